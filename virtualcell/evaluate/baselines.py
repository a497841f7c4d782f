"""Simple baselines, each a function returning a predicted AnnData scored like a model.

Every baseline predicts a *delta* for each target ``(perturbation, context)`` from measured
effects in ``train`` (never from the target itself), and adds it to the baseline control
cells of the target context. Measured effects are ``mean(perturbed) - mean(control)`` in
``train``, per context.

* :func:`nochange` — the control itself (delta 0).
* :func:`meanshift` — the mean effect of the same perturbation in the *other* contexts.
* :func:`pertmean` — the mean effect of the *other* perturbations in the same context.
* :func:`additive` — for a combination ``"A+B"``, effect(A) + effect(B) in the same context.
* :func:`linear` — a ridge regression of measured deltas on perturbation features, after
  Ahlmann-Eltze, Huber & Anders (2025, Nat Methods), who found that such linear models
  match deep models at predicting unseen perturbations.
* :func:`coexpression` — for a perturbation of one measured gene, :func:`pertmean` plus the
  change that goes with the gene across the training cells of its context (each gene's
  regression on it), scaled by one factor fitted on the other single-gene perturbations.
* :func:`dose` — for a drug or cytokine at a dose, its measured effects at its other doses
  in the same context, interpolated in log dose (not among the defaults: name it, e.g.
  ``evaluate(..., baselines=("nochange", "meanshift", "dose"))``).

A target a baseline cannot predict (no other context, a single rather than a combination,
a component never measured alone) is left out of its prediction and listed in
``adata.uns["virtualcell"]["skipped"]``; a pair whose part was never measured alone is also said in a warning,
with the forms of the part looked for.

The shifted cells are ``control + delta``, negative wherever a cell expresses a gene less than
its predicted drop; ``nonnegative=True`` makes them non-negative the way the Simulator makes
its own predictions, for a distribution metric (E-distance) on equal terms.

Examples
--------
>>> import virtualcell as vc
>>> adata = vc.datasets.load("perturbench")
>>> base, ref = vc.evaluate.split_controls(adata, seed=0)
>>> pred = vc.evaluate.baselines.additive(ref, baseline=base)
>>> sorted(set(pred.obs["perturbation"]))[:2]
['KLF1+MAP2K6', 'KLF1+TGFBR2']
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from .._stats import calibrated, log_dose_interpolation
from ..contract import UNS_KEY
from ..errors import DataError, PerturbationError, preview
from ..perturbations import (GENETIC, Perturbation, canonical_condition, condition_parts, dose_on_one_scale,
                             hours_per, label_parts, parse, parts_of, read_quantity, shared_suffix)
from ._data import Prepared, group_means, prepare, resolve_contract, shared_genes

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from ..sentences import Vocabulary

log = logging.getLogger("virtualcell.evaluate")

__all__ = ["nochange", "meanshift", "pertmean", "additive", "linear", "coexpression", "dose", "BASELINES", "Effects",
           "regression_response", "coupling"]

Target = tuple[str, str]  # (perturbation, context)


# --------------------------------------------------------------------------- #
# Measured effects
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Effects:
    """Measured mean deltas of ``train``, per (perturbation, context), against its own control."""

    genes: pd.Index
    delta: Mapping[Target, np.ndarray]
    n_cells: Mapping[Target, int]
    # the training cells themselves (what :func:`coexpression` regresses on), and the moments it caches
    cells: Prepared | None = None
    # a perturbed gene as the labels name it -> the gene's name here (``sentences.target_aliases``: knockouts
    # labelled by symbol in data whose genes are Ensembl ids)
    aliases: Mapping[str, str] = field(default_factory=dict)
    control: str = "control"  # the data's control label, which a label's part may name ('A+NT' is A)
    # each label's typed form where the cells say it (obs['perturbation_typed'] of predicted cells): a cytokine or
    # drug named by its gene ('IFNG@10', 'cytokine:IFNG@10ng/ml') is no perturbation of that gene (:func:`genetic`)
    typed: Mapping[str, str] = field(default_factory=dict)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_prepared(cls, data: Prepared, genes: pd.Index, control: str,
                      aliases: Mapping[str, str] | None = None, typed: Mapping[str, str] | None = None) -> Effects:
        keys = np.array([f"{c}\x1f{p}" for p, c in zip(data.labels, data.contexts)], dtype=object)
        names, means, counts = group_means(data.X, keys)
        table = {tuple(k.split("\x1f", 1)[::-1]): (m, int(n)) for k, m, n in zip(names, means, counts)}
        ctrl = {c: m for (p, c), (m, _) in table.items() if p == control}
        delta, n_cells = {}, {}
        for (p, c), (m, n) in sorted(table.items()):
            if p == control:
                continue
            if c not in ctrl:
                log.info("no control cells for context %r in the training data: its effects are unknown", c)
                continue
            delta[(p, c)] = m - ctrl[c]
            n_cells[(p, c)] = n
        return cls(genes, MappingProxyType(delta), MappingProxyType(n_cells), cells=data,
                   aliases=MappingProxyType(dict(aliases or {})), control=control,
                   typed=MappingProxyType(dict(typed or {})))

    @cached_property
    def singles(self) -> dict[Target, np.ndarray]:
        """:attr:`delta`, and each single's under its one part's name too (``"KLF1+ctrl"`` as ``"KLF1"``): what a
        pair's parts are looked up in."""
        out = dict(self.delta)
        for (q, c), d in self.delta.items():
            parts = _components(self, q)
            if len(parts) == 1:
                out.setdefault((parts[0], c), d)
        return out

    @cached_property
    def vocabulary(self) -> Vocabulary:
        """The genes, looked up as everywhere else (ignoring case and an Ensembl version suffix)."""
        from ..sentences import Vocabulary

        return Vocabulary(tuple(str(g) for g in self.genes))

    def genetic(self, label: str) -> bool:
        """Whether ``label`` may be a knockout, knockdown or activation: its typed form (:attr:`typed`) where the
        cells say it, else the label as written, which is not where it names a drug or cytokine (``"drug:X"``) or a
        dose (``"IFNG@10"``: a knockout takes none, so a dosed condition is a drug's or a cytokine's, named by its
        gene or not). A plain label without a dose (``"STAT1"``) may be."""
        if label in self.typed:
            try:
                q = parse(self.typed[label])
            except PerturbationError:
                return False
            # (a plain label, as a kind="label" model types a knockout 'STAT2', may be one: as the untyped path reads it)
            return all(x.kind in GENETIC or x.kind == "label" for x in parts_of(q)) and bool(parts_of(q))
        name, dose, _ = condition_parts(label)
        if dose is not None:
            return False
        try:
            q = parse(name)
        except PerturbationError:
            return True  # (a label the typed syntax cannot read: as plain as before)
        return all(x.kind in GENETIC or x.kind == "label" for x in parts_of(q))

    def gene_index(self, name: str) -> int | None:
        """The gene a perturbation's part names (``"STAT1"``), looked up as everywhere else (case, Ensembl version
        suffix, then the aliases), or ``None`` when it is not a gene here."""
        name = self.aliases.get(str(name).upper(), str(name))
        i = int(self.vocabulary.ids([name], missing="mark")[0])
        return i if i >= 0 else None

    def response_to(self, gene: int, context: str, *, without: str | None = None) -> np.ndarray:
        """Each gene's least-squares slope on gene ``gene`` over the training cells of ``context``, times that
        gene's standard deviation: how every gene moves with a one-standard-deviation change of it (its own entry
        is its standard deviation). ``without``: a label whose cells are left out (the target of a prediction,
        which a baseline never learns from). Zeros where the gene does not vary there."""
        if self.cells is None:
            raise DataError("These effects were built without their cells; use Effects.from_prepared.")

        def moments(rows: np.ndarray, key: tuple) -> tuple[int, np.ndarray, np.ndarray]:
            """(cells, per-gene sums, cross-products with gene ``gene``) of ``rows``, cached under ``key``."""
            if key not in self._cache:
                X = self.cells.X[rows]
                x = np.asarray(X[:, gene].toarray()).ravel() if hasattr(X, "toarray") else np.asarray(X[:, gene])
                self._cache[key] = (len(rows), np.asarray(X.sum(axis=0), dtype=np.float64).ravel(),
                                    np.asarray(X.T @ x.astype(np.float64), dtype=np.float64).ravel())
            return self._cache[key]

        in_ctx = self.cells.contexts == context
        n, total, cross = moments(np.flatnonzero(in_ctx), ("moments", context, gene))
        if without is not None:
            mine = in_ctx & (self.cells.labels == without)
            if mine.any():
                m, t, c = moments(np.flatnonzero(mine), ("moments", context, gene, without))
                n, total, cross = n - m, total - t, cross - c
        if n < 3:
            return np.zeros(len(self.genes))
        return regression_response((cross - total * total[gene] / n) / (n - 1), gene)


