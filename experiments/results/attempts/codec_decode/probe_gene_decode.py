"""Probe: a gene-aware decode (the rank table plus a per-gene offset, shrunk) through each protocol's codec oracle.

    PYTHONPATH=.:experiments python experiments/results/attempts/codec_decode/probe_gene_decode.py PROTOCOL [SEEDS...]
"""
import sys, time
import numpy as np, pandas as pd
sys.path.insert(0, "experiments")
import _protocol as P
import codec_ceiling as CC
from virtualcell.sentences import encode, RankFit, Vocabulary, expression_matrix, log_normalize, detect_scale
import scipy.sparse as sp
import anndata as ad

LAMBDA = 10.0

def gene_roundtrip(adata, top_k, seed, mode):
    sent = encode(adata, top_k=top_k, seed=seed)
    fit = RankFit.fit(adata, sent, seed=seed)
    X = expression_matrix(adata)
    Xn = log_normalize(X, detect_scale(X))
    rows = np.repeat(np.arange(len(sent)), sent.lengths)
    cols = sent.ids
    own = Vocabulary.from_adata(adata).ids(sent.vocab.genes, missing="mark")
    y = np.asarray(Xn[rows, own[cols]]).ravel().astype(np.float64)
    r = sent.rank_array().astype(np.int64)
    table = np.asarray(fit.rank_means)
    base = table[np.minimum(r, table.size - 1)]
    G = len(sent.vocab)
    if mode == "table":
        vals = base
    elif mode == "offset":
        e = y - base
        c = np.bincount(cols, weights=e, minlength=G) / (np.bincount(cols, minlength=G) + LAMBDA)
        vals = base + c[cols]
    elif mode == "slope":  # per-gene offset and slope on log10(1+rank), each shrunk
        e = y - base
        x = np.log10(1.0 + r); n = np.bincount(cols, minlength=G).astype(float)
        xm = np.bincount(cols, weights=x, minlength=G) / np.maximum(n, 1)
        xc = x - xm[cols]
        c = np.bincount(cols, weights=e, minlength=G) / (n + LAMBDA)
        d = np.bincount(cols, weights=xc * e, minlength=G) / (np.bincount(cols, weights=xc * xc, minlength=G) + LAMBDA * 0.1)
        vals = base + c[cols] + d[cols] * xc
    vals = np.clip(vals, 0, None).astype(np.float32)
    M = sp.csr_matrix((vals, sent.ids.astype(np.int32), sent.offsets), shape=(len(sent), G))
    M.sort_indices()
    return ad.AnnData(M, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.copy()))

protocol = int(sys.argv[1]); seeds = [int(s) for s in sys.argv[2:]] or [0, 1, 2]
P.setup(1)
from virtualcell.evaluate import baselines as B
rows = []
for seed in seeds:
    run = CC.protocol_runs(protocol, seed, False)
    fn = getattr(B, run["rule"])
    kw = dict(baseline=run["baseline"], targets=run["targets"], perturbation_key=run["contract"].perturbation_key,
              control=run["contract"].control, context_key=run["context_key"], max_cells=None, seed=seed)
    score = dict(baseline=run["baseline"], train=run["train"], contract=run["contract"], context_key=run["context_key"],
                 focus=run["targets"], metrics=run["metrics"], seed=seed, cell_eval=False)
    for mode in ("table", "offset", "slope"):
        t = time.perf_counter()
        oracle = fn(gene_roundtrip(run["train"], run["top_k"], seed, mode), nonnegative=True, **kw)
        tab = P.score(oracle, run["reference"], baselines=(), **score)
        tab = tab[tab["method"] == "model"].assign(method=mode, seed=seed)
        rows.append(tab)
        print(protocol, seed, mode, f"{time.perf_counter()-t:.0f}s", flush=True)
out = pd.concat(rows)
print(out.groupby(["method", "metric"])["value"].mean().unstack().round(3).to_string())
