"""Scoring a prediction over several contexts (cell types): the predicted cells record the model's context column,
evaluate reads the measured cells' contexts from it where it is told of none (pooled, a prediction from typeA cells
was scored against measured typeB cells as one context 'all', without a word), to_cell_eval warns where the two
files are of other contexts, and the compare notebook passes the contract it found."""

from __future__ import annotations

import argparse
import importlib.util
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.errors import DataError

from conftest import trained_tiny

ROOT = Path(__file__).resolve().parents[1]
KEY = "guide"  # the perturbation column: not the default's, as in most users' files (Kang's 'condition')
KEYS = dict(perturbation_key=KEY, control="control")
FAST = dict(baselines=(), ceiling=False, profile="pearson")
# the tiny model trained on every cell these tests measure: what they check is which cells are compared, not how well
pytestmark = pytest.mark.filterwarnings("ignore:The measured perturbed cells are those the model was trained on")


@pytest.fixture(scope="module")
def screen():
    """Two cell types, each with four knockouts and its control cells; a stored contract naming the context."""
    data = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=4, n_pairs=0, n_drugs=0, n_cytokines=0,
                                        n_contexts=2, n_cells_per_condition=30, n_control_cells=80, seed=0)
    data.obs[KEY] = data.obs["perturbation"].astype(str)
    data.obs = data.obs.drop(columns=["perturbation", "condition"])
    vc.DataContract(KEY, "control", context_key="cell_type").attach(data)
    return data


@pytest.fixture(scope="module")
def model(screen, tmp_path_factory):
    return trained_tiny(screen, tmp_path_factory.mktemp("context_model"))


def plain(adata):
    """``adata`` as a user's file: no stored contract (Kang's, any scanpy file)."""
    out = adata.copy()
    out.uns.pop("virtualcell", None)
    return out


def cells(screen, *, control: bool, contexts=("typeA", "typeB")):
    mask = (screen.obs[KEY] == "control").to_numpy() == control
    return plain(screen[mask & screen.obs["cell_type"].isin(contexts).to_numpy()])


def knockouts(screen):
    return sorted(set(screen.obs[KEY]) - {"control"})


@pytest.fixture(scope="module")
def baselines(screen):
    """Half the control cells of each type (the other half is the measured reference), without a stored contract."""
    ctrl = cells(screen, control=True)
    first = np.zeros(ctrl.n_obs, dtype=bool)
    first[::2] = True
    return ctrl[first].copy(), ctrl[~first].copy()


def predict(model, baseline, screen):
    return vc.Simulator(baseline, model, seed=0).simulate(knockouts(screen), progress=False, blend=False)


@pytest.fixture(scope="module")
def pred_a(model, baselines, screen):
    base = baselines[0][baselines[0].obs["cell_type"] == "typeA"].copy()
    return predict(model, base, screen).to_anndata(), base


@pytest.fixture(scope="module")
def pred_ab(model, baselines, screen):
    return predict(model, baselines[0], screen).to_anndata(), baselines[0]


def measured(screen, baselines, contexts=("typeA", "typeB")):
    """The perturbed cells of ``contexts`` and the reference half of their controls."""
    import anndata as ad

    ref = baselines[1][baselines[1].obs["cell_type"].isin(contexts).to_numpy()]
    return plain(ad.concat([cells(screen, control=False, contexts=contexts), ref], merge="same"))


# --------------------------------------------------------------------------- #
# the prediction records its context column
# --------------------------------------------------------------------------- #
def test_predicted_cells_record_the_models_context_column(model, baselines, screen, tmp_path):
    import anndata as ad

    res = predict(model, baselines[0], screen)
    pred = res.to_anndata()
    assert pred.uns["virtualcell"]["context_key"] == "cell_type"
    assert set(pred.obs["cell_type"]) == {"typeA", "typeB"}
    written = ad.read_h5ad(res.write_h5ad(tmp_path / "pred.h5ad"))  # (virtualcell predict writes this way)
    assert written.uns["virtualcell"]["context_key"] == "cell_type"
    blind = baselines[0].copy()  # a baseline without the model's context column: its cells carry no context
    blind.obs = blind.obs.drop(columns=["cell_type"])
    assert "context_key" not in predict(model, blind, screen).to_anndata().uns["virtualcell"]


