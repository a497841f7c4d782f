"""A drug's doses are conditions of their own: grouped apart, named apart, predicted apart.

The data contract names a dose (and time) column; every part of the package that groups cells
(pairing, baselines, the validation verdict, evaluation) groups them by condition, and the
model names its predictions as the data names those conditions (``"drugA@10"``).
"""

from __future__ import annotations

import numpy as np
import pytest

import virtualcell as vc
from virtualcell.contract import DataContract
from virtualcell.errors import PerturbationError
from virtualcell.perturbations import Perturbation, parse, quantity_suffix

from conftest import trained_tiny


@pytest.fixture(scope="module")
def dosed():
    """A small synthetic screen with knockouts, drugs at three doses and a cytokine at one dose."""
    return vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=3, n_pairs=0, n_drugs=2, n_cytokines=1,
                                        n_cells_per_condition=40, n_control_cells=120, n_contexts=1, seed=0)


@pytest.fixture(scope="module")
def dosed_model(dosed, tmp_path_factory):
    return trained_tiny(dosed, tmp_path_factory.mktemp("dosed_model"))


def test_conditions_carry_dose_and_time(dosed):
    contract = DataContract.from_adata(dosed)
    cond = contract.conditions(dosed)
    obs = dosed.obs
    drug = (obs["perturbation_type"] == "drug").to_numpy()
    expected = [f"{p}@{d:g}" for p, d in zip(obs["perturbation"][drug], obs["dose"][drug])]
    assert list(cond[drug]) == expected
    assert set(cond[(obs["perturbation"] == "control").to_numpy()]) == {"control"}
    ko = (obs["perturbation_type"] == "knockout").to_numpy()  # dose 0: no dose
    assert list(cond[ko]) == list(obs["perturbation"][ko].astype(str))
    # no dose column in the contract: the conditions are the labels
    plain = DataContract("perturbation", "control", context_key="cell_type")
    assert list(plain.conditions(dosed)) == list(plain.labels(dosed))


def test_time_without_dose_round_trips():
    p = Perturbation("drug", "x", None, None, 24.0, "h")
    assert str(p) == "drug:x@,24h" and parse(str(p)) == p
    assert quantity_suffix(10.0, 24.0) == "@10,24h" and quantity_suffix(None, None) == ""
    assert parse("drug:x@10uM") == Perturbation("drug", "x", 10.0, "uM")


def test_model_names_and_resolves_conditions(dosed, dosed_model):
    vocab = dosed_model.perturbations
    drugs = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))
    d = drugs[0]
    assert vocab.conditions_of(d) == [f"{d}@0.1", f"{d}@1", f"{d}@10"]
    assert str(dosed_model.resolve([f"{d}@10"])[0]) == f"drug:{d}@10"
    assert str(dosed_model.resolve([f"{d}@3"])[0]) == f"drug:{d}@3"  # an untrained dose of a trained drug
    # a time asked of a model that trained none reads a time token nothing taught: refused, with the form without it
    with pytest.raises(PerturbationError, match=rf"trained no condition with a time.*'drug:{d}@10'"):
        dosed_model.resolve([f"{d}@10,24h"])
    with pytest.raises(PerturbationError, match=r"3 doses or times.*Name one of them"):
        dosed_model.resolve([d])
    cyto = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "cytokine"].iloc[0])
    assert str(dosed_model.resolve([cyto])[0]) == f"cytokine:{cyto}@1"  # its one trained dose, as it was trained
    # predictions are named as the data names its conditions
    perts = dosed_model.resolve([f"{d}@10", f"{d}@3", cyto])
    assert vocab.labels_for(perts) == [f"{d}@10", f"{d}@3", f"{cyto}@1"]
    # the full panel: every trained condition, a drug at each of its doses, never the bare multi-dose label
    assert {f"{d}@0.1", f"{d}@1", f"{d}@10", f"{cyto}@1"} <= set(vocab.trained()) and d not in vocab.trained()
    assert all(dosed_model.resolve(vocab.trained()))
    # its doses were plain numbers: a dose with a unit could be 1,000x off what it was trained on, so it is refused
    with pytest.raises(PerturbationError, match=rf"trained on doses written as plain numbers.*'{d}@10' if that"):
        dosed_model.resolve([f"{d}@10uM"])
    with pytest.raises(PerturbationError, match="plain numbers"):
        dosed_model.resolve([f"drug:{d}@10nM + ko:STAT1"])
    # a training condition as the data names it, in a panel line or a combination (parse reads it as a label)
    assert str(dosed_model.resolve([parse(f"{d}@10")])[0]) == f"drug:{d}@10"
    ko = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "knockout"].iloc[0])
    assert str(dosed_model.resolve([f"{d}@10 + ko:{ko}"])[0]) == f"drug:{d}@10 + ko:{ko}"
    # a typed drug without a dose names no condition it trained (it was predicted from a prompt no cell had)
    with pytest.raises(PerturbationError, match=rf"drug:{d} was trained at doses only.*Name one of them"):
        dosed_model.resolve([f"drug:{d}"])
    assert str(dosed_model.resolve([f"cytokine:{cyto}"])[0]) == f"cytokine:{cyto}@1"  # one dose: that one
    with pytest.raises(PerturbationError, match="trained no condition with a time"):  # (24h is read as a time, not
        dosed_model.resolve([f"{d}@1,24h"])                                                # as a dose's unit)
    # and the checkpoint keeps the conditions
    again = type(vocab).from_dict(vocab.to_dict())
    assert again.conditions == vocab.conditions


def test_an_untrained_dose_with_a_unit_is_named_as_the_data_names_its_conditions(dosed, tmp_path):
    """Trained on doses written with a unit ('1uM'), a drug at an untrained dose was labelled 'drugA@3uM', which no
    measured group is (the data's conditions are 'drugA@3', the number in the agent's unit): evaluate matched none."""
    from virtualcell.train import TrainConfig, train

    data = dosed.copy()
    drug = (data.obs["perturbation_type"] == "drug").to_numpy()
    data.obs["dose"] = [f"{x:g}uM" if is_drug else "" for x, is_drug in zip(data.obs["dose"], drug)]
    cfg = TrainConfig(top_k=20, hidden_size=16, n_layers=1, n_heads=2, max_steps=1, batch_size=8, seed=0,
                      kind_key="perturbation_type", verdict_fraction=0.0)
    model = train(data, out=tmp_path, config=cfg, progress=False)
    d = sorted(set(data.obs["perturbation"][drug].astype(str)))[0]
    assert model.perturbations.labels_for(model.resolve([f"{d}@3", f"{d}@3000nM", f"{d}@10"])) == [
        f"{d}@3", f"{d}@3", f"{d}@10"]
    assert set(DataContract.from_adata(data).conditions(data)) >= {f"{d}@10"}


def test_baselines_keep_each_dose(dosed, dosed_model):
    from virtualcell.validation import Baselines

    contract = DataContract.from_adata(dosed)
    base = Baselines.fit(dosed, contract, dosed_model)
    d = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))[0]
    low, name_low = base.delta_for(f"drug:{d}@0.1")
    high, name_high = base.delta_for(f"drug:{d}@10")
    assert name_low == name_high == "meanshift"
    # the measured deltas of each dose, not their pool
    X = vc.sentences.model_expression(dosed, dosed_model.genes)[0].toarray()
    cond = contract.conditions(dosed)
    measured = X[cond == f"{d}@10"].mean(0) - X[cond == "control"].mean(0)
    np.testing.assert_allclose(high, measured, atol=1e-5)
    assert np.linalg.norm(high - low) > 0.1 * np.linalg.norm(high)
    # an untrained dose between trained ones: their deltas interpolated in log dose (protocol 6); beyond them,
    # the nearest trained dose's
    mid, name_mid = base.delta_for(f"drug:{d}@1")
    w = np.log10(7) / np.log10(10)  # 7 lies between 1 and 10
    np.testing.assert_allclose(base.delta_for(f"drug:{d}@7")[0], (1 - w) * mid + w * high, atol=1e-5)
    np.testing.assert_allclose(base.delta_for(f"drug:{d}@20")[0], high)
    np.testing.assert_allclose(base.delta_for(f"drug:{d}@0.01")[0], low)
    assert name_mid == "meanshift" and base.delta_for(f"drug:{d}@7")[1] == "dose"  # named as evaluate's baseline


