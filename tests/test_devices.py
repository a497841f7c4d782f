"""Where a run lands on this machine: which launches are multi-process, which devices and precisions are taken, how
many threads and how much memory a run assumes, and the caller's torch settings left as they were."""

from __future__ import annotations

import contextlib
import logging
import os
from types import SimpleNamespace

import pytest
import torch

from virtualcell import allocator, distributed
from virtualcell.errors import ModelError
from virtualcell.model import pick_device
from virtualcell.train import TrainConfig, train, training_device
from virtualcell.training import kernels

# ---------------------------------------------------------------------------------------------------------- launches

_LAUNCH_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "PMI_SIZE",
                "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
                "MV2_COMM_WORLD_RANK", "ACCELERATE_MIXED_PRECISION")


@pytest.fixture
def environment(monkeypatch):
    """A process environment without any launcher's variables, and the once-only notice not yet said."""
    for key in _LAUNCH_VARS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(distributed, "_SAID", [], raising=False)

    def setenv(**values: str) -> None:
        for key, value in values.items():
            monkeypatch.setenv(key, value)

    return setenv


def test_srun_tasks_are_independent_runs_each_its_own_main_process(environment, caplog):
    """``srun --ntasks=2`` sets PMI_SIZE/PMI_RANK in every task: taken for a launch, accelerate stopped with a raw
    "MASTER_ADDR env was not set", and task 1 (rank 1) would have written nothing. Each task runs alone and says
    so once, with how to share one run's work."""
    environment(PMI_SIZE="2", PMI_RANK="1", SLURM_PROCID="1")
    with caplog.at_level(logging.INFO, logger="virtualcell.distributed"):
        assert not distributed.launched()
        assert distributed.launch_rank() == 0  # (it claims and writes its own --out)
        assert distributed.Split.current(cpu=True) == distributed.Split(0, 1)
    said = [r for r in caplog.records if r.name == "virtualcell.distributed"]
    assert len(said) == 1 and said[0].levelno == logging.INFO, said
    assert "PMI_SIZE=2" in said[0].getMessage() and "torchrun --nproc_per_node N" in said[0].getMessage()


def test_a_task_count_beside_master_addr_or_a_world_size_without_one_is_a_warning_not_a_process_group(
        environment, monkeypatch, caplog):
    """MASTER_ADDR exported beside an MPI task count (a cluster's job template): independent tasks would have joined
    one process group and added up each other's sums. WORLD_SIZE without MASTER_ADDR cannot start one."""
    environment(OMPI_COMM_WORLD_SIZE="4", OMPI_COMM_WORLD_RANK="2", MASTER_ADDR="node1")
    with caplog.at_level(logging.INFO, logger="virtualcell.distributed"):
        assert not distributed.launched() and distributed.launch_rank() == 0
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert "OMPI_COMM_WORLD_SIZE=4" in caplog.text and "WORLD_SIZE is not" in caplog.text
    caplog.clear()
    distributed._SAID.clear()
    monkeypatch.delenv("MASTER_ADDR")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with caplog.at_level(logging.INFO, logger="virtualcell.distributed"):
        assert not distributed.launched()
    assert "WORLD_SIZE=2" in caplog.text and "MASTER_ADDR is not" in caplog.text


def test_torchrun_and_accelerate_launches_are_still_launches(environment, monkeypatch, caplog):
    environment(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500", PMI_RANK="0")
    with caplog.at_level(logging.INFO, logger="virtualcell.distributed"):
        assert distributed.launched() and distributed.launch_rank() == 1  # (torchrun's RANK, not srun's)
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "PMI_RANK"):
        monkeypatch.delenv(key)
    # accelerate launch --mpirun_hostfile: mpirun's ranks, accelerate's MASTER_ADDR and settings
    environment(PMI_SIZE="2", PMI_RANK="1", ACCELERATE_MIXED_PRECISION="no")
    assert distributed.launched() and distributed.launch_rank() == 1
    assert not caplog.records


