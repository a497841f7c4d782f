"""Probe: how much sampling noise would a Rao-Blackwellized ("soft") decode remove?

Each generated sentence is decoded as sum_r v(r) * onehot(gene at r) (hard, as now). Its
conditional expectation at each step, sum_r v(r) * q_r(gene | prefix) with q_r the sampling
distribution of step r, has the same expectation and less variance. This probe runs the bundled
model through Simulator.simulate unchanged, records q_r of every row at every step (by
monkeypatching the engine's sampler), and compares the two decodes' noise across samples.
"""
import sys, time
import numpy as np, torch
torch.set_num_threads(1)
import virtualcell as vc
import virtualcell.generation as G
import virtualcell.model as M

N_CELLS, SAMPLES = int(sys.argv[1]) if len(sys.argv) > 1 else 40, 4
model = vc.model.bundled(device="cpu")
fit = model.rank_fit
gene_tokens = torch.as_tensor(np.asarray(model.constraint().gene_tokens))
eos = model.format.eos
values = torch.as_tensor(fit.expression(np.arange(model.top_k + 2)), dtype=torch.float32)

acc, done_keys, seen = {}, set(), {}
orig_sample = G._sample
def patched(logits, keys, step, temperature):
    tok = orig_sample(logits, keys, step, temperature)
    probs = torch.softmax(logits.float() / temperature, dim=-1)[:, gene_tokens] * values[step]
    for r, k in enumerate(keys.tolist()):
        if k in done_keys or seen.get(k) == step:  # finished, or a guidance twin of a row already counted
            continue
        seen[k] = step
        acc[k] = acc.get(k, 0) + probs[r]
        if int(tok[r]) == eos:
            done_keys.add(k)
    return tok
G._sample = patched

records = []
orig_grid = M.generate_grid
def grid(lm, prefixes, suffixes, *, cell_keys, suffix_keys, config, **kw):
    for i, j, toks in orig_grid(lm, prefixes, suffixes, cell_keys=cell_keys, suffix_keys=suffix_keys, config=config, **kw):
        k = (config.seed * 1_000_003 + cell_keys[i] * 7919 + suffix_keys[j]) & G._MASK
        records.append((i, j, toks, acc.pop(k).numpy().copy()))
        yield i, j, toks
M.generate_grid = grid

adata = vc.datasets.load("papalexi2021")
contract = vc.DataContract.from_adata(adata)
held = (adata.obs["bio_rep"].astype(str) == "rep_3").to_numpy()
ctrl = np.sort(np.random.default_rng(0).permutation(np.flatnonzero(held & contract.is_control(adata)))[:N_CELLS])
sim = vc.Simulator(adata[ctrl].copy(), model)
perts = ["STAT1", "IFNGR2", "CAV1", "ATF2"]
t = time.time()
sim.simulate(perts, samples=SAMPLES, blend=None)
print(f"simulated in {time.time()-t:.0f} s; rows recorded {len(records)}")

tok2gene = {int(t): g for g, t in enumerate(gene_tokens.tolist())}
V = len(gene_tokens)
rows = {}
for i, j, toks, soft in records:
    hard = np.zeros(V, np.float32)
    for r, t in enumerate(toks):
        hard[tok2gene[int(t)]] = values[r]
    rows.setdefault(j, []).append((i, hard, soft))
print("suffixes", len(rows), "cells per suffix", {j: len(v) for j, v in list(rows.items())[:3]})
# group suffixes into perturbations: suffix j order = control x C then each perturbation x SAMPLES (Simulator's run)
C = len(rows) - len(perts) * SAMPLES
groups = {"control": list(range(C))}
for t_, p in enumerate(perts):
    groups[p] = list(range(C + t_ * SAMPLES, C + (t_ + 1) * SAMPLES))
out = {}
for name, js in groups.items():
    H = np.stack([np.stack([h for _, h, _ in sorted(rows[j], key=lambda x: x[0])]) for j in js])  # samples x cells x genes
    S = np.stack([np.stack([s for _, _, s in sorted(rows[j], key=lambda x: x[0])]) for j in js])
    vh, vs = H.var(axis=0, ddof=1).mean(), S.var(axis=0, ddof=1).mean()
    mh, ms = H.mean(axis=(0, 1)), S.mean(axis=(0, 1))
    out[name] = (H, S)
    print(f"{name:8s} samples {len(js):3d}  per-cell var across samples: hard {vh:.4f} soft {vs:.4f} ratio {vh/vs:.2f}; "
          f"gene means corr {np.corrcoef(mh, ms)[0,1]:.4f}, max |diff| {np.abs(mh-ms).max():.3f}")
# delta noise: split samples in halves and correlate the population deltas (signal reliability)
for p in perts:
    Hp, Sp = out[p]; Hc, Sc = out["control"]
    for nm, P, Cc in (("hard", Hp, Hc), ("soft", Sp, Sc)):
        d1 = P[: SAMPLES // 2].mean(axis=(0, 1)) - Cc[: C // 2].mean(axis=(0, 1))
        d2 = P[SAMPLES // 2:].mean(axis=(0, 1)) - Cc[C // 2:].mean(axis=(0, 1))
        print(f"  {p:7s} {nm}: split-half delta corr {np.corrcoef(d1, d2)[0,1]:.3f}, |delta| {np.linalg.norm((d1+d2)/2):.3f}")
