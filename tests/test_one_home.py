"""One home per meaning: the shared statistics, kind aliases, labels and prompt formats behave as the
callers rely on, the objectives score hand-computed cases, and the simulator's prediction follows its formula."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import scipy.sparse as sp
import xarray as xr

import virtualcell as vc
from virtualcell._stats import noise_corrected_sq_norm, paired_sq_norm, pca, signed_root, unbiased_var
from virtualcell.errors import PerturbationError, ScreenError


# --------------------------------------------------------------------------- #
# statistics
# --------------------------------------------------------------------------- #
def test_pca_is_centered_sign_fixed_and_the_same_by_every_method(monkeypatch):
    from virtualcell import _stats

    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 12)) @ np.diag(np.linspace(3, 0.5, 12))
    gram = pca(sp.csr_matrix(X), 4)  # few genes: the covariance path
    ref = np.linalg.svd(X - X.mean(0), full_matrices=False)[2][:4]
    np.testing.assert_allclose(np.abs(gram.components @ ref.T), np.eye(4), atol=1e-5)  # the top axes, in order
    assert np.all(gram.components[np.arange(4), np.abs(gram.components).argmax(1)] > 0)  # fixed sign
    monkeypatch.setattr(_stats, "_GRAM_MAX_GENES", 0)  # the dense SVD path
    dense = pca(X, 4)
    np.testing.assert_allclose(dense.components, gram.components, atol=1e-5)
    monkeypatch.setattr(_stats, "_DENSE_MAX", 0)  # the truncated (svds) path, on a sparse matrix
    trunc = pca(sp.csr_matrix(X), 4, seed=3)
    np.testing.assert_allclose(trunc.components, dense.components, atol=1e-4)
    np.testing.assert_allclose(trunc.transform(sp.csr_matrix(X)), dense.transform(X), atol=1e-3)
    np.testing.assert_allclose(dense.transform(X).mean(0), 0, atol=1e-5)
    assert pca(X[:2], 5).components.shape == (1, 12)  # too few cells: one axis


def test_pca_of_few_cells_over_many_genes_is_the_svd(monkeypatch):
    """Fewer cells than genes: the axes from the cells' inner products are the SVD's (an evaluate of a few hundred
    cells over 9,000 genes took a second per context in svds); where an axis would carry no variance (repeated
    cells) the SVD decides it."""
    from virtualcell import _stats

    rng = np.random.default_rng(2)
    X = rng.normal(size=(30, 50)) @ np.diag(np.linspace(4, 0.2, 50))
    monkeypatch.setattr(_stats, "_GRAM_MAX_GENES", 0)
    calls = []
    real = _stats._cell_space_axes
    monkeypatch.setattr(_stats, "_cell_space_axes", lambda *a: calls.append(1) or real(*a))
    cells = pca(sp.csr_matrix(X), 6)
    assert calls  # the cell-space path ran
    monkeypatch.setattr(_stats, "_GRAM_MAX_CELLS", 0)  # the dense SVD path
    dense = pca(X, 6)
    np.testing.assert_allclose(cells.components, dense.components, atol=1e-5)
    np.testing.assert_allclose(cells.center, dense.center, atol=1e-6)
    monkeypatch.setattr(_stats, "_GRAM_MAX_CELLS", 2_000)
    repeated = np.repeat(X[:4], 5, axis=0)  # rank 3 after centering: a fourth axis has no variance
    assert _stats._cell_space_axes(repeated, repeated.mean(0), 4) is None
    axes = pca(repeated, 4).components
    np.testing.assert_allclose(axes @ axes.T, np.eye(4), atol=1e-5)  # orthonormal all the same (from the SVD)


def test_variance_and_noise_corrected_effect_size_by_hand():
    rng = np.random.default_rng(1)
    a, b = rng.normal(1.0, 2.0, size=(7, 5)), rng.normal(0.0, 1.0, size=(11, 5))
    var_a = unbiased_var(a.mean(0), (a**2).mean(0), len(a))
    np.testing.assert_allclose(var_a, a.var(0, ddof=1))
    assert np.all(unbiased_var(a[:1].mean(0), (a[:1] ** 2).mean(0), 1) == 0)
    sq, noise = noise_corrected_sq_norm(a.mean(0) - b.mean(0), var_a=var_a, n_a=7, var_b=b.var(0, ddof=1), n_b=11)
    assert sq == pytest.approx(np.sum((a.mean(0) - b.mean(0)) ** 2))
    assert noise == pytest.approx(a.var(0, ddof=1).sum() / 7 + b.var(0, ddof=1).sum() / 11)
    assert np.isnan(noise_corrected_sq_norm(np.ones(2), var_a=np.ones(2), n_a=1, var_b=np.ones(2), n_b=5)[1])


def test_effect_size_of_evaluate_is_the_shared_formula(papalexi_small):
    from virtualcell.sentences import log_normalize

    table = vc.evaluate.effect_size(papalexi_small).set_index("perturbation")
    X = log_normalize(papalexi_small.X.tocsr(), "counts").toarray().astype(np.float64)
    labels = papalexi_small.obs["perturbation"].astype(str).to_numpy()
    c, p = X[labels == "control"], X[labels == "STAT1"]
    expected = np.sum((p.mean(0) - c.mean(0)) ** 2) - p.var(0, ddof=1).sum() / len(p) - c.var(0, ddof=1).sum() / len(c)
    assert expected > 0 and table.loc["STAT1", "effect_size"] == pytest.approx(np.sqrt(expected), rel=1e-4)


def test_normalization_labels_have_one_spelling(papalexi_small):
    from virtualcell.evaluate._data import expression
    from virtualcell.sentences import RankFit, encode, normalization_label

    _, counts_label = expression(papalexi_small, name="x")
    fit = RankFit.fit(papalexi_small, encode(papalexi_small))
    assert counts_label == fit.normalization == normalization_label("counts") == "log1p_cp10k"
    with pytest.raises(vc.errors.DataError, match="scale"):
        normalization_label("tpm")


# --------------------------------------------------------------------------- #
# perturbation kinds
# --------------------------------------------------------------------------- #
def test_every_kind_alias_is_a_panel_prefix_and_a_kind_column_value():
    """The panel parser and the trainer's kind column read one table (they used to disagree: 'kd:' was
    not a kind-column value, 'shrna:' not a panel prefix)."""
    import anndata as ad
    import pandas as pd

    from virtualcell.contract import DataContract
    from virtualcell.perturbations import KIND_ALIASES, parse
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    for alias, kind in KIND_ALIASES.items():
        p = parse(f"{alias}:MYC")
        assert p.kind == ("control" if kind == "control" else kind), alias
    for alias in ("kd", "act", "cyto", "shRNA", "CRISPR", "small molecule"):
        assert alias.lower() in KIND_ALIASES
    obs = pd.DataFrame({"perturbation": ["control", "MYC", "KLF1", "dex", "IFNB"],
                        "kind": ["control", "kd", "shRNA", "small molecule", "cyto"]})
    obs.index = [f"c{i}" for i in range(len(obs))]
    adata = ad.AnnData(np.ones((5, 3), dtype=np.float32), obs=obs,
                       var=pd.DataFrame(index=["MYC", "KLF1", "GATA1"]))
    contract = DataContract("perturbation", "control")
    typed, _ = typed_labels(adata, contract, Vocabulary.from_adata(adata), TrainConfig(kind_key="kind"))
    assert list(typed) == ["control", "kd:MYC", "kd:KLF1", "drug:dex", "cytokine:IFNB"]
    with pytest.raises(PerturbationError, match="Unknown perturbation type"):
        parse("zap:MYC")


# --------------------------------------------------------------------------- #
# objectives, by hand
# --------------------------------------------------------------------------- #
GENES = ["A", "B", "C", "D"]
DELTA = np.array([3.0, -4.0, 1.0, 0.0])
CONTROL = np.array([1.0, 2.0, 0.0, 5.0])


@pytest.mark.parametrize(("text", "expected"), [
    (None, 5.0990195),                      # sqrt(9 + 16 + 1)
    ("largest", 5.0990195),
    ("raise:A,C", 2.0),                     # mean(3, 1)
    ("lower:b", 4.0),                       # -mean(-4); case-insensitive genes
    ("signature:A/B", 7.0),                 # 3 - (-4)
    ("reverse:A/B", -7.0),                  # the disease signature pushed the other way
    ("signature:A,C/B,D", 4.0),             # mean(3, 1) - mean(-4, 0)
])
def test_objective_scores_by_hand(text, expected):
    obj = vc.objectives.parse_objective(text).bind(GENES, CONTROL)
    assert obj.score(DELTA) == pytest.approx(expected)


def test_toward_state_and_custom_by_hand():
    target = np.array([4.0, -2.0, 1.0, 5.0])  # control + delta lands exactly on it
    obj = vc.objectives.TowardState(target=target, target_genes=GENES).bind(GENES, CONTROL)
    assert obj.score(DELTA) == pytest.approx(np.linalg.norm(CONTROL - target))  # all the way: the whole distance
    assert obj.score(-DELTA) == pytest.approx(np.linalg.norm(CONTROL - target) - 2 * np.linalg.norm(DELTA))
    custom = vc.objectives.parse_objective(lambda d: d["A"] - 2 * d["B"]).bind(GENES, CONTROL)
    assert custom.score(DELTA) == pytest.approx(11.0)
    with pytest.raises(ScreenError, match="not a number"):
        vc.objectives.Custom(fn=lambda d: "x").bind(GENES, CONTROL).score(DELTA)
    with pytest.raises(ScreenError, match="NOTAGENE"):
        vc.objectives.parse_objective("raise:NOTAGENE").bind(GENES, CONTROL)


# --------------------------------------------------------------------------- #
# diverse picks
# --------------------------------------------------------------------------- #
def test_diverse_picks_and_what_each_pick_represents():
    import pandas as pd
    import xarray as xr

    from virtualcell.screen import diverse_picks

    deltas = {"A": [1, 0, 0], "A2": [0.99, 0.1, 0], "A3": [0.98, 0, 0.1], "B": [0, 1, 0], "C": [0, 0, 1],
              "B2": [0.05, 1, 0]}
    names = list(deltas)  # already in rank order
    agg = xr.Dataset({"delta": (("perturbation", "gene"), np.array([deltas[n] for n in names], dtype=float))},
                     coords={"perturbation": names, "gene": ["g1", "g2", "g3"]})
    ranking = pd.DataFrame({"perturbation": names, "score": np.arange(len(names), 0, -1.0)})
    out = diverse_picks(ranking, agg, top=10, similarity=0.9).set_index("perturbation")
    assert list(out.index[out["pick"]]) == ["A", "B", "C"]
    assert out.loc["A", "represents"] == ["A2", "A3"] and out.loc["B", "represents"] == ["B2"]
    assert out.loc["C", "represents"] == []
    assert out.loc["A2", "similar_to_pick"] == "A" and out.loc["B2", "similar_to_pick"] == "B"
    assert out.loc["A", "similar_to_pick"] == ""
    two = diverse_picks(ranking, agg, top=2, similarity=0.9).set_index("perturbation")
    assert list(two.index[two["pick"]]) == ["A", "B"] and two.loc["C", "similar_to_pick"] == ""


# --------------------------------------------------------------------------- #
# the simulator: calibration formula, control variance, labels
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def bundled_sim(papalexi):
    base = papalexi[papalexi.obs.perturbation == "control"][:6].copy()
    return vc.Simulator(base, vc.model.bundled(), seed=0)


def _calibrated_by_hand(x, d, c):
    r = x + d - c
    clipped = np.maximum(r, 0)
    out = np.zeros_like(clipped)
    for g in range(r.shape[1]):  # gene by gene: the clipped cells rescaled to the unclipped mean
        if clipped[:, g].mean() > 0:
            out[:, g] = clipped[:, g] * max(r[:, g].mean(), 0) / clipped[:, g].mean()
    return out


def test_calibrated_prediction_is_x_plus_decoded_perturbed_minus_decoded_control(bundled_sim):
    perts = ["control", "ko:STAT1"]
    raw = bundled_sim.simulate(perts, seed=2, calibrate=False, keep_cells=True, progress=False, control_samples=1)
    cal = bundled_sim.simulate(perts, seed=2, keep_cells=True, progress=False, control_samples=1, blend=None)
    x = bundled_sim.expression.toarray()
    d_ctrl, d_ko = (raw.cells.sel(perturbation=p).values for p in perts)
    got = cal.cells.sel(perturbation="ko:STAT1").values
    np.testing.assert_allclose(got, _calibrated_by_hand(x, d_ko, d_ctrl), atol=1e-5)
    # the mean is the unclipped one: clipping at 0 adds no up-shift to genes the cells do not express
    np.testing.assert_allclose(got.mean(0), np.maximum((x + d_ko - d_ctrl).mean(0), 0), atol=1e-5)
    assert (got >= 0).all()
    np.testing.assert_allclose(cal.cells.sel(perturbation="control").values, x, atol=1e-6)  # control: the baseline
    a = cal.aggregates
    np.testing.assert_allclose(a["delta"].sel(perturbation="ko:STAT1"),
                               cal.cells.sel(perturbation="ko:STAT1").mean("cell") - x.mean(0), atol=1e-5)
    # the pinned disagreement: the control variance is unbiased (ddof=1), like the predicted one
    np.testing.assert_allclose(a["control_var"], x.var(0, ddof=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(a["var"].sel(perturbation="ko:STAT1"),
                               cal.cells.sel(perturbation="ko:STAT1").values.var(0, ddof=1), rtol=1e-4, atol=1e-6)
    # the noise of a delta is that of paired cells: each cell's change before clipping (the calibrated cells keep its
    # mean, not its spread: clipped at 0, they vary less, and their variance understated the noise)
    diff = d_ko - d_ctrl
    np.testing.assert_allclose(a["var_delta"].sel(perturbation="ko:STAT1"), diff.var(0, ddof=1), rtol=1e-4, atol=1e-6)
    clipped = cal.cells.sel(perturbation="ko:STAT1").values - x
    assert diff.var(0, ddof=1).sum() > clipped.var(0, ddof=1).sum()
    from virtualcell.objectives import parse_objective
    from virtualcell.screen import rank

    row = rank(a, parse_objective(None), n_boot=0, seed=0).set_index("perturbation").loc["ko:STAT1"]
    d = clipped.mean(0)
    want = signed_root(float(d @ d) - diff.var(0, ddof=1).sum() / diff.shape[0])
    assert row["l2_delta_corrected"] == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_predictions_are_calibrated_against_the_mean_of_several_control_samples(bundled_sim):
    """control_samples=3: each cell is generated three times under control (keys 'control', 'control#1',
    'control#2'), and every perturbation is calibrated against the mean of the three decodes."""
    from virtualcell.generation import stable_key
    from virtualcell.sentences import decode

    model = bundled_sim.model
    keys = [stable_key("control"), stable_key("control#1"), stable_key("control#2")]
    dec = {}
    for out in model.generate(bundled_sim.sentences, model.resolve(["control"] * 3), perturbation_keys=keys,
                              config=bundled_sim.generation_config(seed=2)):  # the model's chosen settings
        for r, (c, k) in enumerate(zip(out.cell, out.perturbation)):
            dec[(int(c), int(k))] = decode(out.sentences, model.rank_fit).toarray()[r]
    n = bundled_sim.baseline.n_obs
    samples = np.stack([[dec[(c, k)] for c in range(n)] for k in range(3)])
    assert not np.allclose(samples[0], samples[1])  # distinct samples, not one repeated
    perts = ["control", "ko:STAT1"]
    raw = bundled_sim.simulate(perts, seed=2, calibrate=False, keep_cells=True, progress=False, control_samples=3)
    cal = bundled_sim.simulate(perts, seed=2, keep_cells=True, progress=False, control_samples=3, blend=None)
    np.testing.assert_allclose(raw.cells.sel(perturbation="control").values, samples.mean(0), atol=1e-5)
    x = bundled_sim.expression.toarray()
    np.testing.assert_allclose(cal.cells.sel(perturbation="ko:STAT1").values,
                               _calibrated_by_hand(x, raw.cells.sel(perturbation="ko:STAT1").values, samples.mean(0)),
                               atol=1e-5)
    np.testing.assert_allclose(cal.cells.sel(perturbation="control").values, x, atol=1e-6)
    assert cal.aggregates.attrs["control_samples"] == 3
    for bad in (0, 2.5, True):
        with pytest.raises(vc.errors.DataError, match="control_samples"):
            bundled_sim.simulate(perts, control_samples=bad, progress=False)


def test_each_perturbation_can_be_sampled_several_times_per_cell_and_averaged(bundled_sim):
    """samples=3: each cell is generated three times under a perturbation (keys 'ko:STAT1',
    'ko:STAT1#1', 'ko:STAT1#2'; the first is the key samples=1 uses, so its cells are unchanged),
    and the cell's uncalibrated prediction is the mean of the three decodes."""
    from virtualcell.generation import stable_key
    from virtualcell.sentences import decode

    model = bundled_sim.model
    keys = [stable_key("ko:STAT1"), stable_key("ko:STAT1#1"), stable_key("ko:STAT1#2")]
    dec = {}
    for out in model.generate(bundled_sim.sentences, model.resolve(["ko:STAT1"] * 3), perturbation_keys=keys,
                              config=bundled_sim.generation_config(seed=2)):  # the model's chosen settings
        for r, (c, k) in enumerate(zip(out.cell, out.perturbation)):
            dec[(int(c), int(k))] = decode(out.sentences, model.rank_fit).toarray()[r]
    n = bundled_sim.baseline.n_obs
    draws = np.stack([[dec[(c, k)] for c in range(n)] for k in range(3)])
    assert not np.allclose(draws[0], draws[1])
    perts = ["control", "ko:STAT1"]
    one = bundled_sim.simulate(perts, seed=2, calibrate=False, keep_cells=True, progress=False, samples=1)
    three = bundled_sim.simulate(perts, seed=2, calibrate=False, keep_cells=True, progress=False, samples=3)
    np.testing.assert_allclose(one.cells.sel(perturbation="ko:STAT1").values, draws[0], atol=1e-5)
    np.testing.assert_allclose(three.cells.sel(perturbation="ko:STAT1").values, draws.mean(0), atol=1e-5)
    assert three.aggregates.attrs["samples"] == 3 and one.aggregates.attrs["samples"] == 1
    # the control is sampled 4 times per sample by default (its noise is shared by every delta) ...
    assert (one.aggregates.attrs["control_samples"], three.aggregates.attrs["control_samples"]) == (4, 12)
    assert not np.allclose(three.cells.sel(perturbation="control").values, one.cells.sel(perturbation="control").values)
    # ... and the same 4 control samples as samples=1 when they are given
    four = bundled_sim.simulate(perts, seed=2, calibrate=False, keep_cells=True, progress=False, samples=3,
                                control_samples=4)
    np.testing.assert_allclose(four.cells.sel(perturbation="control").values,
                               one.cells.sel(perturbation="control").values, atol=1e-6)
    for bad in (0, 1.5):
        with pytest.raises(vc.errors.DataError, match="samples must be a whole number"):
            bundled_sim.simulate(perts, samples=bad, progress=False)


