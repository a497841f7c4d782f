"""cell-eval (Arc Institute, the Virtual Cell Challenge metrics) as the evaluation engine.

* :func:`to_cell_eval` puts any AnnData (a ``virtualcell predict`` output or a measured
  screen) into the form ``cell-eval run -ap pred.h5ad -ar real.h5ad`` reads with its
  defaults: the perturbation in ``obs["target_gene"]``, the control labelled
  ``"non-targeting"``, the same genes in the same order in both files, and log1p
  values (raw counts are normalized as virtualcell does, ``log1p(counts / total * 1e4)``).
* :func:`score` runs cell-eval's ``MetricsEvaluator`` on one method's predicted cells
  against the measured cells of every context; :func:`~virtualcell.evaluate.evaluate`
  calls it for the model, each baseline and the split-half ceiling alike when the
  profile is one of cell-eval's (:data:`CELL_EVAL_PROFILES`).

cell-eval (with polars, scanpy and pdex) is imported only here, and only when used.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..contract import UNS_KEY, DataContract
from ..errors import ContractError, DataError, VirtualCellWarning, preview
from ..perturbations import condition_parts, units_of_text
from ..sentences import gene_positions, require_in_memory, with_gene_key
from ._data import (Prepared, canonical_label, condition_labels, controls_in, dose_units_warning, expression,
                    names_conditions, onto_prediction_scale, prediction_context_key, prediction_total,
                    refuse_absent_quantities, resolve_contract)

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

log = logging.getLogger("virtualcell.evaluate")

__all__ = ["CELL_EVAL_PROFILES", "PERT_COL", "CONTROL", "to_cell_eval", "require_cell_eval"]

CELL_EVAL_PROFILES = ("vcc", "full", "minimal", "de", "anndata", "pds")
PERT_COL = "target_gene"  # cell-eval run's default --pert-col
CONTROL = "non-targeting"  # cell-eval run's default --control-pert
INSTALL = "pip install 'cell-eval>=0.8.2'"


@contextlib.contextmanager
def _torch_threads_kept() -> Any:
    """Give torch back its thread count after cell-eval ran: its differential expression (pdex, numba's OpenMP
    pool) leaves torch on every core, so a run held to 1 thread (``--threads 1``, two runs sharing a machine's
    cores) generated on all of them after its first cell-eval score. Nothing to do where torch is not imported."""
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if torch is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def require_cell_eval() -> Any:
    """The ``cell_eval`` module, or an ImportError that says what to install."""
    try:
        import cell_eval
    except ImportError as err:
        raise ImportError(
            f"evaluate computes its metrics with the cell-eval package (the Virtual Cell Challenge metrics), "
            f"which is not installed: {INSTALL} ({err})."
        ) from err
    return cell_eval


# --------------------------------------------------------------------------- #
# Files cell-eval reads as they are
# --------------------------------------------------------------------------- #
def to_cell_eval(
    adata: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    gene_key: str | None = None,
    dose_key: str | None = None,
    time_key: str | None = None,
    dose_unit_key: str | None = None,
    like: ad.AnnData | None = None,
    part: bool = False,
) -> ad.AnnData:
    """``adata`` in the form ``cell-eval run -ap PRED -ar REAL`` accepts with its default options.

    The perturbation goes to ``obs["target_gene"]`` and the control cells are labelled
    ``"non-targeting"`` (the other obs columns stay); ``X`` holds log1p values, float32
    (raw counts are normalized as virtualcell does). With ``like`` (a file already in this
    form, e.g. ``virtualcell predict --format cell-eval`` output), the result has exactly its
    genes, in its order, and its perturbations: what cell-eval needs to pair two files. cell-eval pairs cells by
    perturbation alone, so where ``like``'s cells are of other contexts than these (its context column,
    ``uns['virtualcell']['context_key']``, else this file's stored one: seven cell types predicted, CD14 monocytes
    measured), a warning names each side's contexts and the fix.

    Parameters
    ----------
    adata
        Cells: a measured screen, or predicted cells with ``obs['perturbation']``.
    perturbation_key, control
        The data contract; defaults to the one ``adata`` carries.
    gene_key
        Var column with the gene names to use (default ``var_names``).
    dose_key, time_key, dose_unit_key
        Obs columns of each cell's dose, time and dose unit (:class:`~virtualcell.DataContract`), so that each dose
        of a drug is a perturbation of its own (``drugA@10``, as ``virtualcell predict`` names it); default: the
        contract ``adata`` carries. A measured screen without a stored contract needs them to meet a prediction's
        dosed labels (sci-Plex: ``dose_key="dose_value", dose_unit_key="dose_unit", time_key="time"``).
    like
        The other file of the pair (cell-eval form); genes are matched ignoring case and
        an Ensembl version suffix and written with ``like``'s spelling.
    part
        ``adata`` is one part of a file written a part at a time (``virtualcell predict --format cell-eval``
        writes a perturbation at a time): it need not hold the control cells itself.

    Returns
    -------
    AnnData
        Write it with ``.write_h5ad(path)``.

    Examples
    --------
    One line for a measured file, after ``virtualcell predict ... --format cell-eval --out pred.h5ad``::

        python -c "import anndata as ad, virtualcell as vc; vc.evaluate.to_cell_eval(ad.read_h5ad('real.h5ad'), like=ad.read_h5ad('pred.h5ad')).write_h5ad('real_ce.h5ad')"

    >>> import virtualcell as vc
    >>> real = vc.evaluate.to_cell_eval(vc.datasets.load("papalexi2021")[:300])
    >>> sorted(set(real.obs["target_gene"]))[:2]
    ['ATF2', 'BRD4']
    """
    import anndata as ad

    require_in_memory(adata)
    adata = with_gene_key(adata, gene_key)
    contract = resolve_contract(adata, perturbation_key=perturbation_key, control=control, require_control=not part,
                                measured=False)
    try:
        stored = DataContract.from_adata(adata)
    except ContractError:
        stored = DataContract()
    if not names_conditions(adata, contract):  # measured cells: a stored dose or time column they lack is refused
        refuse_absent_quantities(adata, replace(stored, dose_key=dose_key or stored.dose_key,
                                                time_key=time_key or stored.time_key),
                                 python="to_cell_eval(..., {role}_key='COLUMN')")
    if dose_key is not None or time_key is not None or dose_unit_key is not None:  # given here: over the stored ones
        stored_unit = stored.dose_unit_key  # (the stored unit column, where the stored dose column is gone)
        contract = replace(contract, dose_key=dose_key or contract.dose_key, time_key=time_key or contract.time_key,
                           dose_unit_key=dose_unit_key or contract.dose_unit_key or stored_unit)
        contract.validate(adata, require_control=not part)  # (a column named here that adata lacks is refused)
    labels = contract.conditions(adata)  # a drug's doses are perturbations of their own
    if like is not None and PERT_COL in like.obs.columns:
        # named as like= names them: measured doses in the prediction's units, one spelling of a pair ('B+A' is 'A+B')
        units = units_of_text((like.uns.get(UNS_KEY) or {}).get("dose_units"))
        said = dose_units_warning(units, adata, contract)
        if said:
            log.warning(said)
        spelled = {canonical_label(x): x for x in like.obs[PERT_COL].astype(str).unique()}
        labels = np.array([spelled.get(c, c) for c in condition_labels(adata, contract, dose_units=units)],
                          dtype=object)
    if CONTROL in set(labels) and contract.control != CONTROL:
        raise DataError(
            f"A perturbation is labelled {CONTROL!r}, the label cell-eval gives the control cells "
            f"({contract.control!r} here). Rename it before converting."
        )
    target = np.where(labels == contract.control, CONTROL, labels).astype(object)
    keep = np.ones(adata.n_obs, dtype=bool)
    genes = pd.Index(adata.var_names.astype(str))
    col = np.arange(adata.n_vars)
    if like is not None:
        if PERT_COL not in like.obs.columns:
            raise DataError(
                f"like= has no obs column {PERT_COL!r}: pass a file in cell-eval form (virtualcell predict "
                "--format cell-eval, or the output of to_cell_eval)."
            )
        wanted = set(like.obs[PERT_COL].astype(str))
        missing = sorted(wanted - set(target))
        if missing:
            raise DataError(
                f"{len(missing)} perturbations of like= are not measured here ({preview(missing, 5)}; measured: "
                f"{preview(sorted(set(target) - {CONTROL}), 5)}). cell-eval needs the same perturbations in both "
                "files: predict only measured ones, or check the perturbation column and control label."
                + _quantities_hint(missing, set(target) - {CONTROL}, adata, contract)
            )
        keep = np.isin(target, sorted(wanted))
        col = gene_positions(genes, like.var_names)
        if (col < 0).any():
            lacking = [str(g) for g, c in zip(like.var_names, col) if c < 0]
            raise DataError(
                f"{len(lacking)} of like='s {like.n_vars} genes are not in this file ({preview(lacking, 5)}). "
                "cell-eval compares the same genes: use the measured file with every predicted gene, or a "
                "--gene-key column that names genes as the prediction does."
            )
        genes = pd.Index(like.var_names.astype(str))
        _warn_other_contexts(adata, like, target, keep, contract)
    # onto the prediction's scale as evaluate puts it: counts normalized over the genes compared (not over every gene of
    # this file, which left a perfect prediction of 250 of 299 genes with MAE 0.05), log1p at another total onto 1e4
    cells = adata if like is None else _with_genes(adata, col, genes)
    if like is not None:
        cells = onto_prediction_scale({"pred": like, "measured": cells}, genes)[0]["measured"]
    X, _ = expression(cells, name="input", allow_negative=False, total=prediction_total(like))
    col = np.arange(len(genes))
    rows = np.flatnonzero(keep)
    obs = adata.obs.iloc[rows].copy()
    obs[PERT_COL] = pd.Categorical(target[rows])
    obs.index = pd.Index([str(i) for i in obs.index])
    if obs.index.duplicated().any():
        obs.index = pd.Index([f"{i}-{n}" for n, i in enumerate(obs.index)])
    var = adata.var.iloc[col].copy()  # its columns kept (ids beside names), its index named as compared
    var.index = genes
    out = ad.AnnData(X=X[rows][:, col].astype(np.float32), obs=obs, var=var)
    out.uns["log1p"] = {"base": None}  # X is log1p, as scanpy marks it
    record = adata.uns.get(UNS_KEY) or {}  # a prediction's scale, read by like= in turn
    kept = {k: record[k] for k in ("normalization", "scale_total", "dose_units", "context_key")
            if record.get(k) is not None}
    out.uns[UNS_KEY] = {"cell_eval": {"pert_col": PERT_COL, "control_pert": CONTROL,
                                      "perturbation_key": contract.perturbation_key,
                                      "control": contract.control, "scale": "log1p"},
                        **kept}
    return out


def _warn_other_contexts(adata: ad.AnnData, like: ad.AnnData, target: np.ndarray, keep: np.ndarray,
                         contract: DataContract) -> None:
    """Warn where ``like`` (a prediction in cell-eval form) and the cells of ``adata`` kept for it (``keep``, their
    cell-eval labels ``target``) are of other contexts, perturbation by perturbation: cell-eval pairs them by
    ``target_gene`` alone, so a prediction made from seven cell types was compared with measured CD14 monocytes,
    without a word. The context column is ``like``'s (:func:`~virtualcell.evaluate._data.prediction_context_key`),
    else ``adata``'s stored one; nothing is said without one, or where ``like`` lacks it."""
    key = prediction_context_key(like) or contract.context_key
    keyed = DataContract(context_key=key) if key is not None else None
    if keyed is None or not keyed.has_context(like):
        return
    import warnings

    from ..errors import user_stacklevel

    predicted = pd.Series(keyed.contexts(like), index=like.obs[PERT_COL].astype(str).to_numpy())
    pred_all = sorted(set(predicted))
    fix = ("cell-eval pairs cells by target_gene alone, so each perturbation's predicted cells would be compared with "
           "measured cells of other contexts. ")
    if not keyed.has_context(adata):
        if len(pred_all) > 1:
            warnings.warn(
                f"The prediction (like=) is of {len(pred_all)} contexts in obs[{key!r}] ({preview(pred_all, 6)}) and "
                f"these measured cells have no column {key!r}, so their contexts cannot be matched: {fix}Give the "
                f"measured cells the column {key!r} (each cell's context) to have them checked, or subset the "
                f"prediction to the context they are of (pred[pred.obs[{key!r}] == 'CONTEXT']) before converting.",
                VirtualCellWarning, stacklevel=user_stacklevel())
        return
    measured = pd.Series(keyed.contexts(adata)[keep], index=target[keep].astype(str))
    pred_sets = {t: set(c) for t, c in predicted.groupby(level=0)}
    real_sets = {t: set(c) for t, c in measured.groupby(level=0)}
    differ = sorted(t for t in pred_sets if pred_sets[t] != real_sets.get(t, set()))
    if not differ:
        return
    real_all = sorted(set(measured))
    shown = differ[0]
    each = ("" if set(pred_all) != set(real_all) else
            f" ({len(differ)} of {len(pred_sets)} perturbations differ, e.g. {shown!r}: predicted in "
            f"{preview(sorted(pred_sets[shown]), 4)}, measured in "
            f"{preview(sorted(real_sets.get(shown, ())), 4) or 'none'})")

    def code(values: list[str]) -> str:  # a list to paste, or a placeholder where it is long
        return repr(values) if len(values) <= 8 else "[...]"

    both = sorted(set(pred_all) & set(real_all))
    fixes = []
    if set(pred_all) - set(real_all):
        fixes.append(f"subset the prediction to the measured contexts (pred = pred[pred.obs[{key!r}].isin("
                     f"{code(both or real_all)})], and write it again)")
    if set(real_all) - set(pred_all):
        fixes.append(f"subset the measured cells to the predicted contexts (real = real[real.obs[{key!r}].isin("
                     f"{code(pred_all)})])")
    if not fixes:  # the same contexts in all, not for every perturbation
        fixes.append("keep each perturbation's cells, on both sides, to the contexts both hold for it")
    warnings.warn(
        f"The prediction (like=) and these measured cells are of other contexts in obs[{key!r}]: predicted "
        f"{preview(pred_all, 6)}, measured {preview(real_all, 6)}{each}. {fix}Before converting, "
        f"{' and '.join(fixes)}; or score the prediction with virtualcell evaluate (--profile vcc), which pairs "
        "cells context by context.", VirtualCellWarning, stacklevel=user_stacklevel())


