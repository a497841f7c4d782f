"""The gene map: every gene from a decoded cell sentence (virtualcell.gene_map)."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from virtualcell.errors import ModelError
from virtualcell.gene_map import GeneMap
from virtualcell.sentences import roundtrip
from virtualcell.validation import choose_decode


def _two_programs(n: int = 400, seed: int = 0) -> tuple[ad.AnnData, np.ndarray]:
    """Cells in one of two programs: A writes genes 0-9 high, B genes 10-19; below every sentence's cut, genes 20-39
    rise with A and 40-59 with B. Log1p counts; returns the cells and each cell's program (1: A)."""
    rng = np.random.default_rng(seed)
    a = rng.random(n) < 0.5
    rate = np.full((n, 60), 0.05)
    rate[a, 0:10] = 40.0
    rate[~a, 10:20] = 40.0
    rate[a, 20:40] = 1.0
    rate[~a, 40:60] = 1.0
    X = np.log1p(rng.poisson(rate)).astype(np.float32)
    return ad.AnnData(X, var=pd.DataFrame(index=[f"G{i}" for i in range(60)])), a


def test_the_map_gives_back_the_genes_the_sentences_leave_out():
    cells, a = _two_programs()
    decoded = roundtrip(cells, top_k=10, seed=0)  # sentences of 10 genes: genes 20-59 never written
    assert not np.asarray(decoded.X[:, 20:].todense()).any()
    gene_map = GeneMap.fit(decoded.X, cells.X, decode="linear", seed=0)
    assert gene_map.error < 0.5 * gene_map.error_without  # on the fifth of the cells that chose it
    full = gene_map(decoded.X)
    assert full.shape == cells.shape and full.dtype == np.float32
    # the unwritten genes now follow the program the sentence shows
    assert full[a, 20:40].mean() > 0.4 and full[~a, 20:40].mean() < 0.1
    assert full[~a, 40:60].mean() > 0.4 and full[a, 40:60].mean() < 0.1
    # a change of decoded expression (what the Simulator predicts from) passes on by the map's linear part
    change = np.asarray(decoded.X[a].mean(axis=0) - decoded.X[~a].mean(axis=0)).ravel()
    moved = gene_map.shift(change)
    np.testing.assert_allclose(moved, full[a].mean(axis=0) - full[~a].mean(axis=0), atol=1e-4)
    assert moved[20:40].mean() > 0.4 and moved[40:60].mean() < -0.4


def test_the_map_refuses_what_it_cannot_fit_or_read(tmp_path):
    cells, _ = _two_programs(n=60)
    decoded = roundtrip(cells, top_k=10, seed=0)
    with pytest.raises(ModelError, match="same cells and genes"):
        GeneMap.fit(decoded.X, cells.X[:, :30], decode="linear")
    with pytest.raises(ModelError, match="at least 10 cells"):
        GeneMap.fit(decoded.X[:5], cells.X[:5], decode="linear")
    gene_map = GeneMap.fit(decoded.X, cells.X, decode="table", seed=1)
    with pytest.raises(ModelError, match="decoded sentences of 60 genes"):
        gene_map(np.zeros((3, 59)))
    path = tmp_path / "gene_map.npz"
    gene_map.save(path)
    again = GeneMap.load(path, gene_map.record(), 60)
    np.testing.assert_array_equal(again(decoded.X), gene_map(decoded.X))
    assert again.record() == gene_map.record()
    with pytest.raises(ModelError, match="does not fit this model's 61 genes"):
        GeneMap.load(path, gene_map.record(), 61)
    path.write_bytes(b"not a numpy file")
    with pytest.raises(ModelError, match="cannot be read"):
        GeneMap.load(path, gene_map.record(), 60)


def test_choose_decode_takes_the_map_only_where_its_codec_error_is_lowest():
    from virtualcell.sentences import RankFit

    cells, _ = _two_programs(n=60)
    gene_map = GeneMap.fit(roundtrip(cells, top_k=10, seed=0, method="table").X, cells.X, decode="table")
    fit = RankFit(-1.0, 3.0, 0.9, "log1p", 10, rank_means=(3.0, 2.0, 1.0))
    maps = {"table+map": gene_map}
    scores = {"linear": {"mse": 0.3}, "table": {"mse": 0.2}, "table+map": {"mse": 0.1}}
    chosen, chosen_map, name = choose_decode(fit, scores, maps)
    assert (chosen.method, chosen_map, name) == ("table", gene_map, "table+map")
    chosen, chosen_map, name = choose_decode(fit, scores | {"linear": {"mse": 0.05}}, maps)
    assert (chosen.method, chosen_map, name) == ("linear", None, "linear")
    # the two kinds of map after one decode are two decodes: the lower codec error wins
    decoded = roundtrip(cells, top_k=10, seed=0, method="linear").X
    plain = GeneMap.fit(decoded, cells.X, decode="linear", residual=False)
    residual = GeneMap.fit(decoded, cells.X, decode="linear", residual=True)
    assert not plain.residual and residual.residual
    maps = {"linear+map": plain, "linear+residual map": residual}
    both = {"linear": {"mse": 0.3}, "linear+map": {"mse": 0.2}, "linear+residual map": {"mse": 0.1}}
    assert choose_decode(fit, both, maps)[1:] == (residual, "linear+residual map")
    assert choose_decode(fit, both | {"linear+map": {"mse": 0.05}}, maps)[1:] == (plain, "linear+map")
    with pytest.raises(ModelError, match="neither a rank-fit method"):
        choose_decode(fit, {"linear+map": {"mse": 0.1}})  # a mapped decode whose map was not passed


