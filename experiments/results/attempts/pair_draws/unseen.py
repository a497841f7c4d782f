"""Protocol 3 with a fifth of the training knockouts held out whole (--set unseen_fraction=0.2): the training run's
verdict on knockouts it never trained on, with one draw of the pairing and with 8, beside the held-out figures.

    python experiments/results/attempts/pair_draws/unseen.py      (reads the p3u-*-sS folders beside it)
"""

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent

print("| run | verdict MSE, trained knockouts | verdict MSE, knockouts never trained on (its baseline) | "
      "held out, pure: pearson_delta / discrimination |")
print("|---|---|---|---|")
for d in sorted(HERE.glob("p3u-*-s*")):
    v = json.loads((d / "verdict.json").read_text())
    rec = json.loads(next(d.glob("protocol_3*.json")).read_text())
    held = {h["metric"]: h["model"].split()[0] for h in rec["headline"]}
    u = v["unseen"]
    print(f"| {d.name} | {v['model']['mse']:.4f} | {u['model']['mse']:.4f} ({u['baseline']['mse']:.4f}) | "
          f"{held['pearson_delta']} / {held['discrimination']} |")
