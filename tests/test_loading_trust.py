"""What virtualcell trusts in files someone else wrote: a shared model folder, its training checkpoint, a screen
folder. Nothing in them runs code, and a damaged or edited file is refused by name, with the fix, before it is served
(not a prediction of NaN, random weights or an out-of-range blend, nor a raw traceback)."""

from __future__ import annotations

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch

import virtualcell as vc
from virtualcell.errors import ModelError, ScreenError, TrainingError
from virtualcell.model import META_FILE, verdict_files
from virtualcell.screen import FINISHED_FILES
from virtualcell.screen import run as screen
from virtualcell.training import checkpoint

HUB_ID = "vandijklab/C2S-Scale-Gemma-2-2B"


@pytest.fixture
def folder(model_dir):
    """A copy of the tiny model's folder (without its training checkpoint), to damage (conftest.model_dir)."""
    return model_dir


def _edit_json(path, edit):  # noqa: ANN001
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _reseal(folder):  # noqa: ANN001
    """Record the verdict files' digests again, as a tool that rewrote them consistently would: what is tested is then
    the file's own check, not the digest's."""
    _edit_json(folder / META_FILE, lambda d: d.__setitem__("verdict_files", verdict_files(folder)))


def _edit_npz(folder, name, edit):  # noqa: ANN001
    z = dict(np.load(folder / name))
    edit(z)
    with open(folder / name, "wb") as fh:
        np.savez(fh, **z)
    _reseal(folder)


