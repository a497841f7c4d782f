"""Shared machinery of the benchmark protocols (issue 5): train with a budget, predict, evaluate, write.

Every protocol script (``experiments/protocol_N_*.py``) does the same five things:

1. mark which cells are held out (:func:`mark_test`) and split the control cells into an
   independent baseline half (fed to the model and the baselines) and a reference half
   (what measured deltas are taken against) — :func:`virtualcell.evaluate.split_controls`;
2. train a model on everything else within ``--max-minutes`` (:func:`train_model`), or load one;
3. predict the held-out groups from the baseline cells (:func:`predict`);
4. score model, baselines and the split-half noise ceiling on the held-out groups only
   (:func:`score`), with the training split as the only data the baselines learn from;
5. write ``protocol_N_<name>.{md,json,png}`` and refresh the combined ``protocols.md`` (:func:`write`).

Nothing here is tuned to a dataset: the protocols differ only in what they hold out.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
SPLIT = "vc_protocol_split"  # obs column: "train" / "test"
METRICS = ("pearson_delta", "pearson_delta_top50", "discrimination")
# cell-eval's Virtual Cell Challenge profile, computed by the cell-eval library on the same cells and
# prefixed so that its mae stays apart from virtualcell's: the columns a reader of the field compares
VCC_METRICS = ("vcc_overlap_at_N", "vcc_mae", "vcc_discrimination_score_l1")
METHODS = "virtualcell_methods"  # predict() -> score(): more predictions to score beside the model, by method name
# (the served blend, when the checkpoint blends; a protocol may add its own)
BLEND = "model (blend)"
DRAWS = "virtualcell_draws"  # predict(draws=True) -> the caller: one draw per cell, for distribution metrics


# --------------------------------------------------------------------------- #
# Command line and environment
# --------------------------------------------------------------------------- #
def parser(doc: str, *, minutes: float) -> argparse.ArgumentParser:
    """The common options: --max-minutes, --quick, --out, --seed, --threads."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-minutes", type=float, default=minutes, help="training budget per model (wall clock)")
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (numbers meaningless)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder (default experiments/results)")
    ap.add_argument("--seed", type=int, default=0, help="seed of every split, training run and sample")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: training measures 1 against all cores and keeps the faster)")
    ap.add_argument("--model-dir", default=None, help="keep the trained checkpoint(s) here (default: a temp dir)")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps at most (default: the protocol's)")
    ap.add_argument("--samples", type=int, default=None,
                    help="samples of each baseline cell under each perturbation, averaged into its prediction "
                         "(default: the number the trainer chose on its validation split; 1 where it chose none)")
    ap.add_argument("--temperature", type=float, default=None,
                    help="sampling temperature (default: the one the trainer chose on its validation split; 1 where "
                         "it chose none)")
    ap.add_argument("--guidance", type=float, default=None,
                    help="guidance scale (default: the one the trainer chose on its validation split; 1 = none)")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE[,FIELD=VALUE]",
                    help="change a TrainConfig field of the protocol's training runs, e.g. --set pairing=nearest "
                         "(repeatable); recorded with the run")
    return ap


def parse_settings(text: str) -> dict[str, Any]:
    """``"FIELD=VALUE[,FIELD=VALUE]"`` -> ``{FIELD: VALUE}``; values are Python literals where they parse (``true`` and
    ``false`` too, in any case), else strings."""
    import ast
    import re

    out: dict[str, Any] = {}
    for part in re.split(r",(?=\s*[A-Za-z_]\w*\s*=)", text):  # a comma inside a value (a tuple, a dict) stays
        key, _, value = part.partition("=")
        if not value:
            raise SystemExit(f"{text!r}: write FIELD=VALUE[,FIELD=VALUE], e.g. pairing=nearest")
        if value.strip().lower() in ("true", "false"):  # as a shell user writes them
            out[key.strip()] = value.strip().lower() == "true"
            continue
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def setup(threads: int | None) -> None:
    """Quiet logs, a fixed number of torch threads (None: the library's choice), offline Hugging Face."""
    if threads is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))
        os.environ.setdefault("MKL_NUM_THREADS", str(threads))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
        # numpy is loaded by now, so OMP_NUM_THREADS above came too late for its BLAS: set its pools themselves
        # (two runs at --threads 1 otherwise busy-wait on each other's BLAS threads)
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="anndata")


