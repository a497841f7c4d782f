"""Datasets and the data contract."""

from __future__ import annotations

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


def test_local_copy_missing_names_the_folders(monkeypatch, tmp_path):
    monkeypatch.setattr(vc.datasets, "data_dirs", lambda: [tmp_path])
    with pytest.raises(DataError, match="VIRTUALCELL_DATA"):
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
