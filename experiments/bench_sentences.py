"""Speed of the cell-sentence codec against cell2sentence 1.2.0's own code path.

The requirement: encoding and decoding at least 20x faster than cell2sentence 1.2.0 on the
same 20,000-cell data, measured side by side in one run. The shared folder holds 2,000
Kang 2018 cells (x 9,015 genes, raw counts), so the 20,000 cells are that file stacked
10 times (cell names made unique).

Steps timed, each the median of ``--repeats`` runs, interleaved (c2s, then ours, per repeat)
so that a change in machine load hits both sides alike:

* **encode**: c2s ``CSData.adata_to_arrow`` (vocabulary + one sentence string per cell,
  all expressed genes, in an arrow dataset) against ``virtualcell.sentences.encode(adata,
  top_k=None)`` (all expressed genes, as gene ids), and against ``encode(...).to_text()``
  (the same strings c2s makes).
* **decode**: the same text for both sides, the top-200-gene cell sentences of the 20,000
  cells (made once by our encoder). c2s: ``post_process_generated_cell_sentences`` +
  ``reconstruct_expression_from_cell_sentence`` per cell (as in its tutorials) and
  ``np.stack`` of the vectors; ours: ``parse_text`` + ``decode``. Both use the same slope
  and intercept (our ``RankFit`` on the data).

cell2sentence is not a dependency: it runs in a throw-away virtual environment
(``--venv``, default ``/tmp/c2s-venv``, outside the repository) made with
``--system-site-packages`` so that it shares this interpreter's numpy/scipy/anndata, with
``cell2sentence==1.2.0`` installed ``--no-deps`` plus the two packages it needs to import
(``datasets``, ``plotnine``), pinned so they cannot replace the shared numeric stack. The
c2s side runs in a subprocess of that environment (this same file, ``--c2s-worker``).
BLAS/OpenMP pools get ``--threads`` threads in both processes; ``encode`` gets
``threads=--threads``.

Run from the repository root::

    python experiments/bench_sentences.py              # ~15 min: c2s decodes ~90 cells/s
    python experiments/bench_sentences.py --stack 1 --repeats 1   # a quick smoke run

It prints the table and writes ``experiments/results/sentences_speed.md`` and the config,
hardware and raw timings next to it (``sentences_speed.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
DATA = ROOT.parent / "shared" / "data" / "kang2018_ifnb_pbmc_harmony_2000cells.h5ad"
C2S_VERSION = "1.2.0"
C2S_IMPORT_NEEDS = ("datasets==5.2.0", "plotnine==0.15.9")  # what c2s imports beyond our stack
SHARED_STACK = ("numpy", "scipy", "pandas", "anndata", "scikit-learn", "h5py")
DECODE_TOP_K = 200
N_CHECK = 50  # cells whose outputs are compared between the two sides


def _limit_threads(n: int) -> None:
    """Cap BLAS/OpenMP pools; must run before numpy is imported."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)


def stacked_adata(path: Path, stack: int):
    """The h5ad's cells stacked ``stack`` times (unique cell names), CSR float32 counts."""
    import anndata as ad
    import scipy.sparse as sp

    a = ad.read_h5ad(path)
    X = sp.csr_matrix(a.X)
    big = ad.AnnData(X=sp.vstack([X] * stack, format="csr"), var=a.var.copy())
    big.obs_names = [f"{name}-{i}" for i in range(stack) for name in a.obs_names]
    return big


