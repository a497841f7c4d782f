"""Protocol 6, doses never trained on: does the model fill in a titration's missing dose?

    python experiments/protocol_6_dose_interpolation.py [--seed 0] [--max-minutes 7] [--threads 1] [--quick]
    python experiments/protocol_6_dose_interpolation.py --summary [FOLDER]   # means over its seed*/ runs

Data: the known-answer synthetic screen (``vc.datasets.synthetic_screen``, seeded) with drugs at five
doses (0.1, 0.3, 1, 3, 10 in units of their IC50 scale), knockouts, one context. Every drug's middle
dose (1) is held out whole: the model trains on the other doses, so it never sees a cell at dose 1
and no drug trains the dose's token, and predicts each drug at dose 1 from one half of the control
cells; the other half is the reference the measured effects are taken against.

Its headline is ``pearson_delta`` (all genes, top 50), next to:

* ``dose``: each drug's measured effects at its neighbouring doses (0.3 and 3), interpolated in log
  dose (``vc.evaluate.baselines.dose``): what a pharmacologist would draw between two measured points;
* ``pertmean``: the mean effect of every other condition; ``nochange``;
* the split-half ceiling of the measured dose-1 cells.

A screen flags such a dose ``trained = False`` (``ScreenResult.ranking``): this protocol measures what
that prediction is worth. One seed is a check, not a table row: run seeds 0, 1 and 2.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

import _protocol as P

DOSES = (0.1, 0.3, 1.0, 3.0, 10.0)
HELD_DOSE = 1.0
TOP_K = 100
CONTEXT = "typeA"  # the synthetic screen's one context


def data(seed: int, quick: bool = False):  # noqa: ANN201
    """``(adata, contract, held labels, training cells, baseline controls, reference)``."""
    import virtualcell as vc

    adata = vc.datasets.synthetic_screen(
        n_genes=60 if quick else 200, n_tfs=10 if quick else 20, n_knockouts=4 if quick else 10, n_pairs=0,
        n_drugs=3 if quick else 8, n_cytokines=0, doses=DOSES, n_cells_per_condition=30 if quick else 100,
        n_control_cells=120 if quick else 600, n_contexts=1, seed=seed)
    contract = vc.DataContract.from_adata(adata)
    conditions = contract.conditions(adata)
    drugs = (adata.obs["perturbation_type"] == "drug").to_numpy()
    doses = adata.obs["dose"].to_numpy(float)
    test = drugs & np.isclose(doses, HELD_DOSE)
    held = sorted(str(c) for c in set(conditions[test]))
    baseline, rest = P.split(adata, contract, seed=seed)
    P.mark_test(adata, test)
    train = adata[~test & np.isin(adata.obs_names, rest.obs_names)].copy()
    reference = rest[np.isin(rest.obs_names, adata.obs_names[test]) | contract.is_control(rest)].copy()
    return adata[np.isin(adata.obs_names, rest.obs_names)].copy(), contract, held, train, baseline, reference


def summarize(folder: Path) -> Path:
    """``summary.md`` in ``folder``: each method's mean over the ``seed*/`` runs there (each seed's mean over its
    held-out doses; every seed holds out the same number), beside the per-seed pearson_delta."""
    import json

    import pandas as pd

    runs = {int(d.name[4:]): json.loads((d / "protocol_6_dose_interpolation.json").read_text())
            for d in sorted(folder.glob("seed*")) if (d / "protocol_6_dose_interpolation.json").exists()}
    if not runs:
        raise SystemExit(f"no seed*/protocol_6_dose_interpolation.json in {folder}")
    frame = pd.DataFrame([r | {"seed": s} for s, run in runs.items() for r in run["summary"]])
    cols = [f"{m} mean" for m in P.METRICS]
    table = frame.groupby("method", sort=False)[cols].mean().round(3)
    table["pearson_delta per seed"] = frame.groupby("method", sort=False)["pearson_delta mean"].apply(
        lambda v: " / ".join(f"{x:.2f}" for x in v))
    steps = [run["training"]["steps"] for run in runs.values()]
    shown = folder.resolve().relative_to(P.ROOT) if folder.resolve().is_relative_to(P.ROOT) else folder
    lines = ["# Protocol 6: doses never trained on, seeds " + ", ".join(map(str, runs)), "",
             f"`python experiments/protocol_6_dose_interpolation.py --summary {shown}` over its `seed*/` runs (each "
             "run's command heads its `protocol_6_dose_interpolation.md`: `--seed S --threads 1` trains, `--model` "
             "scores a kept checkpoint again). "
             f"Training: {min(steps)}-{max(steps)} steps in the 7-minute budget. Means over seeds of each seed's mean "
             "over its 8 held-out doses.", "",
             P.markdown_table(table.reset_index()), ""]
    out = folder / "summary.md"
    out.write_text("\n".join(lines))
    print("\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        import sys

        argv = sys.argv[1:]
    if argv[:1] == ["--summary"]:
        summarize(Path(argv[1]) if len(argv) > 1 else P.RESULTS / "dose_interpolation")
        return
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--n-cells", type=int, default=100, help="baseline control cells perturbed per drug")
    ap.add_argument("--model", default=None,
                    help="score this kept checkpoint (DIR/protocol6 of an earlier --model-dir run at the same --seed) "
                         "instead of training one: the same split and prediction, so a change to serving or scoring "
                         "is measured on the same model")
    args = ap.parse_args(argv)
    if args.out == str(P.RESULTS):
        args.out = str(P.RESULTS / "dose_interpolation" / f"seed{args.seed}")
    P.setup(args.threads)
    started = time.perf_counter()

    adata, contract, held, train, baseline, reference = data(args.seed, args.quick)
    print(f"protocol 6: {len(held)} held-out drug doses {held}; training on {int((adata.obs[P.SPLIT] != 'test').sum())} "
          f"cells", flush=True)
    if args.model:
        trained = P.load_trained(args.model, seed=args.seed)
    else:
        cfg = P.train_config(args, top_k=TOP_K, kind_key="perturbation_type")
        trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name="protocol6")
    targets = {p: p for p in held}  # the data's own names ("drugA@1"): the model reads the drug at that dose
    n_cells = 8 if args.quick else args.n_cells
    # predicted cells are labelled with the condition itself ("drugA@1") and carry no dose column
    pred, _, pred_s = P.predict(trained.model, baseline, targets, perturbation_key=contract.perturbation_key,
                                context=(contract.context_key, CONTEXT), n_cells=n_cells, seed=args.seed,
                                samples=args.samples, temperature=args.temperature, guidance=args.guidance)
    baselines = ("nochange", "pertmean", "dose")
    table = P.score(pred, reference, baseline=baseline, train=train, contract=contract, baselines=baselines,
                    seed=args.seed, cell_eval=False)
    table = table[table["perturbation"].isin(held)].copy()
    summ = P.summary(table)
    trained_doses = sorted({float(d) for d in adata.obs["dose"][adata.obs[P.SPLIT] != "test"] if d > 0})
    report = P.Report(
        6, "dose_interpolation", "Doses never trained on (synthetic titration)",
        __doc__.split("\n\n", 2)[2],
        [P.headline(summ, m, list(baselines)) for m in P.METRICS],
        summ, table,
        extra_md=(f"Held-out conditions: {', '.join(held)} (trained doses {trained_doses}). Training: "
                  f"{trained.described()}; prediction from {min(n_cells, baseline.n_obs)} baseline "
                  f"control cells in {pred_s:.0f} s."),
        meta={"held_out": held, "trained_doses": trained_doses,
              "training": trained.record(),
              "prediction_seconds": round(pred_s, 1), "n_cells": n_cells},
    )
    P.write(report, args.out, started=started, quick=args.quick, args=args)


if __name__ == "__main__":
    main()
