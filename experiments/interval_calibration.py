"""How often the package's 95% intervals say something that is not there: the screen's largest-effect score and
the verdict's model-minus-baseline difference, each beside the rule it replaced, in one run, on simulations whose
truth is known (numpy only, no model; seeded).

1. **A screen candidate with no effect** (``screen.rank`` with the default objective, the L2 norm of the mean delta):
   aggregates laid out as ``Simulator.simulate`` writes them (120 baseline cells in the Simulator's 20 buckets, and a
   small screen of 12 cells in 10 or so, each predicted cell paired with its own baseline cell), four candidates per
   screen whose true mean change is 0, and candidates with a true effect of 1x, 3x and 10x the noise. The score is
   corrected on the squared norm with the resamples widened for the buckets' number (``LargestEffect.corrected``,
   ``objectives.widened``); the rules before (the basic bootstrap on the norm itself, ``2 * plug_in -
   median(boots)``; on the squared norm without widening, session 56) are computed from the same resamples. Reported: how often the interval excludes the true value
   (nominal 5%), how often a null candidate scores above 0 (and so may be a diverse pick), the mean score.
2. **The verdict's difference when model and baseline are equally good** (``validation.mse_difference``): 20
   perturbations x 5 contexts, each perturbation's error shared by its contexts (a model that misreads a
   perturbation misreads it everywhere); the interval resampling rows (before) against resampling perturbations and
   contexts (now). Reported: how often it calls a difference settled (nominal 5%).
3. **A setting chosen on the rows that judge it** (``validation.crossfitted``): five candidate settings as good as
   the baseline, each with its own noise (correlated 0.5 with the others); the candidate of lowest MSE judged on all
   rows (before) against each half judged at the setting the other half chose (now). Reported: how often "the model
   is better" is said (nominal 2.5%).

Run from the repository root::

    python experiments/interval_calibration.py            # about 2 minutes on one core
    python experiments/interval_calibration.py --reps 50  # a quick run

Writes ``experiments/results/interval_calibration.md`` and ``.json`` (``--out``: another folder, e.g. for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def aggregates(changes: np.ndarray, x: np.ndarray, names: list[str]):  # noqa: ANN201
    """Aggregates as ``Simulator._aggregates`` lays them out, from given per-cell changes (no model)."""
    import xarray as xr

    from virtualcell._stats import unbiased_var
    from virtualcell.simulator import N_BUCKETS, _bucket

    P, n, G = changes.shape
    b = _bucket(np.arange(n), 0)
    pred = x[None] + changes
    mean, cm = pred.mean(1), x.mean(0)
    bt, bc = np.zeros((P, N_BUCKETS, G)), np.zeros((P, N_BUCKETS), np.int64)
    for p in range(P):
        np.add.at(bt[p], b, pred[p])
        bc[p] += np.bincount(b, minlength=N_BUCKETS)
    cbm = np.stack([x[b == k].mean(0) if (b == k).any() else np.zeros(G) for k in range(N_BUCKETS)])
    return xr.Dataset({
        "mean": (("perturbation", "gene"), mean), "var": (("perturbation", "gene"), pred.var(1, ddof=1)),
        "delta": (("perturbation", "gene"), mean - cm),
        "var_delta": (("perturbation", "gene"), unbiased_var(changes.mean(1), (changes ** 2).mean(1), n)),
        "n_cells": (("perturbation",), np.full(P, n)),
        "bucket_mean": (("perturbation", "bucket", "gene"), bt / np.maximum(bc, 1)[..., None]),
        "bucket_count": (("perturbation", "bucket"), bc),
        "control_mean": (("gene",), cm), "control_var": (("gene",), x.var(0, ddof=1)),
        "control_bucket_mean": (("bucket", "gene"), cbm),
    }, coords={"perturbation": names, "gene": [f"G{i}" for i in range(G)], "bucket": np.arange(N_BUCKETS)},
        attrs={"n_baseline_cells": n})


def earlier_rules(agg, name: str, n_boot: int, seed: int) -> dict[str, tuple[float, float, float]]:  # noqa: ANN001
    """The rules before, from the same resamples ``screen.rank`` draws: the basic bootstrap on the norm (before
    session 56), and on the squared norm without widening the resamples for the buckets' number (session 56)."""
    from virtualcell.objectives import LargestEffect
    from virtualcell.generation import stable_key

    a = agg.sel(perturbation=name)
    bucket_delta = a["bucket_mean"].values - agg["control_bucket_mean"].values
    bc = a["bucket_count"].values.astype(float)
    nonempty = np.flatnonzero(bc > 0)
    rng = np.random.default_rng([seed, stable_key(name)])
    boots = []
    for _ in range(n_boot):
        pick = rng.choice(nonempty, size=nonempty.size, replace=True)
        w = bc[pick]
        boots.append(np.linalg.norm((bucket_delta[pick] * w[:, None]).sum(0) / w.sum()))
    plug = float(np.linalg.norm(a["delta"].values))
    low, mid, high = np.percentile(boots, [2.5, 50, 97.5])
    return {"norm (before session 56)": (2 * plug - mid, 2 * plug - high, 2 * plug - low),
            "squared, not widened (session 56)": LargestEffect().corrected(plug, np.asarray(boots))}


