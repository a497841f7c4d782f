"""Probe (session 50): is the bundled model's control prompt fitted more to its own training pairs than the knockout
prompts are?

Rebuilds the bundled model's training run's cells, pairs and split exactly as ``virtualcell train`` made them (its
recorded config, the same data hash), and scores the model's plain response loss (nats per response token) on its
training pairs and on its validation pairs (the same pairing, never trained on), for control pairs, the small
knockouts' pairs and the other knockouts' pairs. The gap (validation minus training) is what the model memorized.
Also counts how often each training target repeats (a control target repeats when the screen has fewer control
cells than ``control_fraction`` asks for).

    cd experiments && PYTHONPATH=. python results/attempts/source_tracking/overfit.py [--model DIR] > results/attempts/source_tracking/overfit.txt
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "alike_decomposed"), str(HERE.parents[2])]
import _protocol as P  # noqa: E402
import probe as pr  # noqa: E402

PAIRS = 480  # pairs scored per category and split, at most


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    args = ap.parse_args()
    P.setup(2)
    import torch

    import virtualcell as vc
    from virtualcell import train as T
    from virtualcell.training import batching, loop

    sc = pr.screen(0, 200, args.model)  # the model, and which knockouts are small
    model = sc.model
    rec = model.train_config
    cfg = T.TrainConfig.from_record(rec)
    adata = vc.datasets.load("papalexi2021")
    contract = vc.DataContract.from_adata(adata)
    cells = T._prepare(adata, contract, cfg)
    assert cells.given_hash == rec["data_hash"], (cells.given_hash, rec["data_hash"])
    assert cells.train_targets.size == rec["n_pairs"], (cells.train_targets.size, rec["n_pairs"])
    small = {sc.panel[i] for i in sc.small}
    typed = np.asarray(cells.typed)
    is_ctrl = contract.is_control(cells.data)
    labels = cells.data.obs[contract.perturbation_key].astype(str).to_numpy()
    kind = np.where(is_ctrl, "control", np.where(np.isin(labels, list(small)), "small knockouts", "other knockouts"))
    t, counts = np.unique(cells.train_targets, return_counts=True)
    print(f"training pairs {cells.train_targets.size}, validation pairs {cells.val_targets.size}; training control "
          f"cells {int(is_ctrl.sum())}")
    for k in ("control", "small knockouts", "other knockouts"):
        m = kind[t] == k
        print(f"  {k}: {int(counts[m].sum())} training pairs on {int(m.sum())} target cells (each seen "
              f"{counts[m].mean():.2f} times an epoch)")
    device = torch.device("cpu")
    extras = T._Extras()
    objective = T._objective(model, cells, contract, cfg, extras, device, {})
    batches = batching.StepBatches(model.format, cells.sentences, cells.sources, [cells.parsed[x] for x in typed],
                                   ~is_ctrl, pairs=None, lone=None, seed=cfg.seed)
    model.lm.eval()
    rng = np.random.default_rng(0)
    print("\ncategory | training pairs: loss | validation pairs: loss | gap (validation - training) | pairs scored")
    for k in ("control", "small knockouts", "other knockouts"):
        row = []
        for targets in (np.unique(cells.train_targets), cells.val_targets):
            chosen = targets[kind[targets] == k]
            chosen = rng.choice(chosen, size=min(PAIRS, chosen.size), replace=False)
            chunks = batching.validation_chunks(chosen, cells.sources[0], batch_size=cfg.batch_size,
                                                group_size=cfg.group_size)
            with torch.no_grad():
                loss = loop.validation_loss(model.lm, functools.partial(objective, weighted=False),
                                            [functools.partial(batches.of, c) for c in chunks])
            row.append((loss, chosen.size))
        print(f"{k} | {row[0][0]:.4f} | {row[1][0]:.4f} | {row[1][0] - row[0][0]:+.4f} | {row[0][1]} / {row[1][1]}")


if __name__ == "__main__":
    main()