def test_effect_sizes_per_dose(dosed):
    table = vc.evaluate.effect_size(dosed)
    d = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))[0]
    rows = table[table["perturbation"].str.startswith(f"{d}@")]
    assert sorted(rows["perturbation"]) == [f"{d}@0.1", f"{d}@1", f"{d}@10"]


def test_ot_pairs_and_verdict_split_group_by_condition(dosed):
    from virtualcell.train import TrainConfig, build_pairs, verdict_split

    contract = DataContract.from_adata(dosed)
    src, _ = build_pairs(dosed, contract, pairing="ot", seed=0)
    cond = contract.conditions(dosed)
    is_ctrl = contract.is_control(dosed)
    for c in set(cond[~is_ctrl]):  # one-to-one within each condition: no control serves two cells of one dose
        s = src[cond == c]
        assert (s >= 0).all() and len(set(s)) == s.size
    held = verdict_split(dosed, contract, TrainConfig(verdict_fraction=0.25, seed=0))
    held_conditions = set(cond[held & ~is_ctrl])
    assert any("@" in c for c in held_conditions)  # doses are chosen as conditions


def test_own_dose_tokens_name_each_trained_dose(dosed, tmp_path):
    """dose_tokens="own": a trained (drug, dose) gets its own token after the shared dose token; an untrained
    dose keeps only the shared one; the choice is checked and kept in the checkpoint."""
    from virtualcell.errors import TrainingError
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0,
                      kind_key="perturbation_type", verdict_fraction=0.0, dose_tokens="own")
    train(dosed, out=tmp_path, config=cfg, progress=False)
    model = vc.C2SModel.load(tmp_path)
    assert model.perturbations.own_doses
    d = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))[0]
    fmt = model.format
    words = {v: k for k, v in fmt.token_id.items()}

    def suffix(p: str) -> list[str]:
        return [words[i] for i in fmt.suffix(model.resolve([p])[0])]

    assert suffix(f"{d}@10") == ["<drug>", f"<drug:{d}>", "<dose:1>", f"<dose:drug:{d}:1>", "<out>"]
    assert suffix(f"{d}@0.1") == ["<drug>", f"<drug:{d}>", "<dose:-1>", f"<dose:drug:{d}:-1>", "<out>"]
    assert suffix(f"{d}@1000") == ["<drug>", f"<drug:{d}>", "<dose:3>", "<out>"]  # never trained at it
    with pytest.raises(TrainingError, match="dose_tokens"):
        TrainConfig(dose_tokens="per-drug")


def test_auto_kind_keeps_a_dosed_label_s_doses(dosed):
    """Without a kind (kind='auto'), a label that is not a gene of the panel but whose cells carry a dose is a drug:
    its doses stay conditions of their own (once they were dropped, and the verdict's simulate then refused the
    repeated names); a plain label cannot carry a dose and says so instead of dropping it."""
    from virtualcell.errors import DataError
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    contract = DataContract.from_adata(dosed)
    genes = Vocabulary.from_adata(dosed)
    typed, vocab = typed_labels(dosed, contract, genes, TrainConfig())
    drug = (dosed.obs["perturbation_type"] == "drug").to_numpy()
    doses = dosed.obs["dose"].to_numpy()[drug]
    assert all(parse(t).kind == "drug" and parse(t).dose == pytest.approx(d) for t, d in zip(typed[drug], doses))
    assert vocab.resolve("drugA@10") == parse("drug:drugA@10")
    ko = (dosed.obs["perturbation_type"] == "knockout").to_numpy()
    assert {parse(t).kind for t in typed[ko]} == {"knockout"}  # gene labels stay knockouts
    with pytest.raises(DataError, match="kind 'label'.*dose"):
        typed_labels(dosed, contract, genes, TrainConfig(kind="label"))


def _with_dose_strings(adata, write):  # noqa: ANN001, ANN202
    """``adata`` with its dose column written as strings by ``write(label, dose)`` (cells of dose 0 get "")."""
    out = adata.copy()
    out.obs["dose"] = [write(str(lab), d) if d > 0 else "" for lab, d in zip(out.obs["perturbation"], out.obs["dose"])]
    return out


def test_a_dose_column_with_units_reads_as_each_agent_s_numbers(dosed):
    """Doses written with units ("10uM") are read, not silently dropped (they once read as no dose, pooling a drug's
    doses into one group); one family given in several units is put on one; values that are no dose stop."""
    from virtualcell.errors import ContractError

    contract = DataContract.from_adata(dosed)
    plain = sorted(set(contract.conditions(dosed)))
    assert contract.dose_units(dosed) == {}
    cyto = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "cytokine"].iloc[0])

    in_um = _with_dose_strings(dosed, lambda lab, d: f"{d:g}uM" if lab != cyto else f"{d:g} ng/ml")
    assert sorted(set(contract.conditions(in_um))) == plain
    assert contract.dose_units(in_um) == {"drugA": "uM", "drugB": "uM", cyto: "ng/ml"}
    mixed = _with_dose_strings(dosed, lambda lab, d: f"{d * 1000:g}nM" if d < 1 else f"{d:g}µM")
    assert sorted(set(contract.conditions(mixed))) == plain  # 100nM is drugA@0.1, in uM
    assert set(contract.dose_units(mixed).values()) == {"uM"}
    with_nan = dosed.copy()
    with_nan.obs["dose"] = with_nan.obs["dose"].where(with_nan.obs["dose"] > 0)  # NaN: no dose, not an error
    contract.validate(with_nan)
    assert sorted(set(contract.conditions(with_nan))) == plain
    odd_control = _with_dose_strings(dosed, lambda lab, d: "vehicle" if lab == "control" else f"{d:g}")
    assert sorted(set(contract.conditions(odd_control))) == plain  # a control's value is not read

    for write, match in [
        (lambda lab, d: "high" if d > 5 else f"{d:g}", r"not a number with an optional unit: 'high'"),
        (lambda lab, d: f"-{d:g}" if d > 5 else f"{d:g}", r"has negative values: '-10'.*positive"),
        (lambda lab, d: f"{d:g}" if d < 1 else f"{d:g}uM", r"some doses in 'uM' and others without a unit"),
        (lambda lab, d: f"{d:g}ng/ml" if d < 1 else f"{d:g}uM", r"doses of '(drugA|drugB|CYTO1)'.*do not convert"),
    ]:
        with pytest.raises(ContractError, match=match):
            contract.conditions(_with_dose_strings(dosed, write))

    timed = dosed.copy()
    timed.obs["time"] = ["30min" if i % 2 else "1d" for i in range(timed.n_obs)]
    with_time = DataContract("perturbation", "control", time_key="time")
    assert {c.partition("@")[2] for c in with_time.conditions(timed) if "@" in c} == {",0.5h", ",24h"}
    timed.obs["time"] = "3kg"
    with pytest.raises(ContractError, match="units that are not times: 'kg'"):
        with_time.conditions(timed)


