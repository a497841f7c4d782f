"""Datasets and the data contract."""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.errors import ContractError, DataError


def test_embedded_default_loads_offline_with_its_contract(papalexi):
    assert papalexi.shape == (20729, 299)
    c = DataContract.from_adata(papalexi)
    assert c == DataContract("perturbation", "control")
    assert len(c.perturbations(papalexi)) == 25
    assert "MIT" in papalexi.uns["virtualcell"]["dataset"]["license"]


def test_second_embedded_dataset_has_contexts():
    a = vc.datasets.load("perturbench")
    c = DataContract.from_adata(a)
    assert c.context_key == "cell_type"
    assert set(c.contexts(a)) == {"k562", "A172", "T98G", "U87MG"}


def test_unknown_dataset_suggests_names():
    with pytest.raises(DataError, match="Did you mean 'papalexi2021'"):
        vc.datasets.load("papalexi2012")


def test_pertpy_loader_offline_gives_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("VIRTUALCELL_CACHE", str(tmp_path))
    import pertpy as pt

    def offline():
        raise ConnectionError("no network")

    monkeypatch.setattr(pt.data, "norman_2019", offline)
    with pytest.raises(DataError, match=r"needs the internet.*read_h5ad"):
        vc.datasets.load("norman_2019")


def test_sciplex3_reads_its_dose_unit_column_and_loads_without_one(monkeypatch, tmp_path, caplog):
    """sci-Plex 3 keeps each dose's unit in its own column (dose_value beside dose_unit): the dataset reads the
    doses in it; a download without that column loads with its doses as plain numbers, saying so, not refused."""
    import anndata as ad
    import pandas as pd

    monkeypatch.setenv("VIRTUALCELL_CACHE", str(tmp_path))
    import pertpy as pt

    obs = pd.DataFrame({"perturbation": ["control"] * 2 + ["drugA"] * 4, "cell_line": ["A549"] * 6,
                        "dose_value": [0.0, 0.0, 10.0, 10.0, 10000.0, 10000.0], "dose_unit": [None] * 2 + ["nM"] * 4,
                        "time": [24.0] * 6}, index=[f"c{i}" for i in range(6)])
    file = ad.AnnData(np.ones((6, 3), dtype=np.float32), obs=obs, var=pd.DataFrame(index=["G1", "G2", "G3"]))
    monkeypatch.setattr(pt.data, "srivatsan_2020_sciplex3", lambda: file.copy())
    adata = vc.datasets.load("sciplex3")
    contract = vc.DataContract.from_adata(adata)
    assert contract.dose_unit_key == "dose_unit"
    assert contract.dose_units(adata) == {"drugA": "nM"}  # (without the column: {}, the doses' unit unknown)
    assert sorted(set(contract.conditions(adata))) == ["control", "drugA@10,24h", "drugA@10000,24h"]
    monkeypatch.setattr(pt.data, "srivatsan_2020_sciplex3",
                        lambda: ad.AnnData(file.X.copy(), obs=obs.drop(columns="dose_unit"), var=file.var.copy()))
    with caplog.at_level("WARNING"):
        plain = vc.datasets.load("sciplex3")
    assert "has no dose unit column 'dose_unit'" in caplog.text
    plain_contract = vc.DataContract.from_adata(plain)
    assert plain_contract.dose_unit_key is None and plain_contract.dose_units(plain) == {}


