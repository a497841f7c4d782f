"""Probe (session 49): do the small knockouts share the spurious part when the model starts from cells it trained on?

As probe.py, but the 200 baseline cells are control cells of a training replicate (rep_1, then rep_2), and the data's
deltas are that replicate's own. Prints, for the small knockouts (noise-free squared norm below 1 in the training
replicates), off the common direction u: each one's noise-free squared norm and the mean product of two different ones,
model against data, and the pooled noise-free mean pairwise correlation of all 25.

    cd experiments && PYTHONPATH=. python results/attempts/alike_decomposed/in_sample.py > results/attempts/alike_decomposed/in_sample.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]
import _protocol as P  # noqa: E402
import probe as pr  # noqa: E402
import protocol_4_screen_ranking as p4  # noqa: E402


def main() -> None:
    P.setup(2)
    import virtualcell as vc
    from virtualcell.sentences import model_expression

    model = vc.model.bundled()
    panel = sorted(model.perturbations.labels)
    adata, contract, held, *_ = p4.data(0, 200)
    X = model_expression(adata, model.genes)[0].toarray()
    labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
    ctl = contract.is_control(adata)
    rep = adata.obs[p4.HELD[0]].astype(str).to_numpy()
    tA, tB, _ = pr.data_halves(X, labels, ~held, np.flatnonzero(~held & ctl), panel, np.random.default_rng(0))
    g = (tA.mean(0) + tB.mean(0)) / 2
    u = g / np.linalg.norm(g)
    small = np.flatnonzero(np.einsum("ij,ij->i", tA, tB) < 1.0)

    def shared(A: np.ndarray, B: np.ndarray) -> tuple[float, float]:
        a, b = A[small] - np.outer(A[small] @ u, u), B[small] - np.outer(B[small] @ u, u)
        C = a @ b.T
        return float(np.diag(C).mean()), float(C[~np.eye(len(small), dtype=bool)].mean())

    print("baseline cells from | small knockouts off u, each / shared: model | data | pooled noise-free alike: model | data")
    for r in ("rep_1", "rep_2"):
        cells = np.sort(np.random.default_rng(1).permutation(np.flatnonzero((rep == r) & ctl))[:200])
        mA, mB = pr.model_halves(model, adata[cells].copy(), panel, 0)
        rA, rB, _ = pr.data_halves(X, labels, rep == r, np.flatnonzero((rep == r) & ctl), panel, np.random.default_rng(0))
        (me, ms), (de, ds) = shared(mA, mB), shared(rA, rB)
        print(f"{r} | {me:.3f} / {ms:.3f} | {de:.3f} / {ds:.3f} | {pr.pooled(mA, mB):.3f} | {pr.pooled(rA, rB):.3f}")


if __name__ == "__main__":
    main()
