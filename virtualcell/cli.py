"""The ``virtualcell`` command line: thin over the package.

Each sub-command is one function ``cmd_<name>(args)``; heavy imports happen inside it,
so ``virtualcell --help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

from . import __version__
from .errors import VirtualCellError

log = logging.getLogger("virtualcell")


# --------------------------------------------------------------------------- #
def cmd_demo(args: argparse.Namespace) -> int:
    """Run the main job on the embedded default: a real screen with the bundled model."""
    import pandas as pd

    from . import datasets
    from .demo import HELDOUT, run_demo

    info = datasets.available()[datasets.DEFAULT]
    print(f"virtualcell {__version__} demo: the bundled model on the embedded default dataset {info.name!r}")
    print(f"  {info.description}; license {info.license}")
    print(f"  baseline: {args.n_cells} control cells of the held-out replicate {HELDOUT[0]}={HELDOUT[1]}; "
          "panel: every knockout the model knows\n")
    res = run_demo(out=args.out, n_cells=args.n_cells, seed=args.seed, progress=not args.quiet, force=args.force)
    print(_verdict_text(res.verdict, res.blend_weight) + "\n")
    # the measured effect in the held-out replicate beside the predicted one, on the same scale (a signed norm)
    table = res.screen.ranking.assign(**{f"measured_{HELDOUT[1]}": lambda t: t["perturbation"].map(
        res.measured_by_perturbation)})
    cols = ["rank", "perturbation", "score", "score_low", "score_high", "edistance", "l2_delta_corrected",
            f"measured_{HELDOUT[1]}", "pick"]
    with pd.option_context("display.width", 160, "display.max_columns", 20, "display.float_format", "{:.3f}".format):
        print(table[cols].head(args.top).to_string(index=False))
        print("\nTop genes of the diverse picks:")
        for _, row in res.screen.picks().iterrows():
            up, down = ", ".join(row["top_up"][:3]), ", ".join(row["top_down"][:3])
            rep = list(row["represents"])
            more = f" and {len(rep) - 4} more; all in ranking.csv" if len(rep) > 4 else ""
            also = f"  (also stands for {', '.join(rep[:4])}{more})" if rep else ""
            print(f"  {row['perturbation']:<12} up: {up:<28} down: {down}{also}")
    print("\nHow the predicted ranking compares with measured effects the model never saw")
    print(f"  (Spearman over {len(res.measured)} knockouts, noise-corrected effect sizes in {HELDOUT[1]}):")
    if res.blend_weight is None:
        print(f"    model prediction           {res.spearman_model:+.2f}   (served: the pure model)")
    else:
        print(f"    served prediction          {res.spearman_model:+.2f}   (blend, w={res.blend_weight:.2f} on the model)")
        print(f"    pure model                 {res.spearman_pure:+.2f}")
    print(f"    training-cell count only   {res.spearman_size_only:+.2f}   (a trivial reference)")
    print(f"    replicate vs replicate     {res.spearman_ceiling:+.2f}   (measured rep_1 vs rep_2: the ceiling)")
    print(f"\nwrote {res.out}/ (ranking.csv, ranking.parquet, aggregates.nc, top_hits.png) in {res.seconds:.0f} s")
    return 0


def _verdict_text(verdict, weight, unseen_weight=None) -> str:  # noqa: ANN001
    """The checkpoint's validation verdict and the weights served (``unseen_weight``: the one perturbations no
    training cell measured get, where it differs), for a person."""
    from .validation import summary_line

    served = ("served: the pure model" if weight is None
              else f"served: blend with weight {weight:.2f} on the model (1 - w on the training baseline)")
    if weight is not None and unseen_weight is not None and unseen_weight != weight:
        served += (f"; {unseen_weight:.2f} for perturbations no training cell measured (served beside pertmean "
                   "or coexpression)")
    return f"validation: {summary_line(verdict)}\n{served}"


def _blend_arg(text: str) -> str | float | None:
    """--blend: auto, none, or a weight in [0, 1]."""
    low = text.strip().lower()
    if low in ("auto", "none"):
        return None if low == "none" else "auto"
    try:
        w = float(low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use auto, none or a weight in [0, 1], e.g. 0.5") from None
    if not 0.0 <= w <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is outside [0, 1] (1: the pure model, 0: the training baseline)")
    return w


def _split_list(text: str) -> list[str]:
    """Split 'A,B,drug:x@1uM,24h' on commas, keeping a drug's ',TIME' with its dose and a '{a,b}' group
    whole, then write each group out (``perturbations.expand``: 'drug:x@{0.1,1}uM' is two)."""
    import re

    from .perturbations import expand, hours_per, split_label

    pieces, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth <= 0:
            pieces.append(text[start:i])
            start = i + 1
    if start <= len(text):  # an unclosed '{': the rest is one piece, which expand() refuses by name
        pieces.append(text[start:])
    out: list[str] = []
    for piece in pieces:
        # a time is a number with a time's unit or none ("24h", "30min", "24"), the rest of a combination may follow
        # it ("24h + ko:STAT1"); "5FU" is the next item
        m = re.fullmatch(r"\s*(\{[^}]*\}|[0-9.]+)\s*([A-Za-z]*)\s*(\+.*)?", piece)
        last = split_label(out[-1])[-1] if out else ""  # (the part the time belongs to: a pair's second has its own)
        if "@" in last and m and (not m.group(2) or hours_per(m.group(2)) is not None) \
                and "," not in re.sub(r"\{[^}]*\}", "", last):
            out[-1] += "," + piece.strip()
        elif piece.strip():
            out.append(piece.strip())
    return [q for piece in out for q in expand(piece)]


def _baseline(args: argparse.Namespace, model, *, pooled: bool = False):  # noqa: ANN001, ANN202
    """The baseline cells: the data's control cells when it is a whole screen with the model's contract. Printed
    with their contexts where they hold several (``pooled``: a screen, which ranks them as one pool)."""
    adata = _load_data(args.data)
    if adata.n_obs == 0:
        from .errors import DataError

        raise DataError(f"{args.data} holds no cells: the baseline needs at least one cell to predict from.")
    contract = model.contract
    elsewhere = (contract.labels_elsewhere(adata, model.known_labels()) if contract is not None and not args.all_cells
                 else [])
    if elsewhere:  # every cell, the perturbed ones too, would be the baseline
        from .errors import ContractError, preview

        (first, spelled), key = elsewhere[0], contract.perturbation_key
        relabel = (f"; adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).replace({{{spelled!r}: "
                   f"{contract.control!r}}})" if spelled != contract.control else "")
        raise ContractError(
            f"{args.data} has no obs column {key!r} (the model's perturbation column), but obs[{first!r}] "
            f"{'(and ' + preview([c for c, _ in elsewhere[1:]], 3) + ') ' if len(elsewhere) > 1 else ''}holds its "
            f"control label ({spelled!r}) beside perturbations it knows: if that is the perturbation column, rename it "
            f"(adata.obs = adata.obs.rename(columns={{{first!r}: {key!r}}}){relabel}) to take its control cells as "
            "the baseline; or pass --all-cells to use every cell.")
    said = None  # the baseline line, which the contexts of its cells are added to
    if contract is not None and contract.perturbation_key not in adata.obs.columns and not args.all_cells:
        said = (f"baseline: every cell of {args.data} (it has no obs column {contract.perturbation_key!r} to find "
                "control cells by)")
    if contract is not None and contract.perturbation_key in adata.obs.columns and not args.all_cells:
        is_ctrl = contract.is_control(adata)
        named = " or ".join(repr(c) for c in contract.controls)
        if not is_ctrl.any():
            from .errors import ContractError, preview

            labels = adata.obs[contract.perturbation_key].astype(str).to_numpy()
            raise ContractError(
                f"No cell of {args.data} has {contract.perturbation_key} == {named} (the model's control "
                f"label); it holds {preview(sorted(set(labels)), 8)}. If this file labels its controls otherwise, "
                f"relabel them (adata.obs[{contract.perturbation_key!r}] = adata.obs[{contract.perturbation_key!r}]"
                f".astype(str).replace({{'NT': {contract.control!r}}}), with its own label); --all-cells uses every "
                "cell, the perturbed too, as the baseline."
            )
        if not is_ctrl.all():
            log.info("using the %d control cells of %s as the baseline (--all-cells to use every cell)", is_ctrl.sum(), args.data)
            first = f"the first {args.n_cells} of " if args.n_cells is not None and args.n_cells < is_ctrl.sum() else ""
            said = (f"baseline: {first}the {int(is_ctrl.sum())} control cells ({contract.perturbation_key} == "
                    f"{named}) of {args.data}")
            adata = adata[is_ctrl].copy()
    _print_baseline(said, adata, model, args, pooled=pooled)
    return adata


def _print_baseline(said: str | None, adata, model, args: argparse.Namespace, *, pooled: bool) -> None:  # noqa: ANN001
    """The baseline line ``said`` (or none), with how many of the cells used (the first ``--n-cells``) come from each
    of the model's contexts where they come from several, or the one they come from where the file holds several;
    ``pooled`` (a screen): and a line saying the ranking pools them, and how to rank one context."""
    from .errors import preview
    from .screen import _composition

    contract = model.contract
    if contract is None or contract.context_key is None or not contract.has_context(adata):
        if said:
            print(said)
        return
    key = contract.context_key
    every = [str(c) for c in contract.contexts(adata)]
    used = every[:args.n_cells] if args.n_cells is not None else every
    counts, kinds = _composition(used), sorted(set(every))
    found = list(counts)
    if len(found) > 1 or len(kinds) > 1:  # (a line of its own where none was said)
        said = said or f"baseline: the {len(used)} cells of {args.data}"
    if len(found) > 1:
        shown = [f"{c}: {counts[c]}" for c in found]
        columns = contract.context_columns(adata)  # (a composite key names several columns: each, joined)
        where = " and ".join(f"obs[{c!r}]" for c in columns)
        print(f"{said}, of {len(found)} contexts in {where} ({', '.join(shown[:8])}"
              + (f" … and {len(found) - 8} more)" if len(found) > 8 else ")"))
        if pooled:
            one = (f": adata[adata.obs[{key!r}] == {found[0]!r}].write_h5ad('{found[0]}.h5ad')"
                   if contract.context_columns(adata) == [key] else "")
            print(f"  the ranking pools them (each score over all {len(used)} cells, whatever their context); to rank "
                  f"one context, give --data a file of its cells alone{one}")
    elif len(kinds) > 1:  # (--n-cells took the first cells in file order)
        print(f"{said}, all of {key} {found[0]!r} (--n-cells takes the first in file order; all {len(every)} hold "
              f"{len(kinds)} contexts: {preview(kinds, 5)})")
    elif said:
        print(said)


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict perturbed cells for a baseline population."""
    from .safeio import check_output_file, file_lock

    perts = _split_list(args.perturbations)
    if not perts:
        raise _usage(f"--perturbations {args.perturbations!r} lists none: give at least one, e.g. --perturbations ko:STAT1")
    out = check_output_file(args.out, suffix=".h5ad", force=args.force)  # before any work
    from pathlib import Path

    if Path(str(args.data)).exists() and Path(str(args.data)).resolve() == out.resolve():
        from .errors import OutputError

        raise OutputError(f"--out {args.out!r} is the --data file: the predictions would replace the cells they are "
                          "made from. Write them to another file.")
    with _main_only(file_lock(out, what="predict")):
        return _predict(args, perts, out)


