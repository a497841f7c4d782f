"""The demo: a real screen with the bundled model on the embedded default, checked against held-out data.

The bundled model was trained on the Papalexi 2021 knockout screen with biological
replicate ``rep_3`` held out. The demo

1. takes control cells of ``rep_3`` as the baseline population (the model never saw them),
2. screens all 25 knockouts the model knows, ranking them by predicted effect size,
3. writes the results folder and a plot of the top hits,
4. compares the predicted ranking with the measured, noise-corrected effect sizes in
   ``rep_3`` (on the scale of the ranking's ``l2_delta_corrected``, so they are printed beside it) (against the other ``rep_3`` control cells, independent of the baseline), and
   with the replicate-vs-replicate agreement of the measured data (the ceiling): the
   served prediction (blended with the training baseline when the checkpoint's validation
   verdict says so) and the pure model, side by side.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["run_demo", "DemoResult", "HELDOUT"]

HELDOUT = ("bio_rep", "rep_3")


@dataclass
class DemoResult:
    screen: Any
    spearman_model: float  # the served prediction (blended when the checkpoint's verdict fitted a weight < 1)
    spearman_ceiling: float
    spearman_size_only: float
    measured: Any
    seconds: float
    out: Path
    spearman_pure: float = float("nan")  # the pure model's noise-corrected effect sizes
    verdict: dict | None = None  # the model's validation verdict (None: the checkpoint has none)
    blend_weight: float | None = None  # the weight served on the model's delta (None: the pure model)
    # ``measured`` by the ranking's perturbation names ("ko:STAT1"), on the scale of the ranking's l2_delta_corrected
    measured_by_perturbation: Any = None


def measured_effects(adata, contract, column: str, value: str, *, reference_cells: np.ndarray | None = None):  # noqa: ANN001, ANN201
    """Noise-corrected measured effect sizes in one replicate (``evaluate.effect_size``)."""
    from .evaluate import effect_size

    sub = adata[adata.obs[column].astype(str) == value]
    ref = None
    if reference_cells is not None:
        ref = adata[reference_cells]
        sub = sub[~sub.obs_names.isin(ref.obs_names)]
    table = effect_size(sub, perturbation_key=contract.perturbation_key, control=contract.control, reference=ref)
    return table.set_index("perturbation")["effect_size"]


def run_demo(*, out: str | Path = "virtualcell-demo", n_cells: int = 120, seed: int = 0, progress: bool = True,
             model_path: str | None = None, force: bool = False) -> DemoResult:
    """Run the demo screen; see the module docstring. ``force``: write into ``out`` even if
    virtualcell did not write it (see :func:`virtualcell.screen.run`)."""
    from scipy.stats import spearmanr

    from . import datasets
    from .contract import DataContract
    from .model import BUNDLED, C2SModel
    from .screen import run as screen
    from .simulator import Simulator

    t0 = time.perf_counter()
    adata = datasets.load(datasets.DEFAULT)
    contract = DataContract.from_adata(adata)
    model = C2SModel.load(model_path or BUNDLED)
    col, rep = HELDOUT
    held = (adata.obs[col].astype(str) == rep).to_numpy()
    ctrl = np.flatnonzero(held & contract.is_control(adata))
    rng = np.random.default_rng(seed)
    ctrl = rng.permutation(ctrl)
    n = min(n_cells, ctrl.size // 2)
    baseline_idx, reference_idx = np.sort(ctrl[:n]), np.sort(ctrl[n:])
    sim = Simulator(adata[baseline_idx].copy(), model, seed=seed)
    panel = model.perturbations.panel()  # each trained condition (a drug at each of its doses)
    result = screen(sim, panel, out=out, top=8, seed=seed, progress=progress, force=force)
    measured = measured_effects(adata, contract, col, rep, reference_cells=reference_idx)
    labels = model.perturbations.label_map(result.ranking["perturbation"])
    pred = result.ranking.assign(label=result.ranking["perturbation"].map(labels)).set_index("label")
    common = [p for p in pred.index if p in measured.index]
    rho_model = float(spearmanr(pred.loc[common, "l2_delta_corrected"], measured.loc[common]).statistic)
    rho_pure = float(spearmanr(pred.loc[common, "l2_delta_corrected_model"], measured.loc[common]).statistic)
    # the ceiling: how well one measured replicate ranks the other
    r1 = measured_effects(adata, contract, col, "rep_1")
    r2 = measured_effects(adata, contract, col, "rep_2")
    both = [p for p in r1.index if p in r2.index]
    rho_ceiling = float(spearmanr(r1.loc[both], r2.loc[both]).statistic)
    # a trivial reference: rank knockouts by how many training cells they have
    counts = adata.obs.loc[~held, contract.perturbation_key].astype(str).value_counts()
    rho_size = float(spearmanr(counts.reindex(common).fillna(0), measured.loc[common]).statistic)
    by_name = pred.reset_index().set_index("perturbation")["label"].map(measured)
    return DemoResult(result, rho_model, rho_ceiling, rho_size, measured, time.perf_counter() - t0, Path(out),
                      spearman_pure=rho_pure, verdict=model.verdict, blend_weight=sim.blend_weight("auto"),
                      measured_by_perturbation=by_name)