def test_a_model_trained_in_um_reads_doses_in_nm_and_refuses_ones_that_do_not_convert(dosed, tmp_path):
    from virtualcell.train import TrainConfig, train

    cyto = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "cytokine"].iloc[0])
    data = _with_dose_strings(dosed, lambda lab, d: f"{d:g}uM" if lab != cyto else f"{d:g}ng/ml")
    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=1, batch_size=8, seed=0,
                      kind_key="perturbation_type", verdict_fraction=0.0)
    train(data, out=tmp_path, config=cfg, progress=False)
    model = vc.C2SModel.load(tmp_path)  # the units travel in the checkpoint
    assert model.perturbations.dose_units["drugA"] == "uM"
    perts = model.resolve(["drugA@100nM", "drugA@10uM", "drugA@1", f"{cyto}@1000pg/ml", "drugA@1000nM"])
    assert [str(p) for p in perts] == ["drug:drugA@0.1uM", "drug:drugA@10uM", "drug:drugA@1uM",
                                       f"cytokine:{cyto}@1ng/ml", "drug:drugA@1uM"]
    assert model.perturbations.labels_for(perts[:4]) == ["drugA@0.1", "drugA@10", "drugA@1", f"{cyto}@1"]
    with pytest.raises(PerturbationError, match="trained on doses of drugA in uM, and ng/ml does not convert"):
        model.resolve(["drugA@5ng/ml"])


def test_a_user_s_dosed_screen_across_contexts_from_training_to_evaluation(tmp_path, capsys):
    """The path of a user's own file (no stored contract): a drug at doses across patients (written with their unit),
    one patient's treated cells held out. Predicted cells carry their source cell's context and are named as the
    data's conditions whatever unit the dose is asked in, and `virtualcell evaluate` scores each dose apart
    (--dose-key) with meanshift learned from the training cells (--train)."""
    import anndata as ad

    from virtualcell.cli import main
    from virtualcell.train import TrainConfig, train

    screen = vc.datasets.synthetic_screen(n_genes=40, n_tfs=8, n_knockouts=0, n_pairs=0, n_drugs=2, n_cytokines=0,
                                          n_cells_per_condition=30, n_control_cells=80, n_contexts=2, seed=1)
    screen.uns.pop("virtualcell")
    screen.obs = screen.obs.rename(columns={"cell_type": "patient", "perturbation": "treatment"})
    screen.obs["dose"] = [f"{d:g} uM" if d > 0 else "" for d in screen.obs["dose"]]  # as files often write them
    obs = screen.obs
    held = (obs["patient"] == "typeB").to_numpy()
    ctrl = (obs["treatment"] == "control").to_numpy()
    base_idx = np.flatnonzero(held & ctrl)[::2]
    training = screen[~(held & ~ctrl)].copy()  # every control, the other patient's treated cells
    contract = DataContract("treatment", "control", context_key="patient", dose_key="dose")
    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0,
                      verdict_fraction=0.0)  # kind "auto": the dosed labels are drugs
    model = train(training, out=tmp_path / "model", contract=contract, config=cfg, progress=False)
    res = vc.Simulator(screen[base_idx].copy(), model).simulate(["drugA@10uM", "drugA@1000nM"], keep_cells=True,
                                                                progress=False, blend=False)
    pred = res.to_anndata()
    # labelled in the training data's own column, each cell in its source cell's patient
    assert set(pred.obs["patient"]) == {"typeB"} and set(pred.obs["treatment"]) == {"drugA@10", "drugA@1"}
    pred.write_h5ad(tmp_path / "pred.h5ad")
    real_idx = np.flatnonzero(held & (~ctrl | ~np.isin(np.arange(screen.n_obs), base_idx)))
    screen[real_idx].copy().write_h5ad(tmp_path / "real.h5ad")
    screen[base_idx].copy().write_h5ad(tmp_path / "base.h5ad")
    training.write_h5ad(tmp_path / "train.h5ad")
    args = ["evaluate", "--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"), "--baseline",
            str(tmp_path / "base.h5ad"), "--perturbation-key", "treatment", "--control", "control",
            "--context-key", "patient", "--profile", "fast", "--baselines", "nochange,meanshift", "--no-ceiling"]
    assert main([*args, "--out", str(tmp_path / "e0")]) == 2  # the doses would pool into 'drugA': said, with the fix
    assert "--dose-key" in capsys.readouterr().err
    assert main([*args, "--dose-key", "dose", "--train", str(tmp_path / "train.h5ad"), "--out", str(tmp_path / "e")]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "e" / "metrics.csv")
    model, shift = table[table["method"] == "model"], table[table["method"] == "meanshift"]
    assert set(model["perturbation"]) == {"drugA@10", "drugA@1"} and set(table["context"]) == {"typeB"}
    assert {"drugA@10", "drugA@1", "drugA@0.1"} <= set(shift["perturbation"])  # each dose, from the other patient
    assert ad.read_h5ad(tmp_path / "real.h5ad").uns.get("virtualcell") is None  # the file on disk is untouched


def test_a_screen_of_doses_draws_each_agent_s_dose_response(dosed, dosed_model, tmp_path):
    """A panel with one drug at several doses (one of them never trained) gets its dose series and
    dose_response.png; a single dose, a knockout and a cytokine at one dose are no series."""
    import matplotlib.pyplot as plt

    from virtualcell.errors import ScreenError

    drugs = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))
    a, b = drugs[:2]
    cyto = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "cytokine"].iloc[0])
    ko = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "knockout"].iloc[0])
    base = dosed[dosed.obs["perturbation"].astype(str) == "control"][:8].copy()
    sim = vc.Simulator(base, dosed_model, seed=0)
    res = sim.screen([f"{a}@0.1", f"{a}@1", f"{a}@3", f"{a}@10", f"{b}@10", f"{cyto}@1", ko], out=tmp_path / "s",
                     progress=False)
    series = res.dose_series()
    assert list(series["series"]) == [f"drug:{a}"] * 4 and list(series["dose"]) == [0.1, 1.0, 3.0, 10.0]
    assert list(series["trained"]) == [True, True, False, True]  # 3 lies between the doses it trained on
    ranked = res.ranking.set_index("perturbation")
    assert list(series["score"]) == list(ranked.loc[series["perturbation"], "score"])  # the ranking's own rows
    assert (tmp_path / "s" / "dose_response.png").stat().st_size > 0
    fig = res.plot_dose_response(genes=[str(res.aggregates.gene.values[0])], return_fig=True)
    assert len(fig.axes) == 2
    plt.close(fig)
    with pytest.raises(ScreenError, match=r"NOTAGENE.*not in the screen's aggregates"):
        res.plot_dose_response(genes=["NOTAGENE"])
    # a screen without a dose series draws none and says how to make one
    single = sim.screen([f"{a}@10", ko], out=tmp_path / "t", progress=False)
    assert single.dose_series().empty and not (tmp_path / "t" / "dose_response.png").exists()
    with pytest.raises(ScreenError, match=r"two or more doses.*'drug:NAME@0.1uM'"):
        single.plot_dose_response()


