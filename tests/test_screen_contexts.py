"""Screens over several contexts (cell types) say what they did: which (perturbation, context) pairs the model
measured, which candidates a screen serves another context's measured effect, and how many ranked cells each context
holds (from a sweep of multi-context screens)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

import virtualcell as vc
from conftest import trained_tiny
from virtualcell.screen import run as screen

ONLY_A = "GENE030"  # measured in typeA only; typeC: controls only


@pytest.fixture(scope="module")
def three_contexts(tmp_path_factory):
    """A tiny model (two steps) of a synthetic screen of three cell types: typeA and typeB perturbed, typeC controls
    only, GENE030 measured in typeA alone; its data, and where it was saved."""
    data = vc.datasets.synthetic_screen(n_genes=60, n_tfs=8, n_knockouts=6, n_pairs=0, n_drugs=0, n_cytokines=0,
                                        n_contexts=3, n_cells_per_condition=20, n_control_cells=60, seed=0)
    obs = data.obs
    keep = ~((obs.perturbation == ONLY_A) & (obs.cell_type != "typeA"))
    keep &= ~((obs.cell_type == "typeC") & (obs.perturbation != "control"))
    data = data[keep.to_numpy()].copy()
    out = tmp_path_factory.mktemp("three_contexts")
    return trained_tiny(data, out / "model"), data, out


def _controls(data, *types: str, n: int = 8):  # noqa: ANN001, ANN202
    """The first ``n`` control cells of each of ``types``, in that order."""
    import anndata as ad

    ctrl = data[(data.obs.perturbation == "control").to_numpy()]
    out = ad.concat([ctrl[(ctrl.obs.cell_type == t).to_numpy()][:n] for t in types], merge="same")
    out.obs_names_make_unique()
    return out


def test_the_model_lists_the_contexts_each_condition_was_measured_in(three_contexts, capsys):
    """The served baselines kept each context's own effect, but nothing public said which pairs were measured; now
    C2SModel.measured_contexts / measured_pairs do, and the card (virtualcell info) names the partial ones."""
    from virtualcell.cli import main

    model, _, out = three_contexts
    only_a, both, never = model.resolve([ONLY_A, "TF01", "ko:TF03"])
    assert model.measured_contexts(only_a) == ("typeA",)
    assert model.measured_contexts(both) == ("typeA", "typeB")
    assert model.measured_contexts(never) == ()  # measured nowhere (an extrapolation, trained False)
    # a label reads as resolve reads it ('TF01' was read as a plain label, and said to be measured nowhere)
    assert model.measured_contexts("TF01") == ("typeA", "typeB") and model.measured_contexts(ONLY_A) == ("typeA",)
    pairs = model.measured_pairs()
    assert pairs[str(only_a)] == ("typeA",) and pairs[str(both)] == ("typeA", "typeB") and str(never) not in pairs
    # the same answer as what is served: typeB's cells get typeA's effect of GENE030 (the mean over where measured)
    b = model.baselines
    served, source = b.delta_for(only_a, context="typeB")
    np.testing.assert_allclose(served, b.delta_for(only_a, context="typeA")[0])
    assert source == "meanshift"
    assert main(["info", "--model", str(out / "model")]) == 0
    text = capsys.readouterr().out
    assert "1 of 6 conditions in only some of the contexts seen perturbed: ko:GENE030 in typeA" in text
    assert main(["info", "--model", str(out / "model"), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card["measured"][str(only_a)] == ["typeA"] and card["measured"][str(both)] == ["typeA", "typeB"]


def test_a_model_of_one_context_or_none_says_so(three_contexts, tmp_path):
    """One context trained (its baselines keep no per-context record): every measured condition was measured there,
    so a screen of another cell type names it; without a context column nothing can be told (None)."""
    _, data, _ = three_contexts
    one = data[(data.obs.cell_type == "typeA").to_numpy()].copy()
    model = trained_tiny(one, tmp_path / "one")
    assert model.baselines.own_rows is None  # (one context: its own effects are the means)
    (tf01,) = model.resolve(["TF01"])
    assert model.measured_contexts(tf01) == ("typeA",) and model.measured_pairs()[str(tf01)] == ("typeA",)
    res = screen(vc.Simulator(_controls(data, "typeB"), model, warn_new_contexts=False), ["TF01"], progress=False,
                 n_boot=5, top=1)
    assert res.ranking["unmeasured_in"].tolist() == [["typeB"]]
    plain = trained_tiny(one, tmp_path / "plain", contract=vc.DataContract(perturbation_key="perturbation",
                                                                            control="control"))
    assert plain.contract.context_key is None
    assert plain.measured_contexts(tf01) is None and plain.measured_pairs() is None
    assert plain.card()["measured"] is None


def test_a_screen_names_the_contexts_each_candidate_was_never_measured_in(three_contexts, caplog):
    """Screening typeB cells served GENE030 typeA's measured effect with trained=True, nothing logged, nothing
    marked; a screen of typeC (controls only) was trained=True throughout. Now `unmeasured_in` names the contexts and
    one INFO line counts the transfers; `trained` keeps its meaning."""
    model, data, _ = three_contexts
    panel = [ONLY_A, "TF02", "ko:TF03"]
    with caplog.at_level(logging.INFO, logger="virtualcell.screen"):
        res = screen(vc.Simulator(_controls(data, "typeB"), model), panel, progress=False, n_boot=5, top=1)
    rows = res.ranking.set_index("perturbation")
    assert rows["unmeasured_in"].to_dict() == {"ko:GENE030": ["typeB"], "ko:TF02": [], "ko:TF03": ["typeB"]}
    assert rows["trained"].to_dict() == {"ko:GENE030": True, "ko:TF02": True, "ko:TF03": False}
    said = [r.getMessage() for r in caplog.records if "unmeasured_in" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("1 of the panel's 3 candidates were never measured in some")
    assert "ko:GENE030 (not in typeB)" in said[0] and "TF03" not in said[0]  # (measured nowhere: no transfer)
    # a context only controls were measured in: every candidate is a transfer there
    only_c = screen(vc.Simulator(_controls(data, "typeC"), model, warn_new_contexts=False), panel[:2],
                    progress=False, n_boot=5, top=1)
    assert only_c.ranking["unmeasured_in"].tolist() == [["typeC"], ["typeC"]]
    assert only_c.ranking["trained"].all()
    # measured in every context ranked: empty
    home = screen(vc.Simulator(_controls(data, "typeA", "typeB"), model), ["TF02"], progress=False, n_boot=5, top=1)
    assert home.ranking["unmeasured_in"].tolist() == [[]]


def test_a_mixed_screen_records_its_composition_and_resumes_an_older_folder(three_contexts, tmp_path):
    """A screen of three cell types recorded nowhere how many cells of each it ranked; now config.json, the
    aggregates' attrs and the ranking's provenance do (and load() gives them back). The record is no part of what
    makes a screen the same one: a folder written before it existed resumes, to the files of an uninterrupted run."""
    model, data, _ = three_contexts
    sim = vc.Simulator(_controls(data, "typeA", "typeB", "typeC", n=6), model, warn_new_contexts=False)
    panel = [ONLY_A, "TF01", "TF02", "TF04"]
    with pytest.raises(KeyboardInterrupt):
        screen(sim, panel, out=tmp_path / "a", group_size=2, stop_after_groups=1, progress=False, n_boot=5, top=2)
    old = json.loads((tmp_path / "a" / "config.json").read_text())
    assert old["baseline_contexts"] == {"typeA": 6, "typeB": 6, "typeC": 6}
    del old["baseline_contexts"]  # as an older virtualcell wrote it
    (tmp_path / "a" / "config.json").write_text(json.dumps(old, indent=1))
    resumed = screen(sim, panel, out=tmp_path / "a", group_size=2, progress=False, n_boot=5, top=2)
    fresh = screen(sim, panel, out=tmp_path / "b", group_size=2, progress=False, n_boot=5, top=2)
    for f in ("config.json", "ranking.csv", "ranking.parquet", "aggregates.nc"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    counts = {"typeA": 6, "typeB": 6, "typeC": 6}
    for res in (resumed, fresh, vc.screen.load(tmp_path / "a")):
        assert res.config["baseline_contexts"] == counts
        assert res.ranking.attrs["virtualcell"]["baseline_contexts"] == counts
        assert json.loads(res.aggregates.attrs["baseline_contexts"]) == counts
        assert res.ranking.set_index("perturbation").loc["ko:GENE030", "unmeasured_in"] == ["typeB", "typeC"]
    import pandas as pd

    csv = pd.read_csv(tmp_path / "a" / "ranking.csv").set_index("perturbation")
    assert csv.loc["ko:GENE030", "unmeasured_in"] == "typeB;typeC" and csv.loc["ko:TF01", "unmeasured_in"] == "typeC"


def test_the_cli_says_the_baseline_spans_several_contexts_and_which_candidates_were_never_measured(
        three_contexts, tmp_path, capsys):
    """`virtualcell screen` on a file of three cell types printed "baseline: the 180 control cells … of data.h5ad"
    and nothing of the cell types; now the line counts them, says the ranking pools them and how to rank one, and the
    table shows `unmeasured_in`; with --n-cells that takes one cell type's cells, the line says so."""
    from virtualcell.cli import main

    _, data, out = three_contexts
    data.write_h5ad(tmp_path / "data.h5ad")
    (tmp_path / "panel.txt").write_text(f"{ONLY_A}\nTF02\n")
    args = ["screen", "--model", str(out / "model"), "--data", str(tmp_path / "data.h5ad"), "--panel",
            str(tmp_path / "panel.txt"), "-q", "--top", "1"]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    text = capsys.readouterr().out
    assert ("180 control cells (perturbation == 'control') of " in text
            and "of 3 contexts in obs['cell_type'] (typeA: 60, typeB: 60, typeC: 60)" in text)
    assert "the ranking pools them" in text and "adata[adata.obs['cell_type'] == 'typeA']" in text
    header = next(line for line in text.splitlines() if line.lstrip().startswith("rank"))
    assert header.rstrip().endswith("unmeasured_in")
    assert any("ko:GENE030" in line and line.rstrip().endswith("typeB, typeC") for line in text.splitlines())
    assert main([*args, "--out", str(tmp_path / "first"), "--n-cells", "8"]) == 0
    text = capsys.readouterr().out
    assert "the first 8 of the 180 control cells" in text and "all of cell_type 'typeA'" in text
    assert "pools" not in text