def test_an_srun_task_of_rank_1_writes_its_own_prediction(environment, tiny_model, tmp_path):
    """The whole command as one srun task of two runs it: it predicts and writes its --out (it stopped in accelerate
    before; with MASTER_ADDR set, rank != 0 wrote nothing)."""
    from virtualcell import cli

    _, folder, data = tiny_model
    base = tmp_path / "base.h5ad"
    data[data.obs.perturbation == "control"][:8].copy().write_h5ad(base)
    environment(PMI_SIZE="2", PMI_RANK="1")
    assert cli.main(["predict", "-q", "--model", str(folder), "--data", str(base), "--perturbations", "STAT1",
                     "--out", str(tmp_path / "task1.h5ad")]) == 0
    assert (tmp_path / "task1.h5ad").exists()


# ----------------------------------------------------------------------------------------------------------- devices

@pytest.mark.parametrize("device", ["xpu", "hip", "meta", "privateuseone", "xla"])
def test_device_types_virtualcell_does_not_run_on_are_refused_naming_what_the_machine_has(device):
    """They were accepted and then failed deep inside torch ('Torch not compiled with XPU enabled', 'Tensor.item()
    cannot be called on meta tensors')."""
    with pytest.raises(ModelError, match=rf"Device '{device}' is not one virtualcell runs on.*use cuda \(or cuda:N\), "
                                         r"mps or cpu.*This machine has: .*cpu"):
        pick_device(device)
    with pytest.raises(ModelError, match="not one virtualcell runs on"):
        training_device(device)


def test_a_device_torch_sees_but_virtualcell_does_not_run_on_is_named(monkeypatch):
    monkeypatch.setattr(torch.xpu, "is_available", lambda: True)
    with pytest.raises(ModelError, match=r"torch sees a device of type 'xpu' here, but virtualcell is not built"):
        pick_device("xpu:0")
    with pytest.raises(ModelError, match=r"ROCm GPUs are 'cuda' in torch"):
        pick_device("hip")


def test_auto_is_the_best_available_and_names_are_read_without_case():
    assert pick_device("auto") == pick_device(None) == pick_device(" Auto ")
    assert training_device("auto") == training_device(None)
    assert pick_device("CPU")[0] == torch.device("cpu")


def test_mps_not_built_and_not_available_are_told_apart(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ModelError, match=r"Device 'mps' \(Apple's Metal\) was asked for, but this torch was built "
                                         r"without MPS.*This machine has: .*cpu"):
        pick_device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: True)
    with pytest.raises(ModelError, match=r"torch has MPS but it is not available here \(it needs macOS 12.3"):
        pick_device("mps")


@contextlib.contextmanager
def _gpus(monkeypatch, majors: tuple[int, ...]):
    """A machine with CUDA GPUs of these compute-capability majors, as torch.cuda reports them (no GPU needed):
    ``torch.cuda.device(i)`` makes GPU i the current one, and emulated bfloat16 works on every GPU (as on a T4)."""
    current = [0]

    class Device:
        def __init__(self, device):  # noqa: ANN001
            self.index = torch.device(device).index if not isinstance(device, int) else device

        def __enter__(self):  # noqa: ANN204
            self.before, current[0] = current[0], self.index if self.index is not None else current[0]

        def __exit__(self, *exc):  # noqa: ANN002, ANN204
            current[0] = self.before

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(majors))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", Device)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(major=majors[torch.device(i).index if not isinstance(i, int) else i]))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)
    monkeypatch.setattr(torch.version, "hip", None)
    yield current


def test_a_gpu_without_native_bf16_runs_fp16_and_the_chosen_gpu_is_asked(monkeypatch):
    """A T4 or V100 (compute capability 7) emulates bfloat16: torch.cuda.is_bf16_supported() says True by default,
    so fp16 was never chosen. And it asked the current GPU (0), not the one chosen (cuda:1)."""
    with _gpus(monkeypatch, (8, 7)) as current:
        assert torch.cuda.is_bf16_supported()  # (torch's default counts the emulation)
        assert pick_device("cuda:0") == (torch.device("cuda", 0), torch.bfloat16)
        assert pick_device("cuda:1") == (torch.device("cuda", 1), torch.float16)
        assert current[0] == 0  # (the current GPU left as it was)
        assert kernels.bf16_native(torch.device("cuda", 0)) and not kernels.bf16_native(torch.device("cuda", 1))
        monkeypatch.setenv("LOCAL_RANK", "1")  # (under a launch, "cuda" is the process's own GPU)
        assert pick_device("cuda") == (torch.device("cuda", 1), torch.float16)
    with _gpus(monkeypatch, (7, 8)):
        monkeypatch.delenv("LOCAL_RANK")
        assert pick_device(None) == (torch.device("cuda", 0), torch.float16)
        assert pick_device("cuda:1")[1] == torch.bfloat16


