"""The few statistics several layers need, written once: a PCA, per-gene variances and the
noise-corrected effect size.

Pure numpy/scipy. Every caller imports these; a second copy would drift (the simulator's
control variance was once biased while its neighbour was not).

Examples
--------
>>> import numpy as np
>>> from virtualcell._stats import pca, noise_corrected_sq_norm
>>> X = np.random.default_rng(0).normal(size=(50, 6))
>>> basis = pca(X, 2)
>>> basis.transform(X).shape
(50, 2)
>>> sq, noise = noise_corrected_sq_norm(np.ones(3), var_a=np.ones(3), n_a=10, var_b=np.ones(3), n_b=10)
>>> sq, round(noise, 3)
(3.0, 0.6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

__all__ = ["PCABasis", "bootstrap_mean", "calibrated", "gram_axes", "log_dose_interpolation", "noise_corrected_sq_norm",
           "pca", "signed_root", "unbiased_var"]

_GRAM_MAX_GENES = 2_000  # up to this many genes the covariance matrix is small: eigendecompose it
_DENSE_MAX = 4_000_000  # values: below this a dense SVD is fast and exact
_GRAM_MAX_CELLS = 2_000  # up to this many cells (fewer than genes) the cells' n x n inner products are small


@dataclass(frozen=True)
class PCABasis:
    """The center and principal axes (rows of ``components``, largest variance first) of some cells."""

    center: np.ndarray
    components: np.ndarray

    def transform(self, X: np.ndarray | sp.spmatrix) -> np.ndarray:
        """Cells (rows of ``X``, same genes) on the principal axes, as float32."""
        if sp.issparse(X):  # (X - center) @ W without densifying X
            return (np.asarray(X @ self.components.T) - self.center @ self.components.T).astype(np.float32)
        return ((np.asarray(X) - self.center) @ self.components.T).astype(np.float32)


def pca(X: np.ndarray | sp.spmatrix, n_components: int, *, seed: int = 0) -> PCABasis:
    """Principal axes of the rows of ``X`` (cells x genes), centered on their mean.

    Up to 2,000 genes the axes are the eigenvectors of the genes' covariance matrix (exact,
    and fast for any number of cells); up to 2,000 cells (fewer than genes) they come from the
    eigenvectors of the cells' centered inner products (exact, and fast for any number of genes);
    small matrices get an exact dense SVD; larger ones a truncated SVD
    (``scipy.sparse.linalg.svds`` on the implicitly centered matrix, seeded by ``seed``).
    Each axis's sign is fixed (its largest loading is positive), so the result does not
    depend on the LAPACK build or the method. At most ``min(cells, genes) - 1`` axes are
    returned (one when there are fewer than three cells or genes).
    """
    dense = not sp.issparse(X)
    A = np.asarray(X, dtype=np.float64) if dense else X
    n, g = A.shape
    center = np.asarray(A.mean(axis=0), dtype=np.float64).ravel()
    k = max(1, min(int(n_components), min(n, g) - 1))
    if min(n, g) <= 2:
        comps = np.zeros((1, g))
        comps[0, 0] = 1.0
    elif g <= _GRAM_MAX_GENES:  # few genes: eigenvectors of the g x g covariance, exact and fast for any n
        gram = np.asarray((A.T @ A).toarray() if not dense else A.T @ A, dtype=np.float64)
        cov = gram - n * np.outer(center, center)
        values, vectors = np.linalg.eigh(cov)
        comps = vectors[:, np.argsort(values)[::-1][:k]].T
    elif n <= _GRAM_MAX_CELLS and n < g and (comps := _cell_space_axes(A, center, k)) is not None:
        pass
    elif n * g <= _DENSE_MAX:
        M = (A.toarray() if not dense else A) - center
        _, _, vt = np.linalg.svd(M, full_matrices=False)
        comps = vt[:k]
    else:
        import scipy.sparse.linalg as spla

        rng = np.random.default_rng(seed)
        op = spla.aslinearoperator(A if dense else sp.csr_matrix(A, dtype=np.float64))
        op = op - spla.aslinearoperator(np.ones((n, 1))) @ spla.aslinearoperator(center[None, :])
        _, s, vt = spla.svds(op, k=k, v0=rng.uniform(-1, 1, min(n, g)))
        comps = vt[np.argsort(s)[::-1]]
    comps = comps * np.sign(comps[np.arange(comps.shape[0]), np.abs(comps).argmax(axis=1)])[:, None]
    return PCABasis(center.astype(np.float32), comps.astype(np.float32))


def gram_axes(M: np.ndarray, k: int, *, min_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The leading axes of the (already centered) rows of ``M`` (cells x genes) from the eigenvectors of the cells'
    n x n inner products, for fewer cells than genes: ``(S, W)``, the singular values (largest first) and the genes x
    r matrix ``M.T @ U`` whose columns are the axes times them, for the at most ``k`` axes whose singular value
    exceeds ``min_ratio`` times the largest (the Gram matrix resolves no finer). The thin SVD's cells x genes
    workspace is avoided (at 4,000 x 30,000: 100 s and GBs, against seconds). :func:`pca` and the served
    coexpression baseline's covariance both take their axes here."""
    eig, U = np.linalg.eigh(M @ M.T)
    order = np.argsort(eig)[::-1]
    S = np.sqrt(np.clip(eig[order], 0.0, None))
    r = min(k, int(np.sum(S > min_ratio * max(S.max(initial=0.0), 1e-12))))
    return S[:r], M.T @ U[:, order[:r]]


