"""How training reads times, the doses of combinations and the kinds of their parts.

A cell has one dose and one time, which a combination's parts share; a genetic perturbation's prompt carries neither.
Where the data says more than that (a knockout measured at two times, a pair's parts at two doses, one kind for a
drug and a knockout), training refuses rather than pool or drop it without a word.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.errors import ContractError, DataError, TrainingError
from virtualcell.sentences import Vocabulary
from virtualcell.train import TrainConfig, train
from virtualcell.training.labels import typed_labels

from conftest import shared_file

TINY = dict(top_k=20, hidden_size=32, n_layers=1, n_heads=2, batch_size=8, seed=0, verdict_fraction=0.0, threads=1,
            compile="off", attention="eager", precision="fp32")


def _cells(labels, *, dose=None, time=None, kind=None, unit=None, genes=("G1", "G2", "TF06")):
    """A few cells with these labels (and doses, times, kinds, dose units), and the contract that reads them."""
    import anndata as ad

    obs = pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(len(labels))])
    for name, values in (("dose", dose), ("time", time), ("kind", kind), ("unit", unit)):
        if values is not None:
            obs[name] = values
    a = ad.AnnData(np.ones((len(labels), len(genes)), dtype=np.float32), obs=obs, var=pd.DataFrame(index=list(genes)))
    contract = DataContract("perturbation", "control", dose_key="dose" if dose is not None else None,
                            time_key="time" if time is not None else None,
                            dose_unit_key="unit" if unit is not None else None)
    return a, contract


def _typed(a, contract, **cfg):
    typed, vocab = typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig(**cfg))
    return dict(zip(contract.conditions(a), typed)), vocab


def _timed_screen():
    """The synthetic screen (knockouts, one drug at three doses), every perturbed cell at 24h but drugA@0.1 at 6h."""
    a = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=3, n_pairs=0, n_drugs=1, n_cytokines=0,
                                     n_cells_per_condition=20, n_control_cells=60, n_contexts=1, seed=0)
    perturbed = (a.obs["perturbation"] != "control").to_numpy()
    a.obs["time"] = np.where(perturbed, "24h", "")
    a.obs.loc[(a.obs["condition"] == "drugA@0.1").to_numpy(), "time"] = "6h"
    return a, DataContract("perturbation", "control", dose_key="dose", time_key="time")


# --------------------------------------------------------------------------- #
# A1: a genetic perturbation at several times
# --------------------------------------------------------------------------- #
def test_a_knockout_measured_at_two_times_is_refused_with_the_fix():
    """TF06 knocked out and measured at 24h and at 72h trained as one prompt (a knockout's carries no time), its
    predictions named after one of the two, and the only word blamed the doses' bins."""
    kinds = ["control", "knockout", "knockout", "drug"]
    a, contract = _cells(["control", "TF06", "TF06", "drugA"], time=["", "24h", "72h", "24h"], kind=kinds)
    with pytest.raises(DataError, match=r"'TF06' at 'TF06@,24h', 'TF06@,72h'.*--context-key time without "
                                        r"--time-key.*one model per time"):
        _typed(a, contract, kind_key="kind")
    with pytest.raises(DataError, match=r"'TF06' at 'TF06@,24h', 'TF06@,72h'"):  # (kind auto reads it so too)
        _typed(a, contract)
    a, contract = _cells(["control", "TF06", "TF06", "drugA"], time=["", "24h", "", "24h"], kind=kinds)
    with pytest.raises(DataError, match=r"'TF06' at 'TF06', 'TF06@,24h'.*fill it in or drop"):
        _typed(a, contract, kind_key="kind")
    a, contract = _cells(["control", "TF06", "TF06", "drugA"], dose=["", "1", "3", "1"], kind=kinds)
    with pytest.raises(DataError, match=r"more than one dose \('TF06' at 'TF06@1', 'TF06@3'\).*--context-key dose"):
        _typed(a, contract, kind_key="kind")
    # the fix it names: each time a context of its own (no time column), or one time per model
    a, contract = _cells(["control", "TF06", "TF06", "drugA"], time=["24h", "24h", "72h", "24h"], kind=kinds)
    forms, _ = _typed(a, DataContract("perturbation", "control", context_key="time"), kind_key="kind")
    assert forms["TF06"] == "ko:TF06"


def test_a_knockout_at_one_time_trains_and_is_named_with_it(tmp_path):
    """One time for all of a knockout's cells: dropped from its prompt, and its predictions named as the data names
    its condition ('TF06@,24h'), as before."""
    a, contract = _timed_screen()
    train(a, out=tmp_path, contract=contract, config=TrainConfig(max_steps=2, kind_key="perturbation_type", **TINY),
          progress=False)
    m = vc.C2SModel.load(tmp_path)
    vocab = m.perturbations
    assert vocab.conditions["TF06@,24h"] == "ko:TF06" and vocab.conditions["drugA@0.1,6h"] == "drug:drugA@0.1,6h"
    asked = m.resolve(["ko:TF06"])
    assert str(asked[0]) == "ko:TF06" and vocab.labels_for(asked) == ["TF06@,24h"]
    sim = vc.Simulator(a[(a.obs["perturbation"] == "control").to_numpy()][:8].copy(), m)
    pred = sim.simulate(["ko:TF06"], progress=False, samples=1).to_anndata()
    assert set(pred.obs["perturbation"]) == {"TF06@,24h"}


# --------------------------------------------------------------------------- #
# A2: the kinds of a combination's parts
# --------------------------------------------------------------------------- #
def test_a_column_of_kinds_gives_a_combination_one_kind_per_part():
    """'drug+knockout' in the column of kinds was refused, with the advice to map it to a single kind: which trained
    TF06 in 'drugA+TF06' as a drug."""
    from virtualcell.perturbations import read_kinds

    a, _ = _cells(["control", "drugA+TF06", "drugA+TF06"], kind=["", "Compound+KO", "drug + knockout"])
    assert read_kinds(a, "kind", controls=np.array([True, False, False])) == [
        "control", "drug+knockout", "drug+knockout"]
    a.obs["kind"] = ["", "drug+knokout", "drug"]
    with pytest.raises(DataError, match=r"one per part.*'knokout' in 'drug\+knokout' is no kind.*'drug\+knockout'"):
        read_kinds(a, "kind", controls=np.array([True, False, False]))

    labels = ["control", "TF06", "drugA", "drugA+TF06"]
    a, contract = _cells(labels, dose=["", "", "1uM", "1uM"], kind=["control", "knockout", "drug", "drug+knockout"])
    forms, _ = _typed(a, contract, kind_key="kind")
    assert forms["drugA+TF06@1"] == "drug:drugA@1uM + ko:TF06" and forms["TF06"] == "ko:TF06"
    a.obs["kind"] = ["control", "knockout", "drug", "drug+knockout+drug"]
    with pytest.raises(DataError, match=r"'drugA\+TF06' is given the kinds 'drug\+knockout\+drug'.*2 parts"):
        _typed(a, contract, kind_key="kind")
    # a part naming the control ('KLF1+ctrl', as GEARS writes a single) may have its kind or not
    a, contract = _cells(["control", "KLF1+ctrl", "KLF1+G1"], kind=["control", "activation+control", "activation"],
                         genes=("KLF1", "G1"))
    forms, _ = _typed(a, contract, kind_key="kind")
    assert forms["KLF1+ctrl"] == "act:KLF1" and forms["KLF1+G1"] == "act:G1 + act:KLF1"


def test_one_kind_for_a_pair_that_contradicts_a_part_is_refused(caplog):
    """'drugA+TF06' of kind 'drug' trained TF06 as a drug while TF06 alone trained as a knockout; 'CYTO1+drugB' of
    kind 'cytokine' trained drugB as a cytokine."""
    labels = ["control", "TF06", "drugA", "drugA+TF06"]
    a, contract = _cells(labels, dose=["", "", "1uM", "1uM"], kind=["control", "knockout", "drug", "drug"])
    with pytest.raises(DataError, match=r"'drugA\+TF06' \(drug\): 'TF06' trains alone as knockout.*obs\['kind'\] "
                                        r"'drug\+knockout' for 'drugA\+TF06'.*'drugA\+ko:TF06'.*kind auto"):
        _typed(a, contract, kind_key="kind")
    a.obs["perturbation"] = ["control", "TF06", "drugA", "drugA+ko:TF06"]  # the part typed in the label: as it says
    forms, _ = _typed(a, contract, kind_key="kind")
    assert forms["drugA+ko:TF06@1"] == "drug:drugA@1uM + ko:TF06"
    # a gene of the panel, never alone, typed as a drug by its pair's one kind: believed, with a word
    a, contract = _cells(["control", "drugA", "drugA+G1"], dose=["", "1uM", "1uM"], kind=["control", "drug", "drug"])
    with caplog.at_level(logging.WARNING, logger="virtualcell.training.labels"):
        forms, _ = _typed(a, contract, kind_key="kind")
    assert forms["drugA+G1@1"] == "drug:G1@1uM + drug:drugA@1uM"
    assert any("names a gene of the panel ('G1'" in r.getMessage() and "'drugA+ko:G1'" in r.getMessage()
               for r in caplog.records)
    # a cytokine pair names genes of the panel (IFNG+TNF): the column is believed, and no genetic kind is suggested
    a, contract = _cells(["control", "G1+G2"], dose=["", "10"], kind=["control", "cytokine"])
    forms, _ = _typed(a, contract, kind_key="kind")
    assert forms["G1+G2@10"] == "cytokine:G1@10 + cytokine:G2@10"
    # cytokine + drug
    labels = ["control", "CYTO1", "drugB", "CYTO1+drugB"]
    a, contract = _cells(labels, dose=["", "10", "1", "10"], kind=["control", "cytokine", "drug", "cytokine"])
    with pytest.raises(DataError, match=r"'drugB' trains alone as drug.*'cytokine\+drug'.*'CYTO1\+drug:drugB'"):
        _typed(a, contract, kind_key="kind")
    a.obs["kind"] = ["control", "cytokine", "drug", "cytokine+drug"]
    forms, _ = _typed(a, contract, kind_key="kind")
    assert forms["CYTO1+drugB@10"] == "cytokine:CYTO1@10 + drug:drugB@10"


# --------------------------------------------------------------------------- #
# A3: one dose and one time per cell
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize(("column", "values", "shown"), [
    ("dose", ["", "1", "10", "1+10"], "'1+10'"),
    ("dose", ["", "10ng/ml", "1uM", "10ng/ml+1uM"], "'10ng/ml+1uM'"),
    ("time", ["", "6h", "24h", "6h+24h"], "'6h+24h'"),
])
def test_a_pair_given_a_value_per_part_that_differ_is_refused(column, values, shown):
    """'1+10' (one dose per part) trained both parts at the first; '6h+24h' both at 6h."""
    labels = ["control", "drugA", "drugB", "drugA+drugB"]
    a, contract = _cells(labels, **{column: values})
    with pytest.raises(ContractError, match=rf"{column} column '{column}' gives cells one {column} per part.*"
                                            rf"'drugA\+drugB' at {shown.replace('+', '[+]')}.*one dose and one time "
                                            r"per cell.*leave those cells out"):
        contract.conditions(a)


def test_a_pair_given_one_value_per_part_that_agree_is_read_as_it():
    """'1+1' (perturbench's pairs) and equal amounts in two units are one dose; a part without a value (a
    knockout's) or a dose of 0 gives none."""
    labels = ["control", "drugA", "drugB", "drugA+drugB"]
    a, contract = _cells(labels, dose=["", "1", "1", "1+1"])
    assert list(contract.conditions(a)) == ["control", "drugA@1", "drugB@1", "drugA+drugB@1"]
    for dose in ("1uM+1uM", "1uM+1000nM", "1uM+1", "1uM+", "0+1uM"):
        a, contract = _cells(labels, dose=["", "1uM", "1uM", dose])
        assert list(contract.conditions(a)) == ["control", "drugA@1", "drugB@1", "drugA+drugB@1"], dose
        assert contract.dose_units(a) == {"drugA": "uM", "drugB": "uM"}
    a, contract = _cells(labels, dose=["", "1", "1", "1+1"], unit=["", "uM", "uM", "uM+uM"])
    assert list(contract.conditions(a))[-1] == "drugA+drugB@1"
    a.obs["unit"] = ["", "uM", "uM", "uM+nM"]
    with pytest.raises(ContractError, match=r"one dose per part.*'drugA\+drugB' at '1\+1 uM\+nM'"):
        contract.conditions(a)
    a, contract = _cells(labels, time=["", "6h", "6h", "6h+360min"])
    assert list(contract.conditions(a))[-1] == "drugA+drugB@,6h"
    a, contract = _cells(["control", "x+y", "drugA"], dose=["1+10", "1", "1"])  # (a control's values are not read)
    assert list(contract.conditions(a)) == ["control", "x+y@1", "drugA@1"]


def test_one_agents_units_are_checked_and_named_by_its_identity_not_its_spelling():
    """'drug:drugC' and 'drugC' are one agent: its doses in two families were let through (checked by label text),
    and 'drug:drugC' alone was trained without its unit (its unit keyed 'drug:drugC', looked up as 'drugC'); a
    knockout written 'ko:TF06' beside two agents in two families takes no dose and no unit."""
    a, contract = _cells(["control", "drugC", "CYTO1+drug:drugC", "CYTO1"], dose=["", "1uM", "10ng/ml", "10ng/ml"])
    with pytest.raises(ContractError, match=r"doses of 'drugC'.*'ng/ml \(CYTO1\+drug:drugC\)', 'uM \(drugC\)'"):
        contract.conditions(a)
    labels = ["control", "drugA+ko:TF06", "CYTO1+ko:TF06", "CYTO1", "drug:drugC", "drugA"]
    a, contract = _cells(labels, dose=["", "1uM", "10ng/ml", "10ng/ml", "1uM", "1uM"])
    assert contract.dose_units(a) == {"drugA": "uM", "CYTO1": "ng/ml", "drugC": "uM"}
    forms, _ = _typed(a, contract, kind_key=None, kind="auto")
    assert forms["drug:drugC@1"] == "drug:drugC@1uM" and forms["drugA+ko:TF06@1"] == "drug:drugA@1uM + ko:TF06"


# --------------------------------------------------------------------------- #
# A4: a resume after the values were rewritten
# --------------------------------------------------------------------------- #
def test_a_resume_compares_the_conditions_and_dose_units(tmp_path):
    """The data's hash reads the labels, the run's record the names of the dose and time columns: a checkpoint
    whose conditions or units differ from this run's reading is refused by name."""
    from virtualcell.model import META_FILE
    from virtualcell.training.checkpoint import same_quantities

    was = {"conditions": {"drugA@1,6h": "drug:drugA@1uM,6h"}, "dose_units": {"drugA": "uM"}}
    (tmp_path / META_FILE).write_text(json.dumps({"perturbations": was}))
    same_quantities(tmp_path, was)
    with pytest.raises(TrainingError, match=r"conditions: 'drugA@1,6h' \(drug:drugA@1uM,6h\) there only; "
                                            r"'drugA@1,0.1h' \(drug:drugA@1uM,0.1h\) here only.*--restart"):
        same_quantities(tmp_path, {"conditions": {"drugA@1,0.1h": "drug:drugA@1uM,0.1h"},
                                   "dose_units": {"drugA": "uM"}})
    with pytest.raises(TrainingError, match=r"drug:drugA@1uM,6h there, drug:drugA@1nM,6h here \| dose units: "
                                            r"'drugA': uM there, nM here"):
        same_quantities(tmp_path, {"conditions": {"drugA@1,6h": "drug:drugA@1nM,6h"}, "dose_units": {"drugA": "nM"}})
    (tmp_path / META_FILE).write_text(json.dumps({"perturbations": {"labels": {}}}))  # (a record without them)
    same_quantities(tmp_path, {"conditions": {}, "dose_units": {}})


def test_a_run_is_not_resumed_after_its_times_were_rewritten(tmp_path):
    """6h rewritten 6min in the same column (same labels, same expression) resumed the run under the new reading."""
    a, contract = _timed_screen()
    cfg = dict(TINY, kind_key="perturbation_type", save_every=2, eval_every=2)
    train(a, out=tmp_path, contract=contract, config=TrainConfig(max_steps=2, **cfg), progress=False)
    b = a.copy()
    b.obs["time"] = b.obs["time"].str.replace("h", "min")
    with pytest.raises(TrainingError, match=r"doses or times otherwise.*'TF06@,24h' \(ko:TF06\) there only.*--restart"):
        train(b, out=tmp_path, contract=contract, config=TrainConfig(max_steps=3, **cfg), progress=False)
    train(a, out=tmp_path, contract=contract, config=TrainConfig(max_steps=3, **cfg), progress=False)  # as it was
    assert vc.C2SModel.load(tmp_path).train_config["steps"] == 3


# --------------------------------------------------------------------------- #
# A5: a time (or dose) column not named
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("column", ["time", "timepoint", "time_point", "TimePoint", "hours", "treatment_time"])
def test_an_unnamed_time_column_that_varies_within_a_label_is_warned_of(column, caplog):
    """obs['time'] with drugA at 6h and 24h, trained without --time-key: the two times pooled without a word."""
    from virtualcell.train import _warn_unnamed_quantities, unnamed_quantities

    a, _ = _timed_screen()
    a.obs = a.obs.rename(columns={"time": column})
    contract = DataContract("perturbation", "control", dose_key="dose")
    with caplog.at_level(logging.WARNING, logger="virtualcell"):
        _warn_unnamed_quantities(a, contract, TrainConfig())
    assert f"obs[{column!r}] looks like each cell's time" in caplog.text
    assert "'drugA' at '24h', '6h'" in caplog.text and f"--time-key {column}" in caplog.text
    # named, or the same within each label: nothing to say
    assert unnamed_quantities(a, DataContract("perturbation", "control", dose_key="dose", time_key=column)) == []
    a.obs[column] = np.where(a.obs["perturbation"] == "control", "", "24h")
    assert unnamed_quantities(a, contract) == []


@pytest.mark.parametrize("column", ["dose", "dose_value", "concentration", "Concentration_uM"])
def test_an_unnamed_dose_column_that_varies_within_a_label_is_warned_of(column):
    from virtualcell.train import unnamed_quantities

    a, _ = _timed_screen()
    a.obs = a.obs.rename(columns={"dose": column}).drop(columns=["time", "condition"])
    found = unnamed_quantities(a, DataContract("perturbation", "control"))
    assert [(c, what) for c, what, _ in found] == [(column, "dose")]
    assert unnamed_quantities(a, DataContract("perturbation", "control", dose_key=column)) == []
    a.obs["dose_unit"] = "uM"  # (a unit column is no dose)
    assert [c for c, _, _ in unnamed_quantities(a, DataContract("perturbation", "control"))] == [column]


@pytest.mark.parametrize("name", ["perturbench_devel_norman2019_mcfaline2023.h5ad",
                                  "papalexi2021_thp1_crispr_ko_sceptredata.h5ad",
                                  "kang2018_ifnb_pbmc_scgen_valid_lognorm.h5ad",
                                  "kang2018_ifnb_pbmc_harmony_2000cells.h5ad"])
def test_no_unnamed_quantity_is_said_of_the_shared_files(name):
    """perturbench's 'dose' ('1' for a single, '1+1' for a pair) is one value per label: nothing to say."""
    import warnings

    import anndata as ad

    from virtualcell.train import unnamed_quantities

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = ad.read_h5ad(shared_file(name))
    key = "perturbation" if "perturbation" in a.obs else "condition"
    for context in (None, "cell_type"):
        if context is None or context in a.obs:
            assert unnamed_quantities(a, DataContract(key, "control", context_key=context)) == []


@pytest.mark.parametrize("name", ["papalexi2021", "perturbench"])
def test_no_unnamed_quantity_is_said_of_the_bundled_files(name):
    from virtualcell.train import unnamed_quantities

    a = vc.datasets.load(name)
    assert unnamed_quantities(a, DataContract.from_adata(a)) == []
    # perturbench's pairs, '1+1', read as one dose where its dose column is named
    if name == "perturbench":
        contract = DataContract("perturbation", "control", context_key="cell_type", dose_key="dose")
        assert {c for c in contract.conditions(a) if "+" in c} <= {f"{x}@1" for x in contract.labels(a)}


def test_times_that_share_a_bin_train_apart_with_tokens_of_their_own(caplog):
    """48h and 72h share a whole bin of log2 hours, so they read one prompt and a model predicted them alike (warned
    of only). With tokens of their own for each dose (the default), each such condition gets a token for its very
    dose and time after the bins' token: their prompts differ, a time between them reads the bins' token alone, and
    an agent whose conditions each have bins of their own gets no new token (its prompts are as before)."""
    from virtualcell.perturbations import parse
    from virtualcell.prompts import CompactFormat, build_gene_tokenizer

    labels = ["control"] + ["drugA"] * 3 + ["drugB"] * 2
    a, contract = _cells(labels * 2, dose=["", "1uM", "1uM", "1uM", "1uM", "1uM"] * 2,
                         time=["", "24h", "48h", "72h", "24h", "72h"] * 2)
    with caplog.at_level(logging.INFO, logger="virtualcell.training.labels"):
        _, vocab = _typed(a, contract)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "drugA@1,48h = drugA@1,72h" in caplog.text and "train apart" in caplog.text
    exact = [n for n in vocab.names["dose"] if "@" in n]
    assert exact == ["drug:drugA@1,48h", "drug:drugA@1,72h"]  # none for drugA at 24h, nor for drugB
    genes = list(a.var_names)
    fmt = CompactFormat(build_gene_tokenizer(genes, vocab), genes, vocab)
    tokens = {t: fmt.perturbation_tokens(parse(f"drug:drugA@1,{t}")) for t in ("24h", "48h", "60h", "72h")}
    assert tokens["48h"] != tokens["72h"] and tokens["48h"][:-1] == tokens["72h"][:-1] == tokens["60h"]
    assert len(tokens["24h"]) == len(tokens["60h"])  # the bins' token, no token of its own
    assert fmt.perturbation_tokens(parse("drug:drugA@1,72h"), own_tokens=False) == tokens["60h"][:-1]
    # with one token per bin shared by every agent (--dose-tokens shared), they still read one prompt: said, with
    # the fix for times, not for doses
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="virtualcell.training.labels"):
        _typed(a, contract, dose_tokens="shared")
    said = [r.getMessage() for r in caplog.records if "read one prompt" in r.getMessage()]
    assert len(said) == 1 and "drugA@1,48h = drugA@1,72h" in said[0], said
    assert "--context-key" in said[0] and "nM" not in said[0]
    caplog.clear()  # doses apart by less than a bin still get the dose advice
    a, contract = _cells(labels[:4] * 2, dose=["", "1uM", "1.1uM", "10uM"] * 2)
    with caplog.at_level(logging.WARNING, logger="virtualcell.training.labels"):
        _typed(a, contract, dose_tokens="shared")
    said = [r.getMessage() for r in caplog.records if "read one prompt" in r.getMessage()]
    assert len(said) == 1 and "half-decade" in said[0] and "--context-key" not in said[0], said
    caplog.clear()  # ... and with tokens of their own they train apart, said at info only
    with caplog.at_level(logging.WARNING, logger="virtualcell.training.labels"):
        _, vocab = _typed(a, contract)
    assert caplog.text == "" and [n for n in vocab.names["dose"] if "@" in n] == ["drug:drugA@1", "drug:drugA@1.1"]
    # a part sharing its bins with another condition's part, where the two conditions read prompts of their own
    # anyway (drugA in a pair at 1 uM, alone at 1.2 uM): no token is added, their prompts are as before
    a, contract = _cells(["control", "drugA+drugB", "drugA"] * 2, dose=["", "1uM", "1.2uM"] * 2)
    _, vocab = _typed(a, contract)
    assert not [n for n in vocab.names["dose"] if "@" in n], vocab.names["dose"]


