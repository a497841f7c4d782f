"""A user's own files through the command line: train, predict, evaluate, as the README says.

    python experiments/user_files.py [--seed 0] [--threads 1] [--max-minutes 4] [--out DIR]

The protocols call the package from Python on files it knows. This script writes two screens the way a
user's files arrive (genes named by Ensembl ids with the symbols in a var column, no stored data contract,
their own column names) and runs the three commands a user would, reading back ``evaluate``'s table:

* ``drug_doses``: a synthetic drug screen (``vc.datasets.synthetic_screen``: three drugs at three doses
  across four "patients", 300 genes); the treated cells of patient ``PD`` and half its controls are held out;
  the model predicts each drug at each dose (``drugA@10`` ...) from PD's other controls. Doses come from
  ``--dose-key dose``; the drugs' kind is left to ``kind="auto"``.
* ``cytokine_cell_types``: the Kang 2018 scGen split (IFN-beta on PBMCs, 7 cell types), 300 most variable
  genes, labels in ``obs['condition']``; CD4T's stimulated cells and half its controls are held out.

For each: ``virtualcell train`` (``--max-minutes``), ``virtualcell predict`` served (the checkpoint's blend)
and pure (``--blend none``), and ``virtualcell evaluate --train`` (so ``meanshift`` brings each effect from
the other patients or cell types). Written to ``--out/user_files.md`` (default
``experiments/results/user_files/seedSEED``; the files, models and evaluations go to ``--work``, a temporary folder
by default). One seed is a check of the path and a rough figure, not a table row.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("pearson_delta", "pearson_delta_top50")


def with_ids(adata):  # noqa: ANN001, ANN201
    """Genes renamed to well-formed Ensembl ids, the symbols kept in var['symbol']; no stored contract."""
    out = adata.copy()
    out.var["symbol"] = out.var_names.astype(str)
    out.var_names = [f"ENSG{300000 + i:011d}" for i in range(out.n_vars)]
    out.uns.pop("virtualcell", None)
    return out


def split_files(adata, folder: Path, *, context_key: str, held_context: str, label_key: str, control: str,  # noqa: ANN001
                seed: int) -> None:
    """``screen.h5ad`` (with obs['split']), ``train.h5ad``, ``baseline.h5ad`` (the held context's training
    controls) and ``real.h5ad`` (its treated cells and the other half of its controls)."""
    rng = np.random.default_rng(seed)
    held = (adata.obs[context_key].astype(str) == held_context).to_numpy()
    ctrl = (adata.obs[label_key].astype(str) == control).to_numpy()
    idx = np.flatnonzero(held & ctrl)
    rng.shuffle(idx)
    split = np.where(held & ~ctrl, "test", "train").astype(object)
    split[idx[: idx.size // 2]] = "reference"
    adata.obs["split"] = split
    folder.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(folder / "screen.h5ad")
    adata[split == "train"].copy().write_h5ad(folder / "train.h5ad")
    adata[(split == "train") & held & ctrl].copy().write_h5ad(folder / "baseline.h5ad")
    adata[split != "train"].copy().write_h5ad(folder / "real.h5ad")


def drug_doses(folder: Path, seed: int) -> dict:
    import virtualcell as vc

    a = vc.datasets.synthetic_screen(n_genes=300, n_tfs=25, n_knockouts=0, n_pairs=0, n_drugs=3, n_cytokines=0,
                                     n_cells_per_condition=100, n_control_cells=300, n_contexts=4, seed=seed)
    a.obs = a.obs.rename(columns={"cell_type": "patient"}).drop(columns=["condition", "perturbation_type"])
    a.obs["patient"] = a.obs["patient"].astype(str).str.replace("type", "P")
    split_files(with_ids(a), folder, context_key="patient", held_context="PD", label_key="perturbation",
                control="control", seed=seed)
    panel = ",".join(f"drug{d}@{x:g}" for d in "ABC" for x in (0.1, 1.0, 10.0))
    return {"keys": ["--perturbation-key", "perturbation", "--control", "control", "--context-key", "patient"],
            "dose": ["--dose-key", "dose"], "panel": panel}


def cytokine_cell_types(folder: Path, seed: int) -> dict:
    import virtualcell as vc

    a = vc.datasets.load("kang2018_scgen")
    X = a.X
    var = np.asarray(X.power(2).mean(0)).ravel() - np.square(np.asarray(X.mean(0)).ravel())
    a = a[:, np.sort(np.argsort(-var)[:300])].copy()
    split_files(with_ids(a), folder, context_key="cell_type", held_context="CD4T", label_key="condition",
                control="control", seed=seed)
    return {"keys": ["--perturbation-key", "condition", "--control", "control", "--context-key", "cell_type"],
            "dose": [], "panel": "stimulated"}


def cli(*args: str) -> float:
    """Run ``python -m virtualcell.cli ARGS``; seconds taken (stops on a failure, printing its output)."""
    t = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "virtualcell.cli", *args], capture_output=True, text=True,
                         cwd=ROOT)
    if run.returncode != 0:
        sys.exit(f"virtualcell {' '.join(args)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-minutes", type=float, default=4.0)
    ap.add_argument("--out", default=None, help="default: experiments/results/user_files/seedSEED")
    ap.add_argument("--work", default=None, help="folder for the files, models and evaluations (default: a temporary one)")
    ap.add_argument("--train-option", action="append", default=[], metavar="OPTION",
                    help="an extra option of 'virtualcell train' (repeatable), e.g. --train-option=--token-bias")
    ap.add_argument("--only", choices=("drug_doses", "cytokine_cell_types"), default=None, help="run one file only")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "experiments" / "results" / "user_files" / f"seed{args.seed}"
    if args.work is None:
        import atexit
        import shutil
        import tempfile

        work = Path(tempfile.mkdtemp(prefix="vc-user-files-"))
        atexit.register(shutil.rmtree, work, ignore_errors=True)
    else:
        work = Path(args.work)
    rows, timing = [], {}
    for name, build in (("drug_doses", drug_doses), ("cytokine_cell_types", cytokine_cell_types)):
        if args.only not in (None, name):
            continue
        folder = work / name
        spec = build(folder, args.seed)
        f = lambda x: str(folder / x)  # noqa: E731
        secs = {"train": cli("train", "--data", f("screen.h5ad"), *spec["keys"], *spec["dose"], "--holdout",
                             "split=test,reference", "--max-minutes", f"{args.max_minutes:g}", "--seed",
                             str(args.seed), "--threads", str(args.threads), *args.train_option, "--out", f("model"),
                             "--force")}
        for served, blend in (("served", "auto"), ("pure", "none")):
            secs[f"predict ({served})"] = cli("predict", "--model", f("model"), "--data", f("baseline.h5ad"),
                                              "--perturbations", spec["panel"], "--blend", blend, "--seed",
                                              str(args.seed), "--out", f(f"pred_{served}.h5ad"), "--force")
            secs[f"evaluate ({served})"] = cli("evaluate", "--pred", f(f"pred_{served}.h5ad"), "--real", f("real.h5ad"),
                                               "--baseline", f("baseline.h5ad"), "--train", f("train.h5ad"),
                                               *spec["keys"], *spec["dose"], "--baselines", "nochange,meanshift",
                                               "--profile", "pearson", "--seed", str(args.seed),
                                               "--out", f(f"eval_{served}"), "--force")
            table = pd.read_csv(folder / f"eval_{served}" / "metrics.csv")
            for method in ("model", "meanshift", "ceiling") if served == "served" else ("model",):
                sub = table[(table["method"] == method) & table["metric"].isin(METRICS)]
                label = {"model": f"model ({served})"}.get(method, method)
                rows.append({"file": name, "method": label, "groups": sub["perturbation"].nunique(),
                             **{m: float(sub.loc[sub["metric"] == m, "value"].mean()) for m in METRICS}})
        model_meta = json.loads((folder / "model" / "virtualcell.json").read_text())
        timing[name] = {**{k: round(v) for k, v in secs.items()},
                        "steps": (model_meta.get("train_config", {}).get("history") or [{}])[-1].get("step")}
    frame = pd.DataFrame(rows)
    extra = "".join(f" --train-option={o}" for o in args.train_option) + (f" --only {args.only}" if args.only else "")
    md = [f"# A user's own files through the command line (seed {args.seed})", "",
          f"Command: `python experiments/user_files.py --seed {args.seed} --threads {args.threads} "
          f"--max-minutes {args.max_minutes:g}{extra}`", "", __doc__.split("\n\n", 2)[2].strip(), "",
          "pearson_delta over the held-out groups (drug_doses: 9 drug-dose conditions in patient PD; "
          "cytokine_cell_types: IFN-beta in CD4T):", "",
          "| file | method | groups | pearson_delta | pearson_delta_top50 |", "|---|---|---|---|---|"]
    md += [f"| {r['file']} | {r['method']} | {r['groups']} | {r['pearson_delta']:.3f} | {r['pearson_delta_top50']:.3f} |"
           for r in rows]
    md += ["", "Seconds per command and training steps: " + json.dumps(timing), ""]
    out.mkdir(parents=True, exist_ok=True)
    (out / "user_files.md").write_text("\n".join(md))
    frame.to_csv(out / "user_files.csv", index=False)
    print("\n".join(md))


if __name__ == "__main__":
    main()