def test_dose_series_puts_units_on_one_scale_and_refuses_units_it_cannot():
    import pandas as pd

    from virtualcell.dose_response import dose_series
    from virtualcell.errors import ScreenError

    def ranking(labels):
        n = len(labels)
        return pd.DataFrame({"perturbation": labels, "rank": range(1, n + 1), "score": np.arange(n, dtype=float),
                             "score_low": np.zeros(n), "score_high": np.ones(n) * n})

    s = dose_series(ranking(["drug:A@500nM,24h", "drug:A@2µM,24h", "drug:A@1uM,6h", "cytokine:IFNB@10ng/ml",
                             "cytokine:IFNB@0.1ug/ml", "ko:STAT1", "drug:A@1uM,6h + ko:STAT1"]))
    assert list(s["series"]) == ["cytokine:IFNB", "cytokine:IFNB", "drug:A,24h", "drug:A,24h"]  # 6h has one dose
    assert list(s["dose"]) == [10.0, 100.0, 0.5, 2.0] and list(s["unit"]) == ["ng/ml", "ng/ml", "uM", "uM"]
    with pytest.raises(ScreenError, match=r"drug:A is screened at doses in units \['ng/ml', 'uM'\]"):
        dose_series(ranking(["drug:A@1uM", "drug:A@10ng/ml"]))
    with pytest.raises(ScreenError, match="no 'perturbation' column"):
        dose_series(pd.DataFrame({"score": [1.0]}))


def test_a_time_course_is_one_agent_at_one_dose_over_time():
    import matplotlib.pyplot as plt
    import pandas as pd
    import xarray as xr

    from virtualcell.dose_response import dose_series, plot_time_course, time_series
    from virtualcell.errors import ScreenError

    labels = ["drug:A@1uM,6h", "drug:A@1000nM,1d", "drug:A@10uM,6h", "drug:A@1uM,30min", "cytokine:IFNB@10ng/ml,6h"]
    ranking = pd.DataFrame({"perturbation": labels, "rank": range(1, 6), "score": [1.0, 3.0, 2.0, 0.5, 4.0],
                            "score_low": [0.5, 2.0, 1.0, 0.1, 3.0], "score_high": [1.5, 4.0, 3.0, 0.9, 5.0],
                            "trained": [True, True, True, False, True]})
    t = time_series(ranking)
    assert list(t["series"]) == ["drug:A@1uM"] * 3 and list(t["time_h"]) == [0.5, 6.0, 24.0]  # days and minutes
    assert list(t["trained"]) == [False, True, True]
    assert list(dose_series(ranking)["series"]) == ["drug:A,6h", "drug:A,6h"]  # 1 and 10 uM at 6h
    agg = xr.Dataset({"delta": (("perturbation", "gene"), np.arange(10.0).reshape(5, 2))},
                     coords={"perturbation": labels, "gene": ["G1", "G2"]})
    fig = plot_time_course(ranking, agg, n_genes=1, return_fig=True)
    assert len(fig.axes) == 2 and fig.axes[0].get_xlabel() == "time (h)"
    plt.close(fig)
    with pytest.raises(ScreenError, match=r"two or more times.*'drug:NAME@1uM,\{6,24\}h'"):
        plot_time_course(ranking.iloc[[0, 2]])  # 1 and 10 uM at 6h: a dose series, no time course


def test_the_dose_baseline_interpolates_the_agent_s_other_doses_in_log_dose():
    """A@1 between A@0.1 (+0.5) and A@10 (+2.5): halfway in log10 dose, +1.5; beyond the measured doses, the
    nearest; an agent with no other dose is skipped by name. Built in, but not among the defaults."""
    import anndata as ad
    import pandas as pd

    from virtualcell.evaluate import DEFAULT_BASELINES
    from virtualcell.evaluate.baselines import BASELINES, dose

    labels = ["control"] * 50 + ["A@0.1"] * 20 + ["A@10"] * 20 + ["A@100"] * 20 + ["A@10,24h"] * 20
    X = np.full((len(labels), 3), 1.2)  # log-normalized values (not whole numbers, so not read as counts)
    X[50:70, 0] += 0.5
    X[70:90, 0] += 2.5
    X[90:110, 0] += 3.0
    X[110:130, 0] += 9.0  # another time: never mixed with the doses at no time
    cells = ad.AnnData(X.astype(np.float32), obs=pd.DataFrame({"perturbation": labels},
                                                               index=[f"c{i}" for i in range(len(labels))]),
                       var=pd.DataFrame(index=["G1", "G2", "G3"]))
    base, train = cells[:25].copy(), cells[25:].copy()
    targets = [("A@1", "all"), ("A@1000", "all"), ("A@0.01", "all"), ("A@10", "all"), ("B@1", "all")]
    out = dose(train, baseline=base, targets=targets, perturbation_key="perturbation", control="control")
    shift = {t: float(np.asarray(out[out.obs["perturbation"] == t].X.mean(0)).ravel()[0] - 1.2) for t, _ in targets[:4]}
    # A@10 from its other doses (0.1 and 100: 1/3 of the way in log dose), never from itself
    assert shift == pytest.approx({"A@1": 1.5, "A@1000": 3.0, "A@0.01": 0.5, "A@10": 0.5 + 2.5 * 2 / 3}, abs=1e-5)
    assert out.uns["virtualcell"]["skipped"] == ["B@1 in all: dose cannot predict it from the training data"]
    assert "dose" in BASELINES and "dose" not in DEFAULT_BASELINES
    # labels that carry their unit read on one scale: 100nM and 10uM around 1uM (halfway in log dose)
    train.obs["perturbation"] = train.obs["perturbation"].astype(str).replace({"A@0.1": "A@100nM", "A@10": "A@10uM"})
    out = dose(train, baseline=base, targets=[("A@1uM", "all")], perturbation_key="perturbation", control="control")
    predicted = out[out.obs["perturbation"] == "A@1uM"]
    assert float(np.asarray(predicted.X.mean(0)).ravel()[0] - 1.2) == pytest.approx(1.5, abs=1e-5)
    # times read in hours: a day's doses meet a target named in hours (the 24-hour cells stay apart from no time)
    train.obs["perturbation"] = train.obs["perturbation"].astype(str).replace({"A@10,24h": "A@10,1d"})
    out = dose(train, baseline=base, targets=[("A@1,24h", "all")], perturbation_key="perturbation", control="control")
    predicted = out[out.obs["perturbation"] == "A@1,24h"]
    assert float(np.asarray(predicted.X.mean(0)).ravel()[0] - 1.2) == pytest.approx(9.0, abs=1e-5)


def test_a_dose_in_a_trained_dose_s_bin_is_said_to_read_its_prompt_and_a_sole_time_is_filled_in(dosed, dosed_model,
                                                                                                   caplog):
    """drugA@1.5 is no trained condition, but the model writes doses in half-decade bins, so it reads drugA@1's
    prompt: simulate says so (once per Simulator). A dose asked without a time, of an agent trained at one time
    only, is that time (else the prompt would be a form no training cell had)."""
    from virtualcell.prompts import PerturbationVocab

    d = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))[0]
    perts = dosed_model.resolve([f"{d}@1.5", f"{d}@3", f"{d}@1"])
    assert dosed_model.prompt_twins(perts) == {f"drug:{d}@1.5": f"{d}@1"}  # @3 is its own bin; @1 is trained
    sim = vc.Simulator(dosed[dosed.obs["perturbation"] == "control"][:4].copy(), dosed_model)
    with caplog.at_level("WARNING", logger="virtualcell"):
        sim.simulate([f"{d}@1.5"], progress=False)
        sim.simulate([f"{d}@1.5"], progress=False)
    said = [r.message for r in caplog.records if "read the prompt of one" in r.message]
    assert len(said) == 1 and f"drug:{d}@1.5 as {d}@1" in said[0]
    vocab = PerturbationVocab(labels={"IFNB": "cytokine:IFNB"}, conditions={"IFNB@10,6h": "cytokine:IFNB@10,6h"})
    assert str(vocab.resolve("cytokine:IFNB@10")) == str(vocab.resolve("IFNB@10")) == "cytokine:IFNB@10,6h"
    assert str(vocab.resolve("cytokine:IFNB@10,2h")) == "cytokine:IFNB@10,2h"  # a time asked stays


