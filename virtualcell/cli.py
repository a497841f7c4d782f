"""The ``virtualcell`` command line: thin over the package.

Each sub-command is one function ``cmd_<name>(args)``; heavy imports happen inside it,
so ``virtualcell --help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

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
    res = run_demo(out=args.out, n_cells=args.n_cells, seed=args.seed, progress=not args.quiet)
    table = res.screen.ranking
    cols = ["rank", "perturbation", "score", "score_low", "score_high", "edistance", "l2_delta_corrected", "pick"]
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
    print(f"    model prediction           {res.spearman_model:+.2f}")
    print(f"    training-cell count only   {res.spearman_size_only:+.2f}   (a trivial reference)")
    print(f"    replicate vs replicate     {res.spearman_ceiling:+.2f}   (measured rep_1 vs rep_2: the ceiling)")
    print(f"\nwrote {res.out}/ (ranking.csv, ranking.parquet, aggregates.nc, top_hits.png) in {res.seconds:.0f} s")
    return 0


def _split_list(text: str) -> list[str]:
    """Split 'A,B,drug:x@1uM,24h' on commas, keeping a drug's ',TIME' with its dose."""
    import re

    out: list[str] = []
    for piece in text.split(","):
        if out and "@" in out[-1] and re.fullmatch(r"\s*[0-9.]+\s*[A-Za-z]*\s*", piece) and out[-1].count(",") == 0:
            out[-1] += "," + piece
        elif piece.strip():
            out.append(piece.strip())
    return out


def _baseline(args: argparse.Namespace, model):  # noqa: ANN001, ANN202
    """The baseline cells: the data's control cells when it is a whole screen with the model's contract."""
    adata = _load_data(args.data)
    contract = model.contract
    if contract is not None and contract.perturbation_key in adata.obs.columns and not args.all_cells:
        is_ctrl = adata.obs[contract.perturbation_key].astype(str).to_numpy() == contract.control
        if is_ctrl.any() and not is_ctrl.all():
            log.info("using the %d control cells of %s as the baseline (--all-cells to use every cell)", is_ctrl.sum(), args.data)
            print(f"baseline: the {int(is_ctrl.sum())} control cells ({contract.perturbation_key} == {contract.control!r}) of {args.data}")
            adata = adata[is_ctrl].copy()
    return adata


def cmd_predict(args: argparse.Namespace) -> int:
    """Predict perturbed cells for a baseline population."""
    from .model import C2SModel
    from .simulator import MAX_IN_MEMORY, Simulator

    import tempfile
    from pathlib import Path

    model = C2SModel.load(args.model, device=args.device)
    sim = Simulator(_baseline(args, model), model, genes=args.genes, seed=args.seed)
    perts = _split_list(args.perturbations)
    n = sim.baseline.n_obs if args.n_cells is None else min(args.n_cells, sim.baseline.n_obs)
    out = Path(args.out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None, prefix=".vc-predict-") as tmp:
        # large predictions stream through a chunked file on disk instead of memory
        limit = MAX_IN_MEMORY if args.max_in_memory is None else args.max_in_memory
        big = (len(perts) + 1) * n * len(model.genes) > limit
        res = sim.simulate(perts, n_cells=n, seed=args.seed, keep_cells=not big,
                           store=Path(tmp) / "cells.nc" if big else None, batch_size=args.batch_size,
                           max_genes=args.max_genes)
        res.write_h5ad(out)
        if res.store is not None:
            res.cells.close()
    a = res.aggregates.attrs
    P, C, G = res.cells.shape
    print(f"wrote {P * C:,} predicted cells x {G} genes to {args.out} "
          f"({a['normalization']}; invalid genes {a['invalid_genes']}, duplicates {a['duplicate_genes']})")
    return 0


