"""Sampling temperature on a checkpoint's own validation split (the verdict's held-out cells only).

    python probe_temperature.py bundled papalexi2021 THREADS 1,4 OUT.json
    python probe_temperature.py CKPT DATA(.h5ad or dataset name) THREADS SAMPLES OUT.json

Each temperature at each number of samples per cell, at the guidance the checkpoint's verdict chose;
prints settings, validation MSE, pearson_delta, pearson_delta_top50 and seconds, then the baseline's.
The checkpoint is judged in memory (``virtualcell.train.rejudge``); nothing is written into it.
"""
import json
import sys

import torch

import virtualcell as vc
from virtualcell.train import rejudge

torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
model = vc.model.bundled(device="cpu") if sys.argv[1] == "bundled" else vc.C2SModel.load(sys.argv[1], device="cpu")
data = sys.argv[2]
adata = vc.datasets.load(data) if not data.endswith(".h5ad") else __import__("anndata").read_h5ad(data)
temps = (1.0, 0.8, 0.6, 0.4)
ks = tuple(int(k) for k in (sys.argv[4].split(",") if len(sys.argv) > 4 else ["1", "4"]))
g = model.verdict["settings"].get("guidance", 1.0) if model.verdict else 1.0
cands = tuple({"guidance": g, "temperature": t, "samples": k} for k in ks for t in temps)
v = rejudge(model, adata, samples=(1,), candidates=cands, temperatures=(1.0,))
out = []
for c in v["candidates"]:
    m = c["model"]
    out.append((c["settings"], round(m["mse"], 5), round(m["pearson_delta"], 3), round(m["pearson_delta_top50"], 3),
                c["seconds"]))
    print(*out[-1], flush=True)
print("baseline", {k: round(x, 5) for k, x in v["baseline"].items() if isinstance(x, float)})
json.dump(out, open(sys.argv[5] if len(sys.argv) > 5 else "temperature.json", "w"))
