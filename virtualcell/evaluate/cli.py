"""The ``virtualcell evaluate`` sub-command: register it with :func:`add_evaluate_parser`.

Writes into ``--out``: ``metrics.csv`` (the tidy table), ``summary.md``, ``config.json``
(the arguments and what evaluation did to the inputs), ``metric_bars.png`` and
``delta_scatter.png``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

__all__ = ["add_evaluate_parser", "cmd_evaluate"]

# what an evaluation writes into its folder (a figure only where it has something to show)
OUTPUTS = ("metrics.csv", "summary.md", "config.json", "metric_bars.png", "delta_scatter.png")


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``evaluate`` to an ``argparse`` sub-parser collection; returns the new parser.

    Examples
    --------
    >>> import argparse
    >>> parser = argparse.ArgumentParser(prog="virtualcell")
    >>> p = add_evaluate_parser(parser.add_subparsers(dest="command"))
    >>> args = parser.parse_args(["evaluate", "--pred", "p.h5ad", "--real", "r.h5ad", "--out", "out"])
    >>> args.func is cmd_evaluate
    True
    """
    from ..cli import _add_common, _Formatter, _add_force, _positive_int, _seed

    p = subparsers.add_parser(
        "evaluate", formatter_class=_Formatter,
        epilog="example:\n  virtualcell evaluate --pred predictions.h5ad --real measured.h5ad --out my-evaluation",
        help="score predicted cells against measured ones, next to simple baselines and a noise ceiling",
        description="Score a predicted .h5ad against a measured one per perturbation (and context), with "
        "the built-in baselines and a split-half noise ceiling. Writes metrics.csv, summary.md, "
        "config.json and plots into --out.",
    )
    _add_common(p)
    p.add_argument("--pred", required=True, help="predicted cells (.h5ad), labelled like --real")
    p.add_argument("--real", required=True, help="measured cells (.h5ad): perturbed and control cells")
    p.add_argument("--perturbation-key", default=None,
                   help="obs column with the perturbation (default: the contract stored in --real)")
    p.add_argument("--control", default=None,
                   help="label of the control cells, several separated by commas (default: from the contract)")
    p.add_argument("--context-key", default=None,
                   help="obs column with the context (cell type/line), if any; several joined by + (cell_type+patient) "
                   "(default: the contract stored in --real, else the prediction's context column, recorded by "
                   "virtualcell predict, where --real has it)")
    p.add_argument("--dose-key", default=None,
                   help="obs column of --real with each cell's dose, so that each dose of a drug is a group of its own "
                   "(as virtualcell predict names them: drugA@10); default: the contract stored in --real")
    p.add_argument("--dose-unit-key", default=None,
                   help="obs column of --real with each dose's unit, where it is kept apart from --dose-key (sci-Plex's "
                   "dose_unit beside dose_value); default: the contract stored in --real")
    p.add_argument("--time-key", default=None, help="obs column of --real with each cell's time, as --dose-key "
                   "(default: the contract stored in --real)")
    p.add_argument("--gene-key", default=None, metavar="COLUMN",
                   help="var column holding the gene names in every input (symbols or Ensembl ids; default var_names)")
    p.add_argument("--baseline", default=None,
                   help="control cells fed to the model (.h5ad); default: split the measured controls in halves")
    p.add_argument("--train", default=None,
                   help="measured cells the baselines learn effects from (.h5ad; e.g. the model's training split, "
                   "so that meanshift carries each perturbation's effect from the other contexts); default: the "
                   "perturbed cells of --real, each target left out")
    p.add_argument("--out", required=True, help="output folder (created if needed; one of virtualcell's or empty)")
    p.add_argument("--profile", default="default",
                   help="metric profile: virtualcell's default, fast or pearson; or cell-eval's vcc (the Virtual Cell "
                   "Challenge metrics), full, minimal, de, anndata or pds, computed by the cell-eval library "
                   "(default: default)")
    p.add_argument("--threads", type=_positive_int, default=1,
                   help="threads for cell-eval's differential expression (default 1)")
    p.add_argument("--min-shared-genes", type=float, default=0.9,
                   help="refuse inputs sharing fewer than this fraction of the smallest input's genes (default 0.9)")
    from . import DEFAULT_BASELINES

    p.add_argument("--baselines", default=",".join(DEFAULT_BASELINES),
                   help="comma-separated baselines ('' for none; default: evaluate()'s, %(default)s); also built in: "
                        "dose (a drug's other doses, interpolated in log dose)")
    p.add_argument("--no-ceiling", action="store_true", help="skip the split-half noise ceiling")
    p.add_argument("--max-cells", type=_positive_int, default=500, help="cells per group for distances and baselines")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the cell subsampling and the split halves")
    _add_force(p)
    p.set_defaults(func=cmd_evaluate)
    return p


def _read(path: str, what: str) -> Any:
    from ..errors import DataError

    p = Path(path)
    if not p.exists():
        raise DataError(f"No such file: {path!r} ({what}). Check the path.")
    if p.suffix != ".h5ad":
        raise DataError(f"{path!r} ({what}) is not an .h5ad file.")
    from ..datasets import _read as read_h5ad

    return read_h5ad(p, what)