def _refuse_busy(out) -> None:  # noqa: ANN001
    """Refuse an ``--out`` folder another run holds the lock of (:func:`virtualcell.safeio.check_not_in_use`), in a
    lone process or the main process of a launch (the others would see the main one's lock), before any work."""
    from .distributed import launch_rank
    from .safeio import check_not_in_use

    if launch_rank() == 0:
        check_not_in_use(out)


def _main_only(claim):  # noqa: ANN001, ANN202
    """``claim`` (a lock on an output) in a lone process or the main process of a multi-process launch; nothing in
    the others, which share the work (:mod:`virtualcell.distributed`) but leave the writing to the main one. A
    refusal ends the main process, and the launcher then stops the others."""
    import contextlib

    from .distributed import launch_rank

    return claim if launch_rank() == 0 else contextlib.nullcontext()


def _predict(args: argparse.Namespace, perts: list[str], out) -> int:  # noqa: ANN001
    from .distributed import launch_rank
    import tempfile
    from pathlib import Path

    from .model import C2SModel
    from .simulator import MAX_IN_MEMORY, Simulator

    model = C2SModel.load(args.model, device=args.device)
    sim = Simulator(_baseline(args, model), model, genes=args.genes, seed=args.seed, gene_key=args.gene_key)
    n = sim.baseline.n_obs if args.n_cells is None else min(args.n_cells, sim.baseline.n_obs)
    names = sim.baseline.obs_names[:n]
    if names.duplicated().any():  # (the predictions' cells would repeat names too, and evaluate refuses them)
        from .errors import DataError, preview

        repeated = names[names.duplicated()].unique()
        many = len(repeated) != 1
        raise DataError(f"{len(repeated)} baseline cell name{'s' if many else ''} in {args.data} "
                        f"repeat{'' if many else 's'} ({int(names.isin(repeated).sum())} cells; e.g. "
                        f"{preview(list(repeated), 3)}): each predicted cell is named by its source cell, so those "
                        "could not be told apart. Make them unique and write the file again: "
                        "adata.obs_names_make_unique(); adata.write_h5ad(path).")
    model.resolve(perts)  # an unknown perturbation is refused before anything lands on stdout
    print(_verdict_text(model.verdict, sim.blend_weight(args.blend), sim.unseen_weight(args.blend)))
    # the chunked file of a large prediction goes beside --out, named for it and this process; one a killed run left
    # (a scheduler's time limit) is removed here, under the output's lock
    prefix = f".vc-predict-{out.name}-r{launch_rank()}-"
    if out.parent.exists():
        import shutil

        for stale in out.parent.glob(prefix + "*"):
            shutil.rmtree(stale, ignore_errors=True)
        for stale in out.parent.glob(f".{out.stem}.????????.partial{out.suffix}") if launch_rank() == 0 else ():
            stale.unlink(missing_ok=True)  # (atomic_path's, of a killed run: the main process holds the lock)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None, prefix=prefix) as tmp:
        # large predictions stream through a chunked file on disk instead of memory
        limit = MAX_IN_MEMORY if args.max_in_memory is None else args.max_in_memory
        big = (len(perts) + 1) * n * len(model.genes) > limit
        from .distributed import launched

        if big and launched():  # (the processes would write one chunked file at once)
            raise _usage(f"{len(perts) + 1} x {n:,} cells x {len(model.genes):,} genes is over --max-in-memory "
                         f"({limit:,} values), and a prediction that large streams through one file, which a "
                         "multi-process launch cannot share yet: run it as one process, predict fewer --n-cells or "
                         "perturbations at a time, or raise --max-in-memory.")
        if big and args.draws:
            raise _usage(f"--draws holds the predictions in memory, and {len(perts) + 1} x {n:,} cells x "
                         f"{len(model.genes):,} genes is over --max-in-memory ({limit:,} values): predict fewer "
                         "--n-cells or perturbations at a time, or raise --max-in-memory.")
        res = sim.simulate(perts, n_cells=n, seed=args.seed, keep_cells=not big, keep_draws=args.draws,
                           store=Path(tmp) / "cells.nc" if big else None, batch_size=args.batch_size,
                           max_genes=args.max_genes, blend=args.blend, samples=args.samples,
                           coexpression_prior=args.coexpression_prior, compose=args.compose)
        try:
            if launch_rank() == 0:  # (under a multi-process launch the main process writes)
                if args.format == "cell-eval":
                    _write_cell_eval(res, sim, model, out, n, draws=args.draws, scratch=Path(tmp))
                else:
                    res.write_h5ad(out, draws=args.draws)
        finally:  # the streamed cells' file closed before its folder goes, written or not (Windows removes no open one)
            if res.store is not None:
                res.cells.close()
    a = res.aggregates.attrs
    P, C, G = res.cells.shape
    controls = (f" and the {C:,} baseline cells as cell-eval's control"  # (the cell-eval form holds them too)
                if args.format == "cell-eval" and "control" not in res.perturbations else "")
    print(f"wrote {P * C:,} predicted cells{controls} x {G} genes to {args.out} "
          f"({a['normalization']}; invalid genes {a['invalid_genes']}, duplicates {a['duplicate_genes']})")
    return 0


