"""Data handling for the validation layer: keys, expression matrices, group means, control splits.

Everything here is numpy/scipy/pandas; nothing imports torch or pertpy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._stats import noise_corrected_sq_norm, signed_root, unbiased_var
from ..contract import UNS_KEY, DataContract, one_reading
from ..errors import ContractError, DataError, VirtualCellWarning, close_matches, preview, user_stacklevel
from ..perturbations import canonical_condition, condition_in_units, split_label, unordered_label
from ..sentences import detect_scale, log_normalize, normalization_label, require_in_memory

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

log = logging.getLogger("virtualcell.evaluate")

__all__ = ["split_controls", "effect_size", "resolve_contract", "MIN_SHARED"]


# --------------------------------------------------------------------------- #
# Keys
# --------------------------------------------------------------------------- #
def resolve_contract(
    adata: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    context_key: str | None = None,
    require_control: bool = True,
    measured: bool = True,
) -> DataContract:
    """The data contract to use: explicit keys over the one ``adata`` carries, over the defaults.

    ``perturbation_key``/``control``/``context_key`` given here win; the rest (and the dose and time
    columns) comes from ``adata.uns["virtualcell"]["contract"]`` when there is one, else from
    :class:`~virtualcell.DataContract`'s defaults (``"perturbation"`` / ``"control"``, no context). ``control``
    may name several labels of control cells (``["NT_1", "NT_2"]``), all read as the first
    (:attr:`DataContract.other_controls`). ``measured``: ``adata`` holds measured cells, so a dose or time column its
    stored contract names and its obs lacks is refused (:func:`refuse_absent_quantities`: left out, the doses or times
    of a label would pool into one group); otherwise (predicted cells, whose labels name their conditions already)
    such a column is left out.
    """
    try:
        stored = DataContract.from_adata(adata)
    except ContractError:
        stored = DataContract()
    if measured:
        refuse_absent_quantities(adata, stored)
    if control is not None and not isinstance(control, str) and not isinstance(control, Iterable):
        control = str(control)  # one label given as a number (control=0 of integer labels), as DataContract reads it
    if control is None or (isinstance(control, str) and control == stored.control):
        control, others = stored.control, stored.other_controls
    elif isinstance(control, str):
        others = ()
    else:
        labels = [str(x) for x in control]
        if not labels:
            raise ContractError("control names no label: give the label of the control cells, or a list of them.")
        control, others = labels[0], tuple(labels[1:])
    contract = DataContract(
        perturbation_key=perturbation_key or stored.perturbation_key,
        control=control,
        context_key=context_key if context_key is not None else stored.context_key,
        dose_key=stored.dose_key, time_key=stored.time_key,  # a drug's doses stay conditions of their own
        other_controls=others, dose_unit_key=stored.dose_unit_key,  # ... read in their units
    ).without_quantities_absent_from(adata)
    contract.validate(adata, require_control=require_control)
    return contract


def prediction_context_key(pred: ad.AnnData | None) -> str | None:
    """The obs column a prediction's cells carry their context in: ``uns['virtualcell']['context_key']`` (the model's
    context column, as :meth:`~virtualcell.simulator.SimulationResult.to_anndata` and ``virtualcell predict``
    record it), else its stored contract's; ``None`` where it records none, or its obs lacks that column (each column
    of a composite ``"cell_type+patient"``)."""
    if pred is None:
        return None
    record = pred.uns.get(UNS_KEY) or {}
    key = record.get("context_key") if isinstance(record, Mapping) else None
    if not key:
        try:
            key = DataContract.from_adata(pred).context_key
        except ContractError:
            key = None
    if not key or not DataContract(context_key=str(key)).has_context(pred):
        return None
    return str(key)


def context_of_prediction(pred: ad.AnnData | None, contract: DataContract,
                          measured: Mapping[str, ad.AnnData | None]) -> tuple[DataContract, str | None]:
    """``contract`` (resolved from the measured cells, :func:`resolve_contract`) with the prediction's context column
    (:func:`prediction_context_key`) where it names none and every input of ``measured`` (``{"real": ..., "baseline":
    ..., "train": ...}``, ``None`` for one not given) holds that column; and what was done, for the table's record.

    Without it every context pooled into one group ``"all"``: a prediction from typeA cells was scored against
    measured typeB cells as one context, without a word. Where an input lacks the column and the prediction's
    cells and the measured cells are of more than one context in all, a warning names them and the fix; the contexts
    are pooled then, as before. A context column given or stored (``context_key=``, ``--context-key``, the measured
    file's contract) is kept as it is.
    """
    key = prediction_context_key(pred) if contract.context_key is None else None
    if key is not None and key in {contract.perturbation_key, contract.dose_key, contract.time_key}:
        key = None  # (the measured file's perturbation, dose or time column: no context)
    if key is None:
        return contract, None
    keyed = replace(contract, context_key=key)
    given = {name: a for name, a in measured.items() if a is not None}
    lacking = [name for name, a in given.items() if not _readable(keyed, a)]
    real = given.get("real")
    predicted = sorted(set(_contexts_or_empty(keyed, pred)))
    there = sorted(set(_contexts_or_empty(keyed, real))) if real is not None else []
    if not lacking:  # (contexts that match nowhere are then refused by name, as a stored context column's are)
        said = (f"each cell's context read from obs[{key!r}], the prediction's context column "
                "(uns['virtualcell']['context_key']), as the measured file names no context column of its own")
        log.info("evaluate: %s", said)
        return keyed, said
    import warnings

    if len(set(predicted) | set(there)) < 2:  # one context in all: pooling it changes nothing
        return contract, None
    names = ["{} cells ({}".format(*INPUT_NAMES[n].split(" (", 1)) for n in lacking]  # measured cells (real=, --real)
    why = (f"the {' and '.join(names)} {'has' if len(names) == 1 else 'have'} no readable column {key!r} (absent, or "
           "with missing values)")
    fix = (f"Give {'it' if len(names) == 1 else 'them'} the column {key!r} (each cell's context: it is then read "
           "from there), or subset " + (f"the prediction to the context the measured cells are of "
                                        f"(pred[pred.obs[{key!r}] == CONTEXT])." if len(predicted) > 1 else
                                        "the measured cells to the prediction's context."))
    said = (f"the prediction's cells are of {len(predicted)} context{'s' if len(predicted) != 1 else ''} in "
            f"obs[{key!r}] (its uns['virtualcell']['context_key']: {preview(predicted, 6)}), but {why}, so every "
            "context is pooled into one group 'all' and each predicted group is scored against measured cells of "
            "other contexts too")
    warnings.warn(said[0].upper() + said[1:] + ". " + fix, VirtualCellWarning, stacklevel=user_stacklevel())
    return contract, said


def _readable(contract: DataContract, adata: ad.AnnData) -> bool:
    """Whether ``adata`` holds ``contract``'s context column(s), every cell with a value."""
    return contract.has_context(adata) and not any(adata.obs[c].isna().any() for c in contract.context_columns(adata))


def _contexts_or_empty(contract: DataContract, adata: ad.AnnData | None) -> list[str]:
    """``contract.contexts(adata)`` where :func:`_readable`, else none."""
    return [] if adata is None or not _readable(contract, adata) else list(contract.contexts(adata))


def refuse_absent_quantities(adata: ad.AnnData, stored: DataContract, *, name: str = "measured",
                             python: str = "dataclasses.replace(DataContract.from_adata(real), {role}_key='COLUMN')"
                                           ".attach(real)") -> None:
    """Refuse measured cells whose stored contract names a dose or time column their obs lacks (renamed or dropped
    after the contract was attached): without it the cells of one label at several doses or times would pool into
    one group, 6 h with 24 h, and be scored as one. The message names the column, the closest obs columns and the
    fix (the evaluate CLI's ``--dose-key``/``--time-key``, or ``python``, the Python call that names it, ``{role}``
    standing for ``dose`` or ``time``)."""
    for role, key in (("dose", stored.dose_key), ("time", stored.time_key)):
        if key is None or key in adata.obs.columns:
            continue
        hint = close_matches(key, adata.obs.columns)
        did = f" (did you mean {preview(hint, 3)}?)" if hint else ""
        raise ContractError(
            f"The {name} cells' stored contract (uns['virtualcell']['contract']) names the {role} column {key!r}, "
            f"which their obs does not hold{did}; obs columns: {preview(adata.obs.columns, 12) or 'none'}. Left out, "
            f"the cells of one perturbation at several {role}s would pool into one group and be scored as one. Name "
            f"the column that holds each cell's {role} (evaluate CLI: --{role}-key COLUMN; Python: "
            f"{python.format(role=role)}), or, where every perturbation was measured at one {role}, store the "
            f"contract without it ({role}_key=None).")


def names_conditions(adata: ad.AnnData, contract: DataContract) -> bool:
    """Whether ``adata`` looks like predicted cells, whose labels name their conditions already (``"drugA@10,24h"``):
    a prediction's record (``uns['virtualcell']['model']``, ``obs['perturbation_typed']``) or a label with a dose or
    time. Its contract's dose and time columns are then not needed
    (:meth:`~virtualcell.contract.DataContract.without_quantities_absent_from`)."""
    record = adata.uns.get(UNS_KEY) or {}
    if (isinstance(record, Mapping) and record.get("model")) or "perturbation_typed" in adata.obs.columns:
        return True
    if contract.perturbation_key not in adata.obs.columns:
        return False
    return any("@" in str(x) for x in adata.obs[contract.perturbation_key].astype(str).unique())


# --------------------------------------------------------------------------- #
# Expression matrices
# --------------------------------------------------------------------------- #
def check_values(adata: ad.AnnData, *, name: str, allow_negative: bool = False) -> None:
    """Refuse an input that is empty or holds NaN, infinite or (unless allowed) negative values.

    ``name`` says which input it is, as the user passed it (e.g. ``"real (--real)"``).
    """
    X = adata.X
    if X is None or adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"The {name} AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes) or has no X. "
            "Evaluate needs expression in adata.X for at least one cell and one gene."
        )
    values = X.data if sp.issparse(X) else np.asarray(X)
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        raise DataError(
            f"The {name} expression holds {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values. "
            "Fix or drop those cells before evaluating."
        )
    if not allow_negative and values.size and values.min() < 0:
        raise DataError(
            f"The {name} expression holds {int((values < 0).sum())} negative values (min {float(values.min()):.3g}). "
            "Expression must be raw counts or log-normalized values (>= 0), not scaled or centered data: put the "
            "values saved before sc.pp.scale back in X and write the file again (adata.X = adata.layers['counts'], "
            "or adata = adata.raw.to_adata())."
        )


