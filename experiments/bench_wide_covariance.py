"""The coexpression baseline's covariance on a full-transcriptome file: the cells' Gram matrix against the thin SVD.

`virtualcell train` on a screen with genetic perturbations keeps the covariance of up to 4,000 training cells along
at most 256 principal axes (``validation.covariance_factor``). With more genes than cells it now takes the leading
axes from the cells' Gram matrix; before, it ran the thin SVD of the cells x genes matrix. This script times both,
side by side in one run, on the same synthetic sparse log1p matrix (seeded), with each side's peak resident memory
(each in its own process, so one side's peak does not hide the other's), and checks they give the same covariance
along the axes kept (largest entry of ``F F'`` on the first 50 genes, absolute and relative).

Run from the repository root::

    python experiments/bench_wide_covariance.py                  # 4,000 cells x 30,000 genes, ~3 min
    python experiments/bench_wide_covariance.py --genes 6000     # a quick run

Writes ``experiments/results/wide_covariance.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def _cells(n: int, genes: int, density: float, seed: int):  # noqa: ANN202
    import scipy.sparse as sp

    X = sp.random(n, genes, density=density, format="csr", random_state=seed, dtype=np.float32)
    X.data = np.log1p(X.data * 10.0)
    contexts = np.array(["a", "b"])[np.random.default_rng(seed).integers(0, 2, n)]
    return X, contexts


def _svd_factor(X, contexts: np.ndarray, rank: int) -> np.ndarray:  # noqa: ANN001
    """The path before: the thin SVD of the centred cells (what covariance_factor runs for fewer genes than cells)."""
    Z = X.toarray().astype(np.float64)
    for c in sorted(set(contexts)):
        Z[contexts == c] -= Z[contexts == c].mean(axis=0)
    dof = max(Z.shape[0] - len(set(contexts)), 1)
    _, S, Vt = np.linalg.svd(Z, full_matrices=False)
    r = min(rank, int(np.sum(S > 1e-9 * max(S.max(initial=0.0), 1e-12))))
    return (Vt[:r].T * (S[:r] / np.sqrt(dof))).astype(np.float32)


def _worker(side: str, n: int, genes: int, density: float, seed: int, rank: int, out: Path) -> None:
    from virtualcell.validation import covariance_factor

    X, contexts = _cells(n, genes, density, seed)
    t = time.perf_counter()
    F = covariance_factor(X, contexts, max_cells=n, rank=rank) if side == "gram" else _svd_factor(X, contexts, rank)
    seconds = time.perf_counter() - t
    np.save(out / f"{side}.npy", F[:50])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    (out / f"{side}.json").write_text(json.dumps({"seconds": round(seconds, 2), "peak_mib": round(peak), "axes": F.shape[1]}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=4000)
    ap.add_argument("--genes", type=int, default=30000)
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--rank", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="experiments/results/wide_covariance")
    ap.add_argument("--worker", choices=["gram", "svd"], help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.cells, args.genes, args.density, args.seed, args.rank, Path(args.scratch))
        return
    import tempfile

    env = os.environ | {k: str(args.threads) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for side in ("gram", "svd"):
            subprocess.run([sys.executable, __file__, "--worker", side, "--scratch", scratch, "--cells", str(args.cells),
                            "--genes", str(args.genes), "--density", str(args.density), "--rank", str(args.rank),
                            "--seed", str(args.seed)], check=True, env=env)
            results[side] = json.loads((Path(scratch) / f"{side}.json").read_text())
        gram, svd = (np.load(Path(scratch) / f"{s}.npy").astype(np.float64) for s in ("gram", "svd"))
    a, b = gram @ gram.T, svd @ svd.T
    diff = float(np.abs(a - b).max())
    config = {"cells": args.cells, "genes": args.genes, "density": args.density, "rank": args.rank, "seed": args.seed,
              "threads": args.threads, "machine": f"{platform.machine()} python {platform.python_version()}"}
    record = {"config": config, "results": results, "max_abs_diff_FFt": diff, "scale_FFt": float(np.abs(b).max())}
    lines = [
        "# The coexpression baseline's covariance on a wide file: Gram matrix against the thin SVD", "",
        f"`python experiments/bench_wide_covariance.py` — {args.cells:,} cells x {args.genes:,} genes (sparse log1p, "
        f"density {args.density}), at most {args.rank} axes, {args.threads} thread(s), each side in its own process. "
        f"Machine: {config['machine']}.", "",
        "| path | seconds | peak resident MiB | axes kept |", "|---|---|---|---|",
        f"| cells' Gram matrix (`covariance_factor` today) | {results['gram']['seconds']} | {results['gram']['peak_mib']:,} "
        f"| {results['gram']['axes']} |",
        f"| thin SVD (the path before, and today's for fewer genes than cells) | {results['svd']['seconds']} | "
        f"{results['svd']['peak_mib']:,} | {results['svd']['axes']} |", "",
        f"Same covariance along the axes kept: the largest difference of `F F'` on the first 50 genes is {diff:.2e} "
        f"(its largest entry {record['scale_FFt']:.3g}).",
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
