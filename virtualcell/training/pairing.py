"""Which control cell each training cell is predicted from: its pair (:func:`build_pairs`).

By default optimal transport within each context: every perturbation's cells are matched one to one to a fair draw
of the context's controls, so the pairs keep the whole effect and a cell is still paired with a control that
resembles it. ``nearest`` and ``random`` are the alternatives it was measured against
(``experiments/pairing_shrinkage.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .._stats import pca
from ..contract import DataContract
from ..errors import DataError, TrainingError
from ..sentences import detect_scale, expression_matrix, log_normalize

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = ["PAIRINGS", "build_pairs", "check_pairing"]

PAIRINGS = ("ot", "nearest", "random")  # how training cells get their source control cell; the first is the default


def check_pairing(pairing: str) -> None:
    if pairing not in PAIRINGS:
        raise TrainingError(f"pairing={pairing!r}: use ot (each perturbation's cells matched one to one to a fair draw "
                            "of the controls; the default), nearest or random.")


_OT_BLOCK = 1024  # the largest assignment solved at once (cubic cost); larger groups are cut into random blocks


def build_pairs(
    adata: ad.AnnData, contract: DataContract, *, pairing: str = PAIRINGS[0], neighbours: int = 5, n_pcs: int = 20,
    seed: int = 0, draw: int = 0, embedded: dict[tuple, np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair every cell with a control cell of the same context: the cell it is predicted from.

    ``pairing`` says how:

    * ``"ot"``: optimal transport. Each perturbation's cells (in each context) are matched,
      one to one, to an equally large uniform draw of the context's control cells, by the
      assignment of least total squared distance in PCA space. The sources are then a fair
      sample of the controls, so the pairs carry the perturbation's whole effect, and within
      that a cell is still paired with a control that resembles it (as CINEMA-OT pairs).
      Control cells are split into two random halves matched to each other the same way.
    * ``"nearest"``: one of the ``neighbours`` nearest control cells, at random. The source
      then resembles its target most, but for a perturbation that moves the cells, the
      nearest controls are those that already look perturbed: the pairs carry only part of
      the effect (about 0.4–0.9 of it on the embedded screen's strongest knockouts, varying
      from one knockout to another), and that shrinkage is what the model learns.
    * ``"random"``: a random control cell of the context; unbiased, but the source says
      nothing about its target beyond the context.

    Control cells are never paired with themselves. Returns ``(source, target)`` index
    arrays: target cell ``target[i]`` is predicted from control cell ``source[i]``.
    ``draw`` > 0 gives another draw of the same pairing over the same PCA embedding, with other random
    choices; for ``"ot"`` the controls are then drawn with replacement (a bootstrap sample: uniform still, but not
    every control once, so that a perturbation with as many cells as there are controls, whose transport is then
    one fixed matching, gets other pairs too). ``draw=0`` is the draw of ``seed`` alone. ``embedded``: a dict the
    call keeps each context's PCA embedding in, for the next draw of the same cells to reuse (the embedding does
    not depend on the draw; on wide data it is most of a draw's time).
    """
    from scipy.spatial import cKDTree

    check_pairing(pairing)
    if draw < 0:
        raise ValueError(f"draw must be >= 0, got {draw}.")
    rng = np.random.default_rng(seed if draw == 0 else [seed, draw])
    embedded = {} if embedded is None else embedded
    normalized: list = []  # read once, where an embedding is not kept yet

    def embedding(c: str, members: np.ndarray) -> np.ndarray:
        key = (c, n_pcs, seed, adata.n_obs, hash(members.tobytes()))  # (kept for these very cells and settings only)
        if key not in embedded:
            if not normalized:
                X = expression_matrix(adata)
                normalized.append(log_normalize(X, detect_scale(X)))
            Xn = normalized[0][members]
            embedded[key] = pca(Xn, n_pcs, seed=seed).transform(Xn)
        return embedded[key]

    ctx = contract.contexts(adata)
    labels = contract.conditions(adata)  # each dose of a drug is matched to the controls on its own
    is_ctrl = contract.is_control(adata)
    src = np.full(adata.n_obs, -1, dtype=np.int64)
    for c in np.unique(ctx):
        members = np.flatnonzero(ctx == c)
        controls = members[is_ctrl[members]]
        if controls.size < 2:
            raise DataError(
                f"Context {c!r} has {controls.size} control cells; pairs need at least 2. Add control cells for it "
                "or drop the context."
            )
        if pairing == "random":
            for m in members:
                cand = controls[controls != m]
                src[m] = cand[rng.integers(cand.size)]
            continue
        emb = embedding(str(c), members)
        pos = {m: i for i, m in enumerate(members)}
        if pairing == "ot":
            at = lambda idx: emb[[pos[int(i)] for i in idx]]  # noqa: E731
            half = rng.permutation(controls)
            a, b = half[: half.size // 2], half[half.size // 2 :]
            groups = [(a, b), (b, a)]
            groups += [(members[~is_ctrl[members] & (labels[members] == lab)], controls)
                       for lab in np.unique(labels[members][~is_ctrl[members]])]
            for targets, pool in groups:
                src[targets] = _transport(targets, pool, at, rng, bootstrap=draw > 0)
            continue
        tree = cKDTree(emb[[pos[m] for m in controls]])
        k = min(neighbours + 1, controls.size)
        _, nn = tree.query(emb, k=k)
        nn = np.atleast_2d(nn)
        for row, m in enumerate(members):
            cand = controls[nn[row]]
            cand = cand[cand != m][: max(1, k - 1)]
            src[m] = cand[rng.integers(cand.size)]
    return src, np.arange(adata.n_obs)


def _transport(targets: np.ndarray, pool: np.ndarray, at: Callable[[np.ndarray], np.ndarray],
               rng: np.random.Generator, bootstrap: bool = False) -> np.ndarray:
    """A source from ``pool`` for each of ``targets``: a uniform draw of the pool (each pool cell
    used equally often, up to one; with ``bootstrap``, drawn with replacement), assigned to the targets by
    least total squared distance of their embeddings ``at(idx)``; groups over ``_OT_BLOCK`` cells are solved
    in random blocks."""
    from scipy.optimize import linear_sum_assignment

    n = targets.size
    if bootstrap:
        draw = rng.choice(pool, size=n, replace=True)
    else:
        draw = np.concatenate([rng.permutation(pool) for _ in range(-(-n // pool.size))])[:n]
    order = rng.permutation(n)
    out = np.empty(n, dtype=np.int64)
    for block in np.array_split(order, -(-n // _OT_BLOCK)) if n else []:
        t, s = at(targets[block]), at(draw[block])
        cost = ((t[:, None, :] - s[None, :, :]) ** 2).sum(-1)
        rows, cols = linear_sum_assignment(cost)
        out[block[rows]] = draw[block][cols]
    return out