def expression(adata: ad.AnnData, *, name: str, allow_negative: bool = True,
               total: float | None = None) -> tuple[sp.csr_matrix, str]:
    """``adata.X`` as float32 CSR on the log1p-normalized scale, and what was done to it.

    Raw counts (every value a whole number) are normalized with
    :func:`virtualcell.sentences.log_normalize`; the second value is
    :func:`virtualcell.sentences.normalization_label` of the input's scale. NaN and inf are refused. Negative values
    are allowed with ``allow_negative`` (a baseline made by shifting control cells can go
    below zero); user inputs are checked with :func:`check_values` first, which refuses them. ``total``: the per-cell
    total counts go to, where a prediction is on a log1p scale of another than 1e4 (:func:`prediction_total`).
    """
    check_values(adata, name=name, allow_negative=allow_negative)
    X = adata.X
    X = sp.csr_matrix(X, dtype=np.float32) if sp.issparse(X) else sp.csr_matrix(np.asarray(X, dtype=np.float32))
    values = X.data
    if values.size and values.min() >= 0:
        try:
            scale = detect_scale(X)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
        if scale == "counts":
            return (log_normalize(X, "counts", total=total),
                    normalization_label("counts") if total is None else normalization_label("log1p"))
    return X, normalization_label("log1p")


