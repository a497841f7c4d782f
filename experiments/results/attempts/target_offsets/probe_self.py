"""Probe: a synthetic-screen model's predicted change of each knockout's own gene, next to the measured one.

    python probe_self.py MODEL_DIR   (a model of `experiments/synthetic_recovery.py --seed 1 --model-dir DIR`: DIR/synthetic)
"""
import sys, numpy as np, torch
import virtualcell as vc
from virtualcell.datasets.synthetic import truth_effects
torch.set_num_threads(1)
seed=1
data = vc.datasets.synthetic_screen(seed=seed)
base, rest = vc.evaluate.split_controls(data, seed=seed)
model = vc.C2SModel.load(sys.argv[1])
truth = truth_effects(data)
names=[n for n in truth.index if n.startswith('GENE') or (n.startswith('TF') and '+' not in n)]
panel = model.resolve(names)
cells = base[base.obs["cell_type"]=="typeA"].copy()
sim = vc.Simulator(cells, model, seed=seed)
res = sim.simulate(panel, n_cells=40, progress=False, blend=False)
ag = res.aggregates
X = vc.sentences.log_normalize(vc.sentences.expression_matrix(rest), "counts")
genes=list(data.var_names)
ctrl = X[(rest.obs['perturbation_type']=='control').values & (rest.obs['cell_type']=='typeA').values].mean(0)
ctrl=np.asarray(ctrl).ravel()
rank = np.argsort(np.argsort(-ctrl))
for p,n in zip(panel,names):
    g=n
    j=genes.index(g)
    m = (rest.obs['perturbation'].astype(str)==n).values & (rest.obs['cell_type']=='typeA').values
    meas = np.asarray(X[m].mean(0)).ravel()
    d_pred = float(ag['delta_model'].sel(perturbation=str(p), gene=g))
    d_all = ag['delta_model'].sel(perturbation=str(p)).values
    print(f"{n:8s} ctrl {ctrl[j]:.2f} rank {rank[j]:3d}  measured self-delta {meas[j]-ctrl[j]:+.2f}  predicted self-delta {d_pred:+.2f}  |pred| {np.linalg.norm(d_all):.2f} |meas| {np.linalg.norm(meas-ctrl):.2f} true {truth.loc[n,'effect_typeA']:.2f}")
