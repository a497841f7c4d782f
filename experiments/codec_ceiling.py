"""What a perfect model could reach through the cell-sentence codec, on each protocol's split (no training).

    python experiments/codec_ceiling.py [--seeds 0 1 2] [--protocols 5 4 3 2 0] [--quick]

The model never sees expression. It reads and writes cell sentences (each cell's ``top_k``
expressed genes, by rank), and the Simulator turns a generated sentence back into expression
with one rank -> expression map (``RankFit``, as Cell2Sentence does) and predicts a baseline
cell ``x`` as ``calibrated(x, decode(perturbed) - decode(control))``, which is never below zero
(``virtualcell._stats.calibrated``; a baseline's ``nonnegative=True``). So a model that wrote every perturbed cell exactly as
the data does would still predict the effect *as the codec sees it*, made non-negative.

This script measures that limit on each protocol's own split, without training anything:
1. the training cells are encoded at ``top_k`` (the protocol's, and twice and four times it)
   and decoded with a ``RankFit`` fitted on them, as ``virtualcell train`` does
   (``virtualcell.sentences.roundtrip``);
2. the protocol's strongest baseline rule (meanshift, additive, pertmean) is applied to the
   *decoded* training cells: the effects a model that learned its training data perfectly
   through sentences would give;
3. that delta is added to the protocol's baseline cells with the Simulator's calibration, and
   the result is scored exactly as the protocol scores the model.

Rows of each protocol's table:
* ``codec oracle, top_k=K``: steps 1-3, what a perfect model reaches at sentence length K;
* ``codec oracle (rank table), top_k=K``: the same at the protocol's K, decoded by the rank table
  (the mean expression at each rank) instead of the linear map: the other decode that
  ``virtualcell train`` may choose on its validation split (``RankFit.method``);
* ``codec oracle + gene map (D), top_k=K``: the decoded cells (decode ``D``) passed through a gene map fitted on
  the same training cells (``virtualcell.gene_map``: every gene predicted from the decoded sentence, the genes
  below the sentence's cut included); ``+ residual gene map``: through the map fitted to what the decode misses,
  added to the decode. The four other decodes the verdict may choose;
* ``baseline, non-negative``: the baseline rule on the measured training cells, calibrated as a
  prediction is (what the served blend gives at weight 0): the cost of non-negativity alone;
* the baseline as the protocol scores it (``x + delta``, whose cells may go below zero) and the
  split-half ceiling.
Means over ``--seeds`` (each seed is the protocol's split at that seed) and the held-out groups.
Protocol ``0`` is the known-answer synthetic screen (``synthetic_recovery.py``), whose target is a
ranking: there the rows are the Spearman correlation of the training cells' effect sizes with the
true ones, measured directly and through the codec.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

import _protocol as P

ORACLE = "codec oracle, top_k={k}"
TABLE = "codec oracle (rank table), top_k={k}"  # decoded by the rank table, not the linear map (RankFit.method)
NONNEG = "{rule}, non-negative"
MAPPED = "codec oracle + gene map ({decode}), top_k={k}"  # the decode followed by a gene map (virtualcell.gene_map)
RESIDUAL = "codec oracle + residual gene map ({decode}), top_k={k}"  # ... by a map fitted to what the decode misses


def oracle_rows(train, top_ks: list[int], seed: int, score) -> list[tuple[str, object]]:  # noqa: ANN001
    """``(label, score(cells))`` for every codec oracle, in the tables' row order: the linear decode at every top_k,
    the rank table, then both kinds of gene map after each decode at the protocol's top_k (``top_ks[0]``).
    ``score`` turns the training cells, decoded one way, into that row's result."""
    k0, rows = top_ks[0], {}
    for k, method in [(k, "linear") for k in top_ks] + [(k0, "table")]:
        for way, cells in decoded_ways(train, k, method, seed, mapped=k == k0).items():
            rows[(way or (ORACLE if method == "linear" else TABLE)).format(k=k, decode=method)] = score(cells)
    order = ([ORACLE.format(k=k) for k in top_ks] + [TABLE.format(k=k0)]
             + [kind.format(k=k0, decode=m) for kind in (MAPPED, RESIDUAL) for m in ("linear", "table")])
    return [(label, rows[label]) for label in order]


