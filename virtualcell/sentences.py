"""Cell sentences: the Cell2Sentence transform, its inverse, and a robust parser.

A *cell sentence* is the list of a cell's expressed genes ordered by descending
expression (van Dijk lab, Cell2Sentence). This module turns an AnnData into cell
sentences, fits the rank → expression map that inverts the transform, decodes
sentences (or generated text) back into an expression matrix, and does it all
vectorized over the sparse matrix: there is no Python loop over cells.

It is pure numpy/scipy: importing it does not import torch.

Examples
--------
>>> import virtualcell as vc
>>> adata = vc.datasets.load("papalexi2021")[:500]
>>> cs = vc.sentences.encode(adata, top_k=50, seed=0)
>>> cs.to_text()[0].split()[:3]
['BTG1', 'PSMA7', 'TMA7']
>>> fit = vc.sentences.RankFit.fit(adata, cs)
>>> X = vc.sentences.decode(cs, fit)  # cells x genes, float32, sparse
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from itertools import repeat
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import scipy.sparse as sp

from .errors import DataError, VocabularyError, finite_number, preview, whole_at_least

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from .contract import DataContract

__all__ = [
    "Vocabulary",
    "CellSentences",
    "RankFit",
    "ParseReport",
    "encode",
    "decode",
    "roundtrip",
    "parse_text",
    "expression_matrix",
    "detect_scale",
    "log_normalize",
    "with_gene_key",
    "require_symbols",
    "gene_match_key",
    "normalization_label",
    "model_expression",
    "target_aliases",
]

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 200
TARGET_SUM = 1e4
_ENSEMBL = re.compile(r"^ENS[A-Z]*[GTP]\d{6,}(\.\d+)?$", re.IGNORECASE)
_VERSION = re.compile(r"^(ENS[A-Z]*[GTP]\d{6,})\.\d+$", re.IGNORECASE)
_STRIP = ".,;:!?\"'()[]{}"


# --------------------------------------------------------------------------- #
# Expression matrices: validation and normalization
# --------------------------------------------------------------------------- #
def require_in_memory(adata: ad.AnnData, what: str = "The AnnData") -> None:
    """Refuse an AnnData read with ``backed='r'``: virtualcell reads expression in memory, and a backed file failed
    differently at each entry point (train, evaluate, split_controls: anndata's and numpy's errors). Anything but an
    AnnData (a matrix, a DataFrame) is refused naming what to build, a path naming how to read it."""
    if isinstance(adata, str | os.PathLike):  # (the CLI takes paths, so a path is tried here too)
        raise DataError(f"{what} must be an AnnData, got the path {str(adata)!r}: read it first, adata = "
                        "vc.datasets.read_h5ad(path) (with contract=DataContract(...) where the file carries none).")
    if not all(hasattr(adata, a) for a in ("X", "obs", "var", "obs_names", "var_names")):
        raise DataError(f"{what} must be an AnnData (cells x genes, with gene names), got {type(adata).__name__}: "
                        "wrap a matrix as anndata.AnnData(X, obs=pd.DataFrame(index=cell_names), "
                        "var=pd.DataFrame(index=gene_names)), or read a file with vc.datasets.read_h5ad(path).")
    if getattr(adata, "isbacked", False):
        raise DataError(f"{what}: the AnnData was read with backed='r' (its expression stays on disk), and "
                        "virtualcell reads expression in memory: load it first, adata = adata.to_memory() (or a "
                        "subset: adata[cells].to_memory()).")


def expression_matrix(adata: ad.AnnData, *, layer: str | None = None) -> sp.csr_matrix:
    """The cells × genes matrix of ``adata`` as float32 CSR, after checking its values.

    Raises :class:`~virtualcell.errors.DataError` for an empty AnnData, a missing
    layer, or negative, NaN or infinite values, each with the fix.
    """
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise DataError(
            f"The AnnData is empty ({adata.n_obs} cells x {adata.n_vars} genes). "
            "Check the filter or subset that produced it; virtualcell needs at least one cell and one gene."
        )
    if layer is None:
        X = adata.X
        where = "adata.X"
    else:
        if layer not in adata.layers:
            raise DataError(
                f"Layer {layer!r} is not in the AnnData. Available layers: "
                f"{preview(adata.layers.keys()) or 'none'}; leave the layer out (CLI: no --layer; Python: layer=None) to use adata.X."
            )
        X = adata.layers[layer]
        where = f"adata.layers[{layer!r}]"
    if X is None:
        raise DataError(f"{where} is empty (None). Put the expression matrix there or choose another layer.")
    if getattr(adata, "isbacked", False) and not sp.issparse(X) and not isinstance(X, np.ndarray):
        require_in_memory(adata, where)
    if sp.issparse(X):
        X = sp.csr_matrix(X, dtype=np.float32, copy=False)
        values = X.data
    else:
        X = np.asarray(X, dtype=np.float32)
        values = X
    _check_values(values, where)
    if not sp.issparse(X):
        X = sp.csr_matrix(X)
    if not X.has_sorted_indices:
        # a dtype conversion with copy=False can share the caller's index arrays: sort a copy,
        # never the caller's matrix in place
        X = X.copy()
        X.sort_indices()
    return X


def data_hash(adata: ad.AnnData, contract: DataContract) -> str:
    """A short digest of ``adata``'s expression, perturbation labels (as ``contract`` reads them) and gene names:
    what a training run records of the data it was given (``data_hash``) and trained on, so that a resumed run, a
    verdict run again and an evaluation can tell that file again."""
    import hashlib

    X = expression_matrix(adata)
    h = hashlib.sha256()
    for arr in (X.data, X.indices, X.indptr):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(contract.labels(adata)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    return h.hexdigest()[:16]


def _check_values(values: np.ndarray, where: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        raise DataError(
            f"{where} holds {n_nan} NaN and {int(bad.sum()) - n_nan} infinite values. "
            "Expression must be finite: fix or remove the affected cells (for example "
            "adata = adata[np.isfinite(np.asarray(adata.X.sum(axis=1))).ravel()]) before encoding."
        )
    if values.size and values.min() < 0:
        raise DataError(
            f"{where} holds {int((values < 0).sum())} negative values (min {float(values.min()):.3g}). "
            "Cell sentences rank expression, which must be >= 0: pass raw counts or log-normalized "
            "values, not scaled/centered data: put the values saved before sc.pp.scale back in X and write the "
            "file again (adata.X = adata.layers['counts'], or adata = adata.raw.to_adata())."
        )


# above this, values that are not whole numbers are not on a log scale: log1p of counts per million stays below 14,
# and log1p(1e13) is 30 (so this is no tuned constant: any log-normalized matrix is far below it)
LOG_SCALE_MAX = 30.0


def detect_scale(X: sp.spmatrix | np.ndarray) -> Literal["counts", "log1p"]:
    """``"counts"`` if every stored value is a whole number, else ``"log1p"`` (already normalized), read from up to
    :data:`MAX_SCALE_ROWS` cells spread over ``X``.

    Refused, naming the fix: values that are not whole numbers and reach past :data:`LOG_SCALE_MAX` (normalized but
    not logged, or corrected counts: CellBender, SoupX), which read as log1p would put every prediction on the wrong
    scale; cells of whole numbers beside cells of logged values (files on two scales concatenated); counts with a few
    values that are not whole numbers (to be rounded); log2(1 + counts).
    """
    # cell by cell (up to MAX_SCALE_ROWS cells spread over the matrix): a cell of raw counts has only whole numbers,
    # a cell of logged values hardly ever does. Stretches of stored values (each mixing cells) missed files
    # concatenated and then sorted, whose every stretch held both kinds, and read them as log1p.
    rows, whole, top, share = _whole_rows(X)
    if whole.all():  # (a matrix of zeros too: nothing says otherwise)
        return "counts"
    values = (X.data if sp.issparse(X) else np.asarray(X).ravel())[:1_000_000].astype(np.float64)
    odd = values[np.mod(values, 1) != 0]  # (log2 keeps counts 1, 3, 7 whole: it can pass as counts with a few odd)
    odd = odd[odd < 60]  # (2**x past that is no count; numpy would warn of overflow)
    if odd.size and np.mean(np.abs(np.exp2(odd) - 1 - np.rint(np.exp2(odd) - 1)) < 1e-3) > 0.99:
        raise DataError(
            "The expression values look like log2(1 + counts) (2**x - 1 is a whole number for nearly every value "
            "that is not one), which read as counts or as log1p would put every prediction on the wrong scale. Give "
            "raw counts: adata.X = np.rint(np.exp2(adata.X) - 1) (for a sparse X, on adata.X.data).")
    if share < 0.5:  # mostly whole numbers: counts with a few values that are not
        rows = rows[~whole]
        among = " among cells of raw counts" if whole.any() else ""
        raise DataError(
            f"{int((~whole).sum())} of {whole.size} cells checked hold values that are not whole numbers (e.g. rows "
            f"{', '.join(str(int(r)) for r in rows[:3])}; {share:.0%} of their values){among}. If they are counts "
            "(corrected or averaged), round them: adata.X = np.rint(adata.X).")
    if top > LOG_SCALE_MAX:  # (normalized values of a cell whose total divides 1e4 can be whole: not a mix)
        raise DataError(
            f"The expression values are not whole numbers, so they are not raw counts, and they reach {top:.4g}, "
            f"which no log-normalized data does (log1p of counts per million stays below 14): they look normalized "
            "but not logged, or like corrected counts (CellBender, SoupX). virtualcell reads raw counts (whole "
            "numbers) or log1p-normalized values: log them first (sc.pp.log1p(adata)), or give it raw counts "
            "(corrected ones rounded: adata.X = np.rint(adata.X)).")
    if whole.any():  # logged cells beside cells of whole numbers, which no logged cell is
        rows = rows[whole]
        raise DataError(
            f"The expression matrix mixes scales: {int(whole.sum())} of {whole.size} cells checked hold only whole "
            f"numbers (raw counts; e.g. rows {', '.join(str(int(r)) for r in rows[:3])}), the others logged values, "
            "as when files on different scales are concatenated. Put every cell on one scale first (raw counts "
            "throughout, e.g. from each file's .layers['counts'] or .raw, or log1p-normalized throughout).")
    return "log1p"


MAX_SCALE_ROWS = 20_000  # cells detect_scale checks one by one (spread evenly over the matrix)
# log1p values whose median totals are more than this many-fold apart were normalized to different totals (cells of
# one normalization differ by their make-up, cell lines and depth, several-fold over a gene panel): the one threshold
# of the warnings that say so
SCALE_APART = 25.0


def _whole_rows(X: sp.spmatrix | np.ndarray) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Up to :data:`MAX_SCALE_ROWS` cells spread over ``X`` that express three genes or more (any where none does;
    their rows), for each whether every value it stores is a whole number, the largest value of the others (0 where
    there are none) and the share of their values that are not whole numbers."""
    n = X.shape[0]
    rows = np.unique(np.linspace(0, n - 1, min(n, MAX_SCALE_ROWS)).astype(np.int64)) if n else np.zeros(0, np.int64)
    if sp.issparse(X):
        sub = (X if sp.isspmatrix_csr(X) or isinstance(X, sp.csr_array) else sp.csr_matrix(X))[rows]

        def per_row(flags: np.ndarray) -> np.ndarray:
            total = np.concatenate([[0], np.cumsum(flags, dtype=np.int64)])
            return total[sub.indptr[1:]] - total[sub.indptr[:-1]]

        nonzero, bad = per_row(sub.data != 0), per_row(np.mod(sub.data, 1) != 0)
        row_of = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
        others = sub.data[bad[row_of] > 0]
    else:
        sub = np.asarray(X)[rows]
        nonzero, bad = (sub != 0).sum(axis=1), (np.mod(sub, 1) != 0).sum(axis=1)
        others = sub[np.asarray(bad).ravel() > 0]
    nonzero, bad = np.asarray(nonzero).ravel(), np.asarray(bad).ravel()
    # cells of three values or more, where there are any: a cell of one or two can be whole by chance (log1p of a
    # near-empty droplet stored as float16: log1p(2981) is 8.0)
    expressing = nonzero >= 3 if (nonzero >= 3).any() else nonzero > 0
    share = float(bad.sum() / max(nonzero[bad > 0].sum(), 1))  # of the other cells' values, those not whole
    return (rows[expressing], bad[expressing] == 0, float(np.max(others)) if others.size else 0.0, share)


