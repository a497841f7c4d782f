"""What the command line writes, and what it leaves behind in the process that called it: any text on a stream whose
encoding lacks a character, a pipe whose reader leaves (Windows' way too), the caller's logging as it was, and no
file left open."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import sys
from pathlib import Path

import pytest

import virtualcell.cli as cli
from virtualcell.cli import main


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory):
    """Eight control cells of the tiny model's data."""
    _, _, data = tiny_model
    path = tmp_path_factory.mktemp("cli_output") / "base.h5ad"
    data[data.obs.perturbation == "control"][:8].copy().write_h5ad(path)
    return path


def _open_files(part: str) -> list[str]:
    """The files this process holds open whose path holds ``part`` (Linux's /proc/self/fd)."""
    fds = Path("/proc/self/fd")
    if not fds.is_dir():
        pytest.skip("no /proc/self/fd to list this process's open files")
    held = []
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if part in (target := os.readlink(fd)):
                held.append(target)
    return held


@pytest.mark.parametrize("encoding", ["latin-1", "ascii"])
def test_a_stream_that_cannot_encode_the_text_gets_its_escapes_and_the_work_is_done(
        tiny_model, base, tmp_path, monkeypatch, encoding):
    """A Latin-1 locale, or a C one (ASCII), or a Windows pipe (cp1252, and a cytokine 'IFN-β'): info's ellipsis
    and the verdict's dash raised UnicodeEncodeError, exit 1, and predict stopped before writing anything. The
    stream is as it was afterwards."""
    _, model, _ = tiny_model
    raw = io.BytesIO()
    out = io.TextIOWrapper(raw, encoding=encoding, errors="strict")  # what PYTHONIOENCODING=<encoding> gives
    monkeypatch.setattr(sys, "stdout", out)
    assert main(["info", "--model", str(model)]) == 0
    assert main(["predict", "-q", "--model", str(model), "--data", str(base), "--perturbations", "STAT1",
                 "--out", str(tmp_path / "p.h5ad")]) == 0
    assert (tmp_path / "p.h5ad").is_file()
    assert out.errors == "strict"  # (main() called from Python: the caller's stream as it was)
    out.flush()
    said = raw.getvalue().decode(encoding)
    assert "\\u2026" in said and "\\u2014" in said  # the ellipsis of info and the verdict's dash, as escapes
    assert "wrote " in said


@pytest.mark.parametrize("encoding", ["cp1252", "latin-1"])
def test_the_command_lines_own_stdout_takes_any_text(encoding):
    """The same through the interpreter's own standard output (PYTHONIOENCODING: a Windows pipe, a Latin-1 locale),
    a command's text holding a cytokine's Greek letter: it ended in a raw UnicodeEncodeError, exit 1."""
    import subprocess

    said = "IFN-\u03b2 \u2014 \u2026"  # (the command is stood in for: the interpreter starts in well under a second)
    code = ("import virtualcell.cli as cli\n"
            f"cli.cmd_info = lambda args: print({said!r}) or 0\n"
            "raise SystemExit(cli.main(['info', '--model', 'bundled']))")
    env = {**os.environ, "PYTHONIOENCODING": encoding, "PYTHONPATH": str(Path(cli.__file__).parents[1])}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, env=env, timeout=60)
    assert run.returncode == 0, run.stderr.decode(errors="replace")
    assert run.stdout.decode(encoding).strip() == said.encode(encoding, "backslashreplace").decode(encoding)


def test_the_log_lines_are_the_commands_and_the_callers_logging_is_as_it_was(monkeypatch, capsys):
    """main() from Python with no logging set up: basicConfig left a handler on the root logger and the root at the
    command's level (every library's INFO then printed in the caller's process)."""
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [])  # (pytest's own handlers are set aside: a caller that set up nothing)
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(cli, "cmd_info", lambda args: logging.getLogger("virtualcell.cli").info("said at -v") or 0)
    assert main(["info", "--model", "bundled", "-v"]) == 0
    assert "INFO virtualcell.cli: said at -v" in capsys.readouterr().err.splitlines()  # the shell's form
    assert root.handlers == [] and root.level == logging.WARNING
    assert logging.getLogger("virtualcell").level == logging.NOTSET


