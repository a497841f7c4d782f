"""Protocol 3 with and without the verdict on knockouts held out whole (session 28), side by side.

    python experiments/results/attempts/unseen_verdict/summarize.py

Reads the runs of this folder (seed0-2: ``--set unseen_fraction=0.2``, trained, then scored again
with ``--model`` after the scoring fix; without/seed0-2: the protocol as it is, unseen_fraction 0)
and writes ``summary.md``: the mean over seeds of each method's mean over the 4 held-out knockouts,
and each training run's blend weights (trained knockouts; knockouts held out whole).
The runs::

    python experiments/protocol_3_unseen_knockouts.py --seed S --threads 1 --set unseen_fraction=0.2 \\
        --model-dir /tmp/uv/mS --out experiments/results/attempts/unseen_verdict/seedS
    python experiments/protocol_3_unseen_knockouts.py --seed S --threads 1 --model /tmp/uv/mS/protocol3 \\
        --out experiments/results/attempts/unseen_verdict/seedS
    python experiments/protocol_3_unseen_knockouts.py --seed S --threads 1 --model-dir /tmp/ua/mS \\
        --out experiments/results/attempts/unseen_verdict/without/seedS
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
METHODS = ("model", "model (blend)", "pertmean", "ceiling")
METRICS = ("pearson_delta", "pearson_delta_top50", "discrimination", "vcc_mae")


def runs(folder: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted(folder.glob("seed*/protocol_3_unseen_knockouts.json"))]


def row(name: str, found: list[dict]) -> list[str]:
    lines = []
    for method in METHODS:
        cells = []
        for metric in METRICS:
            v = [next(r[f"{metric} mean"] for r in run["summary"] if r["method"] == method) for run in found]
            cells.append(f"{np.mean(v):.3f} ({' / '.join(f'{x:.2f}' for x in v)})")
        lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
    return lines


def weights(found: list[dict]) -> str:
    out = []
    for run in found:
        v = run["training"].get("verdict") or {}
        unseen = v.get("unseen")
        out.append(f"w {v.get('weight', float('nan')):.2f}" + (f", unseen {unseen['weight']:.2f} on "
                                                                f"{', '.join(unseen['perturbations'])}" if unseen else ""))
    return "; ".join(out)


def main() -> None:
    variants = {"unseen_fraction 0 (the protocol)": runs(HERE / "without"),
                "unseen_fraction 0.2": runs(HERE)}
    lines = ["# Protocol 3 with and without the verdict on knockouts held out whole", "",
             "Mean over the seeds (each seed's value: mean over the 4 held-out knockouts). "
             "`python experiments/results/attempts/unseen_verdict/summarize.py`", "",
             "| training | method | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    for name, found in variants.items():
        lines += row(f"{name}, seeds {len(found)}", found)
    lines += ["", "Blend weights of each training run (seeds 0, 1, 2):", ""]
    lines += [f"* {name}: {weights(found)}" for name, found in variants.items()]
    (HERE / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
