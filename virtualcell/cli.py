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
    """Run the main job on the embedded default dataset."""
    import numpy as np

    from . import datasets
    from .contract import DataContract
    from .sentences import RankFit, decode, encode

    t0 = time.perf_counter()
    adata = datasets.load(datasets.DEFAULT)
    info = datasets.available()[datasets.DEFAULT]
    contract = DataContract.from_adata(adata)
    labels = contract.labels(adata)
    print(f"virtualcell {__version__} demo on the embedded default dataset {info.name!r}")
    print(f"  {info.description}")
    print(f"  {adata.n_obs:,} cells x {adata.n_vars} genes; license {info.license}")
    print(f"  perturbations: {len(contract.perturbations(adata))} + control ({int((labels == contract.control).sum()):,} control cells)")
    t = time.perf_counter()
    cs = encode(adata, top_k=args.top_k, seed=args.seed)
    t_enc = time.perf_counter() - t
    fit = RankFit.fit(adata, cs, seed=args.seed)
    t = time.perf_counter()
    X = decode(cs, fit)
    t_dec = time.perf_counter() - t
    print(f"\nCell sentences (top {args.top_k} genes, seed {args.seed}): {cs}")
    print(f"  encoded in {t_enc:.2f} s ({adata.n_obs / t_enc:,.0f} cells/s); decoded in {t_dec:.2f} s")
    first = cs.to_text()[0].split()
    print(f"  cell 0 ({labels[0]}): {' '.join(first[:12])} …")
    print(
        f"  rank fit: expression = {fit.slope:.3f} * log10(1 + rank) + {fit.intercept:.3f}  "
        f"(R^2 {fit.r2:.3f}, {fit.normalization}, {fit.n_cells} cells)"
    )
    print(f"  decoded matrix: {X.shape[0]:,} x {X.shape[1]} float32, {X.nnz:,} stored values")
    # effect sizes per knockout on the decoded sentences vs measured, as a first look
    means = {}
    for p in [contract.control, *contract.perturbations(adata)]:
        means[p] = np.asarray(X[labels == p].mean(axis=0)).ravel()
    effects = {p: float(np.linalg.norm(m - means[contract.control])) for p, m in means.items() if p != contract.control}
    top = sorted(effects.items(), key=lambda kv: -kv[1])[:5]
    print("\n  largest decoded shifts from control (L2 of mean delta):")
    for p, v in top:
        print(f"    {p:<10} {v:.3f}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")
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

    p = sub.add_parser("demo", help="run the main job on the embedded default dataset (offline)")
    p.add_argument("--top-k", type=int, default=200, help="genes per cell sentence (default 200)")
    p.add_argument("--seed", type=int, default=0)
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