def _quantities_hint(missing: Sequence[str], measured: set[str], adata: ad.AnnData, contract: DataContract) -> str:
    """What to add where like='s perturbations name doses or times the measured labels lack (``'IFNG@10'`` beside
    ``'IFNG'``): the measured file's dose or time column (``dose_key=``, ``time_key=``), so that each dose is a
    perturbation of its own, as the prediction names it; ``''`` where none does."""
    plain = {condition_parts(m)[0] for m in measured if condition_parts(m)[1:] == (None, None)}
    found = {"dose": [], "time": []}
    for p in missing:
        name, dose, time = condition_parts(p)
        if name in plain:
            for what, value in (("dose", dose), ("time", time)):
                if value is not None and getattr(contract, f"{what}_key") is None:
                    found[what].append(p)
    out = ""
    for what, names in found.items():
        if names:
            cols = [str(c) for c in adata.obs.columns if what in str(c).lower()]
            col = next((c for c in cols if c.lower() == what), cols[0]) if cols else "COLUMN"
            seen = f" (its obs has {preview(cols, 4)})" if cols else ""
            out += (f" {len(names)} of them name a {what} (e.g. {names[0]!r}) that the measured labels lack: name the "
                    f"measured file's {what} column{seen}, e.g. to_cell_eval(real, like=pred, {what}_key={col!r}), "
                    f"so that each {what} is a perturbation of its own, as the prediction names it.")
    return out

