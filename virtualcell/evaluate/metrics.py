"""Metrics: a registry of pure functions over a frozen predicted/measured pair.

Each metric is ``fn(pair: PredRealPair) -> {perturbation: value}``, registered with a
name, a description and a direction (is higher or lower better). Named profiles pick a
set of metrics. The registry is read-only: pass your own :class:`Metric` objects to
:func:`~virtualcell.evaluate.evaluate` instead of adding to it.

Deltas are always ``mean(perturbed) - mean(control)``: the prediction's against the
prediction's control (the population fed to the model, or its decoded control), the
measurement's against the measured (reference) control.

Where cell-eval (the field's standard; the engine of ``evaluate(..., profile="vcc")``, see
:mod:`virtualcell.evaluate._celleval`) has the metric, it computes it here too: ``pearson_delta``,
``mae`` and ``mse`` call cell-eval's own functions on the pair's means (cell-eval imported on first
use). ``tests/test_cell_eval.py`` shows they equal the former hand-written numbers and the
cell-level cell-eval profile on a fixture. Two documented exceptions: a prediction with no
change at all correlates 0 here, where cell-eval's ``pearsonr`` gives NaN; and the cell-eval
profiles clip predicted values below 0 (cell-eval reads log1p expression), so a shifted-control
baseline that goes negative scores a little differently there. ``discrimination`` differs from
cell-eval's ``discrimination_score_l1`` by definition (see :func:`discrimination`); the rest
(``*_top50``, ``direction_accuracy_top50``, ``de_overlap_top50``, the distances) have no
cell-eval counterpart.

Examples
--------
>>> from virtualcell.evaluate import METRICS, PROFILES
>>> METRICS["pearson_delta_top50"].direction
'higher'
>>> "edistance" in PROFILES["fast"]
False
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType

import numpy as np

from ..errors import DataError, preview

__all__ = ["Metric", "PredRealPair", "METRICS", "PROFILES", "TOP_N", "resolve_metrics"]

TOP_N = 50  # the number of measured DE genes the *_top50 metrics look at
_TOL = 1e-5  # a delta below this is float noise: a copied control has delta exactly 0


# --------------------------------------------------------------------------- #
# The pair
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class PredRealPair:
    """Predicted and measured expression of one context, aligned on the same genes.

    Built once per context and method by :func:`~virtualcell.evaluate.evaluate`; the
    constructor checks that every array has one column per gene, so metrics need not.

    Attributes
    ----------
    genes
        Gene names, one per column.
    context
        The context (cell type / line) these perturbations were measured in.
    perturbations
        The scored perturbations, one row of ``pred_means`` / ``real_means`` each.
    pred_means, real_means
        Mean log1p expression per perturbation, predicted and measured (perturbations x genes).
    pred_control, real_control
        Mean control expression: the prediction's control and the measured (reference) control.
    candidates, candidate_deltas
        Every measured perturbation of the context and its measured delta: the line-up
        the discrimination score ranks each prediction in.
    real_de_score, pred_de_score
        Per perturbation and gene, how differentially expressed the gene is in the measurement
        and in the prediction (Welch t statistic against the respective control cells); they
        rank the top DE genes.
    pred_cells, real_cells, control_cells
        Cells (rows) for the distribution metrics, in a shared PCA embedding; empty when
        the chosen metrics do not need cells.
    """

    genes: tuple[str, ...]
    context: str
    perturbations: tuple[str, ...]
    pred_means: np.ndarray
    real_means: np.ndarray
    pred_control: np.ndarray
    real_control: np.ndarray
    candidates: tuple[str, ...]
    candidate_deltas: np.ndarray
    real_de_score: np.ndarray
    pred_de_score: np.ndarray
    pred_cells: Mapping[str, np.ndarray] = field(default_factory=dict)
    real_cells: Mapping[str, np.ndarray] = field(default_factory=dict)
    control_cells: np.ndarray | None = None

    def __post_init__(self) -> None:
        g = len(self.genes)
        n = len(self.perturbations)
        shapes = {
            "pred_means": (self.pred_means.shape, (n, g)),
            "real_means": (self.real_means.shape, (n, g)),
            "real_de_score": (self.real_de_score.shape, (n, g)),
            "pred_de_score": (self.pred_de_score.shape, (n, g)),
            "pred_control": (self.pred_control.shape, (g,)),
            "real_control": (self.real_control.shape, (g,)),
            "candidate_deltas": (self.candidate_deltas.shape, (len(self.candidates), g)),
        }
        bad = {k: v for k, v in shapes.items() if v[0] != v[1]}
        if bad:
            described = "; ".join(f"{k} is {a}, expected {b}" for k, (a, b) in bad.items())
            raise DataError(f"Predicted and measured arrays are not aligned on the same genes: {described}.")
        missing = [p for p in self.perturbations if p not in self.candidates]
        if missing:
            raise DataError(f"Scored perturbations {preview(missing)} are not among the measured candidates.")

    @cached_property
    def pred_delta(self) -> np.ndarray:
        """Predicted delta per perturbation; values below float noise (1e-5) are exactly 0."""
        d = np.asarray(self.pred_means, dtype=np.float64) - self.pred_control
        d[np.abs(d) < _TOL] = 0.0
        return d

    @cached_property
    def real_delta(self) -> np.ndarray:
        """Measured delta per perturbation."""
        return np.asarray(self.real_means, dtype=np.float64) - self.real_control

    @cached_property
    def top_de(self) -> np.ndarray:
        """Indices of the ``TOP_N`` most differentially expressed measured genes per perturbation."""
        n = min(TOP_N, len(self.genes))
        score = np.nan_to_num(np.abs(self.real_de_score), nan=0.0)
        return np.argsort(-score, axis=1, kind="stable")[:, :n]

    def top(self, values: np.ndarray) -> np.ndarray:
        """``values`` (perturbations x genes) restricted to each row's top DE genes."""
        return np.take_along_axis(values, self.top_de, axis=1)

    @cached_property
    def cell_eval_bulk(self):  # noqa: ANN201 - a cell_eval.PerturbationAnndataPair, imported lazily
        """The means as cell-eval's pair: one row per perturbation and the control, so its pseudobulk
        of each group is exactly the mean here. cell-eval's bulk metrics run on it as they are."""
        import anndata as ad
        import pandas as pd
        from cell_eval import PerturbationAnndataPair

        control = "\x1fcontrol"  # cannot clash with a perturbation label
        labels = [control, *self.perturbations]
        obs = pd.DataFrame({"perturbation": labels}, index=[str(i) for i in range(len(labels))])
        var = pd.DataFrame(index=list(self.genes))

        def bulk(control_row: np.ndarray, rows: np.ndarray) -> ad.AnnData:
            X = np.vstack([control_row[None, :], rows]).astype(np.float64)
            return ad.AnnData(X, obs=obs.copy(), var=var.copy())

        return PerturbationAnndataPair(real=bulk(self.real_control, self.real_means),
                                       pred=bulk(self.pred_control, self.pred_means),
                                       pert_col="perturbation", control_pert=control)


