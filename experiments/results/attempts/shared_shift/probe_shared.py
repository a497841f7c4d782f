"""How much of the bundled model's predicted deltas is one shift shared by every knockout (a probe, session 31).

    python experiments/results/attempts/shared_shift/probe_shared.py   (about 2 minutes)

The bundled model's pure deltas for its 25 knockouts from 100 rep_3 control cells, beside the measured
rep_3 deltas and the training replicates' (rep_1, rep_2): the mean pairwise correlation, the norm of the
mean delta over knockouts (the shared shift) and its share of the sum of squares, and the same for
the deltas with that shift taken out. Output: ``probe_shared.txt``.
"""
import numpy as np

import virtualcell as vc
from virtualcell.sentences import expression_matrix, log_normalize
model = vc.model.bundled(device="cpu")
adata = vc.datasets.load("papalexi2021")
held = adata[adata.obs["bio_rep"] == "rep_3"].copy()
is_ctrl = (held.obs["perturbation"] == "control").to_numpy()
ctrl = held[is_ctrl][:100].copy()
kos = [p for p in model.perturbations.labels if p != "control"]
sim = vc.Simulator(ctrl, model)
res = sim.simulate(kos, seed=0, progress=False, blend=None)
D = res.aggregates["delta"].values
genes = list(held.var_names); col = [genes.index(g) for g in res.genes]
def meas_of(a):
    X = log_normalize(expression_matrix(a), "counts")[:, col].toarray()
    lab = a.obs["perturbation"].astype(str).to_numpy()
    mu0 = X[lab == "control"].mean(0)
    return np.stack([X[lab == k].mean(0) - mu0 for k in kos]), mu0
M, mu0 = meas_of(held)
T, tmu0 = meas_of(adata[adata.obs["bio_rep"] != "rep_3"])
def offd(A):
    C = np.corrcoef(A); return float(C[~np.eye(len(A), dtype=bool)].mean())
def r(a, b): return float(np.corrcoef(a, b)[0, 1])
for name, A in [("pred", D), ("rep3", M), ("train", T)]:
    s = A.mean(0)
    frac = (np.linalg.norm(np.outer(np.ones(len(A)), s)) / np.linalg.norm(A)) ** 2
    print(f"{name}: pairwise corr {offd(A):.3f}; shared norm {np.linalg.norm(s):.2f}; share of sumsq {frac:.2f}; "
          f"corr(shared, rep3 shared) {r(s, M.mean(0)):.2f}; corr(shared, ctrl mean) {r(s, mu0):.2f}; "
          f"corr(shared, train shared) {r(s, T.mean(0)):.2f}")
Ds, Ms, Ts = D - D.mean(0), M - M.mean(0), T - T.mean(0)
print("specific parts: corr per ko pred vs rep3", np.round(np.mean([r(Ds[k], Ms[k]) for k in range(len(kos))]), 3),
      "train vs rep3", np.round(np.mean([r(Ts[k], Ms[k]) for k in range(len(kos))]), 3))
print("pairwise corr of specific parts pred/rep3/train", round(offd(Ds),3), round(offd(Ms),3), round(offd(Ts),3))
# how the pairwise corr would be if the shared part were scaled to rep3's share
for a in [0.0, 0.5, 1.0]:
    print("shared scaled", a, round(offd(Ds + a * D.mean(0)), 3))
# shared vs expression level
bins = np.quantile(tmu0, [0, .5, .8, .95, 1])
for lo, hi in zip(bins[:-1], bins[1:]):
    m = (tmu0 >= lo) & (tmu0 <= hi)
    print(f"ctrl mean {lo:.2f}-{hi:.2f}: n={m.sum()} pred shared {D.mean(0)[m].mean():+.4f} rep3 shared {M.mean(0)[m].mean():+.4f} train {T.mean(0)[m].mean():+.4f}")
