"""Resumable training checkpoints that a kill cannot corrupt.

A checkpoint is a folder (the model folder plus ``trainer_state.pt`` and
``run_config.json``), written whole in a temporary place and swapped in for the previous
one only when complete (:func:`virtualcell.safeio.atomic_folder`). A kill at any moment
leaves the previous or the new checkpoint, never a mix; :func:`load` first finishes or
undoes a swap that a kill interrupted (:func:`virtualcell.safeio.recover_folder`).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..safeio import atomic_folder, recover_folder

__all__ = ["save", "load", "STATE_FILE", "CONFIG_FILE"]

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"


def save(folder: str | Path, write: Callable[[Path], None], *, state: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Write a checkpoint atomically.

    ``write(tmp)`` writes the model files into ``tmp``; the trainer state (``state``: model
    and optimizer state dicts, step, history) and the run config go beside them.
    """
    import torch

    with atomic_folder(folder) as tmp:
        write(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1))
        torch.save(state, tmp / STATE_FILE)


def load(folder: str | Path, *, data_hash: str) -> dict[str, Any] | None:
    """The checkpoint's trainer state, or ``None`` when there is none.

    A checkpoint that cannot be read, or one of other data, is refused with a
    :class:`TrainingError` that names ``--restart``.
    """
    import torch

    folder = recover_folder(folder)
    if not (folder / STATE_FILE).exists():
        return None
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
        state = torch.load(folder / STATE_FILE, weights_only=False)
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the files, the fix is the same
        raise TrainingError(
            f"The checkpoint {folder} cannot be read ({type(err).__name__}: {err}); it was not written by a complete "
            "save. Use --restart to start over (or delete the folder)."
        ) from None
    if saved.get("data_hash") != data_hash:
        raise TrainingError(
            f"{folder} holds a run on other data (hash {saved.get('data_hash')} vs {data_hash}). "
            "Use another --out, or --restart to start over."
        )
    return state
