"""Both cores for training: one process with 1 or 2 threads, against two processes of 1 thread each.

``virtualcell train`` launched by ``torchrun --nproc_per_node 2`` (or ``accelerate launch``) is
data-parallel: each process computes the loss of its half of every batch, the gradients are
averaged, and every process applies the same update (``virtualcell.distributed.Split``). This
script runs the real command each way on the same recipe and reports optimizer steps per minute
and the loss at equal steps, so the two ways of using a machine's cores are compared side by side.

Recipe: the embedded Papalexi screen with ``bio_rep=rep_3`` held out, the defaults of ``virtualcell
train`` (3 layers, hidden size 96, 16 pairs per step), no validation verdict (``--verdict-fraction
0``), no compilation (``--compile off``), ``--steps`` optimizer steps. Sides run one after another,
``--repeats`` rounds in turn, so that machine load falls on all alike. Steps per minute count the
steps after the first 20 (warm-up) by the run's own clock (``history.json``'s ``elapsed_s``,
validation included); the losses are the mean training loss of the last 50 steps and the
validation loss at the last step (400-pair validation set, the same on every side: it is drawn
from the seed).

    python experiments/bench_processes.py                  # ~15 min on 2 cores
    python experiments/bench_processes.py --steps 60 --repeats 1   # smoke

Writes ``experiments/results/training_processes.{md,json}`` (``--out``: another folder).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
WARMUP = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_side(name: str, processes: int, threads: int, steps: int, out: Path, seed: int) -> dict:
    args = ["train", "--data", "papalexi2021", "--perturbation-key", "perturbation", "--control", "control",
            "--holdout", "bio_rep=rep_3", "--out", str(out), "--max-steps", str(steps), "--seed", str(seed),
            "--verdict-fraction", "0", "--compile", "off", "--threads", str(threads), "--restart", "--force"]
    if processes == 1:
        cmd = [sys.executable, "-m", "virtualcell", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "virtualcell", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    hist = json.loads((out / "history.json").read_text())
    by_step = {h["step"]: h for h in hist}
    last = hist[-1]
    t_warm = by_step[WARMUP]["elapsed_s"]
    return {
        "side": name, "processes": processes, "threads": threads, "steps": last["step"],
        "steps_per_min": 60.0 * (last["step"] - WARMUP) / (last["elapsed_s"] - t_warm),
        "train_loss_last50": statistics.mean(h["loss"] for h in hist[-50:]),
        "val_loss": last["val_loss"], "wall_s": wall,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="training_processes")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = ap.parse_args()
    sides = [("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes, 1 thread each", 2, 1)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for name, p, t in sides:
                row = run_side(name, p, t, args.steps, Path(tmp) / f"{p}x{t}", args.seed) | {"round": r}
                print(f"round {r}  {name:28s} {row['steps_per_min']:6.0f} steps/min  train loss "
                      f"{row['train_loss_last50']:.4f}  val loss {row['val_loss']:.4f}  ({row['wall_s']:.0f} s)",
                      flush=True)
                rows.append(row)
    summary = []
    for name, p, t in sides:
        mine = [r for r in rows if r["side"] == name]
        summary.append({"side": name, "processes": p, "threads": t,
                        "steps_per_min": statistics.mean(r["steps_per_min"] for r in mine),
                        "steps_per_min_each": [round(r["steps_per_min"]) for r in mine],
                        "train_loss_last50": statistics.mean(r["train_loss_last50"] for r in mine),
                        "val_loss": statistics.mean(r["val_loss"] for r in mine)})
    base = summary[1]["steps_per_min"]
    lines = [
        f"# Training on both cores: threads against processes ({args.steps} steps, {args.repeats} rounds)", "",
        f"`python experiments/bench_processes.py --steps {args.steps} --repeats {args.repeats}` on "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}.",
        "The real `virtualcell train` on the embedded screen (rep_3 held out, default model), no verdict, no "
        "compilation; two processes are launched by `torchrun --nproc_per_node 2` and split each 16-pair batch.", "",
        "| side | steps/min (each round) | vs 1 process, 2 threads | train loss, last 50 steps | validation loss |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(f"| {s['side']} | {s['steps_per_min']:.0f} ({', '.join(map(str, s['steps_per_min_each']))}) | "
                     f"{s['steps_per_min'] / base:.2f}x | {s['train_loss_last50']:.4f} | {s['val_loss']:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    (args.out / f"{args.name}.json").write_text(json.dumps({"args": vars(args), "rows": rows, "summary": summary},
                                                          indent=1, default=str))


if __name__ == "__main__":
    main()
