"""Every gene from a decoded cell sentence: a linear map fitted on the training cells.

A cell sentence holds a cell's ``top_k`` most expressed genes; decoded by the rank fit, every other gene reads 0
and a written gene reads the value of its rank, whatever the gene. Where a panel has more expressed genes than
``top_k`` (protocol 5: 9,015 genes, sentences of 100), the genes below the cut are lost: a perfect model's
IFN-beta effect, decoded, scored pearson_delta 0.83 against meanshift's 0.94. Yet the genes below the cut move with
those above it (an interferon program is many genes at once), so the decoded sentence predicts them.

:class:`GeneMap` is that prediction: a ridge regression from the decoded sentence (the genes any training sentence
wrote) fitted on the training cells, its penalty and its rank chosen on a random fifth of them. It comes in two
kinds. Fitted to what the decode misses (``residual``: every gene's measured expression, log-normalized as the
Simulator's cells are, minus its decoded value) and added to the decode, a large penalty or rank 0 gives the decode
back, so a written gene keeps its decoded value; it predicts single cells better than the decode alone on every
panel measured (``experiments/results/attempts/gene_map/gate_check_residual.txt``). Fitted to the expression itself,
it also recalibrates each written gene (its decoded value is that of its rank, whatever the gene) but pulls it
toward its mean, and predicted protocol 1's single cells worse than the decode alone (``gate_check.txt``); yet on
protocol 5 its mean effects came out closer to the measured ones than the residual map's (the verdict's codec MSE at
every seed, and the held-out pearson_delta). Applied to the decoded sentences the model generates, a map turns each
into a full expression profile; the Simulator's ``decode(perturbed) - decode(control)`` then has an effect on every
gene. ``virtualcell train`` scores both kinds after both rank decodes and keeps the one whose training effects,
passed through the sentences, come out closest to its validation split's measured effects, or no map
(:func:`virtualcell.validation.choose_decode`).

The map is stored as two factors, ``inputs x rank`` and ``rank x genes``, in ``gene_map.npz`` in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from .errors import ModelError, finite_number, non_finite, whole_at_least

FILE = "gene_map.npz"
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # ridge penalty, times the mean diagonal of the inputs' D'D
RANKS = (0, 8, 16, 32, 64, 128, 256)  # the map's ranks tried (0: the decode plus a constant), and its full rank
MAX_FLOATS = 1 << 22  # a map's two factors hold at most this many numbers (16 MB): the full rank of a small panel
MAPPED = "{decode}+map"  # a decode through a map fitted to the expression itself (GeneMap.fit(residual=False))
RESIDUAL = "{decode}+residual map"  # through a map fitted to what the decode misses (the verdict's codec names)
MAX_CELLS = 2000  # training cells the map is fitted on at most (a seeded draw): the fit is a cells x inputs SVD
VALIDATION = 0.2  # share of those cells that choose the penalty and the rank


@dataclass(frozen=True)
class GeneMap:
    """``expression = decoded + (decoded[:, inputs] - mean_in) @ left @ right + mean_out``.

    ``residual=False`` (a map fitted to the expression itself; every map written in session 42, whose record
    has no ``residual``) drops the leading ``decoded``.

    Not clipped at 0: a difference of two mapped profiles (what the Simulator predicts from) stays linear in the
    sentences, and the Simulator's predictions are made non-negative after it (``simulator.calibrated``).

    ``decode``: the rank decode (``"linear"`` or ``"table"``) whose output it was fitted on; ``penalty``,
    ``rank``: chosen on the validation fifth of the fitting cells (the rank at most the inputs' own); ``error``:
    that fifth's mean squared error per gene, and ``error_without`` the decoded sentences' own, for the record.
    """

    inputs: np.ndarray
    mean_in: np.ndarray
    mean_out: np.ndarray
    left: np.ndarray
    right: np.ndarray
    decode: str
    penalty: float
    rank: int
    error: float
    error_without: float
    residual: bool = True

    @property
    def n_genes(self) -> int:
        return int(self.mean_out.size)

    def __call__(self, decoded: sp.spmatrix | np.ndarray) -> np.ndarray:
        """Full expression profiles (float32, cells x genes) of decoded sentences (cells x genes)."""
        D = decoded.toarray() if sp.issparse(decoded) else np.asarray(decoded)
        if D.ndim != 2 or D.shape[1] != self.n_genes:
            raise ModelError(f"The gene map reads decoded sentences of {self.n_genes} genes; got shape {D.shape}.")
        out = ((D[:, self.inputs] - self.mean_in) @ self.left) @ self.right + self.mean_out
        return (out + D if self.residual else out).astype(np.float32)

    def shift(self, delta: np.ndarray) -> np.ndarray:
        """A change of decoded expression (rows x genes) as the map passes it on: its linear part, no intercept."""
        delta = np.asarray(delta)
        out = (delta[..., self.inputs] @ self.left) @ self.right
        return (out + delta if self.residual else out).astype(np.float32)

    @classmethod
    def fit(cls, decoded: sp.spmatrix | np.ndarray, expression: sp.spmatrix | np.ndarray, *, decode: str,
            seed: int = 0, residual: bool = True) -> GeneMap:
        """Fit on the training cells: ``decoded`` (their sentences, decoded) and ``expression`` (the same cells'
        log-normalized expression over the same genes, :func:`virtualcell.sentences.model_expression`).
        ``residual``: fit what the decode misses (``expression - decoded``) and add the decode back; ``False``
        fits the expression itself, which recalibrates each written gene as well (its decoded value is that of
        its rank, whatever the gene) but pulls it toward its mean where the penalty is large. Which carries the
        training effects better differs from panel to panel, so the trainer's verdict scores both
        (:data:`RESIDUAL`, :data:`MAPPED`; :meth:`fit_kinds` fits them at the cost of one)."""
        return cls.fit_kinds(decoded, expression, decode=decode, seed=seed, kinds=(residual,))[residual]

    @classmethod
    def fit_kinds(cls, decoded: sp.spmatrix | np.ndarray, expression: sp.spmatrix | np.ndarray, *, decode: str,
                  seed: int = 0, kinds: tuple[bool, ...] = (False, True)) -> dict[bool, GeneMap]:
        """:meth:`fit` of each kind in ``kinds`` (``residual`` values) on the same cells: the kinds differ in their
        target only, so the inputs' two SVDs (on the fitting cells, and on all of them) are made once."""
        if decoded.shape != expression.shape:
            raise ModelError(f"decoded {decoded.shape} and expression {expression.shape} must be the same cells and "
                             "genes.")
        rng = np.random.default_rng([seed, 23])
        n = decoded.shape[0]
        cells = np.sort(rng.choice(n, size=min(n, MAX_CELLS), replace=False))
        full = _dense(decoded, cells)
        T = _dense(expression, cells)
        inputs = np.flatnonzero((full != 0).any(axis=0))
        if inputs.size == 0 or cells.size < 10:
            raise ModelError(f"A gene map needs at least 10 cells with written genes; got {cells.size} cells, "
                             f"{inputs.size} genes written.")
        D = full[:, inputs]
        val = rng.random(cells.size) < VALIDATION
        if val.sum() < 2 or (~val).sum() < 5:
            val = np.arange(cells.size) % 5 == 0
        base = float(((T[val] - full[val]) ** 2).mean())
        fitting, every = _basis(D[~val]), _basis(D)
        maps = {}
        for residual in kinds:
            R = T - full if residual else T  # the map's target: what the decode misses, or the expression itself
            penalty, rank, error = _choose(fitting, R[~val], D[val], R[val])
            mean_in, mean_out, left, right = _solve(every, R, penalty, rank)
            maps[residual] = cls(inputs.astype(np.int64), mean_in, mean_out, left, right, decode, float(penalty),
                                 int(left.shape[1]), float(error), base, bool(residual))
        return maps

    # ------------------------------------------------------------------ storage
    def record(self) -> dict[str, Any]:
        """What ``virtualcell.json`` says of it (the arrays are in :data:`FILE`)."""
        return {"decode": self.decode, "penalty": self.penalty, "rank": self.rank, "inputs": int(self.inputs.size),
                "error": self.error, "error_without": self.error_without, "residual": self.residual}

    def save(self, path: str | Path) -> None:
        from .safeio import atomic_write

        with atomic_write(path, "wb") as fh:
            np.savez(fh, inputs=self.inputs, mean_in=self.mean_in, mean_out=self.mean_out, left=self.left,
                     right=self.right)

    @classmethod
    def load(cls, path: str | Path, record: dict[str, Any], n_genes: int) -> GeneMap:
        """The map in ``path`` (``gene_map.npz``), as ``record`` (``virtualcell.json``'s ``gene_map``) describes it,
        for a model of ``n_genes`` genes. Arrays of another shape, inputs that are not genes of the model (numpy
        wrapped a negative one round to another gene), and values that are not finite numbers are refused, naming
        the file."""
        again = ("Copy the checkpoint folder again, or run 'virtualcell verdict' on it to fit the map again.")
        try:
            with np.load(path) as z:
                arrays = {k: z[k] for k in ("inputs", "mean_in", "mean_out", "left", "right")}
        except (OSError, ValueError, KeyError) as err:
            raise ModelError(f"{str(path)!r} cannot be read ({err}); the checkpoint's virtualcell.json says the model "
                             f"decodes through a gene map. {again}") from None
        said = _record_fault(record)
        if said:
            raise ModelError(f"The gene_map record in the virtualcell.json beside {str(path)!r} is damaged ({said}). "
                             + again)
        inputs = arrays["inputs"]
        if inputs.ndim != 1 or inputs.dtype.kind not in "iu" or (inputs.size and (
                int(inputs.min()) < 0 or int(inputs.max()) >= n_genes)):
            raise ModelError(f"{str(path)!r} is damaged: its inputs are not positions of this model's {n_genes} genes "
                             f"({inputs.dtype}, {inputs.size} of them, from {inputs.min() if inputs.size else '-'} to "
                             f"{inputs.max() if inputs.size else '-'}). {again}")
        for name in ("mean_in", "mean_out", "left", "right"):
            bad = non_finite(arrays[name])
            if bad:
                raise ModelError(f"{str(path)!r} is damaged: its {name}: {bad}. {again}")
        out = cls(**arrays, decode=str(record["decode"]), penalty=float(record["penalty"]), rank=int(record["rank"]),
                  error=float(record.get("error", np.nan)), error_without=float(record.get("error_without", np.nan)),
                  residual=bool(record.get("residual", False)))
        if out.n_genes != n_genes or out.mean_out.shape != (n_genes,) or out.mean_in.shape != (out.inputs.size,) \
                or out.left.shape != (out.inputs.size, out.rank) or out.right.shape != (out.rank, n_genes):
            raise ModelError(f"{str(path)!r} does not fit this model's {n_genes} genes; copy the checkpoint folder "
                             "again, or run 'virtualcell verdict' on it to fit the map again.")
        return out


def _record_fault(record: Any) -> str:
    """What is wrong with a map's record in ``virtualcell.json`` (:meth:`GeneMap.record`), or ``""``."""
    from .sentences import DECODE_METHODS

    if not isinstance(record, dict):
        return f"{type(record).__name__}, not a record"
    missing = [k for k in ("decode", "penalty", "rank") if k not in record]
    if missing:
        return f"it lacks {', '.join(missing)}"
    if record["decode"] not in DECODE_METHODS:
        return f"decode {record['decode']!r}, not one of {', '.join(DECODE_METHODS)}"
    if not (finite_number(record["penalty"]) and record["penalty"] >= 0):
        return f"penalty {record['penalty']!r}, not a number >= 0"
    if not whole_at_least(record["rank"], 0):
        return f"rank {record['rank']!r}, not a whole number >= 0"
    if not isinstance(record.get("residual", False), bool):
        return f"residual {record['residual']!r}, not true or false"
    for key in ("error", "error_without"):  # (for the record only: NaN where it was not measured)
        value = record.get(key, np.nan)
        if not (finite_number(value) or (isinstance(value, float) and np.isnan(value))):
            return f"{key} {value!r}, not a number"
    return ""


def _dense(X: sp.spmatrix | np.ndarray, rows: np.ndarray) -> np.ndarray:
    part = X[rows]
    return np.asarray(part.toarray() if sp.issparse(part) else part, dtype=np.float64)


def _basis(D: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centred thin SVD of the inputs: ``D - mu = U s V'`` (``mu, U, s, V'``), shared by every target fitted on
    them."""
    mu = D.mean(axis=0)
    U, s, Vt = np.linalg.svd(D - mu, full_matrices=False)
    keep = s > s[0] * 1e-9 if s.size else s > 0
    return mu, U[:, keep], s[keep], Vt[keep]


def _targets(basis: tuple[np.ndarray, ...], T: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The targets' mean ``nu`` and the centred targets in the basis's left vectors: ``B = U'(T - nu)``."""
    nu = T.mean(axis=0)
    return nu, basis[1].T @ (T - nu)


def _shrunk(s: np.ndarray, penalty: float, n_inputs: int) -> np.ndarray:
    """Ridge's ``s / (s^2 + lambda)`` per component, ``lambda`` = ``penalty`` times the mean diagonal of ``D'D``."""
    return s / (s ** 2 + penalty * float((s ** 2).sum()) / max(n_inputs, 1))


def _choose(basis: tuple[np.ndarray, ...], T: np.ndarray, Dv: np.ndarray, Tv: np.ndarray) -> tuple[float, int, float]:
    """The (penalty, rank) of least squared error on the validation cells ``Dv, Tv``, fitted on the cells of
    ``basis`` (:func:`_basis`) with targets ``T``; and that error (mean per cell and gene). Truncating the SVD at
    ``rank`` components, by singular value, gives the rank."""
    mu, _, s, Vt = basis
    nu, B = _targets(basis, T)
    A = (Dv - mu) @ Vt.T  # validation inputs in the right basis
    R = Tv - nu
    # (only the diagonal of A.T @ R @ B.T enters the error: the whole k x k product grows with genes x k^2)
    AtA, BBt, dM, RR = A.T @ A, B @ B.T, ((A.T @ R) * B).sum(1), float((R ** 2).sum())
    best = (np.inf, PENALTIES[0], RANKS[0])
    for penalty in PENALTIES:
        f = _shrunk(s, penalty, Vt.shape[1])
        for rank in _ranks(s.size, Vt.shape[1] + T.shape[1]):
            g = np.where(np.arange(s.size) < rank, f, 0.0)
            # ||A diag(g) B - R||^2 through k x k products: no cells x genes matrix per candidate
            err = float(np.einsum("i,ij,j,ji->", g, AtA, g, BBt) - 2 * (g * dM).sum() + RR)
            if err < best[0] - 1e-12:
                best = (err, penalty, rank)
    return best[1], best[2], best[0] / Tv.size


def _ranks(components: int, width: int) -> list[int]:
    """The ranks tried: :data:`RANKS` below the number of ``components``, and the full rank (every component)
    where its two factors (``width`` = inputs + genes numbers per rank) fit :data:`MAX_FLOATS`. Cutting
    components by their singular value drops the inputs that vary least, which on a panel whose sentences hold
    every gene still carry the most of some genes: the full rank must stay a choice there (the embedded screen's
    299 genes: without it the map's error per gene was twice the plain decode's)."""
    ranks = [r for r in RANKS if r < components]
    return ranks + [components] if components * width <= MAX_FLOATS or max(ranks, default=0) == 0 else ranks


def _solve(basis: tuple[np.ndarray, ...], T: np.ndarray, penalty: float, rank: int) -> tuple[np.ndarray, ...]:
    """The map's factors fitted on all the cells of ``basis`` (:func:`_basis`) with targets ``T``:
    ``left = V diag(s / (s^2 + lambda))`` and ``right = U'(T - nu)``, each cut to ``rank`` components."""
    mu, _, s, Vt = basis
    nu, B = _targets(basis, T)
    f = _shrunk(s, penalty, Vt.shape[1])
    r = min(rank, s.size)
    left = (Vt[:r].T * f[:r]).astype(np.float32)
    return mu.astype(np.float32), nu.astype(np.float32), left, B[:r].astype(np.float32)
