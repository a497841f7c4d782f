"""Protocol 4, screen ranking: does the model rank knockouts by effect size in a held-out replicate?

    python experiments/protocol_4_screen_ranking.py [--retrain --max-minutes 7] [--quick]

Data: the embedded Papalexi 2021 screen, biological replicate ``rep_3`` held out. By default
the bundled model (``virtualcell/data/model``) is used: it was trained exactly this way
(``experiments/train_bundled_model.py``, rep_3 held out, 14 min on 2 threads); ``--retrain``
trains a fresh one within ``--max-minutes`` instead (``--quick`` always retrains a tiny one).
As in ``virtualcell demo``, the baseline population is ``--n-cells`` rep_3 control cells; the
other rep_3 control cells are the reference for the measured effects.

Scores:
* Spearman of the predicted noise-corrected effect size (``l2_delta_corrected`` of the screen
  ranking) against the measured noise-corrected effect size in rep_3 (``evaluate.effect_size``; both
  the noise-corrected norm of the mean delta, so the table's figures compare as numbers too),
  next to: the replicate-vs-replicate ceiling (rep_1 vs rep_2, as in the demo); ranking by the
  number of training cells (a trivial reference); and the measured effect sizes in the
  training replicates (rep_1 + rep_2 against their own controls), which is what a model that
  only memorized its training data could reach.
* ``pearson_delta`` (all / top 50) and the discrimination score of the 25 predicted knockouts in
  rep_3, with ``bio_rep`` as the context: ``meanshift`` is then the same knockout's mean effect
  in the training replicates (the strongest simple baseline here); ``pertmean`` does not apply
  (it would need other knockouts measured in rep_3).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

import _protocol as P

HELD = ("bio_rep", "rep_3")
TOP_K = 100  # genes per cell sentence (the bundled recipe's)


def mean_pairwise(D: np.ndarray) -> float:
    """The mean pairwise correlation of the rows of ``D`` (perturbations x genes): how alike the deltas are."""
    C = np.corrcoef(D)
    return float(C[np.triu_indices_from(C, 1)].mean())


def data(seed: int, n_cells: int):  # noqa: ANN201
    """The split: ``(adata, contract, held mask, train, baseline, baseline indices, reference control indices)``."""
    import virtualcell as vc

    adata = vc.datasets.load("papalexi2021")
    contract = vc.DataContract.from_adata(adata)
    col, rep = HELD
    held = (adata.obs[col].astype(str) == rep).to_numpy()
    ctrl = np.random.default_rng(seed).permutation(np.flatnonzero(held & contract.is_control(adata)))
    n = min(n_cells, ctrl.size // 2)
    base_idx, ref_idx = np.sort(ctrl[:n]), np.sort(ctrl[n:])
    P.mark_test(adata, held)
    return adata, contract, held, adata[~held].copy(), adata[base_idx].copy(), base_idx, ref_idx


def held_reference(adata, held: np.ndarray, base_idx: np.ndarray):  # noqa: ANN001, ANN201
    """The held-out replicate's cells but the baseline ones: what the predictions are scored against."""
    return adata[held & ~np.isin(np.arange(adata.n_obs), base_idx)].copy()


