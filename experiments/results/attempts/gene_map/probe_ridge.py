"""Probe: does a linear map from the decoded sentence to every gene (ridge, fitted on the training cells) raise
the codec ceiling? The codec oracle (codec_ceiling.py) with the linear decode, against the same decode followed
by a ridge map D -> T (T: the training cells, log-normalized; lambda chosen on a random fifth of the training
cells by squared error), the protocol's rule applied to the imputed training cells.

    cd experiments && PYTHONPATH=. python results/attempts/gene_map/probe_ridge.py PROTOCOL [SEEDS...]

The probe before virtualcell/gene_map.py existed (session 42); its output for protocols 5, 2, 4 and 3 at seeds 0-2
is probe_pP.txt. GeneMap is the same fit, with the rank chosen too and the penalty grid widened (here protocols 3
and 4 chose the grid's smallest penalty); experiments/codec_ceiling.py now measures it.
"""
import sys, time
import numpy as np, pandas as pd, anndata as ad, scipy.sparse as sp
import _protocol as P
from codec_ceiling import protocol_runs
from virtualcell.evaluate import baselines as B
from virtualcell.sentences import roundtrip, expression_matrix, log_normalize, detect_scale

LAMBDAS = [0.01, 0.1, 1, 10, 100, 1000]  # times the mean diagonal of D'D / n


def ridge_map(D: np.ndarray, T: np.ndarray, seed: int):
    keep = np.flatnonzero((D != 0).any(0))
    Dk = D[:, keep]
    rng = np.random.default_rng(seed)
    val = rng.random(D.shape[0]) < 0.2

    def fit(rows, lam):
        mu_d, mu_t = Dk[rows].mean(0), T[rows].mean(0)
        Dc = Dk[rows] - mu_d
        G = Dc.T @ Dc
        scale = np.trace(G) / G.shape[0]
        W = np.linalg.solve(G + lam * scale * np.eye(G.shape[0]), Dc.T @ (T[rows] - mu_t))
        return mu_d, mu_t, W

    errs = []
    for lam in LAMBDAS:
        mu_d, mu_t, W = fit(~val, lam)
        errs.append(float((((Dk[val] - mu_d) @ W + mu_t - T[val]) ** 2).mean()))
    best = LAMBDAS[int(np.argmin(errs))]
    mu_d, mu_t, W = fit(np.ones(D.shape[0], bool), best)
    print("   lambda errors", dict(zip(LAMBDAS, np.round(errs, 5))), "->", best, "inputs", keep.size, flush=True)
    return lambda Dn: (Dn[:, keep] - mu_d) @ W + mu_t


def main():
    protocol = int(sys.argv[1]); seeds = [int(s) for s in sys.argv[2:]] or [0]
    P.setup(2)
    rows = []
    for seed in seeds:
        run = protocol_runs(protocol, seed, False)
        train, contract = run["train"], run["contract"]
        fn = getattr(B, run["rule"])
        kw = dict(baseline=run["baseline"], targets=run["targets"], perturbation_key=contract.perturbation_key,
                  control=contract.control, context_key=run["context_key"], max_cells=None, seed=seed)
        score = dict(baseline=run["baseline"], train=train, contract=contract, context_key=run["context_key"],
                     focus=run["targets"], metrics=run["metrics"], seed=seed, cell_eval=run["cell_eval"])
        X = expression_matrix(train)
        T = np.asarray(log_normalize(X, detect_scale(X)).todense(), dtype=np.float64)
        parts = []
        first = P.score(fn(train, nonnegative=True, **kw), run["reference"], baselines=(run["rule"],), **score)
        parts.append(first.replace({"method": {"model": "measured, non-negative"}}))
        for method in ("linear", "table"):
            t = time.perf_counter()
            dec = roundtrip(train, top_k=run["top_k"], seed=seed, method=method)
            D = np.asarray(dec.X.todense() if sp.issparse(dec.X) else dec.X, dtype=np.float64)
            f = ridge_map(D, T, seed)
            imp = ad.AnnData(f(D).astype(np.float32), obs=train.obs.copy(), var=pd.DataFrame(index=train.var_names.copy()))
            for name, cells in ((f"oracle {method}", dec), (f"oracle {method} + ridge", imp)):
                tab = P.score(fn(cells, nonnegative=True, **kw), run["reference"], baselines=(), **score)
                parts.append(tab[tab["method"] == "model"].assign(method=name))
            print(f"  seed {seed} {method}: {time.perf_counter() - t:.0f} s", flush=True)
        tab = pd.concat(parts, ignore_index=True)
        tab["seed"] = seed
        rows.append(tab)
    table = pd.concat(rows, ignore_index=True)
    metrics = tuple(m for m in run["metrics"] + (P.VCC_METRICS if run["cell_eval"] else ()) if m in set(table["metric"]))
    summ = P.summary(table, metrics)
    print(summ[["method", "groups"] + [f"{m} mean" for m in metrics]].to_string(index=False))


main()
