"""The Simulator: a baseline population + a model → predicted responses to perturbations.

Prediction of cell *i* under perturbation *p* is calibrated against the model's own
control generation (README, "Fine-tune on your own screen")::

    r_ip = x_i + decode(gen(i, p)) − mean_k decode(gen_k(i, control))
    x̂_ip = max(0, r_ip) · s_p,   s_p = max(0, mean_i r_ip) / mean_i max(0, r_ip)   (per gene)

which cancels the drift of generated cells toward the training population. ``decode`` is the
model's (:meth:`C2SModel.decode`): the rank fit, then, where the training run's verdict chose
one, a gene map that predicts every gene from the decoded sentence (:mod:`virtualcell.gene_map`),
so that genes below the sentence's cut have an effect too. The
calibrated prediction under ``control`` is the baseline cell itself, so deltas are
against the baseline population. Expression cannot be negative, but clipping each
cell at 0 alone adds ``E[max(0, noise)] > 0`` to every gene a cell does not express:
the same spurious up-shift for every perturbation (it made the bundled model's deltas
correlate 0.72 with one another, against 0.19 unclipped and 0.12 measured). The per-gene
factor ``s_p`` (over the cells generated together, a chunk of ``cell_chunk``) gives
the clipped cells back the unclipped mean.

Results stream: cells are processed in chunks, every perturbation of a chunk shares
the chunk's prefix cache, and only per-perturbation sums are kept in memory (mean,
fraction expressing, variance, and per-bucket sums for resampling). Per-cell
predictions are kept in memory only when small, or written chunk by chunk to a
netCDF file and read back lazily.

Examples
--------
>>> import virtualcell as vc
>>> adata = vc.datasets.load()
>>> sim = vc.Simulator(adata[adata.obs.perturbation == "control"][:64], vc.model.bundled())
>>> res = sim.simulate(["STAT1", "ko:JAK2", "IFNGR1+IRF1"], seed=0)  # doctest: +SKIP
>>> res.aggregates["delta"].sel(perturbation="ko:STAT1")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .distributed import Split
from .contract import one_reading
from .errors import (DataError, ModelError, OutputError, ScreenError, VirtualCellWarning, VocabularyError, non_finite,
                     preview, user_stacklevel, whole_at_least)
from .perturbations import Combination, Perturbation, units_text
from .progress import progress_bar
from ._stats import calibrated, pca, unbiased_var
from .sentences import Vocabulary, encode, on_model_scale, require_in_memory, with_gene_key
from .validation import UNSEEN_BASELINES

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp
    import xarray as xr

    from .generation import GenerationConfig
    from .model import C2SModel
    from .screen import ScreenResult

__all__ = ["Simulator", "SimulationResult", "N_BUCKETS"]

log = logging.getLogger(__name__)
KEEP_EMBEDDED = 256  # predicted cells per perturbation kept embedded (the first ones), for the E-distance
_PROVENANCE = ("normalization", "scale_total", "dose_units", "model", "device", "dtype", "seed", "sentence_seed",
               "calibrated", "n_baseline_cells", "max_genes", "temperature", "guidance", "coexpression_prior", "composed",
               "control_samples", "samples", "blend_weight", "blend_weight_unseen", "baseline", "new_contexts",
               "absent_genes", "training_data_hash", "training_perturbed_data_hash", "model_weights", "model_serving",
               "virtualcell_version")
N_BUCKETS = 20  # cells are hashed into buckets; resampling buckets gives confidence intervals
MAX_IN_MEMORY = 50_000_000  # default of simulate(max_in_memory=): per-cell values kept in memory
CONTROL_SAMPLES = 4  # samples of each cell under control per sample under each perturbation (simulate's default)
MIN_RESCALE_CELLS = 8  # a block of fewer baseline cells is warned of: its rescale leaves the clip's up-shift


@dataclass
class _Sums:
    """Streaming per-perturbation sums over cells."""

    n_pert: int
    n_genes: int
    n_pcs: int
    keep_embedded: int
    total: np.ndarray = field(init=False)
    sq: np.ndarray = field(init=False)
    model_total: np.ndarray = field(init=False)  # the pure model's sums, beside the served (blended) ones
    model_sq: np.ndarray = field(init=False)
    # sums of each cell's change before clipping (its calibrated prediction is x + change, clipped at 0 and
    # rescaled to the unclipped mean) and of its square: the paired noise of the mean delta, which is the
    # unclipped change's (the clipped cells vary less: their variance understated the noise 1.7-fold)
    diff_total: np.ndarray = field(init=False)
    diff_sq: np.ndarray = field(init=False)
    model_diff_total: np.ndarray = field(init=False)
    model_diff_sq: np.ndarray = field(init=False)
    expressing: np.ndarray = field(init=False)
    count: np.ndarray = field(init=False)
    bucket_total: np.ndarray = field(init=False)
    bucket_count: np.ndarray = field(init=False)
    embedded: list[list[np.ndarray]] = field(init=False)
    embedded_idx: list[list[np.ndarray]] = field(init=False)
    n_invalid: int = 0
    n_duplicate: int = 0
    n_generated_genes: int = 0

    def __post_init__(self) -> None:
        P, G = self.n_pert, self.n_genes
        self.total = np.zeros((P, G))
        self.sq = np.zeros((P, G))
        self.model_total = np.zeros((P, G))
        self.model_sq = np.zeros((P, G))
        self.diff_total = np.zeros((P, G))
        self.diff_sq = np.zeros((P, G))
        self.model_diff_total = np.zeros((P, G))
        self.model_diff_sq = np.zeros((P, G))
        self.expressing = np.zeros((P, G))
        self.count = np.zeros(P, dtype=np.int64)
        self.bucket_total = np.zeros((P, N_BUCKETS, G))
        self.bucket_count = np.zeros((P, N_BUCKETS), dtype=np.int64)
        self.embedded = [[] for _ in range(P)]
        self.embedded_idx = [[] for _ in range(P)]

    def add(self, p: int, X: np.ndarray, change: np.ndarray, buckets: np.ndarray, emb: np.ndarray | None,
            idx: np.ndarray) -> None:
        """The served predictions ``X`` of perturbation ``p``, and each cell's change before clipping."""
        self.total[p] += X.sum(0)
        self.sq[p] += np.square(X, dtype=np.float64).sum(0)
        self.diff_total[p] += change.sum(0)
        self.diff_sq[p] += np.square(change, dtype=np.float64).sum(0)
        self.expressing[p] += (X > 0).sum(0)
        self.count[p] += X.shape[0]
        np.add.at(self.bucket_total[p], buckets, X)
        self.bucket_count[p] += np.bincount(buckets, minlength=N_BUCKETS)
        if emb is not None:
            have = sum(e.shape[0] for e in self.embedded[p])
            if have < self.keep_embedded:
                self.embedded[p].append(emb[: self.keep_embedded - have])
                self.embedded_idx[p].append(idx[: self.keep_embedded - have])

    def add_model(self, p: int, X: np.ndarray, change: np.ndarray) -> None:
        """The pure model's predictions of perturbation ``p`` (the served ones go to :meth:`add`)."""
        self.model_total[p] += X.sum(0)
        self.model_sq[p] += np.square(X, dtype=np.float64).sum(0)
        self.model_diff_total[p] += change.sum(0)
        self.model_diff_sq[p] += np.square(change, dtype=np.float64).sum(0)

    def merge(self, split: Split) -> None:
        """Add the sums of every process (each generated a share of the cells)."""
        if split.world == 1:
            return
        (self.total, self.sq, self.model_total, self.model_sq, self.diff_total, self.diff_sq, self.model_diff_total,
         self.model_diff_sq, self.expressing, self.count, self.bucket_total, self.bucket_count) = split.sum(
            self.total, self.sq, self.model_total, self.model_sq, self.diff_total, self.diff_sq, self.model_diff_total,
            self.model_diff_sq, self.expressing, self.count, self.bucket_total, self.bucket_count)
        counts = split.sum(np.array([self.n_invalid, self.n_duplicate, self.n_generated_genes], dtype=np.int64))[0]
        self.n_invalid, self.n_duplicate, self.n_generated_genes = (int(v) for v in counts)
        parts = split.gather([(np.concatenate(e) if e else np.zeros((0, self.n_pcs), np.float32),
                               np.concatenate(i) if i else np.zeros(0, np.int64))
                              for e, i in zip(self.embedded, self.embedded_idx)])
        for p in range(self.n_pert):
            emb = np.concatenate([part[p][0] for part in parts])
            idx = np.concatenate([part[p][1] for part in parts])
            order = np.argsort(idx, kind="stable")[: self.keep_embedded]  # the first cells, as one process keeps
            self.embedded[p], self.embedded_idx[p] = [emb[order]], [idx[order]]