def hardware() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # the instruction set decides the trainer's kernels (bfloat16 only where native: training ran about twice as fast
    # where it was), so runs on "AMD EPYC" machines of different generations are told apart by it (session 44)
    from virtualcell.training.kernels import bf16_native

    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "gpu": torch.cuda.is_available(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "bf16_native": bf16_native(torch.device("cpu"))}


def command_line() -> str:
    return "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if Path(sys.argv[0]).exists() else sys.argv[0],
                                 *sys.argv[1:]])


# --------------------------------------------------------------------------- #
# Splits
# --------------------------------------------------------------------------- #
def mark_test(adata, test: np.ndarray) -> None:  # noqa: ANN001
    """Write the train/test split into ``adata.obs[SPLIT]`` (what ``TrainConfig.holdout`` reads)."""
    adata.obs[SPLIT] = np.where(np.asarray(test, dtype=bool), "test", "train")


def split(adata, contract, *, seed: int, context_key: str | None = None):  # noqa: ANN001, ANN201
    """Independent control halves: (baseline controls, reference = everything else)."""
    from virtualcell.evaluate import split_controls

    return split_controls(adata, perturbation_key=contract.perturbation_key, control=contract.control,
                          context_key=context_key if context_key is not None else contract.context_key, seed=seed)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
@dataclass
class Trained:
    model: Any
    seconds: float
    steps: int
    final_loss: float
    val_loss: float
    path: str
    config: dict[str, Any] = field(default_factory=dict)
    verdict: dict[str, Any] | None = None  # the trainer's validation verdict (training data only): model vs baseline

    def record(self) -> dict[str, Any]:
        """Everything but the model: a report's ``meta["training"]``."""
        return {k: v for k, v in vars(self).items() if k != "model"}

    def described(self) -> str:
        """How every protocol's report states the training: ``"N steps in M min (final loss L, validation V)"``."""
        return (f"{self.steps} steps in {self.seconds / 60:.1f} min (final loss {self.final_loss:.3f}, validation "
                f"{self.val_loss:.3f})")


def train_config(args: argparse.Namespace, **kw: Any):  # noqa: ANN201
    """The protocol's TrainConfig; ``--quick`` shrinks the model and the step count."""
    from virtualcell.train import TrainConfig

    # the model's size, learning rate and batch are the trainer's defaults (TrainConfig): a protocol measures them
    base = dict(seed=args.seed, max_minutes=args.max_minutes, eval_every=100, save_every=10_000,
                holdout={SPLIT: ["test"]}, threads=args.threads)
    base.update(kw)
    if getattr(args, "max_steps", None):
        base["max_steps"] = args.max_steps
    for item in getattr(args, "set", None) or []:
        base.update(parse_settings(item))
    if args.quick:
        base.update(quick_settings(base.get("top_k", 200), args.max_minutes))
    return TrainConfig(**base)


def quick_settings(top_k: int, max_minutes: float | None = 1.0) -> dict[str, Any]:
    """What ``--quick`` changes in a run's TrainConfig: a small model for a few steps, a smoke run of the path."""
    return dict(hidden_size=32, n_layers=1, n_heads=2, top_k=min(top_k, 24), max_steps=12, warmup_steps=2,
                eval_every=12, max_minutes=min(max_minutes or 1.0, 1.0), max_pairs=400)


def _trained(model, folder: Path, seconds: float | None, config: dict[str, Any]) -> Trained:  # noqa: ANN001
    """A trained checkpoint with the figures of its ``history.json`` (steps, final and validation loss;
    ``seconds`` None: the training loop's recorded time)."""
    history = json.loads((folder / "history.json").read_text())
    val = [h["val_loss"] for h in history if "val_loss" in h]
    if seconds is None:
        seconds = float(history[-1].get("elapsed_s", float("nan")))
    return Trained(model, seconds, len(history), float(history[-1]["loss"]), float(val[-1]) if val else float("nan"),
                   str(folder), config, model.verdict)


def load_trained(path: str, *, seed: int | None = None, held: Sequence[str] = ()) -> Trained:
    """A checkpoint an earlier run of a protocol trained (``--model-dir``), as :func:`train_model` returns it,
    so that it can be scored again without training (its training time is the recorded one). With ``seed``,
    refused (exit) unless it was trained at that seed (another seed's split trained on this one's held-out
    cells) and knows none of the ``held`` labels."""
    from virtualcell import C2SModel

    model = C2SModel.load(path)
    unknown = sorted(set(model.perturbations.labels) & set(held))
    if seed is not None and (unknown or model.train_config.get("seed") != seed):
        raise SystemExit(f"{path} was not trained by this protocol at --seed {seed} (seed "
                         f"{model.train_config.get('seed')}; it knows held-out perturbations {unknown}): its training "
                         "cells would overlap the held-out ones.")
    return _trained(model, Path(path), None, {k: v for k, v in model.train_config.items() if k != "history"})


