"""How much of each perturbation's effect do the training pairs carry, under each pairing?

    python experiments/pairing_shrinkage.py [--data papalexi2021] [--seed 0]

A training pair (source control cell, target cell) teaches the model ``target − source``. Over
a perturbation's cells, the mean of that is what the model can learn as the perturbation's
effect. This script builds the pairs of ``virtualcell.train.build_pairs`` with every pairing
(``ot``, ``nearest``, ``random``) and reports, for each perturbation, the share of its measured
effect (mean of its cells minus mean of the control cells, per context, on log-normalized
expression) that the pairs carry: the projection ``<d_pairs, d> / <d, d>``. 1 means the pairs
carry the whole effect; below 1, the pairs shrink it, and a model trained on them learns the
shrunk effect. No model is trained. Writes ``experiments/results/pairing_shrinkage[_DATA].{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="papalexi2021", help="an embedded dataset name or an .h5ad path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--top", type=int, default=10, help="list this many perturbations (largest effects first)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results")
    args = ap.parse_args(argv)

    import virtualcell as vc
    from virtualcell.sentences import detect_scale, expression_matrix, log_normalize
    from virtualcell.train import PAIRINGS, build_pairs

    adata = vc.datasets.load(args.data) if not args.data.endswith(".h5ad") else vc.datasets.read_h5ad(args.data)
    contract = vc.DataContract.from_adata(adata)
    X = expression_matrix(adata)
    X = log_normalize(X, detect_scale(X))
    X = np.asarray(X.todense()) if hasattr(X, "todense") else np.asarray(X)
    labels, ctx, is_ctrl = contract.labels(adata), contract.contexts(adata), contract.is_control(adata)
    perts = sorted(set(labels[~is_ctrl]))
    measured = {}
    for p in perts:  # per context against that context's controls, weighted by the perturbation's cells there
        m = labels == p
        d = np.zeros(X.shape[1])
        for c in np.unique(ctx[m]):
            mc = m & (ctx == c)
            d += mc.sum() * (X[mc].mean(0) - X[is_ctrl & (ctx == c)].mean(0))
        measured[p] = d / m.sum()
    size = {p: float(np.linalg.norm(measured[p])) for p in perts}
    rows, seconds = {p: {"perturbation": p, "effect norm": round(size[p], 3)} for p in perts}, {}
    for method in PAIRINGS:
        t = time.perf_counter()
        src, _ = build_pairs(adata, contract, pairing=method, seed=args.seed)
        seconds[method] = round(time.perf_counter() - t, 2)
        for p in perts:
            m = labels == p
            d_pairs = (X[m] - X[src[m]]).mean(0)
            d = measured[p]
            rows[p][method] = round(float(d_pairs @ d / (d @ d)), 3)
    table = sorted(rows.values(), key=lambda r: -r["effect norm"])
    top = table[: args.top]
    summary = {m: {"median": round(float(np.median([r[m] for r in table])), 3),
                   "median of the top": round(float(np.median([r[m] for r in top])), 3),
                   "range of the top": [min(r[m] for r in top), max(r[m] for r in top)]} for m in PAIRINGS}
    cmd = "python experiments/pairing_shrinkage.py" + (f" --data {args.data}" if args.data != "papalexi2021" else "") \
        + (f" --seed {args.seed}" if args.seed else "")
    cols = ["perturbation", "effect norm", *PAIRINGS]
    md = [f"# Share of each perturbation's effect the training pairs carry ({args.data})", "",
          f"`{cmd}` — `build_pairs` with each pairing (seed {args.seed}); per perturbation, the projection of "
          "mean(target − source) over its cells on its measured effect (1: the whole effect). Seconds to build the "
          f"pairs: {seconds}.", "",
          "| pairing | median, all perturbations | median, the largest " + str(len(top)) + " | range, the largest "
          + str(len(top)) + " |", "|---|---|---|---|"]
    md += [f"| {m} | {s['median']:.2f} | {s['median of the top']:.2f} | {s['range of the top'][0]:.2f} to "
           f"{s['range of the top'][1]:.2f} |" for m, s in summary.items()]
    md += ["", f"The {len(top)} largest effects:", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in top]
    stem = "pairing_shrinkage" + ("" if args.data == "papalexi2021" else "_" + Path(args.data).stem)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.md").write_text("\n".join(md) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"command": cmd, "seconds": seconds, "summary": summary,
                                                                 "rows": table}, indent=1))
    print("\n".join(md))


if __name__ == "__main__":
    main()