def median_log1p_total(X: sp.spmatrix) -> float | None:
    """The cells' median total of log1p values ``X`` on the linear scale, ``expm1`` summed in float64 (cells with
    none left out; None where no cell has any): what they were normalized to."""
    return _median_total(_expm1(X, np.float64))


def log_normalize(X: sp.csr_matrix, scale: str, *, total: float | None = None) -> sp.csr_matrix:
    """The project's normalization: counts → log1p(counts / cell total * ``total``), ``total`` 1e4 unless a model
    trained on log1p values at another total reads them (:attr:`RankFit.total`); log1p input unchanged."""
    if scale == "log1p":
        return X
    if scale != "counts":
        raise DataError(f"Unknown expression scale {scale!r}; expected 'counts' or 'log1p'.")
    totals = np.asarray(X.sum(axis=1)).ravel()
    totals[totals == 0] = 1.0
    out = sp.csr_matrix(X, dtype=np.float32, copy=True)
    out.data *= np.repeat(((total or TARGET_SUM) / totals).astype(np.float32), np.diff(out.indptr))
    np.log1p(out.data, out=out.data)
    return out


_NORMALIZATION = {"counts": "log1p_cp10k", "log1p": "as_is_log1p"}


def normalization_label(scale: str) -> str:
    """What :func:`log_normalize` did to data of ``scale``, as recorded in checkpoints and results:
    ``"log1p_cp10k"`` (counts normalized to 1e4 per cell, then log1p) or ``"as_is_log1p"``."""
    if scale not in _NORMALIZATION:
        raise DataError(f"Unknown expression scale {scale!r}; expected 'counts' or 'log1p'.")
    return _NORMALIZATION[scale]


def onto_cp10k(X: sp.csr_matrix, *, total: float | None = None) -> tuple[sp.csr_matrix, float]:
    """log1p values (CSR, float32) normalized again to 1e4 per cell over their columns, ``log1p(1e4 · e / Σ e)``
    with ``e = expm1(x)``: the scale a model trained on raw counts reads (``"log1p_cp10k"`` over its genes), whatever
    total (scanpy's default is the median library size) or gene set the values were normalized to. Returns it and the
    cells' median total of ``e`` before (1e4 where they were on that scale already). ``total``: another per-cell total
    than 1e4 to put them onto."""
    linear = _expm1(X, np.float32)
    had = _median_total(linear) or TARGET_SUM
    return log_normalize(linear, "counts", total=total), had  # the project's one normalization, as for counts


def _expm1(X: sp.spmatrix, dtype: type) -> sp.csr_matrix:
    """log1p values back on their linear scale, ``expm1(x)``, as a CSR copy of ``dtype``."""
    linear = sp.csr_matrix(X, dtype=dtype, copy=True)
    np.expm1(linear.data, out=linear.data)
    return linear


def _median_total(linear: sp.csr_matrix) -> float | None:
    """The cells' median total on the linear scale (cells with none left out; None where no cell has any): what log1p
    values were normalized to (:func:`onto_cp10k`, :attr:`RankFit.total`)."""
    totals = np.asarray(linear.sum(axis=1)).ravel()
    return float(np.median(totals[totals > 0])) if (totals > 0).any() else None