def prediction_total(pred: ad.AnnData | None) -> float | None:
    """The per-cell total a prediction's values are log1p of, where its model trained on log1p values at a recorded
    total (``uns['virtualcell']``: ``normalization`` ``as_is_log1p``, ``scale_total``); else None (1e4). Measured
    counts are normalized to it, as the Simulator put its baseline's (counts normalized to 1e4 scored a model trained
    on scanpy's layout against cells on another scale than its predictions)."""
    record = (pred.uns.get(UNS_KEY) or {}) if pred is not None else {}
    total = float(record.get("scale_total") or 0.0)
    return total if record.get("normalization") == normalization_label("log1p") and total > 0 else None


def _matrix(adata: ad.AnnData) -> Any:
    """``adata.X`` as it is (sparse or dense), for a copy on other genes."""
    return adata.X if sp.issparse(adata.X) else np.asarray(adata.X)


def onto_prediction_scale(named: dict[str, ad.AnnData], genes: pd.Index) -> tuple[dict[str, ad.AnnData], list[str]]:
    """The measured inputs of ``named`` (all but ``"pred"``) on one scale with the prediction, and the keys of those
    moved.

    Raw counts are normalized to 1e4 per cell over ``genes`` (:func:`prepare`), and a prediction that records
    ``log1p_cp10k`` (``uns['virtualcell']['normalization']``: a model trained on raw counts, its cells on log1p of
    1e4 per cell over its genes) is on that scale too. Where either holds, a measured input of log1p values
    normalized to another total (scanpy's default, the median library) or over other genes goes onto 1e4 per cell
    over ``genes`` (:func:`~virtualcell.sentences.onto_cp10k`), as the Simulator put its baseline. Left as they were,
    every delta was taken between two scales (pearson_delta -0.03 against 0.46 for the same predictions scored against
    the cells given as counts). Measured inputs all of log1p values whose totals are far apart (``SCALE_APART``) are
    warned of, not moved (inputs of one normalization differ in total by their cells' make-up: cell lines, depth). The
    prediction itself is never moved (another tool's, recording nothing, may hold means of log values, whose totals
    read low); one of log1p values whose total is that far off the measured cells' is warned of. A prediction
    that records a model's own log1p total (``as_is_log1p``) leaves all as given (counts go onto its total,
    :func:`prediction_total`); inputs with negative values (a baseline shifted below zero) stay as they are.
    """
    import anndata as ad

    from ..sentences import SCALE_APART, TARGET_SUM, median_log1p_total, onto_cp10k

    pred = named.get("pred")
    recorded = ((pred.uns.get(UNS_KEY) or {}).get("normalization") if pred is not None else None)
    if recorded not in (None, normalization_label("counts")):
        return named, []
    scales, matrices, totals = {}, {}, {}
    for key, a in named.items():
        if a is None:
            continue
        X = sp.csr_matrix(_matrix(a), dtype=np.float32)[:, _positions(a, genes)]  # (as given: negatives too)
        if X.nnz and X.data.min() < 0:
            continue
        try:
            scales[key] = detect_scale(X) if X.nnz else "counts"
        except DataError as err:
            raise DataError(f"{INPUT_NAMES.get(key, key)}: {err}") from None
        matrices[key] = X
        if scales[key] == "log1p":
            totals[key] = median_log1p_total(X) or TARGET_SUM
    measured = [k for k in totals if k != "pred"]
    onto_1e4 = recorded is not None or "counts" in scales.values()
    if not onto_1e4 and measured and max(totals[k] for k in measured) > SCALE_APART * min(totals[k] for k in measured):
        # (not moved: inputs of one normalization differ in total by their cells' make-up, cell lines and depth)
        log.warning("The measured inputs' log1p values sum to medians of %s per cell on the linear scale: more than "
                    "%g-fold apart, they look normalized to different totals, and their deltas would compare two "
                    "scales. Give them normalized alike (or as raw counts).",
                    ", ".join(f"{INPUT_NAMES.get(k, k).split(' (')[0]} {totals[k]:.4g}" for k in measured), SCALE_APART)
    out, moved = dict(named), []
    for key in measured if onto_1e4 else []:
        if 0.99 <= totals[key] / TARGET_SUM <= 1.01:  # there already
            continue
        a = named[key]
        out[key] = ad.AnnData(X=onto_cp10k(matrices[key])[0], obs=a.obs, var=a.var.iloc[_positions(a, genes)],
                              uns=dict(a.uns))
        moved.append(key)
        log.info("%s: log1p values at a median total of %.4g per cell put onto 1e4", key, totals[key])
    if "pred" in totals and recorded is None:
        scale = TARGET_SUM if onto_1e4 else float(np.median([totals[k] for k in measured] or [TARGET_SUM]))
        if not 1 / SCALE_APART <= totals["pred"] / scale <= SCALE_APART:
            log.warning("The prediction's log1p values sum to a median of %.4g per cell on the linear scale and the "
                        "measured cells' to %.4g: more than %g-fold apart, the deltas compare two scales. Give the "
                        "prediction on the measured cells' scale (or as raw counts).", totals["pred"], scale,
                        SCALE_APART)
    return out, moved


