"""The validation verdict: held-out cells, training baselines, the blend weight and the served blend."""

from __future__ import annotations

import json
import shutil

import dataclasses

import anndata
import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.errors import ScreenError, TrainingError
from virtualcell.train import GUIDANCE_CANDIDATES, TrainConfig, data_hash, verdict_split
from virtualcell.validation import Baselines, blend_weight, delta_noise, run_verdict, score_deltas

# the tiny model of conftest.py is trained with this config (and the default verdict_fraction)
TINY = TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=12, eval_every=6, save_every=6,
                   batch_size=8, warmup_steps=2, seed=0)


# --------------------------------------------------------------------------- the split
def _two_contexts(papalexi_small):
    """Context A: every cell; context B: exactly 41 control cells plus one perturbation's cells."""
    import anndata as ad

    a = papalexi_small.copy()
    a.obs["line"] = "A"
    b = a[a.obs.perturbation == "control"][:41].copy()
    b.obs["line"] = "B"
    few = a[a.obs.perturbation == "STAT1"].copy()
    few.obs["line"] = "B"
    c = a[a.obs.perturbation == "control"][:30].copy()  # context C: too few controls to hold any out
    c.obs["line"] = "C"
    for prefix, part in zip("ABSC", (a, b, few, c)):
        part.obs_names = [f"{prefix}-{n}" for n in part.obs_names]
    return ad.concat([a, b, few, c], merge="same"), DataContract(perturbation_key="perturbation", control="control", context_key="line")


def test_verdict_split_is_seeded_bounded_and_keeps_controls_for_training(papalexi_small):
    data, contract = _two_contexts(papalexi_small)
    cfg = TrainConfig(seed=0)
    held = verdict_split(data, contract, cfg)
    np.testing.assert_array_equal(held, verdict_split(data, contract, cfg))  # deterministic
    assert not np.array_equal(held, verdict_split(data, contract, TrainConfig(seed=1)))
    assert not verdict_split(data, contract, TrainConfig(verdict_fraction=0.0)).any()
    labels, ctx, ctrl = contract.labels(data), contract.contexts(data), contract.is_control(data)
    for c in ("A", "B", "C"):
        assert (ctrl & (ctx == c) & ~held).sum() >= 2  # training keeps controls in every context
    n_b = int((ctrl & (ctx == "B")).sum())
    assert n_b == 41 and (ctrl & (ctx == "B") & held).sum() == 8  # at least 8 of a context with >= 40
    assert not held[ctx == "C"].any()  # fewer than 40 controls: nothing held out there
    assert (ctrl & (ctx == "A") & held).sum() == round(0.1 * (ctrl & (ctx == "A")).sum())
    held_labels = set(labels[held & ~ctrl])
    assert 0 < len(held_labels) <= 24
    for p in held_labels:  # only perturbations with >= 20 cells in the context lose cells, and only 10% of them
        for c in ("A", "B"):
            n = int(((labels == p) & (ctx == c)).sum())
            k = int(((labels == p) & (ctx == c) & held).sum())
            assert k == 0 or (n >= 20 and k == max(1, round(0.1 * n)))
    with pytest.raises(TrainingError, match="verdict_fraction"):
        TrainConfig(verdict_fraction=0.9)


def test_the_verdict_cells_never_reach_training(tiny_model):
    model, folder, data = tiny_model
    contract = DataContract.from_adata(data)
    held = verdict_split(data, contract, TINY)
    tc = model.train_config
    assert tc["n_verdict_cells"] == int(held.sum()) > 0
    assert tc["n_train_cells"] == data.n_obs - int(held.sum())
    assert tc["trained_data_hash"] == data_hash(data[~held], contract)  # what was paired and fitted: the rest only
    assert tc["data_hash"] == data_hash(data, contract)  # the data as given
    assert tc["verdict_seconds"] < 60


# --------------------------------------------------------------------------- the pure functions
def test_blend_weight_is_the_least_squares_weight():
    rng = np.random.default_rng(0)
    y = rng.normal(size=(5, 40))
    b = y + rng.normal(scale=0.5, size=y.shape)
    m = y + rng.normal(scale=0.5, size=y.shape)
    d = (m - b).ravel()
    by_hand = float(d @ (y - b).ravel() / (d @ d))
    assert 0 < by_hand < 1
    assert blend_weight(model=m, baseline=b, measured=y) == pytest.approx(by_hand)
    blend = by_hand * m + (1 - by_hand) * b  # the weight minimizes the error of the blend
    for w in (by_hand - 0.05, by_hand + 0.05):
        assert np.sum((blend - y) ** 2) < np.sum((w * m + (1 - w) * b - y) ** 2)
    assert blend_weight(model=y, baseline=b, measured=y) == 1.0  # the model is the truth
    assert blend_weight(model=b, baseline=b, measured=y) == 0.0  # nothing to add
    noise = rng.normal(scale=3.0, size=y.shape)
    assert blend_weight(model=noise, baseline=y, measured=y) == 0.0  # pure noise against a perfect baseline
    assert blend_weight(model=2 * y - b, baseline=b, measured=y) == pytest.approx(0.5)


def test_learning_rate_follows_what_is_trained(tiny_model):
    """No rate given: a new small model trains at NEW_MODEL_LR and a pretrained base is fine-tuned at FINETUNE_LR
    (a small model's rate would wreck it); a given rate is kept, a non-positive one refused; the checkpoint
    records the rate it used."""
    from virtualcell.cli import build_parser
    from virtualcell.train import FINETUNE_LR, NEW_MODEL_LR, with_learning_rate

    assert TrainConfig().lr is None and FINETUNE_LR < NEW_MODEL_LR
    assert with_learning_rate(TrainConfig(), None).lr == NEW_MODEL_LR
    assert with_learning_rate(TrainConfig(), "vandijklab/C2S-Scale-Gemma-2-2B").lr == FINETUNE_LR
    assert with_learning_rate(TrainConfig(lr=5e-4), "some/base").lr == 5e-4
    with pytest.raises(TrainingError, match="lr must be > 0"):
        TrainConfig(lr=0.0)
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--perturbation-key", "p", "--control", "c"])
    assert args.lr is None
    model, _, _ = tiny_model
    assert model.train_config["lr"] == NEW_MODEL_LR  # the fixture gives none


def test_the_mse_difference_resamples_perturbations_and_contexts_not_rows():
    """20 perturbations x 5 contexts where the model and the baseline are equally good, but each perturbation's
    error is shared by its contexts: resampling rows called a difference settled in over a third of splits;
    resampling perturbations and contexts, about as often as its 95% says."""
    from virtualcell.validation import mse_difference

    rng = np.random.default_rng(0)
    p, c = np.repeat(np.arange(20), 5).astype(str), np.tile(np.arange(5), 20).astype(str)
    settled_rows = settled = 0
    for r in range(100):
        y = np.zeros((100, 10))
        shared = np.repeat(rng.normal(0, 1, (20, 2, 10)), 5, axis=0)  # each perturbation's own error, two sides
        m, b = shared[:, 0] + 0.3 * rng.normal(size=y.shape), shared[:, 1] + 0.3 * rng.normal(size=y.shape)
        d = mse_difference(m, b, y, seed=r)
        settled_rows += d["high"] < 0 or d["low"] > 0
        d = mse_difference(m, b, y, seed=r, perturbations=p, contexts=c)
        settled += d["high"] < 0 or d["low"] > 0
        assert (d["perturbations"], d["contexts"], d["rows"]) == (20, 5, 100)
    assert settled_rows > 20 and settled <= 12, (settled_rows, settled)
    one = mse_difference(np.ones((5, 3)), np.zeros((5, 3)), np.zeros((5, 3)), perturbations=["a"] * 5,
                         contexts=list("vwxyz"))  # one perturbation in five contexts: resampled over contexts
    assert np.isfinite(one["low"]) and one["perturbations"] == 1


