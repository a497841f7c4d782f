"""How much of the bundled model's alike deltas is the control generation they share (a probe).

    cd experiments && python results/attempts/control_samples/probe_control_samples.py [--seed 0]

Every perturbation's predicted delta is calibrated against one mean of the baseline cells' control
generations (``Simulator.simulate(control_samples=)``, 4 per sample by default: 32 at the bundled
model's 8 samples), so that mean's sampling noise is shared by every delta and makes them alike. This
simulates protocol 4's panel on its rep_3 baseline cells (same seed, same cells, the checkpoint's
own settings) with 32 and with 128 control samples, and reports the mean pairwise correlation of the
pure model's deltas, the Spearman of its noise-corrected effect sizes against rep_3 and the
generation time. Diagnosis only: rep_3 is held out, so nothing is chosen on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))  # experiments/


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--control", default="32,128")
    args = ap.parse_args()
    import torch
    from scipy.stats import spearmanr

    torch.set_num_threads(1)
    import protocol_4_screen_ranking as P4

    import virtualcell as vc
    from virtualcell.demo import measured_effects
    from virtualcell.objectives import parse_objective
    from virtualcell.screen import rank
    from virtualcell.sentences import model_expression

    adata, contract, held, train_ad, baseline, base_idx, ref_idx = P4.data(args.seed, 120)
    model = vc.model.bundled()
    panel = sorted(model.perturbations.labels)
    col, rep = P4.HELD
    measured = measured_effects(adata, contract, col, rep, reference_cells=ref_idx)
    X, _ = model_expression(adata, model.genes)
    labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
    ref_mean = np.asarray(X[ref_idx].mean(axis=0)).ravel()
    common = [p for p in panel if p in measured.index]
    measured_d = np.stack([np.asarray(X[np.flatnonzero(held & (labels == p))].mean(axis=0)).ravel() - ref_mean
                           for p in common])

    def alike(D: np.ndarray) -> float:
        C = np.corrcoef(D)
        return float(C[np.triu_indices_from(C, 1)].mean())

    rows = []
    for k in (int(x) for x in args.control.split(",")):
        sim = vc.Simulator(baseline, model, seed=args.seed)
        t = time.perf_counter()
        res = sim.simulate(panel, seed=args.seed, blend=None, control_samples=k, progress=False, keep_cells=False)
        seconds = time.perf_counter() - t
        ranking = rank(res.aggregates, parse_objective(None), n_boot=0, seed=args.seed)
        typed = model.perturbations.label_map(ranking["perturbation"])
        eff = ranking.assign(label=ranking["perturbation"].map(typed)).set_index("label")["l2_delta_corrected"]
        by_label = {lab: t_ for t_, lab in typed.items()}
        D = res.aggregates["delta"].sel(perturbation=[by_label[p] for p in common]).values
        rows.append({"control_samples": k, "samples": int(res.aggregates.attrs["samples"]),
                     "mean_pairwise_correlation": alike(D),
                     "spearman_rep3": float(spearmanr(eff.loc[common], measured.loc[common]).statistic),
                     "seconds": round(seconds, 1)})
        print(rows[-1], flush=True)
    out = {"seed": args.seed, "measured_rep3_pairwise_correlation": alike(measured_d), "rows": rows}
    (HERE / f"probe_seed{args.seed}.json").write_text(json.dumps(out, indent=1))
    print(out)


if __name__ == "__main__":
    main()
