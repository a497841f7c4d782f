import numpy as np, sys
sys.argv=['x']
from protocol_4_screen_ranking import data, HELD
import virtualcell as vc
from virtualcell.sentences import model_expression
adata, contract, held, train_ad, baseline, base_idx, ref_idx = data(0, 120)
m = vc.model.bundled()
X,_ = model_expression(adata, m.genes); X = np.asarray(X.todense()) if hasattr(X,'todense') else np.asarray(X)
labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
panel = sorted(m.perturbations.labels)
d = np.load("shared_delta.npz")
rs=[]
for rep in range(20):
    rng = np.random.default_rng(rep)
    r = rng.permutation(ref_idx); ra, rb = r[:r.size//2], r[r.size//2:]
    A=[];B=[]
    for p in panel:
        c = rng.permutation(np.flatnonzero(held & (labels==p)))
        A.append(X[c[:c.size//2]].mean(0)-X[ra].mean(0)); B.append(X[c[c.size//2:]].mean(0)-X[rb].mean(0))
    A=np.stack(A);B=np.stack(B)
    A-=A.mean(1,keepdims=True);B-=B.mean(1,keepdims=True)
    cov = A@B.T/A.shape[1]
    rel = np.diag(cov)
    n=len(panel); vals=[]
    for i in range(n):
        for j in range(i+1,n):
            if rel[i]>0 and rel[j]>0:
                vals.append(0.5*(cov[i,j]+cov[j,i])/np.sqrt(rel[i]*rel[j]))
    rs.append(np.mean(vals))
print("disattenuated measured mutual corr (split halves, 20 splits):", np.mean(rs), np.std(rs))
def mp(D):
    C=np.corrcoef(D); return C[np.triu_indices_from(C,1)].mean()
print("plain measured (all rep_3 cells):", mp(d['M']))
