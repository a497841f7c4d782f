"""Safe output: atomic files and folders, ownership, and the lock (virtualcell.safeio)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from virtualcell import safeio
from virtualcell.errors import FolderInUseError, OutputError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "ranking.csv"
    safeio.write_text(target, "old\n")
    with pytest.raises(RuntimeError), safeio.atomic_write(target) as fh:
        fh.write("half of the new")
        raise RuntimeError("killed")
    assert target.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ranking.csv"]


def test_outputs_keep_the_usual_permissions(tmp_path):
    import os

    mask = os.umask(0o022)
    try:
        safeio.write_text(tmp_path / "new.csv", "x")
        assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o644
        os.chmod(tmp_path / "new.csv", 0o640)
        safeio.write_text(tmp_path / "new.csv", "y")
        assert (tmp_path / "new.csv").stat().st_mode & 0o777 == 0o640
        with safeio.atomic_folder(tmp_path / "last") as tmp:
            (tmp / "state").write_text("1")
        assert (tmp_path / "last").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(mask)


def test_a_killed_writer_leaves_the_old_file(tmp_path):
    """SIGKILL in the middle of a write: the target is the old complete file."""
    target = tmp_path / "aggregates.bin"
    safeio.write_bytes(target, b"old" * 1000)
    code = textwrap.dedent(f"""
        import os, signal
        from virtualcell import safeio
        with safeio.atomic_write({str(target)!r}, "wb") as fh:
            fh.write(b"new" * 500)
            fh.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    assert target.read_bytes() == b"old" * 1000


def test_atomic_folder_keeps_the_previous_folder_until_the_new_one_is_complete(tmp_path):
    last = tmp_path / "last"
    with safeio.atomic_folder(last) as tmp:
        (tmp / "trainer_state.pt").write_bytes(b"step 200")
    with pytest.raises(RuntimeError), safeio.atomic_folder(last) as tmp:
        (tmp / "trainer_state.pt").write_bytes(b"")  # a save cut short
        raise RuntimeError("killed")
    assert (last / "trainer_state.pt").read_bytes() == b"step 200"
    # a kill between the two renames of the swap: the previous folder is put back
    last.rename(tmp_path / ".last.old")
    safeio.recover_folder(last)
    assert (last / "trainer_state.pt").read_bytes() == b"step 200"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_user_folder_is_refused_unless_forced(tmp_path):
    (tmp_path / "summary.md").write_text("my notes")
    with pytest.raises(OutputError, match="not written by virtualcell.*--force"):
        safeio.claim_folder(tmp_path, kind="evaluate")
    safeio.claim_folder(tmp_path, kind="evaluate", force=True)
    safeio.claim_folder(tmp_path, kind="evaluate")  # now it is ours
    with pytest.raises(OutputError, match="holds virtualcell evaluate results, not screen results"):
        safeio.claim_folder(tmp_path, kind="screen")
    assert (tmp_path / "summary.md").read_text() == "my notes"
    empty = tmp_path / "new"
    assert safeio.claim_folder(empty, kind="screen") == empty and safeio.is_ours(empty)


def test_the_early_check_of_an_out_folder_refuses_what_the_claim_would(tmp_path):
    """check_output_folder (called before a command's work) passed a link to a missing folder, which the claim then
    refused as 'File exists' after the work."""
    link = tmp_path / "results"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(OutputError, match="is a link to a missing folder"):
        safeio.check_output_folder(link, kind="screen")
    (tmp_path / "gone").mkdir()
    assert safeio.check_output_folder(link, kind="screen") == link  # the folder exists now: it is fine
    assert safeio.claim_folder(link, kind="screen") == link


def test_a_folder_locked_by_another_process_is_refused(tmp_path):
    code = textwrap.dedent(f"""
        import sys, time
        from virtualcell import safeio
        with safeio.folder_lock({str(tmp_path)!r}, what="screen"):
            print("locked", flush=True)
            sys.stdin.read()
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUseError, match=rf"in use by another virtualcell run \(pid {holder.pid}, screen\)"):
            with safeio.folder_lock(tmp_path):
                pass
    finally:
        holder.communicate("")
    with safeio.folder_lock(tmp_path):  # released when the holder ends
        pass


def test_file_lock_is_removed_after_use(tmp_path):
    out = tmp_path / "pred.h5ad"
    with safeio.file_lock(out):
        with pytest.raises(FolderInUseError), safeio.file_lock(out):
            pass
        assert (tmp_path / ".pred.h5ad.lock").exists()
    assert list(tmp_path.iterdir()) == []


def test_a_saved_model_s_weights_are_as_readable_as_its_other_files(tiny_model):
    """save_pretrained wrote model.safetensors 0600 beside 0644 files: a model folder shared with a lab group could
    not be loaded by the others."""
    _, out, _ = tiny_model
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir() if f.is_file()}
    assert modes["model.safetensors"] == modes["config.json"] == modes["virtualcell.json"], modes


def test_training_from_python_refuses_a_user_s_folder_as_the_cli_does(papalexi_small, tmp_path):
    """vc.fit / train() wrote over a lab's own config.json in a folder virtualcell never wrote (only the CLI
    guarded its --out); now the Python API claims and locks the folder too, and force=True goes on."""
    import json

    import virtualcell as vc
    from virtualcell.errors import OutputError

    (tmp_path / "config.json").write_text(json.dumps({"my": "lab config"}))
    cfg = vc.TrainConfig(top_k=20, hidden_size=16, n_layers=1, n_heads=2, max_steps=2, warmup_steps=1, batch_size=4,
                         verdict_fraction=0.0)
    with pytest.raises(OutputError):
        vc.fit(papalexi_small[:300].copy(), out=tmp_path, config=cfg, progress=False)
    assert json.loads((tmp_path / "config.json").read_text()) == {"my": "lab config"}