def regression_response(cov_column: np.ndarray, gene: int) -> np.ndarray:
    """How every gene moves with a one-standard-deviation change of gene ``gene``: its column of the covariance
    matrix over its standard deviation (each gene's least-squares slope on it, times its standard deviation; its
    own entry is its standard deviation). Zeros where it does not vary."""
    col = np.asarray(cov_column, dtype=np.float64)
    return col / np.sqrt(col[gene]) if col[gene] > 1e-12 else np.zeros_like(col)


def coupling(deltas: np.ndarray, fitted: np.ndarray, responses: np.ndarray) -> float | None:
    """The one factor ``a`` of :func:`coexpression`: least squares of ``delta - rest ~ a * response`` over the
    ``fitted`` rows of ``deltas`` (perturbations x genes: every perturbation the baseline may learn from; ``rest`` is
    the mean delta of the others), ``responses`` holding the :func:`regression_response` of each fitted row's gene.
    ``None`` with fewer than 2 fitted rows or no response at all."""
    if len(fitted) < 2:
        return None
    D = np.asarray(deltas, dtype=np.float64)
    rest = (D.sum(axis=0)[None, :] - D[fitted]) / (len(D) - 1)
    den = float((responses * responses).sum())
    return float(((D[fitted] - rest) * responses).sum()) / den if den > 0 else None


