"""Why the bundled model's screen ranking is weak: three diagnostics on held-out data.

On the control cells of the held-out replicate (Papalexi 2021 rep_3), for every knockout
the bundled model knows:

1. **A shared shift.** The norm of the mean predicted delta over all knockouts, against the
   norm of the measured delta of all knockout cells pooled (same replicate, vs its controls).
2. **Effects too alike.** The mean pairwise Pearson correlation of the knockouts' predicted
   deltas, against the same for their measured deltas.
3. **The input cell barely matters.** The Jaccard overlap of each generated cell's genes with
   its own input cell's genes, against another input cell's genes.
4. **The knocked-out gene itself.** For each knockout whose target is a measured gene, the
   predicted change of that gene against its measured change in rep_3 and in the training
   replicates (rep_1 and rep_2 against their own controls); how often a generated sentence
   writes the gene under the knockout and under control, against the measured cells'
   sentences; and the size of the whole predicted delta against the measured one (norms).

Run: ``python experiments/diagnose_model.py [--model DIR] [--out FILE]`` (about a minute; the bundled
model by default). Writes ``experiments/results/diagnose_model.md``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a checkpoint trained with rep_3 held out (default: the bundled one)")
    ap.add_argument("--out", type=Path, default=ROOT / "experiments" / "results" / "diagnose_model.md")
    args = ap.parse_args(argv)
    import virtualcell as vc
    from virtualcell.generation import GenerationConfig
    from virtualcell.sentences import encode, expression_matrix, log_normalize

    model = vc.C2SModel.load(args.model, device="cpu") if args.model else vc.model.bundled(device="cpu")
    adata = vc.datasets.load("papalexi2021")
    held = adata[adata.obs["bio_rep"] == "rep_3"].copy()
    is_ctrl = (held.obs["perturbation"] == "control").to_numpy()
    ctrl = held[is_ctrl][:60].copy()
    knockouts = [p for p in model.perturbations.labels if p != "control"]

    sim = vc.Simulator(ctrl, model)
    res = sim.simulate(knockouts, seed=0, progress=False, blend=None)  # the pure model
    pred = res.aggregates["delta"].values  # knockouts x genes, vs the baseline cells
    genes = list(held.var_names)  # predictions keep the data's gene spelling
    col = [genes.index(g) for g in res.genes]
    X = log_normalize(expression_matrix(held), "counts")[:, col].toarray()
    mu0 = X[is_ctrl].mean(0)
    labels = held.obs["perturbation"].astype(str).to_numpy()
    meas = np.stack([X[labels == k].mean(0) - mu0 for k in knockouts])
    pooled = X[~is_ctrl].mean(0) - mu0

    def mean_offdiag_corr(D: np.ndarray) -> float:
        C = np.corrcoef(D)
        return float(C[~np.eye(len(D), dtype=bool)].mean())

    cells = encode(ctrl, vocab=model.genes, top_k=model.top_k)
    own, other = [], []
    for chunk in model.generate(cells, model.resolve(knockouts[:4]), config=GenerationConfig(max_genes=model.top_k)):
        for c, s in zip(chunk.cell, (chunk.sentences[i] for i in range(len(chunk.cell)))):
            g = set(s.tolist())
            a, b = set(cells[int(c)].tolist()), set(cells[(int(c) + 7) % len(cells)].tolist())
            own.append(len(g & a) / len(g | a))
            other.append(len(g & b) / len(g | b))

    # the same generated cells, calibrated as before the per-gene rescaling: each cell clipped at 0 alone
    raw = sim.simulate(["control", *knockouts], seed=0, progress=False, blend=None, calibrate=False,
                       keep_cells=True).cells.values
    x = sim.expression.toarray()
    clipped = np.stack([(np.maximum(x + raw[j] - raw[0], 0) - x).mean(0) for j in range(1, raw.shape[0])])

    rows = [
        ("norm of the mean delta over all knockouts", f"{np.linalg.norm(pred.mean(0)):.2f}",
         f"{np.linalg.norm(pooled):.2f} (all knockout cells pooled)"),
        ("the same, cells only clipped at 0 (the calibration before its per-gene rescaling)",
         f"{np.linalg.norm(clipped.mean(0)):.2f}", "—"),
        ("mean pairwise correlation of knockout deltas", f"{mean_offdiag_corr(pred):.2f}", f"{mean_offdiag_corr(meas):.2f}"),
        ("the same, cells only clipped at 0", f"{mean_offdiag_corr(clipped):.2f}", "—"),
        ("Jaccard of generated genes with own input / another input", f"{np.mean(own):.2f} / {np.mean(other):.2f}", "—"),
    ]
    which = f"the checkpoint {args.model}" if args.model else "the bundled model"
    lines = [f"# Diagnostics of {which} on held-out data (Papalexi rep_3)", "",
             f"`{' '.join(['python experiments/diagnose_model.py', *(argv if argv is not None else sys.argv[1:])])}` — "
             f"{ctrl.n_obs} control cells of rep_3, {len(knockouts)} knockouts.", "",
             "| diagnostic | predicted | measured |", "| --- | ---: | ---: |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]

    # 4. the knocked-out gene's own change, how often a sentence writes it, and the size of each knockout's delta
    train = adata[adata.obs["bio_rep"] != "rep_3"]
    Xt = log_normalize(expression_matrix(train), "counts")[:, col].toarray()
    t_labels = train.obs["perturbation"].astype(str).to_numpy()
    t_mu0 = Xt[t_labels == "control"].mean(0)
    upper = [g.upper() for g in res.genes]
    measured_targets = [k for k in knockouts if k.upper() in upper]
    run = model.resolve(["control", *measured_targets])
    written: dict[int, list[np.ndarray]] = {}
    for chunk in model.generate(cells, run, config=GenerationConfig(max_genes=model.top_k, seed=0)):
        for i, p in enumerate(chunk.perturbation):
            written.setdefault(int(p), []).append(chunk.sentences[i])

    def share(sentences: list[np.ndarray], gene: int) -> float:
        return float(np.mean([gene in s for s in sentences]))

    t_sentences = {lab: encode(train[t_labels == lab], vocab=model.genes, top_k=model.top_k)
                   for lab in ["control", *measured_targets]}
    lines += ["", "The knocked-out gene itself: its change (log1p scale), the share of cell sentences that write it "
              "(generated from the rep_3 cells above; measured: the training replicates' cells), and the size of "
              "each knockout's delta (norm over genes):", "",
              "| knockout | target gene: predicted | rep_3 | training replicates | written, generated: knockout / "
              "control | measured: knockout / control | delta norm: predicted | rep_3 |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, name in enumerate(knockouts):
        if name not in measured_targets:
            continue
        j = upper.index(name.upper())
        g = model.genes.index(name)
        s_ts = t_sentences[name]
        trained = Xt[t_labels == name].mean(0)[j] - t_mu0[j]
        gen = f"{share(written[1 + measured_targets.index(name)], g):.2f} / {share(written[0], g):.2f}"
        data = (f"{share([s_ts[i] for i in range(len(s_ts))], g):.2f} / "
                f"{share([t_sentences['control'][i] for i in range(len(t_sentences['control']))], g):.2f}")
        lines.append(f"| {name} | {pred[k, j]:+.2f} | {meas[k, j]:+.2f} | {trained:+.2f} | {gen} | {data} | "
                     f"{np.linalg.norm(pred[k]):.2f} | {np.linalg.norm(meas[k]):.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