def test_a_setting_chosen_on_the_rows_is_judged_on_the_other_half():
    """The verdict keeps the candidate of lowest MSE; judged on the rows that chose it, a difference from the
    baseline is optimistic. crossfitted takes each half's deltas from the candidate the other half chose."""
    from virtualcell.validation import crossfitted

    rng = np.random.default_rng(0)
    y = rng.normal(size=(8, 5))
    groups = list("aabbccdd")
    good = y + 0.1
    cands = [y + rng.normal(size=y.shape) for _ in range(3)] + [good]
    assert np.allclose(crossfitted(cands, y, groups, seed=1), good)  # the best everywhere is chosen by both halves
    # a candidate best on one half only: that half's rows take the other half's choice
    mixed = np.where(np.isin(groups, ["a", "b"])[:, None], y, y + 5.0)
    out = crossfitted([mixed, good], y, groups, seed=0)
    assert not np.allclose(out, mixed) or not np.allclose(out, good)
    assert crossfitted([good], y, groups) is None and crossfitted(cands, y, ["a"] * 8) is None


def test_mse_difference_bounds_which_is_better():
    """The model-minus-baseline MSE, averaged over the rows, with a bootstrap interval over the rows: it
    excludes 0 when one side is closer on every row, and straddles it when the rows disagree."""
    from virtualcell.validation import mse_difference

    rng = np.random.default_rng(0)
    y = rng.normal(size=(12, 30))
    close, far = y + 0.1 * rng.normal(size=y.shape), y + rng.normal(size=y.shape)
    d = mse_difference(close, far, y)
    assert d["rows"] == 12 and d["low"] <= d["mse"] <= d["high"] < 0
    even = np.arange(12)[:, None] % 2 == 0
    d = mse_difference(np.where(even, close, far), np.where(even, far, close), y)  # each closer on half the rows
    assert d["low"] < 0 < d["high"]
    assert mse_difference(close, far, y, seed=3) == mse_difference(close, far, y, seed=3)  # seeded
    one = mse_difference(close[:1], far[:1], y[:1])  # one row: a difference, no interval
    assert one["mse"] < 0 and np.isnan(one["low"]) and np.isnan(one["high"])
    # ... and then the summary settles nothing: it says which error is lower, and that one group gives no interval
    from virtualcell.validation import _summary

    scores = {"pearson_delta": 0.5, "mse": 0.1}

    def part(difference):  # noqa: ANN001, ANN202
        return {"model": scores, "baseline": scores | {"name": "meanshift"}, "blend": scores, "weight": 0.5,
                "difference": difference}

    lone = _summary(1, 10, part(one))
    assert "the model's error is lower, on 1 held-out group, too few for an interval" in lone and "nan" not in lone
    assert "better" not in lone.split("—")[1].split(";")[0]
    assert "the model is better" in _summary(12, 10, part(mse_difference(close, far, y)))


def test_delta_noise_is_the_variance_of_the_mean_over_independent_cells():
    """Cells hashed into unequal buckets: the spread of the buckets' means gives the variance of the mean over all
    cells (sigma^2 / N), whatever the bucket sizes; one bucket gives no estimate (0)."""
    rng = np.random.default_rng(0)
    n_cells, n_buckets, genes, sigma = 64, 20, 20_000, 2.0
    bucket = rng.integers(0, n_buckets, n_cells)
    cells = rng.normal(size=(n_cells, genes)) * sigma
    means = np.stack([cells[bucket == b].mean(0) if (bucket == b).any() else np.zeros(genes)
                      for b in range(n_buckets)])[None]
    counts = np.bincount(bucket, minlength=n_buckets)[None]
    assert (counts == 0).any() and counts.max() > 2 * counts[counts > 0].min()  # unequal, some empty
    noise = delta_noise(means, counts)
    assert noise.shape == (1, genes)
    assert abs(noise.mean() / (sigma ** 2 / n_cells) - 1) < 0.05
    one = np.zeros((1, n_buckets), dtype=int)
    one[0, 3] = n_cells
    assert not delta_noise(means, one).any()


def test_score_deltas_by_hand():
    y = np.array([[1.0, 2.0, 3.0, -1.0]])
    s = score_deltas(2 * y, y, top_n=2)
    assert s["pearson_delta"] == pytest.approx(1.0) and s["pearson_delta_top2"] == pytest.approx(1.0)
    assert s["mse"] == pytest.approx(np.mean(y**2))
    assert score_deltas(np.zeros_like(y), y)["pearson_delta"] == 0.0  # a constant prediction correlates 0


def test_baselines_meanshift_pertmean_and_additive(tiny_model):
    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    base = Baselines.fit(data, contract, model)
    X, _ = vc.sentences.model_expression(data, model.genes)
    labels = contract.labels(data)
    by_hand = np.asarray(X[labels == "STAT1"].mean(0) - X[labels == "control"].mean(0)).ravel()
    d, name = base.delta_for("ko:STAT1")
    assert name == "meanshift"
    np.testing.assert_allclose(d, by_hand, atol=1e-5)
    pair, name = base.delta_for(vc.perturbations.parse("ko:STAT1+ko:JAK2"))
    assert name == "additive"
    np.testing.assert_allclose(pair, d + base.delta_for("ko:JAK2")[0], atol=1e-5)
    unseen = next(g for g in model.genes.genes if g not in {q.split(":")[-1] for q in base.names})
    other, name = base.delta_for(f"ko:{unseen}")
    assert name == "coexpression"  # a knockout never trained on, of one of the model's genes
    plain = dataclasses.replace(base, response=None)  # a checkpoint that keeps no covariance
    other, name = plain.delta_for(f"ko:{unseen}")
    assert name == "pertmean"
    np.testing.assert_allclose(other, base.delta.mean(0), atol=1e-6)
    assert base.delta_for("drug:nothing")[1] == "pertmean"  # not genetic: no gene to move with
    assert base.delta_for("control")[1] == "none" and not base.delta_for("control")[0].any()


def test_the_served_coexpression_baseline_is_the_evaluated_one(tiny_model):
    """One context, every axis of the covariance kept: the checkpoint's coexpression baseline of a knockout never
    trained on is what ``evaluate``'s ``coexpression`` predicts from the same training cells."""
    from virtualcell.evaluate import baselines as B
    from virtualcell.validation import covariance_factor

    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    base = Baselines.fit(data, contract, model)
    X, _ = vc.sentences.model_expression(data, model.genes)
    exact = dataclasses.replace(base, response=covariance_factor(X, contract.contexts(data), rank=10_000))
    trained = {q.split(":")[-1] for q in base.names}
    unseen = [g for g in model.genes.genes if g not in trained][:3]
    pred = B.coexpression(data, targets=[(g, "all") for g in unseen], max_cells=None)
    lab = pred.obs[contract.perturbation_key].astype(str).to_numpy()
    key = vc.sentences.gene_match_key
    order = pd.Index([key(g) for g in pred.var_names]).get_indexer([key(g) for g in model.genes.genes])
    assert (order >= 0).all()
    for g in unseen:
        want = (pred.X[lab == g].mean(0) - pred.X[lab == "control"].mean(0))[order]
        got, name = exact.delta_for(f"ko:{g}")
        assert name == "coexpression"
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    # the kept factor (at most RESPONSE_RANK_DEFAULT axes) is close to it
    got = np.stack([base.delta_for(f"ko:{g}")[0] for g in unseen])
    want = np.stack([exact.delta_for(f"ko:{g}")[0] for g in unseen])
    assert np.corrcoef(got.ravel(), want.ravel())[0, 1] > 0.99


