"""Simulator and screens: results, resumption, and bad input."""

from __future__ import annotations

import numpy as np
import pytest

import virtualcell as vc
from virtualcell.errors import PerturbationError, ScreenError
from virtualcell.screen import run as screen

PANEL = ["STAT1", "JAK2", "IFNGR1", "ko:PSMB9", "IFNGR1+IRF1"]


@pytest.fixture(scope="module")
def sim(tiny_model):
    model, _, data = tiny_model
    ctrl = data[data.obs.perturbation == "control"][:12].copy()
    return vc.Simulator(ctrl, model)


def test_simulate_gives_xarray_and_anndata(sim):
    res = sim.simulate(["STAT1", "ko:JAK2"], seed=0, progress=False)
    agg = res.aggregates
    assert agg["delta"].dims == ("perturbation", "gene") and list(agg["perturbation"].values) == ["ko:STAT1", "ko:JAK2"]
    assert agg.attrs["invalid_genes"] == 0 and agg.attrs["duplicate_genes"] == 0
    np.testing.assert_allclose(agg["mean"].values, res.cells.values.mean(axis=1), atol=1e-4)
    a = res.to_anndata()
    assert a.n_obs == 24 and set(a.obs["perturbation"]) == {"STAT1", "JAK2"}  # the training labels
    assert set(a.obs["perturbation_typed"]) == {"ko:STAT1", "ko:JAK2"}


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


def test_predictions_on_disk_write_the_same_h5ad_as_in_memory(sim, tmp_path):
    import anndata as ad

    mem = sim.simulate(["STAT1", "ko:JAK2"], seed=3, progress=False, keep_cells=True)
    disk = sim.simulate(["STAT1", "ko:JAK2"], seed=3, progress=False, store=tmp_path / "cells.nc")
    assert disk.store is not None
    disk.write_h5ad(tmp_path / "pred.h5ad")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    ref = mem.to_anndata()
    assert list(back.obs_names) == list(ref.obs_names) and list(back.var_names) == list(ref.var_names)
    np.testing.assert_allclose(back.X, ref.X, atol=1e-6)
    assert back.uns["virtualcell"]["normalization"] == ref.uns["virtualcell"]["normalization"]


def _baseline_file(tiny_model, tmp_path):
    _, _, data = tiny_model
    path = tmp_path / "baseline.h5ad"
    data[data.obs.perturbation == "control"][:6].copy().write_h5ad(path)
    return path


def test_cli_predict_writes_predictions_with_the_model_genes(tiny_model, tmp_path):
    import anndata as ad

    from virtualcell.cli import main

    model, folder, _ = tiny_model
    base = _baseline_file(tiny_model, tmp_path)
    for big, name in ((False, "mem.h5ad"), (True, "disk.h5ad")):
        assert main(["predict", "--model", str(folder), "--data", str(base), "--perturbations", "STAT1,ko:JAK2",
                     "--seed", "1", "--max-in-memory", str(0 if big else 10**9), "--out", str(tmp_path / name)]) == 0
    mem, disk = ad.read_h5ad(tmp_path / "mem.h5ad"), ad.read_h5ad(tmp_path / "disk.h5ad")
    assert mem.n_obs == 12 and list(mem.var_names) == list(model.genes.genes)
    assert set(mem.obs["perturbation"]) == {"STAT1", "JAK2"}
    np.testing.assert_allclose(mem.X, disk.X, atol=1e-6)  # the streamed file is the same prediction
    assert not list(tmp_path.glob(".vc-predict-*"))  # the temporary store is gone


def test_cli_panel_error_names_the_line(tiny_model, tmp_path, capsys):
    from virtualcell.cli import main

    _, folder, _ = tiny_model
    base = _baseline_file(tiny_model, tmp_path)
    panel = tmp_path / "panel.txt"
    panel.write_text("# knockouts\nko:STAT1\n\nko:JAK2 ++ drug:\n")
    code = main(["screen", "--model", str(folder), "--data", str(base), "--panel", str(panel), "--out",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code != 0 and "line 4" in err and "ko:JAK2 ++ drug:" in err
