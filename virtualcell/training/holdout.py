"""The cells a training run keeps out of training: the user's ``holdout`` and the validation verdict's.

The verdict (:mod:`virtualcell.validation`) judges the model on cells it never trained on: a seeded share of the
controls and of the perturbations' cells in each context with enough controls (:func:`verdict_split`), optionally
perturbations held out whole (:func:`unseen_labels`) and one context held out whole (:func:`verdict_context`).
Training and :func:`virtualcell.train.rejudge` both find them through :func:`verdict_cells`, so a checkpoint's verdict
can be run again on the same cells.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..contract import DataContract
from ..errors import DataError, no_such_column, preview
from ..perturbations import GENETIC, Perturbation, parse
from ..sentences import Vocabulary
from .labels import typed_labels

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from ..train import TrainConfig

__all__ = ["cells_per_context", "holdout_mask", "unseen_labels", "verdict_context", "verdict_split", "verdict_cells",
           "baseline_cells", "no_verdict_reason", "VERDICT_MAX_LABELS", "VERDICT_MIN_CONTROLS", "VERDICT_FEWEST_CONTROLS",
           "VERDICT_MIN_CELLS", "VERDICT_FEWEST_CELLS"]

log = logging.getLogger(__name__)


def holdout_mask(adata: ad.AnnData, holdout: dict[str, list[str]]) -> np.ndarray:
    keep = np.ones(adata.n_obs, dtype=bool)
    for col, values in holdout.items():
        if col not in adata.obs.columns:
            raise DataError(no_such_column(col, adata.obs.columns, what="holdout column"))
        column = adata.obs[col].astype(str)
        unknown = sorted({str(v) for v in values} - set(column))
        if unknown:
            raise DataError(
                f"holdout {col}={','.join(unknown)} matches no cell, so nothing would be held out "
                f"(',' separates values). {col} holds: {preview(sorted(set(column)), 20)}."
            )
        keep &= ~column.isin([str(v) for v in values]).to_numpy()
    return keep


VERDICT_MAX_LABELS = 24  # perturbations the validation verdict simulates at most: it stays quick
VERDICT_MIN_CONTROLS = 40  # a context holds out control cells only when it has this many
# ... or, where no context has that many (small patient x cell-type contexts), this many: 8 held out, 8 left to train
VERDICT_FEWEST_CONTROLS = 16
VERDICT_FEWEST_CELLS = 10  # ... and perturbations with this many cells there, where none has VERDICT_MIN_CELLS
VERDICT_MIN_CELLS = 20  # a perturbation holds out cells in a context only when it has this many there


def unseen_labels(adata: ad.AnnData, contract: DataContract, cfg: TrainConfig) -> dict[str, str]:
    """The perturbations held out of training whole, to judge the model on ones it never saw:
    ``{condition: typed form}`` (empty when ``cfg.unseen_fraction`` is 0).

    Only what a model can name without training is eligible: a single genetic perturbation
    (knockout, knockdown, activation) of one of the data's genes, without dose or time, with at
    least 20 cells in a context that has at least 40 control cells. A seeded
    ``unseen_fraction`` of the data's perturbations (at least 2, at most all eligible but 2
    perturbations stay for training) is chosen among those; none when fewer than 2 are
    eligible (logged), or without a verdict (``verdict_fraction`` 0).
    """
    if cfg.unseen_fraction <= 0 or cfg.verdict_fraction <= 0:  # (no verdict, nothing to judge them in)
        return {}
    vocabulary = Vocabulary.from_adata(adata)
    typed, _ = typed_labels(adata, contract, vocabulary, cfg, warn=False)  # (training reads them again, and warns)
    genes = {g.upper() for g in vocabulary.genes}
    labels, ctx, is_ctrl = contract.conditions(adata), contract.contexts(adata), contract.is_control(adata)
    contexts = _contexts_with_controls(ctx, is_ctrl)
    perturbations = sorted(set(labels[~is_ctrl]))
    form = {p: str(typed[np.flatnonzero(labels == p)[0]]) for p in perturbations}
    eligible = []
    for p in perturbations:
        q = parse(form[p])
        enough = any(np.sum((labels == p) & (ctx == c)) >= VERDICT_MIN_CELLS for c in contexts)
        if (isinstance(q, Perturbation) and q.kind in GENETIC and q.target.upper() in genes and q.dose is None
                and q.time is None and enough):
            eligible.append(p)
    n = min(max(2, int(round(cfg.unseen_fraction * len(perturbations)))), len(eligible), len(perturbations) - 2)
    if n < 2:
        log.warning("unseen_fraction %g: %d of the %d perturbations can be held out whole (a single genetic "
                    "perturbation of a measured gene, with %d cells in a context with %d controls), and 2 are needed "
                    "while 2 stay for training; the verdict judges seen perturbations only", cfg.unseen_fraction,
                    len(eligible), len(perturbations), VERDICT_MIN_CELLS, VERDICT_MIN_CONTROLS)
        return {}
    chosen = np.random.default_rng([cfg.seed, 13]).choice(eligible, size=n, replace=False)
    return {str(p): form[p] for p in sorted(chosen)}


def verdict_context(adata: ad.AnnData, contract: DataContract, cfg: TrainConfig,
                    unseen: Mapping[str, str] | None = None) -> str | None:
    """The context whose perturbed cells are held out of training whole (``cfg.context_verdict``), for the
    verdict to judge the model on a context it never saw perturbed; ``None`` when not asked, without a verdict,
    or when no context qualifies (logged).

    A seeded choice among the contexts with at least 40 control cells that have a perturbation (not one of
    ``unseen``) with at least 20 cells there which is also measured in another context: its baseline there is
    the other contexts' mean effect (``meanshift``), what a model that never saw the context perturbed serves.
    """
    if not cfg.context_verdict or cfg.verdict_fraction <= 0:
        return None
    labels, ctx, is_ctrl = contract.conditions(adata), contract.contexts(adata), contract.is_control(adata)
    unseen = set(unseen or ())
    eligible = []
    for c in _contexts_with_controls(ctx, is_ctrl):
        here, n = np.unique(labels[(ctx == c) & ~is_ctrl], return_counts=True)
        elsewhere = set(labels[(ctx != c) & ~is_ctrl])
        if any(k >= VERDICT_MIN_CELLS and p in elsewhere and p not in unseen for p, k in zip(here, n)):
            eligible.append(c)
    if not eligible:
        log.warning("context_verdict: no context can be held out whole (one with %d control cells and a perturbation "
                    "of %d cells there that is also measured in another context; contexts: %s); the verdict judges "
                    "trained contexts only", VERDICT_MIN_CONTROLS, VERDICT_MIN_CELLS,
                    preview(sorted(set(ctx)), 8))
        return None
    return str(np.random.default_rng([cfg.seed, 17]).choice(eligible))


def verdict_cells(data: ad.AnnData, contract: DataContract, cfg: TrainConfig
                   ) -> tuple[dict[str, str], str | None, np.ndarray]:
    """What a run holds out for its verdict, as training and ``rejudge`` both find it: the perturbations held out
    whole (:func:`unseen_labels`), the context held out whole (:func:`verdict_context`) and the mask of the held-out
    cells (:func:`verdict_split`)."""
    unseen = unseen_labels(data, contract, cfg)
    context = verdict_context(data, contract, cfg, unseen)
    return unseen, context, verdict_split(data, contract, cfg, unseen, context)


def cells_per_context(ctx: np.ndarray, mask: np.ndarray) -> dict[str, int]:
    """``{context: number of cells in mask}`` for every context of ``ctx`` (0 where none), in sorted order: the one
    count behind the verdict's choice of contexts, the reason it gives for holding none, and the run's record."""
    names, at = np.unique(np.asarray(ctx, dtype=str), return_inverse=True)
    return dict(zip(names.tolist(), np.bincount(at.ravel()[np.asarray(mask)], minlength=names.size).tolist()))


def _contexts_with_controls(ctx: np.ndarray, is_control: np.ndarray) -> list[str]:
    """The contexts with at least :data:`VERDICT_MIN_CONTROLS` control cells, or where none has that many, those with
    :data:`VERDICT_FEWEST_CONTROLS`: the only ones the verdict holds cells out of (it needs controls to feed the
    model and others to measure against). A smaller verdict is noisier, but none at all serves the pure model
    unjudged."""
    counts = cells_per_context(ctx, is_control)
    enough = [c for c, n in counts.items() if n >= VERDICT_MIN_CONTROLS]
    return enough or [c for c, n in counts.items() if n >= VERDICT_FEWEST_CONTROLS]


def no_verdict_reason(data: ad.AnnData, contract: DataContract) -> str:
    """Why :func:`verdict_split` holds nothing out of ``data``, for a person."""
    counts = cells_per_context(contract.contexts(data), contract.is_control(data))
    most = max(counts, key=counts.get)
    if counts[most] < VERDICT_FEWEST_CONTROLS:
        where = f"the most: {counts[most]} in {most!r}" if len(counts) > 1 else str(counts[most])
        return (f"no context has {VERDICT_FEWEST_CONTROLS} control cells ({where}); a coarser --context-key, or more "
                "control cells, gives one")
    return (f"no perturbation has {VERDICT_FEWEST_CELLS} cells in a context with {VERDICT_FEWEST_CONTROLS} control "
            "cells or more")


def baseline_cells(data: ad.AnnData, contract: DataContract, in_verdict: np.ndarray,
                    unseen: Mapping[str, str]) -> ad.AnnData:
    """The cells the served baselines (:class:`~virtualcell.validation.Baselines`) are fitted on: the
    training cells and every cell of the perturbations held out whole. The model never saw those,
    but their measured effect is the best guess for them and part of ``pertmean``; the verdict
    judges them against a ``pertmean`` without them (:func:`~virtualcell.validation.run_verdict`)."""
    return data[~in_verdict | np.isin(contract.conditions(data), sorted(unseen))]


def verdict_split(adata: ad.AnnData, contract: DataContract, cfg: TrainConfig,
                  unseen: Mapping[str, str] | None = None, context: str | None = None) -> np.ndarray:
    """The cells held out of training entirely, for the validation verdict (:mod:`virtualcell.validation`).

    Per context with at least 40 control cells (16 where no context has 40), a seeded ``verdict_fraction`` of them (at
    least 8, and never leaving fewer than 2 for training); in those contexts, a seeded
    ``verdict_fraction`` of the cells of each condition (a perturbation at one dose and time,
    :meth:`DataContract.conditions`) with at least 20 cells there (10 where none has 20). At most 24 conditions (a
    seeded choice) lose cells; the others train on all theirs. Every cell of the ``unseen``
    conditions (:func:`unseen_labels`) is held out too, and every perturbed cell of ``context``
    (:func:`verdict_context`).
    Returns a boolean mask over ``adata``'s cells; all False when ``verdict_fraction`` is 0.
    """
    held = np.zeros(adata.n_obs, dtype=bool)
    if cfg.verdict_fraction <= 0:
        return held
    rng = np.random.default_rng([cfg.seed, 11])
    labels, ctx, is_ctrl = contract.conditions(adata), contract.contexts(adata), contract.is_control(adata)
    unseen = set(unseen or ())
    contexts = _contexts_with_controls(ctx, is_ctrl)
    counts = [(p, n) for c in contexts for p, n in zip(*np.unique(labels[(ctx == c) & ~is_ctrl], return_counts=True))
              if p not in unseen]
    # perturbations with 20 cells in a context, or where none has that many, 10
    fewest = VERDICT_MIN_CELLS if any(n >= VERDICT_MIN_CELLS for _, n in counts) else VERDICT_FEWEST_CELLS
    eligible = sorted({p for p, n in counts if n >= fewest})
    chosen = set(rng.choice(eligible, size=min(VERDICT_MAX_LABELS, len(eligible)), replace=False)) if eligible else set()
    for c in contexts:
        controls = np.flatnonzero(is_ctrl & (ctx == c))
        k = min(max(8, int(round(cfg.verdict_fraction * controls.size))), controls.size - 2)
        held[rng.choice(controls, size=k, replace=False)] = True
        for p in sorted(chosen):
            cells = np.flatnonzero((ctx == c) & (labels == p))
            if cells.size >= fewest:
                held[rng.choice(cells, size=max(1, int(round(cfg.verdict_fraction * cells.size))), replace=False)] = True
    if unseen:
        held |= np.isin(labels, sorted(unseen))
    if context is not None:
        held |= (ctx == context) & ~is_ctrl
    return held
