"""virtualcell.allocator: large blocks freed inside a run are reused instead of faulted in again."""

from __future__ import annotations

import resource

import pytest

from virtualcell import allocator

glibc = pytest.mark.skipif(allocator._glibc() is None, reason="the setting is glibc's; elsewhere it does nothing")


def _faults_of_repeated_tensors(n: int = 12, mib: int = 64) -> int:
    """Minor page faults while a ``mib`` MiB tensor is allocated, written and freed ``n`` times (after three)."""
    import torch

    for _ in range(3):  # the first ones grow the heap either way (an aligned block does not fit the first freed one)
        torch.ones(mib * 2**18)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        t = torch.ones(mib * 2**18)  # float32: mib MiB, every page written
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@glibc
def test_freed_large_tensors_are_reused_inside_and_given_back_after():
    outside = _faults_of_repeated_tensors()
    with allocator.large_blocks_on_heap() as run:
        inside = _faults_of_repeated_tensors()
    assert run.applied and not run.released
    # outside, each 64 MiB tensor is a fresh mmap: about 16,000 pages faulted in per tensor
    assert outside > 12 * 8000, outside
    assert inside < outside / 2, (inside, outside)
    assert allocator._depth == 0


@glibc
def test_nested_runs_share_one_setting():
    with allocator.large_blocks_on_heap() as a:
        with allocator.large_blocks_on_heap() as b:
            assert allocator._depth == 2 and b is a
        assert allocator._depth == 1
    assert a.applied and allocator._depth == 0 and allocator._watch is None


@glibc
def test_past_its_memory_limit_the_run_hands_large_blocks_back_to_mmap(caplog):
    """The watcher sees resident memory pass the limit, restores glibc's thresholds (a fresh large tensor is
    faulted in again) and says so; the run goes on."""
    import time

    import torch

    with caplog.at_level("WARNING", logger="virtualcell.allocator"):
        with allocator.large_blocks_on_heap(max_resident=allocator._resident() + 100 * 2**20) as run:
            kept = torch.ones(64 * 2**20)  # 256 MiB held: past the limit
            for _ in range(40):
                if run.released:
                    break
                time.sleep(0.1)
            assert run.released
            after = _faults_of_repeated_tensors()
            del kept
    assert after > 12 * 8000, after  # large blocks come from mmap again
    assert "go back to mmap" in caplog.text


def test_a_users_own_malloc_tuning_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    with allocator.large_blocks_on_heap() as run:
        assert not run.applied
    assert allocator._depth == 0