def _components(effects: Effects, perturbation: str) -> list[str]:
    """A label's parts, without one naming the control (``"KLF1+ctrl"``, as GEARS writes a single, is KLF1; the
    data's own control label too, as training reads it)."""
    return label_parts(perturbation, (effects.control,))


# --------------------------------------------------------------------------- #
# The delta rules: (effects, target) -> predicted delta, or None when not predictable
# --------------------------------------------------------------------------- #
def _delta_nochange(effects: Effects, target: Target) -> np.ndarray | None:
    return np.zeros(len(effects.genes))


def _delta_meanshift(effects: Effects, target: Target) -> np.ndarray | None:
    p, c = target
    others = [d for (q, cc), d in effects.delta.items() if q == p and cc != c]
    return np.mean(others, axis=0) if others else None


def _delta_pertmean(effects: Effects, target: Target) -> np.ndarray | None:
    p, c = target
    others = [d for (q, cc), d in effects.delta.items() if cc == c and q != p]
    return np.mean(others, axis=0) if others else None


class Unpredictable(Exception):
    """Raised by a delta rule for a target it is meant for but cannot predict, with why (a pair whose part was never
    measured alone): :func:`_predict` skips it with a warning that says so, where a target the rule is not for (a
    single, to :func:`additive`) is skipped with a note in the log."""


def _delta_additive(effects: Effects, target: Target) -> np.ndarray | None:
    """effect(A) + effect(B) for ``"A+B"``, whatever the order of its parts. A dosed pair's condition, ``"A+B@1,24h"``
    (one dose and time for the pair, as the data names it), sums each part at the quantities it takes: a part
    measured at that dose and time (a drug: ``A@1,24h``) at them; a part never measured at a dose (a knockout) at
    that time alone (``B@,24h``) where it was measured so, else as it is (``B``); a drug's dose is never a knockout's.
    Parts written with doses of their own (``"A@1+B@10"``) are read as written. A pair with a part measured at none of
    these raises :class:`Unpredictable`, naming it; a single is None."""
    p, c = target
    singles = effects.singles
    found: list[np.ndarray] = []
    lacking: list[str] = []

    def look(keys: list[str], said: str) -> None:  # the first of a part's readings measured here, else it is lacking
        hit = next((k for k in keys if (k, c) in singles), None)
        if hit is None:
            lacking.append(said)
        else:
            found.append(singles[(hit, c)])

    shared = shared_suffix(p)
    if shared is not None:
        label, quantity = shared
        parts = _components(effects, label)
        if len(parts) < 2:
            return None
        _, _, time = quantity.partition(",")
        for g in parts:
            names = [g, *_target_of(g)]  # ('ko:TF06' is measured alone as 'TF06')
            alone = [_dose_of(q) for q, cc in singles if cc == c and _dose_of(q)[0] in names]
            dosed = any(dose is not None for _, dose, _ in alone)
            def forms(n: str) -> list[str]:  # a drug at the pair's dose and time; a knockout at its time, or alone
                return [f"{n}@{quantity}"] if dosed else [*([f"{n}@,{time}"] if time.strip() else []), n]

            look(list(dict.fromkeys(canonical_condition(t) for n in names for t in forms(n))),
                 " or ".join(repr(canonical_condition(t)) for t in forms(names[-1])) if alone
                 else f"{names[-1]!r} (at any dose or time)")
    else:
        parts = _components(effects, p)
        if len(parts) < 2:
            return None
        for g in parts:
            look([g, *_target_of(g)], repr([g, *_target_of(g)][-1]))
    if lacking:
        raise Unpredictable(f"no cells of {'; '.join(lacking)} alone in context {c!r}")
    return np.sum(found, axis=0)


