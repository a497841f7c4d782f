"""evaluate(): predicted vs measured, per perturbation and context, next to baselines and a noise ceiling."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .._stats import PCABasis, noise_corrected_sq_norm, pca, signed_root
from ..contract import UNS_KEY, DataContract, one_reading
from ..errors import DataError, VirtualCellWarning, preview, user_stacklevel, whole_at_least
from ..perturbations import units_of_text
from ..sentences import Vocabulary, data_hash, require_in_memory, target_aliases, with_gene_key
from . import DEFAULT_BASELINES, _celleval
from ._celleval import CELL_EVAL_PROFILES, require_cell_eval
from ._data import (
    INPUT_NAMES as _INPUT_NAMES,
    MIN_SHARED,
    Prepared,
    check_values,
    context_of_prediction,
    controls_in,
    dose_units_warning,
    group_moments,
    onto_prediction_scale,
    prediction_total,
    prepare,
    resolve_contract,
    shared_genes,
    split_controls,
    split_role,
)
from .baselines import BASELINES
from .metrics import Metric, PredRealPair, resolve_metrics

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

log = logging.getLogger("virtualcell.evaluate")

__all__ = ["evaluate", "delta_table", "summarize", "DEFAULT_BASELINES", "TABLE_COLUMNS"]

TABLE_COLUMNS = ["method", "perturbation", "context", "metric", "value", "direction", "n_cells", "effect_size"]
_N_COMPONENTS = 50


# --------------------------------------------------------------------------- #
# Setup shared by evaluate() and delta_table()
# --------------------------------------------------------------------------- #
@dataclass
class _Setup:
    contract: DataContract
    genes: pd.Index
    real: Prepared
    base: Prepared  # baseline control cells only
    pred: Prepared | None
    info: dict[str, Any] = field(default_factory=dict)
    train: ad.AnnData | None = None  # the training data, on the shared genes
    # perturbed genes as the labels name them -> the genes' names (sentences.target_aliases over the measured var)
    aliases: dict[str, str] = field(default_factory=dict)
    # each agent's dose unit in the prediction's labels: measured doses are named in them (prepare's dose_units)
    dose_units: dict[str, str] = field(default_factory=dict)
    # the per-cell total measured counts are normalized to (a prediction of a model trained on log1p values at it)
    total: float | None = None


def _as_anndata(data: Prepared, genes: pd.Index, contract: DataContract, mask: np.ndarray | None = None) -> ad.AnnData:
    """A normalized, gene-aligned AnnData of (a subset of) prepared cells, carrying ``contract`` without its dose and
    time columns: its labels are the cells' conditions already (``"drugA@10,24h"``)."""
    import anndata as ad

    idx = np.arange(len(data.labels)) if mask is None else np.flatnonzero(mask)
    obs = pd.DataFrame({contract.perturbation_key: data.labels[idx]})
    if contract.context_key is not None:
        obs[contract.context_key] = data.contexts[idx]
    obs.index = obs.index.astype(str)
    out = ad.AnnData(data.X[idx], obs=obs, var=pd.DataFrame(index=genes.astype(str)))
    replace(contract, dose_key=None, time_key=None, dose_unit_key=None).attach(out)
    return out


def _named_genes(adata: ad.AnnData, gene_key: str | None, name: str) -> ad.AnnData:
    """``adata`` with its genes named by ``var[gene_key]`` where it has that column; an input without it keeps its
    var_names (a prediction named by symbols beside a measured file of Ensembl ids with a symbol column; the genes
    then have to match by name, which the shared-genes check sees to)."""
    if gene_key is None or gene_key in adata.var.columns:
        try:
            return with_gene_key(adata, gene_key)
        except DataError as err:
            raise DataError(f"{name}: {err}") from None
    log.info("%s has no var column %r: its genes are its var_names", name, gene_key)
    return adata


def _fresh_names(adata: ad.AnnData) -> ad.AnnData:
    """``adata`` with new name indexes where pandas calls them non-unique though no name repeats (a slice of an index
    whose names repeat elsewhere keeps the parent's flag, and pandas then refuses to look names up in it); else
    ``adata`` itself."""
    stale = [axis for axis in ("var_names", "obs_names")
             if not getattr(adata, axis).is_unique and not getattr(adata, axis).duplicated().any()]
    if not stale:
        return adata
    adata = adata.copy()
    for axis in stale:
        setattr(adata, axis, pd.Index(getattr(adata, axis).astype(str).tolist()))
    return adata


def _refuse_shared_controls(baseline: ad.AnnData, real: ad.AnnData, contract: DataContract) -> None:
    """Refuse baseline cells that are also the measured control cells (the same names, the same expression): the
    reference of every measured delta would then be the baselines' own input, and on a screen with no effect at all
    a baseline scores pearson_delta 0.66 instead of 0."""
    if contract.perturbation_key not in real.obs.columns:
        return
    ref_names = real.obs_names[contract.is_control(real)]
    shared = baseline.obs_names.intersection(ref_names)
    if shared.empty:
        return
    rows = shared[: 200]  # the same names may be a coincidence ("0", "1", ... of two files): same values are not

    def values(a: ad.AnnData) -> np.ndarray:
        x = a[rows].X
        return np.asarray(x.toarray() if hasattr(x, "toarray") else x, dtype=np.float64)

    mine, theirs = values(baseline), values(real)
    if mine.shape == theirs.shape and np.allclose(mine, theirs):
        raise DataError(
            f"{len(shared)} of the baseline's {baseline.n_obs} cells are the measured control cells too (same names "
            "and values): the measured deltas would be taken from the very cells the baselines start from, which "
            "inflates every score (a screen with no effect scores like one with effects). Split the controls in two "
            "halves (vc.evaluate.split_controls(real, ...): base, real), or give no baseline and evaluate splits them.")