def _with_genes(adata: ad.AnnData, col: np.ndarray, genes: pd.Index) -> ad.AnnData:
    """``adata``'s columns ``col``, named ``genes`` (the other file's spelling)."""
    import anndata as ad

    return ad.AnnData(X=adata.X[:, col], obs=adata.obs, var=pd.DataFrame(index=genes), uns=dict(adata.uns))


# --------------------------------------------------------------------------- #
# Scoring one method through cell-eval
# --------------------------------------------------------------------------- #
def direction(name: str) -> str:
    """``"higher"``/``"lower"`` (is better) from cell-eval's registry; ``"none"`` for counts."""
    from cell_eval import metrics_registry
    from cell_eval._types import MetricBestValue

    try:
        best = metrics_registry.get_metric(name).best_value
    except KeyError:
        return "none"  # sub-metrics such as de_nsig_counts_real
    return {MetricBestValue.ONE: "higher", MetricBestValue.ZERO: "lower"}.get(best, "none")


def _anndata(X: sp.csr_matrix, labels: np.ndarray, genes: Sequence[str]) -> ad.AnnData:
    import anndata as ad

    X = X.tocsr(copy=True).astype(np.float32)
    np.maximum(X.data, 0.0, out=X.data)  # cell-eval reads log1p values, which are never negative
    X.eliminate_zeros()
    obs = pd.DataFrame({PERT_COL: pd.Categorical(labels.astype(str))}, index=[str(i) for i in range(len(labels))])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=[str(g) for g in genes]))


