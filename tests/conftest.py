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


def shared_file(name: str) -> Path:
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"{path} is not here (the shared data folder sits beside the repository)")
    return path


@pytest.fixture(scope="session")
def kang_harmony():
    import anndata as ad

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ad.read_h5ad(shared_file("kang2018_ifnb_pbmc_harmony_2000cells.h5ad"))
