"""Screen throughput and validity of generation against a plain ``transformers`` loop.

The requirement (issue 3): generated cells per second at least 3x a reference that calls
plain ``transformers`` ``generate`` on the full prompts, in batches of the same size,
with the same model, data, sampling and number of genes, measured side by side in one
run. Also: 0 invalid and 0 duplicate genes per generated cell with constraints on, and
what the same model writes without them.

Setup: the bundled model, ``--cells`` control cells of the embedded dataset times
``--perturbations`` knockouts (a small screen grid). Every generated cell has exactly
``--genes`` genes on both sides (``min_new_tokens = max_new_tokens`` for ``generate``;
``min_genes = max_genes`` for ours) so that the work is the same. ``--stop eos`` instead lets
every cell end at the model's EOS (at most ``--genes`` genes), as in a real screen; tokens/s
then counts the tokens each side actually wrote. Sampling is
temperature 1 over the full vocabulary on both sides.

Sides, each timed ``--repeats`` times, interleaved so that machine load hits all alike:

* ``transformers.generate``: full prompt (``<bos> cell <sep> perturbation <out>``) for
  every (cell, perturbation) pair, left-padded, ``do_sample=True``, ``top_k=0``; once with
  torch's default thread count (what a plain loop, and cell2sentence, runs with) and
  once pinned to 1 thread.
* ``virtualcell`` unconstrained: prefix computed once per cell, shared-prefix attention
  (the prefix keys/values are not repeated per perturbation), preallocated cache, no gene mask.
* ``virtualcell`` constrained (the default): the same plus the gene mask.
* ``virtualcell`` constrained with ``prefix_attention="repeat"``: each cell's prefix cache
  repeated for each of its rows (the engine before shared-prefix attention), to show what
  that part gives.

``--sweep 128,256,512,1024`` adds a second table: ``generate`` (default threads) against the
constrained engine at each batch size (both sides at the same size; ``cells = size /
perturbations``, one timed run each after a warm-up), because the ratio depends on it.

Both ``virtualcell`` sides use the engine's default ``threads=None``: on CPU it times a
decode-shaped forward pass with 1 and with all threads and keeps the faster. The two
reference rows separate what that choice gives from what the engine itself gives.

Run from the repository root::

    python experiments/bench_generation.py --sweep 128,256,512,1024   # ~8 min on 2 cores
    python experiments/bench_generation.py --cells 4 --perturbations 4 --repeats 1   # smoke

Writes ``experiments/results/generation_speed.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cells", type=int, default=64)
    ap.add_argument("--perturbations", type=int, default=8)
    ap.add_argument("--genes", type=int, default=100, help="genes per generated cell (both sides)")
    ap.add_argument("--batch-size", type=int, default=None, help="rows per forward pass, both sides (default: the engine's)")
    ap.add_argument("--sweep", default="", help="comma-separated batch sizes for the batch-size table (e.g. 128,256,512,1024)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads for the process (default: torch's)")
    ap.add_argument("--stop", choices=["length", "eos"], default="length",
                    help="length: every cell gets exactly --genes genes; eos: cells end at EOS (real screens)")
    ap.add_argument("--device", default="cpu", help="cpu (the figure), or cuda to check the GPU path")
    ap.add_argument("--name", default="generation_speed", help="results file stem")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    import numpy as np
    import torch
    import transformers

    import virtualcell as vc
    from virtualcell.generation import GenerationConfig
    from virtualcell.sentences import encode, parse_text

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch_size is None:
        args.batch_size = GenerationConfig().batch_size
    default_threads = torch.get_num_threads()
    model = vc.model.bundled(device=args.device)
    dev = model.device
    fmt = model.format
    adata = vc.datasets.load("papalexi2021")
    ctrl = adata[adata.obs["perturbation"] == "control"]
    sweep = [int(x) for x in args.sweep.split(",") if x.strip()]
    n_pool = max([args.cells] + [-(-b // args.perturbations) for b in sweep])
    ctrl = ctrl[np.random.default_rng(0).choice(ctrl.n_obs, n_pool, replace=False)].copy()
    pool = encode(ctrl, vocab=model.genes, top_k=model.top_k)
    cells = pool.subset(list(range(args.cells)))
    perts = model.resolve([p for p in model.perturbations.labels if p != "control"][: args.perturbations])
    n_rows = len(cells) * len(perts)

    # --- the reference: plain generate on full prompts -------------------------------------
    prompts = [fmt.prefix(cells[i][: model.top_k]) + fmt.suffix(p) for i in range(len(cells)) for p in perts]

    forced = args.stop == "length"

    def plain_generate(threads: int, prompts: list[list[int]] = prompts, batch_size: int | None = None) -> list[list[int]]:
        torch.manual_seed(0)
        torch.set_num_threads(threads)
        outs: list[list[int]] = []
        bs = batch_size or args.batch_size
        for b0 in range(0, len(prompts), bs):
            batch = prompts[b0 : b0 + bs]
            width = max(len(p) for p in batch)
            ids = torch.full((len(batch), width), fmt.pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, p in enumerate(batch):
                ids[r, width - len(p) :] = torch.tensor(p)
                mask[r, width - len(p) :] = 1
            with torch.inference_mode():
                gen = model.lm.generate(
                    input_ids=ids.to(dev), attention_mask=mask.to(dev), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                    max_new_tokens=args.genes, min_new_tokens=args.genes if forced else 0, eos_token_id=fmt.eos,
                    pad_token_id=fmt.pad, use_cache=True,
                )
            outs.extend(gen[:, width:].cpu().tolist())
        torch.set_num_threads(default_threads)
        return outs

    def ours(constrain: bool, prefix_attention: str = "auto", batch_size: int | None = None):  # noqa: ANN202
        cfg = GenerationConfig(max_genes=args.genes, min_genes=args.genes if forced else 1, constrain=constrain,
                               batch_size=batch_size or args.batch_size, seed=0, prefix_attention=prefix_attention)
        chunks = list(model.generate(cells, perts, config=cfg))
        return chunks

    def words_of(token_rows: list[list[int]]) -> list[str]:
        vocab = model.tokenizer.convert_ids_to_tokens
        return [" ".join(vocab(r[: r.index(fmt.eos)] if fmt.eos in r else r)) for r in token_rows]

    ref_name = f"transformers.generate, full prompts, {default_threads} threads (torch default)"
    sides = {
        ref_name: lambda: plain_generate(default_threads),
        "transformers.generate, full prompts, 1 thread": lambda: plain_generate(1),
        "virtualcell, no constraints": lambda: ours(False),
        "virtualcell, constrained (default)": lambda: ours(True),
        "virtualcell, constrained, prefix cache repeated per row": lambda: ours(True, "repeat"),
    }
    times: dict[str, list[float]] = {k: [] for k in sides}
    last: dict[str, object] = {}
    for fn in sides.values():  # warm-up of every side (allocator, kernels, first-call overheads), not timed
        fn()
    for _ in range(args.repeats):
        for name, fn in sides.items():
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            last[name] = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)

    # --- validity: parse every side's output the same way ---------------------------------
    def validity(name: str) -> dict[str, float]:
        out = last[name]
        if isinstance(out, list) and out and isinstance(out[0], list):  # plain generate: token rows
            _, rep = parse_text(words_of(out), model.genes)
            n_tok = sum(r.index(fmt.eos) if fmt.eos in r else len(r) for r in out)
            return {"invalid_per_cell": rep.n_invalid / n_rows, "duplicate_per_cell": rep.n_duplicate / n_rows,
                    "tokens": n_tok}
        n_inv = sum(c.n_invalid for c in out)
        n_dup = sum(c.n_duplicate for c in out)
        kept = sum(int(np.diff(c.sentences.offsets).sum()) for c in out)
        return {"invalid_per_cell": n_inv / n_rows, "duplicate_per_cell": n_dup / n_rows,
                "tokens": kept + n_inv + n_dup}

    ref = statistics.median(times[ref_name])
    ref1 = statistics.median(times["transformers.generate, full prompts, 1 thread"])
    rows = []
    for name in sides:
        med = statistics.median(times[name])
        v = validity(name)
        tokens = n_rows * args.genes if forced else v["tokens"]  # forced: exactly --genes per cell
        rows.append({"side": name, "seconds": med, "cells_per_s": n_rows / med, "tokens_per_s": tokens / med,
                     "speedup_vs_generate": ref / med,
                     "speedup_vs_generate_1_thread": ref1 / med, **v, "all_times": times[name]})

    from virtualcell.generation import _pick_threads

    picked = _pick_threads(model.lm, min(args.batch_size, n_rows), dev, fmt.pad) or default_threads
    hw = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch_threads": default_threads,
          "engine_threads": picked,
          "python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__,
          "load_1min": os.getloadavg()[0], "device": str(dev), "dtype": str(next(model.lm.parameters()).dtype),
          "gpu": torch.cuda.get_device_name(0) if dev.type == "cuda" else None}
    header = (f"{n_rows} generated cells ({len(cells)} control cells x {len(perts)} knockouts), {args.genes} genes each, "
              f"{'cells end at EOS' if not forced else 'exactly that many'}, batch {args.batch_size}, bundled model ({model.n_parameters / 1e6:.2f}M parameters), "
              f"median of {args.repeats}, torch {torch.__version__}; the engine chose {picked} thread(s)")
    cmd = "python experiments/bench_generation.py" + (" --stop eos --name generation_speed_eos" if not forced else "")
    cmd += f" --sweep {args.sweep}" if sweep else ""
    lines = [
        "# Generation throughput and validity", "",
        f"`{cmd}` — {header}.", "",
        "| side | cells/s | tokens/s | speed-up vs generate (default threads) | vs generate (1 thread) "
        "| invalid genes / cell | duplicate genes / cell |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['side']} | {r['cells_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['speedup_vs_generate']:.2f}x "
                     f"| {r['speedup_vs_generate_1_thread']:.2f}x | {r['invalid_per_cell']:.2f} | {r['duplicate_per_cell']:.2f} |")
    sweep_rows = []
    if sweep:  # the ratio at several batch sizes, both sides at the same size
        lines += ["", "Batch size (rows per forward pass, the same on both sides; constrained engine vs `generate` "
                  f"with default threads; {args.perturbations} perturbations per cell, one timed run each after a warm-up):", "",
                  "| batch size | cells | generate cells/s | virtualcell cells/s | speed-up |", "| ---: | ---: | ---: | ---: | ---: |"]
        for b in sweep:
            sub = pool.subset(list(range(-(-b // len(perts)))))
            sub_prompts = [fmt.prefix(sub[i][: model.top_k]) + fmt.suffix(p) for i in range(len(sub)) for p in perts]
            t = {}
            for name, fn in (("generate", lambda: plain_generate(default_threads, sub_prompts, b)),
                             ("virtualcell", lambda: list(model.generate(sub, perts, config=GenerationConfig(
                                 max_genes=args.genes, min_genes=args.genes if forced else 1, batch_size=b, seed=0))))):
                fn()
                t0 = time.perf_counter()
                fn()
                t[name] = time.perf_counter() - t0
            n_b = len(sub_prompts)
            sweep_rows.append({"batch_size": b, "cells": n_b, "generate_cells_per_s": n_b / t["generate"],
                               "virtualcell_cells_per_s": n_b / t["virtualcell"], "speedup": t["generate"] / t["virtualcell"]})
            r = sweep_rows[-1]
            lines.append(f"| {b} | {n_b} | {r['generate_cells_per_s']:.1f} | {r['virtualcell_cells_per_s']:.1f} | {r['speedup']:.2f}x |")
    lines += ["", f"Machine: {hw}", ""]
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    (args.out / f"{args.name}.json").write_text(json.dumps({"config": vars(args) | {"out": str(args.out)},
                                                                "hardware": hw, "rows": rows, "sweep": sweep_rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
