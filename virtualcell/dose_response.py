"""Dose-response curves and time courses from a screen: a drug or cytokine at several doses or times.

A screen ranks every condition on its own. When a panel holds the same agent at two or more
doses (``drug:dexamethasone@0.1uM``, ``@1uM``, ``@10uM``), how its predicted effect grows with
the dose is what a wet lab plans a titration from. :func:`dose_series` gathers those rows of a
ranking, one series per agent and time, with the doses on one scale; :func:`plot_dose_response`
draws each series' score (with its bootstrap 95% interval) and the predicted change of chosen
genes against the dose, a dose the model never trained on hollow. :func:`time_series` and
:func:`plot_time_course` do the same for one agent at one dose and several times (``@1uM,6h``,
``@1uM,24h``). ``screen.run`` writes ``dose_response.png`` and ``time_course.png`` wherever its
panel has such a series.

Doses are compared on one scale per unit family: molar (pM, nM, uM/µM, mM, M) in uM, mass
concentration (pg/ml ... mg/ml) in ng/ml; any other unit must be the same for all the doses of
an agent (a series that mixes units it cannot convert is refused, naming them).

Examples
--------
>>> import pandas as pd
>>> from virtualcell.dose_response import dose_series
>>> ranking = pd.DataFrame({"perturbation": ["drug:A@1uM", "drug:A@100nM", "ko:STAT1", "drug:B@1uM"],
...                         "rank": [1, 2, 3, 4], "score": [2.0, 1.0, 3.0, 0.5],
...                         "score_low": [1.5, 0.5, 2.5, 0.1], "score_high": [2.5, 1.5, 3.5, 0.9]})
>>> dose_series(ranking)[["series", "dose", "unit", "score"]].to_string(index=False)
'series  dose unit  score\\ndrug:A   0.1   uM    1.0\\ndrug:A   1.0   uM    2.0'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ScreenError, as_names
from .perturbations import Perturbation, dose_on_one_scale, parse

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

__all__ = ["dose_series", "time_series", "plot_dose_response", "plot_time_course"]

_COLUMNS = ("perturbation", "rank", "score", "score_low", "score_high", "l2_delta_corrected", "trained")


def dose_series(ranking: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``ranking`` that belong to a dose series: one drug or cytokine (alone, not in a
    combination) at two or more doses, at one time.

    Returns one row per dose with ``series`` (the agent and its time, e.g. ``"drug:A,24h"``), ``kind``,
    ``target``, ``time_h`` (hours, or NaN), ``dose`` on the series' common ``unit``, and the ranking's
    ``perturbation``, ``rank``, ``score``, ``score_low``, ``score_high`` (and ``l2_delta_corrected`` and
    ``trained``, whether the model trained on that dose, where present); sorted by series and dose. Empty
    when no agent has two doses.

    Raises
    ------
    ScreenError
        When the ranking lacks a perturbation column, or one agent's doses use units that cannot be put on
        one scale (``uM`` beside ``ng/ml``, or two unknown units).
    """
    return _series(ranking, "dose")


