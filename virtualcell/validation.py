"""The training run's own verdict: how the model does against the simple baselines on cells it never saw.

``virtualcell train`` holds a validation split of *cells* out of training entirely
(:func:`virtualcell.train.verdict_split`). After the training loop it

1. fits the training-data baselines (:class:`Baselines`): each training label's
   **meanshift** delta (its effect in each context it was measured in, served to that context's cells, and its mean
   over those contexts, served to any other and the baseline the verdict judges), **pertmean** (the mean of
   those, for perturbations never seen), **coexpression** for a genetic perturbation never
   seen (pertmean plus how the genes move with its gene in the training cells; the cells'
   covariance is kept for it) and the **additive** sum for a combination of seen singles;
   they are saved in the checkpoint (``baselines.npz``) so that the
   :class:`~virtualcell.simulator.Simulator` can serve them;
2. simulates the held-out perturbations on half of the held-out control cells and scores
   the pure model, the baseline and their blend against the measured deltas (the held-out
   perturbed cells against the *other* half of the held-out controls: independent noise);
3. fits the blend weight ``w`` (:func:`blend_weight`), bounds how sure the split is of which
   is better (:func:`mse_difference`: a bootstrap interval over the held-out perturbations)
   and writes ``verdict.json``.

The Simulator then serves ``x + w·(model delta) + (1−w)·(baseline delta)`` by default
(``blend="auto"``); a model with nothing to add gets ``w = 0``.

With ``--unseen-fraction`` the trainer also holds some perturbations out whole
(:func:`virtualcell.train.unseen_labels`); the verdict judges the model on them apart, against
the baseline of a model that never saw them (``pertmean``, or ``coexpression``), and fits them a
weight of their own (``verdict["unseen"]``), which the Simulator serves for every perturbation
whose baseline is one of :data:`UNSEEN_BASELINES`. Without it, such perturbations get the weight
fitted on trained ones.

Examples
--------
>>> import numpy as np
>>> from virtualcell.validation import blend_weight
>>> y = np.array([[1.0, -1.0, 0.5]])
>>> blend_weight(model=y, baseline=np.zeros_like(y), measured=y)
1.0
>>> blend_weight(model=np.zeros_like(y), baseline=y, measured=y)
0.0
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._stats import gram_axes, log_dose_interpolation
from .errors import DataError, ModelError, preview
from .perturbations import GENETIC, Combination, Perturbation, parse, parts_of, read_kinds, without_quantities
from .progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from .contract import DataContract
    from .gene_map import GeneMap
    from .model import C2SModel
    from .sentences import RankFit, Vocabulary

__all__ = ["Baselines", "blend_weight", "choose_decode", "delta_noise", "mse_difference", "score_deltas", "run_verdict", "summary_line",
           "BASELINES_FILE", "VERDICT_FILE", "TOP_N", "verdict_seconds"]

log = logging.getLogger(__name__)

BASELINES_FILE = "baselines.npz"
VERDICT_FILE = "verdict.json"
TOP_N = 50  # genes with the largest measured |delta| for pearson_delta_top50


def _key(p: Perturbation | Combination | str) -> str:
    """The typed name of a perturbation without dose or time: how training labels are stored."""
    return str(without_quantities(parse(p) if isinstance(p, str) else p))


KIND_SEP = "\x1e"  # joins a label trained as several kinds to one cell's kind: "MAP2K3\x1eactivation"


def _kind_of(typed: str) -> str:
    """The kind of a typed form (its first part's, for a combination)."""
    q = parse(typed)
    return (q.parts[0] if isinstance(q, Combination) else q).kind


def _kind_split(adata: ad.AnnData, labels: np.ndarray, forms: Mapping[str, list[str]], kind_key: str | None
                ) -> np.ndarray:
    """``labels`` with each cell of a label trained as several kinds (``forms``) marked with its kind from
    ``obs[kind_key]``, so that an activation's cells and a knockdown's are not averaged into one effect."""
    if kind_key is None or kind_key not in adata.obs:
        raise DataError(f"{len(forms)} labels were trained as several kinds ({preview(sorted(forms), 4)}), told apart "
                        f"by the column of kinds {kind_key!r}, which these cells lack: give them that column.")
    kinds = read_kinds(adata, kind_key, controls=~np.isin(labels, list(forms)))  # (only these cells' kinds are read)
    return np.array([f"{lab}{KIND_SEP}{k}" if lab in forms else lab for lab, k in zip(labels, kinds)], dtype=object)


def _quantity_distance(a: Perturbation | Combination, b: Perturbation | Combination) -> float:
    """How far apart two forms of one perturbation are in dose and time: summed |log10| ratios
    (an absent dose or time counts as 1 unit); 0 for forms without either."""
    def log_quantities(p: Perturbation | Combination) -> list[float]:
        parts = parts_of(p)
        out = []
        for x in parts:
            out += [np.log10(v) if v and v > 0 else 0.0 for v in (x.dose, x.time_hours)] if isinstance(x, Perturbation) else []
        return out

    return float(np.sum(np.abs(np.subtract(log_quantities(a), log_quantities(b)))))


RESPONSE_CELLS_DEFAULT = 4000  # training cells (seeded) whose covariance the served coexpression baseline keeps
RESPONSE_RANK_DEFAULT = 256  # at most this many of its principal axes (all of them for a panel of fewer genes)


def covariance_factor(X, contexts: np.ndarray, *, max_cells: int = RESPONSE_CELLS_DEFAULT,  # noqa: ANN001
                      rank: int = RESPONSE_RANK_DEFAULT, seed: int = 0) -> np.ndarray:
    """``genes x r`` (float32) ``F`` with ``F @ F.T`` the covariance of the cells ``X`` (cells x genes) around their
    context's mean: of a seeded ``max_cells`` of them, along at most ``rank`` principal axes (every axis, so the
    covariance itself, for a panel of at most ``rank`` genes)."""
    rows = np.arange(X.shape[0])
    if rows.size > max_cells:
        rows = np.sort(np.random.default_rng([seed, 17]).choice(rows, max_cells, replace=False))
    Z = np.asarray(X[rows].toarray() if hasattr(X, "toarray") else X[rows], dtype=np.float64)
    ctx = np.asarray(contexts)[rows]
    groups = sorted(set(ctx))
    for c in groups:
        Z[ctx == c] -= Z[ctx == c].mean(axis=0)
    dof = max(Z.shape[0] - len(groups), 1)
    if Z.shape[1] > Z.shape[0] and rank < Z.shape[0]:
        # more genes than cells (a full transcriptome): the cells' Gram matrix gives the same leading axes
        _, W = gram_axes(Z, rank, min_ratio=1e-6)
        return (W / np.sqrt(dof)).astype(np.float32)
    _, S, Vt = np.linalg.svd(Z, full_matrices=False)
    r = min(rank, int(np.sum(S > 1e-9 * max(S.max(initial=0.0), 1e-12))))
    return (Vt[:r].T * (S[:r] / np.sqrt(dof))).astype(np.float32)


UNSEEN_BASELINES = ("pertmean", "coexpression")  # what Baselines.delta_for serves a perturbation never trained on


@dataclass(frozen=True)
class Baselines:
    """Training-data baseline deltas on a model's genes and normalized log1p scale.

    Attributes
    ----------
    genes
        The model's genes, in its order (the columns of ``delta``).
    names
        The typed name (no dose) of each training perturbation, one row of ``delta`` each.
    delta
        meanshift: per training perturbation, the mean over contexts of
        ``mean(its training cells) − mean(the context's training controls)``: what a context it was not measured in
        is served. ``own_rows``/``own_contexts``/``own_delta`` hold the effect in each context it was measured in,
        which that context's cells are served (:meth:`delta_for` with ``context``).
    response
        ``genes x r``: a factor ``F`` of the training cells' covariance (within their contexts),
        ``F @ F.T``, kept for models that have genetic perturbations; it gives the served
        :func:`~virtualcell.evaluate.baselines.coexpression` baseline of a genetic perturbation
        never trained on. ``None``: such a perturbation gets ``pertmean``.
    """

    genes: tuple[str, ...]
    names: tuple[str, ...]
    delta: np.ndarray
    response: np.ndarray | None = None
    # each training perturbation's own effect in each context it was measured in, where there are several contexts:
    # row ``own_rows[k]`` of ``delta`` in context ``own_contexts[k]`` is ``own_delta[k]`` (a cell type's own effect,
    # served to its cells: the mean over contexts gave a cell type with a strong response too little, a weak one too
    # much)
    own_rows: np.ndarray | None = None
    own_contexts: tuple[str, ...] = ()
    own_delta: np.ndarray | None = None

    @property
    def pertmean(self) -> np.ndarray:
        """The mean of every training perturbation's delta: the guess for one never seen."""
        return self.delta.mean(axis=0) if len(self.names) else np.zeros(len(self.genes))

    def pertmean_without(self, perturbations: Sequence[str]) -> np.ndarray:
        """:attr:`pertmean` over the rows of every perturbation but ``perturbations`` (typed forms; doses
        ignored): what a model that never saw those serves for them."""
        keep = self._kept(perturbations)
        return self.delta[keep].mean(axis=0) if keep else np.zeros(len(self.genes))

    def _kept(self, perturbations: Sequence[str]) -> list[int]:
        drop = {_key(p) for p in perturbations}
        return [i for i, name in enumerate(self.names) if _key(name) not in drop]

    def unseen_delta(self, perturbation: Perturbation | Combination, without: Sequence[str] = ()
                     ) -> tuple[np.ndarray, str]:
        """The baseline of a perturbation never trained on, as if ``without`` were not trained on either, and its
        name: ``coexpression`` for a genetic perturbation of one of the model's genes, where the model keeps the
        covariance (:attr:`response`) and at least two trained perturbations of that kind target one of its genes
        (:func:`~virtualcell.evaluate.baselines.coexpression`: ``pertmean`` plus :meth:`coexpression_shift`);
        else ``pertmean``."""
        base = self.pertmean_without(without).astype(np.float32)
        shift = self.coexpression_shift(perturbation, without)
        if shift is None:
            return base, "pertmean"
        return (base + shift).astype(np.float32), "coexpression"

    def coexpression_shift(self, perturbation: Perturbation | Combination, without: Sequence[str] = ()
                           ) -> np.ndarray | None:
        """What :func:`~virtualcell.evaluate.baselines.coexpression` adds to ``pertmean`` for ``perturbation``
        (as if ``without`` were not trained on): ``a`` times how the genes move with its gene in the training
        cells, ``a`` fitted on the other trained perturbations of its kind that target one of the model's genes.
        ``None`` where that baseline does not apply (not one genetic perturbation of a model gene, no covariance
        kept, fewer than two such perturbations to fit on)."""
        from .evaluate.baselines import coupling

        gene = self._genetic_gene(perturbation)
        if gene is None:
            return None
        key = (perturbation.kind, tuple(sorted({_key(p) for p in without})))
        if key not in self._couplings:  # one fit per kind and set left out, not one per perturbation of a screen
            keep = self._kept(without)
            fitted = [(j, g) for j, i in enumerate(keep)
                      for g in [self._genetic_gene(parse(self.names[i]), perturbation.kind)] if g is not None]
            self._couplings[key] = (coupling(self.delta[keep], np.array([j for j, _ in fitted], dtype=np.int64),
                                             np.stack([self._response(g) for _, g in fitted]))
                                    if len(keep) >= 3 and len(fitted) >= 2 else None)
        a = self._couplings[key]
        return None if a is None else a * self._response(gene)

    @cached_property
    def _couplings(self) -> dict[tuple[str, tuple[str, ...]], float | None]:
        return {}

    def _genetic_gene(self, q: Perturbation | Combination, kind: str | None = None) -> int | None:
        """The model gene that ``q`` perturbs, when ``q`` is one genetic perturbation (of ``kind``, if given) and the
        covariance is kept; else ``None``."""
        if self.response is None or not isinstance(q, Perturbation) or q.kind not in GENETIC:
            return None
        if kind is not None and q.kind != kind:
            return None
        i = int(self._vocabulary.ids([q.target], missing="mark")[0])
        return i if i >= 0 else None

    @cached_property
    def _vocabulary(self) -> Vocabulary:
        from .sentences import Vocabulary

        return Vocabulary(self.genes)

    @cached_property
    def _factor(self) -> np.ndarray:
        return self.response.astype(np.float64)

    def _response(self, gene: int) -> np.ndarray:
        from .evaluate.baselines import regression_response

        return regression_response(self._factor @ self._factor[gene], gene)

    @classmethod
    def fit(cls, adata: ad.AnnData, contract: DataContract, model: C2SModel,
            forms: Mapping[str, str] | None = None, *, response: bool = True) -> Baselines:
        """The meanshift deltas of the training cells ``adata`` (the model's genes and normalization);
        ``forms``: the typed form of conditions the model was not trained on (else they are left out).
        ``response``: keep the cells' covariance (:attr:`response`) when a training perturbation is genetic."""
        from .evaluate._data import group_means
        from .sentences import model_expression

        X, _ = model_expression(adata, model.genes)
        labels = conditions = contract.conditions(adata)  # the doses of a drug are separate rows
        forms_of = model.perturbations.forms  # a label trained as several kinds: a row per kind, not their mean
        if forms_of:
            labels = _kind_split(adata, labels, forms_of, (model.train_config or {}).get("kind_key"))
        ctx = contract.contexts(adata)
        keys = np.array([f"{c}\x1f{p}" for p, c in zip(labels, ctx)], dtype=object)
        groups, means, _ = group_means(X, keys)
        table = {tuple(k.split("\x1f", 1)): m for k, m in zip(groups, means)}
        ctrl = {c: m for (c, p), m in table.items() if p == contract.control}
        per_label: dict[str, list[tuple[str, np.ndarray]]] = {}
        for (c, p), m in table.items():
            if p != contract.control and c in ctrl:
                per_label.setdefault(p, []).append((c, m - ctrl[c]))
        several = len(set(ctx)) > 1  # (one context: its own effect is the mean)
        names, rows, own_rows, own_contexts, own_delta = [], [], [], [], []
        for key in sorted(per_label):
            label, _, kind = key.partition(KIND_SEP)
            typed = (next(f for f in forms_of[label] if _kind_of(f) == kind) if kind
                     else model.perturbations.trained_form(label) or (forms or {}).get(label))
            if typed is None:
                continue
            names.append(str(parse(typed)))
            rows.append(np.mean([d for _, d in per_label[key]], axis=0))
            for c, d in per_label[key] if several else ():
                own_rows.append(len(names) - 1)
                own_contexts.append(str(c))
                own_delta.append(d)
        delta = np.asarray(rows, dtype=np.float32).reshape(len(rows), len(model.genes))
        genetic = any(isinstance(q, Perturbation) and q.kind in GENETIC for q in map(parse, names))
        # the covariance of the cells the model trained on: not of perturbations held out whole (``forms``), whose
        # baseline the verdict judges as a model's that never saw them
        trained = ~np.isin(conditions, sorted(forms or {}))
        factor = covariance_factor(X[trained], ctx[trained]) if response and genetic else None
        own = (np.array(own_rows, dtype=np.int64), tuple(own_contexts),
               np.asarray(own_delta, dtype=np.float32).reshape(len(own_rows), len(model.genes))) if own_rows else \
            (None, (), None)
        return cls(tuple(model.genes.genes), tuple(names), delta, factor, *own)

    def delta_for(self, perturbation: Perturbation | Combination | str, context: str | None = None
                  ) -> tuple[np.ndarray, str]:
        """The baseline delta for one perturbation (in ``context``, a cell's context as
        :meth:`~virtualcell.contract.DataContract.contexts` names it) and the baseline's name.

        A training perturbation gets its own ``meanshift`` delta: its effect in ``context`` where it was measured
        there, else its mean over the contexts it was measured in (at an untrained dose, its trained doses
        interpolated in log dose: ``dose``, as :mod:`virtualcell.evaluate` names that baseline); a combination
        whose every part was trained alone gets their sum (``additive``); the control gets zeros
        (``none``); any other perturbation gets :meth:`unseen_delta` (``coexpression`` or
        ``pertmean``, :data:`UNSEEN_BASELINES`).
        """
        q = parse(perturbation) if isinstance(perturbation, str) else perturbation
        if isinstance(q, Perturbation) and q.kind == "control":
            return np.zeros(len(self.genes), dtype=np.float32), "none"
        own = self._measured(q, context)
        if own is not None:
            return own
        if isinstance(q, Combination):
            parts = [self._measured(x, context) for x in q.parts]
            if all(d is not None for d in parts):
                return np.sum([d for d, _ in parts], axis=0).astype(np.float32), "additive"
        return self.unseen_delta(q)

    def _measured(self, q: Perturbation | Combination, context: str | None = None) -> tuple[np.ndarray, str] | None:
        """``q``'s measured delta and how it was had: its own row (same dose and time; ``meanshift``); a drug or
        cytokine at an untrained dose, its trained doses at the same time interpolated in log dose (``dose``;
        ``_stats.log_dose_interpolation``; protocol 6: 0.70 against the model's 0.60); else the row of the same
        perturbation at the nearest dose and time (log scale; ``meanshift``); None for a perturbation never
        trained at any dose."""
        same = self._rows_by_key.get(_key(q), [])
        if not same:
            return None
        exact = [i for i, form in same if str(form) == str(q)]
        # several rows of one form: conditions the model read as one prompt (a knockout at 24h and 72h is ko:TF06 at
        # both), served their mean, as the model learned them, never one of them (the last row was, 72h for 24h)
        if self._own_in(exact, context):  # its effect in this very context
            return np.mean([self.own_delta[self._own_at[(i, context)]] for i in exact], axis=0).astype(
                np.float32), "meanshift"
        if exact:
            return np.mean(self.delta[exact], axis=0).astype(np.float32), "meanshift"
        if isinstance(q, Perturbation) and q.dose is not None:
            doses = {form.dose: self.delta[i] for i, form in same
                     if isinstance(form, Perturbation) and form.dose is not None and form.time_hours == q.time_hours}
            between = log_dose_interpolation(doses, q.dose) if doses else None
            if between is not None:
                return between.astype(np.float32), "dose"
        return self.delta[min(same, key=lambda x: _quantity_distance(x[1], q))[0]], "meanshift"

    def _own_in(self, rows: Sequence[int], context: str | None) -> bool:
        """Whether the table keeps the effect of every one of ``rows`` (the rows of one typed form) measured in
        ``context`` itself: where :meth:`delta_for` serves that context's cells its own effect."""
        return bool(rows) and all((i, context) in self._own_at for i in rows)

    def measured_contexts(self, perturbation: Perturbation | Combination | str, *, fitted_on: str | None = None
                          ) -> tuple[str, ...] | None:
        """The contexts in which the cells these baselines were fitted on measured this very condition (the same
        typed form, dose and time; its own effect there is kept in :attr:`own_delta`), sorted: there
        :meth:`delta_for` serves its own effect; in any other context the mean over these (``meanshift``), or, for a
        condition measured nowhere (empty), an extrapolation. ``None`` for the control, and where the table keeps no
        per-context record (a checkpoint from before it was kept, or one fitted on a single context) unless
        ``fitted_on`` names that single context (:meth:`C2SModel.measured_contexts` passes it from the training
        record): then ``(fitted_on,)`` for a condition it holds.

        Examples
        --------
        >>> import numpy as np
        >>> b = Baselines(("g1", "g2"), ("ko:A", "ko:B"), np.zeros((2, 2), np.float32), None, np.array([0, 0, 1]),
        ...               ("liver", "lung", "liver"), np.zeros((3, 2), np.float32))
        >>> b.measured_contexts("ko:A"), b.measured_contexts("ko:B"), b.measured_contexts("ko:C")
        (('liver', 'lung'), ('liver',), ())
        """
        q = parse(perturbation) if isinstance(perturbation, str) else perturbation
        if (self.own_rows is None and fitted_on is None) or (isinstance(q, Perturbation) and q.kind == "control"):
            return None
        exact = [i for i, form in self._rows_by_key.get(_key(q), []) if str(form) == str(q)]
        if self.own_rows is None:
            return (str(fitted_on),) if exact else ()
        return tuple(c for c in sorted(set(self.own_contexts)) if self._own_in(exact, c))

    def measured_pairs(self, *, fitted_on: str | None = None) -> dict[str, tuple[str, ...]] | None:
        """Each condition of the table (its typed name, as :attr:`names` holds it) and the contexts it was measured
        in (:meth:`measured_contexts`, ``fitted_on`` as there); ``None`` where that is."""
        if self.own_rows is None and fitted_on is None:
            return None
        return {name: self.measured_contexts(name, fitted_on=fitted_on) for name in dict.fromkeys(self.names)}

    @cached_property
    def _own_at(self) -> dict[tuple[int, str], int]:
        """``(row of delta, context) -> row of own_delta``."""
        if self.own_rows is None:
            return {}
        return {(int(r), c): k for k, (r, c) in enumerate(zip(self.own_rows, self.own_contexts))}

    @cached_property
    def _rows_by_key(self) -> dict[str, list[tuple[int, Perturbation | Combination]]]:
        """Each perturbation without dose and time -> its rows and their typed forms, parsed once per table."""
        out: dict[str, list[tuple[int, Perturbation | Combination]]] = {}
        for i, name in enumerate(self.names):
            out.setdefault(_key(name), []).append((i, parse(name)))
        return out

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> None:
        from .safeio import atomic_write

        with atomic_write(path, "wb") as fh:  # whole or not at all (virtualcell verdict rewrites it in place)
            extra = {} if self.response is None else {"response": self.response.astype(np.float32)}
            if self.own_rows is not None:
                extra |= {"own_rows": self.own_rows.astype(np.int64),
                          "own_contexts": np.array(self.own_contexts, dtype=str),
                          "own_delta": self.own_delta.astype(np.float32)}
            np.savez(fh, genes=np.array(self.genes, dtype=str), names=np.array(self.names, dtype=str),
                     delta=self.delta.astype(np.float32), **extra)

    @classmethod
    def load(cls, path: str | Path, genes: Sequence[str]) -> Baselines:
        """Read ``baselines.npz``; its genes must be the model's (``genes``), in order, its tables one row per
        perturbation and its values finite numbers."""
        from .errors import non_finite

        try:
            with np.load(path) as z:
                own = ((np.asarray(z["own_rows"], dtype=np.int64), tuple(str(c) for c in z["own_contexts"]),
                        np.asarray(z["own_delta"], dtype=np.float32)) if "own_rows" in z.files else (None, (), None))
                out = cls(tuple(str(g) for g in z["genes"]), tuple(str(n) for n in z["names"]),
                          np.asarray(z["delta"], dtype=np.float32),
                          np.asarray(z["response"], dtype=np.float32) if "response" in z.files else None, *own)
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{str(path)!r} is broken ({err}); delete it to serve the pure model, or retrain.") from None
        if out.genes != tuple(genes):
            raise ModelError(f"{str(path)!r} holds baselines for other genes than the model's; delete it to serve "
                             "the pure model, or retrain.")
        # what the file holds is served as it is: a NaN delta made every prediction NaN, a table of other rows
        # failed deep in a screen with an IndexError
        n, g = len(out.names), len(out.genes)
        own = 0 if out.own_rows is None else len(out.own_rows)
        fault = (f"delta is {out.delta.shape}, not one row per perturbation ({n}) by gene ({g})"
                 if out.delta.shape != (n, g) else
                 f"response is {out.response.shape}, not one row per gene ({g})"
                 if out.response is not None and (out.response.ndim != 2 or out.response.shape[0] != g) else
                 f"own_delta is {out.own_delta.shape} and own_contexts {len(out.own_contexts)} long, not one row "
                 f"and context per own_rows ({own}) by gene ({g})"
                 if out.own_rows is not None and (out.own_delta.shape != (own, g) or len(out.own_contexts) != own
                                                  or out.own_rows.ndim != 1) else
                 f"own_rows point outside its {n} perturbations"
                 if own and (int(out.own_rows.min()) < 0 or int(out.own_rows.max()) >= n) else "")
        for name in ("delta", "response", "own_delta"):
            bad = "" if fault or getattr(out, name) is None else non_finite(getattr(out, name))
            fault = fault or (f"its {name}: {bad}" if bad else "")
        if fault:
            raise ModelError(f"{str(path)!r} is damaged ({fault}); delete it to serve the pure model, copy the "
                             "checkpoint folder again, or retrain.")
        return out


# the plain generation settings: where a verdict candidate sets none, and what a checkpoint serves where its verdict
# chose none (C2SModel.setting)
PLAIN = {"samples": 1, "guidance": 1.0, "temperature": 1.0, "coexpression_prior": True}


# --------------------------------------------------------------------------- #
# Pure functions: scores and the blend weight
# --------------------------------------------------------------------------- #
def blend_weight(*, model: np.ndarray, baseline: np.ndarray, measured: np.ndarray) -> float:
    """The least-squares weight ``w`` in [0, 1] of ``w·model + (1−w)·baseline`` against ``measured``.

    Rows are perturbations, columns genes (mean deltas):
    ``w = clip(Σ_p <m_p − b_p, y_p − b_p> / Σ_p ||m_p − b_p||², 0, 1)``; 0 when the model
    equals the baseline (nothing to add).
    """
    m, b, y = (np.asarray(a, dtype=np.float64) for a in (model, baseline, measured))
    d = m - b
    denom = float(np.sum(d * d))
    if denom < 1e-12:
        return 0.0
    return float(np.clip(np.sum(d * (y - b)) / denom, 0.0, 1.0))


def score_deltas(pred: np.ndarray, measured: np.ndarray, *, top_n: int = TOP_N) -> dict[str, float]:
    """pearson_delta (all genes and the ``top_n`` genes of largest measured |delta|) and MSE over
    genes, each averaged over the rows (perturbations)."""
    from .evaluate.metrics import _pearson

    pred, measured = np.atleast_2d(pred).astype(np.float64), np.atleast_2d(measured).astype(np.float64)
    n = min(top_n, pred.shape[1])
    top = np.argsort(-np.abs(measured), axis=1, kind="stable")[:, :n]
    pt, mt = np.take_along_axis(pred, top, axis=1), np.take_along_axis(measured, top, axis=1)
    return {
        "pearson_delta": float(np.mean([_pearson(a, b) for a, b in zip(pred, measured)])),
        f"pearson_delta_top{top_n}": float(np.mean([_pearson(a, b) for a, b in zip(pt, mt)])),
        "mse": float(np.mean((pred - measured) ** 2)),
    }


def delta_noise(bucket_delta: np.ndarray, bucket_count: np.ndarray) -> np.ndarray:
    """The sampling variance of a mean predicted delta, from the spread of its buckets' deltas.

    ``bucket_delta``: perturbations x buckets x genes, each bucket's mean predicted delta (its
    cells against their own baseline cells: the Simulator's ``bucket_mean - control_bucket_mean``);
    ``bucket_count``: perturbations x buckets, its cells. Cells fall into buckets by a hash, so the
    buckets are independent groups and the variance of the cell-weighted mean over them is
    ``B/(B-1) · Σ_b (n_b/N)² (D_b − D)²`` (B: the buckets with cells), whatever the noise comes
    from (the samples, the control generations, the cells themselves). It is the part of a
    validation MSE of the mean delta that more cells or samples would average away. It is not
    all that more samples change: on the bundled model, ``mse − noise`` still fell from 0.096 to
    0.084 between 1 and 8 samples per cell (``experiments/results/attempts/guidance_at_samples/``),
    so a noisier prediction also carries an error this does not see (most likely a bias through
    the clip at zero, which is not linear). Returns
    perturbations x genes (0 where fewer than two buckets have cells).

    >>> import numpy as np
    >>> d = np.array([[[1.0], [3.0]]])          # one perturbation, two buckets of 2 cells, one gene
    >>> delta_noise(d, np.array([[2, 2]]))       # 2/1 * ((1/2)^2 * 1 + (1/2)^2 * 1)
    array([[1.]])
    """
    D = np.asarray(bucket_delta, dtype=np.float64)
    n = np.asarray(bucket_count, dtype=np.float64)
    total = np.maximum(n.sum(axis=1), 1.0)[:, None]
    share = n / total  # P x B
    mean = np.einsum("pb,pbg->pg", share, D)
    used = (n > 0).sum(axis=1)[:, None]
    spread = np.einsum("pb,pbg->pg", share ** 2, (D - mean[:, None, :]) ** 2)
    return np.where(used > 1, spread * used / np.maximum(used - 1, 1), 0.0)


def summary_line(verdict: Mapping[str, Any] | None) -> str:
    """One line for a person: how the model did against the baseline on the validation split."""
    if not verdict:
        return "no validation verdict in this checkpoint"
    if "summary" in verdict:
        return str(verdict["summary"])
    return "validation verdict without a summary"


def settings_text(settings: Mapping[str, Any], *, empty: str = "defaults") -> str:
    """Generation settings for a person, e.g. ``"guidance 1, samples 4"`` (``empty`` when there are none).

    >>> settings_text({"guidance": 1.0, "samples": 4}), settings_text({})
    ('guidance 1, samples 4', 'defaults')
    """
    return ", ".join(f"{k} {v:g}" if isinstance(v, float | int) else f"{k} {v}" for k, v in settings.items()) or empty


def candidate_lines(verdict: Mapping[str, Any] | None) -> list[str]:
    """The generation settings the verdict tried, one line each (validation MSE and pearson_delta of the
    pure model, seconds), the chosen one marked: what each costs beside what it bought. ``noise``: the
    part of the MSE that is the sampling noise of the mean predicted delta (:func:`delta_noise`),
    which more samples or cells would average away.

    >>> v = {"settings": {"samples": 4}, "candidates": [
    ...     {"settings": {}, "model": {"mse": 0.2, "pearson_delta": 0.1, "noise": 0.04}, "seconds": 1.0},
    ...     {"settings": {"samples": 4}, "model": {"mse": 0.1, "pearson_delta": 0.3, "noise": 0.01}, "seconds": 4.0}]}
    >>> print("\\n".join(candidate_lines(v)))
    defaults   MSE 0.2000 (noise 0.0400)  pearson_delta 0.10     1 s
    samples 4  MSE 0.1000 (noise 0.0100)  pearson_delta 0.30     4 s  <- chosen
    """
    tried = list((verdict or {}).get("candidates") or [])
    if not tried:
        return []

    width = max(len(settings_text(c["settings"])) for c in tried)
    chosen = (verdict or {}).get("settings")

    def noise(c: Mapping[str, Any]) -> str:  # (verdicts written before it was measured have none)
        return f" (noise {c['model']['noise']:.4f})" if "noise" in c["model"] else ""

    return [f"{settings_text(c['settings']):<{width}}  MSE {c['model']['mse']:.4f}{noise(c)}  pearson_delta "
            f"{c['model']['pearson_delta']:.2f}  {c.get('seconds', float('nan')):4.0f} s"
            + ("  <- chosen" if c["settings"] == chosen else "") for c in tried]


def shared_setting(verdicts: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Among the generation settings that every verdict scored (their ``candidates``), the one with the
    lowest mean validation MSE over them; ``None`` when they share none.

    Two training recipes whose verdicts chose different settings cannot be compared by each one's
    chosen MSE: more samples per cell lower a verdict's MSE whatever the model (they average out
    sampling noise), so a recipe that trains less but is offered more samples can look better
    (``protocols_attempts.md``, session 26). Compare them at a setting both scored
    (:func:`mse_at`).

    >>> a = {"candidates": [{"settings": {"guidance": 1.0}, "model": {"mse": 0.30}},
    ...                     {"settings": {"guidance": 1.0, "samples": 4}, "model": {"mse": 0.21}}]}
    >>> b = {"candidates": [{"settings": {"guidance": 1.0}, "model": {"mse": 0.32}},
    ...                     {"settings": {"guidance": 1.0, "samples": 4}, "model": {"mse": 0.22}},
    ...                     {"settings": {"guidance": 1.0, "samples": 8}, "model": {"mse": 0.20}}]}
    >>> shared_setting([a, b])
    {'guidance': 1.0, 'samples': 4}
    >>> mse_at(b, shared_setting([a, b]))
    0.22
    """
    def key(settings: Mapping[str, Any]) -> str:
        return json.dumps(dict(settings), sort_keys=True)

    scored = [{key(c["settings"]): c for c in (v.get("candidates") or [])} for v in verdicts]
    common = set.intersection(*(set(s) for s in scored)) if scored else set()
    if not common:
        return None
    best = min(sorted(common), key=lambda k: float(np.mean([s[k]["model"]["mse"] for s in scored])))
    return dict(scored[0][best]["settings"])


def mse_at(verdict: Mapping[str, Any], settings: Mapping[str, Any]) -> float:
    """The verdict's validation MSE of the pure model at ``settings`` (one of its ``candidates``), or NaN."""
    for c in verdict.get("candidates") or []:
        if dict(c["settings"]) == dict(settings):
            return float(c["model"]["mse"])
    return float("nan")


def mse_difference(model: np.ndarray, baseline: np.ndarray, measured: np.ndarray, *, seed: int = 0,
                   perturbations: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
                   ) -> dict[str, Any]:
    """How much larger the model's MSE is than the baseline's, with a 95% bootstrap interval:
    ``{"mse": mean difference, "low", "high", "rows", "perturbations", "contexts"}`` (the counts of each).
    Negative: the model is closer to the measured deltas. Each row is a perturbation in a context; given
    the rows' ``perturbations`` and ``contexts``, the interval resamples perturbations and contexts, not
    rows (:func:`~virtualcell._stats.bootstrap_mean`'s ``factors``): rows of one perturbation in several
    contexts are not independent, and counting them so made a difference that was not there look settled
    in 42% of simulated splits of 20 perturbations x 5 contexts, against 9% resampling perturbations and contexts
    (``experiments/interval_calibration.py``). The interval is the split's sampling only;
    a second training run moves the model's side too."""
    from ._stats import bootstrap_mean

    y = np.atleast_2d(np.asarray(measured, dtype=np.float64))
    per_row = (np.mean((np.atleast_2d(model) - y) ** 2, axis=1)
               - np.mean((np.atleast_2d(baseline) - y) ** 2, axis=1))
    rows = np.arange(per_row.size).astype(str)
    p = np.asarray(perturbations if perturbations is not None else rows).astype(str)
    c = np.asarray(contexts if contexts is not None else np.zeros(per_row.size)).astype(str)
    mean, low, high = bootstrap_mean(per_row, seed=seed, factors=[p, c])
    return {"mse": mean, "low": low, "high": high, "rows": int(per_row.size),
            "perturbations": int(np.unique(p).size), "contexts": int(np.unique(c).size)}


def crossfitted(candidates: Sequence[np.ndarray], measured: np.ndarray, groups: Sequence[str], *,
                seed: int = 0) -> np.ndarray | None:
    """The rows' deltas, each half of the ``groups`` (perturbations, or contexts) taken from the candidate
    with the lowest MSE on the *other* half; ``None`` with one candidate or one group. The verdict chooses
    its generation setting by the MSE on its rows, so the chosen setting's error on those very rows is
    lower than a new split would give it, and a difference from the baseline judged there is optimistic;
    judged on these deltas, no row's setting was chosen on that row.

    >>> Y = np.zeros((4, 2)); good, bad = np.zeros((4, 2)), np.ones((4, 2))
    >>> crossfitted([bad, good], Y, ["a", "a", "b", "b"]).tolist() == good.tolist()
    True
    """
    g = np.asarray(groups).astype(str)
    levels = np.unique(g)
    if len(candidates) < 2 or levels.size < 2:
        return None
    y = np.asarray(measured, dtype=np.float64)
    errors = np.stack([np.mean((np.asarray(m, dtype=np.float64) - y) ** 2, axis=1) for m in candidates])
    half = np.isin(g, np.random.default_rng(seed).permutation(levels)[: levels.size // 2])
    out = np.empty_like(y)
    for here in (half, ~half):
        best = int(np.argmin(errors[:, ~here].mean(axis=1)))
        out[here] = np.asarray(candidates[best], dtype=np.float64)[here]
    return out


def _judged(M: np.ndarray, B: np.ndarray, Y: np.ndarray, name: str, *, seed: int,
            perturbations: Sequence[str] | None = None, contexts: Sequence[str] | None = None,
            chosen_from: Sequence[np.ndarray] = ()) -> dict[str, Any]:
    """The model's deltas ``M``, the baseline ``name``'s ``B`` and their least-squares blend, each
    scored against the measured ``Y`` (rows: perturbations in their contexts, named by ``perturbations``
    and ``contexts``), with the blend's weight and the MSE difference's interval: the verdict's parts, for
    any set of rows. ``chosen_from``: the candidates' deltas on these rows, ``M`` the one of lowest MSE among
    them; the difference is then judged on :func:`crossfitted` deltas (``"crossfitted": True``)."""
    w = blend_weight(model=M, baseline=B, measured=Y)
    names = {"perturbations": perturbations, "contexts": contexts}
    groups = None
    if perturbations is not None:  # split along whichever factor has more values
        n_p, n_c = len(set(perturbations)), len(set(contexts)) if contexts is not None else 1
        groups = perturbations if n_p >= n_c or contexts is None else contexts
    fair = crossfitted(chosen_from, Y, groups, seed=seed) if groups is not None else None
    difference = mse_difference(M if fair is None else fair, B, Y, seed=seed, **names)
    return {"model": score_deltas(M, Y), "baseline": score_deltas(B, Y) | {"name": name},
            "blend": score_deltas(w * M + (1 - w) * B, Y),
            "difference": difference | {"crossfitted": fair is not None}, "weight": w}


def _summary(n_labels: int, n_cells: int, part: Mapping[str, Any],
             what: str = "held-out cells of {n} training perturbations", served_for: str = "",
             reported_only: bool = False) -> str:
    """One line for a person from a :func:`_judged` part; ``reported_only``: its weight is reported, not served."""
    model, base, blend, w = part["model"], part["baseline"], part["blend"], part["weight"]
    name, diff = base["name"], part["difference"]
    settled = diff["high"] < 0 or diff["low"] > 0  # the interval excludes 0; NaN bounds (one row) settle nothing
    lone = not (np.isfinite(diff["low"]) and np.isfinite(diff["high"]))  # one group: no interval over groups
    if settled:
        better = "the model is better" if diff["mse"] < 0 else "the baseline is better"
    elif lone:
        better = (f"the {'model' if diff['mse'] < 0 else 'baseline'}'s error is lower, on {diff['rows']} held-out "
                  "group, too few for an interval")
    else:
        better = "neither is clearly better"
    over = (f"resampling its {_count(diff['perturbations'], 'perturbation')} and "
            f"{_count(diff['contexts'], 'context')}" if "perturbations" in diff
            else f"over the {diff['rows']} held-out perturbation x context groups")
    fair = ", each half's generation setting chosen on the other half" if diff.get("crossfitted") else ""
    interval = "" if lone else f"; the difference's 95% interval{fair}, {over}, is {diff['low']:+.4f} to {diff['high']:+.4f}"
    if reported_only:
        served = f"a blend fitted there would weigh the model {w:.2f} (reported; not what predictions are served with)"
    else:
        served = served_for + ("predictions are the baseline's" if w <= 0 else "predictions are the model's" if w >= 1
                  else "predictions are blended")
    return (f"Validation ({what.format(n=n_labels)}, {n_cells} cells): model pearson_delta "
            f"{model['pearson_delta']:.2f}, {name} {base['pearson_delta']:.2f}, blend (w={w:.2f}) "
            f"{blend['pearson_delta']:.2f} — {better} (MSE {model['mse']:.4f} against {base['mse']:.4f}{interval}); "
            f"{served}.")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


# --------------------------------------------------------------------------- #
# The verdict
# --------------------------------------------------------------------------- #
def run_verdict(model: C2SModel, held: ad.AnnData, contract: DataContract, *, seed: int = 0,
                candidates: Sequence[Mapping[str, Any]] = ({},), samples: Sequence[int] = (1,),
                temperatures: Sequence[float] = (1.0,), max_input_cells: int = 64,
                codec: Baselines | Mapping[str, Baselines] | None = None,
                unseen: Mapping[str, str] | None = None,
                gene_maps: Mapping[str, GeneMap] | None = None,
                new_context: str | None = None, progress: bool = False) -> dict[str, Any] | None:
    """Score the model, its baseline and their blend on the held-out cells ``held``.

    Per context, half of the held-out control cells (at most ``max_input_cells`` over all
    contexts) are the Simulator's input; the other half is the reference that the
    held-out perturbed cells are measured against. Each dict of ``candidates`` is extra
    keyword arguments of :meth:`Simulator.simulate` (generation settings); then the best of
    them (lowest validation MSE of the pure model) is tried again with each number of
    ``samples`` per cell other than 1 (unless it sets ``samples`` itself), then the best so far
    with each sampling temperature of ``temperatures`` other than 1 (unless it sets its own), at
    the samples per cell already chosen: a lower temperature also averages noise away, as more
    samples do, so it is judged where the samples have done that. The setting with the lowest
    MSE of all is kept (``"settings"``). ``model.baselines`` must be set.
    ``codec``: the same baselines fitted on the training cells *as the codec gives them back*
    (:func:`~virtualcell.sentences.roundtrip` with the model's sentences and rank fit); their
    scores (``"codec"``) are what a model that learned the training effects exactly could reach
    through its ``top_k``-gene sentences: when they fall short of the baseline's, the sentences,
    not the training, limit the model. A mapping of decode methods (``"linear"``, ``"table"``) to
    such baselines, each decoded that way, also chooses the decode (:func:`choose_decode`):
    ``model.rank_fit`` is set to the one with the lowest MSE before any candidate is simulated. ``gene_maps``:
    the gene maps of the codec's mapped decodes (``"linear+map"`` ...; :mod:`virtualcell.gene_map`):
    ``model.gene_map`` becomes the chosen one, or ``None`` where a decode without a map was chosen.
    ``unseen``: perturbations held out of training whole (``{condition: typed form}``,
    :func:`virtualcell.train.unseen_labels`). They are simulated beside the others but judged
    apart, against the baseline a perturbation never trained on gets (:meth:`Baselines.unseen_delta`
    without any of them: ``pertmean`` or ``coexpression``): the settings, the decode and ``"weight"``
    are chosen on the trained perturbations alone, and ``"unseen"`` holds the scores, the difference
    and a weight of their own, which the Simulator serves for every perturbation whose baseline is one
    of :data:`UNSEEN_BASELINES`. Where the coexpression prior moves them (:meth:`C2SModel.coexpression_priors`;
    not when they are all the verdict has), they are simulated again without it, and the prior is kept only if
    their error is no higher with it: ``"unseen"["settings"]`` holds the choice, which
    :meth:`C2SModel.setting` serves, and ``"unseen"["coexpression_prior"]`` both scores.
    ``new_context``: the context whose perturbed cells were held out of training whole
    (:func:`virtualcell.train.verdict_context`). Its trained perturbations are simulated beside the others and judged
    apart, against their mean effect in the other contexts (``meanshift``, which is what the baselines were fitted
    on): ``"new_context"`` holds the scores, the difference and the weight a blend fitted there would have,
    reported, not served (the settings, the decode and ``"weight"`` are chosen on the trained contexts' rows;
    ``"served"`` False). Where the held-out context has the only trained perturbations' rows, the verdict proper is
    its (``"served"`` True).
    Returns the verdict (also what ``verdict.json`` holds), or ``None`` when ``held`` has no
    context with both held-out controls and perturbed cells.
    """
    from .sentences import model_expression
    from .simulator import Simulator

    if model.baselines is None:
        raise ModelError("run_verdict needs model.baselines (Baselines.fit on the training cells) first.")
    t0 = time.perf_counter()
    candidates = [dict(c) for c in candidates] or [{}]
    labels, ctx = contract.conditions(held), contract.contexts(held)
    X, _ = model_expression(held, model.genes)
    unseen = dict(unseen or {})
    plans = _plans(model, held, contract, seed=seed, max_input_cells=max_input_cells, unseen=unseen)
    if not plans:
        return None
    codecs = ({} if codec is None else dict(codec) if isinstance(codec, Mapping)
              else {model.rank_fit.method if model.rank_fit is not None else "linear": codec})
    sims, b_rows, y_rows, names, row_cells, row_ctx, n_cells, n_controls = [], [], [], [], [], [], 0, 0
    held_whole = list(unseen.values())
    unseen_names: set[str] = set()  # the baselines the perturbations held out whole got (UNSEEN_BASELINES)
    c_rows: dict[str, list[np.ndarray]] = {m: [] for m in codecs}
    for c, inputs, reference, perts in plans:
        ref_mean = np.asarray(X[reference].mean(axis=0)).ravel()
        typed = [parse(unseen[p] if p in unseen else model.perturbations.trained_form(p)) for p in perts]
        sims.append((Simulator(held[inputs], model, seed=seed, warn_new_contexts=False), typed))
        for p, q in zip(perts, typed):
            cells = np.flatnonzero((ctx == c) & (labels == p))
            y_rows.append(np.asarray(X[cells].mean(axis=0)).ravel() - ref_mean)
            # a perturbation held out whole: the baseline of a model that never saw any of them (the served
            # baselines know their measured effects)
            if p in unseen:
                delta, name = model.baselines.unseen_delta(q, without=held_whole)
                unseen_names.add(name)
            else:  # its mean over the training contexts: what a context it was not measured in is served. (Its own
                # context's effect, served to that context's cells, is the stronger baseline there, and judged against
                # it the weight fell, lowering the blend a new cell type gets; one weight serves both, so it is fitted
                # against the baseline a transfer gets)
                delta = model.baselines.delta_for(q)[0]
            b_rows.append(delta.astype(np.float64))
            for m, baselines in codecs.items():
                c_rows[m].append(baselines.delta_for(q)[0].astype(np.float64))
            names.append(p)
            row_ctx.append(c)
            row_cells.append(cells.size)
            n_cells += cells.size
        n_cells += inputs.size + reference.size
        n_controls += inputs.size + reference.size
    Y, B = np.array(y_rows), np.array(b_rows)
    new = np.array([p in unseen for p in names])  # perturbations never trained on: judged apart
    # trained perturbations in the context held out whole: judged apart too
    moved = np.array([c == new_context for c in row_ctx]) & ~new if new_context is not None else np.zeros_like(new)
    only_unseen = bool(new.all())  # (no trained perturbation has held-out cells: the verdict is theirs alone)
    seen = new if only_unseen else ~new & ~moved
    only_moved = not seen.any()  # (only the held-out context has trained perturbations' cells: the verdict is its)
    if only_moved:
        seen, moved = moved, np.zeros_like(moved)
    unseen_name = "/".join(sorted(unseen_names)) or "pertmean"
    base_name = unseen_name if only_unseen else "meanshift"
    codec_scores = {m: score_deltas(np.array(rows)[seen], Y[seen]) for m, rows in c_rows.items()}
    if len(codec_scores) > 1:  # before any simulation: the Simulator decodes with model.rank_fit (and its map)
        model.rank_fit, model.gene_map, decode_name = choose_decode(model.rank_fit, codec_scores, gene_maps)
    else:  # the one codec's own decode (none without a codec)
        decode_name = next(iter(codec_scores), None)

    def simulated(settings: Mapping[str, Any], only: set[str] | None = None) -> list:
        """Each context's aggregates at ``settings`` (a setting left out is its plain value, not one an earlier
        verdict chose), of its perturbations or of those whose typed form is in ``only``, in the verdict's row
        order (blend=None: the buckets' served cells are the pure model's)."""
        chosen = [(sim, [q for q in typed if only is None or str(q) in only]) for sim, typed in sims]
        return [sim.simulate(typed, seed=seed, blend=None, keep_cells=False, progress=False,
                             **(PLAIN | dict(settings))).aggregates for sim, typed in chosen if typed]

    # one step per generation setting tried: the candidates, then the other samples per cell and temperatures of the
    # best so far, fewer where the best sets its own (a candidate the user wrote whole), which the total then drops
    more = {"samples": len(_other_values({}, "samples", samples)),
            "temperature": len(_other_values({}, "temperature", temperatures))}
    bar = progress_bar(len(candidates) + sum(more.values()), progress, "verdict (generation settings tried)",
                       " settings")

    def then(key: str, tries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The ``tries`` of the step trying other values of ``key``, the bar's total put right for them."""
        if len(tries) != more[key]:
            bar.total -= more[key] - len(tries)
            bar.refresh()
        return tries

    def attempt(settings: dict[str, Any]) -> tuple[dict[str, Any], np.ndarray]:
        """The candidate's score (what ``"candidates"`` lists) and its predicted deltas."""
        t = time.perf_counter()
        bar.set_postfix_str(", ".join(f"{k} {v}" for k, v in settings.items()) or "plain")
        aggs = simulated(settings)
        bar.update(1)
        M = np.concatenate([a["delta_model"].values.astype(np.float64) for a in aggs])
        V = np.concatenate([delta_noise(a["bucket_mean"].values - a["control_bucket_mean"].values[None],
                                        a["bucket_count"].values) for a in aggs])
        scores = score_deltas(M[seen], Y[seen]) | {"noise": float(V[seen].mean())}
        return {"settings": settings, "model": scores, "seconds": round(time.perf_counter() - t, 2)}, M

    def lowest_error(tried: list[tuple[dict[str, Any], np.ndarray]]) -> tuple[dict[str, Any], np.ndarray]:
        return min(tried, key=lambda a: a[0]["model"]["mse"])

    tried = [attempt(cand) for cand in candidates]
    tried += [attempt(cand) for cand in then("samples", _more_samples(lowest_error(tried)[0]["settings"], samples))]
    tried += [attempt(cand) for cand in then("temperature", _other_values(lowest_error(tried)[0]["settings"],
                                                                          "temperature", temperatures))]
    bar.close()
    scored = [a[0] for a in tried]
    best, M_all = lowest_error(tried)
    settings = best["settings"]
    # the verdict proper is on the trained perturbations' rows (the model's scores as the candidate had them)
    row_names, row_contexts = np.asarray(names).astype(str), np.asarray(row_ctx).astype(str)

    def rows(mask: np.ndarray) -> dict[str, Any]:
        return {"perturbations": row_names[mask], "contexts": row_contexts[mask]}

    plain = _judged(M_all[seen], B[seen], Y[seen], base_name, seed=seed, **rows(seen),
                    chosen_from=[M[seen] for _, M in tried])
    judged = plain | {"model": best["model"]}
    perturbations = sorted({p for p, s in zip(names, seen) if s})
    verdict = judged | {
        "settings": settings,
        "candidates": scored,
        "n_labels": len(perturbations),
        "n_targets": len(names),
        "n_cells": int(n_cells),
        "n_contexts": len(plans),
        "perturbations": perturbations,
        "seconds": round(time.perf_counter() - t0, 2),
    }
    context_what = f"context {new_context!r} held out of training whole, {{n}} perturbations"
    # the cells behind the verdict proper: its perturbations' and the controls (not those judged apart below)
    verdict["summary"] = _summary(len(perturbations), int(np.sum(np.asarray(row_cells)[seen])) + n_controls, judged,
                                  **({"what": UNSEEN_WHAT} if only_unseen else {"what": context_what} if only_moved
                                     else {}))
    if only_moved:  # the verdict proper is the context's: its weight, the only one there is, is served
        verdict["new_context"] = judged | {"context": new_context, "n_labels": len(perturbations),
                                           "perturbations": perturbations, "served": True,
                                           "summary": verdict["summary"]}
    if codec_scores:  # the codec's limit: the training effects as a model that wrote them exactly would see them
        verdict["codec"] = codec_scores[decode_name] | {"top_k": model.top_k, "decode": decode_name}
        verdict["summary"] += (f" Through its {model.top_k}-gene sentences, a model that learned the training effects "
                               f"exactly would score pearson_delta {verdict['codec']['pearson_delta']:.2f}.")
        if len(codec_scores) > 1:
            verdict["decode"] = dict(codec_scores)
            others = ", ".join(f"{m} {v['mse']:.4f}" for m, v in codec_scores.items() if m != decode_name)
            verdict["summary"] += (f" Decode chosen on it: {decode_name} (codec MSE "
                                   f"{codec_scores[decode_name]['mse']:.4f}; {others}).")
    if len(tried) > 1:  # say what was chosen on this split, and among what
        chosen = settings_text(settings, empty="the defaults")
        verdict["summary"] += f" Generation settings chosen on it: {chosen} (of {len(tried)} tried)."
    if new.any():  # the perturbations never trained on, at the settings just chosen, with a weight of their own
        # (when they are all the verdict has, its part above is already theirs)
        part = plain if only_unseen else _judged(M_all[new], B[new], Y[new], unseen_name, seed=seed, **rows(new))
        prior = None
        if not only_unseen and model.coexpression_priors([parse(v) for v in unseen.values()]) is not None:
            # the coexpression prior moves only these: kept or dropped by their error without it
            alone = simulated(settings | {"coexpression_prior": False}, only={str(parse(v)) for v in unseen.values()})
            without = _judged(np.concatenate([a["delta_model"].values.astype(np.float64) for a in alone]),
                              B[new], Y[new], unseen_name, seed=seed, **rows(new))
            keep = part["model"]["mse"] <= without["model"]["mse"]
            prior = {"with": part["model"], "without": without["model"], "kept": keep}
            part = part if keep else without
        held_whole = sorted(set(np.asarray(names)[new]))
        verdict["unseen"] = part | {"n_labels": len(held_whole), "perturbations": held_whole}
        verdict["unseen"]["summary"] = _summary(len(held_whole), int(np.sum(np.asarray(row_cells)[new])), part,
                                                what=UNSEEN_WHAT, served_for="for perturbations no training cell measured, ")
        if prior is not None:
            verdict["unseen"] |= {"settings": {"coexpression_prior": prior["kept"]}, "coexpression_prior": prior}
            verdict["unseen"]["summary"] += (
                f" The coexpression prior on its logits is {'kept' if prior['kept'] else 'dropped'} for them (MSE "
                f"{prior['with']['mse']:.4f} with it, {prior['without']['mse']:.4f} without).")
        if not only_unseen:
            verdict["summary"] += " " + verdict["unseen"]["summary"]
    if moved.any():  # the context never seen perturbed, at the settings just chosen: reported beside
        part = _judged(M_all[moved], B[moved], Y[moved], "meanshift", seed=seed, **rows(moved))
        labels_there = sorted(set(np.asarray(names)[moved]))
        verdict["new_context"] = part | {"context": new_context, "n_labels": len(labels_there),
                                         "perturbations": labels_there, "served": False}
        verdict["new_context"]["summary"] = _summary(
            len(labels_there), int(np.sum(np.asarray(row_cells)[moved])), part,
            what=context_what, reported_only=True)
        verdict["summary"] += " " + verdict["new_context"]["summary"]
    return verdict


UNSEEN_WHAT = "{n} perturbations held out of training whole"  # how a summary names them


def choose_decode(fit: RankFit, codec_scores: Mapping[str, Mapping[str, float]],
                  gene_maps: Mapping[str, GeneMap] | None = None) -> tuple[RankFit, GeneMap | None, str]:
    """The decode whose codec scores (:func:`score_deltas` of the training effects through the sentences,
    decoded that way, against the validation split's measured deltas) have the lowest MSE: the decode that
    carries what the data says best. A decode is a rank-fit method (``"linear"``, ``"table"``) or one of them
    followed by a gene map (``"linear+map"``, ``"linear+residual map"``, the map in ``gene_maps``;
    :mod:`virtualcell.gene_map`). The
    scores are free (no generation), and the decode is shared by every prediction, so it is chosen once,
    before the generation settings. Returns ``fit`` set to decode by the chosen method, the chosen gene map
    (``None``: none) and the decode's name.

    >>> from virtualcell.sentences import RankFit
    >>> fit = RankFit(-1.0, 3.0, 0.9, "log1p", 10, rank_means=(3.0, 2.0, 1.0))
    >>> fit2, gene_map, name = choose_decode(fit, {"linear": {"mse": 0.2}, "table": {"mse": 0.1}})
    >>> fit2.method, gene_map, name
    ('table', None, 'table')
    """
    from dataclasses import replace

    from .sentences import DECODE_METHODS

    name = min(codec_scores, key=lambda m: codec_scores[m]["mse"])
    gene_map = (gene_maps or {}).get(name)
    method = gene_map.decode if gene_map is not None else name
    if method not in DECODE_METHODS:
        raise ModelError(f"The codec's decode {name!r} is neither a rank-fit method {DECODE_METHODS} nor a gene map "
                         "passed with it.")
    return (fit if fit.method == method else replace(fit, method=method)), gene_map, name


def _plans(model: C2SModel, held: ad.AnnData, contract: DataContract, *, seed: int, max_input_cells: int,
           unseen: Mapping[str, str] | None = None) -> list[tuple[str, np.ndarray, np.ndarray, list[str]]]:
    """Per context of ``held``: its input control cells, its reference control cells and the
    perturbations to simulate (the model's own and the ``unseen`` ones, measured there); contexts
    without both are left out."""
    rng = np.random.default_rng([seed, 11])
    labels, ctx, is_ctrl = contract.conditions(held), contract.contexts(held), contract.is_control(held)
    known = set(model.perturbations.labels) | set(model.perturbations.conditions) | set(unseen or ())
    found = []
    for c in sorted(set(ctx)):
        controls = rng.permutation(np.flatnonzero((ctx == c) & is_ctrl))
        perts = sorted({p for p in labels[(ctx == c) & ~is_ctrl] if p in known})
        if controls.size >= 4 and perts:
            found.append((c, controls, perts))
    per_context = max(2, max_input_cells // len(found)) if found else 0
    plans = []
    for c, controls, perts in found:
        half = min(controls.size // 2, per_context)
        plans.append((c, np.sort(controls[:half]), np.sort(controls[half:]), perts))
    return plans


def verdict_seconds(model: C2SModel, held: ad.AnnData, contract: DataContract, *, seed: int = 0,
                    candidates: Sequence[Mapping[str, Any]] = ({},), samples: Sequence[int] = (1,),
                    temperatures: Sequence[float] = (1.0,), max_input_cells: int = 64, probe_cells: int = 4,
                    unseen: Mapping[str, str] | None = None, repeats: int = 2) -> float:
    """About how long :func:`run_verdict` will take with ``model`` (an upper bound, as a rule).

    It simulates the first context's perturbations from ``probe_cells`` of its input cells
    with every candidate's settings (the more ``samples`` on top of the first candidate's, and the
    other ``temperatures`` at the most samples: the most :func:`run_verdict` may try), and
    scales the seconds per generated row to all the verdict's cells. The stages after the
    candidates are priced as if the costliest candidate had won (a guided one's rows cost about
    twice a plain one's). With an untrained
    ``model`` (as the trainer asks, before training, to reserve the time) sentences rarely end
    early, and the small probe batch is slower per row than the verdict's full ones, so the
    estimate errs high.

    Each probe runs ``repeats`` times and its fastest run counts: a probe is short, so one
    stall (another process taking the cores, a first call's one-off costs) would otherwise be
    scaled up to the whole verdict and taken out of training (protocol 1's CD8T run reserved
    190 s for a 31 s verdict).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    from .simulator import Simulator

    unseen = dict(unseen or {})
    plans = _plans(model, held, contract, seed=seed, max_input_cells=max_input_cells, unseen=unseen)
    if not plans:
        return 0.0
    _, inputs, _, perts = plans[0]
    probe = inputs[:probe_cells]
    typed = [parse(unseen[p]) if p in unseen else model.perturbations.resolve(p) for p in perts]
    sim = Simulator(held[probe], model, seed=seed, warn_new_contexts=False)
    candidates = [dict(c) for c in candidates] or [{}]
    per_row: dict[str, float] = {}

    def cost(settings: dict[str, Any]) -> tuple[float, int, int]:
        """Seconds per generated row at ``settings`` (probed once per cost: a row costs the same at any
        temperature), and its control and sample rows per cell."""
        k = sim.sample_count(settings["samples"])
        control = Simulator.control_sample_count(k, settings.get("control_samples"))
        key = repr(sorted((n, v) for n, v in settings.items() if n != "temperature"))
        if key not in per_row:
            fastest = float("inf")
            for _ in range(repeats):
                t = time.perf_counter()
                sim.simulate(typed, seed=seed, blend=None, keep_cells=False, progress=False, **settings)
                fastest = min(fastest, time.perf_counter() - t)
            per_row[key] = fastest / (probe.size * (control + k * len(perts)))  # rows: control and samples
        return per_row[key], control, k

    def seconds(row: float, control: int, k: int) -> float:
        return row * sum(inp.size * (control + k * len(ps)) for _, inp, _, ps in plans)

    firsts = [cost(PLAIN | c) for c in candidates]
    total = sum(seconds(*c) for c in firsts)
    # the later stages run on whichever candidate wins: priced on the first one's probe, scaled to the costliest
    # (a guided candidate generates a second condition beside each row)
    dearest = max(row for row, _, _ in firsts) / firsts[0][0] if firsts[0][0] > 0 else 1.0
    most = candidates[0] if "samples" in candidates[0] else candidates[0] | {"samples": max(samples)}
    for cand in _more_samples(candidates[0], samples) + _other_values(most, "temperature", temperatures):
        row, control, k = cost(PLAIN | cand)
        total += seconds(row * dearest, control, k)
    if unseen:  # the perturbations held out whole, once more without the coexpression prior, at the most samples
        row, control, k = cost(PLAIN | most)
        total += row * dearest * sum(inp.size * (control + k * sum(p in unseen for p in ps)) for _, inp, _, ps in plans)
    return total


def _more_samples(settings: Mapping[str, Any], samples: Sequence[int]) -> list[dict[str, Any]]:
    """``settings`` with each number of ``samples`` per cell but 1 (none when it sets its own)."""
    return [dict(s) | {"samples": int(s["samples"])} for s in _other_values(settings, "samples", samples)]


def _other_values(settings: Mapping[str, Any], key: str, values: Sequence[Any]) -> list[dict[str, Any]]:
    """``settings`` with each of ``values`` for ``key`` but its plain one (:data:`PLAIN`); none when ``settings``
    sets ``key`` itself (a candidate the user wrote whole).

    >>> _other_values({"guidance": 2.0}, "temperature", (1.0, 0.8, 0.6))
    [{'guidance': 2.0, 'temperature': 0.8}, {'guidance': 2.0, 'temperature': 0.6}]
    >>> _other_values({"temperature": 0.5}, "temperature", (1.0, 0.8))
    []
    """
    if key in settings:
        return []
    return [dict(settings) | {key: v} for v in dict.fromkeys(values) if v != PLAIN[key]]
