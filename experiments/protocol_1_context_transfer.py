"""Protocol 1, context transfer: predict IFN-beta's effect in a cell type where it was never measured.

    python experiments/protocol_1_context_transfer.py [--max-minutes 7] [--cell-types CD4T] [--quick]

Data: the Kang 2018 scGen validation split (PBMC, 7 cell types, control and IFN-beta stimulated,
log-normalized). For each held-out cell type, one model is trained on every cell except the
held-out type's stimulated cells and the reference half of its control cells; it then predicts
the stimulated state from the baseline half of that type's control cells.

Which cell type: by default CD4T, fixed in advance by a rule, not by results — it is the
type held out in scGen's main benchmark (Lotfollahi et al. 2019) and the largest stimulated
group here (356 cells), so its measured delta is the least noisy. ``--cell-types all`` (or a
comma list) loops over several, one model each; each adds a training budget to the wall time.
Baseline to beat: ``meanshift`` (control of the held-out type + the mean IFN-beta effect in the
other six types). The discrimination score does not apply: one perturbation per cell type.
"""

from __future__ import annotations

import time

import pandas as pd

import _protocol as P

DEFAULT_TYPES = "CD4T"
METRICS = ("pearson_delta", "pearson_delta_top50")


def main(argv: list[str] | None = None) -> None:
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--cell-types", default=DEFAULT_TYPES, help="comma list of held-out cell types, or 'all'")
    ap.add_argument("--n-cells", type=int, default=200, help="at most this many baseline cells to predict from")
    args = ap.parse_args(argv)
    P.setup(args.threads)
    started = time.perf_counter()
    import virtualcell as vc

    adata = vc.datasets.load("kang2018_scgen")
    contract = vc.DataContract.from_adata(adata)
    ctx_key, stim = contract.context_key, "stimulated"
    contexts = contract.contexts(adata)
    types = sorted(set(contexts)) if args.cell_types == "all" else args.cell_types.split(",")
    baseline, reference = P.split(adata, contract, seed=args.seed)
    ref_ctrl = adata.obs_names.isin(reference.obs_names[contract.is_control(reference)])
    tables, runs = [], []
    for ct in types:
        test = (contexts == ct) & ((contract.labels(adata) == stim) | ref_ctrl)
        P.mark_test(adata, test)
        train_ad = adata[~test].copy()
        base_ct = baseline[(contract.contexts(baseline) == ct)].copy()
        print(f"protocol 1: hold out {ct} ({int(test.sum())} cells); {base_ct.n_obs} baseline controls", flush=True)
        cfg = P.train_config(args, top_k=100, max_steps=3000)
        trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name=f"protocol1_{ct}")
        n_cells = 8 if args.quick else args.n_cells
        pred, _, pred_s = P.predict(trained.model, base_ct, {stim: stim}, perturbation_key=contract.perturbation_key,
                                    context=(ctx_key, ct), n_cells=n_cells, seed=args.seed,
                                samples=args.samples, temperature=args.temperature, guidance=args.guidance)
        table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract, focus=[(stim, ct)],
                        metrics=METRICS, baselines=("nochange", "meanshift", "linear"), seed=args.seed)
        tables.append(table)
        runs.append({"cell_type": ct, "training": trained.record(),
                     "prediction_seconds": round(pred_s, 1), "n_cells": min(n_cells, base_ct.n_obs)})
    table = pd.concat(tables, ignore_index=True)
    table.attrs = tables[0].attrs
    summ = P.summary(table, METRICS)
    per_type = table[table["metric"].isin(METRICS)].pivot_table(index=["context", "method"], columns="metric",
                                                                 values="value").reset_index()
    lines = [f"- {r['cell_type']}: {r['training']['steps']} training steps in {r['training']['seconds'] / 60:.1f} min "
             f"(final loss {r['training']['final_loss']:.3f}, validation {r['training']['val_loss']:.3f}); "
             f"{r['n_cells']} baseline cells predicted in {r['prediction_seconds']:.0f} s" for r in runs]
    report = P.Report(
        1, "context_transfer", "Context transfer (Kang 2018 IFN-beta, leave one cell type out)",
        __doc__.split("\n\n", 2)[2],
        [P.headline(summ, m, ["nochange", "meanshift", "linear"]) for m in METRICS],
        summ, table,
        extra_md="Per held-out cell type:\n\n" + P.markdown_table(per_type) + "\n\n" + "\n".join(lines),
        meta={"held_out_cell_types": types, "runs": runs}, metrics=METRICS,
    )
    P.write(report, args.out, started=started, quick=args.quick, args=args)


if __name__ == "__main__":
    main()
