"""Shared fixtures: real small data, no network."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
# scripts the tests launch in subprocesses: importing one runs it, so --doctest-modules must not collect them
collect_ignore_glob = ["_*_worker.py"]


@pytest.fixture(scope="session")
def papalexi():
    """The embedded default dataset (20,729 cells x 299 genes, raw counts)."""
    import virtualcell as vc

    return vc.datasets.load("papalexi2021")


@pytest.fixture(scope="session")
def papalexi_small(papalexi):
    """2,000 cells of the embedded default, every perturbation present."""
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(papalexi.n_obs, 2000, replace=False))
    return papalexi[idx].copy()


def trained_tiny(adata, out, *, contract=None, **config):
    """A tiny model trained for two steps on ``adata`` into ``out`` (kinds from obs['perturbation_type'], no verdict;
    ``config`` overrides), loaded back: the recipe the dose and cytokine tests share."""
    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(**{**dict(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=2, batch_size=8, seed=0,
                                kind_key="perturbation_type", verdict_fraction=0.0), **config})
    train(adata, out=out, contract=contract, config=cfg, progress=False)
    return vc.C2SModel.load(out)


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data folder sits beside the repository)")
    return path


def log1p_median(adata):
    """``adata`` (counts) as scanpy's default ``normalize_total`` (each cell to the median total, not 1e4) then
    ``log1p`` leaves it, by hand: the log-normalized file a user most often has."""
    import scipy.sparse as sp

    X = sp.csr_matrix(adata.X, dtype=np.float64)
    totals = np.asarray(X.sum(axis=1)).ravel()
    out = adata.copy()
    out.X = sp.csr_matrix(sp.diags(np.median(totals) / totals) @ X).log1p().astype(np.float32)
    return out


@pytest.fixture(scope="session")
def kang_harmony():
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(shared_file("kang2018_ifnb_pbmc_harmony_2000cells.h5ad"))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, papalexi):
    """A tiny gene-level model trained by the project's own code on 1,200 embedded cells."""
    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(papalexi.n_obs, 1200, replace=False))
    data = papalexi[idx].copy()
    out = tmp_path_factory.mktemp("tiny_model")
    cfg = TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=12, eval_every=6,
                      save_every=6, batch_size=8, warmup_steps=2, seed=0)
    train(data, out=out, config=cfg, progress=False)
    return vc.C2SModel.load(out), out, data


@pytest.fixture
def model_dir(tiny_model, tmp_path):
    """A copy of the tiny model's folder (weights, codec, token bias, verdict) without its training checkpoint, for a
    test to damage or write into."""
    import shutil

    _, out, _ = tiny_model
    dst = tmp_path / "model"
    shutil.copytree(out, dst, ignore=shutil.ignore_patterns("last"))
    return dst
