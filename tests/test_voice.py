"""How virtualcell talks to its user: each warning said once, at the user's line; bars with totals; what an
interrupt kept; refusals that name both sides and the fix (from a sweep of how the package talks)."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest

import virtualcell as vc
from virtualcell.errors import DataError, ModelError, ScreenError

SPACED = "spaces around them"


def _spaced(adata, label: str = "STAT1"):  # noqa: ANN001, ANN202
    """``adata`` with ``label`` written with a trailing space, as CSV-derived obs columns often have it."""
    out = adata.copy()
    labels = out.obs["perturbation"].astype(str)
    out.obs["perturbation"] = labels.where(labels != label, label + " ")
    return out


def _tiny_config(**options):  # noqa: ANN003, ANN202
    return vc.TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, batch_size=4, warmup_steps=1, seed=0,
                          attention="sdpa", precision="fp32", **({"max_steps": 4, "eval_every": 1000} | options))


@pytest.fixture(scope="module")
def spaced_run(tmp_path_factory, papalexi):
    """A tiny model fitted on 400 embedded cells whose STAT1 cells are labelled 'STAT1 ', with every warning the fit
    said (recorded with "always": a warning said again shows again)."""
    rng = np.random.default_rng(0)
    data = _spaced(papalexi[np.sort(rng.choice(papalexi.n_obs, 400, replace=False))])
    out = tmp_path_factory.mktemp("spaced_model")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model = vc.fit(data, out=out, config=_tiny_config(), progress=False)
    return model, out, data, list(said)


def _said(records, text: str = SPACED) -> list:  # noqa: ANN001
    return [w for w in records if text in str(w.message)]


def test_a_spaced_label_is_said_once_per_call_at_the_users_line(spaced_run):
    """Item 2: fit + evaluate said "N cells' labels ... have spaces around them" up to 31 times, with three counts
    (the file's, then each split's), pointing inside the library; now once per call, the file's count, at the
    caller's line."""
    model, _, data, fitted = spaced_run
    n = int((data.obs["perturbation"] == "STAT1 ").sum())
    spaced = _said(fitted)
    assert len(spaced) == 1, [str(w.message)[:60] for w in spaced]
    assert spaced[0].filename == __file__
    assert str(spaced[0].message).startswith(f"{n} cells' labels") and ".str.strip()" in str(spaced[0].message)

    with pytest.warns(UserWarning, match=SPACED):  # (a call of its own: said there too)
        base, ref = vc.evaluate.split_controls(data, seed=0)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        vc.evaluate.evaluate(None, ref, baseline=base, profile="fast", baselines=("nochange",), ceiling=False)
    spaced = _said(said)
    assert len(spaced) == 1 and spaced[0].filename == __file__
    assert str(spaced[0].message).startswith(f"{n} cells' labels")


def test_evaluates_warnings_point_at_the_callers_line_and_name_the_python_argument(perturbench_data):
    """Item 3: evaluate's cautions (training data, every control cell, gene case) pointed at
    virtualcell/evaluate/_core.py; the training-data caution named only the CLI's --holdout."""
    from virtualcell.contract import DataContract
    from virtualcell.sentences import data_hash

    base, ref = perturbench_data
    contract = DataContract.from_adata(ref)
    # a prediction whose record says the measured cells are its training data
    pred = ref.copy()
    pred.uns["virtualcell"] = dict(pred.uns.get("virtualcell", {})) | {"training_data_hash": data_hash(ref, contract)}
    # gene names differing in case from the baseline's
    lower = base.copy()
    lower.var_names = [g.lower() for g in lower.var_names]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        vc.evaluate.evaluate(pred, ref, baseline=lower, profile="fast", baselines=(), ceiling=False)
    caution, case = _said(said, "trained on"), _said(said, "when case and Ensembl")
    assert caution and case
    assert {w.filename for w in caution + case} == {__file__}
    assert "vc.TrainConfig(holdout=" in str(caution[0].message) and "--holdout" in str(caution[0].message)

    # a prediction made from every measured control cell
    controls = ref[ref.obs["perturbation"] == "control"]
    every = controls.copy()
    every.obs["source_cell"] = controls.obs_names.to_numpy()
    every.obs_names = [f"p{i}" for i in range(every.n_obs)]
    every.obs["perturbation"] = sorted(set(ref.obs["perturbation"]) - {"control"})[0]
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        vc.evaluate.evaluate(every, ref, profile="fast", baselines=(), ceiling=False)
    assert [w.filename for w in _said(said, "every measured control cell")] == [__file__]


