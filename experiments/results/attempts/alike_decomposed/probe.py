"""Probe (session 49): where do the bundled model's "alike" deltas differ from its training data's?

Protocol 4's split (rep_3 held out), 200 rep_3 control cells. For the model: each knockout sampled twice per cell
(halves A and B) and the control condition 32 times per cell (16 for A, 16 for B), decoded with the model's decode,
uncalibrated (the calibration changes the deltas by little: 0.27 -> 0.29 naive at seed 0). For the data: each
knockout's cells and the controls split at random into halves, in the training replicates (rep_1 + rep_2) and in
rep_3 (its controls but the 200 baseline cells). A delta is a half's mean minus its control half's mean.

Two halves make noise-free estimates of products: A_i . B_j has no noise term, so

* pooled alike = mean over pairs i < j of A_i . B_j, over the mean of A_i . B_i (both centred over genes): how
  alike the deltas are, without the noise that every naive correlation carries (naive: the same from one estimate);
* per knockout, along the common direction u (the training replicates' mean delta over all knockouts, unit): the
  coefficient (A_i . u + B_i . u) / 2, and the squared norm off it, A_i' . B_i' (A', B' with u projected out).

    cd experiments && PYTHONPATH=. python results/attempts/alike_decomposed/probe.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import _protocol as P  # noqa: E402
import protocol_4_screen_ranking as p4  # noqa: E402
from protocol_4_screen_ranking import mean_pairwise  # noqa: E402

CONTROL_SAMPLES = 32


def pooled(A: np.ndarray, B: np.ndarray) -> float:
    """Mean off-diagonal over mean diagonal of the cross products of two estimates' rows (centred over genes)."""
    A = A - A.mean(1, keepdims=True)
    B = B - B.mean(1, keepdims=True)
    C = A @ B.T
    C = (C + C.T) / 2
    return float(C[np.triu_indices_from(C, 1)].mean() / np.diag(C).mean())


def generation_config(model, seed: int):  # noqa: ANN001, ANN201
    """The generation settings the model's verdict chose (temperature, guidance, coexpression prior), as
    ``Simulator.simulate`` resolves them, for a probe that drives ``model.generate`` itself."""
    from virtualcell.generation import GenerationConfig

    return GenerationConfig(max_genes=model.top_k, temperature=float(model.setting("temperature")), batch_size=512,
                            seed=seed, guidance=float(model.setting("guidance")),
                            coexpression_prior=bool(model.setting("coexpression_prior")))


def model_halves(model, baseline, panel: list[str], seed: int) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """The model's deltas from two independent halves of its samples: ``(A, B)``, knockouts x genes."""
    import virtualcell as vc
    from virtualcell.generation import stable_key
    from virtualcell.perturbations import Perturbation

    sentences = vc.Simulator(baseline, model, seed=seed).sentences
    perts = model.resolve(panel)
    run = [Perturbation("control")] * CONTROL_SAMPLES + [p for p in perts for _ in range(2)]
    keys = [stable_key(f"control#{k}") for k in range(CONTROL_SAMPLES)]
    keys += [stable_key(f"{p}#{j}") for p in perts for j in range(2)]
    cfg = generation_config(model, seed)
    sums = np.zeros((len(run), len(model.genes)))
    n = baseline.n_obs
    for c0 in range(0, n, 32):
        idx = np.arange(c0, min(c0 + 32, n))
        for out in model.generate(sentences.subset(idx), run, config=cfg, cell_keys=idx, perturbation_keys=keys):
            np.add.at(sums, out.perturbation, model.decode(out.sentences))
    M = sums / n
    half = CONTROL_SAMPLES // 2
    c_a, c_b = M[:half].mean(0), M[half:CONTROL_SAMPLES].mean(0)
    return M[CONTROL_SAMPLES::2] - c_a, M[CONTROL_SAMPLES + 1::2] - c_b


