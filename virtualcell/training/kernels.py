"""Which attention kernel, arithmetic precision and thread count make a training step fastest here.

On a CPU the answer depends on the processor and on the model's shape: with small heads
the fused ("flash") attention kernels of ``sdpa`` lose to plain matrix products
(``eager``), and bfloat16 matrix products are several times faster than float32 where the
CPU has native bfloat16 instructions (AVX-512 BF16, AMX) and much slower where it has not.
Threads help only when the matrices are big enough and no other process
wants the cores. So nothing is hard-coded: on a CPU each candidate runs the first batch's
forward and backward pass twice and the fastest is kept. On a GPU the usual choice stands (``sdpa``,
bfloat16 where the GPU supports it). Either way, parameters and optimizer state stay in
float32 (mixed precision): only the forward and backward arithmetic changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

__all__ = ["Kernels", "choose", "autocast", "bf16_native", "usable_cores", "ThreadGuard", "decoder_layers",
           "compile_layers", "uncompile_layers", "eager", "COMPILE_AFTER_S"]

log = logging.getLogger(__name__)

ATTENTION = ("sdpa", "eager")
PRECISION = ("fp32", "bf16")


@dataclass(frozen=True)
class Kernels:
    attention: str  # "sdpa" or "eager"
    precision: str  # "fp32" or "bf16"
    threads: int  # torch threads (CPU)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def bf16_native(device: torch.device) -> bool:
    """Whether ``device`` does bfloat16 arithmetic natively (on a CPU: AVX-512 BF16 or AMX; without, emulated and slow).

    On CUDA it asks about that GPU (``cuda:1``, not the current one) and leaves emulation out: torch's default
    answer counts bfloat16 emulated on a T4 or V100 (compute capability below 8) as supported, where float16 is
    several times faster."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):
            return False
    return False


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity where the system keeps one (``taskset``, a Slurm job's or
    a container's cpuset: 4 of a node's 64 cores are 4), else every core the machine has."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (macOS and Windows keep none)
        return max(1, os.cpu_count() or 1)


def _set_attention(lm, name: str) -> None:  # noqa: ANN001
    lm.set_attn_implementation(name)


def _supports_sdpa(lm) -> bool:  # noqa: ANN001
    """Whether ``lm`` may use torch's scaled_dot_product_attention: transformers allows it, and the model caps no
    attention logits (:func:`~virtualcell.model.caps_attention`, Gemma-2's: transformers 4.56 to 5.20 allowed sdpa
    for Gemma-2 and dropped the cap without a word)."""
    from ..model import caps_attention

    return not caps_attention(lm) and bool(getattr(lm, "_supports_sdpa", True))


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


@contextlib.contextmanager
def _probing(lm) -> Iterator[None]:  # noqa: ANN001
    """Leave no gradient and no changed mode behind."""
    was_training = lm.training
    try:
        yield
    finally:
        lm.zero_grad(set_to_none=True)
        lm.train(was_training)


def choose(lm, device: torch.device, loss_of: Callable[[], torch.Tensor], *, attention: str = "auto",  # noqa: ANN001
           precision: str = "auto", threads: int | None = None,
           agree: Callable[[Kernels], Kernels] | None = None) -> Kernels:
    """Pick (and set: on ``lm`` and ``torch.set_num_threads``) the attention kernel, precision and thread count.

    ``"auto"`` (``threads=None``) measures on a CPU: threads 1 against ``torch.get_num_threads()`` (so a caller's
    ``torch.set_num_threads`` caps it), at most :func:`usable_cores`. ``loss_of()`` computes the loss of a
    representative batch with the model as it is set. The caller restores the thread setting
    when it is done (:func:`virtualcell.generation.torch_threads`). ``agree`` turns this process's pick
    into the one every process of a multi-process launch sets (the main process's), so that they compute alike.
    """
    for value, allowed, what in ((attention, ATTENTION, "attention"), (precision, PRECISION, "precision")):
        if value != "auto" and value not in allowed:
            raise ValueError(f"Unknown {what} {value!r}; use auto or one of {', '.join(allowed)}.")
    if precision == "bf16" and not bf16_native(device):
        log.warning("bf16 was asked for, but %s has no native bfloat16 arithmetic: it will be slow", device)
    attn = [attention] if attention != "auto" else (["sdpa"] if device.type != "cpu" else list(ATTENTION))
    if not _supports_sdpa(lm):  # (Gemma-2: transformers refuses sdpa for its logit soft-capping)
        if attention == "sdpa":
            from ..errors import TrainingError

            from ..model import caps_attention

            why = ("caps its attention logits (attn_logit_softcapping), which sdpa attention drops" if caps_attention(lm)
                   else f"does not support sdpa attention in transformers {_transformers_version()}")
            raise TrainingError(f"{type(lm).__name__} {why}: use --attention eager (attention='eager') or auto.")
        attn = ["eager"]
    if precision != "auto":
        prec = [precision]
    elif device.type != "cpu":
        prec = ["bf16"] if bf16_native(device) else ["fp32"]
    else:
        prec = ["fp32", "bf16"] if bf16_native(device) else ["fp32"]
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}.")
        n_threads = [int(threads)]
    elif device.type == "cpu":  # 1, or as many as torch is set to use (a caller's set_num_threads caps it) and the
        # process may run on: timing more threads than cores measured threads waiting on each other, not a choice
        n_threads = sorted({1, min(torch.get_num_threads(), usable_cores())})
    else:
        n_threads = [torch.get_num_threads()]
    candidates = [Kernels(a, p, t) for a in attn for p in prec for t in n_threads]
    if len(candidates) == 1:
        _set_attention(lm, candidates[0].attention)
        torch.set_num_threads(candidates[0].threads)
        return candidates[0]
    # (seconds to a minute before the first step's bar, said only afterwards: a person saw nothing happen)
    log.info("timing %d training kernels (attention/precision/threads) on the first batch before the first step",
             len(candidates))
    timings = {}
    with _probing(lm), torch.enable_grad():  # (the backward pass needs gradients, whatever the caller's mode)
        lm.train()
        for k in candidates:
            _set_attention(lm, k.attention)
            torch.set_num_threads(k.threads)
            best = float("inf")
            for _ in range(2):  # the first run warms up the kernels
                t = time.perf_counter()
                with autocast(device, k.precision):
                    loss = loss_of()
                loss.backward()
                best = min(best, time.perf_counter() - t)
                lm.zero_grad(set_to_none=True)
            timings[k] = best
    pick = min(timings, key=timings.get)
    if agree is not None:
        pick = agree(pick)
    _set_attention(lm, pick.attention)
    torch.set_num_threads(pick.threads)
    log.info("training kernels: %s", ", ".join(f"{k.attention}/{k.precision}/{k.threads} thread(s) {t * 1000:.0f} ms"
                                               for k, t in timings.items()))
    return pick