# what the inputs of evaluate (and effect_size) are called in messages
INPUT_NAMES = {"real": "measured (real=, --real)", "pred": "predicted (pred=, --pred)",
               "baseline": "baseline (baseline=, --baseline)", "train": "training (train=)"}


def _positions(a: ad.AnnData, genes: pd.Index) -> np.ndarray:
    """The columns of ``a`` for ``genes`` (its own var_names, repeated names and all, as they are)."""
    return np.arange(a.n_vars) if a.var_names.equals(genes) else a.var_names.get_indexer(genes)


@dataclass(frozen=True)
class Prepared:
    """One AnnData reduced to what evaluation needs: normalized X on shared genes, labels, contexts."""

    X: sp.csr_matrix
    labels: np.ndarray
    contexts: np.ndarray
    normalization: str

    def mask(self, label: str, context: str) -> np.ndarray:
        return (self.labels == label) & (self.contexts == context)

    def dense(self, mask: np.ndarray) -> np.ndarray:
        return np.asarray(self.X[np.flatnonzero(mask)].toarray(), dtype=np.float32)


def controls_in(pred: Prepared, context: str, control: str, candidates: Sequence[str], method: str) -> bool:
    """Whether ``pred`` (a method's predicted cells, its control cells among them) has control cells in ``context``,
    which its deltas are measured from; where not, the log says so, a warning where it predicted groups measured
    there (a baseline file spelling its contexts otherwise left every group of theirs unscored without a word)."""
    here = pred.labels[pred.contexts == context]
    if (here == control).any():
        return True
    lost = sorted(set(here) & set(candidates))
    (log.warning if lost else log.info)(
        "The %s prediction has no control cells in context %r (check how each file spells its contexts; the "
        "controls' are %s), so %s not evaluated there.", method, context,
        preview(sorted(set(pred.contexts[pred.labels == control])), 4) or "none",
        f"its {len(lost)} predicted groups ({preview(lost, 4)}) are" if lost else "nothing is")
    return False


