"""A tiny causal language model and the response loss computed by hand, pair by pair, for tests that check
the packed training loss (virtualcell.training.loss) and what it adds to the logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

PAD = 0


def tiny_lm(vocab: int = 40, seed: int = 0):  # noqa: ANN201
    """A 2-layer Llama over ``vocab`` tokens (``PAD`` pads), in eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


def loss_by_hand(lm, groups: Sequence, adjust: Callable[[Sequence[int], torch.Tensor], None]) -> torch.Tensor:  # noqa: ANN001
    """The mean cross-entropy of every group's responses, each pair fed as one whole sequence (shared + own +
    response); ``adjust(own, logits)`` changes a pair's logits in place first (what the loss adds for its prompt)."""
    losses = []
    for shared, pairs in groups:
        for own, response in pairs:
            seq = torch.tensor([list(shared) + list(own) + list(response)])
            logits = lm(input_ids=seq).logits[0, :-1].float().clone()
            adjust(own, logits)
            target = seq[0, 1:].clone()
            target[: len(shared) + len(own) - 1] = -100
            losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none")[target != -100])
    return torch.cat(losses).mean()