def model_expression(adata: ad.AnnData, genes: Vocabulary, *, layer: str | None = None,
                     total: float | None = None) -> tuple[sp.csr_matrix, str]:
    """Log-normalized expression of ``adata`` with one column per gene of ``genes`` (a model's
    vocabulary; zeros for genes ``adata`` lacks), as float32 CSR, and the scale the data came in.

    Raw counts are normalized over the model's genes that ``adata`` has, as the model's training cells were (their
    genes are the model's): a file with genes beyond the model's (a full transcriptome beside a 2,000-gene model)
    would otherwise put each cell lower on the model's scale by its counts on genes the model never reads.
    ``total``: the per-cell total counts are normalized to (1e4 unless given, :attr:`RankFit.total`)."""
    X = expression_matrix(adata, layer=layer)
    scale = detect_scale(X)
    col = genes.ids(Vocabulary.from_adata(adata).genes, missing="mark")
    keep = col >= 0
    Xn = log_normalize(X[:, np.flatnonzero(keep)], scale, total=total).tocoo()
    out = sp.csr_matrix((Xn.data, (Xn.row, col[keep][Xn.col])), shape=(adata.n_obs, len(genes)), dtype=np.float32)
    return out, scale


def on_model_scale(adata: ad.AnnData, genes: Vocabulary, *, fit: RankFit | None,
                   what: str = "baseline") -> tuple[sp.csr_matrix, str, str]:
    """``adata``'s expression as a model reads it, the model's scale read off its rank fit ``fit``
    (:attr:`RankFit.normalization` and :attr:`RankFit.total`): :func:`model_expression` (one column per gene of
    ``genes``, counts normalized over them to the per-cell total its training cells had: 1e4 for a model trained on
    raw counts, the median of its log1p training cells' totals for one trained on log1p values); for a model trained
    on raw counts, log1p values normalized to another total (scanpy's default: the median library) or over other
    genes put onto its 1e4 per cell (:func:`onto_cp10k`), with a log line naming ``what``. Returns the matrix, the
    scale the data came in and the normalization its values now have (:func:`normalization_label`). The one reading of
    cells onto a model's scale: the Simulator's baseline, a screen's target state."""
    counts_trained = getattr(fit, "normalization", None) == normalization_label("counts")
    log1p_total = None if counts_trained else getattr(fit, "total", None)
    X, scale = model_expression(adata, genes, total=log1p_total)
    normalization = normalization_label(scale)
    if scale == "log1p" and counts_trained:
        # each prediction adds the model's change to these values: on another scale, to the wrong ones
        X, had = onto_cp10k(X)
        normalization = normalization_label("counts")  # what the values now are: log1p of 1e4 per cell
        if not 0.9 <= had / TARGET_SUM <= 1.1:
            (log.warning if not 0.5 <= had / TARGET_SUM <= 2.0 else log.info)(
                "The %s's log1p values were normalized to a median of %.4g per cell over the model's genes and the "
                "model's training cells to %g (it trained on raw counts): normalized again onto the model's scale. "
                "(Values on a log2 scale, or normalized but never logged, cannot be told from log1p: give raw counts "
                "where you can.)", what, had, TARGET_SUM)
    elif scale == "log1p" and log1p_total:
        # a model trained on log1p values: cells are not put onto one total (its training cells' totals varied, by
        # cell line and depth, several-fold over a gene panel), but values normalized to another total altogether are
        # not on its scale
        had = median_log1p_total(X) or log1p_total
        if not 1 / SCALE_APART <= had / log1p_total <= SCALE_APART:
            log.warning("The %s's log1p values were normalized to a median of %.4g per cell over the model's genes, "
                        "its training cells' to %.4g (it trained on log1p values; more than %g-fold apart): "
                        "predictions add the model's changes to values on another scale. Give raw counts, or log1p "
                        "values normalized as the training data were (scanpy's normalize_total with the same "
                        "target_sum).", what, had, log1p_total, SCALE_APART)
    elif scale == "counts" and fit is not None and not counts_trained:
        # a model trained on log1p values (scanpy's layout): counts go to its training cells' total, not to 1e4
        normalization = normalization_label("log1p")  # the model's scale, which the values are now on
        if log1p_total is not None:
            log.info("The %s's raw counts were normalized to %.4g per cell over the model's genes (its training "
                     "cells' median total: it trained on log1p values), then log1p'd.", what, log1p_total)
        else:
            log.warning("The %s holds raw counts and the model trained on log1p values without recording their "
                        "total (a checkpoint from before it did): the counts were normalized to %g per cell, which "
                        "may not be the model's scale. Give log1p values normalized as its training data were.",
                        what, TARGET_SUM)
    return X, scale, normalization


# --------------------------------------------------------------------------- #
# Gene identifiers
# --------------------------------------------------------------------------- #
def gene_positions(have: Sequence[object], want: Sequence[object]) -> np.ndarray:
    """Where each name of ``want`` sits in ``have``: the same name, else the same :func:`gene_match_key` (case and
    an Ensembl version suffix aside), the first such; -1 where none."""
    exact: dict[str, int] = {}
    keyed: dict[str, int] = {}
    for i, g in enumerate(have):
        exact.setdefault(str(g), i)
        keyed.setdefault(gene_match_key(g), i)
    return np.array([exact.get(str(g), keyed.get(gene_match_key(g), -1)) for g in want], dtype=np.int64)


def gene_match_key(name: object) -> str:
    """The key two spellings of one gene share: upper case, Ensembl version suffix dropped.

    ``"Stat1"`` and ``"STAT1"`` share a key, as do ``"ENSG00000118785.13"`` and
    ``"ENSG00000118785"``.

    Examples
    --------
    >>> gene_match_key("ENSG00000118785.13"), gene_match_key("Stat1")
    ('ENSG00000118785', 'STAT1')
    """
    text = str(name).upper()
    m = _VERSION.match(text)
    return m.group(1) if m else text


def _looks_ensembl(names: Any) -> tuple[int, str | None]:
    hits = [n for n in (str(x) for x in names) if _ENSEMBL.match(n)]
    return len(hits), (hits[0] if hits else None)


def require_symbols(names: Any, *, what: str = "A text model (C2S prompt)") -> None:
    """Refuse gene names that are mostly Ensembl ids where a model reads them as text.

    The project's own gene-level models give each gene one token, so ids work there;
    a text model (C2S-Scale, ``--base``) reads gene symbols.

    Raises
    ------
    VocabularyError
        When more than half of ``names`` look like Ensembl ids, naming the flag that fixes it.
    """
    names = [str(n) for n in names]
    n_ens, example = _looks_ensembl(names)
    if names and n_ens > len(names) / 2:
        raise VocabularyError(
            f"{n_ens} of {len(names)} gene names look like Ensembl ids (e.g. {example!r}). {what} reads gene "
            "symbols: pass --gene-key COLUMN on the command line (gene_key='COLUMN' in Python) naming a var "
            "column that holds symbols, or map the ids to symbols first. The project's own gene-level models "
            "(virtualcell train without --base) take Ensembl ids as they are."
        )