def data_halves(X: np.ndarray, labels: np.ndarray, scope: np.ndarray, ref: np.ndarray, panel: list[str],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Measured deltas in ``scope`` from two random halves of each knockout's cells and of the controls ``ref``:
    ``(A, B, whole)``."""
    def split(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rows = rng.permutation(rows)
        return rows[: rows.size // 2], rows[rows.size // 2:]

    ra, rb = split(ref)
    A, B = [], []
    for p in panel:
        a, b = split(np.flatnonzero(scope & (labels == p)))
        A.append(X[a].mean(0) - X[ra].mean(0))
        B.append(X[b].mean(0) - X[rb].mean(0))
    whole = np.stack([X[scope & (labels == p)].mean(0) - X[ref].mean(0) for p in panel])
    return np.stack(A), np.stack(B), whole


def off_u(A: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``A`` (a row, or rows) with the unit direction ``u`` projected out."""
    return A - np.outer(A @ u, u).reshape(A.shape)


def decompose(A: np.ndarray, B: np.ndarray, u: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the coefficient along unit ``u`` and the noise-free squared norm off it."""
    along = (A @ u + B @ u) / 2
    off = np.einsum("ij,ij->i", off_u(A, u), off_u(B, u))
    return along, off


def small_products(A: np.ndarray, B: np.ndarray, u: np.ndarray, small: np.ndarray) -> tuple[float, float]:
    """The ``small`` rows off ``u``: the mean noise-free squared norm of each, and the mean product of two different
    ones (``A_i' . B_j'``, what they share)."""
    cross = off_u(A[small], u) @ off_u(B[small], u).T
    return float(np.diag(cross).mean()), float(cross[~np.eye(len(small), dtype=bool)].mean())


def screen(seed: int, n_cells: int, model_dir: str | None = None) -> SimpleNamespace:
    """Protocol 4's split, the model (``model_dir``, default the bundled one), the cells' expression in its genes, and
    the training replicates' halves with what they define: ``u`` (their mean knockout delta, unit) and ``small`` (the
    knockouts whose noise-free squared norm there is below 1: their effect is near noise). ``rng`` is the generator
    that drew the halves, for more."""
    import virtualcell as vc
    from virtualcell.sentences import model_expression

    model = vc.C2SModel.load(model_dir) if model_dir else vc.model.bundled()
    panel = sorted(model.perturbations.labels)
    adata, contract, held, _, baseline, base_idx, _ = p4.data(seed, n_cells)
    X = model_expression(adata, model.genes)[0].toarray()
    labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
    ctl = contract.is_control(adata)
    rng = np.random.default_rng(seed)
    tA, tB, t_whole = data_halves(X, labels, ~held, np.flatnonzero(~held & ctl), panel, rng)
    g = (tA.mean(0) + tB.mean(0)) / 2
    return SimpleNamespace(model=model, panel=panel, adata=adata, contract=contract, held=held, baseline=baseline,
                           base_idx=base_idx, X=X, labels=labels, ctl=ctl, rng=rng, tA=tA, tB=tB, t_whole=t_whole,
                           u=g / np.linalg.norm(g), small=np.flatnonzero(np.einsum("ij,ij->i", tA, tB) < 1.0))


def one_seed(seed: int, n_cells: int, model_dir: str | None = None) -> dict:
    import virtualcell as vc

    sc = screen(seed, n_cells, model_dir)
    model, panel, held, ctl, small = sc.model, sc.panel, sc.held, sc.ctl, sc.small
    t0 = time.perf_counter()
    mA, mB = model_halves(model, sc.baseline, panel, seed)
    seconds = time.perf_counter() - t0
    r3_ref = np.setdiff1d(np.flatnonzero(held & ctl), sc.base_idx)
    hA, hB, h_whole = data_halves(sc.X, sc.labels, held, r3_ref, panel, sc.rng)
    # the training replicates' cells written as the model's cell sentences and decoded by its decode: what a model
    # that wrote each training cell exactly would give (the codec's share of the loss)
    Xc = model.decode(vc.sentences.encode(sc.adata, top_k=model.top_k, vocab=model.genes, seed=seed))
    cA, cB, c_whole = data_halves(Xc, sc.labels, ~held, np.flatnonzero(~held & ctl), panel, np.random.default_rng(seed))
    out = {"seed": seed, "small": [panel[i] for i in small], "n_cells": int(sc.baseline.n_obs),
           "generation_seconds": round(seconds, 1), "knockouts": panel}
    for name, (A, B, whole) in {"model": (mA, mB, (mA + mB) / 2), "training replicates": (sc.tA, sc.tB, sc.t_whole),
                                "training via the codec": (cA, cB, c_whole), "rep_3": (hA, hB, h_whole)}.items():
        along, off = decompose(A, B, sc.u)
        own, shared = small_products(A, B, sc.u, small)
        out[name + " small"] = {"own": own, "shared": shared}
        out[name] = {"naive": mean_pairwise(whole), "pooled_naive": pooled(whole, whole), "pooled": pooled(A, B),
                     "along": along.tolist(), "off": off.tolist()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-cells", type=int, default=200)
    ap.add_argument("--model", default=None, help="a checkpoint trained with rep_3 held out (default: the bundled one)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("probe.md")))
    args = ap.parse_args()
    P.setup(2)
    runs = [one_seed(s, args.n_cells, args.model) for s in args.seeds]
    Path(args.out).with_suffix(".json").write_text(json.dumps(runs, indent=1))
    who = ("model", "training replicates", "training via the codec", "rep_3")
    mean = lambda name, key: float(np.mean([r[name][key] for r in runs]))  # noqa: E731
    lines = [f"model: {args.model or 'bundled'}; seeds {args.seeds}, {runs[0]['n_cells']} rep_3 control cells; model: 2 samples per cell and knockout, "
             f"{CONTROL_SAMPLES} control samples per cell (generation {np.mean([r['generation_seconds'] for r in runs]):.0f} s a seed)",
             "", "| deltas | naive mean pairwise correlation | pooled, naive | pooled, noise-free (two halves) |",
             "|---|---|---|---|"]
    lines += [f"| {w} | {mean(w, 'naive'):.3f} | {mean(w, 'pooled_naive'):.3f} | {mean(w, 'pooled'):.3f} |" for w in who]
    lines += ["", "Per knockout (mean over seeds; u: the training replicates' mean knockout delta, unit): coefficient "
              "along u, and the noise-free squared norm off u (negative: below noise)", "",
              "| knockout | along u: model | training | training via the codec | rep_3 | off u: model | training | via the codec | rep_3 |",
              "|---|---|---|---|---|---|---|---|---|"]
    panel = runs[0]["knockouts"]
    avg = {w: {k: np.mean([r[w][k] for r in runs], axis=0) for k in ("along", "off")} for w in who}
    order = np.argsort(-avg["training replicates"]["off"] - avg["training replicates"]["along"] ** 2)
    for i in order:
        lines.append(f"| {panel[i]} | " + " | ".join(f"{avg[w]['along'][i]:.2f}" for w in who) + " | "
                     + " | ".join(f"{avg[w]['off'][i]:.2f}" for w in who) + " |")
    tot = {w: (float(np.sum(avg[w]["along"] ** 2)), float(np.sum(avg[w]["off"]))) for w in who}
    lines += ["", "Summed over knockouts, energy along u / off u: " + "; ".join(
        f"{w} {a:.1f} / {o:.1f}" for w, (a, o) in tot.items())]
    lines += ["", f"The small knockouts (noise-free squared norm below 1 in the training replicates; seed 0: "
              f"{', '.join(runs[0]['small'])}), off u: the mean noise-free squared norm of each, and the mean product "
              "of two different ones (A_i' . B_j'): what they share", "", "| deltas | each | shared between two |", "|---|---|---|"]
    lines += [f"| {w} | {mean(w + ' small', 'own'):.3f} | {mean(w + ' small', 'shared'):.3f} |" for w in who]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
