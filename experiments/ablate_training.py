"""Choose a training setting on validation data only: the bundled model's recipe with one setting changed.

    python experiments/ablate_training.py --arms gene_init=pca gene_init=random --seeds 0 1 --max-steps 1500

Each arm trains the bundled model's recipe (``experiments/train_bundled_model.py``: the
embedded Papalexi screen, rep_3 held out, 100 genes, a 4-layer model of width 128) with the
``TrainConfig`` fields it names changed, for ``--max-steps`` steps, once per seed. Every
figure comes from the training data's own validation splits, never from rep_3 or a
protocol's held-out cells:

* ``val loss``: the masked response loss on the trainer's validation pairs, at the end;
* ``verdict``: the trainer's validation verdict (held-out cells of up to 24 training
  knockouts, :mod:`virtualcell.validation`): the pure model's pearson_delta (all genes, top
  50) and MSE, next to the meanshift baseline's, and the blend weight it fitted.

Arms run ``--parallel`` at a time (1 torch thread each). Writes
``experiments/results/ablations/<name>.{md,json}`` (``--out``: another folder).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from _protocol import parse_settings as parse_arm

ROOT = Path(__file__).resolve().parents[1]


def run_one(arm: str, seed: int, max_steps: int, compile_: str) -> dict:
    import torch

    torch.set_num_threads(1)
    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    changes = parse_arm(arm)
    cfg = TrainConfig(top_k=100, hidden_size=128, n_layers=4, n_heads=4, lr=3e-3, batch_size=16, kind="knockout",
                      holdout={"bio_rep": ["rep_3"]}, seed=seed, max_steps=max_steps, threads=1, compile=compile_,
                      **changes)
    adata = vc.datasets.load("papalexi2021")
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model = train(adata, out=tmp, config=cfg, progress=False)
    v = model.verdict or {}
    hist = model.train_config.get("history") or []
    val = [r["val_loss"] for r in hist if "val_loss" in r]
    return {"arm": arm, "seed": seed, "steps": model.train_config.get("steps"), "seconds": round(time.perf_counter() - t, 1),
            "val_loss": val[-1] if val else None,
            "model": v.get("model"), "baseline": v.get("baseline"), "blend": v.get("blend"), "weight": v.get("weight"),
            "settings": v.get("settings"),
            "candidates": [{"settings": c.get("settings"), "model": c.get("model")} for c in v.get("candidates") or []]}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arms", nargs="+", required=True, help="FIELD=VALUE[,FIELD=VALUE] of TrainConfig, one per arm")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--max-steps", type=int, default=1500)
    ap.add_argument("--compile", default="on", choices=("auto", "on", "off"))
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--name", default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "ablations",
                    help="folder for the results (default: experiments/results/ablations)")
    args = ap.parse_args(argv)
    for arm in args.arms:
        parse_arm(arm)
    jobs = [(arm, s) for s in args.seeds for arm in args.arms]
    with ProcessPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(run_one, arm, s, args.max_steps, args.compile) for arm, s in jobs]
        rows = []
        for f in futures:
            rows.append(f.result())
            r = rows[-1]
            print(f"{r['arm']} seed {r['seed']}: val loss {r['val_loss']:.4f}, verdict pd "
                  f"{(r['model'] or {}).get('pearson_delta', float('nan')):.3f}", file=sys.stderr, flush=True)

    def mean(arm: str, get) -> float:  # noqa: ANN001
        vals = [get(r) for r in rows if r["arm"] == arm]
        vals = [v for v in vals if v is not None]
        return float(np.mean(vals)) if vals else float("nan")

    command = "python experiments/ablate_training.py " + " ".join(sys.argv[1:] if argv is None else argv)
    lines = ["# Training ablation on validation data", "", f"`{command}` — the bundled model's recipe, "
             f"{args.max_steps} steps, seeds {args.seeds}, 1 thread per run. Means over seeds; every figure is on the "
             "training data's own validation splits (validation pairs; the verdict's held-out cells of training "
             "knockouts).", "",
             "| arm | val loss | verdict pearson_delta | top 50 | MSE | meanshift pearson_delta | meanshift MSE | blend w |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in args.arms:
        g = lambda who, key: (lambda r: (r[who] or {}).get(key))  # noqa: E731
        lines.append(f"| {arm} | {mean(arm, lambda r: r['val_loss']):.4f} | {mean(arm, g('model', 'pearson_delta')):.3f} | "
                     f"{mean(arm, g('model', 'pearson_delta_top50')):.3f} | {mean(arm, g('model', 'mse')):.4f} | "
                     f"{mean(arm, g('baseline', 'pearson_delta')):.3f} | {mean(arm, g('baseline', 'mse')):.4f} | "
                     f"{mean(arm, lambda r: r['weight']):.2f} |")
    lines += ["", "Per run:", "", "| arm | seed | steps | seconds | val loss | verdict pearson_delta | MSE |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        m = r["model"] or {}
        lines.append(f"| {r['arm']} | {r['seed']} | {r['steps']} | {r['seconds']} | {r['val_loss']:.4f} | "
                     f"{m.get('pearson_delta', float('nan')):.3f} | {m.get('mse', float('nan')):.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    name = args.name or "_vs_".join(a.replace("=", "-").replace(",", "+") for a in args.arms)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text(text)
    (out / f"{name}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=1, default=float))


if __name__ == "__main__":
    main()
