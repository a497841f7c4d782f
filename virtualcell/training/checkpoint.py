"""Resumable training checkpoints that a kill cannot corrupt.

A checkpoint is a folder (the model folder plus ``trainer_state.pt`` and
``run_config.json``), written whole in a temporary place and swapped in for the previous
one only when complete (:func:`virtualcell.safeio.atomic_folder`). A kill at any moment
leaves the previous or the new checkpoint, never a mix; :func:`load` first finishes or
undoes a swap that a kill interrupted (:func:`virtualcell.safeio.recover_folder`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..errors import TrainingError
from ..safeio import atomic_folder, recover_folder

__all__ = ["save", "load", "resume", "same_extras", "same_decay", "same_quantities", "STATE_FILE", "CONFIG_FILE"]

STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "run_config.json"


def save(folder: str | Path, write: Callable[[Path], None], *, state: dict[str, Any], run_config: dict[str, Any]) -> None:
    """Write a checkpoint atomically.

    ``write(tmp)`` writes the model files into ``tmp``; the trainer state (``state``: model
    and optimizer state dicts, step, history) and the run config go beside them. The state is written as tensors and
    plain values only (:func:`_storable`), all that :func:`load` reads back: it never unpickles objects.
    """
    import torch

    with atomic_folder(folder) as tmp:
        write(tmp)
        (tmp / CONFIG_FILE).write_text(json.dumps(run_config, indent=1))
        torch.save(_storable(state), tmp / STATE_FILE)


def _storable(value: Any) -> Any:
    """``value`` (the trainer state) with numpy scalars and arrays as Python numbers and tensors: what
    ``torch.load(weights_only=True)`` reads (it refuses a numpy float in the history)."""
    import numpy as np
    import torch

    if isinstance(value, Mapping):
        return {k: _storable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_storable(v) for v in value)
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    return value


def load(folder: str | Path, *, data_hash: str, settings: Mapping[str, Any] | None = None,
         labels: Mapping[str, str] | None = None, quantities: Mapping[str, Mapping[str, str]] | None = None
         ) -> dict[str, Any] | None:
    """The checkpoint's trainer state, or ``None`` when there is none.

    A checkpoint that cannot be read, one of other data, or (given this run's ``settings``) one trained under
    other settings (:func:`same_settings`), or (given this run's ``labels``: each training label's typed form) one
    whose labels were read as other perturbations (:func:`same_labels`), or (given this run's ``quantities``: its
    ``conditions`` and ``dose_units``, as its :class:`~virtualcell.prompts.PerturbationVocab` holds them) one whose
    doses and times were read otherwise (:func:`same_quantities`) is refused with a :class:`TrainingError` that
    names ``--restart``.

    ``trainer_state.pt`` is read as tensors and plain values only (``torch.load(weights_only=True)``): a model
    folder someone shared carries its ``last/`` checkpoint, and a pickle in it would run its code on a resume. One
    that holds anything else is refused, unread. Its tensors are read onto the CPU, wherever the run that saved them
    ran (a GPU run goes on on a laptop).
    """
    import pickle

    import torch

    folder = recover_folder(folder)
    if not (folder / STATE_FILE).exists():
        return None
    try:
        saved = json.loads((folder / CONFIG_FILE).read_text())
        if not isinstance(saved, dict):
            raise ValueError(f"{CONFIG_FILE} is not a JSON object")
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the files, the fix is the same
        raise TrainingError(
            f"The checkpoint {folder} cannot be read ({type(err).__name__}: {err}); it was not written by a complete "
            "save. Use --restart to start over (or delete the folder)."
        ) from None
    if saved.get("data_hash") != data_hash:  # (before the state file is opened at all)
        raise TrainingError(
            f"{folder} holds a run on other data (hash {saved.get('data_hash')} vs {data_hash}). "
            "Use another --out, or --restart to start over."
        )
    try:
        # (onto the CPU: a run saved on a GPU resumes on a machine without one, or with another; resume() loads the
        # weights into the module wherever it is, and the optimizer moves its state onto its parameters' device)
        state = torch.load(folder / STATE_FILE, weights_only=True, map_location="cpu")
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no trainer state (a dict with its step) in it")
    except pickle.UnpicklingError as err:
        # (torch's message is a page of advice on loading it anyway, allow-listing what is refused included: only
        # the name of what the file holds is kept, 'GLOBAL posix.system')
        import re

        what = re.search(r"GLOBAL\s+[\w.]+", str(err))
        said = f" (it holds {what.group(0).rstrip('.')})" if what else ""
        raise TrainingError(
            f"{folder / STATE_FILE} holds more than the tensors and plain values virtualcell writes there{said}, "
            "and it is not unpickled: a pickle can run code, and this one was not written by virtualcell (or by one "
            "older than it reads). Use --restart to start over from the model (or delete the folder's last/ "
            "checkpoint)."
        ) from None
    except Exception as err:  # noqa: BLE001 - whatever is wrong with the file, the fix is the same
        raise TrainingError(
            f"The checkpoint {folder} cannot be read ({type(err).__name__}: {err}); it was not written by a complete "
            "save. Use --restart to start over (or delete the folder)."
        ) from None
    if settings is not None:
        same_settings(saved, settings, folder, int(state["step"]))
    if labels is not None:
        same_labels(folder, labels)
    if quantities is not None:
        same_quantities(folder, quantities)
    return state


def same_labels(last: Path, labels: Mapping[str, str]) -> None:
    """Refuse to resume where the checkpoint read a training label as another perturbation than this run does (a
    version before 'None' and 'ctrl' trained as plain labels trained them as the control prompt: its steps and the
    rest would mix two readings of those cells, and the record would keep only the second)."""
    from ..model import META_FILE

    try:
        saved = json.loads((last / META_FILE).read_text())["perturbations"]["labels"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # (no record of them: nothing to compare)
    differ = sorted(k for k, v in labels.items() if k in saved and saved[k] != v)
    if differ:
        said = "; ".join(f"{k!r}: {saved[k]} there, {labels[k]} here" for k in differ[:5])
        raise TrainingError(
            f"{last} was trained reading some labels as other perturbations than this run does ({said}; a version of "
            "virtualcell before this one read them so): resuming would train those cells two ways. Start over with "
            "--restart (resume=False), or use another --out.")


def same_quantities(last: Path, quantities: Mapping[str, Mapping[str, str]]) -> None:
    """Refuse to resume where the checkpoint read the data's doses or times otherwise than this run does: its
    conditions (``"drugA@1,6h"`` -> its typed form) or its agents' dose units differ. The data's hash reads its
    expression and labels, and the run's record names its dose and time columns, not their values: a time column
    rewritten from '6h' to '6min', or doses from uM to nM, resumed the run under a second reading of the same cells
    without a word, and its record kept only the second."""
    from ..model import META_FILE

    try:
        saved = json.loads((last / META_FILE).read_text())["perturbations"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # (no record of them: nothing to compare)
    said = []
    for key, what in (("conditions", "conditions"), ("dose_units", "dose units")):
        if not isinstance(saved, Mapping) or key not in saved or key not in quantities:
            continue  # (a record from before it was kept: not compared)
        was, now = dict(saved[key]), dict(quantities[key])
        if was == now:
            continue
        there, here = sorted(set(was) - set(now)), sorted(set(now) - set(was))
        other = sorted(k for k in set(was) & set(now) if was[k] != now[k])
        parts = ([f"{k!r} ({was[k]}) there only" for k in there[:3]] + [f"{k!r} ({now[k]}) here only" for k in here[:3]]
                 + [f"{k!r}: {was[k]} there, {now[k]} here" for k in other[:3]])
        said.append(f"{what}: {'; '.join(parts)}")
    if said:
        raise TrainingError(
            f"{last} was trained reading the data's doses or times otherwise than this run does ({' | '.join(said)}): "
            "the values of the dose or time column changed (a time '6h' now '6min', doses in uM now in nM) while the "
            "labels and the expression did not, or a version of virtualcell before this one read them so; resuming "
            "would train the same cells under two readings and record only the second. Give the run the values it "
            "was trained on to go on from it, or start over with --restart (resume=False), or use another --out.")


# settings a resumed run may change: how long it goes on, how it runs, what it keeps and how the verdict after it
# looks; every other one (the seed, the splits, the model's shape, the data it is shown, the schedule) made the
# steps already taken, and a resume under another would mix two runs and record only the second
RESUMABLE_WITH_OTHER = frozenset({
    "max_steps", "max_minutes", "threads", "compile", "attention", "precision", "keep_best", "eval_every",
    "save_every", "verdict_candidates", "verdict_samples", "verdict_temperatures"})


def same_settings(saved: Mapping[str, Any], settings: Mapping[str, Any], last: Path, step: int) -> None:
    """Refuse to resume the run recorded in ``saved`` (its ``run_config.json``) under ``settings`` (this run's
    :class:`~virtualcell.train.TrainConfig` fields, and ``base``) where one outside :data:`RESUMABLE_WITH_OTHER`
    differs (a new seed moved 108 of 119 cells the model had trained on into the verdict's held-out split), or
    where ``max_steps`` is below the ``step`` already reached. A setting the record lacks (a run from before it
    existed) is not compared."""
    differ = [k for k, v in settings.items()
              if k not in RESUMABLE_WITH_OTHER and k in saved and _plain(saved[k]) != _plain(v)]
    if differ:
        said = "; ".join(f"{k}: {saved[k]!r} there, {settings[k]!r} here" for k in differ[:6])
        from dataclasses import fields

        from ..train import TrainConfig

        first = next((k for k in differ if k in {f.name for f in fields(TrainConfig)}), None)
        python = ("" if first is None else " (its flag, or, for a setting the command line has no flag for, from "
                  f"Python: vc.fit(adata, out=..., config=vc.TrainConfig({first}={saved[first]!r}, ...)))")
        raise TrainingError(
            f"{last} holds a run trained with other settings ({said}): resuming it under these would mix two runs "
            f"(and the record would name only the second). Train as that run did to go on from it{python}, or start "
            "over with --restart (resume=False), or use another --out.")
    wanted = settings.get("max_steps")
    if isinstance(wanted, int) and wanted < step:
        raise TrainingError(
            f"{last} is at step {step}, past the {wanted} steps asked (--max-steps): there is nothing to train. Ask for "
            f"more than {step} steps to go on, or --restart (resume=False) to train {wanted} from the start.")


def _plain(value: Any) -> Any:
    """A setting as JSON keeps it (tuples are lists there)."""
    return json.loads(json.dumps(value, default=str))


def resume(folder: str | Path, *, data_hash: str, module: Any, optimizer: Any,
           extras: list[tuple[str, bool, str, str | None]], keep_best: bool,
           settings: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None,
           quantities: Mapping[str, Mapping[str, str]] | None = None) -> tuple[Any, Any] | None:
    """Load the checkpoint in ``folder`` (of the data whose hash is ``data_hash``) into ``module`` and ``optimizer``;
    returns the loop's state and its best weights to go on from (:class:`~.loop.LoopState`,
    :class:`~.loop.BestWeights`), or ``None`` where there is no checkpoint. Refuses one trained under other
    ``settings`` (:func:`same_settings`), labels or ``quantities`` (:func:`same_labels`, :func:`same_quantities`), or
    whose extra parameters (``extras``, see :func:`same_extras`), weights'
    shapes or weight decays differ from this run's."""
    from .loop import BestWeights, LoopState

    saved = load(folder, data_hash=data_hash, settings=settings, labels=labels, quantities=quantities)
    if saved is None:
        return None
    same_extras(saved["model"], Path(folder), extras)
    try:
        module.load_state_dict(saved["model"])
    except RuntimeError as err:  # another shape (hidden size, layers, heads, vocabulary)
        first = str(err).strip().splitlines()[-1].strip() if str(err).strip() else type(err).__name__
        if _vocabulary_only(saved["model"], module.state_dict()):
            # (the same data and settings, so the tokens were written otherwise: a run an older virtualcell started,
            # e.g. before trained conditions sharing dose and time bins got tokens of their own)
            raise TrainingError(
                f"{folder} holds a model of this run's shape but with another number of tokens ({first}): the "
                "data and settings are the same, so the run was started by another version of virtualcell, which "
                "wrote its perturbations' tokens otherwise. Resume it with the version that started it, or start "
                "over with --restart (resume=False).") from None
        raise TrainingError(
            f"{folder} holds a model of another shape than this run's ({first}): train as that run did to go on "
            "from it, or start over with --restart (resume=False).") from None
    same_decay(saved["optimizer"], optimizer, Path(folder))
    optimizer.load_state_dict(saved["optimizer"])
    return (LoopState(saved["step"], saved["history"], saved.get("pretrain_end")),
            BestWeights.from_dict(saved.get("best"), keep_state=keep_best))


def _vocabulary_only(saved: Mapping[str, Any], here: Mapping[str, Any]) -> bool:
    """Whether the saved weights differ from this run's in their number of tokens alone: the same names, and each
    weight of another shape differs in its first dimension only (the embedding's and the output's rows; the token
    bias's table, whose rows and columns both follow the tokens, differs in any)."""
    from .. import token_bias

    if set(saved) != set(here):
        return False
    differ = [k for k in here if tuple(saved[k].shape) != tuple(here[k].shape)]
    return bool(differ) and all(saved[k].ndim == here[k].ndim and (
        k.startswith(token_bias.PARAMETER) or tuple(saved[k].shape[1:]) == tuple(here[k].shape[1:])) for k in differ)


def same_extras(state: Mapping[str, Any], last: Path, extras: list[tuple[str, bool, str, str | None]]) -> None:
    """Refuse to resume from ``state`` (the saved model's) where it has one of the model's extra parameters
    (target offsets, neighbour offsets, the token bias) that this run lacks, or lacks one this run has: each extra
    as ``(parameter name, whether this run has it, what it is called, the flag that leaves it out)``."""
    for key, here, what, flag in extras:
        if (key in state) != here:
            how = f" ({'without ' if not here else ''}{flag})" if flag else ""
            raise TrainingError(
                f"{last} was saved by a run {'with' if not here else 'without'} {what}, and this run is "
                f"{'without' if not here else 'with'} {'them' if what.endswith('s') else 'one'}, so it cannot resume "
                f"from it: train as that run did{how}, or start over with --restart (resume=False).")


def same_decay(saved: dict[str, Any], optimizer: Any, last: Path) -> None:
    """Stop a resume whose optimizer had other weight decays (``weight_decay``, ``--token-bias-decay``): loading
    its state would silently bring its settings back."""
    was = [g.get("weight_decay") for g in saved.get("param_groups", [])]
    now = [g.get("weight_decay") for g in optimizer.param_groups]
    if was != now:
        raise TrainingError(
            f"The checkpoint in {last} was trained with weight decay {was} (the model's, then the token-bias table's "
            f"where it differs) and this run asks for {now}: loading it would bring its own back. Resume with the "
            "settings it was trained with, or start over with --restart (resume=False)."
        )