# --------------------------------------------------------------------------- the checkpoint
def test_fit_writes_the_verdict_and_load_reads_it(tiny_model):
    model, folder, _ = tiny_model
    assert (folder / "verdict.json").exists() and (folder / "baselines.npz").exists()
    verdict = json.loads((folder / "verdict.json").read_text())
    assert model.verdict == verdict and model.baselines is not None
    # the guidance scales, then the best of them again with 4 samples per cell, then the best so far at lower
    # temperatures; the lowest error is kept
    tried, n = [c["settings"] for c in verdict["candidates"]], len(GUIDANCE_CANDIDATES)

    def best(upto: int) -> dict:
        return min(verdict["candidates"][:upto], key=lambda c: c["model"]["mse"])["settings"]

    assert tried[:n] == [{"guidance": g} for g in GUIDANCE_CANDIDATES]
    assert tried[n] == best(n) | {"samples": 4}
    assert tried[n + 1:] == [best(n + 1) | {"temperature": t} for t in TINY.verdict_temperatures if t != 1.0]
    assert len(tried) == n + 3
    assert verdict["settings"] == min(verdict["candidates"], key=lambda c: c["model"]["mse"])["settings"]
    assert 0.0 <= verdict["weight"] <= 1.0 and all(c["seconds"] > 0 for c in verdict["candidates"])
    # each candidate's MSE carries the sampling noise of its mean delta, measured from its cell buckets
    assert all(0.0 <= c["model"]["noise"] < np.inf for c in verdict["candidates"])
    for who in ("model", "baseline", "blend"):
        assert set(verdict[who]) >= {"pearson_delta", "pearson_delta_top50", "mse"}
    assert verdict["blend"]["mse"] <= min(verdict["model"]["mse"], verdict["baseline"]["mse"]) + 1e-9
    assert verdict["n_labels"] > 0 and verdict["n_cells"] > 0
    assert verdict["summary"].startswith(f"Validation (held-out cells of {verdict['n_labels']} training perturbations")
    assert f"w={verdict['weight']:.2f}" in verdict["summary"]
    # how sure the split is of the comparison: the MSE difference with its interval, in the record and the words
    diff = verdict["difference"]
    assert diff["rows"] == verdict["n_targets"] and diff["low"] <= diff["high"]
    # judged on deltas whose setting was chosen on the other half of the perturbations (several were tried)
    assert diff["crossfitted"] and diff["perturbations"] == verdict["n_labels"]
    assert "each half's generation setting chosen on the other half" in verdict["summary"]
    assert f"{diff['low']:+.4f} to {diff['high']:+.4f}" in verdict["summary"]
    settled = diff["high"] < 0 or diff["low"] > 0
    assert ("neither is clearly better" in verdict["summary"]) == (not settled)
    # the codec's limit: the training effects through the model's sentences, on the same held-out cells
    assert set(verdict["codec"]) >= {"pearson_delta", "pearson_delta_top50", "mse"}
    assert verdict["codec"]["top_k"] == model.top_k == TINY.top_k
    assert f"Through its {model.top_k}-gene sentences" in verdict["summary"]
    # ... decoded each way, and each way through both kinds of gene map: the decode with the lower codec MSE is the
    # model's, saved with its rank fit (and its map, when it has one, of the kind chosen)
    assert set(verdict["decode"]) == {"linear", "table", "linear+map", "table+map", "linear+residual map",
                                      "table+residual map"}
    chosen = min(verdict["decode"], key=lambda m: verdict["decode"][m]["mse"])
    assert chosen == verdict["codec"]["decode"] and model.rank_fit.method == chosen.split("+")[0]
    assert (model.gene_map is not None) == chosen.endswith("map")
    assert model.gene_map is None or model.gene_map.residual == chosen.endswith("residual map")
    assert verdict["codec"]["mse"] == verdict["decode"][chosen]["mse"]
    assert f"Decode chosen on it: {chosen}" in verdict["summary"]
    loaded = vc.C2SModel.load(folder)
    assert loaded.rank_fit.method == model.rank_fit.method
    assert (loaded.gene_map is None) == (model.gene_map is None)
    if model.gene_map is not None:
        assert np.array_equal(loaded.gene_map.right, model.gene_map.right)


def test_codec_baselines_lose_what_the_sentences_leave_out(tiny_model):
    """Baselines fitted on the training cells as the codec gives them back (the verdict's ``codec``) follow the
    measured ones more closely the more genes each sentence keeps."""
    from virtualcell.sentences import roundtrip

    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    measured = Baselines.fit(data, contract, model)

    def agreement(top_k: int | None) -> float:
        codec = Baselines.fit(roundtrip(data, top_k=top_k, seed=0), contract, model)
        assert codec.names == measured.names and codec.genes == measured.genes
        return float(np.corrcoef(codec.delta.ravel(), measured.delta.ravel())[0, 1])

    short, every = agreement(3), agreement(None)
    assert every > 0.8 and every > short + 0.1, (short, every)


def test_verdict_keeps_the_candidate_settings_with_the_lowest_model_error(tiny_model):
    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    held = data[verdict_split(data, contract, TINY)]
    verdict = run_verdict(model, held, contract, seed=0, candidates=[{}, {"temperature": 0.3}])
    errors = [c["model"]["mse"] for c in verdict["candidates"]]
    assert errors[0] != errors[1]  # the settings change the prediction
    assert verdict["settings"] == [{}, {"temperature": 0.3}][int(np.argmin(errors))]
    assert verdict["model"]["mse"] == min(errors)


def test_verdict_ignores_the_settings_an_earlier_verdict_chose(tiny_model):
    """A candidate that leaves samples or guidance out is scored with the plain value (1), not with
    what the checkpoint's own verdict chose: judging a model again gives the same scores."""
    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    held = data[verdict_split(data, contract, TINY)]
    kept = model.verdict
    model.verdict = dict(kept) | {"settings": {"samples": 3}}  # as if the training run had chosen 3 samples
    try:
        assert vc.Simulator(held[:4], model).sample_count() == 3
        again = run_verdict(model, held, contract, seed=0, candidates=[{}], samples=(1,))
    finally:
        model.verdict = kept
    plain = run_verdict(model, held, contract, seed=0, candidates=[{"samples": 1, "guidance": 1.0}])
    assert again["candidates"][0]["model"] == plain["candidates"][0]["model"]
    assert len(plain["candidates"]) == 1  # a candidate that sets samples is not tried with more


def test_the_simulator_samples_at_the_temperature_the_verdict_chose(tiny_model):
    """``temperature=None`` (what screen and predict pass) is the verdict's choice, 1 where it chose none; an
    explicit one wins, and the prediction records which it used."""
    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:6].copy(), model)
    kept = model.verdict
    try:
        model.verdict = dict(kept) | {"settings": {}}
        plain = sim.simulate(["STAT1"], progress=False, blend=None, seed=3)
        model.verdict = dict(kept) | {"settings": {"temperature": 0.5}}
        chosen = sim.simulate(["STAT1"], progress=False, blend=None, seed=3)
        asked = sim.simulate(["STAT1"], progress=False, blend=None, seed=3, temperature=1.0)
    finally:
        model.verdict = kept
    assert plain.aggregates.attrs["temperature"] == asked.aggregates.attrs["temperature"] == 1.0
    assert chosen.aggregates.attrs["temperature"] == 0.5
    np.testing.assert_array_equal(plain.aggregates["delta"].values, asked.aggregates["delta"].values)
    assert not np.array_equal(plain.aggregates["delta"].values, chosen.aggregates["delta"].values)