def _with_quantity_keys(real: Any, *, dose_key: str | None, time_key: str | None,
                        dose_unit_key: str | None = None, name: str = "--real") -> None:
    """Store ``--dose-key``/``--time-key``/``--dose-unit-key`` in ``real``'s contract (its other keys as stored, or
    the defaults); ``name``: the option that gave ``real``, for the refusals."""
    from dataclasses import replace

    from ..contract import DataContract
    from ..errors import ContractError, DataError

    for flag, key in (("--dose-key", dose_key), ("--dose-unit-key", dose_unit_key), ("--time-key", time_key)):
        if key is not None and key not in real.obs.columns:
            raise DataError(f"{flag} {key!r} is not a column of {name}'s obs (columns: {list(real.obs.columns)[:15]}).")
    try:
        stored = DataContract.from_adata(real)
    except ContractError:
        stored = DataContract()
    keys = replace(stored, dose_key=dose_key or stored.dose_key, time_key=time_key or stored.time_key,
                   dose_unit_key=dose_unit_key or stored.dose_unit_key)
    keys.require_dose_key()  # a unit column without a dose column: refused before anything is read
    keys.attach(real)


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Run :func:`~virtualcell.evaluate.evaluate` from parsed arguments and write the results.

    ``--out`` must be empty or a folder virtualcell wrote (else ``--force``); it is locked
    while the evaluation runs, and every file in it is written atomically.
    """
    from .. import safeio

    out = Path(args.out)
    legacy = ("metrics.csv",) if (out / "summary.md").exists() else ()
    with safeio.output_folder(out, kind="evaluate", force=args.force, legacy=legacy):
        return _evaluate(args, out)


def _evaluate(args: argparse.Namespace, out: Path) -> int:
    from .. import safeio
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..contract import control_labels
    from . import plot_delta_scatter, plot_metric_bars, summarize
    from ._core import _run

    pred = _read(args.pred, "--pred")
    real = _read(args.real, "--real")
    base = _read(args.baseline, "--baseline") if args.baseline else None
    train = _read(args.train, "--train") if args.train else None
    if args.dose_key or args.time_key or args.dose_unit_key:
        for name, data in (("--real", real), ("--train", train)):
            if data is not None:
                _with_quantity_keys(data, dose_key=args.dose_key, time_key=args.time_key,
                                    dose_unit_key=args.dose_unit_key, name=name)
    control = None
    if args.control is not None:  # one label, or several separated by commas (all read as the first)
        first, others = control_labels(args.control)
        control = [first, *others] if others else first
    keys = dict(perturbation_key=args.perturbation_key, control=control, context_key=args.context_key,
                gene_key=args.gene_key)
    baselines = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
    try:
        table, deltas = _run(pred, real, **keys, profile=args.profile, baselines=baselines, baseline=base, train=train,
                             ceiling=not args.no_ceiling, max_cells=args.max_cells, seed=args.seed,
                             threads=args.threads, min_shared_genes=args.min_shared_genes)
    except ImportError as err:
        from ..errors import VirtualCellError

        raise VirtualCellError(str(err)) from None
    # the last evaluation's files go first, with a killed run's temporary ones (this run holds the folder's lock): a
    # run cut half-way (a full disk) left its figures beside these metrics
    for name in OUTPUTS:
        stem, suffix = name.rsplit(".", 1)
        for old in (out / name, *out.glob(f".{stem}.????????.partial.{suffix}")):
            old.unlink(missing_ok=True)
    with safeio.atomic_path(out / "metrics.csv") as tmp:
        table.to_csv(tmp, index=False)
    title = f"Evaluation of {Path(args.pred).name} against {Path(args.real).name}"
    safeio.write_text(out / "summary.md", summarize(table, title=title))
    config = {"arguments": {k: v for k, v in vars(args).items() if k != "func"},
              "evaluation": table.attrs.get("virtualcell", {})}
    safeio.write_text(out / "config.json", json.dumps(config, indent=2, default=str))
    metrics = [m for m in ("pearson_delta", "pearson_delta_top50", "mse_top50", "direction_accuracy_top50",
                           "discrimination", "edistance", "overlap_at_N", "mae", "discrimination_score_l1")
               if m in set(table["metric"])]
    written = ["metrics.csv", "summary.md", "config.json"]
    if metrics:
        fig = plot_metric_bars(table, metric=metrics, return_fig=True)
        with safeio.atomic_path(out / "metric_bars.png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append("metric_bars.png")
    if deltas is not None and (table["method"] == "model").any():
        fig = plot_delta_scatter(deltas, return_fig=True)
        with safeio.atomic_path(out / "delta_scatter.png") as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        written.append("delta_scatter.png")
    n = table[table["method"] == "model"][["perturbation", "context"]].drop_duplicates().shape[0]
    print(summarize(table, title=title))
    print(f"evaluated {n} predicted perturbation x context groups; wrote {', '.join(written)} to {out}")
    return 0
