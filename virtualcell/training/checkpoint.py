"""Resumable training checkpoints that a kill cannot corrupt.

A checkpoint is a folder (the model folder plus ``trainer_state.pt`` and
``run_config.json``). It is written whole into a temporary sibling folder, then put in
place by renames: the previous good checkpoint is kept as ``.<name>.previous`` until the
new one is complete. A kill at any moment leaves a complete checkpoint under one of the
two names, and :func:`load` tries them in that order, so a resume never trusts a partial
one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TrainingError

__all__ = ["save", "load", "STATE_FILE", "CONFIG_FILE"]

log = logging.getLogger(__name__)

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"


def _previous(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.previous")


def _fsync_tree(folder: Path) -> None:
    for f in folder.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(folder: str | Path, write: Callable[[Path], None], *, state: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Write a checkpoint atomically.

    ``write(tmp)`` writes the model files into ``tmp``; the trainer state (``state``: model
    and optimizer state dicts, step, history) and the run config go beside them.
    """
    import torch

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    for stale in folder.parent.glob(f".{folder.name}.writing-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f".{folder.name}.writing-{os.getpid()}")
    tmp.mkdir()
    write(tmp)
    (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1))
    torch.save(state, tmp / STATE_FILE)
    _fsync_tree(tmp)
    previous = _previous(folder)
    if previous.exists():
        shutil.rmtree(previous)
    if folder.exists():
        os.replace(folder, previous)
    os.replace(tmp, folder)
    shutil.rmtree(previous, ignore_errors=True)


def load(folder: str | Path, *, data_hash: str) -> dict[str, Any] | None:
    """The newest complete checkpoint's trainer state, or ``None`` when there is none.

    Tries ``folder`` and then the previous checkpoint kept beside it. A checkpoint that
    cannot be read is skipped with a warning; if none can be read, a :class:`TrainingError`
    says so and names ``--restart``. A checkpoint of other data is refused.
    """
    import torch

    folder = Path(folder)
    candidates = [p for p in (folder, _previous(folder)) if (p / STATE_FILE).exists()]
    if not candidates:
        return None
    problems = []
    for path in candidates:
        try:
            saved = json.loads((path / CONFIG_FILE).read_text())
            state = torch.load(path / STATE_FILE, weights_only=False)
        except Exception as err:  # noqa: BLE001 - any unreadable file means: try the older checkpoint
            problems.append(f"{path}: {type(err).__name__}: {err}")
            log.warning("checkpoint %s cannot be read (%s); trying the previous one", path, err)
            continue
        if saved.get("data_hash") != data_hash:
            raise TrainingError(
                f"{path} holds a run on other data (hash {saved.get('data_hash')} vs {data_hash}). "
                "Use another --out, or --restart to start over."
            )
        return state
    raise TrainingError(f"No readable checkpoint to resume from ({'; '.join(problems)}). Use --restart to start over.")