def _setup(
    pred: ad.AnnData | None,
    real: ad.AnnData,
    *,
    perturbation_key: str | None,
    control: str | Sequence[str] | None,
    context_key: str | None,
    baseline: ad.AnnData | None,
    train: ad.AnnData | None,
    seed: int,
    gene_key: str | None = None,
    min_shared: float = MIN_SHARED,
) -> _Setup:
    inputs = {"real": real, "pred": pred, "baseline": baseline, "train": train}
    for key, a in inputs.items():  # every input checked as the user passed it, and named so
        if a is not None:  # measured expression is never negative; a shifted-control prediction can be
            require_in_memory(a, f"The {_INPUT_NAMES[key]} AnnData")
            check_values(a, name=_INPUT_NAMES[key], allow_negative=key == "pred")
        if a is not None and key in ("real", "baseline") and a.obs_names.duplicated().any():
            # cells are found by name (the baseline's among the reference, a prediction's source cells)
            repeated = sorted(set(a.obs_names[a.obs_names.duplicated()]))
            raise DataError(
                f"The {_INPUT_NAMES[key]} cells' names repeat ({len(repeated)}, e.g. {preview(repeated, 3)}; files of "
                "several samples concatenated keep their barcodes): cells are matched by name. Make them unique "
                "before splitting and predicting (adata.obs_names_make_unique(), or anndata.concat(..., "
                "index_unique='-')), then predict and evaluate.")
    if gene_key is not None and not any(gene_key in a.var.columns for a in inputs.values() if a is not None):
        raise DataError(f"--gene-key {gene_key!r} is a var column of no input: "
                        + "; ".join(f"{_INPUT_NAMES[k]} has {preview(list(a.var.columns), 6) or 'none'}"
                                    for k, a in inputs.items() if a is not None) + ".")
    real, pred, baseline, train = (_fresh_names(_named_genes(a, gene_key, _INPUT_NAMES[k])) if a is not None else None
                                   for k, a in inputs.items())
    contract = resolve_contract(real, perturbation_key=perturbation_key, control=control, context_key=context_key)
    # no context column given or stored: the prediction's own (uns['virtualcell']['context_key']), where the measured
    # inputs hold it (pooled, a prediction from typeA cells was scored against measured typeB cells, without a word)
    contract, said_contexts = context_of_prediction(pred, contract, {"real": real, "baseline": baseline,
                                                                     "train": train})
    info: dict[str, Any] = {"contract": contract.to_dict(), "seed": int(seed)}
    if said_contexts:
        info["contexts"] = said_contexts
    if gene_key is not None:
        info["gene_key"] = gene_key
    said = (pred.uns.get(UNS_KEY) or {}) if pred is not None else {}
    # the hash of the training run's perturbed cells where it recorded one (it also tells the whole file), else of
    # the file it was given (a run from before the perturbed cells' hash was kept)
    alone = bool(said.get("training_perturbed_data_hash"))
    trained = said.get("training_perturbed_data_hash") or said.get("training_data_hash")

    def hashed(a: ad.AnnData) -> str | None:
        if not alone:
            return data_hash(a, contract)
        perturbed = ~contract.is_control(a)
        return data_hash(a[perturbed], contract) if perturbed.any() else None

    if trained and trained in {hashed(a) for a in {id(x): x for x in (inputs["real"], real)}.values()}:
        note = ("the measured perturbed cells are those the model was trained on (their hash is the training run's, "
                "a split of its controls or not): the model learned them, so these scores say how well it fits them, "
                "not how it predicts cells it never saw. Hold cells out when training (Python: "
                "vc.fit(adata, out=..., config=vc.TrainConfig(holdout={'COLUMN': ['VALUE']})); CLI: --holdout "
                "COLUMN=VALUE) and score the prediction against those only")
        warnings.warn(note[0].upper() + note[1:] + ".", VirtualCellWarning, stacklevel=user_stacklevel())
        info["measured_is_training_data"] = note
    sources = _sources_among_controls(pred, real, contract)
    every = baseline is None and sources is not None and not (contract.is_control(real) & ~sources).any()
    if every:
        warnings.warn(
            f"The prediction was made from every measured control cell ({int(sources.sum())}, its "
            "obs['source_cell']), so no independent control cells are left to measure the deltas against: the "
            "controls are split at random and the model's delta shares half its cells' noise with the reference. Split "
            "the controls before predicting (vc.evaluate.split_controls: predict from one half, pass it as "
            "--baseline and the rest as --real).", VirtualCellWarning, stacklevel=user_stacklevel())
        sources = None
    if baseline is None and sources is not None:
        # the prediction was made from some of these very control cells (its obs['source_cell']): they are its
        # baseline, the others the reference. Split again at random, the model's delta was taken against half of
        # the cells it was made from (a no-change copy of every control scored pearson_delta -0.2, not 0)
        baseline, real = real[sources].copy(), real[~sources].copy()
        info["controls"] = (f"the {int(sources.sum())} measured control cells the prediction was made from (its "
                            "obs['source_cell']) are the baselines' input, the other control cells the reference")
    elif baseline is None:
        if split_role(real) == "reference":
            warnings.warn(
                "real holds only the reference half of the controls (from split_controls) but no baseline= "
                "was given, so its controls are split again. Pass baseline=<the other half>.",
                VirtualCellWarning, stacklevel=user_stacklevel(),
            )
        baseline, real = split_controls(real, perturbation_key=contract.perturbation_key, control=contract.controls,
                                        context_key=contract.context_key, seed=seed)
        info["controls"] = (f"the measured control cells were split in two halves (seed {seed}): one is the "
                            "baselines' input, the other the reference for measured deltas")
        if pred is not None and "source_cell" in pred.obs and not every:  # made from cells of another file
            note = ("the prediction names the cells it was made from (obs['source_cell']) and they are not all control "
                    "cells of real, so the model's delta is taken against other cells than its own baseline: pass "
                    "the file it was predicted from as baseline= (--baseline)")
            warnings.warn(note[0].upper() + note[1:] + ".", VirtualCellWarning, stacklevel=user_stacklevel())
            info["controls"] += "; " + note
    else:
        _refuse_shared_controls(baseline, real, contract)
        info["controls"] = "baseline control cells given; the measured control cells are the reference"
        baseline, fed = cells_fed(pred, baseline, contract)
        if fed is not None:
            info["controls"] += (f"; in the contexts the prediction covers, only the {fed} baseline cells it was "
                                 "made from (its obs['source_cell']): the model's delta and the baselines' start from "
                                 "the same cells")
    named = {"real": real, "baseline": baseline}
    if pred is not None:
        named = {"real": real, "pred": pred, "baseline": baseline}
    if train is not None:
        named["train"] = train
    try:
        genes, dropped, named = shared_genes(named, min_shared=min_shared)
    except DataError as err:
        lacking = [_INPUT_NAMES[k] for k, a in inputs.items() if a is not None and gene_key is not None
                   and gene_key not in a.var.columns]
        if not lacking:
            raise
        raise DataError(f"{err} --gene-key {gene_key!r} named the genes of the inputs that have that var column; "
                        f"{', '.join(lacking)} {'has' if len(lacking) == 1 else 'have'} none and kept "
                        f"{'its' if len(lacking) == 1 else 'their'} var_names: leave --gene-key out to compare "
                        "var_names, or give every input that column.") from None
    named, moved = onto_prediction_scale(named, genes)
    if moved:
        info["onto_prediction_scale"] = moved
        log.warning("The %s held log1p values normalized to another total than the raw counts beside them, or the "
                    "prediction's (log1p of 1e4 per cell): put onto 1e4 per cell over the %d genes compared, as the "
                    "Simulator put its baseline.", " and ".join(_INPUT_NAMES[k].split(" (")[0] for k in moved),
                    len(genes))
    real, baseline = named["real"], named["baseline"]
    pred, train = named.get("pred"), named.get("train")
    info["n_genes"] = len(genes)
    info["genes_dropped"] = {k: {"n": len(v), "first": v[:20]} for k, v in dropped.items() if v}
    if any(dropped.values()):
        log.info("evaluating on %d shared genes; dropped %s", len(genes),
                 ", ".join(f"{len(v)} from {k}" for k, v in dropped.items() if v))
    units = units_of_text((pred.uns.get(UNS_KEY) or {}).get("dose_units")) if pred is not None else {}
    said = dose_units_warning(units, real, contract) if pred is not None else None
    if said:
        log.warning(said)
    total = prediction_total(pred)  # measured counts onto the prediction's scale: its model's training total
    real_p = prepare(real, contract, genes, name="measured", dose_units=units, total=total)
    vocabulary = Vocabulary(tuple(str(g) for g in genes))
    aliases = {}
    for data in (real, train) if train is not None else (real,):  # the measured data's var, else the training's
        labels = sorted(set(contract.labels(data)) - {contract.control}) if contract.perturbation_key in data.obs else []
        aliases = aliases or target_aliases(data, labels, vocabulary)
    base_p = prepare(baseline, contract, genes, name="baseline", dose_units=units, total=total)
    keep = base_p.labels == contract.control
    if not keep.any():
        raise DataError(
            f"The baseline AnnData has no control cells (label {contract.control!r}). Pass the control cells fed "
            "to the model, e.g. the first value of split_controls()."
        )
    base_p = Prepared(base_p.X[np.flatnonzero(keep)], base_p.labels[keep], base_p.contexts[keep], base_p.normalization)
    pred_p = prepare(pred, contract, genes, name="predicted") if pred is not None else None
    info["normalization"] = {"real": real_p.normalization, "baseline": base_p.normalization}
    for key in set(moved) & set(info["normalization"]):  # log1p at another total, put onto the prediction's 1e4
        info["normalization"][key] = "log1p_onto_cp10k"
    if pred_p is not None:  # what the prediction's values are, as it records them (else as read)
        info["normalization"]["pred"] = (pred.uns.get(UNS_KEY) or {}).get("normalization") or pred_p.normalization
    return _Setup(contract, genes, real_p, base_p, pred_p, info, train, aliases, units, total)


