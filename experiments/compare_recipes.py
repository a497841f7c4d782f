"""Training recipes side by side on protocol 4, over training runs (not sampling seeds).

    python experiments/compare_recipes.py \\
        --recipe "bundled (4,000 steps)=experiments/results/issue11/seed0,experiments/results/issue11/training_seed1,..." \\
        --recipe "10,000 steps=experiments/results/attempts/recipes/steps10k_s0,..." \\
        --out experiments/results/attempts/recipes

Protocol 4's ranking moves more from one training run of a recipe to the next (same data,
same loss, another seed) than most changes to the recipe move it, so one run says little.
Each ``--recipe NAME=FOLDER,FOLDER,...`` lists protocol-4 result folders, one per training
run of that recipe (``protocol_4_screen_ranking.py --model CHECKPOINT --seed 0``); a folder
may also hold the checkpoint's ``verdict.json`` (the trainer's own validation split), which
is what a recipe may honestly be chosen on. The table gives every run and each recipe's
mean and standard deviation over its runs:

* the pure model's Spearman of effect sizes against rep_3 (target >= 0.6), and the served
  blend's;
* the mean pairwise correlation of the predicted deltas (measured rep_3: about 0.15);
* cell-eval's MAE and discrimination_score_l1 (means over the 25 knockouts);
* the optimizer steps the run made, and the validation verdict's pearson_delta and MSE, and its MSE
  at the generation setting every run's verdict scored (``compare_verdicts.py`` explains why).

Writes ``recipes.md`` and ``recipes.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

COLUMNS = [("spearman", "Spearman (pure)"), ("served", "Spearman (served)"), ("alike", "delta correlation"),
           ("mae", "vcc MAE"), ("disc", "vcc disc. L1"), ("steps", "steps"), ("val_pd", "verdict pearson_delta"),
           ("val_mse", "verdict MSE"), ("val_mse_shared", "verdict MSE, shared setting")]


def run_row(folder: Path) -> dict[str, Any]:
    """One training run's figures from its protocol-4 record (and verdict, when the folder has it)."""
    f = folder / "protocol_4_screen_ranking.json"
    if not f.exists():
        raise SystemExit(f"{folder}: no protocol_4_screen_ranking.json (run protocol_4_screen_ranking.py --out there)")
    r = json.loads(f.read_text())
    summary = {s["method"]: s for s in r["summary"]}
    served = [v for k, v in r["spearman"].items() if k.startswith("served blend")]
    row = {"run": str(folder), "date": r.get("date"),
           "spearman": r["spearman"]["model"], "served": served[0] if served else float("nan"),
           "alike": r["pairwise_correlation"]["model"],
           "mae": summary["model"]["vcc_mae mean"], "disc": summary["model"]["vcc_discrimination_score_l1 mean"],
           "steps": r["model"]["train_config"].get("steps"), "val_pd": float("nan"), "val_mse": float("nan"),
           "val_mse_shared": float("nan"), "verdict": None,
           "checkpoint": r["model"].get("checkpoint") or r["model"].get("bundled")}
    v = folder / "verdict.json"
    if v.exists():
        verdict = json.loads(v.read_text())
        row["val_pd"], row["val_mse"] = verdict["model"]["pearson_delta"], verdict["model"]["mse"]
        row["verdict"] = verdict
    return row


def at_shared_setting(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Each run's verdict MSE at the generation setting every run's verdict scored (the one with the lowest mean
    MSE; ``validation.shared_setting``): verdicts that chose different samples are not comparable by their own
    choice, since more samples lower the MSE whatever the model. Fills ``val_mse_shared``; returns the setting."""
    from virtualcell.validation import mse_at, shared_setting

    verdicts = [r["verdict"] for r in rows if r["verdict"] is not None]
    setting = shared_setting(verdicts) if verdicts else None
    for r in rows:
        if setting is not None and r["verdict"] is not None:
            r["val_mse_shared"] = mse_at(r["verdict"], setting)
        r.pop("verdict")
    return setting


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"runs": len(rows)}
    for key, _ in COLUMNS:
        vals = np.array([r[key] for r in rows if r[key] is not None], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[key] = {"mean": float(vals.mean()) if vals.size else float("nan"),
                    "sd": float(vals.std(ddof=1)) if vals.size > 1 else float("nan")}
    return out


def _cell(v: Any, key: str = "") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    if isinstance(v, int) or float(v) > 50:
        return f"{v:.0f}"
    return f"{v:.3f}" if key in ("mae", "val_mse", "val_mse_shared") else f"{v:.2f}"  # errors differ in the third digit


def markdown(recipes: dict[str, dict[str, Any]]) -> str:
    head = "| recipe | run | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, rec in recipes.items():
        for r in rec["rows"]:
            lines.append(f"| {name} | {Path(r['run']).name} | " + " | ".join(_cell(r[k], k) for k, _ in COLUMNS) + " |")
        s = rec["summary"]
        lines.append(f"| **{name}** | **mean ± sd ({s['runs']} runs)** | " + " | ".join(
            f"**{_cell(s[k]['mean'], k)}** ± {_cell(s[k]['sd'], k)}" for k, _ in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", required=True, metavar="NAME=FOLDER,FOLDER,...")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    recipes = {}
    for item in args.recipe:
        name, _, folders = item.partition("=")
        if not folders:
            raise SystemExit(f"--recipe {item!r}: write NAME=FOLDER[,FOLDER...]")
        recipes[name] = {"rows": [run_row(Path(f)) for f in folders.split(",")]}
    setting = at_shared_setting([r for rec in recipes.values() for r in rec["rows"]])
    for rec in recipes.values():
        rec["summary"] = summarize(rec["rows"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = ("# Training recipes on protocol 4, over training runs\n\nCommand: `python experiments/compare_recipes.py "
            + " ".join(f'--recipe "{r}"' for r in args.recipe) + f" --out {args.out}`\n\n" + markdown(recipes)
            + f"\nShared setting (every run's verdict scored it): {setting or 'none'}.\n")
    (out / "recipes.md").write_text(text)
    (out / "recipes.json").write_text(json.dumps(recipes, indent=1, default=float))
    print(text)


if __name__ == "__main__":
    main()
