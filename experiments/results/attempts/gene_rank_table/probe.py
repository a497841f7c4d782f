"""Probe (session 48, nothing built): would a decode of each gene's own rank -> expression table lift the codec oracle?

The codec's decodes give a written gene the value of its rank whatever the gene (RankFit: linear or the rank table),
then optionally a gene map (virtualcell.gene_map) predicts every gene from the decoded sentence. A per-gene table
decodes gene g at rank r as the mean expression of g in the training cells where g sits in r's rank bin (bins of
log2(rank + 1); each entry shrunk toward the all-gene bin mean with the weight of ``M`` cells), and an unwritten gene
as its mean where it is unwritten; or (``gene_linear_cells``) each gene's own line on log10(1 + rank). On protocol 2 (CRISPRa pairs) the target gene of an activation sits at rank 1
where it would sit at rank 1 whatever its level, which a shared table cannot tell apart.

    cd experiments && PYTHONPATH=. python results/attempts/gene_rank_table/probe.py --protocols 2 4 3 5 --seeds 0 1 2

Scored as codec_ceiling.py scores its oracles (the protocol's baseline rule on the decoded training cells).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import _protocol as P  # noqa: E402
from codec_ceiling import MAPPED, decoded_ways, protocol_runs  # noqa: E402

M = 5.0  # shrinkage weight (cells) toward the all-gene bin mean


def expression_and_ranks(train, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The training cells' log-normalized expression (cells x genes) and each gene's rank in its cell's sentence at
    ``top_k`` ``k`` (-1 where the sentence does not write it)."""
    from virtualcell.sentences import detect_scale, encode, expression_matrix, log_normalize

    X = expression_matrix(train)
    X = log_normalize(X, detect_scale(X))
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float64)
    s = encode(train, top_k=k, seed=seed)
    ranks = np.full(X.shape, -1, dtype=np.int64)
    ranks[np.repeat(np.arange(len(s)), s.lengths), s.ids] = s.rank_array()
    return X, ranks


def gene_table_cells(train, k: int, seed: int):  # noqa: ANN001, ANN201
    import anndata as ad

    X, ranks = expression_and_ranks(train, k, seed)
    g = X.shape[1]
    nb = int(np.floor(np.log2(k + 1))) + 1
    bins = np.where(ranks >= 0, np.floor(np.log2(np.maximum(ranks, 0) + 1)).astype(np.int64), nb)  # nb: unwritten
    idx = np.arange(g)[None, :] * (nb + 1) + bins
    sums = np.bincount(idx.ravel(), weights=X.ravel(), minlength=g * (nb + 1)).reshape(g, nb + 1)
    counts = np.bincount(idx.ravel(), minlength=g * (nb + 1)).reshape(g, nb + 1).astype(np.float64)
    overall = sums.sum(0) / np.maximum(counts.sum(0), 1)
    table = (sums + M * overall[None, :]) / (counts + M)
    table[:, nb] = sums[:, nb] / np.maximum(counts[:, nb], 1)  # unwritten: the gene's own mean, unshrunk
    decoded = table[np.arange(g)[None, :], bins].astype(np.float32)
    return ad.AnnData(decoded, obs=train.obs.copy(), var=pd.DataFrame(index=train.var_names.copy()))


