"""Validation: predicted vs measured perturbation effects, next to simple baselines and a noise ceiling.

* :func:`evaluate` — score a predicted AnnData against a measured one per perturbation and
  context; returns a tidy table (model, baselines and the split-half ceiling side by side).
* :data:`METRICS` / :data:`PROFILES` — the metric registry (pure functions over a frozen
  :class:`PredRealPair`, each with a direction) and named sets of them.
* :mod:`~virtualcell.evaluate.baselines` — ``nochange``, ``meanshift``, ``pertmean``,
  ``additive``, ``linear``, ``coexpression`` (the defaults, :data:`DEFAULT_BASELINES`) and ``dose``:
  each returns a predicted AnnData.
* cell-eval (Arc Institute, the Virtual Cell Challenge metrics) as the engine: ``profile="vcc"``
  (or ``"full"``, ``"minimal"``, ``"de"``, ``"anndata"``, ``"pds"``; :data:`CELL_EVAL_PROFILES`)
  scores the model, the baselines and the ceiling with cell-eval's own metric functions, and
  :func:`to_cell_eval` writes files that ``cell-eval run`` reads as they are.
* :func:`split_controls` — independent control halves: the baseline population fed to the
  model, and the reference measured deltas are taken against. Always evaluate this way: a
  shared control inflates every score.
* :func:`effect_size` — effect strength corrected for group size, for ranking.
* :func:`distance_test` — ``pertpy.tools.DistanceTest`` with its group-order bug (#1072) fixed.
* :func:`summarize`, :func:`delta_table`, :func:`plot_delta_scatter`, :func:`plot_metric_bars`.

Nothing here imports torch; cell-eval (with polars and scanpy) is imported when a metric is
computed, pertpy and matplotlib when a distance metric or a plot is used.

Examples
--------
>>> import virtualcell as vc
>>> adata = vc.datasets.load("perturbench")
>>> base, ref = vc.evaluate.split_controls(adata, seed=0)
>>> pred = vc.evaluate.baselines.additive(ref, baseline=base)  # stands in for a model
>>> table = vc.evaluate.evaluate(pred, ref, baseline=base, profile="fast")
>>> md = vc.evaluate.summarize(table)
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover - the lazy names below, for type checkers and editors
    from . import baselines, distances, metrics, plots
    from ._celleval import CELL_EVAL_PROFILES, to_cell_eval
    from ._core import TABLE_COLUMNS, delta_table, evaluate, summarize
    from ._data import effect_size, resolve_contract, split_controls
    from .baselines import BASELINES
    from .distances import distance_test, sorted_by_group
    from .metrics import METRICS, PROFILES, TOP_N, Metric, PredRealPair
    from .plots import plot_delta_scatter, plot_metric_bars

# the baselines evaluate() and `virtualcell evaluate` put beside a model unless told otherwise (here, not in _core, so
# that the CLI's parser reads it without importing pandas)
DEFAULT_BASELINES = ("nochange", "meanshift", "pertmean", "additive", "linear", "coexpression")

# name -> (module, attribute or None for the module). Imported on first use, so that
# `import virtualcell.evaluate.cli` (the CLI's parser) does not import pandas.
_LAZY = {
    "evaluate": ("._core", "evaluate"),
    "summarize": ("._core", "summarize"),
    "delta_table": ("._core", "delta_table"),
    "TABLE_COLUMNS": ("._core", "TABLE_COLUMNS"),
    "split_controls": ("._data", "split_controls"),
    "to_cell_eval": ("._celleval", "to_cell_eval"),
    "CELL_EVAL_PROFILES": ("._celleval", "CELL_EVAL_PROFILES"),
    "effect_size": ("._data", "effect_size"),
    "resolve_contract": ("._data", "resolve_contract"),
    "baselines": (".baselines", None),
    "BASELINES": (".baselines", "BASELINES"),
    "metrics": (".metrics", None),
    "METRICS": (".metrics", "METRICS"),
    "PROFILES": (".metrics", "PROFILES"),
    "TOP_N": (".metrics", "TOP_N"),
    "Metric": (".metrics", "Metric"),
    "PredRealPair": (".metrics", "PredRealPair"),
    "distances": (".distances", None),
    "distance_test": (".distances", "distance_test"),
    "sorted_by_group": (".distances", "sorted_by_group"),
    "plots": (".plots", None),
    "plot_delta_scatter": (".plots", "plot_delta_scatter"),
    "plot_metric_bars": (".plots", "plot_metric_bars"),
}

__all__ = [*_LAZY, "DEFAULT_BASELINES"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = import_module(module, __name__)
        value = mod if attr is None else getattr(mod, attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'virtualcell.evaluate' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