def test_draws_are_each_cells_first_sample_calibrated_against_the_same_control_mean(bundled_sim):
    """keep_draws: beside the cells averaged over samples=3, one draw per cell, its first sample alone
    (the key samples=1 uses), calibrated against the same mean of the control samples; served and pure."""
    perts = ["control", "ko:STAT1"]
    kw = dict(seed=2, progress=False, samples=3, control_samples=4)
    raw = bundled_sim.simulate(perts, calibrate=False, keep_draws=True, **kw)
    one = bundled_sim.simulate(perts, calibrate=False, keep_cells=True, **{**kw, "samples": 1})
    first = one.cells.sel(perturbation="ko:STAT1").values  # the first sample's decode, uncalibrated
    np.testing.assert_allclose(raw.draws.sel(perturbation="ko:STAT1").values, first, atol=1e-6)
    averaged = raw.cells.sel(perturbation="ko:STAT1").values
    assert not np.allclose(averaged, first)
    # calibrated: x + first sample - mean of the 4 control samples (the same 4 as samples=1's)
    x = bundled_sim.expression.toarray()
    d_ctrl = one.cells.sel(perturbation="control").values
    pure = bundled_sim.simulate(perts, keep_draws=True, blend=None, **kw)
    np.testing.assert_allclose(pure.draws.sel(perturbation="ko:STAT1").values, _calibrated_by_hand(x, first, d_ctrl),
                               atol=1e-5)
    np.testing.assert_allclose(pure.draws.sel(perturbation="control").values, x, atol=1e-6)
    assert pure.draws_model is None  # nothing blended: the draws are the pure model's
    # the averaged cells, and the aggregates made of them, are what they are without draws
    plain = bundled_sim.simulate(perts, keep_cells=True, blend=None, **kw)
    np.testing.assert_allclose(pure.cells.values, plain.cells.values, atol=1e-6)
    np.testing.assert_allclose(pure.aggregates["delta"].values, plain.aggregates["delta"].values, atol=1e-6)
    # served with a blend weight: the draw's change blended with the baseline's, and the pure draws beside them
    blended = bundled_sim.simulate(perts, keep_draws=True, blend=0.5, **kw)
    np.testing.assert_allclose(blended.draws_model.values, pure.draws.values, atol=1e-5)
    shift = bundled_sim.model.baselines.delta_for(bundled_sim.model.resolve(["ko:STAT1"])[0])[0]
    want = _calibrated_by_hand(x, 0.5 * (first - d_ctrl) + 0.5 * shift, np.zeros_like(x))
    np.testing.assert_allclose(blended.draws.sel(perturbation="ko:STAT1").values, want, atol=1e-5)
    ann = blended.to_anndata(draws=True, pure=True)
    np.testing.assert_allclose(ann.X, pure.draws.values.reshape(ann.n_obs, -1), atol=1e-5)
    assert ann.uns["virtualcell"]["draws"] is True and ann.uns["virtualcell"]["blend_weight"] == 1.0
    with pytest.raises(vc.errors.ScreenError, match="keep_draws=True"):
        plain.to_anndata(draws=True)
    with pytest.raises(vc.errors.ScreenError, match="keep_draws=True keeps one draw"):
        bundled_sim.simulate(perts, keep_draws=True, keep_cells=False, **kw)