# ----------------------------------------------------------------------------------------------------------- threads

def _timed_threads(monkeypatch, *, torch_threads: int, cores: set[int] | None) -> set[int]:
    """The thread counts kernels.choose times (and may pick) on a CPU, with torch set to ``torch_threads`` and the
    process allowed ``cores`` (``None``: a system without CPU affinity)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    if cores is None:
        monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    else:
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(cores), raising=False)
    monkeypatch.setattr(torch, "get_num_threads", lambda: torch_threads)
    seen: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    ids = torch.arange(1, 9).unsqueeze(0)
    kernels.choose(lm, torch.device("cpu"), lambda: lm(input_ids=ids, labels=ids).loss, attention="eager",
                   precision="fp32")
    return set(seen)


def test_training_times_no_more_threads_than_the_cores_it_may_run_on_or_torch_is_set_to(monkeypatch):
    """Under ``taskset -c 0`` (or a Slurm job given 4 of 64 cores) it timed os.cpu_count() threads, and a caller's
    torch.set_num_threads(1) was raised to every core."""
    assert _timed_threads(monkeypatch, torch_threads=1, cores={0, 1, 2, 3}) == {1}
    assert _timed_threads(monkeypatch, torch_threads=64, cores={0}) == {1}
    assert _timed_threads(monkeypatch, torch_threads=64, cores={4, 5, 6, 7}) == {1, 4}
    assert _timed_threads(monkeypatch, torch_threads=2, cores={0, 1, 2, 3}) == {1, 2}
    assert _timed_threads(monkeypatch, torch_threads=64, cores=None) == {1, os.cpu_count() or 1}  # (macOS, Windows)


def test_usable_cores_is_this_process_affinity():
    """Under ``taskset -c 0`` one core, whatever the machine has (os.cpu_count() counted them all)."""
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity here")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert kernels.usable_cores() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert kernels.usable_cores() == len(before)


# ---------------------------------------------------------------------------------------------------------- training

def _fit(papalexi_small, out):
    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0,
                      verdict_fraction=0.0, attention="eager", precision="fp32", threads=1, compile="off")
    return train(papalexi_small[:300].copy(), out=out, config=cfg, progress=False)


def test_a_fit_inside_inference_mode_under_a_float64_default_trains_float32_and_restores_both(papalexi_small,
                                                                                              tmp_path):
    """A notebook that turned gradients off (torch.no_grad(), set_grad_enabled(False), inference_mode()) got a raw
    "element 0 of tensors does not require grad"; one that set torch.set_default_dtype(torch.float64) trained and
    saved a float64 model (other weights from the same seed, a checkpoint twice the size)."""
    plain = _fit(papalexi_small, tmp_path / "plain")
    torch.set_default_dtype(torch.float64)
    try:
        with torch.inference_mode():
            model = _fit(papalexi_small, tmp_path / "caller")
            assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()
        assert torch.get_default_dtype() == torch.float64
    finally:
        torch.set_default_dtype(torch.float32)
    assert torch.is_grad_enabled()
    assert {p.dtype for p in model.lm.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(plain.lm.state_dict().items(), model.lm.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    with torch.no_grad():  # (a plain no_grad block too, and the caller's mode kept)
        _fit(papalexi_small, tmp_path / "no_grad")
        assert not torch.is_grad_enabled()


# ------------------------------------------------------------------------------------------------------------ memory

def _cgroup_tree(tmp_path, monkeypatch, proc: str, files: dict[str, str]) -> None:
    """A fake /proc/self/cgroup and /sys/fs/cgroup: ``files`` maps paths under the cgroup root to their text."""
    (tmp_path / "cgroup").write_text(proc)
    for rel, text in files.items():
        path = tmp_path / "fs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(allocator, "PROC_CGROUP", str(tmp_path / "cgroup"))
    monkeypatch.setattr(allocator, "CGROUP_ROOT", str(tmp_path / "fs"))


GiB = 2**30


def test_cgroup_v2_limit_above_the_process_cgroup_counts(tmp_path, monkeypatch):
    """A Slurm --mem job: the limit is on the job's cgroup, the process sits in a step below it without one; its
    reclaimable file cache is free."""
    _cgroup_tree(tmp_path, monkeypatch, "0::/job_7/step_0\n", {
        "job_7/memory.max": str(4 * GiB), "job_7/memory.current": str(2 * GiB),
        "job_7/memory.stat": f"anon 1\ninactive_file {GiB // 2}\nactive_file 5\n",
        "job_7/step_0/memory.max": "max", "job_7/step_0/memory.current": str(GiB)})
    assert allocator._cgroup_free() == 4 * GiB - (2 * GiB - GiB // 2)


def test_cgroup_v1_and_a_container_root(tmp_path, monkeypatch):
    unlimited = "9223372036854771712"
    _cgroup_tree(tmp_path, monkeypatch, "5:cpu,cpuacct:/x\n4:memory:/docker/abc\n0::/\n", {
        "memory/memory.limit_in_bytes": str(2 * GiB), "memory/memory.usage_in_bytes": str(GiB + GiB // 2),
        "memory/memory.stat": "cache 3\ntotal_inactive_file 0\n",
        "memory/docker/abc/memory.limit_in_bytes": unlimited, "memory/docker/abc/memory.usage_in_bytes": "7"})
    assert allocator._cgroup_free() == GiB // 2
    # (a container without a cgroup namespace: /proc names a path that is not under its mount; the root is its own)
    _cgroup_tree(tmp_path, monkeypatch, "4:memory:/docker/other\n", {})
    assert allocator._cgroup_free() == GiB // 2


def test_no_cgroup_limit_is_none(tmp_path, monkeypatch):
    _cgroup_tree(tmp_path, monkeypatch, "0::/user.slice\n", {"user.slice/memory.max": "max",
                                                              "user.slice/memory.current": "123"})
    assert allocator._cgroup_free() is None
    monkeypatch.setattr(allocator, "PROC_CGROUP", str(tmp_path / "absent"))
    assert allocator._cgroup_free() is None
    (tmp_path / "binary").write_bytes(b"0::/\xff\xfe\n")  # (bytes that are not text: no limit, not a crash)
    monkeypatch.setattr(allocator, "PROC_CGROUP", str(tmp_path / "binary"))
    assert allocator._cgroup_free() is None


@pytest.mark.skipif(allocator._glibc() is None, reason="the watcher is glibc's; elsewhere it does nothing")
def test_the_heap_watcher_takes_the_cgroups_limit_where_it_is_below_the_machines(tmp_path, monkeypatch):
    """Its limit came from /proc/meminfo (the whole node's): a job given 1 GiB of a 24 GiB node was OOM-killed
    before the watcher handed anything back."""
    limit = 256 * 2**20
    _cgroup_tree(tmp_path, monkeypatch, "0::/job\n", {"job/memory.max": str(limit), "job/memory.current": "0"})
    assert allocator._available() == limit  # (this machine has more available than that)
    with allocator.large_blocks_on_heap() as run:
        resident = allocator._resident()
    assert run.applied and run.max_resident <= allocator.RESIDENT_SHARE * (resident + limit) + 2**20


def test_generation_times_no_more_threads_than_the_cores_it_may_run_on(monkeypatch):
    """Generation timed torch's thread count against 1 whatever the affinity (training did not, since this session):
    on one usable core it runs on 1 thread without timing two."""
    from virtualcell import generation

    monkeypatch.setattr(kernels, "usable_cores", lambda: 1)
    with generation.torch_threads(2):
        assert generation._pick_threads(None, 8, torch.device("cpu"), 0) == 1
    with generation.torch_threads(1):
        assert generation._pick_threads(None, 8, torch.device("cpu"), 0) is None
