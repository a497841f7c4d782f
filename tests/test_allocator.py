"""virtualcell.allocator: large blocks freed inside a run are reused instead of faulted in again."""

from __future__ import annotations

import resource

import pytest

from virtualcell import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the setting is glibc's; elsewhere it does nothing")


def _faults_of_repeated_tensors(n: int = 4, mib: int = 64) -> int:
    """Minor page faults while a ``mib`` MiB tensor is allocated, written and freed ``n`` times (after a first)."""
    import torch

    torch.ones(mib * 2**18)  # the first one may grow the heap either way
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.ones(mib * 2**18)  # float32: mib MiB, every page written
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_freed_large_tensors_are_reused_inside_and_given_back_after():
    outside = _faults_of_repeated_tensors()
    with allocator.large_blocks_on_heap() as applied:
        inside = _faults_of_repeated_tensors()
    assert applied
    # outside, each 64 MiB tensor is a fresh mmap: about 16,000 pages faulted in per tensor
    assert outside > 4 * 8000, outside
    assert inside < outside / 4, (inside, outside)
    assert allocator._depth == 0


@glibc
def test_nested_runs_share_one_setting():
    with allocator.large_blocks_on_heap() as a:
        with allocator.large_blocks_on_heap() as b:
            assert allocator._depth == 2
        assert allocator._depth == 1
    assert (a, b, allocator._depth) == (True, True, 0)


def test_a_users_own_malloc_tuning_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    with allocator.large_blocks_on_heap() as applied:
        assert not applied
    assert allocator._depth == 0
