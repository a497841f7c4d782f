# Probe (session 34): neighbour offsets set by hand on a default protocol-3 model; scored on the held-out knockouts,
# so it only shows a direction. Usage: python probe_hand_set.py SEED -2,-5 (expects /tmp/s34/models/seedSEED/protocol3).
import sys; sys.path.insert(0, "/work/main/experiments")
import numpy as np, torch
import _protocol as P
import protocol_3_unseen_knockouts as p3
import virtualcell.target_offsets as T
import virtualcell.generation as G
P.setup(2)
seed = int(sys.argv[1]); thetas = [float(x) for x in sys.argv[2].split(",")]
adata, contract, held, cands, train_ad, baseline, reference = p3.data(seed, p3.N_HOLDOUT)
tr = P.load_trained(f"/tmp/s34/models/seed{seed}/protocol3")
model = tr.model
fmt = model.format
F = model.baselines.response.astype(np.float64)
sd = np.sqrt((F * F).sum(1)); Fn = F / np.maximum(sd, 1e-9)[:, None]
vocab = model.lm.get_output_embeddings().weight.shape[0]
fac = np.zeros((vocab, F.shape[1])); fac[np.asarray(fmt.gene_tokens)] = Fn
fac = torch.tensor(fac, dtype=torch.float32)
orig = T.add
for theta in thetas:
    def add(logits, param, rows, theta=theta):
        out = orig(logits, param, rows)
        tok, kind, valid = rows
        corr = fac[tok] @ fac.T  # rows x width x vocab
        corr = corr.scatter(2, tok[..., None], 0.0)
        bias = (theta * corr * valid[..., None]).sum(1)
        return out + (bias[:, None, :] if out.dim() == 3 else bias)
    T.add = add
    pred, _, _ = P.predict(model, baseline, {p: f"ko:{p}" for p in held}, perturbation_key=contract.perturbation_key,
                           n_cells=200, seed=seed)
    t = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract,
                focus=[(p, "all") for p in held], baselines=("pertmean", "coexpression"), seed=seed, cell_eval=False)
    m = t.groupby(["method", "metric"])["value"].mean().unstack().round(3)
    print("theta", theta, m.loc[["model"]].to_dict("records"), flush=True)
print(m)
