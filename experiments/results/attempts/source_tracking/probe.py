"""Probe (session 50): does the bundled model's prediction follow its source cell as much under a knockout prompt as
under the control prompt?

Session 49 (`../alike_decomposed/`) found that the small knockouts' predicted deltas share a part the data lacks,
lying partly along the difference between the training replicates' controls and rep_3's. A reading that would give
exactly that: if the prediction under prompt p is about ``m_p + b_p (x_s - m)`` for source cell ``x_s``, then over a
set of sources whose mean sits off the training controls' mean (rep_3's), every knockout's delta gains
``(b_p - b_control)(mean source - m)``: one shared part, along the replicate difference, wherever a knockout prompt
follows its source less than the control prompt does.

Sources: 200 control cells of each replicate (rep_1, rep_2: trained on; rep_3: held out). Each prompt (control and the
25 knockouts) is sampled twice per cell and decoded. Per prompt:

* ``b_shift``: how far the mean prediction moves with the source set's mean, across the three replicates (the
  slope of the prediction's replicate means on the sources' replicate means, pooled over genes; both centred);
* ``b_cell``: the same within a replicate, from cell-to-cell variation of the sources (the slope of per-cell mean
  prediction on the source cell's expression, pooled over genes and replicates, each replicate centred).

Sources are in the model's decode of their own sentences (the codec), so a slope of 1 means "carries the source over".

    cd experiments && PYTHONPATH=. python results/attempts/source_tracking/probe.py [--model DIR] > results/attempts/source_tracking/probe.txt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "alike_decomposed"), str(HERE.parents[2])]  # probe.py there; _protocol
import _protocol as P  # noqa: E402
import probe as pr  # noqa: E402  (../alike_decomposed/probe.py)
import protocol_4_screen_ranking as p4  # noqa: E402

SAMPLES = 2
SPLITS = 20  # random halvings averaged in the noise-free products


def predictions(model, cells, prompts, seed: int) -> np.ndarray:  # noqa: ANN001
    """Per prompt and cell, the mean decoded prediction over SAMPLES samples: prompts x cells x genes."""
    import virtualcell as vc
    from virtualcell.generation import stable_key

    sentences = vc.Simulator(cells, model, seed=seed).sentences
    run = [p for p in prompts for _ in range(SAMPLES)]
    keys = [stable_key(f"{p}#{j}") for p in prompts for j in range(SAMPLES)]
    cfg = pr.generation_config(model, seed)
    out_arr = np.zeros((len(prompts), cells.n_obs, len(model.genes)))
    for c0 in range(0, cells.n_obs, 32):
        idx = np.arange(c0, min(c0 + 32, cells.n_obs))
        for out in model.generate(sentences.subset(idx), run, config=cfg, cell_keys=idx, perturbation_keys=keys):
            np.add.at(out_arr, (np.asarray(out.perturbation) // SAMPLES, idx[np.asarray(out.cell)]),
                      model.decode(out.sentences) / SAMPLES)
    return out_arr


def slope(y: np.ndarray, x: np.ndarray) -> float:
    """Least-squares slope of y on x, pooled over every entry (both already centred)."""
    return float((y * x).sum() / (x * x).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--n-cells", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true", help="reuse the last run's predictions (kept in /tmp)")
    args = ap.parse_args()
    P.setup(2)
    import virtualcell as vc
    from virtualcell.perturbations import Perturbation

    sc = pr.screen(args.seed, 200, args.model)  # the model and the screen, with u and the small knockouts for bias()
    model, adata, ctl = sc.model, sc.adata, sc.ctl
    rep = adata.obs[p4.HELD[0]].astype(str).to_numpy()
    rng = np.random.default_rng(args.seed)
    reps = ("rep_1", "rep_2", "rep_3")
    sets = {r: np.sort(rng.permutation(np.flatnonzero((rep == r) & ctl))[: args.n_cells]) for r in reps}
    panel = sorted(model.perturbations.labels)
    prompts = [Perturbation("control")] + list(model.resolve(panel))
    names = ["control"] + panel
    src, pred = {}, {}
    cache = Path(f"/tmp/source_tracking_{Path(args.model or 'bundled').name}_{args.seed}.npz")
    for r in reps:
        cells = adata[sets[r]].copy()
        src[r] = model.decode(vc.sentences.encode(cells, top_k=model.top_k, vocab=model.genes, seed=args.seed))
        pred[r] = (np.load(cache)[f"pred_{r}"] if args.reuse and cache.exists()
                   else predictions(model, cells, prompts, args.seed))
    np.savez_compressed(cache, **{f"pred_{r}": pred[r] for r in reps},
                        **{f"src_{r}": src[r] for r in reps})
    # between replicates: the replicate means, centred over the three
    s_mean = np.stack([src[r].mean(0) for r in reps])
    s_mean -= s_mean.mean(0)
    p_mean = np.stack([pred[r].mean(1) for r in reps], 1)  # prompts x reps x genes
    p_mean -= p_mean.mean(1, keepdims=True)
    # within replicates: each cell's deviation from its replicate's mean
    s_cell = np.concatenate([src[r] - src[r].mean(0) for r in reps])
    p_cell = np.concatenate([pred[r] - pred[r].mean(1, keepdims=True) for r in reps], 1)
    held = np.flatnonzero(np.isin(np.concatenate([[r] * args.n_cells for r in reps]), ["rep_1", "rep_2"]))
    print(f"model: {args.model or 'bundled'}; {args.n_cells} control cells per replicate, {SAMPLES} samples per "
          "cell and prompt")
    print("prompt | b_shift (across replicates) | b_cell (within, all replicates) | b_cell (rep_1, rep_2 only)")
    rows = []
    for k, name in enumerate(names):
        row = (slope(p_mean[k], s_mean), slope(p_cell[k], s_cell), slope(p_cell[k][held], s_cell[held]))
        rows.append(row)
        print(f"{name} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f}")
    rows = np.array(rows)
    print(f"knockouts' mean | {rows[1:, 0].mean():.3f} | {rows[1:, 1].mean():.3f} | {rows[1:, 2].mean():.3f}")
    bias(sc, rep, names, pred, args.seed)


def bias(sc, rep, names, pred, seed: int) -> None:  # noqa: ANN001
    """From the training replicates' sources (rep_1 + rep_2): each prompt's mean prediction minus the mean of its own
    training cells through the codec (its error), off u, noise-free: from two random halves of the source cells (the
    model's side) and of the prompt's training cells (the data's side), ``E1_i . E2_j`` has no noise term. Is the small
    knockouts' shared part the control prediction's error (which every delta subtracts) or the knockout prompts'?
    ``sc`` is the screen (``pr.screen``) the predictions were made on."""
    import virtualcell as vc

    model, u, small = sc.model, sc.u, sc.small  # small: indices into the panel (names[1:])
    train = np.isin(rep, ["rep_1", "rep_2"])
    labels, ctl = sc.labels, sc.ctl
    Xc = model.decode(vc.sentences.encode(sc.adata, top_k=model.top_k, vocab=model.genes, seed=seed))
    rng = np.random.default_rng(seed + 5)
    cells = np.concatenate([pred["rep_1"], pred["rep_2"]], 1)  # prompts x sources x genes
    groups = [train & (ctl if n == "control" else labels == n) for n in names]
    C = np.zeros((len(names), len(names)))
    for _ in range(SPLITS):  # each split's products are unbiased; their mean has less variance
        order = rng.permutation(cells.shape[1])
        h1, h2 = order[: order.size // 2], order[order.size // 2:]
        E1, E2 = [], []
        for k, g in enumerate(groups):
            rows = rng.permutation(np.flatnonzero(g))
            a, b = rows[: rows.size // 2], rows[rows.size // 2:]
            E1.append(pr.off_u(cells[k, h1].mean(0) - Xc[a].mean(0), u))
            E2.append(pr.off_u(cells[k, h2].mean(0) - Xc[b].mean(0), u))
        E1, E2 = np.stack(E1), np.stack(E2)
        C += (E1 @ E2.T + E2 @ E1.T) / 2 / SPLITS  # noise-free products of the prompts' errors
    s = 1 + small
    cc, ss, cs = C[0, 0], np.diag(C)[s].mean(), C[0, s].mean()
    pair = C[np.ix_(s, s)][~np.eye(len(s), dtype=bool)].mean()
    print("\nFrom the training replicates' sources, off u, noise-free (squared units): the prompts' errors against "
          "their own training cells (through the codec)")
    print(f"control prompt's error, squared norm: {cc:.3f}; each small knockout's: {ss:.3f}; every knockout's: "
          f"{np.diag(C)[1:].mean():.3f}")
    print(f"products: control x small knockout {cs:.3f}; small knockout x another small knockout {pair:.3f}")
    print(f"so the small knockouts' deltas share (e_i - e_c).(e_j - e_c) = {pair - 2 * cs + cc:.3f}, of which the "
          f"control's own error, e_c.e_c - 2 e_c.e_i, is {cc - 2 * cs:.3f}")
    print("per prompt, squared error off u: " + ", ".join(f"{n} {C[k, k]:.2f}" for k, n in enumerate(names)))


if __name__ == "__main__":
    main()
