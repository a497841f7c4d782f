"""Training recipes compared on their own validation verdicts, at a generation setting every run scored.

    python experiments/compare_verdicts.py \\
        --recipe "1,4=experiments/results/issue11/seed0/synthetic_recovery.json,..." \\
        --recipe "1,4,8=experiments/results/attempts/verdict_samples_8/synthetic_seed0/synthetic_recovery.json,..." \\
        [--out experiments/results/attempts/verdict_samples_8/synthetic.md]

Each ``--recipe NAME=PATH,PATH,...`` lists one training run per seed of that recipe: a protocol's
result JSON (``protocol_*.json``, ``synthetic_recovery.json``) or a checkpoint folder (its
``verdict.json``). A recipe is chosen on the verdicts, never on the held-out scores, and two
verdicts that chose different settings are not comparable by their chosen MSE: more samples per
cell lower the MSE whatever the model. So beside each run's chosen setting and MSE, the table
gives every run's MSE at the setting all runs scored with the lowest mean MSE
(``virtualcell.validation.shared_setting``), and the steps each run made.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np


def record(path: Path) -> tuple[dict[str, Any], Any]:
    """``(verdict, steps)`` of one training run: from a protocol's result JSON or a checkpoint folder."""
    if path.is_dir():
        verdict = json.loads((path / "verdict.json").read_text())
        meta = path / "virtualcell.json"
        steps = json.loads(meta.read_text())["train_config"].get("steps") if meta.exists() else None
        return verdict, steps
    r = json.loads(path.read_text())
    training = r.get("training") if isinstance(r.get("training"), dict) else r
    if not training.get("verdict"):
        raise SystemExit(f"{path}: no validation verdict in it")
    return training["verdict"], training.get("steps")


def main(argv: list[str] | None = None) -> str:
    from virtualcell.validation import mse_at, settings_text, shared_setting

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", action="append", required=True, metavar="NAME=PATH,PATH,...")
    ap.add_argument("--out", default=None, help="also write the table here (.md)")
    args = ap.parse_args(argv)
    recipes: dict[str, list[tuple[str, dict[str, Any], Any]]] = {}
    for item in args.recipe:
        name, _, paths = item.partition("=")
        if not paths:
            raise SystemExit(f"--recipe {item!r}: write NAME=PATH[,PATH...]")
        recipes[name] = [(p, *record(Path(p))) for p in paths.split(",")]
    shared = shared_setting([v for runs in recipes.values() for _, v, _ in runs])
    at = settings_text(shared) if shared is not None else "none shared"
    lines = [f"| recipe | run | steps | chosen setting | MSE, chosen | MSE at {at} |", "|---|---|---|---|---|---|"]
    for name, runs in recipes.items():
        shared_mse = []
        for path, verdict, steps in runs:
            m = mse_at(verdict, shared) if shared is not None else float("nan")
            shared_mse.append(m)
            lines.append(f"| {name} | {path} | {steps if steps is not None else '—'} | {settings_text(verdict['settings'])} "
                         f"| {verdict['model']['mse']:.4f} | {m:.4f} |")
        lines.append(f"| **{name}** | **mean ({len(runs)} runs)** | | | "
                     f"**{np.mean([v['model']['mse'] for _, v, _ in runs]):.4f}** | **{np.nanmean(shared_mse):.4f}** |")
    text = ("Command: `python experiments/compare_verdicts.py " + " ".join(f'--recipe "{r}"' for r in args.recipe)
            + (f" --out {args.out}" if args.out else "") + "`\n\n" + "\n".join(lines) + "\n")
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