def test_old_checkpoint_without_verdict_still_simulates(tiny_model, tmp_path):
    model, folder, data = tiny_model
    old = tmp_path / "old"
    shutil.copytree(folder, old, ignore=shutil.ignore_patterns("last", "verdict.json", "baselines.npz"))
    m = vc.C2SModel.load(old)
    assert m.verdict is None and m.baselines is None
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:6].copy(), m)
    res = sim.simulate(["STAT1"], progress=False)  # blend="auto": the pure model
    assert res.aggregates.attrs["blend_weight"] == 1.0 and res.aggregates.attrs["baseline"] == "none"
    np.testing.assert_array_equal(res.aggregates["delta"].values, res.aggregates["delta_model"].values)
    with pytest.raises(ScreenError, match="baselines"):
        sim.simulate(["STAT1"], progress=False, blend=0.5)
    bundled = vc.model.bundled()  # retrained with its recorded command: it has both
    assert bundled.verdict is not None and bundled.baselines is not None


# --------------------------------------------------------------------------- the served blend
def _calibrated_by_hand(x, delta):
    """x + delta clipped at 0, each gene rescaled to the unclipped mean (Simulator's calibration)."""
    r = x + delta
    clipped = np.maximum(r, 0)
    m = clipped.mean(0)
    return clipped * np.divide(np.maximum(r.mean(0), 0), m, out=np.zeros_like(m), where=m > 0)


def test_blend_is_arithmetic_on_one_generation(tiny_model, tmp_path):
    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:8].copy(), model)
    perts = ["STAT1", "IFNGR1+IRF1"]
    pure = sim.simulate(perts, progress=False, blend=None, keep_cells=True)
    raw = sim.simulate(["control", *perts], progress=False, calibrate=False, keep_cells=True).cells.values
    d_ctrl, d = raw[0], raw[1:]  # the mean decoded control samples, and each perturbation's decoded cells
    x = sim.expression[:8].toarray()
    b = np.stack([model.baselines.delta_for(p)[0] for p in model.resolve(perts)])
    for w in (0.0, 0.5, 1.0):
        res = sim.simulate(perts, progress=False, blend=w, keep_cells=True)
        # the pure model's aggregates come from the same generated cells as the served ones
        np.testing.assert_allclose(res.aggregates["delta_model"].values, pure.aggregates["delta"].values, atol=1e-5)
        served, P = res.cells.values, pure.cells.values
        assert res.aggregates.attrs["blend_weight"] == w
        if w == 1.0:
            np.testing.assert_array_equal(served, P)
            assert res.cells_model is None  # nothing blended: the cells are the pure model's
            assert res.aggregates.attrs["baseline"] == "none"  # ... and no baseline is in them
        else:  # ... and its cells too, kept beside the served ones
            np.testing.assert_allclose(res.cells_model.values, P, atol=1e-6)
            np.testing.assert_allclose(res.to_anndata(pure=True).X, pure.to_anndata().X, atol=1e-6)
            assert res.to_anndata(pure=True).uns["virtualcell"]["blend_weight"] == 1.0
            written = anndata.read_h5ad(res.write_h5ad(tmp_path / f"pure{w}.h5ad", pure=True))  # the same, written
            np.testing.assert_allclose(written.X, pure.to_anndata().X, atol=1e-6)
            assert written.uns["virtualcell"]["baseline"] == "none"
        for j in range(len(perts)):
            want = _calibrated_by_hand(x, w * (d[j] - d_ctrl) + (1 - w) * b[j])
            np.testing.assert_allclose(served[j], want, atol=1e-4)
    auto = sim.simulate(perts, progress=False)
    assert auto.aggregates.attrs["blend_weight"] == pytest.approx(model.verdict["weight"])
    assert auto.aggregates.attrs["baseline"] == "additive;meanshift"
    with pytest.raises(ScreenError, match="outside"):
        sim.simulate(perts, progress=False, blend=1.5)


def test_screen_ranks_the_served_blend_beside_the_pure_model(tiny_model, tmp_path):
    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:8].copy(), model)
    res = sim.screen(["STAT1", "JAK2"], out=tmp_path / "s", progress=False, n_boot=10, blend=0.0)
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert config["blend_weight"] == 0.0 and res.ranking.attrs["virtualcell"]["blend_weight"] == 0.0
    pure = sim.screen(["STAT1", "JAK2"], out=tmp_path / "p", progress=False, n_boot=10, blend=None)
    assert json.loads((tmp_path / "p" / "config.json").read_text())["blend_weight"] is None
    a = res.ranking.set_index("perturbation")
    p = pure.ranking.set_index("perturbation")
    np.testing.assert_allclose(a.loc[p.index, "l2_delta_corrected_model"], p["l2_delta_corrected"], rtol=1e-5)
    np.testing.assert_allclose(p["l2_delta_corrected_model"], p["l2_delta_corrected"])


