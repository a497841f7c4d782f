"""The public surface read as a user writes it: keywords a loader does not take, a contract stored in the data, one
number or one name where several are taken, numpy's numbers, paths where an AnnData is taken, the command line's list
syntax in Python, and an Optional argument that means what its docstring says."""

from __future__ import annotations

import types

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.contract import control_labels
from virtualcell.errors import ContractError, DataError, PerturbationError, TrainingError


# --------------------------------------------------------------------------- #
# datasets.load(name, **kwargs)
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("kwargs, said", [
    ({"backed": "r"}, r"takes no keyword 'backed'; it takes 'contract' \(virtualcell reads expression in memory"),
    ({"n_cells": 100, "seed": 3}, r"no keywords 'n_cells', 'seed'; it takes 'contract' \(the synthetic screen's "),
    ({"cache_dir": "/tmp/elsewhere"}, r"'cache_dir'.*VIRTUALCELL_CACHE"),
    ({"contrat": vc.DataContract()}, r"'contrat' \(did you mean 'contract'\?\)"),
])
def test_load_refuses_the_keywords_a_named_dataset_does_not_take(kwargs, said):
    # (each was dropped without a word: the dataset loaded as if it had not been given)
    with pytest.raises(DataError, match=said):
        vc.datasets.load("perturbench", **kwargs)


def test_load_reads_a_contract_given_for_a_named_dataset_and_refuses_synthetic_keywords_by_name():
    given = vc.DataContract("perturbation", "control", context_key="bio_rep")
    adata = vc.datasets.load("papalexi2021", contract=given)
    assert vc.DataContract.from_adata(adata) == given  # (the dataset's own contract was stored instead)
    with pytest.raises(ContractError, match="'no_such_column' is not in adata.obs"):  # validated as read_h5ad does
        vc.datasets.load("papalexi2021", contract=vc.DataContract(context_key="no_such_column"))
    with pytest.raises(DataError, match=r"contract must be a virtualcell.DataContract, got str"):
        vc.datasets.load("papalexi2021", contract="bio_rep")
    with pytest.raises(DataError, match=r"load\('synthetic'\) takes no keyword 'n_cell_per_condition' \(did you mean "
                                        r"'n_cells_per_condition'\?\); it takes 'depth', 'doses'"):
        vc.datasets.load("synthetic", n_cell_per_condition=10)  # (a TypeError of synthetic_screen's)
    with pytest.raises(DataError, match=r"'x\.h5ad' is a file: read it with vc\.datasets\.read_h5ad\(path\)"):
        vc.datasets.load("x.h5ad")


# --------------------------------------------------------------------------- #
# fit: the gene column of the contract stored in the data
# --------------------------------------------------------------------------- #
def test_fit_reads_the_gene_column_the_stored_contract_names(papalexi_small, tmp_path):
    a = papalexi_small[:300].copy()
    del a.uns["virtualcell"]
    a.var["ens"] = [f"ENSG{i:011d}" for i in range(a.n_vars)]
    a.obs = a.obs.rename(columns={"perturbation": "guide_target"})
    path = tmp_path / "with_ens.h5ad"
    a.write_h5ad(path)
    b = vc.datasets.read_h5ad(path, contract=vc.DataContract("guide_target", "control", gene_key="ens"))
    cfg = vc.TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8,
                         verdict_fraction=0.0, threads=1)
    model = vc.fit(b, out=tmp_path / "model", config=cfg, progress=False)
    # its perturbation column and control were read from it, and its gene column now too (it was dropped)
    assert (model.contract.perturbation_key, model.contract.gene_key) == ("guide_target", "ens")
    assert model.genes.genes[0] == "ENSG00000000000"


# --------------------------------------------------------------------------- #
# verdict samples and temperatures: one number or several, numpy's too
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("given, read", [
    (4, (4,)), (np.int64(2), (2,)), (np.array([1, 4]), (1, 4)), ((np.int64(1), np.int64(4)), (1, 4)), ([1, 4], (1, 4)),
])
def test_verdict_samples_take_one_number_or_several_numpy_s_too(given, read):
    samples = vc.TrainConfig(verdict_samples=given).verdict_samples
    assert samples == read and all(type(k) is int for k in samples)  # plain ints: the checkpoint's JSON takes them


