"""Probe (session 49): what is the part the bundled model's small knockouts share, off the common direction?

Seed 0, as probe.py. The small knockouts' shared part (their mean delta off u, model) against: the cell-weighted
average knockout off u (what the generic condition is trained on), the replicate difference (training controls minus
rep_3 controls, through the codec), and, per knockout, each delta along that replicate difference, model against
training replicates. Then the training pairs' source-target distance (OT pairing, log-normalized expression) for
control pairs against knockout pairs: whether a control target is paired closer to its source than a knockout's is.

    cd experiments && PYTHONPATH=. python results/attempts/alike_decomposed/shared_part.py > results/attempts/alike_decomposed/shared_part.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parents[2])]
import _protocol as P  # noqa: E402
import probe as pr  # noqa: E402


def main() -> None:
    P.setup(2)
    from virtualcell.sentences import encode, expression_matrix, log_normalize, detect_scale
    from virtualcell.train import build_pairs

    sc = pr.screen(0, 200)
    model, panel, X, labels, held, ctl, u, small = sc.model, sc.panel, sc.X, sc.labels, sc.held, sc.ctl, sc.u, sc.small
    adata, contract, tA, tB = sc.adata, sc.contract, sc.tA, sc.tB
    mA, mB = pr.model_halves(model, sc.baseline, panel, 0)
    off = lambda v: pr.off_u(v, u)  # noqa: E731
    m = (off(mA[small]).mean(0) + off(mB[small]).mean(0)) / 2
    corr = lambda a, b: float(np.corrcoef(a, b)[0, 1])  # noqa: E731
    print(f"small knockouts ({len(small)}): their shared part off u (model) has norm {np.linalg.norm(m):.2f}")
    w = off(X[~held & ~ctl].mean(0) - X[~held & ctl].mean(0))
    print(f"  correlation with the cell-weighted average knockout off u (norm {np.linalg.norm(w):.2f}): {corr(m, w):.2f}")
    Xc = model.decode(encode(adata, top_k=model.top_k, vocab=model.genes, seed=0))
    rv = off(Xc[~held & ctl].mean(0) - Xc[held & ctl].mean(0))
    print(f"  correlation with the replicate difference off u (training controls - rep_3 controls, norm "
          f"{np.linalg.norm(rv):.2f}): {corr(m, rv):.2f}")
    big = [i for i in range(len(panel)) if i not in set(small)]
    print(f"  the other knockouts' mean off u, correlation with it: model {corr(off(mA[big]).mean(0), m):.2f}, "
          f"training replicates {corr(off(tA[big]).mean(0), m):.2f}")
    rv /= np.linalg.norm(rv)
    counts = {p: int((~held & (labels == p)).sum()) for p in panel}
    print("\nknockout | training cells | along the replicate difference: model | training replicates")
    for p in sorted(panel, key=counts.get):
        i = panel.index(p)
        print(f"{p} | {counts[p]} | {((mA[i] + mB[i]) / 2) @ rv:.2f} | {((tA[i] + tB[i]) / 2) @ rv:.2f}")

    train_ad = adata[~held].copy()
    src, tgt = build_pairs(train_ad, contract, pairing="ot", seed=0)
    src, tgt = src[src >= 0], tgt[src >= 0]
    Xt = expression_matrix(train_ad)
    Xn = log_normalize(Xt, detect_scale(Xt)).toarray()
    lab = train_ad.obs[contract.perturbation_key].astype(str).to_numpy()[tgt]
    d = np.linalg.norm(Xn[src] - Xn[tgt], axis=1)
    print(f"\ntraining pairs, source-target distance: control pairs {d[lab == contract.control].mean():.2f}, knockout "
          f"pairs {d[lab != contract.control].mean():.2f}, small knockouts' "
          f"{d[np.isin(lab, [panel[i] for i in small])].mean():.2f}")


if __name__ == "__main__":
    main()
