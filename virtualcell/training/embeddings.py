"""Gene token embeddings that start from the data instead of from noise.

A new gene-level model knows nothing about genes: every gene token starts as an unrelated
random vector, and the few hundred optimizer steps a CPU affords must discover which genes
rise and fall together. The training cells already say it: the leading principal axes of
their log expression place co-expressed genes near each other (Ahlmann-Eltze et al. 2025: a
linear model on such embeddings beat the deep perturbation models). So the first half of
each gene token's embedding is its direction on those axes, scaled to the size of the random
initialization, and the second half stays random so that every gene keeps its own identity.
The embeddings are tied to the output head, so genes that go together also start with
similar output logits; a knockout names its gene's token, so a knocked-out gene brings its
co-expression position into the prompt too.

Not the default (``TrainConfig(gene_init="pca")`` or ``--gene-init pca`` opt in): it improved
the validation loss and verdict of the bundled model's recipe, but not the held-out protocols
(README, "Gene embeddings from the data").
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["pca_directions", "init_gene_embeddings"]


def pca_directions(X: sp.spmatrix | np.ndarray, k: int, *, seed: int = 0, max_cells: int = 5000) -> np.ndarray:
    """Each gene's loadings on the ``k`` leading principal axes of ``X`` (cells x genes, log expression).

    Rows are shrunk by ``norm / (norm + median norm)``: genes that vary a lot keep a unit-size
    direction, genes that barely vary (whose direction is noise) stay near zero. At most
    ``max_cells`` seeded cells are used. Returns ``genes x k`` float32.
    """
    n_cells, n_genes = X.shape
    if n_cells < 2 or n_genes < 2:
        raise ValueError(f"PCA gene embeddings need at least 2 cells and 2 genes, got {n_cells} x {n_genes}.")
    rng = np.random.default_rng([seed, 17])
    rows = np.sort(rng.choice(n_cells, max_cells, replace=False)) if n_cells > max_cells else np.arange(n_cells)
    A = X[rows]
    A = np.asarray(A.todense() if sp.issparse(A) else A, dtype=np.float32)
    A = A - A.mean(axis=0, keepdims=True)
    k_eff = int(min(k, A.shape[0] - 1, n_genes - 1))
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's random state untouched
        torch.manual_seed(seed)
        _, S, V = torch.svd_lowrank(torch.from_numpy(A), q=min(k_eff + 8, min(A.shape)), niter=4)
    load = (V[:, :k_eff] * S[:k_eff]).numpy() / np.sqrt(A.shape[0])  # gene loadings in expression units
    norm = np.linalg.norm(load, axis=1, keepdims=True)
    med = float(np.median(norm)) or 1e-12
    out = np.zeros((n_genes, k), dtype=np.float32)
    out[:, :k_eff] = load / (norm + med)
    return out


def init_gene_embeddings(lm, gene_token_ids: np.ndarray, directions: np.ndarray) -> None:  # noqa: ANN001
    """Write ``directions`` (genes x k) into the first ``k`` dimensions of the genes' input embeddings,
    scaled to the random initialization's size (``initializer_range`` per dimension)."""
    emb = lm.get_input_embeddings().weight
    k = directions.shape[1]
    if k > emb.shape[1]:
        raise ValueError(f"{k} embedding dimensions asked for, the model has {emb.shape[1]}.")
    scale = float(getattr(lm.config, "initializer_range", 0.02)) * np.sqrt(k)
    with torch.no_grad():
        emb[torch.as_tensor(gene_token_ids), :k] = torch.from_numpy(directions * scale).to(emb.dtype)