def _made_from(pred: ad.AnnData | None, cells: ad.AnnData) -> np.ndarray | None:
    """A mask of ``cells`` that ``pred`` was made from (its ``obs['source_cell']``, by name), where every source is
    among them; else ``None`` (no such column, or some source is another file's cell)."""
    if pred is None or "source_cell" not in pred.obs:
        return None
    sources = set(pred.obs["source_cell"].astype(str))
    mask = cells.obs_names.isin(sources)
    return mask if len(set(cells.obs_names[mask])) == len(sources) else None


def _sources_among_controls(pred: ad.AnnData | None, real: ad.AnnData, contract: DataContract) -> np.ndarray | None:
    """A mask of ``real``'s cells that ``pred`` was made from (``obs['source_cell']``), where every source is one of
    its control cells; else ``None``."""
    mask = _made_from(pred, real)
    return None if mask is None or (mask & ~contract.is_control(real)).any() else mask


def cells_fed(pred: ad.AnnData | None, baseline: ad.AnnData,
              contract: DataContract | None) -> tuple[ad.AnnData, int | None]:
    """``baseline`` kept, in the contexts ``pred`` covers, to the cells ``pred`` was made from
    (``obs["source_cell"]``, as :meth:`~virtualcell.simulator.SimulationResult.to_anndata` writes it), and how
    many those are (``None``: unchanged); ``contract`` says how to read contexts (``None``: one context).

    A prediction from ``n`` of ``N`` baseline cells is then measured against the mean of those ``n``,
    and the baselines shift the same ``n``. Against all ``N``, the model's delta would carry the sampling
    noise of its ``n`` cells' mean, which the baselines (shifting all ``N``) do not. Left as given
    when the model saw every cell, or when some source cell is not in ``baseline`` (other cells).

    >>> import anndata as ad, numpy as np, pandas as pd
    >>> base = ad.AnnData(np.zeros((4, 1)), obs=pd.DataFrame(index=["a", "b", "c", "d"]))
    >>> pred = ad.AnnData(np.zeros((2, 1)), obs=pd.DataFrame({"source_cell": ["a", "b"]}, index=["x", "y"]))
    >>> kept, n = cells_fed(pred, base, None)
    >>> list(kept.obs_names), n
    (['a', 'b'], 2)
    """
    found = _made_from(pred, baseline)
    if found is None:
        return baseline, None
    keep = found.copy()
    if contract is not None and contract.has_context(pred) and contract.has_context(baseline):
        keep |= ~np.isin(contract.contexts(baseline), list(set(contract.contexts(pred))))
    return (baseline, None) if keep.all() else (baseline[keep], len(set(baseline.obs_names[found])))




def _with_control(pred: Prepared, base: Prepared, control: str, info: dict[str, Any]) -> Prepared:
    """The prediction, with the baseline controls added for contexts where it has none."""
    have = set(pred.contexts[pred.labels == control])
    missing = np.isin(base.contexts, sorted(set(base.contexts) - have))
    if not missing.any():
        info["pred_control"] = "the prediction's own control cells"
        return pred
    info["pred_control"] = (f"the measured baseline control cells (the prediction has none in "
                            f"{preview(sorted(set(base.contexts[missing])), 5)})")
    idx = np.flatnonzero(missing)
    return Prepared(sp.vstack([pred.X, base.X[idx]]).tocsr(), np.concatenate([pred.labels, base.labels[idx]]),
                    np.concatenate([pred.contexts, base.contexts[idx]]), pred.normalization)