class ThreadGuard:
    """Drop to one thread when multi-threaded steps become much slower than they were.

    The thread count is measured once, on an idle start. If another process later takes a
    core, threads that wait for each other spin instead of working (seen on a 2-core machine:
    a 2-thread run beside one busy process became many times slower, where one thread would
    lose about half). The guard keeps the median of the first ``window`` step
    times of each phase (pre-training and pair steps cost differently) as the reference; when
    the median of the last ``window`` steps exceeds ``slowdown`` times it, it sets one thread,
    once, and says so.
    """

    def __init__(self, threads: int, *, slowdown: float = 4.0, window: int = 20) -> None:
        self.threads, self.slowdown, self.window = int(threads), float(slowdown), int(window)
        self._phase: object = None
        self._reference: float | None = None
        self._recent: list[float] = []
        self.fell_back_at: int | None = None

    def observe(self, step: int, seconds: float, phase: object = None) -> bool:
        """Record one step's time; returns True when this step made the guard drop to one thread."""
        if self.threads <= 1 or self.fell_back_at is not None:
            return False
        if phase != self._phase:
            self._phase, self._reference, self._recent = phase, None, []
        self._recent = (self._recent + [float(seconds)])[-self.window :]
        if len(self._recent) < self.window:
            return False
        median = sorted(self._recent)[self.window // 2]
        if self._reference is None:
            self._reference = median
            return False
        if median > self.slowdown * self._reference:
            log.warning("training steps became %.0fx slower than at the start with %d threads (another process is "
                        "using the cores?): continuing on 1 thread from step %d", median / self._reference,
                        self.threads, step)
            torch.set_num_threads(1)
            self.fell_back_at, self.threads = step, 1
            return True
        return False


# Compiling the layers makes a training step ~1.25-1.4x faster on a CPU, but costs ~25 s per layer on
# a 2-core machine the first time (each layer meets the key/value cache in its own state, so each
# compiles its own graphs; ~4 s per layer once the inductor cache holds them). Cold, it pays for
# itself after ~9 minutes of steps for the 4-layer default; "auto" compiles runs expected to last
# at least COMPILE_AFTER_S per layer (experiments/bench_training.py measures both sides).
COMPILE_AFTER_S = 150.0


def decoder_layers(lm) -> torch.nn.ModuleList:  # noqa: ANN001
    """The model's stack of decoder layers (the module list as long as ``config.num_hidden_layers``)."""
    n = int(lm.config.num_hidden_layers)
    for module in lm.base_model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"{type(lm).__name__} has no list of {n} decoder layers to compile.")


def compile_layers(lm, probe: Callable[[], None]) -> float | None:  # noqa: ANN001
    """Compile each decoder layer (``torch.compile``, dynamic shapes) and run ``probe`` to build the kernels.

    Only the layers are compiled (the loss and the cache handling around them stay plain
    Python). Raises dynamo's recompile limit, process-wide, to hold every layer's graphs. ``probe()`` runs the passes training will run (a
    forward and backward pass of each batch kind) so that the compile time is spent, and
    any compiler failure (no C++ compiler, an unsupported operator) met, here. Returns the
    seconds it took, or ``None`` after a failure, with the layers plain again and a warning.
    """
    layers = decoder_layers(lm)
    # every layer compiles a graph per pass kind (prefix, segment, lone sentence): keep them all compiled
    needed = 4 * len(layers) + 4
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, needed)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, 4 * needed)
    t = time.perf_counter()
    try:
        for layer in layers:
            layer.compile(dynamic=True)
        probe()
    except Exception as exc:  # noqa: BLE001  (any compiler failure falls back to the plain layers)
        uncompile_layers(lm)
        log.warning("compiling the model failed (%s: %s); training continues uncompiled", type(exc).__name__,
                    str(exc).splitlines()[0] if str(exc) else "")
        return None
    finally:
        lm.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t
    log.info("compiled the %d decoder layers in %.1f s", len(layers), seconds)
    return seconds


def uncompile_layers(lm) -> None:  # noqa: ANN001
    """Undo :func:`compile_layers`: the layers run plain again (generation and saving see the plain model)."""
    for layer in decoder_layers(lm):
        layer._compiled_call_impl = None


def eager() -> contextlib.AbstractContextManager:
    """Run compiled modules plain inside the block (validation: not worth compiling a graph for)."""
    return torch.compiler.set_stance("force_eager")