@pytest.fixture(scope="module")
def perturbench_data():
    return vc.evaluate.split_controls(vc.datasets.load("perturbench"), seed=0)


def test_a_delta_table_that_meets_nothing_names_both_sides_and_the_fix(perturbench_data):
    """Item 12: "No predicted perturbation matches a measured one (same label and context)." named neither side."""
    base, ref = perturbench_data
    pred = ref.copy()
    labels = pred.obs["perturbation"].astype(str)
    pred.obs["perturbation"] = labels.where(labels == "control", "ko:UNMEASURED")
    with pytest.raises(DataError, match=r"None of the predicted groups \('ko:UNMEASURED in .*\) is in the measured "
                                        r"data \(which has '[^']+ in .*--perturbation-key"):
        vc.evaluate.delta_table(pred, ref, baseline=base)
    only_controls = ref[ref.obs["perturbation"] == "control"].copy()
    with pytest.raises(DataError, match="control cells only"):
        vc.evaluate.delta_table(only_controls, ref, baseline=base)


def test_an_objective_naming_one_unknown_gene_says_gene():
    from virtualcell.objectives import _index

    with pytest.raises(ScreenError, match="names 1 gene the model does not have: 'NOPE'.*or drop it"):
        _index(["A", "B"], ["A", "NOPE"], "objective")
    with pytest.raises(ScreenError, match="names 2 genes the model .*or drop them"):
        _index(["A", "B"], ["NOPE", "NADA"], "objective")


def test_rejudge_shows_the_verdict_bar_with_its_total(spaced_run, capsys):
    """Items 6 and 8: `virtualcell verdict` (train.rejudge) showed no bar, and training's verdict bar had no total
    ("0 settings [00:00, ? settings/s]"). A candidate that sets its own samples leaves the samples step out, and the
    total drops to what is tried."""
    from virtualcell.train import rejudge

    model, _, data, _ = spaced_run
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        rejudge(model, data, candidates=({"samples": 2},), samples=(1, 4), temperatures=(1.0,))
    err = capsys.readouterr().err
    assert "verdict (generation settings tried)" in err and "1/1" in err
    assert len(_said(said)) == 1 and _said(said)[0].filename == __file__