def _time_course():
    """A drug measured at 48h and at 72h (one whole bin of log2 hours) beside control cells, and its contract."""
    a = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=0, n_pairs=0, n_drugs=1, n_cytokines=0,
                                     n_cells_per_condition=20, n_control_cells=40, n_contexts=1, seed=0)
    a = a[a.obs["condition"].isin(["control", "drugA@1"])].copy()
    perturbed = (a.obs["perturbation"] != "control").to_numpy()
    a.obs["time"] = np.where(perturbed, np.where(np.arange(a.n_obs) % 2 == 0, "48h", "72h"), "")
    return a, DataContract("perturbation", "control", dose_key="dose", time_key="time")


def test_a_run_an_older_version_started_is_refused_as_such_on_resume(tmp_path, monkeypatch):
    """A run started before trained conditions sharing bins got tokens of their own (simulated by leaving them out)
    could not be resumed: 'holds a model of another shape ... train as that run did', which the user had done. The
    refusal says another version wrote the tokens, and what to do."""
    from tests.conftest import trained_tiny
    from virtualcell.training import labels

    a, contract = _time_course()
    with monkeypatch.context() as m:
        m.setattr(labels, "_add_exact_tokens", lambda vocab: None)
        trained_tiny(a, tmp_path / "m", contract=contract, kind_key=None, kind="drug")
    with pytest.raises(TrainingError, match="another number of tokens.*another version of virtualcell.*--restart"):
        trained_tiny(a, tmp_path / "m", contract=contract, kind_key=None, kind="drug", max_steps=4)


def test_a_time_course_sharing_a_bin_is_predicted_apart(tmp_path):
    """A drug measured at 48h and at 72h (one log2-hour bin): the trained model read both through one prompt, so its
    next-gene distributions after any cell were the same; with a token for each time they are not."""
    import torch

    from tests.conftest import trained_tiny
    from virtualcell.perturbations import parse

    a, contract = _time_course()
    model = trained_tiny(a, tmp_path / "m", contract=contract, kind_key=None, kind="drug")
    resolved = [model.perturbations.resolve(c) for c in ("drugA@1,48h", "drugA@1,72h")]
    assert [str(r) for r in resolved] == [str(parse("drug:drugA@1,48h")), str(parse("drug:drugA@1,72h"))]
    cell = np.arange(10)
    with torch.no_grad():
        logits = [model.lm(torch.tensor([model.format.prefix(cell) + model.format.suffix(r)])).logits[0, -1]
                  for r in resolved]
    assert not torch.allclose(logits[0], logits[1])