def with_gene_key(adata: ad.AnnData, gene_key: str | None) -> ad.AnnData:
    """``adata`` with its gene names taken from the var column ``gene_key`` (``None``: as it is).

    The expression is shared, not copied. The former ``var_names`` stay in
    ``var["var_names_before_gene_key"]``.

    Raises
    ------
    VocabularyError
        If the column does not exist, has empty values, or names a gene twice.

    Examples
    --------
    >>> import anndata as ad, numpy as np, pandas as pd
    >>> a = ad.AnnData(np.ones((1, 2)), var=pd.DataFrame({"symbol": ["MYC", "TP53"]}, index=["ENSG1", "ENSG2"]))
    >>> list(with_gene_key(a, "symbol").var_names)
    ['MYC', 'TP53']
    """
    if gene_key is None:
        return adata
    import anndata as ad
    import pandas as pd

    if gene_key not in adata.var.columns:
        raise VocabularyError(
            f"gene_key {gene_key!r} (--gene-key): there is no such var column. var columns: "
            f"{preview(adata.var.columns) or 'none'}; leave it out to use var_names "
            f"(e.g. {preview(adata.var_names[:3], 3)})."
        )
    col = adata.var[gene_key]
    names = col.astype(str).str.strip()
    empty = col.isna().to_numpy() | (names == "").to_numpy() | names.str.lower().isin(["nan", "none"]).to_numpy()
    if empty.any():
        raise VocabularyError(
            f"gene_key {gene_key!r} (--gene-key): {int(empty.sum())} of {adata.n_vars} genes have no name in that column "
            f"(e.g. var_names {preview(adata.var_names[empty], 3)}). Drop them first, e.g. "
            f"adata = adata[:, adata.var[{gene_key!r}].notna()], or fill them in."
        )
    dup = names[names.duplicated()].unique()
    if len(dup):
        raise VocabularyError(
            f"gene_key {gene_key!r} (--gene-key): {len(dup)} names occur more than once in that column ({preview(dup, 5)}). "
            "Each gene needs its own name: keep one row per name, or use another column."
        )
    var = adata.var.copy()
    var["var_names_before_gene_key"] = adata.var_names.astype(str)
    var.index = pd.Index(names.to_numpy(), dtype=object)
    out = ad.AnnData(X=adata.X, obs=adata.obs, var=var, uns=dict(adata.uns), layers=dict(adata.layers),
                     obsm=dict(adata.obsm))
    return out


def _gene_key_alias(gene_key: str | None, var_key: str | None, *, stacklevel: int = 3) -> str | None:
    """``gene_key``, or the deprecated ``var_key`` with a warning."""
    if var_key is None:
        return gene_key
    import warnings

    warnings.warn("var_key= is deprecated; use gene_key= (the same option under its new name).",
                  DeprecationWarning, stacklevel=stacklevel)
    if gene_key is not None and gene_key != var_key:
        raise DataError(f"gene_key={gene_key!r} and var_key={var_key!r} disagree; pass only gene_key.")
    return var_key


# --------------------------------------------------------------------------- #
# Vocabulary
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class Vocabulary:
    """The genes a set of cell sentences (or a model) speaks, in a fixed order.

    Names are upper-cased as Cell2Sentence does. Two genes that become the same
    name are an error, never silently merged or shifted. Lookups ignore case and an
    Ensembl version suffix (``ENSG00000118785.13`` finds ``ENSG00000118785.14``), and
    Ensembl ids are valid names: a gene-level model gives each gene one token. Only a
    text model needs symbols (:func:`require_symbols`).
    """

    genes: tuple[str, ...]
    _index: dict[str, int] = field(init=False, repr=False, compare=False)
    _loose: dict[str, int] = field(init=False, repr=False, compare=False)

    def __repr__(self) -> str:  # (every gene was printed: 189 kB for 20,000 genes)
        return f"Vocabulary({len(self.genes)} genes: {preview(self.genes, 5)})"

    def __post_init__(self) -> None:
        genes = tuple(str(g) for g in self.genes)
        object.__setattr__(self, "genes", genes)
        index = {g: i for i, g in enumerate(genes)}
        if len(index) != len(genes):
            counts = Counter(genes)
            dups = sorted(g for g, c in counts.items() if c > 1)
            raise VocabularyError(
                f"{len(dups)} gene names occur more than once: {preview(dups)}. Make them unique first, "
                "e.g. adata.var_names_make_unique(), or drop the duplicated genes."
            )
        object.__setattr__(self, "_index", index)
        loose: dict[str, int] = {}
        ambiguous: set[str] = set()
        for g, i in index.items():
            k = gene_match_key(g)
            if k in loose and loose[k] != i:
                ambiguous.add(k)
            loose.setdefault(k, i)
        object.__setattr__(self, "_loose", {k: i for k, i in loose.items() if k not in ambiguous})

    @classmethod
    def from_names(cls, names: Any, *, uppercase: bool = True, allow_ensembl: bool = True) -> Vocabulary:
        """Build a vocabulary from gene names, upper-cased like C2S unless ``uppercase=False``.

        ``allow_ensembl=False`` refuses names that are mostly Ensembl ids
        (:func:`require_symbols`), for vocabularies a text model reads.
        """
        raw = [str(n) for n in names]
        if not raw:
            raise VocabularyError("No gene names were given; a vocabulary needs at least one gene.")
        if not allow_ensembl:
            require_symbols(raw)
        names_out = [n.upper() for n in raw] if uppercase else raw
        if len(set(names_out)) != len(names_out):
            groups: dict[str, list[str]] = {}
            for original, new in zip(raw, names_out):
                groups.setdefault(new, []).append(original)
            clashes = {k: v for k, v in groups.items() if len(v) > 1}
            described = "; ".join(f"{' / '.join(v)} -> {k}" for k, v in list(clashes.items())[:10])
            how = "after upper-casing " if uppercase else ""
            raise VocabularyError(
                f"{len(clashes)} gene names collide {how}({described}). Each gene needs its own name: "
                "rename or drop the duplicates (adata.var_names_make_unique() for exact duplicates)."
            )
        return cls(tuple(names_out))

    @classmethod
    def from_adata(
        cls, adata: ad.AnnData, *, gene_key: str | None = None, uppercase: bool = True, var_key: str | None = None
    ) -> Vocabulary:
        """Vocabulary from ``adata.var_names``, or from the var column ``gene_key``.

        ``var_key`` is the deprecated name of ``gene_key``.
        """
        gene_key = _gene_key_alias(gene_key, var_key)
        return cls.from_names(with_gene_key(adata, gene_key).var_names, uppercase=uppercase)

    def __len__(self) -> int:
        return len(self.genes)

    def __contains__(self, gene: object) -> bool:
        return self._find(str(gene)) >= 0

    def _find(self, g: str) -> int:
        i = self._index.get(g, -1)
        if i < 0:
            i = self._index.get(g.upper(), -1)
        if i < 0:
            i = self._loose.get(gene_match_key(g), -1)
        return i

    def find(self, gene: str) -> int:
        """The id of one gene (ignoring case and an Ensembl version suffix), or -1 where it is not one."""
        return self._find(str(gene))

    def index(self, gene: str) -> int:
        """The id of one gene (ignoring case and an Ensembl version suffix)."""
        i = self._find(str(gene))
        if i < 0:
            raise VocabularyError(f"Gene {gene!r} is not in the vocabulary of {len(self)} genes.")
        return i

    def ids(self, genes: Any, *, missing: Literal["error", "mark"] = "error") -> np.ndarray:
        """Ids of many genes; ``missing="mark"`` gives -1 for unknown genes instead of raising.

        A name matches exactly, else ignoring case, else ignoring an Ensembl version suffix.
        """
        out = np.fromiter((self._find(str(g)) for g in genes), dtype=np.int64)
        if missing == "error" and (out < 0).any():
            bad = [str(g) for g, i in zip(genes, out) if i < 0]
            raise VocabularyError(f"{len(bad)} genes are not in the vocabulary: {preview(bad)}.")
        return out

    def lookup(self) -> dict[str, int]:
        """The name → id mapping (a copy)."""
        return dict(self._index)

    def to_json(self) -> str:
        return json.dumps({"genes": list(self.genes)})

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        return cls(tuple(json.loads(text)["genes"]))


