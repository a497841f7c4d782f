"""Simulator and screens: results, resumption, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import virtualcell as vc
from virtualcell.errors import PerturbationError, ScreenError
from virtualcell.screen import screen

PANEL = ["STAT1", "JAK2", "IFNGR1", "ko:PSMB9", "IFNGR1+IRF1"]


@pytest.fixture(scope="module")
def sim(tiny_model):
    model, _, data = tiny_model
    ctrl = data[data.obs.perturbation == "control"][:12].copy()
    return vc.Simulator(model, ctrl)


def test_simulate_gives_xarray_and_anndata(sim):
    res = sim.simulate(["STAT1", "ko:JAK2"], seed=0, progress=False)
    agg = res.aggregates
    assert agg["delta"].dims == ("perturbation", "gene") and list(agg["perturbation"].values) == ["ko:STAT1", "ko:JAK2"]
    assert agg.attrs["invalid_genes"] == 0 and agg.attrs["duplicate_genes"] == 0
    np.testing.assert_allclose(agg["mean"].values, res.cells.values.mean(axis=1), atol=1e-4)
    a = res.to_anndata()
    assert a.n_obs == 24 and set(a.obs["perturbation"]) == {"ko:STAT1", "ko:JAK2"}


def test_interrupted_screen_resumes_to_identical_results(sim, tmp_path):
    with pytest.raises(KeyboardInterrupt):
        screen(sim, PANEL, out=tmp_path / "a", group_size=2, stop_after_groups=1, progress=False, n_boot=20)
    resumed = screen(sim, PANEL, out=tmp_path / "a", group_size=2, progress=False, n_boot=20, top=2)
    fresh = screen(sim, PANEL, out=tmp_path / "b", group_size=2, progress=False, n_boot=20, top=2)
    assert list(resumed.ranking["perturbation"]) == list(fresh.ranking["perturbation"])
    np.testing.assert_allclose(resumed.ranking["score"], fresh.ranking["score"])
    assert resumed.ranking["pick"].sum() == 2
    for f in ("ranking.csv", "ranking.parquet", "aggregates.nc", "top_hits.png", "config.json"):
        assert (tmp_path / "a" / f).exists()


def test_folder_of_another_screen_is_refused(sim, tmp_path):
    screen(sim, PANEL[:2], out=tmp_path, progress=False, n_boot=5)
    with pytest.raises(ScreenError, match="different screen.*panel"):
        screen(sim, PANEL[:3], out=tmp_path, progress=False, n_boot=5)


def test_signature_with_unknown_genes_names_them(sim):
    with pytest.raises(ScreenError, match="NOTAGENE"):
        screen(sim, PANEL[:2], objective="raise:NOTAGENE,STAT1", progress=False)


def test_unrepresentable_perturbation(sim):
    with pytest.raises(PerturbationError, match="not trained on the drug"):
        screen(sim, ["drug:aspirin@1uM"], progress=False)
