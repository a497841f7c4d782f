"""Where does the bundled model's shared delta come from? Two sampling seeds of the P4 prediction."""
import numpy as np, sys, json
sys.argv = ['x']
from protocol_4_screen_ranking import data, HELD
import _protocol as P
import virtualcell as vc
from virtualcell.sentences import model_expression
P.setup(2)
adata, contract, held, train_ad, baseline, base_idx, ref_idx = data(0, 120)
m = vc.model.bundled()
panel = sorted(m.perturbations.labels)
X, _ = model_expression(adata, m.genes)
labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
ref_mean = np.asarray(X[ref_idx].mean(0)).ravel()
out = {}
for seed in (0, 1):
    pred, res, s = P.predict(m, baseline, {p: p for p in panel}, perturbation_key=contract.perturbation_key,
                             context=HELD, n_cells=120, seed=seed)
    typed = m.perturbations.label_map(list(res.aggregates.perturbation.values))
    D = res.aggregates["delta_model"].values
    out[seed] = (list(res.aggregates.perturbation.values), D)
names, D0 = out[0]; _, D1 = out[1]
typed = m.perturbations.label_map(names)
M = np.stack([np.asarray(X[np.flatnonzero(held & (labels == typed[n]))].mean(0)).ravel() - ref_mean for n in names])
np.savez("shared_delta.npz", D0=D0, D1=D1, M=M, names=np.array(names))
def mp(D):
    C = np.corrcoef(D); return float(C[np.triu_indices_from(C, 1)].mean())
print("mutual corr seed0", mp(D0), "seed1", mp(D1), "avg of seeds", mp((D0+D1)/2), "measured", mp(M))
N = (D0 - D1) / 2
print("noise mutual corr", mp(N), "noise norm/delta norm", np.linalg.norm(N, axis=1).mean() / np.linalg.norm(D0, axis=1).mean())
gp, gm = D0.mean(0), M.mean(0)
print("generic norm pred", np.linalg.norm(gp), "meas", np.linalg.norm(gm), "corr(gp,gm)", np.corrcoef(gp, gm)[0, 1])
print("per-ko norm pred", np.linalg.norm(D0, axis=1).round(2))
print("per-ko norm meas", np.linalg.norm(M, axis=1).round(2))
print("mutual corr after removing generic: pred", mp(D0 - gp), "meas", mp(M - gm))