def test_the_simulator_decodes_through_the_models_gene_map(tiny_model):
    """A model with a gene map decodes every generated sentence through it: the uncalibrated prediction (the mean
    decoded generation) is the map of the one without it, from the same generation."""
    import virtualcell as vc
    from virtualcell.sentences import decode, encode, model_expression

    model, _, data = tiny_model
    sentences = encode(data, vocab=model.genes, top_k=model.top_k, seed=0)
    gene_map = GeneMap.fit(decode(sentences, model.rank_fit), model_expression(data, model.genes)[0],
                           decode=model.rank_fit.method, seed=0)
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:6].copy(), model)
    kept = model.gene_map
    try:
        model.gene_map = None
        plain = sim.simulate(["STAT1"], progress=False, calibrate=False, seed=2).cells.values
        model.gene_map = gene_map
        mapped = sim.simulate(["STAT1"], progress=False, calibrate=False, seed=2).cells.values
    finally:
        model.gene_map = kept
    np.testing.assert_allclose(mapped[0], gene_map(plain[0]), atol=1e-4)
    assert not np.allclose(mapped, plain, atol=1e-2)


def test_a_checkpoint_keeps_its_gene_map_until_a_verdict_drops_it(tiny_model, tmp_path):
    """save_verdict (what 'virtualcell verdict' writes) stores the chosen map beside virtualcell.json, and removes
    it when a verdict run again chose a decode without one: a stale file is never read back."""
    import shutil

    import virtualcell as vc
    from virtualcell.gene_map import FILE
    from virtualcell.sentences import decode, encode, model_expression

    model, folder, data = tiny_model
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    model = vc.C2SModel.load(copy)
    sentences = encode(data, vocab=model.genes, top_k=model.top_k, seed=0)
    model.gene_map = GeneMap.fit(decode(sentences, model.rank_fit), model_expression(data, model.genes)[0],
                                 decode=model.rank_fit.method, seed=0)
    model.save_verdict(copy)
    again = vc.C2SModel.load(copy)
    assert again.gene_map is not None and again.gene_map.record() == model.gene_map.record()
    np.testing.assert_array_equal(again.decode(sentences[:5]), model.decode(sentences[:5]))
    model.gene_map = None
    model.save_verdict(copy)
    assert not (copy / FILE).exists() and vc.C2SModel.load(copy).gene_map is None


def test_a_small_panel_keeps_the_full_rank_among_the_choices():
    """Cutting the map's rank drops the inputs that vary least; on a panel whose sentences hold every gene they still
    carry some genes, so the full rank stays a choice wherever its factors are small (not on a 9,015-gene panel)."""
    from virtualcell.gene_map import MAX_FLOATS, RANKS, _ranks

    assert _ranks(299, 299 + 299)[-1] == 299 and set(RANKS[:-1]) <= set(_ranks(299, 598))
    assert _ranks(1600, 4039 + 9015) == list(RANKS)  # the full rank's factors would exceed MAX_FLOATS
    assert 1600 * (4039 + 9015) > MAX_FLOATS
    assert _ranks(5, 10) == [0, 5]  # fewer components than the smallest positive rank tried; 0 is the decode alone


def test_where_the_sentences_write_every_gene_the_map_keeps_the_decode():
    """The map fits what the decode misses, so a large penalty or rank 0 gives the decode back: on sentences that
    write every gene it predicts the cells at least as well as the decode alone (a map fitted to the expression
    itself shrank each written gene toward its mean and did worse: experiments/results/attempts/gene_map/)."""
    cells, a = _two_programs()
    decoded = roundtrip(cells, top_k=60, seed=0)
    gene_map = GeneMap.fit(decoded.X, cells.X, decode="linear", seed=0)
    assert gene_map.residual and gene_map.error <= gene_map.error_without
    D = np.asarray(decoded.X.todense())
    full = gene_map(D)
    T = np.asarray(cells.X)
    assert np.corrcoef(full.ravel(), T.ravel())[0, 1] >= np.corrcoef(D.ravel(), T.ravel())[0, 1]
    # with the rank at 0 the map is the decode plus the residual's mean, whatever the sentence
    flat = GeneMap(gene_map.inputs, gene_map.mean_in, gene_map.mean_out, gene_map.left[:, :0], gene_map.right[:0],
                   "linear", 1.0, 0, np.nan, np.nan)
    np.testing.assert_allclose(flat(D) - D, np.broadcast_to(gene_map.mean_out, D.shape), atol=1e-5)
    np.testing.assert_allclose(flat.shift(D[:3] - D[3:6]), D[:3] - D[3:6], atol=1e-5)


def test_a_map_written_before_the_residual_fit_loads_as_it_was_fitted(tmp_path):
    """A checkpoint's map whose record has no 'residual' (session 42's maps, fitted to the expression itself)
    predicts without adding the decode, as it did when it was chosen."""
    cells, _ = _two_programs(n=100)
    decoded = roundtrip(cells, top_k=10, seed=0)
    gene_map = GeneMap.fit(decoded.X, cells.X, decode="linear", seed=0)
    path = tmp_path / "gene_map.npz"
    gene_map.save(path)
    old = {k: v for k, v in gene_map.record().items() if k != "residual"}
    before = GeneMap.load(path, old, 60)
    D = np.asarray(decoded.X.todense())
    assert not before.residual and before.record()["residual"] is False
    np.testing.assert_allclose(before(D), gene_map(D) - D, atol=1e-5)