def test_verdict_temperatures_take_one_number_or_several_and_the_rest_is_refused_by_name():
    assert vc.TrainConfig(verdict_temperatures=0.8).verdict_temperatures == (0.8,)
    assert vc.TrainConfig(verdict_temperatures=np.array([1.0, 0.8])).verdict_temperatures == (1.0, 0.8)
    assert type(vc.TrainConfig(verdict_temperatures=np.float32(0.5)).verdict_temperatures[0]) is float
    for bad in ("4", (), True, [0], (1.0, 4), None):
        with pytest.raises(TrainingError, match=r"verdict_samples \(rejudge's samples=\) must be whole numbers >= 1, "
                                                r"one or several"):
            vc.TrainConfig(verdict_samples=bad)
    for bad in ("0.8", [1.0, np.inf], np.nan, [0.0]):
        with pytest.raises(TrainingError, match=r"verdict_temperatures \(rejudge's temperatures=\) must be numbers "
                                                r"above 0"):
            vc.TrainConfig(verdict_temperatures=bad)


def test_rejudge_reads_samples_and_temperatures_as_train_config_does():
    from virtualcell.train import rejudge

    # a checkpoint's record, up to where the samples are read: then the data is checked (and refused, here)
    model = types.SimpleNamespace(train_config={"data_hash": "x", "verdict_fraction": 0.1}, source="m",
                                  contract=vc.DataContract("perturbation", "control"), rank_fit=object())
    other = ad.AnnData(np.ones((2, 2)), obs=pd.DataFrame({"guide": ["a", "b"]}, index=["c1", "c2"]))
    with pytest.raises(ContractError, match="not the data the model was trained on"):  # (a TypeError of tuple())
        rejudge(model, other, samples=np.int64(4), temperatures=0.8)
    with pytest.raises(TrainingError, match=r"\(rejudge's samples=\)"):
        rejudge(model, other, samples="4")


# --------------------------------------------------------------------------- #
# a path where an AnnData is taken
# --------------------------------------------------------------------------- #
def _screen() -> ad.AnnData:
    a = ad.AnnData(np.ones((4, 2), dtype=np.float32), obs=pd.DataFrame(
        {"perturbation": ["control", "control", "STAT1", "STAT1"]}, index=[f"c{i}" for i in range(4)]))
    vc.DataContract().attach(a)
    return a


@pytest.mark.parametrize("call", [
    lambda p: vc.encode(p),
    lambda p: vc.evaluate.baselines.meanshift(p),
    lambda p: vc.evaluate.baselines.nochange(_screen(), baseline=p),
])
def test_encode_and_the_baselines_refuse_a_path_as_fit_and_evaluate_do(call, tmp_path):
    for path in (str(tmp_path / "cells.h5ad"), tmp_path / "cells.h5ad"):  # (an AttributeError: no .n_obs, no .uns)
        with pytest.raises(DataError, match=r"must be an AnnData, got the path '.*cells\.h5ad': read it first, "
                                            r"adata = vc\.datasets\.read_h5ad\(path\)"):
            call(path)