def main(argv: list[str] | None = None) -> None:
    ap = P.parser(__doc__, minutes=7.0)
    ap.add_argument("--retrain", action="store_true", help="train a model instead of loading the bundled one")
    ap.add_argument("--n-cells", type=int, default=120, help="rep_3 control cells fed to the model (demo: 120)")
    ap.add_argument("--model", default=None, help="a checkpoint trained with rep_3 held out (default: the bundled one)")
    args = ap.parse_args(argv)
    P.setup(args.threads)
    started = time.perf_counter()
    from scipy.stats import spearmanr

    import virtualcell as vc
    from virtualcell.demo import measured_effects
    from virtualcell.objectives import parse_objective
    from virtualcell.screen import rank

    adata, contract, held, train_ad, baseline, base_idx, ref_idx = data(args.seed, 8 if args.quick else args.n_cells)
    n = base_idx.size
    col, rep = HELD
    if args.retrain or args.quick:
        cfg = P.train_config(args, top_k=TOP_K, max_steps=3000, kind="knockout", holdout={col: [rep]})
        trained = P.train_model(adata, contract, cfg, model_dir=args.model_dir, name="protocol4")
        model, model_info = trained.model, trained.record()
    else:
        model = vc.C2SModel.load(args.model) if args.model else vc.model.bundled()
        model_info = {"bundled" if not args.model else "checkpoint": args.model or vc.model.BUNDLED, "train_config": {k: v for k, v in model.train_config.items()
                                                                    if k not in ("history",)}}
        assert model.train_config.get("holdout") == {col: [rep]}, model.train_config.get("holdout")
    panel = sorted(model.perturbations.labels)
    pred, res, pred_s = P.predict(model, baseline, {p: p for p in panel}, perturbation_key=contract.perturbation_key,
                                  context=(col, rep), n_cells=n, seed=args.seed,
                                samples=args.samples, temperature=args.temperature, guidance=args.guidance)
    # one generation: the pure model's figures (the targets are for it) and, when the checkpoint serves a blend,
    # the served ones (res.aggregates are then the served prediction's, the pure model's beside them as *_model)
    ranking = rank(res.aggregates, parse_objective(None), n_boot=0, seed=args.seed)
    typed = model.perturbations.label_map(ranking["perturbation"])
    effects = ranking.assign(label=ranking["perturbation"].map(typed)).set_index("label")
    predicted = effects["l2_delta_corrected_model"]

    measured = measured_effects(adata, contract, col, rep, reference_cells=ref_idx)
    common = [p for p in predicted.index if p in measured.index]
    rho = {"model": float(spearmanr(predicted.loc[common], measured.loc[common]).statistic)}
    if "blend_weight" in pred.uns:  # the served blend's ranking, beside the pure model's (the same generation)
        w = pred.uns["blend_weight"]
        s_eff = effects["l2_delta_corrected"]
        rho[f"served blend (w={w:.2f})"] = float(spearmanr(s_eff.loc[common], measured.loc[common]).statistic)
    r1 = measured_effects(adata, contract, col, "rep_1")
    r2 = measured_effects(adata, contract, col, "rep_2")
    both = [p for p in r1.index if p in r2.index]
    rho["ceiling (rep_1 vs rep_2)"] = float(spearmanr(r1.loc[both], r2.loc[both]).statistic)
    counts = adata.obs.loc[~held, contract.perturbation_key].astype(str).value_counts()
    rho["training cell count"] = float(spearmanr(counts.reindex(common).fillna(0), measured.loc[common]).statistic)
    train_eff = vc.evaluate.effect_size(train_ad, perturbation_key=contract.perturbation_key,
                                        control=contract.control).set_index("perturbation")["effect_size"]
    rho["measured in training replicates"] = float(spearmanr(train_eff.reindex(common), measured.loc[common]).statistic)
    spearman = pd.DataFrame({"ranking": list(rho), "spearman": list(rho.values())})

    # effects too alike? the mean pairwise correlation of the knockouts' predicted deltas, against the measured ones
    from virtualcell.sentences import model_expression

    X, _ = model_expression(adata, model.genes)
    labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
    ref_mean = np.asarray(X[ref_idx].mean(axis=0)).ravel()
    measured_d = np.stack([np.asarray(X[np.flatnonzero(held & (labels == p))].mean(axis=0)).ravel() - ref_mean
                           for p in common])
    by_label = {lab: typed_name for typed_name, lab in typed.items()}
    predicted_d = res.aggregates["delta_model"].sel(perturbation=[by_label[p] for p in common]).values

    alike = {"model": mean_pairwise(predicted_d), "measured rep_3": mean_pairwise(measured_d)}

    reference = held_reference(adata, held, base_idx)
    table = P.score(pred, reference, baseline=baseline, train=train_ad, contract=contract, context_key=col,
                    baselines=("nochange", "meanshift", "linear"), seed=args.seed)
    summ = P.summary(table)
    served_rho = [f"; served blend {v:.2f}" for k, v in rho.items() if k.startswith("served blend")]
    rows = [{"metric": "Spearman of effect sizes", "model": f"{rho['model']:.2f}" + "".join(served_rho),
             "baselines": f"training-replicate effects {rho['measured in training replicates']:.2f}; "
                          f"cell count {rho['training cell count']:.2f}",
             "ceiling": f"{rho['ceiling (rep_1 vs rep_2)']:.2f} (rep_1 vs rep_2)",
             "verdict": ("beats" if rho["model"] > rho["measured in training replicates"] else "loses to")
             + f" training-replicate effects by {abs(rho['model'] - rho['measured in training replicates']):.2f}"}]
    rows += [P.headline(summ, m, ["nochange", "meanshift", "linear"]) for m in P.METRICS]
    side = pd.DataFrame({"measured rep_3": measured.loc[common], "predicted": predicted.loc[common],
                         "training replicates": train_eff.reindex(common),
                         "training cells": counts.reindex(common).fillna(0).astype(int)}
                        ).sort_values("measured rep_3", ascending=False).reset_index(names="knockout")
    report = P.Report(
        4, "screen_ranking", "Screen ranking (Papalexi 2021, held-out replicate rep_3)",
        __doc__.split("\n\n", 2)[2], rows, summ, table,
        extra_md=("Spearman correlation with the measured noise-corrected effect sizes in rep_3 "
                  f"({len(common)} knockouts):\n\n" + P.markdown_table(spearman) + "\n\n"
                  f"Mean pairwise correlation of the knockouts' deltas (effects too alike?): predicted "
                  f"{alike['model']:.2f}, measured in rep_3 {alike['measured rep_3']:.2f}.\n\n"
                  f"Model: {'retrained' if (args.retrain or args.quick) else (args.model or 'bundled')}; {n} baseline cells, "
                  f"{len(panel)} knockouts predicted in {pred_s:.0f} s.\n\nEffect sizes, all on one scale: the "
                  f"noise-corrected norm of the mean delta over the {X.shape[1]} genes, signed (measured: "
                  "evaluate.effect_size; predicted: the pure model's l2_delta_corrected):\n\n" + P.markdown_table(side)),
        meta={"spearman": rho, "pairwise_correlation": alike, "model": model_info, "prediction_seconds": round(pred_s, 1), "n_cells": n,
              "effects": side.to_dict(orient="records")},
    )
    P.write(report, args.out, started=started, quick=args.quick, args=args)


if __name__ == "__main__":
    main()