def _none_measured(predicted: set[tuple[str, str]], known: set[tuple[str, str]],
                   contract: DataContract) -> DataError:
    """The refusal of a prediction none of whose groups (``predicted``: perturbation and context) is measured
    (``known``): a few groups of each side, and the usual fixes (the labels' column, the context column, the doses and
    times that one side names)."""
    control = contract.control
    measured = {p for p, _ in known if p != control}
    one_sided = _one_sided_quantities({p for p, _ in predicted}, measured)
    dosed = any("@" in p for p, _ in predicted) and not any("@" in p for p in measured)
    timed = (any("," in p.partition("@")[2] for p, _ in predicted)
             and not any("," in p.partition("@")[2] for p in measured))
    hint = (" The predictions name doses or times ('drugA@10') and the measured labels do not: name the "
            "measured data's dose and time columns (CLI: --dose-key / --time-key, and --dose-unit-key "
            "where the units are a column of their own; Python: DataContract(..., dose_key=...)"
            ".attach(real)), so that its doses are groups of their own."
            if dosed else
            " The predictions name times ('drugA@10,24h') and the measured labels do not: name the "
            "measured data's time column (CLI: --time-key; Python: DataContract(..., time_key=...)"
            ".attach(real))." if timed else "")
    has = preview(sorted({f"{p} in {c}" for p, c in known if p != control}), 5) or "no perturbed cells"
    return DataError(
        f"None of the predicted groups ({preview(sorted(f'{p} in {c}' for p, c in predicted), 5)}) is in the measured "
        f"data (which has {has}). Label the predictions as the measured data does (virtualcell predict writes the "
        f"training labels in the column its training data named them in; read here: "
        f"obs[{contract.perturbation_key!r}], --perturbation-key), and check the context column." + (one_sided or hint)
        + contract.whole_floats({c for _, c in predicted}, {c for _, c in known})
    )


def _nothing_scored(setup: _Setup, pred: Prepared, contexts: list[_RealContext]) -> DataError:
    """The refusal of a prediction that gave no group to compare (:func:`delta_table`): it has no perturbed cells,
    none of its groups is measured, or those measured lack control cells on one side; each with a few groups and the
    fix."""
    control = setup.contract.control
    predicted = {(p, c) for p, c in zip(pred.labels, pred.contexts) if p != control}
    if not predicted:
        return DataError(f"The prediction holds control cells only (label {control!r}), so no perturbation can be "
                         "compared. Pass the predicted perturbed cells (SimulationResult.to_anndata(), or virtualcell "
                         "predict's output).")
    known = set(zip(setup.real.labels, setup.real.contexts))
    both = predicted & known
    if not both:
        return _none_measured(predicted, known, setup.contract)
    scorable = {(p, rc.context) for rc in contexts for p in rc.candidates}
    where = preview(sorted({c for _, c in both}), 3)
    lacks = (f"the measured data has no control cells (label {control!r}) in their contexts ({where}): give the "
             "measured file those contexts' control cells" if not both & scorable else
             f"the prediction has no control cells (label {control!r}) in their contexts ({where}), nor its baseline: "
             "pass the control cells it was made from as baseline= (--baseline), spelling the contexts as it does")
    return DataError(
        f"The predicted groups that are measured ({preview(sorted(f'{p} in {c}' for p, c in both), 5)}) cannot be "
        f"compared, since a group's delta is taken against the control cells of its context, and {lacks}.")


def _one_sided_quantities(unmatched: set[str], measured: set[str]) -> str:
    """What to say where predicted groups miss measured ones only by a dose or a time that one side names and the other
    does not (``'drugA@1,24h'`` beside the measured ``'drugA@1'``, or the other way round), with the fix for each way;
    ``''`` where no unmatched group does. (That a whole prediction meets nothing was the only case told before.)"""
    from ..perturbations import condition_parts as split

    by_name: dict[str, list[tuple[str, str | None, str | None]]] = {}
    for m in sorted(measured):
        name, dose, time = split(m)
        by_name.setdefault(name, []).append((m, dose, time))
    found: dict[tuple[str, bool], list[tuple[str, str]]] = {}  # (dose or time, the prediction names it) -> examples
    for p in sorted(unmatched):
        name, dose, time = split(p)
        for m, m_dose, m_time in by_name.get(name, []):
            sided = {"dose": (dose is None) != (m_dose is None), "time": (time is None) != (m_time is None)}
            same = {"dose": dose == m_dose, "time": time == m_time}
            if any(sided.values()) and all(sided[w] or same[w] for w in sided):
                for what in (w for w in sided if sided[w]):
                    found.setdefault((what, (dose if what == "dose" else time) is not None), []).append((p, m))
                break
    out = []
    for (what, predicted), pairs in sorted(found.items()):
        groups = sorted({p for p, _ in pairs})
        p, m = pairs[0]
        if predicted:
            out.append(f" {len(groups)} predicted groups name {what}s the measured labels lack (e.g. predicted {p!r}, "
                       f"measured {m!r}): name the measured data's {what} column (evaluate CLI: --{what}-key; Python: "
                       f"DataContract(..., {what}_key=...).attach(real)), so that its {what}s are groups of their own.")
        else:
            out.append(f" {len(groups)} predicted groups name no {what} where the measured labels name one (e.g. "
                       f"predicted {p!r}, measured {m!r}): each is a prediction of no one {what} (its model trained "
                       f"without a {what} column, or read a knockout's {what}s as one prompt). Train the model with "
                       f"--{what}-key to predict each {what}, or, where the measured file holds one {what} per "
                       f"perturbation, compare without its {what} column (DataContract(..., {what}_key=None)"
                       ".attach(real)).")
    return "".join(out)


# --------------------------------------------------------------------------- #
# Per-context summaries of the measured data
# --------------------------------------------------------------------------- #
@dataclass
class _RealContext:
    context: str
    candidates: tuple[str, ...]
    means: np.ndarray
    control: np.ndarray
    de_score: np.ndarray  # Welch t per candidate and gene
    n_cells: dict[str, int]
    effect_size: dict[str, float]
    basis: PCABasis | None = None  # a PCA of the measured cells
    cells: dict[str, np.ndarray] = field(default_factory=dict)
    control_cells: np.ndarray | None = None


def _welch_t(means: np.ndarray, var: np.ndarray, counts: np.ndarray, c_mean: np.ndarray, c_var: np.ndarray,
             n_c: float) -> np.ndarray:
    """Welch t statistic of every group and gene against the control (a tiny variance floor avoids 0/0)."""
    se = np.sqrt(var / counts[:, None] + c_var / n_c + 1e-8)
    return (means - c_mean) / se


