"""Protocol 5, cytokine response: predict IFN-beta-stimulated PBMCs from held-out control cells (Kang 2018).

    python experiments/protocol_5_cytokine_response.py [--max-minutes 7] [--quick] [--model-dir DIR | --model DIR/protocol5]

Data: the Kang 2018 harmony file (2,000 PBMCs, 1,000 control and 1,000 IFN-beta, raw counts,
no cell-type labels). A seeded random half of the stimulated cells and a random half of the
control cells are held out; the held-out controls are split again into a baseline half (fed
to the model and the baselines) and a reference half (for measured deltas). The model trains
on the other half of the data and predicts ``cytokine:IFNB`` for every baseline cell.

Scores: distributions — the E-distance (pertpy, PCA of the measured cells) between predicted
and measured stimulated cells, against the split-half E-distance of the measured cells (the
ceiling: half of the held-out stimulated cells against the other half) — and means
(``pearson_delta`` all / top 50). ``meanshift`` is the held-out controls shifted by the mean
IFN-beta effect in the training half (the two halves are the two "contexts"); ``nochange``
(the controls themselves) shows how far apart control and stimulated cells are.
``meanshift (non-negative)`` is meanshift made non-negative as the model's predictions are (clipped
at 0, each gene rescaled to the shifted mean): plain meanshift leaves a cell below 0 wherever it
expresses a gene less than the gene's drop, which no served prediction does, and E-distance, unlike the
means, sees it (reported beside it, not a target). E-distance
depends on group sizes: the model and the baselines predict as many cells as there are
baseline controls, the ceiling compares two halves of the measured group.

``model (draws)`` (session 44): the E-distance of one draw per baseline cell, each cell's first generated
sample alone (``Simulator.simulate(keep_draws=True)``), calibrated as every prediction is. Where the training
run's verdict chose several samples per cell, each served cell is their average (the cell's expected
response), a narrower population than the model samples; reported beside the served cells, not a target.
"""

from __future__ import annotations

import time

import numpy as np

import _protocol as P

HALF = "vc_half"
METRICS = ("pearson_delta", "pearson_delta_top50", "edistance")
DISTRIBUTION = ("edistance",)  # also scored on the model's draws (P.with_draws): one generated sample per cell
TOP_K = 100  # genes per cell sentence
NONNEGATIVE = "meanshift (non-negative)"  # reported beside meanshift: see the docstring


def baselines() -> dict:
    """The protocol's baselines, by name: nochange, meanshift and meanshift made non-negative."""
    from functools import partial

    from virtualcell.evaluate import baselines as B

    return {"nochange": B.nochange, "meanshift": B.meanshift, NONNEGATIVE: partial(B.meanshift, nonnegative=True)}


def data(seed: int):  # noqa: ANN201
    """The split: ``(adata, contract, stim, train, baseline, reference)``; ``adata`` marks the test cells."""
    import virtualcell as vc

    adata = vc.datasets.load("kang2018_harmony")
    contract = vc.DataContract.from_adata(adata)
    labels = contract.labels(adata)
    stim = sorted(set(labels) - {contract.control})[0]
    rng = np.random.default_rng(seed)
    test = np.zeros(adata.n_obs, dtype=bool)
    for lbl in (contract.control, stim):
        idx = np.flatnonzero(labels == lbl)
        test[rng.choice(idx, idx.size // 2, replace=False)] = True
    adata.obs[HALF] = np.where(test, "heldout", "train")
    P.mark_test(adata, test)
    held = adata[test].copy()
    baseline, reference = P.split(held, contract, seed=seed, context_key=HALF)
    return adata, contract, stim, adata[~test].copy(), baseline, reference


def main(argv: list[str] | None = None) -> None:
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--n-cells", type=int, default=250, help="at most this many baseline cells to predict from")
    ap.add_argument("--model", default=None, help="score a checkpoint this protocol trained at this --seed "
                    "(--model-dir DIR: DIR/protocol5) instead of training one")
    args = ap.parse_args(argv)
    P.setup(args.threads)
    started = time.perf_counter()

    adata, contract, stim, train_ad, baseline, reference = data(args.seed)
    print(f"protocol 5: training on {train_ad.n_obs} cells; {baseline.n_obs} baseline controls, "
          f"{reference.n_obs} held-out reference cells", flush=True)
    if args.model:
        trained = P.load_trained(args.model, seed=args.seed)
    else:
        cfg = P.train_config(args, top_k=TOP_K, max_steps=3000, kind="cytokine")
        trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name="protocol5")
    n_cells = 8 if args.quick else args.n_cells
    pred, _, pred_s = P.predict(trained.model, baseline, {stim: stim}, perturbation_key=contract.perturbation_key,
                                context=(HALF, "heldout"), n_cells=n_cells, seed=args.seed,
                                samples=args.samples, temperature=args.temperature, guidance=args.guidance,
                                draws=True)
    # (evaluate() keeps the baseline to the cells the model predicted from, its obs["source_cell"])
    drawn = pred.uns.pop(P.DRAWS)
    score = dict(baseline=baseline, train=train_ad, contract=contract, context_key=HALF, focus=[(stim, "heldout")],
                 seed=args.seed)
    table = P.score(pred, reference, metrics=METRICS, baselines=baselines(), **score)
    # E-distance compares populations: beside the served cells (each averaged over its samples), one draw per cell
    table = P.with_draws(table, P.score(drawn, reference, metrics=DISTRIBUTION, baselines=(), cell_eval=False,
                                        **score), DISTRIBUTION)
    summ = P.summary(table, METRICS)
    rows = [P.headline(summ, "edistance", ["nochange", "meanshift"])]
    rows += [P.headline(summ, m, ["nochange", "meanshift"]) for m in METRICS[:2]]
    report = P.Report(
        5, "cytokine_response", "Cytokine response (Kang 2018 IFN-beta, held-out half)",
        __doc__.split("\n\n", 2)[2], rows, summ, table,
        extra_md=(f"Training: {trained.described()}; {min(n_cells, baseline.n_obs)} "
                  f"baseline cells predicted in {pred_s:.0f} s. One group (IFN-beta), so mean = median and "
                  "the discrimination score does not apply. E-distance: lower is better."),
        meta={"training": trained.record(), "prediction_seconds": round(pred_s, 1),
              "n_cells": n_cells, "n_reference_stimulated": int((contract.labels(reference) == stim).sum())},
        metrics=METRICS,
    )
    P.write(report, args.out, started=started, quick=args.quick, args=args)


if __name__ == "__main__":
    main()
