"""Which rule for making a shifted population non-negative keeps it nearest the measured cells (E-distance)?

    cd experiments && PYTHONPATH=. python results/attempts/nonnegative_rule/probe_rules.py

Every prediction the Simulator serves is x + delta made non-negative (virtualcell._stats.calibrated: clipped at 0,
each gene rescaled to its unclipped mean). Protocol 5 scores E-distance, which sees the shape of the predicted
population, and plain meanshift (allowed below 0) scores 1.74 there against 2.25 made non-negative. This probe
asks whether another non-negative rule would lose less, with the exact mean shift (no model, no codec):
* in-sample: the training half's control cells shifted by the training half's own IFN-beta effect, against the
  training half's stimulated cells (protocol 5's split, seeds 0-2), and the same within each Kang (scGen) cell type;
* held out: the training half's effect on protocol 5's held-out baseline controls, against its held-out reference
  stimulated cells (as the protocol scores meanshift).
E-distance: pertpy's, on 50 principal components of the measured control and stimulated cells of the comparison
(log1p-normalized): its own PCA, so the values are not the protocol table's, only comparable within a row.
Rules: raw (x + delta, below 0 allowed); clip+rescale (today's); clip only (mean not kept); multiplicative down
(a falling gene scaled by its mean ratio, a rising one shifted); expressing (a falling gene's drop taken from the
cells that express it, then clipped and rescaled).
"""
import numpy as np
import scipy.sparse as sp
from pertpy.tools import Distance
from sklearn.decomposition import PCA

import _protocol as P
import protocol_5_cytokine_response as p5
import virtualcell as vc
from virtualcell._stats import calibrated
from virtualcell.sentences import detect_scale, expression_matrix, log_normalize


def dense(a):  # noqa: ANN001, ANN201
    X = expression_matrix(a)
    return np.asarray(log_normalize(sp.csr_matrix(X), detect_scale(X)).todense(), dtype=np.float64)


def multiplicative_down(x, d):  # noqa: ANN001, ANN201
    mu = x.mean(0)
    ratio = np.divide(np.maximum(mu + d, 0), mu, out=np.zeros_like(mu), where=mu > 0)
    return np.where(d < 0, x * ratio, x + d)


def expressing(x, d):  # noqa: ANN001, ANN201
    on = x > 0
    dd = np.where(d < 0, d / np.maximum(on.mean(0), 1e-9), d)
    pred = np.maximum(np.where(on | (d >= 0), x + dd, x), 0)
    have, want = pred.mean(0), np.maximum(x.mean(0) + d, 0)
    return pred * np.divide(want, have, out=np.zeros_like(have), where=have > 0)


RULES = {"raw": lambda x, d: x + d, "clip+rescale": calibrated, "clip only": lambda x, d: np.maximum(x + d, 0),
         "multiplicative down": multiplicative_down, "expressing": expressing}


def row(name, ctrl, pert, ctrl_eval=None, pert_eval=None):  # noqa: ANN001, ANN201
    dist = Distance(metric="edistance")
    d = pert.mean(0) - ctrl.mean(0)
    ce, pe = (ctrl, pert) if ctrl_eval is None else (ctrl_eval, pert_eval)
    pca = PCA(50, random_state=0).fit(np.vstack([ce, pe]))
    Y = pca.transform(pe)
    return [name] + [f"{dist(pca.transform(f(ce, d)), Y):.3f}" for f in RULES.values()]


def main() -> None:
    P.setup(1)
    rows = []
    for seed in (0, 1, 2):
        _, contract, stim, train, base, ref = p5.data(seed)
        lab, X = np.asarray(contract.labels(train)), dense(train)
        ctrl, pert = X[lab == contract.control], X[lab == stim]
        rows.append(row(f"protocol 5 seed {seed}, in-sample (training half)", ctrl, pert))
        rows.append(row(f"protocol 5 seed {seed}, held out", ctrl, pert,
                        dense(base)[np.asarray(contract.labels(base)) == contract.control],
                        dense(ref)[np.asarray(contract.labels(ref)) == stim]))
    a = vc.datasets.load("kang2018_scgen")
    c = vc.DataContract.from_adata(a)
    lab, X, ct = np.asarray(c.labels(a)), dense(a), a.obs["cell_type"].astype(str).to_numpy()
    stim = sorted(set(lab) - {c.control})[0]
    for t in np.unique(ct):
        m = ct == t
        if (m & (lab == c.control)).sum() > 20 and (m & (lab == stim)).sum() > 20:
            rows.append(row(f"Kang (scGen) {t}, in-sample", X[m & (lab == c.control)], X[m & (lab == stim)]))
    print("| comparison | " + " | ".join(RULES) + " |")
    print("|---" * (len(RULES) + 1) + "|")
    for r in rows:
        print("| " + " | ".join(r) + " |", flush=True)


if __name__ == "__main__":
    main()
