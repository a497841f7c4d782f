"""Why several samples per cell made the knockouts' predicted deltas alike: the control's shared noise.

Every perturbation's delta is calibrated against the same control samples of each cell, so
their sampling noise is shared by all deltas. With ``S`` samples per perturbation and ``C``
control samples, the share of a delta's noise that every other delta also carries is
``(1/C) / (1/C + 1/S) = S / (S + C)``: 0.2 for ``S=1, C=4`` (the old default), 0.5 for
``S=4, C=4`` (``samples=4`` before control samples scaled with it), 0.2 again for ``S=4,
C=16`` (the default now: ``control_samples = 4 × samples``).

On the control cells of the held-out replicate (Papalexi 2021 rep_3) the bundled model
simulates every knockout it knows with each (S, C) and reports, side by side with the
measured rep_3 deltas (the knockout cells against the other rep_3 controls):

- the mean pairwise correlation of the knockouts' deltas, and the same after removing
  their mean over knockouts (what is left when the shared part is gone);
- the norm of the mean delta over the knockouts;
- the MSE of the deltas against the measured ones, and that of predicting no change.

Run: ``python experiments/control_noise.py [--n-cells 60] [--threads 1]`` (about 4 minutes on
one core). Writes ``experiments/results/control_noise.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = ((1, 4), (4, 4), (4, 16))  # (samples per perturbation, control samples)


def mean_pairwise(D: np.ndarray) -> float:
    C = np.corrcoef(D)
    return float(C[np.triu_indices_from(C, 1)].mean())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n-cells", type=int, default=60, help="rep_3 control cells simulated (the rest are the reference)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results"))
    args = ap.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    import virtualcell as vc
    from virtualcell.sentences import model_expression

    model = vc.model.bundled(device="cpu")
    adata = vc.datasets.load("papalexi2021")
    contract = vc.DataContract.from_adata(adata)
    held = (adata.obs["bio_rep"].astype(str) == "rep_3").to_numpy()
    ctrl = np.random.default_rng(args.seed).permutation(np.flatnonzero(held & contract.is_control(adata)))
    base, ref = np.sort(ctrl[: args.n_cells]), np.sort(ctrl[args.n_cells:])
    X, _ = model_expression(adata, model.genes)
    labels = contract.labels(adata)
    ref_mean = np.asarray(X[ref].mean(axis=0)).ravel()
    knockouts = [p for p in model.perturbations.labels if p != contract.control]
    measured = np.stack([np.asarray(X[np.flatnonzero(held & (labels == p))].mean(axis=0)).ravel() - ref_mean
                         for p in knockouts])
    sim = vc.Simulator(adata[base].copy(), model, seed=args.seed)
    rows = [{"setting": "measured rep_3", "shared noise share S/(S+C)": None,
             "mean pairwise correlation": mean_pairwise(measured),
             "after removing the mean": mean_pairwise(measured - measured.mean(0)),
             "norm of the mean delta": float(np.linalg.norm(measured.mean(0))), "MSE": 0.0, "seconds": None}]
    for s, c in SETTINGS:
        t = time.perf_counter()
        res = sim.simulate(knockouts, seed=args.seed, progress=False, blend=None, guidance=1.0, samples=s,
                           control_samples=c)
        D = res.aggregates["delta_model"].values.astype(np.float64)
        rows.append({"setting": f"samples {s}, control samples {c}", "shared noise share S/(S+C)": s / (s + c),
                     "mean pairwise correlation": mean_pairwise(D), "after removing the mean": mean_pairwise(D - D.mean(0)),
                     "norm of the mean delta": float(np.linalg.norm(D.mean(0))),
                     "MSE": float(np.mean((D - measured) ** 2)), "seconds": round(time.perf_counter() - t, 1)})
        print(rows[-1], flush=True)
    nochange = float(np.mean(measured**2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "control_noise.json").write_text(json.dumps({"rows": rows, "mse_nochange": nochange, "n_cells": int(base.size),
                                                        "knockouts": len(knockouts), "seed": args.seed,
                                                        "model": model.source}, indent=1))
    head = list(rows[0])
    fmt = lambda v: "—" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["# The control's shared noise and the knockouts' alike deltas (bundled model, Papalexi rep_3)", "",
             f"`python experiments/control_noise.py` — {base.size} rep_3 control cells, {len(knockouts)} knockouts, "
             f"pure model, guidance 1. MSE of predicting no change: {nochange:.4f}.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in head) + " |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "control_noise.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
