"""The optimizer loop: batches in, steps out, under a step and a time budget.

Everything the loop needs comes in as arguments (the batch of a step, the loss, the
validation, the checkpoint writer), so the loop itself holds no data logic and can be
tested with any model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import TrainingError
from ..progress import library_bars, progress_bar
from .batching import Batch
from .schedule import lr_at

__all__ = ["LoopState", "Budget", "BestWeights", "fit", "validation_loss"]

log = logging.getLogger(__name__)


@dataclass
class LoopState:
    """What a checkpoint must hold to resume the loop exactly."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    # the step pre-training ended at (by its share of the steps or of the time budget): a resumed run with more
    # --max-steps goes on training pairs instead of going back to lone sentences for the longer run's share
    pretrain_end: int | None = None


@dataclass
class BestWeights:
    """The weights at the lowest validation loss so far: a copy in memory, and its step and loss.

    With ``TrainConfig(keep_best=True)`` the trainer ends on these instead of the last step's, so
    that a step budget too long for the data (the loss on held-out pairs rising again) cannot
    hand over an overfit model; the copy travels in the checkpoint, so a resumed run keeps it.
    """

    step: int = 0
    val_loss: float = math.inf
    state: dict[str, torch.Tensor] | None = None
    keep_state: bool = True  # False: the step and loss only (no copy of the weights)

    def observe(self, step: int, val_loss: float, module: torch.nn.Module) -> bool:
        """Note ``module``'s weights (a copy on the CPU) when ``val_loss`` is the lowest yet; returns whether it was."""
        if not math.isfinite(val_loss) or val_loss >= self.val_loss:
            return False
        self.step, self.val_loss = step, float(val_loss)
        if self.keep_state:
            module = getattr(module, "module", module)  # (a distributed wrapper's model)
            self.state = {k.replace("_orig_mod.", ""): v.detach().to("cpu", copy=True)
                          for k, v in module.state_dict().items()}
        return True

    def restore(self, module: torch.nn.Module) -> None:
        """Load the kept weights into ``module`` (the plain model: no compiled or distributed wrapper)."""
        if self.state is None:
            raise ValueError("BestWeights.restore: no weights kept (keep_state=False, or no validation loss yet).")
        module.load_state_dict(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "val_loss": self.val_loss, "state": self.state}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None, *, keep_state: bool = True) -> BestWeights:
        """A checkpoint's record (``None``: nothing yet); weights recorded without ``keep_state`` are not there."""
        if not d:
            return cls(keep_state=keep_state)
        best = cls(int(d["step"]), float(d["val_loss"]), d.get("state") if keep_state else None, keep_state)
        if keep_state and best.state is None:  # the run kept none before: start over from what comes next
            return cls(keep_state=keep_state)
        return best


@dataclass(frozen=True)
class Budget:
    """The run's limits: optimizer steps, pre-training steps, and wall time (seconds, from ``t_start``, after the
    ``before`` seconds a resumed run's earlier processes spent: an interrupted run goes on with what its budget has
    left, and its schedule where it was, instead of a second whole budget from the peak learning rate)."""

    max_steps: int
    pretrain_steps: int
    pretrain_fraction: float
    seconds: float | None
    t_start: float
    # under a multi-process launch: the largest of every process's value (each calls it at the same points), so
    # that all processes read one clock and end pre-training, set the learning rate and stop at the same step
    # (a process stopping alone would leave the others waiting in the next gradient exchange); None: the own clock
    agree: Callable[[float], float] | None = None
    before: float = 0.0
    reserved: float = 0.0  # seconds of --max-minutes kept for the validation verdict after training (not in seconds)

    def spent(self) -> float:
        return time.perf_counter() - self.t_start + self.before

    def fraction(self, seconds: float) -> float:
        """``seconds`` (of this process's clock) as a share of the budget, agreed between processes."""
        f = seconds / self.seconds
        return f if self.agree is None else self.agree(f)

    def time_fraction(self) -> float | None:
        return None if self.seconds is None else self.fraction(self.spent())


