"""Probe (session 26): how much of a predicted delta's noise the calibrated cells' spread shows.

    python experiments/results/attempts/delta_noise/probe_delta_noise.py

The bundled model, 60 rep_3 control cells, 5 knockouts, one sample per cell, one generation read two
ways (``calibrate=False`` gives each cell's decoded generation, ``calibrate=True`` the served cells).
Per knockout, the noise of the mean delta over the cells, ``sum over genes of var / n``, from (a) each
cell's change before clipping, ``d_i - mean control decode_i`` (what ``var_delta`` uses since the fix),
and (b) the calibrated cells against their baseline cells (what it used before). The calibrated mean
is the unclipped one by construction, so (a) is its noise; clipping at 0 shrinks (b).
"""
import json
from pathlib import Path

import virtualcell as vc

ad = vc.datasets.load("papalexi2021")
ctrl = ad[(ad.obs.perturbation == "control").to_numpy() & (ad.obs.bio_rep == "rep_3").to_numpy()][:60].copy()
sim = vc.Simulator(ctrl, vc.model.bundled(), seed=0)
P = ["control", "ko:STAT1", "ko:JAK2", "ko:SMAD4", "ko:MYC", "ko:IRF7"]
kw = dict(seed=0, samples=1, blend=None, keep_cells=True, progress=False)
raw = sim.simulate(P, calibrate=False, **kw).cells.values
cal = sim.simulate(P, **kw).cells.values
x = cal[0]  # calibrated control: the baseline cells themselves
n = x.shape[0]
out = {}
for j, p in enumerate(P[1:], 1):
    change = raw[j] - raw[0]
    a = float(change.var(0, ddof=1).sum() / n)
    b = float((cal[j] - x).var(0, ddof=1).sum() / n)
    out[p] = {"noise_unclipped_change": round(a, 3), "noise_calibrated_cells": round(b, 3), "ratio": round(a / b, 2)}
    print(p, out[p], flush=True)
(Path(__file__).resolve().parent / "probe_delta_noise.json").write_text(json.dumps(out, indent=1))