def test_verbose_works_where_the_caller_set_logging_up_first(monkeypatch):
    """With the caller's handler on the root logger (logging.basicConfig(), a notebook's), basicConfig did nothing
    and -v and -vv said nothing more; the lines now go to the caller's handlers, and only while the command runs."""

    class Kept(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            said.append(record.getMessage())

    said: list[str] = []
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [Kept()])  # logging.basicConfig(level=logging.WARNING), say
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(cli, "cmd_info", lambda args: logging.getLogger("virtualcell.cli").info("said at -v") or 0)
    assert main(["info", "--model", "bundled"]) == 0
    assert said == []
    assert main(["info", "--model", "bundled", "-v"]) == 0
    assert said == ["said at -v"]
    assert len(root.handlers) == 1 and root.level == logging.WARNING
    assert logging.getLogger("virtualcell").level == logging.NOTSET
    logging.getLogger("virtualcell.cli").info("after the command")
    assert said == ["said at -v"]


def test_a_pipe_whose_reader_left_on_windows_does_not_stop_the_work(tmp_path):
    """Windows raises OSError EINVAL, not BrokenPipeError, writing to a pipe whose reader has gone: the reader
    leaving, on a pipe; on a file it is an error, and raises."""

    class Left(io.TextIOBase):
        def __init__(self, fd: int) -> None:
            self.fd = fd

        def fileno(self) -> int:
            return self.fd

        def write(self, text: str) -> int:
            raise OSError(errno.EINVAL, "Invalid argument")

        def flush(self) -> None:
            raise OSError(errno.EINVAL, "Invalid argument")

    read, write = os.pipe()
    try:
        out = cli._ReaderMayLeave(Left(write))
        assert out.write("the verdict\n") == len("the verdict\n")  # the work goes on
        out.write("more\n")
        out.flush()
    finally:
        os.close(read)
        os.close(write)
    with open(tmp_path / "log.txt", "w") as f:
        with pytest.raises(OSError, match="Invalid argument"):
            cli._ReaderMayLeave(Left(f.fileno())).write("x")


def test_closing_stored_cells_closes_their_file_and_the_path_takes_another_run(tiny_model, base, tmp_path):
    """res.cells.close() left the netCDF file open (the DataArray did not carry its Dataset's close): on Windows a
    second simulate(store=) to the same path failed replacing it."""
    import anndata as ad

    import virtualcell as vc

    model, _, _ = tiny_model
    sim = vc.Simulator(ad.read_h5ad(base), model)
    store = tmp_path / "cells.nc"
    first = sim.simulate(["STAT1"], seed=0, store=store, progress=False)
    assert _open_files(str(store))
    first.cells.close()
    assert _open_files(str(store)) == []
    second = sim.simulate(["STAT1", "ko:JAK2"], seed=0, store=store, progress=False)
    assert list(second.cells.perturbation.values)[-2:] == ["ko:STAT1", "ko:JAK2"]  # the second run's file
    assert second.cells.isel(perturbation=-1).values.shape == (8, len(model.genes))
    second.cells.close()
    assert _open_files(str(store)) == []
    # the first result, closed, read again: its own file is gone (it read the second run's cells under its labels)
    with pytest.raises(vc.errors.OutputError, match="replaced .another simulate.store=. to the same path"):
        first.cells.values
    assert second.cells.isel(perturbation=-1).values.shape == (8, len(model.genes))  # a read after close: its own


def test_predict_closes_its_streamed_cells_before_their_folder_goes(tiny_model, base, tmp_path, monkeypatch):
    """predict streaming through TMP/cells.nc held the file open as its temporary folder was removed (on Windows the
    cleanup failed; on Linux the file closed only as the result was dropped)."""
    import tempfile

    _, model, _ = tiny_model
    held = []
    cleanup = tempfile.TemporaryDirectory.cleanup

    def seen(self) -> None:  # noqa: ANN001
        held.extend(_open_files(self.name))
        cleanup(self)

    monkeypatch.setattr(tempfile.TemporaryDirectory, "cleanup", seen)
    out = tmp_path / "p.h5ad"
    assert main(["predict", "-q", "--model", str(model), "--data", str(base), "--perturbations", "STAT1",
                 "--max-in-memory", "0", "--out", str(out)]) == 0
    assert out.is_file()
    assert held == []
    assert list(tmp_path.glob(".vc-predict-*")) == []