def _subsample(n: int, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    if max_cells is None or n <= max_cells:
        return np.arange(n)
    return np.sort(rng.choice(n, max_cells, replace=False))


def _sampled_cells(data: Prepared, mask: np.ndarray, max_cells: int | None, rng: np.random.Generator) -> np.ndarray:
    """The cells of ``mask`` (at most ``max_cells``, a seeded draw) as a dense array: drawn first, then made dense
    (all of a large group was made dense to keep a few hundred)."""
    rows = np.flatnonzero(mask)
    rows = rows[_subsample(rows.size, max_cells, rng)]
    return np.asarray(data.X[rows].toarray(), dtype=np.float32)


def _real_contexts(
    real: Prepared, control: str, *, cells: bool, max_cells: int | None, seed: int
) -> list[_RealContext]:
    out = []
    rng = np.random.default_rng(seed)
    for ctx in sorted(set(real.contexts)):
        in_ctx = real.contexts == ctx
        idx = np.flatnonzero(in_ctx)
        names, means, var, counts = group_moments(real.X[idx], real.labels[idx])
        if control not in names:  # (its perturbed cells have no reference to be measured from)
            log.warning("The measured context %r has no control cells, so its %d perturbed groups (%s) are not "
                        "evaluated; give the measured file that context's control cells.", ctx, len(names),
                        preview(names, 4))
            continue
        ci = names.index(control)
        cand = [i for i, n in enumerate(names) if n != control]
        if not cand:
            continue
        c_mean, c_var, n_c = means[ci], var[ci], counts[ci]
        de = _welch_t(means[cand], var[cand], counts[cand], c_mean, c_var, n_c)
        effect = {}
        for i in cand:
            sq, noise = noise_corrected_sq_norm(means[i] - c_mean, var_a=var[i], n_a=counts[i], var_b=c_var, n_b=n_c)
            effect[names[i]] = signed_root(sq - noise)
        rc = _RealContext(ctx, tuple(names[i] for i in cand), means[cand], c_mean, de,
                          {names[i]: int(counts[i]) for i in cand}, effect)
        if cells:
            groups = {n: _sampled_cells(real, in_ctx & (real.labels == n), max_cells, rng) for n in names}
            stacked = np.concatenate(list(groups.values()), axis=0).astype(np.float64)
            rc.basis = pca(stacked, _N_COMPONENTS, seed=seed)
            rc.cells = {n: rc.basis.transform(g) for n, g in groups.items() if n != control}
            rc.control_cells = rc.basis.transform(groups[control])
        out.append(rc)
    return out


def _pairs(pred: Prepared, contexts: list[_RealContext], genes: pd.Index, control: str, *, cells: bool,
           max_cells: int | None, seed: int, method: str = "model") -> list[PredRealPair]:
    rng = np.random.default_rng(seed + 1)
    pairs = []
    for rc in contexts:
        in_ctx = pred.contexts == rc.context
        if not controls_in(pred, rc.context, control, rc.candidates, method):
            continue
        idx = np.flatnonzero(in_ctx)
        names, means, var, counts = group_moments(pred.X[idx], pred.labels[idx])
        row = {n: i for i, n in enumerate(names)}
        scored = [p for p in rc.candidates if p in row]
        if not scored:
            continue
        ci = [rc.candidates.index(p) for p in scored]
        pi, c = [row[p] for p in scored], row[control]
        pred_de = _welch_t(means[pi], var[pi], counts[pi], means[c], var[c], counts[c])
        pred_cells: dict[str, np.ndarray] = {}
        if cells and rc.basis is not None:
            for p in scored:
                pred_cells[p] = rc.basis.transform(_sampled_cells(pred, in_ctx & (pred.labels == p), max_cells, rng))
        pairs.append(PredRealPair(
            genes=tuple(str(g) for g in genes),
            context=rc.context,
            perturbations=tuple(scored),
            pred_means=means[[row[p] for p in scored]],
            real_means=rc.means[ci],
            pred_control=means[row[control]],
            real_control=rc.control,
            candidates=rc.candidates,
            candidate_deltas=rc.means - rc.control,
            real_de_score=rc.de_score[ci],
            pred_de_score=pred_de,
            pred_cells=pred_cells,
            real_cells={p: rc.cells[p] for p in scored if p in rc.cells},
            control_cells=rc.control_cells,
        ))
    return pairs


def _score(method: str, pairs: list[PredRealPair], groups: dict[tuple[str, str], tuple[int, float]],
           metrics: list[Metric]) -> list[tuple]:
    """Rows of the table; ``groups`` gives each measured group's size and effect size."""
    rows = []
    for pair in pairs:
        for m in metrics:
            try:
                values = m(pair)
            except Exception as err:
                if hasattr(err, "add_note"):
                    err.add_note(f"while computing metric {m.name!r} for {method!r} in context {pair.context!r}")
                raise
            for p in pair.perturbations:
                n, eff = groups[(p, pair.context)]
                rows.append((method, p, pair.context, m.name, float(values.get(p, np.nan)), m.direction, n, eff))
    return rows


# --------------------------------------------------------------------------- #
# Noise ceiling
# --------------------------------------------------------------------------- #
def _halves(real: Prepared, control: str, seed: int) -> tuple[Prepared, Prepared]:
    """Split every measured perturbed group in two halves; the controls all stay with the second."""
    rng = np.random.default_rng(seed + 2)
    first = np.zeros(len(real.labels), dtype=bool)
    keys = pd.Series(real.labels + "\x1f" + real.contexts.astype(str))
    for key, idx in keys.groupby(keys, sort=True).indices.items():
        if key.split("\x1f", 1)[0] == control or len(idx) < 2:
            continue
        first[rng.choice(idx, len(idx) // 2, replace=False)] = True

    def take(mask: np.ndarray) -> Prepared:
        i = np.flatnonzero(mask)
        return Prepared(real.X[i], real.labels[i], real.contexts[i], real.normalization)

    return take(first), take(~first)


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #
def evaluate(
    pred: ad.AnnData | None,
    real: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    context_key: str | None = None,
    gene_key: str | None = None,
    profile: str | Sequence[str | Metric] = "default",
    baselines: Sequence[str] | Mapping[str, Callable[..., ad.AnnData]] = DEFAULT_BASELINES,
    baseline: ad.AnnData | None = None,
    train: ad.AnnData | None = None,
    ceiling: bool = True,
    max_cells: int | None = 500,
    min_shared_genes: float = MIN_SHARED,
    threads: int = 1,
    seed: int = 0,
) -> pd.DataFrame:
    """Score a prediction against measured data, per perturbation and context, next to baselines.

    Deltas are ``mean(perturbed) - mean(control)``. The prediction's delta is taken against
    its own control cells (label ``control``: the model's decoded control), or against the
    baseline control cells where it has none; the measured delta against the measured
    (reference) control. Both inputs are put on the same genes (their intersection) and the
    same scale (raw counts are log1p-normalized with
    :func:`virtualcell.sentences.log_normalize`); what was done is in ``table.attrs["virtualcell"]``.

    With a cell-eval profile (``"vcc"``, ``"full"``, ``"minimal"``, ``"de"``, ``"anndata"``,
    ``"pds"``) the metrics are computed by the cell-eval library (Arc Institute; the Virtual
    Cell Challenge metrics: ``overlap_at_N``, ``discrimination_score_l1``, ``mae``,
    ``pearson_delta``, the DE metrics ...) on the same cells: the model, every baseline and the
    split-half ceiling each go through ``cell_eval.MetricsEvaluator``, context by context.
    virtualcell's own profiles (``"default"``, ``"fast"``, ``"pearson"``) use
    :data:`~virtualcell.evaluate.METRICS`.

    Parameters
    ----------
    pred
        Predicted cells, labelled like ``real``; ``None`` to score only the baselines.
    real
        The measured screen: perturbed cells and the reference control cells.
    perturbation_key, control, context_key
        The data contract; defaults to the one ``real`` carries. ``control`` may name several labels of control
        cells (``["NT_1", "NT_2"]``), all read as the first. With no context column given or stored, the
        prediction's (``uns['virtualcell']['context_key']``, which predicted cells record) is used where ``real``
        (and ``baseline``, ``train``) hold it; where they lack it and the cells are of several contexts, a warning
        says that the contexts are pooled.
    gene_key
        Var column holding the gene names in every input (default ``var_names``).
    profile
        A metric profile: virtualcell's (``"default"``, ``"fast"``, ``"pearson"``; see
        :data:`~virtualcell.evaluate.PROFILES`) or cell-eval's
        (:data:`~virtualcell.evaluate.CELL_EVAL_PROFILES`); or a list of metric names /
        :class:`Metric` objects.
    baselines
        Names of built-in baselines (:data:`~virtualcell.evaluate.BASELINES`) or a mapping
        ``name -> function`` with their signature; ``()`` for none.
    baseline
        The control cells fed to the model and to the baselines, independent of the measured
        controls (the first value of :func:`split_controls`). If ``None``, the control cells
        of ``real`` are split in two halves here (seeded): one for the baselines, one as the reference.
    train
        Measured data the baselines learn effects from (e.g. the training split). By default
        the perturbed cells of ``real`` with the baseline controls, leaving each target out.
    ceiling
        Also score the split-half noise ceiling (method ``"ceiling"``): half of every measured
        group against the other half.
    max_cells
        At most this many cells per group for the distribution metrics and baselines.
    min_shared_genes
        Refuse inputs that share fewer than this fraction of the smallest input's genes
        (after matching names ignoring case and Ensembl version suffixes).
    threads
        Threads for cell-eval's differential expression (cell-eval profiles only).
    seed
        Seed of every split and subsample.

    Returns
    -------
    DataFrame
        Tidy: one row per ``method`` (``"model"``, each baseline, ``"ceiling"``), ``perturbation``,
        ``context`` and ``metric``, with ``value``, ``direction`` (``"higher"``/``"lower"`` is better,
        ``"none"`` for counts), ``n_cells`` (measured cells of the group) and ``effect_size``
        (measured, corrected for group size; see :func:`effect_size`).

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> table = vc.evaluate.evaluate(None, ref, baseline=base, profile="fast")
    >>> sorted(table["method"].unique())
    ['additive', 'ceiling', 'linear', 'meanshift', 'nochange', 'pertmean']
    >>> vcc = vc.evaluate.evaluate(None, ref, baseline=base, profile="vcc", baselines=("additive",))  # doctest: +SKIP
    >>> sorted(vcc["metric"].unique())  # doctest: +SKIP
    ['discrimination_score_l1', 'mae', 'overlap_at_N']
    """
    table, _ = _run(pred, real, perturbation_key=perturbation_key, control=control, context_key=context_key,
                    gene_key=gene_key, profile=profile, baselines=baselines, baseline=baseline, train=train,
                    ceiling=ceiling, max_cells=max_cells, min_shared_genes=min_shared_genes, threads=threads,
                    seed=seed, deltas=False)
    return table


@one_reading
def _run(
    pred: ad.AnnData | None,
    real: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    context_key: str | None = None,
    gene_key: str | None = None,
    profile: str | Sequence[str | Metric] = "default",
    baselines: Sequence[str] | Mapping[str, Callable[..., ad.AnnData]] = DEFAULT_BASELINES,
    baseline: ad.AnnData | None = None,
    train: ad.AnnData | None = None,
    ceiling: bool = True,
    max_cells: int | None = 500,
    min_shared_genes: float = MIN_SHARED,
    threads: int = 1,
    seed: int = 0,
    deltas: bool = True,
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """:func:`evaluate` and, with ``deltas``, :func:`delta_table`, from one setup (the CLI needs both)."""
    if max_cells is not None and not whole_at_least(max_cells, 1):  # (0 dropped every baseline without a word)
        raise DataError(f"max_cells must be a whole number of at least 1, or None (every cell), got {max_cells!r}.")
    cell_eval = isinstance(profile, str) and profile in CELL_EVAL_PROFILES
    metrics = [] if cell_eval else resolve_metrics(profile)
    if cell_eval:
        require_cell_eval()
    if isinstance(baselines, str):
        baselines = (baselines,)
    if not isinstance(baselines, Mapping):
        unknown = [b for b in baselines if b not in BASELINES]
        if unknown:
            raise DataError(f"Unknown baselines {preview(unknown)}. Built in: {', '.join(BASELINES)}.")
        baselines = {b: BASELINES[b] for b in baselines}
    setup = _setup(pred, real, perturbation_key=perturbation_key, control=control, context_key=context_key,
                   baseline=baseline, train=train, seed=seed, gene_key=gene_key, min_shared=min_shared_genes)
    contract, genes, info = setup.contract, setup.genes, setup.info
    cells = any(m.needs_cells for m in metrics)
    contexts = _real_contexts(setup.real, contract.control, cells=cells, max_cells=max_cells, seed=seed)
    if not contexts:
        raise DataError(
            f"No context of the measured data has both control cells (label {contract.control!r}) and "
            "perturbed cells. Check the control label and the context column."
        )
    groups = {(p, rc.context): (rc.n_cells[p], rc.effect_size[p]) for rc in contexts for p in rc.candidates}
    kw = dict(cells=cells, max_cells=max_cells, seed=seed)

    def score(method: str, pred_p: Prepared, real_p: Prepared, ctxs: list[_RealContext]) -> list[tuple]:
        if cell_eval:
            return _celleval.score(method, pred_p, real_p, ctxs, [str(g) for g in genes], contract.control, groups,
                                   profile=str(profile), threads=threads)
        return _score(method, _pairs(pred_p, ctxs, genes, contract.control, method=method, **kw), groups, metrics)

    rows: list[tuple] = []
    pred_p = None
    if setup.pred is not None:
        pred_p = _with_control(setup.pred, setup.base, contract.control, info)
        known = set(zip(setup.real.labels, setup.real.contexts))
        extra = sorted({f"{p} in {c}" for p, c in zip(pred_p.labels, pred_p.contexts)
                        if p != contract.control and (p, c) not in known})
        if extra:
            info["pred_unmeasured"] = {"n": len(extra), "groups": extra[:20]}
            predicted = {(p, c) for p, c in zip(pred_p.labels, pred_p.contexts) if p != contract.control}
            measured = {p for p, _ in known if p != contract.control}
            one_sided = _one_sided_quantities({p for p, c in predicted if (p, c) not in known}, measured)
            # a label measured in other contexts only: predicted from cells of another cell type than those measured
            elsewhere = sorted({c for p, c in predicted if (p, c) not in known and p in measured})
            where = (f" {sum(1 for p, c in predicted if (p, c) not in known and p in measured)} of them were "
                     f"predicted from cells of contexts (obs[{contract.context_key!r}]: {preview(elsewhere, 6)}) where "
                     f"their label is not measured; the measured cells are of "
                     f"{preview(sorted({c for _, c in known}), 6)}."
                     if elsewhere and contract.context_key is not None else "")
            log.warning("%d predicted groups have no measured cells under that label and are not scored: %s (the "
                        "measured data's labels: %s).%s%s", len(extra), preview(extra, 5),
                        preview(sorted(measured), 8), where, one_sided)
            if not predicted & known:
                raise _none_measured(predicted, known, contract)
        rows += score("model", pred_p, setup.real, contexts)
    if baselines:
        base_ad = _as_anndata(setup.base, genes, contract)
        if setup.train is None:
            perturbed = setup.real.labels != contract.control
            train_ad = _as_anndata(
                Prepared(sp.vstack([setup.real.X[np.flatnonzero(perturbed)], setup.base.X]).tocsr(),
                         np.concatenate([setup.real.labels[perturbed], setup.base.labels]),
                         np.concatenate([setup.real.contexts[perturbed], setup.base.contexts]),
                         "log1p"),
                genes, contract)
        else:
            tp = prepare(setup.train, contract, genes, name="training", dose_units=setup.dose_units,
                         total=setup.total)
            train_ad = _as_anndata(tp, genes, contract)
        # the measured data's own names for its perturbed genes (knockouts labelled by symbol, genes by id): the
        # training cells handed to the baselines keep no var columns, so the link travels with them
        train_ad.uns[UNS_KEY]["gene_aliases"] = dict(setup.aliases)
        if (pred is not None and setup.pred is not None and "perturbation_typed" in pred.obs.columns
                and len(setup.pred.labels) == pred.n_obs):
            # each predicted label's typed form travels too: a cytokine named by its gene ('IFNG', trained without a
            # dose) is no knockout of that gene, which the coexpression baseline would otherwise predict it as
            # (by label, in uns: a perturbation held out whole has no training cell to carry it)
            forms = dict(zip(setup.pred.labels.astype(str), pred.obs["perturbation_typed"].astype(str)))
            train_ad.uns[UNS_KEY]["typed_forms"] = {k: v for k, v in forms.items() if v}
        targets = [(p, rc.context) for rc in contexts for p in rc.candidates]
        for name, fn in baselines.items():
            out = fn(train_ad, baseline=base_ad, targets=targets, perturbation_key=contract.perturbation_key,
                     control=contract.control, context_key=contract.context_key, max_cells=max_cells, seed=seed)
            bp = prepare(out, contract, genes, name=f"baseline {name!r}")
            scored = score(name, bp, setup.real, contexts)
            if not scored:
                info.setdefault("baselines_empty", []).append(name)
            rows += scored
    if ceiling:
        half_a, half_b = _halves(setup.real, contract.control, seed)
        ceiling_contexts = _real_contexts(half_b, contract.control, cells=cells, max_cells=max_cells, seed=seed)
        pred_half = Prepared(sp.vstack([half_a.X, setup.base.X]).tocsr(),
                             np.concatenate([half_a.labels, setup.base.labels]),
                             np.concatenate([half_a.contexts, setup.base.contexts]), "log1p")
        rows += score("ceiling", pred_half, half_b, ceiling_contexts)
        info["ceiling"] = ("half of every measured group against the other half (n_cells is the full group): how "
                           "well a replicate of half the cells agrees, not an upper bound, since a prediction is "
                           "scored against all the cells, whose mean is less noisy (the exact population mean "
                           "scores above it)")
    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if cell_eval:
        info["engine"] = f"cell-eval {_version('cell-eval')}, profile {profile!r}"
        info["metrics"] = {m: {"direction": d} for m, d in dict(zip(table["metric"], table["direction"])).items()}
    else:
        info["metrics"] = {m.name: {"direction": m.direction, "description": m.description} for m in metrics}
    table.attrs[UNS_KEY] = info
    frame = _deltas(setup, pred_p, contexts) if deltas and pred_p is not None else None
    return table, frame


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:  # pragma: no cover
        return "?"


# --------------------------------------------------------------------------- #
# Deltas for plots
# --------------------------------------------------------------------------- #
@one_reading
def delta_table(
    pred: ad.AnnData,
    real: ad.AnnData,
    *,
    perturbation_key: str | None = None,
    control: str | Sequence[str] | None = None,
    context_key: str | None = None,
    gene_key: str | None = None,
    baseline: ad.AnnData | None = None,
    min_shared_genes: float = MIN_SHARED,
    seed: int = 0,
) -> pd.DataFrame:
    """Predicted and measured delta of every gene, perturbation and context, as :func:`evaluate` sees them.

    With the same ``baseline`` and ``seed`` the deltas are exactly those :func:`evaluate` scores.

    Parameters
    ----------
    pred, real, perturbation_key, control, context_key, gene_key, baseline, min_shared_genes, seed
        As in :func:`evaluate`.

    Returns
    -------
    DataFrame
        Long form: ``perturbation``, ``context``, ``gene``, ``predicted``, ``measured``,
        ``top_de`` (one of the 50 top measured DE genes), ``effect_size`` (measured, corrected).

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> pred = vc.evaluate.baselines.meanshift(ref, baseline=base)
    >>> d = vc.evaluate.delta_table(pred, ref, baseline=base)
    >>> list(d.columns)[:4]
    ['perturbation', 'context', 'gene', 'predicted']
    """
    setup = _setup(pred, real, perturbation_key=perturbation_key, control=control, context_key=context_key,
                   baseline=baseline, train=None, seed=seed, gene_key=gene_key, min_shared=min_shared_genes)
    contexts = _real_contexts(setup.real, setup.contract.control, cells=False, max_cells=None, seed=seed)
    pred_p = _with_control(setup.pred, setup.base, setup.contract.control, setup.info)
    return _deltas(setup, pred_p, contexts)


def _deltas(setup: _Setup, pred_p: Prepared, contexts: list[_RealContext]) -> pd.DataFrame:
    frames = []
    for pair in _pairs(pred_p, contexts, setup.genes, setup.contract.control, cells=False, max_cells=None, seed=0):
        rc = next(r for r in contexts if r.context == pair.context)
        n_g = len(pair.genes)
        top = np.zeros(pair.real_delta.shape, dtype=bool)
        np.put_along_axis(top, pair.top_de, True, axis=1)
        frames.append(pd.DataFrame({
            "perturbation": np.repeat(pair.perturbations, n_g),
            "context": pair.context,
            "gene": np.tile(pair.genes, len(pair.perturbations)),
            "predicted": pair.pred_delta.ravel(),
            "measured": pair.real_delta.ravel(),
            "top_de": top.ravel(),
            "effect_size": np.repeat([rc.effect_size[p] for p in pair.perturbations], n_g),
        }))
    if not frames:
        raise _nothing_scored(setup, pred_p, contexts)
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- #
# Markdown summary
# --------------------------------------------------------------------------- #
def on_model_groups(table: pd.DataFrame) -> pd.DataFrame:
    """The rows of ``table`` on the perturbation x context groups the model predicts (all rows without a model):
    what :func:`summarize` and :func:`~virtualcell.evaluate.plot_metric_bars` average over, so that every method's
    mean covers the same groups as the model's."""
    if "model" not in set(table["method"]):
        return table
    keys = table.loc[table["method"] == "model", ["perturbation", "context"]].drop_duplicates()
    out = table.merge(keys, on=["perturbation", "context"])
    out.attrs = dict(table.attrs)
    return out


def summarize(table: pd.DataFrame, *, metrics: Sequence[str] | None = None, title: str = "Evaluation",
              common: bool = True) -> str:
    """A markdown summary of an :func:`evaluate` table: mean (median) of every metric per method.

    With ``common`` (default) and a model in the table, every method is summarized over the
    perturbation x context groups the model predicts, so that the columns compare like with
    like; otherwise over the groups each method could predict (their number is the first
    row). The best method per metric, ceiling aside, is in bold.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load("perturbench")
    >>> base, ref = vc.evaluate.split_controls(adata, seed=0)
    >>> table = vc.evaluate.evaluate(None, ref, baseline=base, profile="pearson")
    >>> print(vc.evaluate.summarize(table).splitlines()[0])
    ## Evaluation
    """
    missing = [c for c in ("method", "metric", "value", "direction") if c not in table.columns]
    if missing:
        raise DataError(f"This is not an evaluate() table: columns {missing} are missing.")
    info = table.attrs.get(UNS_KEY, {})
    methods = list(dict.fromkeys(table["method"]))
    metric_names = list(dict.fromkeys(table["metric"])) if metrics is None else list(metrics)
    lines = [f"## {title}", ""]
    if info:
        if "n_genes" in info:
            dropped = info.get("genes_dropped", {})
            d = "; dropped " + ", ".join(f"{v['n']} from {k}" for k, v in dropped.items()) if dropped else ""
            lines.append(f"- genes: {info['n_genes']} shared{d}")
        if "engine" in info:
            lines.append(f"- metrics: {info['engine']}")
        if "normalization" in info:
            lines.append("- scale: " + ", ".join(f"{k}: {v}" for k, v in info["normalization"].items()))
        if "measured_is_training_data" in info:
            lines.append(f"- **caution**: {info['measured_is_training_data']}")
        for key, label in (("contexts", "contexts"), ("controls", "controls"), ("pred_control", "prediction's control"),
                           ("ceiling", "ceiling")):
            if key in info:
                lines.append(f"- {label}: {info[key]}")
        if info.get("baselines_empty"):
            lines.append(f"- baselines that predict none of these groups: {', '.join(info['baselines_empty'])} "
                         "(meanshift needs the perturbation measured in another context, pertmean and linear other "
                         "perturbations in the context, additive the parts of a pair, coexpression a measured gene; "
                         "--train gives them training cells)")
        if "pred_unmeasured" in info:
            extra = info["pred_unmeasured"]
            lines.append(f"- not scored: {extra['n']} predicted groups with no measured cells under that label "
                         f"({preview(extra['groups'], 8)})")
    n_pert = table[["perturbation", "context"]].drop_duplicates().shape[0]
    if common and "model" in methods:
        table = on_model_groups(table)
        n_model = table.loc[table["method"] == "model", ["perturbation", "context"]].drop_duplicates().shape[0]
        lines.append(f"- {n_pert} perturbation x context groups; values are mean (median) over the {n_model} "
                     "groups the model predicts, for every method")
    else:
        lines.append(f"- {n_pert} perturbation x context groups; values are mean (median) over the groups "
                     "each method predicts")
    lines.append("")
    lines.append("| metric | better | " + " | ".join(methods) + " |")
    lines.append("|---|---|" + "---|" * len(methods))
    counts = table.groupby("method")[["perturbation", "context"]].apply(lambda d: len(d.drop_duplicates()))
    lines.append("| groups scored | | " + " | ".join(str(int(counts.get(m, 0))) for m in methods) + " |")
    for metric in metric_names:
        sub = table[table["metric"] == metric]
        if sub.empty:
            continue
        direction = sub["direction"].iloc[0]
        stats = sub.groupby("method")["value"].agg(["mean", "median"])
        # bold: the best of the methods scored on every group the table covers (a mean over 2 of 8 groups is
        # no match for one over all 8; the groups scored row says which are partial)
        full = max((int(counts.get(m, 0)) for m in methods if m != "ceiling"), default=0)
        contenders = [m for m in methods if m != "ceiling" and m in stats.index and np.isfinite(stats.loc[m, "mean"])
                      and int(counts.get(m, 0)) == full]
        best = None
        if contenders and direction in ("higher", "lower"):
            pick = max if direction == "higher" else min
            best = pick(contenders, key=lambda m: stats.loc[m, "mean"])
        cells = []
        for m in methods:
            if m not in stats.index:
                cells.append("")
                continue
            text = f"{stats.loc[m, 'mean']:.3g} ({stats.loc[m, 'median']:.3g})"
            cells.append(f"**{text}**" if m == best else text)
        lines.append(f"| {metric} | {direction} | " + " | ".join(cells) + " |")
    notes = []
    for m in metric_names:
        values = table.loc[table["metric"] == m, "value"].to_numpy(dtype=float)
        missing = int((~np.isfinite(values)).sum())
        if m not in UNDEFINED_WHEN or not missing:
            continue
        if missing == len(values):
            notes.append(f"nan: {m} {UNDEFINED_WHEN[m]}.")
        else:  # the mean and median above leave these rows out
            notes.append(f"nan: {m} is NaN in {missing} of {len(values)} rows (method x group), left out of its mean "
                         f"and median: it {UNDEFINED_WHEN[m]}.")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


# why a metric can be NaN for every group, for the line under summarize()'s table
UNDEFINED_WHEN = {"discrimination": "ranks a prediction among the context's measured perturbations, and needs two",
                  "compare_distance": "needs cells of the prediction, the measured perturbation and the controls",
                  "de_overlap_top50": "needs more than 50 genes (with fewer, all of them are both tops)"}
