"""The response-only loss of a packed batch.

Two passes through the model: the shared prompts once (the prefix pass, no logits), then
every pair's segment with its group's prefix keys/values as the cache. Logits are computed
only at positions that have a target. For gene-level models the loss also applies the two
rules generation applies: only genes (and end-of-sentence) may be written, and never a gene
already written in the same response. So the model spends no capacity on what decoding
enforces anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import target_offsets, token_bias
from ..generation import _cache_kwarg, _cache_of
from .batching import Batch

__all__ = ["response_loss", "seen_before", "Objective"]


def _logits(lm, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: ANN001
    """Logits at the positions that have a target anywhere in the batch, and those targets."""
    keep = torch.nonzero((batch.targets != -100).any(0)).flatten()
    kw = {}
    mask = batch.seg_mask
    if batch.prefix_ids is not None:
        base = lm.base_model
        p_pos = torch.arange(batch.prefix_ids.shape[1], device=batch.prefix_ids.device).expand_as(batch.prefix_ids)
        out = base(input_ids=batch.prefix_ids, attention_mask=batch.prefix_mask, position_ids=p_pos, use_cache=True)
        cache = _cache_of(out)
        cache.batch_select_indices(batch.cell_of_row)  # each row gets its cell's keys/values (a gather: gradients flow back)
        kw[_cache_kwarg(lm)] = cache
        mask = torch.cat([batch.prefix_mask[batch.cell_of_row], batch.seg_mask], dim=1)
    out = lm(input_ids=batch.seg_ids, attention_mask=mask, position_ids=batch.seg_pos, use_cache=bool(kw),
             logits_to_keep=keep, **kw)
    return out.logits.float(), batch.targets[:, keep]


def response_loss(lm, batch: Batch, *, allowed: torch.Tensor | None = None, no_repeat: bool = False,  # noqa: ANN001
                  weight: torch.Tensor | None = None, offsets: torch.Tensor | None = None,
                  near: tuple[torch.Tensor, torch.Tensor] | None = None,
                  bias: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """Mean cross-entropy over the batch's target tokens, and what it is the mean over: their count, or with
    ``weight`` their weights' sum (so that batches' losses combine exactly, e.g. across processes).

    Parameters
    ----------
    allowed
        Boolean over the vocabulary: the only tokens a response may hold (genes and
        end-of-sentence, for gene-level models); ``None`` for text models.
    no_repeat
        Give no probability to a token already written earlier in the same response.
    weight
        A weight per vocabulary token (:func:`~virtualcell.training.weights.token_weights`):
        the loss is then the mean of the target tokens' cross-entropies weighted by their
        tokens' weights. ``None``: every token weighs the same.
    offsets
        The model's target offsets (:mod:`virtualcell.target_offsets`), added to the logits of the
        genes each row's perturbation names (``batch.named``), as generation adds them.
    near
        The model's neighbour offsets (:func:`virtualcell.target_offsets.neighbours`), added with them.
    bias
        The model's token-bias table and its token-to-row map (:func:`virtualcell.token_bias.of`): each row's
        logits get the sum of the table's rows of its own prompt tokens (``batch.own``), as generation adds them.
    """
    logits, targets = _logits(lm, batch)
    valid = targets != -100
    vocab = logits.shape[-1]
    if offsets is not None and batch.named is not None:
        logits = target_offsets.add(logits, offsets, batch.named, near)
    if bias is not None and batch.own is not None:
        logits = token_bias.add(logits, bias, batch.own)
    # one mask, one fill; positions without a target keep their logits (a row with every token masked would give
    # NaN gradients even where the loss ignores it). No gather of the valid positions either: at thousands of genes
    # copying rows x positions x vocabulary out and scattering its gradient back cost a fifth of the step
    banned = None
    if allowed is not None:
        banned = ~allowed.to(logits.device)
    if no_repeat:
        seen = seen_before(targets, valid, vocab)
        banned = seen if banned is None else seen | banned
    if banned is not None:
        if banned.dim() == 3:
            banned &= valid[:, :, None]
        logits = logits.masked_fill(banned, float("-inf"))
    flat_targets = targets.reshape(-1)
    losses = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), flat_targets, ignore_index=-100,
                                               reduction="none")
    if weight is None:
        norm = valid.sum()
        loss = losses.sum() / norm
    else:
        w = weight.to(logits.device)[flat_targets.clamp(min=0)] * valid.reshape(-1)
        norm = w.sum()
        loss = (losses * w).sum() / norm
    if offsets is not None:  # a step that names no target still gives the parameter a (zero) gradient
        loss = loss + 0.0 * offsets.sum()
    if near is not None:
        loss = loss + 0.0 * near[0].sum()
    if bias is not None:  # (a step whose prompts name no trained perturbation, e.g. pre-training)
        loss = loss + 0.0 * bias[0].sum()
    return loss, float(norm) if weight is not None else int(norm)


def seen_before(target: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``seen[b, t, v]``: token ``v`` is a valid target of row ``b`` at a position before ``t``.

    Computed from each token's first valid position (a scatter-min over ``B x V``) and one
    broadcast comparison, instead of a cumulative sum over a ``B x T x V`` one-hot.
    """
    B, T = target.shape
    pos = torch.arange(T, device=target.device).expand(B, T)
    first = torch.full((B, vocab_size), T, dtype=torch.long, device=target.device)
    first.scatter_reduce_(1, target.clamp(min=0), torch.where(valid, pos, torch.full_like(pos, T)), reduce="amin")
    return first[:, None, :] < pos[:, :, None]


@dataclass
class Objective:
    """The training run's loss of a batch on ``lm``: :func:`response_loss` with the run's rules and extras.

    ``allowed`` (the tokens a response may write; ``None``: any) also turns on the no-repeat rule; ``weight`` are the
    training loss's token weights (the validation loss asks for the plain one: ``weighted=False``); ``offsets`` the
    model's target offsets; ``near`` and ``bias`` say whether the model has neighbour offsets and a token-bias table,
    which are looked up on ``lm`` at each call (moving the model to a device gives its buffers new tensors, where
    parameters keep their identity). ``precision`` is the autocast the kernel choice settles on (``fp32`` until
    then)."""

    lm: Any
    device: torch.device | str = "cpu"
    allowed: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    near: bool = False
    bias: bool = False
    precision: str = "fp32"

    def __call__(self, batch: Batch, weighted: bool = True) -> tuple[torch.Tensor, float]:
        from .kernels import autocast

        with autocast(torch.device(self.device), self.precision):
            return response_loss(self.lm, batch, allowed=self.allowed, no_repeat=self.allowed is not None,
                                 weight=self.weight if weighted else None, offsets=self.offsets,
                                 near=target_offsets.neighbours(self.lm) if self.near else None,
                                 bias=token_bias.of(self.lm) if self.bias else None)
