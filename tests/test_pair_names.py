"""How predictions of dosed, timed and mixed-kind pairs are named, and how evaluate meets them with measured cells.

A pair's condition is written as the data writes it, one dose and time after its parts (``"drugA+ko:TF06@1,6h"``):
asked so in any order, named so at any dose or time, matched so whatever the order of its parts; the additive baseline
reads it so; a stored dose or time column a measured file lacks is refused rather than dropped; and a name is never
one of several conditions the model could not tell apart.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.errors import ContractError, PerturbationError
from virtualcell.evaluate import baselines, evaluate
from virtualcell.evaluate._data import canonical_label
from virtualcell.perturbations import condition_in_units, parse, shared_suffix, unordered_label
from virtualcell.prompts import PerturbationVocab

# synthetic condition -> (label, kind, dose, time): drugs at doses and times, a drug with a knockout written typed in
# the label (one dose column for the pair), a cytokine with a drug known only in that pair
RELABEL = {
    "control": ("control", "control", "", "24h"),
    "drugA@0.1": ("drugA", "drug", "1uM", "6h"),
    "drugA@1": ("drugA", "drug", "1uM", "24h"),
    "drugA@10": ("drugA", "drug", "10uM", "24h"),
    "drugB@0.1": ("drugB", "drug", "1uM", "24h"),
    "drugB@1": ("drugA+ko:TF06", "drug", "1uM", "24h"),
    "drugB@10": ("cytokine:CYTO1+drugC", "drug", "10ng/ml", "24h"),
    "CYTO1": ("CYTO1", "cytokine", "10ng/ml", "24h"),
}


def _timed_screen(relabel: dict | None = None, seed: int = 0) -> ad.AnnData:
    """synthetic_screen's cells relabelled with doses, times and mixed-kind pairs (obs: perturbation, kind, dose,
    time), its contract naming the dose and time columns."""
    a = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=3, n_pairs=1, n_drugs=2, n_cytokines=1,
                                     n_cells_per_condition=20, n_control_cells=80, n_contexts=1, seed=seed)
    rel = dict(RELABEL, **(relabel or {}))
    cond = a.obs["condition"].astype(str)
    for c in set(cond) - set(rel):
        rel[c] = (c, "knockout", "", "")
    a.obs["perturbation"] = [rel[c][0] for c in cond]
    a.obs["kind"] = [rel[c][1] for c in cond]
    a.obs["dose"] = [rel[c][2] for c in cond]
    a.obs["time"] = [rel[c][3] for c in cond]
    a.obs = a.obs.drop(columns=["perturbation_type", "condition"])
    del a.uns["virtualcell"]
    DataContract("perturbation", "control", dose_key="dose", time_key="time").attach(a)
    return a


@pytest.fixture(scope="module")
def timed():
    return _timed_screen()


@pytest.fixture(scope="module")
def timed_model(timed, tmp_path_factory):
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0,
                      kind_key="kind", verdict_fraction=0.0, threads=1, compile="off", attention="eager",
                      precision="fp32")
    out = tmp_path_factory.mktemp("timed_model")
    train(timed, out=out, config=cfg, progress=False)
    return vc.C2SModel.load(out)


def _relabelled(real: ad.AnnData, rename: dict[str, str]) -> ad.AnnData:
    """Predictions made of the measured cells: their conditions renamed as a model might name them, without dose or
    time columns (the labels name the conditions)."""
    pred = real.copy()
    pred.obs["perturbation"] = [rename.get(x, x) for x in DataContract.from_adata(real).conditions(real)]
    pred.obs = pred.obs[["perturbation"]]
    DataContract("perturbation", "control").attach(pred)
    return pred


def _scored(table) -> set[str]:
    return set(table.loc[table["method"] == "model", "perturbation"].astype(str))


# --------------------------------------------------------------------------- #
# Spelling: one name for a pair whatever the order of its parts (B1, B4)
# --------------------------------------------------------------------------- #
def test_a_dosed_pair_has_one_spelling_whatever_the_order_of_its_parts():
    assert canonical_label("TF06+drugA@1,24h") == canonical_label("drugA+TF06@1.0,24h") == "TF06+drugA@1,24h"
    assert canonical_label("ko:TF06+drugA@1,6h") == canonical_label("drugA+ko:TF06@1,6h")
    assert canonical_label("B@10+A@1.0") == canonical_label("A@1+B@10") == "A@1+B@10"  # each part its own dose
    assert canonical_label("A@1+B") != canonical_label("B+A@1")  # A alone at 1 is not both at 1
    assert unordered_label("drugC+cytokine:CYTO1") == "cytokine:CYTO1+drugC"
    assert shared_suffix("drugA+ko:TF06@1,24h") == ("drugA+ko:TF06", "1,24h")
    assert shared_suffix("drugA@1+drugB@10") is None and shared_suffix("drugA@1") is None
    # measured doses put in the prediction's unit: the drug's, whichever part of the pair is written first
    units = ({"drugA": "uM"}, {"drugA": "nM"})
    assert condition_in_units("TF06+drugA@1,24h", *units) == "TF06+drugA@1000,24h"
    assert condition_in_units("drugA+TF06@1,24h", *units) == "drugA+TF06@1000,24h"


def test_a_dosed_pair_named_in_the_other_order_meets_its_measured_cells(timed, caplog):
    """'TF06+drugA@1,24h' did not meet the measured 'drugA+TF06@1,24h' (only labels without '@' were sorted)."""
    real = _timed_screen({"drugB@1": ("drugA+TF06", "drug", "1uM", "24h")})
    pred = _relabelled(real, {"drugA+TF06@1,24h": "TF06+drugA@1,24h"})
    with caplog.at_level("WARNING"):
        table = evaluate(pred, real, profile="pearson", baselines=(), ceiling=False)
    assert canonical_label("drugA+TF06@1,24h") in _scored(table)
    assert "not scored" not in caplog.text


# --------------------------------------------------------------------------- #
# Asking and naming pairs with a shared dose and time (B3, B4)
# --------------------------------------------------------------------------- #
def test_a_pair_s_shared_dose_and_time_apply_to_its_dosable_parts(timed_model):
    """'drugA+ko:TF06@1,6h', the data's own spelling of the pair at an untrained time, was refused ('a knockout takes
    no dose or time') while 'TF06+drugA@1,6h' was accepted; both are the drug at 1uM, 6h with the knockout."""
    want = "drug:drugA@1uM,6h + ko:TF06"
    for ask in ("drugA+ko:TF06@1,6h", "ko:TF06+drugA@1,6h", "TF06+drugA@1,6h", "drugA+TF06@1,6h"):
        assert str(timed_model.resolve([ask])[0]) == want, ask
    with pytest.raises(PerturbationError, match=r"'TF03\+TF08@1'.*applies to drugs and cytokines.*without it"):
        timed_model.resolve(["TF03+TF08@1"])
    # the panel syntax keeps each typed part's own quantities
    assert str(timed_model.resolve(["ko:TF06 + drug:drugA@1uM,6h"])[0]) == want