def cmd_screen(args: argparse.Namespace) -> int:
    """Screen a panel and rank it."""
    from pathlib import Path

    import pandas as pd

    from .errors import ScreenError
    from .model import C2SModel
    from .perturbations import parse_panel
    from .screen import run as screen
    from .simulator import Simulator

    path = Path(args.panel)
    if not path.exists():
        raise ScreenError(f"No such panel file: {args.panel!r}. Write one perturbation a line, e.g. 'ko:STAT1'.")
    panel = parse_panel(path.read_text())
    model = C2SModel.load(args.model, device=args.device)
    try:
        model.resolve(panel)
    except VirtualCellError as err:  # say which line
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            body = line.split("#", 1)[0].strip()
            if body:
                try:
                    model.resolve([body])
                except VirtualCellError as line_err:
                    raise type(err)(f"panel line {number} ({body!r}): {line_err}") from None
        raise
    sim = Simulator(_baseline(args, model), model, genes=args.genes, seed=args.seed)
    res = screen(sim, panel, objective=args.objective, out=args.out, top=args.top, n_cells=args.n_cells,
                 seed=args.seed, batch_size=args.batch_size, max_genes=args.max_genes)
    cols = ["rank", "perturbation", "score", "score_low", "score_high", "edistance", "l2_delta_corrected", "pick"]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(res.ranking[cols].head(max(args.top, 10)).to_string(index=False))
    print(f"\nwrote {args.out}/ (ranking.csv, ranking.parquet, aggregates.nc, top_hits.png)")
    return 0


def cmd_encode(args: argparse.Namespace) -> int:
    """Encode an .h5ad into cell sentences (.npz, or text with --text)."""
    from . import datasets
    from .sentences import encode

    adata = _load_data(args.data)
    cs = encode(adata, layer=args.layer, top_k=args.top_k, seed=args.seed, var_key=args.var_key)
    if args.out.endswith(".txt"):
        with open(args.out, "w") as fh:
            fh.write("\n".join(cs.to_text()) + "\n")
    else:
        cs.save(args.out)
    print(f"wrote {cs} to {args.out}")
    return 0


def _load_data(spec: str, contract=None):  # noqa: ANN001, ANN202
    """A dataset name (see virtualcell.datasets) or an .h5ad path."""
    from . import datasets

    if spec.endswith(".h5ad"):
        if contract is None:
            from pathlib import Path

            if not Path(spec).exists():
                raise datasets.DataError(f"No such file: {spec!r}. Check the path.")
            return datasets._read(spec)
        return datasets.read_h5ad(spec, contract=contract)
    return datasets.load(spec)


def _contract_from_args(args: argparse.Namespace):  # noqa: ANN202
    from .contract import DataContract

    return DataContract(
        perturbation_key=args.perturbation_key, control=args.control, context_key=args.context_key,
        dose_key=getattr(args, "dose_key", None), time_key=getattr(args, "time_key", None),
    )


def cmd_train(args: argparse.Namespace) -> int:
    """Train (or fine-tune) a model on a perturbation screen."""
    from .train import TrainConfig, train

    contract = _contract_from_args(args)
    adata = _load_data(args.data, contract)
    holdout = {}
    for item in args.holdout or []:
        col, _, values = item.partition("=")
        if not values:
            raise _usage(f"--holdout {item!r}: write COLUMN=VALUE[,VALUE...], e.g. bio_rep=rep_3")
        holdout[col] = values.split(",")
    cfg = TrainConfig(
        top_k=args.top_k, hidden_size=args.hidden_size, n_layers=args.layers, n_heads=args.heads, lr=args.lr,
        batch_size=args.batch_size, max_steps=args.max_steps, max_minutes=args.max_minutes, seed=args.seed,
        kind=args.kind, kind_key=args.kind_key, holdout=holdout,
    )
    model = train(adata, out=args.out, contract=contract, config=cfg, base=args.base, resume=not args.restart)
    hist = model.train_config.get("history", [])
    last = hist[-1] if hist else {}
    print(f"saved {model} to {args.out}")
    if last:
        print(f"  steps {last.get('step')}, train loss {last.get('loss', float('nan')):.3f}, "
              f"validation loss {last.get('val_loss', float('nan')):.3f}")
    return 0


