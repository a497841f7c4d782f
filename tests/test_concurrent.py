"""Two processes on one folder at once: a model folder read while it is saved, a verdict in place while a training
holds the folder, a lock file released between another's open and its lock, a filesystem without locks, commands
that check a busy --out before their minutes of loading, and a toward: reference that changed between two runs.
The interleavings are made deterministic (a step of one side runs the other in its middle), not left to timing."""

from __future__ import annotations

import copy
import errno
import fcntl
import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
import torch

import virtualcell as vc
from virtualcell import safeio
from virtualcell.cli import main
from virtualcell.errors import FolderInUseError, ModelError


class _Holder:
    """Another process holding ``safeio.folder_lock(folder, what=what)`` until closed."""

    def __init__(self, folder, what: str) -> None:  # noqa: ANN001
        code = textwrap.dedent(f"""
            import sys
            from virtualcell import safeio
            with safeio.folder_lock({str(folder)!r}, what={what!r}):
                print("locked", flush=True)
                sys.stdin.read()
        """)
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "locked"
        self.pid = self.proc.pid

    def __enter__(self) -> _Holder:
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        self.proc.communicate("")


def _cli(argv, capsys) -> str:  # noqa: ANN001
    """``virtualcell ARGV``'s refusal: exit code 2, and its one-line message."""
    code = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    return err