def _target_of(part: str) -> list[str]:
    """A typed part's bare name, where it is written typed (``"ko:TF06"`` -> ``["TF06"]``: the data's label of the
    knockout alone), else none."""
    if ":" not in part:
        return []
    try:
        q = parse(part)
    except PerturbationError:
        return []
    return [q.target] if isinstance(q, Perturbation) and q.kind not in ("label", "control") and q.target != part \
        else []


def _dose_of(condition: str) -> tuple[str, float | None, float | str]:
    """``(label, dose, time)`` of a condition as the data names it (``"drugA@10,24h"`` -> ``("drugA", 10.0,
    24.0)``); a dose with a unit is put on its family's scale (``"drugA@100nM"`` -> 0.1, in uM), as
    :func:`~virtualcell.perturbations.read_quantity` and ``dose_on_one_scale`` read every dose; None where it has
    none or it is not a number. The time is in hours (``"1d"`` -> 24.0, so that it meets ``"24h"``), ``""`` where
    there is none, and the text as written where it is no time."""
    label, dose, time = condition_parts(condition)
    read = read_quantity(dose) if dose else None
    time = time or ""
    when = read_quantity(time) if time else None
    per = hours_per(when[1]) if when is not None else None
    return (label, None if read is None else read[0] * dose_on_one_scale(read[1])[1],
            float(f"{when[0] * per:.12g}") if per is not None else time)


def _delta_dose(effects: Effects, target: Target) -> np.ndarray | None:
    """The same agent's measured effects at its *other* doses (same context, same time), interpolated linearly in
    log10 dose (``_stats.log_dose_interpolation``); None for a target without a dose, or an agent measured at no
    other dose."""
    p, c = target
    label, dose, time = _dose_of(p)
    if dose is None:
        return None
    measured = {}
    for (q, cc), d in effects.delta.items():
        lab, qd, qt = _dose_of(q)
        if cc == c and q != p and lab == label and qt == time and qd is not None:
            measured[qd] = d
    return log_dose_interpolation(measured, dose)


def _delta_linear(
    effects: Effects, target: Target, *, ridge: float = 0.1, n_components: int = 10
) -> np.ndarray | None:
    """Ridge regression of measured deltas on perturbation features (Ahlmann-Eltze et al. 2025).

    Training columns are every measured (perturbation, context) except the target. The
    features of a perturbation are

    * one-hots of its component genes (``"A+B"`` -> A and B) among those seen in training,
    * the sum of its components' *gene embeddings*: their rows in the top ``n_components``
      principal components of the training deltas (genes x perturbations), when the
      perturbed gene is a measured gene,
    * a one-hot of its context.

    ``delta = mean + B (x - mean_x)`` with ``B`` solved in closed form with an L2 penalty
    ``ridge``. A target with no known feature falls back to the mean training delta.
    """
    cols = [k for k in effects.delta if k != target]
    if not cols:
        return None
    Y = np.stack([effects.delta[k] for k in cols], axis=1).astype(np.float64)  # genes x n
    y_mean = Y.mean(axis=1)
    Yc = Y - y_mean[:, None]
    U, S, _ = np.linalg.svd(Yc, full_matrices=False)
    k = int(min(n_components, np.sum(S > 1e-8 * max(S.max(initial=0.0), 1e-12))))
    G = U[:, :k] * np.sqrt(len(effects.genes))  # genes x k, entries of order 1
    comps = sorted({g for q, _ in cols for g in _components(effects, q)})
    contexts = sorted({c for _, c in cols})

    def features(p: str, c: str) -> np.ndarray:
        parts = _components(effects, p)
        onehot = np.array([parts.count(g) for g in comps], dtype=np.float64)
        emb = np.zeros(k)
        for g in parts:
            row = effects.gene_index(g)
            if row is not None:
                emb += G[row]
        ctx = np.array([c == x for x in contexts], dtype=np.float64)
        return np.concatenate([onehot, emb, ctx])

    X = np.stack([features(*key) for key in cols], axis=1)  # d x n
    x_mean = X.mean(axis=1)
    Xc = X - x_mean[:, None]
    # dual form: B = Yc (Xc^T Xc + ridge I)^-1 Xc^T, an n x n solve
    alpha = np.linalg.solve(Xc.T @ Xc + ridge * np.eye(Xc.shape[1]), (features(*target) - x_mean) @ Xc)
    return y_mean + Yc @ alpha


