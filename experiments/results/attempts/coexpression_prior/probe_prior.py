# Probe (session 35): the coexpression prior as a logit offset at generation, on a trained protocol-3 model.
# For a held-out knockout of gene g: every other gene's logit += kappa * (coexpression delta - pertmean), the
# baseline's own log1p-scale prediction (the model's served baselines, training split only). kappa = 1 is the
# pre-registered setting (logit = log worth, log1p ~ log expression); others are a sensitivity only.
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
tr = P.load_trained(sys.argv[3])
model = tr.model
fmt = model.format
vocab = model.lm.get_output_embeddings().weight.shape[0]
B = model.baselines
rows = {}
for p in held:
    d, src = B.unseen_delta(parse(f"ko:{p}"))
    prior = d - B.pertmean
    gi = B._genetic_gene(parse(f"ko:{p}"))
    prior[gi] = 0.0
    v = np.zeros(vocab, np.float32); v[np.asarray(fmt.gene_tokens)] = prior
    rows[int(fmt.gene_tokens[gi])] = v
    print(p, src, "prior range", prior.min().round(3), prior.max().round(3), flush=True)
orig = T.add
res = {}
for kappa in kappas:
    M = torch.tensor(np.stack([np.zeros(vocab, np.float32)] + [rows[t] for t in rows]))
    idx = torch.zeros(vocab, dtype=torch.long)
    for i, t in enumerate(rows):
        idx[t] = i + 1
    def add(logits, param, rws, near=None, kappa=kappa):
        out = orig(logits, param, rws, near)
        tok, kind, valid = rws
        bias = kappa * (M[idx[tok]] * valid[..., None]).sum(1)
        return out + (bias[:, None, :] if out.dim() == 3 else bias)
    T.add = add
    pred, _, _ = P.predict(model, baseline, {p: f"ko:{p}" for p in held}, perturbation_key=contract.perturbation_key,
                           n_cells=200, seed=seed,
                           coexpression_prior=False)  # (the probe adds it itself)
    t = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract,
                focus=[(p, "all") for p in held], baselines=("pertmean", "coexpression"), seed=seed, cell_eval=False)
    m = t.groupby(["method", "metric"])["value"].mean().unstack()
    res[kappa] = m
    print("kappa", kappa, m.loc["model"].round(3).to_dict(), flush=True)
print(m.round(3))
import pickle; pickle.dump(res, open(f"/tmp/s35/prior_seed{seed}.pkl", "wb"))