def validation_loss(module: torch.nn.Module, loss_of: Callable[[Batch], tuple[torch.Tensor, float]],
                    batches: Sequence[Callable[[], Batch]], *, mine: Callable[[int], bool] = lambda i: True,
                    total: Callable[[np.ndarray], np.ndarray] = lambda v: v) -> float:
    """The mean loss over the validation ``batches`` (each made when its turn comes), in eval mode, without gradients
    and in plain (eager) kernels; ``nan`` without any. ``loss_of`` returns a batch's mean loss and what it is the mean
    over. Under several processes each takes the batches ``mine(i)`` and ``total`` sums ``[loss sum, count]`` over
    them (:meth:`virtualcell.distributed.Split.sum`)."""
    from .kernels import eager

    if not batches:
        return float("nan")
    module.eval()
    loss_sum, count = 0.0, 0.0
    with torch.no_grad(), eager():
        for i, make in enumerate(batches):
            if not mine(i):
                continue
            loss, n = loss_of(make())
            loss_sum += float(loss) * n
            count += n
    module.train()
    loss_sum, count = np.asarray(total(np.array([loss_sum, count], dtype=np.float64))).reshape(-1)[:2]
    return float(loss_sum / max(count, 1))


def in_pretraining(step: int, state: LoopState, budget: Budget) -> bool:
    """Pre-training lasts its share of the steps, or of the time budget when that runs out first."""
    end = budget.pretrain_steps if state.pretrain_end is None else state.pretrain_end
    return step < end


