"""Run a screen in forked children, killing them with SIGKILL at random moments (for test_screen.py).

Usage: python _screen_kill_worker.py MODEL BASELINE.h5ad REFERENCE_OUT KILLED_OUT N_KILLS SEED

The parent loads the model once and never runs it; each attempt is a forked child that
runs the screen. The first child runs uninterrupted into REFERENCE_OUT and times the
screen; then N_KILLS children run into KILLED_OUT and are killed after a random delay
between 0 and 0.6x that time (each resumes what the last one left, so the kills fall in
the groups first and in the final writes later); a last child resumes KILLED_OUT to the end.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import anndata as ad
import numpy as np

import virtualcell as vc
from virtualcell.screen import run as screen

PANEL = ["ko:STAT1", "ko:JAK2", "ko:IFNGR1", "ko:PSMB9", "ko:IRF1", "ko:SMAD4"]


def child(sim: vc.Simulator, out: str) -> None:
    pid = os.fork()
    if pid == 0:  # the child: run the screen, then leave without running the parent's exit handlers
        code = 0
        try:
            screen(sim, PANEL, out=out, group_size=2, n_boot=20, top=3, progress=False)
        except BaseException:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 1
        os._exit(code)
    return pid


def preload() -> None:
    """Import, once in the parent, what a screen imports on first use, so that each child starts at once."""
    import matplotlib

    matplotlib.use("Agg")
    import h5netcdf  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import networkx  # noqa: F401
    import pertpy  # noqa: F401
    import pyarrow.parquet  # noqa: F401
    import torch
    import xarray  # noqa: F401

    torch.set_num_threads(1)  # no thread pool to carry across fork, and no per-child thread benchmark
    # No tqdm lock to carry across fork either: quiet screens build no bar (virtualcell.progress).
    # A child killed holding tqdm's cross-process lock used to hang every later child.


def main() -> int:
    model_dir, baseline, reference, killed, n_kills, seed = sys.argv[1:]
    preload()
    sim = vc.Simulator(ad.read_h5ad(baseline), vc.C2SModel.load(model_dir))
    status, duration = to_end(sim, reference, limit=180)  # the uninterrupted reference, timed
    if status != 0:
        return 1
    rng = np.random.default_rng(int(seed))
    for _ in range(int(n_kills)):
        pid = child(sim, killed)
        time.sleep(rng.uniform(0, 0.6 * duration))  # within the groups at first, in the final writes later
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        left = sorted(p.name for p in Path(killed).rglob("*") if p.is_file())  # where the kill fell, for the log
        groups = sum(n.startswith("group_") and n.endswith(".nc") for n in left)
        print(f"killed with {groups} groups and {len(left)} files on disk", flush=True)
    status, _ = to_end(sim, killed, limit=60 + 10 * duration)  # the last child resumes to the end
    print(f"screen {duration:.2f} s", flush=True)
    return 0 if status == 0 else 1


def to_end(sim: vc.Simulator, out: str, *, limit: float, tries: int = 3) -> tuple[int | None, float]:
    """Run a child's screen into ``out`` to the end: its exit status and seconds.

    A forked child of a parent that holds threads (torch, jax) can deadlock before it starts
    working; one that runs past ``limit`` is killed (one more SIGKILL at a random moment) and
    the next child resumes, up to ``tries`` children.
    """
    for attempt in range(tries):
        t0 = time.perf_counter()
        status = finish(child(sim, out), limit=limit)
        if status is not None:
            return status, time.perf_counter() - t0
        print(f"child {attempt} into {out} hung; killed it and running again", flush=True)
    return None, float("nan")


def finish(pid: int, *, limit: float) -> int | None:
    """The child's exit status, or ``None`` (and the child killed) when it runs past ``limit`` seconds."""
    end = time.perf_counter() + limit
    while time.perf_counter() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


if __name__ == "__main__":
    sys.exit(main())