# --------------------------------------------------------------------------- #
# evaluate
# --------------------------------------------------------------------------- #
def test_a_prediction_from_other_cells_is_refused_not_scored_as_one_context(pred_a, screen, baselines):
    """typeA cells' prediction against measured typeB cells, none of the files storing a contract: refused as it is
    where the measured file stores its context column (it was scored as context 'all', pearson_delta 0.8)."""
    pred, base = pred_a
    real_b = measured(screen, baselines, contexts=("typeB",))
    with pytest.raises(DataError, match="None of the predicted groups .*in typeA.* is in the measured data .*in typeB"):
        vc.evaluate.evaluate(pred, real_b, baseline=base, **KEYS, **FAST)


def test_evaluate_reads_the_contexts_from_the_predictions_column(pred_ab, screen, baselines):
    pred, base = pred_ab
    real = measured(screen, baselines)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*context")  # nothing to say of them: they are matched
        table = vc.evaluate.evaluate(pred, real, baseline=base, **KEYS, **FAST)
    model = table[table["method"] == "model"]
    assert set(model["context"]) == {"typeA", "typeB"}
    assert len(model) == 2 * len(knockouts(screen)) * 2  # every knockout in each type, two metrics
    info = table.attrs["virtualcell"]
    assert info["contract"]["context_key"] == "cell_type"
    assert "prediction's context column" in info["contexts"]
    assert "- contexts: " in vc.evaluate.summarize(table)
    named = vc.evaluate.evaluate(pred, real, baseline=base, context_key="cell_type", **KEYS, **FAST)
    pd.testing.assert_frame_equal(table.reset_index(drop=True), named.reset_index(drop=True))
    deltas = vc.evaluate.delta_table(pred, real, baseline=base, **KEYS)  # (one setup: the same contexts)
    assert set(deltas["context"]) == {"typeA", "typeB"}
    # the prediction from typeA cells against both types: typeA scored, the typeB groups said to be measured only
    pred_a = pred[pred.obs["cell_type"] == "typeA"].copy()
    a = vc.evaluate.evaluate(pred_a, real, baseline=base, **KEYS, **FAST)
    assert set(a.loc[a["method"] == "model", "context"]) == {"typeA"}


def test_a_context_column_given_or_stored_wins_over_the_predictions(pred_ab, screen, baselines):
    pred, base = pred_ab
    real, base = measured(screen, baselines), base.copy()
    for a in (real, base, pred):
        a.obs["batch"] = "b1"
    table = vc.evaluate.evaluate(pred, real, baseline=base, context_key="batch", **KEYS, **FAST)
    assert set(table["context"]) == {"b1"}
    vc.DataContract(KEY, "control", context_key="batch").attach(real)
    table = vc.evaluate.evaluate(pred, real, baseline=base, **FAST)
    assert set(table["context"]) == {"b1"}


def test_evaluate_warns_where_the_measured_file_lacks_the_predictions_context_column(pred_ab, pred_a, screen,
                                                                                     baselines):
    pred, base = pred_ab
    real = measured(screen, baselines)
    real.obs = real.obs.drop(columns=["cell_type"])
    with pytest.warns(UserWarning, match=r"2 contexts in obs\['cell_type'\].*'typeA', 'typeB'.*measured cells "
                                         r"\(real=, --real\) has no readable column .cell_type. \(absent, or with missing values\), so every context is pooled") as said:
        table = vc.evaluate.evaluate(pred, real, baseline=base, **KEYS, **FAST)
    assert "Give it the column 'cell_type'" in str(said[0].message)
    assert set(table["context"]) == {"all"}
    assert "pooled" in table.attrs["virtualcell"]["contexts"]
    one, base_a = pred_a  # one context predicted, the measured cells' unknown: nothing to say
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*pooled.*")
        vc.evaluate.evaluate(one, real, baseline=base_a, **KEYS, **FAST)


def test_cli_evaluate_reads_the_predictions_context_column(pred_ab, screen, baselines, tmp_path):
    from virtualcell.evaluate.cli import add_evaluate_parser

    pred, base = pred_ab
    pred.write_h5ad(tmp_path / "pred.h5ad")
    measured(screen, baselines).write_h5ad(tmp_path / "real.h5ad")
    base.write_h5ad(tmp_path / "base.h5ad")
    parser = argparse.ArgumentParser(prog="virtualcell")
    add_evaluate_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["evaluate", "--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                              "--baseline", str(tmp_path / "base.h5ad"), "--perturbation-key", KEY, "--control",
                              "control", "--profile", "pearson", "--baselines", "", "--no-ceiling", "--out",
                              str(tmp_path / "out"), "-q"])
    assert args.func(args) == 0
    table = pd.read_csv(tmp_path / "out" / "metrics.csv")
    assert set(table["context"]) == {"typeA", "typeB"}
    assert "- contexts: " in (tmp_path / "out" / "summary.md").read_text()


