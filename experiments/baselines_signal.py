"""Signal levels of simple baselines on the shared data, with independent control halves.

Measures, through ``virtualcell.evaluate``, the signal levels the README's benchmark table quotes
(row "baseline signal levels, split controls"; the table is ``experiments/results/baselines_signal.md``):

* Kang 2018 (scGen split), hold one cell type out: ``meanshift`` vs the split-half ceiling.
* PerturBench K562 CRISPRa pairs: ``additive`` vs the ceiling (mean and median).
* Papalexi 2021, leave one knockout out: ``pertmean`` vs the ceiling.
* PerturBench kinases (the 9 genes perturbed in all four lines: CRISPRa in K562, CRISPRi in
  the glioma lines), leave one out per line: ``pertmean`` with a *shared* control (the
  baseline and the reference are the same cells) vs split controls, and the ceiling.

The metric is ``pearson_delta`` over all genes (the README's numbers), with the top-50-DE
variant beside it. Every number is averaged over ``--seeds`` control splits because the
small groups (50 control cells per K562 half) make a single split noisy; the spread across
splits is reported too.

Run from the repository root::

    python experiments/baselines_signal.py            # 20 seeds, about 40 s on 2 cores

It prints the table and writes ``experiments/results/baselines_signal.md`` and the config
next to it (``baselines_signal.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

import virtualcell as vc
from virtualcell.evaluate import evaluate, split_controls

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = tuple(range(20))
    metrics: tuple[str, ...] = ("pearson_delta", "pearson_delta_top50")
    max_cells: int = 500


@dataclass(frozen=True)
class Task:
    name: str
    dataset: str
    baseline: str
    subset: str | None  # obs query on the loaded dataset; "in_every_context" keeps what every context measured
    pairs_only: bool = False  # score combinations "A+B" only
    shared_control: bool = False  # feed the reference controls to the baseline (the wrong way)


TASKS = [
    Task("kang scgen, hold one cell type out", "kang2018_scgen", "meanshift", None),
    Task("perturbench K562 pairs", "perturbench", "additive", "cell_type == 'k562'", pairs_only=True),
    Task("papalexi, leave one knockout out", "papalexi2021", "pertmean", None),
    Task("perturbench kinases (4 lines), split control", "perturbench", "pertmean", "in_every_context"),
    Task("perturbench kinases (4 lines), SHARED control", "perturbench", "pertmean", "in_every_context",
         shared_control=True),
]


def run_task(task: Task, config: Config) -> pd.DataFrame:
    """Tidy rows (seed, method, perturbation, context, metric, value) of one task."""
    adata = vc.datasets.load(task.dataset)
    contract = vc.DataContract.from_adata(adata)
    if task.subset == "in_every_context":
        per_context = pd.crosstab(contract.labels(adata), contract.contexts(adata))
        keep = per_context.index[(per_context > 0).all(axis=1)]
        adata = adata[np.isin(contract.labels(adata), keep)].copy()
    elif task.subset:
        adata = adata[adata.obs.query(task.subset).index].copy()
    keys = dict(perturbation_key=contract.perturbation_key, control=contract.control, context_key=contract.context_key)
    frames = []
    for seed in config.seeds:
        if task.shared_control:
            # the mistake this task measures: the measured controls passed as the baseline too. evaluate refuses the
            # same cells under the same names (a user's slip), so the demonstration names its copies apart
            reference = adata
            baseline = adata[contract.is_control(adata)].copy()
            baseline.obs_names = [f"shared-{n}" for n in baseline.obs_names]
        else:
            baseline, reference = split_controls(adata, **keys, seed=seed)
        table = evaluate(None, reference, **keys, baseline=baseline, profile=list(config.metrics),
                         baselines=(task.baseline,), ceiling=not task.shared_control,
                         max_cells=config.max_cells, seed=seed)
        frames.append(table.assign(seed=seed))
    table = pd.concat(frames, ignore_index=True)
    if task.pairs_only:
        table = table[table["perturbation"].str.contains("+", regex=False)]
    return table


def summarize_task(task: Task, table: pd.DataFrame, config: Config) -> list[dict]:
    rows = []
    predicted = set(zip(table.loc[table["method"] == task.baseline, "perturbation"],
                        table.loc[table["method"] == task.baseline, "context"]))
    for method in [task.baseline, "ceiling"]:
        for scope in (["predicted", "all"] if method == "ceiling" and task.pairs_only else ["all"]):
            sub = table[table["method"] == method]
            if scope == "predicted":
                sub = sub[[k in predicted for k in zip(sub["perturbation"], sub["context"])]]
            if sub.empty:
                continue
            row = {"task": task.name, "method": method + (" (same groups)" if scope == "predicted" else ""),
                   "groups": sub[["perturbation", "context"]].drop_duplicates().shape[0]}
            for metric in config.metrics:
                per_seed = sub[sub["metric"] == metric].groupby("seed")["value"].agg(["mean", "median"])
                row[f"{metric} mean"] = per_seed["mean"].mean()
                row[f"{metric} sd"] = per_seed["mean"].std(ddof=1) if len(per_seed) > 1 else np.nan
                row[f"{metric} median"] = per_seed["median"].mean()
            rows.append(row)
    return rows


def to_markdown(summary: pd.DataFrame, config: Config) -> str:
    cols = ["task", "method", "groups"]
    header = cols + [f"{m} {s}" for m in config.metrics for s in ("mean", "median")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, r in summary.iterrows():
        cells = [str(r[c]) for c in cols]
        for m in config.metrics:
            cells.append(f"{r[f'{m} mean']:.3f} ± {r[f'{m} sd']:.3f}")
            cells.append(f"{r[f'{m} median']:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=20, help="number of control splits (seeds 0..n-1)")
    parser.add_argument("--out", default=str(RESULTS / "baselines_signal.md"))
    args = parser.parse_args(argv)
    config = Config(seeds=tuple(range(args.seeds)))
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    t0 = time.perf_counter()
    rows = []
    for task in TASKS:
        t = time.perf_counter()
        rows += summarize_task(task, run_task(task, config), config)
        print(f"  {task.name}: {time.perf_counter() - t:.1f} s", flush=True)
    summary = pd.DataFrame(rows)
    md = to_markdown(summary, config)
    text = (
        "# Signal levels of simple baselines (split controls)\n\n"
        f"pearson_delta over all genes and over the 50 top measured DE genes (Welch t); mean ± sd over "
        f"{len(config.seeds)} control splits (seeds {list(config.seeds)}) of the per-split mean over groups, "
        "and the per-split median averaged over splits. 'ceiling (same groups)' is the ceiling over the "
        "groups the baseline predicts. Made by experiments/baselines_signal.py.\n\n" + md + "\n"
    )
    print()
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(
        {"config": asdict(config), "tasks": [asdict(t) for t in TASKS], "virtualcell": vc.__version__,
         "seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    print(f"wrote {out} and {out.with_suffix('.json').name} ({time.perf_counter() - t0:.0f} s)")
    return summary


if __name__ == "__main__":
    main()