def test_predicted_cells_are_labelled_and_spelled_like_the_measured_data(bundled_sim):
    res = bundled_sim.simulate(["STAT1", "ko:JAK2"], seed=0, keep_cells=True, progress=False, n_cells=2)
    assert res.labels == {"ko:STAT1": "STAT1", "ko:JAK2": "JAK2"}
    assert list(res.aggregates["label"].values) == ["STAT1", "JAK2"]  # the aggregates carry the same labels
    # a knockout never trained on is named as the screen names knockouts (by gene); a kind it never trained, typed
    assert bundled_sim.model.perturbations.label_map(["ko:STAT1", "ko:NOTKNOWN", "kd:NOTKNOWN"]) == {
        "ko:STAT1": "STAT1", "ko:NOTKNOWN": "NOTKNOWN", "kd:NOTKNOWN": "kd:NOTKNOWN"}
    pred = res.to_anndata(perturbation_key="guide", labels={"ko:JAK2": "JAK2_g1"})
    assert list(pred.obs["guide"].unique()) == ["STAT1", "JAK2_g1"]
    pred.X[:] = 0  # (as scanpy's in-place steps do) the AnnData is a copy: the result's cells stay as predicted
    assert res.cells.values.any() and res.to_anndata().X.any()
    assert list(pred.var_names) == list(bundled_sim.gene_names) == list(bundled_sim.baseline.var_names.astype(str))
    assert pred.uns["virtualcell"]["normalization"] == bundled_sim.normalization
    assert pred.uns["virtualcell"]["seed"] == 0


