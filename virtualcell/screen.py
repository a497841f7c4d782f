"""In-silico screens: simulate a panel, score it, rank it, and pick a diverse shortlist.

:func:`run` (also ``Simulator.screen``) runs a panel in groups of perturbations. Each finished group is written
to the results folder at once, so a screen that is killed resumes where it stopped and
ends with exactly the results of an uninterrupted run (a prediction depends only on
seed, the cell and its row in the baseline, and the perturbation; a score's bootstrap only on seed and perturbation). The folder holds::

    config.json         what was screened, how; a different screen is refused here
    panel.txt           the resolved panel, one perturbation a line
    groups/             finished groups (netCDF aggregates + embedded cells), the resume state
    aggregates.nc       per-perturbation mean, fraction expressing, variance, delta
    ranking.csv/.parquet  the ranked table
    top_hits.png        the top hits with confidence intervals and their top genes
    dose_response.png   where the panel holds a drug or cytokine at two or more doses: score and top genes
                        by dose (:mod:`virtualcell.dose_response`)
    time_course.png     the same by time, where it holds one at one dose and two or more times

The ranking has one row per candidate: the objective's score with a bootstrap
confidence interval (resampling the generated cells), effect sizes against the
baseline (E-distance as ``pertpy.tools.Distance`` computes it, the L2 norm of the mean delta
and its noise-corrected version, and the pure model's noise-corrected effect size beside the
served one when the served prediction is blended with the training baseline), the top up- and down-regulated genes, and the
diverse pick for the wet lab (a ``networkx`` similarity graph of predicted effects), and whether the model
trained on measured cells of that very condition (``trained``: False for a knockout, a pair or a dose it never
saw, whose prediction is an extrapolation). ``label`` names each candidate as measured data does (the model's
training label, as predicted cells are labelled), beside its typed name in ``perturbation``.

A baseline of several contexts (cell types, patients: the model's context column) is ranked as one pool: each score
is over all the ranked cells, whatever their context. ``config.json`` (``baseline_contexts``), the aggregates' attrs
(the same, as JSON text) and ``ranking.attrs["virtualcell"]["baseline_contexts"]`` record how many ranked cells each
context holds; to rank one context, screen a baseline of its cells alone. ``unmeasured_in`` lists, per candidate, the
contexts of the ranked cells whose training cells never measured that very condition (its typed form, dose and time,
against that context's controls; :meth:`~virtualcell.model.C2SModel.measured_contexts`: the cells the model's served
baselines were fitted on, which include those of perturbations the trainer held out whole for its verdict). There the
baseline served (blended) for a candidate measured in other contexts is the mean of its effects measured in those (a
transfer: the log counts such candidates); one measured nowhere lists every context ranked (``trained`` False: a
single perturbation's ``pertmean`` or ``coexpression`` baseline is served alike in every context, a pair of trained
parts its ``additive`` one, the sum of its parts' effects in each context). It is empty where the condition was
measured in every context ranked, and where the model cannot tell: a model or a baseline without the context column,
a checkpoint without served baselines or from before they kept each context's own effect. ``trained`` says whether the
model trained on measured cells of the condition in any context: True for one measured in a single context, whatever
the contexts ranked.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ._stats import noise_corrected_sq_norm, paired_sq_norm, signed_root
from .distributed import Split
from . import safeio
from .errors import ScreenError, VirtualCellError, preview, whole_at_least
from .validation import UNSEEN_BASELINES
from .objectives import Objective, parse_objective
from .perturbations import GENETIC, Combination, Perturbation
from .progress import progress_bar

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd
    import xarray as xr

    from .model import C2SModel
    from .simulator import Simulator

__all__ = ["run", "load", "ScreenResult", "diverse_picks", "rank", "plot_top_hits"]

log = logging.getLogger(__name__)


@dataclass
class ScreenResult:
    """The ranked table, the aggregates and the folder they were written to.

    Attributes
    ----------
    ranking
        One row per candidate, best first; ``ranking.attrs["virtualcell"]`` holds the
        provenance (model, seed, objective, fingerprint, the ranked cells of each context: ``baseline_contexts``),
        which survives row selection.
    aggregates
        ``xarray.Dataset`` per perturbation and gene (see :class:`~virtualcell.simulator.SimulationResult`).
    cells
        Per-cell predictions ``(perturbation, cell, gene)`` when ``run(..., keep_cells=True)``, else ``None``.
    """

    ranking: pd.DataFrame
    aggregates: xr.Dataset
    out: Path | None
    config: dict[str, Any]
    cells: xr.DataArray | None = None

    def __repr__(self) -> str:  # (the dataclass's printed the ranking, the aggregates and every panel entry)
        r = self.ranking
        head = ", ".join(map(str, r["perturbation"].head(3))) if "perturbation" in r.columns and len(r) else ""
        picks = int(r["pick"].sum()) if "pick" in r.columns else 0
        return (f"ScreenResult({len(r)} candidates ranked, {picks} picks; top: {head or 'none'}"
                f"{'' if len(r) <= 3 else ', ...'}; folder {str(self.out) if self.out else 'none'})")

    def top(self, n: int = 10) -> pd.DataFrame:
        """The ``n`` best-ranked rows of :attr:`ranking`."""
        return self.ranking.head(n)

    def picks(self) -> pd.DataFrame:
        """The diverse shortlist for the wet lab, in rank order."""
        return self.ranking[self.ranking["pick"]]

    def plot_top_hits(self, n: int = 15, *, return_fig: bool = False) -> Any:
        """The top-n scores with confidence intervals (picks darker) beside a heatmap of their top genes."""
        return plot_top_hits(self.ranking, self.aggregates, n=n, return_fig=return_fig)

    def dose_series(self) -> pd.DataFrame:
        """The ranking's rows of each drug or cytokine screened at two or more doses, doses on one scale
        (:func:`virtualcell.dose_response.dose_series`); empty when the panel has none."""
        from .dose_response import dose_series

        return dose_series(self.ranking)

    def plot_dose_response(self, genes: list[str] | None = None, *, n_genes: int = 3, return_fig: bool = False) -> Any:
        """Each dose series' score (95% interval) and its genes' predicted change against the dose
        (:func:`virtualcell.dose_response.plot_dose_response`)."""
        from .dose_response import plot_dose_response

        return plot_dose_response(self.ranking, self.aggregates, genes=genes, n_genes=n_genes, return_fig=return_fig)

    def time_series(self) -> pd.DataFrame:
        """The ranking's rows of each drug or cytokine screened at one dose and two or more times
        (:func:`virtualcell.dose_response.time_series`); empty when the panel has none."""
        from .dose_response import time_series

        return time_series(self.ranking)

    def plot_time_course(self, genes: list[str] | None = None, *, n_genes: int = 3, return_fig: bool = False) -> Any:
        """Each time course's score (95% interval) and its genes' predicted change against the time
        (:func:`virtualcell.dose_response.plot_time_course`)."""
        from .dose_response import plot_time_course

        return plot_time_course(self.ranking, self.aggregates, genes=genes, n_genes=n_genes, return_fig=return_fig)


def _fingerprint(d: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run(
    simulator: Simulator,
    panel: Sequence[str | Perturbation | Combination],
    *,
    objective: str | Objective | Callable | None = None,
    out: str | os.PathLike[str] | None = None,
    top: int = 10,
    n_cells: int | None = None,
    seed: int = 0,
    group_size: int = 16,
    similarity: float = 0.8,
    n_boot: int = 200,
    batch_size: int = 512,
    max_genes: int | None = None,
    progress: bool = True,
    keep_cells: bool = False,
    stop_after_groups: int | None = None,
    force: bool = False,
    blend: str | float | bool | None = "auto",
    samples: int | None = None,
    coexpression_prior: bool | None = None,
    compose: bool = False,
    on_start: Callable[[], None] | None = None,
) -> ScreenResult:
    """Screen a panel of perturbations and rank them by ``objective``.

    Parameters
    ----------
    simulator
        The baseline population and model.
    panel
        Perturbations (typed, or strings in the typed syntax, or plain training labels).
    objective
        An :class:`~virtualcell.objectives.Objective`, its CLI form (``"raise:MYC"``…), or a
        callable of the delta Series. Default: largest effect.
    out
        Results folder. Written incrementally; an interrupted screen resumes from it.
    top
        How many diverse picks to choose for the wet lab.
    n_cells
        Use the first ``n_cells`` baseline cells (default all; :meth:`Simulator.simulate`).
    seed
        Sampling seed (:meth:`Simulator.simulate`); also the bootstrap's.
    group_size
        Perturbations simulated together and saved as one group: the unit an interrupted screen resumes from.
    n_boot
        Bootstrap resamples of the cell buckets behind each score's 95% interval (:func:`rank`).
    batch_size, max_genes
        As in :meth:`Simulator.simulate`.
    progress
        A progress bar over the panel.
    similarity
        Cosine similarity of predicted effects above which two candidates count as near-duplicates.
    keep_cells
        Keep the per-cell predictions in :attr:`ScreenResult.cells` (groups finished in an earlier,
        interrupted run are simulated again for them), e.g. to plot the top picks' cells.
    stop_after_groups
        Stop (as if killed) after this many new groups: for testing resumption.
    force
        Write into ``out`` even if it is a folder virtualcell did not write, or holds another
        screen (whose finished groups are then discarded).
    blend
        The weight on the model's delta against the training baseline's (see
        :meth:`Simulator.simulate`): ``"auto"`` (the checkpoint's fitted weight), a number in
        [0, 1], or ``None`` (the pure model). The ranking scores the served prediction and adds
        the pure model's ``l2_delta_corrected_model``; ``config.json`` records the weight.
    samples
        Samples of each baseline cell under each perturbation, averaged into its prediction
        (:meth:`Simulator.simulate`; ``None``: the trainer's choice, else 1). More samples make
        the ranking less noisy, for that many times the generation.
    coexpression_prior
        A genetic perturbation the model never trained on, of one of its genes, is generated with the
        coexpression baseline's shift on its logits (:meth:`Simulator.simulate`); ``False``: the model alone;
        ``None``: as the trainer chose.
        A screen with such perturbations records the setting, so a resumed one does not mix the two.
    compose
        A combination the model never trained on as such is generated from its parts' logits
        (:meth:`Simulator.simulate`; off by default). A screen it changes records it, so a resumed one does not mix.
    on_start
        Called once every input is checked, before any generation (``virtualcell screen`` prints the model's
        verdict there, so a refused panel or objective leaves nothing on stdout).

    Every file in ``out`` is written atomically (see :mod:`virtualcell.safeio`), and the
    folder is locked while the screen runs: a second screen into the same folder stops
    with :class:`~virtualcell.errors.FolderInUseError`. A screen killed at any moment and
    resumed writes the same files, byte for byte, as an uninterrupted one.
    """
    from .simulator import check_seed

    check_seed(seed)
    for name, value, least in (("top", top, 0), ("group_size", group_size, 1), ("n_boot", n_boot, 0)):
        if not whole_at_least(value, least):
            raise ScreenError(f"{name} must be a whole number of at least {least}, got {value!r}.")
    if not 0.0 <= similarity <= 1.0:  # (NaN too)
        raise ScreenError(f"similarity must be a cosine similarity in [0, 1], got {similarity!r}.")
    perts = simulator.model.resolve(panel)
    # the groups are simulated by name, which is resolved again: a name that then named another perturbation left
    # the ranking's maps without it (a raw KeyError at the end of the screen); each is what its name resolves to
    again = simulator.model.resolve([str(p) for p in perts])
    moved = [f"{p} -> {q}" for p, q in zip(perts, again) if str(q) != str(p)]
    if moved:  # (none known: every ask of the tests' vocabularies resolves to itself; said should one ever not)
        log.warning("%d of the panel's perturbations name another once resolved again (%s): each is screened as its "
                    "name resolves, the second.", len(moved), preview(moved, 3))
    perts = [q if str(q) != str(p) else p for p, q in zip(perts, again)]
    if not perts:
        raise ScreenError("The panel is empty: list at least one perturbation to screen.")
    names = [str(p) for p in perts]
    if len(set(names)) != len(names):
        dup = sorted({x for x in names if names.count(x) > 1})
        raise ScreenError(f"The panel lists {dup} more than once (after resolving labels). List each once.")
    obj = parse_objective(objective)
    n = simulator.baseline.n_obs if n_cells is None else min(n_cells, simulator.baseline.n_obs)
    genes = list(simulator.gene_names)
    obj.on_simulator(simulator).bind(genes, simulator.baseline_mean(n))  # unknown genes fail here, before generation
    w = simulator.blend_weight(blend)
    w_unseen = simulator.unseen_weight(blend)
    # whether the model trained on measured cells of exactly this condition: a knockout never trained on, a pair
    # only its parts were, a drug at a dose between its trained ones are the model's extrapolations
    seen = set(simulator.model.perturbations.trained())
    trained = {name: label in seen for name, label in zip(names, simulator.model.perturbations.labels_for(perts))}
    labels = dict(zip(names, simulator.labels_of(perts)))  # what measured data calls each: the ranking's 'label'
    context = simulator.source_context(n)
    composition = None if context is None else _composition(context[1])  # the ranked cells of each context
    unmeasured = _unmeasured(simulator.model, perts, names, list(composition or ()))
    if w is not None and w < 1.0:
        # served the weight fitted on trained perturbations: every untrained one but those the run's verdict on
        # perturbations held out whole fitted a weight for (a knockout never trained on, not a pair or a new dose)
        own = bool((simulator.model.verdict or {}).get("unseen"))
        new = [n for n, p in zip(names, perts) if not trained[n]
               and not (own and simulator.model.baselines.delta_for(p)[1] in UNSEEN_BASELINES)]
        if new:
            chosen = not (blend is True or (isinstance(blend, str) and blend.lower() == "auto"))
            log.warning("%d of the panel's perturbations %s never trained on as such (%s); they are served with "
                        "the blend weight %.2f %s, which says nothing about these: the pure "
                        "model's figures (*_model) are beside the served ones.%s", len(new),
                        "was" if len(new) == 1 else "were", preview(new, 5), w,
                        "you chose" if chosen else "fitted on trained ones",
                        "" if own or not any(isinstance(p, Perturbation) and p.kind in GENETIC
                                             for n, p in zip(names, perts) if n in new)
                        else " Train with --unseen-fraction to fit a weight for knockouts never trained on.")
    k = simulator.sample_count(samples)
    config = {
        "model": simulator.model.source, "model_config": simulator.model.train_config.get("data_hash"),
        "baseline_cells": n, "baseline_hash": simulator.baseline_digest(n), "panel": names, "seed": seed,
        "group_size": group_size, "max_genes": max_genes or simulator.model.top_k, "objective": obj.to_dict(),
        "batch_size": batch_size, "blend_weight": w, "samples": k, "weights": simulator.model.weights_digest(),
        "serving": simulator.model.serving_digest(), "baseline_reads": simulator.reading_digest(n),
    }
    if composition is not None:  # a record only: the contexts are checked on resuming through baseline_reads
        config["baseline_contexts"] = composition
    sim_keys = ("model", "model_config", "baseline_cells", "baseline_hash", "panel", "seed", "group_size", "max_genes")
    if w is not None:  # a blended screen is another screen; a pure one keeps the fingerprint it always had
        sim_keys = (*sim_keys, "blend_weight")
    if w_unseen != w:  # so is one serving a weight of its own for perturbations the model never trained on
        config["blend_weight_unseen"] = w_unseen
        sim_keys = (*sim_keys, "blend_weight_unseen")
    if k != 1:  # so is one with several samples per cell (one sample: the fingerprint it always had)
        sim_keys = (*sim_keys, "samples")
    coexpression_prior = simulator.generation_config(coexpression_prior=coexpression_prior).coexpression_prior
    priors = simulator.model.coexpression_priors(perts)
    if priors is not None:  # so is one the coexpression prior applies to
        config["coexpression_prior"] = bool(coexpression_prior)
        sim_keys = (*sim_keys, "coexpression_prior")
        if coexpression_prior:
            moved = [n for n, prior in zip(names, priors) if prior is not None]
            log.info("%d of the panel's perturbations were never trained on (%s): the model generates them with the "
                     "coexpression baseline's shift on its logits (coexpression_prior=False: the model alone)",
                     len(moved), preview(moved, 5))
    composed = [n for n, p in zip(names, perts) if simulator.model.composes(p, compose=compose)]
    if composed:  # recorded, so that a resumed screen never mixes the two ways (off: the fingerprint it always had)
        config["compose"] = sorted(composed)
        sim_keys = (*sim_keys, "compose")
        log.info("%d of the panel's combinations were never trained on as such (%s): generated from their parts' "
                 "logits (compose=False: from a prompt naming both)", len(composed), preview(composed, 5))
    fingerprint = _fingerprint({k: config[k] for k in sim_keys})
    config["fingerprint"] = fingerprint
    groups = [names[i : i + group_size] for i in range(0, len(names), group_size)]
    folder = Path(out) if out is not None else None
    split = Split.current(cpu=simulator.model.device.type == "cpu")
    with contextlib.ExitStack() as stack:
        refused: VirtualCellError | None = None  # raised below, once every process knows
        if folder is not None and split.main:  # only the main process touches the folder
            try:
                stack.enter_context(safeio.output_folder(folder, kind="screen", force=force, legacy=_legacy(folder)))
            except VirtualCellError as err:
                refused = err
        return _run(simulator, obj, names, groups, config, sim_keys, fingerprint, folder, split, n=n, seed=seed,
                    top=top, similarity=similarity, n_boot=n_boot, batch_size=batch_size, max_genes=max_genes,
                    progress=progress, keep_cells=keep_cells, stop_after_groups=stop_after_groups, force=force,
                    refused=refused, blend=blend, samples=k, coexpression_prior=coexpression_prior, compose=compose,
                    trained=trained, labels=labels, unmeasured=unmeasured, on_start=on_start)


def _composition(contexts: Sequence[str]) -> dict[str, int]:
    """How many of the baseline cells whose ``contexts`` these are (:meth:`Simulator.source_context`'s values) come
    from each context, by context name (``virtualcell screen`` prints it)."""
    found, counts = np.unique(np.asarray([str(c) for c in contexts], dtype=object), return_counts=True)
    return {str(c): int(k) for c, k in zip(found, counts)}


def _unmeasured(model: C2SModel, perts: Sequence[Perturbation | Combination], names: Sequence[str],
                contexts: Sequence[str]) -> dict[str, list[str]]:
    """Each candidate's ``unmeasured_in``: the ``contexts`` (the ranked cells') whose training cells never measured
    it (:meth:`C2SModel.measured_contexts`); empty where the model cannot tell. Says in the log how many are served
    another context's measured effect somewhere (a transfer)."""
    measured = {name: model.measured_contexts(p) if contexts else None for name, p in zip(names, perts)}
    out = {name: [] if m is None else [c for c in contexts if c not in m] for name, m in measured.items()}
    moved = [f"{name} (not in {', '.join(out[name])})" for name in names if out[name] and measured[name]]
    if moved:
        log.info("%d of the panel's %d candidates were never measured in some of the baseline cells' contexts, only "
                 "in other contexts the model trained on (%s): in those cells their served baseline is their effect "
                 "measured elsewhere (the mean over the contexts measured), a transfer; the ranking's unmeasured_in "
                 "column names the contexts.", len(moved), len(names), preview(moved, 5))
    return out


def _legacy(folder: Path) -> tuple[str, ...]:
    """What marks a screen folder written before the marker existed."""
    return ("config.json",) if (folder / "groups").is_dir() else ()


def check_out(out: str | os.PathLike[str], *, force: bool = False) -> None:
    """Refuse an ``out`` that :func:`run` would refuse (a file, a user's folder, another command's results), before
    the minutes of loading a model: the same checks, nothing written."""
    safeio.check_output_folder(out, kind="screen", force=force, legacy=_legacy(Path(out)))


# screen settings that enter the fingerprint only where they change something (else a screen keeps the fingerprint
# it had before they existed)
_RECORDED_WHERE_THEY_APPLY = ("blend_weight", "blend_weight_unseen", "samples", "coexpression_prior", "compose")


def _run(simulator: Simulator, obj: Objective, names: list[str], groups: list[list[str]], config: dict[str, Any],
         sim_keys: Sequence[str], fingerprint: str, folder: Path | None, split: Split, *, n: int, seed: int, top: int,
         similarity: float, n_boot: int, batch_size: int, max_genes: int | None, progress: bool, keep_cells: bool,
         stop_after_groups: int | None, force: bool, refused: VirtualCellError | None,
         blend: str | float | bool | None = "auto", samples: int = 1, coexpression_prior: bool = True,
         compose: bool = False, trained: dict[str, bool], labels: dict[str, str],
         unmeasured: dict[str, list[str]], on_start: Callable[[], None] | None = None) -> ScreenResult:
    """The body of :func:`screen`, run while the folder is locked; ``trained``: each name's ``trained`` column,
    ``unmeasured``: its ``unmeasured_in``.
    ``blend`` goes to :meth:`Simulator.simulate` as the user gave it, which serves each perturbation its weight
    (``"auto"``: the one fitted on perturbations never trained on, for those, where the verdict fitted it;
    given the trained ones' weight resolved, it served that to every perturbation)."""
    import xarray as xr

    done: dict[int, Path] = {}
    if refused is None and folder is not None and split.main:
        try:
            done = _open_folder(folder, config, sim_keys, fingerprint, names, len(groups), force=force)
        except VirtualCellError as err:
            refused = err
    split.main_error(refused)  # the main process's refusal stops every process
    if on_start is not None and split.main:
        on_start()
    if split.world > 1:  # every process follows the main one's view of the folder
        done_ids = split.gather(sorted(done))[0]
        done = {g: folder / "groups" / f"group_{g:05d}.nc" for g in done_ids} if folder is not None else {}
    parts: dict[int, xr.Dataset] = {}
    embedded: dict[str, np.ndarray] = {}
    cells: dict[int, xr.DataArray] = {}
    new_groups = 0
    resumed = 0 if keep_cells else sum(len(groups[g]) for g in done)  # groups read back, not simulated again
    bar = progress_bar(len(names), progress and split.main, "screen", "perturbation", initial=resumed)
    try:  # (closed however the loop ends: an interrupt drew the stale bar again below its message)
        for gi, group in enumerate(groups):
            if gi in done and not keep_cells:
                try:
                    parts[gi], emb = _read_group(done[gi], group)
                    embedded.update(emb)
                    continue
                except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:  # damaged: run it again
                    log.warning("group %d in %s cannot be read (%s); running it again", gi, done[gi].parent, err)
                    del done[gi]
                    bar.n -= len(group)  # it was counted as resumed
                    bar.refresh()
            if stop_after_groups is not None and new_groups >= stop_after_groups:
                raise KeyboardInterrupt(f"stopped after {new_groups} groups (stop_after_groups)")
            res = simulator.simulate(group, n_cells=n, seed=seed, batch_size=batch_size, max_genes=max_genes,
                                     keep_cells=keep_cells, progress=False, blend=blend, samples=samples,
                                     coexpression_prior=coexpression_prior, compose=compose,
                                     on_chunk=lambda done_cells, total, gi=gi: bar.set_postfix_str(
                                         f"group {gi + 1}/{len(groups)}: {done_cells}/{total} cells"))
            parts[gi] = res.aggregates
            embedded.update(res.embedded)
            if keep_cells:
                cells[gi] = res.cells
            if folder is not None and split.main and gi not in done:
                _write_group(folder / "groups" / f"group_{gi:05d}", res.aggregates, res.embedded)
            new_groups += 1
            bar.update(len(group))
    finally:
        bar.close()
    # each group's label coordinate is set again from this panel's labels (a group a version without it wrote lacks it)
    agg = xr.concat([parts[g].drop_vars("label", errors="ignore") for g in range(len(groups))], dim="perturbation",
                    data_vars="minimal", coords="minimal", compat="override")
    named = [labels.get(str(p), str(p)) for p in agg["perturbation"].values]
    agg = _plain_strings(agg.assign_coords(label=("perturbation", named)))
    agg.attrs.update({"objective": obj.name, "fingerprint": fingerprint})
    agg.attrs.update(_panel_attrs([parts[g] for g in range(len(groups))]))
    if "baseline_contexts" in config:  # (JSON: a netCDF attribute holds no mapping)
        agg.attrs["baseline_contexts"] = json.dumps(config["baseline_contexts"], sort_keys=True)
    # one path for the baseline's embedding, whether groups were simulated now or read back, so that
    # a resumed screen ranks exactly as an uninterrupted one (simulate embeds chunk by chunk)
    from .simulator import KEEP_EMBEDDED

    # against the same cells the predicted side keeps (the first KEEP_EMBEDDED): the first 256 of 600 baseline
    # cells against all 600 are 0.05 apart with no perturbation at all
    base_emb = simulator.embed(simulator.expression[:min(n, KEEP_EMBEDDED)].toarray())
    ranking = rank(agg, obj, embedded=embedded, baseline_embedded=base_emb, n_boot=n_boot, seed=seed)
    ranking = diverse_picks(ranking, agg, top=top, similarity=similarity)
    ranking["trained"] = ranking["perturbation"].map(trained)
    ranking["unmeasured_in"] = [list(unmeasured[p]) for p in ranking["perturbation"]]
    ranking.insert(ranking.columns.get_loc("perturbation") + 1, "label", ranking["perturbation"].map(labels))
    ranking.attrs["virtualcell"] = _provenance(agg)
    if folder is not None and split.main:
        with _output_error(folder / "aggregates.nc"), safeio.atomic_path(folder / "aggregates.nc") as tmp:
            _to_netcdf(agg, tmp)
        table = ranking.copy()
        for col in LIST_COLUMNS:
            table[col] = table[col].map(lambda v: ";".join(v))
        with _output_error(folder / "ranking.csv"), safeio.atomic_path(folder / "ranking.csv") as tmp:
            table.to_csv(tmp, index=False)
        import matplotlib.pyplot as plt

        from .dose_response import dose_series, plot_dose_response, plot_time_course, time_series

        figures = {"top_hits.png": plot_top_hits(ranking, agg, return_fig=True,
                                                 first=[*getattr(obj, "up", ()), *getattr(obj, "down", ())])}
        if not dose_series(ranking).empty:
            figures["dose_response.png"] = plot_dose_response(ranking, agg, return_fig=True)
        if not time_series(ranking).empty:
            figures["time_course.png"] = plot_time_course(ranking, agg, return_fig=True)
        for name, fig in figures.items():
            try:
                with _output_error(folder / name), safeio.atomic_path(folder / name) as tmp:
                    fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
            finally:
                plt.close(fig)
        # last: what load() reads as the mark of a finished screen (a run cut by a full disk while writing its
        # figures left a folder that loaded as finished without them)
        with _output_error(folder / "ranking.parquet"), \
                safeio.atomic_path(folder / "ranking.parquet") as tmp:
            table.to_parquet(tmp, index=False)
    kept = xr.concat([cells[g] for g in range(len(groups))], dim="perturbation") if keep_cells else None
    return ScreenResult(ranking, agg, folder, config, kept)


LIST_COLUMNS = ("top_up", "top_down", "represents", "unmeasured_in")  # written ';'-joined into ranking.csv / .parquet


def _provenance(agg: xr.Dataset) -> dict[str, Any]:
    """What ``ranking.attrs["virtualcell"]`` keeps of the aggregates' attributes: the run's provenance."""
    keys = ("model", "seed", "objective", "fingerprint", "n_baseline_cells", "normalization", "blend_weight",
            "baseline", "coexpression_prior", "composed", "baseline_contexts")
    out = {k: agg.attrs[k].item() if isinstance(agg.attrs[k], np.generic) else agg.attrs[k]
           for k in keys if k in agg.attrs}
    if "baseline_contexts" in out:  # the ranked cells of each context, as a mapping again
        with contextlib.suppress(ValueError):  # (an attribute edited by hand stays the text it is)
            out["baseline_contexts"] = json.loads(out["baseline_contexts"])
    return out


def load(folder: str | Path) -> ScreenResult:
    """A finished screen's results from the folder :func:`run` wrote (``out=``), without the model or the cells:
    the ranking (its gene lists restored, its provenance in ``attrs``), the aggregates and the config. A folder whose
    screen did not finish is refused: run the same screen into it again, and it resumes from its saved groups."""
    import pandas as pd
    import xarray as xr

    folder = Path(folder)
    # (ranking.parquet is the last file a screen writes, after its figures)
    missing = [f for f in ("config.json", "aggregates.nc", "ranking.parquet") if not (folder / f).exists()]
    if missing:
        raise ScreenError(f"{folder} holds no finished screen ({', '.join(missing)} missing). Run the same screen "
                          "into it again to finish it: it resumes from its saved groups.")
    # a damaged file (a copy cut short, an edit) is named, with how to make it again, not left to its reader's error
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError(f"a JSON {type(config).__name__}, not the screen's settings")
    except (OSError, ValueError) as err:
        raise ScreenError(f"{folder / 'config.json'} cannot be read ({_first_line(err)}): the screen folder is "
                          "damaged. Copy it again, or run the screen again into it with --force (force=True), which "
                          "starts it over.") from None
    rebuild = ("the screen folder is damaged. Copy it again, or run the same screen into it again: it rebuilds its "
               "results from its saved groups.")
    try:
        ranking = pd.read_parquet(folder / "ranking.parquet")
    except Exception as err:  # noqa: BLE001 - pyarrow's own errors (ArrowInvalid) for a truncated file
        raise ScreenError(f"{folder / 'ranking.parquet'} cannot be read ({_first_line(err)}): {rebuild}") from None
    for col in LIST_COLUMNS:
        if col in ranking.columns:
            ranking[col] = ranking[col].map(lambda s: [x for x in str(s).split(";") if x])
    try:
        agg = xr.load_dataset(folder / "aggregates.nc", engine="h5netcdf")
    except Exception as err:  # noqa: BLE001 - h5py's and h5netcdf's own errors for a truncated or empty file
        raise ScreenError(f"{folder / 'aggregates.nc'} cannot be read ({_first_line(err)}): {rebuild}") from None
    ranking.attrs["virtualcell"] = _provenance(agg)
    return ScreenResult(ranking, agg, folder, config)


def _first_line(err: BaseException) -> str:
    """``err`` for a message: its type and the first line of what it says."""
    said = str(err).strip().splitlines()
    return f"{type(err).__name__}: {said[0][:160]}" if said else type(err).__name__


def screen(simulator: Simulator, panel: Sequence[str | Perturbation | Combination], **options: Any) -> ScreenResult:
    """Deprecated alias of :func:`run` (or ``Simulator.screen``); removed in the next release."""
    import warnings

    warnings.warn("virtualcell.screen.screen is deprecated: use simulator.screen(panel, ...) or "
                  "virtualcell.screen.run(simulator, panel, ...).", DeprecationWarning, stacklevel=2)
    return run(simulator, panel, **options)


# what a screen writes when it finishes, after its groups (ranking.parquet last of them: the mark of a finished one)
FINISHED_FILES = ("aggregates.nc", "ranking.csv", "ranking.parquet", "top_hits.png", "dose_response.png",
                  "time_course.png")
SCREEN_FILES = ("config.json", "panel.txt", "groups", *FINISHED_FILES)


def _open_folder(folder: Path, config: dict[str, Any], sim_keys: Sequence[str], fingerprint: str, names: list[str],
                 n_groups: int, *, force: bool = False) -> dict[int, Path]:
    """Check (or start) a results folder; return the finished groups found there."""
    cfg_path = folder / "config.json"
    groups = folder / "groups"
    forced = False
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            if not force:
                raise ScreenError(
                    f"{cfg_path} is not a readable screen config ({err}), so the finished groups in {folder} "
                    "cannot be checked. Pass --force (force=True) to start this screen over there, or choose "
                    "another --out folder."
                ) from None
            old = {}
        # the model's weights and what serves them (the verdict's settings, the decode, the baselines: `virtualcell
        # verdict` rewrites those in place), checked beside the fingerprint (a screen from before they were recorded
        # resumes): the same folder retrained, trained on or judged again is another model
        reweighted = "weights" in old and old["weights"] != config["weights"]
        reserved = "serving" in old and old["serving"] != config["serving"]
        # the baseline's contexts, gene names or cells past the first n (the embedding): checked where recorded
        rebased = "baseline_reads" in old and old["baseline_reads"] != config["baseline_reads"]
        # the model's path as typed (relative to where the screen ran) says nothing where the weights match
        same_model = "weights" in old and not reweighted
        diff = [k for k in sim_keys if old.get(k) != config[k] and not (k == "model" and same_model)]
        # the settings a screen records only where they apply: one the other screen recorded differs too
        diff += [k for k in _RECORDED_WHERE_THEY_APPLY if k not in sim_keys and k in old and old[k] != config.get(k)]
        renamed = (old.get("fingerprint") != fingerprint and not diff and same_model
                   and old.get("model") != config["model"])
        changed = (old.get("fingerprint") != fingerprint and not renamed) or reweighted or reserved or rebased
        if changed and not force:
            if "model" in diff and "weights" not in old:  # (a screen from before the weights were recorded)
                diff[diff.index("model")] = (f"model (this screen, from an older virtualcell, recorded its model only "
                                             f"by the path as typed, {old.get('model')!r}: give --model exactly so "
                                             "to go on with it)")
            diff += ["the model's weights (the model folder now holds another training run)"] if reweighted else []
            diff += (["the baseline cells' contexts, their gene names, the cells past the first "
                      f"{config['baseline_cells']} or the Simulator's n_pcs (the embedding the distances are "
                      "measured on is fitted on every cell)"] if rebased else [])
            diff += (["how the model's predictions are served (its verdict was run again: generation settings, decode "
                      "or blend)"] if reserved else [])
            raise ScreenError(
                f"{folder} holds the results of a different screen (differs in: {', '.join(diff) or 'config'}). "
                "Refusing to mix them: choose another --out folder, or pass --force (force=True) to discard them "
                "and start this screen there."
            )
        forced = changed  # forced: the other screen's groups go (once its outputs could be moved aside, below)
        if not changed:
            _say_objective_change(folder, old.get("objective"), config["objective"])
    # a finished screen's outputs go before this one's config is written: until this run writes its own, the folder
    # holds no finished screen (vc.screen.load read another screen's ranking under this one's config). All of them
    # are moved aside first: one that cannot be (a ranking.csv open in Excel, on Windows) stops the run here, before
    # anything is simulated or deleted, with the previous results as they were (they went one by one, and the run
    # stopped at the held file with aggregates.nc deleted: the previous screen no longer loaded)
    aside = _move_aside(folder)
    try:
        if forced:  # (before this run's config: a resume must never take the other screen's groups for its own)
            import shutil

            shutil.rmtree(groups, ignore_errors=True)
        with _output_error(cfg_path, _UNCHANGED_FORCED if forced else _UNCHANGED):
            safeio.write_text(cfg_path, json.dumps(config, indent=1, default=str))
    except BaseException:
        _put_back(aside)  # (the config is still the previous screen's, written atomically: its results go with it)
        raise
    # this run's config is written: the previous results are no longer the folder's, whatever happens next
    for moved in aside.values():
        moved.unlink(missing_ok=True)
    with _output_error(folder / "panel.txt", _STARTED):
        safeio.write_text(folder / "panel.txt", "\n".join(names) + "\n")
    groups.mkdir(exist_ok=True)
    for junk in [*folder.glob(".*.partial*"), *groups.glob(".*.partial*")]:  # from a write that was killed
        junk.unlink(missing_ok=True)
    done = {}
    for gi in range(n_groups):
        f = groups / f"group_{gi:05d}.nc"
        if f.exists() and f.with_suffix(".npz").exists():
            done[gi] = f
    if done:
        log.info("resuming: %d of %d groups already done", len(done), n_groups)
    return done


# what a run stopped by an output it cannot write says was left, and what to do then
_RANKING = "run the same screen again: it resumes from its saved groups and only ranks them again"
_UNCHANGED = "run the screen again (nothing was changed: the folder's previous results are as they were)"
_UNCHANGED_FORCED = ("run the screen again (the folder's previous results are as they were; the other screen's "
                     "simulated groups were discarded, as --force asked)")
_STARTED = "run the screen again (this screen's settings are written: the folder holds no finished screen until it ends)"


def _held_open(path: Path, err: OSError, then: str) -> str:
    """The message for ``path`` that could not be replaced (``err``, a PermissionError): on Windows most often a file
    another program holds open; ``then``: what the run left and what to do (one of the texts above)."""
    return (f"{str(path)!r} cannot be replaced ({err.strerror or err}): it may be open in another program (on Windows a "
            f"spreadsheet or a viewer showing it holds it: close it there), or the folder is not writable to you "
            f"(check its permissions); then {then}.")


@contextlib.contextmanager
def _output_error(path: Path, then: str = _RANKING) -> Iterator[None]:
    """A PermissionError while the block writes ``path`` raised as a ScreenError that names the likely cause."""
    try:
        yield
    except PermissionError as err:
        raise ScreenError(_held_open(path, err, then)) from None


def _move_aside(folder: Path) -> dict[Path, Path]:
    """Move a finished screen's outputs in ``folder`` to hidden names (swept as leftovers of a killed write if this
    run dies before deleting them); if one cannot be moved, those moved go back and a ScreenError says why."""
    moved: dict[Path, Path] = {}
    try:
        for name in FINISHED_FILES:
            path = folder / name
            if path.exists():
                with _output_error(path, _UNCHANGED):
                    os.replace(path, folder / f".{name}.previous.partial")
                moved[path] = folder / f".{name}.previous.partial"
    except BaseException:
        _put_back(moved)
        raise
    return moved


def _put_back(moved: dict[Path, Path]) -> None:
    for path, aside in moved.items():
        with contextlib.suppress(OSError):
            os.replace(aside, path)


def _say_objective_change(folder: Path, old: Any, new: dict[str, Any]) -> None:
    """Say where a resumed screen ranks its groups by another objective than the folder's last ranking (recorded in
    ``old``): the groups do not depend on it and are kept, the ranking follows the new one. A warning where the
    objective reads the same and only its reference's cells differ (``target_digest``: the file was rewritten since);
    nothing where a record from before the digest existed cannot tell."""
    if not isinstance(old, dict):
        return
    differ = [k for k in new if k in old and old[k] != new[k]]
    if not differ:
        return
    what = ("ranked again toward the reference given now, whose cells differ from those of the folder's last ranking "
            f"(the same {new.get('description')!r}: the file changed since, or was replaced)")
    if differ != ["target_digest"]:
        what = (f"ranked by the objective given now ({new.get('description') or new.get('name')!r}), not by the one "
                f"of the folder's last ranking ({old.get('description') or old.get('name')!r})")
    (log.warning if differ == ["target_digest"] else log.info)(
        "%s: the saved groups are %s. The groups (the predictions) do not depend on the objective and are kept; the "
        "ranking and config.json follow the new one.", folder, what)


def _plain_strings(ds: xr.Dataset) -> xr.Dataset:
    """Drop the on-disk encodings, so that string coordinates are written at their full length.

    A group read back from disk remembers the fixed width of its own names (``<U11``); left
    in place, that width would truncate a longer name of another group when the
    concatenation is written (``ko:CTD-2196E14.4`` -> ``ko:CTD-2196``).
    """
    ds = ds.copy()
    for name in ds.variables:
        ds[name].encoding = {}
    for name in ("perturbation", "gene", "label"):
        if name in ds.coords:  # (on the coordinate's own dims: a bare array made 'label' a dimension of its own)
            ds = ds.assign_coords({name: (ds[name].dims, np.array([str(v) for v in ds[name].values], dtype=object))})
    return ds


def _read_group(path: Path, names: Sequence[str]) -> tuple[xr.Dataset, dict[str, np.ndarray]]:
    """A finished group and its embedded cells, as the run that wrote it held them; ``names``: the perturbations the
    group holds in this screen. A file that holds others (copied over from another group or screen) is refused: it
    was ranked as this group's perturbations, or failed in the ranking with a raw TypeError."""
    import xarray as xr

    ds = _plain_strings(xr.load_dataset(path, engine="h5netcdf"))
    held = [str(v) for v in ds["perturbation"].values] if "perturbation" in ds.coords else []
    if held != [str(n) for n in names]:
        raise ScreenError(
            f"{path} holds {preview(held, 4) or 'no perturbations'}, not this group's {preview(names, 4)}: the file is "
            f"another group's or another screen's. Delete {path.name} and {path.with_suffix('.npz').name} to have the "
            "group run again, or pass --force (force=True) to start the screen over.")
    if "control_bucket_mean" not in ds:
        raise ValueError("written by an older virtualcell, without paired buckets")
    if "var_delta" not in ds:
        raise ValueError("written by an older virtualcell, without the paired noise of its deltas")
    with np.load(path.with_suffix(".npz")) as z:
        return ds, {k: z[k] for k in z.files}


def _write_group(stem: Path, agg: xr.Dataset, embedded: dict[str, np.ndarray]) -> None:
    """Write a finished group so that a kill leaves either nothing or the whole group.

    The ``.npz`` goes first and the ``.nc`` last: a group counts as finished only when
    both exist, and each appears complete or not at all (:func:`safeio.atomic_path`).
    """
    with safeio.atomic_path(stem.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **embedded)
    with safeio.atomic_path(stem.with_suffix(".nc")) as tmp:
        _to_netcdf(_plain_strings(agg), tmp)


def _to_netcdf(agg: xr.Dataset, path: Path) -> None:
    """``agg`` as netCDF, its float arrays compressed: a wide panel's files are mostly the zeros of genes and buckets
    no cell reached, and a screen writes each group and then the whole."""
    encoding = {k: {"zlib": True, "complevel": 4} for k, v in agg.data_vars.items() if v.dtype.kind == "f"}
    agg.to_netcdf(path, engine="h5netcdf", encoding=encoding)


def _panel_attrs(parts: Sequence[xr.Dataset]) -> dict[str, Any]:
    """The attributes that differ between a screen's groups, for the whole panel (``xr.concat`` keeps the
    first group's): the perturbations composed, the baselines blended in and the devices and dtypes the groups ran
    in (each group's, joined), the weight served to perturbations never trained on (where any group served it), the
    generation counters (summed)."""
    out: dict[str, Any] = {
        "composed": "; ".join(c for a in parts for c in str(a.attrs.get("composed", "")).split("; ") if c),
        "baseline": ";".join(sorted({b for a in parts for b in str(a.attrs.get("baseline", "none")).split(";")}
                                    - {"none", ""})) or "none",
    }
    for key in ("device", "dtype"):  # (a screen resumed on another machine ran its groups on each)
        seen = sorted({str(a.attrs[key]) for a in parts if key in a.attrs})
        if seen:
            out[key] = ";".join(seen)
    for key in ("invalid_genes", "duplicate_genes", "generated_genes"):
        if all(key in a.attrs for a in parts):
            out[key] = int(sum(int(a.attrs[key]) for a in parts))
    unseen = [a.attrs["blend_weight_unseen"] for a in parts if "blend_weight_unseen" in a.attrs]
    if unseen:
        out["blend_weight_unseen"] = unseen[0]
    return out


def rank(agg: xr.Dataset, objective: Objective, *, embedded: dict[str, np.ndarray] | None = None,
         baseline_embedded: np.ndarray | None = None, n_boot: int = 200, seed: int = 0) -> pd.DataFrame:
    """Score every perturbation, with a bootstrap 95% interval over resampled cell buckets.

    A bucket's delta pairs its predicted cells with their own baseline cells
    (``control_bucket_mean``), so a resample compares the same cells, as the score does.
    Objectives that are not linear in the delta, such as the L2 norm of a noisy mean,
    are biased upward, and a resample is biased once more. The bootstrap measures that
    bias, and ``score`` is the bias-corrected estimate (:meth:`.Objective.corrected`:
    ``2 * plug_in - median(boots)``; for the largest effect, on the squared norm, with the mean of the
    resamples' squares);
    ``score_low`` and ``score_high`` are the basic bootstrap interval built around the same
    correction, ``2 * plug_in - q97.5`` and ``2 * plug_in - q2.5``. So the score always lies
    inside its interval. With fewer than two buckets of cells there is no interval (NaN bounds). The
    interval covers the prediction's sampling over its cells, nothing else: a perturbation served its
    training baseline alone (blend weight 0) is one shift for every cell, so its interval is about as
    narrow as a point, and says nothing of how well the training cells measured that shift.
    ``l2_delta`` is the plain, uncorrected norm of the mean delta.
    ``l2_delta_corrected`` is ``sign(x) * sqrt(|x|)`` of ``x = ||delta||^2 - noise``, with the noise of
    paired cells (each predicted cell against its own baseline cell: ``sum(var_delta) / n``); it is
    negative when the effect is below the noise, so such effects keep their order instead of tying at 0
    (``evaluate.effect_size``'s ``effect_size`` column is the same transform of the measured ``x``, which its
    ``squared_norm`` minus ``noise`` gives).
    ``l2_delta_corrected_model`` is the pure model's (equal to ``l2_delta_corrected`` unless the
    served prediction is blended with a baseline).
    """
    import pandas as pd

    from .generation import stable_key

    genes = [str(g) for g in agg["gene"].values]
    control = agg["control_mean"].values.astype(np.float64)
    control_var = agg["control_var"].values.astype(np.float64)
    # aggregates from before paired buckets: every resample against the whole baseline
    paired = agg["control_bucket_mean"].values.astype(np.float64) if "control_bucket_mean" in agg else None
    n_control = int(agg.attrs.get("n_baseline_cells", 0))
    rows = []
    from .evaluate.distances import edistance  # (pertpy's E-distance, without importing pertpy)

    for p in agg["perturbation"].values:
        a = agg.sel(perturbation=p)
        delta = a["delta"].values.astype(np.float64)
        n = int(a["n_cells"])
        bm = a["bucket_mean"].values.astype(np.float64)
        bc = a["bucket_count"].values.astype(np.float64)
        bucket_delta = bm - paired if paired is not None else bm - control
        boots = []
        nonempty = np.flatnonzero(bc > 0)
        rng = np.random.default_rng([seed, stable_key(str(p))])  # its own draws: the same whatever else is screened
        for _ in range(n_boot if nonempty.size > 1 else 0):  # (one bucket: a resample returns it)
            pick = rng.choice(nonempty, size=nonempty.size, replace=True)
            w = bc[pick]
            boots.append(objective.score((bucket_delta[pick] * w[:, None]).sum(0) / w.sum()))
        plug_in = objective.score(delta)
        if boots:
            score, score_low, score_high = objective.corrected(plug_in, np.asarray(boots), n_buckets=nonempty.size)
        else:  # no resamples: no interval and no bias to measure
            score, score_low, score_high = plug_in, float("nan"), float("nan")
        if "var_delta" in a:  # each predicted cell against its own baseline cell
            sq, noise = paired_sq_norm(delta, var_diff=a["var_delta"].values, n=n)
        else:  # aggregates from before: two independent groups
            sq, noise = noise_corrected_sq_norm(delta, var_a=a["var"].values, n_a=n, var_b=control_var, n_b=n_control)
        order = np.argsort(delta)
        ed = float("nan")
        if embedded and baseline_embedded is not None:
            e = embedded.get(str(p))
            if e is not None and e.shape[0] > 1:
                ed = float(edistance(e, baseline_embedded))
        model_delta = a["delta_model"].values.astype(np.float64) if "delta_model" in a else delta
        if "var_delta_model" in a:
            sq_m, noise_m = paired_sq_norm(model_delta, var_diff=a["var_delta_model"].values, n=n)
        else:
            model_var = a["var_model"].values if "var_model" in a else a["var"].values
            sq_m, noise_m = noise_corrected_sq_norm(model_delta, var_a=model_var, n_a=n, var_b=control_var,
                                                    n_b=n_control)
        rows.append({
            "perturbation": str(p),
            "score": float(score),
            "score_low": float(score_low),
            "score_high": float(score_high),
            "edistance": ed,
            "l2_delta": float(np.sqrt(sq)),
            "l2_delta_corrected": signed_root(sq - noise),
            "l2_delta_corrected_model": signed_root(sq_m - noise_m),
            "n_cells": n,
            "top_up": [genes[i] for i in order[::-1][:5] if delta[i] > 0],
            "top_down": [genes[i] for i in order[:5] if delta[i] < 0],
        })
    bad = [r["perturbation"] for r in rows if not np.isfinite(r["score"])]
    if bad:
        raise ScreenError(f"The objective {objective.description or objective.name!r} scored {preview(bad, 5)} "
                          "as NaN or infinite, so they cannot be ranked: an objective must return a finite number "
                          "for every predicted change.")
    table = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table


def diverse_picks(ranking: pd.DataFrame, agg: xr.Dataset, *, top: int = 10, similarity: float = 0.8) -> pd.DataFrame:
    """Pick up to ``top`` high-scoring candidates that are not near-duplicates of each other.

    Candidates are nodes of a ``networkx`` graph with an edge wherever the cosine
    similarity of their predicted effects is at least ``similarity``. Going down the
    ranking, a candidate is picked unless it neighbours an earlier pick; each pick
    ``represents`` its unpicked neighbours. A candidate scoring 0 or less is never picked: it is predicted
    to move against the objective (or, for the largest effect, to do no more than the sampling noise), so
    fewer than ``top`` may be picked, and the log says so. (A largest-effect score is the noise-corrected
    estimate: a candidate with no effect scores about 0, above it about half the time, with an interval
    holding 0; it is picked only when fewer candidates with real effects than ``top`` remain.)
    """
    import networkx as nx

    names = list(ranking["perturbation"])
    D = agg["delta"].sel(perturbation=names).values.astype(np.float64)
    norm = np.linalg.norm(D, axis=1, keepdims=True)
    U = D / np.where(norm > 0, norm, 1.0)
    S = U @ U.T
    graph = nx.Graph()
    graph.add_nodes_from(names)
    ii, jj = np.nonzero(np.triu(S, 1) >= similarity)
    graph.add_edges_from((names[i], names[j], {"similarity": float(S[i, j])}) for i, j in zip(ii, jj))
    picks: list[str] = []
    covered: dict[str, str] = {}
    score = dict(zip(names, ranking["score"].to_numpy(dtype=float)))
    for name in names:
        if len(picks) >= top:
            break
        if name in covered or not score[name] > 0:
            continue
        picks.append(name)
        for nb in graph.neighbors(name):
            covered.setdefault(nb, name)
    if len(picks) < min(top, len(names)) and not all(v > 0 for v in score.values()):
        log.info("%d of %d diverse picks: the other candidates are near an earlier pick or score 0 or less "
                 "(predicted to move against the objective).", len(picks), top)
    out = ranking.copy()
    out["pick"] = out["perturbation"].isin(picks)
    out["represents"] = [sorted(k for k, v in covered.items() if v == name and k not in picks) if name in picks else []
                         for name in out["perturbation"]]
    out["similar_to_pick"] = [covered.get(name, "") if name not in picks else "" for name in out["perturbation"]]
    return out


def plot_top_hits(ranking: pd.DataFrame, agg: xr.Dataset, *, n: int = 15, return_fig: bool = False,
                  first: Sequence[str] = ()) -> Any:
    """Top hits: scores with 95% intervals (picks dark, candidates the model never trained on hatched), and a
    heatmap of genes: ``first`` (an objective's own, where the screen has them), then each hit's top 3 raised and
    top 3 lowered genes in turn, 30 at most (so the lowered genes are shown, not crowded out by the raised)."""
    import matplotlib.pyplot as plt

    top = ranking.head(n)
    spelled = {str(g).upper(): str(g) for g in agg["gene"].values}
    genes = [spelled[str(g).upper()] for g in first if str(g).upper() in spelled]
    for up, down in zip(top["top_up"], top["top_down"]):
        for g in [*list(up)[:3], *list(down)[:3]]:
            if g not in genes:
                genes.append(g)
    genes = list(dict.fromkeys(genes))[:30]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, max(3.0, 0.35 * len(top) + 1.5)),
                                   gridspec_kw={"width_ratios": [1, 1.6]})
    y = np.arange(len(top))[::-1]
    colors = ["#1f4e79" if p else "#9dc3e6" for p in top["pick"]] if "pick" in top else "#1f4e79"
    err = np.vstack([top["score"] - top["score_low"], top["score_high"] - top["score"]]).clip(min=0)
    bars = ax1.barh(y, top["score"], xerr=err, color=colors, ecolor="#444", capsize=2)
    new = ~top["trained"].to_numpy(bool) if "trained" in top else np.zeros(len(top), dtype=bool)
    for bar, extrapolated in zip(bars, new):  # a candidate the model never trained on: hatched
        if extrapolated:
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    ax1.set_yticks(y, top["perturbation"])
    ax1.set_xlabel(f"score ({agg.attrs.get('objective', 'objective')}), 95% CI")
    ax1.set_title("Top hits (dark: diverse picks" + ("; hatched: never trained on" if new.any() else "") + ")")
    if genes:
        M = agg["delta"].sel(perturbation=list(top["perturbation"]), gene=genes).values
        lim = float(np.abs(M).max()) or 1.0
        im = ax2.imshow(M, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        ax2.set_xticks(range(len(genes)), genes, rotation=90, fontsize=7)
        ax2.set_yticks(range(len(top)), list(top["perturbation"]), fontsize=7)
        ax2.set_title("predicted mean change (log1p)")
        fig.colorbar(im, ax=ax2, shrink=0.8)
    fig.tight_layout()
    if return_fig:
        return fig
    return None
