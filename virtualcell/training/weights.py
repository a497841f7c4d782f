"""Response-loss weights: more weight on the genes that perturbations move.

A response sentence is mostly the target cell's identity: which genes it expresses and in
what order. What a perturbation changes is a handful of genes' places in that order. An
unweighted loss spends nearly all of its gradient on the identity, and a small model learns
the average perturbed cell (the "mode collapse" of perturbation models). Here every target
token of a gene-level response is weighted by how much perturbations move its gene in the
training cells::

    weight(g) = 1 + strength * r(g) / mean(r)

where ``r(g)`` is the root mean, over the (context, perturbation) groups, of the squared
shift of the group's mean log expression from its context's controls, less the part that
sampling noise alone would give (the squared standard error of the two means). Genes no
perturbation moves get weight about 1; end-of-sentence and every non-gene token keep 1. The
loss is then the weighted mean of the tokens' cross-entropies.

Computed from the training cells only (never the validation or verdict cells), and from
labels, not from any held-out score: nothing is tuned to a protocol.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["responsiveness", "token_weights"]


def responsiveness(X: sp.spmatrix | np.ndarray, labels: np.ndarray, contexts: np.ndarray,
                   is_control: np.ndarray) -> np.ndarray:
    """Per gene, the root mean square over (context, perturbation) groups of the noise-corrected
    mean shift from the context's controls (log expression units; zeros where no group has both
    at least 2 cells and 2 controls in its context).

    Parameters
    ----------
    X
        Cells x genes, log expression.
    labels, contexts, is_control
        Per cell: its perturbation label, its context (one value for all cells where there is
        no context) and whether it is a control.
    """
    from ..evaluate._data import group_moments

    labels, contexts, is_control = np.asarray(labels), np.asarray(contexts), np.asarray(is_control, dtype=bool)
    n = X.shape[0]
    if not (labels.shape == contexts.shape == is_control.shape == (n,)):
        raise ValueError(f"labels, contexts and is_control need one entry per cell ({n}).")
    _, ctx = np.unique(contexts, return_inverse=True)
    _, lab = np.unique(labels, return_inverse=True)
    n_labels = int(lab.max()) + 1 if n else 1
    c_keys, c_mean, c_var, c_n = group_moments(X[is_control], ctx[is_control])
    control_of = {int(k): i for i, k in enumerate(c_keys) if c_n[i] >= 2}
    total = np.zeros(X.shape[1])
    groups = 0
    keys, g_mean, g_var, g_n = group_moments(X[~is_control], (ctx * n_labels + lab)[~is_control])
    for key, mean, var, size in zip(keys, g_mean, g_var, g_n):
        c = control_of.get(int(key) // n_labels)
        if c is None or size < 2:
            continue
        total += np.maximum((mean - c_mean[c]) ** 2 - var / size - c_var[c] / c_n[c], 0.0)
        groups += 1
    return np.sqrt(total / groups) if groups else total


def token_weights(resp: np.ndarray, gene_tokens: np.ndarray, vocab_size: int, strength: float) -> torch.Tensor:
    """A weight per vocabulary token: ``1 + strength * resp / mean(resp)`` for gene ``i``'s token
    ``gene_tokens[i]``, 1 for every other token (and for every gene where nothing moves)."""
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}.")
    resp = np.asarray(resp, dtype=np.float64)
    if resp.shape != np.asarray(gene_tokens).shape:
        raise ValueError(f"{resp.size} gene responsiveness values for {np.asarray(gene_tokens).size} gene tokens.")
    w = torch.ones(vocab_size, dtype=torch.float32)
    scale = float(resp.mean()) if resp.size else 0.0
    if strength > 0 and scale > 0:
        w[torch.as_tensor(np.asarray(gene_tokens, dtype=np.int64))] = torch.as_tensor(
            1.0 + strength * resp / scale, dtype=torch.float32)
    return w
