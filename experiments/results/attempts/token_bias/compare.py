"""Token-bias runs beside the runs without it: held-out figures and the trainers' own verdicts.

    python experiments/results/attempts/token_bias/compare.py

Reads ``experiments/results/attempts/token_bias/<protocol>/seedS`` (the runs with ``--set token_bias=true``; where that
folder holds no run, the table's run ``experiments/results/issue11/seedS``, which is the token-bias run once the run
without it was moved to ``without/``: session 39 moved protocols 2, 3, the synthetic screen and protocol 1's seeds 1-2) and
the same protocol's runs without it (``experiments/results/issue11/seedS``, the table's runs; the default then; or
``without/<protocol>/seedS``, where the table's runs were moved once it was rerun with the token bias), and
``names_only/<protocol>/seedS`` where present (a table over the name tokens only: no kind, shared dose, control or
generic rows; runs with ``VC_TB_NAMES=1`` on the session-37 code that tried it), ``decay/<protocol>/seedS`` where
present (the table with weight decay 1, ``--set token_bias_decay=1``, session 38),
``decay/user_files_paired/{token_bias,decay1,without}/seedS`` (the drug screen at
both decays and without the table, with their verdicts kept, session 39),
and ``attempts/token_bias/user_files/seedS`` against ``experiments/results/user_files/seedS``. Prints, per seed and
as means, the pure model's held-out figures and the validation verdict's MSE (what a setting may be chosen on).
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args()  # --help answers, runs nothing

ROOT = Path(__file__).resolve().parents[4]
HERE = Path(__file__).resolve().parent
REF = ROOT / "experiments" / "results" / "issue11"
PROTOCOLS = {"p1": "protocol_1_context_transfer", "p2": "protocol_2_unseen_pairs", "p3": "protocol_3_unseen_knockouts",
             "p5": "protocol_5_cytokine_response", "synthetic": "synthetic_recovery"}
METRICS = ("pearson_delta", "pearson_delta_top50", "discrimination", "vcc_discrimination_score_l1", "edistance",
           "spearman")


def protocol_row(path: Path) -> dict:
    d = json.loads(path.read_text())
    if "rows" in d and "verdict" in d:  # synthetic_recovery: the ranking of the true effect sizes
        return {"spearman": d["rows"]["model (screen, held-out controls)"]["spearman"],
                "verdict_mse": d["verdict"]["model"]["mse"], "steps": d["steps"]}
    out = {}
    if "runs" in d:  # protocol 1: CD4T alone (the cell type every seed holds out)
        groups = [g for g in d["groups"] if g["method"] == "model" and g.get("context") == "CD4T"]
        out |= {m: float(np.mean([g["value"] for g in groups if g["metric"] == m]))
                for m in METRICS if any(g["metric"] == m for g in groups)}
        tr = next((r["training"] for r in d["runs"] if r["cell_type"] == "CD4T"), {})
    else:
        for row in d.get("summary", []):
            if row["method"] == "model":
                out |= {m: row[f"{m} mean"] for m in METRICS if f"{m} mean" in row}
        tr = d.get("training") or {}
    verdict = tr.get("verdict") or {}
    out["verdict_mse"] = (verdict.get("model") or {}).get("mse")
    out["steps"] = tr.get("steps")
    return out


def markdown(frame: pd.DataFrame) -> str:
    cols = list(frame.columns)
    cell = lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else (  # noqa: E731
        f"{v:.4g}" if isinstance(v, float) else str(v))
    return "\n".join(["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                     + ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)])


lines = []
for key, name in PROTOCOLS.items():
    rows = []
    seeds = sorted({d.name for d in (HERE / key).glob("seed*")} | {d.name for d in (HERE / "without" / key).glob("seed*")})
    for seed in seeds:
        ref = HERE / "without" / key / seed / f"{name}.json"  # moved here once the table's runs had it
        # the token-bias run: here, or (moved there in session 39) the table's run, once the run without it is in without/
        f = HERE / key / seed / f"{name}.json"
        f = f if f.exists() or not ref.exists() else REF / seed / f"{name}.json"
        ref = ref if ref.exists() else REF / seed / f"{name}.json"
        names = HERE / "names_only" / key / seed / f"{name}.json"
        decay = HERE / "decay" / key / seed / f"{name}.json"
        if f.exists() and ref.exists():
            rows.append({"seed": seed, "arm": "token bias", **protocol_row(f)})
            if names.exists():
                rows.append({"seed": seed, "arm": "names only", **protocol_row(names)})
            if decay.exists():
                rows.append({"seed": seed, "arm": "decay 1", **protocol_row(decay)})
            rows.append({"seed": seed, "arm": "without", **protocol_row(ref)})
    if rows:
        t = pd.DataFrame(rows)
        mean = t.groupby("arm").mean(numeric_only=True).reset_index().assign(seed="mean")
        lines += [f"## {name}", "", markdown(pd.concat([t, mean])), ""]

rows = []
for seed_dir in sorted((HERE / "user_files").glob("seed*")):
    ref = ROOT / "experiments" / "results" / "user_files" / seed_dir.name / "user_files.csv"
    f = seed_dir / "user_files.csv"
    if f.exists() and ref.exists():
        names = HERE / "names_only" / "user_files" / seed_dir.name / "user_files.csv"
        decay = HERE / "decay" / "user_files" / seed_dir.name / "user_files.csv"
        for arm, path in (("token bias", f), ("names only", names), ("decay 1", decay), ("without", ref)):
            if not path.exists():
                continue
            t = pd.read_csv(path)
            t = t[t["method"].isin(["model (pure)", "meanshift"])]
            for _, r in t.iterrows():
                rows.append({"seed": seed_dir.name, "file": r["file"], "arm": arm if r["method"] != "meanshift" else
                             "meanshift", "pearson_delta": r["pearson_delta"], "top50": r["pearson_delta_top50"]})
if rows:
    t = pd.DataFrame(rows).drop_duplicates(["seed", "file", "arm"])
    mean = t.groupby(["file", "arm"]).mean(numeric_only=True).reset_index().assign(seed="mean")
    lines += ["## user_files (pure model; meanshift)", "", markdown(pd.concat([t, mean])), ""]
rows = []  # session 39: the drug screen, the table at the model's decay and at 1, run side by side with --work kept
for arm, folder in (("token bias", "token_bias"), ("decay 1", "decay1"), ("without", "without")):
    for seed_dir in sorted((HERE / "decay" / "user_files_paired" / folder).glob("seed*")):
        t = pd.read_csv(seed_dir / "user_files.csv")
        verdict = json.loads((seed_dir / "verdict.json").read_text())
        steps = json.loads(seed_dir.joinpath("user_files.md").read_text().rsplit("Seconds per command", 1)[1]
                           .split(": ", 1)[1].strip())["drug_doses"]["steps"]
        for _, r in t[t["method"].isin(["model (pure)", "meanshift"])].iterrows():
            rows.append({"seed": seed_dir.name, "arm": arm if r["method"] != "meanshift" else "meanshift",
                         "pearson_delta": r["pearson_delta"], "top50": r["pearson_delta_top50"],
                         "verdict_mse": verdict["model"]["mse"] if r["method"] != "meanshift" else verdict["baseline"]["mse"],
                         "steps": steps if r["method"] != "meanshift" else None})
if rows:
    t = pd.DataFrame(rows).drop_duplicates(["seed", "arm"])
    mean = t.groupby("arm").mean(numeric_only=True).reset_index().assign(seed="mean")
    lines += ["## user_files drug_doses, side by side (decay/user_files_paired; pure model, verdict kept)", "",
              markdown(pd.concat([t, mean])), ""]
text = "\n".join(lines)
(HERE / "compare.md").write_text(text)
print(text)
