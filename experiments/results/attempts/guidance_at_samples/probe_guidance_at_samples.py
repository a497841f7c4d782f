"""Probe: is guidance judged fairly when the verdict compares it at one sample per cell?

    python experiments/results/attempts/guidance_at_samples/probe_guidance_at_samples.py [MODEL] [DATA]

The verdict tries each guidance candidate at 1 sample per cell, then more samples on the best. Guidance
``w`` multiplies the sampled difference between the specific and the generic condition, so at 1 sample it
also multiplies the sampling noise. This reruns the bundled model's verdict (``train.rejudge``, its own
held-out cells) with every guidance candidate at each sample count, and prints the validation MSE and
pearson_delta of each, so the choice at 1 sample can be compared with the choice at 8. ``noise``: the sampling
variance of the mean predicted delta, from the spread of its cell buckets (``validation.delta_noise``); MSE - noise
is the error with that noise averaged away."""
import json
import sys
import time
from pathlib import Path

import torch

import virtualcell as vc
from virtualcell.train import rejudge

torch.set_num_threads(2)
model_dir = sys.argv[1] if len(sys.argv) > 1 else "virtualcell/data/model"
data = sys.argv[2] if len(sys.argv) > 2 else "papalexi2021"
model = vc.C2SModel.load(model_dir)
adata = vc.datasets.load(data)
cands = tuple({"guidance": g, "samples": k} for k in (1, 4, 8) for g in (1.0, 2.0, 4.0))
t = time.perf_counter()
v = rejudge(model, adata, samples=(1,), candidates=cands)
rows = [{"guidance": c["settings"]["guidance"], "samples": c["settings"]["samples"], **c["model"],
         "seconds": c["seconds"]} for c in v["candidates"]]
out = Path(__file__).with_name(Path(model_dir).name + "_" + data + ".json")
out.write_text(json.dumps({"model": model_dir, "data": data, "rows": rows, "chosen": v["settings"],
                           "seconds": round(time.perf_counter() - t)}, indent=1))
print("| guidance | samples | validation MSE | noise | MSE - noise | pearson_delta | top 50 | s |\n"
      "|---|---|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r['guidance']:g} | {r['samples']} | {r['mse']:.4f} | {r['noise']:.4f} | {r['mse'] - r['noise']:.4f} | "
          f"{r['pearson_delta']:.3f} | "
          f"{r['pearson_delta_top50']:.3f} | {r['seconds']:.0f} |")