def test_evaluate_names_measured_doses_in_the_predictions_units():
    """Condition names carry no unit, and a file puts an agent's doses on its family's common unit (uM) only where it
    holds several of its units: a model trained in nM labels 1 nM 'drugA@1', and a measured file with 1nM and 1uM
    cells names its 1 uM cells 'drugA@1'. evaluate scored the 1 nM prediction against the 1 uM cells. A prediction
    records its units (uns['virtualcell']['dose_units']) and measured doses are named in them."""
    import anndata as ad
    import pandas as pd

    from virtualcell.perturbations import condition_in_units, units_of_text, units_text

    rng = np.random.default_rng(0)
    g = 20
    ctrl, low, high = (rng.uniform(1, 3, g) for _ in range(3))
    groups = {("control", ""): ctrl, ("drugA", "1nM"): low, ("drugA", "1uM"): high}
    X = np.concatenate([np.clip(m + rng.normal(0, 0.2, (40, g)), 0, None) for m in groups.values()])
    obs = pd.DataFrame([k for k in groups for _ in range(40)], columns=["perturbation", "dose"])
    obs.index = obs.index.astype(str)
    real = ad.AnnData(X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    DataContract("perturbation", "control", dose_key="dose").attach(real)
    base, ref = vc.evaluate.split_controls(real, seed=0)
    cells = ref[ref.obs["dose"] == "1nM"]  # a perfect prediction of 1 nM, labelled as a model trained in nM does
    pred = ad.AnnData(np.vstack([cells.X, base.X]), var=real.var.copy(),
                      obs=pd.DataFrame({"perturbation": ["drugA@1"] * cells.n_obs + ["control"] * base.n_obs},
                                       index=[str(i) for i in range(cells.n_obs + base.n_obs)]))
    pred.uns["virtualcell"] = {"dose_units": units_text({"drugA": "nM"})}
    assert units_of_text(pred.uns["virtualcell"]["dose_units"]) == {"drugA": "nM"}
    t = vc.evaluate.evaluate(pred, ref, baseline=base, baselines=(), ceiling=False, profile=["mae"])
    assert set(t["perturbation"]) == {"drugA@1"} and float(t["value"].iloc[0]) < 0.05  # the 1 nM cells
    assert condition_in_units("drugA@1,24h", {"drugA": "uM"}, {"drugA": "ng/ml"}) == "drugA@1,24h"  # no conversion


def test_a_dose_column_in_a_spreadsheets_exponent_form_reads_its_numbers():
    """'1.00E+01' (how spreadsheets export numbers) was cut at its '+' as a pair's value: three doses read as one
    condition 'drugA@1' in a unit 'E'. A '+' after an exponent's E is the exponent's."""
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"perturbation": ["control", "drugA", "drugA", "drugA", "drugA"],
                        "dose": ["", "1.00E+01", "1.00E+02", "1.00E+03", "1e+1+1e+1"]}, index=list("abcde"))
    a = ad.AnnData(np.ones((5, 3), np.float32), obs=obs)
    c = DataContract("perturbation", "control", dose_key="dose")
    assert list(c.conditions(a)) == ["control", "drugA@10", "drugA@100", "drugA@1000", "drugA@10"]


def test_a_dose_without_a_time_of_an_agent_trained_at_several_times_is_refused_and_a_dosed_label_combines():
    """'drugA@100' of a drug trained at 6 h and 24 h (never without a time) went through as a prompt no training cell
    had, served one time's baseline; it is refused, naming the times. 'drugA@100,24h+G5' ended in a bare
    AssertionError (the whole text after '@' was read as drugA's quantities)."""
    from virtualcell.prompts import PerturbationVocab

    vocab = PerturbationVocab(labels={"drugA": "drug:drugA", "G5": "ko:G5"},
                              conditions={"drugA@10,24h": "drug:drugA@10nM,24h", "drugA@100,6h": "drug:drugA@100nM,6h"},
                              dose_units={"drugA": "nM"})
    with pytest.raises(PerturbationError, match=r"several times \(6h, 24h\).*Add the time, e.g. 'drugA@100,6h'"):
        vocab.resolve("drugA@100")
    assert str(vocab.resolve("drugA@100,24h+G5")) == "drug:drugA@100nM,24h + ko:G5"
    assert str(vocab.resolve("drugA@30,24h")) == "drug:drugA@30nM,24h"


def test_a_dosed_drug_with_a_knockout_of_a_panel_gene_is_read_part_by_part():
    """'drugA+G5' at 10 nM, G5 a gene of the panel: one kind for the label typed it 'drug:G5@10nM + drug:drugA@10nM',
    a form no one asks; each part is its own kind, the dose the drug's."""
    import anndata as ad
    import pandas as pd

    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    obs = pd.DataFrame({"perturbation": ["control", "drugA+G5", "drugA", "G5"], "dose": ["", "10nM", "10nM", ""]},
                       index=list("abcd"))
    a = ad.AnnData(np.ones((4, 3), np.float32), obs=obs, var=pd.DataFrame(index=["G5", "G6", "G7"]))
    typed, vocab = typed_labels(a, DataContract("perturbation", "control", dose_key="dose"),
                                Vocabulary.from_adata(a), TrainConfig())
    assert list(typed) == ["control", "drug:drugA@10nM + ko:G5", "drug:drugA@10nM", "ko:G5"]
    assert vocab.labels["drugA+G5"] == "drug:drugA + ko:G5"


def test_an_agent_in_two_unit_families_is_refused_also_inside_a_combination():
    """'drugA+drugB' at 10nM beside drugB alone at 5ng/ml: the units were checked per label, so the pair passed and
    its 10 nM was written 'drugB@0.01ng/ml' (the unit map kept the last label's)."""
    import anndata as ad
    import pandas as pd

    from virtualcell.contract import ContractError

    obs = pd.DataFrame({"perturbation": ["control", "drugA+drugB", "drugB", "drugA"],
                        "dose": ["", "10nM", "5ng/ml", "1uM"]}, index=list("abcd"))
    a = ad.AnnData(np.ones((4, 3), np.float32), obs=obs)
    with pytest.raises(ContractError, match=r"doses of 'drugB'.*'ng/ml \(drugB\)'.*part of a combination"):
        DataContract("perturbation", "control", dose_key="dose").conditions(a)
    a.obs["dose"] = ["", "10nM", "5nM", "1uM"]
    assert DataContract("perturbation", "control", dose_key="dose").dose_units(a) == {"drugA": "uM", "drugB": "uM"}


def test_training_warns_where_trained_doses_read_one_prompt(caplog):
    """Doses are half-decade bins of log10 of the value in its unit, from 1e-4 to 1e4: 1e-9 .. 1e-6 written in M all
    read the 1e-4 bin, four conditions the model cannot tell apart, without a word."""
    import logging

    import anndata as ad
    import pandas as pd

    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    obs = pd.DataFrame({"perturbation": ["control"] + ["drugA"] * 4, "dose": ["", "1e-9M", "1e-8M", "1e-7M", "1e-6M"]},
                       index=list("abcde"))
    a = ad.AnnData(np.ones((5, 3), np.float32), obs=obs)
    with caplog.at_level(logging.WARNING):
        typed_labels(a, DataContract("perturbation", "control", dose_key="dose"), Vocabulary.from_adata(a),
                     TrainConfig())
    # each trained dose has a token of its own, so they train apart, but none lies inside the bins: none is ordered
    assert "read one dose token" in caplog.text and "nM for 1e-9 M" in caplog.text and "train apart" in caplog.text
    caplog.clear()
    a.obs["dose"] = ["", "1nM", "10nM", "100nM", "1000nM"]
    with caplog.at_level(logging.WARNING):
        typed_labels(a, DataContract("perturbation", "control", dose_key="dose"), Vocabulary.from_adata(a),
                     TrainConfig())
    assert "read one" not in caplog.text


