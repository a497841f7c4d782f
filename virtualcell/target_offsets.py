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

**Neighbour offsets** (``TrainConfig(neighbour_offsets=True)``, an option) carry the same idea to the
genes that move with the target: one more number per kind, times each gene's correlation with the
perturbed gene across the training cells (0 on the gene itself, which its own offset covers), added
to every gene's logit. A knockout never trained on then lowers what goes with its gene, as the
``coexpression`` baseline predicts (:func:`virtualcell.evaluate.baselines.coexpression`). The
correlations come from the covariance factor the checkpoint keeps for that baseline
(:attr:`virtualcell.validation.Baselines.response`), held on the language model as a buffer that is
not saved with the weights (:func:`attach_neighbours`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .errors import finite_number

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["KINDS", "PARAMETER", "NEIGHBOURS", "SCALE", "attach", "of", "values", "moved", "without", "row_tensors",
           "row_bias", "add", "attach_neighbours", "neighbours", "neighbour_values", "token_factor", "neighbour_bias"]

KINDS = ("knockout", "knockdown", "activation")  # index = the kind's slot in the parameter
PARAMETER = "virtualcell_target_offsets"
NEIGHBOURS = "virtualcell_neighbour_offsets"  # the neighbour offsets' parameter (per kind)
FACTOR = "virtualcell_neighbour_factor"  # vocabulary x r: a gene token's row . another's = their genes' correlation
# The parameter holds offset / SCALE: Adam moves a parameter by about the learning rate a step whatever its
# gradient, and at a new model's 3e-3 an offset would need thousands of steps to reach the -5 that keeps a
# gene out of a sentence (e^-5); scaled, a few hundred steps of the pair phase can.
SCALE = 10.0


def attach(lm, offsets: Mapping[str, float] | None = None) -> torch.nn.Parameter:  # noqa: ANN001
    """Give ``lm`` the offsets parameter (zeros, or ``offsets`` by kind name) and return it. ``offsets`` of an
    unknown kind, or that are not finite numbers (a checkpoint's ``virtualcell.json`` edited or damaged), raise a
    ``ValueError`` that names them."""
    import torch

    _check(offsets, "target-offset")
    ref = next(lm.parameters())
    start = torch.tensor([float((offsets or {}).get(k, 0.0)) / SCALE for k in KINDS], dtype=torch.float32,
                         device=ref.device)
    param = torch.nn.Parameter(start)
    lm.register_parameter(PARAMETER, param)
    return param


def _check(offsets: Mapping[str, float] | None, what: str) -> None:
    """Refuse ``offsets`` (by kind name) of an unknown kind, or whose value is not a finite number: a NaN offset
    was served as it was, a string one read as its number."""
    if offsets is not None and not isinstance(offsets, Mapping):
        raise ValueError(f"the {what}s are {offsets!r}, not a number by kind ({', '.join(KINDS)}).")
    unknown = set(offsets or {}) - set(KINDS)
    if unknown:
        raise ValueError(f"Unknown {what} kinds {sorted(unknown)}; known: {', '.join(KINDS)}.")
    bad = {k: v for k, v in (offsets or {}).items() if not finite_number(v)}
    if bad:
        raise ValueError(f"the {what}s {bad} are not finite numbers.")


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
    return {k: v for k, v in state.items() if k not in (PARAMETER, NEIGHBOURS, FACTOR)}


def token_factor(response, gene_tokens, vocab: int) -> np.ndarray:  # noqa: ANN001
    """``vocab x r`` (float32): gene token ``gene_tokens[g]``'s row is gene ``g``'s row of the covariance factor
    ``response`` (genes x r, ``F @ F.T`` the covariance) over its standard deviation, so that two rows' dot product
    is their genes' correlation; 0 for other tokens and genes that do not vary."""
    F = np.asarray(response, dtype=np.float64)
    sd = np.sqrt((F * F).sum(axis=1))
    out = np.zeros((vocab, F.shape[1]), dtype=np.float32)
    out[np.asarray(gene_tokens)] = np.divide(F, sd[:, None], out=np.zeros_like(F), where=sd[:, None] > 1e-12)
    return out


def attach_neighbours(lm, factor, offsets: Mapping[str, float] | None = None) -> torch.nn.Parameter:  # noqa: ANN001
    """Give ``lm`` the neighbour offsets (zeros, or ``offsets`` by kind name) and the correlation ``factor``
    (:func:`token_factor`, a buffer not saved with the weights); returns the parameter."""
    import torch

    _check(offsets, "neighbour-offset")
    ref = next(lm.parameters())
    lm.register_buffer(FACTOR, torch.as_tensor(np.asarray(factor), dtype=torch.float32, device=ref.device),
                       persistent=False)
    start = torch.tensor([float((offsets or {}).get(k, 0.0)) / SCALE for k in KINDS], dtype=torch.float32,
                         device=ref.device)
    param = torch.nn.Parameter(start)
    lm.register_parameter(NEIGHBOURS, param)
    return param


def neighbours(lm) -> tuple[torch.Tensor, torch.Tensor] | None:  # noqa: ANN001
    """``(parameter, factor)`` of ``lm``'s neighbour offsets, or ``None`` where it has none."""
    param = getattr(lm, NEIGHBOURS, None)
    return None if param is None else (param, getattr(lm, FACTOR))


def neighbour_values(lm) -> dict[str, float] | None:  # noqa: ANN001
    """The neighbour offsets by kind name (logit units per unit of correlation), or ``None``."""
    found = neighbours(lm)
    return None if found is None else {k: round(float(v) * SCALE, 4) for k, v in zip(KINDS, found[0].detach().cpu())}


def neighbour_bias(found: tuple[torch.Tensor, torch.Tensor], rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                   vocab: int) -> torch.Tensor:
    """``(rows x vocab)``: each row's neighbour offset times every gene's correlation with each gene the row names
    (summed over them; 0 on the named gene itself), differentiable in the parameter."""
    import torch

    param, factor = found
    tok, kind, valid = rows
    corr = factor[tok] @ factor[:vocab].T  # rows x named x vocab
    corr = corr.scatter(2, tok[..., None], 0.0)
    vals = (param * SCALE).to(torch.float32)[kind] * valid  # rows x named
    return (vals[..., None] * corr).sum(dim=1)


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


def add(logits: torch.Tensor, param: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        near: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``logits`` (rows x vocab, or rows x positions x vocab) with each row's offsets added (and its neighbour
    offsets, with ``near``: :func:`neighbours`)."""
    bias = row_bias(param, rows, logits.shape[-1])
    if near is not None:
        bias = bias + neighbour_bias(near, rows, logits.shape[-1])
    bias = bias.to(logits.dtype)
    return logits + (bias[:, None, :] if logits.dim() == 3 else bias)