# --------------------------------------------------------------------------- #
# The registry
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Metric:
    """A named metric: ``fn(pair) -> {perturbation: value}`` with its direction."""

    name: str
    fn: Callable[[PredRealPair], dict[str, float]]
    description: str
    higher_is_better: bool
    needs_cells: bool = False

    @property
    def direction(self) -> str:
        return "higher" if self.higher_is_better else "lower"

    def __call__(self, pair: PredRealPair) -> dict[str, float]:
        return self.fn(pair)


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; a constant vector (e.g. a no-change prediction) correlates 0."""
    x = x - x.mean()
    y = y - y.mean()
    nx, ny = np.sqrt(x @ x), np.sqrt(y @ y)
    if nx < _TOL or ny < _TOL:
        return 0.0
    return float(x @ y / (nx * ny))


def _rowwise(pair: PredRealPair, values: np.ndarray) -> dict[str, float]:
    return {p: float(v) for p, v in zip(pair.perturbations, values)}


def _cell_eval(pair: PredRealPair, name: str) -> dict[str, float]:
    """cell-eval's own metric function ``name`` on the pair's means (see :attr:`PredRealPair.cell_eval_bulk`)."""
    import contextlib
    import io
    import warnings

    from ._celleval import require_cell_eval

    ce = require_cell_eval().metrics

    # cell-eval draws a progress bar for every call: noise for a few means, so it goes nowhere; scipy's
    # ConstantInputWarning too (the constant case is handled by the callers)
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        values = getattr(ce, name)(pair.cell_eval_bulk)
    return {p: float(values[p]) for p in pair.perturbations}


def pearson_delta(pair: PredRealPair) -> dict[str, float]:
    """cell-eval's ``pearson_delta``; a prediction of no change (a constant delta) correlates 0, not NaN."""
    out = _cell_eval(pair, "pearson_delta")
    for p, d in zip(pair.perturbations, pair.pred_delta):
        if np.ptp(d) < _TOL:
            out[p] = 0.0
    return out