def largest_effect(reps: int, n_boot: int) -> list[dict]:
    from virtualcell.objectives import LargestEffect
    from virtualcell.screen import rank

    genes, noise_sq = 50, 0.15  # the paired noise ||.||^2 of the demo's screen (120 cells)
    obj = LargestEffect()
    rows = []
    for n, ratio in [(12, 0.0), (12, 3.0), (120, 0.0), (120, 1.0), (120, 3.0), (120, 10.0)]:
        s = np.sqrt(noise_sq * n / genes)  # per-cell, per-gene sd of the change giving that noise of the mean
        truth = float(np.sqrt(ratio * noise_sq))
        tally = {rule: [0, 0, []] for rule in ("now", "squared, not widened (session 56)", "norm (before session 56)")}
        for r in range(reps):
            rng = np.random.default_rng(1000 * int(ratio) + r)
            x = rng.gamma(2.0, 1.0, (n, genes)) + 3
            mu = np.zeros(genes)
            mu[:5] = truth / np.sqrt(5)
            changes = mu + rng.normal(0, s, (4, n, genes))
            names = [f"c{k}" for k in range(4)]
            agg = aggregates(changes, x, names)
            table = rank(agg, obj, n_boot=n_boot, seed=r).set_index("perturbation")
            for name in names:
                for rule, (score, low, high) in (
                        ("now", tuple(table.loc[name, ["score", "score_low", "score_high"]])),
                        *earlier_rules(agg, name, n_boot, r).items()):
                    t = tally[rule]
                    t[0] += not (low <= truth <= high)
                    t[1] += score > 0
                    t[2].append(score)
        for rule, (excl, above, scores) in tally.items():
            rows.append({"cells": n, "effect / noise": ratio, "true norm": round(truth, 3), "rule": rule,
                         "candidates": 4 * reps, "interval excludes the truth": excl / (4 * reps),
                         "score above 0": above / (4 * reps), "mean score": float(np.mean(scores))})
    return rows


def verdict_interval(reps: int) -> list[dict]:
    from virtualcell.validation import mse_difference

    P, C, G = 20, 5, 10
    p = np.repeat(np.arange(P), C).astype(str)
    c = np.tile(np.arange(C), P).astype(str)
    settled = {"rows (before)": 0, "perturbations and contexts (now)": 0}
    for r in range(reps):
        rng = np.random.default_rng(r)
        y = np.zeros((P * C, G))
        shared = np.repeat(rng.normal(0, 1, (P, 2, G)), C, axis=0)  # each perturbation's own error, each side
        m = shared[:, 0] + 0.3 * rng.normal(size=y.shape)
        b = shared[:, 1] + 0.3 * rng.normal(size=y.shape)
        for key, kw in (("rows (before)", {}), ("perturbations and contexts (now)", {"perturbations": p, "contexts": c})):
            d = mse_difference(m, b, y, seed=r, **kw)
            settled[key] += d["high"] < 0 or d["low"] > 0
    return [{"interval resamples": k, "splits": reps, "settled (no true difference)": v / reps}
            for k, v in settled.items()]


def chosen_setting(reps: int) -> list[dict]:
    from virtualcell.validation import crossfitted, mse_difference

    P, G, K = 24, 10, 5
    p = np.arange(P).astype(str)
    better = {"the chosen setting on all rows (before)": 0, "each half at the other half's choice (now)": 0}
    for r in range(reps):
        rng = np.random.default_rng(10_000 + r)
        y = np.zeros((P, G))
        base = rng.normal(0, 1, (P, G))  # the baseline's error
        common = rng.normal(0, 1, (P, G))
        cands = [np.sqrt(0.5) * common + np.sqrt(0.5) * rng.normal(0, 1, (P, G)) for _ in range(K)]
        errors = [float(np.mean((m - y) ** 2)) for m in cands]
        best = cands[int(np.argmin(errors))]
        fair = crossfitted(cands, y, p, seed=r)
        for key, m in (("the chosen setting on all rows (before)", best),
                       ("each half at the other half's choice (now)", fair)):
            d = mse_difference(m, base, y, seed=r, perturbations=p)
            better[key] += d["high"] < 0
    return [{"judged": k, "splits": reps, "'the model is better' (none is)": v / reps} for k, v in better.items()]


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = (lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
                     + ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=100, help="simulated screens / splits per row")
    ap.add_argument("--n-boot", type=int, default=200, help="bootstrap resamples of a screen (as screen's default)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    parts = {"largest_effect": largest_effect(args.reps, args.n_boot), "verdict_interval": verdict_interval(args.reps),
             "chosen_setting": chosen_setting(args.reps)}
    seconds = round(time.perf_counter() - t0, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "interval_calibration.json").write_text(json.dumps(
        {"command": " ".join(["python", "experiments/interval_calibration.py", *sys.argv[1:]]), "seconds": seconds,
         **parts}, indent=1))
    doc = __doc__.split("Run from")[0].strip()
    md = ["# How often a 95% interval says something that is not there\n",
          f"Command: `python experiments/interval_calibration.py{' ' + ' '.join(sys.argv[1:]) if sys.argv[1:] else ''}` "
          f"({seconds:.0f} s). Nominal: an interval misses the truth in 5% of cases; a one-sided claim is wrong in "
          "2.5%.\n", doc.split("\n\n", 1)[1] + "\n",
          "## 1. The largest-effect score of a screen candidate\n", table(parts["largest_effect"]) + "\n",
          "## 2. The verdict's difference, model and baseline equally good\n", table(parts["verdict_interval"]) + "\n",
          "## 3. A generation setting chosen on the rows that judge it\n", table(parts["chosen_setting"]) + "\n"]
    (args.out / "interval_calibration.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