class SimulationResult:
    """What :meth:`Simulator.simulate` returns.

    Attributes
    ----------
    aggregates
        ``xarray.Dataset`` with dims ``(perturbation, gene)`` (and ``bucket``), a ``label`` coordinate on
        ``perturbation`` (each perturbation as measured data names it, as :meth:`to_anndata` labels it): ``mean``,
        ``frac_expressing``, ``var``, ``delta`` (mean − baseline mean), ``n_cells``,
        ``bucket_mean`` (all of the served prediction: blended with the training baseline when
        ``attrs["blend_weight"]`` < 1); ``delta_model`` and ``var_model`` (the pure model's, from
        the same generated cells); ``var_delta`` / ``var_delta_model`` (the variance over cells of
        each cell's change before it is clipped at 0 and rescaled, the cell being its baseline plus that change:
        the paired noise of the mean delta; clipped cells understate it); ``control_mean`` over
        ``gene`` and ``control_bucket_mean`` (the
        baseline cells of each bucket, for paired resampling). ``attrs`` record the model, seed
        and config, the blend weight (1: the pure model), the one served for perturbations the
        model never trained on when it differs (``blend_weight_unseen``) and the baselines blended
        in (``baseline``).
    cells
        Per-cell predictions ``(perturbation, cell, gene)`` as an ``xarray.DataArray``
        (in memory, or lazily read from ``store``), or ``None`` if not kept.
    cells_model
        The pure model's per-cell predictions, from the same generated cells, when ``cells``
        (served) are blended with the baseline and kept in memory; ``None`` otherwise (then
        ``cells`` are the pure model's, or were not kept).
    draws, draws_model
        With ``simulate(keep_draws=True)``: one draw per cell and perturbation ``(perturbation, cell, gene)``,
        each from the cell's first generated sample alone instead of the mean of ``samples`` (served and,
        when blended, the pure model's, as ``cells`` / ``cells_model``); ``None`` otherwise.
    """

    def __init__(self, aggregates: xr.Dataset, cells: xr.DataArray | None, embedded: dict[str, np.ndarray],
                 baseline_embedded: np.ndarray, source_cells: np.ndarray, store: Path | None = None,
                 labels: dict[str, str] | None = None, cells_model: xr.DataArray | None = None,
                 context: tuple[str, np.ndarray] | None = None, perturbation_key: str = "perturbation",
                 draws: xr.DataArray | None = None, draws_model: xr.DataArray | None = None,
                 gene_ids: list[str] | None = None, context_obs: pd.DataFrame | None = None) -> None:
        self.aggregates = aggregates
        self.gene_ids = gene_ids  # each gene's var_name in a baseline read through a gene_key, else None
        self.cells = cells
        self.cells_model = cells_model
        self.draws = draws
        self.draws_model = draws_model
        self.embedded = embedded
        self.baseline_embedded = baseline_embedded
        self.source_cells = source_cells
        self.store = store
        self.labels = labels or {}  # typed name -> training label (what measured data calls it)
        # (the model's context column, each source cell's value there): a predicted cell stays in its cell's context
        self.context = context
        # the source cells' own context columns (each column of a composite key), as the baseline typed them
        self.context_obs = context_obs
        self.perturbation_key = perturbation_key  # the column predictions are labelled in by default

    @property
    def perturbations(self) -> list[str]:
        """The perturbations simulated, typed (``ko:STAT1``), in the order asked."""
        return [str(p) for p in self.aggregates["perturbation"].values]

    @property
    def genes(self) -> list[str]:
        """The genes predicted, in the baseline's spelling."""
        return [str(g) for g in self.aggregates["gene"].values]

    def _require_cells(self) -> tuple[int, int, int]:
        if self.cells is None:
            raise ScreenError(
                "Per-cell predictions were not kept (keep_cells=False, or more values than max_in_memory). Run "
                "simulate(..., store='cells.nc') "
                "to write them to disk, or keep_cells=True for small runs, or use the aggregates."
            )
        return self.cells.shape

    def _draws(self) -> xr.DataArray:
        if self.draws is None:
            raise ScreenError("One draw per cell was not kept: run simulate(..., keep_draws=True) to keep it beside "
                              "the cells averaged over their samples.")
        return self.draws

    def _head(self, perturbation_key: str | None, labels: Mapping[str, str] | None) -> ad.AnnData:
        """The predicted cells' obs, var and uns, without X (shared by to_anndata and write_h5ad)."""
        import anndata as ad
        import pandas as pd

        perturbation_key = perturbation_key or self.perturbation_key

        P, C, _ = self._require_cells()
        names = {**self.labels, **dict(labels or {})}
        obs = pd.DataFrame({
            perturbation_key: np.repeat([names.get(p, p) for p in self.perturbations], C),
            "perturbation_typed": np.repeat(self.perturbations, C),
            "source_cell": np.tile(self.source_cells, P),
        })
        if self.context_obs is not None:  # each column as the baseline has it (integers, categories kept)
            rows = np.tile(np.arange(C), P)
            for col in self.context_obs.columns:
                if col not in obs.columns:
                    obs[col] = self.context_obs[col].iloc[rows].reset_index(drop=True)
        elif self.context is not None and self.context[0] not in obs.columns:
            obs[self.context[0]] = np.tile(np.asarray(self.context[1], dtype=object), P)
        obs.index = [f"{p}|{c}" for p, c in zip(obs["perturbation_typed"], obs["source_cell"])]
        var = pd.DataFrame(index=self.genes)  # the baseline's spelling
        if self.gene_ids is not None:  # read through a gene_key: the baseline's own var_names ('' where it lacked one)
            var["var_names_before_gene_key"] = self.gene_ids
        head = ad.AnnData(obs=obs, var=var)
        head.uns["virtualcell"] = {k: self.aggregates.attrs[k] for k in _PROVENANCE if k in self.aggregates.attrs}
        if self.context is not None:  # the model's context column, which each predicted cell carries: evaluate reads
            # the measured cells' contexts from it where it is told of none (pooled, a prediction from typeA cells was
            # scored against measured typeB cells as one context 'all')
            head.uns["virtualcell"]["context_key"] = self.context[0]
        head.uns["log1p"] = {"base": None}  # X is log1p (natural log), as scanpy marks it: its log1p warns
        return head

    def to_anndata(self, *, perturbation_key: str | None = None, labels: Mapping[str, str] | None = None,
                   pure: bool = False, draws: bool = False) -> ad.AnnData:
        """Predicted cells as AnnData, labelled like the measured data.

        Parameters
        ----------
        perturbation_key
            The obs column of the perturbation labels: the model's training label of each
            perturbation (what measured data calls it; the typed name where it has none), or
            ``labels[typed name]`` where given. ``None`` (default): the column the model's training data
            named its perturbations in (``model.contract.perturbation_key``; ``"perturbation"`` without one), so
            that the predictions line up with measured data of the same layout. ``obs['perturbation_typed']``
            holds the typed name, ``obs['source_cell']`` the baseline cell, and the model's context column
            (where the baseline has it; each column of a composite ``"cell_type+patient"``) each cell's context, as
            the baseline types it; ``uns['virtualcell']['context_key']`` then names that column, which
            :func:`~virtualcell.evaluate.evaluate` reads the measured cells' contexts from where it is told of none.
        pure
            The pure model's cells (:attr:`cells_model` where the served cells are blended)
            instead of the served ones; ``uns['virtualcell']['blend_weight']`` is then 1.
        draws
            One draw per cell (:attr:`draws`, kept by ``simulate(keep_draws=True)``) instead of the cells
            averaged over their samples: a sample of the predicted population, with its spread, for
            distribution distances. ``uns['virtualcell']['draws']`` is then true.

        Genes keep the baseline's spelling (:attr:`Simulator.gene_names`); a baseline read through a ``gene_key``
        keeps its own var_names in ``var['var_names_before_gene_key']``. X is on the model's normalized scale, a
        natural log1p (``uns['log1p']`` says so, as scanpy marks it: ``sc.pp.log1p`` then warns);
        ``uns['virtualcell']`` records it with the model and seed.
        """
        P, C, G = self._require_cells()
        out = self._head(perturbation_key, labels)
        cells, said = self._chosen(pure=pure, draws=draws)
        out.uns["virtualcell"] |= said
        # a copy: scanpy's in-place steps (sc.pp.scale) on the AnnData must not rewrite this result's cells
        out.X = np.array(cells.values, dtype=np.float32, copy=True).reshape(P * C, G)
        return out

    def _chosen(self, *, pure: bool, draws: bool) -> tuple[xr.DataArray, dict[str, Any]]:
        """The cells :meth:`to_anndata` and :meth:`write_h5ad` write for ``pure`` and ``draws``, and what their
        ``uns['virtualcell']`` then says of them."""
        cells, model = (self._draws(), self.draws_model) if draws else (self.cells, self.cells_model)
        said: dict[str, Any] = {"draws": True} if draws else {}
        if pure and model is None and self.aggregates.attrs.get("baseline", "none") != "none":
            raise ScreenError(
                "The pure model's cells were not kept: simulate(store=...) writes the served cells, blended with the "
                f"{self.aggregates.attrs['baseline']} baseline, to disk, not the pure ones. Simulate with blend=False "
                "to store the pure model's cells, or keep_cells=True to keep both in memory; the aggregates hold both "
                "(delta and delta_model)."
            )
        if pure and model is not None:
            cells = model
            said |= {"blend_weight": 1.0, "baseline": "none"}
        return cells, said

    def write_h5ad(self, path: str | Path, *, perturbation_key: str | None = None,
                   labels: Mapping[str, str] | None = None, pure: bool = False, draws: bool = False) -> Path:
        """Write the predicted cells as ``.h5ad`` (same layout and options as :meth:`to_anndata`), one
        perturbation at a time, so that memory holds one perturbation's cells, not all."""
        import h5py

        P, C, G = self._require_cells()
        cells, said = self._chosen(pure=pure, draws=draws)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        head = self._head(perturbation_key, labels)
        head.uns["virtualcell"] |= said
        from .safeio import atomic_path

        with atomic_path(path) as tmp:  # a kill leaves the old file or the new one, never a partial one
            head.write_h5ad(tmp)  # obs, var, uns and the empty slots, in anndata's own encoding
            with h5py.File(tmp, "a") as f:
                if "X" in f:
                    del f["X"]
                # gzip'd in chunks of about 1 MB: predicted cells keep their baseline's zeros (most of a wide
                # panel's values), which compress about 20-fold; anndata and h5py read it back as it is
                rows = max(1, min(C, (1 << 18) // max(G, 1)))
                X = f.create_dataset("X", shape=(P * C, G), dtype="f4", chunks=(rows, G), compression="gzip",
                                     compression_opts=4)
                X.attrs["encoding-type"] = "array"
                X.attrs["encoding-version"] = "0.2.0"
                for i in range(P):
                    X[i * C : (i + 1) * C] = np.asarray(cells[i].values, dtype=np.float32)
        return path

    def __repr__(self) -> str:
        a = self.aggregates
        return (f"SimulationResult({a.sizes['perturbation']} perturbations x "
                f"{int(a['n_cells'].max()) if a.sizes['perturbation'] else 0} cells x "
                f"{a.sizes['gene']} genes; per-cell predictions {'on disk' if self.store else 'in memory' if self.cells is not None else 'not kept'})")


SEED_LIMIT = 2**32  # seeds are whole numbers below it (the cells' hashed buckets mix them in 64 bits)


def _raw_hint(baseline: ad.AnnData, absent: Sequence[str]) -> str:
    """Where ``baseline`` keeps some of the ``absent`` genes in ``.raw`` (a gene subset, such as scanpy's highly
    variable genes, taken after ``adata.raw = adata``), a sentence naming the cells with every measured gene."""
    if baseline.raw is None:
        return ""
    raw = {str(g).upper() for g in baseline.raw.var_names}
    held = sum(str(g).upper() in raw for g in absent)
    if not held:
        return ""
    return (f" (baseline.raw holds {held} of them: the cells with every gene they were measured on are "
            "baseline.raw.to_adata(), with baseline.obs)")


def check_seed(seed: Any) -> int:
    """A sampling seed as given, if it is a whole number in [0, 2**32) (numpy's too); anything else is refused by
    name."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not 0 <= seed < SEED_LIMIT:
        raise DataError(f"seed must be a whole number from 0 to {SEED_LIMIT - 1}, got {seed!r}.")
    return int(seed)


class Simulator:
    """A population of baseline cells and a model that predicts their responses.

    Parameters
    ----------
    baseline
        The baseline cells (e.g. the control cells of one context), raw counts or
        log-normalized. Encoded once, into the model's vocabulary; its obs (contexts, cell names) are read at
        each call, so change neither while a screen over it may resume.
    model
        A :class:`~virtualcell.model.C2SModel`.
    genes
        ``"all"``: ``baseline`` and the model must have the same genes (every gene of ``baseline`` in the model's
        vocabulary, and every gene of the model measured in ``baseline``); ``"shared"``: proceed on the shared
        genes. The model's genes that ``baseline`` lacks are then read as not expressed, with a warning, and the
        result names them (``attrs["absent_genes"]``).
    seed
        The seed of the baseline's encoding (the tie-break among equal values in its cell sentences) and of its
        principal axes (the E-distance's); each call's sampling has its own (``simulate(seed=)``). Recorded as
        ``attrs["sentence_seed"]``. ``virtualcell predict --seed S`` (and ``screen``) uses ``S`` for both, so
        ``Simulator(base, model, seed=S).simulate(seed=S)`` is what it predicts.
    n_pcs
        Principal axes of the baseline cells that predicted and baseline cells are embedded on (the E-distance a
        screen ranks by, :attr:`SimulationResult.embedded`).
    gene_key
        Var column of ``baseline`` holding the gene names (symbols or Ensembl ids); default
        ``var_names``. Names match the model's ignoring case and an Ensembl version suffix,
        and predictions keep the baseline's spelling (:attr:`gene_names`). By default, the
        column the model was trained with (``model.contract.gene_key``) when ``baseline`` has it.
    warn_new_contexts
        Log a warning (once) when baseline cells come from a context (cell type, patient) whose perturbed cells the
        model never trained on (:meth:`new_contexts`): its validation verdict and the blend weight it serves were
        measured on the contexts it trained on, and for these cells the prediction is a transfer; and (once) when a
        block of baseline cells is too small for the non-negativity rescale (see ``simulate``'s ``seed``). The
        verdict, which simulates such a context on purpose (``train --context-verdict``) and on the held-out cells
        it has, turns both off.

    ``Simulator(model, baseline)`` (the order of earlier versions) still works, with a DeprecationWarning.
    """

    @one_reading
    def __init__(self, baseline: ad.AnnData, model: C2SModel, *, genes: Literal["all", "shared"] = "all",
                 seed: int = 0, n_pcs: int = 30, gene_key: str | None = None, warn_new_contexts: bool = True) -> None:
        if hasattr(baseline, "generate") and hasattr(model, "obs"):  # the old order: (model, baseline)
            import warnings

            warnings.warn("Simulator(model, baseline) is deprecated: the data comes first, Simulator(baseline, model).",
                          DeprecationWarning, stacklevel=user_stacklevel())
            baseline, model = model, baseline  # type: ignore[assignment]
        if isinstance(model, str | os.PathLike):
            raise ModelError(f"model={str(model)!r} is a name or path, not a model: load it first, "
                             f"vc.C2SModel.load({str(model)!r}) (vc.model.bundled() for the shipped one).")
        require_in_memory(baseline, "The baseline")
        self.model = model
        trained_with = model.contract.gene_key if model.contract is not None else None
        if gene_key is None and trained_with is not None and trained_with in baseline.var.columns:
            gene_key = trained_with
            log.info("gene names from var[%r], the column the model was trained with", gene_key)
        baseline = with_gene_key(baseline, gene_key)
        self._gene_key = gene_key
        self.seed = check_seed(seed)
        self.baseline = baseline
        contract = model.contract
        if contract is not None and contract.perturbation_key in baseline.obs.columns and baseline.n_obs:
            perturbed = ~contract.is_control(baseline)
            if perturbed.any():  # a prediction adds each perturbation to every baseline cell, these included
                labels = sorted(set(contract.labels(baseline)[perturbed]))
                log.warning("%d of the %d baseline cells are not controls in obs[%r] (%s): each prediction starts "
                            "from every baseline cell, these included. For the usual baseline pass the controls "
                            "only (adata[adata.obs[%r] == %r]); if they are meant, go on.", int(perturbed.sum()),
                            baseline.n_obs, contract.perturbation_key, preview(labels, 4), contract.perturbation_key,
                            contract.control)
        elsewhere = contract.labels_elsewhere(baseline, model.known_labels()) if contract is not None else []
        if elsewhere:
            (first, spelled) = elsewhere[0]
            log.warning("The baseline has no obs column %r (the model's perturbation column), but obs[%r] holds its "
                        "control label (%r) beside perturbations it knows: every baseline cell, perturbed ones too, is "
                        "a starting point. For the usual baseline pass the controls only (adata[adata.obs[%r] == %r]).",
                        contract.perturbation_key, first, spelled, first, spelled)
        self.sentences = encode(baseline, vocab=model.genes, genes=genes, top_k=model.top_k, seed=self.seed)
        # baseline expression in the model's gene order (zeros for model genes the data lacks), on its scale
        self.expression, self.scale, self.normalization = on_model_scale(
            baseline, model.genes, fit=model.rank_fit, what="baseline")
        # the names predictions carry: the baseline's own spelling where it has the gene
        col = model.genes.ids(Vocabulary.from_adata(baseline).genes, missing="mark")
        names = list(model.genes.genes)
        spelled = baseline.var_names.astype(str)
        versions = [(spelled[i], names[c]) for i, c in enumerate(col) if c >= 0 and spelled[i].upper() != names[c]]
        for i in np.flatnonzero(col >= 0):
            names[col[i]] = spelled[i]
        self.gene_names: list[str] = names
        # with a gene_key, each gene's var_name in the baseline ('' for a model gene it lacks): predictions keep it
        self.gene_ids: list[str] | None = None
        if gene_key is not None:
            before = baseline.var["var_names_before_gene_key"].astype(str).to_numpy()
            self.gene_ids = [""] * len(names)
            for i in np.flatnonzero(col >= 0):
                self.gene_ids[col[i]] = before[i]
        # the model's genes the baseline does not measure: read as not expressed, which is not what they are
        absent = np.setdiff1d(np.arange(len(model.genes)), col[col >= 0])
        self.absent_genes: list[str] = [model.genes.genes[i] for i in absent]
        if absent.size:
            what = (f"The baseline lacks {absent.size} of the model's {len(model.genes)} genes (e.g. "
                    f"{preview(self.absent_genes, 5)}): the model would read every baseline cell as not expressing "
                    "them, and predict them from a baseline of 0 that nobody measured")
            what += _raw_hint(baseline, self.absent_genes)
            if genes == "all":
                raise VocabularyError(
                    f"{what}. Give the baseline every gene the model was trained on (a gene measured and not "
                    "expressed is a column of zeros), or pass genes='shared' (CLI: --genes shared) to go on anyway: "
                    "those genes then stay in the prediction, read as not expressed, and the result names them "
                    "(attrs['absent_genes']).")
            log.warning("%s; genes='shared' goes on (the result names them: attrs['absent_genes']).", what)
        if versions:
            import warnings

            warnings.warn(
                f"{len(versions)} baseline genes match the model's only without their Ensembl version suffix "
                f"(e.g. {versions[0][0]!r} <-> {versions[0][1]!r}); they are treated as the same gene and "
                "predictions use the baseline's names.", VirtualCellWarning, stacklevel=user_stacklevel())
        if not model.train_config and model.format.name == "c2s":  # a plain Hugging Face checkpoint (load(genes=))
            log.warning("%s was not fine-tuned by virtualcell: it never trained on virtualcell's perturbation prompt "
                        "(released C2S-Scale checkpoints learned perturbations only in targeted fine-tuning), so its "
                        "predictions are guesses. Fine-tune it on a screen first: virtualcell train --base %s --data "
                        "SCREEN.h5ad --out FOLDER.", model.source or "This model", model.source or "MODEL")
        if model.rank_fit is None:
            raise DataError(
                "The model has no rank fit (codec), so it cannot decode sentences into expression. Fit one on data "
                "like the baseline: model.rank_fit = RankFit.fit(adata, encode(adata, vocab=model.genes))."
            )
        self._basis = pca(self.expression, n_pcs, seed=self.seed)
        self._warn_new_contexts = warn_new_contexts  # (once: simulate sets it False when it has warned)
        self._warn_small_blocks = warn_new_contexts  # (once, as the new contexts)
        self._said_twins: set[str] = set()  # perturbations read as a trained condition's prompt, warned of once
        if baseline.obs_names.duplicated().any():  # (not is_unique: pandas keeps a parent's flag on a slice)
            dup = baseline.obs_names[baseline.obs_names.duplicated()].unique()
            log.warning("%d baseline cell names repeat (e.g. %s): predicted cells name their source cell "
                        "(obs['source_cell']) by it, so those cannot be told apart. baseline.obs_names_make_unique() "
                        "first.", len(dup), preview(list(dup), 3))

    def sample_count(self, samples: int | None = None) -> int:
        """``simulate(samples=)`` resolved: ``None`` is the number the trainer chose on its
        validation split (1 for a checkpoint that chose none); anything but a whole number >= 1 is refused."""
        if samples is None:
            samples = self.model.setting("samples")
        if not whole_at_least(samples):
            raise DataError(f"samples must be a whole number of at least 1 (samples of each cell under each "
                            f"perturbation, averaged), got {samples!r}.")
        return int(samples)

    def new_contexts(self, n: int | None = None) -> list[str]:
        """The contexts of the first ``n`` baseline cells (all by default) whose perturbed cells the model never
        trained on (:attr:`C2SModel.trained_contexts`); empty where there are none, or where it cannot tell (a
        model with no context column or no record of its contexts, a baseline without the model's context column).
        """
        return self._new_contexts(self.source_context(n))

    def _new_contexts(self, context: tuple[str, np.ndarray] | None) -> list[str]:
        """:meth:`new_contexts` of the baseline cells' ``context`` (:meth:`source_context`)."""
        seen = self.model.perturbed_contexts
        if seen is None or context is None:
            return []
        return sorted({str(c) for c in context[1]} - set(seen))

    def source_context(self, n: int | None = None) -> tuple[str, np.ndarray] | None:
        """The model's context column (``model.contract.context_key``: cell type, patient, cell line) and the
        first ``n`` baseline cells' values there, which their predicted cells carry (:meth:`SimulationResult.
        to_anndata`); ``None`` when the model has no context column or the baseline lacks it."""
        contract = self.model.contract
        if contract is None or not contract.has_context(self.baseline):
            return None
        n = self.baseline.n_obs if n is None else n
        return contract.context_key, contract.contexts(self.baseline)[:n]  # (a composite key's values joined)

    def source_context_obs(self, n: int | None = None) -> pd.DataFrame | None:
        """The first ``n`` baseline cells' context columns (:meth:`source_context`'s, each column of a composite key)
        as the baseline types them (an integer patient stays an integer), with a fresh index; ``None`` where
        :meth:`source_context` is."""
        contract = self.model.contract
        if contract is None or not contract.has_context(self.baseline):
            return None
        n = self.baseline.n_obs if n is None else n
        obs = self.baseline.obs[contract.context_columns(self.baseline)].iloc[:n].reset_index(drop=True).copy()
        for col in obs.columns:  # (a column of 1, 2 and '3' could not be written to .h5ad)
            if obs[col].dtype == object:
                obs[col] = obs[col].astype(str)
        return obs

    @staticmethod
    def control_sample_count(samples: int, control_samples: int | None = None) -> int:
        """``simulate(control_samples=)`` resolved for ``samples`` per perturbation: ``None`` is
        ``CONTROL_SAMPLES`` per sample (the control's noise, shared by every delta, stays a fixed
        share of each delta's noise); anything but a whole number >= 1 is refused."""
        if control_samples is None:
            return CONTROL_SAMPLES * int(samples)
        if not whole_at_least(control_samples):
            raise DataError(f"control_samples must be a whole number of at least 1, got {control_samples!r}.")
        return int(control_samples)

    def baseline_digest(self, n: int | None = None) -> str:
        """A digest of the first ``n`` baseline cells as the model reads them (their sentences and expression): what
        a screen's fingerprint and the processes of a launch compare."""
        import hashlib

        n = self.baseline.n_obs if n is None else n
        h = hashlib.sha256()
        s = self.sentences.subset(np.arange(n))
        h.update(s.ids.tobytes())
        h.update(s.offsets.tobytes())
        h.update(self.expression[:n].data.tobytes())
        return h.hexdigest()[:16]

    def reading_digest(self, n: int | None = None) -> str:
        """A digest of what else the predictions of the first ``n`` baseline cells depend on, beside
        :meth:`baseline_digest`: their contexts (a blend serves each context's baseline), the gene names (the genes
        of every group of a screen) and every baseline cell's expression with the number of principal axes (the
        embedding a screen's distances are measured on is fitted on all the cells, not only the first ``n``)."""
        import hashlib

        n = self.baseline.n_obs if n is None else n
        h = hashlib.sha256()
        context = self.source_context(n)
        h.update(repr(None if context is None else (context[0], [str(c) for c in context[1]])).encode())
        h.update("\x00".join(self.gene_names).encode())
        X = self.expression
        for part in (X.data, X.indices, X.indptr, np.asarray(X.shape), np.asarray(self._basis.components.shape)):
            h.update(np.ascontiguousarray(part).tobytes())
        return h.hexdigest()[:16]

    def labels_of(self, perturbations: Sequence[Perturbation | Combination]) -> list[str]:
        """Each perturbation's label as measured data names it (the model's training label; a gene as the baseline
        spells it: an untrained knockout 'Tf06', not 'TF06'): what predictions and a screen's ranking carry."""
        spelling = {g.upper(): s for g, s in zip(self.model.genes.genes, self.gene_names)}
        names = self.model.perturbations.labels_for(perturbations, spelling=spelling)
        control = self.model.contract.control if self.model.contract is not None else "control"
        # the control as the data names it ('ctrl', 'non-targeting'), not the typed 'control' beside its cells
        return [control if str(p) == "control" else name for p, name in zip(perturbations, names)]

    def blend_weight(self, blend: str | float | bool | None = "auto", *, calibrate: bool = True) -> float | None:
        """The weight on the model's delta that :meth:`simulate` serves for ``blend`` (``None``: the pure model).

        ``"auto"`` (or ``True``) is the weight the training run fitted on its validation split, when the
        checkpoint has its baselines and verdict; a number in [0, 1] is used as it is.
        """
        if blend is None or blend is False:
            return None
        if blend is True or (isinstance(blend, str) and blend.lower() == "auto"):
            verdict, have = self.model.verdict, self.model.baselines is not None
            if not calibrate or not have or not verdict or verdict.get("weight") is None:
                return None
            return float(verdict["weight"])
        if isinstance(blend, str) and blend.lower() == "none":
            return None
        try:
            w = float(blend)
        except (TypeError, ValueError):
            raise ScreenError(f"blend={blend!r}: use 'auto', None (the pure model) or a weight in [0, 1].") from None
        if not 0.0 <= w <= 1.0:
            raise ScreenError(f"blend={w:g} is outside [0, 1]: it is the weight on the model's delta "
                              "(1: the pure model, 0: the training baseline).")
        if self.model.baselines is None:
            raise ScreenError(f"blend={w:g} needs the training baselines saved with the model (baselines.npz), and "
                              f"{self.model.source or 'this model'} has none: retrain it with this virtualcell, or "
                              "use blend=None (the pure model).")
        if not calibrate:
            raise ScreenError("blend needs calibrate=True: it blends the calibrated delta with the baseline's.")
        return w

    def unseen_weight(self, blend: str | float | bool | None = "auto", *, calibrate: bool = True) -> float | None:
        """The weight served on the model's delta for a perturbation it never trained on (one whose
        training baseline is ``pertmean`` or ``coexpression``): with ``"auto"``, the weight the training run fitted on
        perturbations it held out whole (``verdict["unseen"]``, ``--unseen-fraction``) when it did,
        else :meth:`blend_weight`'s, as for any other ``blend``."""
        w = self.blend_weight(blend, calibrate=calibrate)
        auto = blend is True or (isinstance(blend, str) and blend.lower() == "auto")
        unseen = (self.model.verdict or {}).get("unseen") or {}
        return float(unseen["weight"]) if w is not None and auto and unseen.get("weight") is not None else w

    def expression_of(self, cells: ad.AnnData, *, what: str = "reference") -> tuple[sp.csr_matrix, np.ndarray]:
        """Other cells (a reference state) on the baseline's footing: one column per model gene, on the model's
        scale as the baseline is put on it (:func:`~virtualcell.sentences.on_model_scale`), and which of the
        model's genes ``cells`` measures (the others are columns of zeros)."""
        cells = with_gene_key(cells, self._gene_key if self._gene_key in cells.var.columns else None)
        X, _, _ = on_model_scale(cells, self.model.genes, fit=self.model.rank_fit, what=what)
        col = self.model.genes.ids(Vocabulary.from_adata(cells).genes, missing="mark")
        measured = np.zeros(len(self.model.genes), dtype=bool)
        measured[col[col >= 0]] = True
        return X, measured

    def baseline_mean(self, n_cells: int | None = None) -> np.ndarray:
        """Mean expression of the first ``n_cells`` baseline cells (all by default), in the model's genes."""
        return np.asarray(self.expression[:n_cells].mean(axis=0), dtype=np.float64).ravel()

    def embed(self, X: np.ndarray | Any) -> np.ndarray:
        """Cells (model-gene expression, like :attr:`expression`) on the baseline's principal axes."""
        return self._basis.transform(X)

    def screen(self, panel: Sequence[str | Perturbation | Combination], **options: Any) -> ScreenResult:
        """Screen ``panel`` on these baseline cells and rank it: :func:`virtualcell.screen.run`
        (``objective=``, ``out=``, ``top=``... are its options); returns a
        :class:`~virtualcell.screen.ScreenResult`."""
        import inspect

        from .errors import with_hints
        from .screen import run

        takes = [k for k in inspect.signature(run).parameters if k not in ("simulator", "panel")]
        unknown = sorted(set(options) - set(takes))
        if unknown:  # (a raw TypeError named run(), which the user never called)
            generation = {"temperature", "guidance", "control_samples", "keep_draws"} & set(unknown)
            why = (f" A screen generates with the settings the training run chose ({', '.join(sorted(generation))} "
                   "are simulate()'s: pass them there for one run of your own)." if generation else "")
            raise TypeError(f"Simulator.screen() takes no {with_hints(unknown, takes)}.{why} It takes: "
                            f"{', '.join(takes)}.")
        return run(self, panel, **options)

    def __repr__(self) -> str:
        return f"Simulator({self.baseline.n_obs} baseline cells, {self.model!r})"

    def generation_config(self, *, seed: int = 0, batch_size: int = 512, max_genes: int | None = None,
                          temperature: float | None = None, guidance: float | None = None,
                          coexpression_prior: bool | None = None, compose: bool = False) -> GenerationConfig:
        """The :class:`~virtualcell.generation.GenerationConfig` that :meth:`simulate` generates with: each setting
        left ``None`` is the one the trainer chose on its validation split (``model.setting``), ``max_genes`` the
        model's sentence length."""
        from .generation import GenerationConfig

        m = self.model
        return GenerationConfig(
            max_genes=max_genes or m.top_k, batch_size=batch_size, seed=seed, compose=compose,
            temperature=float(m.setting("temperature")) if temperature is None else temperature,
            guidance=float(m.setting("guidance")) if guidance is None else guidance,
            coexpression_prior=bool(m.setting("coexpression_prior")) if coexpression_prior is None else coexpression_prior,
        )

    # ------------------------------------------------------------------ #
    @one_reading
    def simulate(
        self,
        perturbations: Sequence[str | Perturbation | Combination],
        *,
        n_cells: int | None = None,
        seed: int = 0,
        batch_size: int = 512,
        cell_chunk: int = 32,
        max_genes: int | None = None,
        temperature: float | None = None,
        guidance: float | None = None,
        coexpression_prior: bool | None = None,
        compose: bool = False,
        control_samples: int | None = None,
        samples: int | None = None,
        calibrate: bool = True,
        blend: str | float | bool | None = "auto",
        keep_cells: bool | None = None,
        keep_draws: bool = False,
        store: str | Path | None = None,
        keep_embedded: int = KEEP_EMBEDDED,
        max_in_memory: int = MAX_IN_MEMORY,
        progress: bool = True,
        on_chunk: Callable[[int, int], None] | None = None,
    ) -> SimulationResult:
        """Apply each perturbation to the baseline cells and aggregate the predictions.

        Parameters
        ----------
        perturbations
            Typed perturbations or strings (``"ko:STAT1"``, ``"drug:X@1uM,24h"``, or plain training labels).
        n_cells
            Use the first ``n_cells`` baseline cells (default all).
        seed
            Sampling seed; a cell's generated sentences depend only on (seed, the cell, its row in the baseline,
            perturbation), not on the other perturbations or the batch size. Its served values also depend on the
            other cells of its block of ``cell_chunk`` rows (32 by default, from row 0): the non-negativity rescale
            gives each gene back the block's unclipped mean. The same baseline in the same order predicts the same;
            reordering or subsetting its cells (``n_cells``, ``--n-cells``), reordering its genes or another
            ``cell_chunk`` moves a prediction within its sampling noise, but for a block of a few cells (a baseline
            of fewer than 8 cells, or a last block as short: 33 cells leave one), where the rescale has too few
            cells to give the unclipped mean back and the clipped cells' up-shift stays: it warns.
        batch_size
            (cell, perturbation) rows generated in one forward pass (on a GPU, fewer where their caches would
            not fit): memory and speed. Predictions are the same up to floating-point rounding, which the shapes
            of a pass change and which can, rarely, flip a near-tie between two tokens (as another panel beside a
            perturbation, or a screen's ``group_size``, can): within sampling noise.
        cell_chunk
            Baseline cells generated together, under every perturbation, before their results are added up (and
            the rows of the non-negativity rescale, see ``seed``).
        max_genes
            Genes each generated cell may name (``None``: the model's ``top_k``, the length it trained on).
        temperature
            Sampling temperature of the generation (below 1: each sampled sentence is closer to the model's
            likeliest, less noisy and less varied). ``None``: the temperature the trainer chose on its
            validation split (1 for a checkpoint without one).
        guidance
            Classifier-free guidance scale (1 = none): sample from ``generic + guidance * (specific − generic)``
            logits, which scales up what the model predicts for this perturbation beyond the average
            perturbed cell. Needs a model trained with a generic condition. ``None``: the scale the
            trainer chose on its validation split (1 for a checkpoint without one).
        coexpression_prior
            A genetic perturbation the model never trained on, of one of its genes, gets the coexpression
            baseline's shift on its logits (:class:`~virtualcell.generation.GenerationConfig`); ``False``:
            the model alone. ``None``: as the trainer chose on the perturbations it held out whole (on where
            it held out none).
        compose
            A combination the model never trained on as such (``"ko:A + ko:B"``) is generated from its parts'
            logits, ``control + sum(part - control)`` at every step, instead of from a prompt naming both
            (:class:`~virtualcell.generation.GenerationConfig`; off by default: it scored below the pair prompt
            on protocol 2). ``aggregates.attrs["composed"]`` names the perturbations composed (``"; "``-separated).
        control_samples
            Samples of each cell under control; predictions are calibrated against their mean. The
            control generation's sampling noise is shared by every perturbation's delta (it made
            deltas of unrelated perturbations correlate), and averaging ``k`` samples cuts it by ``sqrt(k)``
            for ``k`` extra rows per cell. ``None`` (default): ``CONTROL_SAMPLES`` (4) per sample under
            each perturbation (:meth:`control_sample_count`), so that the shared noise stays a fifth of
            each delta's noise whatever ``samples`` is: with 4 control samples for 4 perturbation
            samples it was half, and the deltas' mutual correlation doubled.
        samples
            Samples of each cell under each perturbation, averaged into the cell's predicted delta
            (as the control samples are): a cell's prediction is then closer to its expected
            response, with ``1/samples`` of one sample's noise, for ``samples`` times the rows. One
            sample's noise adds spread that the baseline cell's own variability already carries, and
            lifts each gene's mean absolute error (more ``n_cells`` cuts the noise of the means, not
            that of each cell). ``None``: the number the trainer chose on its validation split (1 for
            a checkpoint without one). ``samples=1`` gives the same cells as before it existed.
        calibrate
            Predict ``x + decode(perturbed) − mean decode(control)`` (default) instead of the decoded generation
            (which, through a gene map, :mod:`virtualcell.gene_map`, can read a little below 0 for a rare gene).
        blend
            Shrink the model's delta toward the training baseline (:mod:`virtualcell.validation`):
            serve ``x + w·(decode(perturbed) − mean decode(control)) + (1−w)·baseline delta`` (calibrated
            as above). ``"auto"`` (default): the weight ``w`` fitted on the training run's validation split,
            when the checkpoint has one (else the pure model), and for a perturbation the model never trained
            on the weight fitted on perturbations held out whole when the run did so (:meth:`unseen_weight`);
            a number in [0, 1] forces ``w``; ``None``
            or ``False``: the pure model. The pure model's aggregates are kept either way
            (``delta_model``, ``var_model``), from the same generated cells.
        keep_cells
            Keep per-cell predictions in memory (default: when they are at most ``max_in_memory`` values).
        keep_draws
            Keep, beside the cells, one draw per cell and perturbation (:attr:`SimulationResult.draws`,
            ``to_anndata(draws=True)``): the cell's prediction from its first generated sample alone, calibrated
            against the same control mean, instead of the mean of ``samples``. The averaged cells estimate each
            cell's expected response, which the aggregates and deltas are made of; averaging narrows the
            predicted population, so a distribution distance between predicted and measured cells (E-distance,
            ``pertpy.tools.Distance``) should compare the draws. With ``samples=1`` the draws are the cells.
            In memory only (``keep_cells`` must allow it; not with ``store``).
        store
            A ``.nc`` path: write per-cell predictions there chunk by chunk, read back lazily.
        keep_embedded
            Predicted cells of each perturbation (the first ones) kept on the baseline's principal axes
            (:attr:`SimulationResult.embedded`), for the E-distance a screen ranks by.
        max_in_memory
            The most per-cell values (perturbations x cells x genes, twice that when blended) kept in memory
            when ``keep_cells`` is ``None``.
        progress
            A progress bar over the cells.
        on_chunk
            Called as ``on_chunk(done, total)`` after each chunk of cells (``done`` cells of ``total`` simulated).
        """
        from .generation import stable_key

        seed = check_seed(seed)
        if n_cells is not None and (isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer)):
            raise DataError(f"n_cells must be a whole number of baseline cells, got {n_cells!r}.")
        if max_genes is not None and not whole_at_least(max_genes, 1):
            raise DataError(f"max_genes must be a whole number of at least 1 (genes per generated cell; None: the "
                            f"model's top_k), got {max_genes!r}.")
        if not whole_at_least(cell_chunk, 1):  # (-1 generated no cell and returned a result of zeros)
            raise DataError(f"cell_chunk must be a whole number of at least 1 (baseline cells generated together), "
                            f"got {cell_chunk!r}.")
        perts = self.model.resolve(perturbations)
        names = [str(p) for p in perts]
        if not names:
            raise ScreenError("simulate was given no perturbation: list at least one, e.g. ['ko:STAT1'].")
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ScreenError(f"Perturbations repeat after parsing: {dup}. List each once.")
        twins = {k: v for k, v in self.model.prompt_twins(perts).items() if k not in self._said_twins}
        if twins:  # (each once per Simulator: a screen simulates its panel group by group)
            self._said_twins.update(twins)
            log.warning("%d perturbations are no trained condition but read the prompt of one (%s): the model tells "
                        "doses apart by half-decade bins and times by doublings, so the pure model predicts each as "
                        "that condition (the baseline a blend serves interpolates between trained doses where it "
                        "can).", len(twins), preview([f"{k} as {v}" for k, v in twins.items()], 4))
        samples = self.sample_count(samples)
        control_samples = self.control_sample_count(samples, control_samples)
        control = Perturbation("control")
        # every cell is generated under control control_samples times: their mean is what each perturbation is
        # calibrated against, and its sampling noise is shared by every perturbation's delta
        # ... and under each perturbation `samples` times (sample 0 keeps the key it always had)
        treated = [p for p in perts if p != control]
        run = [control] * control_samples + [p for p in treated for _ in range(samples)]
        run_keys = [stable_key("control")] + [stable_key(f"control#{k}") for k in range(1, control_samples)]
        run_keys += [stable_key(str(p) if j == 0 else f"{p}#{j}") for p in treated for j in range(samples)]
        first = {str(p): control_samples + samples * t for t, p in enumerate(treated)}  # p's first row in run
        n = self.baseline.n_obs if n_cells is None else min(int(n_cells), self.baseline.n_obs)
        if n < 1:
            raise DataError("n_cells must be at least 1.")
        G = len(self.model.genes)
        P = len(perts)
        w = self.blend_weight(blend, calibrate=calibrate)
        context = self.source_context(n)
        new_contexts = self._new_contexts(context)
        key = self.model.contract.context_key if self.model.contract is not None else None
        if self._warn_new_contexts and key is not None and context is None:
            self._warn_new_contexts = False
            log.warning("The model was trained with contexts in obs[%r] (%s) and the baseline cells have no such "
                        "column: the predicted cells carry no context, and nothing tells whether they come from a "
                        "context the model saw perturbed. Add obs[%r] to the baseline.", key,
                        preview(sorted(self.model.trained_contexts or {}), 5) if self.model.trained_contexts
                        else "not recorded", key)
        if new_contexts and self._warn_new_contexts:
            self._warn_new_contexts = False
            trained = self.model.perturbed_contexts or []
            judged = ((self.model.verdict or {}).get("new_context") or {})
            if judged.get("context") is not None:  # the run held one context out whole and judged the transfer there
                checked = (f"its verdict judged such a transfer on {judged['context']!r}, held out of training whole: "
                           f"{judged.get('summary', '')}")
                advice = ""
            else:
                checked = ("it has no validation verdict, so nothing checked it anywhere, and for these cells the "
                           "prediction is a transfer too" if not self.model.verdict else
                           "its validation verdict" + ("" if w is None else f" and the blend weight served ({w:.2f})")
                           + " was measured on the contexts it trained on, so for these cells the prediction is a "
                           "transfer it did not check")
                advice = " `virtualcell train --context-verdict` judges one context held out whole."
            log.warning("The baseline cells of %s %s come from a context the model never saw perturbed (it trained "
                        "on perturbed cells of %s): %s.%s%s", self.model.contract.context_key, preview(new_contexts, 5),
                        preview(trained, 5), checked.rstrip("."), advice,
                        self.model.contract.whole_floats(new_contexts, self.model.trained_contexts or trained))
        # the baseline of each perturbation, and the weight on the model's delta: a perturbation the model never
        # trained on (baseline pertmean or coexpression) gets the weight fitted on such perturbations, where the verdict has one
        # ... each cell's own: a perturbation's effect in the cell's context where it was measured there (the name
        # of the baseline is the same in every context)
        contexts, cell_context = (np.unique(np.asarray(context[1], dtype=str), return_inverse=True)
                                  if context is not None else (np.array([None], dtype=object), np.zeros(n, np.int64)))
        per_context = [[self.model.baselines.delta_for(p, context=c) for c in contexts] for p in perts] \
            if w is not None else []
        shift_in = [np.stack([d for d, _ in row]) for row in per_context]
        sources = [row[0][1] for row in per_context]
        w_unseen = self.unseen_weight(blend, calibrate=calibrate)
        weights = [w_unseen if source in UNSEEN_BASELINES else w for source in sources]
        blended = w is not None and any(x < 1.0 for x in weights)
        if keep_draws and (store is not None or keep_cells is False):
            raise ScreenError("keep_draws=True keeps one draw per cell in memory beside the cells: it needs the cells "
                              "in memory too (keep_cells=True or None, and no store=).")
        if keep_cells is None:  # (a blend keeps the pure model's cells too)
            keep_cells = keep_draws or (store is None and P * n * G * (1 + blended) <= max_in_memory)
        split = Split.current(cpu=self.model.device.type == "cpu")
        if split.world > 1:  # each process simulates a share of the cells: of the same cells and panel, or a mixture
            given = {"baseline cells": (self.baseline_digest(n), self.reading_digest(n)), "perturbations": names,
                     "seed": seed,
                     "cell_chunk": cell_chunk, "samples": samples, "blend": (w, w_unseen)}
            every = split.gather(given)
            differ = [k for k in given if any(g[k] != every[0][k] for g in every)]
            if differ:
                raise ScreenError(
                    f"The {split.world} processes were given different {', '.join(differ)}: each simulates a share "
                    "of the cells and the shares are added, so the result would mix them. Give every process the "
                    "same inputs (e.g. a subsample drawn with a fixed seed).")
        if split.world > 1 and store is not None:
            raise ScreenError(
                f"store= is not supported with {split.world} processes yet (they would write one file at once). "
                "Use the aggregates, keep_cells=True for small runs, or one process."
            )
        cells_mem = np.zeros((P, n, G), dtype=np.float32) if keep_cells else None
        model_mem = np.zeros((P, n, G), dtype=np.float32) if keep_cells and blended else None
        draws_mem = np.zeros((P, n, G), dtype=np.float32) if keep_draws else None
        draws_model_mem = np.zeros((P, n, G), dtype=np.float32) if keep_draws and blended else None
        import contextlib

        from .safeio import atomic_path, file_lock

        # the cells file is written beside its name and put in place once every block is made: a refused or killed
        # run leaves no file that opens as whole with blocks of zeros; and locked, as predict --out is (two
        # processes storing to one path: the last to finish won, silently)
        placed = contextlib.ExitStack()
        writer = None
        if store is not None:
            placed.enter_context(file_lock(store, what="simulate"))
            writer = _CellStore(placed.enter_context(atomic_path(store)), names, n, self.gene_names)
            placed.callback(writer.close)  # (closed before the file takes its name, or goes)
        sums = _Sums(P, G, self._basis.components.shape[0], keep_embedded)
        cfg = self.generation_config(seed=seed, batch_size=batch_size, max_genes=max_genes, temperature=temperature,
                                     guidance=guidance, coexpression_prior=coexpression_prior, compose=compose)

        def made(j: int, p: Any, d: np.ndarray, x: np.ndarray, d_ctrl: np.ndarray, rows: np.ndarray
                 ) -> tuple[np.ndarray, ...]:
            """Perturbation ``j``'s predictions of the cells ``x`` from decodes ``d``: ``(pure, its change, served,
            its change)``. A change is each cell's before clipping (calibrated: the prediction is x + change, clipped
            and rescaled to the unclipped mean; uncalibrated: the decoded generation against the cell); served is the
            pure prediction, or where blended the same generation blended with the baseline (each cell's, by its
            context: ``rows`` are the cells' rows in the baseline)."""
            if not calibrate:
                pure, change = d, d - x
            elif p == control:  # calibrated: the baseline cell itself
                pure, change = x, np.zeros_like(x)
            else:
                change = d - d_ctrl
                pure = calibrated(x, change)
            pure = pure.astype(np.float32)
            if not blended or p == control:
                return pure, change, pure, change
            served_change = weights[j] * (d - d_ctrl) + (1.0 - weights[j]) * shift_in[j][cell_context[rows]]
            return pure, change, calibrated(x, served_change).astype(np.float32), served_change

        short = n % cell_chunk or min(n, cell_chunk)  # the last block's cells
        if calibrate and short < MIN_RESCALE_CELLS and self._warn_small_blocks and split.main:
            self._warn_small_blocks = False
            log.warning("A block of %d baseline cell%s is generated alone (%d cells in blocks of cell_chunk=%d): the "
                        "non-negativity rescale gives a gene back its unclipped mean over the cells of a block, and "
                        "over so few the clipped cells' up-shift stays, raising every prediction of those cells. "
                        "Predict at least %d cells in each block (n_cells, or a cell_chunk that divides them).", short,
                        "s" if short != 1 else "", n, cell_chunk, MIN_RESCALE_CELLS)
        starts = [c0 for i, c0 in enumerate(range(0, n, cell_chunk)) if split.mine(i)]
        share = sum(min(cell_chunk, n - c0) for c0 in starts)
        bar = progress_bar(share, progress and split.main, "simulate" if split.world == 1 else
                           f"simulate (the main process's {share} of {n} cells)", "cell")
        placed.callback(bar.close)
        base_emb, base_idx = [], []
        # on leaving: the bar and the cells file closed; the file takes its name where every block was made, and goes
        # where the run was refused or interrupted
        with placed:
            for c0 in starts:
                idx = np.arange(c0, min(c0 + cell_chunk, n))
                chunk = self.sentences.subset(idx)
                gen: dict[tuple[int, int], np.ndarray] = {}
                for out in self.model.generate(chunk, run, config=cfg, cell_keys=idx, perturbation_keys=run_keys):
                    sums.n_invalid += out.n_invalid
                    sums.n_duplicate += out.n_duplicate
                    sums.n_generated_genes += int(out.sentences.ids.size)
                    D = self.model.decode(out.sentences)
                    for row, (c, p) in enumerate(zip(out.cell, out.perturbation)):
                        gen[(int(c), int(p))] = D[row]
                x = self.expression[idx].toarray()
                base_emb.append(self.embed(x))
                base_idx.append(idx)
                d_ctrl = np.mean([[gen[(i, k)] for i in range(len(idx))] for k in range(control_samples)], axis=0)
                buckets = _bucket(idx, seed)
                broken = []  # the perturbations whose predictions of these cells are not finite
                for j, p in enumerate(perts):
                    if p == control:
                        d = d_ctrl
                    else:
                        k0 = first[str(p)]
                        d = np.mean([[gen[(i, k)] for i in range(len(idx))] for k in range(k0, k0 + samples)], axis=0)
                    pure, change, pred, served_change = made(j, p, d, x, d_ctrl, idx)
                    if not (np.isfinite(pure).all() and np.isfinite(pred).all()):
                        broken.append(j)  # (nothing of it is kept or written: the block ends in the refusal below)
                        continue
                    sums.add_model(j, pure, change)
                    if model_mem is not None:
                        model_mem[j, idx] = pure
                    sums.add(j, pred, served_change, buckets, self.embed(pred), idx)
                    if cells_mem is not None:
                        cells_mem[j, idx] = pred
                    if draws_mem is not None:  # the cell's first sample alone, made into a prediction the same way
                        k1 = 0 if p == control else first[str(p)]
                        draw, _, served, _ = made(j, p, np.array([gen[(i, k1)] for i in range(len(idx))]), x, d_ctrl,
                                                 idx)
                        draws_mem[j, idx] = served
                        if draws_model_mem is not None:
                            draws_model_mem[j, idx] = draw
                    if writer is not None:
                        writer.write(j, idx, pred)
                del gen
                if broken:
                    raise self._not_finite([names[j] for j in broken], d_ctrl, idx)
                bar.update(len(idx))
                if on_chunk is not None:
                    on_chunk(int(idx[-1]) + 1, n)
        sums.merge(split)
        if split.world > 1:
            if cells_mem is not None:  # each process filled its own cells, zeros elsewhere
                cells_mem = split.sum(cells_mem)[0]
            if model_mem is not None:
                model_mem = split.sum(model_mem)[0]
            if draws_mem is not None:
                draws_mem = split.sum(draws_mem)[0]
            if draws_model_mem is not None:
                draws_model_mem = split.sum(draws_model_mem)[0]
            parts = split.gather((base_emb, base_idx))  # every process's chunks, back in cell order
            emb = np.concatenate([e for chunks, _ in parts for e in chunks])
            idx = np.concatenate([i for _, chunks in parts for i in chunks])
            base_emb = [emb[np.argsort(idx)]]
        agg = self._aggregates(sums, names, n, seed, cfg, calibrate)
        # the combinations generated composed from their parts (GenerationConfig.compose)
        agg.attrs["composed"] = "; ".join(name for name, p in zip(names, perts)
                                          if self.model.composes(p, compose=cfg.compose))
        agg.attrs["control_samples"] = int(control_samples)
        agg.attrs["samples"] = samples
        agg.attrs["blend_weight"] = 1.0 if w is None else float(w)
        if w is not None and w_unseen != w and any(source in UNSEEN_BASELINES for source in sources):
            agg.attrs["blend_weight_unseen"] = float(w_unseen)  # served for the perturbations never trained on
        # the baselines the served cells blend in: none where the weight a perturbation is served at is 1
        blended = {b for b in sources if (w_unseen if b in UNSEEN_BASELINES else w) < 1.0} - {"none"}
        agg.attrs["baseline"] = ";".join(sorted(blended)) or "none"
        agg.attrs["new_contexts"] = "; ".join(new_contexts)  # the cells' contexts the model never saw perturbed
        agg.attrs["absent_genes"] = "; ".join(self.absent_genes)  # the model's genes the baseline did not measure
        cells = cells_model = draws = draws_model = None
        if cells_mem is not None:
            import xarray as xr

            coords = {"perturbation": names, "cell": np.asarray(self.baseline.obs_names[:n]), "gene": list(self.gene_names)}
            cells, cells_model, draws, draws_model = (
                None if mem is None else xr.DataArray(mem, dims=("perturbation", "cell", "gene"), coords=coords,
                                                      name="expression")
                for mem in (cells_mem, model_mem, draws_mem, draws_model_mem))
        elif store is not None:
            cells = _CellStore.open(store)
        embedded = {name: (np.concatenate(e) if e else np.zeros((0, sums.n_pcs), np.float32))
                    for name, e in zip(names, sums.embedded)}
        labels = dict(zip(names, self.labels_of(perts)))
        agg = agg.assign_coords(label=("perturbation", np.array([labels[name] for name in names], dtype=object)))
        return SimulationResult(agg, cells, embedded, np.concatenate(base_emb) if base_emb else np.zeros((0, 0)),
                                np.asarray(self.baseline.obs_names[:n]), Path(store) if store else None,
                                labels, cells_model,
                                self.source_context(n),
                                self.model.contract.perturbation_key if self.model.contract is not None else
                                "perturbation", draws, draws_model, self.gene_ids, self.source_context_obs(n))

    # ------------------------------------------------------------------ #
    def _not_finite(self, broken: list[str], d_ctrl: np.ndarray, idx: np.ndarray) -> ModelError:
        """The refusal of predictions that are not finite (NaN or inf): the model's decode gave such values, which a
        prediction written on would carry without a word (its folder's rank fit, gene map or weights damaged?)."""
        control = "" if not non_finite(d_ctrl) else " (its decode of the control cells too: every perturbation is hit)"
        where = self.model.source or "the model's folder"
        return ModelError(
            f"The model's predictions of {preview(broken, 5)} are not finite (NaN or inf) for baseline cells "
            f"{int(idx[0])} to {int(idx[-1])}{control}: the model decodes its sentences into such values, so {where} "
            "may be damaged (its rank fit, gene map or weights). Load it from a good copy, or train it again "
            "(virtualcell train --restart); the simulation stops here, with nothing returned.")

    def _aggregates(self, sums: _Sums, names: list[str], n: int, seed: int, cfg: Any, calibrate: bool) -> xr.Dataset:
        import xarray as xr

        cnt = np.maximum(sums.count, 1)[:, None]
        mean = sums.total / cnt
        var = unbiased_var(mean, sums.sq / cnt, cnt)
        model_mean = sums.model_total / cnt
        model_var = unbiased_var(model_mean, sums.model_sq / cnt, cnt)
        control_mean = self.baseline_mean(n)
        # each predicted cell against its own baseline cell: the variance of these paired changes (before clipping,
        # whose mean the calibrated cells keep) is the noise of a delta (the predicted cells are not a second,
        # independent sample of the baseline)
        var_delta = unbiased_var(sums.diff_total / cnt, sums.diff_sq / cnt, cnt)
        var_delta_model = unbiased_var(sums.model_diff_total / cnt, sums.model_diff_sq / cnt, cnt)
        control_var = unbiased_var(control_mean, np.asarray(self.expression[:n].power(2).mean(axis=0)).ravel(), n)
        bucket_mean = sums.bucket_total / np.maximum(sums.bucket_count, 1)[..., None]
        # the baseline cells of each bucket: a bucket's delta pairs its predicted cells with their own baselines
        cell_bucket = _bucket(np.arange(n), seed)
        base = self.expression[:n]
        control_bucket_mean = np.stack([np.asarray(base[cell_bucket == b].mean(axis=0)).ravel() if (cell_bucket == b).any()
                                        else np.zeros(base.shape[1]) for b in range(N_BUCKETS)])
        genes = list(self.gene_names)
        ds = xr.Dataset(
            {
                "mean": (("perturbation", "gene"), mean.astype(np.float32)),
                "frac_expressing": (("perturbation", "gene"), (sums.expressing / cnt).astype(np.float32)),
                "var": (("perturbation", "gene"), var.astype(np.float32)),
                "delta": (("perturbation", "gene"), (mean - control_mean).astype(np.float32)),
                "delta_model": (("perturbation", "gene"), (model_mean - control_mean).astype(np.float32)),
                "var_model": (("perturbation", "gene"), model_var.astype(np.float32)),
                "var_delta": (("perturbation", "gene"), np.maximum(var_delta, 0).astype(np.float32)),
                "var_delta_model": (("perturbation", "gene"), np.maximum(var_delta_model, 0).astype(np.float32)),
                "n_cells": (("perturbation",), sums.count),
                "bucket_mean": (("perturbation", "bucket", "gene"), bucket_mean.astype(np.float32)),
                "bucket_count": (("perturbation", "bucket"), sums.bucket_count),
                "control_mean": (("gene",), control_mean.astype(np.float32)),
                "control_var": (("gene",), np.maximum(control_var, 0).astype(np.float32)),
                "control_bucket_mean": (("bucket", "gene"), control_bucket_mean.astype(np.float32)),
            },
            coords={"perturbation": names, "gene": genes, "bucket": np.arange(N_BUCKETS)},
            attrs={
                "model": self.model.source or "in memory",
                # what the model ran in: bf16 on a GPU and fp32 on a CPU sample slightly different cells
                "device": self.model.device.type,
                "dtype": str(next(self.model.lm.parameters()).dtype).removeprefix("torch."),
                "seed": seed,
                "sentence_seed": self.seed,
                "n_baseline_cells": n,
                "calibrated": int(calibrate),
                "normalization": self.normalization,
                # the per-cell total the values are log1p of (0: not recorded): evaluate puts measured counts on it
                "scale_total": float(getattr(self.model.rank_fit, "total", None) or 0.0),
                # the unit of each agent's doses in the labels (conditions name none): evaluate reads measured doses so
                "dose_units": units_text(self.model.perturbations.dose_units),
                "max_genes": cfg.max_genes,
                "temperature": cfg.temperature,
                "guidance": cfg.guidance,
                "coexpression_prior": int(cfg.coexpression_prior),
                "invalid_genes": sums.n_invalid,
                "duplicate_genes": sums.n_duplicate,
                "generated_genes": sums.n_generated_genes,
            },
        )
        for key in ("data_hash", "perturbed_data_hash"):  # the file it was trained on: evaluate tells it again
            if self.model.train_config.get(key):
                ds.attrs[f"training_{key}"] = str(self.model.train_config[key])
        # which model, by what it is rather than by its path (two runs trained into one folder share the path)
        ds.attrs["model_weights"] = self.model.weights_digest()
        ds.attrs["model_serving"] = self.model.serving_digest()
        from . import __version__

        ds.attrs["virtualcell_version"] = __version__
        return ds


def _bucket(idx: np.ndarray, seed: int) -> np.ndarray:
    """A cell's resampling bucket: a hash of (seed, cell index), independent of chunking."""
    x = (idx.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B9)) * np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(31)
    return (x % np.uint64(N_BUCKETS)).astype(np.int64)


class _CellStore:
    """Per-cell predictions written chunk by chunk into a chunked netCDF (h5netcdf) file."""

    def __init__(self, path: str | Path, perturbations: list[str], n_cells: int, genes: Sequence[str]) -> None:
        import h5netcdf

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = h5netcdf.File(self.path, "w")
        self.f.dimensions = {"perturbation": len(perturbations), "cell": n_cells, "gene": len(genes)}
        # names go in attributes: variable-length string coordinates are not portable across netCDF readers
        self.f.attrs["perturbations"] = json.dumps(list(perturbations))
        self.f.attrs["genes"] = json.dumps(list(genes))
        self.var = self.f.create_variable(
            "expression", ("perturbation", "cell", "gene"), "f4",
            chunks=(1, min(n_cells, 512), len(genes)), compression="gzip", compression_opts=1,
        )

    def write(self, p: int, idx: np.ndarray, X: np.ndarray) -> None:
        self.var[p, int(idx[0]) : int(idx[-1]) + 1, :] = X

    def close(self) -> None:
        self.f.close()

    @staticmethod
    def open(path: str | Path) -> xr.DataArray:
        """The stored cells, read lazily; their ``.close()`` closes the file (a DataArray taken from a Dataset does
        not carry the Dataset's close: the file stayed open, and on Windows a second ``store=`` to the same path
        and ``predict``'s cleanup of its temporary folder failed). A read after ``.close()`` opens the file again,
        as xarray does, but only the very file these cells were read from: where a later run replaced it (another
        ``store=`` to the same path), the read is refused, naming that (it returned the later run's cells)."""
        import h5netcdf
        import xarray as xr
        from xarray.backends import CachingFileManager, H5NetCDFStore
        from xarray.backends.locks import HDF5_LOCK

        path = str(path)
        made = os.stat(path)

        def same_file(name: str, mode: str = "r", **kwargs: Any) -> Any:
            try:
                now = os.stat(name)
            except OSError:
                now = None
            if now is None or (now.st_dev, now.st_ino) != (made.st_dev, made.st_ino):
                raise OutputError(
                    f"These cells were closed, and {name!r}, the file they were read from, has since been "
                    f"{'removed' if now is None else 'replaced (another simulate(store=) to the same path)'}: "
                    "they cannot be read again. Read what you need before closing them (.load() keeps them in "
                    "memory), or give each run its own store path.")
            return h5netcdf.File(name, mode, **kwargs)

        manager = CachingFileManager(same_file, path, mode="r", kwargs={"decode_vlen_strings": True})
        ds = xr.open_dataset(H5NetCDFStore(manager, mode="r", lock=HDF5_LOCK))
        try:
            cells = ds["expression"].assign_coords(
                perturbation=json.loads(ds.attrs["perturbations"]), gene=json.loads(ds.attrs["genes"])
            )
        except BaseException:
            ds.close()
            raise
        cells.set_close(ds.close)
        return cells