# --------------------------------------------------------------------------- #
# DataContract(control=[...])
# --------------------------------------------------------------------------- #
def test_a_contract_reads_a_list_of_control_labels_as_the_command_line_reads_its_comma_list():
    listed = vc.DataContract("guide", ["NT_1", "NT_2"])
    control, others = control_labels("NT_1,NT_2")  # --control NT_1,NT_2
    assert listed == vc.DataContract("guide", control, other_controls=others)
    assert (listed.control, listed.other_controls) == ("NT_1", ("NT_2",))  # (it was the label "['NT_1', 'NT_2']")
    assert vc.DataContract("guide", np.array(["NT_1"]), other_controls=["DMSO"]).controls == ("NT_1", "DMSO")
    a = ad.AnnData(np.ones((4, 2)), obs=pd.DataFrame({"guide": ["NT_1", "NT_2", "STAT1", "STAT1"]},
                                                     index=[f"c{i}" for i in range(4)]))
    listed.validate(a)
    assert list(listed.labels(a)) == ["NT_1", "NT_1", "STAT1", "STAT1"]
    with pytest.raises(ContractError, match=r"has no order.*pass a list, control=\['NT_1', 'NT_2'\]"):
        vc.DataContract("guide", {"NT_2", "NT_1"})
    with pytest.raises(ContractError, match="control names no label"):
        vc.DataContract("guide", [])
    with pytest.raises(ContractError, match=r"Several control labels are a list in Python \(the command line's "
                                            r"--control NT_1,NT_2 is one\): control=\['NT_1', 'NT_2'\]"):
        vc.DataContract("guide", "NT_1,NT_2").validate(a)


# --------------------------------------------------------------------------- #
# one name where a list of names is taken
# --------------------------------------------------------------------------- #
def _dose_screen():
    import xarray as xr

    labels = ["drug:A@1uM,6h", "drug:A@1uM,24h", "drug:A@10uM,6h"]
    ranking = pd.DataFrame({"perturbation": labels, "rank": [1, 2, 3], "score": [1.0, 3.0, 2.0],
                            "score_low": [0.5, 2.0, 1.0], "score_high": [1.5, 4.0, 3.0]})
    agg = xr.Dataset({"delta": (("perturbation", "gene"), np.arange(6.0).reshape(3, 2))},
                     coords={"perturbation": labels, "gene": ["TF01", "G2"]})
    return ranking, agg


def test_dose_and_time_plots_read_a_bare_gene_name_as_one_gene():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from virtualcell.dose_response import plot_dose_response, plot_time_course

    ranking, agg = _dose_screen()
    for plot in (plot_dose_response, plot_time_course):  # (read letter by letter: "Genes ['T', 'F', '0', '1'] ...")
        fig = plot(ranking, agg, genes="TF01", return_fig=True)
        assert [ax.get_title() for ax in fig.axes[1:]] == ["TF01: predicted mean change"]
        plt.close(fig)
        fig = plot(ranking, agg, genes=np.array(["TF01", "G2"]), return_fig=True)
        assert len(fig.axes) == 3
        plt.close(fig)


def test_plot_delta_scatter_reads_a_bare_perturbation_as_one():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(0)
    rows = [{"perturbation": p, "context": "all", "gene": f"G{g}", "predicted": rng.normal(), "measured": rng.normal(),
             "top_de": g < 5, "effect_size": e} for p, e in (("drugA@1", 2.0), ("drugA@10", 1.0)) for g in range(10)]
    deltas = pd.DataFrame(rows)
    fig = vc.evaluate.plot_delta_scatter(deltas, perturbations="drugA@1", return_fig=True)
    assert [ax.get_title().split("\n")[0] for ax in fig.axes if ax.get_visible()] == ["drugA@1"]
    plt.close(fig)
    with pytest.raises(DataError, match=r"Perturbations 'drugB' are not in the delta table"):
        vc.evaluate.plot_delta_scatter(deltas, perturbations="drugB")


# --------------------------------------------------------------------------- #
# the command line's and the panel's list syntax, given to Python
# --------------------------------------------------------------------------- #
def test_a_panel_group_given_as_one_perturbation_points_to_expand_and_parse_panel():
    from virtualcell.perturbations import parse

    with pytest.raises(PerturbationError, match=r"A \{a,b\} group is a panel's shorthand.*"
                                                r"vc\.perturbations\.expand\('ko:\{STAT1,JAK2\}'\) \(gives "
                                                r"\['ko:STAT1', 'ko:JAK2'\]\).*parse_panel") as err:
        parse("ko:{STAT1,JAK2}")
    assert "'{STAT1+JAK2}'" not in str(err.value)  # (it advised a combination of the braces)
    with pytest.raises(PerturbationError, match=r"after '@'.*A \{a,b\} group is a panel's shorthand"):
        parse("drug:drugA@{0.1,1,10}")
    with pytest.raises(PerturbationError, match=r"several lines, as a panel's text does: read it with "
                                                r"vc\.perturbations\.parse_panel\(text\)"):
        parse("ko:STAT1\nko:JAK2")
    with pytest.raises(PerturbationError, match=r"not ','; several perturbations are a list "
                                                r"\(\['ko:STAT1', 'ko:JAK2'\]\)"):
        parse("ko:STAT1,JAK2")