# --------------------------------------------------------------------------- #
# The c2s side (runs inside the throw-away venv; imports nothing from virtualcell)
# --------------------------------------------------------------------------- #
def c2s_worker(job_path: Path) -> None:
    import time

    import numpy as np
    from cell2sentence.csdata import CSData
    from cell2sentence.utils import (
        post_process_generated_cell_sentences,
        reconstruct_expression_from_cell_sentence,
    )

    job = json.loads(job_path.read_text())
    adata = stacked_adata(Path(job["data"]), job["stack"])
    texts = Path(job["texts"]).read_text().split("\n")
    out = Path(job["out"])

    t0 = time.perf_counter()
    arrow_ds, vocabulary = CSData.adata_to_arrow(adata, random_state=42, sentence_delimiter=" ")
    t_encode = time.perf_counter() - t0

    vocab_list = list(vocabulary.keys())
    t0 = time.perf_counter()
    vectors = []
    n_replaced = 0
    for text in texts:
        genes, replaced = post_process_generated_cell_sentences(
            cell_sentence=text, vocab_list=vocab_list, replace_nonsense_string="NOT_A_GENE"
        )
        n_replaced += replaced
        vectors.append(
            reconstruct_expression_from_cell_sentence(
                cell_sentence_str=" ".join(genes),
                delimiter=" ",
                vocab_list=vocab_list,
                slope=job["slope"],
                intercept=job["intercept"],
            )
        )
    expression = np.stack(vectors)
    t_decode = time.perf_counter() - t0

    np.save(out / "c2s_decoded_head.npy", expression[: job["n_check"]])
    (out / "c2s_sentences_head.json").write_text(json.dumps(arrow_ds[: job["n_check"]]["cell_sentence"]))
    (out / "c2s_times.json").write_text(
        json.dumps({"encode_s": t_encode, "decode_s": t_decode, "n_cells": adata.n_obs, "n_replaced": n_replaced})
    )


# --------------------------------------------------------------------------- #
# The throw-away environment
# --------------------------------------------------------------------------- #
def ensure_venv(venv: Path) -> Path:
    """Python of a venv with cell2sentence 1.2.0 (``--no-deps``); created on first use."""
    import subprocess
    from importlib.metadata import version

    py = venv / "bin" / "python"
    probe = f"import importlib.metadata as m, cell2sentence.utils; assert m.version('cell2sentence') == '{C2S_VERSION}'"
    if py.exists() and subprocess.run([py, "-c", probe], capture_output=True).returncode == 0:
        return py
    print(f"creating the throw-away environment {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    constraints = venv / "constraints.txt"  # keep the shared numeric stack as it is here
    constraints.write_text("".join(f"{p}=={version(p)}\n" for p in SHARED_STACK))
    pip = [str(py), "-m", "pip", "install", "--quiet"]
    subprocess.run([*pip, "--no-deps", f"cell2sentence=={C2S_VERSION}"], check=True)
    subprocess.run([*pip, "-c", str(constraints), *C2S_IMPORT_NEEDS], check=True)
    subprocess.run([py, "-c", probe], check=True)
    return py


# --------------------------------------------------------------------------- #
# The benchmark
# --------------------------------------------------------------------------- #
def hardware() -> dict:
    import platform

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
    }
    try:
        cpu = Path("/proc/cpuinfo").read_text()
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("model name"))
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gib"] = round(int(mem[1]) / 2**20, 1)
    except (OSError, StopIteration, IndexError, ValueError):
        pass
    return info


