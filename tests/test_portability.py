"""Other platforms and filesystems: Windows (no fcntl; a folder holding an open file cannot be moved), NFS (a file
removed while open stays as .nfsXXXX), shared filesystems seen from several hosts, and a checkpoint saved on a GPU
resumed on a CPU. Each is simulated on this machine."""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

import pytest

from virtualcell import safeio
from virtualcell.errors import FolderInUseError, OutputError


def _save(last: Path, step: int) -> None:
    with safeio.atomic_folder(last) as tmp:
        (tmp / "state").write_text(str(step))


def _inode(path: Path, dir_fd: int | None = None) -> tuple[int, int]:
    st = os.stat(path, dir_fd=dir_fd, follow_symlinks=False)
    return st.st_dev, st.st_ino


def test_without_fcntl_a_run_goes_on_unlocked_saying_so_once(tmp_path, monkeypatch, caplog):
    """Windows has no fcntl: a second run into a folder in use was let in and nothing was said, while the README
    promised a warning where locks do not work. It is said, once a process, with what to do; the runs go on."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # `import fcntl` raises ImportError, as on Windows
    monkeypatch.setattr(safeio, "_said_no_fcntl", False, raising=False)  # (said by an earlier test)
    out = tmp_path / "screen"
    with caplog.at_level(logging.WARNING, logger="virtualcell.safeio"):
        with safeio.output_folder(out, kind="screen"):
            assert safeio.in_use_by(out) is None
            with safeio.output_folder(out, kind="screen"), safeio.file_lock(tmp_path / "pred.h5ad"):
                pass  # not refused: nothing can lock here
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1, said
    assert "no file locks on this platform" in said[0] and "two runs writing into one output folder" in said[0]
    assert "Start one run per --out folder at a time" in said[0]
    assert safeio.is_ours(out)


def test_a_lock_names_its_host_and_the_same_pid_on_another_host_is_another_process(tmp_path):
    """A lock file said 'pid 123, train': from another node of a shared filesystem that pid cannot be found, and a
    holder there with this process's pid number was taken for this process. It names its host now; the host is said
    where it is another machine, and a holder's pid is this process only on this host."""
    import fcntl

    with safeio.folder_lock(tmp_path, what="train"):
        assert (tmp_path / safeio.LOCK).read_text() == f"pid {os.getpid()} on {socket.gethostname()}, train"
        assert safeio.in_use_by(tmp_path) is None  # this process

    def held_by(text: str):  # noqa: ANN202 - another open of the lock file holds it (flock: per open file)
        fh = open(tmp_path / safeio.LOCK, "a+")  # noqa: SIM115
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        fh.truncate(0)
        fh.write(text)
        fh.flush()
        return fh

    with held_by(f"pid {os.getpid()} on node-elsewhere-7, train"):
        assert safeio.in_use_by(tmp_path) == f"pid {os.getpid()} on node-elsewhere-7, train"
        with pytest.raises(FolderInUseError, match=rf"\(pid {os.getpid()} on node-elsewhere-7, train\)"):
            safeio.check_not_in_use(tmp_path)
        with pytest.raises(FolderInUseError, match="on node-elsewhere-7, train"), safeio.folder_lock(tmp_path):
            pass
    with held_by(f"pid 4242 on {socket.gethostname()}, screen"):  # this host: said as before
        assert safeio.in_use_by(tmp_path) == "pid 4242, screen"
    with held_by("pid 4242, train"):  # written by a version before the host was
        assert safeio.in_use_by(tmp_path) == "pid 4242, train"
    with held_by(f"pid {os.getpid()}, train"):  # (such a file with this pid: taken for this process, as before)
        assert safeio.in_use_by(tmp_path) is None


