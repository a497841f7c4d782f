"""Protocol 2, unseen pairs: predict CRISPRa combinations A+B never seen in training (PerturBench K562).

    python experiments/protocol_2_unseen_pairs.py [--max-minutes 7] [--quick] [--out experiments/results]

Data: the K562 CRISPRa part of the perturbench file (Norman et al. 2019): singles and pairs,
100 cells each. Held out: the pairs whose two components are both measured alone (the pairs
the ``additive`` baseline can predict; all of them unless ``--n-pairs`` picks a seeded random
subset), plus the reference half of the control cells. The model trains on every single,
the other pairs (so it sees combination prompts) and the baseline half of the controls, then
predicts each held-out pair ``act:A + act:B`` from the baseline controls.
Baseline to beat: ``additive`` (effect(A) + effect(B), measured alone).

``model (composed)`` (session 36) is the same model writing each held-out pair from its parts' logits
(``control + sum(part - control)`` at every step; ``GenerationConfig.compose``) instead of from the pair's
prompt, with the same sampling seed. ``--singles-only`` trains on the singles alone (no pair at all), as a
screen of single perturbations asked about pairs would be: the pair prompt is then a form the model never read.
"""

from __future__ import annotations

import time

import numpy as np

import _protocol as P

PAIR = "+"
TOP_K = 200  # genes per cell sentence


COMPOSED = "model (composed)"  # the same model writing each pair from its parts' logits, scored beside it


def data(seed: int, n_pairs: int = 0, singles_only: bool = False):  # noqa: ANN201
    """The split: ``(adata, contract, held pairs, train, baseline, reference, number of singles, number of pairs)``;
    ``singles_only``: every pair is held out of training (the held-out pairs are still the ones predicted)."""
    import virtualcell as vc

    adata = vc.datasets.load("perturbench")
    adata = adata[(adata.obs["cell_type"] == "k562").to_numpy()].copy()
    contract = vc.DataContract.from_adata(adata)
    labels = contract.labels(adata)
    singles = {p for p in set(labels) if PAIR not in p and p != contract.control}
    pairs = sorted({p for p in set(labels) if PAIR in p})
    predictable = [p for p in pairs if all(g in singles for g in p.split(PAIR))]
    rng = np.random.default_rng(seed)
    held = predictable if n_pairs <= 0 else sorted(rng.choice(predictable, n_pairs, replace=False))
    baseline, reference = P.split(adata, contract, seed=seed)
    ref_ctrl = set(reference.obs_names[contract.is_control(reference)])
    test = np.isin(labels, pairs if singles_only else held) | adata.obs_names.isin(ref_ctrl)
    P.mark_test(adata, test)
    train_ad = adata[~test].copy()
    return adata, contract, held, train_ad, baseline, reference, len(singles), len(pairs)


def main(argv: list[str] | None = None) -> None:
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--n-pairs", type=int, default=0, help="hold out this many predictable pairs (0 = all)")
    ap.add_argument("--n-cells", type=int, default=50, help="baseline cells to predict from (all 50 by default)")
    ap.add_argument("--singles-only", action="store_true", help="train on the singles alone (no pair at all)")
    args = ap.parse_args(argv)
    P.setup(args.threads)
    started = time.perf_counter()

    adata, contract, held, train_ad, baseline, reference, n_singles, n_pairs = data(args.seed, args.n_pairs,
                                                                                   args.singles_only)
    n_other = 0 if args.singles_only else n_pairs - len(held)
    print(f"protocol 2: {len(held)} held-out pairs {held}; training on {train_ad.n_obs} cells "
          f"({n_singles} singles, {n_other} other pairs)", flush=True)

    cfg = P.train_config(args, top_k=TOP_K, max_steps=3000, kind_key="perturbation_type")
    trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name="protocol2")
    targets = {p: " + ".join(f"act:{g}" for g in p.split(PAIR)) for p in held}
    n_cells = 8 if args.quick else args.n_cells
    pred, _, pred_s = P.predict(trained.model, baseline, targets, perturbation_key=contract.perturbation_key,
                                context=("cell_type", "k562"), n_cells=n_cells, seed=args.seed,
                                samples=args.samples, temperature=args.temperature, guidance=args.guidance)
    # the same model writing each pair composed from its parts' logits, from the same sampling seed
    composed, _, _ = P.predict(trained.model, baseline, targets, perturbation_key=contract.perturbation_key,
                               context=("cell_type", "k562"), n_cells=n_cells, seed=args.seed, samples=args.samples,
                               temperature=args.temperature, guidance=args.guidance, blend=False, compose=True)
    pred.uns.setdefault(P.METHODS, {})[COMPOSED] = composed
    table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract,
                    focus=[(p, "k562") for p in held], seed=args.seed)
    summ = P.summary(table)
    base = ["nochange", "additive", "pertmean", "linear"]
    report = P.Report(
        2, "unseen_pairs", "Unseen pairs (PerturBench K562 CRISPRa)",
        __doc__.split("\n\n", 2)[2],
        [P.headline(summ, m, base) for m in P.METRICS],
        summ, table,
        extra_md=(("Trained on the singles alone (--singles-only). " if args.singles_only else "")
                  + f"Held-out pairs: {', '.join(held)}. Training: {trained.described()}; prediction from "
                  f"{min(n_cells, baseline.n_obs)} baseline control cells in {pred_s:.0f} s. "
                  "`meanshift` does not apply (one cell line)."),
        meta={"held_out": held, "training": trained.record(),
              "prediction_seconds": round(pred_s, 1), "n_cells": n_cells},
    )
    P.write(report, args.out, started=started, quick=args.quick, args=args)


if __name__ == "__main__":
    main()