def prepare(adata: ad.AnnData, contract: DataContract, genes: pd.Index, *, name: str,
            dose_units: Mapping[str, str] | None = None, total: float | None = None) -> Prepared:
    """Keep ``genes`` of ``adata`` (in that order), normalize them and read labels and contexts. ``dose_units``: each
    agent's dose unit in the prediction's labels (``uns['virtualcell']['dose_units']``); a measured file's doses are
    named in those units (:func:`~virtualcell.perturbations.condition_in_units`), whichever units it holds.
    ``total``: the per-cell total raw counts are normalized to (:func:`prediction_total`; 1e4 by default)."""
    for key in (contract.perturbation_key, *contract.context_columns(adata)):
        if key not in adata.obs.columns:
            raise ContractError(
                f"The {name} AnnData has no obs column {key!r}. Give it the same perturbation and context "
                f"columns as the measured data (obs columns here: {preview(adata.obs.columns, 12) or 'none'})."
            )
    idx = adata.var_names.get_indexer(genes)
    if (idx < 0).any():  # pragma: no cover - genes is an intersection
        raise DataError(f"Internal error: {name} lacks genes {preview(genes[idx < 0])}.")
    # raw counts normalized over the genes compared, as the model's cells are over its genes: a prediction of 2,000
    # of a file's 9,000 genes and the measured file itself otherwise sit on two scales (MAE 0.02 for the same cells)
    X, norm = expression(adata[:, idx], name=name, total=total)
    labels = condition_labels(adata, contract, dose_units=dose_units)
    contexts = contract.contexts(adata)
    return Prepared(X.tocsr(), labels, np.asarray(contexts, dtype=object), norm)


def condition_labels(adata: ad.AnnData, contract: DataContract, *,
                     dose_units: Mapping[str, str] | None = None) -> np.ndarray:
    """Each cell's condition as a prediction's labels name it: its label with its dose and time (a drug's doses are
    groups of their own), the doses in ``dose_units`` (each agent's unit in the prediction's labels,
    ``uns['virtualcell']['dose_units']``; :func:`~virtualcell.perturbations.condition_in_units`), in one spelling
    (``"@1.0"`` is ``"@1"``, ``"B+A"`` is ``"A+B"``): how evaluate and :func:`to_cell_eval` meet a prediction."""
    own = contract.without_quantities_absent_from(adata)
    labels = own.conditions(adata)
    if dose_units and own.dose_key is not None:
        have = own.dose_units(adata)
        labels = np.array([condition_in_units(x, have, dose_units) for x in labels], dtype=object)
    return np.array([canonical_label(x) for x in labels], dtype=object)


def canonical_label(label: str) -> str:
    """One spelling of a condition (``"@1.0"`` is ``"@1"``, ``"B+A"`` is ``"A+B"``), a dosed pair's too: its parts
    sorted and the dose and time it shares kept after them (``"TF06+drugA@1.0,24h"`` is ``"TF06+drugA@1,24h"``, as
    ``"drugA+TF06@1,24h"`` is: :func:`~virtualcell.perturbations.unordered_label`), parts with doses of their own
    sorted with theirs (``"B@10+A@1.0"`` is ``"A@1+B@10"``).

    >>> canonical_label("drugA+TF06@1.0,24h"), canonical_label("TF06+drugA@1,24h"), canonical_label("B@10+A@1.0")
    ('TF06+drugA@1,24h', 'TF06+drugA@1,24h', 'A@1+B@10')
    """
    parts = [x.strip() for x in split_label(label)]
    if len(parts) > 1 and all("@" in x for x in parts):  # each part its own dose: each in one spelling first
        label = "+".join(canonical_condition(x) for x in parts)
    label = unordered_label(label)  # (the one home of a pair's order)
    return canonical_condition(label) if "@" in label else label


def dose_units_warning(units: Mapping[str, str], real: ad.AnnData, contract: DataContract) -> str | None:
    """What to say where a prediction's doses (``units``: its agents' units, ``{}`` for plain numbers) and the
    measured doses of ``real`` are matched by number alone, one side's unit unknown; ``None`` where they meet."""
    if contract.dose_key is None or contract.dose_key not in real.obs:
        return None
    dose, _, measured = contract.read_quantities(real)
    if not units and measured:  # (a model trained on plain numbers)
        return (f"The predictions name their doses as plain numbers (their model trained on doses without a unit) and "
                f"the measured doses carry units ({preview(sorted(set(measured.values())), 3)}): they are matched by "
                f"number, so '@10' meets the measured 10 {next(iter(measured.values()))} whatever unit the model's "
                "numbers were in. Write the measured doses in the training data's unit (or train on doses with their "
                "unit) to be sure.")
    if units and not measured and np.isfinite(dose).any():
        return (f"The predictions name their doses in units ({preview(sorted(set(units.values())), 3)}) and the "
                f"measured doses in obs[{contract.dose_key!r}] are plain numbers: they are matched by number, so '@10' "
                "meets every measured 10, whatever its unit (1 nM and 1 uM would pool). Where the measured units are "
                "in a column of their own (sci-Plex's dose_unit), name it: --dose-unit-key (Python: "
                "DataContract(..., dose_unit_key=...), or to_cell_eval(..., dose_unit_key=...)).")
    return None


