"""Training throughput: virtualcell's trainer against a plain transformers loop and the machine's limit.

Issue 11 asks for at least 3x today's optimizer steps per minute at equal model size, with
the same or lower loss per step, measured against two references: the same model trained
by a plain torch/transformers loop, and the machine's floating-point limit.

Setup: the bundled model's recipe (``experiments/train_bundled_model.py``: the embedded
Papalexi screen with rep_3 held out, 100 genes per sentence, a 4-layer Llama with hidden
size 128, 16 pairs per step, lr 3e-3), the same pairs, the same initial weights and the same
learning-rate schedule on every side. Each side runs ``--steps`` optimizer steps on pairs
(no pre-training), and the sides take turns in chunks of ``--chunk`` steps so that machine
load hits all alike.

Sides:

* ``plain loop``: each pair as one sequence (control cell, perturbation, response), Hugging
  Face forward with ``labels`` (the loss on the response only), AdamW.
* ``today's recipe``: the trainer as it was before this benchmark (commit f07ce4d): plain
  sequences, logits at every position, the gene-only and no-repeat masks over
  ``batch x length x vocabulary``.
* ``virtualcell, group G, ..., compiled``: the same step with the model's layers compiled
  (``torch.compile``, as ``virtualcell train --compile on``); its one-off compile time is
  reported beside it, not inside steps/min.
* ``virtualcell, group G``: the current trainer's step (``virtualcell.training``): pairs that
  share a source cell share its prompt (encoded once; ``G`` pairs at most), logits only where
  there is a target, the same masks.

Every side runs with 1 and with 2 torch threads (``--threads``). Loss per step: the mean
training loss of the last ``--tail`` steps, and the validation loss after the last step on 400
held-out pairs, both with the masks generation applies (so that every side is judged on the
distribution it will sample from). The floating-point limit is a large matrix product timed
on this machine; "model FLOP/s" counts the multiply-adds each side's step actually runs.

    python experiments/bench_training.py               # ~15 min on 2 cores
    python experiments/bench_training.py --chunk 150 --name training_speed_sequential
    python experiments/bench_training.py --steps 20    # smoke

Interleaving (``--chunk 10``) shares out machine load fairly, but every switch between sides
costs the next side cold caches and, between 1- and 2-thread sides, a thread pool that has to
wake; the fastest sides lose most. ``--chunk`` equal to ``--steps`` runs the sides one after
another, as a real training run goes (one configuration throughout). Both are reported.

Writes ``experiments/results/training_speed.{md,json}`` (``--out``: another folder, e.g. for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def gemm_peak(threads: int, dtype: str = "fp32") -> float:
    """GFLOP/s of a 2048 x 2048 matrix product (fp32 or bf16) with ``threads`` threads (best of 5)."""
    import torch

    from virtualcell.generation import torch_threads

    with torch_threads(threads):
        dt = torch.float32 if dtype == "fp32" else torch.bfloat16
        a, b = torch.randn(2048, 2048, dtype=dt), torch.randn(2048, 2048, dtype=dt)
        a @ b
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    return 2 * 2048**3 / best / 1e9


def prepare(seed: int):  # noqa: ANN201
    """The bundled model's data and pairs, as the trainer builds them."""
    import virtualcell as vc
    from virtualcell.contract import DataContract
    from virtualcell.perturbations import parse
    from virtualcell.sentences import Vocabulary, encode
    from virtualcell.train import TrainConfig, _holdout_mask, _pair_split, build_pairs, typed_labels

    cfg = TrainConfig(top_k=100, hidden_size=128, n_layers=4, n_heads=4, lr=3e-3, batch_size=16, kind="knockout",
                      holdout={"bio_rep": ["rep_3"]}, seed=seed)
    adata = vc.datasets.load()
    contract = DataContract.from_adata(adata)
    data = adata[_holdout_mask(adata, cfg.holdout)]
    genes = Vocabulary.from_adata(data)
    sentences = encode(data, top_k=cfg.top_k, seed=seed)
    typed, pvocab = typed_labels(data, contract, genes, cfg)
    src, _ = build_pairs(data, contract, seed=seed)
    train_targets, val_targets = _pair_split(data, contract, cfg, src)
    parsed = {s: parse(s) for s in set(typed)}
    return cfg, genes, pvocab, sentences, typed, parsed, src, train_targets, val_targets


