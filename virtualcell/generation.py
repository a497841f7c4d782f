"""Fast, constrained, reproducible generation of cell sentences.

The engine generates one cell sentence for every (baseline cell, perturbation) pair:

* **Prefix sharing.** A cell's prompt prefix is run through the model once for all of its
  perturbation suffixes (compact format: ``<bos> cell <sep>`` + ``perturbation <out>``).
* **Shared-prefix attention.** The prefix keys/values then stay one copy per cell: each
  decode step attends to them with one matrix product per cell and to each row's own
  tokens separately (:mod:`virtualcell.shared_prefix`). Used where a check, once per model,
  finds the logits equal to the plain path of repeating the prefix cache for every row
  (``GenerationConfig.prefix_attention``).
* **KV cache and batching.** Every step feeds one token per row; finished rows are
  dropped from the batch once a quarter of it has finished.
* **Constrained decoding.** Every generated cell holds only real, distinct genes, and
  at most ``max_genes`` of them (or fewer, ending at EOS). Gene-level tokenizers use a
  vectorized mask; tokenizers where a gene spans several tokens (BPE, SentencePiece)
  use a trie over the genes' token sequences.
* **Preallocated cache.** Each row's keys/values are written into a buffer sized for
  the whole sentence, instead of being copied by ``torch.cat`` at every step.
* **Thread choice on CPU.** Decode steps of small models are tiny matrix products, for
  which extra BLAS threads can cost more than they give (measured: 2 threads 4x slower
  than 1 for a 128-wide model on 2 cores). With ``threads=None`` the engine times one
  decode-shaped forward pass with 1 and with all threads and keeps the faster, restoring
  the process setting afterwards.
* **Seeded, batch-independent sampling.** Each step draws one uniform per row, hashed from
  (seed, cell key, perturbation key, step), and inverts the CDF of the (masked, tempered)
  softmax: the same seed gives the same cells whatever the batch size, chunking or
  process split.

Only this module, :mod:`virtualcell.shared_prefix` and :mod:`virtualcell.model` import torch.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import weakref
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from . import target_offsets, token_bias
from .errors import DataError, VirtualCellWarning, user_stacklevel

__all__ = ["GenerationConfig", "GeneConstraint", "TrieConstraint", "Component", "generate_grid", "stable_key",
           "torch_threads"]


@dataclass(frozen=True)
class Component:
    """One condition a row's next-token logits are mixed from (:func:`generate_grid`'s ``components``): the
    prompt suffix it reads, its weight in the sum of logits, the ``(gene token, kind index)`` pairs whose
    target offsets it adds, and a bias over the vocabulary (or ``None``)."""

    tokens: tuple[int, ...]
    weight: float = 1.0
    targets: tuple[tuple[int, int], ...] = ()
    bias: Any = None

_MASK = (1 << 63) - 1


def stable_key(text: str) -> int:
    """A stable 31-bit key for a string (the same in every process and run)."""
    return zlib.crc32(text.encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class GenerationConfig:
    """How to sample. ``max_genes`` caps each generated cell; ``min_genes`` forbids an
    earlier EOS. ``batch_size`` is the number of (cell, perturbation) rows per forward.
    ``prefix_attention``: ``"auto"`` (shared-prefix attention where it is checked to give the
    plain path's logits for the model), ``"shared"`` (require it) or ``"repeat"`` (the plain
    path: each cell's prefix cache repeated for each of its rows).

    ``guidance`` (classifier-free guidance, 1 = none): each row is decoded beside a twin that
    reads the same cell and tokens under the generic condition, and tokens are sampled from
    ``generic + guidance * (specific - generic)`` logits, which scales up what the model
    predicts specifically for this perturbation. Needs a model trained with a generic
    condition (``TrainConfig.generic_fraction``).

    ``coexpression_prior``: a genetic perturbation the model never trained on, of one of its genes,
    gets the served ``coexpression`` baseline's shift (how the genes move with that gene in the
    training cells, :meth:`virtualcell.validation.Baselines.coexpression_shift`) added to every gene's
    logit at every step, in the baseline's log1p units (a logit is a log weight; its own gene is
    left to the target offsets). It is part of the specific condition, so guidance scales it with the rest:
    ``generic + guidance * (specific + prior - generic)``, the prior at ``guidance`` times its size (the verdict
    chooses the two together). Gene-level models with shared prompts only; ``False``: the model alone.

    ``compose``: a combination the model never trained on as such (``ko:A + ko:B``) is decoded from the
    logits of its parts, each read beside the others under the control: ``control + sum(part - control)``,
    one token sampled from that sum at every step (a product of the parts' next-gene distributions over the
    control's; with guidance, each part is guided against the generic condition); gene-level models with shared
    prompts only. Off by default: on protocol 2's held-out pairs it scored below the prompt naming both at all six
    runs, also for models trained on singles only, which never read such a prompt
    (``experiments/results/attempts/compose_pairs/``)."""

    max_genes: int = 200
    min_genes: int = 1
    temperature: float = 1.0
    constrain: bool = True
    batch_size: int = 512
    seed: int = 0
    threads: int | None = None
    prefix_attention: str = "auto"
    guidance: float = 1.0
    coexpression_prior: bool = True
    compose: bool = False

    def __post_init__(self) -> None:
        if not (self.guidance >= 0 and math.isfinite(self.guidance)):  # (inf and NaN sampled nothing: no effect)
            raise DataError(f"guidance must be a number >= 0 (1 = none), got {self.guidance}.")
        if self.prefix_attention not in ("auto", "shared", "repeat"):
            raise DataError(f"prefix_attention must be 'auto', 'shared' or 'repeat', got {self.prefix_attention!r}.")
        if self.max_genes < 1 or self.min_genes < 0 or self.min_genes > self.max_genes:
            raise DataError(f"Need 0 <= min_genes <= max_genes and max_genes >= 1, got {self.min_genes}, {self.max_genes}.")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise DataError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature}.")
        if self.batch_size < 1:
            raise DataError("batch_size must be >= 1.")
        if self.threads is not None and self.threads < 1:
            raise DataError("threads must be >= 1, or None to let the engine choose on CPU.")


# --------------------------------------------------------------------------- #
# Hashed Gumbel noise
# --------------------------------------------------------------------------- #
def _lshr(x: torch.Tensor, n: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts are arithmetic)."""
    return (x >> n) & ((1 << (64 - n)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _lshr(x, 30)) * -4658895280553007687  # 0xBF58476D1CE4E5B9 as int64
    x = (x ^ _lshr(x, 27)) * -7723592293110705685  # 0x94D049BB133111EB
    return x ^ _lshr(x, 31)


def _uniform(row_keys: torch.Tensor, step: int) -> torch.Tensor:
    """(rows,) uniforms in [0, 1), a pure function of (row key, step)."""
    h = _mix(_mix(row_keys * 1000003 + step) ^ -7046029254386353131)  # 0x9E3779B97F4A7C15
    return _lshr(h, 40).to(torch.float32) / float(1 << 24)


def _sample(logits: torch.Tensor, row_keys: torch.Tensor, step: int, temperature: float) -> torch.Tensor:
    """One token per row: inverse-CDF sampling with a hashed uniform per (row, step).

    Needs one hashed number per row instead of one per vocabulary entry (the Gumbel-max
    trick's), and is just as independent of batch composition. A token whose probability
    is 0 (masked out) is never returned.
    """
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(-1)
    target = _uniform(row_keys, step) * cdf[:, -1]
    idx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1).clamp_(max=probs.shape[1] - 1)
    bad = probs.gather(1, idx[:, None]).squeeze(1) <= 0  # rounding at the top end of the CDF
    if bool(bad.any()):
        last = torch.where(probs[bad] > 0, torch.arange(probs.shape[1], device=probs.device), -1).amax(-1)
        idx[bad] = last.clamp(min=0)
    return idx


# --------------------------------------------------------------------------- #
# Constraints
# --------------------------------------------------------------------------- #
class GeneConstraint:
    """One token per gene: allowed next tokens are the genes not yet written, plus EOS."""

    def __init__(self, gene_token_ids: Sequence[int], eos_id: int, vocab_size: int) -> None:
        self.gene_tokens = torch.as_tensor(np.asarray(gene_token_ids, dtype=np.int64))
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)

    def start(self, rows: int, device: torch.device) -> dict:
        allowed = torch.zeros(rows, self.vocab_size, dtype=torch.bool, device=device)
        allowed[:, self.gene_tokens.to(device)] = True
        return {"allowed": allowed, "n": torch.zeros(rows, dtype=torch.int64, device=device)}

    def mask(self, state: dict, logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
        allowed = state["allowed"].clone()
        # EOS once min_genes are written, or where no gene is left to write (min_genes above the genes there are)
        allowed[:, self.eos_id] = (state["n"] >= cfg.min_genes) | ~allowed.any(-1)
        full = state["n"] >= cfg.max_genes
        if full.any():
            allowed[full] = False
            allowed[full, self.eos_id] = True
        return logits.masked_fill(~allowed, float("-inf"))

    def update(self, state: dict, tokens: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
        """Record the sampled tokens; return which rows finished."""
        rows = torch.arange(tokens.shape[0], device=tokens.device)
        state["allowed"][rows, tokens] = False
        done = tokens == self.eos_id
        state["n"] += (~done).long()
        return done | (state["n"] >= cfg.max_genes)

    def select(self, state: dict, keep: torch.Tensor) -> dict:
        return {k: v[keep] for k, v in state.items()}


class TrieConstraint:
    """Genes that span several tokens: a trie over each gene's token sequence.

    ``paths``: each gene's tokens as it appears inside a sentence
    (:func:`virtualcell.prompts.in_sentence_tokens`, as responses are written). Inside a
    gene only its continuations are allowed; at a gene boundary, the first token of
    any gene not yet written, or EOS. A gene is written once.
    """

    def __init__(self, paths: Sequence[Sequence[int]], genes: Sequence[str], eos_id: int, vocab_size: int) -> None:
        self.eos_id = int(eos_id)
        self.vocab_size = int(vocab_size)
        self.children: list[dict[int, int]] = [{}]
        self.gene_at: list[int] = [-1]
        self.paths: list[list[int]] = []
        for g, toks in enumerate(paths):
            if not toks:
                raise ValueError(f"Gene {genes[g]!r} tokenizes to nothing.")
            node, path = 0, []
            for t in toks:
                nxt = self.children[node].get(t)
                if nxt is None:
                    nxt = len(self.children)
                    self.children[node][t] = nxt
                    self.children.append({})
                    self.gene_at.append(-1)
                node = nxt
                path.append(node)
            if self.gene_at[node] != -1:
                raise ValueError(f"Genes {genes[self.gene_at[node]]!r} and {genes[g]!r} tokenize identically.")
            self.gene_at[node] = g
            self.paths.append(path)
        size = np.zeros(len(self.children), dtype=np.int64)
        for path in self.paths:
            size[path] += 1
        self.size = size
        self.root_tokens = torch.tensor(sorted(self.children[0]), dtype=torch.int64)
        self.root_child = {t: c for t, c in self.children[0].items()}
        self.root_token_of = {c: t for t, c in self.children[0].items()}

    def start(self, rows: int, device: torch.device) -> dict:
        return {"rows": [{"node": 0, "removed": {}, "n": 0, "exhausted": set(), "genes": set()} for _ in range(rows)]}

    def _available(self, row: dict, node: int) -> list[int]:
        rem = row["removed"]
        return [t for t, c in self.children[node].items() if self.size[c] - rem.get(c, 0) > 0]

    def _pending(self, row: dict) -> int:
        """The gene that ends at the row's node and is not yet written, or -1."""
        node = row["node"]
        g = self.gene_at[node] if node != 0 else -1
        return g if g >= 0 and g not in row["genes"] else -1

    def mask(self, state: dict, logits: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
        allowed = torch.zeros_like(logits, dtype=torch.bool)
        root = self.root_tokens.to(logits.device)
        for r, row in enumerate(state["rows"]):
            node = row["node"]
            pending = self._pending(row)
            # a gene boundary: at the root, or where a gene not yet written ends (a node whose
            # gene was written already must continue into a longer gene)
            at_boundary = node == 0 or pending >= 0
            n_done = row["n"] + (1 if pending >= 0 else 0)
            if node != 0:
                avail = self._available(row, node)
                if avail:
                    allowed[r, avail] = True
            if at_boundary:
                if n_done < cfg.max_genes:
                    allowed[r, root] = True
                    excluded = set(row["exhausted"])
                    if pending >= 0:  # the pending gene counts as written for the next one
                        first = self.paths[pending][0]
                        if self.size[first] - row["removed"].get(first, 0) - 1 <= 0:
                            excluded.add(self.root_token_of[first])
                    if excluded:
                        allowed[r, list(excluded)] = False
                if n_done >= cfg.min_genes:
                    allowed[r, self.eos_id] = True
            if not allowed[r].any():  # nothing left to write
                allowed[r, self.eos_id] = True
        return logits.masked_fill(~allowed, float("-inf"))

    def _finish_gene(self, row: dict) -> None:
        g = self.gene_at[row["node"]]
        row["genes"].add(g)
        rem = row["removed"]
        for c in self.paths[g]:
            rem[c] = rem.get(c, 0) + 1
        first = self.paths[g][0]
        if self.size[first] - rem[first] <= 0:
            row["exhausted"].add(self.root_token_of[first])
        row["n"] += 1
        row["node"] = 0

    def update(self, state: dict, tokens: torch.Tensor, cfg: GenerationConfig) -> torch.Tensor:
        done = torch.zeros(tokens.shape[0], dtype=torch.bool)
        for r, t in enumerate(tokens.tolist()):
            row = state["rows"][r]
            node = row["node"]
            if t == self.eos_id:
                if self._pending(row) >= 0:
                    self._finish_gene(row)
                done[r] = True
                continue
            child = self.children[node].get(t) if node != 0 else None
            if child is not None and self.size[child] - row["removed"].get(child, 0) > 0:
                row["node"] = child
            else:  # a new gene starts
                if self._pending(row) >= 0:
                    self._finish_gene(row)
                row["node"] = self.root_child[t]
        return done.to(tokens.device)

    def select(self, state: dict, keep: torch.Tensor) -> dict:
        return {"rows": [state["rows"][i] for i in keep.tolist()]}


# --------------------------------------------------------------------------- #
# The engine
# --------------------------------------------------------------------------- #
def _cache_kwarg(model) -> str:  # noqa: ANN001
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out):  # noqa: ANN001, ANN202
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _preallocate(cache, extra: int) -> None:  # noqa: ANN001
    """Give every plain (non-sliding) cache layer room for ``extra`` more positions."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        return
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover - older transformers: keep the growing cache
        return
    for layer in layers:
        if type(layer) is DynamicLayer and getattr(layer, "is_initialized", False) and layer.keys.numel():
            _preallocated_layer_class().adopt(layer, extra)


@functools.cache
def _preallocated_layer_class():  # noqa: ANN202
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        """A ``DynamicLayer`` whose keys/values are views into a buffer with spare room."""

        @classmethod
        def adopt(cls, layer, extra: int) -> None:  # noqa: ANN001
            """Turn a filled ``DynamicLayer`` into one with room for ``extra`` more positions."""
            b, h, n, d = layer.keys.shape
            kbuf = layer.keys.new_empty((b, h, n + extra, d))
            vbuf = layer.values.new_empty((b, h, n + extra, layer.values.shape[-1]))
            kbuf[:, :, :n] = layer.keys
            vbuf[:, :, :n] = layer.values
            layer.__class__ = cls
            layer._set(kbuf, vbuf, n)

        @classmethod
        def empty(cls, rows: int, heads: int, dk: int, dv: int, capacity: int, dtype: torch.dtype,  # noqa: PLR0913
                  device: torch.device):  # noqa: ANN206
            """A layer holding nothing yet, with room for ``capacity`` positions."""
            layer = cls()
            layer.is_initialized, layer.dtype, layer.device = True, dtype, device
            layer._set(torch.empty((rows, heads, capacity, dk), dtype=dtype, device=device),
                       torch.empty((rows, heads, capacity, dv), dtype=dtype, device=device), 0)
            return layer

        def _set(self, kbuf: torch.Tensor, vbuf: torch.Tensor, n: int) -> None:
            self._kbuf, self._vbuf, self._n = kbuf, vbuf, n
            self.keys, self.values = kbuf[:, :, :n], vbuf[:, :, :n]

        def update(self, key_states, value_states, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN201
            n, m = self._n, key_states.shape[-2]
            if n + m > self._kbuf.shape[-2]:  # out of room: double (rare; the engine sizes it for the sentence)
                room = max(n + m, 2 * self._kbuf.shape[-2])
                grow = lambda buf: torch.cat([buf[:, :, :n], buf.new_empty((*buf.shape[:2], room - n, buf.shape[-1]))], dim=2)  # noqa: E731
                self._kbuf, self._vbuf = grow(self._kbuf), grow(self._vbuf)
            self._kbuf[:, :, n : n + m] = key_states
            self._vbuf[:, :, n : n + m] = value_states
            self._set(self._kbuf, self._vbuf, n + m)
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self._n

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            self._set(self._kbuf[indices], self._vbuf[indices], self._n)

        def batch_repeat_interleave(self, repeats: int) -> None:
            self._set(self._kbuf.repeat_interleave(repeats, dim=0), self._vbuf.repeat_interleave(repeats, dim=0), self._n)

    return PreallocatedLayer


# model -> {(batch rows, thread count): choice}; weak keys, so a new model never inherits a dead one's entry
_THREAD_CHOICE: weakref.WeakKeyDictionary[Any, dict[tuple[int, int], int | None]] = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (``None``: leave the setting alone); the previous
    setting is restored on every exit path."""
    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Hold numpy's and scipy's BLAS / OpenMP pools to ``n`` threads in the block (``None``: leave them alone).

    ``OMP_NUM_THREADS`` is read when a BLAS library loads, so a run that sets its thread count after importing
    numpy kept OpenBLAS on every core: two runs held to 1 torch thread each on a 2-core machine then busy-waited
    on each other's BLAS threads, and a gene map's SVDs before training took minutes instead of seconds (session
    43: protocol 1's set-up grew from ~20 s to 266-415 s). ``threadpoolctl`` (a scikit-learn dependency) sets the
    loaded pools themselves; without it nothing changes."""
    if not n:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - installed with scikit-learn
        yield
        return
    with threadpool_limits(limits=int(n)):
        yield


def _iterate_with_threads(items: Iterator[Any], n: int | None, lock: Any = None) -> Iterator[Any]:
    """Iterate ``items`` with ``n`` torch threads while it computes, and the caller's own setting
    while the caller runs between items (a generator must not leave a process setting changed); ``lock`` (the
    model's :func:`~virtualcell.shared_prefix.model_lock`) held while it computes, not while the caller runs (a
    generator left unfinished holds nothing)."""
    while True:
        with lock if lock is not None else contextlib.nullcontext(), torch_threads(n):
            try:
                item = next(items)
            except StopIteration:
                return
        yield item


def _pick_threads(model, rows: int, device: torch.device, vocab_token: int) -> int | None:  # noqa: ANN001
    """On CPU, the faster of 1 thread and all threads for a decode-shaped forward pass: torch's thread count, at
    most the cores this process may run on (:func:`~virtualcell.training.kernels.usable_cores`, as training times
    them: under ``taskset -c 0`` or a one-core Slurm cpuset, two threads busy-waited on one core).

    Measured once per (model, batch rows, thread count) in a process and remembered, so a
    simulation that calls the engine chunk after chunk pays for it once and keeps one choice.
    """
    if device.type != "cpu":
        return None
    from .training.kernels import usable_cores

    most = min(torch.get_num_threads(), usable_cores())
    if most <= 1:
        return 1 if torch.get_num_threads() > 1 else None
    known = _THREAD_CHOICE.setdefault(model, {})
    if (rows, most) in known:
        return known[(rows, most)]
    import time

    x = torch.full((rows, 1), vocab_token, dtype=torch.long, device=device)
    times: dict[int, list[float]] = {1: [], most: []}
    for _ in range(5):
        for n in (1, most):
            with torch_threads(n):
                t0 = time.perf_counter()
                model(input_ids=x, use_cache=False)
                times[n].append(time.perf_counter() - t0)
    choice = 1 if np.median(times[1]) < np.median(times[most]) else most
    known[(rows, most)] = choice
    return choice


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on an accelerator; None where the engine does not limit rows (CPU, MPS)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return None


def _rows_that_fit(model, device: torch.device, tokens: int) -> int | None:  # noqa: ANN001
    """Rows whose key/value caches (``tokens`` positions) and logits fit in half the free memory."""
    free = _free_memory(device)
    if free is None:
        return None
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        vocab = int(cfg.vocab_size)
    except (AttributeError, TypeError, ValueError):
        return None  # an architecture whose sizes are named differently: no limit
    width = next(model.parameters()).element_size()
    per_row = layers * 2 * heads * head_dim * width * tokens + 4 * vocab * 4  # cache + logits, probs, cdf, mask
    return max(1, int(0.5 * free) // per_row)


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max((len(s) for s in seqs), default=0)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s) :] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s) :] = 1
    return ids, mask


def position_limit(model) -> int | None:  # noqa: ANN001
    """The most positions ``model`` was built for (``max_position_embeddings``, GPT-2's ``n_positions``), or None."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_positions(model, total: int, *, prompt: int, what: str) -> None:  # noqa: ANN001
    """Refuse sequences of ``total`` positions (``prompt`` of them the prompt) longer than ``model`` was built for:
    a model with learned positions (GPT-2) fails inside its embedding, one with rotary positions (Llama, Gemma,
    Pythia) reads positions it never trained on without a word."""
    limit = position_limit(model)
    if limit is not None and total > limit:
        from .errors import ModelError

        fix = (f"Use fewer genes a cell: a smaller max_genes (--max-genes), whose tokens must fit the {limit - prompt} "
               "positions left after the prompt" if prompt < limit else
               "The prompt alone (the cell's top_k genes, set in training) does not fit: train with a smaller --top-k")
        raise ModelError(
            f"The {what} needs sequences of up to {total} tokens ({prompt} of prompt, {total - prompt} generated or "
            f"answered), past the {limit} positions the model was built for. {fix}, or use a base model with a "
            "longer context.")


@torch.inference_mode()
def generate_grid(
    model,  # noqa: ANN001
    prefixes: Sequence[Sequence[int]],
    suffixes: Sequence[Sequence[int]],
    *,
    cell_keys: Sequence[int],
    suffix_keys: Sequence[int],
    constraint: GeneConstraint | TrieConstraint | None,
    eos_id: int,
    pad_id: int,
    config: GenerationConfig,
    max_new_tokens: int | None = None,
    guide_suffixes: Sequence[Sequence[int]] | None = None,
    suffix_targets: Sequence[Sequence[tuple[int, int]]] | None = None,
    suffix_bias: Sequence[np.ndarray | None] | None = None,
    components: Sequence[Sequence[Component] | None] | None = None,
) -> Iterator[tuple[int, int, list[int]]]:
    """Generate for every (prefix, suffix) pair; yields ``(prefix index, suffix index, tokens)``.

    ``guide_suffixes[j]`` is suffix ``j``'s counterpart under the generic condition, needed
    when ``config.guidance != 1`` (a suffix that is its own counterpart is not guided).
    ``suffix_targets[j]`` lists the ``(gene token, kind index)`` pairs that suffix ``j`` perturbs
    (:meth:`~virtualcell.prompts.PromptFormat.named_targets`): the model's target offsets
    (:mod:`virtualcell.target_offsets`) are added to those genes' logits at every step of suffix ``j``'s
    rows, as the training loss adds them; its generic twin gets none, so guidance scales them as part
    of what the perturbation does. Ignored for a model without offsets.
    ``suffix_bias[j]`` (a vector over the vocabulary, or ``None``) is added to the logits of suffix
    ``j``'s rows at every step, its twin's excepted (the coexpression prior, ``C2SModel.generate``).
    ``components[j]`` (optional; ``None``: suffix ``j`` as above) decodes suffix ``j`` as a weighted sum of the
    logits of several conditions read beside one another (:class:`Component`; e.g. a combination composed from
    its parts and the control), and then stands for the guidance, targets and bias above for that suffix; every
    component row writes the
    token sampled from the sum, so they move in lockstep. Guidance is the case ``[(specific, w), (generic, 1 - w)]``.

    Prefixes are computed once per chunk of cells and shared by all suffixes. Memory is
    bounded by ``config.batch_size`` rows at a time; on a GPU, fewer if the rows' caches
    would not fit in the free memory (with a warning; the cells are the same either way,
    since sampling does not depend on the batch).
    """
    device = next(model.parameters()).device
    if config.guidance == 1.0:
        guide_suffixes = None
    elif guide_suffixes is None:
        raise ValueError(f"guidance={config.guidance} needs a model trained with a generic condition (and a prompt "
                         "format that shares the cell's prefix); use guidance=1, or retrain with generic_fraction > 0.")
    elif len(guide_suffixes) != len(suffixes):
        raise ValueError("guide_suffixes must have one entry per suffix.")
    if suffix_targets is not None and len(suffix_targets) != len(suffixes):
        raise ValueError("suffix_targets must have one entry per suffix.")
    if target_offsets.of(model) is None:
        suffix_targets = None
    if suffix_bias is not None and len(suffix_bias) != len(suffixes):
        raise ValueError("suffix_bias must have one entry per suffix.")
    if suffix_bias is not None and all(b is None for b in suffix_bias):
        suffix_bias = None
    if components is not None and len(components) != len(suffixes):
        raise ValueError("components must have one entry per suffix.")
    comps = _components(suffixes, guide_suffixes, config.guidance, suffix_targets, suffix_bias, components)
    steps = max_new_tokens or (config.max_genes + 1)
    longest = (max((len(p) for p in prefixes), default=0) + max((len(c.tokens) for cs in comps for c in cs), default=0)
               + steps + 1)
    # the prompt, then the tokens the model reads back: all but the last of at most steps - 1 (EOS is never read)
    prompt_len = longest - steps - 1
    check_positions(model, prompt_len + max(steps - 2, 0), prompt=prompt_len, what="generation")
    cap = _rows_that_fit(model, device, longest)
    if cap is not None and cap < config.batch_size:
        import dataclasses
        import warnings

        warnings.warn(f"{config.batch_size} rows per forward pass would need more GPU memory than is free for "
                      f"sentences of up to {longest} tokens; using {cap} rows (pass a smaller batch_size to "
                      "silence this).", VirtualCellWarning, stacklevel=user_stacklevel())
        config = dataclasses.replace(config, batch_size=cap)
    from .shared_prefix import model_lock

    # every forward pass on the model under its lock: another thread's shared-prefix attention switches the config
    # they all read (two threads generating with one loaded model)
    lock = model_lock(model)
    threads = config.threads
    if threads is None:
        rows = min(config.batch_size, max(1, len(prefixes) * len(suffixes)))
        with lock:
            threads = _pick_threads(model, rows, device, pad_id)
    grid = _grid(model, prefixes, comps, cell_keys, suffix_keys, constraint, eos_id, pad_id, config, steps, device,
                 use_offsets=suffix_targets is not None or components is not None)
    yield from _iterate_with_threads(grid, threads, lock)


def _components(suffixes, guide_suffixes, guidance, suffix_targets, suffix_bias, components  # noqa: ANN001, ANN202
                ) -> list[list[Component]]:
    """Each suffix's components: as given, else (no ``components``, or ``None`` for that suffix) the suffix alone,
    with its targets and bias, and, guided, its generic counterpart (``1 - guidance`` of it, without either)."""
    out = []
    for j, tokens in enumerate(suffixes):
        if components is not None and components[j] is not None:
            out.append(list(components[j]))
            continue
        own = Component(tuple(tokens), guidance if guide_suffixes is not None else 1.0,
                        tuple(suffix_targets[j]) if suffix_targets is not None else (),
                        None if suffix_bias is None else suffix_bias[j])
        out.append([own] if guide_suffixes is None else [own, Component(tuple(guide_suffixes[j]), 1.0 - guidance)])
    return out


def _grid(model, prefixes, comps, cell_keys, suffix_keys, constraint, eos_id, pad_id, config,  # noqa: ANN001, ANN202, PLR0913
          steps, device, use_offsets=True):
    kw = _cache_kwarg(model)
    param, near = target_offsets.of(model), target_offsets.neighbours(model)  # the model's offsets, if any
    table = token_bias.of(model)
    table = None if table is None else (table[0].detach(), table[1])
    if not use_offsets:
        param = None
    n_suffix = len(comps)
    vocab = next((np.shape(c.bias)[0] for cs in comps for c in cs if c.bias is not None), None)
    zero_bias = None if vocab is None else torch.zeros(vocab, dtype=torch.float32, device=device)
    # several rows a suffix (its components) are decoded side by side and mixed; a plain suffix has one, weight 1
    mixed = any(len(cs) > 1 or cs[0].weight != 1.0 for cs in comps)
    width = max(len(cs) for cs in comps) if comps else 1
    per_group = max(1, min(n_suffix, config.batch_size // width))
    cells_per_chunk = max(1, config.batch_size // per_group)
    s_longest = max((len(c.tokens) for cs in comps for c in cs), default=0)
    for c0 in range(0, len(prefixes), cells_per_chunk):
        cells = list(range(c0, min(c0 + cells_per_chunk, len(prefixes))))
        p_ids, p_mask = _left_pad([prefixes[i] for i in cells], pad_id)
        p_ids, p_mask = p_ids.to(device), p_mask.to(device)
        p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
        prefix_cache = _cache_of(out)
        prefix_last_logits = out.logits[:, -1, :]
        shared = _use_shared_prefix(model, config, p_ids.shape[1] + s_longest + steps + 1, pad_id, device)
        for s0 in range(0, n_suffix, per_group):
            group = list(range(s0, min(s0 + per_group, n_suffix)))
            # each cell's rows: every component of each of the group's suffixes, (suffix, component)
            row_kinds = [(j, k) for j in group for k in range(len(comps[j]))]
            g = len(row_kinds)
            tokens_of = [list(comps[j][k].tokens) for j, k in row_kinds]
            capacity = max(len(t) for t in tokens_of) + steps + 1
            _refuse_padding_in_window(model, p_ids.shape[1] + capacity, tokens_of)
            if shared:
                decoder = _SharedPrefixDecoder(model, kw, prefix_cache, p_mask, g, capacity)
            else:
                decoder = _RepeatedPrefixDecoder(model, kw, prefix_cache, p_mask, g, capacity)
            last_pos = p_pos[:, -1].repeat_interleave(g, dim=0)
            rows_cell = [cells[i // g] for i in range(len(cells) * g)]
            rows_suffix = [row_kinds[i % g][0] for i in range(len(cells) * g)]
            rows_comp = [comps[j][k] for j, k in (row_kinds[i % g] for i in range(len(cells) * g))]
            s_ids, s_mask = _left_pad([tokens_of[i % g] for i in range(len(cells) * g)], pad_id)
            if s_ids.shape[1] > 0:
                s_ids, s_mask = s_ids.to(device), s_mask.to(device)
                s_pos = last_pos[:, None] + s_mask.cumsum(1)
                logits = decoder.forward(s_ids, s_pos, s_mask)
                last_pos = s_pos[:, -1]
            else:
                logits = prefix_last_logits.repeat_interleave(g, dim=0).float()
            keys = torch.tensor(  # every component row of a suffix samples with its suffix's key
                [(config.seed * 1_000_003 + cell_keys[c] * 7919 + suffix_keys[s]) & _MASK
                 for c, s in zip(rows_cell, rows_suffix)],
                dtype=torch.int64,
                device=device,
            )
            mix = None
            if mixed:  # rows of one (cell, suffix) share an owner; their logits are summed with the weights
                owner = torch.tensor([i // g * len(group) + group.index(rows_suffix[i]) for i in range(len(rows_cell))],
                                     dtype=torch.long, device=device)
                weight = torch.tensor([c.weight for c in rows_comp], dtype=torch.float32, device=device)
                mix = (owner, weight)
            main = [row_kinds[i % g][1] == 0 for i in range(len(rows_cell))]  # the row that is yielded
            named = None if param is None else target_offsets.row_tensors([list(c.targets) for c in rows_comp], device)
            offsets = None if named is None else (param, named, near)
            bias = None
            if zero_bias is not None:
                bias = torch.stack([zero_bias if c.bias is None else
                                    torch.as_tensor(np.asarray(c.bias, dtype=np.float32), device=device)
                                    for c in rows_comp])
            if table is not None:  # each row's tokens' learned biases (virtualcell.token_bias), as the loss adds them
                own = token_bias.bias(table, token_bias.row_tokens(tokens_of, device)).float().repeat(len(cells), 1)
                bias = own if bias is None else bias + own
            for c, s, toks in _sample_loop(decoder, last_pos, logits, keys, rows_cell, rows_suffix, constraint, eos_id,
                                           config, steps, device, mix, offsets, bias, main):
                yield c, s, toks


def _refuse_padding_in_window(model, total: int, suffixes: list[list[int]]) -> None:  # noqa: ANN001
    """Suffixes of several lengths are left-padded between the cell's prefix and them; past a sliding window those pad
    positions take the places of real tokens, so a shorter suffix's row sees less of its cell than a plain forward
    pass would (0.2-0.4 in log-probability on a Gemma-2 with an 8-token window). Refused rather than sampled."""
    from .shared_prefix import window_below

    window = window_below(model, total)
    if window is not None and len({len(t) for t in suffixes}) > 1:
        raise ValueError(
            f"A model with a sliding window of {window} tokens cannot read prompts of {total} positions with "
            "perturbation suffixes of several lengths (a shorter one would see less of its cell). Use a text prompt "
            "format (prompt_format='c2s'), fewer genes per sentence (top_k, max_genes), or a model without a sliding "
            "window.")


class _RepeatedPrefixDecoder:
    """The plain path: the prefix cache repeated for every row of its cell."""

    def __init__(self, model, kw, prefix_cache, p_mask, g, capacity):  # noqa: ANN001, PLR0913
        self.model, self.kw = model, kw
        self.cache = copy.deepcopy(prefix_cache)
        self.cache.batch_repeat_interleave(g)
        _preallocate(self.cache, capacity)
        self.mask = p_mask.repeat_interleave(g, dim=0)

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, new_mask: torch.Tensor | None = None) -> torch.Tensor:
        if new_mask is None:
            new_mask = torch.ones_like(ids)
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=pos, use_cache=True, **{self.kw: self.cache})
        self.cache = _cache_of(out)
        return out.logits[:, -1, :].float()

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.mask = self.mask[keep]


class _SharedPrefixDecoder:
    """One copy of each cell's prefix keys/values; see :mod:`virtualcell.shared_prefix`."""

    def __init__(self, model, kw, prefix_cache, p_mask, g, capacity):  # noqa: ANN001, PLR0913
        from . import shared_prefix

        self.sp = shared_prefix
        self.model, self.kw = model, kw
        kv = [(layer.keys, layer.values) for layer in prefix_cache.layers]
        self.state = shared_prefix.SharedPrefix(kv, p_mask.bool(), g)
        rows = p_mask.shape[0] * g
        from transformers import DynamicCache

        # each row's own positions only, preallocated; the prefix stays in self.state
        self.cache = DynamicCache()
        self.cache.layers = [_preallocated_layer_class().empty(rows, k.shape[1], k.shape[3], v.shape[3], capacity, k.dtype,
                                                               p_mask.device) for k, v in kv]
        self.state.suffix_valid = torch.ones((rows, capacity), dtype=torch.bool, device=p_mask.device)
        self.n = 0

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, new_mask: torch.Tensor | None = None) -> torch.Tensor:
        valid = self.state.suffix_valid
        if self.n + ids.shape[1] > valid.shape[1]:  # the cache layers grow too
            self.state.suffix_valid = valid = torch.cat([valid, torch.ones_like(valid)], dim=1)
        if new_mask is not None:
            valid[:, self.n : self.n + ids.shape[1]] = new_mask.bool()
        self.n += ids.shape[1]
        with self.sp.active(self.model):
            out = self.model(input_ids=ids, position_ids=pos, use_cache=True,
                             **{self.kw: self.cache, self.sp.KWARG: self.state})
        return out.logits[:, -1, :].float()

    def select(self, keep: torch.Tensor) -> None:
        self.cache.batch_select_indices(keep)
        self.state.select(keep)


_SHARED_OK: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {(device, dtype): passed}


def _use_shared_prefix(model, config: GenerationConfig, max_total: int, token: int, device: torch.device) -> bool:  # noqa: ANN001
    """Shared-prefix attention when asked (``"auto"``: when it is checked to agree with the plain path)."""
    if config.prefix_attention == "repeat":
        return False
    from . import shared_prefix

    if not shared_prefix.supported(model, max_total):
        if config.prefix_attention == "shared":
            raise ValueError("prefix_attention='shared' is not possible for this model and length (sliding window or "
                             "encoder-decoder); use 'auto' or 'repeat'.")
        return False
    checked = _SHARED_OK.setdefault(model, {})
    key = (str(device), str(next(model.parameters()).dtype))
    if key not in checked:
        checked[key] = _check_shared_prefix(model, token, device)
        if not checked[key]:
            import warnings

            warnings.warn("Shared-prefix attention does not reproduce this model's plain attention; generating with "
                          "the prefix cache repeated per row instead (slower, same results).", VirtualCellWarning, stacklevel=user_stacklevel())
    if config.prefix_attention == "shared" and not checked[key]:
        raise ValueError("prefix_attention='shared' does not reproduce this model's attention; use 'auto' or 'repeat'.")
    return checked[key]


def _check_shared_prefix(model, token: int, device: torch.device) -> bool:  # noqa: ANN001
    """Logits of both paths on a small padded grid (2 cells x 2 suffixes, 3 decode steps) agree."""
    vocab = int(model.get_input_embeddings().weight.shape[0])
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (40,), generator=gen).tolist()
    prefixes, suffixes = [ids[:7], ids[7:11]], [ids[11:12], ids[12:14]]
    kw = _cache_kwarg(model)
    p_ids, p_mask = _left_pad(prefixes, token)
    p_ids, p_mask = p_ids.to(device), p_mask.to(device)
    p_pos = (p_mask.cumsum(1) - 1).clamp(min=0)
    try:
        out = model(input_ids=p_ids, attention_mask=p_mask, position_ids=p_pos, use_cache=True)
        cache = _cache_of(out)
        s_ids, s_mask = _left_pad([suffixes[i % 2] for i in range(4)], token)
        s_ids, s_mask = s_ids.to(device), s_mask.to(device)
        s_pos = p_pos[:, -1].repeat_interleave(2)[:, None] + s_mask.cumsum(1)
        logits = {}
        for name, cls in (("repeat", _RepeatedPrefixDecoder), ("shared", _SharedPrefixDecoder)):
            dec = cls(model, kw, cache, p_mask, 2, 3)  # room for 3: the growing of the buffers is checked too
            got = [dec.forward(s_ids, s_pos, s_mask)]
            pos = s_pos[:, -1]
            for t in range(3):
                pos = pos + 1
                if t == 1:  # drop a row, as finished rows are dropped
                    dec.select(torch.tensor([0, 2, 3], device=device))
                    pos = pos[[0, 2, 3]]
                step_ids = torch.tensor([ids[20 + t]] * pos.shape[0], device=device)[:, None]
                got.append(dec.forward(step_ids, pos[:, None]))
            logits[name] = got
    except Exception:  # noqa: BLE001 - any failure means: use the plain path
        return False
    for a, b in zip(logits["repeat"], logits["shared"]):
        scale = 1.0 + float(a.abs().max())
        tol = 1e-3 if a.dtype == torch.float32 and next(model.parameters()).dtype == torch.float32 else 3e-2
        if a.shape != b.shape or float((a - b).abs().max()) > tol * scale:
            return False
    return True


def _mix_rows(logits: torch.Tensor, owner: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Every row gets the weighted sum of the logits of its owner's rows (the components of one suffix of one
    cell): guidance's ``generic + w * (row - generic)``, or a combination composed from its parts."""
    summed = torch.zeros((int(owner.max()) + 1, logits.shape[1]), dtype=logits.dtype, device=logits.device)
    summed.index_add_(0, owner, logits * weight[:, None].to(logits.dtype))
    return summed[owner]


def _sample_loop(decoder, last_pos, logits, keys, rows_cell, rows_suffix,  # noqa: ANN001, PLR0913
                 constraint, eos_id, config, steps, device, mix=None, offsets=None, bias=None, main=None
                 ) -> Iterator[tuple[int, int, list[int]]]:
    """Sample every row to EOS; yield the rows flagged ``main`` (all, by default). ``mix`` (each row's owner and
    weight) sums the rows of one owner into the logits each of them samples from, with the same key, so they write
    the same tokens and finish together. ``offsets`` (the offsets parameter, each row's named targets as
    :func:`virtualcell.target_offsets.row_tensors` gives them, and the neighbour offsets or ``None``) are added to
    each row's logits at every step, before the mix (:func:`target_offsets.add`), and so is ``bias`` (rows x
    vocabulary), where given."""
    n = len(rows_cell)
    active = torch.arange(n, device=device)
    written = torch.full((n, steps), eos_id, dtype=torch.long, device=device)  # EOS = nothing written
    if not config.constrain:
        constraint = None
    state = constraint.start(n, device) if constraint is not None else None
    # Rows that finish stay in the batch (fed EOS, their output ignored) until a quarter of
    # the batch has finished: dropping rows copies every layer's cache, which cost more than
    # computing a few idle rows when rows end one by one.
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    eos = torch.tensor(eos_id, device=device)
    for step in range(steps):
        if offsets is not None:
            logits = target_offsets.add(logits.float(), *offsets)
        if bias is not None:
            logits = logits.float() + bias
        if mix is not None:
            logits = _mix_rows(logits.float(), *mix)
        if constraint is not None:
            logits = constraint.mask(state, logits, config)
        tokens = _sample(logits, keys, step, config.temperature)
        tokens = torch.where(finished, eos, tokens)
        if constraint is not None:
            done = constraint.update(state, tokens, config)
        else:
            done = tokens == eos_id
            step_len = step + 1  # every unfinished row has written one token per step
            # the steps the format gives max_genes genes (one token a gene, or several: a text model's), EOS kept last
            done = done | (step_len >= steps - 1)
        done = done | finished
        written[active, step] = tokens
        finished = done
        if bool(done.all()) or step == steps - 1:
            break
        n_done = int(done.sum())
        if n_done * 4 >= active.numel():
            keep = (~done).nonzero().squeeze(1)
            active = active[keep]
            if mix is not None:
                mix = (mix[0][keep], mix[1][keep])
            if offsets is not None:
                offsets = (offsets[0], tuple(t[keep] for t in offsets[1]), offsets[2])
            if bias is not None:
                bias = bias[keep]
            decoder.select(keep)
            last_pos, keys, tokens = last_pos[keep], keys[keep], tokens[keep]
            finished = finished[keep]
            if state is not None:
                state = constraint.select(state, keep)
        last_pos = last_pos + 1
        logits = decoder.forward(tokens[:, None], last_pos[:, None])
    for i, row in enumerate(written.cpu().tolist()):
        if main is None or main[i]:
            yield rows_cell[i], rows_suffix[i], row[: row.index(eos_id)] if eos_id in row else row