def test_a_pair_at_an_untrained_time_is_named_as_the_data_names_the_pair(timed_model):
    """It was named in typed form ('drug:drugA@1uM,6h + ko:TF06'), which no measured group is."""
    vocab = timed_model.perturbations
    perts = timed_model.resolve(["TF06+drugA@1,6h", "drugA+ko:TF06@1,24h", "drug:drugA@1uM,48h + ko:TF06"])
    assert vocab.labels_for(perts) == ["drugA+ko:TF06@1,6h", "drugA+ko:TF06@1,24h", "drugA+ko:TF06@1,48h"]
    # an untrained pair whose parts are trained labels: their names joined, then the dose and time they share
    assert vocab.labels_for(timed_model.resolve(["drug:drugB@1uM,24h + ko:TF06"])) == ["drugB+TF06@1,24h"]
    # parts at doses of their own keep the typed form (no one suffix names them)
    mixed = timed_model.resolve(["drug:drugA@1uM,6h + drug:drugB@1uM,24h"])
    assert vocab.labels_for(mixed) == [str(mixed[0])]


def test_a_typed_trained_pair_asked_in_the_other_order_is_found(timed_model):
    """'drugC+cytokine:CYTO1@10,24h' was refused as an unknown 'drugC' with the hint 'ko:drugC'."""
    want = str(timed_model.resolve(["cytokine:CYTO1+drugC@10,24h"])[0])
    assert str(timed_model.resolve(["drugC+cytokine:CYTO1@10,24h"])[0]) == want
    assert str(timed_model.resolve(["drugC+cytokine:CYTO1"])[0]) == want
    assert timed_model.perturbations.labels_for(timed_model.resolve(["drugC+cytokine:CYTO1@10,24h"])) == [
        "cytokine:CYTO1+drugC@10,24h"]


