"""Plots of an evaluation: predicted vs measured deltas, and metric bars against the baselines.

Each ``plot_*`` function takes ``ax=None, return_fig=False`` (pertpy style) and works with
the Agg backend; matplotlib is imported inside the functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..errors import DataError, as_names, preview

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["plot_delta_scatter", "plot_metric_bars"]

_COLORS = {"model": "#d62728", "ceiling": "#7f7f7f"}


def _finish(fig: Figure, return_fig: bool) -> Figure | None:
    return fig if return_fig else None


def plot_delta_scatter(
    deltas: pd.DataFrame,
    *,
    perturbations: str | Sequence[str] | None = None,
    n_top: int = 4,
    ax: Axes | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Predicted vs measured delta per gene, for the perturbations with the largest measured effects.

    Parameters
    ----------
    deltas
        The output of :func:`~virtualcell.evaluate.delta_table`.
    perturbations
        Which perturbations to show (one, ``"STAT1"``, or a list); by default the ``n_top`` with the largest
        measured effect size (corrected for group size, so small noisy groups do not win).
    n_top
        How many perturbations by default.
    ax
        Draw all of them into this axes (colours by perturbation); by default one panel each.
    return_fig
        Return the figure instead of ``None``.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> pred = vc.evaluate.baselines.additive(ref, baseline=base)
    >>> d = vc.evaluate.delta_table(pred, ref, baseline=base)
    >>> fig = vc.evaluate.plot_delta_scatter(d, return_fig=True)
    """
    import matplotlib.pyplot as plt

    need = {"perturbation", "context", "predicted", "measured", "top_de", "effect_size"}
    if not need <= set(deltas.columns):
        raise DataError(f"deltas needs the columns of delta_table(); missing {sorted(need - set(deltas.columns))}.")
    groups = deltas.groupby(["perturbation", "context"], sort=False)["effect_size"].first().sort_values(ascending=False)
    if perturbations is None:
        chosen = list(groups.index[:n_top])
    else:
        asked = set(as_names(perturbations))  # one perturbation, not its letters
        chosen = [k for k in groups.index if k[0] in asked]
        unknown = sorted(asked - {k[0] for k in chosen})
        if unknown:
            raise DataError(f"Perturbations {preview(unknown)} are not in the delta table.")
    if not chosen:
        raise DataError("The delta table is empty: nothing to plot.")
    multi_context = deltas["context"].nunique() > 1
    if ax is None:
        n = len(chosen)
        ncols = min(n, 4)
        nrows = int(np.ceil(n / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 3.1 * nrows), squeeze=False)
        panels = list(axes.ravel())
        for extra in panels[n:]:
            extra.set_visible(False)
    else:
        fig = ax.figure
        panels = [ax] * len(chosen)
    cmap = plt.get_cmap("tab10")
    for i, ((p, c), panel) in enumerate(zip(chosen, panels)):
        sub = deltas[(deltas["perturbation"] == p) & (deltas["context"] == c)]
        label = f"{p} ({c})" if multi_context else p
        shared = panel is panels[0] and ax is not None
        color = cmap(i % 10) if shared else "#1f77b4"
        panel.scatter(sub["measured"], sub["predicted"], s=4, alpha=0.35, color="#bbbbbb" if not shared else color,
                      linewidths=0, label=None if shared else "all genes")
        top = sub[sub["top_de"]]
        panel.scatter(top["measured"], top["predicted"], s=10, color=color, linewidths=0,
                      label=label if shared else "top 50 DE")
        lim = float(np.nanmax(np.abs(sub[["measured", "predicted"]].to_numpy()))) or 1.0
        panel.plot([-lim, lim], [-lim, lim], lw=0.8, color="black", ls="--")
        panel.axhline(0, lw=0.5, color="black")
        panel.axvline(0, lw=0.5, color="black")
        if not shared:
            moves = top["predicted"].std() > 0 and top["measured"].std() > 0
            r = f"{np.corrcoef(top['measured'], top['predicted'])[0, 1]:.2f}" if moves else "n/a (a constant side)"
            panel.set_title(f"{label}\nr(top 50) = {r}", fontsize=9)
        panel.set_xlabel("measured delta")
        panel.set_ylabel("predicted delta")
    if ax is not None:
        ax.legend(fontsize=7, markerscale=2)
    else:
        panels[0].legend(fontsize=7, markerscale=2)
    fig.tight_layout()
    return _finish(fig, return_fig)


