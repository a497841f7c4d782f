"""Gene identifiers end to end: Ensembl ids through the whole CLI, spellings kept, mismatches refused."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

import virtualcell as vc
from virtualcell.cli import main
from virtualcell.errors import DataError, VocabularyError


def _ensembl(adata: ad.AnnData) -> ad.AnnData:
    """The data with fake but well-formed Ensembl ids (with version suffixes) as var_names; symbols in var."""
    out = adata.copy()
    out.var["symbol"] = out.var_names.astype(str)
    out.var_names = [f"ENSG{100000 + i:011d}.{1 + i % 17}" for i in range(out.n_vars)]
    return out


@pytest.fixture(scope="module")
def screen_ids(papalexi, tmp_path_factory):
    rng = np.random.default_rng(3)
    keep = papalexi.obs["perturbation"].isin(["control", "STAT1", "IFNGR1", "JAK2"]).to_numpy()
    idx = np.sort(rng.choice(np.flatnonzero(keep), 500, replace=False))
    data = _ensembl(papalexi[idx])
    path = tmp_path_factory.mktemp("ids") / "screen_ids.h5ad"
    data.write_h5ad(path)
    return data, path


def test_ensembl_screen_goes_through_train_predict_screen_evaluate(screen_ids, tmp_path, capsys):
    data, path = screen_ids
    model = tmp_path / "model"
    tiny = ["--top-k", "20", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--max-steps", "4",
            "--batch-size", "8"]
    assert main(["train", "--data", str(path), "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(model), *tiny]) == 0
    trained = vc.C2SModel.load(model)
    assert trained.genes.genes[0] == data.var_names[0]  # a model trained on ids speaks ids
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(model), "--data", str(path), "--perturbations", "STAT1,JAK2",
                 "--n-cells", "12", "--out", str(pred)]) == 0
    p = ad.read_h5ad(pred)
    assert list(p.var_names) == list(data.var_names)  # the user's ids, version suffix included
    panel = tmp_path / "panel.txt"
    panel.write_text("STAT1\nIFNGR1\n")
    assert main(["screen", "--model", str(model), "--data", str(path), "--panel", str(panel), "--n-cells", "8",
                 "--top", "2", "--out", str(tmp_path / "screen")]) == 0
    assert main(["evaluate", "--pred", str(pred), "--real", str(path), "--baselines", "nochange",
                 "--profile", "pearson", "--out", str(tmp_path / "eval")]) == 0
    out = capsys.readouterr().out
    assert f"- genes: {data.n_vars} shared" in out
    # --gene-key: the symbols column; the same model refuses symbols it never saw, and says what to do
    assert main(["predict", "--model", str(model), "--data", str(path), "--gene-key", "symbol", "--perturbations",
                 "STAT1", "--n-cells", "4", "--out", str(tmp_path / "p2.h5ad")]) == 2
    assert "--gene-key" in capsys.readouterr().err


def test_a_model_trained_with_gene_key_reads_new_cells_the_same_way(screen_ids, tmp_path):
    data, path = screen_ids
    model = tmp_path / "model"
    assert main(["train", "--data", str(path), "--perturbation-key", "perturbation", "--control", "control",
                 "--gene-key", "symbol", "--top-k", "15", "--hidden-size", "32", "--layers", "1", "--heads", "2",
                 "--max-steps", "2", "--batch-size", "8", "--out", str(model)]) == 0
    trained = vc.C2SModel.load(model)
    assert trained.contract.gene_key == "symbol" and "STAT1" in trained.genes
    pred = tmp_path / "pred.h5ad"  # no --gene-key: the checkpoint remembers the column
    assert main(["predict", "--model", str(model), "--data", str(path), "--perturbations", "STAT1",
                 "--n-cells", "4", "--out", str(pred)]) == 0
    written = ad.read_h5ad(pred)
    assert list(written.var_names) == list(data.var["symbol"])
    # the baseline's own ids beside: without them a concat with the measured cells (indexed by id) shared no gene
    assert list(written.var["var_names_before_gene_key"]) == list(data.var_names)
    assert written.uns["log1p"] == {"base": None}  # X is log1p, marked as scanpy marks it
    assert main(["predict", "--model", str(model), "--data", str(path), "--perturbations", "STAT1", "--n-cells", "4",
                 "--format", "cell-eval", "--out", str(tmp_path / "ce.h5ad")]) == 0
    ce = ad.read_h5ad(tmp_path / "ce.h5ad")  # the cell-eval form keeps both (a concat dropped them)
    assert list(ce.var["var_names_before_gene_key"]) == list(data.var_names) and ce.uns["log1p"] == {"base": None}
    # the verdict run again finds the same cells through the same column (the data hash is of the symbols' data)
    before = trained.verdict
    assert main(["verdict", "--model", str(model), "--data", str(path), "--verdict-samples", "1"]) == 0
    again = vc.C2SModel.load(model).verdict
    assert before is not None and again["perturbations"] == before["perturbations"]
    assert again["n_cells"] == before["n_cells"]


def test_knockouts_named_by_symbol_in_an_id_screen_are_linked_to_their_genes(screen_ids, tmp_path):
    """Genes as Ensembl ids, knockouts labelled by symbol (STAT1), the symbols in a var column: the trainer links
    each target to its gene, so the model knows which gene a knockout removes (its own token, the target offsets,
    the coexpression baseline and prior), and 'ko:STAT1' or an untrained 'ko:STAT2' find it too."""
    from virtualcell.train import TrainConfig, train

    data, _ = screen_ids
    stat1 = data.var_names[list(data.var["symbol"]).index("STAT1")].upper()
    cfg = TrainConfig(top_k=15, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0)
    model = train(data, out=tmp_path / "m", config=cfg, progress=False)
    vocab = model.perturbations
    assert vocab.aliases["STAT1"] == stat1 and str(vocab.resolve("STAT1")) == f"ko:{stat1}"
    assert vocab.resolve("ko:STAT1") == vocab.resolve("STAT1")  # typed by symbol: the same gene
    assert model.genes.index(stat1) >= 0
    stat2 = vc.perturbations.parse("ko:STAT2")  # measured, not in this training subset
    assert vocab.resolve(stat2).target == data.var_names[list(data.var["symbol"]).index("STAT2")].upper()
    assert vocab.labels_for([vocab.resolve(stat2)]) == ["STAT2"]  # named as the labels name knockouts: by symbol
    again = vc.C2SModel.load(tmp_path / "m")  # kept in the checkpoint
    assert again.perturbations.aliases == vocab.aliases
    # a screen whose labels are the gene names themselves gets no aliases
    plain = train(data[:, :].copy(), out=tmp_path / "m2", config=cfg, progress=False, gene_key="symbol")
    assert plain.perturbations.aliases == {}


def test_evaluate_baselines_link_symbol_labels_to_id_genes(papalexi_small):
    """evaluate's coexpression and linear baselines find the knocked-out gene through the same link as the
    trainer (sentences.target_aliases): the same figures whether the genes are symbols or ids."""
    tables = []
    for data in (papalexi_small, _ensembl(papalexi_small)):
        base, ref = vc.evaluate.split_controls(data, seed=0)
        t = vc.evaluate.evaluate(None, ref, baseline=base, profile="pearson", baselines=("coexpression", "linear"),
                                 ceiling=False)
        tables.append(t.groupby(["method", "perturbation", "metric"])["value"].mean())
    assert (tables[0].loc["coexpression"].size > 0) and tables[0].index.equals(tables[1].index)
    np.testing.assert_allclose(tables[0].to_numpy(), tables[1].to_numpy(), rtol=1e-5, atol=1e-6)


def test_text_model_refuses_ids_and_names_the_flag(screen_ids):
    from virtualcell.train import train

    data, _ = screen_ids
    with pytest.raises(VocabularyError, match=r"--base 'some/model' is a text model.*--gene-key COLUMN"):
        train(data, out="unused", base="some/model")


def test_baseline_spelled_differently_keeps_its_own_spelling(tiny_model):
    model, _, data = tiny_model
    ctrl = data[data.obs["perturbation"] == "control"][:16].copy()
    # mixed and mouse-style case: the model's names are upper case, the baseline's are not
    ctrl.var_names = [g.capitalize() if i % 2 else g for i, g in enumerate(ctrl.var_names)]
    sim = vc.Simulator(ctrl, model)
    res = sim.simulate(["STAT1"], n_cells=4, progress=False)
    assert res.genes == list(ctrl.var_names)  # e.g. 'Stat1', not the model's 'STAT1'
    assert list(res.to_anndata().var_names) == list(ctrl.var_names)
    plain = vc.Simulator(data[data.obs["perturbation"] == "control"][:8].copy(), model)
    assert "C10orf11" in plain.gene_names and "C10ORF11" not in plain.gene_names  # not upper-cased any more
    # a knockout never trained on is named by its gene as the baseline spells it (as measured data labels it)
    never = next(g for g in ctrl.var_names if g.upper() not in model.perturbations.labels and g != g.upper())
    res = sim.simulate([f"ko:{never}"], n_cells=2, progress=False)
    assert list(res.to_anndata().obs["perturbation"].unique()) == [never]


def test_version_suffix_differences_are_matched_with_a_warning(screen_ids, tmp_path):
    data, _ = screen_ids
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=15, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0)
    model = train(data, out=tmp_path / "m", config=cfg, progress=False)
    other = data[data.obs["perturbation"] == "control"][:10].copy()
    other.var_names = [g.split(".")[0] + ".99" for g in other.var_names]  # another annotation release
    with pytest.warns(UserWarning, match=r"Ensembl version suffix"):
        sim = vc.Simulator(other, model)
    assert sim.gene_names[: 3] == list(other.var_names[:3])
    # a knockout and an objective name a gene as genes are matched everywhere: without the version, or by the
    # symbol the training data linked to the id (both were refused: 'neither a gene of this model ...')
    stat1 = data.var_names[list(data.var["symbol"]).index("STAT1")]
    jak2 = data.var_names[list(data.var["symbol"]).index("JAK2")]
    assert model.resolve([f"ko:{jak2.split('.')[0]}"]) == model.resolve([f"ko:{jak2.split('.')[0]}.99"]) \
        == model.resolve([f"ko:{jak2}"])
    res = sim.screen(["STAT1"], objective="raise:STAT1,stat1,JAK2", out=tmp_path / "s", progress=False, n_boot=5,
                     n_cells=4)
    delta = res.aggregates["delta"].sel(perturbation=res.ranking["perturbation"][0]).to_pandas()
    by_id = {g.split(".")[0]: v for g, v in delta.items()}
    want = (by_id[stat1.split(".")[0]] + by_id[jak2.split(".")[0]]) / 2  # STAT1 once, however often named
    assert res.ranking["score"][0] == pytest.approx(want, abs=1e-4) or res.ranking["score_low"][0] <= want


# --------------------------------------------------------------------------- #
# evaluate: shared genes, values, and which input is to blame
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def split(papalexi_small):
    return vc.evaluate.split_controls(papalexi_small, seed=0)


def test_evaluate_matches_case_with_a_warning_and_refuses_few_shared_genes(split):
    base, ref = split
    pred = vc.evaluate.baselines.pertmean(ref, baseline=base, max_cells=20)
    upper = pred.copy()
    upper.var_names = [g.upper() for g in pred.var_names]  # what predictions used to write
    with pytest.warns(UserWarning, match=r"case and Ensembl version suffixes are ignored.*'C10ORF11' = 'C10orf11'"):
        t = vc.evaluate.evaluate(upper, ref, baseline=base, profile="pearson", baselines=(), ceiling=False)
    assert t.attrs["virtualcell"]["n_genes"] == ref.n_vars == 299
    mouse = pred.copy()
    mouse.var_names = [f"{g}_mm" for g in pred.var_names[:-1]] + [pred.var_names[-1]]
    with pytest.raises(DataError, match=r"share only 1 gene names, 0% .*pred: 299 genes, e.g. '\w+_mm'"):
        vc.evaluate.evaluate(mouse, ref, baseline=base, profile="pearson", baselines=(), ceiling=False)
    t = vc.evaluate.evaluate(pred[:, pred.var_names[:250]].copy(), ref, baseline=base, profile="pearson",
                             baselines=(), ceiling=False)  # the smaller input fully shared: fine
    assert t.attrs["virtualcell"]["n_genes"] == 250


def test_evaluate_names_the_input_with_bad_values(split):
    base, ref = split
    bad = ref.copy()
    bad.X = bad.X.toarray().astype(np.float32) if hasattr(bad.X, "toarray") else bad.X.astype(np.float32)
    bad.X[0, 0] = -1.0
    with pytest.raises(DataError, match=r"measured \(real=, --real\) expression holds 1 negative"):
        vc.evaluate.evaluate(None, bad, baseline=base, profile="pearson", baselines=("nochange",))
    bad.X[0, 0] = np.nan
    whole = bad.copy()
    with pytest.raises(DataError, match=r"measured \(real=, --real\) expression holds 1 NaN"):
        vc.evaluate.evaluate(None, whole, profile="pearson", baselines=("nochange",))  # controls split here


def test_evaluate_gene_key_maps_the_inputs_that_have_the_column_and_names_one_that_cannot(split):
    """A measured file of Ensembl ids with a symbol column, a prediction named by symbols: the gene key maps the
    inputs that have the column and the others keep their names; a key no input has is refused, naming each's."""
    base, ref = split
    pred = ref[~ref.obs["is_control"].astype(bool).to_numpy()].copy()
    ids_ref, ids_base = _ensembl(ref), _ensembl(base)
    table = vc.evaluate.evaluate(pred, ids_ref, baseline=ids_base, gene_key="symbol", profile="fast", baselines=(),
                                 ceiling=False)
    assert table.loc[(table["method"] == "model") & (table["metric"] == "mae"), "value"].max() < 1e-6
    with pytest.raises(DataError, match=r"--gene-key 'symbl' is a var column of no input: measured.*'symbol'"):
        vc.evaluate.evaluate(pred, ids_ref, baseline=ids_base, gene_key="symbl", profile="fast", baselines=(),
                             ceiling=False)