def test_a_pair_predicted_at_an_untrained_time_meets_its_measured_group(timed, timed_model, caplog):
    """Named in typed form, it was 'no measured cells' in evaluate and refused by to_cell_eval(like=)."""
    real = _timed_screen({"drugB@1": ("drugA+ko:TF06", "drug", "1uM", "6h")}, seed=1)
    base = real[real.obs["perturbation"] == "control"][:8].copy()
    pred = vc.Simulator(base, timed_model).simulate(["control", "TF06+drugA@1,6h"], progress=False,
                                                    samples=1).to_anndata()
    assert set(pred.obs["perturbation"]) == {"control", "drugA+ko:TF06@1,6h"}
    with caplog.at_level("WARNING"):
        table = evaluate(pred, real, profile="pearson", baselines=(), ceiling=False)
    assert canonical_label("drugA+ko:TF06@1,6h") in _scored(table) and "not scored" not in caplog.text
    like = vc.evaluate.to_cell_eval(pred)
    measured = vc.evaluate.to_cell_eval(real, like=like)
    assert set(measured.obs["target_gene"]) == {"non-targeting", "drugA+ko:TF06@1,6h"}


# --------------------------------------------------------------------------- #
# Conditions the model read as one prompt are never named after one of them (A1b)
# --------------------------------------------------------------------------- #
def _pooled_vocab() -> PerturbationVocab:
    """A model (written before training refused it) that trained a knockout at 24h and at 72h: both conditions are
    ko:TF06 to it."""
    return PerturbationVocab(labels={"TF06": "ko:TF06", "drugA": "drug:drugA"},
                             conditions={"TF06@,24h": "ko:TF06", "TF06@,72h": "ko:TF06",
                                         "drugA@1,24h": "drug:drugA@1uM,24h"},
                             dose_units={"drugA": "uM"})


def test_a_form_trained_from_several_conditions_is_named_by_its_label_never_by_one_of_them():
    """'TF06@,24h' was named 'TF06@,72h' (the condition added last), and evaluate scored it against the 72h cells."""
    vocab = _pooled_vocab()
    assert vocab.labels_for([parse("ko:TF06")]) == ["TF06"]
    assert vocab.pooled() == {"ko:TF06": ["TF06@,24h", "TF06@,72h"]}
    assert str(vocab.resolve("TF06")) == "ko:TF06" and vocab.labels_for([vocab.resolve("TF06")]) == ["TF06"]
    for asked, other in (("TF06@,24h", "TF06@,72h"), ("TF06@,72h", "TF06@,24h")):
        with pytest.raises(PerturbationError, match=rf"'{asked}' was trained as ko:TF06, as '{other}' was.*"
                                                    r"Ask 'TF06'.*retrain"):
            vocab.resolve(asked)
    assert "TF06" in vocab.panel() and not {"TF06@,24h", "TF06@,72h"} & set(vocab.panel())
    assert vocab.labels_for([vocab.resolve("drugA@1,24h")]) == ["drugA@1,24h"]  # one condition: named by it


def test_the_served_baseline_of_a_form_of_several_rows_is_their_mean():
    """delta_for served the last row (72h for a 24h ask); the model read both as one prompt."""
    from virtualcell.validation import Baselines

    delta = np.array([[1.0, 0.0, 2.0], [3.0, 2.0, 0.0], [5.0, 5.0, 5.0]], dtype=np.float32)
    base = Baselines(("G0", "G1", "G2"), ("ko:TF06", "ko:TF06", "drug:drugA@1uM,24h"), delta)
    got, name = base.delta_for("ko:TF06")
    assert name == "meanshift"
    np.testing.assert_allclose(got, [2.0, 1.0, 1.0])
    np.testing.assert_allclose(base.delta_for("drug:drugA@1uM,24h")[0], delta[2])


# --------------------------------------------------------------------------- #
# The additive baseline of a dosed pair, in any order (B2)
# --------------------------------------------------------------------------- #
def _additive_screen(pairs: list[str], singles: dict[str, np.ndarray], ctrl: np.ndarray) -> ad.AnnData:
    """Cells on their group's mean: the singles, and each pair exactly the sum of its parts' effects (the parts of a
    pair read from the map ``pairs`` -> parts below)."""
    groups = {"control": ctrl} | {k: ctrl + e for k, e in singles.items()}
    for p in pairs:
        groups[p] = ctrl + sum(singles[x] for x in PAIR_PARTS[p])
    X = np.concatenate([np.repeat(m[None, :], 5, axis=0) for m in groups.values()]).astype(np.float32)
    obs = pd.DataFrame({"perturbation": [k for k in groups for _ in range(5)]})
    obs.index = obs.index.astype(str)
    a = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(ctrl.size)]))
    DataContract("perturbation", "control").attach(a)
    return a


PAIR_PARTS = {"drugA+TF06@1,24h": ("drugA@1,24h", "TF06"), "TF06+drugA@1,24h": ("drugA@1,24h", "TF06"),
              "drugA+ko:TF06@1,24h": ("drugA@1,24h", "TF06"), "TF07+drugA@1,24h": ("drugA@1,24h", "TF07@,24h"),
              "drugA+TF08@10,24h": ("drugA@1,24h", "TF06")}