def gene_linear_cells(train, k: int, seed: int):  # noqa: ANN001, ANN201
    """Each gene's own least-squares line of expression on log10(1 + rank) over the cells that write it (shrunk toward
    the all-gene line with the weight of M cells); an unwritten gene reads its mean where it is unwritten."""
    import anndata as ad

    X, ranks = expression_and_ranks(train, k, seed)
    w = ranks >= 0
    u = np.where(w, np.log10(1.0 + np.maximum(ranks, 0)), 0.0)
    y = np.where(w, X, 0.0)
    # the all-gene line
    uu, yy = u[w], X[w]
    B, _ = np.polyfit(uu, yy, 1)
    cnt = w.sum(0) + M
    su, sy = u.sum(0) + M * uu.mean(), y.sum(0) + M * yy.mean()
    suu = (u * u).sum(0) + M * (uu * uu).mean()
    suy = (u * y).sum(0) + M * (uu * yy).mean()
    mu, my = su / cnt, sy / cnt
    var = suu / cnt - mu * mu
    slope = np.where(var > 1e-9, (suy / cnt - mu * my) / np.maximum(var, 1e-9), B)
    icpt = my - slope * mu
    absent = np.where(~w, X, 0.0).sum(0) / np.maximum((~w).sum(0), 1)
    decoded = np.where(w, icpt[None, :] + slope[None, :] * u, absent[None, :]).astype(np.float32)
    return ad.AnnData(np.maximum(decoded, 0), obs=train.obs.copy(), var=pd.DataFrame(index=train.var_names.copy()))


def mapped(train, cells, seed: int):  # noqa: ANN001, ANN201
    import anndata as ad

    from virtualcell.gene_map import GeneMap
    from virtualcell.sentences import detect_scale, expression_matrix, log_normalize

    X = expression_matrix(train)
    kinds = GeneMap.fit_kinds(cells.X, log_normalize(X, detect_scale(X)), decode="table", seed=seed)
    return ad.AnnData(kinds[False](cells.X), obs=cells.obs.copy(), var=cells.var.copy())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--protocols", type=int, nargs="+", default=[2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=str(Path(__file__).with_name("probe.md")))
    args = ap.parse_args()
    P.setup(1)
    from virtualcell.evaluate import baselines as B

    rows = []
    for protocol in args.protocols:
        for seed in args.seeds:
            t = time.perf_counter()
            r = protocol_runs(protocol, seed, False)
            fn = getattr(B, r["rule"])
            kw = dict(baseline=r["baseline"], targets=r["targets"], perturbation_key=r["contract"].perturbation_key,
                      control=r["contract"].control, context_key=r["context_key"], max_cells=None, seed=seed)
            score = dict(baseline=r["baseline"], train=r["train"], contract=r["contract"], context_key=r["context_key"],
                         focus=r["targets"], metrics=r["metrics"], seed=seed, cell_eval=False)

            def scored(cells, label):  # noqa: ANN001, ANN202
                table = P.score(fn(cells, nonnegative=True, **kw), r["reference"], baselines=(), **score)
                table = table[table["method"] == "model"].assign(method=label, protocol=protocol, seed=seed)
                rows.append(table)

            scored(r["train"], f"{r['rule']}, non-negative")
            ways = decoded_ways(r["train"], r["top_k"], "table", seed)
            scored(ways[None], "codec oracle (rank table)")
            scored(ways[MAPPED], "codec oracle + gene map (table)")
            lin = decoded_ways(r["train"], r["top_k"], "linear", seed)
            scored(lin[MAPPED], "codec oracle + gene map (linear)")
            own = gene_table_cells(r["train"], r["top_k"], seed)
            scored(own, "codec oracle, per-gene rank table")
            scored(mapped(r["train"], own, seed), "codec oracle, per-gene rank table + gene map")
            line = gene_linear_cells(r["train"], r["top_k"], seed)
            scored(line, "codec oracle, per-gene line")
            scored(mapped(r["train"], line, seed), "codec oracle, per-gene line + gene map")
            print(f"protocol {protocol} seed {seed}: {time.perf_counter() - t:.0f} s", flush=True)
    long = pd.concat(rows, ignore_index=True)
    long = long[long["metric"].isin(["pearson_delta", "pearson_delta_top50", "discrimination", "edistance"])]
    table = long.groupby(["protocol", "method", "metric"], sort=False)["value"].mean().unstack("metric").round(3)
    text = ("# Per-gene rank tables through the codec (probe)\n\n" + (__doc__ or "") + "\n\nMeans over seeds "
            f"{args.seeds} and held-out groups.\n\n" + P.markdown_table(table.reset_index()) + "\n")
    Path(args.out).write_text(text)
    print(table.to_string())


if __name__ == "__main__":
    main()