def _usage(message: str):  # noqa: ANN202
    from .errors import VirtualCellError

    return VirtualCellError(message)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint folder (virtualcell train output) or hub id")
    p.add_argument("--data", required=True, help="baseline cells: an .h5ad or a dataset name (control cells are used)")
    p.add_argument("--all-cells", action="store_true", help="use every cell of --data as baseline, not only controls")
    p.add_argument("--genes", choices=["all", "shared"], default="all", help="'shared': proceed on the genes the model knows")
    p.add_argument("--n-cells", type=int, default=None, help="use the first N baseline cells")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=512, help="(cell, perturbation) rows per forward pass; lower it if memory is short")
    p.add_argument("--max-genes", type=int, default=None, help="genes per generated cell (default: the model's top_k)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def _add_contract_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--perturbation-key", required=required, default="perturbation", help="obs column of the perturbation labels")
    p.add_argument("--control", required=required, default="control", help="label of the control cells")
    p.add_argument("--context-key", default=None, help="obs column of the context (cell type / line / patient)")
    p.add_argument("--dose-key", default=None, help="obs column of the dose")
    p.add_argument("--time-key", default=None, help="obs column of the time")


# --------------------------------------------------------------------------- #
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="virtualcell",
        description="Simulate how cells respond to drugs, knockouts and cytokines with Cell2Sentence-style "
        "language models, and rank which experiments to run first.",
    )
    parser.add_argument("--version", action="version", version=f"virtualcell {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="screen the embedded default with the bundled model (offline, ~1 min on a CPU)")
    p.add_argument("--out", default="virtualcell-demo", help="results folder (default ./virtualcell-demo)")
    p.add_argument("--n-cells", type=int, default=120, help="baseline cells (default 120)")
    p.add_argument("--top", type=int, default=12, help="rows of the ranking to print")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("encode", help="encode an .h5ad (or a dataset name) into cell sentences")
    p.add_argument("--data", required=True, help="an .h5ad path or a dataset name (see virtualcell.datasets)")
    p.add_argument("--out", required=True, help="output .npz (compact ids) or .txt (one sentence a line)")
    p.add_argument("--layer", default=None)
    p.add_argument("--var-key", default=None, help="var column holding gene symbols (default var_names)")
    p.add_argument("--top-k", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("train", help="train a small C2S model on a screen, or fine-tune a real checkpoint (--base)")
    p.add_argument("--data", required=True, help="the screen: an .h5ad path or a dataset name")
    _add_contract_args(p)
    p.add_argument("--base", default=None, help="a Hugging Face causal LM to fine-tune (hub id or folder); default: a new small model")
    p.add_argument("--out", required=True, help="checkpoint folder (resumes from OUT/last if present)")
    p.add_argument("--max-minutes", type=float, default=None, help="wall-time budget; training stops when it is spent")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=200, help="genes per cell sentence")
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--kind", default="auto", help="what the labels are: auto, knockout, knockdown, activation, drug, cytokine, label")
    p.add_argument("--kind-key", default=None, help="obs column giving each cell's perturbation kind (e.g. CRISPRa / CRISPRi)")
    p.add_argument("--holdout", action="append", metavar="COLUMN=VALUES", help="exclude cells from training, e.g. bio_rep=rep_3")
    p.add_argument("--restart", action="store_true", help="ignore OUT/last and start over")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("predict", help="predict perturbed cells for a baseline population")
    _add_model_args(p)
    p.add_argument("--perturbations", required=True, help="comma-separated: training labels (A, A+B) or typed (ko:A, drug:X@1uM,24h)")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--max-in-memory", type=int, default=None, metavar="VALUES",
                   help="stream predictions larger than this many values through a file on disk (default 50 million)")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("screen", help="screen a panel of perturbations and rank them for the wet lab")
    _add_model_args(p)
    p.add_argument("--panel", required=True, help="text file: one perturbation a line ('#' comments)")
    p.add_argument("--objective", default=None,
                   help="largest (default), raise:G1,G2, lower:G1,G2, signature:UP/DOWN, reverse:UP/DOWN, toward:REF.h5ad")
    p.add_argument("--top", type=int, default=10, help="size of the diverse shortlist")
    p.add_argument("--out", required=True, help="results folder (resumes an interrupted screen)")
    p.set_defaults(func=cmd_screen)

    from .evaluate.cli import add_evaluate_parser

    add_evaluate_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=[logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)],
        format="%(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except VirtualCellError as err:
        print(f"virtualcell {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