def test_additive_sums_a_drug_and_knockout_pair_in_either_order(caplog):
    """It existed only with the knockout written first ('TF06+drugA@1,24h'): the pair's dose was put on every part
    ('TF06@1,24h'), and a skipped pair was said at INFO only."""
    rng = np.random.default_rng(0)
    ctrl = rng.uniform(3.0, 5.0, 30)
    singles = {k: rng.normal(0, 0.5, 30) for k in ("drugA@1,24h", "TF06", "TF07@,24h")}
    pairs = ["drugA+TF06@1,24h", "TF06+drugA@1,24h", "drugA+ko:TF06@1,24h", "TF07+drugA@1,24h"]
    train = _additive_screen(pairs, singles, ctrl)
    targets = [(p, "all") for p in pairs] + [("drugA+TF08@10,24h", "all")]
    with caplog.at_level("WARNING"):
        pred = baselines.additive(train, targets=targets, max_cells=None)
    labels = pred.obs["perturbation"].astype(str)
    X = np.asarray(pred.X)
    c = X[(labels == "control").to_numpy()].mean(axis=0)
    for p in pairs:  # a knockout's part at the pair's time where it was measured so ('TF07@,24h'), else alone
        got = X[(labels == p).to_numpy()].mean(axis=0) - c
        np.testing.assert_allclose(got, sum(singles[x] for x in PAIR_PARTS[p]), atol=1e-5, err_msg=p)
    # drugA was not measured at 10: the pair is left out, said at WARNING with the part and the form looked for
    assert "drugA+TF08@10,24h" not in set(labels)
    assert "additive cannot predict" in caplog.text and "'drugA@10,24h'" in caplog.text


# --------------------------------------------------------------------------- #
# A stored dose or time column the measured file lacks (A6)
# --------------------------------------------------------------------------- #
def test_a_stored_time_column_the_measured_file_lacks_is_refused_by_name(timed):
    """The time key was dropped without a word and the 6h and 24h cells of drugA pooled."""
    real = timed.copy()
    real.obs = real.obs.rename(columns={"time": "timepoint"})
    with pytest.raises(ContractError, match=r"time column 'time'.*'timepoint'.*--time-key"):
        evaluate(None, real, profile="pearson", baselines=("pertmean",), ceiling=False)
    with pytest.raises(ContractError, match=r"time column 'time'.*time_key="):
        vc.evaluate.to_cell_eval(real)
    # named where it is now: both read the times again
    assert "drugA@1,6h" in set(vc.evaluate.to_cell_eval(real, time_key="timepoint").obs["target_gene"])
    gone = timed.copy()
    del gone.obs["dose"]
    with pytest.raises(ContractError, match=r"dose column 'dose'.*--dose-key"):
        vc.evaluate.split_controls(gone)


def test_predicted_cells_keep_naming_their_conditions_without_the_columns(timed):
    """Predicted cells carry no dose or time column (their labels name the conditions): today's behaviour stays."""
    pred = timed.copy()
    pred.obs["perturbation"] = DataContract.from_adata(timed).conditions(timed)
    pred.obs = pred.obs[["perturbation"]]  # the stored contract, with its dose and time keys, is kept
    out = vc.evaluate.to_cell_eval(pred)
    assert {"drugA@1,6h", "drugA@1,24h"} <= set(out.obs["target_gene"])


# --------------------------------------------------------------------------- #
# Groups that miss by a time one side names (B6)
# --------------------------------------------------------------------------- #
def test_groups_missing_by_a_time_one_side_names_are_told_the_fix_in_either_way(timed, caplog):
    """The --time-key hint came only where nothing matched; a prediction that matched its knockouts but not its timed
    drugs was told nothing of why."""
    untimed = timed.copy()
    DataContract("perturbation", "control", dose_key="dose").attach(untimed)  # the measured time column not named
    pred = _relabelled(timed, {})
    with caplog.at_level("WARNING"):
        table = evaluate(pred, untimed, profile="pearson", baselines=(), ceiling=False)
    assert "TF06" in {x.split("@")[0] for x in _scored(table)}  # some groups met
    assert "name times the measured labels lack" in caplog.text and "--time-key" in caplog.text
    caplog.clear()
    pred = _relabelled(untimed, {})  # predictions without times, measured cells with
    with caplog.at_level("WARNING"):
        evaluate(pred, timed, profile="pearson", baselines=(), ceiling=False)
    assert "name no time where the measured labels name one" in caplog.text and "--time-key" in caplog.text