MIN_SHARED = 0.9  # evaluate refuses inputs that share fewer of their genes than this


def _intersect(items: list[tuple[str, pd.Index]]) -> pd.Index:
    genes = items[0][1]
    for _, names in items[1:]:
        genes = genes[genes.isin(names)]
    return genes


def _renamed(adata: ad.AnnData, names: list[str]) -> ad.AnnData:
    """``adata`` with new gene names; the expression is shared, not copied."""
    import anndata as ad

    var = adata.var.copy()
    var.index = pd.Index(names, dtype=object)
    return ad.AnnData(X=adata.X, obs=adata.obs, var=var, uns=dict(adata.uns))


def shared_genes(
    named: dict[str, ad.AnnData], *, min_shared: float = MIN_SHARED
) -> tuple[pd.Index, dict[str, list[str]], dict[str, ad.AnnData]]:
    """Genes present in every AnnData (in the order of the first), those dropped per input, and the inputs.

    Names match exactly. If that leaves some of the smallest input's genes without a
    partner, they are matched ignoring case and an Ensembl version suffix
    (:func:`~virtualcell.sentences.gene_match_key`), with a warning, and renamed to the
    first input's spelling. If fewer than ``min_shared`` are still shared, a
    :class:`~virtualcell.errors.DataError` names the mismatch: scoring a handful of genes
    would give numbers that look valid and mean nothing.
    """
    import warnings

    from ..sentences import gene_match_key

    if not 0 < min_shared <= 1:
        raise DataError(f"min_shared_genes (--min-shared-genes) is a fraction of the smallest input's genes in (0, 1], "
                        f"got {min_shared!r}.")
    items = list(named.items())
    for name, a in items:
        if a.var_names.duplicated().any():  # (not is_unique: a slice of a repeated index keeps its flag)
            raise DataError(
                f"The {name} AnnData has duplicated gene names. Run adata.var_names_make_unique() first."
            )
    smallest = min(a.n_vars for _, a in items)
    genes = _intersect([(n, a.var_names) for n, a in items])
    if len(genes) < smallest:  # some genes of the smallest input found no partner as written
        keys = {n: [gene_match_key(g) for g in a.var_names] for n, a in items}
        if all(len(set(k)) == len(k) for k in keys.values()):
            loose = _intersect([(n, pd.Index(k)) for n, k in keys.items()])
            if len(loose) > len(genes):
                first = dict(zip(keys[items[0][0]], items[0][1].var_names.astype(str)))
                examples = []
                for n, a in items[1:]:
                    new = [first.get(k, str(g)) for k, g in zip(keys[n], a.var_names)]
                    examples += [(str(g), m) for g, m in zip(a.var_names, new) if str(g) != m][:1]
                    named[n] = _renamed(a, new)
                warnings.warn(
                    f"The inputs share {len(genes)} gene names as written but {len(loose)} when case and Ensembl "
                    f"version suffixes are ignored (e.g. {examples[0][0]!r} = {examples[0][1]!r}); genes are matched "
                    f"that way and named as in {items[0][0]}.", VirtualCellWarning, stacklevel=user_stacklevel())
                items = list(named.items())
                genes = _intersect([(n, a.var_names) for n, a in items])
    if len(genes) < min_shared * smallest:
        sizes = "; ".join(
            f"{n}: {a.n_vars} genes, e.g. {preview(a.var_names[~a.var_names.isin(genes)][:3], 3) or '-'} not shared"
            for n, a in items)
        raise DataError(
            f"The inputs share only {len(genes)} gene names, {len(genes) / max(smallest, 1):.0%} of the smallest "
            f"input's {smallest} ({sizes}). Scoring so few genes would give numbers that mean nothing. Name genes "
            "the same way in every input (symbols or Ensembl ids, the same species; --gene-key COLUMN picks a var "
            f"column), or lower min_shared_genes (now {min_shared}) if the difference is intended."
        )
    dropped = {n: [str(g) for g in a.var_names[~a.var_names.isin(genes)]] for n, a in items}
    return genes, dropped, named


def group_means(X: sp.spmatrix | np.ndarray, keys: np.ndarray) -> tuple[list[Any], np.ndarray, np.ndarray]:
    """Mean of the rows of ``X`` per distinct key: (keys, means [groups x genes], counts)."""
    uniq, inv = np.unique(keys, return_inverse=True)
    counts = np.bincount(inv, minlength=len(uniq)).astype(np.float64)
    ind = sp.csr_matrix((np.ones(len(inv)), (inv, np.arange(len(inv)))), shape=(len(uniq), len(inv)))
    sums = ind @ X
    sums = sums.toarray() if sp.issparse(sums) else np.asarray(sums)
    return list(uniq), sums / counts[:, None], counts