def plot_metric_bars(
    table: pd.DataFrame,
    *,
    metric: str | Sequence[str] = "pearson_delta_top50",
    ax: Axes | None = None,
    return_fig: bool = False,
) -> Figure | None:
    """Mean (± standard error) of a metric per method: the model next to the baselines and the ceiling, each over
    the groups the model predicts (where the table has a model), as :func:`~virtualcell.evaluate.summarize` averages.

    Parameters
    ----------
    table
        The output of :func:`~virtualcell.evaluate.evaluate`.
    metric
        One metric, or several (one panel each; then ``ax`` must be ``None``).
    ax
        The axes to draw into (one metric only).
    return_fig
        Return the figure instead of ``None``.

    Examples
    --------
    >>> import matplotlib; matplotlib.use("Agg")
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> table = vc.evaluate.evaluate(None, ref, baseline=base, profile="fast", baselines=("nochange", "pertmean"))
    >>> fig = vc.evaluate.plot_metric_bars(table, metric=["pearson_delta", "mse"], return_fig=True)
    """
    import matplotlib.pyplot as plt

    from ._core import on_model_groups

    table = on_model_groups(table)  # every bar over the groups the model predicts, as summarize() averages
    names = as_names(metric)
    unknown = [m for m in names if m not in set(table["metric"])]
    if unknown:
        have = preview(sorted(set(table["metric"])))
        raise DataError(f"Metrics {preview(unknown)} are not in the table; it has {have}.")
    if ax is not None and len(names) > 1:
        raise DataError("Pass one metric with ax=, or several metrics without ax (one panel each).")
    if ax is None:
        ncols = min(len(names), 3)
        nrows = int(np.ceil(len(names) / ncols))
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows), squeeze=False)
        panels = list(axes.ravel())
        for extra in panels[len(names):]:
            extra.set_visible(False)
    else:
        fig, panels = ax.figure, [ax]
    methods = list(dict.fromkeys(table["method"]))
    for name, panel in zip(names, panels):
        sub = table[table["metric"] == name]
        stats = sub.groupby("method")["value"].agg(["mean", "sem", "count"]).reindex(methods).dropna(subset=["mean"])
        colors: list[Any] = [_COLORS.get(m, "#1f77b4") for m in stats.index]
        if stats.empty:  # NaN for every method (e.g. discrimination with one perturbation): say so, not a blank
            panel.text(0.5, 0.5, "n/a: undefined on these groups", ha="center", va="center",
                       transform=panel.transAxes, fontsize=8, color="#666666")
        # one group has no spread to show: no error bar rather than a zero-width one
        bars = panel.bar(range(len(stats)), stats["mean"], yerr=stats["sem"].where(stats["count"] > 1), color=colors,
                         capsize=3)
        for bar, m in zip(bars, stats.index):
            if m == "ceiling":
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        panel.set_xticks(range(len(stats)))
        panel.set_xticklabels([f"{m}\n(n={int(k)})" for m, k in zip(stats.index, stats["count"])], fontsize=7,
                              rotation=30, ha="right")
        direction = sub["direction"].iloc[0] if len(sub) else "higher"
        panel.set_title(f"{name} ({direction} is better)", fontsize=9)
        panel.axhline(0, lw=0.5, color="black")
    fig.tight_layout()
    return _finish(fig, return_fig)
