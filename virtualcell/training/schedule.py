"""The learning rate at a step: linear warm-up, then cosine decay to 10% of the peak.

The warm-up takes at most half of ``max_steps``, and ends at half of the time budget at the latest (the rate then
joins the time budget's decay, 55% of the peak at half the budget): a run shorter than its warm-up (``--max-steps
30`` beside the default 50 warm-up steps, or a ``--max-minutes`` that gives 20 steps) never decayed from it.

The decay runs over ``max_steps`` or over the time budget, whichever ends first, so a run
stopped by ``--max-minutes`` still ends at a low learning rate.
"""

from __future__ import annotations

import math

__all__ = ["lr_at", "warmup_of"]


def warmup_of(warmup_steps: int, max_steps: int) -> int:
    """The warm-up's steps in a run of ``max_steps``: ``warmup_steps``, at most half the run."""
    return min(warmup_steps, max_steps // 2)


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, time_fraction: float | None = None) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    ``time_fraction`` is the share of the time budget already spent (``None``: no budget).

    >>> lr_at(0, lr=1.0, warmup_steps=10, max_steps=100)
    0.1
    >>> round(lr_at(100, lr=1.0, warmup_steps=10, max_steps=100), 3)
    0.1
    >>> [round(lr_at(s, lr=1.0, warmup_steps=50, max_steps=4), 2) for s in range(4)]  # warm-up: half the run
    [0.5, 1.0, 1.0, 0.55]
    """
    warmup_steps = warmup_of(warmup_steps, max_steps)
    if step < warmup_steps and (time_fraction is None or time_fraction < 0.5):
        # (the time budget's share counts the setup before the first step too: it ends the warm-up, never speeds it)
        return lr * (step + 1) / warmup_steps
    # the decay: by steps past the warm-up, or by the time budget's share (a warm-up that half the budget ended
    # goes straight onto the time's decay, where any later step finds it too)
    frac = max(0.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    if time_fraction is not None:
        frac = max(frac, time_fraction)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))