# --------------------------------------------------------------------------- #
# to_cell_eval
# --------------------------------------------------------------------------- #
def test_to_cell_eval_warns_where_the_prediction_is_of_other_contexts(model, screen, baselines):
    """Predicted from both types, measured in typeA only: cell-eval pairs by target_gene alone."""
    from virtualcell import viz

    sim = vc.Simulator(baselines[0], model, seed=0)
    with_ctrl = viz.predict_as_measured(sim, knockouts(screen), seed=0)  # the baseline as the prediction's control
    like = vc.evaluate.to_cell_eval(with_ctrl, **KEYS)
    assert like.uns["virtualcell"]["context_key"] == "cell_type"  # (a file converted carries it on)
    real_a = measured(screen, baselines, contexts=("typeA",))
    with pytest.warns(UserWarning, match=r"other contexts in obs\['cell_type'\]: predicted 'typeA', 'typeB', "
                                         r"measured 'typeA'.*target_gene alone") as said:
        vc.evaluate.to_cell_eval(real_a, like=like, **KEYS)
    assert "isin(['typeA'])" in str(said[0].message)  # the fix: the prediction to the measured contexts
    real = measured(screen, baselines)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*other contexts.*")
        vc.evaluate.to_cell_eval(real, like=like, **KEYS)
    # the same contexts in all, but one knockout measured in typeA only
    first = knockouts(screen)[0]
    some = real[~((real.obs[KEY] == first) & (real.obs["cell_type"] == "typeB")).to_numpy()].copy()
    with pytest.warns(UserWarning, match=rf"1 of {len(knockouts(screen)) + 1} perturbations differ, e.g. '{first}': "
                                         r"predicted in 'typeA', 'typeB', measured in 'typeA'"):
        vc.evaluate.to_cell_eval(some, like=like, **KEYS)
    blind = real_a.copy()  # the measured cells' contexts unknown: said too
    blind.obs = blind.obs.drop(columns=["cell_type"])
    with pytest.warns(UserWarning, match=r"2 contexts in obs\['cell_type'\].*have no column 'cell_type'"):
        vc.evaluate.to_cell_eval(blind, like=like, **KEYS)


# --------------------------------------------------------------------------- #
# notebooks/compare.py
# --------------------------------------------------------------------------- #
@pytest.mark.timeout(300)
def test_the_compare_notebook_scores_each_context_of_a_file_without_a_stored_contract(model, screen):
    """The notebook found the model's contract (viz.data_contract) but passed it to neither split_controls nor
    evaluate: a file without a stored contract was refused, naming a CLI flag, or its cell types were pooled."""
    from virtualcell import viz

    spec = importlib.util.spec_from_file_location("compare_notebook", ROOT / "notebooks" / "compare.py")
    notebook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(notebook)
    adata = plain(screen)
    contract = viz.data_contract(adata, model)
    assert contract.perturbation_key == KEY and contract.context_key == "cell_type"
    picked = knockouts(screen)[:2]
    form = {"holdout_value": None, "perturbations": picked, "n_cells": 32, "profile": "pearson"}
    ui = {name: SimpleNamespace(value=value) for name, value in (
        ("data_source", "h5ad"), ("data_path", "screen.h5ad"), ("data_loader", None), ("model_source", "folder"),
        ("model_path", "model"), ("holdout_column", None), ("run", True), ("form", form))}
    _, defs = notebook.app.run(defs={**ui, "adata": adata, "model": model, "contract": contract, "DEFAULTS": {},
                                     "measured": viz.measured_labels(model, adata, contract=contract)})
    table = defs["table"]
    scored = table[table["method"] == "model"]
    assert set(scored["perturbation"]) == set(picked)
    assert set(scored["context"]) == set(defs["predicted"].obs["cell_type"]) == {"typeA", "typeB"}


def test_a_measured_context_column_with_gaps_is_pooled_with_a_warning_not_a_crash(pred_ab, screen, baselines):
    """A review: the prediction's column was taken where the measured file's had missing values, and evaluate stopped
    ('3 missing values') where it had scored the same inputs, pooled, before; the column is taken only where every
    input reads it whole."""
    import numpy as np

    pred, base = pred_ab
    real = measured(screen, baselines)
    values = real.obs["cell_type"].astype(object).to_numpy()
    values[:3] = np.nan
    real.obs["cell_type"] = values
    with pytest.warns(UserWarning, match=r"has no readable column .cell_type. \(absent, or with missing values\)"):
        table = vc.evaluate.evaluate(pred, real, baseline=base, **KEYS, **FAST)
    assert set(table["context"]) == {"all"}