def test_cli_prints_the_verdict_and_the_weight(tiny_model, tmp_path, capsys):
    from virtualcell.cli import main

    model, folder, data = tiny_model
    base = tmp_path / "base.h5ad"
    data[data.obs.perturbation == "control"][:6].copy().write_h5ad(base)
    assert main(["predict", "--model", str(folder), "--data", str(base), "--perturbations", "STAT1",
                 "--out", str(tmp_path / "p.h5ad")]) == 0
    out = capsys.readouterr().out
    assert model.verdict["summary"] in out and f"weight {model.verdict['weight']:.2f}" in out
    assert main(["predict", "--model", str(folder), "--data", str(base), "--perturbations", "STAT1",
                 "--blend", "none", "--out", str(tmp_path / "q.h5ad")]) == 0
    assert "served: the pure model" in capsys.readouterr().out
    panel = tmp_path / "panel.txt"
    panel.write_text("STAT1\nJAK2\n")
    old = tmp_path / "old"  # a checkpoint from before the verdict
    shutil.copytree(folder, old, ignore=shutil.ignore_patterns("last", "verdict.json", "baselines.npz"))
    assert main(["screen", "--model", str(old), "--data", str(base), "--panel", str(panel),
                 "--n-cells", "4", "--out", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "no validation verdict in this checkpoint" in out and "served: the pure model" in out
    with pytest.raises(SystemExit):
        main(["predict", "--model", str(folder), "--data", str(base), "--perturbations", "STAT1", "--blend", "2",
              "--out", str(tmp_path / "r.h5ad")])
    capsys.readouterr()
    assert main(["train", "--data", str(base), "--perturbation-key", "perturbation", "--control", "control",
                 "--verdict-fraction", "0.9", "--out", str(tmp_path / "m")]) == 2
    assert "verdict_fraction must be in [0, 0.5]" in capsys.readouterr().err


# --------------------------------------------------------------------------- perturbations never trained on
def test_unseen_labels_are_single_genetic_perturbations_of_measured_genes_held_out_whole(papalexi_small, caplog):
    from virtualcell.perturbations import parse
    from virtualcell.train import unseen_labels

    data, contract = papalexi_small, DataContract(perturbation_key="perturbation", control="control")
    cfg = TrainConfig(seed=0, unseen_fraction=0.2)
    unseen = unseen_labels(data, contract, cfg)
    assert unseen == unseen_labels(data, contract, cfg)  # seeded
    assert unseen != unseen_labels(data, contract, TrainConfig(seed=1, unseen_fraction=0.2))
    assert unseen_labels(data, contract, TrainConfig(seed=0)) == {}  # none unless asked
    assert unseen_labels(data, contract, TrainConfig(seed=0, unseen_fraction=0.2, verdict_fraction=0.0)) == {}
    labels = contract.conditions(data)
    n_perturbations = len(set(labels) - {"control"})
    assert 2 <= len(unseen) <= round(0.2 * n_perturbations)
    genes = {g.upper() for g in data.var_names}
    for label, form in unseen.items():  # only what a model can name untrained: a knockout of a measured gene
        q = parse(form)
        assert q.kind == "knockout" and q.target == label.upper() in genes and (labels == label).sum() >= 20
    held = verdict_split(data, contract, cfg, unseen)
    whole = np.isin(labels, list(unseen))
    assert held[whole].all()  # every cell of theirs leaves training
    assert (held & ~whole & ~contract.is_control(data)).any()  # ... beside the held-out cells of the others
    with caplog.at_level("WARNING"):  # nothing a model could name untrained: no unseen verdict, and it says why
        assert unseen_labels(data, contract, TrainConfig(seed=0, unseen_fraction=0.2, kind="drug")) == {}
    assert "can be held out whole" in caplog.text
    with pytest.raises(TrainingError, match="unseen_fraction must be in"):
        TrainConfig(unseen_fraction=0.7)


def test_pertmean_without_some_perturbations():
    b = Baselines(("A", "B"), ("ko:X", "ko:Y", "drug:d@10"), np.array([[1.0, 0.0], [3.0, 2.0], [5.0, 4.0]]))
    np.testing.assert_allclose(b.pertmean_without(["ko:Y"]), [3.0, 2.0])
    np.testing.assert_allclose(b.pertmean_without(["drug:d"]), [2.0, 1.0])  # doses ignored
    np.testing.assert_allclose(b.pertmean_without([]), b.pertmean)


def test_a_run_with_unseen_fraction_judges_and_serves_perturbations_it_never_saw(papalexi, tmp_path):
    from dataclasses import replace

    from virtualcell.cli import _verdict_text
    from virtualcell.train import rejudge, train

    rng = np.random.default_rng(0)
    data = papalexi[np.sort(rng.choice(papalexi.n_obs, 1200, replace=False))].copy()
    model = train(data, out=tmp_path / "m", config=replace(TINY, unseen_fraction=0.2), progress=False)
    verdict = model.verdict
    unseen = verdict["unseen"]["perturbations"]
    assert len(unseen) >= 2 and unseen == model.train_config["unseen_labels"]
    assert not set(unseen) & set(model.perturbations.labels)  # never trained on
    assert not set(unseen) & set(verdict["perturbations"])  # ... and judged apart from the trained ones
    # the served baselines know their measured effects; the verdict's baseline (coexpression: knockouts of measured
    # genes, fitted without them) did not
    assert all(model.baselines.delta_for(f"ko:{g}")[1] == "meanshift" for g in unseen)
    part = verdict["unseen"]
    assert part["baseline"]["name"] == "coexpression" and 0.0 <= part["weight"] <= 1.0
    assert part["difference"]["rows"] == part["n_labels"] == len(unseen)
    assert part["blend"]["mse"] <= min(part["model"]["mse"], part["baseline"]["mse"]) + 1e-9
    assert part["summary"] in verdict["summary"] and "held out of training whole" in part["summary"]
    assert model.train_config["verdict_weight_unseen"] == part["weight"]
    assert f"{part['weight']:.2f} for perturbations no training cell measured" in _verdict_text(
        verdict, verdict["weight"], part["weight"])
    # the Simulator serves their weight for a perturbation whose baseline is one for the unseen, the other for the rest
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:8].copy(), model)
    w, w_u = verdict["weight"], part["weight"]
    assert sim.unseen_weight("auto") == pytest.approx(w_u) and sim.unseen_weight(0.5) == 0.5
    assert sim.unseen_weight(None) is None
    never = next(g for g in data.var_names if g.upper() not in set(data.obs.perturbation.astype(str)))
    perts = ["STAT3" if "STAT3" in model.perturbations.labels else sorted(model.perturbations.labels)[0], f"ko:{never}"]
    raw = sim.simulate(["control", *perts], progress=False, calibrate=False, keep_cells=True).cells.values
    res = sim.simulate(perts, progress=False, keep_cells=True)
    x = sim.expression[:8].toarray()
    typed = model.resolve(perts)
    assert [model.baselines.delta_for(p)[1] for p in typed] == ["meanshift", "coexpression"]
    for j, weight in enumerate((w, w_u)):
        b = model.baselines.delta_for(typed[j])[0]
        want = _calibrated_by_hand(x, weight * (raw[1 + j] - raw[0]) + (1 - weight) * b)
        np.testing.assert_allclose(res.cells.values[j], want, atol=1e-4)
    assert res.aggregates.attrs["blend_weight"] == pytest.approx(w)
    if w_u != w:
        assert res.aggregates.attrs["blend_weight_unseen"] == pytest.approx(w_u)
    # a screen serves the same weights, one perturbation per group: it passed simulate the trained ones' weight
    # resolved, which served it to the never-trained knockout too, and kept the first group's attributes (the cells
    # themselves may differ by a sampled token: a batch of one perturbation rounds otherwise than one of two)
    screened = sim.screen(perts, out=tmp_path / "s", group_size=1, progress=False, n_boot=5).aggregates
    for key in ("baseline", "blend_weight_unseen"):
        assert screened.attrs.get(key) == res.aggregates.attrs.get(key), key
    # every group's genes generated (each group's control samples too), not the first group's
    assert screened.attrs["generated_genes"] > res.aggregates.attrs["generated_genes"]
    # judged again from the recorded run: the same perturbations held out whole
    assert rejudge(model, data)["unseen"]["perturbations"] == unseen


def test_a_verdict_of_unseen_perturbations_alone_says_so(tiny_model):
    """When every perturbation with held-out cells is one never trained on, the verdict is theirs: judged
    against pertmean, and its summary does not call them training perturbations."""
    from virtualcell.train import verdict_split

    model, _, data = tiny_model
    contract = model.contract
    held = data[verdict_split(data, contract, TINY)]
    perts = sorted(set(contract.conditions(held)) - {contract.control})[:3]
    held = held[np.isin(contract.conditions(held), [*perts, contract.control])].copy()
    unseen = {p: model.perturbations.trained_form(p) for p in perts}  # read as never trained on
    verdict = run_verdict(model, held, contract, seed=0, unseen=unseen)
    assert verdict["baseline"]["name"] == "pertmean" and verdict["unseen"]["weight"] == verdict["weight"]
    assert verdict["summary"].startswith(f"Validation ({len(perts)} perturbations held out of training whole")
    assert "training perturbations" not in verdict["summary"]


@pytest.fixture(scope="module")
def two_contexts():
    """A small synthetic screen in two cell types: knockouts measured in both."""
    data = vc.datasets.synthetic_screen(n_genes=60, n_tfs=8, n_knockouts=6, n_drugs=0, n_cytokines=0,
                                        n_cells_per_condition=40, n_control_cells=120, seed=0)
    return data, DataContract.from_adata(data)


