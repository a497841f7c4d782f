"""Data-parallel generation and training across processes (GPUs or CPU workers), through accelerate.

Launch any script that calls :meth:`Simulator.simulate` or :func:`screen` with several
processes and each process generates a share of the baseline cells; the streaming sums
are then added across processes, so every process ends with the same aggregates, equal
to a one-process run (sampling is keyed by seed, cell and perturbation, never by
process). Only the main process writes files. ``virtualcell train`` under the same launchers
trains data-parallel (:meth:`Split.average_gradients`, :meth:`Split.largest` for one clock).

* GPUs, one machine: ``accelerate launch --multi_gpu --num_processes 4 my_screen.py``
* several machines: add ``--num_machines 2 --machine_rank R --main_process_ip HOST``
* CPU workers: ``torchrun --nproc_per_node 2 my_screen.py`` (gloo backend)

Nothing here runs (or imports accelerate) unless the process was started by such a
launcher: ``WORLD_SIZE`` > 1 with ``MASTER_ADDR``, what torchrun and ``accelerate launch`` set and
``torch.distributed`` needs (or accelerate's own ``mpirun`` launch: ``accelerate launch --mpirun_hostfile``).
An MPI launcher's variables alone (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``: ``srun --ntasks=N`` sets them in every
task) do not make one: such tasks are independent runs, each doing all its own work (:func:`launched` says so).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Split", "launched", "launch_rank"]

log = logging.getLogger(__name__)


_MPI_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_MPI_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_SAID: list[bool] = []


def _env_int(key: str, default: int) -> int:
    try:
        return int(os.environ.get(key, "").strip() or default)
    except ValueError:
        return default


def _by_accelerate_mpirun() -> bool:
    """Whether ``accelerate launch --mpirun_hostfile`` started this process: mpirun's variables say several tasks, and
    accelerate set ``MASTER_ADDR`` and its own settings for them (accelerate's state reads the MPI ranks)."""
    return (any(_env_int(k, 1) > 1 for k in _MPI_SIZE) and bool(os.environ.get("MASTER_ADDR"))
            and "ACCELERATE_MIXED_PRECISION" in os.environ)


def _torch_launch() -> bool:
    """Whether torchrun or ``accelerate launch`` started this process among several: ``WORLD_SIZE`` > 1 with
    ``MASTER_ADDR`` (what ``torch.distributed`` needs to join them)."""
    return _env_int("WORLD_SIZE", 1) > 1 and bool(os.environ.get("MASTER_ADDR"))


def launched() -> bool:
    """Whether this process is one of several started to work together by torchrun or ``accelerate launch``:
    ``WORLD_SIZE`` > 1 with ``MASTER_ADDR`` set (what ``torch.distributed`` needs to join them), or accelerate's
    mpirun launch. An MPI launcher's task count alone (``srun --ntasks=N``, ``mpirun -n N``: ``PMI_SIZE``,
    ``OMPI_COMM_WORLD_SIZE``) is not: each such task runs as one process, doing all its own work, and writes its own
    output (it is said once, with how to launch processes that share one run)."""
    if _torch_launch():
        return True
    if _by_accelerate_mpirun():
        return True
    _say_alone()
    return False


def _say_alone() -> None:
    """Say once, where the environment names several tasks but no launch torch.distributed can join, that this
    process runs alone: a warning where a shared run looks meant (``WORLD_SIZE`` > 1, or ``MASTER_ADDR`` beside an
    MPI task count), else an info line (``srun --ntasks=N``'s independent tasks, a common and intended pattern)."""
    if _SAID:
        return
    world = _env_int("WORLD_SIZE", 1)
    mpi = [f"{k}={os.environ[k]}" for k in _MPI_SIZE if _env_int(k, 1) > 1]
    if world <= 1 and not mpi:
        return
    _SAID.append(True)
    seen = ", ".join(([f"WORLD_SIZE={world}"] if world > 1 else []) + mpi)
    how = ("to share one run's work across N processes, start it with torchrun --nproc_per_node N (or accelerate "
           "launch), which sets WORLD_SIZE, RANK and MASTER_ADDR")
    if world > 1:
        log.warning("%s is set but MASTER_ADDR is not, so torch.distributed cannot join the processes: this process "
                    "runs alone, on all of its work, and writes its own output; %s.", seen, how)
    elif os.environ.get("MASTER_ADDR"):
        log.warning("%s (an MPI launcher's task count) and MASTER_ADDR are set, but WORLD_SIZE is not: this process "
                    "runs alone, on all of its work, and writes its own output (independent tasks, as srun "
                    "--ntasks=N starts them); %s.", seen, how)
    else:
        log.info("%s (an MPI launcher such as srun --ntasks=N): this task runs as one independent process, on all of "
                 "its work, and writes its own output; %s.", seen, how)


def launch_rank() -> int:
    """This process's rank as the launcher set it in the environment (0 when not :func:`launched`: an independent
    srun task is its own main process), read before any process group exists: what a command needs to let only the
    main process claim its output folder."""
    if not launched():
        return 0
    keys = ("RANK",) if _torch_launch() else ("RANK", *_MPI_RANK)
    for key in keys:
        if key in os.environ:
            return _env_int(key, 0)
    return 0


_ENDING: list[bool] = []


def _end_at_exit() -> None:
    """Leave the process group when the interpreter exits (registered once). Left standing, gloo's threads met the
    interpreter's end and aborted the process ("terminate called without an active exception": exit status -6, the
    launcher reports the whole run failed) in most runs of a two-process script that otherwise finished."""
    if _ENDING:
        return
    _ENDING.append(True)
    import atexit

    def end() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    atexit.register(end)


@dataclass(frozen=True)
class Split:
    """This process's place in the job: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def current(cls, *, cpu: bool) -> Split:
        if not launched():
            return cls()
        from accelerate import PartialState

        state = PartialState(cpu=cpu)
        _end_at_exit()
        return cls(state.process_index, state.num_processes)

    def mine(self, i: int) -> bool:
        """Whether work item ``i`` (e.g. a chunk of cells) belongs to this process."""
        return i % self.world == self.rank

    def sum(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Element-wise sums over processes (every process gets the result)."""
        if self.world == 1:
            return list(arrays)
        return [self.sum_with(a) for a in arrays]

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (every process gets the list)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def main_error(self, err: BaseException | None) -> None:
        """Raise the main process's ``err`` on every process (a virtualcell error by its class and message; the
        others' own ``err`` is not looked at): a refusal only the main process can make (its output folder) must
        stop them all, or the others wait in their next exchange for ever. Returns where the main one had none."""
        from . import errors

        status = None if err is None else (type(err).__name__, str(err))
        if self.world > 1:
            status = self.gather(status)[0]
        if status is None:
            return
        if self.main and err is not None:
            raise err
        kind, message = status
        cls = getattr(errors, kind, None)
        raise (cls if isinstance(cls, type) and issubclass(cls, errors.VirtualCellError)
               else errors.VirtualCellError)(message)

    def largest(self, value: float) -> float:
        """The largest of every process's ``value`` (every process gets it): one clock for a time budget."""
        if self.world == 1:
            return value
        return float(self.sum_with(np.array([value], dtype=np.float64), op="max")[0])

    def sum_with(self, a: np.ndarray, *, op: str = "sum") -> np.ndarray:
        """``a`` reduced over processes element-wise by ``op`` (``"sum"`` or ``"max"``)."""
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(a))
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
        return t.cpu().numpy().astype(a.dtype, copy=False)

    def average_gradients(self, parameters: Any, weight: float = 1.0, loss: float = 0.0, tokens: float = 0.0
                          ) -> tuple[float, float]:
        """Replace every parameter's gradient by its mean over processes weighted by each process's ``weight``,
        in one exchange. Data-parallel training: each process computed the gradient of the mean loss over its
        share of the batch, and ``weight`` is what that mean is over (the share's target tokens, or their loss
        weights' sum), so the result is the gradient of the mean over the whole batch, as one process computes it.
        A parameter without a gradient counts as a zero gradient, so every process exchanges the same tensor.
        Returns the whole batch's mean of ``loss`` (each process's mean loss over its share) by the same weights,
        and the sum of every process's ``tokens`` (the tokens the whole batch read), for the record."""
        if self.world == 1:
            return loss, tokens
        import torch
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in parameters if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads) * float(weight)
        # the loss, the tokens and the weights' total travel in the same exchange
        flat = torch.cat([flat, flat.new_tensor([float(tokens), float(loss) * float(weight), float(weight)])])
        dist.all_reduce(flat)
        total, tokens = float(flat[-1]), float(flat[-3])
        if total > 0:
            flat /= total
        for g, mean in zip(grads, _unflatten_dense_tensors(flat[:-3], grads), strict=True):
            g.copy_(mean)
        return float(flat[-2]), tokens

    def same_weights(self, module: Any) -> None:
        """Give every process the main process's parameters and buffers (data-parallel training starts equal)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)