def pearson_delta_top50(pair: PredRealPair) -> dict[str, float]:
    a, b = pair.top(pair.pred_delta), pair.top(pair.real_delta)
    return _rowwise(pair, [_pearson(x, y) for x, y in zip(a, b)])


def mse(pair: PredRealPair) -> dict[str, float]:
    """cell-eval's ``mse`` of the mean expression."""
    return _cell_eval(pair, "mse")


def mse_top50(pair: PredRealPair) -> dict[str, float]:
    return _rowwise(pair, np.mean((pair.top(pair.pred_means) - pair.top(pair.real_means)) ** 2, axis=1))


def mae(pair: PredRealPair) -> dict[str, float]:
    """cell-eval's ``mae`` of the mean expression."""
    return _cell_eval(pair, "mae")


def mae_top50(pair: PredRealPair) -> dict[str, float]:
    return _rowwise(pair, np.mean(np.abs(pair.top(pair.pred_means) - pair.top(pair.real_means)), axis=1))


def direction_accuracy_top50(pair: PredRealPair) -> dict[str, float]:
    same = np.sign(pair.top(pair.pred_delta)) == np.sign(pair.top(pair.real_delta))
    return _rowwise(pair, same.mean(axis=1))


def de_overlap_top50(pair: PredRealPair) -> dict[str, float]:
    """Share of the 50 top measured DE genes among the 50 top predicted DE genes (the same Welch t ranking).

    A gene whose predicted delta is 0 never counts as predicted DE. NaN with 50 genes or fewer: every gene
    is then among both tops, and any prediction that moves them all scored 1.
    """
    n = pair.top_de.shape[1]
    if len(pair.genes) <= TOP_N:
        return _rowwise(pair, [float("nan")] * len(pair.top_de))
    score = np.where(pair.pred_delta == 0, 0.0, np.abs(np.nan_to_num(pair.pred_de_score, nan=0.0)))
    out = []
    for row, real_top in zip(score, pair.top_de):
        order = np.argsort(-row, kind="stable")[:n]
        order = order[row[order] > 0]
        out.append(len(np.intersect1d(order, real_top)) / n)
    return _rowwise(pair, out)


def discrimination(pair: PredRealPair) -> dict[str, float]:
    """Normalized rank of the measured p among all measured deltas, by L1 distance to the prediction (1 = closest).

    ``1 - rank / (n - 1)`` over the ``n`` measured candidates of the context, so that the
    farthest place scores 0. cell-eval's ``discrimination_score_l1`` divides by ``n`` instead
    (its worst score is ``1 / n``), ranks only among the perturbations the prediction covers,
    and leaves out the gene named like the perturbation (the knocked-out target): when the
    prediction covers every candidate and no label is a gene name, cell-eval's value is
    ``1 - (1 - this) * (n - 1) / n`` (tested).
    """
    cand = np.asarray(pair.candidate_deltas, dtype=np.float64)
    index = {c: i for i, c in enumerate(pair.candidates)}
    out = []
    for p, pred in zip(pair.perturbations, pair.pred_delta):
        if len(cand) < 2:
            out.append(np.nan)
            continue
        d = np.abs(cand - pred).sum(axis=1)
        rank = int(np.sum(d < d[index[p]]))
        out.append(1.0 - rank / (len(cand) - 1))
    return _rowwise(pair, out)