def _cell_space_axes(A: np.ndarray | sp.spmatrix, center: np.ndarray, k: int) -> np.ndarray | None:
    """The top ``k`` principal axes through :func:`gram_axes`; None where an axis would carry (almost) no variance
    (its direction is then poorly determined here: the SVD decides it)."""
    M = (A.toarray() if sp.issparse(A) else A) - center
    _, W = gram_axes(M, k, min_ratio=3e-5)  # (an eigenvalue above 1e-9 of the largest: directions to ~1e-7)
    if W.shape[1] < k:
        return None
    axes = W.T
    return axes / np.linalg.norm(axes, axis=1, keepdims=True)


def calibrated(x: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """Cells x genes: ``x + delta``, clipped at 0, each gene rescaled so that its mean over the cells
    is the unclipped mean (or 0 where that is negative).

    How every prediction is made non-negative: the Simulator's cells (see its module docstring) and the
    baselines' with ``nonnegative=True``, so that a distribution metric compares them on equal terms.
    """
    raw = x + delta
    pred = np.maximum(raw, 0.0)
    have, want = pred.mean(axis=0), np.maximum(raw.mean(axis=0), 0.0)
    scale = np.divide(want, have, out=np.zeros_like(have), where=have > 0)
    return pred * scale


def log_dose_interpolation(effects: dict[float, np.ndarray], dose: float) -> np.ndarray | None:
    """An effect at ``dose`` from the effects measured at other doses (``{dose: delta}``, doses > 0): linear in
    log10 dose between the nearest measured dose below and above; beyond the measured range, the nearest dose's;
    None when nothing is measured or ``dose`` is not positive. The one rule for a dose between measured ones, for
    the ``dose`` baseline of :mod:`virtualcell.evaluate` and the served baseline of an untrained dose.

    >>> log_dose_interpolation({0.1: np.array([1.0]), 10.0: np.array([3.0])}, 1.0)
    array([2.])
    """
    points = {float(np.log10(d)): v for d, v in effects.items() if d > 0}
    if not points or not dose > 0:
        return None
    x, xs = float(np.log10(dose)), np.array(sorted(points))
    below, above = xs[xs <= x], xs[xs >= x]
    if len(below) == 0 or len(above) == 0:  # outside the measured doses: the nearest one
        return points[float(xs[np.argmin(np.abs(xs - x))])]
    lo, hi = float(below[-1]), float(above[0])
    if hi == lo:
        return points[lo]
    w = (x - lo) / (hi - lo)
    return (1 - w) * points[lo] + w * points[hi]


def unbiased_var(mean: np.ndarray, mean_of_squares: np.ndarray, n: np.ndarray | float) -> np.ndarray:
    """Per-gene sample variance (``ddof=1``) from the first two moments over ``n`` cells.

    ``n`` broadcasts against ``mean`` (e.g. a column of group sizes); a group of one cell
    has variance 0.
    """
    n = np.asarray(n, dtype=np.float64)
    # in float64: ``E[x^2] - E[x]^2`` of float32 moments cancels to nothing where the spread is small beside the
    # mean (values about 20 with sd 0.01 gave 0 to 3e-4 for 1e-4)
    mean, mean_of_squares = np.asarray(mean, dtype=np.float64), np.asarray(mean_of_squares, dtype=np.float64)
    return np.maximum(mean_of_squares - mean**2, 0.0) * (n / np.maximum(n - 1, 1))


def noise_corrected_sq_norm(delta: np.ndarray, *, var_a: np.ndarray, n_a: float, var_b: np.ndarray,
                            n_b: float) -> tuple[float, float]:
    """``(||delta||^2, noise)`` for ``delta = mean(a) - mean(b)`` of two independent groups.

    ``noise = sum(var_a) / n_a + sum(var_b) / n_b`` is the expected ``||delta||^2`` under
    sampling noise alone (``var_*``: unbiased per-gene variances), so ``||delta||^2 - noise``
    is an effect size that does not favour small groups. ``noise`` is NaN when a group has
    fewer than two cells.
    """
    sq = float(np.sum(np.square(np.asarray(delta, dtype=np.float64))))
    if n_a < 2 or n_b < 2:
        return sq, float("nan")
    return sq, float(np.sum(var_a) / n_a + np.sum(var_b) / n_b)


def signed_root(x: float) -> float:
    """``sign(x) * sqrt(|x|)``: an effect size on the scale of a norm from ``||delta||^2 - noise``,
    an unbiased estimate that falls below 0 when the effect is smaller than the noise. Flooring it
    at 0 would tie every such effect and lose their order; NaN stays NaN.

    >>> signed_root(4.0), signed_root(-0.25)
    (2.0, -0.5)
    """
    x = float(x)
    return float(np.sign(x) * np.sqrt(abs(x))) if np.isfinite(x) else float("nan")


def paired_sq_norm(delta: np.ndarray, *, var_diff: np.ndarray, n: float) -> tuple[float, float]:
    """``(||delta||^2, noise)`` for ``delta = mean(a_i - b_i)`` over ``n`` pairs (a predicted cell and
    its own baseline cell): ``noise = sum(var_diff) / n``, with ``var_diff`` the unbiased per-gene
    variance of the differences. Treating the pairs as two independent groups
    (:func:`noise_corrected_sq_norm`) would count the baseline cells' own spread as noise twice."""
    sq = float(np.sum(np.square(np.asarray(delta, dtype=np.float64))))
    if n < 2:
        return sq, float("nan")
    return sq, float(np.sum(var_diff) / n)


def bootstrap_mean(values: np.ndarray, *, seed: int = 0, n_boot: int = 2000, level: float = 0.95,
                   factors: Sequence[np.ndarray] | None = None) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``values`` and its percentile bootstrap interval at ``level``
    (``n_boot`` resamples of the values with replacement, seeded). With fewer than two values the
    interval is NaN: one value says nothing about its spread.

    ``factors``: labels of each value (e.g. its perturbation and its context), one array per factor.
    Values that share a label are not independent (a model that misreads a perturbation misreads it in
    every context), and resampling them one by one makes the interval too narrow. So each factor's
    labels are resampled instead, independently, and a value counts as often as the product of its
    labels' draws (Owen's "pigeonhole" bootstrap); with one factor this is the cluster bootstrap. The
    interval is NaN when no factor has two labels.

    >>> m, lo, hi = bootstrap_mean(np.array([1.0, 2.0, 3.0, 4.0]))
    >>> m, lo <= m <= hi
    (2.5, True)
    >>> bootstrap_mean(np.array([1.0, 2.0]), factors=[np.array(["a", "a"])])[1:]  # one perturbation
    (nan, nan)
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("bootstrap_mean needs at least one value.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    tail = 100 * (1 - level) / 2
    if factors is None:
        idx = rng.integers(0, v.size, size=(n_boot, v.size))
        boots = v[idx].mean(axis=1)
        return mean, float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))
    codes = [np.unique(np.asarray(f).astype(str), return_inverse=True)[1].ravel() for f in factors]
    if any(c.size != v.size for c in codes):
        raise ValueError("bootstrap_mean: each factor needs one label per value.")
    if all(c.max(initial=0) == 0 for c in codes):
        return mean, float("nan"), float("nan")
    weight = np.ones((n_boot, v.size))
    for c in codes:
        levels = int(c.max()) + 1
        weight *= rng.multinomial(levels, np.full(levels, 1.0 / levels), size=n_boot)[:, c]
    total = weight.sum(axis=1)
    boots = (weight @ v)[total > 0] / total[total > 0]  # a draw whose labels share no value says nothing
    return mean, float(np.percentile(boots, tail)), float(np.percentile(boots, 100 - tail))