def versions(venv_py: Path) -> dict:
    import subprocess
    from importlib.metadata import version

    out = {p: version(p) for p in SHARED_STACK}
    out["virtualcell"] = version("virtualcell") if _installed("virtualcell") else "source"
    code = "import importlib.metadata as m; print(*(m.version(p) for p in ('cell2sentence', 'datasets', 'numpy')))"
    result = subprocess.run([venv_py, "-c", code], capture_output=True, text=True, check=True)
    c2s, datasets, np_venv = result.stdout.split()
    out.update({"cell2sentence": c2s, "datasets (c2s venv)": datasets, "numpy (c2s venv)": np_venv})
    return out


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
    except PackageNotFoundError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DATA, help="raw-count h5ad (default: the shared Kang 2018 file)")
    parser.add_argument("--stack", type=int, default=10, help="stack the file this many times (10: 20,000 cells)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per step; the median is reported")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--venv", type=Path, default=Path("/tmp/c2s-venv"), help="throw-away venv for cell2sentence")
    parser.add_argument("--out", type=Path, default=RESULTS / "sentences_speed", help="output stem (.md and .json)")
    parser.add_argument("--c2s-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    _limit_threads(args.threads)
    if args.c2s_worker is not None:
        c2s_worker(args.c2s_worker)
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    import subprocess
    import tempfile
    import time

    import numpy as np

    import virtualcell as vc
    from virtualcell.sentences import RankFit, decode, encode, parse_text

    venv_py = ensure_venv(args.venv)
    command = "python " + " ".join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    load_before = os.getloadavg()
    adata = stacked_adata(args.data, args.stack)
    n = adata.n_obs
    print(f"{n:,} cells x {adata.n_vars:,} genes ({args.data.name} stacked {args.stack}x), "
          f"{adata.X.nnz / n:.0f} expressed genes per cell; {args.threads} threads, median of {args.repeats}")

    # the decode input: top-200 cell sentences as text, and one rank fit, shared by both sides
    sentences = encode(adata, top_k=DECODE_TOP_K, seed=0, threads=args.threads)
    texts = sentences.to_text()
    fit = RankFit.fit(adata, sentences, seed=0)
    vocab = sentences.vocab

    times: dict[str, list[float]] = {k: [] for k in ("c2s_encode", "c2s_decode", "encode", "encode_text", "decode")}
    with tempfile.TemporaryDirectory(prefix="bench_sentences_") as tmp:
        tmp = Path(tmp)
        (tmp / "texts.txt").write_text("\n".join(texts))
        job = {"data": str(args.data), "stack": args.stack, "texts": str(tmp / "texts.txt"), "out": str(tmp),
               "slope": fit.slope, "intercept": fit.intercept, "n_check": N_CHECK}
        (tmp / "job.json").write_text(json.dumps(job))
        worker = [str(venv_py), str(Path(__file__).resolve()), "--threads", str(args.threads),
                  "--c2s-worker", str(tmp / "job.json")]
        for r in range(args.repeats):
            subprocess.run(worker, check=True, stderr=subprocess.DEVNULL)  # stderr: c2s's progress bar
            c2s = json.loads((tmp / "c2s_times.json").read_text())
            times["c2s_encode"].append(c2s["encode_s"])
            times["c2s_decode"].append(c2s["decode_s"])

            t0 = time.perf_counter()
            encode(adata, top_k=None, seed=0, threads=args.threads)
            times["encode"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            text_all = encode(adata, top_k=None, seed=0, threads=args.threads).to_text()
            times["encode_text"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            parsed, report = parse_text(texts, vocab)
            X = decode(parsed, fit)
            times["decode"].append(time.perf_counter() - t0)
            print(f"  run {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
        checks = cross_check(adata, tmp, text_all, X, report, c2s["n_replaced"])
    load_after = os.getloadavg()

    med = {k: float(np.median(v)) for k, v in times.items()}
    rows = [
        ("encode: AnnData -> sentences, all expressed genes", "`CSData.adata_to_arrow`", "c2s_encode",
         "`encode(adata, top_k=None)` (gene ids)", "encode"),
        ("encode -> text (the strings c2s makes)", "`CSData.adata_to_arrow`", "c2s_encode",
         "`encode(adata, top_k=None).to_text()`", "encode_text"),
        (f"decode: top-{DECODE_TOP_K} sentence text -> expression", "`post_process_generated_cell_sentences` + "
         "`reconstruct_expression_from_cell_sentence`, `np.stack`", "c2s_decode", "`parse_text` + `decode`", "decode"),
    ]
    table = [
        "| step | cell2sentence 1.2.0 | time | virtualcell | time | c2s cells/s | virtualcell cells/s | speed-up |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    speedup = {our_key: med[c2s_key] / med[our_key] for *_, c2s_key, _, our_key in rows}
    for step, c2s_call, c2s_key, our_call, our_key in rows:
        ratio = speedup[our_key]
        table.append(
            f"| {step} | {c2s_call} | {med[c2s_key]:.2f} s | {our_call} | {med[our_key]:.3f} s | "
            f"{n / med[c2s_key]:,.0f} | {n / med[our_key]:,.0f} | **{ratio:.0f}x** |"
        )
    hw = hardware()
    vers = versions(venv_py)
    lines = [
        "# Cell-sentence codec speed: virtualcell vs cell2sentence 1.2.0",
        "",
        f"Data: `{args.data.name}` ({adata.n_vars:,} genes, raw counts) stacked {args.stack}x = {n:,} cells, "
        f"{adata.X.nnz / n:.0f} expressed genes per cell. Median of {args.repeats} runs, interleaved, "
        f"{args.threads} threads (BLAS/OpenMP pools and `encode(threads=...)`). cell2sentence {vers['cell2sentence']} "
        "runs in a throw-away venv (installed `--no-deps`), in a subprocess, on the same cells and text.",
        "",
        *table,
        "",
        "Target, at least 20x for encoding (`encode`) and decoding: "
        + f"encode {speedup['encode']:.0f}x, decode {speedup['decode']:.0f}x"
        + (": met." if min(speedup["encode"], speedup["decode"]) >= 20 else ": NOT met.")
        + " The encode -> text row (our sentences turned into the same Python strings c2s builds, with"
        " `CellSentences.to_text`) is shown for a like-for-like output; it is not part of the target.",
        "",
        "Cross-checks on the first cells: " + "; ".join(checks),
        "",
        f"Machine: {hw.get('cpu', '?')}, {hw['cpus_usable']} usable cores, {hw.get('memory_gib', '?')} GiB; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after "
        "(other work on the machine slows both sides).",
        "",
        f"Command: `{command}`",
        "",
    ]
    md = "\n".join(lines)
    print("\n" + md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(md)
    record = {
        "command": command,
        "config": {"data": str(args.data), "stack": args.stack, "n_cells": n, "n_genes": adata.n_vars,
                   "repeats": args.repeats, "threads": args.threads, "decode_top_k": DECODE_TOP_K,
                   "encode_seed": 0, "venv": str(args.venv), "c2s_import_needs": list(C2S_IMPORT_NEEDS)},
        "rank_fit": fit.to_dict() | {"rank_means": len(fit.rank_means)},
        "median_s": med,
        "runs_s": times,
        "speedup": speedup,
        "checks": checks,
        "hardware": hw | {"loadavg_before": load_before, "loadavg_after": load_after},
        "versions": vers,
        "virtualcell_version": getattr(vc, "__version__", None),
    }
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out.with_suffix('.md')} and {args.out.with_suffix('.json')}")


def cross_check(adata, tmp: Path, text_all, X, report, c2s_replaced: int) -> list[str]:
    """Both sides produce the same thing: value order of the sentences, decoded values."""
    import numpy as np

    c2s_sentences = json.loads((tmp / "c2s_sentences_head.json").read_text())
    c2s_X = np.load(tmp / "c2s_decoded_head.npy")
    Xc = adata.X[: len(c2s_sentences)].toarray()
    index = {g.upper(): i for i, g in enumerate(adata.var_names)}
    same_values = all(
        np.array_equal(Xc[i, [index[g] for g in s.split(" ")]], Xc[i, [index[g] for g in text_all[i].split(" ")]])
        for i, s in enumerate(c2s_sentences)
    )
    ours = X[: len(c2s_X)].toarray()
    # c2s does not clip the fitted line at 0; ours does
    diff = float(np.abs(np.clip(c2s_X, 0, None) - ours).max())
    return [
        f"encode: the expression values along each sentence are {'identical' if same_values else 'DIFFERENT'} "
        f"on both sides ({len(c2s_sentences)} cells; ties are ordered by each side's own seeded rule)",
        f"decode: max |c2s - ours| = {diff:.2g} over {len(c2s_X)} cells x {X.shape[1]:,} genes "
        f"(c2s values clipped at 0 as ours are)",
        f"parse: {report.n_invalid} invalid and {report.n_duplicate} repeated words (c2s replaced {c2s_replaced})",
    ]


if __name__ == "__main__":
    main()
