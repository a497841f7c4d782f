"""Probe (session 26): protocol 2's held-out pairs predicted by composing the model's own single effects.

    python experiments/protocol_2_unseen_pairs.py --seed S --threads 1 --model-dir M --out O
    python experiments/results/attempts/compose_pairs/probe_p2_compose.py S M/protocol2

From one trained model and one generation: each held-out pair A+B as the protocol asks it (the pair's
prompt), and composed from the model's predictions of A and B alone, cell by cell:
``x + (pred_A - x) + (pred_B - x)`` (clipped at 0). Pure model, no blend, scored as the protocol
scores it, beside additive (the measured single effects summed).
"""
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/
import _protocol as P  # noqa: E402
from protocol_2_unseen_pairs import PAIR, data  # noqa: E402

import anndata as ad  # noqa: E402
import virtualcell as vc  # noqa: E402

seed, mdir = int(sys.argv[1]), sys.argv[2]
P.setup(1)
adata, contract, held, train_ad, baseline, reference, _, _ = data(seed)
model = vc.C2SModel.load(mdir)
key = contract.perturbation_key
singles = sorted({g for p in held for g in p.split(PAIR)})
targets = {p: " + ".join(f"act:{g}" for g in p.split(PAIR)) for p in held} | {g: f"act:{g}" for g in singles}
pred, res, _ = P.predict(model, baseline, targets, perturbation_key=key, context=("cell_type", "k562"),
                         n_cells=50, seed=seed, blend=False)
labels = pred.obs[key].astype(str).to_numpy()
x = baseline[: min(50, baseline.n_obs)].X
x = np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float32)


def cells(label: str) -> np.ndarray:
    X = pred[labels == label].X
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)


direct = pred[np.isin(labels, held)].copy()
parts = []
for p in held:
    a, b = p.split(PAIR)
    Xc = np.maximum(cells(a) + cells(b) - x, 0.0)
    part = ad.AnnData(Xc, obs=direct[direct.obs[key].astype(str) == p].obs.copy(), var=pred.var.copy())
    parts.append(part)
composed = ad.concat(parts)
composed.obs_names_make_unique()
out = {}
for name, prediction in (("direct", direct), ("composed", composed)):
    table = P.score(prediction, reference, baseline=baseline, train=train_ad, contract=contract,
                    focus=[(p, "k562") for p in held], baselines=("additive",), seed=seed, cell_eval=False)
    s = table.groupby(["method", "metric"])["value"].mean()
    out[name] = {m: round(float(s[("model", m)]), 3) for m in ("pearson_delta", "pearson_delta_top50", "mse")
                 if ("model", m) in s}
    out["additive"] = {m: round(float(s[("additive", m)]), 3) for m in ("pearson_delta", "pearson_delta_top50", "mse")
                       if ("additive", m) in s}
    print(name, out[name], "additive", out["additive"], flush=True)
(HERE / f"probe_p2_s{seed}.json").write_text(json.dumps(out, indent=1))
