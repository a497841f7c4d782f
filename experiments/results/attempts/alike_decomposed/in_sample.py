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
    sc = pr.screen(0, 200)
    rep = sc.adata.obs[p4.HELD[0]].astype(str).to_numpy()
    print("baseline cells from | small knockouts off u, each / shared: model | data | pooled noise-free alike: model | data")
    for r in ("rep_1", "rep_2"):
        cells = np.sort(np.random.default_rng(1).permutation(np.flatnonzero((rep == r) & sc.ctl))[:200])
        mA, mB = pr.model_halves(sc.model, sc.adata[cells].copy(), sc.panel, 0)
        rA, rB, _ = pr.data_halves(sc.X, sc.labels, rep == r, np.flatnonzero((rep == r) & sc.ctl), sc.panel,
                                   np.random.default_rng(0))
        (me, ms), (de, ds) = pr.small_products(mA, mB, sc.u, sc.small), pr.small_products(rA, rB, sc.u, sc.small)
        print(f"{r} | {me:.3f} / {ms:.3f} | {de:.3f} / {ds:.3f} | {pr.pooled(mA, mB):.3f} | {pr.pooled(rA, rB):.3f}")


if __name__ == "__main__":
    main()