def time_series(ranking: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``ranking`` that belong to a time course: one drug or cytokine (alone) at one dose, at two
    or more times (``drug:A@1uM,6h`` and ``drug:A@1uM,24h``). The same columns as :func:`dose_series`, the
    ``series`` naming the agent and its dose (``"drug:A@1uM"``), sorted by series and ``time_h``."""
    return _series(ranking, "time")


def _series(ranking: pd.DataFrame, over: str) -> pd.DataFrame:
    """:func:`dose_series` (``over="dose"``) or :func:`time_series` (``over="time"``)."""
    import pandas as pd

    if "perturbation" not in ranking.columns:
        raise ScreenError("The ranking has no 'perturbation' column: pass a screen's ranking (ScreenResult.ranking "
                          "or ranking.csv of a screen folder).")
    x = "dose" if over == "dose" else "time_h"
    rows = []
    for _, row in ranking.iterrows():
        try:
            p = parse(str(row["perturbation"]))
        except ValueError:
            continue  # a label the typed syntax does not read is no series
        if not isinstance(p, Perturbation) or p.kind not in ("drug", "cytokine"):
            continue
        time = p.time_hours
        if (p.dose is None) if over == "dose" else (time is None):
            continue
        unit, factor = dose_on_one_scale(p.dose_unit)
        agent = f"{p.kind}:{p.target}"
        if over == "dose":
            series = agent + (f",{time:g}h" if time is not None else "")
        else:
            series = agent + (f"@{p.dose * factor:g}{unit}" if p.dose is not None else "")  # 1000nM is 1uM
        rows.append({"series": series, "kind": p.kind, "target": p.target,
                     "time_h": np.nan if time is None else float(time),
                     "dose": np.nan if p.dose is None else p.dose * factor, "unit": unit,
                     **{c: row[c] for c in _COLUMNS if c in ranking.columns}})
    columns = ["series", "kind", "target", "time_h", "dose", "unit", *[c for c in _COLUMNS if c in ranking.columns]]
    table = pd.DataFrame(rows, columns=columns)
    if table.empty:
        return table
    if over == "dose":
        for series, part in table.groupby("series", sort=False):
            units = sorted(set(part["unit"]))
            if len(units) > 1:
                raise ScreenError(f"{series} is screened at doses in units {units} that cannot be put on one scale: "
                                  "write its doses in one unit (molar: pM, nM, uM, mM; or mass: pg/ml, ng/ml, ug/ml).")
    counts = table.groupby("series")[x].transform("nunique")
    return table[counts >= 2].sort_values(["series", x], kind="stable").reset_index(drop=True)


def plot_dose_response(ranking: pd.DataFrame, aggregates: xr.Dataset | None = None, *,
                       genes: str | Sequence[str] | None = None, n_genes: int = 3, return_fig: bool = False) -> Any:
    """Each dose series' score with its 95% interval against the dose, beside the predicted change of genes.

    Parameters
    ----------
    ranking, aggregates
        A screen's ranking and aggregates (:class:`~virtualcell.screen.ScreenResult`); without
        ``aggregates`` only the score panel is drawn.
    genes
        Genes whose predicted mean change (``aggregates["delta"]``, the served prediction) to draw, one panel
        each (one gene, ``"STAT1"``, or a list); by default the ``n_genes`` that change most at any dose of any
        series.
    n_genes
        How many genes to draw when ``genes`` is not given.
    return_fig
        Return the figure instead of ``None``.

    Raises
    ------
    ScreenError
        When the ranking holds no agent at two or more doses (it names how to write one), or a gene asked for
        is not in the aggregates.
    """
    return _plot(ranking, aggregates, "dose", genes=genes, n_genes=n_genes, return_fig=return_fig)


def plot_time_course(ranking: pd.DataFrame, aggregates: xr.Dataset | None = None, *,
                     genes: str | Sequence[str] | None = None, n_genes: int = 3, return_fig: bool = False) -> Any:
    """Each time course's score with its 95% interval against the time (hours), beside the predicted change
    of genes: :func:`plot_dose_response` for an agent at one dose and several times (:func:`time_series`)."""
    return _plot(ranking, aggregates, "time", genes=genes, n_genes=n_genes, return_fig=return_fig)


def _plot(ranking: pd.DataFrame, aggregates: xr.Dataset | None, over: str, *, genes: str | Sequence[str] | None,
          n_genes: int, return_fig: bool) -> Any:
    import matplotlib.pyplot as plt

    table = _series(ranking, over)
    x_col, what = ("dose", "doses") if over == "dose" else ("time_h", "times")
    if table.empty:
        example = ("'drug:NAME@0.1uM', 'drug:NAME@1uM', 'drug:NAME@10uM' (or 'drug:NAME@{0.1,1,10}uM')"
                   if over == "dose" else "'drug:NAME@1uM,6h', 'drug:NAME@1uM,24h' (or 'drug:NAME@1uM,{6,24}h')")
        raise ScreenError(f"No drug or cytokine of this screen was screened at two or more {what}, so there is no "
                          f"{'dose-response' if over == 'dose' else 'time course'} to draw: put one agent at several "
                          f"{what} in the panel, e.g. {example}.")
    if genes is not None:
        genes = as_names(genes)  # one gene, not its letters
    if aggregates is not None:
        known = [str(g) for g in aggregates["gene"].values]
        if genes is None:
            delta = aggregates["delta"].sel(perturbation=list(table["perturbation"])).values
            order = np.argsort(-np.nanmax(np.abs(delta), axis=0), kind="stable")
            genes = [known[i] for i in order[:n_genes]]
        missing = [g for g in genes if g not in known]
        if missing:
            raise ScreenError(f"Genes {missing} are not in the screen's aggregates ({len(known)} genes): pick genes "
                              "the screen predicted (aggregates.gene).")
    else:
        genes = []
    fig, axes = plt.subplots(1, 1 + len(genes), figsize=(4.2 * (1 + len(genes)), 3.6), squeeze=False)
    axes = axes[0]
    for series, part in table.groupby("series", sort=True):
        x = part[x_col].to_numpy(float)
        err = np.vstack([part["score"] - part["score_low"], part["score_high"] - part["score"]]).clip(min=0)
        line = axes[0].errorbar(x, part["score"], yerr=err, marker="o", capsize=3, label=series)
        color = line[0].get_color()
        # a condition the model never trained on: a hollow marker (its prediction is the model's interpolation)
        new = ~part["trained"].to_numpy(bool) if "trained" in part else np.zeros(len(part), dtype=bool)
        axes[0].plot(x[new], part["score"].to_numpy()[new], "o", color=color, mfc="white", zorder=3)
        for ax, gene in zip(axes[1:], genes):
            d = aggregates["delta"].sel(perturbation=list(part["perturbation"]), gene=gene).values
            ax.plot(x, d, marker="o", color=color, label=series)
            ax.plot(x[new], d[new], "o", color=color, mfc="white", zorder=3)
    scale: dict[str, Any] = {}  # time: hours on a plain axis, as time courses are read
    label = "time (h)"
    if over == "dose":  # doses on a log axis, symlog where a dose is 0
        positive = table["dose"][table["dose"] > 0]
        scale = ({"value": "symlog", "linthresh": float(positive.min()) if len(positive) else 1.0}
                 if (table["dose"] <= 0).any() else {"value": "log"})
        label = f"dose ({', '.join(u for u in sorted(set(table['unit'])) if u) or 'as written'})"
    for ax in axes:
        if scale:
            ax.set_xscale(**scale)
        ax.set_xlabel(label)
    axes[0].set_ylabel(f"score ({ranking.attrs.get('virtualcell', {}).get('objective', 'objective')}), 95% CI")
    hollow = "trained" in table and not table["trained"].astype(bool).all()
    title = "Predicted effect by dose" if over == "dose" else "Predicted effect over time"
    axes[0].set_title(title + (f"\n(hollow: {'a dose' if over == 'dose' else 'a time'} the model never trained on)"
                               if hollow else ""))
    axes[0].legend(fontsize=7)
    for ax, gene in zip(axes[1:], genes):
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_title(f"{gene}: predicted mean change")
        ax.set_ylabel("change (log1p)")
    fig.tight_layout()
    if return_fig:
        return fig
    return None
