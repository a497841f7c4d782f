"""Probe (session 48): are the bundled model's "alike" deltas its generic perturbed cell?

Protocol 4's split (rep_3 held out, 120 cells, the verdict's 8 samples, 16 control samples per sample so that the
shared control noise is small; see ../control_samples_alike). The pure model's delta of each of the 25 knockouts,
and of the generic condition (guidance 0: the prompt without the perturbation's name, which the model was trained
on for 15% of perturbed pairs). For each knockout: its delta's correlation with the generic delta and its
regression coefficient on it; the measured rep_3 effect size beside it. Then the mean pairwise correlation of the
knockouts' deltas as they are, and with the generic direction projected out of each.

    cd experiments && PYTHONPATH=. python results/attempts/null_knockouts_generic/probe.py --seed 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
import _protocol as P  # noqa: E402
import protocol_4_screen_ranking as p4  # noqa: E402
from protocol_4_screen_ranking import mean_pairwise  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).with_name("probe.md")))
    args = ap.parse_args()
    P.setup(2)
    import virtualcell as vc
    from virtualcell.demo import measured_effects

    model = vc.model.bundled()
    samples = int((model.verdict or {}).get("settings", {}).get("samples", 1))
    panel = sorted(model.perturbations.labels)
    adata, contract, held, train_ad, baseline, base_idx, ref_idx = p4.data(args.seed, 120)
    cells = baseline[:120].copy()
    kw = dict(samples=samples, control_samples=16 * samples, blend=None, keep_cells=False)
    res = vc.Simulator(cells, model, seed=args.seed).simulate(panel, **kw)
    D = res.aggregates["delta"].values
    names = [str(p) for p in res.aggregates["delta"].coords["perturbation"].values]
    gen = vc.Simulator(cells, model, seed=args.seed + 1).simulate(panel[:1], guidance=0.0, **kw)
    g = gen.aggregates["delta"].values[0]
    measured = measured_effects(adata, contract, *p4.HELD, reference_cells=ref_idx)
    typed = model.perturbations.label_map(names)
    rows = []
    for name, d in zip(names, D):
        label = typed.get(name, name)
        rows.append({"knockout": label, "measured": float(measured.get(label, np.nan)),
                     "corr_generic": float(np.corrcoef(d, g)[0, 1]), "coef_generic": float(d @ g / (g @ g)),
                     "norm": float(np.linalg.norm(d))})
    rows.sort(key=lambda r: -r["measured"])
    unit = g / np.linalg.norm(g)
    resid = D - np.outer(D @ unit, unit)
    out = {"seed": args.seed, "samples": samples, "generic_norm": float(np.linalg.norm(g)),
           "alike": mean_pairwise(D), "alike_without_generic": mean_pairwise(resid), "rows": rows}
    Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1))
    lines = [f"seed {args.seed}, {samples} samples, 16 control samples per sample; generic delta norm "
             f"{out['generic_norm']:.2f}", "",
             f"mean pairwise correlation of the knockouts' deltas: {out['alike']:.3f}; with the generic direction "
             f"projected out of each: {out['alike_without_generic']:.3f}", "",
             "| knockout | measured rep_3 effect | delta norm | corr with generic | coefficient on generic |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['knockout']} | {r['measured']:.2f} | {r['norm']:.2f} | {r['corr_generic']:.2f} | "
              f"{r['coef_generic']:.2f} |" for r in rows]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