def target_aliases(adata: ad.AnnData, labels: list[str], genes: Vocabulary) -> dict[str, str]:
    """``{name: gene}`` for genes the perturbation labels name otherwise than the gene names do, e.g. knockout
    labels written as symbols (``STAT1``) in a screen whose genes are Ensembl ids, with the symbols in a var column.

    Among the var columns of text, the one that holds the most of the labels' parts that are not gene names is
    taken (none when no column holds any: nothing to link), and each name in it that names one gene only (and is
    not itself another gene's name) maps to that gene. The chosen column is logged. Without the link a knocked-out
    gene would be a name of its own, and its own expression drop, the coexpression baseline and prior, and the
    target offsets would not know it."""
    from .perturbations import split_label

    bare = (str(lab).rpartition("@")[0] or str(lab) for lab in labels)  # a condition's label without its dose
    parts = {x.strip().upper() for lab in bare for x in split_label(lab) if x.strip()}
    missing = {x for x in parts if x not in genes}
    if not missing:
        return {}
    best: tuple[int, str | None, dict[str, str]] = (0, None, {})
    for col in adata.var.columns:
        values = adata.var[col]
        if not (values.dtype == object or str(values.dtype) in ("category", "string")):
            continue
        names = values.astype(str).str.strip().str.upper().to_numpy()
        unique, counts = np.unique(names, return_counts=True)
        once = set(unique[counts == 1]) - {"", "NAN", "NONE"}
        mapping = {n: genes.genes[genes.index(v)] for n, v in zip(names, adata.var_names.astype(str))
                   if n in once and n not in genes and v in genes}
        hits = len(missing & mapping.keys())
        if hits > best[0]:
            best = (hits, str(col), mapping)
    hits, col, mapping = best
    if col is not None:
        log.info("%d of the %d perturbation targets that are not gene names are named by var[%r]; each is linked "
                 "to its gene (e.g. %s)", hits, len(missing), col,
                 preview([f"{x} -> {mapping[x]}" for x in sorted(missing & mapping.keys())], 3))
    return mapping


# --------------------------------------------------------------------------- #
# Cell sentences
# --------------------------------------------------------------------------- #
@dataclass
class CellSentences:
    """Many cell sentences, stored compactly.

    Attributes
    ----------
    ids
        Gene ids of all sentences, concatenated (int32).
    offsets
        Sentence ``i`` is ``ids[offsets[i]:offsets[i + 1]]`` (int64, length ``n + 1``).
    vocab
        The vocabulary the ids index.
    ranks
        0-based rank of each id in its sentence, or ``None`` when ranks are the
        positions. Parsed model output keeps the position each valid gene was
        written at, so a dropped word does not shift the genes after it.
    obs_names
        Optional cell names, one per sentence.
    """

    ids: np.ndarray
    offsets: np.ndarray
    vocab: Vocabulary
    ranks: np.ndarray | None = None
    obs_names: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.ids = np.asarray(self.ids, dtype=np.int32)
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        if self.offsets.ndim != 1 or self.offsets[0] != 0 or self.offsets[-1] != self.ids.size:
            raise DataError("CellSentences offsets must start at 0 and end at len(ids).")
        if self.ranks is not None:
            self.ranks = np.asarray(self.ranks, dtype=np.int32)

    @classmethod
    def from_lists(cls, sentences: list[Any], vocab: Vocabulary, **kw: Any) -> CellSentences:
        """From a list of id sequences."""
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        offsets = np.concatenate([[0], np.cumsum(lengths)])
        ids = np.concatenate([np.asarray(s, dtype=np.int32) for s in sentences]) if len(sentences) else np.zeros(0)
        return cls(ids, offsets, vocab, **kw)

    def __len__(self) -> int:
        return self.offsets.size - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def __getitem__(self, i: int) -> np.ndarray:
        if isinstance(i, (int, np.integer)):
            n = len(self)
            if not -n <= i < n:
                raise IndexError(f"sentence {i} out of range for {n} sentences")
            i = int(i) % n
            return self.ids[self.offsets[i] : self.offsets[i + 1]]
        return self.subset(i)

    def subset(self, index: Any) -> CellSentences:
        """The sentences at ``index`` (ints, a slice or a boolean mask), as a new object."""
        idx = np.arange(len(self))[index]
        idx = np.atleast_1d(idx)
        starts, stops = self.offsets[idx], self.offsets[idx + 1]
        lengths = stops - starts
        gather = _ranges(starts, lengths)
        return CellSentences(
            self.ids[gather],
            np.concatenate([[0], np.cumsum(lengths)]),
            self.vocab,
            ranks=None if self.ranks is None else self.ranks[gather],
            obs_names=None if self.obs_names is None else self.obs_names[idx],
        )

    def rank_array(self) -> np.ndarray:
        """0-based rank of every id in :attr:`ids`."""
        if self.ranks is not None:
            return self.ranks
        return np.arange(self.ids.size, dtype=np.int64) - np.repeat(self.offsets[:-1], self.lengths)

    def genes(self, i: int) -> list[str]:
        """Gene names of sentence ``i``."""
        names = self.vocab.genes
        return [names[j] for j in self[i]]

    def to_text(self, *, sep: str = " ") -> list[str]:
        """Space-separated gene names, one string per cell: the text C2S models read. Gene names holding the
        separator are refused (their words could not be told apart from two genes'); :meth:`save` keeps them."""
        spaced = [g for g in self.vocab.genes if sep in g or (sep.isspace() and any(c.isspace() for c in g))]
        if spaced:
            raise VocabularyError(f"{len(spaced)} gene names hold {sep!r} ({preview(spaced, 3)}), which separates "
                                  "genes in a sentence's text: write the compact form instead (.npz; "
                                  "CellSentences.save), or rename them, e.g. adata.var_names = "
                                  "adata.var_names.str.replace(' ', '_').")
        names = np.asarray(self.vocab.genes, dtype=object)
        words = names[self.ids]
        return [sep.join(words[a:b]) for a, b in zip(self.offsets[:-1], self.offsets[1:])]

    def save(self, path: str) -> None:
        """Write to a ``.npz`` file (ids, offsets, ranks, vocabulary)."""
        np.savez_compressed(
            path,
            ids=self.ids,
            offsets=self.offsets,
            ranks=self.ranks if self.ranks is not None else np.zeros(0, np.int32),
            has_ranks=np.array(self.ranks is not None),
            genes=np.asarray(self.vocab.genes),
            obs_names=np.asarray(self.obs_names if self.obs_names is not None else [], dtype=str),
        )

    @classmethod
    def load(cls, path: str) -> CellSentences:
        with np.load(path, allow_pickle=False) as z:
            obs = z["obs_names"]
            return cls(
                z["ids"],
                z["offsets"],
                Vocabulary(tuple(z["genes"].tolist())),
                ranks=z["ranks"] if bool(z["has_ranks"]) else None,
                obs_names=obs if obs.size else None,
            )

    def __repr__(self) -> str:
        lengths = self.lengths
        mean = float(lengths.mean()) if lengths.size else 0.0
        return f"CellSentences({len(self)} cells, {len(self.vocab)} genes, mean length {mean:.1f})"


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated ``arange(s, s + l)`` for each pair, vectorized."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(lengths)
    return np.arange(total, dtype=np.int64) - np.repeat(ends - lengths - np.asarray(starts, np.int64), lengths)