def test_screen_ranking_keeps_its_provenance_through_selection(bundled_sim):
    res = bundled_sim.screen(["STAT1", "JAK2", "IFNGR1"], n_cells=3, n_boot=5, seed=1, progress=False)
    top = res.ranking[res.ranking["score"] > res.ranking["score"].min()]
    assert top.attrs["virtualcell"]["seed"] == 1 and top.attrs["virtualcell"]["objective"] == "largest_effect"
    picked = res.aggregates.sel(perturbation=["ko:JAK2"])
    assert picked.attrs["seed"] == 1 and picked.attrs["normalization"] == bundled_sim.normalization
    # the noise-corrected effect size of the ranking is the shared formula over the aggregates
    a, row = res.aggregates, res.ranking.iloc[0]
    agg = a.sel(perturbation=row["perturbation"])
    sq, noise = paired_sq_norm(agg["delta"].values, var_diff=agg["var_delta"].values, n=3)
    assert row["l2_delta"] == pytest.approx(np.sqrt(sq), rel=1e-5)
    assert row["l2_delta_corrected"] == pytest.approx(signed_root(sq - noise), rel=1e-5, abs=1e-6)
    # effects below the noise are negative and keep their order, not all tied at 0
    from virtualcell.objectives import parse_objective
    from virtualcell.screen import rank

    weak = a.copy(deep=True)
    weak["var_delta"] = weak["var_delta"] + 1.0  # noise sum(var_delta) / 3 far above each ||delta||^2
    weak["delta"] = weak["delta"] * xr.DataArray([0.1, 0.2, 0.3], dims="perturbation")
    low = rank(weak, parse_objective(None), n_boot=0).set_index("perturbation")["l2_delta_corrected"]
    for p, value in low.items():
        g = weak.sel(perturbation=p)
        sq, noise = paired_sq_norm(g["delta"].values, var_diff=g["var_delta"].values, n=3)
        assert sq < noise and value == pytest.approx(-np.sqrt(noise - sq), rel=1e-5)
    assert low.nunique() == len(low)


