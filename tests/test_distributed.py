"""Data-parallel generation: two CPU processes (torchrun, gloo) give the one-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

import virtualcell as vc
from virtualcell.screen import run as screen

WORKER = Path(__file__).with_name("_distributed_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tiny_model, tmp_path):
    model, folder, data = tiny_model
    base = tmp_path / "baseline.h5ad"
    data[data.obs.perturbation == "control"][:7].copy().write_h5ad(base)  # odd: uneven shares
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), str(WORKER), str(folder), str(base), str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    sim = vc.Simulator(vc.datasets.read_h5ad(base), model)
    one = sim.simulate(["STAT1", "ko:JAK2"], seed=5, progress=False, keep_cells=True, cell_chunk=2)
    ranked = screen(sim, ["STAT1", "JAK2", "IFNGR1"], out=tmp_path / "single", group_size=2, progress=False,
                    n_boot=20, seed=5)
    for rank in (0, 1):  # every process ends with the full result
        got = np.load(tmp_path / f"rank{rank}.npz")
        np.testing.assert_array_equal(got["n"], [7, 7])
        np.testing.assert_allclose(got["cells"], one.cells.values, atol=1e-5)
        np.testing.assert_allclose(got["mean"], one.aggregates["mean"].values, atol=1e-5)
        np.testing.assert_allclose(got["emb"], one.embedded["ko:STAT1"], atol=1e-4)
        np.testing.assert_allclose(got["score"], ranked.ranking.sort_values("perturbation")["score"], rtol=1e-4)
    # only the main process wrote the results folder, and it is complete
    assert (tmp_path / "screen" / "ranking.csv").exists() and len(list((tmp_path / "screen" / "groups").glob("*.nc"))) == 2
