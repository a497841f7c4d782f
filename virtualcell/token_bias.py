"""A learned bias over the genes for each token that names a perturbation.

A perturbation's mean effect reaches a language model only through attention to the prompt
tokens that name it, and a small model on a CPU learns small shifts that way slowly: on a drug
screen at three doses across four patients (``experiments/user_files.py``) a 4-minute model's
predicted effects correlated 0.09 with the measured ones where the other patients' mean effect
reached 0.49 (``experiments/results/attempts/token_bias/``).

So the model may carry, for every prompt token that is not a gene (:func:`bias_tokens`: a drug, a
cytokine, a label, a trained target's own token, a dose, the kind tokens ``<ko>``/``<drug>``..., the
control and generic conditions), a vector over the vocabulary that is added to the logits of every
response token written under a prompt that holds it: in the training loss and in generation alike,
as the target offsets (:mod:`virtualcell.target_offsets`) are. A perturbation named by several
tokens (``<drug> <drug:X> <dose:1> <dose:drug:X:1>``, or the two parts of a combination) gets the sum
of theirs; a knockout never trained on, named by its kind and its gene, gets its kind's vector, which
learns what knockouts share; guidance scales the difference with the generic condition's vector like
the rest of what the perturbation does. (A table over the name tokens alone, without the kind,
shared-dose, control and generic rows, was tried: its verdicts were lower on knockout and cytokine
screens and much higher on protocol 2's pairs; ``attempts/token_bias/README.md``.)

The table starts at 0 (the model without it) and lives on the language model as one extra
parameter (with a buffer mapping token ids to its rows), so the optimizer, gradient clipping and
checkpoints handle it with the rest (its weight decay is the model's unless ``TrainConfig.token_bias_decay`` gives
it one of its own: over the bundled recipe's 10,000 steps the table kept growing at the model's 0.01,
``attempts/token_bias/bundled/``); :meth:`virtualcell.model.C2SModel.save` writes it beside the
weights (``token_bias.npy``, its tokens in ``virtualcell.json``), which stay a plain Hugging Face
checkpoint. Only gene-level prompts have it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import non_finite

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["PARAMETER", "ROWS", "FILE", "MAX_ENTRIES", "bias_tokens", "attach", "of", "without", "row_tokens",
           "bias", "add", "table"]

PARAMETER = "virtualcell_token_bias"
ROWS = "virtualcell_token_bias_rows"  # vocabulary-long: each token's row of the table, -1 for a token without one
FILE = "token_bias.npy"
# the table is (named tokens x vocabulary); beyond this many entries (a genome-wide screen with a token per target)
# a run trains without it rather than hold a dense table that size and its optimizer state
MAX_ENTRIES = 16_000_000
# Unlike the target offsets, the entries are not scaled up to move faster than the network's weights: on the drug
# screen's validation split a table moving 4x faster scored a higher error (attempts/token_bias/)


def bias_tokens(fmt) -> list[str]:  # noqa: ANN001
    """The tokens of a gene-level prompt format that get a row: every token before the first gene's (the special,
    kind, dose, time, control and generic tokens and the names of the trained perturbations), in id order;
    ``[]`` for a format without gene tokens (a text model)."""
    token_id = getattr(fmt, "token_id", None)
    gene_tokens = getattr(fmt, "gene_tokens", None)
    if token_id is None or gene_tokens is None or not len(gene_tokens):
        return []
    first = int(np.min(gene_tokens))
    return [t for t, i in sorted(token_id.items(), key=lambda kv: kv[1]) if i < first]


def attach(lm, token_ids: Sequence[int], values: np.ndarray | None = None) -> torch.nn.Parameter:  # noqa: ANN001
    """Give ``lm`` the table (one row for each of ``token_ids``, in that order, x its vocabulary; zeros, or
    ``values``) and the buffer that maps a token id to its row; returns the parameter."""
    import torch

    vocab = lm.get_output_embeddings().weight.shape[0]
    ids = np.asarray(list(token_ids), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab or np.unique(ids).size != ids.size):
        raise ValueError(f"token ids must be distinct and within the vocabulary of {vocab}.")
    ref = next(lm.parameters())
    shape = (int(ids.size), vocab)
    if values is not None:
        values = np.asarray(values)
        if values.shape != shape:
            raise ValueError(f"token bias of shape {values.shape}, expected {shape}.")
        bad = non_finite(values)  # (a NaN row made every sentence under its token NaN logits)
        if bad:
            raise ValueError(f"token bias: {bad}")
        values = values.astype(np.float32)
        start = torch.as_tensor(values, device=ref.device)
    else:
        start = torch.zeros(shape, dtype=torch.float32, device=ref.device)
    rows = torch.full((vocab,), -1, dtype=torch.long, device=ref.device)
    rows[torch.as_tensor(ids, device=ref.device)] = torch.arange(ids.size, device=ref.device)
    lm.register_buffer(ROWS, rows, persistent=False)
    param = torch.nn.Parameter(start)
    lm.register_parameter(PARAMETER, param)
    return param


def of(lm) -> tuple[torch.nn.Parameter, torch.Tensor] | None:  # noqa: ANN001
    """``(table, rows)`` of ``lm`` (the parameter and the token-to-row map), or ``None`` where it has none."""
    param = getattr(lm, PARAMETER, None)
    return None if param is None else (param, getattr(lm, ROWS))


def table(lm) -> np.ndarray | None:  # noqa: ANN001
    """The table as a float32 array (named tokens x vocabulary), or ``None``."""
    found = of(lm)
    return None if found is None else found[0].detach().float().cpu().numpy()


def without(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a state dict) without the table."""
    return {k: v for k, v in state.items() if k not in (PARAMETER, ROWS)}


def row_tokens(tokens: Sequence[Sequence[int]], device: torch.device | str = "cpu") -> torch.Tensor:
    """Each row's prompt tokens as a padded ``rows x most`` tensor (``-1`` pads)."""
    import torch

    width = max((len(t) for t in tokens), default=0)
    out = torch.full((len(tokens), max(width, 1)), -1, dtype=torch.long)
    for r, t in enumerate(tokens):
        if len(t):
            out[r, : len(t)] = torch.as_tensor(list(t), dtype=torch.long)
    return out.to(device)


def bias(found: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``rows x vocabulary``: the sum of the table's rows of each row's tokens (tokens without a row and pads add
    nothing); differentiable in the table."""
    param, index = found
    idx = index[rows.clamp(min=0)].masked_fill(rows < 0, -1)
    picked = param[idx.clamp(min=0)] * (idx >= 0)[..., None].to(param.dtype)
    return picked.sum(dim=1)


def add(logits: torch.Tensor, found: tuple[torch.Tensor, torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """``logits`` (rows x vocabulary, or rows x positions x vocabulary) with each row's bias added."""
    b = bias(found, rows).to(logits.dtype)
    return logits + (b[:, None, :] if logits.dim() == 3 else b)
