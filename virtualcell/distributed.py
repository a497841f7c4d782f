"""Data-parallel generation across processes (GPUs or CPU workers), through accelerate.

Launch any script that calls :meth:`Simulator.simulate` or :func:`screen` with several
processes and each process generates a share of the baseline cells; the streaming sums
are then added across processes, so every process ends with the same aggregates, equal
to a one-process run (sampling is keyed by seed, cell and perturbation, never by
process). Only the main process writes files.

* GPUs, one machine: ``accelerate launch --multi_gpu --num_processes 4 my_screen.py``
* several machines: add ``--num_machines 2 --machine_rank R --main_process_ip HOST``
* CPU workers: ``torchrun --nproc_per_node 2 my_screen.py`` (gloo backend)

Nothing here runs (or imports accelerate) unless the process was started by such a
launcher (``WORLD_SIZE`` > 1 in the environment).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["Split", "launched"]


def launched() -> bool:
    """Whether this process is one of several started by accelerate/torchrun/MPI."""
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(key, "1")) > 1:
            return True
    return False


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
        return cls(state.process_index, state.num_processes)

    def mine(self, i: int) -> bool:
        """Whether work item ``i`` (e.g. a chunk of cells) belongs to this process."""
        return i % self.world == self.rank

    def sum(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """Element-wise sums over processes (every process gets the result)."""
        if self.world == 1:
            return list(arrays)
        import torch
        import torch.distributed as dist

        out = []
        for a in arrays:
            t = torch.from_numpy(np.ascontiguousarray(a))
            if dist.get_backend() == "nccl":
                t = t.cuda()
            dist.all_reduce(t)
            out.append(t.cpu().numpy().astype(a.dtype, copy=False))
        return out

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj``, in rank order (every process gets the list)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out
