"""How long one draw of the OT pairing takes on many cells: why `train` makes each draw when an epoch first needs it.

    python experiments/results/attempts/pair_draws/draw_time.py [--cells 50000]     (writes draw_time.txt beside it)

A synthetic screen of Poisson counts (300 genes, one context; a sixth of the cells controls, the rest in 20
perturbations of equal size), paired with `virtualcell.train.build_pairs` at draw 0 (one uniform draw of the
controls) and draw 1 (drawn with replacement), timed each.
"""

import argparse
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from virtualcell import DataContract
from virtualcell.train import build_pairs

ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
ap.add_argument("--cells", type=int, default=50_000)
args = ap.parse_args()
rng = np.random.default_rng(0)
n_ctrl = args.cells // 5
per = (args.cells - n_ctrl) // 20
labels = ["control"] * n_ctrl + [f"KO{i}" for i in range(20) for _ in range(per)]
a = ad.AnnData(rng.poisson(2.0, size=(len(labels), 300)).astype(np.float32),
               obs=pd.DataFrame({"perturbation": labels, "ctx": "a"}, index=[f"c{i}" for i in range(len(labels))]))
a.var_names = [f"G{i}" for i in range(300)]
contract = DataContract("perturbation", "control", context_key="ctx")
lines = [f"`python experiments/results/attempts/pair_draws/draw_time.py --cells {args.cells}`: {a.n_obs:,} cells "
         f"({n_ctrl:,} controls, 20 perturbations of {per:,})"]
for d in (0, 1):
    t = time.perf_counter()
    build_pairs(a, contract, seed=0, draw=d)
    lines.append(f"draw {d}: {time.perf_counter() - t:.1f} s")
text = "\n".join(lines) + "\n"
(Path(__file__).parent / "draw_time.txt").write_text(text)
print(text, end="")