def test_kernels_say_they_are_timed_before_they_are(caplog):
    """Item 8: a tiny run sat silent for seconds before its first bar, timing kernels it logged only afterwards."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from virtualcell.training import kernels

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))
    ids = torch.randint(0, 20, (2, 8))
    before = torch.get_num_threads()
    try:
        with caplog.at_level(logging.INFO, logger="virtualcell"):
            kernels.choose(lm, torch.device("cpu"), lambda: lm(ids).logits.float().square().mean(), precision="fp32",
                           threads=1)
    finally:
        torch.set_num_threads(before)
    said = [r.getMessage() for r in caplog.records if r.name == kernels.__name__]
    assert said[0].startswith("timing 2 training kernels") and said[1].startswith("training kernels: ")


def test_an_interrupted_fit_says_which_checkpoint_it_kept(papalexi, tmp_path):
    """Item 7b: Ctrl-C said "Run the same command again" but not what was kept."""
    data = papalexi[np.sort(np.random.default_rng(1).choice(papalexi.n_obs, 300, replace=False))].copy()

    def stop(record):  # noqa: ANN001, ANN202
        if record["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt) as stopped:
        vc.fit(data, out=tmp_path / "m", config=_tiny_config(max_steps=50, save_every=2, verdict_fraction=0.0),
               progress=False, on_log=stop)
    notes = " ".join(getattr(stopped.value, "__notes__", []))
    assert "Stopped after step 3 of 50. The last checkpoint kept is step 2" in notes
    assert "the step after it is lost" in notes and "to resume from step 2" in notes


def test_the_command_line_says_what_an_interrupt_kept(monkeypatch, capsys):
    from virtualcell import cli
    from virtualcell.train import _interrupted_note

    def interrupted(args):  # noqa: ANN001, ANN202
        stop = KeyboardInterrupt()
        stop.add_note(_interrupted_note(57, 3000, 50, "m/last", save_every=50))
        raise stop

    monkeypatch.setattr(cli, "cmd_train", interrupted)
    assert cli.main(["train", "--data", "d.h5ad", "--perturbation-key", "perturbation", "--control", "control",
                     "--out", "m"]) == 130
    err = capsys.readouterr().err
    assert ("train: interrupted. Stopped after step 57 of 3000. The last checkpoint kept is step 50 (in m/last): the "
            "7 steps after it are lost. Train again into the same folder to resume from step 50.") in err
    assert "Run the same command again" not in err  # (the same command with --restart started over)
    assert "No checkpoint was written yet" in _interrupted_note(7, 3000, None, "m/last", save_every=200)
    # a --restart run: running it again as it was starts over, and an earlier run's checkpoint may still be there
    assert "without --restart" in _interrupted_note(57, 3000, 50, "m/last", save_every=50, restarted=True)

    def interrupted_early(args):  # noqa: ANN001, ANN202 - outside the loop (data preparation): no note
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_train", interrupted_early)
    assert cli.main(["train", "--data", "d.h5ad", "--perturbation-key", "perturbation", "--control", "control",
                     "--out", "m", "--restart"]) == 130
    assert "Run it again without --restart: training resumes from OUT/last" in capsys.readouterr().err


def test_predictions_that_are_not_finite_are_refused(spaced_run, monkeypatch):
    """Item T: a model whose decode gives NaN (a damaged folder) predicted NaN cells without a word."""
    model, _, data, _ = spaced_run
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda sentences: np.full_like(decode(sentences), np.nan))
    sim = vc.Simulator(data[data.obs["perturbation"] == "control"][:8].copy(), model)
    with pytest.raises(ModelError, match=r"predictions of .*STAT1.* are not finite.*may be damaged"):
        sim.simulate(["STAT1"], progress=False)


def test_a_refused_simulation_leaves_no_cells_file(spaced_run, monkeypatch, tmp_path):
    """simulate(store=...) refused in its second block left the file at its name, opening as whole with the second
    block all zeros: it is written beside its name and put in place once every block is made."""
    model, _, data, _ = spaced_run
    decode, calls = model.decode, []

    def second_block_broken(sentences):  # noqa: ANN001, ANN202
        calls.append(1)
        out = decode(sentences)
        return np.full_like(out, np.nan) if len(calls) > 1 else out

    monkeypatch.setattr(model, "decode", second_block_broken)
    sim = vc.Simulator(data[data.obs["perturbation"] == "control"][:16].copy(), model)
    store = tmp_path / "cells.nc"
    with pytest.raises(ModelError, match="not finite"):
        sim.simulate(["STAT1"], progress=False, store=store, cell_chunk=8)
    assert len(calls) > 1 and list(tmp_path.iterdir()) == []  # no file at its name, no partial one beside it
    monkeypatch.setattr(model, "decode", decode)
    res = sim.simulate(["STAT1"], progress=False, store=store, cell_chunk=8)  # a whole run puts it in place
    assert store.exists() and res.cells.shape[1] == 16
    res.cells.close()


def test_the_command_line_says_a_spaced_label_once(papalexi, tmp_path, caplog):
    """Item 2 through `virtualcell train`: reading the file, then training, each said it (one command, twice)."""
    from virtualcell import cli

    data = _spaced(papalexi[np.sort(np.random.default_rng(2).choice(papalexi.n_obs, 300, replace=False))])
    data.write_h5ad(tmp_path / "spaced.h5ad")
    with caplog.at_level(logging.WARNING, logger="virtualcell"):
        assert cli.main(["train", "--data", str(tmp_path / "spaced.h5ad"), "--perturbation-key", "perturbation",
                         "--control", "control", "--out", str(tmp_path / "m"), "--max-steps", "2", "--top-k", "20",
                         "--hidden-size", "32", "--layers", "1", "--heads", "2", "--attention", "sdpa", "--precision",
                         "fp32", "--verdict-fraction", "0", "-q"]) == 0
    assert len([r for r in caplog.records if SPACED in r.getMessage()]) == 1


def test_simulators_warnings_point_at_the_callers_line(spaced_run):
    """A warning said in a call that reads the data once (:func:`virtualcell.contract.one_reading`) still points at
    the caller's line, not at the wrapper's."""
    model, _, data, _ = spaced_run
    with pytest.warns(DeprecationWarning, match="data comes first") as said:
        vc.Simulator(model, data[data.obs["perturbation"] == "control"][:8].copy())
    assert [w.filename for w in said if w.category is DeprecationWarning] == [__file__]