def test_a_context_is_held_out_whole_only_when_asked(two_contexts):
    from virtualcell.train import verdict_context

    data, contract = two_contexts
    assert verdict_context(data, contract, TrainConfig()) is None  # off by default
    cfg = TrainConfig(context_verdict=True)
    chosen = verdict_context(data, contract, cfg)
    assert chosen in set(contract.contexts(data)) and chosen == verdict_context(data, contract, cfg)  # seeded
    assert verdict_context(data, contract, TrainConfig(context_verdict=True, verdict_fraction=0.0)) is None
    held = verdict_split(data, contract, cfg, context=chosen)
    there, control = contract.contexts(data) == chosen, contract.is_control(data)
    assert held[there & ~control].all()  # every perturbed cell of the context
    assert held[there & control].any() and not held[there & control].all()  # some of its controls: inputs, reference
    assert not held[~there & ~control].all()  # the other context trains
    # one context only: nothing to transfer from, so none is held out (and the run says so)
    alone = data[contract.contexts(data) == chosen].copy()
    assert verdict_context(alone, contract, cfg) is None


def test_the_verdict_judges_a_context_held_out_whole_apart(two_contexts, tmp_path, caplog, capsys):
    from virtualcell.cli import main

    data, contract = two_contexts
    data.write_h5ad(tmp_path / "screen.h5ad")
    assert main(["train", "--data", str(tmp_path / "screen.h5ad"), "--perturbation-key", "perturbation",
                 "--control", "control", "--context-key", "cell_type", "--context-verdict", "--top-k", "30",
                 "--hidden-size", "32", "--layers", "2", "--heads", "2", "--max-steps", "12", "--batch-size", "8",
                 "--verdict-samples", "1", "--verdict-temperatures", "1", "--out", str(tmp_path / "m")]) == 0
    model = vc.C2SModel.load(tmp_path / "m")
    assert model.train_config["context_verdict"] is True
    part = model.verdict["new_context"]
    assert part["context"] in set(contract.contexts(data)) and part["n_labels"] >= 1
    assert part["baseline"]["name"] == "meanshift" and 0.0 <= part["weight"] <= 1.0
    assert "held out of training whole" in model.verdict["summary"] and "not what predictions are served" in part["summary"]
    # the verdict proper is still the trained contexts' (its weight is the one served), even to that context's cells
    there = data[(contract.contexts(data) == part["context"]) & contract.is_control(data)][:4].copy()
    assert vc.Simulator(there, model).blend_weight() == model.verdict["weight"]
    assert part["served"] is False
    # the checkpoint records that the context was never trained perturbed, and a prediction there says so, once
    trained = model.trained_contexts
    assert trained[part["context"]]["perturbed"] == 0 < trained[part["context"]]["control"]
    (elsewhere,) = set(trained) - {part["context"]}
    assert trained[elsewhere]["perturbed"] > 0
    sim = vc.Simulator(there, model)
    assert sim.new_contexts() == [part["context"]]
    with caplog.at_level("WARNING"):
        first = sim.simulate(model.perturbations.trained()[:1], progress=False)
        sim.simulate(model.perturbations.trained()[:1], progress=False)
    assert caplog.text.count("never saw perturbed") == 1 and part["context"] in caplog.text
    assert first.aggregates.attrs["new_contexts"] == part["context"]
    assert first.to_anndata().uns["virtualcell"]["new_contexts"] == part["context"]
    home = data[(contract.contexts(data) == elsewhere) & contract.is_control(data)][:4].copy()
    assert vc.Simulator(home, model).new_contexts() == []
    bare = home.copy()
    del bare.obs["cell_type"]  # no context column: nothing can tell, and the run says that instead
    with caplog.at_level("WARNING"):
        vc.Simulator(bare, model).simulate(model.perturbations.trained()[:1], progress=False)
    assert "baseline cells have no such column" in caplog.text
    # and the model's card shows both, beside the verdict's part on the held-out context
    capsys.readouterr()
    assert main(["info", "--model", str(tmp_path / "m")]) == 0
    text = capsys.readouterr().out
    assert (f"seen perturbed: {elsewhere!r}; controls only: {part['context']!r} (perturbed cells held out for the "
            "context verdict);") in text and "new context" in text
    assert main(["info", "--model", str(tmp_path / "m"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["contexts"] == trained and card["verdict"]["new_context"]["weight"] == part["weight"]
    # judged again without training: the same context is found again from the run's record
    assert main(["verdict", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "screen.h5ad"),
                 "--verdict-samples", "1", "--verdict-temperatures", "1"]) == 0
    assert vc.C2SModel.load(tmp_path / "m").verdict["new_context"]["context"] == part["context"]


def test_a_verdict_with_no_other_context_to_judge_is_the_held_out_context_s(two_contexts, tmp_path):
    """Where only the context held out whole has enough control cells for the verdict, its rows are the verdict
    proper (its weight, the only one there is, is served), named as that context's, not as trained contexts'."""
    from virtualcell.train import train

    data, contract = two_contexts
    ctx, control = contract.contexts(data), contract.is_control(data)
    other = sorted(set(ctx))[1]
    keep = ~((ctx == other) & control) | (np.cumsum((ctx == other) & control) <= 30)  # 30 controls: no verdict there
    data = data[keep].copy()
    cfg = dataclasses.replace(TINY, context_verdict=True, verdict_samples=(1,), verdict_temperatures=(1.0,))
    model = train(data, out=tmp_path / "m", contract=contract, config=cfg, progress=False)
    part = model.verdict["new_context"]
    assert part["context"] == sorted(set(ctx))[0] and part["served"] is True
    assert model.verdict["summary"].startswith(part["summary"])  # a summary, as the reported part has, which is the verdict's
    assert part["weight"] == model.verdict["weight"]
    assert model.verdict["summary"].startswith(f"Validation (context {part['context']!r} held out of training whole")
    assert model.verdict["summary"].count("held out of training whole") == 1


def test_small_contexts_still_get_a_verdict_and_none_at_all_is_said_at_train(tmp_path, caplog):
    """Patient x cell-type contexts often have fewer than 40 control cells each: the verdict then holds out of those
    with 16, rather than none (which served the pure model unjudged); below that, training says why there is none."""
    from virtualcell.train import train

    data = vc.datasets.synthetic_screen(n_genes=40, n_tfs=6, n_knockouts=3, n_drugs=0, n_cytokines=0, n_contexts=2,
                                        n_cells_per_condition=30, n_control_cells=30, seed=0)
    contract = DataContract.from_adata(data)
    cfg = dataclasses.replace(TINY, verdict_samples=(1,), verdict_temperatures=(1.0,))
    held = verdict_split(data, contract, cfg)
    assert held[contract.is_control(data)].sum() == 2 * 8 and held[~contract.is_control(data)].any()
    model = train(data, out=tmp_path / "m", contract=contract, config=cfg, progress=False)
    assert model.verdict is not None and model.verdict["n_contexts"] == 2
    control = contract.is_control(data)
    few = data[~control | (np.cumsum(control) % 3 == 0)].copy()  # 10 controls a context
    with caplog.at_level("WARNING"):
        bare = train(few, out=tmp_path / "m2", contract=contract, config=cfg, progress=False)
    assert bare.verdict is None
    assert "No validation verdict: no context has 16 control cells (the most: 10 in" in caplog.text
    assert "serve the pure model" in caplog.text
    # perturbations of 12 cells a context (none has 20): 10 is enough
    thin = vc.datasets.synthetic_screen(n_genes=40, n_tfs=6, n_knockouts=3, n_drugs=0, n_cytokines=0, n_contexts=2,
                                        n_cells_per_condition=12, n_control_cells=30, seed=0)
    assert verdict_split(thin, contract, cfg)[~contract.is_control(thin)].any()
    assert train(thin, out=tmp_path / "m3", contract=contract, config=cfg, progress=False).verdict is not None


def test_a_screen_warns_when_unseen_perturbations_get_the_trained_ones_weight(tiny_model, tmp_path, caplog):
    model, _, data = tiny_model
    assert "unseen" not in model.verdict
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:6].copy(), model)
    never = next(g for g in data.var_names if g.upper() not in set(data.obs.perturbation.astype(str)))
    with caplog.at_level("WARNING"):
        sim.screen(["STAT1", f"ko:{never}"], out=tmp_path / "s", progress=False, n_boot=0, blend=0.5)
    assert "1 of the panel's perturbations was never trained on" in caplog.text and "--unseen-fraction" in caplog.text


