"""Paired training runs, a variant against the default: each run's steps, validation loss, verdict and held-out score.

Every run of a folder was made beside its pair (the default and the variant, same protocol and
seed, started together with ``--threads 1``), so the two shared the machine alike. The folder holds
one sub-folder per run, named ``PROTOCOL-default-sSEED`` and ``PROTOCOL-VARIANT-sSEED``, each with the
protocol's record (``*.json``; ``user_files.csv`` for ``user_files.py --only drug_doses``) and, from ``--model-dir``, the model's ``history.json`` (cut to its
validation rows and last step) and ``verdict.json`` (the weights are not kept).

Run: ``python experiments/paired_runs.py FOLDER --variant NAME --title TITLE`` (writes ``FOLDER/summary.md``).
The variant wins where the training run's own validation verdict says so (its MSE column), not where the
held-out columns do: those are reported, never chosen on.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

SHARED = {"guidance": 1.0}  # a setting every run's verdict scores (1 sample): runs are compared there


def _user_files(folder: Path) -> dict[str, str]:
    """``user_files.py``'s drug screen (``--only drug_doses``): pure / served per metric, from its csv."""
    import csv

    rows = {r["method"]: r for r in csv.DictReader((folder / "user_files.csv").open()) if r["file"] == "drug_doses"}
    return {m: f"{float(rows['model (pure)'][m]):.2f} / {float(rows['model (served)'][m]):.2f}"
            for m in ("pearson_delta", "pearson_delta_top50")}


def row(folder: Path) -> dict:
    # the protocol's record (user_files.py's drug screen has none: its user_files.csv instead)
    rec = next((json.loads(f.read_text()) for f in folder.glob("*.json") if f.name not in ("verdict.json", "history.json")),
               {})
    verdict = json.loads((folder / "verdict.json").read_text())
    history = json.loads((folder / "history.json").read_text())
    history = history if isinstance(history, list) else history["history"]
    val = [r["val_loss"] for r in history if "val_loss" in r]
    shared = next(c["model"]["mse"] for c in verdict["candidates"] if c["settings"] == SHARED)
    if (folder / "user_files.csv").exists():  # user_files.py's drug screen
        held = _user_files(folder)
    elif "rows" in rec:  # the synthetic screen
        held = {k: v["spearman"] for k, v in rec["rows"].items() if k.startswith("model")}
    else:  # a protocol: its headline metrics, the pure model's figure and the served blend's
        held = {}
        for h in rec["headline"]:
            pure, _, served = h["model"].partition("; served blend ")
            held[h["metric"]] = f"{pure.split()[0]} / {served.split()[0] if served else '-'}"
    return {"steps": int(history[-1]["step"]), "val_loss_end": val[-1], "val_loss_min": min(val),
            "verdict_mse_g1": shared, "verdict_mse_chosen": verdict["model"]["mse"],
            "verdict_pearson_delta": verdict["model"]["pearson_delta"], "weight": verdict["weight"], "held_out": held}


def summary(folder: Path, variant: str, title: str, about: str) -> str:
    """The runs' table and the per-protocol comparison of the variant with the default, as markdown."""
    runs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "verdict.json").exists())
    command = " ".join(["python experiments/paired_runs.py", *map(shlex.quote, sys.argv[1:])])
    lines = [f"# {title}", "", f"`{command}`", "",
             "| run | steps | val loss (end / min) | verdict MSE, guidance 1, 1 sample | verdict MSE, chosen | "
             "verdict pearson_delta | weight | held out (protocols: pure / served) |", "|---|---|---|---|---|---|---|---|"]
    for p in runs:
        r = row(p)
        held = ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r["held_out"].items())
        lines.append(f"| {p.name} | {r['steps']} | {r['val_loss_end']:.3f} / {r['val_loss_min']:.3f} | "
                     f"{r['verdict_mse_g1']:.4f} | {r['verdict_mse_chosen']:.4f} | {r['verdict_pearson_delta']:.3f} | "
                     f"{r['weight']:.2f} | {held} |")
    v = variant
    lines += ["", f"Per protocol, paired by seed: {about}", "",
              f"| protocol | steps, {v} / default | verdict MSE (chosen setting), default -> {v} | {v} lower at | "
              f"verdict MSE at guidance 1, 1 sample (a setting both scored): default -> {v}, lower at | "
              f"held out, pure: default -> {v} | served: default -> {v} |", "|---|---|---|---|---|---|---|"]
    for proto in sorted({p.name.split("-")[0] for p in runs}):
        pairs = [(folder / f"{proto}-default-s{s}", folder / f"{proto}-{v}-s{s}") for s in range(10)]
        pairs = [(row(a), row(b)) for a, b in pairs if (a / "verdict.json").exists() and (b / "verdict.json").exists()]
        if not pairs:
            continue
        ratio = [b["steps"] / a["steps"] for a, b in pairs]
        mse = [(a["verdict_mse_chosen"], b["verdict_mse_chosen"]) for a, b in pairs]
        g1 = [(a["verdict_mse_g1"], b["verdict_mse_g1"]) for a, b in pairs]
        held = []
        for k in pairs[0][0]["held_out"]:
            def mean(side: int, which: int) -> float:
                parts = [str(pr[side]["held_out"][k]).split(" / ") for pr in pairs]  # "pure / served", or one figure
                vals = [fig[which] if len(fig) > which else fig[0] for fig in parts]
                return sum(float(x) for x in vals) / len(vals)
            if k.startswith("model (blend)"):
                continue
            held.append((k, mean(0, 0), mean(1, 0), mean(0, 1), mean(1, 1)))
        pure = "; ".join(f"{k} {a:.2f} -> {b:.2f}" for k, a, b, _, _ in held)
        if proto == "synthetic":  # its served ranking is a row of its own
            blend = [(pr[0]["held_out"].get("model (blend)"), pr[1]["held_out"].get("model (blend)")) for pr in pairs]
            served = f"Spearman {sum(a for a, _ in blend) / len(blend):.2f} -> {sum(b for _, b in blend) / len(blend):.2f}"
        else:
            served = "; ".join(f"{k} {c:.2f} -> {d:.2f}" for k, _, _, c, d in held)
        lines.append(f"| {proto} ({len(pairs)} seeds) | {min(ratio):.2f}-{max(ratio):.2f}x | "
                     f"{sum(a for a, _ in mse) / len(mse):.4f} -> {sum(b for _, b in mse) / len(mse):.4f} | "
                     f"{sum(b < a for a, b in mse)} of {len(mse)} | {sum(a for a, _ in g1) / len(g1):.4f} -> "
                     f"{sum(b for _, b in g1) / len(g1):.4f}, {sum(b < a for a, b in g1)} of {len(g1)} | {pure} | {served} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", type=Path, help="the runs' folder (PROTOCOL-default-sS and PROTOCOL-VARIANT-sS inside)")
    ap.add_argument("--variant", required=True, help="the variant's name in its runs' folder names")
    ap.add_argument("--title", required=True, help="the summary's heading")
    ap.add_argument("--about", default="", help="what the default and the variant are, for the comparison's caption")
    args = ap.parse_args(argv)
    if not any(args.folder.glob(f"*-{args.variant}-s*")):
        ap.error(f"no run folder named PROTOCOL-{args.variant}-sSEED in {args.folder}")
    text = summary(args.folder, args.variant, args.title, args.about)
    (args.folder / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