# --------------------------------------------------------------------------- #
# prompt formats and the engine's thread setting
# --------------------------------------------------------------------------- #
def test_both_prompt_formats_implement_one_interface(bundled_sim):
    from virtualcell.prompts import FORMATS, PromptFormat

    model = bundled_sim.model
    fmt = model.format
    assert isinstance(fmt, PromptFormat) and set(FORMATS) == {"compact", "c2s"}
    perts = model.resolve(["STAT1", "JAK2", "control"])
    cells = [bundled_sim.sentences[i][:5] for i in range(2)]
    grid = fmt.grid(cells, perts, cell_keys=[10, 11], perturbation_keys=[1, 2, 3])
    assert len(grid.prefixes) == 2 and len(grid.suffixes) == 3 and grid.pair(1, 2) == (1, 2)
    assert fmt.prompt_parts(cells[0], perts[0]) == (grid.prefixes[0], grid.suffixes[0])  # the trainer's prompts
    assert fmt.sentence(cells[1])[1:] == fmt.response(cells[1])
    sentences, n_invalid, n_dup = fmt.to_sentences([fmt.response(cells[1])[:-1] + [fmt.response(cells[1])[0]]],
                                                   model.genes)
    assert list(sentences[0]) == list(cells[1]) and (n_invalid, n_dup) == (0, 1)
    # a word dropped (not a gene, or repeated) leaves the genes after it at their places, as parse_text reads text
    # (the gene-level path closed the gap: the same generated cell decoded to other expression)
    g = fmt.response(cells[1])[:3]
    sentences, n_invalid, n_dup = fmt.to_sentences([[fmt.sep, g[0], g[0], g[1], g[2]]], model.genes)
    words = " ".join(["FOO"] + [model.genes.genes[i] for i in (cells[1][0], cells[1][0], cells[1][1], cells[1][2])])
    text, _ = vc.sentences.parse_text([words], model.genes)
    assert list(sentences.rank_array()) == list(text.rank_array()) == [1, 3, 4] and (n_invalid, n_dup) == (1, 1)
    c2s = FORMATS["c2s"](model.tokenizer, model.genes.genes, model.perturbations)
    grid = c2s.grid(cells, perts, cell_keys=[10, 11], perturbation_keys=[1, 2, 3])
    assert len(grid.prefixes) == 6 and grid.suffixes == [[]]
    assert [grid.pair(i, 0) for i in range(6)] == [(c, p) for c in range(2) for p in range(3)]
    assert c2s.prompt_parts(cells[1], perts[2]) == ([], grid.prefixes[5])
    assert c2s.response_vocabulary() is None and set(fmt.response_vocabulary()) == {*fmt.gene_tokens, fmt.eos}
    with pytest.raises(PerturbationError):
        fmt.check(vc.Perturbation("drug", "never-seen"))
    c2s.check(vc.Perturbation("drug", "never-seen"))  # a text model reads any name


