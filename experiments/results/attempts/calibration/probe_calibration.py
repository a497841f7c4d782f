"""Probe: how the non-negative calibration of a delta costs protocol 5's E-distance.

    cd experiments && python results/attempts/calibration/probe_calibration.py

Applies protocol 5's meanshift delta (measured training cells) to the baseline cells with several ways of
keeping the prediction non-negative, and scores each as the protocol does, seeds 0-2."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import numpy as np
import pandas as pd

import _protocol as P
import codec_ceiling as C
import virtualcell.simulator as S
from virtualcell.evaluate import baselines as B

orig = S.calibrated


def clip_only(x, d):
    return np.maximum(x + d, 0.0)


def multiplicative_down(x, d):
    """Up: x + d. Down: x scaled by (mean + d) / mean, which keeps zeros and the mean."""
    up = x + d
    m = x.mean(axis=0)
    f = np.divide(np.maximum(m + d.mean(axis=0), 0.0), m, out=np.zeros_like(m), where=m > 0)
    down = x * f
    neg = d.mean(axis=0) < 0
    out = np.where(neg, down, up)
    return np.maximum(out, 0.0)


def shift_nonzero(x, d):
    """Down: the shift falls on expressing cells only (zeros stay zero), clipped, rescaled to the mean."""
    up = x + d
    dm = d.mean(axis=0)
    frac = (x > 0).mean(axis=0)
    dd = np.divide(dm, frac, out=np.zeros_like(dm), where=frac > 0)
    down = np.where(x > 0, x + dd, 0.0)
    raw = np.where(dm < 0, down, up)
    return _rescale(raw, x + d)


def _rescale(raw, unclipped):
    pred = np.maximum(raw, 0.0)
    have, want = pred.mean(axis=0), np.maximum(unclipped.mean(axis=0), 0.0)
    scale = np.divide(want, have, out=np.zeros_like(have), where=have > 0)
    return pred * scale


VARIANTS = {"calibrated (now)": orig, "clip only": clip_only, "multiplicative down": multiplicative_down,
            "shift on expressing cells": shift_nonzero}

rows = []
for protocol in (5, 4, 3, 2):
    for seed in (0, 1, 2):
        r = C.protocol_runs(protocol, seed, quick=False)
        fn = getattr(B, r["rule"])
        kw = dict(baseline=r["baseline"], targets=r["targets"], perturbation_key=r["contract"].perturbation_key,
                  control=r["contract"].control, context_key=r["context_key"], max_cells=None, seed=seed)
        raw = fn(r["train"], **kw)
        for name, f in VARIANTS.items():
            S.calibrated = f
            pred = C.non_negative(raw, r["contract"], r["context_key"])
            S.calibrated = orig
            t = P.score(pred, r["reference"], baseline=r["baseline"], train=r["train"], contract=r["contract"],
                        context_key=r["context_key"], focus=r["targets"], metrics=r["metrics"], seed=seed,
                        baselines=(r["rule"],) if name == "calibrated (now)" else (), cell_eval=False)
            t = t.replace({"method": {"model": name}})
            t["seed"], t["protocol"] = seed, protocol
            rows.append(t)
        print(protocol, seed, flush=True)
df = pd.concat(rows)
summ = df.groupby(["protocol", "method", "metric"])["value"].mean().unstack("metric")
print(summ.round(3).to_string())
summ.round(4).to_csv(Path(__file__).with_name("probe_calibration.csv"))