def decoded_ways(train, k: int, method: str, seed: int, *, mapped: bool = True) -> dict:  # noqa: ANN001
    """The training cells through the codec at ``top_k`` ``k``, decoded by ``method``: ``{None: the decode alone}``
    and, with ``mapped``, the same cells through both kinds of gene map fitted on them as ``virtualcell train`` fits
    them for its verdict's mapped decodes (``{MAPPED: fitted to the expression, RESIDUAL: fitted to what the decode
    misses}``). One roundtrip and one :meth:`GeneMap.fit_kinds` (its SVDs shared by both kinds) per decode."""
    import anndata as ad

    from virtualcell.gene_map import GeneMap
    from virtualcell.sentences import detect_scale, expression_matrix, log_normalize, roundtrip

    cells = roundtrip(train, top_k=k, seed=seed, method=method)
    ways = {None: cells}
    if mapped:
        X = expression_matrix(train)
        kinds = GeneMap.fit_kinds(cells.X, log_normalize(X, detect_scale(X)), decode=method, seed=seed)
        for label, residual in ((MAPPED, False), (RESIDUAL, True)):
            ways[label] = ad.AnnData(kinds[residual](cells.X), obs=cells.obs.copy(), var=cells.var.copy())
    return ways


def score_protocol(name: str, *, rule: str, train, baseline, reference, contract, context_key: str | None,  # noqa: ANN001
                   targets: list[tuple[str, str]], metrics: tuple[str, ...], top_ks: list[int], seed: int,
                   cell_eval: bool) -> pd.DataFrame:
    """Every row of one protocol at one seed: the long table of P.score, methods renamed."""
    from virtualcell.evaluate import baselines as B

    fn = getattr(B, rule)
    kw = dict(baseline=baseline, targets=targets, perturbation_key=contract.perturbation_key, control=contract.control,
              context_key=context_key, max_cells=None, seed=seed)
    score = dict(baseline=baseline, train=train, contract=contract, context_key=context_key, focus=targets,
                 metrics=metrics, seed=seed, cell_eval=cell_eval)
    parts = []
    measured = fn(train, nonnegative=True, **kw)
    first = P.score(measured, reference, baselines=(rule,), **score)
    parts.append(first.replace({"method": {"model": NONNEG.format(rule=rule)}}))
    t = time.perf_counter()

    def oracle(cells):  # noqa: ANN001, ANN202 - the rule on the decoded training cells, scored as the protocol does
        table = P.score(fn(cells, nonnegative=True, **kw), reference, baselines=(), **score)
        return table[table["method"] == "model"]

    parts += [table.assign(method=label) for label, table in oracle_rows(train, top_ks, seed, oracle)]
    print(f"  {name} seed {seed}: the codec oracles in {time.perf_counter() - t:.0f} s", flush=True)
    out = pd.concat(parts, ignore_index=True)
    out["seed"] = seed
    return out


def synthetic_table(seed: int, top_ks: list[int]) -> pd.DataFrame:
    """The synthetic screen (``synthetic_recovery.py``'s split): Spearman of each condition's measured effect size in
    the training cells of its context (the norm of its mean delta, as that script's reference) against the true
    effect sizes, measured directly and through the codec at each top_k."""
    from scipy.stats import spearmanr

    from synthetic_recovery import CONTEXT, training_effects

    import virtualcell as vc
    from virtualcell.datasets.synthetic import truth_effects
    from virtualcell.sentences import expression_matrix, log_normalize

    data = vc.datasets.synthetic_screen(seed=seed)
    _, rest = vc.evaluate.split_controls(data, seed=seed)
    true = truth_effects(data)[f"effect_{CONTEXT}"]

    def spearman(X) -> float:  # noqa: ANN001
        eff, _ = training_effects(X, rest, true.index)
        ok = np.isfinite(eff)
        return float(spearmanr(eff[ok], true.to_numpy()[ok]).statistic)

    rows = [("measured effect in the training cells", spearman(log_normalize(expression_matrix(rest), "counts")))]
    rows += oracle_rows(rest, top_ks, seed, lambda cells: spearman(cells.X))
    return pd.DataFrame([{"method": m, "metric": "spearman", "value": v, "seed": seed, "perturbation": "all",
                          "context": CONTEXT} for m, v in rows])


