# Probe (session 35): how big is the decoded change the coexpression prior makes, per unit kappa? Label-free: the
# model's own predictions with and without the prior, projected on the prior's log1p-scale vector v.
# Then scores kappa* = the kappa whose decoded change carries v at its size (1/slope), on the held-out knockouts.
# Usage (from the repository root): python <this file> SEED KAPPAS MODEL_DIR/protocol3
import sys; sys.path.insert(0, "experiments")
import numpy as np, torch
import _protocol as P
import protocol_3_unseen_knockouts as p3
import virtualcell.target_offsets as T
from virtualcell.perturbations import parse
P.setup(1)
seed = int(sys.argv[1]); kappas = [float(x) for x in sys.argv[2].split(",")]
adata, contract, held, cands, train_ad, baseline, reference = p3.data(seed, p3.N_HOLDOUT)
model = P.load_trained(sys.argv[3]).model
fmt = model.format
vocab = model.lm.get_output_embeddings().weight.shape[0]
B = model.baselines
rows, V = {}, {}
for p in held:
    d, src = B.unseen_delta(parse(f"ko:{p}"))
    prior = (d - B.pertmean).astype(np.float32)
    gi = B._genetic_gene(parse(f"ko:{p}"))
    prior[gi] = 0.0
    V[p] = prior
    v = np.zeros(vocab, np.float32); v[np.asarray(fmt.gene_tokens)] = prior
    rows[int(fmt.gene_tokens[gi])] = v
orig = T.add
M = torch.tensor(np.stack([np.zeros(vocab, np.float32)] + [rows[t] for t in rows]))
idx = torch.zeros(vocab, dtype=torch.long)
for i, t in enumerate(rows):
    idx[t] = i + 1
def run(kappa, score=False):
    def add(logits, param, rws, near=None):
        out = orig(logits, param, rws, near)
        tok, kind, valid = rws
        bias = kappa * (M[idx[tok]] * valid[..., None]).sum(1)
        return out + (bias[:, None, :] if out.dim() == 3 else bias)
    T.add = add
    pred, _, _ = P.predict(model, baseline, {p: f"ko:{p}" for p in held}, perturbation_key=contract.perturbation_key,
                           n_cells=200, seed=seed,
                           coexpression_prior=False)  # (the probe adds it itself)
    lab = pred.obs[contract.perturbation_key].astype(str).values
    ids = np.asarray(model.genes.ids(list(pred.var_names), missing="mark"))
    Xp = pred.X.toarray() if hasattr(pred.X, "toarray") else np.asarray(pred.X)
    X = np.zeros((Xp.shape[0], len(B.genes))); X[:, ids[ids >= 0]] = Xp[:, ids >= 0]
    means = {p: X[lab == p].mean(0) for p in held}
    out = None
    if score:
        t = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract,
                    focus=[(p, "all") for p in held], baselines=("pertmean", "coexpression"), seed=seed, cell_eval=False)
        out = t.groupby(["method", "metric"])["value"].mean().unstack().loc["model"].round(3).to_dict()
    return means, out
m0, s0 = run(0.0, True)
print("kappa 0", s0, flush=True)
for k in kappas:
    mk, _ = run(k)
    sl = [float((mk[p] - m0[p]) @ V[p] / (V[p] @ V[p])) / k for p in held]
    print("kappa", k, "decoded slope per kappa", np.round(sl, 3), "-> kappa*", round(1 / np.mean(sl), 2), flush=True)
ks = 1 / np.mean(sl)
_, s = run(ks, True)
print("kappa*", round(ks, 2), s, flush=True)