def edistance(pair: PredRealPair) -> dict[str, float]:
    """E-distance between predicted and measured cells (pertpy.tools.Distance's, PCA embedding; computed by
    :func:`virtualcell.evaluate.distances.edistance`)."""
    from .distances import edistance as dist

    out = {}
    for p in pair.perturbations:
        X, Y = pair.pred_cells.get(p), pair.real_cells.get(p)
        out[p] = float(dist(X, Y)) if X is not None and Y is not None and len(X) and len(Y) else np.nan
    return out


def compare_distance(pair: PredRealPair) -> dict[str, float]:
    """pertpy ``Distance.compare_distance``: d(measured, predicted) / d(control, predicted) in E-distance."""
    from .distances import edistance as dist

    out = {}
    for p in pair.perturbations:
        X, Y, C = pair.pred_cells.get(p), pair.real_cells.get(p), pair.control_cells
        ok = X is not None and Y is not None and C is not None and len(X) and len(Y) and len(C)
        with np.errstate(divide="ignore", invalid="ignore"):  # a prediction equal to the controls (nochange) is inf
            out[p] = float(dist(Y, X) / dist(C, X)) if ok else np.nan  # (in the cells' own precision, as pertpy)
    return out


METRICS: Mapping[str, Metric] = MappingProxyType({
    m.name: m
    for m in [
        Metric("pearson_delta", pearson_delta, "Pearson r of predicted vs measured delta, all genes", True),
        Metric("pearson_delta_top50", pearson_delta_top50,
               "Pearson r of predicted vs measured delta on the 50 top measured DE genes", True),
        Metric("mse", mse, "mean squared error of the mean expression, all genes", False),
        Metric("mse_top50", mse_top50, "mean squared error of the mean expression, top 50 DE genes", False),
        Metric("mae", mae, "mean absolute error of the mean expression, all genes", False),
        Metric("mae_top50", mae_top50, "mean absolute error of the mean expression, top 50 DE genes", False),
        Metric("direction_accuracy_top50", direction_accuracy_top50,
               "share of the top 50 DE genes whose predicted delta has the measured sign", True),
        Metric("de_overlap_top50", de_overlap_top50,
               "share of the 50 top measured DE genes among the 50 top predicted DE genes (Welch t)", True),
        Metric("discrimination", discrimination,
               "normalized rank of the measured perturbation among all measured ones, by L1 "
               "distance of deltas to the prediction (1 = the prediction is closest to its own)", True),
        Metric("edistance", edistance, "E-distance between predicted and measured cells (PCA space)",
               False, needs_cells=True),
        Metric("compare_distance", compare_distance,
               "E-distance(measured, predicted) / E-distance(control, predicted); < 1 means closer to "
               "the measured cells than to control", False, needs_cells=True),
    ]
})

_FAST = tuple(n for n, m in METRICS.items() if not m.needs_cells)
PROFILES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "default": tuple(METRICS),
    "fast": _FAST,
    "pearson": ("pearson_delta", "pearson_delta_top50"),
})


def resolve_metrics(profile: str | Sequence[str | Metric]) -> list[Metric]:
    """The metrics of a profile name, or of a list of metric names and :class:`Metric` objects."""
    if isinstance(profile, str):
        if profile not in PROFILES:
            from ._celleval import CELL_EVAL_PROFILES

            raise DataError(
                f"Unknown metric profile {profile!r}. Profiles: {', '.join(PROFILES)}, and cell-eval's "
                f"{', '.join(CELL_EVAL_PROFILES)}; or pass a list of metric names ({preview(METRICS, 12)}) and Metric "
                "objects."
            )
        return [METRICS[n] for n in PROFILES[profile]]
    out = []
    for m in profile:
        if isinstance(m, Metric):
            out.append(m)
        elif m in METRICS:
            out.append(METRICS[m])
        else:
            raise DataError(f"Unknown metric {m!r}. Known metrics: {', '.join(METRICS)}.")
    if not out:
        raise DataError("No metrics were chosen. Pass a profile name or at least one metric.")
    return out