def test_the_verdict_time_is_reserved_inside_max_minutes(tiny_model, tmp_path):
    from dataclasses import replace

    from virtualcell.train import train
    from virtualcell.validation import verdict_seconds

    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    held = data[verdict_split(data, contract, TINY)]
    candidates = [{"guidance": g} for g in GUIDANCE_CANDIDATES]
    assert verdict_seconds(model, held, contract, candidates=candidates) > 0
    assert verdict_seconds(model, held[contract.is_control(held)], contract, candidates=candidates) == 0.0  # nothing to judge
    # the budget holds the set-up, which took 17.7 s and 47.6 s on a machine other processes were loading (a budget
    # it leaves too little of is refused by name): a longer one is tried where that is why it was refused
    from virtualcell.errors import TrainingError

    for budget in (30.0, 120.0):
        cfg = replace(TINY, max_steps=100_000, eval_every=10_000, save_every=10_000, max_minutes=budget / 60)
        try:
            trained = train(data, out=tmp_path / f"m{budget:g}", config=cfg, progress=False)
            break
        except TrainingError as err:
            if "setting up took" not in str(err) or budget == 120.0:
                raise
    run = trained.train_config
    reserved = run["verdict_reserved_s"]
    assert 0 < reserved <= budget / 2  # at most half of the budget
    last = run["history"][-1]["elapsed_s"]
    assert last <= budget - reserved + 2.0  # the steps stopped in time to leave the verdict its share
    assert run["verdict_seconds"] > 0 and trained.verdict is not None