def _single_gene(effects: Effects, perturbation: str) -> int | None:
    """The measured gene that ``perturbation`` perturbs alone (``"STAT1"``, ``"STAT1@,24h"``), or ``None``: also for
    a drug or cytokine named by a gene (``"IFNG@10"``, :meth:`Effects.genetic`), which does not perturb that gene as
    a knockout would."""
    if not effects.genetic(perturbation):
        return None
    label = perturbation.rpartition("@")[0] or perturbation
    parts = _components(effects, label)
    return effects.gene_index(parts[0]) if len(parts) == 1 else None


def _delta_coexpression(effects: Effects, target: Target) -> np.ndarray | None:
    """``pertmean + a * response_to(gene)``: the mean effect of the other perturbations of the context, plus how
    the genes move with the perturbed gene across the context's training cells (:meth:`Effects.response_to`).
    The factor ``a`` (how many standard deviations of its gene a perturbation moves, in effect) is one least-squares
    fit over the context's other single-gene perturbations of a measured gene, each against the mean effect of the
    rest; ``None`` (left out) for a perturbation that is not one measured gene, or a context with fewer than two
    such perturbations to fit on."""
    p, c = target
    gene = _single_gene(effects, p)
    base = _delta_pertmean(effects, target)
    if gene is None or base is None:
        return None
    others = [(q, d) for (q, cc), d in effects.delta.items() if cc == c and q != p]
    fitted = [(i, g) for i, (q, _) in enumerate(others) for g in [_single_gene(effects, q)] if g is not None]
    if len(fitted) < 2:
        return None
    a = coupling(np.stack([d for _, d in others]), np.array([i for i, _ in fitted]),
                 np.stack([effects.response_to(g, c, without=p) for _, g in fitted]))
    if a is None:
        return None
    return base + a * effects.response_to(gene, c, without=p)


