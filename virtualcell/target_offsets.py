"""A learned logit offset on the gene that a genetic perturbation names.

A knockout's own gene is gone from the knocked-out cells, and a CRISPRa target rises to the
top of its cell. A gene-level model reads the target as a token of its prompt, yet a
7-minute model barely learns to stop writing it: on the synthetic screen (seed 1) it wrote
a knocked-out gene in 78% of its sentences where the measured cells never hold it, and the
knockouts of non-regulators, whose whole effect is their own gene, ranked near zero
(``experiments/results/attempts/target_offsets/``).

So the model carries one number per genetic kind (knockout, knockdown, activation), added
to the logit of each gene the prompt perturbs, at every step of the response: in the
training loss and in generation alike. The numbers start at 0 and the training pairs move
them (a knockout's goes negative, an activation's positive; a kind the data never holds
stays 0, which is the model without them). They live on the language model as one extra
parameter, so the optimizer, gradient clipping, checkpoints and the kept best weights
handle them with the rest; :meth:`virtualcell.model.C2SModel.save` writes them into the
codec file (``virtualcell.json``) instead of the weights file, which stays a plain
Hugging Face checkpoint.

Only gene-level prompts name a target by one token (:meth:`PromptFormat.named_targets`);
text prompts name none, and nothing changes for them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["KINDS", "PARAMETER", "SCALE", "attach", "of", "values", "moved", "without", "row_tensors", "row_bias", "add"]

KINDS = ("knockout", "knockdown", "activation")  # index = the kind's slot in the parameter
PARAMETER = "virtualcell_target_offsets"
# The parameter holds offset / SCALE: Adam moves a parameter by about the learning rate a step whatever its
# gradient, and at a new model's 3e-3 an offset would need thousands of steps to reach the -5 that keeps a
# gene out of a sentence (e^-5); scaled, a few hundred steps of the pair phase can.
SCALE = 10.0


def attach(lm, offsets: Mapping[str, float] | None = None) -> torch.nn.Parameter:  # noqa: ANN001
    """Give ``lm`` the offsets parameter (zeros, or ``offsets`` by kind name) and return it."""
    import torch

    unknown = set(offsets or {}) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown target-offset kinds {sorted(unknown)}; known: {', '.join(KINDS)}.")
    ref = next(lm.parameters())
    start = torch.tensor([float((offsets or {}).get(k, 0.0)) / SCALE for k in KINDS], dtype=torch.float32,
                         device=ref.device)
    param = torch.nn.Parameter(start)
    lm.register_parameter(PARAMETER, param)
    return param


def of(lm) -> torch.nn.Parameter | None:  # noqa: ANN001
    """The offsets parameter of ``lm``, or ``None`` where it has none."""
    return getattr(lm, PARAMETER, None)


def values(lm) -> dict[str, float] | None:  # noqa: ANN001
    """The offsets by kind name (logit units), or ``None`` where ``lm`` has none."""
    p = of(lm)
    return None if p is None else {k: round(float(v) * SCALE, 4) for k, v in zip(KINDS, p.detach().cpu())}


def moved(offsets: Mapping[str, float] | None) -> str:
    """The kinds whose offset left 0, as ``"knockout -17.22, activation +8.35"``; ``""`` where none did."""
    return ", ".join(f"{k} {v:+.2f}" for k, v in (offsets or {}).items() if v != 0)


def without(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` (a state dict) without the offsets: what a plain Hugging Face model loads."""
    return {k: v for k, v in state.items() if k != PARAMETER}


def row_tensors(named: Sequence[Sequence[tuple[int, int]]], device: torch.device | str = "cpu"
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Each row's named targets as padded ``(tokens, kinds, valid)`` tensors (rows x most targets), or
    ``None`` where no row names one. ``named[r]`` lists row ``r``'s ``(token, kind index)`` pairs."""
    import torch

    width = max((len(n) for n in named), default=0)
    if width == 0:
        return None
    tok = torch.zeros((len(named), width), dtype=torch.long)
    kind = torch.zeros((len(named), width), dtype=torch.long)
    valid = torch.zeros((len(named), width), dtype=torch.bool)
    for r, pairs in enumerate(named):
        for i, (t, k) in enumerate(pairs):
            tok[r, i], kind[r, i], valid[r, i] = int(t), int(k), True
    return tok.to(device), kind.to(device), valid.to(device)


def row_bias(param: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor], vocab: int) -> torch.Tensor:
    """``(rows x vocab)``: each row's offsets on its named genes, 0 elsewhere (differentiable in ``param``)."""
    import torch

    tok, kind, valid = rows
    vals = (param * SCALE).to(torch.float32)[kind] * valid
    return torch.zeros((tok.shape[0], vocab), dtype=vals.dtype, device=vals.device).scatter_add(1, tok, vals)


def add(logits: torch.Tensor, param: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``logits`` (rows x vocab, or rows x positions x vocab) with each row's offsets added."""
    bias = row_bias(param, rows, logits.shape[-1]).to(logits.dtype)
    return logits + (bias[:, None, :] if logits.dim() == 3 else bias)
