"""Protocol 3, unseen knockouts: predict CRISPR knockouts never seen in training (Papalexi 2021, THP-1).

    python experiments/protocol_3_unseen_knockouts.py [--max-minutes 7] [--n-holdout 4] [--quick]

Data: the embedded Papalexi 2021 ECCITE-seq screen (25 knockouts + non-targeting, raw counts).
One model is trained with ``--n-holdout`` knockouts left out (a seeded random choice, not
one per model, to fit the time budget) plus the reference half of the control cells, and
predicts each held-out knockout written as ``ko:GENE``.

Which knockouts can be held out: a gene-level model represents a knockout it never saw only
through the target gene's own token, so the candidates are the knockouts whose target is
one of the 299 measured genes (9 of 25: CMTM6, IFNGR2, JAK2, NFKBIA, STAT1, STAT2, STAT3,
TNFRSF14, UBE2L6); the other 16 targets get a learned token only when trained on.
Baseline to beat: ``pertmean`` (control + the mean effect of the training knockouts), issue 11's
named baseline. ``coexpression`` (session 34) is stronger on this screen: ``pertmean`` plus how the
genes move with the knocked-out gene across the training cells, scaled by one factor fitted on
the training knockouts (``virtualcell.evaluate.baselines.coexpression``); it is scored beside it.
The model generates a knockout it never trained on with that baseline's shift on its logits (the
coexpression prior, ``GenerationConfig.coexpression_prior``, session 35); ``model (no prior)`` is the
same model and sampling seed without it.

``--set unseen_fraction=0.2``: training also holds a fifth of its own knockouts out whole, so
its verdict judges the model on knockouts it never saw and fits the blend weight served for
every held-out knockout (``verdict["unseen"]``); those knockouts are then not trained on.
Without it (the default) the served blend uses the weight fitted on trained knockouts.
"""

from __future__ import annotations

import time

import numpy as np

import _protocol as P

TOP_K = 100  # genes per cell sentence
N_HOLDOUT = 4  # knockouts held out by default
BASELINES = ("nochange", "pertmean", "linear", "coexpression")
NO_PRIOR = "model (no prior)"  # the pure model without the coexpression prior, scored beside it


def data(seed: int, n_holdout: int):  # noqa: ANN201
    """The split: ``(adata, contract, held knockouts, candidates, train, baseline, reference)``."""
    import virtualcell as vc

    adata = vc.datasets.load("papalexi2021")
    contract = vc.DataContract.from_adata(adata)
    labels = contract.labels(adata)
    genes = {str(g).upper() for g in adata.var_names}
    candidates = sorted(p for p in set(labels) - {contract.control} if p.upper() in genes)
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(candidates, min(n_holdout, len(candidates)), replace=False).tolist())
    baseline, reference = P.split(adata, contract, seed=seed)
    test = np.isin(labels, held) | adata.obs_names.isin(reference.obs_names[contract.is_control(reference)])
    P.mark_test(adata, test)
    train_ad = adata[~test].copy()
    return adata, contract, held, candidates, train_ad, baseline, reference


def unseen_note(verdict: dict | None) -> str:
    """The training run's verdict on the knockouts it held out whole (``unseen_fraction``), whose blend
    weight the served prediction of every held-out knockout uses; empty without one."""
    unseen = (verdict or {}).get("unseen")
    return f" Training's verdict on knockouts it held out whole: {unseen['summary']}" if unseen else ""


def main(argv: list[str] | None = None) -> None:
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--n-holdout", type=int, default=N_HOLDOUT, help="knockouts held out (seeded random among representable)")
    ap.add_argument("--n-cells", type=int, default=200, help="baseline control cells to predict from")
    ap.add_argument("--model", default=None, help="score a checkpoint this protocol trained at this --seed "
                    "(--model-dir DIR: DIR/protocol3) instead of training one")
    args = ap.parse_args(argv)
    P.setup(args.threads)
    started = time.perf_counter()

    adata, contract, held, candidates, train_ad, baseline, reference = data(args.seed, args.n_holdout)
    print(f"protocol 3: held-out knockouts {held} (of representable {candidates}); training on {train_ad.n_obs} cells",
          flush=True)
    if args.model:
        trained = P.load_trained(args.model, seed=args.seed, held=held)
    else:
        cfg = P.train_config(args, top_k=TOP_K, max_steps=3000, kind="knockout")
        trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name="protocol3")
    n_cells = 8 if args.quick else args.n_cells
    pred, _, pred_s = P.predict(trained.model, baseline, {p: f"ko:{p}" for p in held},
                                perturbation_key=contract.perturbation_key, n_cells=n_cells, seed=args.seed,
                                samples=args.samples, temperature=args.temperature, guidance=args.guidance)
    # the same model without the coexpression prior on its logits (session 35), from the same sampling seed
    alone, _, _ = P.predict(trained.model, baseline, {p: f"ko:{p}" for p in held},
                            perturbation_key=contract.perturbation_key, n_cells=n_cells, seed=args.seed,
                            samples=args.samples, temperature=args.temperature, guidance=args.guidance, blend=False,
                            coexpression_prior=False)
    pred.uns.setdefault(P.METHODS, {})[NO_PRIOR] = alone
    table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract,
                    focus=[(p, "all") for p in held], baselines=BASELINES, seed=args.seed)
    summ = P.summary(table)
    per = table.pivot_table(index=["perturbation", "method"], columns="metric", values="value").reset_index()
    report = P.Report(
        3, "unseen_knockouts", "Unseen knockouts (Papalexi 2021 THP-1 CRISPR KO)",
        __doc__.split("\n\n", 2)[2],
        [P.headline(summ, m, list(BASELINES)) for m in P.METRICS],
        summ, table,
        extra_md=(f"Held-out knockouts: {', '.join(held)}. Training: {trained.described()}; "
                  f"{min(n_cells, baseline.n_obs)} baseline control cells predicted in "
                  f"{pred_s:.0f} s. The discrimination score ranks each prediction among all 25 measured "
                  f"knockouts.{unseen_note(trained.verdict)}\n\nPer knockout:\n\n" + P.markdown_table(per)),
        meta={"held_out": held, "candidates": candidates,
              "training": trained.record(),
              "prediction_seconds": round(pred_s, 1), "n_cells": n_cells},
    )
    P.write(report, args.out, started=started, quick=args.quick, args=args)


if __name__ == "__main__":
    main()
