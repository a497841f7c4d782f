"""Every bad input at the command line ends in one sentence that names the problem and the fix, exit code 2.

One table: a case is one line, ``(id, arguments, pattern the message must match)``. Arguments
are templates over the files made by the ``files`` fixture (``{model}``, ``{base}`` …).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from virtualcell.cli import main

M = "--model {model} --data {base}"  # a working model and baseline
CASES = [
    # files that are not h5ad, or truncated, for every command that reads one
    ("predict-not-h5ad", "predict --model {model} --data {text_h5ad} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"is not a readable \.h5ad file \(it is not an HDF5 file\)"),
    ("predict-truncated-h5ad", "predict --model {model} --data {trunc_h5ad} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"is not a readable \.h5ad file \(the file is truncated\)"),
    ("screen-truncated-h5ad", "screen --model {model} --data {trunc_h5ad} --panel {panel} --out {tmp}/s",
     r"not a readable \.h5ad file"),
    ("train-not-h5ad", "train --data {text_h5ad} --perturbation-key perturbation --control control --out {tmp}/t",
     r"not a readable \.h5ad file"),
    ("encode-truncated-h5ad", "encode --data {trunc_h5ad} --out {tmp}/e.npz", r"not a readable \.h5ad file"),
    ("encode-out-suffix", "encode --data {base} --out {tmp}/e.csv", r"must end in \.npz .* or \.txt"),
    # a file or folder that exists is the user's, not a dataset's name (it was 'Unknown dataset', with Python advice)
    ("predict-csv", "predict --model {model} --data {csv} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"is not an \.h5ad file\. Convert it with anndata first"),
    ("predict-folder", "predict --model {model} --data {user_folder} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"is a folder; --data takes an \.h5ad file or a dataset name"),
    ("evaluate-not-h5ad", "evaluate --pred {text_h5ad} --real {base} --out {tmp}/ev",
     r"\(--pred\) is not a readable \.h5ad file"),
    ("screen-toward-truncated", ("screen --model {model} --data {base} --panel {panel} --objective toward:{trunc_h5ad} "
     "--out {tmp}/s"), r"toward: reference\) is not a readable \.h5ad"),
    # a device this machine has not (the CPU-only case is in test_a_gpu_asked_of_a_cpu_only_machine_is_refused)
    ("predict-unknown-device", "predict --model {model} --data {base} --perturbations STAT1 --out {tmp}/p.h5ad --device gpu",
     r"Unknown device 'gpu': use cuda \(or cuda:N\), mps or cpu"),
    ("train-unknown-device", "train --data {base} --perturbation-key perturbation --control control --out {tmp}/t --device gpu",
     r"Unknown device 'gpu'"),
    ("screen-unknown-device", "screen --model {model} --data {base} --panel {panel} --out {tmp}/s --device GPU0",
     r"Unknown device 'GPU0'"),
    # broken model files
    ("model-truncated-safetensors", "predict --model {trunc_model} --data {base} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"cannot be read .*model\.safetensors may be truncated"),
    ("model-broken-virtualcell-json", "predict --model {broken_meta} --data {base} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"virtualcell\.json' is broken"),
    ("model-mistyped-folder", "predict --model {tmp}/my-modle --data {base} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"No such folder: '.*my-modle'\. Check the path"),
    # a base model that cannot be loaded (offline here): one sentence, as loading a model to predict says it
    ("train-base-offline", "train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--base vandijklab/C2S-Scale-Gemma-2-2B --out {tmp}/tb", r"Could not load 'vandijklab/C2S-Scale-Gemma-2-2B'.*offline"),
    # a mistyped local --base is a missing folder, not a network failure
    ("train-base-mistyped-folder", "train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--base ./models/my-bsae --out {tmp}/tb", r"No such folder: '\./models/my-bsae'\. Check the path"),
    ("train-base-mistyped-2-slashes", "train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--base {tmp}/models/my-bsae --out {tmp}/tb", r"No such folder: '.*/models/my-bsae'\. Check the path"),
    # the shipped model is not rewritten in place (it would rewrite the package's files)
    ("verdict-bundled-in-place", "verdict --model bundled --data {screen_h5ad}", r"not judged again in place.*--out"),
    # screens
    ("screen-broken-config", f"screen {M} --panel {{panel}} --out {{broken_screen}}", r"not a readable screen config.*--force"),
    ("panel-utf16", f"screen {M} --panel {{panel_utf16}} --out {{tmp}}/s", r"panel line 2 \('ko:NOTAGENE'\)"),
    ("panel-utf8-bom", f"screen {M} --panel {{panel_bom}} --out {{tmp}}/s", r"panel line 1 \('ko:NOTAGENE'\)"),
    ("panel-group", f"screen {M} --panel {{panel_group}} --out {{tmp}}/s", r"panel line 2 \('ko:NOTAGENE'\)"),
    ("panel-latin1", f"screen {M} --panel {{panel_latin1}} --out {{tmp}}/s", r"is not UTF-8 text\. Save it as UTF-8"),
    # predictions
    ("perturbations-empty", f"predict {M} --perturbations '' --out {{tmp}}/p.h5ad", r"lists none: give at least one"),
    ("out-is-a-folder", f"predict {M} --perturbations STAT1 --out {{tmp}}/", r"is a folder; it must name a file"),
    ("out-unwritable", f"predict {M} --perturbations STAT1 --out {{panel}}/p.h5ad", r"not a folder you can write to"),
    ("out-not-ours-file", f"predict {M} --perturbations STAT1 --out {{user_h5ad}}",
     r"was not written by virtualcell; refusing to overwrite it\. .*--force"),
    # measured cells saved from vc.datasets.load carry uns['virtualcell'] (their contract): still the user's
    ("out-measured-file", f"predict {M} --perturbations STAT1 --out {{screen_h5ad}}",
     r"was not written by virtualcell; refusing to overwrite it"),
    ("predict-repeated-cell-names", "predict --model {model} --data {dup_names} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"1 baseline cell name in .* repeats \(6 cells; e\.g\. 'cell'\).*obs_names_make_unique"),
    # refused before the verdict is printed: stdout stays empty (a redirected predict kept the verdict of a refusal)
    ("predict-unknown-gene", f"predict {M} --perturbations ko:NOTAGENE --out {{tmp}}/p.h5ad", r"NOTAGENE"),
    ("screen-objective-unknown-gene", f"screen {M} --panel {{panel}} --objective raise:NOTAGENE --out {{tmp}}/s",
     r"NOTAGENE"),
    ("out-is-the-data", "predict --model {model} --data {base} --perturbations STAT1 --out {base} --force",
     r"is the --data file"),
    ("control-label-matches-nothing", "predict --model {model} --data {no_control} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"No cell of .* has perturbation == 'control'.*--all-cells"),
    # the perturbations under another column name: every cell, perturbed ones too, was the baseline without a word
    ("perturbation-column-renamed", "predict --model {model} --data {renamed} --perturbations STAT1 --out {tmp}/p.h5ad",
     r"has no obs column 'perturbation' .*obs\['pert'\] holds its control label \('control'\).*rename.*--all-cells"),
    # numbers that cannot be
    ("batch-size-0", f"predict {M} --perturbations STAT1 --batch-size 0 --out {{tmp}}/p.h5ad",
     r"argument --batch-size: must be at least 1, got 0"),
    ("max-genes-0", f"screen {M} --panel {{panel}} --max-genes 0 --out {{tmp}}/s", r"argument --max-genes: must be at least 1"),
    ("n-cells-0", f"predict {M} --perturbations STAT1 --n-cells 0 --out {{tmp}}/p.h5ad", r"argument --n-cells: must be at least 1"),
    ("train-max-steps-0", ("train --data {screen_h5ad} --perturbation-key perturbation --control control --max-steps 0 "
     "--out {tmp}/t"), r"argument --max-steps: must be at least 1"),
    ("train-pair-draws-0", ("train --data {screen_h5ad} --perturbation-key perturbation --control control --pair-draws 0 "
     "--out {tmp}/t"), r"argument --pair-draws: must be at least 1"),
    ("train-max-minutes-0", ("train --data {screen_h5ad} --perturbation-key perturbation --control control --max-minutes 0 "
     "--out {tmp}/t"), r"argument --max-minutes: must be a number above 0"),
    # training data
    ("holdout-value-matches-nothing", ("train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--holdout bio_rep=rep3 --max-steps 1 --out {tmp}/t"), r"holdout bio_rep=rep3 matches no cell.*'rep_1'"),
    ("holdout-values-match-nothing", ("train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--holdout bio_rep=rep9,rep8 --max-steps 1 --out {tmp}/t"), r"matches no cell, so nothing would be held out \(',' "
     r"separates values\)"),
    ("holdout-column-mistyped", ("train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--holdout biorep=rep_3 --max-steps 1 --out {tmp}/t"),
     r"holdout column 'biorep' does not exist\. Did you mean 'bio_rep'\?"),
    ("train-heads-do-not-divide", ("train --data {screen_h5ad} --perturbation-key perturbation --control control "
     "--hidden-size 30 --heads 4 --max-steps 1 --out {tmp}/t"),
     r"hidden_size 30 \(--hidden-size\) must be divisible by n_heads 4 \(--heads\)"),
    # output folders that are not ours, or in use
    ("train-out-not-ours", ("train --data {screen_h5ad} --perturbation-key perturbation --control control --max-steps 1 "
     "--out {user_folder}"), r"not written by virtualcell .*--force"),
    ("evaluate-out-not-ours", "evaluate --pred {base} --real {base} --out {user_folder}", r"not written by virtualcell .*--force"),
    ("screen-out-not-ours", f"screen {M} --panel {{panel}} --out {{user_folder}}", r"not written by virtualcell .*--force"),
    ("screen-out-unwritable", f"screen {M} --panel {{panel}} --out {{panel}}/s", r"Cannot write .*is a file, not a folder\. Choose another --out"),
    ("screen-out-in-use", f"screen {M} --panel {{panel}} --out {{locked}}", r"is in use by another virtualcell run"),
]


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """The good and broken inputs the cases name."""
    _, folder, data = tiny_model
    d = tmp_path_factory.mktemp("cli_errors")
    f = {"model": str(folder)}
    ctrl = data[data.obs.perturbation == "control"][:6].copy()
    ctrl.write_h5ad(d / "base.h5ad")
    f["base"] = str(d / "base.h5ad")
    dup = ctrl.copy()
    dup.obs_names = ["cell"] * dup.n_obs
    dup.write_h5ad(d / "dup_names.h5ad")
    f["dup_names"] = str(d / "dup_names.h5ad")
    small = data[:300].copy()
    small.write_h5ad(d / "screen.h5ad")
    f["screen_h5ad"] = str(d / "screen.h5ad")
    no_ctrl = data[data.obs.perturbation != "control"][:6].copy()
    no_ctrl.write_h5ad(d / "no_control.h5ad")
    f["no_control"] = str(d / "no_control.h5ad")
    renamed = data[:12].copy()
    renamed.obs = renamed.obs.rename(columns={"perturbation": "pert"})
    renamed.write_h5ad(d / "renamed.h5ad")
    f["renamed"] = str(d / "renamed.h5ad")
    (d / "text.h5ad").write_text("gene,cell1\nSTAT1,3\n")
    (d / "cells.csv").write_text("gene,cell1\nSTAT1,3\n")
    f["csv"] = str(d / "cells.csv")
    f["text_h5ad"] = str(d / "text.h5ad")
    raw = (d / "base.h5ad").read_bytes()
    (d / "trunc.h5ad").write_bytes(raw[: len(raw) // 2])
    f["trunc_h5ad"] = str(d / "trunc.h5ad")
    user = d / "user.h5ad"
    import anndata as ad

    ad.AnnData(np.ones((2, 2), dtype=np.float32)).write_h5ad(user)  # a user's own file, not a prediction
    f["user_h5ad"] = str(user)
    # broken models
    trunc_model = d / "trunc_model"
    shutil.copytree(folder, trunc_model)
    st = trunc_model / "model.safetensors"
    st.write_bytes(st.read_bytes()[:1000])
    f["trunc_model"] = str(trunc_model)
    broken_meta = d / "broken_meta"
    shutil.copytree(folder, broken_meta)
    meta = broken_meta / "virtualcell.json"
    meta.write_text(meta.read_text()[:200])
    f["broken_meta"] = str(broken_meta)
    # panels
    (d / "panel.txt").write_text("ko:STAT1\nko:JAK2\n")
    f["panel"] = str(d / "panel.txt")
    (d / "panel_utf16.txt").write_text("ko:STAT1\nko:NOTAGENE\n", encoding="utf-16")
    f["panel_utf16"] = str(d / "panel_utf16.txt")
    (d / "panel_bom.txt").write_text("ko:NOTAGENE\nko:STAT1\n", encoding="utf-8-sig")
    f["panel_bom"] = str(d / "panel_bom.txt")
    (d / "panel_group.txt").write_text("ko:STAT1\nko:{JAK2,NOTAGENE}\n")  # one line, two perturbations
    f["panel_group"] = str(d / "panel_group.txt")
    (d / "panel_latin1.txt").write_bytes("ko:STAT1 # Prüfung\n".encode("latin-1"))
    f["panel_latin1"] = str(d / "panel_latin1.txt")
    # folders
    user_folder = d / "user_folder"
    user_folder.mkdir()
    (user_folder / "config.json").write_text(json.dumps({"mine": True}))
    (user_folder / "summary.md").write_text("# my notes\n")
    f["user_folder"] = str(user_folder)
    broken_screen = d / "broken_screen"
    (broken_screen / "groups").mkdir(parents=True)
    (broken_screen / "config.json").write_text('{"model": "x", "fing')
    (broken_screen / ".virtualcell").write_text('{"written_by": "virtualcell", "kind": "screen"}\n')
    f["broken_screen"] = str(broken_screen)
    f["locked"] = str(d / "locked")
    return f


@pytest.mark.parametrize(("args", "pattern"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_with_exit_code_2(files, tmp_path, capsys, args, pattern):
    import re
    import shlex

    from virtualcell.safeio import folder_lock

    argv = shlex.split(args.format(tmp=tmp_path, **files))
    with folder_lock(files["locked"], what="a test holding the folder"):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own errors
            code = exit_.code
    said = capsys.readouterr()
    err = said.err
    assert code == 2, err
    assert "Traceback" not in err
    assert said.out == "", said.out  # nothing lands on stdout before a refusal (predict printed its verdict first)
    message = err.strip().splitlines()[-1]
    assert message.startswith(("virtualcell", "usage")) and "error:" in message, err
    assert re.search(pattern, message), message
    if "user_folder" in args:  # the user's folder is untouched: not even a lock file
        with open(f"{files['user_folder']}/config.json") as fh:
            assert json.load(fh) == {"mine": True}
        assert sorted(p.name for p in Path(files["user_folder"]).iterdir()) == ["config.json", "summary.md"]


def test_train_config_refuses_zero_steps():
    from virtualcell.errors import TrainingError
    from virtualcell.train import TrainConfig

    with pytest.raises(TrainingError, match="max_steps must be at least 1"):
        TrainConfig(max_steps=0)


def test_every_command_has_a_description_an_example_and_option_help():
    from virtualcell.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, p in sub.choices.items():
        text = p.format_help()
        assert p.description and "example:" in text and f"virtualcell {name}" in p.epilog, name
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings[0]} has no help"
                shown = p._get_formatter()._get_help_string(action)
                assert "default" in shown or action.required or action.default is False, (name, shown)
    train = sub.choices["train"].format_help()
    assert "3000" in train and "no time limit" in train


def test_a_gpu_asked_of_a_machine_without_one_is_refused_with_what_it_has():
    """--device cuda (or mps) on a machine without one: one sentence saying so and what the machine has, not a
    traceback from deep inside torch (it was 'AssertionError: Torch not compiled with CUDA enabled')."""
    import torch

    from virtualcell.errors import ModelError
    from virtualcell.model import pick_device

    assert pick_device("cpu")[0] == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ModelError, match=r"Device 'cuda:1' was asked for, but .*This machine has: .*cpu"):
            pick_device("cuda:1")
    elif torch.cuda.device_count() < 8:
        with pytest.raises(ModelError, match=r"CUDA GPU\(s\): cuda:0 to"):
            pick_device("cuda:8")
    if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
        with pytest.raises(ModelError, match=r"Device 'mps' \(Apple's Metal\) was asked for"):
            pick_device("mps")


def test_an_interrupted_command_says_how_to_resume_and_warnings_are_log_lines(monkeypatch, capsys, caplog):
    """Ctrl-C is a line saying what to run, not a traceback; a Python warning is one log line, not a source line."""
    import warnings

    from virtualcell import cli

    def interrupted(args):  # noqa: ANN001, ANN202
        raise KeyboardInterrupt

    def warns(args):  # noqa: ANN001, ANN202
        warnings.warn("a warning for a person", UserWarning, stacklevel=1)
        return 0

    monkeypatch.setattr(cli, "cmd_screen", interrupted)
    assert cli.main(["screen", "--model", "m", "--data", "d", "--panel", "p", "--out", "o"]) == 130
    assert "screen: interrupted. Run the same command again: the screen resumes" in capsys.readouterr().err
    monkeypatch.setattr(cli, "cmd_info", warns)
    shown = warnings.showwarning
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.simplefilter("always")
        assert cli.main(["info", "--model", "m"]) == 0
    assert [r.getMessage() for r in caplog.records if r.name == "virtualcell"] == ["a warning for a person"]
    assert warnings.showwarning is shown  # put back when the command ends


def test_a_holdout_value_holding_a_comma_is_read_whole(files, tmp_path):
    import anndata as ad

    import virtualcell as vc
    from virtualcell.cli import main

    a = ad.read_h5ad(files["screen_h5ad"])
    a.obs["batch"] = np.where(np.arange(a.n_obs) % 3 == 0, "lane 1,2", "lane 3")
    a.write_h5ad(tmp_path / "s.h5ad")
    assert main(["train", "--data", str(tmp_path / "s.h5ad"), "--perturbation-key", "perturbation", "--control",
                 "control", "--holdout", "batch=lane 1,2", "--max-steps", "1", "--top-k", "10", "--hidden-size", "16",
                 "--layers", "1", "--heads", "2", "--verdict-fraction", "0", "--out", str(tmp_path / "m")]) == 0
    assert vc.C2SModel.load(tmp_path / "m").train_config["holdout"] == {"batch": ["lane 1,2"]}


def test_a_reader_that_leaves_does_not_stop_the_work_and_no_command_is_a_usage_error(papalexi, tmp_path, capsys):
    """predict printed its verdict before the work; with stdout a pipe whose reader had gone (`| grep -q`, `| true`),
    the next progress bar's flush raised BrokenPipeError half-way and the command exited 0 with nothing written.
    Standard output now outlives its reader. A missing command is a usage error (exit 2), not a success."""
    import os
    import subprocess
    import sys

    base = tmp_path / "base.h5ad"
    papalexi[papalexi.obs["perturbation"] == "control"][:8].copy().write_h5ad(base)
    out = tmp_path / "pred.h5ad"
    proc = subprocess.Popen([sys.executable, "-m", "virtualcell", "predict", "--model", "bundled", "--data", str(base),
                             "--perturbations", "STAT1", "--n-cells", "4", "--samples", "1", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    proc.stdout.close()  # the reader leaves at once
    assert proc.wait(timeout=300) == 0 and out.exists()
    assert main([]) == 2 and "usage" in capsys.readouterr().err
    for command in (["evaluate", "--pred", "p", "--real", "r"], ["train", "--data", "d", "--out", "o"], ["demo"]):
        with pytest.raises(SystemExit) as ended:  # a negative seed was a traceback from numpy, exit 1
            main([*command, "--seed", "-1"])
        assert ended.value.code == 2 and "--seed: must be at least 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["evaluate", "--pred", "p", "--real", "r", "--threads", "0"])


def test_encode_will_not_replace_a_users_file(tmp_path, capsys):
    """encode replaced any .txt or .npz (a user's notes.txt ended up holding cell sentences)."""
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    assert main(["encode", "--data", "papalexi2021", "--out", str(notes)]) == 2
    assert notes.read_text() == "my notes\n" and "--force" in capsys.readouterr().err
    mine = tmp_path / "s.npz"
    assert main(["encode", "--data", "papalexi2021", "--out", str(mine), "--top-k", "20"]) == 0
    assert main(["encode", "--data", "papalexi2021", "--out", str(mine), "--top-k", "20"]) == 0  # its own: replaced
    assert main(["encode", "--data", "papalexi2021", "--out", str(notes), "--force"]) == 0


def test_every_command_takes_verbose_and_quiet_after_its_name(capsys, monkeypatch, caplog):
    """-v worked only before the command ('virtualcell info --model m -v' was an unrecognized argument); only demo had
    --quiet, so a log of predict, screen, train or evaluate filled with progress bars' \\r updates."""
    import logging

    from virtualcell.progress import Silent, progress_bar

    import os

    import virtualcell.cli as cli

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    seen = []
    monkeypatch.setattr(cli, "cmd_info", lambda args: seen.append(
        (args.verbose, isinstance(progress_bar(3, True, "x", "it"), Silent))) or 0)
    with caplog.at_level(logging.INFO):
        assert main(["info", "--model", "bundled", "-v", "-q"]) == 0
    assert seen == [(1, True)]  # -v after the command counted; -q: every bar off while it runs
    assert "TQDM_DISABLE" not in os.environ  # ... and the caller's environment as it was after
    capsys.readouterr()
    # every command, evaluate too (its parser lives in virtualcell.evaluate: it took neither)
    sub = next(a for a in cli.build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    for name, parser in sub.choices.items():
        flags = {s for a in parser._actions for s in a.option_strings}
        assert {"-v", "--verbose", "-q", "--quiet"} <= flags, name


def test_predict_takes_threads_and_gives_the_setting_back(papalexi, tmp_path, monkeypatch):
    """predict and screen had no --threads (train and verdict had): on a shared machine they took every core."""
    import torch

    import virtualcell.generation as generation

    base = tmp_path / "base.h5ad"
    papalexi[papalexi.obs["perturbation"] == "control"][:6].copy().write_h5ad(base)
    seen = []
    real = generation.torch_threads

    def spy(n):  # noqa: ANN001, ANN202
        seen.append(n)
        return real(n)

    monkeypatch.setattr(generation, "torch_threads", spy)
    before = torch.get_num_threads()
    assert main(["predict", "--model", "bundled", "--data", str(base), "--perturbations", "STAT1", "--n-cells", "4",
                 "--samples", "1", "--threads", "1", "--out", str(tmp_path / "p.h5ad"), "-q"]) == 0
    assert seen[:1] == [1] and torch.get_num_threads() == before and (tmp_path / "p.h5ad").exists()


def test_screen_refuses_its_out_and_objective_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """A user's --out folder or a mistyped objective were refused only after the model had loaded (minutes for a
    C2S-Scale checkpoint); now before, and without writing anything into the user's folder."""
    from virtualcell.model import C2SModel

    def loaded(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(C2SModel, "load", loaded)
    panel = tmp_path / "panel.txt"
    panel.write_text("ko:STAT1\n")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    base = ["screen", "--model", "bundled", "--data", "papalexi2021", "--panel", str(panel)]
    assert main([*base, "--out", str(mine)]) == 2
    assert "not written by virtualcell" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]
    assert main([*base, "--out", str(tmp_path / "s"), "--objective", "rasie:STAT1"]) == 2
    assert not (tmp_path / "s").exists()
    (tmp_path / "afile").write_text("x")
    assert main([*base, "--out", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err


def test_train_and_verdict_refuse_a_users_out_before_reading_anything(tmp_path, capsys, monkeypatch):
    """train read the whole --data (minutes for a large screen) and verdict loaded the model and the data before a
    user's --out folder was refused."""
    import virtualcell.cli as cli
    from virtualcell.model import C2SModel

    def read(*args, **kwargs):
        raise AssertionError("read before --out was checked")

    monkeypatch.setattr(cli, "_load_data", read)
    monkeypatch.setattr(C2SModel, "load", read)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("my notes")
    assert main(["train", "--data", "papalexi2021", "--perturbation-key", "perturbation", "--control", "control",
                 "--out", str(mine)]) == 2
    assert "not written by virtualcell" in capsys.readouterr().err
    assert main(["verdict", "--model", "bundled", "--data", "papalexi2021", "--out", str(mine)]) == 2
    assert "not written by virtualcell" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == ["notes.md"]


def test_a_dataset_name_is_a_dataset_whatever_folder_shares_it(tmp_path, monkeypatch):
    """A folder named like a dataset in the working directory (e.g. after --out synthetic) was read as the user's
    folder and refused; a file or folder that names no dataset is still the user's."""
    from virtualcell.cli import _load_data
    from virtualcell.errors import DataError

    monkeypatch.chdir(tmp_path)
    (tmp_path / "perturbench").mkdir()
    assert _load_data("perturbench").n_obs > 0
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="is a folder"):
        _load_data("mine")


def test_a_full_disk_or_a_memory_limit_is_said_with_what_to_do(files, tmp_path, capsys, monkeypatch):
    """torch, h5py and safetensors report a full disk in words of their own (a RuntimeError 'unexpected pos', an
    OSError 28 chained): each was a raw traceback. The command says what ran out and what to do, exit code 2."""
    import errno

    from virtualcell.sentences import CellSentences

    class SafetensorError(Exception):  # (safetensors' own error is no OSError)
        pass

    def raising(err):  # noqa: ANN001, ANN202
        def save(self, path):  # noqa: ANN001
            raise err
        return save

    def torch_full(self, path):  # noqa: ANN001 - torch.save on a full disk: no errno anywhere in its chain
        try:
            raise RuntimeError("basic_ios::clear: iostream error")
        except RuntimeError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 498176 vs 498068")

    for save, said in ((raising(OSError(errno.ENOSPC, "No space left on device")), "the disk is full"),
                       (raising(SafetensorError("I/O error: No space left on device (os error 28)")), "the disk is full"),
                       (torch_full, "could not be written whole"),
                       (raising(OSError(errno.EFBIG, "File too large")), "size limit"),
                       (raising(MemoryError()), "out of memory"),
                       (raising(OSError(errno.ENOMEM, "Cannot allocate memory")), "out of memory")):
        monkeypatch.setattr(CellSentences, "save", save)
        assert main(["encode", "--data", files["base"], "--out", str(tmp_path / "e.npz")]) == 2
        assert said in capsys.readouterr().err
    monkeypatch.setattr(CellSentences, "save", lambda self, path: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # anything else is not dressed up as one of these
        main(["encode", "--data", files["base"], "--out", str(tmp_path / "e.npz")])
