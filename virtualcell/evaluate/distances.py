"""pertpy distance tests, with the group-order bug of pertpy 1.0.3 worked around, and the one E-distance the
package computes (:func:`edistance`: pertpy's, to the bit, without importing pertpy).

``pertpy.tools.DistanceTest`` computes its permutation null per group in *sorted* order
(``df.sort_index()``) but labels the resulting p-values in order of *first appearance* of
each group in ``adata.obs``. Unless the cells are already sorted by the group column, the
p-values land on the wrong groups (scverse/pertpy issue #1072): a null group can look
significant and a strong one not. :func:`distance_test` sorts the cells first.

pertpy is imported inside the functions, so importing this module stays light.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError, VirtualCellWarning, no_such_column, preview, user_stacklevel, whole_at_least

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd

__all__ = ["distance_test", "edistance", "sorted_by_group"]


def edistance(a: np.ndarray, b: np.ndarray) -> float:
    """E-distance between the cells (rows) of ``a`` and ``b``, as ``pertpy.tools.Distance(metric="edistance")(a, b)``
    computes it, to the bit: twice the mean Euclidean distance between the two sets' cells less each set's mean
    distance within (over every pair, a cell with itself included), through the same scikit-learn function, term by
    term in its order. pertpy itself is not imported (6-10 s, and jax with it). BLAS is held to one thread: the sums
    came out otherwise in the 6th digit with the machine's thread count (a screen's ranking file differed in bytes
    between OMP_NUM_THREADS=1 and the default). A screen's effect sizes and evaluate's ``edistance`` and
    ``compare_distance`` metrics all take it here."""
    from .._imports import quiet_import

    pairwise = quiet_import("sklearn.metrics").pairwise_distances
    try:
        from threadpoolctl import threadpool_limits  # (a scikit-learn dependency)
    except ImportError:  # pragma: no cover
        import contextlib

        def threadpool_limits(limits: int) -> contextlib.AbstractContextManager:  # noqa: ARG001
            return contextlib.nullcontext()

    with threadpool_limits(limits=1):
        sigma_a = pairwise(a, a, metric="euclidean").mean()
        sigma_b = pairwise(b, b, metric="euclidean").mean()
        delta = pairwise(a, b, metric="euclidean").mean()
    return 2 * delta - sigma_a - sigma_b


def _require_column(adata: ad.AnnData, groupby: str) -> None:
    if groupby not in adata.obs.columns:
        raise DataError(no_such_column(groupby, adata.obs.columns))


def sorted_by_group(adata: ad.AnnData, groupby: str) -> ad.AnnData:
    """A copy of ``adata`` whose cells are sorted by ``obs[groupby]`` (as plain strings).

    The column becomes a plain string column too, so that pandas sorts a categorical's
    labels alphabetically rather than in category order; first appearance and sorted
    order then agree, which is what ``DistanceTest`` silently assumes.
    """
    labels, order = _group_order(adata, groupby)
    out = adata[order].copy()
    out.obs[groupby] = labels[order].astype(object)
    return out


def _group_order(adata: ad.AnnData, groupby: str) -> tuple[np.ndarray, np.ndarray]:
    """Each cell's group as a plain string, and the order that sorts the cells by it (stable): the order
    ``DistanceTest`` assumes."""
    _require_column(adata, groupby)
    labels = adata.obs[groupby].astype(str).to_numpy()
    return labels, np.argsort(labels, kind="stable")


def distance_test(
    adata: ad.AnnData,
    *,
    groupby: str,
    contrast: str,
    metric: str = "edistance",
    n_perms: int = 1000,
    obsm_key: str | None = "X_pca",
    layer_key: str | None = None,
    alpha: float = 0.05,
    correction: str = "holm-sidak",
) -> pd.DataFrame:
    """Permutation test of every group against ``contrast`` (pertpy's DistanceTest), p-values on the right groups.

    Parameters
    ----------
    adata
        Cells with an embedding in ``obsm[obsm_key]`` (e.g. ``sc.pp.pca``) or a layer.
    groupby
        obs column with the groups (e.g. the perturbation column).
    contrast
        The group everything is tested against (the control label).
    obsm_key
        The embedding the distances are measured in, ``obsm[obsm_key]``; ``None``: the expression itself,
        ``adata.X`` (every gene, densified: slow on many genes).
    layer_key
        Measure in this layer instead (``obsm_key`` is then not read).
    metric, n_perms, alpha, correction
        As in ``pertpy.tools.DistanceTest``. pertpy draws its permutations from an
        unseeded generator, so p-values vary a little between runs.

    Returns
    -------
    DataFrame
        Indexed by group: ``distance``, ``pvalue``, ``significant``, ``pvalue_adj``,
        ``significant_adj`` (the contrast row has distance 0 and p-value 1).

    Examples
    --------
    >>> import numpy as np, anndata as ad, pandas as pd
    >>> rng = np.random.default_rng(0)
    >>> obs = pd.DataFrame({"g": ["ctrl"] * 30 + ["strong"] * 30}, index=[str(i) for i in range(60)])
    >>> a = ad.AnnData(np.zeros((60, 1)), obs=obs)
    >>> a.obsm["X_pca"] = rng.normal(size=(60, 3)) + (obs["g"] == "strong").to_numpy()[:, None] * 3
    >>> bool(distance_test(a, groupby="g", contrast="ctrl", n_perms=50).loc["strong", "pvalue"] < 0.05)
    True
    """
    _require_column(adata, groupby)  # (before the embedding: running PCA as told only to learn the column is wrong)
    missing = int(adata.obs[groupby].isna().sum())
    if missing:  # (read as strings they were a group named 'nan', tested as one)
        raise DataError(f"{missing} cells have no group in obs[{groupby!r}] (missing values): drop them "
                        f"(adata = adata[adata.obs[{groupby!r}].notna()].copy()) or give them their group.")
    if not whole_at_least(n_perms):
        raise DataError(f"n_perms must be a whole number of permutations of at least 1, got {n_perms!r}.")
    if correction not in CORRECTIONS:
        raise DataError(f"correction {correction!r} is not a multiple-testing correction statsmodels knows: "
                        f"{', '.join(CORRECTIONS)}.")
    if layer_key is not None:
        obsm_key = None
        if layer_key not in adata.layers:
            raise DataError(
                f"Layer {layer_key!r} is not in the AnnData. Layers: {preview(adata.layers.keys()) or 'none'}."
            )
    elif obsm_key is None:
        if adata.X is None:
            raise DataError("obsm_key=None measures in adata.X, and this AnnData has no X: name an embedding "
                            f"(obsm_key=, one of {preview(adata.obsm.keys()) or 'none'}) or a layer (layer_key=).")
    elif obsm_key not in adata.obsm:
        raise DataError(
            f"obsm[{obsm_key!r}] is missing. Compute an embedding first (e.g. scanpy.pp.pca(adata)) "
            f"or name one of {preview(adata.obsm.keys()) or 'none'} as obsm_key=; or pass layer_key=, or "
            "obsm_key=None for adata.X."
        )
    labels, order = _group_order(adata, groupby)
    contrast = str(contrast)  # (the groups are read as strings: a column of numbers and contrast=4 name group '4')
    if contrast not in set(labels):
        groups = preview(sorted(set(labels)))
        raise DataError(f"Contrast group {contrast!r} is not in obs[{groupby!r}]; groups: {groups}. "
                        "Pass the control label.")
    from .._imports import import_pertpy

    DistanceTest = import_pertpy("distance_test", "pertpy.tools").DistanceTest
    known = _metrics()
    if known and metric not in known:
        raise DataError(f"metric {metric!r} is not one pertpy's DistanceTest knows: {', '.join(known)}.")
    _warn_unsound(adata, labels, contrast, layer_key)
    if layer_key is not None or obsm_key is None:  # pertpy reads a layer for some metrics only (mmd, wasserstein,
        # euclidean read obsm[None]): every metric reads a layer, or X, as an embedding
        layer = adata.layers[layer_key] if layer_key is not None else adata.X
        obsm_key = "_virtualcell_layer"
        embedding = layer.toarray() if hasattr(layer, "toarray") else np.asarray(layer)
    else:
        embedding = np.asarray(adata.obsm[obsm_key])
    # the cells sorted by group (sorted_by_group's order), holding only what the test reads: the groups and the
    # embedding, not a copy of the whole AnnData with its expression
    import anndata as ad
    import pandas as pd

    sorted_adata = ad.AnnData(obs=pd.DataFrame({groupby: labels[order].astype(object)},
                                               index=adata.obs_names[order].astype(str)),
                              obsm={obsm_key: embedding[order]})
    test = DistanceTest(metric, n_perms=n_perms, obsm_key=obsm_key, alpha=alpha, correction=correction)
    with warnings.catch_warnings():  # statsmodels' holm-sidak warns on p-values of exactly 1; harmless
        warnings.filterwarnings("ignore", "divide by zero encountered in log1p", RuntimeWarning)
        out = test(sorted_adata, groupby=groupby, contrast=contrast, show_progressbar=False)
        # pertpy corrects over every group, the contrast's own included, then sets its row to 1: one test too many
        # (Holm-Sidak over 5 groups' p-values gave 0.0198 where 0.0166 is right); corrected over the tested groups
        from statsmodels.stats.multitest import multipletests

        # a group whose distance is no number (one cell under a t-test) has no p-value, where pertpy gives it the
        # smallest a permutation test can (it clips its count of failures to 1) and calls it significant
        undefined = ~np.isfinite(out["distance"].to_numpy(float)) & (out.index != contrast)
        if undefined.any():
            warnings.warn(f"{int(undefined.sum())} group(s) have no {metric} distance to {contrast!r} "
                          f"({preview(list(out.index[undefined]), 5)}; too few cells?): their p-values are NaN, not "
                          "significant.", VirtualCellWarning, stacklevel=user_stacklevel())
            out["pvalue"] = out["pvalue"].astype(float)
            out.loc[undefined, ["pvalue", "pvalue_adj"]] = np.nan
            out.loc[undefined, ["significant", "significant_adj"]] = False
        tested = (out.index != contrast) & ~undefined
        if tested.any():
            reject, adjusted, _, _ = multipletests(out.loc[tested, "pvalue"].to_numpy(float), alpha=alpha,
                                                   method=correction)
            out.loc[tested, "pvalue_adj"], out.loc[tested, "significant_adj"] = adjusted, reject
        return out


# the multiple-testing corrections statsmodels' multipletests takes (what pertpy passes its correction to)
CORRECTIONS = ("bonferroni", "sidak", "holm-sidak", "holm", "simes-hochberg", "hommel", "fdr_bh", "fdr_by",
               "fdr_tsbh", "fdr_tsbky")


def _metrics() -> tuple[str, ...]:
    """The metrics pertpy's distances take (``()`` where this pertpy does not list them)."""
    from typing import get_args

    from .._imports import quiet_import

    try:
        Metric = quiet_import("pertpy.tools._distances._distances").Metric
    except (ImportError, AttributeError):  # pragma: no cover - a pertpy that moved it: pertpy's own refusal then
        return ()
    return tuple(str(m) for m in get_args(Metric))


def _warn_unsound(adata: ad.AnnData, labels: np.ndarray, contrast: str, layer_key: str | None) -> None:
    """Warn where the test's premise fails without an error: groups predicted from the contrast's own cells
    (``obs['source_cell']``: each predicted cell is paired with a cell of the contrast, and a test of independent
    groups is then far too conservative), groups of fewer than two cells, and cells on two scales (counts beside
    log values, as when measured counts are concatenated with predictions). ``labels``: each cell's group."""
    from ..sentences import detect_scale

    from ._data import predicted_from

    sourced = predicted_from(adata, labels == contrast)
    if sourced.any():
        warnings.warn(
            f"Cells of {preview(sorted(set(labels[sourced])), 5)} were predicted from the {contrast!r} cells "
            "themselves (their obs['source_cell']): each is paired with a cell of the contrast, and a permutation "
            "test of independent groups then misses real effects. Test them against control cells the prediction "
            "was not made from (vc.evaluate.split_controls: predict from one half, contrast the other).",
            VirtualCellWarning, stacklevel=user_stacklevel())
    names, counts = np.unique(labels, return_counts=True)
    if (counts < 2).any():
        warnings.warn(f"Groups with fewer than 2 cells ({preview(list(names[counts < 2]), 5)}): a distance test has "
                      "nothing to permute there.", VirtualCellWarning, stacklevel=user_stacklevel())
    X = adata.layers[layer_key] if layer_key is not None else adata.X
    if X is None:  # (an AnnData of an embedding alone: nothing to read a scale from)
        return
    try:
        detect_scale(X)
    except DataError as err:
        if "mixes scales" in str(err):
            warnings.warn(f"{err} The distances would compare cells on two scales: predictions are log1p of 1e4 per "
                          "cell; put measured counts on it first (sc.pp.normalize_total(adata, target_sum=1e4); "
                          "sc.pp.log1p(adata)) and compute the embedding again.", VirtualCellWarning, stacklevel=user_stacklevel())
    except (TypeError, ValueError, AttributeError):  # (values it cannot read as expression: the embedding is tested)
        pass