def test_a_drug_named_with_spaces_trains_and_is_asked_as_the_data_names_it(dosed, tmp_path):
    """sci-Plex names its compounds 'Givinostat (ITF2357)', 'Quisinostat (JNJ-26481585) 2HCl': refused at training as
    'labels hold spaces' (meant for 'STAT1 KO'), they train as drugs at their doses, with tokens of their own, and are
    asked and named as the data names them."""
    from virtualcell.train import TrainConfig, train

    data = dosed.copy()
    drugs = sorted(set(data.obs["perturbation"][data.obs["perturbation_type"] == "drug"].astype(str)))
    names = {drugs[0]: "Givinostat (ITF2357)", drugs[1]: "Quisinostat (JNJ-26481585) 2HCl"}
    data.obs["perturbation"] = data.obs["perturbation"].astype(str).replace(names)
    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=1, batch_size=8, seed=0,
                      kind_key="perturbation_type", verdict_fraction=0.0)
    train(data, out=tmp_path, config=cfg, progress=False)
    model = vc.C2SModel.load(tmp_path)
    asked = model.resolve(["Givinostat (ITF2357)@1", "drug:Quisinostat (JNJ-26481585) 2HCl@10"])
    assert [str(p) for p in asked] == ["drug:Givinostat (ITF2357)@1", "drug:Quisinostat (JNJ-26481585) 2HCl@10"]
    tokens = [model.tokenizer.convert_ids_to_tokens(list(model.format.perturbation_tokens(p))) for p in asked]
    assert "<drug:Givinostat (ITF2357)>" in tokens[0] and model.tokenizer.unk_token not in tokens[0] + tokens[1]
    base = data[data.obs["perturbation"] == "control"][:3].copy()
    pred = vc.Simulator(base, model).simulate(asked, progress=False, samples=1).to_anndata()
    assert set(pred.obs["perturbation"]) == {"Givinostat (ITF2357)@1", "Quisinostat (JNJ-26481585) 2HCl@10"}


def test_predictions_of_plain_dose_numbers_against_doses_with_units_are_warned_of(dosed, dosed_model, caplog):
    """A model trained on plain numbers (sci-Plex's dose_value) names '@10'; measured doses written '10uM' were matched
    by number without a word, whatever unit the model's numbers were in."""
    base = dosed[dosed.obs["perturbation"] == "control"][:6].copy()
    drug = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))[0]
    pred = vc.Simulator(base, dosed_model).simulate([f"{drug}@10"], progress=False, samples=1).to_anndata()
    real = _with_dose_strings(dosed, lambda lab, d: f"{d:g}uM")
    with caplog.at_level("WARNING"):
        vc.evaluate.evaluate(pred, real, profile="pearson", baselines=("nochange",), ceiling=False)
    assert "name their doses as plain numbers" in caplog.text and "('uM')" in caplog.text


def test_predictions_naming_times_against_measured_labels_without_are_told_the_time_key(dosed):
    """Predictions 'drugA@10,24h' against measured 'drugA@10' (the time column not named) matched nothing, and the
    refusal named the context column only."""
    drug = sorted(set(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "drug"].astype(str)))[0]
    pred = dosed[(dosed.obs["perturbation"] == drug) & (dosed.obs["dose"] == 10)].copy()
    pred.obs["perturbation"] = f"{drug}@10,24h"
    del pred.obs["dose"]
    with pytest.raises(vc.errors.DataError, match=r"name times .* --time-key"):
        vc.evaluate.evaluate(pred, dosed, profile="pearson", baselines=("nochange",), ceiling=False)


def _sciplex_shaped(adata, *, unit=None):  # noqa: ANN001, ANN202
    """``adata`` as pertpy's sci-Plex 3 keeps a screen's doses: numbers in obs['dose_value'] (the drugs' here in nM,
    x1000) and each dose's unit in obs['dose_unit'] ('nM'; ``unit(label, dose)`` where given), the control cells at
    dose 0 with no unit (NaN for half of them, '' for the rest), the knockouts at 0 with '', the cytokine in ng/ml."""
    out = adata.copy()
    obs = out.obs
    cyto = (obs["perturbation_type"] == "cytokine").to_numpy()
    dose = obs.pop("dose").to_numpy(dtype=float)
    labels = obs["perturbation"].astype(str).to_numpy()
    obs["dose_value"] = np.where(cyto, dose, dose * 1000)
    units = np.array(["ng/ml" if c else unit(lab, d) if unit else "nM" for lab, d, c in zip(labels, dose, cyto)],
                     dtype=object)
    units[dose == 0] = ""
    units[np.flatnonzero(labels == "control")[::2]] = np.nan
    obs["dose_unit"] = units
    return out


_SCIPLEX = dict(context_key="cell_type", dose_key="dose_value", dose_unit_key="dose_unit")


def test_a_dose_unit_column_reads_as_doses_written_with_their_unit(dosed, tmp_path):
    """sci-Plex keeps each dose's unit in a column of its own (dose_value beside dose_unit). Named as the dose column
    alone, its doses read as plain numbers, their unit lost; with dose_unit_key each dose reads as its value joined
    with its unit: the conditions and each agent's unit of the same data written '10000nM' in one column."""
    import anndata as ad

    cyto = str(dosed.obs["perturbation"][dosed.obs["perturbation_type"] == "cytokine"].iloc[0])
    sciplex = _sciplex_shaped(dosed)
    contract = DataContract("perturbation", "control", **_SCIPLEX)
    contract.validate(sciplex)  # the controls' missing units are no error: their doses are not read
    one_column = _with_dose_strings(dosed, lambda lab, d: f"{d:g}ng/ml" if lab == cyto else f"{d * 1000:g}nM")
    written = DataContract("perturbation", "control", context_key="cell_type", dose_key="dose")
    assert list(contract.conditions(sciplex)) == list(written.conditions(one_column))
    assert contract.dose_units(sciplex) == written.dose_units(one_column) == {"drugA": "nM", "drugB": "nM",
                                                                              cyto: "ng/ml"}
    assert "drugA@10000" in set(contract.conditions(sciplex))
    # one family in several units is put on its common unit, as '100nM' beside '10uM' in one column
    mixed = _sciplex_shaped(dosed, unit=lambda lab, d: "uM" if d == 10 else "nM")
    mixed.obs["dose_value"] = np.where(mixed.obs["dose_unit"] == "uM", mixed.obs["dose_value"] / 1000,
                                       mixed.obs["dose_value"])
    assert list(contract.conditions(mixed)) == list(DataContract.from_adata(dosed).conditions(dosed))  # in uM
    assert contract.dose_units(mixed)["drugA"] == "uM"
    # a dose that holds the unit its unit column gives is read once ('10000nM' beside 'nM', '10µM' beside 'uM')
    agreeing = sciplex.copy()
    agreeing.obs["dose_value"] = [f"{v:g}{u}" if isinstance(u, str) else f"{v:g}"
                                  for v, u in zip(sciplex.obs["dose_value"], sciplex.obs["dose_unit"])]
    assert list(contract.conditions(agreeing)) == list(contract.conditions(sciplex))
    drug = (dosed.obs["perturbation_type"] == "drug").to_numpy()
    agreeing.obs.loc[drug, "dose_value"] = [f"{d:g}µM" for d in dosed.obs["dose"][drug]]
    agreeing.obs.loc[drug, "dose_unit"] = "uM"
    assert list(contract.conditions(agreeing)) == list(DataContract.from_adata(dosed).conditions(dosed))
    # the key travels with the data and in a checkpoint's record; a record without it reads as none
    contract.attach(sciplex)
    sciplex.write_h5ad(tmp_path / "sciplex.h5ad")
    assert DataContract.from_adata(ad.read_h5ad(tmp_path / "sciplex.h5ad")) == contract
    assert DataContract.from_dict(contract.to_dict()) == contract
    old = {k: v for k, v in contract.to_dict().items() if k != "dose_unit_key"}
    assert DataContract.from_dict(old).dose_unit_key is None
    # predicted cells carry no dose column: the unit column goes with it
    bare = sciplex.copy()
    del bare.obs["dose_value"]
    assert contract.without_quantities_absent_from(bare).dose_unit_key is None


