"""Probe: is protocol 5's E-distance held back by per-cell sampling noise in the predicted deltas?

Scores, on protocol 5's split (seed 0), the pure model's per-cell predictions beside the same predictions
with each cell's delta replaced by the mean delta of its k nearest baseline cells (PCA of the baseline
cells' expression; k=1 is the prediction re-calibrated, k=all the population's mean delta), each
re-calibrated as the Simulator does. Usage: probe_smooth.py MODEL_DIR [SEED]
"""
import sys
sys.path.insert(0, "experiments")
import numpy as np
import _protocol as P
import protocol_5_cytokine_response as p5
import virtualcell as vc
from virtualcell._stats import calibrated

model_dir, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0
P.setup(1)
adata, contract, stim, train_ad, baseline, reference = p5.data(seed)
model = vc.C2SModel.load(model_dir)
pred, res, _ = P.predict(model, baseline, {stim: stim}, perturbation_key=contract.perturbation_key,
                         context=(p5.HALF, "heldout"), n_cells=250, seed=seed)
pred.uns.pop(P.METHODS, None)
cells = baseline[: min(250, baseline.n_obs)].copy()
sim = vc.Simulator(cells, model, seed=seed)
names = list(cells.obs_names)
src = [names.index(s) for s in pred.obs["source_cell"].astype(str)]
x = np.asarray(sim.expression[src].todense()) if hasattr(sim.expression, "todense") else np.asarray(sim.expression[src])
X = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
d = X - x
xc = x - x.mean(0)
U, S, Vt = np.linalg.svd(xc, full_matrices=False)
emb = U[:, :20] * S[:20]
D2 = ((emb[:, None, :] - emb[None, :, :]) ** 2).sum(-1)
order = np.argsort(D2, axis=1)
variants = {}
for k in (1, 5, 15, 50, len(src)):
    ds = d[order[:, :k]].mean(axis=1)
    v = pred.copy()
    v.X = calibrated(x, ds).astype(np.float32)
    variants[f"knn k={k}" if k < len(src) else "population mean delta"] = v
pred.uns[P.METHODS] = variants
print("per-cell delta sd (mean over genes):", d.std(0).mean(), " x sd:", x.std(0).mean())
table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract, context_key=p5.HALF,
                focus=[(stim, "heldout")], metrics=p5.METRICS, baselines=p5.baselines(), seed=seed, cell_eval=False)
summ = P.summary(table, p5.METRICS)
print(summ.to_string() if hasattr(summ, "to_string") else summ)
