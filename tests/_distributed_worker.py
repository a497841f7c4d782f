"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2``: a simulation, a
screen and ``virtualcell predict`` split across two CPU processes (gloo)."""

import sys
from pathlib import Path

import numpy as np

import virtualcell as vc
from virtualcell.screen import run as screen

model_dir, baseline, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
model = vc.C2SModel.load(model_dir, device="cpu")
sim = vc.Simulator(vc.datasets.read_h5ad(baseline), model)
res = sim.simulate(["STAT1", "ko:JAK2"], seed=5, progress=False, keep_cells=True, cell_chunk=2)
ranked = screen(sim, ["STAT1", "JAK2", "IFNGR1"], out=out / "screen", group_size=2, progress=False, n_boot=20, seed=5)
from virtualcell.distributed import Split  # noqa: E402

split = Split.current(cpu=True)
assert split.world == 2, split
np.savez(out / f"rank{split.rank}.npz", mean=res.aggregates["mean"].values, cells=res.cells.values,
         emb=res.embedded["ko:STAT1"], score=ranked.ranking.sort_values("perturbation")["score"].to_numpy(),
         invalid=res.aggregates.attrs["invalid_genes"], n=res.aggregates["n_cells"].values)

from virtualcell import cli  # noqa: E402

# the command line: only the main process locks and writes the file (both did, and the second was refused)
assert cli.main(["predict", "--model", model_dir, "--data", baseline, "--perturbations", "STAT1,ko:JAK2", "--seed", "5",
                 "--out", str(out / "cli.h5ad")]) == 0

# processes given different cells (or a different panel) are refused on both, not added into a mixture of them
import pytest  # noqa: E402

for cells, panel in ((sim.baseline[split.rank:].copy(), ["STAT1"]), (sim.baseline, ["STAT1", "JAK2"][: 1 + split.rank])):
    with pytest.raises(vc.errors.ScreenError, match="2 processes were given different"):
        vc.Simulator(cells, model).simulate(panel, seed=5, progress=False)