def test_a_dose_unit_column_is_refused_where_missing_without_doses_contradicting_them_or_empty_for_a_dose(dosed):
    """The unit column's refusals name the fix: a column not in obs (the close names, --dose-unit-key), a unit column
    without a dose column (--dose-key), a dose holding a unit its unit column contradicts (both named), and a perturbed
    cell's dose without a unit; a control cell's unit is not read, as its dose is not."""
    from virtualcell.errors import ContractError

    sciplex = _sciplex_shaped(dosed)
    typo = DataContract("perturbation", "control", context_key="cell_type", dose_key="dose_value",
                        dose_unit_key="dose_units")
    for read in (typo.validate, typo.conditions, typo.dose_units):
        with pytest.raises(ContractError, match=r"dose unit column 'dose_units' is not in adata.obs. Did you mean "
                                                r"'dose_unit'.*--dose-unit-key"):
            read(sciplex)
    controls = sciplex[sciplex.obs["perturbation"] == "control"].copy()
    del controls.obs["dose_unit"]
    assert set(typo.conditions(controls)) == {"control"}  # control cells alone (a baseline): no unit is read

    alone = DataContract("perturbation", "control", dose_unit_key="dose_unit")
    with pytest.raises(ContractError, match=r"'dose_unit' is named without a dose column.*--dose-key"):
        alone.validate(sciplex)

    contract = DataContract("perturbation", "control", **_SCIPLEX)
    contradicted = sciplex.copy()
    contradicted.obs["dose_value"] = contradicted.obs["dose_value"].astype(object)
    first = np.flatnonzero((sciplex.obs["perturbation"] == "drugA").to_numpy())[0]
    contradicted.obs.iloc[first, contradicted.obs.columns.get_loc("dose_value")] = "10uM"  # its unit column: nM
    with pytest.raises(ContractError, match=r"'dose_value' gives doses with a unit that the dose unit column "
                                            r"'dose_unit' contradicts.*'10uM beside nM'.*--dose-unit-key"):
        contract.conditions(contradicted)

    no_unit = sciplex.copy()
    no_unit.obs.iloc[first, no_unit.obs.columns.get_loc("dose_unit")] = np.nan
    with pytest.raises(ContractError, match=r"'dose_unit' has no unit for doses of perturbed cells: '(100|1000|10000)"
                                            r"\.0'.*Give each dosed cell its unit"):
        contract.conditions(no_unit)

    odd_controls = sciplex.copy()  # a control's dose and unit are not read, whatever they hold
    ctrl = (sciplex.obs["perturbation"] == "control").to_numpy()
    odd_controls.obs["dose_value"] = np.where(ctrl, "vehicle", sciplex.obs["dose_value"].astype(str))
    odd_controls.obs["dose_unit"] = np.where(ctrl, "10uM", sciplex.obs["dose_unit"].astype(object))
    assert list(contract.conditions(odd_controls)) == list(contract.conditions(sciplex))


def test_a_sciplex_shaped_screen_trains_predicts_and_evaluates_in_its_units(dosed, tmp_path, capsys):
    """A file of sci-Plex's columns (no stored contract) from the command line: `train --dose-key dose_value
    --dose-unit-key dose_unit` keeps each agent's unit in the model, so a dose asked in uM is the trained nM one
    ('drugA@10uM' predicts 'drugA@10000'), and `evaluate --dose-unit-key` reads the measured file the same way."""
    import anndata as ad
    import pandas as pd

    from virtualcell.cli import main

    data = _sciplex_shaped(dosed)
    data.uns.pop("virtualcell")
    path = tmp_path / "sciplex.h5ad"
    data.write_h5ad(path)
    tiny = ["--top-k", "20", "--hidden-size", "32", "--layers", "1", "--heads", "2", "--max-steps", "2",
            "--batch-size", "8", "--verdict-fraction", "0", "--kind-key", "perturbation_type"]
    keys = ["--context-key", "cell_type", "--dose-key", "dose_value"]
    assert main(["train", "--data", str(path), "--perturbation-key", "perturbation", "--control", "control", *keys,
                 "--dose-unit-key", "dose_unit", *tiny, "--out", str(tmp_path / "model")]) == 0
    model = vc.C2SModel.load(tmp_path / "model")
    assert model.contract == DataContract("perturbation", "control", **_SCIPLEX)  # the checkpoint keeps the key
    assert model.perturbations.dose_units["drugA"] == "nM"
    asked = model.resolve(["drugA@0.1uM"])
    assert str(asked[0]) == "drug:drugA@100nM" and model.perturbations.labels_for(asked) == ["drugA@100"]
    pred = tmp_path / "pred.h5ad"
    assert main(["predict", "--model", str(tmp_path / "model"), "--data", str(path), "--perturbations", "drugA@10uM",
                 "--n-cells", "12", "--out", str(pred)]) == 0
    assert set(ad.read_h5ad(pred).obs["perturbation"]) == {"drugA@10000"}
    args = ["evaluate", "--pred", str(pred), "--real", str(path), *keys, "--baselines", "nochange", "--profile",
            "pearson", "--no-ceiling"]
    assert main([*args, "--dose-unit-key", "dose_unit", "--out", str(tmp_path / "eval")]) == 0
    table = pd.read_csv(tmp_path / "eval" / "metrics.csv")
    assert set(table.loc[table["method"] == "model", "perturbation"]) == {"drugA@10000"}
    capsys.readouterr()
    unit_alone = [a for a in args if a not in ("--dose-key", "dose_value")]
    assert main([*unit_alone, "--dose-unit-key", "dose_unit", "--out", str(tmp_path / "e2")]) == 2
    assert "--dose-key" in capsys.readouterr().err


def test_evaluate_reads_a_measured_dose_unit_column_in_the_predictions_units():
    """A measured file with drugA at 1 nM and 1 uM kept as dose_value 1 beside dose_unit 'nM' / 'uM' (its stored
    contract names both columns) against a model trained in nM: read without their units, both doses were
    'drugA@1', one pooled group; read with them, the 1 nM cells are the prediction's 'drugA@1'."""
    import anndata as ad
    import pandas as pd

    from virtualcell.perturbations import units_text

    real, _ = _nm_and_um_screen()
    DataContract("perturbation", "control", dose_key="dose_value", dose_unit_key="dose_unit").attach(real)
    base, ref = vc.evaluate.split_controls(real, seed=0)
    cells = ref[(ref.obs["dose_unit"] == "nM").to_numpy()]  # a perfect prediction of 1 nM, as a model in nM names it
    pred = ad.AnnData(np.vstack([cells.X, base.X]), var=real.var.copy(),
                      obs=pd.DataFrame({"perturbation": ["drugA@1"] * cells.n_obs + ["control"] * base.n_obs},
                                       index=[str(i) for i in range(cells.n_obs + base.n_obs)]))
    pred.uns["virtualcell"] = {"dose_units": units_text({"drugA": "nM"})}
    t = vc.evaluate.evaluate(pred, ref, baseline=base, baselines=(), ceiling=False, profile=["mae"])
    assert set(t["perturbation"]) == {"drugA@1"} and float(t["value"].iloc[0]) < 0.05  # the 1 nM cells alone