def score(
    method: str,
    pred: Prepared,
    real: Prepared,
    contexts: Sequence[Any],
    genes: Sequence[str],
    control: str,
    groups: dict[tuple[str, str], tuple[int, float]],
    *,
    profile: str,
    threads: int = 1,
) -> list[tuple]:
    """Rows of the evaluate table: cell-eval's metrics of ``pred`` against ``real``, per context.

    In each context, the perturbations both sides have (with the prediction's control cells
    against the measured control cells) go through ``cell_eval.MetricsEvaluator`` and its
    metric ``profile``. Predicted values below 0 (a shifted-control baseline can go there)
    are clipped at 0, since cell-eval reads log1p expression.
    """
    require_cell_eval()
    from cell_eval import MetricsEvaluator

    rows: list[tuple] = []
    for rc in contexts:
        in_pred = pred.contexts == rc.context
        if not controls_in(pred, rc.context, control, rc.candidates, method):
            continue
        scored = sorted(set(pred.labels[in_pred]) & set(rc.candidates))
        if not scored:
            continue
        wanted = [*scored, control]
        p_rows = np.flatnonzero(in_pred & np.isin(pred.labels, wanted))
        r_rows = np.flatnonzero((real.contexts == rc.context) & np.isin(real.labels, wanted))
        p_ad = _anndata(pred.X[p_rows], pred.labels[p_rows], genes)
        r_ad = _anndata(real.X[r_rows], real.labels[r_rows], genes)
        with tempfile.TemporaryDirectory(prefix="vc-cell-eval-") as tmp, warnings.catch_warnings(), \
                _torch_threads_kept():
            warnings.filterwarnings("ignore", "the string cache", DeprecationWarning)  # polars, inside cell-eval
            try:
                # Both sides are on virtualcell's log1p scale already: cell-eval must not normalize them again,
                # nor refuse a calibrated prediction above its 15 heuristic for "raw counts" (x + dec(p) - dec(c)
                # can reach it for a gene the model's control generation lacks): allow_discrete skips that guess,
                # and is_log1p keeps its differential expression on the log1p scale, as by default.
                ev = MetricsEvaluator(p_ad, r_ad, control_pert=control, pert_col=PERT_COL, num_threads=threads,
                                      outdir=str(Path(tmp) / "out"), skip_de=profile == "pds", allow_discrete=True,
                                      pdex_kwargs={"is_log1p": True})
                results, _ = ev.compute(profile=profile, write_csv=False, break_on_error=True)
            except Exception as err:
                if profile in ("full", "anndata"):  # its clustering metrics fail on a few perturbations
                    raise DataError(
                        f"cell-eval's {profile!r} profile failed on the {len(scored)} perturbations of context "
                        f"{rc.context!r} ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}): "
                        "its clustering and distribution metrics need more perturbations than that. Score them with "
                        "--profile vcc (or the default profile), or with more perturbations.") from err
                if hasattr(err, "add_note"):
                    err.add_note(f"while cell-eval scored {method!r} in context {rc.context!r} (profile {profile!r})")
                raise
        frame = results.to_pandas()
        for _, r in frame.iterrows():
            p = str(r["perturbation"])
            if (p, rc.context) not in groups:
                continue
            n, eff = groups[(p, rc.context)]
            for name in frame.columns:
                if name == "perturbation":
                    continue
                value = r[name]
                value = float(value) if value is not None and not isinstance(value, str) else np.nan
                rows.append((method, p, rc.context, str(name), value, direction(str(name)), n, eff))
    return rows
