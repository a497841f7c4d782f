"""Safe output: atomic files and folders, folders that are ours, and a lock per folder.

Every file virtualcell writes goes through here, so that a kill at any moment leaves
either the old complete file or the new complete one, never a partial one:

* :func:`atomic_path` / :func:`atomic_write` / :func:`write_text` — write into a
  temporary file in the same folder, ``fsync`` it, then ``os.replace`` it over the target
  (an atomic rename on one filesystem) and ``fsync`` the folder.
* :func:`atomic_folder` — build a whole folder beside the target, then swap it in; the
  previous folder stays complete until the new one is. :func:`recover_folder` puts the
  previous folder back if a kill fell between the two renames of the swap. A previous copy
  that cannot be removed yet (a file in it still open: NFS keeps such a file as
  ``.nfsXXXX``) is moved aside to ``.NAME.old-*`` and removed by a later swap.
* :func:`claim_folder` — an output folder is one of ours or empty: a marker file
  (``.virtualcell``) says that virtualcell wrote it; a non-empty folder without one is
  refused unless ``force=True`` (``--force`` on the command line).
  :func:`check_output_folder` says so without writing anything, for a command to call
  before its work.
* :func:`folder_lock` — an exclusive lock (``.virtualcell.lock``, ``fcntl.flock``) for a
  folder in use: a second run into the same folder stops with :class:`FolderInUseError`,
  naming the holder's pid (and its host, where that is another machine).
* :func:`output_folder` — both, as a command uses its ``--out``: refuse a user's folder
  (before writing anything into it), lock, mark.
* :func:`file_lock` — the same lock for one output file (``.NAME.lock`` beside it).
* :func:`writing` / :func:`reading` — a model folder written file by file (:meth:`C2SModel.save
  <virtualcell.model.C2SModel.save>`) is read whole or not at all: the writer holds an exclusive lock
  (``.virtualcell.save.lock``) while it writes, a reader a shared one while it reads. ``folder_lock``,
  which a training holds for hours, is another lock: the previous model stays readable meanwhile.
* :func:`in_use_by` / :func:`check_not_in_use` — whether a run holds a folder's lock, asked without
  taking it or writing anything (a command checks its ``--out`` before loading a model).
* :func:`check_output_file` — an output *file* path (``predict --out``): not a folder,
  its folder writable, not a user's file, checked before any work is done.

A lock file is locked, then checked to be still the file its path names (a holder that removes its
lock file on release, as :func:`file_lock` does, may do so between another's open and its lock); on a
filesystem without locks (``ENOLCK``: some network mounts), and where ``fcntl`` does not exist (Windows), a run
goes on unlocked, saying so.

Examples
--------
>>> import tempfile, pathlib
>>> from virtualcell import safeio
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> safeio.write_text(d / "a.txt", "hello\\n")
>>> (d / "a.txt").read_text()
'hello\\n'
>>> out = d / "results"
>>> with safeio.folder_lock(out, what="screen"):
...     safeio.claim_folder(out, kind="screen") == out
True
>>> safeio.claim_folder(d, kind="screen")  # doctest: +ELLIPSIS
Traceback (most recent call last):
...
virtualcell.errors.OutputError: --out '...' is not empty and was not written by virtualcell (it holds a.txt, results); ...
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from .errors import FolderInUseError, OutputError

__all__ = [
    "MARKER", "LOCK", "atomic_path", "atomic_write", "write_text", "write_bytes", "atomic_folder", "recover_folder",
    "claim_folder", "check_output_folder", "folder_lock", "file_lock", "output_folder", "check_output_file", "is_ours",
    "h5ad_is_ours", "SAVE_LOCK", "writing", "reading", "in_use_by", "check_not_in_use",
]

log = logging.getLogger(__name__)

MARKER = ".virtualcell"  # JSON: {"written_by": "virtualcell", "kind": ...}
LOCK = ".virtualcell.lock"
SAVE_LOCK = ".virtualcell.save.lock"  # held while a model folder is written (exclusive) or read (shared); see writing()
_IGNORED = {MARKER, LOCK, SAVE_LOCK, ".DS_Store"}


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _usual_mode(tmp: Path, target: Path, *, folder: bool = False) -> None:
    """Give ``tmp`` the permissions of what it replaces, or those a new file or folder gets (umask)."""
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        mask = os.umask(0)
        os.umask(mask)
        mode = (0o777 if folder else 0o666) & ~mask
    with contextlib.suppress(OSError):
        os.chmod(tmp, mode)


def usual_mode(path: str | os.PathLike[str]) -> None:
    """Give a file another library wrote privately (``save_pretrained`` writes ``model.safetensors`` 0600) the
    permissions a new file gets (the umask's), as every other file of a checkpoint has: a model folder shared with
    a lab group is then readable by it."""
    mask = os.umask(0)
    os.umask(mask)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666 & ~mask)


def _unwritable(path: Path, err: OSError) -> OutputError:
    blocked = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:  # a file where a folder must go (--out afile): say that, not "File exists"
        return OutputError(f"Cannot write {str(path)!r}: {str(blocked)!r} is a file, not a folder. Choose another "
                           "--out, or move that file.")
    return OutputError(
        f"Cannot write {str(path)!r} ({err.strerror or err}). Choose an --out in a folder you can write to."
    )


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """A temporary path beside ``path``; on success it replaces ``path`` atomically.

    For writers that want a file name (``to_netcdf``, ``savefig``, ``write_h5ad``). The
    temporary name keeps the suffix, so writers that look at it pick the same format.
    If the block raises, the temporary file is removed and ``path`` is untouched.

    Examples
    --------
    >>> import tempfile, pathlib, numpy as np
    >>> from virtualcell.safeio import atomic_path
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "x.npy"
    >>> with atomic_path(target) as tmp:
    ...     np.save(tmp, np.arange(3))
    >>> np.load(target).tolist()
    [0, 1, 2]
    """
    path = Path(path)
    folder = path.parent
    if path.is_dir():  # (os.replace failed naming the temporary file)
        raise OutputError(f"{str(path)!r} is a folder; give the name of a file to write (e.g. "
                          f"{str(path / ('out' + (path.suffix or '.h5ad')))!r}).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{path.stem}.", suffix=f".partial{path.suffix}")
    except OSError as err:
        raise _unwritable(path, err) from None
    os.close(fd)
    tmp = Path(name)
    try:
        _usual_mode(tmp, path)  # mkstemp makes the file private; an output keeps the usual permissions
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike[str], mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temporary file beside ``path`` for writing; on success it replaces ``path``.

    ``mode`` is ``"w"`` (text, UTF-8 by default) or ``"wb"``; ``kwargs`` go to :func:`open`.
    """
    if mode not in {"w", "wb"}:
        raise ValueError(f"atomic_write writes whole files: mode 'w' or 'wb', not {mode!r}.")
    if mode == "w":
        kwargs.setdefault("encoding", "utf-8")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as fh:
        yield fh
        fh.flush()


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_write(path, "w") as fh:
        fh.write(text)


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_write(path, "wb") as fh:
        fh.write(data)


# --------------------------------------------------------------------------- #
# Folders
# --------------------------------------------------------------------------- #
def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _beside(path: Path, prefix: str) -> list[Path]:
    """The entries beside ``path`` whose names start with ``.NAME`` + ``prefix`` (no glob: a name may hold ``[``)."""
    start = f".{path.name}{prefix}"
    try:
        return [p for p in path.parent.iterdir() if p.name.startswith(start)]
    except OSError:
        return []


def _held_open(path: Path, stuck: Path, err: OSError) -> OutputError:
    """The error for a swap of ``path`` that cannot move ``stuck`` (``path`` itself, or its previous copy) aside: a
    refusal (Windows, a file inside still open) says that and how to close it; any other error (a stale NFS handle, a
    busy mount) is named as it is."""
    what = ("it cannot be moved aside" if stuck == path
            else f"its previous copy {str(stuck)!r} can be neither removed nor moved aside")
    if isinstance(err, PermissionError):
        why = ("A file inside it is most likely still open in another program or process (a notebook or Python "
               "session that loaded the model from it, a file viewer): Windows cannot move or remove a folder holding "
               "an open file. Close it there (in Python: del the model, or restart the kernel) and run again")
    else:
        why = "Check the folder's filesystem (a network mount may have failed for a moment) and run again"
    return OutputError(
        f"Cannot replace {str(path)!r}: {what} ({err.strerror or err}). {why}; {str(path)!r} still holds its last "
        "complete copy (a training run again resumes from it)."
    )


def _clear_old(path: Path) -> None:
    """Free the name ``.NAME.old`` for the next swap of ``path``: remove the previous copy there, or, where that
    leaves something (a file in it still open: NFS keeps such a file as ``.nfsXXXX`` until it is closed, and Windows
    refuses), move it aside to a name of its own, ``.NAME.old-*``, which a later swap removes. Only a copy no longer
    needed is here: ``path`` is complete. Raises :class:`OutputError` where it cannot be moved either."""
    old = _old(path)
    if not os.path.lexists(old):
        return
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(old):
        try:
            os.replace(old, path.with_name(f"{old.name}-{os.urandom(6).hex()}"))
        except OSError as err:
            raise _held_open(path, old, err) from None


def recover_folder(path: str | os.PathLike[str]) -> Path:
    """Finish or undo an interrupted :func:`atomic_folder` swap of ``path``; returns ``path``.

    A kill between the two renames of a swap leaves ``path`` missing and the previous
    folder under ``.NAME.old``: it is put back. A leftover ``.NAME.old`` beside a
    complete ``path``, and unfinished ``.NAME.new-*`` builds, are removed. Older copies moved
    aside to ``.NAME.old-*`` (where ``.NAME.old`` could not be removed) are never put back, as
    ``.NAME.old`` is always the newest previous copy; they are removed once ``path`` is complete
    and they can be (a file in one still open stays until it is closed).
    """
    path = Path(path)
    old = _old(path)
    if os.path.lexists(old) and not path.exists():
        os.replace(old, path)
        log.warning("restored %s from the previous complete copy (a save was interrupted)", path)
    if path.exists():
        with contextlib.suppress(OutputError):  # (one that cannot go yet is moved aside by the next swap)
            _clear_old(path)
        for aside in _beside(path, ".old-"):
            shutil.rmtree(aside, ignore_errors=True)
    for partial in _beside(path, ".new-"):
        shutil.rmtree(partial, ignore_errors=True)
    return path


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Build a folder in a temporary place, then swap it in for ``path``.

    The previous ``path`` stays complete until the new one is: a kill while the block
    runs leaves the old folder as it was, and a kill during the swap is undone by
    :func:`recover_folder` (called here first, and by readers that want to be sure).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from virtualcell.safeio import atomic_folder
    >>> last = pathlib.Path(tempfile.mkdtemp()) / "last"
    >>> with atomic_folder(last) as tmp:
    ...     _ = (tmp / "state.txt").write_text("step 200")
    >>> (last / "state.txt").read_text()
    'step 200'
    """
    path = Path(path)
    recover_folder(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.new-"))
    except OSError as err:
        raise _unwritable(path, err) from None
    _usual_mode(tmp, path, folder=True)
    try:
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists():
            _clear_old(path)
            try:
                os.replace(path, _old(path))
            except OSError as err:
                raise _held_open(path, path, err) from None
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(_old(path), ignore_errors=True)  # (what cannot go yet is moved aside by the next swap)


# --------------------------------------------------------------------------- #
# Ownership and locking
# --------------------------------------------------------------------------- #
def is_ours(folder: str | os.PathLike[str], *, legacy: Sequence[str] = ()) -> bool:
    """Whether virtualcell wrote ``folder``: it holds the marker (or one of the ``legacy`` names,
    which folders written before the marker existed hold)."""
    folder = Path(folder)
    return (folder / MARKER).is_file() or any((folder / name).exists() for name in legacy)


def check_output_folder(folder: str | os.PathLike[str], *, kind: str, force: bool = False,
                        legacy: Sequence[str] = ()) -> Path:
    """Refuse, before any work and without writing anything, an ``--out`` folder that :func:`claim_folder` would
    refuse: a file, a user's folder that is not empty, another command's results, a place that cannot be written.
    Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--out {str(folder)!r} is a file, not a folder. Choose a folder name.")
    if folder.is_symlink() and not folder.exists():
        raise OutputError(f"--out {str(folder)!r} is a link to a missing folder ({os.readlink(folder)!r}). Create "
                          "that folder, or choose another --out.")
    if not folder.exists():
        probe = next((p for p in folder.parents if p.exists()), Path("."))
        if not probe.is_dir():
            raise _unwritable(folder, OSError("a file is in the way"))
        if not os.access(probe, os.W_OK | os.X_OK):
            raise _unwritable(folder, PermissionError(13, "Permission denied"))
        return folder
    if not os.access(folder, os.W_OK | os.X_OK):
        raise _unwritable(folder, PermissionError(13, "Permission denied"))
    try:
        contents = [p.name for p in folder.iterdir() if p.name not in _IGNORED]
    except OSError as err:  # (an OutputError, which every process of a launch is told of, not a bare one)
        raise _unwritable(folder, err) from None
    if contents and not is_ours(folder, legacy=legacy) and not force:
        raise OutputError(
            f"--out {str(folder)!r} is not empty and was not written by virtualcell (it holds "
            f"{', '.join(sorted(contents)[:5])}{' …' if len(contents) > 5 else ''}); refusing to overwrite it. "
            "Choose another folder, or pass --force (force=True in Python) to write into it anyway."
        )
    marker = folder / MARKER
    if marker.is_file():
        try:
            old_kind = json.loads(marker.read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            old_kind = None
        if old_kind not in (None, kind) and not force:
            raise OutputError(
                f"--out {str(folder)!r} holds virtualcell {old_kind} results, not {kind} results. "
                "Choose another folder, or pass --force (force=True in Python) to write into it anyway."
            )
    return folder


def claim_folder(folder: str | os.PathLike[str], *, kind: str, force: bool = False,
                 legacy: Sequence[str] = ()) -> Path:
    """Make ``folder`` an output folder of ``kind`` (``"screen"``, ``"train"``, ``"evaluate"``…).

    A missing or empty folder is created and marked. A folder that holds the marker (or
    a ``legacy`` name) is ours: it is reused. Anything else is a user's folder, and is
    refused with :class:`~virtualcell.errors.OutputError` unless ``force`` is true.
    Returns the folder.
    """
    folder = check_output_folder(folder, kind=kind, force=force, legacy=legacy)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise _unwritable(folder, err) from None
    marker = folder / MARKER
    if not marker.is_file() or force:
        try:
            write_text(marker, json.dumps({"written_by": "virtualcell", "kind": kind}) + "\n")
        except OutputError:
            raise
        except OSError as err:
            raise _unwritable(marker, err) from None
    return folder


# flock's answers for a lock another process holds; any other error means the filesystem cannot lock (ENOLCK,
# EOPNOTSUPP, ENOSYS: Lustre without -o flock, some CIFS and FUSE mounts), which no wait will change
_BUSY = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES})


