"""Training steps with glibc's default malloc against large blocks kept on the heap (``virtualcell.allocator``).

    python experiments/bench_allocator.py [--genes 299 300 2000 9015] [--steps 60] [--repeats 2] [--long 600]   # 5 min; 17 with --long 600

A training step allocates several ``rows x positions x vocabulary`` tensors (logits, masks, their
gradients). glibc serves each block above its mmap threshold with a fresh ``mmap`` and returns it
with ``munmap``, so every step faults in and zeroes those pages again. ``virtualcell train`` now
keeps freed large blocks in the heap while it runs (:func:`virtualcell.allocator.large_blocks_on_heap`).

Each side trains the same model on the same data from the same seed for ``--steps`` optimizer
steps in a fresh process (``virtualcell.train``: 2 threads, no pre-training, no verdict, no
checkpoints on the way, eager kernels chosen as the trainer chooses them); "glibc default" is the
same call with the allocator setting switched off (the trainer as it was before). Sides alternate,
``--repeats`` times each. Reported per side: seconds per step (steps 10 to the last, from the
trainer's own clock, which stops before the last step's validation), minor page faults and the share of CPU time spent in the kernel, both
over the whole process, and the last step's training loss (the allocator changes no arithmetic: the
losses differ only where the trainer's timed choice of kernels, made afresh in each run, differed). Data:

* 299 genes: the embedded Papalexi screen (rep_3 held out, 100 genes per sentence: the bundled recipe's);
* any other number: the Kang 2018 PBMC file from ``../shared/data`` (raw counts, 2,000 cells; all its 9,015
  genes, or the ones detected in most cells), 200 genes per sentence (``train``'s default).

With ``--long STEPS`` (600 in the recorded run) each side also makes one whole run as ``virtualcell
train`` makes it at 9,015 genes (validation every 200 steps, checkpoints, the verdict): its wall
time, the resident memory every 50 steps and at the end (``VmRSS``), and the peak (``ru_maxrss``).

Writes ``experiments/results/allocator.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
KANG = ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc_harmony_2000cells.h5ad"
SIDES = ("glibc default", "large blocks on the heap")


def data(genes: int):  # noqa: ANN201
    """``(adata, contract, config fields)`` for a panel of ``genes`` genes."""
    import anndata as ad
    import numpy as np

    import virtualcell as vc

    if genes == 299:
        adata = vc.datasets.load("papalexi2021")
        return adata, vc.DataContract.from_adata(adata), {"top_k": 100, "kind": "knockout",
                                                          "holdout": {"bio_rep": ["rep_3"]}}
    if not KANG.exists():
        raise SystemExit(f"{KANG} is missing: the larger panels come from ../shared/data (see its README)")
    adata = ad.read_h5ad(KANG)
    if genes < adata.n_vars:
        detected = np.asarray((adata.X > 0).mean(axis=0)).ravel()
        adata = adata[:, np.sort(np.argsort(-detected, kind="stable")[:genes])].copy()
    return adata, vc.DataContract(perturbation_key="perturbation", control="control"), {}


def _resident_mb() -> int:
    from virtualcell.allocator import _resident  # the watcher's own reading

    return _resident() // 2**20


def long_side(steps: int, heap: bool, out: str) -> dict:
    """One whole default run at 9,015 genes in this process: wall time and resident memory."""
    import tempfile

    import virtualcell as vc
    import virtualcell.allocator as allocator
    from virtualcell.train import TrainConfig

    if not heap:
        allocator._glibc = lambda: None
    adata, contract, fields = data(9015)
    cfg = TrainConfig(max_steps=steps, compile="off", threads=2, seed=0, **fields)
    resident = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vc.fit(adata, out=tmp, contract=contract, config=cfg, resume=False, progress=False,
               on_log=lambda r: resident.append(_resident_mb()) if r["step"] % 50 == 0 else None)
    result = {"heap": heap, "steps": steps, "wall_s": time.perf_counter() - t0, "resident_mb_every_50": resident,
              "resident_mb_after": _resident_mb(),
              "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    Path(out).write_text(json.dumps(result))
    return result


def side(genes: int, steps: int, heap: bool, out: str) -> dict:
    """One training run in this process; returns its timings."""
    import tempfile

    import virtualcell as vc
    import virtualcell.allocator as allocator
    from virtualcell.train import TrainConfig

    if not heap:
        allocator._glibc = lambda: None  # the context then does nothing: glibc's own behaviour
    adata, contract, fields = data(genes)
    cfg = TrainConfig(max_steps=steps, verdict_fraction=0.0, pretrain_fraction=0.0, eval_every=10**6,
                      save_every=10**6, compile="off", threads=2, seed=0, **fields)
    log = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        vc.fit(adata, out=tmp, contract=contract, config=cfg, resume=False, progress=False,
               on_log=lambda r: log.append((r.get("step"), r.get("elapsed_s"), r.get("loss"))))
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    timed = [(s, t, loss) for s, t, loss in log if s is not None and loss is not None]
    first = next((x for x in timed if x[0] >= 10), timed[0])
    last = timed[-1]
    result = {"genes": int(adata.n_vars), "heap": heap, "steps": int(last[0]),
              "s_per_step": (last[1] - first[1]) / max(last[0] - first[0], 1), "wall_s": wall,
              "minor_faults": after.ru_minflt - before.ru_minflt,
              "system_share": (after.ru_stime - before.ru_stime) / max(
                  (after.ru_stime - before.ru_stime) + (after.ru_utime - before.ru_utime), 1e-9),
              "last_loss": float(last[2])}
    Path(out).write_text(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, nargs="+", default=[299, 300, 2000, 9015])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--long", type=int, default=0, metavar="STEPS",
                    help="also one whole default run per side at 9,015 genes (0: none)")
    ap.add_argument("--side", nargs=3, metavar=("GENES", "HEAP", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.side:  # a child process: one run
        if args.side[0] == "long":
            long_side(args.long, args.side[1] == "1", args.side[2])
        else:
            side(int(args.side[0]), args.steps, args.side[1] == "1", args.side[2])
        return
    started = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    rows = []
    for genes in args.genes:
        for rep in range(args.repeats):
            for heap in (False, True):
                path = Path(args.out) / f".allocator_{genes}_{int(heap)}_{rep}.json"
                subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--side", str(genes),
                                str(int(heap)), str(path)], check=True)
                row = json.loads(path.read_text()) | {"repeat": rep}
                path.unlink()
                rows.append(row)
                print(f"{genes} genes, {SIDES[heap]}, repeat {rep}: {row['s_per_step']:.3f} s/step, "
                      f"{row['minor_faults']:,} minor faults, {row['system_share']:.0%} system", flush=True)
    longs = []
    for heap in (False, True) if args.long else ():
        path = Path(args.out) / f".allocator_long_{int(heap)}.json"
        subprocess.run([sys.executable, __file__, "--long", str(args.long), "--side", "long", str(int(heap)), str(path)],
                       check=True)
        longs.append(json.loads(path.read_text()))
        path.unlink()
        print(f"whole run, {SIDES[heap]}: {longs[-1]['wall_s']:.0f} s, peak {longs[-1]['peak_mb']} MB", flush=True)
    lines = ["| genes | side | s/step (each repeat) | steps/min | minor page faults | system share of CPU | last loss |",
             "|---|---|---|---|---|---|---|"]
    summary = []
    for genes in args.genes:
        for heap in (False, True):
            rs = [r for r in rows if r["heap"] == heap and r["genes"] == genes]
            mean = statistics.mean(r["s_per_step"] for r in rs)
            summary.append({"genes": rs[0]["genes"], "side": SIDES[heap], "s_per_step": mean})
            lines.append(f"| {rs[0]['genes']:,} | {SIDES[heap]} | {mean:.3f} ("
                         + " / ".join(f"{r['s_per_step']:.3f}" for r in rs) + f") | {60 / mean:.0f} | "
                         f"{statistics.mean(r['minor_faults'] for r in rs):,.0f} | "
                         f"{statistics.mean(r['system_share'] for r in rs):.0%} | "
                         + " / ".join(f"{r['last_loss']:.4f}" for r in rs) + " |")
    speed = [f"{a['genes']:,} genes {a['s_per_step'] / b['s_per_step']:.2f}x"
             for a, b in zip(summary[::2], summary[1::2])]
    long_md = ""
    if longs:
        long_md = (f"\n\nOne whole run per side at 9,015 genes, {args.long} steps (validation, checkpoints, verdict):\n\n"
                   "| side | wall s | resident MB every 50 steps | resident MB after the run | peak MB |\n|---|---|---|---|---|\n"
                   + "\n".join(f"| {SIDES[r['heap']]} | {r['wall_s']:.0f} | "
                                + " ".join(str(v) for v in r["resident_mb_every_50"])
                                + f" | {r['resident_mb_after']} | {r['peak_mb']} |" for r in longs))
    import platform

    md = (f"# Training steps: glibc's default malloc against large blocks kept on the heap\n\nCommand: `python "
          f"experiments/bench_allocator.py {' '.join(sys.argv[1:])}`".rstrip() + f"  \nWall time: "
          f"{(time.perf_counter() - started) / 60:.1f} min on {platform.processor() or platform.machine()} (2 torch "
          f"threads, 2 cores, no GPU).\n\n" + __doc__.split("\n\n", 2)[2].rsplit("\n\nWrites", 1)[0] + "\n\n"
          + "\n".join(lines) + f"\n\nSteps per minute, heap against glibc default: {'; '.join(speed)}." + long_md + "\n")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "allocator.md").write_text(md)
    (out / "allocator.json").write_text(json.dumps({"command": sys.argv, "rows": rows, "summary": summary, "long": longs}, indent=1))
    print(md)


if __name__ == "__main__":
    main()
