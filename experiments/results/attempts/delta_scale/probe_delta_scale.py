"""Does a per-gene scale on the codec's deltas, fitted on the training perturbations, raise the codec oracle?

    cd experiments && PYTHONPATH=. python results/attempts/delta_scale/probe_delta_scale.py [--protocols 2 5 3 4] [--seeds 0 1 2]

For each protocol split: the training cells through the codec (rank table + gene map, one of the six decodes
`train` chooses among), then the per-gene scale a_g = (sum_p d_pg e_pg + lam) / (sum_p e_pg^2 + lam) where d is a
training perturbation's measured effect (its cells' mean minus its context's controls', log1p-normalized), e the same
effect on the decoded cells, and lam the mean over genes of sum_p e_pg^2 (a gene with the average decoded effect
energy is shrunk halfway to 1). The decoded cells' deviations from their context's decoded control mean are scaled
by a_g, so every mean effect measured on them is scaled by a_g; the protocol's baseline rule on those cells is then
scored as codec_ceiling.py scores its oracle. No held-out data is used to fit a_g.
"""
import argparse, sys, time
import numpy as np, pandas as pd
import anndata as ad
import _protocol as P
import codec_ceiling as C


def effects(X, labels, contexts, control):
    rows = []
    for ctx in np.unique(contexts):
        c = (contexts == ctx) & (labels == control)
        if c.sum() < 5:
            continue
        m = X[c].mean(0)
        for p in np.unique(labels[(contexts == ctx) & (labels != control)]):
            s = (contexts == ctx) & (labels == p)
            if s.sum() >= 5:
                rows.append(X[s].mean(0) - m)
    return np.asarray(rows)


def dense(X):
    return np.asarray(X.todense() if hasattr(X, "todense") else X, dtype=np.float64)


def scale_cells(decoded, train, contract, context_key):
    from virtualcell.sentences import detect_scale, expression_matrix, log_normalize
    Xm = dense(log_normalize(expression_matrix(train), detect_scale(expression_matrix(train))))
    Xd = dense(decoded.X)
    labels = np.asarray(contract.labels(train)).astype(str)
    contexts = train.obs[context_key].astype(str).to_numpy() if context_key else np.zeros(train.n_obs, dtype=str)
    d, e = effects(Xm, labels, contexts, contract.control), effects(Xd, labels, contexts, contract.control)
    energy = (e ** 2).sum(0)
    lam = max(energy.mean(), 1e-12)
    a = ((d * e).sum(0) + lam) / (energy + lam)
    out = Xd.copy()
    for ctx in np.unique(contexts):
        rows = contexts == ctx
        c = rows & (labels == contract.control)
        m = Xd[c].mean(0) if c.any() else Xd[rows].mean(0)
        out[rows] = m + a * (Xd[rows] - m)
    out = np.maximum(out, 0)
    return ad.AnnData(out.astype(np.float32), obs=decoded.obs.copy(), var=decoded.var.copy()), a, len(d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocols", type=int, nargs="+", default=[2, 5, 3, 4])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    P.setup(1)
    from virtualcell.evaluate import baselines as B
    from virtualcell.sentences import roundtrip
    for protocol in args.protocols:
        tables = []
        for seed in args.seeds:
            t0 = time.perf_counter()
            run = C.protocol_runs(protocol, seed, False)
            fn = getattr(B, run["rule"])
            kw = dict(baseline=run["baseline"], targets=run["targets"], perturbation_key=run["contract"].perturbation_key,
                      control=run["contract"].control, context_key=run["context_key"], max_cells=None, seed=seed)
            score = dict(baseline=run["baseline"], train=run["train"], contract=run["contract"],
                         context_key=run["context_key"], focus=run["targets"], metrics=run["metrics"], seed=seed,
                         cell_eval=False)
            for method in ("table", "linear"):
                cells = roundtrip(run["train"], top_k=run["top_k"], seed=seed, method=method)
                mapped = C.through_gene_map(cells, run["train"], method, seed)
                for label, c in ((f"oracle + gene map ({method})", mapped),):
                    t = P.score(fn(c, nonnegative=True, **kw), run["reference"], baselines=(), **score)
                    tables.append(t[t["method"] == "model"].assign(method=label, seed=seed))
                    sc, a, n = scale_cells(c, run["train"], run["contract"], run["context_key"])
                    t = P.score(fn(sc, nonnegative=True, **kw), run["reference"], baselines=(), **score)
                    tables.append(t[t["method"] == "model"].assign(method=label + " + delta scale", seed=seed))
                    print(f"protocol {protocol} seed {seed} {method}: {n} training effects; a_g quantiles "
                          f"{np.round(np.quantile(a, [0.05, 0.25, 0.5, 0.75, 0.95]), 2)}", flush=True)
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        table = pd.concat(tables, ignore_index=True)
        summ = P.summary(table, run["metrics"])
        cols = ["method", "groups"] + [f"{m} mean" for m in run["metrics"]]
        print(f"## protocol {protocol} ({run['rule']})")
        print(summ[cols].to_string(index=False), flush=True)


if __name__ == "__main__":
    main()