def _fcntl() -> Any:
    """The ``fcntl`` module, or ``None`` where it does not exist (Windows: locks are not taken)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    return fcntl


def _same_file(fh: IO[Any], path: Path) -> bool:
    """Whether ``path`` still names the file ``fh`` has open (not removed, nor replaced by another)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    own = os.fstat(fh.fileno())
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def _host() -> str:
    try:
        return socket.gethostname()
    except OSError:  # pragma: no cover
        return ""


def _signature(what: str) -> str:
    """What a lock's holder writes into its lock file: its pid and host, and what it does (``pid 123 on node7,
    train``). The host, as a lock on a shared filesystem may be held from another machine, where that pid is another
    process's."""
    host = _host()
    return f"pid {os.getpid()}{f' on {host}' if host else ''}, {what}"


# a lock file's text: "pid 123 on node7, train"; "pid 123, train" from a version before the host was written
_SIGNATURE = re.compile(r"pid (\d+)(?: on (\S+?))?, (.*)", re.DOTALL)


def _shown(text: str) -> str:
    """A lock file's text as a message shows it: the host said only where it is another machine than this one."""
    m = _SIGNATURE.fullmatch(text)
    return f"pid {m[1]}, {m[3]}" if m and m[2] == _host() else text


def _is_this_process(text: str) -> bool:
    """Whether a lock file's text names this process (its pid, on this host; a text without a host: its pid)."""
    m = _SIGNATURE.fullmatch(text)
    return m is not None and int(m[1]) == os.getpid() and m[2] in (None, _host())


