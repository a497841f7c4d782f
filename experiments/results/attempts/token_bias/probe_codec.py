"""What the codec leaves of the drug-dose effects in the held-out patient (user_files drug_doses).

    python experiments/results/attempts/token_bias/probe_codec.py FOLDER

FOLDER holds user_files' drug_doses files (screen.h5ad ...) and a trained ``model``. For each held-out
drug-dose group: pearson_delta of (a) meanshift (other patients' mean effect), (b) the held-out cells'
own effect through the codec (decode(encode(treated)) - decode(encode(controls))), (c) meanshift through
the codec, against the measured effect (treated - baseline controls, log-normalized)."""
import sys
from pathlib import Path

import anndata as ad
import numpy as np

import virtualcell as vc
from virtualcell.sentences import Vocabulary, log_normalize, expression_matrix, detect_scale, roundtrip

folder = Path(sys.argv[1])
model = vc.C2SModel.load(folder / "model")
a = ad.read_h5ad(folder / "screen.h5ad")
X = expression_matrix(a)
a.X = log_normalize(X, detect_scale(X))
back = roundtrip(a, fit=model.rank_fit, top_k=model.top_k)
lab = (a.obs["perturbation"].astype(str) + "@" + a.obs["dose"].astype(str)).to_numpy()
pat = a.obs["patient"].astype(str).to_numpy()
split = a.obs["split"].astype(str).to_numpy()
M = np.asarray(a.X.todense()); B = np.asarray(back.X.todense())
ctrl = a.obs["perturbation"].astype(str).to_numpy() == "control"
base = (pat == "PD") & ctrl & (split == "train")
ref = (pat == "PD") & ctrl & (split == "reference")


def pc(x, y):
    return float(np.corrcoef(x, y)[0, 1])


rows = []
for g in sorted(set(lab[(pat == "PD") & ~ctrl])):
    t = (pat == "PD") & (lab == g)
    real = M[t].mean(0) - M[base].mean(0)
    others = [p for p in sorted(set(pat)) if p != "PD"]
    ms = np.mean([M[(pat == p) & (lab == g)].mean(0) - M[(pat == p) & ctrl].mean(0) for p in others], 0)
    ms_c = np.mean([B[(pat == p) & (lab == g)].mean(0) - B[(pat == p) & ctrl].mean(0) for p in others], 0)
    own_c = B[t].mean(0) - B[base].mean(0)
    half = M[t][: t.sum() // 2].mean(0) - M[ref].mean(0)
    top = np.argsort(-np.abs(real))[:50]
    rows.append((g, np.linalg.norm(real), pc(ms, real), pc(own_c, real), pc(ms_c, real), pc(half, real),
                 pc(ms[top], real[top]), pc(own_c[top], real[top]), pc(ms_c[top], real[top])))
print(f"{'group':14s} {'|real|':>7s} {'ms':>6s} {'own_c':>6s} {'ms_c':>6s} {'half':>6s} | top50 ms own_c ms_c")
for r in rows:
    print(f"{r[0]:14s} {r[1]:7.2f} " + " ".join(f"{v:6.2f}" for v in r[2:6]) + " | " + " ".join(f"{v:5.2f}" for v in r[6:]))
R = np.array([r[1:] for r in rows])
print("mean           " + " ".join(f"{v:6.2f}" for v in R.mean(0)))