def _write_cell_eval(res, sim, model, out, n: int, draws: bool = False, *, scratch) -> None:  # noqa: ANN001
    """Predicted cells plus the baseline as the control (its calibrated prediction), in cell-eval's form, one
    perturbation at a time (memory holds one perturbation's cells, as the plain ``.h5ad`` form does): each part goes
    through :func:`~virtualcell.evaluate.to_cell_eval` and is appended to the X of a file in ``scratch`` (the
    command's temporary folder, which a rerun clears after a kill), then copied into the result."""
    from pathlib import Path

    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    from .evaluate import to_cell_eval
    from .safeio import atomic_path

    head = res._head("perturbation", None)  # every predicted cell's obs, the genes, what made them
    cells, said = res._chosen(pure=False, draws=draws)
    provenance = dict(head.uns.get("virtualcell") or {}) | said  # (what lets a rerun replace the file, too)
    control = model.contract.control if model.contract is not None else "control"
    P, C, _ = res._require_cells()

    def parts():  # noqa: ANN202
        for i in range(P):
            rows = slice(i * C, (i + 1) * C)
            yield ad.AnnData(np.asarray(cells[i].values, dtype=np.float32), obs=head.obs.iloc[rows].copy(),
                             var=head.var.copy(), uns={"virtualcell": provenance})
        if control not in set(head.obs["perturbation"]):
            ctrl = ad.AnnData(sim.expression[:n].toarray(), var=head.var.copy())
            ctrl.obs["perturbation"] = ctrl.obs["perturbation_typed"] = control
            ctrl.obs["source_cell"] = list(res.source_cells)
            for col in [] if res.context_obs is None else res.context_obs.columns:  # each cell's context
                if col in head.obs.columns:
                    ctrl.obs[col] = res.context_obs[col].values
            ctrl.obs_names = [f"{control}|{c}" for c in res.source_cells]
            yield ctrl

    obs, first = [], None
    xfile = Path(scratch) / "cell_eval_X.h5"
    with h5py.File(xfile, "w") as f:
        for part in parts():
            written = to_cell_eval(part, perturbation_key="perturbation", control=control, part=True)
            obs.append(written.obs)
            if first is None:
                first = written
                ad.io.write_elem(f, "X", written.X)
            else:
                ad.io.sparse_dataset(f["X"]).append(written.X)
    whole = ad.AnnData(obs=pd.concat(obs), var=first.var, uns=first.uns)
    whole.uns["virtualcell"] = provenance | first.uns["virtualcell"]
    with atomic_path(out) as tmp:
        whole.write_h5ad(tmp)
        with h5py.File(tmp, "a") as f, h5py.File(xfile, "r") as src:
            if "X" in f:
                del f["X"]
            src.copy(src["X"], f, "X")


def cmd_screen(args: argparse.Namespace) -> int:
    """Screen a panel and rank it."""
    from pathlib import Path

    import pandas as pd

    from .errors import ScreenError
    from .model import C2SModel
    from .objectives import parse_objective
    from .perturbations import panel_lines, parse_panel
    from .screen import check_out
    from .screen import run as screen
    from .simulator import Simulator

    path = Path(args.panel)
    if not path.exists():
        raise ScreenError(f"No such panel file: {args.panel!r}. Write one perturbation a line, e.g. 'ko:STAT1'.")
    text = _read_panel(path)
    panel = parse_panel(text)
    objective = parse_objective(args.objective)  # a mistyped objective or --out is refused before the model loads
    check_out(args.out, force=args.force)
    _refuse_busy(args.out)  # (as predict's lock is taken: before the minutes of loading a model and its baseline)
    model = C2SModel.load(args.model, device=args.device)
    try:
        model.resolve(panel)
    except VirtualCellError as err:  # say which line
        for number, body in panel_lines(text):
            try:
                model.resolve([body])
            except VirtualCellError as line_err:
                raise type(err)(f"panel line {number} ({body!r}): {line_err}") from None
        raise
    sim = Simulator(_baseline(args, model, pooled=True), model, genes=args.genes, seed=args.seed,
                    gene_key=args.gene_key)
    verdict = _verdict_text(model.verdict, sim.blend_weight(args.blend), sim.unseen_weight(args.blend))
    res = screen(sim, panel, objective=objective, out=args.out, top=args.top, n_cells=args.n_cells,
                 seed=args.seed, batch_size=args.batch_size, max_genes=args.max_genes, force=args.force,
                 blend=args.blend, samples=args.samples, coexpression_prior=args.coexpression_prior,
                 compose=args.compose, group_size=args.group_size, on_start=lambda: print(verdict))
    cols = ["rank", "perturbation", "score", "score_low", "score_high", "edistance", "l2_delta_corrected", "pick"]
    if res.config.get("blend_weight") is not None:  # the pure model beside the served blend
        cols.insert(cols.index("l2_delta_corrected") + 1, "l2_delta_corrected_model")
    if not res.ranking["trained"].all():  # say which candidates are the model's extrapolations
        cols.append("trained")
    unmeasured = res.ranking["unmeasured_in"].map(len).to_numpy() > 0
    if unmeasured.any():  # and in which of the ranked cells' contexts each was never measured
        cols.append("unmeasured_in")
    shown = res.ranking[cols].head(max(args.top, 10)).copy()
    if unmeasured.any():
        shown["unmeasured_in"] = shown["unmeasured_in"].map(
            lambda v: ", ".join(v[:3]) + (f" +{len(v) - 3} more" if len(v) > 3 else "") if len(v) else "-")
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(shown.to_string(index=False))
    if unmeasured.any():
        print(f"unmeasured_in: the ranked cells' contexts in which the training cells never measured the candidate "
              f"({int(unmeasured.sum())} of {len(unmeasured)} candidates have some); there the baseline served is its "
              "effect measured in other contexts (a transfer) or, for one measured nowhere, an extrapolation")
    figures = ("top_hits.png" + (", dose_response.png" if not res.dose_series().empty else "")
               + (", time_course.png" if not res.time_series().empty else ""))
    print(f"\nwrote {args.out}/ (ranking.csv, ranking.parquet, aggregates.nc, {figures})")
    return 0


