"""Memory and resume overhead of predictions and screens at scale.

Figures (issues 3 and 4):

* **predict**: peak RSS of a 10,000-cell x 20-perturbation prediction written to ``.h5ad``
  (the ``virtualcell predict`` command, in-process), under 4 GB.
* **screen**: peak RSS of a 100-perturbation screen over a 20,000-cell baseline
  population, under 4 GB, and the generated cells per second.
* **resume**: a screen stopped halfway and resumed, against the same screen run
  uninterrupted; the overhead must stay under 5% of the uninterrupted time.

Every measurement runs in a fresh subprocess (this file with ``--worker``) that reports
its own peak RSS (``ru_maxrss``), so one run's memory never counts for another.

What makes it fit the CPU: the baseline cells are the embedded dataset's control cells
resampled to the requested population size (with unique names), and the memory runs
generate ``--max-genes`` genes per cell (default 5) instead of the model's 100. Memory does
not grow with that choice: generation holds ``batch_size`` rows of KV cache at a time,
per-cell predictions stream to disk, aggregates are ``perturbation x gene``. The
screen's panel is knockouts of the first 100 genes of the model's vocabulary: a
gene-level model represents a knockout of any gene by the gene's own token. The screen
simulates ``--screen-cells`` cells per perturbation (default 500) out of the 20,000: at
these CPU speeds all 20,000 x 100 would take hours; a series of smaller sizes in the
table shows how RSS grows with the simulated cells (it should not).

Run from the repository root::

    python experiments/bench_scale.py                 # ~12 min on 2 cores
    python experiments/bench_scale.py --quick         # a smoke run (~2 min)

Writes ``experiments/results/scale.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def _baseline(n: int):  # noqa: ANN202
    import numpy as np

    import virtualcell as vc

    a = vc.datasets.load("papalexi2021")
    ctrl = a[a.obs["perturbation"] == "control"]
    idx = np.random.default_rng(0).choice(ctrl.n_obs, n, replace=n > ctrl.n_obs)
    base = ctrl[idx].copy()
    base.obs_names = [f"cell{i}" for i in range(n)]
    return base


def worker(kind: str, opts: dict) -> dict:
    import virtualcell as vc

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vc-bench-") as tmp:
        tmp = Path(tmp)
        base_path = tmp / "baseline.h5ad"
        _baseline(opts["baseline"]).write_h5ad(base_path)
        if kind == "predict":
            from virtualcell.cli import main

            model = vc.model.bundled(device="cpu")
            perts = [p for p in model.perturbations.labels if p != "control"][: opts["perturbations"]]
            t1 = time.perf_counter()
            rc = main(["predict", "--model", str(vc.model.BUNDLED), "--data", str(base_path), "--perturbations",
                       ",".join(perts), "--max-genes", str(opts["max_genes"]), "--batch-size", str(opts["batch_size"]),
                       "--out", str(tmp / "pred.h5ad")])
            assert rc == 0
            generated = opts["baseline"] * (len(perts) + 1)
            size = (tmp / "pred.h5ad").stat().st_size
        elif kind == "screen":
            from virtualcell.screen import run as screen

            model = vc.model.bundled(device="cpu")
            sim = vc.Simulator(vc.datasets.read_h5ad(base_path), model)
            panel = [f"ko:{g}" for g in model.genes.genes[: opts["perturbations"]]]
            t1 = time.perf_counter()
            screen(sim, panel, out=tmp / "screen", n_cells=opts["cells"], max_genes=opts["max_genes"],
                   batch_size=opts["batch_size"], group_size=opts["group_size"], progress=False, n_boot=50)
            n_groups = -(-len(panel) // opts["group_size"])
            generated = opts["cells"] * (len(panel) + n_groups)  # each group also generates its control
            size = sum(f.stat().st_size for f in (tmp / "screen").rglob("*") if f.is_file())
        else:
            raise ValueError(kind)
    secs = time.perf_counter() - t1
    return {"kind": kind, **opts, "seconds": secs, "total_seconds": time.perf_counter() - t0,
            "generated_cells": generated, "cells_per_s": generated / secs, "output_bytes": size,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}


def resume_worker(opts: dict) -> dict:
    """Uninterrupted vs stopped-at-half + resumed, in one process (the model loaded once)."""
    import numpy as np

    import virtualcell as vc
    from virtualcell.screen import run as screen

    model = vc.model.bundled(device="cpu")
    sim = vc.Simulator(_baseline(opts["cells"]), model)
    panel = [p for p in model.perturbations.labels if p != "control"][: opts["perturbations"]]
    kw = {"group_size": opts["group_size"], "progress": False, "n_boot": 100, "seed": 0}
    n_groups = -(-len(panel) // opts["group_size"])
    out: dict = {"kind": "resume", **opts, "groups": n_groups}
    with tempfile.TemporaryDirectory(prefix="vc-bench-") as tmp:
        tmp = Path(tmp)
        # warm-up, not timed: first-call costs (pertpy import for E-distances, allocator) hit neither side
        screen(sim, panel[:2], out=tmp / "warm", **kw)
        t = time.perf_counter()
        full = screen(sim, panel, out=tmp / "full", **kw)
        out["uninterrupted_s"] = time.perf_counter() - t
        t = time.perf_counter()
        try:
            screen(sim, panel, out=tmp / "cut", stop_after_groups=n_groups // 2, **kw)
        except KeyboardInterrupt:
            pass
        out["first_half_s"] = time.perf_counter() - t
        t = time.perf_counter()
        resumed = screen(sim, panel, out=tmp / "cut", **kw)
        out["resume_s"] = time.perf_counter() - t
    out["overhead"] = (out["first_half_s"] + out["resume_s"]) / out["uninterrupted_s"] - 1
    out["identical_ranking"] = bool(
        list(full.ranking["perturbation"]) == list(resumed.ranking["perturbation"])
        and np.allclose(full.ranking["score"], resumed.ranking["score"])
    )
    return out


def _run(kind: str, opts: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, json.dumps(opts)]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{kind} {opts} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worker", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    ap.add_argument("--max-genes", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--screen-cells", type=int, default=500, help="cells simulated per perturbation in the screen")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.worker:
        kind, opts = args.worker[0], json.loads(args.worker[1])
        print(json.dumps(resume_worker(opts) if kind == "resume" else worker(kind, opts)))
        return 0

    q = args.quick
    common = {"max_genes": args.max_genes, "batch_size": args.batch_size}
    rows = []
    # predictions: a small size, then the figure's size
    for cells in ([200] if q else [1000, 10_000]):
        rows.append(_run("predict", {**common, "baseline": cells, "perturbations": 20}))
    # screens over a 20,000-cell baseline: RSS against the number of simulated cells
    for cells in ([50] if q else [250, args.screen_cells]):
        rows.append(_run("screen", {**common, "baseline": 2000 if q else 20_000, "cells": cells,
                                    "perturbations": 20 if q else 100, "group_size": 16}))
    rows.append(_run("resume", {"cells": 12 if q else 40, "perturbations": 8 if q else 24,
                                "group_size": 2 if q else 4}))

    import torch

    hw = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "python": sys.version.split()[0],
          "torch": torch.__version__, "load_1min_at_end": os.getloadavg()[0]}
    lines = ["# Memory, throughput and resume overhead at scale", "",
             f"`python experiments/bench_scale.py{' --quick' if q else ''}` on {hw['cores']} CPU cores "
             f"(torch {hw['torch']}), the bundled model; {args.max_genes} genes per generated cell in the memory runs.", "",
             "| run | baseline cells | simulated cells x perturbations | generated cells | seconds | cells/s | peak RSS (GB) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["kind"] == "resume":
            continue
        sim_cells = r["baseline"] if r["kind"] == "predict" else r["cells"]
        lines.append(f"| {r['kind']} | {r['baseline']:,} | {sim_cells:,} x {r['perturbations']} | {r['generated_cells']:,} "
                     f"| {r['seconds']:.0f} | {r['cells_per_s']:.0f} | {r['peak_rss_gb']:.2f} |")
    r = rows[-1]
    lines += ["", "Resume: a screen of "
              f"{r['perturbations']} perturbations x {r['cells']} cells in {r['groups']} groups ({r['group_size']} "
              f"perturbations each; full {r.get('max_genes', 'model')} genes), stopped after half the groups and resumed.", "",
              "| uninterrupted (s) | first half (s) | resume (s) | overhead | same ranking |", "| ---: | ---: | ---: | ---: | --- |",
              f"| {r['uninterrupted_s']:.1f} | {r['first_half_s']:.1f} | {r['resume_s']:.1f} | {100 * r['overhead']:+.1f}% "
              f"| {r['identical_ranking']} |", "",
              "A killed screen loses at most the group it was computing: finished groups are written atomically.", "",
              f"Machine: {hw}", ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text)
    (args.out / "scale.json").write_text(json.dumps({"config": {k: str(v) for k, v in vars(args).items()},
                                                     "hardware": hw, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