def _edit_weights(folder, edit):  # noqa: ANN001
    from safetensors.torch import load_file, save_file

    sd = load_file(folder / "model.safetensors")
    sd = edit(sd)
    save_file(sd, folder / "model.safetensors", metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------- checkpoints
class _Payload:
    """Pickled, it makes a folder when it is unpickled: code that a shared trainer_state.pt runs."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.mkdir, (self.marker,))


def test_a_shared_checkpoints_trainer_state_is_never_unpickled(tiny_model, tmp_path):
    _, out, _ = tiny_model
    shared = tmp_path / "shared"
    shutil.copytree(out, shared)
    last = shared / "last"
    data_hash = json.loads((last / checkpoint.CONFIG_FILE).read_text())["data_hash"]
    marker = tmp_path / "PAYLOAD_RAN"
    torch.save({"model": {}, "optimizer": {}, "step": 0, "history": [], "x": _Payload(str(marker))},
               last / checkpoint.STATE_FILE)
    # `virtualcell train --out SHARED` resumes from SHARED/last by default: the state is read, never run
    with pytest.raises(TrainingError, match=r"trainer_state\.pt holds more than the tensors .*\(it holds GLOBAL "
                                            r"posix\.mkdir\).* not unpickled.*--restart") as refused:
        checkpoint.load(last, data_hash=data_hash)
    assert "add_safe_globals" not in str(refused.value)  # torch's advice to allow-list what is refused is not passed on
    assert not marker.exists()


def test_a_real_trainer_state_loads_as_tensors_and_plain_values(tiny_model, tmp_path):
    _, out, _ = tiny_model
    last = out / "last"
    data_hash = json.loads((last / checkpoint.CONFIG_FILE).read_text())["data_hash"]
    state = checkpoint.load(last, data_hash=data_hash)
    assert isinstance(state["step"], int) and state["model"] and state["optimizer"]["state"]
    assert torch.load(last / checkpoint.STATE_FILE, weights_only=True)["step"] == state["step"]
    # numpy numbers in the history (a clock or loss a process handed back as numpy) are stored as plain ones
    numpy_history = {"model": {"w": torch.ones(2)}, "optimizer": {}, "step": np.int64(3), "pretrain_end": None,
                     "history": [{"step": 3, "loss": np.float64(1.5), "elapsed_s": np.float32(2.0)}]}
    checkpoint.save(tmp_path / "last", lambda tmp: None, state=numpy_history, run_config={"data_hash": "h"})
    back = checkpoint.load(tmp_path / "last", data_hash="h")
    assert back["step"] == 3 and back["history"][0]["loss"] == 1.5


# ---------------------------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("damage, said", [
    (lambda sd: {k: v for k, v in sd.items() if "layers.1." not in k},
     r"model\.safetensors lacks 9 of the weights its config\.json describes .*layers\.1\..*random values.*Copy the "
     r"whole checkpoint folder again"),
    (lambda sd: {k: torch.full_like(v, float("nan")) if "layers.0.mlp" in k else v for k, v in sd.items()},
     r"model\.safetensors holds weights that are not finite numbers .*layers\.0\.mlp.*Copy the whole checkpoint"),
], ids=["layer-missing", "nan-weights"])
def test_weights_that_are_not_the_model_are_refused(folder, damage, said):
    _edit_weights(folder, damage)
    with pytest.raises(ModelError, match=said):
        vc.C2SModel.load(folder)


def test_a_config_that_disagrees_with_the_weights_is_refused(folder):
    _edit_json(folder / "config.json", lambda d: d.__setitem__("num_hidden_layers", 1))
    with pytest.raises(ModelError, match=r"holds 9 weights that its config\.json has no place for .*layers\.1\."):
        vc.C2SModel.load(folder)
    _edit_json(folder / "config.json", lambda d: d.update(num_hidden_layers=2, rms_norm_eps=float("nan")))
    with pytest.raises(ModelError, match=r"config\.json' holds values that are not finite numbers \('rms_norm_eps nan'"):
        vc.C2SModel.load(folder)


def test_an_intact_folder_and_a_plain_checkpoint_still_load(tiny_model, folder):
    model, _, data = tiny_model
    again = vc.C2SModel.load(folder)  # (its output layer is tied to the embeddings, and not stored: not 'missing')
    assert again.weights_digest() == model.weights_digest() and again.verdict is not None
    # a plain Hugging Face checkpoint (no virtualcell.json: the hub models' case) loads as it did, with genes=
    (folder / META_FILE).unlink()
    plain = vc.C2SModel.load(folder, genes=list(data.var_names))
    assert plain.format.name == "c2s"


# ---------------------------------------------------------------------------------------------------- stored values
def _meta(edit):  # noqa: ANN001, ANN202
    return lambda f: _edit_json(f / META_FILE, edit)


@pytest.mark.parametrize("damage, said", [
    (_meta(lambda d: d["rank_fit"].__setitem__("slope", float("nan"))),
     r"virtualcell\.json': rank_fit's slope is nan, not a finite number.*copy the checkpoint folder again"),
    (_meta(lambda d: d["rank_fit"].__setitem__("intercept", float("inf"))), r"rank_fit's intercept is inf"),
    (_meta(lambda d: d["rank_fit"].__setitem__("slope", "-1.8")), r"rank_fit's slope is '-1\.8', not a finite number"),
    (_meta(lambda d: d["rank_fit"].__setitem__("rank_means", [float("nan")] * 30)), r"rank_fit's rank_means hold nan"),
    (_meta(lambda d: d["rank_fit"].__setitem__("bogus", 1)),
     r"virtualcell\.json': rank_fit has fields this virtualcell does not know \('bogus'\): it was written by a newer "
     r"virtualcell\. Upgrade virtualcell"),
    (_meta(lambda d: d["target_offsets"].__setitem__("knockout", float("nan"))),
     r"virtualcell\.json' is damaged: the target-offsets \{'knockout': nan\} are not finite numbers"),
    (_meta(lambda d: d["genes"].__setitem__(1, d["genes"][0])), r"virtualcell\.json' is damaged: its genes list"),
    (lambda f: np.save(f / "token_bias.npy", np.full(np.load(f / "token_bias.npy").shape, np.nan, np.float32)),
     r"token_bias\.npy' is damaged .*values are not finite \(nan\)"),
    (lambda f: _edit_npz(f, "gene_map.npz", lambda z: z.__setitem__("left", np.full_like(z["left"], np.nan))),
     r"gene_map\.npz' is damaged: its left: .* not finite \(nan\)"),
    (lambda f: _edit_npz(f, "gene_map.npz", lambda z: z.__setitem__("inputs", z["inputs"] - 5)),
     r"gene_map\.npz' is damaged: its inputs are not positions of this model's 299 genes"),
    (lambda f: _edit_npz(f, "baselines.npz", lambda z: z.__setitem__("delta", np.full_like(z["delta"], np.inf))),
     r"baselines\.npz' is damaged \(its delta: .* not finite \(inf\)\); delete it to serve the pure model"),
    (lambda f: _edit_npz(f, "baselines.npz", lambda z: z.__setitem__("delta", z["delta"][:3])),
     r"baselines\.npz' is damaged \(delta is \(3, 299\), not one row per perturbation"),
], ids=["slope-nan", "intercept-inf", "slope-string", "rank-means-nan", "rank-fit-newer-field", "offsets-nan",
        "genes-duplicate", "token-bias-nan", "gene-map-nan", "gene-map-negative-inputs", "baselines-inf",
        "baselines-rows"])
def test_stored_values_that_are_not_finite_or_in_range_are_refused_naming_the_file(folder, damage, said):
    damage(folder)
    with pytest.raises(ModelError, match=said):
        vc.C2SModel.load(folder)


@pytest.mark.parametrize("weight", [2.0, -0.1, float("nan"), "0.6"])
def test_a_verdicts_blend_weight_outside_0_1_is_refused(folder, weight):
    _edit_json(folder / "verdict.json", lambda v: v.__setitem__("weight", weight))
    _reseal(folder)
    with pytest.raises(ModelError, match=r"verdict\.json' is broken \(its weight is .*not a blend weight in \[0, 1\]\)"
                                         r"; delete it to serve the pure model"):
        vc.C2SModel.load(folder)


def test_a_verdicts_generation_settings_are_checked(folder):
    _edit_json(folder / "verdict.json", lambda v: v["settings"].__setitem__("samples", -3))
    _reseal(folder)
    with pytest.raises(ModelError, match=r"its samples setting is -3, not a whole number of at least 1"):
        vc.C2SModel.load(folder)


# ---------------------------------------------------------------------------------------------------- names
def test_a_local_folder_named_like_a_hub_model_is_said_and_recorded_by_its_path(tiny_model, tmp_path, monkeypatch,
                                                                                  caplog):
    _, out, data = tiny_model
    monkeypatch.chdir(tmp_path)
    shutil.copytree(out, tmp_path / HUB_ID, ignore=shutil.ignore_patterns("last"))
    with caplog.at_level(logging.INFO, logger="virtualcell.model"):
        model = vc.C2SModel.load(HUB_ID)
    said = [r for r in caplog.records if "local folder" in r.getMessage()]
    assert said and said[0].levelno == logging.WARNING and "not the Hugging Face hub model" in said[0].getMessage()
    where = str((tmp_path / HUB_ID).resolve())
    assert model.source == where and model.source.endswith(HUB_ID)
    ctrl = data[data.obs.perturbation == "control"][:4].copy()
    pred = vc.Simulator(ctrl, model).simulate(["STAT1"], n_cells=4, progress=False).to_anndata()
    assert pred.uns["virtualcell"]["model"] == where
    # an everyday folder such as runs/model (no hub model of that name is known here) is said quietly
    shutil.copytree(out, tmp_path / "runs" / "model", ignore=shutil.ignore_patterns("last"))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="virtualcell.model"):
        mine = vc.C2SModel.load("runs/model")
    assert [r.levelno for r in caplog.records if "local folder" in r.getMessage()] == [logging.INFO]
    assert mine.source == "runs/model"  # as given: a screen written with it resumes by it
    # "bundled" with no folder of that name here is the shipped model itself: nothing to say (it warned that it was not)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="virtualcell.model"):
        vc.C2SModel.load("bundled")
    assert not [r for r in caplog.records if "local folder" in r.getMessage()]
    shutil.copytree(out, tmp_path / "bundled", ignore=shutil.ignore_patterns("last"))
    with caplog.at_level(logging.INFO, logger="virtualcell.model"):
        assert vc.C2SModel.load("bundled").source == str((tmp_path / "bundled").resolve())
    assert [r.levelno for r in caplog.records if "not the model shipped" in r.getMessage()] == [logging.WARNING]


# ---------------------------------------------------------------------------------------------------- screens
@pytest.fixture(scope="module")
def screened(tiny_model, tmp_path_factory):
    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:8].copy(), model)
    out = tmp_path_factory.mktemp("screen") / "s"
    screen(sim, ["STAT1", "JAK2", "IFNGR1"], out=out, group_size=1, progress=False, n_boot=10)
    return sim, out


def _cut(path):  # noqa: ANN001
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("damage, said", [
    (lambda d: _cut(d / "config.json"),
     r"config\.json cannot be read \(JSONDecodeError.*the screen folder is damaged.*--force"),
    (lambda d: (d / "config.json").write_text("[]"), r"config\.json cannot be read \(ValueError: a JSON list"),
    (lambda d: _cut(d / "aggregates.nc"),
     r"aggregates\.nc cannot be read .*the screen folder is damaged.*rebuilds its results from its saved groups"),
    (lambda d: (d / "aggregates.nc").write_bytes(b""), r"aggregates\.nc cannot be read"),
    (lambda d: _cut(d / "ranking.parquet"), r"ranking\.parquet cannot be read .*the screen folder is damaged"),
], ids=["config-cut", "config-list", "aggregates-cut", "aggregates-empty", "ranking-cut"])
def test_a_damaged_screen_folder_is_named_not_a_raw_traceback(screened, tmp_path, damage, said):
    d = tmp_path / "s"
    shutil.copytree(screened[1], d)
    damage(d)
    with pytest.raises(ScreenError, match=said):
        vc.screen.load(d)


def test_a_resumed_screen_refuses_a_group_file_of_other_perturbations(screened, tmp_path):
    sim, out = screened
    d = tmp_path / "s"
    shutil.copytree(out, d)
    for name in FINISHED_FILES:
        (d / name).unlink(missing_ok=True)
    for ext in ("nc", "npz"):  # group 0's files replaced by group 1's
        shutil.copy(d / "groups" / f"group_00001.{ext}", d / "groups" / f"group_00000.{ext}")
    with pytest.raises(ScreenError, match=r"group_00000\.nc holds 'ko:JAK2', not this group's 'ko:STAT1'.*Delete "
                                          r"group_00000\.nc and group_00000\.npz"):
        screen(sim, ["STAT1", "JAK2", "IFNGR1"], out=d, group_size=1, progress=False, n_boot=10)
