"""The residual-only gene map (commit 51d5087, every map fitted to what the decode misses) against session 42's map
(fitted to the expression itself), protocols 2, 3 and 5 at the seeds run; and the verdict's codec MSE of each
mapped decode, which depends on the training cells alone (not the model), so the two runs' codecs are comparable.

    python experiments/results/attempts/residual_map/compare.py   # writes compare.txt beside it
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
BEFORE = HERE.parents[1] / "issue11"  # session 42's runs (maps fitted to the expression itself)
ROWS = {"protocol_5_cytokine_response": ("edistance", "pearson_delta", "meanshift"),
        "protocol_2_unseen_pairs": ("pearson_delta", "pearson_delta_top50", "additive"),
        "protocol_3_unseen_knockouts": ("discrimination", "pearson_delta", "pertmean")}


def summary(path: Path) -> dict:
    rec = json.loads(path.read_text())
    return {r["method"]: r for r in rec["summary"]}, rec["training"]["verdict"]


out = []
for stem, (m1, m2, base) in ROWS.items():
    for seed in (0, 1, 2):
        new = HERE / f"seed{seed}" / f"{stem}.json"
        if not new.exists():
            continue
        (a, va), (b, vb) = summary(BEFORE / f"seed{seed}" / f"{stem}.json"), summary(new)
        mse = lambda v: {k: round(x["mse"], 5) for k, x in v["decode"].items() if "map" in k}  # noqa: E731
        out.append(f"{stem} seed {seed}: {m1} {a['model'][m1 + ' mean']:.3f} -> {b['model'][m1 + ' mean']:.3f}, "
                   f"{m2} {a['model'][m2 + ' mean']:.3f} -> {b['model'][m2 + ' mean']:.3f} ({base}: "
                   f"{b[base][m1 + ' mean']:.3f}, {b[base][m2 + ' mean']:.3f}); codec MSE of the mapped decodes: "
                   f"expression {mse(va)}, residual {mse(vb)}; chosen {va['codec']['decode']} -> "
                   f"{vb['codec']['decode']}")
(HERE / "compare.txt").write_text("\n".join(out) + "\n")
print("\n".join(out))