def protocol_runs(protocol: int, seed: int, quick: bool) -> dict:
    """The protocol's split at ``seed`` and how the protocol scores it (its own ``data()``)."""
    if protocol == 5:
        import protocol_5_cytokine_response as p5

        _, contract, stim, train, baseline, reference = p5.data(seed)
        return dict(rule="meanshift", train=train, baseline=baseline[: 8 if quick else 250].copy(), reference=reference,
                    contract=contract, context_key=p5.HALF, targets=[(stim, "heldout")], metrics=p5.METRICS,
                    top_k=p5.TOP_K, cell_eval=False)
    if protocol == 4:
        import protocol_4_screen_ranking as p4

        adata, contract, held, train, baseline, base_idx, _ = p4.data(seed, 8 if quick else 120)
        col, rep = p4.HELD
        knockouts = sorted(set(contract.labels(train)) - {contract.control})
        return dict(rule="meanshift", train=train, baseline=baseline, contract=contract,
                    reference=p4.held_reference(adata, held, base_idx), context_key=col,
                    targets=[(p, rep) for p in knockouts], metrics=P.METRICS, top_k=p4.TOP_K,
                    cell_eval=True)
    if protocol == 3:
        import protocol_3_unseen_knockouts as p3

        _, contract, held, _, train, baseline, reference = p3.data(seed, p3.N_HOLDOUT)
        return dict(rule="pertmean", train=train, baseline=baseline[: 8 if quick else 200].copy(), reference=reference,
                    contract=contract, context_key=contract.context_key, targets=[(p, "all") for p in held],
                    metrics=P.METRICS, top_k=p3.TOP_K, cell_eval=False)
    if protocol == 2:
        import protocol_2_unseen_pairs as p2

        _, contract, held, train, baseline, reference, _, _ = p2.data(seed)
        return dict(rule="additive", train=train, baseline=baseline, reference=reference, contract=contract,
                    context_key=contract.context_key, targets=[(p, "k562") for p in held], metrics=P.METRICS,
                    top_k=p2.TOP_K, cell_eval=False)
    raise SystemExit(f"protocol {protocol}: choose among 5, 4, 3, 2 and 0 (the synthetic screen)")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--protocols", type=int, nargs="+", default=[5, 4, 3, 2, 0], help="0: the synthetic screen")
    ap.add_argument("--quick", action="store_true", help="seed 0, protocol 5, 8 cells, the protocol's top_k only")
    ap.add_argument("--out", default=str(P.RESULTS))
    args = ap.parse_args(argv)
    P.setup(1)
    started = time.perf_counter()
    seeds, protocols = ([0], [5]) if args.quick else (args.seeds, args.protocols)
    sections, record = [], {"command": P.command_line(), "seeds": seeds, "protocols": {}}
    for protocol in protocols:
        tables, run = [], None
        if protocol == 0:  # the synthetic screen: a ranking, scored on its own
            from synthetic_recovery import TOP_K as top_k

            ks = [top_k] if args.quick else [top_k, 2 * top_k]
            table = pd.concat([synthetic_table(seed, ks) for seed in seeds], ignore_index=True)
            means = table.groupby("method", sort=False)["value"].mean().rename("spearman vs true effects").reset_index()
            sections += [f"## Synthetic screen (effect sizes in typeA; synthetic_recovery.py's top_k is {top_k})", "",
                         P.markdown_table(means), ""]
            record["protocols"]["synthetic"] = {"top_k": top_k, "summary": means.to_dict(orient="records")}
            print(means.to_string(index=False), flush=True)
            continue
        for seed in seeds:
            run = protocol_runs(protocol, seed, args.quick)
            ks = [run["top_k"]] if args.quick else [run["top_k"], 2 * run["top_k"], 4 * run["top_k"]]
            tables.append(score_protocol(f"protocol {protocol}", rule=run["rule"], train=run["train"],
                                         baseline=run["baseline"], reference=run["reference"], contract=run["contract"],
                                         context_key=run["context_key"], targets=run["targets"], metrics=run["metrics"],
                                         top_ks=ks, seed=seed, cell_eval=run["cell_eval"]))
        table = pd.concat(tables, ignore_index=True)
        scored = run["metrics"] + (P.VCC_METRICS if run["cell_eval"] else ())  # cell_eval adds cell-eval's vcc_*
        metrics = tuple(m for m in scored if m in set(table["metric"]))
        summ = P.summary(table, metrics)
        means = summ[["method", "groups"] + [f"{m} mean" for m in metrics]]
        means.columns = ["method", "groups"] + list(metrics)
        sections += [f"## Protocol {protocol} ({run['rule']}; the protocol's top_k is {run['top_k']})", "",
                     P.markdown_table(means), ""]
        record["protocols"][str(protocol)] = {"rule": run["rule"], "top_k": run["top_k"],
                                              "summary": means.to_dict(orient="records")}
        print(means.to_string(index=False), flush=True)
    record |= {"wall_seconds": round(time.perf_counter() - started, 1), "hardware": P.hardware(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    stem = "codec_ceiling_quick" if args.quick else "codec_ceiling"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    groups = "groups: the held-out groups scored per seed, summed over seeds"
    md = ["# What a perfect model could reach through the cell-sentence codec", "",
          f"Command: `{record['command']}` ({record['wall_seconds'] / 60:.1f} min, no training). Seeds {seeds}; "
          f"values are means over seeds and held-out groups ({groups}).", "",
          __doc__.split("\n\n", 2)[2].strip(), "", *sections]
    (out / f"{stem}.md").write_text("\n".join(md) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(P._jsonable(record), indent=1))
    print(f"wrote {out / stem}.md", flush=True)


if __name__ == "__main__":
    main()