def test_the_engine_restores_the_callers_thread_setting_between_items(bundled_sim):
    import torch

    from virtualcell.generation import (
        _THREAD_CHOICE,
        GenerationConfig,
        generate_grid,
        torch_threads,
    )

    model = bundled_sim.model
    fmt = model.format
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        grid = generate_grid(model.lm, [fmt.prefix(bundled_sim.sentences[i][:5]) for i in range(3)],
                             [fmt.suffix(p) for p in model.resolve(["STAT1"])], cell_keys=[0, 1, 2], suffix_keys=[0],
                             constraint=model.constraint(), eos_id=fmt.eos, pad_id=fmt.pad,
                             config=GenerationConfig(max_genes=4, batch_size=1, threads=1))
        seen = []
        for item in grid:
            seen.append(torch.get_num_threads())  # the caller's setting while it holds an item
        assert len(seen) == 3 and set(seen) == {2}
        with pytest.raises(RuntimeError), torch_threads(1):
            assert torch.get_num_threads() == 1
            raise RuntimeError
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)

    class Tiny(torch.nn.Module):
        pass

    tiny = Tiny()
    _THREAD_CHOICE[tiny] = {(1, 2): 1}
    del tiny
    gc.collect()
    assert not any(isinstance(m, Tiny) for m in _THREAD_CHOICE)  # a dead model's choice goes with it