# --------------------------------------------------------------------------- #
# From deltas to a predicted AnnData
# --------------------------------------------------------------------------- #
def _predict(
    rule: Callable[[Effects, Target], np.ndarray | None],
    name: str,
    train: ad.AnnData,
    *,
    baseline: ad.AnnData | None,
    targets: Iterable[Target] | None,
    perturbation_key: str | None,
    control: str | Sequence[str] | None,
    context_key: str | None,
    max_cells: int | None,
    seed: int,
    nonnegative: bool = False,
) -> ad.AnnData:
    import anndata as ad

    from ..sentences import Vocabulary, require_in_memory, target_aliases

    require_in_memory(train, "The training cells (train=)")
    if baseline is not None:
        require_in_memory(baseline, "The baseline cells (baseline=)")
    contract = resolve_contract(train, perturbation_key=perturbation_key, control=control, context_key=context_key)
    inputs = {"train": train} if baseline is None else {"train": train, "baseline": baseline}
    genes, _, inputs = shared_genes(inputs)
    train, baseline = inputs["train"], inputs.get("baseline")
    data = prepare(train, contract, genes, name="training")
    stored = (train.uns.get(UNS_KEY) or {}).get("gene_aliases")  # what evaluate found in the measured data's var
    aliases = dict(stored) if stored is not None else target_aliases(
        train, sorted(set(data.labels) - {contract.control}), Vocabulary(tuple(str(g) for g in genes)))
    # each predicted label's typed form, as evaluate hands it (those with training cells and those held out whole)
    typed = dict((train.uns.get(UNS_KEY) or {}).get("typed_forms") or {})
    if "perturbation_typed" in train.obs.columns:  # (predicted cells, or evaluate's: each label's typed form; '' none)
        typed.update({label: form for label, form in zip(contract.conditions(train).astype(str),
                                                         train.obs["perturbation_typed"].astype(str)) if form})
    effects = Effects.from_prepared(data, genes, contract.control, aliases, typed)
    base = data if baseline is None else prepare(baseline, contract, genes, name="baseline")
    base_ctrl = base.labels == contract.control
    if not base_ctrl.any():
        raise DataError(
            f"The baseline AnnData has no control cells (label {contract.control!r}). Pass the control cells "
            "fed to the model, e.g. the first value of split_controls()."
        )
    if targets is None:
        targets = sorted(set(effects.delta))
    rng = np.random.default_rng(seed)
    blocks, obs, skipped, unpredictable = [], [], [], []
    contexts = sorted(set(base.contexts[base_ctrl]))
    ctrl_cells = {c: base.dense(base_ctrl & (base.contexts == c)) for c in contexts}
    for c in contexts:  # the control population itself comes along as the prediction's control
        blocks.append(ctrl_cells[c])
        obs += [(contract.control, c)] * len(ctrl_cells[c])
    for p, c in targets:
        if c not in ctrl_cells:
            skipped.append((p, c, "no baseline control cells in this context"))
            continue
        try:
            d = rule(effects, (p, c))
        except Unpredictable as why:  # a target the rule is for but cannot predict: said at WARNING, with why
            unpredictable.append((p, c, str(why)))
            skipped.append((p, c, f"{name} cannot predict it: {why}"))
            continue
        if d is None:
            skipped.append((p, c, f"{name} cannot predict it from the training data"))
            continue
        cells = ctrl_cells[c]
        if max_cells is not None and len(cells) > max_cells:
            sub = cells[np.sort(rng.choice(len(cells), max_cells, replace=False))]
            # keep the mean exactly control + delta (in float64: float32 means differ by ~1e-5,
            # which the metrics would read as a tiny but non-zero delta of `nochange`)
            d = d + (cells.mean(axis=0, dtype=np.float64) - sub.mean(axis=0, dtype=np.float64))
            cells = sub
        shifted = calibrated(cells, d[None, :]) if nonnegative else cells + d[None, :]
        blocks.append(shifted.astype(np.float32))
        obs += [(p, c)] * len(cells)
    if unpredictable:
        log.warning("%s cannot predict %d of its targets, which it leaves out: %s. Measure each part alone (at the "
                    "pair's dose and time, where dosed), or pass training cells that hold them (train=, --train).",
                    name, len(unpredictable), "; ".join(f"{p} in {c}: {why}" for p, c, why in unpredictable[:3])
                    + (f"; ... and {len(unpredictable) - 3} more" if len(unpredictable) > 3 else ""))
    said = {(p, c) for p, c, _ in unpredictable}
    quiet = [f"{p} in {c}" for p, c, _ in skipped if (p, c) not in said]  # (not meant for it: a single, to additive)
    if quiet:
        log.info("%s skipped %d targets: %s", name, len(quiet), preview(quiet, 5))
    frame = pd.DataFrame(obs, columns=[contract.perturbation_key, "_context"])
    if contract.context_key is not None:
        frame = frame.rename(columns={"_context": contract.context_key})
    else:
        frame = frame.drop(columns="_context")
    frame.index = [f"{name}-{i}" for i in range(len(frame))]
    out = ad.AnnData(np.concatenate(blocks, axis=0), obs=frame, var=pd.DataFrame(index=genes.astype(str)))
    # its labels are conditions ("drugA@10") already
    replace(contract, dose_key=None, time_key=None, dose_unit_key=None).attach(out)
    out.uns[UNS_KEY]["baseline"] = name
    out.uns[UNS_KEY]["skipped"] = [f"{p} in {c}: {why}" for p, c, why in skipped]
    return out