def _nm_and_um_screen():  # noqa: ANN202
    """drugA at 1 nM and at 1 uM, kept as dose_value 1 beside dose_unit 'nM' / 'uM', 40 cells each and 40 controls,
    no stored contract; and a perfect prediction of the 1 nM cells as a model trained in nM names it."""
    import anndata as ad
    import pandas as pd

    from virtualcell.perturbations import units_text

    rng = np.random.default_rng(0)
    g = 20
    groups = {("control", 0.0, None): rng.uniform(1, 3, g), ("drugA", 1.0, "nM"): rng.uniform(1, 3, g),
              ("drugA", 1.0, "uM"): rng.uniform(1, 3, g)}
    X = np.concatenate([np.clip(m + rng.normal(0, 0.2, (40, g)), 0, None) for m in groups.values()])
    obs = pd.DataFrame([k for k in groups for _ in range(40)], columns=["perturbation", "dose_value", "dose_unit"])
    obs.index = obs.index.astype(str)
    real = ad.AnnData(X.astype(np.float32), obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(g)]))
    nm = real[(real.obs["dose_unit"] == "nM").to_numpy()]
    pred = ad.AnnData(nm.X.copy(), var=real.var.copy(),
                      obs=pd.DataFrame({"perturbation": ["drugA@1"] * nm.n_obs}, index=[f"p{i}" for i in range(40)]))
    pred.uns["virtualcell"] = {"dose_units": units_text({"drugA": "nM"})}
    return real, pred


def test_a_measured_dose_screen_meets_a_prediction_in_its_units_or_says_it_cannot(caplog):
    """From a review of the dose unit column: to_cell_eval(real, like=pred) paired a prediction of 1 nM with the
    measured 1 uM cells (evaluate converts the measured doses into the prediction's units; to_cell_eval did not),
    and evaluate pooled 1 nM and 1 uM as one 'drugA@1' without a word where the measured unit column was not named.
    Both now read the measured doses as evaluate does (one function), and say so where one side's unit is unknown."""
    real, pred = _nm_and_um_screen()
    like = vc.evaluate.to_cell_eval(pred, part=True)
    assert like.uns["virtualcell"]["dose_units"] == pred.uns["virtualcell"]["dose_units"]  # kept for like= to read
    out = vc.evaluate.to_cell_eval(real, dose_key="dose_value", dose_unit_key="dose_unit", like=like)
    assert set(out.obs["target_gene"]) == {"drugA@1"}  # (like= holds no control cells: none are kept)
    paired = out[(out.obs["target_gene"] == "drugA@1").to_numpy()]
    assert paired.n_obs == 40
    np.testing.assert_allclose(paired.X.mean(0), like.X.mean(0), atol=1e-4)  # the 1 nM cells, not the 1 uM ones
    # the unit column not named: one side's unit unknown, said with the flag that names it
    caplog.clear()
    with caplog.at_level("WARNING"):
        vc.evaluate.to_cell_eval(real, dose_key="dose_value", like=like)
    assert "plain numbers" in caplog.text and "1 nM and 1 uM would pool" in caplog.text
    assert "--dose-unit-key" in caplog.text
    DataContract("perturbation", "control", dose_key="dose_value").attach(real)
    base, ref = vc.evaluate.split_controls(real, seed=0)
    caplog.clear()
    with caplog.at_level("WARNING"):
        vc.evaluate.evaluate(pred, ref, baseline=base, baselines=(), ceiling=False, profile=["mae"])
    assert "1 nM and 1 uM would pool" in caplog.text and "--dose-unit-key" in caplog.text
    # a stored unit column whose dose column was renamed: named again, the dose column finds the stored units
    DataContract("perturbation", "control", dose_key="old_dose", dose_unit_key="dose_unit").attach(real)
    renamed = vc.evaluate.to_cell_eval(real, dose_key="dose_value", like=like)
    assert (renamed.obs["target_gene"] == "drugA@1").sum() == 40


def test_a_dose_unit_column_holding_no_units_or_a_pairs_units_reads_as_it_should(caplog):
    """From the review: a pair's units ('nM+uM' beside '1+1') read as its first, as its doses do; a unit column of
    numbers, or the dose column named as its own unit column, is refused as the wrong column; a column of words
    that are no units (the perturbation kind) is read, with a warning naming the column."""
    import anndata as ad
    import pandas as pd

    from virtualcell.errors import ContractError

    obs = pd.DataFrame({"perturbation": ["control"] * 2 + ["drugA+drugB"] * 2 + ["drugA"] * 2,
                        "dose_value": ["0", "0", "1+1", "1+1", "1", "1"],
                        "dose_unit": [None, None, "nM+nM", "nM+nM", "nM", "nM"],
                        "kind": ["control", "control", "drug", "drug", "drug", "drug"],
                        "count": ["0", "0", "3", "3", "3", "3"]}, index=[f"c{i}" for i in range(6)])
    a = ad.AnnData(np.ones((6, 2), dtype=np.float32), obs=obs, var=pd.DataFrame(index=["G1", "G2"]))
    contract = DataContract("perturbation", "control", dose_key="dose_value", dose_unit_key="dose_unit")
    assert sorted(set(contract.conditions(a))) == ["control", "drugA+drugB@1", "drugA@1"]
    assert contract.dose_units(a) == {"drugA": "nM", "drugB": "nM"}
    with pytest.raises(ContractError, match=r"dose unit column 'count' holds numbers, not units: '3'"):
        DataContract("perturbation", "control", dose_key="dose_value", dose_unit_key="count").conditions(a)
    with pytest.raises(ContractError, match=r"'dose_value' is named as both the dose column and the dose unit"):
        DataContract("perturbation", "control", dose_key="dose_value", dose_unit_key="dose_value").validate(a)
    caplog.clear()
    with caplog.at_level("WARNING"):
        DataContract("perturbation", "control", dose_key="dose_value", dose_unit_key="kind").conditions(a)
    assert "dose unit column 'kind' holds units of no molar or mass family ('drug')" in caplog.text


def test_a_run_is_not_resumed_under_another_reading_of_its_doses(tmp_path):
    """The data's hash reads its labels, not its doses: a run started without --dose-key (or its unit column) and
    resumed with it would mix two readings of the same cells. The run records how it read them and refuses."""
    from virtualcell.errors import TrainingError
    from virtualcell.training.checkpoint import same_settings

    before = {"quantity_keys": {"dose": "dose_value", "dose_unit": None, "time": None}}
    now = {"quantity_keys": {"dose": "dose_value", "dose_unit": "dose_unit", "time": None}}
    with pytest.raises(TrainingError, match=r"other settings \(quantity_keys:.*--restart"):
        same_settings(before, now, tmp_path, 2)
    same_settings(before, before, tmp_path, 2)
    same_settings({}, now, tmp_path, 2)  # (a run recorded before it was kept: not compared)


def test_evaluate_names_the_file_that_lacks_a_dose_column():
    """--dose-unit-key missing from --train's file was refused as a column --real lacked."""
    from virtualcell.errors import DataError
    from virtualcell.evaluate.cli import _with_quantity_keys

    real, _ = _nm_and_um_screen()
    train = real.copy()
    del train.obs["dose_unit"]
    _with_quantity_keys(real, dose_key="dose_value", time_key=None, dose_unit_key="dose_unit", name="--real")
    with pytest.raises(DataError, match=r"--dose-unit-key 'dose_unit' is not a column of --train's obs"):
        _with_quantity_keys(train, dose_key="dose_value", time_key=None, dose_unit_key="dose_unit", name="--train")