def _other(model: vc.C2SModel) -> vc.C2SModel:
    """Another model of the same shape: other weights, other target offsets, another step count in its record."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        for w in other.lm.parameters():
            w.add_(0.01)
    other.train_config = dict(other.train_config, steps=999)
    return other


# --------------------------------------------------------------------------- file_lock / the folder lock
def test_a_file_lock_released_between_anothers_open_and_its_lock_is_never_held_twice(tmp_path, monkeypatch):
    """file_lock removes its lock file on release. B opened it just before A released (A removed it), then locked
    the removed file, while C created a new one and locked that: two holders of one output's lock. B now sees the
    file it locked is gone and opens the lock file anew, so C is refused while B holds it."""
    out = tmp_path / "pred.h5ad"
    a = safeio.file_lock(out, what="A")
    a.__enter__()
    real = fcntl.flock
    released = []

    def flock(fd, op):  # noqa: ANN001, ANN202 - B's first lock: A releases between B's open and B's lock
        if not released:
            released.append(True)
            a.__exit__(None, None, None)
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    with safeio.file_lock(out, what="B"):
        monkeypatch.setattr(fcntl, "flock", real)
        assert released
        with pytest.raises(FolderInUseError, match=r"in use by another virtualcell run \(pid \d+, B\)"):
            with safeio.file_lock(out, what="C"):
                pass
    assert list(tmp_path.iterdir()) == []  # (the lock file still goes after use)


def test_a_filesystem_without_locks_runs_unlocked_saying_so_and_a_held_lock_is_still_refused(tmp_path, monkeypatch,
                                                                                              caplog):
    """flock raising ENOLCK (Lustre without -o flock, some network mounts) read as 'in use by another virtualcell
    run (pid of a run that ended long ago)', forever. A filesystem without locks is said, with the fix, and the run
    goes on; a lock another run holds (EWOULDBLOCK) is refused as before."""
    out = tmp_path / "screen"
    with safeio.output_folder(out, kind="screen"):
        pass  # an earlier, finished run: the lock file names its pid

    def no_locks(fd, op):  # noqa: ANN001, ANN202
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    with caplog.at_level(logging.WARNING, logger="virtualcell.safeio"):
        with safeio.output_folder(out, kind="screen") as folder:
            assert folder == out
    assert "does not support file locks" in caplog.text and "No locks available" in caplog.text
    assert "start no other run into it until this one ends, or use a folder on a local disk" in caplog.text

    def busy(fd, op):  # noqa: ANN001, ANN202
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", busy)
    with pytest.raises(FolderInUseError, match="in use by another virtualcell run"):
        with safeio.output_folder(out, kind="screen"):
            pass


def test_whether_a_folder_is_in_use_is_asked_without_taking_its_lock(tmp_path):
    assert safeio.in_use_by(tmp_path) is None  # no lock file: nobody, and nothing is written
    assert list(tmp_path.iterdir()) == []
    with _Holder(tmp_path, "train") as holder:
        assert safeio.in_use_by(tmp_path) == f"pid {holder.pid}, train"
        with pytest.raises(FolderInUseError, match=rf"in use by another virtualcell run \(pid {holder.pid}, train\)"):
            safeio.check_not_in_use(tmp_path)
    assert safeio.in_use_by(tmp_path) is None  # released when the holder ended
    safeio.check_not_in_use(tmp_path)
    with safeio.folder_lock(tmp_path, what="screen"):  # this process's own lock is no other run's
        assert safeio.in_use_by(tmp_path) is None


# --------------------------------------------------------------------------- a model folder read while saved
def test_a_model_loaded_while_another_is_saved_into_its_folder_is_one_saves_whole(model_dir, monkeypatch):
    """A reader read virtualcell.json (one model's codec: steps, target offsets), then the weights, while a save
    (train's end) wrote another model's into the folder in between: it loaded one model's weights with the other's
    codec, without a word (about 8% of loads in a loop). The save waits for the reader's lock, and the reader gets the
    model it started reading, whole; a load after the save gets the new one, whole."""
    import transformers

    first = vc.C2SModel.load(model_dir)
    other = _other(first)
    assert other.weights_digest() != first.weights_digest()
    real = transformers.AutoModelForCausalLM.from_pretrained
    saver: list[threading.Thread] = []
    waiting, finished = threading.Event(), threading.Event()
    real_flock = fcntl.flock

    def flock(fd, op):  # noqa: ANN001, ANN202 - the saver's wait for the lock, seen
        if saver and threading.current_thread() is saver[0] and not op & fcntl.LOCK_NB:
            waiting.set()
        return real_flock(fd, op)

    def save_other():  # noqa: ANN202
        try:
            other.save(model_dir)
        finally:
            finished.set()

    def from_pretrained(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - the codec is read; now a save runs
        if not saver:
            saver.append(threading.Thread(target=save_other))
            saver[0].start()
            for _ in range(600):  # until the save has finished (no lock) or waits for this reader's
                if waiting.wait(0.05) or finished.is_set():
                    break
        return real(*args, **kwargs)

    monkeypatch.setattr(fcntl, "flock", flock)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    read = vc.C2SModel.load(model_dir)
    saver[0].join(60)
    monkeypatch.undo()
    assert finished.is_set()
    assert read.train_config["steps"] == first.train_config["steps"] and read.target_offsets == first.target_offsets
    assert read.weights_digest() == first.weights_digest()  # (the other's weights under this one's codec, before)
    assert waiting.is_set()  # (the save waited for the reader)
    after = vc.C2SModel.load(model_dir)
    assert after.weights_digest() == other.weights_digest() and after.train_config["steps"] == 999
    assert not (model_dir / safeio.SAVE_LOCK).exists()  # (no lock file is left in the folder)


def test_a_read_only_model_folder_loads_without_its_lock(model_dir, monkeypatch):
    """An installed model in a folder this process cannot write (no lock file there) still loads, unlocked; one
    whose owner's save left a lock file is read under a shared lock of it, opened read-only."""
    import builtins

    real_open = builtins.open

    def read_only(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if str(file).endswith(safeio.SAVE_LOCK) and mode != "r":
            raise PermissionError(errno.EACCES, "Permission denied", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(safeio, "open", read_only, raising=False)
    assert vc.C2SModel.load(model_dir).verdict is not None
    assert not (model_dir / safeio.SAVE_LOCK).exists()
    (model_dir / safeio.SAVE_LOCK).write_text("pid 1, saving")  # (left by the owner's save, killed)
    assert vc.C2SModel.load(model_dir).verdict is not None


def test_a_token_bias_table_cut_short_is_refused_as_damaged_and_is_written_whole(model_dir, monkeypatch):
    """A token_bias.npy cut short (a save read half-way, a full disk) gave a raw EOFError traceback; it is refused
    naming the file and the fix. The table is written through a temporary file, so a save that fails while writing
    it leaves the previous table whole."""
    from virtualcell import token_bias

    model = vc.C2SModel.load(model_dir)
    table = model_dir / token_bias.FILE
    whole = table.read_bytes()
    real_save = np.save

    def full_disk(file, arr, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        with open(file, "wb") as fh:
            fh.write(b"\x93NUMPY")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        model.save(model_dir)
    monkeypatch.setattr(np, "save", real_save)
    assert table.read_bytes() == whole
    assert not list(model_dir.glob(".token_bias*"))  # (nor a temporary file left)
    model.save(model_dir)
    for cut in (b"", whole[: len(whole) // 2]):
        table.write_bytes(cut)
        with pytest.raises(ModelError, match=r"token_bias\.npy' is damaged: it cannot be read as the model's "
                                             r"token-bias table .*Copy the checkpoint folder again, or retrain it"):
            vc.C2SModel.load(model_dir)


# --------------------------------------------------------------------------- verdict in place, training
def test_an_in_place_verdict_is_refused_while_a_training_holds_the_folder(model_dir, tiny_model, tmp_path,
                                                                         monkeypatch, capsys):
    """`virtualcell verdict --model X` locked only X/.verdict.json.lock, so it ran beside `train --out X`, whose end
    saved other weights under the verdict's codec (the earlier model's target offsets): a mixed folder that loaded
    without a word. It takes the folder's lock, a training's, before the model loads: refused at once, naming the
    training's pid."""
    _, _, data = tiny_model
    data_file = tmp_path / "data.h5ad"
    data[:50].write_h5ad(data_file)

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("the model was loaded before the folder's lock was checked")

    monkeypatch.setattr(vc.C2SModel, "load", no_load)
    with _Holder(model_dir, "train") as holder:
        err = _cli(["verdict", "--model", model_dir, "--data", data_file], capsys)
    assert f"is in use by another virtualcell run (pid {holder.pid}, train). Wait for it to finish" in err
    assert not (model_dir / "previous-verdict.json").exists()


def test_an_in_place_verdict_refuses_weights_saved_into_the_folder_since_it_loaded(model_dir, tiny_model, tmp_path,
                                                                                  monkeypatch, capsys):
    """The verdict rewrote the codec from the model it loaded, over whatever weights the folder then held. Weights
    saved there while it judged (a save that takes no folder lock: a Python model.save) are refused before anything
    is written, and the folder keeps the new model whole."""
    import virtualcell.train

    _, _, data = tiny_model
    data_file = tmp_path / "data.h5ad"
    data.write_h5ad(data_file)
    other = _other(vc.C2SModel.load(model_dir))

    def rejudge(model, adata, **kwargs):  # noqa: ANN001, ANN003, ANN202 - a save lands while it judges
        other.save(model_dir)

    monkeypatch.setattr(virtualcell.train, "rejudge", rejudge)
    err = _cli(["verdict", "--model", model_dir, "--data", data_file], capsys)
    assert re.search(r"changed since this model was loaded from it \(.*model\.safetensors.*virtualcell\.json.*\)"
                     r".*Run `virtualcell verdict --model", err), err
    assert not (model_dir / "previous-verdict.json").exists()
    now = vc.C2SModel.load(model_dir)
    assert now.weights_digest() == other.weights_digest() and now.train_config["steps"] == 999
    assert now.target_offsets == other.target_offsets


def test_save_verdict_writes_only_beside_the_weights_it_was_loaded_with(model_dir, tmp_path):
    model = vc.C2SModel.load(model_dir)
    model.save_verdict(model_dir)  # its own folder, unchanged: written (again and again)
    model.save_verdict(model_dir)
    other = _other(model)
    other.save(model_dir)  # another model saved there since
    with pytest.raises(ModelError, match="changed since this model was loaded from it"):
        model.save_verdict(model_dir)
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(model_dir, elsewhere)
    with pytest.raises(ModelError, match=r"is not the folder this model was loaded from or saved to .*model\.save"):
        other.save_verdict(elsewhere)
    again = vc.C2SModel.load(model_dir)
    assert again.weights_digest() == other.weights_digest()
    other.save_verdict(model_dir)  # (saved there: its own)


def test_a_folder_being_trained_for_the_first_time_says_so_not_that_a_save_was_cut(tmp_path):
    """`predict --model X` while X's first training ran said X 'has no virtualcell.json ... a save that was cut ...
    run the training command again'; it says the folder is being trained now, by which pid, and to wait."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "history.json").write_text("[]")
    with _Holder(folder, "train") as holder:
        with pytest.raises(ModelError, match=rf"holds no model yet: it is being trained now \(pid {holder.pid}, "
                                             r"train\).*Wait for that run to finish"):
            vc.C2SModel.load(folder)
    with pytest.raises(ModelError, match=r"has no virtualcell\.json.*a save that was cut"):  # no run holds it
        vc.C2SModel.load(folder)


# --------------------------------------------------------------------------- busy --out before the minutes of loading
@pytest.mark.parametrize("command", ["screen", "train"])
def test_a_busy_out_is_refused_before_the_model_or_data_loads(tiny_model, tmp_path, monkeypatch, capsys, command):
    """`screen` (and `train`) checked a busy --out only after loading the model and baseline (the data): minutes for a
    2B model, then refused. The lock is asked first, as predict's is."""
    import virtualcell.cli

    _, folder, data = tiny_model
    base = tmp_path / "base.h5ad"
    data[:10].write_h5ad(base)
    (tmp_path / "panel.txt").write_text("ko:STAT1\n")
    out = tmp_path / "out"
    out.mkdir()

    def no_load(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("loaded before the --out's lock was checked")

    monkeypatch.setattr(vc.C2SModel, "load", no_load)
    monkeypatch.setattr(virtualcell.cli, "_load_data", no_load)
    argv = {"screen": ["screen", "--model", str(folder), "--data", str(base), "--panel", str(tmp_path / "panel.txt")],
            "train": ["train", "--data", str(base), "--perturbation-key", "perturbation", "--control", "control",
                      "--max-steps", "1"]}[command]
    with _Holder(out, command) as holder:
        err = _cli([*argv, "--out", out], capsys)
    assert f"{str(out)!r} is in use by another virtualcell run (pid {holder.pid}, {command})" in err


# --------------------------------------------------------------------------- toward: a reference that changed
def test_a_toward_reference_whose_cells_changed_is_recorded_and_said_on_resume(tiny_model, tmp_path, caplog):
    """A toward:REF.h5ad screen recorded the reference only by the path typed: REF rewritten, the same command
    resumed, ranked toward other cells, and wrote a byte-identical config.json. The record holds a digest of the
    target (the reference cells' mean), so the two differ, and the resume says the ranking follows the new cells
    (the groups do not depend on the objective and are kept). A screen folder written before the digest resumes
    as it did, without a word."""
    from virtualcell.objectives import parse_objective
    from virtualcell.screen import run as screen

    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:8].copy(), model)
    ref = tmp_path / "ref.h5ad"
    out = tmp_path / "screen"
    panel = ["ko:STAT1", "ko:JAK2"]

    def run_with(label):  # noqa: ANN001, ANN202
        data[data.obs.perturbation == label].copy().write_h5ad(ref)
        return screen(sim, panel, objective=parse_objective(f"toward:{ref}"), out=out, n_cells=8, progress=False,
                      n_boot=5)

    run_with("IFNGR1")
    before = json.loads((out / "config.json").read_text())
    digest = before["objective"]["target_digest"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="virtualcell.screen"):
        run_with("IFNGR1")  # the same reference: resumed without a word on the objective
    assert "ranked again" not in caplog.text and "ranked by the objective" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="virtualcell.screen"):
        run_with("STAT1")
    after = json.loads((out / "config.json").read_text())
    assert after["objective"]["description"] == before["objective"]["description"]
    assert after["objective"]["target_digest"] != digest
    assert "the saved groups are ranked again toward the reference given now, whose cells differ from those of the " \
           "folder's last ranking" in caplog.text

    old = dict(after, objective={k: v for k, v in after["objective"].items() if k != "target_digest"})
    (out / "config.json").write_text(json.dumps(old))  # as a screen from before the digest recorded it
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="virtualcell.screen"):
        run_with("IFNGR1")
    assert "ranked again" not in caplog.text and "resuming" in caplog.text
    assert json.loads((out / "config.json").read_text())["objective"]["target_digest"] == digest


def test_simulate_store_is_locked_as_predict_out_is(tiny_model, tmp_path):
    """Two processes storing cells to one path: the last to finish won, silently (predict --out had a lock). While
    another run holds the path, simulate(store=) is refused naming it, and the path is left as it was."""
    model, _, data = tiny_model
    sim = vc.Simulator(data[data.obs.perturbation == "control"][:4].copy(), model)
    path = tmp_path / "cells.nc"
    with safeio.file_lock(path, what="simulate"):
        with pytest.raises(FolderInUseError, match="in use by another virtualcell run"):
            sim.simulate(["STAT1"], seed=0, store=path, progress=False)
    assert not path.exists()
    sim.simulate(["STAT1"], seed=0, store=path, progress=False)  # once free, it writes
    assert path.exists() and not list(tmp_path.glob(".*.lock"))


def test_a_verdict_saved_in_place_is_not_refused_for_a_chmod_or_a_hard_link(tiny_model, tmp_path):
    """A review: the 'changed since loaded' check compared the files' change times, so a chmod or a hard-link backup
    of the weights refused the verdict's save, saying a training had finished meanwhile."""
    import os

    _, folder, _ = tiny_model
    own = tmp_path / "m"
    shutil.copytree(folder, own)
    model = vc.C2SModel.load(own)
    weights = next(own.glob("*.safetensors"))
    os.chmod(weights, 0o600)
    os.link(weights, tmp_path / "backup.safetensors")
    model.save_verdict(own)  # the weights are the ones loaded: written
