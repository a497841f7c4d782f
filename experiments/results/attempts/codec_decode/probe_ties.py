"""Probe: the codec oracle with ties broken in a fixed gene order instead of a seeded hash.

    PYTHONPATH=.:experiments python experiments/results/attempts/codec_decode/probe_ties.py PROTOCOL MODE [SEEDS]   MODE: hash | column | mean
"""
import sys
import numpy as np, pandas as pd
sys.path.insert(0, "experiments")
import _protocol as P
import codec_ceiling as CC
import virtualcell.sentences as S

protocol, mode = int(sys.argv[1]), sys.argv[2]
seeds = [int(s) for s in sys.argv[3:]] or [0, 1, 2]
if mode in ("column", "mean"):
    orig = S._encode_rows
    S._encode_rows = lambda X, rows, keep, gh, rh, col_bits: orig(X, rows, keep, gh, rh, 32)
P.setup(1)
parts = []
for seed in seeds:
    run = CC.protocol_runs(protocol, seed, False)
    if mode == "mean":  # columns in descending order of the training cells' mean: ties go to the usually higher gene
        X = S.expression_matrix(run["train"])
        order = np.argsort(-np.asarray(S.log_normalize(X, S.detect_scale(X)).mean(axis=0)).ravel(), kind="stable")
        for k in ("train", "baseline", "reference"):
            run[k] = run[k][:, order].copy()
    top_k = run.pop("top_k")
    t = CC.score_protocol(f"p{protocol}", top_ks=[top_k], seed=seed, **run)
    parts.append(t)
out = pd.concat(parts)
print(mode, protocol)
print(out.groupby(["method", "metric"])["value"].mean().unstack().round(3).to_string())