def group_moments(X: sp.spmatrix | np.ndarray, keys: np.ndarray) -> tuple[list[Any], np.ndarray, np.ndarray, np.ndarray]:
    """Per distinct key: (keys, means, unbiased variances [groups x genes], counts)."""
    names, means, counts = group_means(X, keys)
    X = X.astype(np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)  # squares without float32 loss
    _, sq, _ = group_means(X.multiply(X).tocsr() if sp.issparse(X) else X ** 2, keys)
    return names, means, unbiased_var(means, sq, counts[:, None]), counts


# --------------------------------------------------------------------------- #
# Independent controls
# --------------------------------------------------------------------------- #
@one_reading
def split_controls(
    adata: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    context_key: str | None = None,
    fraction: float = 0.5,
    seed: int = 0,
) -> tuple[ad.AnnData, ad.AnnData]:
    """Split the control cells of every context into two independent, disjoint halves.

    The first half (``baseline``) is the population fed to the model and to the
    baselines; the second (``reference``) is what measured deltas are taken against.
    With one shared control population, the noise of its mean enters predicted and
    measured deltas alike and inflates every score (the mean of the other perturbations
    then correlates with pure noise).

    Parameters
    ----------
    adata
        A measured screen with control and perturbed cells.
    perturbation_key, control, context_key
        The data contract; defaults to the one ``adata`` carries.
    fraction
        Share of each context's control cells that goes to ``baseline``.
    seed
        Seed of the split (``np.random.default_rng(seed)``); the same seed gives the same split.

    Returns
    -------
    baseline
        The baseline control cells only.
    reference
        Every perturbed cell plus the other control cells: the measured data to evaluate against.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> set(base.obs_names) & set(ref.obs_names)
    set()
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"fraction must be between 0 and 1 (exclusive), got {fraction}.")
    require_in_memory(adata)
    contract = resolve_contract(adata, perturbation_key=perturbation_key, control=control, context_key=context_key)
    rng = np.random.default_rng(seed)
    is_ctrl = contract.is_control(adata)
    contexts = contract.contexts(adata)
    to_base = np.zeros(adata.n_obs, dtype=bool)
    for ctx in sorted(set(contexts[is_ctrl])):
        cells = np.flatnonzero(is_ctrl & (contexts == ctx))
        if cells.size < 2:
            raise DataError(
                f"Context {ctx!r} has {cells.size} control cell(s); splitting controls needs at least 2 per "
                "context. Drop that context or pass its controls as baseline= yourself."
            )
        n_base = min(max(int(round(cells.size * fraction)), 1), cells.size - 1)
        to_base[rng.choice(cells, n_base, replace=False)] = True
    baseline = adata[to_base].copy()
    reference = adata[~to_base].copy()
    for part, role in ((baseline, "baseline"), (reference, "reference")):
        contract.attach(part)
        part.uns[UNS_KEY]["control_split"] = {"role": role, "seed": int(seed), "fraction": float(fraction)}
    log.info("split controls (seed %d): %d baseline, %d reference control cells", seed,
             int(to_base.sum()), int((is_ctrl & ~to_base).sum()))
    return baseline, reference


def split_role(adata: ad.AnnData) -> str | None:
    """``"baseline"`` / ``"reference"`` if ``adata`` came out of :func:`split_controls`."""
    info = adata.uns.get(UNS_KEY, {})
    split = info.get("control_split") if isinstance(info, dict) else None
    return str(split["role"]) if isinstance(split, dict) and "role" in split else None


# --------------------------------------------------------------------------- #
# Effect sizes corrected for group size
# --------------------------------------------------------------------------- #
def predicted_from(adata: ad.AnnData, contrast: np.ndarray) -> np.ndarray:
    """The cells outside ``contrast`` (a mask) that were predicted from a cell of it (their ``obs['source_cell']``
    names a contrast cell, by its name or by the cell a predicted contrast cell came from): each is paired with one,
    which tests and noise terms of independent groups cannot see. All false without the column."""
    if "source_cell" not in adata.obs.columns:
        return np.zeros(adata.n_obs, dtype=bool)
    source = adata.obs["source_cell"].astype(str).to_numpy()
    among = set(adata.obs_names[contrast].astype(str)) | set(source[contrast]) - {"nan", "None", ""}
    return np.isin(source, list(among)) & ~contrast


def effect_size(
    adata: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    context_key: str | None = None,
    reference: ad.AnnData | None = None,
) -> pd.DataFrame:
    """Strength of every perturbation's effect, corrected for the noise of small groups.

    ``squared_norm = ||mean(perturbed) - mean(control)||^2``; ``noise = sum_g var_p,g / n_p + sum_g var_c,g / n_c``
    is its expected value under sampling noise alone (unbiased per-gene variances), and
    ``effect_size = signed_root(squared_norm - noise)``: the noise-corrected norm of the mean delta,
    negative when the effect is below the noise. It is on the scale of a norm, the same scale as a
    screen's predicted ``l2_delta_corrected`` (:func:`virtualcell.screen.rank`) and a synthetic
    screen's true effect sizes, so measured and predicted effects can be compared as numbers, not only
    as ranks. (It reads independent groups: predicted cells measured against the very cells they were
    predicted from are paired, which the screen's figure takes into account and this does not; it warns.)
    Without the correction a group of 20 cells looks stronger than one of 2,000 with the same true effect. Values near or below 0 mean "not distinguishable from noise". Expression is
    log1p-normalized first if it is raw counts.

    Parameters
    ----------
    adata
        A measured screen.
    perturbation_key, control, context_key
        The data contract; defaults to the one ``adata`` carries.
    reference
        Optional control cells to take the deltas against (e.g. the reference half from
        :func:`split_controls`); by default the control cells in ``adata``.

    Returns
    -------
    DataFrame
        One row per perturbation and context: ``perturbation``, ``context``, ``n_cells``,
        ``n_control``, ``squared_norm``, ``noise``, ``effect_size``; sorted by ``effect_size``, largest first.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("papalexi2021")
    >>> vc.evaluate.effect_size(adata).iloc[0]["perturbation"]
    'STAT1'
    """
    from ..sentences import require_in_memory

    require_in_memory(adata, "The measured cells")
    if reference is not None:
        require_in_memory(reference, "The reference cells")
    contract = resolve_contract(adata, perturbation_key=perturbation_key, control=control, context_key=context_key)
    labels, contexts = contract.conditions(adata), contract.contexts(adata)
    if reference is None and predicted_from(adata, contract.is_control(adata)).any():
        import warnings

        warnings.warn("The perturbed cells were predicted from the control cells they are measured against (their "
                      "obs['source_cell']): this reads them as independent groups, so its noise term and effect size "
                      "differ from a screen's l2_delta_corrected, which pairs each predicted cell with its source. "
                      "For predictions, read the screen's figure, or pass reference= control cells they were not "
                      "made from.", VirtualCellWarning, stacklevel=user_stacklevel())
    if reference is not None:
        from ..sentences import gene_positions

        # (checked before the scales are read: z-scored values refused naming the fix; expression() checks alone)
        check_values(adata, name="measured")
        check_values(reference, name="reference")
        idx = gene_positions(reference.var_names, adata.var_names)  # ignoring case and version, as evaluate's do
        if (idx < 0).any():
            missing = [str(g) for g in adata.var_names[idx < 0]]
            raise DataError(f"reference lacks {len(missing)} genes of adata ({preview(missing, 5)}): it must hold "
                            "every gene of adata; subset adata to the shared genes first.")
        ref_ctx = contract.contexts(reference)
        ref_ctrl = contract.is_control(reference)
        import anndata as ad

        # on adata's genes, and both on one scale (counts beside log1p values at another total were compared as given)
        aligned = ad.AnnData(X=sp.csr_matrix(_matrix(reference))[:, idx], obs=reference.obs,
                             var=pd.DataFrame(index=adata.var_names), uns=dict(reference.uns))
        both, _ = onto_prediction_scale({"measured": adata, "reference": aligned}, adata.var_names)
        X, _ = expression(both["measured"], name="measured", allow_negative=False)
        Xr, _ = expression(both["reference"], name="reference", allow_negative=False)
    else:
        X, _ = expression(adata, name="measured", allow_negative=False)
        Xr, ref_ctx, ref_ctrl = X, contexts, labels == contract.control

    def stats(M: sp.csr_matrix, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
        sub = M[np.flatnonzero(mask)].astype(np.float64)  # (in float32, identical cells differed from 0)
        n = sub.shape[0]
        mean = np.asarray(sub.mean(axis=0)).ravel()
        var = unbiased_var(mean, np.asarray(sub.multiply(sub).mean(axis=0)).ravel(), n)
        return mean, var, n

    rows = []
    for ctx in sorted(set(contexts)):
        cmask = ref_ctrl & (ref_ctx == ctx)
        if not cmask.any():
            log.info("effect_size: context %r has no control cells; skipped", ctx)
            continue
        c_mean, c_var, n_c = stats(Xr, cmask)
        for p in sorted(set(labels[contexts == ctx]) - {contract.control}):
            p_mean, p_var, n_p = stats(X, (labels == p) & (contexts == ctx))
            sq, noise = noise_corrected_sq_norm(p_mean - c_mean, var_a=p_var, n_a=n_p, var_b=c_var, n_b=n_c)
            rows.append((p, ctx, n_p, n_c, sq, noise, signed_root(sq - noise)))
    cols = ["perturbation", "context", "n_cells", "n_control", "squared_norm", "noise", "effect_size"]
    return pd.DataFrame(rows, columns=cols).sort_values("effect_size", ascending=False, ignore_index=True)