_DOC = """

    Parameters
    ----------
    train
        Measured data with control cells: the effects the baseline learns from. The
        target itself is never used to predict it.
    baseline
        The control cells to add the predicted delta to (the population fed to the model,
        e.g. the first value of :func:`~virtualcell.evaluate.split_controls`); by default
        the control cells of ``train``.
    targets
        ``(perturbation, context)`` pairs to predict; by default every measured one in ``train``.
        Without a context column the context is ``"all"``.
    perturbation_key, control, context_key
        The data contract; defaults to the one ``train`` carries.
    max_cells
        At most this many predicted cells per target (a seeded subsample of the control
        cells, re-centred so that its mean is exactly control + delta); ``None`` for all.
    seed
        Seed of that subsample.
    nonnegative
        Make the shifted cells non-negative as the Simulator makes its predictions
        (:func:`virtualcell._stats.calibrated`: clipped at 0, each gene rescaled to its unclipped
        shifted mean, or 0 where that is negative). By default the cells are ``control + delta`` as the
        field defines the baseline, negative wherever a cell expresses less than the gene's drop;
        the means agree wherever they are not below 0; the distributions (E-distance) differ.

    Returns
    -------
    AnnData
        The baseline control cells (labelled with the control label) and, per predicted
        target, control cells shifted by the predicted delta (labelled with the perturbation).

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> pred = vc.evaluate.baselines.{name}(ref, baseline=base, max_cells=50)
    """


def _make(rule: Callable[..., np.ndarray | None], name: str, summary: str) -> Callable[..., ad.AnnData]:
    def baseline_fn(
        train: ad.AnnData,
        *,
        baseline: ad.AnnData | None = None,
        targets: Iterable[Target] | None = None,
        perturbation_key: str | None = None,
        control: str | Sequence[str] | None = None,
        context_key: str | None = None,
        max_cells: int | None = 500,
        seed: int = 0,
        nonnegative: bool = False,
    ) -> ad.AnnData:
        return _predict(rule, name, train, baseline=baseline, targets=targets, perturbation_key=perturbation_key,
                        control=control, context_key=context_key, max_cells=max_cells, seed=seed,
                        nonnegative=nonnegative)

    baseline_fn.__name__ = baseline_fn.__qualname__ = name
    baseline_fn.__doc__ = summary + _DOC.replace("{name}", name)
    baseline_fn.__module__ = __name__
    return baseline_fn


nochange = _make(_delta_nochange, "nochange", "Predict no change: the control cells themselves.")
meanshift = _make(
    _delta_meanshift, "meanshift",
    "Predict control + the mean measured effect of the same perturbation in the other contexts.",
)
pertmean = _make(
    _delta_pertmean, "pertmean",
    "Predict control + the mean measured effect of the other perturbations in the same context.",
)
additive = _make(
    _delta_additive, "additive",
    "Predict a combination ``A+B`` as control + effect(A) + effect(B), measured alone in the same context.",
)
linear = _make(
    _delta_linear, "linear",
    "Predict control + a ridge regression of measured deltas on perturbation features.\n\n"
    "    Features are one-hots of the component genes, the components' rows in the PCA of the\n"
    "    training deltas (when the perturbed gene is measured) and a one-hot of the context;\n"
    "    see Ahlmann-Eltze, Huber & Anders, Nat Methods (2025). Ridge penalty 0.1, 10 components.",
)

dose = _make(
    _delta_dose, "dose",
    "Predict a drug or cytokine at a dose as control + its measured effects at its other doses in the same\n"
    "    context and time, interpolated linearly in log10 dose (beyond the measured doses, the nearest one's).\n"
    "    The simple reference for a dose a model never trained on (a titration's in-between doses).",
)

coexpression = _make(
    _delta_coexpression, "coexpression",
    "Predict a perturbation of one measured gene as control + pertmean + how the genes move with that gene.\n\n"
    "    Every gene's regression on the perturbed gene across the training cells of the context (its slope\n"
    "    times the perturbed gene's standard deviation), scaled by one factor fitted on the context's other\n"
    "    single-gene perturbations against the mean effect of the rest (least squares). A drug or cytokine\n"
    "    named by a gene (``IFNG@10``, or typed so in ``obs['perturbation_typed']``) is no perturbation of it:\n"
    "    neither predicted nor fitted on.",
)

BASELINES: Mapping[str, Callable[..., ad.AnnData]] = MappingProxyType(
    {f.__name__: f for f in (nochange, meanshift, pertmean, additive, linear, coexpression, dose)}
)