def fit(
    lm: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    batch_at: Callable[[int, bool], Batch],
    loss_of: Callable[[Batch], tuple[torch.Tensor, int]],
    validate: Callable[[], float],
    checkpoint: Callable[[LoopState], None],
    state: LoopState,
    budget: Budget,
    lr: float,
    warmup_steps: int,
    eval_every: int,
    save_every: int,
    backward: Callable[[torch.Tensor], None] = lambda loss: loss.backward(),
    clip: Callable[[], None] | None = None,
    average: Callable[[float, float, float], tuple[float, float]] | None = None,
    on_log: Callable[[dict[str, float]], None] | None = None,
    progress: bool = True,
    on_step_time: Callable[[int, float, bool], None] | None = None,
    best: BestWeights | None = None,
) -> LoopState:
    """Run optimizer steps from ``state.step`` until ``budget`` ends; returns the final state.

    Each step: the batch of the step (pre-training or pairs), the learning rate of the
    schedule, loss, backward, gradient clipping, update. Every ``eval_every`` steps the
    validation loss is logged; every ``save_every`` steps ``checkpoint`` is called.
    ``on_step_time(step, seconds, pretrain)`` hears how long each step's work took. ``best``
    sees every validation loss and keeps the weights of the lowest (:class:`BestWeights`); the
    loop itself always ends on the last step's weights. ``average(loss, n, tokens)``, under a multi-process launch,
    replaces this process's gradients (of its mean ``loss`` over ``n``: its target tokens, or their weights' sum) by
    the whole batch's, before clipping, and returns the whole batch's loss and tokens read (which the history
    records).
    """
    bar = progress_bar(budget.max_steps, progress, "train", "step", initial=state.step)
    lm.train()
    tokens_seen, t_loop, first_step_s = 0, time.perf_counter(), None
    try:
        spent = budget.seconds is not None and budget.before > 0 and budget.fraction(budget.spent()) > 1.0
        if spent:  # a resumed run whose earlier processes used the budget up
            log.info("the time budget (%.1f s) was spent before step %d: nothing more to train", budget.seconds,
                     state.step)
        while state.step < budget.max_steps and not spent:
            step = state.step
            t_step = time.perf_counter()
            time_fraction = budget.time_fraction()  # (one agreed reading per step start)
            if (time_fraction is not None and state.pretrain_end is None and step < budget.pretrain_steps
                    and time_fraction > budget.pretrain_fraction):
                state.pretrain_end = step
                log.info("pre-training ends at step %d: its share of --max-minutes is used", step)
            pretrain = in_pretraining(step, state, budget)
            if not pretrain and state.pretrain_end is None:
                state.pretrain_end = step
            batch = batch_at(step, pretrain)
            rate = lr_at(step, lr=lr, warmup_steps=warmup_steps, max_steps=budget.max_steps,
                         time_fraction=time_fraction)
            for g in optimizer.param_groups:
                g["lr"] = rate
            loss, n_targets = loss_of(batch)
            backward(loss)
            loss_value, step_tokens = loss.item(), batch.n_tokens
            if average is not None:  # the whole batch's loss and tokens, from every process's share
                loss_value, step_tokens = average(loss_value, n_targets, step_tokens)
            if not math.isfinite(loss_value):  # (the job's loss: every process stops here together)
                raise TrainingError(
                    f"The training loss is {loss_value} at step {step + 1}: the run diverged, and a model trained on "
                    f"from here would be broken (its weights go {loss_value} too). Lower the learning rate (--lr; it "
                    f"was {rate:g} at this step) and train again from the start (--restart; resume=False): the last "
                    "checkpoint may hold diverging weights already.")
            if clip is not None:
                clip()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if on_step_time is not None:  # the step alone: no validation or checkpoint time
                on_step_time(step, time.perf_counter() - t_step, pretrain)
            state.step += 1
            tokens_seen += step_tokens
            elapsed = budget.spent()
            if first_step_s is None:
                first_step_s = time.perf_counter() - t_step
                # (agreed: every process stops here, or none; one stopping alone leaves the others in an exchange)
                if budget.seconds is not None and not budget.before and budget.fraction(elapsed) > 1.0:
                    total = budget.seconds + budget.reserved
                    kept = (f", of which {budget.reserved:.1f} s are kept for the validation verdict"
                            if budget.reserved else "")
                    raise TrainingError(
                        f"--max-minutes {total / 60:g} ({total:.1f} s{kept}) is too small: setting up took "
                        f"{elapsed - first_step_s:.1f} s and one optimizer step {first_step_s:.2f} s here. Give at least "
                        f"{math.ceil((elapsed * 20 + budget.reserved) / 60 * 10) / 10:g} minutes for a useful run."
                    )
            record: dict[str, Any] = {
                "step": state.step, "loss": loss_value, "lr": rate, "phase": 0.0 if pretrain else 1.0,
                "tokens_per_s": tokens_seen / max(1e-9, time.perf_counter() - t_loop), "elapsed_s": elapsed,
            }
            if state.step % eval_every == 0 or state.step == budget.max_steps:
                record["val_loss"] = validate()
                if best is not None:
                    best.observe(state.step, record["val_loss"], lm)
            state.history.append(record)
            if on_log is not None:
                on_log(record)
            bar.update(1)
            # refresh=False: the bar redraws at tqdm's own pace (every step forced a line into a redirected log)
            bar.set_postfix(loss=f"{record['loss']:.3f}", phase="pre" if pretrain else "pairs", refresh=False)
            if state.step % save_every == 0:
                with library_bars(False):  # transformers' shard bar, nested under ours, wrote cursor codes into logs
                    checkpoint(state)
            if budget.seconds is not None and budget.fraction(elapsed + (time.perf_counter() - t_step)) > 1.0:
                log.info("stopping at step %d: the time budget (%.1f s) is spent", state.step, budget.seconds)
                break
    finally:
        bar.close()
    if state.history and "val_loss" not in state.history[-1]:
        state.history[-1]["val_loss"] = validate()
        if best is not None:
            best.observe(state.step, state.history[-1]["val_loss"], lm)
    return state