def test_a_download_cache_that_cannot_be_made_names_the_setting(monkeypatch, tmp_path):
    """A read-only home: a bare PermissionError from the cache folder, before any download was tried."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("VIRTUALCELL_CACHE", str(blocker / "cache"))  # under a file: no folder can be made
    with pytest.raises(DataError, match=r"Cannot create the download cache .*\$VIRTUALCELL_CACHE"):
        vc.datasets.load("norman_2019")


def test_local_copy_missing_names_the_folders(monkeypatch, tmp_path):
    monkeypatch.setattr(vc.datasets, "data_dirs", lambda: [tmp_path])
    with pytest.raises(DataError, match="VIRTUALCELL_DATA.*datasets.available"):
        vc.datasets.load("kang2018_scgen")


def test_read_h5ad_validates_the_contract(tmp_path, papalexi_small):
    path = tmp_path / "screen.h5ad"
    papalexi_small.write_h5ad(path)
    a = vc.datasets.read_h5ad(path, contract=DataContract("perturbation", "control"))
    assert a.n_obs == 2000
    with pytest.raises(ContractError, match=r"control label 'ctrl' does not occur.*'control'"):
        vc.datasets.read_h5ad(path, contract=DataContract("perturbation", "ctrl"))
    with pytest.raises(DataError, match="No such file"):
        vc.datasets.read_h5ad(tmp_path / "missing.h5ad")


def test_unknown_perturbation_column_is_named_with_a_hint(papalexi_small):
    with pytest.raises(ContractError, match=r"column 'perturbaton' is not in adata.obs. Did you mean 'perturbation'"):
        DataContract("perturbaton", "control").validate(papalexi_small)


def test_missing_control_label(papalexi_small):
    with pytest.raises(ContractError, match="control label 'NT' does not occur"):
        DataContract("perturbation", "NT").validate(papalexi_small)


def test_empty_anndata_contract():
    with pytest.raises(ContractError, match="no cells"):
        DataContract().validate(ad.AnnData(np.zeros((0, 2))))


def test_missing_values_in_a_contract_column():
    a = ad.AnnData(np.ones((3, 2)), obs=pd.DataFrame({"perturbation": ["control", None, "A"]}, index=list("abc")))
    with pytest.raises(ContractError, match="1 missing values"):
        DataContract().validate(a)


def test_contract_round_trips_through_h5ad(tmp_path):
    a = ad.AnnData(np.ones((2, 2)), obs=pd.DataFrame({"p": ["c", "x"], "ct": ["u", "v"]}, index=["a", "b"]))
    c = DataContract("p", "c", context_key="ct")
    c.attach(a)
    a.write_h5ad(tmp_path / "a.h5ad")
    assert DataContract.from_adata(ad.read_h5ad(tmp_path / "a.h5ad")) == c


def test_several_control_labels_are_read_as_one(tmp_path):
    """Screens often label their controls several ways (one label per non-targeting guide): other_controls (CLI:
    --control NT_1,NT_2) reads every one as the first, for the contract, its round trips and the CLI's parsing."""
    from virtualcell.contract import control_labels

    obs = pd.DataFrame({"g": ["NT_1", "NT_2", "A", "B", "NT_2", "NT_3"]}, index=list("abcdef"))
    a = ad.AnnData(np.ones((6, 2)), obs=obs)
    c = DataContract("g", "NT_1", other_controls=["NT_2", "NT_3", "NT_1"])  # the first again: dropped
    assert c.other_controls == ("NT_2", "NT_3") and c.controls == ("NT_1", "NT_2", "NT_3")
    assert list(c.labels(a)) == ["NT_1", "NT_1", "A", "B", "NT_1", "NT_1"]
    assert c.is_control(a).sum() == 4 and c.perturbations(a) == ["A", "B"]
    c.validate(a)
    c.attach(a)
    a.write_h5ad(tmp_path / "a.h5ad")
    assert DataContract.from_adata(ad.read_h5ad(tmp_path / "a.h5ad")) == c
    assert DataContract.from_dict(json.loads(c.to_json())) == c
    with pytest.raises(ContractError, match=r"None of the control labels 'X', 'Y' occurs"):
        DataContract("g", "X", other_controls=("Y",)).validate(a)
    with pytest.raises(ContractError, match="takes a list of labels"):
        DataContract("g", "NT_1", other_controls="NT_2")
    assert control_labels(" NT_1, NT_2 ,") == ("NT_1", ("NT_2",)) and control_labels("ctrl") == ("ctrl", ())
    with pytest.raises(ContractError, match="names no label"):
        control_labels(" , ")


def test_several_control_labels_through_train_predict_and_evaluate(papalexi, tmp_path, capsys):
    from virtualcell.cli import main

    rng = np.random.default_rng(0)
    keep = papalexi.obs["perturbation"].isin(["control", "STAT1", "JAK2"]).to_numpy()
    data = papalexi[np.sort(rng.choice(np.flatnonzero(keep), 300, replace=False))].copy()
    data.uns.pop("virtualcell", None)
    labels = data.obs["perturbation"].astype(str).to_numpy()
    ctrl = np.flatnonzero(labels == "control")
    labels[ctrl[1::2]] = "NT_2"  # half the controls under a second guide's label
    data.obs["guide"] = labels
    path = tmp_path / "screen.h5ad"
    data.write_h5ad(path)
    tiny = ["--top-k", "15", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--max-steps", "2",
            "--batch-size", "8", "--verdict-fraction", "0"]
    assert main(["train", "--data", str(path), "--perturbation-key", "guide", "--control", "control,NT_2",
                 "--out", str(tmp_path / "m"), *tiny]) == 0
    model = vc.C2SModel.load(tmp_path / "m")
    assert model.contract.controls == ("control", "NT_2") and set(model.perturbations.labels) == {"STAT1", "JAK2"}
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(tmp_path / "m"), "--data", str(path), "--perturbations", "STAT1",
                 "--n-cells", "6", "--out", str(pred)]) == 0
    assert f"baseline: the first 6 of the {ctrl.size} control cells (guide == 'control' or 'NT_2')" \
        in capsys.readouterr().out
    assert main(["evaluate", "--pred", str(pred), "--real", str(path), "--perturbation-key", "guide",
                 "--control", "control,NT_2", "--baselines", "nochange", "--profile", "pearson", "--no-ceiling",
                 "--out", str(tmp_path / "e")]) == 0
    table = pd.read_csv(tmp_path / "e" / "metrics.csv")
    assert set(table["perturbation"]) == {"STAT1", "JAK2"}  # NT_2 is no perturbation of its own
    assert set(table.loc[table["method"] == "model", "perturbation"]) == {"STAT1"}
    # run again into the folder: a killed run's temporary file and the last run's outputs do not stay beside it
    (tmp_path / "e" / ".metric_bars.x1y2z3w4.partial.png").write_bytes(b"half")
    (tmp_path / "e" / "delta_scatter.png").write_bytes(b"the last run's")
    assert main(["evaluate", "--pred", str(pred), "--real", str(path), "--perturbation-key", "guide",
                 "--control", "control,NT_2", "--baselines", "nochange", "--profile", "pearson", "--no-ceiling",
                 "--out", str(tmp_path / "e")]) == 0
    assert not list((tmp_path / "e").glob(".*.partial.*"))
    assert (tmp_path / "e" / "delta_scatter.png").read_bytes() != b"the last run's"