def test_the_control_is_named_as_the_data_names_it(bundled_sim, monkeypatch):
    """Predictions of the control were labelled 'control' whatever the data called its controls ('ctrl',
    'non-targeting'): a pertpy contrast by the data's label missed them, and a concat held both names."""
    from dataclasses import replace

    from virtualcell.perturbations import parse

    monkeypatch.setattr(bundled_sim.model, "contract", replace(bundled_sim.model.contract, control="ctrl"))
    assert bundled_sim.labels_of([parse("control"), parse("ko:STAT1")]) == ["ctrl", "STAT1"]


def test_what_moves_a_prediction_is_said_and_recorded(bundled_sim, caplog):
    """From a sweep of every route to one prediction: a block of a few baseline cells kept the clip's up-shift (the
    rescale has too few cells) without a word; two models trained into one folder left the same records; and
    effect_size read predicted cells against their own source cells as independent groups. Each is now said or
    recorded."""
    sim = vc.Simulator(bundled_sim.baseline.copy(), bundled_sim.model, seed=0)  # (its own: the warning is once)
    with caplog.at_level("WARNING"):
        result = sim.simulate(["ko:STAT1"], n_cells=6, max_genes=8, progress=False, keep_cells=True)
        sim.simulate(["ko:JAK2"], n_cells=6, max_genes=8, progress=False)
    assert caplog.text.count("A block of 6 baseline cells is generated alone") == 1  # once a Simulator
    said = result.to_anndata().uns["virtualcell"]
    assert said["model_weights"] == bundled_sim.model.weights_digest()
    assert said["model_serving"] == bundled_sim.model.serving_digest() and said["virtualcell_version"] == vc.__version__
    import anndata as ad

    pred = result.to_anndata()
    base = bundled_sim.baseline[:6].copy()
    base.obs = base.obs[["perturbation"]]
    X = np.asarray(base.X.todense() if hasattr(base.X, "todense") else base.X, dtype=np.float64)
    base.X = np.log1p(X / X.sum(1, keepdims=True) * 1e4).astype(np.float32)  # on the predictions' scale
    base.obs["source_cell"] = np.nan  # (measured cells come from none; anndata.concat keeps shared columns only)
    both = ad.concat([pred, base])  # predicted cells beside the very cells they were predicted from
    with pytest.warns(UserWarning, match=r"predicted from the control cells they are measured against"):
        vc.evaluate.effect_size(both, perturbation_key="perturbation", control="control")