class Side:
    """One way of training: a model, an optimizer and a step function, timed per step."""

    def __init__(self, name: str, kind: str, group: int, threads: int, ctx, init_state,  # noqa: ANN001, PLR0913
                 kernels: str = "sdpa/fp32", compiled: bool = False) -> None:
        import torch

        from virtualcell.generation import torch_threads
        from virtualcell.prompts import CompactFormat
        from virtualcell.train import _new_model
        from virtualcell.training import kernels as kmod
        from virtualcell.training.batching import PairSchedule

        cfg, genes, pvocab, sentences, typed, parsed, src, train_targets, _ = ctx
        self.name, self.kind, self.group, self.threads, self.ctx = name, kind, group, threads, ctx
        self.lm, tokenizer, _ = _new_model(cfg, None, genes, pvocab)
        self.lm.load_state_dict(init_state)
        self.lm.train()
        self.fmt = CompactFormat(tokenizer, genes.genes, pvocab)
        self.opt = torch.optim.AdamW(self.lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
        self.sched = PairSchedule(train_targets, src[train_targets], batch_size=cfg.batch_size, group_size=group, seed=0)
        vocab = self.lm.get_output_embeddings().weight.shape[0]
        self.allowed = torch.zeros(vocab, dtype=torch.bool)
        self.allowed[torch.as_tensor(self.fmt.response_vocabulary())] = True
        self.step, self.seconds, self.losses, self.tokens, self.flops = 0, [], [], 0, 0.0
        self.perturbation_of = [parsed[t] for t in typed]  # each cell's typed perturbation, as the trainer has it
        self.kernels = kernels
        self.precision = "fp32"
        first = [self.sched.targets[c] for c in self.sched.groups(self.sched.at(0))]  # the batch kernels are timed on
        if kernels == "auto":
            with torch_threads(threads):
                k = kmod.choose(self.lm, torch.device("cpu"), lambda: self.loss(first, train=True)[0], threads=threads)
            self.precision, self.kernels = k.precision, f"{k.attention}/{k.precision} (auto)"
        self.compile_s = None
        if compiled:  # as the trainer compiles: its layers, the compile time spent on a probe batch
            def probe() -> None:
                with kmod.autocast(torch.device("cpu"), self.precision):
                    loss = self.loss(first, train=True)[0]
                loss.backward()

            with torch_threads(threads):
                self.compile_s = kmod.compile_layers(self.lm, probe)
            self.kernels += ", compiled"

    def groups(self, chunks):  # noqa: ANN001, ANN201
        from virtualcell.training.batching import pair_groups

        sentences, src = self.ctx[3], self.ctx[6]
        return pair_groups(self.fmt, chunks, sentences=sentences, sources=src, perturbations=self.perturbation_of)

    def loss(self, chunks, train: bool):  # noqa: ANN001, ANN201
        import torch

        from virtualcell.training.batching import pack
        from virtualcell.training.loss import response_loss, seen_before

        groups = self.groups(chunks)
        if self.kind == "trainer":
            b = pack(groups, self.fmt.pad)
            n_logits = b.seg_ids.shape[0] * int((b.targets != -100).any(0).sum())
            work = _flops(self.lm, b.prefix_ids, b.seg_ids, n_logits)
            return (*response_loss(self.lm, b, allowed=self.allowed, no_repeat=True), b.n_tokens, work)
        # plain sequences
        seqs = [(list(s) + list(o), list(r)) for s, pairs in groups for o, r in pairs]
        width = max(len(p) + len(r) for p, r in seqs)
        ids = torch.full((len(seqs), width), self.fmt.pad, dtype=torch.long)
        lab = torch.full_like(ids, -100)
        att = torch.zeros_like(ids)
        for i, (p, r) in enumerate(seqs):
            ids[i, : len(p) + len(r)] = torch.tensor(p + r)
            lab[i, len(p) : len(p) + len(r)] = torch.tensor(r)
            att[i, : len(p) + len(r)] = 1
        work = _flops(self.lm, None, ids, ids.numel())
        if self.kind == "plain" and train:
            out = self.lm(input_ids=ids, attention_mask=att, labels=lab)
            return out.loss, int((lab != -100).sum()), int(att.sum()), work
        logits = self.lm(input_ids=ids, attention_mask=att).logits[:, :-1].float()
        target = lab[:, 1:]
        valid = target != -100
        vocab = logits.shape[-1]
        logits = logits.masked_fill(~self.allowed, float("-inf"))
        logits = logits.masked_fill(seen_before(target, valid, vocab), float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab), target.reshape(-1), ignore_index=-100)
        return loss, int(valid.sum()), int(att.sum()), work

    def run(self, n: int, max_steps: int) -> None:
        import torch

        from virtualcell.training import kernels as kmod
        from virtualcell.generation import torch_threads
        from virtualcell.training.schedule import lr_at

        cfg = self.ctx[0]
        with torch_threads(self.threads):
            for _ in range(n):
                t = time.perf_counter()
                chunks = [self.sched.targets[c] for c in self.sched.groups(self.sched.at(self.step))]
                for g in self.opt.param_groups:
                    g["lr"] = lr_at(self.step, lr=cfg.lr, warmup_steps=cfg.warmup_steps, max_steps=max_steps)
                with kmod.autocast(torch.device("cpu"), self.precision):
                    loss, _, tokens, work = self.loss(chunks, train=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(self.lm.parameters(), 1.0)
                self.opt.step()
                self.opt.zero_grad(set_to_none=True)
                self.seconds.append(time.perf_counter() - t)
                self.losses.append(float(loss) if self.kind != "plain" else float("nan"))
                self.tokens += tokens
                self.flops += 3 * work  # backward ~ 2x forward
                self.step += 1

    def masked_loss(self, chunks_list) -> float:  # noqa: ANN001
        import torch

        from virtualcell.generation import torch_threads

        saved, self.kind = self.kind, "recipe"  # plain sequences with the masks: the same yardstick for every side
        total = count = 0
        self.lm.eval()
        with torch.no_grad(), torch_threads(self.threads):
            for chunks in chunks_list:
                loss, n, _, _ = self.loss(chunks, train=False)
                total += float(loss) * n
                count += n
        self.kind = saved
        self.lm.train()
        return total / count


def _flops(lm, prefix_ids, seg_ids, n_logits: int, prefix_rows=None) -> float:  # noqa: ANN001
    """Forward FLOPs (2 per multiply-add) of what a step runs on its padded tensors: linear layers per
    token, dense attention per (query, key) pair, the output head per logit."""
    c = lm.config
    d, L, V = c.hidden_size, c.num_hidden_layers, c.vocab_size
    per_token = 2 * L * (4 * d * d + 3 * d * c.intermediate_size)
    R, S = seg_ids.shape
    tokens, pairs = R * S, R * S * S
    if prefix_ids is not None:
        C, P = prefix_ids.shape
        tokens += C * P
        pairs += C * P * P + R * S * P
    return tokens * per_token + 2 * 2 * L * d * pairs + 2 * d * V * n_logits


def interleave(sides: list[Side], steps: int, chunk: int) -> None:
    """Run every side ``steps`` optimizer steps, taking turns every ``chunk`` steps, so that the machine's load
    falls on all alike."""
    done = 0
    while done < steps:
        n = min(chunk, steps - done)
        for s in sides:
            s.run(n, steps)
        done += n
        print(f"{done}/{steps} steps on every side", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--chunk", type=int, default=10)
    ap.add_argument("--tail", type=int, default=30)
    ap.add_argument("--groups", default="1,4,8")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--name", default="training_speed")
    ap.add_argument("--compiled", default="8", help="groups that also get a compiled side ('' for none)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for the results (default: experiments/results)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    import torch

    from virtualcell.train import _new_model

    ctx = prepare(args.seed)
    cfg, genes, pvocab = ctx[0], ctx[1], ctx[2]
    lm0, _, _ = _new_model(cfg, None, genes, pvocab)
    init = {k: v.clone() for k, v in lm0.state_dict().items()}
    n_params = sum(p.numel() for p in lm0.parameters())
    threads = [int(t) for t in args.threads.split(",")]
    compiled_groups = {int(x) for x in args.compiled.split(",") if x}
    sides: list[Side] = []
    for th in threads:
        sides.append(Side(f"plain transformers loop, {th} thread(s)", "plain", 1, th, ctx, init))
        sides.append(Side(f"today's recipe (f07ce4d), {th} thread(s)", "recipe", 1, th, ctx, init))
        for g in (int(x) for x in args.groups.split(",")):
            sides.append(Side(f"virtualcell, group {g}, sdpa/fp32, {th} thread(s)", "trainer", g, th, ctx, init))
            if g > 1:
                side = Side(f"virtualcell, group {g}, auto, {th} thread(s)", "trainer", g, th, ctx, init, kernels="auto")
                side.name = f"virtualcell, group {g}, {side.kernels}, {th} thread(s)"
                sides.append(side)
                if g in compiled_groups:
                    side = Side("", "trainer", g, th, ctx, init, kernels="auto", compiled=True)
                    side.name = f"virtualcell, group {g}, {side.kernels}, {th} thread(s)"
                    sides.append(side)
    peaks = {th: gemm_peak(th) for th in threads}
    peaks_bf16 = {th: gemm_peak(th, "bf16") for th in threads}
    interleave(sides, args.steps, args.chunk)
    # validation: 400 held-out pairs, 16 a batch, same for every side
    val = ctx[8][:400]
    val_chunks = [[np.array([t]) for t in val[i : i + 16]] for i in range(0, val.size, 16)]
    rows = []
    for s in sides:
        per_step = statistics.median(s.seconds[3:])
        total = sum(s.seconds)
        rows.append({
            "side": s.name, "threads": s.threads, "group": s.group if s.kind == "trainer" else None,
            "steps_per_min": 60 / per_step, "tokens_per_s": s.tokens / total,
            "model_gflops": s.flops / total / 1e9, "peak_gflops": peaks[s.threads],
            "peak_gflops_bf16": peaks_bf16[s.threads], "precision": s.precision, "compile_s": s.compile_s,
            "train_loss_tail": float(np.nanmean(s.losses[-args.tail:])) if s.kind != "plain" else None,
            "val_loss_masked": s.masked_loss(val_chunks),
        })
    # the reference: today's recipe at the fewest threads this run measured (1 unless --threads leaves it out)
    ref = next(r for r in rows if r["side"].startswith("today's recipe") and r["threads"] == min(threads))
    for r in rows:
        r["x_today_1_thread"] = r["steps_per_min"] / ref["steps_per_min"]
    meta = {"steps": args.steps, "batch_pairs": cfg.batch_size, "parameters": n_params, "seed": args.seed,
            "machine": f"{platform.machine()} {platform.processor()} python {platform.python_version()} torch {torch.__version__}",
            "command": "python experiments/bench_training.py " + " ".join(sys.argv[1:])}
    lines = [
        "# Training throughput (issue 11)", "",
        f"`{meta['command'].strip()}` — the bundled model's recipe ({n_params:,} parameters, {cfg.batch_size} pairs a "
        f"step, 100 genes a sentence), {args.steps} steps per side from the same weights, sides interleaved every "
        f"{args.chunk} steps. Machine: {meta['machine']}.", "",
        f"| side | steps/min | x today ({min(threads)} thread{'s' if min(threads) > 1 else ''}) | tokens read/s | model GFLOP/s | GEMM limit GFLOP/s (fp32 / bf16) | train loss, last "
        f"{args.tail} | val loss (masked) | compile s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        tl = "—" if r["train_loss_tail"] is None else f"{r['train_loss_tail']:.3f}"
        lines.append(f"| {r['side']} | {r['steps_per_min']:.0f} | {r['x_today_1_thread']:.2f}x | {r['tokens_per_s']:,.0f} | "
                     f"{r['model_gflops']:.1f} | {r['peak_gflops']:.0f} / {r['peak_gflops_bf16']:.0f} | {tl} | {r['val_loss_masked']:.3f} | "
                     f"{'—' if r['compile_s'] is None else format(r['compile_s'], '.0f')} |")
    lines += ["", "The plain loop's training loss is unmasked (Hugging Face's own), so only its masked validation loss "
              "is comparable. Tokens read: prompt and response tokens each side's model reads (shared prompts count "
              "once). Model GFLOP/s: the FLOPs of each side's own padded tensors (linear layers, dense attention, "
              "output head; backward counted as 2x forward) per second, against the matrix-product limit of the "
              "precision it runs in. `auto`: the trainer's own measured choice of attention kernel and precision "
              "(`virtualcell.training.kernels`). `compiled`: its layers compiled as `virtualcell train --compile on` "
              "does (`kernels.compile_layers`); compile s: the one-off compile time, outside steps/min (the first "
              "compiled side pays the cold compile, later ones find the inductor cache warm)."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
