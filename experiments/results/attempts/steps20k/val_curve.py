"""The validation loss along training, for checkpoints side by side (session 27's 20,000-step probe).

    python experiments/results/attempts/steps20k/val_curve.py NAME=CHECKPOINT [NAME=CHECKPOINT ...]

Reads each checkpoint's history.json (the trainer's record of every step; the validation loss every
200 steps) and writes val_loss.json beside this script: each run's curve, its lowest point and its
last, so the curve survives the checkpoints (not kept: 7.5 MB each)."""
import json
import sys
from pathlib import Path

out = {}
for arg in sys.argv[1:]:
    name, folder = arg.split("=", 1)
    history = json.loads((Path(folder) / "history.json").read_text())
    curve = [(r["step"], round(r["val_loss"], 4)) for r in history if "val_loss" in r]
    best = min(curve, key=lambda x: x[1])
    out[name] = {"checkpoint": folder, "best_step": best[0], "best": best[1], "last_step": curve[-1][0],
                 "last": curve[-1][1], "curve": curve}
Path(__file__).with_name("val_loss.json").write_text(json.dumps(out, indent=1))
steps = sorted({s for r in out.values() for s, _ in r["curve"] if s % 2000 == 0})
print("| run | lowest (step) | last (step) | " + " | ".join(f"{s:,}" for s in steps) + " |")
print("|---|---|---|" + "---|" * len(steps))
for name, r in out.items():
    at = dict(r["curve"])
    print(f"| {name} | {r['best']:.4f} ({r['best_step']:,}) | {r['last']:.4f} ({r['last_step']:,}) | "
          + " | ".join(f"{at[s]:.3f}" if s in at else "" for s in steps) + " |")
