"""Run from the repository root: python experiments/results/attempts/effect_scale/probe_shrink.py [N_CELLS]

How much of each knockout's training effect does the bundled model's delta carry? (slope of predicted on
training-replicate delta across genes, and norm ratio), by guidance and temperature."""
import sys, time, numpy as np, anndata as ad, torch
import virtualcell as vc
from virtualcell.sentences import expression_matrix, log_normalize, detect_scale
torch.set_num_threads(1)
a = vc.datasets.load("papalexi2021")
X = log_normalize(expression_matrix(a), 'counts').toarray()
p = a.obs.perturbation.astype(str).values; rep = a.obs.bio_rep.astype(str).values
tr = rep != 'rep_3'
ctrl_mean = X[tr & (p == 'control')].mean(0)
kos = ['STAT1', 'JAK2', 'IFNGR1', 'SMAD4', 'IRF1', 'MYC']
meas = {k: X[tr & (p == k)].mean(0) - ctrl_mean for k in kos}
base = a[(rep == 'rep_3') & (p == 'control')][:int(sys.argv[1]) if len(sys.argv) > 1 else 60].copy()
model = vc.model.bundled()
sim = vc.Simulator(base, model)
genes = [g.upper() for g in a.var_names]
for settings in [dict(guidance=1.0), dict(guidance=2.0), dict(guidance=1.0, temperature=0.6)]:
    t = time.time()
    res = sim.simulate([f'ko:{k}' for k in kos], samples=4, blend=False, progress=False, **settings)
    d = res.aggregates['delta']
    rg = [str(g).upper() for g in d['gene'].values]
    idx = [rg.index(g) for g in genes]
    out = []
    for k in kos:
        pd_ = d.sel(perturbation=f'ko:{k}').values[idx]; m = meas[k]
        slope = float(pd_ @ m / (m @ m)); ratio = float(np.linalg.norm(pd_) / np.linalg.norm(m))
        r = float(np.corrcoef(pd_, m)[0, 1])
        out.append(f"{k}: slope {slope:.2f} norm {ratio:.2f} r {r:.2f}")
    print(settings, f"{time.time()-t:.0f}s", '; '.join(out), flush=True)
