"""Unseen knockouts on the known-answer synthetic screen: protocol 3's question on a second dataset.

    python experiments/unseen_knockouts_synthetic.py [--seed 0] [--threads 1] [--max-minutes 7] [--n-holdout 4]
                                                     [--model-dir DIR | --model DIR/unseen_synthetic] [--out DIR]

Data: ``vc.datasets.synthetic_screen(seed=SEED)`` (a networkx regulatory network; knockouts of transcription
factors that are genes of the panel, pairs, drugs at doses, cytokines; two cell types). ``--n-holdout`` single
knockouts (a seeded choice) are left out of training whole, with every pair that contains one of them (so the
model never saw the gene knocked out) and the reference half of the control cells. One model is trained as
protocol 3 trains (7 minutes, 1 thread, the trainer's defaults) and predicts each held-out knockout, written
``ko:GENE``, from the baseline controls of each cell type.

It scores the pure model with the coexpression prior (``GenerationConfig.coexpression_prior``, the default) and,
from the same model and sampling seed, without it, beside ``pertmean`` and ``coexpression`` (which learn from
the training split only) and the ceiling, as protocol 3 does. Written to ``--out`` as
``unseen_knockouts_synthetic.{md,json}`` (default ``experiments/results/attempts/coexpression_prior/synthetic/
seedSEED``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

import _protocol as P

TOP_K = 100
N_HOLDOUT = 4
CONTEXT_KEY = "cell_type"
BASELINES = ("pertmean", "coexpression")
NO_PRIOR = "model (no prior)"
PAIR = "+"


def data(seed: int, n_holdout: int):  # noqa: ANN201
    """``(adata, contract, held knockouts, train, baseline, reference)``; ``train`` lacks the held-out knockouts,
    the pairs that hold one of them and the reference control half."""
    import virtualcell as vc

    adata = vc.datasets.synthetic_screen(seed=seed)
    contract = vc.DataContract.from_adata(adata)
    labels = np.asarray(contract.labels(adata)).astype(str)
    kinds = adata.obs["perturbation_type"].astype(str).to_numpy()
    genes = {str(g).upper() for g in adata.var_names}
    singles = sorted({p for p, k in zip(labels, kinds) if k == "knockout" and PAIR not in p and p.upper() in genes})
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(singles, min(n_holdout, len(singles)), replace=False).tolist())
    baseline, reference = P.split(adata, contract, seed=seed, context_key=CONTEXT_KEY)
    touches = np.array([any(g in held for g in p.split(PAIR)) for p in labels])
    test = touches | adata.obs_names.isin(reference.obs_names[contract.is_control(reference)])
    P.mark_test(adata, test)
    return adata, contract, held, adata[~test].copy(), baseline, reference


def main(argv: list[str] | None = None) -> None:
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--n-holdout", type=int, default=N_HOLDOUT, help="single knockouts held out (seeded)")
    ap.add_argument("--n-cells", type=int, default=100, help="baseline control cells per cell type to predict from")
    ap.add_argument("--model", default=None, help="score a checkpoint this script trained at this --seed "
                    "(--model-dir DIR: DIR/unseen_synthetic) instead of training one")
    ap.set_defaults(out=None)
    args = ap.parse_args(argv)
    out = Path(args.out or P.RESULTS / "attempts" / "coexpression_prior" / "synthetic" / f"seed{args.seed}")
    P.setup(args.threads)
    started = time.perf_counter()
    adata, contract, held, train_ad, baseline, reference = data(args.seed, args.n_holdout)
    print(f"unseen knockouts (synthetic, seed {args.seed}): held out {held}; training on {train_ad.n_obs} cells",
          flush=True)
    if args.model:
        trained = P.load_trained(args.model, seed=args.seed, held=held)
    else:
        cfg = P.train_config(args, top_k=TOP_K, max_steps=3000, kind_key="perturbation_type")
        trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name="unseen_synthetic")
    n_cells = 8 if args.quick else args.n_cells
    targets = {p: f"ko:{p}" for p in held}
    preds, alones, focus = [], [], []
    for ctx in sorted(set(baseline.obs[CONTEXT_KEY].astype(str))):
        cells = baseline[baseline.obs[CONTEXT_KEY].astype(str) == ctx]
        kw = dict(perturbation_key=contract.perturbation_key, context=(CONTEXT_KEY, ctx), n_cells=n_cells,
                  seed=args.seed, samples=args.samples, temperature=args.temperature, guidance=args.guidance)
        preds.append(P.predict(trained.model, cells, targets, blend=False, **kw)[0])
        alones.append(P.predict(trained.model, cells, targets, blend=False, coexpression_prior=False, **kw)[0])
        focus += [(p, ctx) for p in held]
    import anndata as ad

    pred = ad.concat(preds, merge="same")
    pred.uns[P.METHODS] = {NO_PRIOR: ad.concat(alones, merge="same")}
    table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract, focus=focus,
                    baselines=BASELINES, context_key=CONTEXT_KEY, seed=args.seed, cell_eval=False)
    summ = P.summary(table)
    per = table.pivot_table(index=["perturbation", "context", "method"], columns="metric", values="value").reset_index()
    wall = time.perf_counter() - started
    md = [f"# Unseen knockouts on the synthetic screen (seed {args.seed})", "", f"`{P.command_line()}`", "",
          f"Held out: {', '.join(held)} (with every pair holding one); training: {trained.steps} steps in "
          f"{trained.seconds / 60:.1f} min; {n_cells} baseline cells per cell type; {wall / 60:.1f} min in all.", "",
          P.markdown_table(summ), "", "Per knockout and cell type:", "", P.markdown_table(per), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "unseen_knockouts_synthetic.md").write_text("\n".join(md))
    record = {"command": P.command_line(), "seed": args.seed, "held_out": held, "steps": trained.steps,
              "training_seconds": round(trained.seconds, 1), "wall_seconds": round(wall, 1),
              "summary": summ.to_dict(orient="records"), "table": table.to_dict(orient="records")}
    (out / "unseen_knockouts_synthetic.json").write_text(json.dumps(record, indent=1, default=float))
    print(P.markdown_table(summ))
    print(f"wrote {out}/unseen_knockouts_synthetic.{{md,json}} ({wall / 60:.1f} min)")


if __name__ == "__main__":
    main()