def test_a_checkpoint_swap_goes_on_while_a_file_of_an_earlier_one_is_open_on_nfs(tmp_path, monkeypatch):
    """On NFS a file removed while a process has it open (a notebook that loaded last/) stays as .nfsXXXX until it is
    closed, so .last.old could not be removed, and every later checkpoint stopped the training with 'OSError: [Errno
    39] Directory not empty: last -> .last.old'. The stuck copy is moved aside and removed once it can be; a kill in
    the middle of a swap still puts back the newest copy, never the stale one."""
    last = tmp_path / "last"
    _save(last, 1)
    held = {_inode(last / "state")}  # the notebook's open file
    unlink = os.unlink

    def nfs_unlink(path, *, dir_fd=None):  # noqa: ANN001, ANN202 - the NFS client's 'silly rename'
        if _inode(path, dir_fd) in held:
            name = f".nfs{os.urandom(8).hex()}"
            os.rename(path, name if dir_fd is not None else Path(path).with_name(name),
                      src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "unlink", nfs_unlink)
    for step in (2, 3, 4):
        _save(last, step)
    assert (last / "state").read_text() == "4"
    aside = [p for p in tmp_path.iterdir() if p.name != "last"]
    assert len(aside) == 1 and aside[0].name.startswith(".last.old-"), aside  # the open file's copy, set aside
    # a kill between the two renames of the next swap: .last.old is the newest copy; one set aside is never put back
    (aside[0] / "state").write_text("1")
    last.rename(tmp_path / ".last.old")
    assert (safeio.recover_folder(last) / "state").read_text() == "4"
    held.clear()  # the notebook closes its file: the next swap removes what was set aside
    _save(last, 5)
    assert (last / "state").read_text() == "5"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def _windows_open(monkeypatch, held: set) -> None:  # noqa: ANN001
    """Windows' answer for a file this process holds open: it cannot be removed, nor a folder holding it moved."""
    replace, unlink = os.replace, os.unlink

    def refuse(path: Path) -> None:
        inside = [path, *path.rglob("*")] if path.is_dir() else [path]
        if any(_inode(p) in held for p in inside):
            raise PermissionError(13, "The process cannot access the file because it is being used by another "
                                      "process", str(path))

    def win_replace(src, dst, **kw):  # noqa: ANN001, ANN202
        refuse(Path(src))
        return replace(src, dst, **kw)

    def win_unlink(path, *, dir_fd=None):  # noqa: ANN001, ANN202
        if _inode(path, dir_fd) in held:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        unlink(path, dir_fd=dir_fd)

    monkeypatch.setattr(os, "replace", win_replace)
    monkeypatch.setattr(os, "unlink", win_unlink)


def test_a_checkpoint_that_cannot_be_moved_for_an_open_file_says_why_and_keeps_the_last_copy(tmp_path, monkeypatch):
    """Windows cannot move a folder holding an open file (a notebook that loaded last/): the swap stops with what
    holds it and the fix, not a raw PermissionError, and the last complete checkpoint stays as it was."""
    last = tmp_path / "last"
    _save(last, 1)
    held = {_inode(last / "state")}
    _windows_open(monkeypatch, held)
    with pytest.raises(OutputError, match=r"'.*last': it cannot be moved aside \(The process cannot access.*still "
                                          r"open in another program.*Close it there.*still holds its last complete"):
        _save(last, 2)
    assert (last / "state").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no half-built checkpoint left
    # an earlier copy stuck under .last.old (a file in it opened after the swap) is named the same way
    held.clear()
    _save(last, 2)
    (tmp_path / ".last.old").mkdir()
    (tmp_path / ".last.old" / "state").write_text("1")
    held.add(_inode(tmp_path / ".last.old" / "state"))
    with pytest.raises(OutputError, match=r"its previous copy '.*\.last\.old' can be neither removed nor moved aside"):
        _save(last, 3)
    assert (last / "state").read_text() == "2"
    held.clear()
    _save(last, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_swap_failing_for_another_reason_is_named_as_it_is(tmp_path, monkeypatch):
    """Only a refusal (PermissionError, Windows' open file) gets the open-file advice; a stale NFS handle read
    'Windows cannot move ... del the model, or restart the kernel'."""
    import errno

    last = tmp_path / "last"
    _save(last, 1)
    real = os.replace

    def stale(src, dst, **kw):  # noqa: ANN001, ANN202
        if Path(src) == last:
            raise OSError(errno.ESTALE, os.strerror(errno.ESTALE), str(src))
        return real(src, dst, **kw)

    monkeypatch.setattr(os, "replace", stale)
    with pytest.raises(OutputError, match="it cannot be moved aside") as err:
        _save(last, 2)
    assert "Windows" not in str(err.value) and "still holds its last complete copy" in str(err.value)
    assert (last / "state").read_text() == "1"


def test_a_checkpoint_saved_on_a_gpu_resumes_on_a_cpu(tmp_path, monkeypatch):
    """trainer_state.pt from a GPU run holds tensors tagged for cuda:0; loading it without CUDA failed, and the error
    said the checkpoint 'was not written by a complete save. Use --restart' (throwing away the GPU's training). It is
    read onto the CPU; the weights and the optimizer's moments come back on the module's device and training goes
    on."""
    import torch
    import torch.serialization

    from virtualcell.training import checkpoint

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    last = tmp_path / "last"
    with monkeypatch.context() as gpu:  # what torch.save records for tensors on a GPU
        gpu.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        checkpoint.save(last, lambda folder: None, run_config={"data_hash": "abc"},
                        state={"model": net.state_dict(), "optimizer": opt.state_dict(), "step": 1, "history": [],
                               "pretrain_end": None, "best": None})
    fresh = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    state, _ = checkpoint.resume(last, data_hash="abc", module=fresh, optimizer=opt2, extras=[], keep_best=False)
    assert state.step == 1
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), fresh.state_dict().values()))
    moments = [s["exp_avg"] for s in opt2.state.values()]
    assert len(moments) == 2 and all(m.device == p.device for m, p in zip(moments, fresh.parameters()))
    fresh(torch.randn(4, 3)).sum().backward()
    opt2.step()  # training goes on