def _holder(fh: IO[Any]) -> str:
    """What the holder of a lock wrote into its lock file (``pid 123 on node7, train``)."""
    with contextlib.suppress(OSError, ValueError):
        fh.seek(0)
        return fh.read().strip() or "another process"
    return "another process"


class _Busy(Exception):
    """Another process holds the lock (``args[0]``: what its lock file says)."""


def _lock(lockfile: Path, *, shared: bool = False, wait: bool = False, readonly: bool = False,
          waiting: Callable[[str], None] | None = None) -> tuple[IO[Any] | None, OSError | None]:
    """Open ``lockfile`` and ``flock`` it, exclusive or ``shared``, waiting for it (``wait``, after calling
    ``waiting`` with what the holder's file says) or raising :class:`_Busy`. Returns ``(file, None)`` once it is
    locked and ``lockfile`` still names the file locked (else it is opened again: a holder that removes its lock
    file on release may do so between another process's open and its lock, and the two would each hold a lock of
    their own); ``(file, error)`` where the filesystem cannot lock (the file open, not locked); ``(None, None)``
    where a ``readonly`` caller cannot open it (no lock file in a folder it cannot write) or ``fcntl`` does not
    exist. Opening it otherwise raises ``OSError``."""
    fcntl = _fcntl()
    if fcntl is None:  # pragma: no cover - Windows
        return None, None
    while True:
        try:
            fh = open(lockfile, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        except OSError:
            if not readonly:
                raise
            try:  # (a folder the reader cannot write: the writer's lock file, where there is one)
                fh = open(lockfile)  # noqa: SIM115
            except OSError:
                return None, None
        op = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            try:
                fcntl.flock(fh.fileno(), op | fcntl.LOCK_NB)
            except OSError as err:
                if err.errno not in _BUSY:
                    return fh, err
                if not wait:
                    raise _Busy(_shown(_holder(fh))) from None
                if waiting is not None:
                    waiting(_shown(_holder(fh)))
                    waiting = None
                fcntl.flock(fh.fileno(), op)
        except BaseException:
            fh.close()
            raise
        if _same_file(fh, lockfile):
            return fh, None
        fh.close()


def _unlock(fh: IO[Any], lockfile: Path, *, remove: bool, shared: bool = False) -> None:
    """Release a lock :func:`_lock` took, removing its file where ``remove`` is true: while it is still held, and,
    for a ``shared`` holder, only where no other process holds it (an exclusive lock taken without waiting)."""
    try:
        if remove:
            fcntl = _fcntl()
            if shared and fcntl is not None:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    return  # another holds it, and removes it in its turn
            if _same_file(fh, lockfile):
                with contextlib.suppress(OSError):
                    lockfile.unlink()
    finally:
        fh.close()


def _in_use(where: Path, holder: str) -> FolderInUseError:
    return FolderInUseError(f"{str(where)!r} is in use by another virtualcell run ({holder}). Wait for it to finish, "
                            "or choose another --out.")


_said_no_fcntl = False


def _no_fcntl() -> None:
    """Say, once a process, that no lock is taken where ``fcntl`` does not exist (Windows): two runs into one folder
    are not kept apart there, so the user must."""
    global _said_no_fcntl
    if _said_no_fcntl:
        return
    _said_no_fcntl = True
    log.warning("virtualcell takes no file locks on this platform (Python has no fcntl here, as on Windows), so two "
                "runs writing into one output folder at once are not kept apart: each would overwrite the other's "
                "files. Start one run per --out folder at a time (a second run into a folder in use is not refused "
                "here), and load a model only once the run saving it has ended.")


def _no_locks(where: Path, what: str, err: OSError) -> None:
    """Say that ``where`` goes on without its lock: its filesystem cannot lock (``err``). Refusing would leave the
    command unusable on that filesystem, whose users often cannot remount it, for the rare case of two runs into
    one folder at once."""
    log.warning("%s cannot be locked (%s: its filesystem does not support file locks, as some network mounts do not), "
                "so this %s runs without the lock that keeps a second run out of it: start no other run into it until "
                "this one ends, or use a folder on a local disk.", where, err.strerror or err, what)


@contextlib.contextmanager
def _hold(lockfile: Path, where: Path, what: str, *, remove: bool = False) -> Iterator[None]:
    try:
        lockfile.parent.mkdir(parents=True, exist_ok=True)
        fh, unsupported = _lock(lockfile)
    except _Busy as busy:
        raise _in_use(where, busy.args[0]) from None
    except OSError as err:
        raise _unwritable(where, err) from None
    if fh is None:  # no fcntl (Windows): the block runs unlocked
        _no_fcntl()
        yield
        return
    if unsupported is not None:
        _no_locks(where, what, unsupported)
    else:
        fh.seek(0)
        fh.truncate()
        fh.write(_signature(what))
        fh.flush()
    try:
        yield
    finally:  # (removed while still held: a run that opened it meanwhile sees it gone once it locks, and opens anew)
        _unlock(fh, lockfile, remove=remove)


def in_use_by(folder: str | os.PathLike[str]) -> str | None:
    """Who holds :func:`folder_lock` on ``folder`` now, as its lock file says (``"pid 123, train"``; ``"pid 123 on
    node7, train"`` where the holder runs on another machine), or ``None`` where no other process does (nor where the
    folder has no lock file, or locks do not work there). Asked without taking the lock or writing anything."""
    fcntl = _fcntl()
    if fcntl is None:  # no fcntl (Windows): no lock is taken, and the holding run has said so
        return None
    try:
        fh = open(Path(folder) / LOCK)  # noqa: SIM115
    except OSError:
        return None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as err:
            holder = _holder(fh) if err.errno in _BUSY else None
            return None if holder is None or _is_this_process(holder) else _shown(holder)
    return None


def check_not_in_use(folder: str | os.PathLike[str]) -> None:
    """Refuse (:class:`FolderInUseError`) a ``folder`` whose lock another run holds, before the minutes of loading a
    model and data that :func:`output_folder` would refuse after; nothing is written."""
    holder = in_use_by(folder)
    if holder is not None:
        raise _in_use(Path(folder), holder)


@contextlib.contextmanager
def writing(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``FOLDER/.virtualcell.save.lock`` exclusively while the files of one whole (a model folder's weights,
    codec and verdict) are written into ``folder``: readers holding :func:`reading` are waited for, and wait in
    their turn, so none reads one save's weights beside another's codec. Not :func:`folder_lock`, which a training
    holds for its whole run; the lock file is removed afterwards. A folder whose filesystem cannot lock is written
    unlocked."""
    folder = Path(folder)
    lockfile = folder / SAVE_LOCK
    try:
        fh, unsupported = _lock(lockfile, wait=True, waiting=lambda holder: log.info(
            "%s is being read or written by another process (%s): waiting for it to finish", folder, holder))
    except OSError:  # (a folder that cannot be written: the save's own writes say so)
        fh, unsupported = None, None
    if fh is None:
        yield
        return
    if unsupported is None:
        fh.seek(0)
        fh.truncate()
        fh.write(_signature("saving"))
        fh.flush()
    else:
        log.info("%s cannot be locked while it is written (%s); a process reading it meanwhile may read a mix",
                 folder, unsupported.strerror or unsupported)
    try:
        yield
    finally:
        _unlock(fh, lockfile, remove=True)


@contextlib.contextmanager
def reading(folder: str | os.PathLike[str]) -> Iterator[None]:
    """Hold ``FOLDER/.virtualcell.save.lock`` shared while the files of a model folder are read: a save into it
    (:func:`writing`) is waited for, and waits in its turn; other readers read alongside. A folder this process
    cannot write (an installed model) and that holds no lock file is read unlocked, as is one whose filesystem
    cannot lock. The lock file is removed afterwards by the last holder."""
    folder = Path(folder)
    lockfile = folder / SAVE_LOCK
    fh, unsupported = _lock(lockfile, shared=True, wait=True, readonly=True, waiting=lambda holder: log.info(
        "%s is being written (%s): waiting for the save to finish before loading it", folder, holder))
    if fh is None:
        yield
        return
    try:
        yield
    finally:  # (where nothing locks, the file goes as the reader leaves)
        _unlock(fh, lockfile, remove=True, shared=unsupported is None)


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike[str], *, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` for the block; a second holder gets :class:`FolderInUseError`.

    The lock is ``fcntl.flock`` on ``FOLDER/.virtualcell.lock``: the operating system
    releases it when the process ends, killed or not, so a stale lock never blocks a
    rerun. Where ``fcntl`` does not exist (Windows) the block runs unlocked, with a warning
    (once a process) that the user must keep to one run per folder.
    """
    folder = Path(folder)
    with _hold(folder / LOCK, folder, what):
        yield folder


@contextlib.contextmanager
def file_lock(path: str | os.PathLike[str], *, what: str = "run") -> Iterator[Path]:
    """:func:`folder_lock` for one output file: the lock is ``.NAME.lock`` beside it, removed afterwards."""
    path = Path(path)
    with _hold(path.with_name(f".{path.name}.lock"), path, what, remove=True):
        yield path


def h5ad_is_ours(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is an ``.h5ad`` of predictions that virtualcell wrote: it carries their provenance
    (``uns['virtualcell']['model']``). ``uns['virtualcell']`` alone is not enough: a user's measured data saved from
    ``vc.datasets.load`` or ``split_controls`` carries it too (its contract), and ``predict --out real.h5ad``
    replaced 748 measured cells with 4 predicted ones."""
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "uns/virtualcell/model" in f
    except (OSError, ImportError):
        return False


@contextlib.contextmanager
def output_folder(folder: str | os.PathLike[str], *, kind: str, force: bool = False,
                  legacy: Sequence[str] = ()) -> Iterator[Path]:
    """:func:`claim_folder` and :func:`folder_lock` together: what a command does with its ``--out``.

    A user's folder is refused before anything is written into it (not even the lock).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> from virtualcell.safeio import output_folder
    >>> with output_folder(pathlib.Path(tempfile.mkdtemp()) / "screen", kind="screen") as out:
    ...     (out / ".virtualcell").exists()
    True
    """
    folder = check_output_folder(folder, kind=kind, force=force, legacy=legacy)
    with folder_lock(folder, what=kind):
        yield claim_folder(folder, kind=kind, force=force, legacy=legacy)


def check_output_file(path: str | os.PathLike[str], *, suffix: str | None = None, force: bool = False) -> Path:
    """Check, before any work, that ``path`` can be written as a file: not a folder, its folder writable,
    and (for ``.h5ad``) not a file of the user's that virtualcell did not write, unless ``force``."""
    raw = str(path)
    path = Path(path)
    if raw.endswith(("/", os.sep)) or path.is_dir():
        example = f" (e.g. {str(path / ('predictions' + (suffix or '')))!r})" if suffix else ""
        raise OutputError(f"--out {raw!r} is a folder; it must name a file{example}.")
    if suffix and path.suffix != suffix:
        raise OutputError(f"--out {raw!r} must end in {suffix} (e.g. {str(path.with_suffix(suffix))!r}).")
    folder = path.parent
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"Cannot write {raw!r}: {str(probe)!r} is not a folder you can write to. "
                          "Choose another --out.")
    if path.exists() and suffix == ".h5ad" and not force and not h5ad_is_ours(path):
        raise OutputError(f"--out {raw!r} exists and was not written by virtualcell; refusing to overwrite it. "
                          "Choose another file name, or pass --force to replace it.")
    return path