def _read_panel(path) -> str:  # noqa: ANN001
    """A panel file's text: UTF-8 (a byte-order mark is dropped) or UTF-16 with its byte-order mark."""
    from .errors import ScreenError

    raw = path.read_bytes()
    try:
        if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
            return raw.decode("utf-16")
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ScreenError(f"The panel {str(path)!r} is not UTF-8 text. Save it as UTF-8 (plain text), "
                          "one perturbation a line.") from None


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode an .h5ad into cell sentences (.npz, or text with --text)."""
    from .safeio import atomic_path, check_output_file, write_text
    from .sentences import encode

    if not args.out.endswith((".txt", ".npz")):
        raise _usage(f"--out {args.out!r} must end in .npz (compact ids) or .txt (one sentence a line).")
    check_output_file(args.out)
    _refuse_someone_elses(args.out, force=args.force)
    adata = _load_data(args.data)
    cs = encode(adata, layer=args.layer, top_k=args.top_k, seed=args.seed, gene_key=args.gene_key)
    if args.out.endswith(".txt"):
        write_text(args.out, "\n".join(cs.to_text()) + "\n")
    else:
        with atomic_path(args.out) as tmp:
            cs.save(str(tmp))
    print(f"wrote {cs} to {args.out}")
    return 0


def _refuse_someone_elses(out: str, *, force: bool) -> None:
    """Refuse to replace an existing ``--out`` that is not encode's own (a sentences .npz), unless ``force``: a
    .txt cannot say who wrote it (a user's notes.txt was replaced by cell sentences)."""
    from pathlib import Path

    import numpy as np

    from .errors import OutputError

    path = Path(out)
    if force or not path.exists():
        return
    if path.suffix == ".npz":
        try:
            with np.load(path) as saved:
                if {"ids", "offsets", "genes"} <= set(saved.files):
                    return
        except (OSError, ValueError):  # not an .npz at all
            pass
    raise OutputError(f"--out {out!r} exists and is not a file virtualcell encode wrote; refusing to replace it. "
                      "Choose another file name, or pass --force to replace it.")


def _load_data(spec: str, contract=None):  # noqa: ANN001, ANN202
    """A dataset name (see virtualcell.datasets) or an .h5ad path."""
    from pathlib import Path

    from . import datasets

    path = Path(spec)
    named = spec in datasets.available() or spec == "synthetic"  # a dataset's name, whatever folder shares it
    if spec.lower().endswith(".h5ad") or (path.exists() and not named):  # a file the user named
        if path.is_dir():
            raise datasets.DataError(f"{spec!r} is a folder; --data takes an .h5ad file or a dataset name "
                                     f"({', '.join(datasets.available())}).")
        if path.exists() and not spec.lower().endswith(".h5ad"):
            raise datasets.DataError(f"{spec!r} is not an .h5ad file. Convert it with anndata first (e.g. "
                                     "sc.read_10x_mtx(...).write_h5ad('cells.h5ad'); ad.read_csv(...) for a table).")
        if contract is None:
            if not path.exists():
                raise datasets.DataError(f"No such file: {spec!r}. Check the path.")
            return datasets._read(spec)
        return datasets.read_h5ad(spec, contract=contract)
    return datasets.load(spec)


def _contract_from_args(args: argparse.Namespace):  # noqa: ANN202
    from .contract import DataContract, control_labels

    control, others = control_labels(args.control)
    return DataContract(
        perturbation_key=args.perturbation_key, control=control, context_key=args.context_key,
        dose_key=getattr(args, "dose_key", None), time_key=getattr(args, "time_key", None), other_controls=others,
        dose_unit_key=getattr(args, "dose_unit_key", None),
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or fine-tune) a model on a perturbation screen."""
    from .distributed import launch_rank
    from .train import TrainConfig, check_out, train, training_device

    training_device(args.device)  # a device this machine lacks, or a user's --out, is refused before the data is read
    if launch_rank() == 0:
        check_out(args.out, force=args.force)
    _refuse_busy(args.out)  # (before the data is read: a second training into it is refused at once)
    contract = _contract_from_args(args)
    adata = _load_data(args.data, contract)
    holdout = {}
    for item in args.holdout or []:
        col, _, values = item.partition("=")
        if not values:
            raise _usage(f"--holdout {item!r}: write COLUMN=VALUE[,VALUE...], e.g. bio_rep=rep_3")
        column = set(adata.obs[col].astype(str)) if col in adata.obs.columns else set()
        holdout[col] = [values] if values in column else values.split(",")  # a value with a comma, given whole
    cfg = TrainConfig(
        top_k=args.top_k, hidden_size=args.hidden_size, n_layers=args.layers, n_heads=args.heads, lr=args.lr,
        batch_size=args.batch_size, max_steps=args.max_steps, max_minutes=args.max_minutes, seed=args.seed,
        kind=args.kind, kind_key=args.kind_key, holdout=holdout, generic_fraction=args.generic_fraction,
        threads=args.threads, verdict_fraction=args.verdict_fraction, unseen_fraction=args.unseen_fraction,
        context_verdict=args.context_verdict, keep_best=args.keep_best, compile=args.compile, attention=args.attention,
        precision=args.precision, gene_init=args.gene_init,
        pairing=args.pairing, pair_draws=args.pair_draws, control_copies=args.control_copies,
        verdict_samples=args.verdict_samples, verdict_temperatures=args.verdict_temperatures,
        response_weight=args.response_weight,
        target_tokens=args.target_tokens, dose_tokens=args.dose_tokens, own_token_dropout=args.own_token_dropout,
        target_offsets=args.target_offsets, neighbour_offsets=args.neighbour_offsets, token_bias=args.token_bias,
        token_bias_decay=args.token_bias_decay,
    )
    model = train(adata, out=args.out, contract=contract, config=cfg, base=args.base, resume=not args.restart,
                  gene_key=args.gene_key, device=args.device, force=args.force)
    hist = model.train_config.get("history", [])
    last = hist[-1] if hist else {}
    print(f"saved {model} to {args.out}")
    if last:
        print(f"  steps {last.get('step')}, train loss {last.get('loss', float('nan')):.3f}, "
              f"validation loss {last.get('val_loss', float('nan')):.3f}")
    kinds = model.card()["perturbations"]["kinds"]
    print(f"  the labels were read as: {', '.join(f'{n} {k}' for k, n in sorted(kinds.items())) or 'none'}"
          + (" (--kind auto; --kind or --kind-key say otherwise)" if args.kind == "auto" and not args.kind_key else ""))
    from .target_offsets import moved

    if model.target_offsets is not None:
        print(f"  target offsets (logits on the gene a perturbation names): {moved(model.target_offsets) or 'none moved'}")
    if model.neighbour_offsets is not None:
        print(f"  neighbour offsets (per unit of a gene's correlation with it): "
              f"{moved(model.neighbour_offsets) or 'none moved'}")
    from .validation import summary_line

    print(f"  {summary_line(model.verdict)}")
    _print_candidates(model.verdict)
    return 0


def _print_candidates(verdict) -> None:  # noqa: ANN001
    """The generation settings a verdict tried, when it tried more than one (:func:`validation.candidate_lines`)."""
    from .validation import candidate_lines

    lines = candidate_lines(verdict)
    if len(lines) > 1:
        print("  generation settings tried (validation, pure model; the lowest MSE is chosen):")
        print("\n".join(f"    {line}" for line in lines))


def cmd_verdict(args: argparse.Namespace) -> int:
    """Run a trained model's validation verdict again, on the data it was trained on."""
    import contextlib
    import os
    from pathlib import Path

    from .distributed import launch_rank
    from .errors import OutputError
    from .generation import blas_threads
    from .model import BUNDLED, C2SModel, _shipped
    from .safeio import folder_lock, output_folder, write_text
    from .train import LEGACY, check_out, rejudge
    from .validation import VERDICT_FILE, summary_line

    main = launch_rank() == 0  # (under a multi-process launch every process judges; the main one writes)
    if args.out is not None and main:  # a user's --out is refused before the model and data load
        check_out(args.out, force=args.force)
        _refuse_busy(args.out)
    folder = Path(BUNDLED if _shipped(args.model) else args.model)  # where an in-place verdict writes
    with contextlib.ExitStack() as claimed:
        if main and args.out is None and folder.is_dir():
            if folder.resolve() == Path(BUNDLED).resolve():
                raise OutputError("The shipped model is not judged again in place (its verdict is the one the README's "
                                  "figures were made with): pass --out NEW_FOLDER to write it with its new verdict.")
            if not os.access(folder, os.W_OK | os.X_OK):
                raise OutputError(f"Cannot write the verdict into {str(folder)!r} (not a folder you can write to): "
                                  "pass --out NEW_FOLDER to write the model with its new verdict there.")
            # the folder's own lock, a training's, taken before the model loads: a training into it is refused now,
            # and none starts until the verdict is written (its end would save other weights under this verdict)
            claimed.enter_context(folder_lock(folder, what="verdict"))
        model = C2SModel.load(args.model, device=args.device)
        adata = _load_data(args.data)  # (rejudge checks it is the training data, against the model's own columns)
        before = summary_line(model.verdict)
        candidates = None if args.guidance is None else tuple({"guidance": g} for g in args.guidance)
        if args.threads is not None:
            import torch

            torch.set_num_threads(args.threads)
        # where it will write is claimed before the minutes of judging, not refused after them
        if main and args.out is not None:
            claimed.enter_context(output_folder(args.out, kind="train", force=args.force, legacy=LEGACY))
        with blas_threads(args.threads):  # the gene maps' SVDs: numpy's BLAS held to --threads too
            rejudge(model, adata, samples=args.verdict_samples, candidates=candidates,
                    temperatures=args.verdict_temperatures)
        if not main:
            return 0
        if args.out is not None:
            model.save(args.out)
            where = args.out
        else:  # in place: the weights stay, the verdict and the codec it chose are rewritten; the old verdict is kept
            model._check_on_disk(folder)  # (weights saved there since it loaded: refused before anything is written)
            if (folder / VERDICT_FILE).exists():
                write_text(folder / ("previous-" + VERDICT_FILE), (folder / VERDICT_FILE).read_text())
            model.save_verdict(folder)
            where = f"{folder} (the previous verdict: previous-{VERDICT_FILE})"
    print(f"before: {before}")
    print(f"now:    {summary_line(model.verdict)}")
    _print_candidates(model.verdict)
    print(f"wrote the verdict into {where}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    """A checkpoint's card: what it is, was trained on, can be asked, and how its verdict went."""
    import json

    from .card import card, card_text
    from .model import C2SModel

    model = C2SModel.load(args.model, device="cpu")
    c = card(model)
    print(json.dumps(c, indent=1, default=str) if args.json else card_text(c))
    return 0


def _usage(message: str):  # noqa: ANN202
    from .errors import VirtualCellError

    return VirtualCellError(message)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples' line breaks and appends each option's default to its help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (default is not None and default is not False and default != argparse.SUPPRESS and "%(default)" not in text
                and "default" not in text and action.option_strings and not action.required):
            text += " (default: %(default)s)"
        elif default is None and action.option_strings and not action.required and "default" not in text:
            text += " (default: none)"
        return text

    def _expand_help(self, action: argparse.Action) -> str:
        """A tuple default shown as it is typed, ``1,4`` (not ``(1, 4)``)."""
        if isinstance(action.default, tuple):
            import copy

            action = copy.copy(action)
            action.default = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in action.default)
        return super()._expand_help(action)


def _int_at_least(lowest: int, below: int | None = None):  # noqa: ANN202
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {value}")
        if below is not None and value >= below:
            raise argparse.ArgumentTypeError(f"must be below {below}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)  # an argparse type: an integer of at least 1
_count = _int_at_least(0)  # an argparse type: an integer of at least 0
_seed = _int_at_least(0, below=2**32)  # an argparse type: a seed (simulator.SEED_LIMIT)


def _whole_numbers(text: str) -> tuple[int, ...]:
    """``"1,4"`` -> ``(1, 4)``: :data:`_positive_int` values, comma-separated (an argparse type)."""
    try:
        return tuple(_positive_int(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: write whole numbers >= 1 separated by commas, e.g. 1,4") from None


def _positive_float(text: str) -> float:
    """An argparse type: a number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number above 0, got {text}")
    return value


def _positive_floats(text: str) -> tuple[float, ...]:
    """``"1,2,4"`` -> ``(1.0, 2.0, 4.0)``: :func:`_positive_float` values, comma-separated (an argparse type)."""
    try:
        return tuple(_positive_float(v) for v in text.split(","))
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: write numbers above 0 separated by commas, e.g. 1,2,4") from None


def _add_command(sub, name: str, summary: str, example: str) -> argparse.ArgumentParser:  # noqa: ANN001
    """A sub-command with a one-line description and an example in its help, and the options every command takes:
    ``-v`` (also after the command) and ``-q``/``--quiet`` (no progress bars, for logs)."""
    p = sub.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                       epilog=f"example:\n  {example}", formatter_class=_Formatter)
    _add_common(p)
    return p


def _add_common(p: argparse.ArgumentParser) -> None:
    """The options every command takes: ``-v`` (also after the command) and ``-q``/``--quiet``."""
    p.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                   help="more log output, -vv for debug (default: warnings only)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars (a log file gets no \\r updates)")


def _add_force(p: argparse.ArgumentParser, what: str = "a non-empty folder that virtualcell did not write") -> None:
    p.add_argument("--force", action="store_true", help=f"write into --out even if it is {what}")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="CPU threads for the model and numpy (default: all cores; generation may still use 1 where it "
                        "times faster): fewer leave cores to others on a shared machine")
    p.add_argument("--model", required=True, help="checkpoint folder (virtualcell train output, or a C2S checkpoint "
                   "fine-tuned by it), or 'bundled' (the model shipped in the package)")
    p.add_argument("--data", required=True, help="baseline cells: an .h5ad or a dataset name (control cells are used)")
    p.add_argument("--all-cells", action="store_true", help="use every cell of --data as baseline, not only controls")
    _add_gene_key(p)
    p.add_argument("--genes", choices=["all", "shared"], default="all",
                   help="'all': --data and the model must have the same genes; 'shared': proceed on the genes "
                   "both have (the model's genes that --data lacks are read as not expressed, with a warning; genes "
                   "--data has beyond the model's are left out, and each cell is normalized over the model's genes, "
                   "as its training cells were)")
    p.add_argument("--n-cells", type=_positive_int, default=None, help="use the first N baseline cells (default: all)")
    p.add_argument("--seed", type=_seed, default=0,
                   help="sampling seed (and the baseline's tie-breaks); a prediction depends on seed, the cell, its "
                        "row in --data and the perturbation, and through the non-negativity rescale on the other "
                        "cells of its block of 32 rows")
    p.add_argument("--batch-size", type=_positive_int, default=512,
                   help="(cell, perturbation) rows per forward pass; lower it if memory is short")
    p.add_argument("--max-genes", type=_positive_int, default=None, help="genes per generated cell (default: the model's top_k)")
    p.add_argument("--device", default=None, help="cuda[:N], mps or cpu (default, or auto: the best available)")
    p.add_argument("--blend", type=_blend_arg, default="auto", metavar="auto|none|W",
                   help="weight W in [0, 1] on the model's delta, 1 - W on the training baseline's; auto (default): "
                   "the weight the training run fitted on its validation split (the pure model when the checkpoint "
                   "has none); none: the pure model")
    p.add_argument("--samples", type=_positive_int, default=None,
                   help="samples of each baseline cell under each perturbation, averaged into its prediction: less "
                        "noise per cell and in the ranking, for that many times the generation (default: the number "
                        "the training run chose on its validation split; 1 where it chose none)")
    p.add_argument("--no-coexpression-prior", dest="coexpression_prior", action="store_const", const=False,
                   default=None,
                   help="generate a knockout, knockdown or activation the model never trained on without the "
                        "coexpression baseline's shift on its logits (the model alone; default: as the training "
                        "run chose, on where it held no perturbation out whole)")
    p.add_argument("--compose", action="store_true",
                   help="generate a combination never trained on as such (A+B) from its parts' logits (control + "
                   "the sum of each part's change over the control, at every step) instead of a prompt naming "
                   "both (off by default: it scored below the pair prompt on held-out pairs)")


def _add_gene_key(p: argparse.ArgumentParser, *aliases: str) -> None:
    p.add_argument("--gene-key", *aliases, dest="gene_key", default=None, metavar="COLUMN",
                   help="var column holding the gene names to use: symbols, or Ensembl ids (with or without a "
                   "version suffix) for the project's own gene-level models; a text model (--base) needs "
                   "symbols (default: var_names)")


def _add_contract_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--perturbation-key", required=required, default="perturbation", help="obs column of the perturbation labels")
    p.add_argument("--control", required=required, default="control",
                   help="label of the control cells; several separated by commas (NT_1,NT_2), all read as the first")
    p.add_argument("--context-key", default=None,
                   help="obs column of the context (cell type / line / patient); several joined by + "
                   "(cell_type+patient): each combination is a context")
    p.add_argument("--dose-key", default=None,
                   help="obs column of the dose: numbers, or numbers with a unit ('10uM'; nM and uM convert)")
    p.add_argument("--dose-unit-key", default=None,
                   help="obs column of each dose's unit, where the screen keeps it apart from --dose-key (sci-Plex: "
                   "--dose-key dose_value --dose-unit-key dose_unit): each dose reads as its value with its unit")
    p.add_argument("--time-key", default=None, help="obs column of the time, in hours or with a unit ('24h', '30min')")


# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtualcell",
        description="Simulate how cells respond to drugs, knockouts and cytokines with Cell2Sentence-style "
        "language models, and rank which experiments to run first.",
        epilog="example:\n  virtualcell demo\n\n'virtualcell COMMAND --help' explains each command, with an example.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"virtualcell {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _add_command(sub, "demo", "screen the embedded default with the bundled model (offline, under 2 min on a CPU)",
                     "virtualcell demo --out virtualcell-demo --n-cells 120")
    p.add_argument("--out", default="virtualcell-demo", help="results folder")
    p.add_argument("--n-cells", type=_positive_int, default=120, help="baseline cells")
    p.add_argument("--top", type=_positive_int, default=12, help="rows of the ranking to print")
    p.add_argument("--seed", type=_seed, default=0,
                   help="seed of the sampling and of the draw of held-out control cells into the baseline and the "
                        "measured reference (another seed draws other cells, so the measured column moves too)")
    _add_force(p)
    p.set_defaults(func=cmd_demo)

    p = _add_command(sub, "encode", "encode an .h5ad (or a dataset name) into cell sentences",
                     "virtualcell encode --data papalexi2021 --out sentences.txt --top-k 100")
    p.add_argument("--data", required=True, help="an .h5ad path or a dataset name (see virtualcell.datasets)")
    p.add_argument("--out", required=True, help="output .npz (compact ids) or .txt (one sentence a line)")
    p.add_argument("--layer", default=None, help="layer holding the expression (default: X)")
    _add_gene_key(p, "--var-key")  # --var-key: the former name, kept working
    p.add_argument("--top-k", type=_positive_int, default=200, help="genes per cell sentence")
    p.add_argument("--seed", type=_seed, default=0, help="seed that breaks ties between equal counts")
    _add_force(p, "a file that virtualcell encode did not write")
    p.set_defaults(func=cmd_encode)

    from .train import DOSE_TOKENS, FINETUNE_LR, NEW_MODEL_LR, PAIRINGS, TARGET_TOKENS, TrainConfig

    p = _add_command(sub, "train", "train a small C2S model on a screen, or fine-tune a real checkpoint (--base)",
                     "virtualcell train --data papalexi2021 --perturbation-key perturbation --control control "
                     "--holdout bio_rep=rep_3 --max-minutes 30 --out my-model")
    p.description += (f" Training stops at --max-steps ({TrainConfig.max_steps} by default) or when --max-minutes is "
                      "spent, whichever comes first; without --max-minutes there is no time limit. A run that finds "
                      "OUT/last resumes from it. Launched on several processes (torchrun --nproc_per_node N -m "
                      "virtualcell train ..., or accelerate launch) it trains data-parallel, each process on its "
                      "share of every batch.")
    p.add_argument("--data", required=True, help="the screen: an .h5ad path or a dataset name")
    _add_contract_args(p)
    _add_gene_key(p)
    p.add_argument("--base", default=None, help="a Hugging Face causal LM to fine-tune (hub id or folder); default: a new small model")
    p.add_argument("--out", required=True, help="checkpoint folder (resumes from OUT/last if present)")
    p.add_argument("--max-minutes", type=_positive_float, default=None,
                   help="wall-time budget in minutes; training stops when it is spent (default: no time limit)")
    p.add_argument("--max-steps", type=_positive_int, default=TrainConfig.max_steps, help="optimizer steps at most")
    p.add_argument("--seed", type=_seed, default=0, help="seed of the initialization, pairing and batch order")
    p.add_argument("--top-k", type=_positive_int, default=TrainConfig.top_k, help="genes per cell sentence")
    p.add_argument("--hidden-size", type=_positive_int, default=TrainConfig.hidden_size,
                   help="width of a new model (divisible by --heads)")
    p.add_argument("--layers", type=_positive_int, default=TrainConfig.n_layers,
                   help="transformer layers of a new model")
    p.add_argument("--heads", type=_positive_int, default=TrainConfig.n_heads, help="attention heads of a new model")
    p.add_argument("--lr", type=_positive_float, default=None,
                   help=f"peak learning rate (default: {NEW_MODEL_LR:g} for a new model, {FINETUNE_LR:g} when "
                        "fine-tuning --base, as cell2sentence's own fine-tuning tutorial)")
    p.add_argument("--batch-size", type=_positive_int, default=TrainConfig.batch_size,
                   help="training pairs per optimizer step")
    p.add_argument("--kind", default="auto", help="what the labels are: auto, knockout, knockdown, activation, drug, cytokine, label (auto: labels "
                   "naming the panel's genes are knockouts, labels whose cells carry a dose or time are drugs, "
                   "other gene-like symbols knockouts, the rest plain labels)")
    p.add_argument("--kind-key", default=None, help="obs column giving each cell's perturbation kind (e.g. CRISPRa / CRISPRi)")
    p.add_argument("--holdout", action="append", metavar="COLUMN=VALUES",
                   help="exclude cells from training, e.g. bio_rep=rep_3 (repeatable; default: none)")
    p.add_argument("--generic-fraction", type=float, default=TrainConfig.generic_fraction,
                   help="share of perturbed pairs written under the generic condition, which guidance contrasts "
                        "against (0 = no guidance; default %(default)s)")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch threads (default: measured, 1 against torch's thread count, at most the cores this process may "
                        "run on; pass 1 on a machine others share)")
    p.add_argument("--device", default=None,
                   help="cuda[:N], mps or cpu (default, or auto: a CUDA GPU where there is one, else the CPU; under torchrun / "
                        "accelerate launch each process takes the GPU of its LOCAL_RANK)")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="compile the model's layers (torch.compile): ~1.3x faster steps on a CPU for a one-off ~25 s per "
                        "layer (less when cached); auto: on a CPU, when the run is expected to last 150 s per layer "
                        "or more (10 minutes for 4 layers)")
    p.add_argument("--attention", choices=("auto", "sdpa", "eager"), default=TrainConfig.attention,
                   help="attention kernel; auto: the faster of the two, timed on this machine at the start, which can "
                        "differ between two runs of one command (their weights then differ slightly): name one to "
                        "take the timing out of a run")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default=TrainConfig.precision,
                   help="arithmetic of the training steps; auto: bf16 where timed faster on this CPU or GPU (as "
                        "--attention, timed per run): name one to take the timing out of a run")
    p.add_argument("--gene-init", choices=("pca", "random"), default=TrainConfig.gene_init,
                   help="how a new model's gene embeddings start: random (default) or pca (half of each from the "
                        "training cells' principal axes, so co-expressed genes start close; better on validation, "
                        "not on the held-out protocols: see the README)")
    p.add_argument("--response-weight", type=float, default=TrainConfig.response_weight, metavar="S",
                   help="weigh each response gene's tokens 1 + S x how much perturbations move that gene in the "
                        "training cells (relative to the mean gene), so the loss rewards what perturbations change "
                        "rather than the average cell; 0 (default): every token weighs the same")
    p.add_argument("--dose-tokens", choices=DOSE_TOKENS, default=TrainConfig.dose_tokens,
                   help="how a prompt writes a drug's (cytokine's) dose: own (default), with the dose token every drug "
                        "shares and then one of the drug's own for each dose it was trained at (an untrained dose keeps "
                        "the shared token alone); shared, with the shared token alone, so the model must learn how dose "
                        "and drug combine")
    p.add_argument("--target-tokens", choices=TARGET_TOKENS, default=TrainConfig.target_tokens,
                   help="how a prompt names a knockout's (knockdown's, activation's) target gene: gene, with "
                        "the gene's own token, the same one cell sentences use, so a target never trained still means "
                        "something; own, with a token of its own for every trained target, so naming it does not "
                        "invite the model to write the gene (untrained targets are then refused); both (default), "
                        "with the gene's token and then the trained target's own (an untrained target keeps the "
                        "gene's alone)")
    p.add_argument("--no-target-offsets", dest="target_offsets", action="store_false",
                   help="leave out the learned logit offset on the gene a knockout (knockdown, activation) names, one "
                        "number per kind added wherever the model writes a response, so a knocked-out gene can leave "
                        "its sentence (default: on for gene-level models whose training perturbations name a gene)")
    p.add_argument("--neighbour-offsets", action="store_true",
                   help="also learn one number per kind times every gene's correlation with the perturbed gene in the "
                        "training cells, added to the logits, so a knockout never trained on lowers what goes with "
                        "its gene (an option; needs target offsets)")
    p.add_argument("--token-bias", action=argparse.BooleanOptionalAction, default=TrainConfig.token_bias,
                   help="learn a bias over the genes for every token that names a perturbation (a drug, a dose, a "
                        "cytokine, a kind), added to the response's logits, so a perturbation's mean shift is learned "
                        "directly rather than only through attention (gene-level models)")
    p.add_argument("--token-bias-decay", type=float, default=TrainConfig.token_bias_decay, metavar="D",
                   help="weight decay of the token-bias table (default: the model's, 0.01); a larger one keeps the "
                        "table small over long runs")
    p.add_argument("--own-token-dropout", type=float, default=TrainConfig.own_token_dropout, metavar="F",
                   help="share of perturbed training pairs named without their target's or dose's own token, as an "
                        "untrained target or dose is named, so the model also learns that form (default 0)")
    p.add_argument("--pairing", choices=PAIRINGS, default=TrainConfig.pairing,
                   help="which control cell each training cell is predicted from: ot (each perturbation's cells matched "
                        "one to one to a fair draw of the controls, so the pairs carry the whole effect), nearest (one "
                        "of the 5 most similar controls; those look perturbed already, so the effect shrinks) or "
                        f"random (default: {TrainConfig.pairing})")
    p.add_argument("--pair-draws", type=_positive_int, default=TrainConfig.pair_draws, metavar="N",
                   help="draws of the pairing the training epochs cycle through, so that a cell is predicted from other "
                        f"control cells from one epoch to the next (default {TrainConfig.pair_draws}: one draw)")
    p.add_argument("--control-copies", action=argparse.BooleanOptionalAction, default=TrainConfig.control_copies,
                   help="where the screen has fewer control cells than its control share asks for, train the control "
                        "pairs again up to that share; --no-control-copies trains each once, so the control prompt "
                        f"memorizes its targets less (default: {'on' if TrainConfig.control_copies else 'off'})")
    p.add_argument("--restart", action="store_true", help="ignore OUT/last and start over")
    p.add_argument("--keep-best", action="store_true",
                   help="end on the weights of the lowest validation loss instead of the last step's, so that a step "
                        "budget too long for the data cannot hand over an overfit model (without it, a final loss 1%% "
                        "above the lowest is warned about). The token loss can turn up while the predicted effects "
                        "still improve: compare the validation verdicts of a run with and without it")
    p.add_argument("--verdict-fraction", type=float, default=TrainConfig.verdict_fraction, metavar="F",
                   help="share of the control cells and of up to 24 perturbations' cells held out of training for the "
                   "validation verdict (model vs baseline, and the blend weight predictions are served with); 0: none")
    p.add_argument("--unseen-fraction", type=float, default=TrainConfig.unseen_fraction, metavar="F",
                   help="share of the perturbations held out of training whole (single knockouts, knockdowns or "
                   "activations of measured genes), so the verdict also judges the model on perturbations it never "
                   "saw and fits their blend weight apart; use it when you will screen perturbations the data lacks "
                   "(they are then not trained on; default: %(default)s, none)")
    p.add_argument("--context-verdict", action="store_true",
                   help="hold the perturbed cells of one context (a cell type or patient of --context-key, a seeded "
                   "choice) out of training whole, so the verdict also judges the model on a context it never saw "
                   "perturbed, against the other contexts' mean effects; use it when you will predict new cell types "
                   "or patients (that context's perturbed cells are then not trained on; default: off)")
    p.add_argument("--verdict-samples", type=_whole_numbers, default=TrainConfig.verdict_samples, metavar="K[,K...]",
                   help="samples per cell (each cell's predictions averaged over K generations) that the verdict tries "
                        "with its best generation settings, keeping the one with the lowest validation error; each "
                        "K > 1 costs about K times the verdict's generation, and the chosen K multiplies every "
                        "later screen's (default: %(default)s; 1: one sample, no choice)")
    p.add_argument("--verdict-temperatures", type=_positive_floats, default=TrainConfig.verdict_temperatures,
                   metavar="T[,T...]",
                   help="sampling temperatures the verdict tries at its chosen samples per cell, keeping the one "
                        "with the lowest validation error; each one other than 1 costs one more generation at those "
                        "samples (default: %(default)s; 1: no choice)")
    _add_force(p)
    p.set_defaults(func=cmd_train)

    p = _add_command(sub, "verdict", "run a trained model's validation verdict again, on the data it was trained on",
                     "virtualcell verdict --model my-model --data papalexi2021 --verdict-samples 1,4,8")
    p.description += (" The verdict's held-out cells are found again from the run's record (its seed, "
                      "--verdict-fraction and --holdout), so --data must be what training was given; its hash is "
                      "checked. It gives an older checkpoint what the verdict reports now, or tries other samples "
                      "per cell or guidance scales without training again; what it chooses is what predict and "
                      "screen then use.")
    p.add_argument("--model", required=True, help="checkpoint folder written by 'virtualcell train', or 'bundled' (the "
                   "model shipped in the package)")
    p.add_argument("--data", required=True, help="the data the model was trained on: an .h5ad path or a dataset name")
    p.add_argument("--out", default=None,
                   help="write the re-judged checkpoint (weights too) into this folder (default: rewrite the "
                        "verdict inside --model, keeping the old one as previous-verdict.json)")
    p.add_argument("--verdict-samples", type=_whole_numbers, default=None, metavar="K[,K...]",
                   help="samples per cell the verdict tries with its best generation settings (default: the "
                        "training run's)")
    p.add_argument("--verdict-temperatures", type=_positive_floats, default=None, metavar="T[,T...]",
                   help="sampling temperatures the verdict tries at its chosen samples per cell (default: the "
                        "training run's, or 1,0.8,0.6 for one that recorded none)")
    p.add_argument("--guidance", type=_positive_floats, default=None, metavar="W[,W...]",
                   help="guidance scales the verdict compares, one sample each (default: the training run's: "
                        "1,2,4 for a model trained with a generic condition)")
    p.add_argument("--threads", type=_positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default=None, help="cuda[:N], mps or cpu (default, or auto: the best available)")
    _add_force(p)
    p.set_defaults(func=cmd_verdict)

    p = _add_command(sub, "info", "what a trained model is, was trained on, can be asked, and how its verdict went",
                     "virtualcell info --model my-model")
    p.description += (" Read from the checkpoint's own record, nothing simulated: its size and genes, the data "
                      "contract it reads, every condition it trained on (as the data named it), the contexts it saw "
                      "perturbed, the training run, and the validation verdict with the blend weight and generation "
                      "settings that predict and screen serve.")
    p.add_argument("--model", required=True, help="checkpoint folder written by 'virtualcell train' ('bundled': the "
                   "model shipped in the package)")
    p.add_argument("--json", action="store_true", help="the card as JSON, for a script")
    p.set_defaults(func=cmd_info)

    p = _add_command(sub, "predict", "predict perturbed cells for a baseline population",
                     "virtualcell predict --model my-model --data baseline.h5ad --perturbations ko:STAT1,ko:JAK2 "
                     "--out predictions.h5ad")
    _add_model_args(p)
    p.add_argument("--perturbations", required=True, help="comma-separated: training labels (A, A+B) or typed (ko:A, drug:X@1uM,24h); a {a,b} group "
                        "writes one a choice (drug:X@{0.1,1,10}uM)")
    p.add_argument("--out", required=True, help="output .h5ad file")
    p.add_argument("--format", choices=["h5ad", "cell-eval"], default="h5ad",
                   help="h5ad: virtualcell's layout (default); cell-eval: what 'cell-eval run -ap OUT -ar REAL' "
                   "reads as it is (obs['target_gene'], control 'non-targeting', the baseline cells as the "
                   "control, log1p values; written a perturbation at a time). Put the measured file in the same form with "
                   "virtualcell.evaluate.to_cell_eval(real, like=pred)")
    p.add_argument("--max-in-memory", type=_count, default=None, metavar="VALUES",
                   help="stream predictions larger than this many values through a file on disk (0: always; "
                   "default 50 million)")
    p.add_argument("--draws", action="store_true",
                   help="write one draw per cell (each cell's first generated sample alone, calibrated the same way) "
                   "instead of the cells averaged over --samples: the predicted population, with its spread, for "
                   "distribution distances such as E-distance; held in memory")
    _add_force(p, "an existing file that virtualcell did not write")
    p.set_defaults(func=cmd_predict)

    p = _add_command(sub, "screen", "screen a panel of perturbations and rank them for the wet lab",
                     "virtualcell screen --model my-model --data baseline.h5ad --panel panel.txt --out my-screen")
    _add_model_args(p)
    p.add_argument("--panel", required=True, help="text file (UTF-8): one perturbation a line ('#' comments)")
    p.add_argument("--objective", default=None,
                   help="largest (default), raise:G1,G2, lower:G1,G2, signature:UP/DOWN, reverse:UP/DOWN, toward:REF.h5ad")
    p.add_argument("--top", type=_positive_int, default=10, help="size of the diverse shortlist")
    p.add_argument("--out", required=True, help="results folder (resumes an interrupted screen)")
    p.add_argument("--group-size", type=_positive_int, default=16,
                   help="perturbations simulated and saved together: an interrupted screen resumes after its last "
                   "finished group (smaller: less lost to an interruption, a little slower)")
    _add_force(p, "a folder virtualcell did not write, or one of another screen (its results are then discarded)")
    p.set_defaults(func=cmd_screen)

    from .evaluate.cli import add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    with _any_text():  # (--help and argparse's errors are our text too)
        parser = build_parser()
        args = parser.parse_args(argv)
        with _log_lines(args.verbose):
            if not getattr(args, "command", None):
                parser.print_help(sys.stderr)
                return 2  # (a missing command is a usage error)
            if getattr(args, "quiet", False):  # every bar, ours (virtualcell.progress) and tqdm's in the libraries
                with _no_bars():
                    return _main_run(args)
            return _main_run(args)


@contextlib.contextmanager
def _any_text() -> Iterator[None]:
    """Standard output and error that write any text: a character their encoding lacks ('IFN-β' to a Windows
    cp1252 pipe, an ellipsis or a dash of ours under a Latin-1 or C locale) is written as its escape
    (``\\u03b2``) where it raised UnicodeEncodeError before any work was done. The streams as they were afterwards
    (main() called from Python)."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            with contextlib.suppress(ValueError, OSError):  # (a closed or detached stream: left as it is)
                stream.reconfigure(errors="backslashreplace")
                changed.append(stream)
    try:
        yield
    finally:
        for stream in changed:
            with contextlib.suppress(ValueError, OSError):
                stream.reconfigure(errors="strict")


@contextlib.contextmanager
def _log_lines(verbose: int) -> Iterator[None]:
    """The command's log lines (``LEVEL name: message`` on standard error, -v INFO, -vv DEBUG), and the caller's
    logging as it was afterwards (main() called from Python). Where nothing set logging up (a shell), the root logger
    holds the handler for the command's time, so the libraries' warnings read the same; where the caller did, the
    lines go to the caller's handlers, and -v / -vv still lower virtualcell's level."""
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    root, ours = logging.getLogger(), logging.getLogger("virtualcell")
    root_level, our_level = root.level, ours.level
    handler = None
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
        root.setLevel(level)
    elif level < ours.getEffectiveLevel():
        ours.setLevel(level)
    try:
        yield
    finally:
        ours.setLevel(our_level)
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(root_level)


@contextlib.contextmanager
def _no_bars() -> Iterator[None]:
    """No progress bar (``TQDM_DISABLE``), and the caller's environment as it was afterwards (main() called from
    Python)."""
    import os

    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def _main_run(args: argparse.Namespace) -> int:
    """The command, in the main process or one of a multi-process launch."""
    from .distributed import launch_rank

    if launch_rank() != 0:  # under a multi-process launch the main process reports; the others' errors still show
        import os

        # (their warnings and progress bars are the main one's: 8 GPUs printed each warning 8 times)
        ours = logging.getLogger("virtualcell")
        level = ours.level
        ours.setLevel(logging.ERROR)
        try:
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet), _no_bars():
                return _run(args)
        finally:
            ours.setLevel(level)
    with contextlib.redirect_stdout(_ReaderMayLeave(sys.stdout)):
        return _run(args)


class _ReaderMayLeave:
    """Standard output that outlives its reader: once a pipe's reader has gone (``predict ... | head -1``, a ``grep
    -q``), what is printed goes nowhere and the work goes on. A print before the work (the verdict) raised
    BrokenPipeError half-way, and predict and screen exited 0 with nothing written. On Windows a pipe whose reader
    has gone usually raises OSError EINVAL instead: on a pipe, that is the reader leaving too."""

    def __init__(self, stream) -> None:  # noqa: ANN001
        import os
        import stat

        self._stream = stream
        try:
            self._pipe = stat.S_ISFIFO(os.fstat(stream.fileno()).st_mode)
        except (AttributeError, ValueError, OSError):  # (no file under it: a StringIO, a notebook's stream)
            self._pipe = False

    def _left(self, err: OSError) -> bool:
        """Whether ``err``, raised writing or flushing, says the reader has gone."""
        import errno

        return isinstance(err, BrokenPipeError) or (self._pipe and err.errno == errno.EINVAL)

    def _gone(self) -> None:
        import os

        with contextlib.suppress(OSError, ValueError):  # (and the interpreter's last flush finds nothing to say)
            os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())
        self._stream = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as err:
            if not self._left(err):
                raise
            self._gone()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as err:
            if not self._left(err):
                raise
            self._gone()

    def __getattr__(self, name: str):  # noqa: ANN204 - isatty, fileno, encoding...: the stream's own
        return getattr(self._stream, name)


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """``warnings.showwarning`` for the command line: the warning as one log line."""
    log.warning("%s", message)


def _run(args: argparse.Namespace) -> int:
    import warnings

    shown = warnings.showwarning
    if args.verbose < 2:  # a warning is one log line for a person, not a source line of ours (-vv: Python's own)
        warnings.showwarning = _warning_line
    try:
        with contextlib.ExitStack() as held:
            if getattr(args, "threads", None) is not None and args.command in ("predict", "screen"):
                from .generation import blas_threads, torch_threads  # (train and verdict hold their own)

                held.enter_context(torch_threads(args.threads))
                held.enter_context(blas_threads(args.threads))
            from .contract import one_reading

            # one command is one reading of its data: a warning about the data is said once (read_h5ad and then
            # train said the same one twice)
            return int(one_reading(args.func)(args) or 0)
    except KeyboardInterrupt as stop:
        if args.verbose >= 2:
            raise
        # what was kept, where the work knows it (train: the step of its last checkpoint, and the steps lost)
        kept = " ".join(str(note) for note in getattr(stop, "__notes__", ()))
        again = {"train": "training resumes from OUT/last", "screen": "the screen resumes from its finished batches"}
        how = "Run the same command again"
        if args.command == "train" and getattr(args, "restart", False):  # (run again as it was, it starts over)
            how, again["train"] = "Run it again without --restart", "training resumes from OUT/last, if it was written"
        said = (f" {kept}" if kept and args.command in again else  # (the note says how to go on)
                f" {how}: {again[args.command]}." if args.command in again else "")
        print(f"\nvirtualcell {args.command}: interrupted.{said}", file=sys.stderr)
        return 130
    except VirtualCellError as err:
        print(f"virtualcell {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # a pipe gone under something else than standard output (which outlives its reader)
        import os

        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"virtualcell {args.command}: stopped: a pipe it wrote to was closed; the work may be unfinished.",
              file=sys.stderr)
        return 1
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as err:
        if args.verbose >= 2:
            raise
        print(f"virtualcell {args.command}: error: cannot use {err.filename!r} ({err.strerror}). "
              "Check the path and its permissions (-vv shows the traceback).", file=sys.stderr)
        return 2
    except Exception as err:  # noqa: BLE001 - a full disk or a memory limit, in torch's, h5py's or safetensors' words
        said = _out_of(err)
        if said is None or args.verbose >= 2:
            raise
        print(f"virtualcell {args.command}: error: {said} (-vv shows the traceback).", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = shown


def _out_of(err: BaseException) -> str | None:
    """What ran out, for an error a full disk or a memory limit raised (through any library, its own error chained
    or worded), or ``None``: each said with what to do, and that the last complete outputs are kept."""
    import errno

    seen: list[BaseException] = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)  # type: ignore[assignment]
    text = " ".join(f"{type(e).__name__}: {e}" for e in seen).lower()
    codes = {getattr(e, "errno", None) for e in seen}
    kept = "; the last complete outputs are kept, and train and screen run again go on from what they finished"
    if codes & {errno.ENOSPC, errno.EDQUOT} or "no space left" in text or "quota exceeded" in text:
        return "the disk is full: free space, or write to another --out" + kept
    if errno.EFBIG in codes or "file too large" in text:
        return ("a file grew past the size limit of this process or file system (ulimit -f): raise it, or write to "
                "another --out" + kept)
    if ("unexpected pos" in text or "file write failed" in text or "basic_ios" in text
            or ("requested and" in text and "written" in text)):  # (torch.save, np.save: a write stopped short)
        return ("a file could not be written whole (a full disk, or a file-size limit?): free space, or write to "
                "another --out" + kept)
    if (any(isinstance(e, MemoryError) for e in seen) or errno.ENOMEM in codes or "allocate memory" in text
            or "out of memory" in text):
        return "out of memory: use fewer cells at a time (--n-cells) or a smaller --batch-size, or raise the limit"
    return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