# --------------------------------------------------------------------------- #
# Encoding
# --------------------------------------------------------------------------- #
_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_BLOCK = 1 << 17  # stored entries per sorted block in encode
_LOW = 0 if sys.byteorder == "little" else 1  # where the low half of an int64 sits


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a cheap, well-mixed hash of uint64 values."""
    x = (x ^ (x >> np.uint64(30))) * _M2
    x = (x ^ (x >> np.uint64(27))) * _M3
    return x ^ (x >> np.uint64(31))


def _fmix32(t: np.ndarray) -> np.ndarray:
    """In-place 32-bit finalizer (lowbias32): mixes every bit of ``t`` into every other."""
    t ^= t >> np.uint32(16)
    t *= np.uint32(0x7FEB352D)
    t ^= t >> np.uint32(15)
    t *= np.uint32(0x846CA68B)
    t ^= t >> np.uint32(16)
    return t


def _encode_rows(
    X: sp.csr_matrix,
    rows: np.ndarray,
    keep: np.ndarray,
    gene_hash: np.ndarray,
    row_hash: np.ndarray,
    col_bits: int,
) -> np.ndarray:
    """The first ``keep[i]`` genes of each row in ``rows`` by descending value, concatenated.

    ``rows`` have similar numbers of stored entries, so they are laid out as one padded
    2-D block and sorted row by row (much cheaper than one sort over all entries). Each
    entry becomes one int64 key: [inverted float bits (31) | tie hash | column]. For
    non-negative floats the IEEE bit pattern orders like the value; padding and stored
    zeros get the largest key and sort last. The tie hash depends only on (seed, global
    row, column), so the result does not depend on how rows are grouped or threaded.
    """
    sub = X[rows]  # the rows' entries, gathered in C
    lengths = np.diff(sub.indptr)
    width = int(lengths.max())
    filled = np.arange(width) < lengths[:, None]
    key = np.empty((rows.size, width), dtype=np.int64)
    words = key.view(np.uint32)  # the low and high 32-bit word of each key
    low, high = words[:, _LOW::2], words[:, 1 - _LOW :: 2]
    high.fill(0x7FFFFFFF)
    inverted = np.invert(sub.data.view(np.uint32))
    inverted &= np.uint32(0x7FFFFFFF)  # 0x7FFFFFFF - bits; also maps -0.0 to +0.0
    high[filled] = inverted
    cols = np.zeros((rows.size, width), dtype=np.uint32)
    cols[filled] = sub.indices
    tie_bits = 32 - col_bits
    if tie_bits > 0:
        tie = np.take(gene_hash, cols)
        tie ^= row_hash[rows][:, None]
        _fmix32(tie)
        tie >>= np.uint32(col_bits)  # keep the top tie_bits bits ...
        tie <<= np.uint32(col_bits)  # ... above the column
        tie |= cols
        low[...] = tie
    else:
        low[...] = cols
    k = int(keep.max())
    if k < width:
        key.partition(k - 1, axis=1)
        key = key[:, :k]
    key.sort(axis=1)
    picked = key.view(np.uint32)[:, _LOW::2][np.arange(k) < keep[:, None]]
    picked &= np.uint32((1 << col_bits) - 1)
    return picked.view(np.int32)


def _take_rows(
    values: np.ndarray, offsets: np.ndarray, rows: np.ndarray, n_values: int
) -> tuple[np.ndarray, np.ndarray]:
    """Ragged rows ``values[offsets[r]:offsets[r + 1]]`` for ``r`` in ``rows``, concatenated.

    Uses scipy's compiled CSR row gather: ``values`` (ints in ``[0, n_values)``) ride
    along as the column indices. Returns the values and the new offsets.
    """
    M = sp.csr_matrix((values, values, offsets), shape=(offsets.size - 1, max(n_values, 1)), copy=False)
    out = M[rows]
    return out.indices, out.indptr.astype(np.int64)


def encode(
    adata: ad.AnnData,
    *,
    layer: str | None = None,
    top_k: int | None = DEFAULT_TOP_K,
    seed: int = 0,
    vocab: Vocabulary | None = None,
    gene_key: str | None = None,
    genes: Literal["all", "shared"] = "all",
    threads: int = 2,
    var_key: str | None = None,
) -> CellSentences:
    """Encode cells as cell sentences: expressed gene ids by descending expression.

    Parameters
    ----------
    adata
        Cells × genes; raw counts or normalized values, sparse or dense.
    layer
        Layer to rank (default ``adata.X``).
    top_k
        Keep at most this many genes per cell (``None``: all expressed genes). Cells
        with fewer expressed genes get shorter sentences.
    seed
        Seed of the tie-break: genes with equal expression are ordered by a hash of
        (seed, the cell's row, the gene's column), reproducible and independent of chunking; reordering the
        cells or the genes draws other tie-breaks.
    vocab
        Encode into this vocabulary (a model's). By default the vocabulary is built
        from ``adata`` (``var_names`` or ``var[gene_key]``).
    gene_key
        Var column holding the gene names to use (symbols or Ensembl ids); default
        ``var_names``. ``var_key`` is its deprecated former name.
    genes
        With ``vocab``: ``"all"`` requires every gene of ``adata`` to be in it;
        ``"shared"`` drops the genes it does not know (before ranking).
    threads
        Worker threads for the per-cell sorts.

    Zeros, including explicitly stored zeros, are never part of a sentence. A cell
    with no expressed gene is an error (remove such cells first).
    """
    require_in_memory(adata, "The cells to encode")
    if top_k is not None and top_k < 1:
        raise DataError(f"top_k must be a positive number of genes or None, got {top_k}.")
    if genes not in ("all", "shared"):  # (anything but 'all' read as 'shared' and skipped the check)
        raise DataError(f"genes must be 'all' or 'shared', got {genes!r}.")
    X = expression_matrix(adata, layer=layer)
    own = Vocabulary.from_adata(adata, gene_key=_gene_key_alias(gene_key, var_key))
    if vocab is None:
        vocab, col_map = own, None
    else:
        col_map = vocab.ids(own.genes, missing="mark")
        unknown = np.flatnonzero(col_map < 0)
        if unknown.size == len(own):
            spaced = sum(g != g.strip() for g in own.genes)
            hint = (f" {spaced} of the data's gene names have spaces around them: strip them, adata.var_names = "
                    "adata.var_names.str.strip()." if spaced else "")
            raise VocabularyError(
                f"None of the data's {len(own)} genes are in the model's vocabulary "
                f"(data e.g. {preview(own.genes, 3)}; model e.g. {preview(vocab.genes, 3)}).{hint} "
                "Check that both name genes the same way (symbols or Ensembl ids, same species); if the "
                "model's names sit in a var column of the data, pass --gene-key COLUMN (gene_key='COLUMN')."
            )
        if unknown.size and genes == "all":
            shared = len(own) - unknown.size
            raise VocabularyError(
                f"{unknown.size} of the data's {len(own)} genes are not in the model's vocabulary "
                f"of {len(vocab)} genes ({shared} shared; missing e.g. {preview([own.genes[i] for i in unknown], 5)}). "
                "Pass genes='shared' (CLI: --genes shared) to proceed on the shared genes only."
            )
        if unknown.size:  # genes="shared" (none shared was refused above)
            keep = col_map >= 0
            X = X[:, keep]
            col_map = col_map[keep]
    lengths = np.diff(X.indptr)
    stored_zeros = np.flatnonzero(X.data == 0)  # explicitly stored zeros are not expressed
    row_of_zero = np.searchsorted(X.indptr, stored_zeros, side="right") - 1
    n_expressed = lengths - np.bincount(row_of_zero, minlength=X.shape[0])
    empty = np.flatnonzero(n_expressed == 0)
    if empty.size:
        names = adata.obs_names[empty]
        if X.shape[1] < len(own):  # genes='shared': they may express genes the model does not know
            raise DataError(
                f"{empty.size} of {adata.n_obs} cells express none of the {X.shape[1]} genes shared with the model "
                f"(e.g. {preview(names, 5)}). A cell sentence needs at least one gene: remove them first, e.g. "
                "shared = model.genes.ids(list(adata.var_names), missing='mark') >= 0; "
                "adata = adata[np.asarray((adata[:, shared].X > 0).sum(axis=1)).ravel() > 0].")
        raise DataError(
            f"{empty.size} of {adata.n_obs} cells have no expressed genes (e.g. {preview(names, 5)}). "
            "A cell sentence needs at least one gene: remove them first, e.g. "
            "adata = adata[np.asarray((adata.X > 0).sum(axis=1)).ravel() > 0]."
        )
    n_cells, n_genes = X.shape
    keep = n_expressed if top_k is None else np.minimum(n_expressed, int(top_k))
    col_bits = max(1, int(n_genes - 1).bit_length())
    # tie hashes: one 32-bit hash per gene and per cell, combined and mixed per entry
    seed_hash = _mix(np.array([seed & 0xFFFFFFFFFFFFFFFF], dtype=np.uint64) + _M3)[0]
    gene_hash = (_mix(np.arange(n_genes, dtype=np.uint64) * _M1 + seed_hash) >> np.uint64(32)).astype(np.uint32)
    row_hash = (_mix(np.arange(n_cells, dtype=np.uint64) * _M2 + seed_hash) >> np.uint64(32)).astype(np.uint32)
    # group cells of similar length into blocks of about _BLOCK entries (little padding)
    order = np.argsort(lengths, kind="stable")
    cum = np.cumsum(lengths[order])
    cuts = np.searchsorted(cum, np.arange(_BLOCK, int(cum[-1]), _BLOCK), side="right")
    bounds = np.unique(np.concatenate([[0], cuts, [n_cells]]))
    perm_offsets = np.concatenate([[0], np.cumsum(keep[order])])
    out = np.empty(int(perm_offsets[-1]), dtype=np.int32)

    def run(i: int) -> None:
        r0, r1 = bounds[i], bounds[i + 1]
        rows = order[r0:r1]
        out[perm_offsets[r0] : perm_offsets[r1]] = _encode_rows(X, rows, keep[rows], gene_hash, row_hash, col_bits)

    blocks = range(bounds.size - 1)
    if threads > 1 and len(blocks) > 1:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, blocks))
    else:
        for i in blocks:
            run(i)
    rank_of = np.empty(n_cells, dtype=np.int64)
    rank_of[order] = np.arange(n_cells)
    ids, offsets = _take_rows(out, perm_offsets, rank_of, n_genes)  # back to the cells' order
    if col_map is not None:
        ids = col_map[ids].astype(np.int32)
    return CellSentences(ids, offsets, vocab, obs_names=np.asarray(adata.obs_names, dtype=str))


# --------------------------------------------------------------------------- #
# Rank -> expression
# --------------------------------------------------------------------------- #
DECODE_METHODS = ("linear", "table")


@dataclass(frozen=True)
class RankFit:
    """The inverse transform: expression = slope · log10(1 + rank) + intercept.

    Fitted per dataset by least squares on the kept genes of up to ``max_cells``
    cells, as Cell2Sentence does, on the normalized scale (``normalization``).
    ``rank_means`` holds the mean expression at each rank as well: a lookup-table
    decode (``method="table"``) that has no parametric bias.

    ``method`` is the decode that :func:`decode` (and so the Simulator) uses when none is
    passed: ``"linear"`` (Cell2Sentence's) unless ``virtualcell train`` chose ``"table"`` on its
    validation split (:func:`virtualcell.validation.choose_decode`). On sparse panels, whose
    cells are written in a few dozen genes, the linear map misses the steep first ranks.
    """

    slope: float
    intercept: float
    r2: float
    normalization: str
    n_cells: int
    rank_means: tuple[float, ...] = ()
    method: Literal["linear", "table"] = "linear"
    # the training cells' median per-cell total of expm1 over the model's genes: 1e4 for raw counts, whatever a log1p
    # file was normalized to otherwise; counts given to a model trained on log1p values are put onto it (None: a
    # checkpoint from before it was recorded)
    total: float | None = None

    def __repr__(self) -> str:  # (the rank table printed one float per rank)
        total = "" if self.total is None else f", total {self.total:.4g}"
        return (f"RankFit({self.method}: slope {self.slope:.4g}, intercept {self.intercept:.4g}, r2 {self.r2:.3f}; "
                f"{self.normalization}{total}; {self.n_cells} cells, {len(self.rank_means)} ranks in the table)")

    def __post_init__(self) -> None:
        if self.method not in DECODE_METHODS:
            raise DataError(f"Unknown decode method {self.method!r}; use one of {DECODE_METHODS}.")
        if self.method == "table" and not self.rank_means:
            raise DataError("A table decode needs the rank table (rank_means); refit the RankFit or use 'linear'.")

    @classmethod
    def fit(
        cls,
        adata: ad.AnnData,
        sentences: CellSentences,
        *,
        layer: str | None = None,
        max_cells: int = 2000,
        seed: int = 0,
    ) -> RankFit:
        """Fit on ``adata`` (normalized with :func:`log_normalize`) and its sentences."""
        if len(sentences) != adata.n_obs:
            raise DataError(
                f"{len(sentences)} sentences for {adata.n_obs} cells: fit the rank map on the AnnData the sentences were encoded from."
            )
        X = expression_matrix(adata, layer=layer)
        scale = detect_scale(X)
        rng = np.random.default_rng(seed)
        n = adata.n_obs
        cells = np.sort(rng.choice(n, size=min(n, max_cells), replace=False))
        sub = sentences.subset(cells)
        Xn = log_normalize(X[cells], scale)
        own_ids = Vocabulary.from_adata(adata).ids(sentences.vocab.genes, missing="mark")
        rows = np.repeat(np.arange(len(sub)), sub.lengths)
        cols = own_ids[sub.ids]
        if (cols < 0).any():
            raise DataError("The sentences use genes that are not in this AnnData; fit on the data they came from.")
        y = np.asarray(Xn[rows, cols]).ravel().astype(np.float64)
        r = sub.rank_array().astype(np.float64)
        x = np.log10(1.0 + r)
        A = np.stack([x, np.ones_like(x)], axis=1)
        (slope, intercept), *_ = np.linalg.lstsq(A, y, rcond=None)
        pred = A @ np.array([slope, intercept])
        ss_res = float(((y - pred) ** 2).sum())
        ss_tot = float(((y - y.mean()) ** 2).sum()) or 1.0
        sums = np.bincount(r.astype(np.int64), weights=y)
        counts = np.bincount(r.astype(np.int64))
        means = tuple(float(v) for v in sums / np.maximum(counts, 1))
        norm = normalization_label(scale)
        total = TARGET_SUM if scale == "counts" else median_log1p_total(Xn)
        return cls(float(slope), float(intercept), 1.0 - ss_res / ss_tot, norm, len(cells), means, total=total)

    def expression(self, ranks: np.ndarray, *, method: Literal["linear", "table"] | None = None) -> np.ndarray:
        """Expression at 0-based ``ranks`` (float32, clipped at 0), by ``method`` (default: the fit's own)."""
        ranks = np.asarray(ranks)
        method = self.method if method is None else method
        if method == "linear":
            out = self.slope * np.log10(1.0 + ranks) + self.intercept
        elif method == "table":
            if not self.rank_means:
                raise DataError("This RankFit has no rank table; refit it or use method='linear'.")
            table = np.asarray(self.rank_means)
            out = table[np.minimum(ranks, table.size - 1)]
        else:
            raise DataError(f"Unknown decode method {method!r}; use 'linear' or 'table'.")
        return np.clip(out, 0.0, None).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rank_means"] = list(self.rank_means)
        if d["total"] is None:  # (a checkpoint from before it: its record, and its serving digest, as they were)
            del d["total"]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankFit:
        """A fit as :meth:`to_dict` wrote it (a checkpoint's ``virtualcell.json``, ``rank_fit``). A field this
        virtualcell does not know (a newer one's), a missing one, and a number that is not a finite number (a NaN
        slope decoded every value as NaN; a slope stored as a string failed in numpy) are refused with a
        :class:`DataError` that names the field."""
        damaged = "restore the file as training wrote it (copy the checkpoint folder again), or retrain the model."
        if not isinstance(d, dict):
            raise DataError(f"rank_fit is {type(d).__name__}, not the record of the rank fit's fields: {damaged}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in d if k not in known)
        if unknown:
            raise DataError(f"rank_fit has fields this virtualcell does not know ({preview(unknown, 5)}): it was "
                            "written by a newer virtualcell. Upgrade virtualcell (pip install -U virtualcell) to "
                            "load it.")
        missing = [k for k in ("slope", "intercept", "r2", "normalization", "n_cells") if k not in d]
        if missing:
            raise DataError(f"rank_fit lacks {', '.join(missing)}: {damaged}")
        for key in ("slope", "intercept"):
            if not finite_number(d[key]):
                raise DataError(f"rank_fit's {key} is {d[key]!r}, not a finite number: {damaged}")
        if not (finite_number(d["r2"]) or (isinstance(d["r2"], float) and np.isnan(d["r2"]))):
            raise DataError(f"rank_fit's r2 is {d['r2']!r}, not a number: {damaged}")
        if not isinstance(d["normalization"], str) or not isinstance(d.get("method", "linear"), str):
            raise DataError(f"rank_fit's normalization and method are names (strings), not {d['normalization']!r} "
                            f"and {d.get('method')!r}: {damaged}")
        if d.get("method", "linear") not in DECODE_METHODS:
            raise DataError(f"rank_fit's method is {d['method']!r}, not one of {', '.join(DECODE_METHODS)} (a newer "
                            f"virtualcell's? pip install -U virtualcell): {damaged}")
        if not whole_at_least(d["n_cells"], 0):
            raise DataError(f"rank_fit's n_cells is {d['n_cells']!r}, not a count of cells: {damaged}")
        total = d.get("total")
        if total is not None and not (finite_number(total) and total > 0):
            raise DataError(f"rank_fit's total is {total!r}, not a positive number: {damaged}")
        means = d.get("rank_means", ())
        if not isinstance(means, list | tuple) or not all(finite_number(v) for v in means):
            bad = means if not isinstance(means, list | tuple) else next(v for v in means if not finite_number(v))
            raise DataError(f"rank_fit's rank_means hold {bad!r}, not finite numbers (one mean expression per rank): "
                            f"{damaged}")
        return cls(**(d | {"rank_means": tuple(float(v) for v in means)}))


def decode(
    sentences: CellSentences, fit: RankFit, *, method: Literal["linear", "table"] | None = None
) -> sp.csr_matrix:
    """Expression matrix (cells × vocabulary genes, float32 CSR) from sentences and a rank fit, decoded by
    ``method`` (default: the fit's own, ``fit.method``)."""
    ranks = sentences.rank_array()
    top = int(ranks.max()) + 1 if ranks.size else 0
    if top <= ranks.size:  # evaluate each distinct rank once, then look it up
        values = fit.expression(np.arange(top), method=method)[ranks]
    else:
        values = fit.expression(ranks, method=method)
    X = sp.csr_matrix(
        (values, sentences.ids.astype(np.int32), sentences.offsets),
        shape=(len(sentences), len(sentences.vocab)),
    )
    X.sort_indices()
    return X


def roundtrip(
    adata: ad.AnnData,
    sentences: CellSentences | None = None,
    fit: RankFit | None = None,
    *,
    top_k: int | None = DEFAULT_TOP_K,
    seed: int = 0,
    method: Literal["linear", "table"] | None = None,
) -> ad.AnnData:
    """``adata``'s cells as the cell-sentence codec gives them back: ``decode(encode(cells))``.

    Same cells (``obs``) and genes as ``adata``, values on the normalized log1p scale of the
    rank fit; a gene outside a cell's sentence is 0. A model that wrote every cell's
    sentence exactly could not tell these cells from the measured ones, so an effect
    measured on them is the most such a model can predict (the validation verdict's
    ``codec`` score; ``experiments/codec_ceiling.py``). ``sentences`` and ``fit`` default to
    ``encode(adata, top_k=top_k, seed=seed)`` and a :class:`RankFit` fitted on them; pass a
    model's own to see its codec. ``method``: the decode (default: the fit's own, :attr:`RankFit.method`).

    >>> import numpy as np, anndata as ad
    >>> a = ad.AnnData(np.array([[5.0, 0.0, 1.0], [0.0, 2.0, 7.0]], dtype=np.float32))
    >>> back = roundtrip(a, top_k=1)
    >>> back.shape, int((back.X.toarray() > 0).sum())  # one gene per cell survives
    ((2, 3), 2)
    """
    import anndata as ad
    import pandas as pd

    if sentences is None:
        sentences = encode(adata, top_k=top_k, seed=seed)
    if len(sentences) != adata.n_obs:
        raise DataError(f"{len(sentences)} sentences for {adata.n_obs} cells: pass the sentences encoded from adata.")
    if fit is None:
        fit = RankFit.fit(adata, sentences, seed=seed)
    own = Vocabulary.from_adata(adata)
    if sentences.vocab.genes != own.genes:
        raise DataError("The sentences were encoded in another vocabulary than adata's genes; encode adata itself "
                        "(encode(adata)) to see its cells through the codec.")
    X = decode(sentences, fit, method=method)
    return ad.AnnData(X, obs=adata.obs.copy(), var=pd.DataFrame(index=adata.var_names.copy()))


# --------------------------------------------------------------------------- #
# Parsing generated text
# --------------------------------------------------------------------------- #
@dataclass(frozen=True)
class ParseReport:
    """What parsing generated text found."""

    n_cells: int
    n_words: int
    n_invalid: int
    n_duplicate: int
    top_invalid: tuple[tuple[str, int], ...]

    @property
    def invalid_fraction(self) -> float:
        return self.n_invalid / max(self.n_words, 1)

    @property
    def duplicate_fraction(self) -> float:
        return self.n_duplicate / max(self.n_words, 1)

    @property
    def invalid_per_cell(self) -> float:
        return self.n_invalid / max(self.n_cells, 1)

    @property
    def duplicate_per_cell(self) -> float:
        return self.n_duplicate / max(self.n_cells, 1)


def parse_text(texts: list[str], vocab: Vocabulary, *, uppercase: bool = True) -> tuple[CellSentences, ParseReport]:
    """Parse generated cell sentences (text) into ids, robustly.

    Words are split on white space and stripped of surrounding punctuation. Unknown
    words are dropped and a repeated gene keeps only its first place; neither shifts
    the ranks of the genes after it (ranks are the word positions). The report counts
    invalid and duplicate words.
    """
    index = vocab._index
    # words that need no stripping are looked up as they are; a gene whose own name
    # would change by stripping must go through the stripping path, as every word did
    direct = index if all(g.strip(_STRIP) == g for g in index) else {
        g: i for g, i in index.items() if g.strip(_STRIP) == g
    }
    flat: list[str] = []
    lengths = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        ws = (str(t).upper() if uppercase else str(t)).split()
        flat.extend(ws)
        lengths[i] = len(ws)
    ids = np.fromiter(map(direct.get, flat, repeat(-1)), dtype=np.int64, count=len(flat))
    missed = np.flatnonzero(ids < 0)
    if missed.size:  # strip surrounding punctuation; a word of punctuation only is no word
        dropped = []
        for j in missed.tolist():
            w = flat[j].strip(_STRIP)
            if not w:
                dropped.append(j)
            elif w != flat[j]:
                flat[j] = w
                ids[j] = index.get(w, -1)
        if dropped:
            row = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
            lengths = lengths - np.bincount(row[dropped], minlength=len(texts))
            gone = np.zeros(ids.size, dtype=bool)
            gone[dropped] = True
            flat = [w for w, g in zip(flat, gone.tolist()) if not g]
            ids = ids[~gone]
    row = np.repeat(np.arange(len(texts), dtype=np.int64), lengths)
    pos = np.arange(ids.size, dtype=np.int64) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    valid = ids >= 0
    vidx = np.flatnonzero(valid)
    pair = row[vidx] * (len(vocab) + 1) + ids[vidx]
    if len(texts) * (len(vocab) + 1) < np.iinfo(np.int32).max:
        pair = pair.astype(np.int32)  # a cheaper sort
    if pair.size > 1 and (np.diff(np.sort(pair)) == 0).any():
        _, first = np.unique(pair, return_index=True)
        keep = np.sort(vidx[first])
    else:  # no gene repeats within a cell
        keep = vidx
    n_invalid = int(ids.size - vidx.size)
    n_dup = int(vidx.size - keep.size)
    counts = np.bincount(row[keep], minlength=len(texts))
    invalid_words = Counter(flat[j] for j in np.flatnonzero(~valid).tolist()).most_common(10)
    cs = CellSentences(
        ids[keep].astype(np.int32), np.concatenate([[0], np.cumsum(counts)]), vocab, ranks=pos[keep]
    )
    return cs, ParseReport(len(texts), int(ids.size), n_invalid, n_dup, tuple(invalid_words))