def test_a_context_of_several_columns(tmp_path):
    """context_key="cell_type+patient": each combination is a context, read from the two columns of the measured
    data and from the two columns predicted cells carry, as the baseline typed them (an integer patient stays an
    integer: a string '1' no longer matched the measured data's 1 in a merge); train, simulate and evaluate agree."""
    from virtualcell.train import TrainConfig, train

    screen = vc.datasets.synthetic_screen(n_genes=30, n_tfs=6, n_knockouts=2, n_pairs=0, n_drugs=0, n_cytokines=0,
                                          n_cells_per_condition=20, n_control_cells=60, n_contexts=2, seed=0)
    screen.uns.pop("virtualcell")
    screen.obs["patient"] = np.where(np.arange(screen.n_obs) % 2 == 0, 1, 2)
    contract = DataContract("perturbation", "control", context_key="cell_type+patient")
    contract.validate(screen)
    ctx = contract.contexts(screen)
    assert set(ctx) == {f"{c}|{p}" for c in set(screen.obs["cell_type"]) for p in (1, 2)}
    assert contract.context_columns(screen) == ["cell_type", "patient"] and contract.has_context(screen)
    with pytest.raises(ContractError, match=r"context column 'donor' is not in adata.obs"):
        DataContract("perturbation", "control", context_key="cell_type+donor").validate(screen)
    joined = screen.copy()  # a value holding the separator would merge ('A|x', 'y') with ('A', 'x|y'): refused
    joined.obs["patient"] = np.where(joined.obs["patient"] == 1, "p1|a", "p2")
    with pytest.raises(ContractError, match=r"'patient' has values holding '\|' \('p1\|a'\)"):
        contract.contexts(joined)
    cfg = TrainConfig(top_k=15, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0,
                      verdict_fraction=0.0)
    model = train(screen, out=tmp_path / "m", contract=contract, config=cfg, progress=False)
    base = screen[contract.is_control(screen)][:10].copy()
    ko = sorted(model.perturbations.labels)[0]
    pred = vc.Simulator(base, model).simulate([ko], keep_cells=True, progress=False, blend=False).to_anndata()
    for col in ("cell_type", "patient"):  # each cell's own context, typed as the baseline types it
        assert list(pred.obs[col]) == list(base.obs[col]) and pred.obs[col].dtype == base.obs[col].dtype, col
    assert list(contract.contexts(pred)) == list(contract.contexts(base))
    table = vc.evaluate.evaluate(pred, screen, context_key="cell_type+patient", profile="pearson",
                                 baselines=("nochange",), ceiling=False)
    assert set(table["context"]) <= set(ctx) and set(table.loc[table["method"] == "model", "perturbation"]) == {ko}


def test_contexts_written_as_whole_floats_are_named_with_the_fix():
    """A patient column turned float by a merge with missing values reads '1.0' where the model trained on '1': the
    new-context warning and evaluate's refusal say so, with the conversion."""
    said = DataContract.whole_floats(["1.0", "2.0", "CD4T"], {"1", "2", "3"})
    assert "'1.0', '2.0' are whole numbers written as floats" in said and ".astype(int)" in said
    assert DataContract.whole_floats(["1.5", "CD4T", "4.0"], {"1", "2", "3"}) == ""
    assert "'CD4T|1.0'" in DataContract.whole_floats(["CD4T|1.0"], {"CD4T|1"})  # a context of two columns too