def test_a_comma_list_given_as_one_label_says_to_pass_a_list():
    from virtualcell.prompts import PerturbationVocab

    vocab = PerturbationVocab(labels={"STAT1": "ko:STAT1", "JAK2": "ko:JAK2"})
    with pytest.raises(PerturbationError, match=r"does not know the perturbation 'STAT1,JAK2'.*',' separates no "
                                                r"perturbations in a name: pass several as a list "
                                                r"\(\['STAT1', 'JAK2'\]\); a combination is written with '\+' "
                                                r"\('STAT1\+JAK2'\)"):
        vocab.resolve("STAT1,JAK2")


# --------------------------------------------------------------------------- #
# distance_test(obsm_key=None)
# --------------------------------------------------------------------------- #
def test_distance_test_with_obsm_key_none_measures_in_x():
    from virtualcell.evaluate import distance_test

    rng = np.random.default_rng(0)
    obs = pd.DataFrame({"g": ["ctrl"] * 30 + ["strong"] * 30}, index=[str(i) for i in range(60)])
    a = ad.AnnData(rng.normal(size=(60, 4)) + (obs["g"] == "strong").to_numpy()[:, None] * 3, obs=obs)
    out = distance_test(a, groupby="g", contrast="ctrl", n_perms=50, obsm_key=None)  # (refused: "obsm[None]")
    assert out.loc["strong", "pvalue"] < 0.05
    a.obsm["X_pca"] = np.asarray(a.X)  # the same numbers as an embedding: the same distance
    same = distance_test(a, groupby="g", contrast="ctrl", n_perms=50)
    assert np.isclose(out.loc["strong", "distance"], same.loc["strong", "distance"])


def test_list_hints_keep_each_parts_kind_and_leave_names_and_times_alone():
    """The hint that several perturbations were written as one prefixed a typed part again ('ko:ko:JAK2',
    'ko:kd:JAK2'), read a time after ',' as a perturbation ('drugA,48h') and split a drug's name ('2,4-DNP'); it was
    computed twice (Perturbation and list_syntax_hint), which disagreed."""
    from virtualcell.errors import PerturbationError
    from virtualcell.perturbations import list_syntax_hint, parse

    for text, listed in (("ko:STAT1,ko:JAK2", ["ko:STAT1", "ko:JAK2"]), ("ko:STAT1, kd:JAK2", ["ko:STAT1", "kd:JAK2"]),
                         ("ko:STAT1,JAK2", ["ko:STAT1", "ko:JAK2"])):
        with pytest.raises(PerturbationError) as err:
            parse(text)
        assert f"list ({listed!r})" in str(err.value), err.value
        assert f"list ({listed!r})" in list_syntax_hint(text)
    for text in ("drugA,48h", "2,4-DNP", "TF01,", "drug:2,4-DNP@1"):
        assert list_syntax_hint(text) == "", text


def test_screen_names_what_it_does_not_take(tiny_model):
    """sim.screen(panel, temperature=0.6) raised 'run() got an unexpected keyword argument', naming a function the
    user never called; it names screen, says where generation settings go, and a typo gets a did-you-mean."""
    import virtualcell as vc

    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:4].copy(), model)
    with pytest.raises(TypeError, match=r"Simulator.screen\(\) takes no 'temperature'.*simulate\(\)'s"):
        sim.screen(["STAT1"], temperature=0.6)
    with pytest.raises(TypeError, match=r"'objectve' \(did you mean 'objective'\?\)"):
        sim.screen(["STAT1"], objectve="effect")
