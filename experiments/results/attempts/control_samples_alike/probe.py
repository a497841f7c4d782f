"""Probe (session 48): how much of protocol 4's "deltas too alike" is the control samples' shared noise?

Every predicted delta of a cell subtracts the same mean of that cell's control samples, so their sampling noise
is one error vector added to every perturbation's delta; for perturbations the model gives no effect, that alone
makes deltas correlate by (1/c) / (1 + 1/c), c the control samples per perturbation sample (the default 4: 0.2).
The bundled model on protocol 4's split (rep_3 held out, 120 cells, the verdict's samples per cell), the mean
pairwise correlation of the 25 knockouts' pure-model deltas at 4 (default), 16 and 64 control samples per sample.

    cd experiments && PYTHONPATH=. python results/attempts/control_samples_alike/probe.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import _protocol as P  # noqa: E402
import protocol_4_screen_ranking as p4  # noqa: E402
from protocol_4_screen_ranking import mean_pairwise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--per-sample", type=int, nargs="+", default=[4, 16, 64])
    ap.add_argument("--out", default=str(Path(__file__).with_name("probe.json")))
    args = ap.parse_args()
    P.setup(2)
    import virtualcell as vc

    model = vc.model.bundled()
    samples = int((model.verdict or {}).get("settings", {}).get("samples", 1))
    panel = sorted(model.perturbations.labels)
    rows = []
    for seed in args.seeds:
        adata, contract, held, train_ad, baseline, base_idx, ref_idx = p4.data(seed, 120)
        for c in args.per_sample:
            t = time.perf_counter()
            sim = vc.Simulator(baseline[:120].copy(), model, seed=seed)
            res = sim.simulate(panel, samples=samples, control_samples=c * samples, blend=None, keep_cells=False)
            D = res.aggregates["delta"].values
            rows.append({"seed": seed, "control_per_sample": c, "samples": samples, "alike": mean_pairwise(D),
                         "seconds": round(time.perf_counter() - t)})
            print(rows[-1], flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    for c in args.per_sample:
        v = [r["alike"] for r in rows if r["control_per_sample"] == c]
        print(f"{c} control samples per sample: mean pairwise correlation {np.mean(v):.3f} over seeds {args.seeds}")


if __name__ == "__main__":
    main()