def test_one_stalled_probe_does_not_inflate_the_verdict_reserve(tiny_model, monkeypatch):
    """A probe that stalls once (another process on the cores) must not be scaled up into the reserve: each
    candidate's probe runs twice and the faster run counts. Timed on a clock that each generation moves by 1 s
    (the stalled one by 4 s), so the comparison does not depend on the machine's load."""
    import types

    import virtualcell.validation as validation
    from virtualcell.validation import verdict_seconds

    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    held = data[verdict_split(data, contract, TINY)]
    simulate, calls, clock = vc.Simulator.simulate, [], [0.0]

    def one_second_each(self, *args, **kwargs):
        calls.append(1)
        clock[0] += 1.0
        return simulate(self, *args, **kwargs)

    def stalls_once(self, *args, **kwargs):
        calls.append(1)
        clock[0] += 4.0 if len(calls) == 1 else 1.0
        return simulate(self, *args, **kwargs)

    monkeypatch.setattr(validation, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    monkeypatch.setattr(vc.Simulator, "simulate", one_second_each)
    calm = verdict_seconds(model, held, contract)
    monkeypatch.setattr(vc.Simulator, "simulate", stalls_once)
    calls.clear()
    stalled = verdict_seconds(model, held, contract)
    assert len(calls) == 2  # one candidate, probed twice
    assert stalled == pytest.approx(calm) and calm > 0  # the stall (times the verdict's rows over the probe's) is not in it
    with pytest.raises(ValueError, match="repeats"):
        verdict_seconds(model, held, contract, repeats=0)
    # the temperatures are reserved for at the most samples, with no probe of their own (a row costs the same)

    def one_second_each(self, *args, **kwargs):
        calls.append(1)
        clock[0] += 1.0
        return simulate(self, *args, **kwargs)

    monkeypatch.setattr(vc.Simulator, "simulate", one_second_each)
    calls.clear()
    plain = verdict_seconds(model, held, contract, samples=(1, 4))
    probed = len(calls)
    with_temperatures = verdict_seconds(model, held, contract, samples=(1, 4), temperatures=(1.0, 0.8, 0.6))
    assert len(calls) == 2 * probed and with_temperatures > 1.5 * plain


def test_the_reserve_prices_the_later_stages_at_the_costliest_candidate(tiny_model, monkeypatch):
    """The samples and temperature stages run on whichever candidate wins, so they are priced at the costliest one
    (a guided candidate's rows cost twice a plain one's here), and the temperatures at the most samples."""
    import time

    from virtualcell.validation import verdict_seconds

    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    held = data[verdict_split(data, contract, TINY)]

    def rows_cost(self, *args, samples=1, guidance=1.0, **kwargs):  # seconds in proportion to the rows, and no work
        time.sleep(0.1 * samples * (2 if guidance > 1 else 1))

    monkeypatch.setattr(vc.Simulator, "simulate", rows_cost)
    unit = verdict_seconds(model, held, contract, candidates=[{"guidance": 1.0}], samples=(1,), repeats=1)
    full = verdict_seconds(model, held, contract, candidates=[{"guidance": 1.0}, {"guidance": 4.0}], samples=(1, 4),
                           temperatures=(1.0, 0.8), repeats=1)
    # guidance 1 (1) + guidance 4 (2) + 4 samples at guidance 4's cost (8) + temperature 0.8 there (8)
    assert full == pytest.approx(19 * unit, rel=0.15)


# --------------------------------------------------------------------------- the verdict again (virtualcell verdict)
def test_verdict_command_judges_a_checkpoint_again_on_its_own_training_data(tiny_model, tmp_path, capsys):
    """``virtualcell verdict`` finds the run's held-out cells again (seed, fraction, holdout, checked by the data
    hash), rewrites the verdict in place with the old one kept, and tries other samples per cell when asked."""
    from virtualcell.cli import main

    model, folder, data = tiny_model
    ckpt = tmp_path / "model"
    shutil.copytree(folder, ckpt)
    path = tmp_path / "data.h5ad"
    data.write_h5ad(path)
    old = json.loads((ckpt / "verdict.json").read_text())
    before = vc.C2SModel.load(ckpt).baselines
    dataclasses.replace(before, response=None).save(ckpt / "baselines.npz")  # as an older version wrote them
    meta = json.loads((ckpt / "virtualcell.json").read_text())  # (which recorded no digests of its verdict files)
    meta.pop("verdict_files")
    (ckpt / "virtualcell.json").write_text(json.dumps(meta))
    assert vc.C2SModel.load(ckpt).baselines.response is None  # the old baselines are read, not set aside
    assert main(["verdict", "--model", str(ckpt), "--data", str(path), "--verdict-samples", "1,2"]) == 0
    out = capsys.readouterr().out
    assert "before: " in out and "now: " in out and "previous-verdict.json" in out
    assert out.count("<- chosen") == 1 and "samples 2" in out  # what was tried, and which was kept
    assert json.loads((ckpt / "previous-verdict.json").read_text()) == old
    # no lock file of the verdict's left behind (the folder's own marker and lock are the training run's)
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith(".")
                  and p.name not in (".virtualcell", ".virtualcell.lock")) == []
    new = vc.C2SModel.load(ckpt)
    # the same held-out cells and perturbations, judged by the same code: the same scores of the guidance scales
    assert new.verdict["perturbations"] == old["perturbations"] and new.verdict["n_cells"] == old["n_cells"]
    n = len(GUIDANCE_CANDIDATES)
    for a, b in zip(old["candidates"][:n], new.verdict["candidates"][:n]):
        assert a["settings"] == b["settings"]
        assert a["model"]["mse"] == pytest.approx(b["model"]["mse"], rel=0.05)
    # ... and the samples asked for, recorded with the checkpoint (then the temperatures, at the samples chosen)
    assert new.verdict["candidates"][n]["settings"].get("samples") == 2
    assert all("temperature" in c["settings"] for c in new.verdict["candidates"][n + 1:])
    assert new.train_config["verdict_samples"] == [1, 2]
    assert new.train_config["verdict_temperatures"] == list(TINY.verdict_temperatures)
    assert new.train_config["data_hash"] == model.train_config["data_hash"]
    assert (ckpt / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    # the baselines fitted again as training fits them today: the same deltas, and the covariance they lacked
    assert new.baselines.names == before.names and np.array_equal(new.baselines.delta, before.delta)
    F, F0 = new.baselines.response, before.response  # (compared as the covariance: an axis' sign is arbitrary)
    assert F is not None and np.allclose(F @ F.T, F0 @ F0.T, atol=1e-5)
    # into a copy (--out), with other guidance scales: the copy loads with them, the original is left as it was
    copy = tmp_path / "copy"
    assert main(["verdict", "--model", str(ckpt), "--data", str(path), "--guidance", "1,3", "--verdict-samples", "1",
                 "--verdict-temperatures", "1", "--out", str(copy)]) == 0
    capsys.readouterr()
    tried = [c["settings"] for c in vc.C2SModel.load(copy).verdict["candidates"]]
    assert tried == [{"guidance": 1.0}, {"guidance": 3.0}]
    assert vc.C2SModel.load(ckpt).verdict == new.verdict
    # other data: refused before anything is judged or written, naming the problem
    data[:-5].write_h5ad(path)
    before = (ckpt / "verdict.json").read_text()
    assert main(["verdict", "--model", str(ckpt), "--data", str(path)]) == 2
    assert "not the data the model was trained on" in capsys.readouterr().err
    # other columns: the same answer, not advice to pass --control or --perturbation-key, which verdict has not
    other = data.copy()
    other.obs["perturbation"] = other.obs["perturbation"].astype(str).replace({"control": "NT"})
    other.write_h5ad(path)
    assert main(["verdict", "--model", str(ckpt), "--data", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not the data the model was trained on" in err and "--control" not in err
    assert (ckpt / "verdict.json").read_text() == before


def test_rejudge_refuses_a_checkpoint_without_a_record_of_its_data(tiny_model):
    from virtualcell.errors import ModelError
    from virtualcell.train import rejudge

    model, folder, data = tiny_model
    bare = vc.C2SModel.load(folder)
    bare.train_config = {k: v for k, v in bare.train_config.items() if k != "data_hash"}
    with pytest.raises(ModelError, match="no record of the data it was trained on"):
        rejudge(bare, data)
    bare.train_config = dict(model.train_config) | {"verdict_fraction": 0.0}
    with pytest.raises(ModelError, match="verdict_fraction 0"):
        rejudge(bare, data)


def test_the_covariance_of_more_genes_than_cells_is_the_thin_svd_s():
    """A full transcriptome (more genes than the 4,000 cells kept) takes the cells' Gram matrix instead of the thin
    SVD's cells x genes workspace: the same covariance along the axes kept."""
    import scipy.sparse as sp

    from virtualcell.validation import covariance_factor

    rng = np.random.default_rng(0)
    X = sp.random(300, 1200, density=0.05, format="csr", random_state=1, dtype=np.float32)
    X.data = np.log1p(X.data * 10)
    ctx = np.array(["a", "b"])[rng.integers(0, 2, 300)]
    F = covariance_factor(X, ctx, rank=64).astype(np.float64)
    Z = X.toarray().astype(np.float64)
    for c in "ab":
        Z[ctx == c] -= Z[ctx == c].mean(axis=0)
    _, S, Vt = np.linalg.svd(Z, full_matrices=False)
    exact = Vt[:64].T * (S[:64] / np.sqrt(298))
    np.testing.assert_allclose(F @ F[:40].T, exact @ exact[:40].T, atol=1e-6)


def test_the_covariance_leaves_out_perturbations_held_out_whole(tiny_model):
    """The coexpression baseline's covariance was of the training cells and of every cell of the perturbations held
    out whole, which the verdict judges as never seen (their baseline scored 0.78 with them, 0.75 without)."""
    model, _, data = tiny_model
    contract = DataContract.from_adata(data)
    held = sorted(set(contract.conditions(data)) - {contract.control})[:2]
    with_forms = Baselines.fit(data, contract, model, forms={h: f"ko:{h}" for h in held})
    keep = ~np.isin(contract.conditions(data), held)
    without = Baselines.fit(data[keep].copy(), contract, model)
    np.testing.assert_allclose(with_forms.response, without.response, atol=1e-5)
    assert set(held) <= {n.split(":")[-1] for n in with_forms.names}  # their meanshift is still served


def test_a_cell_is_served_its_own_contexts_measured_effect(tmp_path):
    """drugX moves G00-G04 four times up in cell type A and four times down in B. The served baseline was one vector,
    the mean over contexts (about -0.2 for every cell), so a screen of A cells ranked drugX below a mild drug and
    listed G00-G04 as going down. Each cell now gets its own context's measured effect where it was measured (the
    mean over contexts where not); baselines.npz keeps them. (The verdict fits its one weight against the mean over
    contexts, the baseline a new context gets.)"""
    import anndata as ad
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    genes = [f"G{i:02d}" for i in range(40)]
    mu = rng.uniform(5, 30, len(genes))
    rows, obs = [], []
    for c in ("A", "B"):
        for p, n in (("control", 150), ("drugX", 60), ("drugY", 60)):
            m = mu.copy()
            if p == "drugX":
                m[:5] *= 4.0 if c == "A" else 0.25
            if p == "drugY":
                m[10:15] *= 1.6
            rows.append(rng.poisson(m, size=(n, len(genes))))
            obs += [(p, c)] * n
    a = ad.AnnData(sp.csr_matrix(np.vstack(rows).astype(np.float32)),
                   obs=pd.DataFrame(obs, columns=["perturbation", "cell_type"], index=[f"c{i}" for i in range(len(obs))]),
                   var=pd.DataFrame(index=genes))
    cfg = vc.TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=8, eval_every=4, save_every=4,
                         batch_size=8, warmup_steps=2, seed=0)
    vc.train.train(a, out=tmp_path / "m", config=cfg, progress=False,
                   contract=DataContract("perturbation", "control", context_key="cell_type"))
    model = vc.C2SModel.load(tmp_path / "m")
    base = model.baselines
    own_a, own_b = base.delta_for("drugX", context="A")[0][:5], base.delta_for("drugX", context="B")[0][:5]
    assert (own_a > 1.0).all() and (own_b < -1.0).all()
    np.testing.assert_allclose(base.delta_for("drugX", context="new")[0], base.delta_for("drugX")[0])
    np.testing.assert_allclose(base.delta_for("drugX")[0][:5], (own_a + own_b) / 2, atol=1e-5)
    ctrl = a[a.obs["perturbation"] == "control"]
    for c, sign in (("A", 1), ("B", -1)):
        cells = ctrl[ctrl.obs["cell_type"] == c][:12].copy()
        served = vc.Simulator(cells, model, seed=0).simulate(["drugX"], blend=0.0, samples=1, progress=False)
        assert (sign * served.aggregates["delta"].values[0, :5] > 0.8).all(), c