def train_model(adata, contract, config, *, model_dir: str | None, name: str) -> Trained:  # noqa: ANN001
    """Train on the cells not marked ``test`` within the config's time budget."""
    from virtualcell.train import train

    if model_dir:
        root = Path(model_dir)
    else:
        import atexit
        import shutil

        root = Path(tempfile.mkdtemp(prefix="vc-protocol-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
    out = root / name
    if (out / "last").exists():  # never resume silently from another run's checkpoint
        import shutil

        shutil.rmtree(out)
    t = time.perf_counter()
    model = train(adata, out=out, contract=contract, config=config, progress=False)
    trained = _trained(model, out, time.perf_counter() - t, asdict(config))
    print(f"  trained {name}: {trained.steps} steps in {trained.seconds:.0f} s, loss {trained.final_loss:.3f}, "
          f"val {trained.val_loss:.3f}", flush=True)
    return trained


# --------------------------------------------------------------------------- #
# Prediction
# --------------------------------------------------------------------------- #
def predict(model, baseline, targets: dict[str, str], *, perturbation_key: str,  # noqa: ANN001, ANN201
            context: tuple[str, str] | None = None, n_cells: int | None = None, seed: int = 0,
            temperature: float | None = None, samples: int | None = None, guidance: float | None = None,
            blend=None, coexpression_prior: bool | None = None, compose: bool = False,  # noqa: ANN001
            draws: bool = False):
    """Predicted cells of every target from the baseline cells, labelled like the measured data.

    ``targets`` maps each measured label to the perturbation written for the model (a
    training label, or a typed perturbation such as ``ko:STAT1`` for one it never saw).
    ``samples``: samples of each cell under each perturbation, averaged into its prediction
    (``Simulator.simulate(samples=)``; ``None``: the trainer's choice).
    Returns ``(AnnData, SimulationResult, seconds)``: the pure model's cells, and with ``blend=None``
    the served blend's beside them in ``uns`` when the checkpoint serves one, both from one
    generation (the result's aggregates are then the served ones, with the pure model's
    ``delta_model`` beside ``delta``). ``coexpression_prior=False``: the model without the coexpression
    prior on a knockout it never trained on (``Simulator.simulate(coexpression_prior=)``); ``compose``: a
    combination generated from its parts' logits, or from its pair prompt (``Simulator.simulate(compose=)``).
    ``draws``: also one draw per cell, each cell's first sample alone (``Simulator.simulate(keep_draws=True)``), in
    ``uns[DRAWS]`` (with its own blend beside it): the predicted population for a distribution metric, where the
    cells averaged over ``samples`` are the expected responses, for the means.
    """
    from virtualcell import Simulator

    t = time.perf_counter()
    typed = [str(p) for p in model.resolve(list(targets.values()))]
    back = dict(zip(typed, targets))
    cells = (baseline if n_cells is None else baseline[: min(n_cells, baseline.n_obs)]).copy()
    sim = Simulator(cells, model, seed=seed)
    # blend=None: the pure model (issue 11: the targets are for it), and beside it the checkpoint's served blend,
    # from the same generated cells (res.cells_model are the pure model's; res.aggregates hold both, the pure
    # model's as delta_model); blend="auto" or a weight: that prediction alone
    w = sim.blend_weight("auto") if blend is None else None
    both = w is not None and min(w, sim.unseen_weight("auto")) < 1.0
    res = sim.simulate(list(targets.values()), seed=seed, temperature=temperature, guidance=guidance, samples=samples,
                       progress=False, keep_cells=True, blend="auto" if both else blend,
                       coexpression_prior=coexpression_prior, compose=compose, keep_draws=draws)

    def labelled(pure: bool, draws: bool = False):
        out = res.to_anndata(perturbation_key=perturbation_key, labels=back, pure=pure, draws=draws)
        out.obs = out.obs.drop(columns=["perturbation_typed"])
        if context is not None:
            out.obs[context[0]] = context[1]
        return out

    def with_blend(draws: bool):
        out = labelled(pure=True, draws=draws)
        if both:  # the checkpoint serves a blend: score it beside the pure model (score() reads it)
            out.uns[METHODS] = {BLEND: labelled(pure=False, draws=draws)}
            out.uns["blend_weight"] = float(w)
        return out

    pred = with_blend(draws=False)
    if draws:
        pred.uns[DRAWS] = with_blend(draws=True)
    seconds = time.perf_counter() - t
    a = res.aggregates.attrs
    print(f"  predicted {len(targets)} perturbations x {res.aggregates['n_cells'].values.max()} cells in "
          f"{seconds:.0f} s ({a.get('generated_genes', 0)} genes generated)", flush=True)
    return pred, res, seconds


# --------------------------------------------------------------------------- #
# Scoring
# --------------------------------------------------------------------------- #
def score(pred, real, *, baseline, train, contract, focus: list[tuple[str, str]] | None = None,  # noqa: ANN001
          metrics: tuple[str, ...] = METRICS, baselines: tuple[str, ...] = ("nochange", "meanshift", "pertmean",
                                                                              "additive", "linear"),
          context_key: str | None = None, seed: int = 0, max_cells: int = 500,
          cell_eval: bool = True) -> pd.DataFrame:
    """evaluate() of the model next to the baselines and the ceiling, kept to the ``focus`` groups.

    The baselines learn effects from ``train`` only (the model's training split), never from
    the held-out groups. With ``cell_eval``, cell-eval's ``vcc`` profile is scored too, on the
    same inputs, as metrics ``vcc_<name>`` (:data:`VCC_METRICS`).
    """
    from virtualcell.evaluate import evaluate

    ctx = context_key if context_key is not None else contract.context_key
    kw = dict(perturbation_key=contract.perturbation_key, control=contract.control, context_key=ctx,
              baselines=baselines, baseline=baseline, train=train, max_cells=max_cells, seed=seed)
    more = pred.uns.pop(METHODS, {}) if pred is not None else {}
    table = evaluate(pred, real, profile=list(metrics), **kw)
    if cell_eval:
        vcc = evaluate(pred, real, profile="vcc", **kw)
        vcc["metric"] = "vcc_" + vcc["metric"]
        attrs = dict(table.attrs)
        attrs.setdefault("virtualcell", {})["cell_eval"] = vcc.attrs.get("virtualcell", {}).get("engine")
        table = pd.concat([table, vcc], ignore_index=True)
        table.attrs = attrs
    for name, other in more.items():  # the served blend (predict()) and others, each a method beside the pure model
        parts = [evaluate(other, real, profile=list(metrics), **(kw | {"baselines": ()}))]
        if cell_eval:
            parts.append(evaluate(other, real, profile="vcc", **(kw | {"baselines": ()})))
            parts[-1]["metric"] = "vcc_" + parts[-1]["metric"]
        extra = pd.concat(parts, ignore_index=True)
        extra = extra[extra["method"] == "model"].assign(method=name)
        attrs = dict(table.attrs)
        table = pd.concat([table, extra], ignore_index=True)
        table.attrs = attrs
    if focus is not None:  # the provenance in table.attrs survives the selection
        keep = set(focus)
        table = table[[(p, c) in keep for p, c in zip(table["perturbation"], table["context"])]].copy()
    return table


DRAWN = " (draws)"  # with_draws(): the model's distribution metric on one draw per cell, reported beside it


def with_draws(table: pd.DataFrame, drawn: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """``table`` (score() of the served cells, each averaged over its samples) with the model's and the blend's
    ``metrics`` on their draws beside them (score() of ``predict(draws=True)``'s one draw per cell), as
    ``model (draws)`` / ``model (blend) (draws)``: a distribution metric can compare the predicted population
    the model samples, where averaging narrows it. Every other row is ``table``'s."""
    drawn = drawn[drawn["method"].isin(["model", BLEND]) & drawn["metric"].isin(metrics)]
    out = pd.concat([table, drawn.assign(method=drawn["method"] + DRAWN)], ignore_index=True)
    out.attrs = dict(table.attrs)
    return out


def summary(table: pd.DataFrame, metrics: tuple[str, ...] = METRICS) -> pd.DataFrame:
    """Mean and median of every metric per method over the groups it predicted (order: model, baselines, ceiling)."""
    methods = list(dict.fromkeys(table["method"]))
    order = [m for m in ["model", BLEND] + [x for x in methods if x not in ("model", BLEND, "ceiling")] + ["ceiling"]
             if m in methods]
    metrics = tuple(metrics) + tuple(m for m in VCC_METRICS if m in set(table["metric"]) and m not in metrics)
    rows = []
    for m in order:
        sub = table[table["method"] == m]
        row: dict[str, Any] = {"method": m, "groups": int(sub[["perturbation", "context"]].drop_duplicates().shape[0])}
        for k in metrics:
            v = sub.loc[sub["metric"] == k, "value"].dropna()
            row[f"{k} mean"] = float(v.mean()) if len(v) else float("nan")
            row[f"{k} median"] = float(v.median()) if len(v) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def markdown_table(frame: pd.DataFrame, *, digits: int = 3) -> str:
    cols = list(frame.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in frame.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, float | np.floating):
                cells.append("n/a" if not np.isfinite(v) else f"{v:.{digits}f}")
            else:
                cells.append(str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def compact(summ: pd.DataFrame, metrics: tuple[str, ...]) -> pd.DataFrame:
    """One column per metric, ``mean (median)``."""
    out = summ[["method", "groups"]].copy()
    metrics = tuple(metrics) + tuple(m for m in VCC_METRICS if f"{m} mean" in summ.columns and m not in metrics)
    for k in metrics:
        out[k] = [("n/a" if not np.isfinite(a) else f"{a:.3f} ({b:.3f})")
                  for a, b in zip(summ[f"{k} mean"], summ[f"{k} median"])]
    return out


# --------------------------------------------------------------------------- #
# Output
# --------------------------------------------------------------------------- #
def plot(table: pd.DataFrame, path: Path, metrics: tuple[str, ...], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from virtualcell.evaluate import plot_metric_bars

    have = [m for m in metrics if table.loc[table["metric"] == m, "value"].notna().any()]
    fig = plot_metric_bars(table, metric=have, return_fig=True)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


@dataclass
class Report:
    """What a protocol writes: its table, its headline and its context."""

    number: int
    name: str
    title: str
    description: str
    headline: list[dict[str, Any]]  # rows of the combined table: metric, model, baselines, ceiling, verdict
    summary: pd.DataFrame
    table: pd.DataFrame | None
    extra_md: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS


def write(report: Report, out: str | Path, *, started: float, quick: bool,
          args: argparse.Namespace | None = None) -> Path:
    """protocol_N_<name>.md/.json/.png in ``out``, and the combined protocols.md there."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"protocol_{report.number}_{report.name}"
    wall = time.perf_counter() - started
    meta = {"protocol": report.number, "name": report.name, "title": report.title, "command": command_line(),
            "quick": quick, "wall_seconds": round(wall, 1), "hardware": hardware(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "settings": vars(args) if args is not None else {}} | report.meta
    png = stem.with_suffix(".png")
    if report.table is not None and len(report.table):
        plot(report.table, png, report.metrics, f"Protocol {report.number}: {report.title}")
    md = [f"# Protocol {report.number}: {report.title}", "", report.description.strip(), "",
          f"Command: `{meta['command']}`  ", f"Wall time: {wall / 60:.1f} min on {meta['hardware']['cpu']} "
          f"({meta['hardware']['torch_threads']} torch thread(s), {meta['hardware']['cores']} cores, no GPU)."
          + (" **--quick smoke run: the numbers are meaningless.**" if quick else ""), "",
          "Values are mean (median) over the held-out groups each method predicts; `n/a` where a method or "
          "metric does not apply.", "",
          markdown_table(compact(report.summary, report.metrics)), ""]
    if report.extra_md:
        md += [report.extra_md.strip(), ""]
    if png.exists():
        md += [f"![metrics]({png.name})", ""]
    stem.with_suffix(".md").write_text("\n".join(md))
    record = meta | {"headline": report.headline, "summary": report.summary.to_dict(orient="records")}
    if report.table is not None:
        record["groups"] = report.table.to_dict(orient="records")
        record["evaluate"] = _jsonable(report.table.attrs.get("virtualcell", {}))
    stem.with_suffix(".json").write_text(json.dumps(_jsonable(record), indent=1))
    print("\n".join(md[:14]))
    print(f"wrote {stem}.{{md,json{',png' if png.exists() else ''}}} ({wall / 60:.1f} min)")
    write_combined(out)
    return stem


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating | float):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    return x


def write_combined(out: str | Path) -> Path:
    """protocols.md: one row per protocol from the protocol_*.json files in ``out``."""
    out = Path(out)
    rows, cpu = [], "CPU"
    for f in sorted(out.glob("protocol_*.json")):
        r = json.loads(f.read_text())
        cpu = r.get("hardware", {}).get("cpu", cpu)
        means = {row["method"]: row for row in r.get("summary", [])}
        for i, h in enumerate(r.get("headline", [])):
            first = i == 0
            m, n = means.get("model", {}).get(f"{h.get('metric')} mean"), means.get("nochange", {}).get(f"{h.get('metric')} mean")
            if m is not None and n is not None and "nochange" not in h.get("verdict", ""):
                better = m < n if h.get("metric") == "edistance" else m > n
                h = h | {"verdict": f"{'beats' if better else 'does not beat'} nochange; {h.get('verdict', '')}"}
            rows.append("| {n} | {metric} | {model} | {base} | {ceiling} | {verdict} | {cmd} | {wall} |".format(
                n=f"{r['protocol']}. {r['title']}" if first else "", metric=h.get("metric", ""),
                model=h.get("model", ""), base=h.get("baselines", ""), ceiling=h.get("ceiling", ""),
                verdict=h.get("verdict", ""), cmd=f"`{r['command']}`" if first else "",
                wall=(f"{r['wall_seconds'] / 60:.1f} min" + (" (quick)" if r.get("quick") else "")) if first else ""))
    text = "\n".join([
        "# Benchmark protocols (issue 5): model vs baselines vs noise ceiling", "",
        f"Each row is one command (`experiments/protocol_N_*.py`), run on a shared 2-core CPU ({cpu}, no GPU) "
        "with 1 torch thread and a 7-minute training budget per model (protocol 4 loads the bundled model, trained "
        "with rep_3 held out by its recorded command, `experiments/train_bundled_model.py`). "
        "Values are mean (median) over the held-out groups of one seed (the command's); baselines learn only from "
        "the training split; deltas are scored against an independent half of the control cells. Details, "
        "per-group values and plots: `protocol_N_*.md` beside this file. Means over seeds 0-2, against issue 11's "
        "targets: `experiments/results/issue11/issue11.md` (`python experiments/issue11_table.py`).", "",
        "| protocol | metric | model | baselines | ceiling | model vs best baseline | command | wall time |",
        "|---|---|---|---|---|---|---|---|", *rows, ""]
        + (["What was tried to close the gaps, with the numbers: [protocols_attempts.md](protocols_attempts.md).", ""]
           if (out / "protocols_attempts.md").exists() else []))
    path = out / "protocols.md"
    path.write_text(text)
    return path


def fmt(summ: pd.DataFrame, method: str, metric: str) -> str:
    row = summ[summ["method"] == method]
    if row.empty or not np.isfinite(row.iloc[0][f"{metric} mean"]):
        return "n/a"
    r = row.iloc[0]
    return f"{r[f'{metric} mean']:.2f} ({r[f'{metric} median']:.2f})"


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` is better: the metric registry's direction (cell-eval's ``vcc_``
    metrics by virtualcell's metric of the same name where there is one); the rest here are scores."""
    from virtualcell.evaluate.metrics import METRICS

    known = METRICS.get(metric.removeprefix("vcc_"))
    return known.higher_is_better if known is not None else True


def headline(summ: pd.DataFrame, metric: str, baselines: list[str]) -> dict[str, Any]:
    """The combined table's row for one metric: model, the named baselines, the ceiling, and who wins (in the
    metric's own direction, :func:`higher_is_better`)."""
    higher = higher_is_better(metric)
    vals = {m: summ.loc[summ["method"] == m, f"{metric} mean"].iloc[0]
            for m in summ["method"] if np.isfinite(summ.loc[summ["method"] == m, f"{metric} mean"].iloc[0])}
    bases = [b for b in baselines if b in vals]
    best = (max if higher else min)(bases, key=lambda b: vals[b]) if bases else None
    verdict = ""
    if "model" in vals and best is not None:
        diff = vals["model"] - vals[best]
        wins = diff > 0 if higher else diff < 0
        verdict = f"{'beats' if wins else 'loses to'} {best} by {abs(diff):.2f}"
    blend = f"; served blend {fmt(summ, BLEND, metric)}" if BLEND in vals else ""
    return {"metric": metric, "model": fmt(summ, "model", metric) + blend,
            "baselines": "; ".join(f"{b} {fmt(summ, b, metric)}" for b in bases),
            "ceiling": fmt(summ, "ceiling", metric), "verdict": verdict}
