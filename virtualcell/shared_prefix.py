"""Shared-prefix ("cascade") attention: one copy of a cell's prompt keys/values for all
of its perturbations.

In a screen, one baseline cell meets many perturbations. After the cell's prefix has been
run once, the plain way to decode its ``G`` perturbation rows is to repeat the prefix
keys/values ``G`` times, so that every decode step reads ``G`` copies of them. Here the
prefix keys/values stay one per cell, and every decode step splits attention in two:

* **prefix part**: the queries of a cell's ``G`` rows (times the heads that share a KV
  head) are stacked into one matrix product against that cell's prefix keys, a real
  matrix product instead of ``G`` matrix-vector products over copies;
* **suffix part**: each row against its own keys (perturbation tokens and generated
  genes), kept in a preallocated per-row buffer.

Scores of both parts are joined before one softmax, so the result is the same attention
as over the concatenated keys (tests compare logits with the plain path on Llama,
GPT-NeoX and Gemma-2 configurations). It plugs into ``transformers`` through its
``AttentionInterface`` under the name :data:`NAME`; masks are built here, from the padding
of each prefix and suffix, so ``transformers`` skips its own.

It is used only for the forward passes after the prefix (the perturbation suffix and the
decode steps), and only when :func:`supported` has checked, once per model, that the
model's logits agree with the plain path.
"""

from __future__ import annotations

import contextlib
import math
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["NAME", "SharedPrefix", "supported", "active", "model_lock"]

NAME = "virtualcell_shared_prefix"
KWARG = "virtualcell_shared_prefix"


class SharedPrefix:
    """Per-chunk state: each cell's prefix keys/values and how rows map onto cells.

    ``prefix_kv[layer] = (keys, values)`` of shape (cells, kv heads, P, head dim);
    ``prefix_valid`` (cells, P) marks real (not padding) prefix positions; ``group`` rows
    per cell, laid out cell-major (row ``r`` belongs to cell ``r // group``).
    ``slots`` maps the rows still in the batch to their place in that layout.
    """

    def __init__(self, prefix_kv: list[tuple[torch.Tensor, torch.Tensor]], prefix_valid: torch.Tensor, group: int) -> None:
        self.prefix_kv = prefix_kv
        self.prefix_valid = prefix_valid
        self.group = int(group)
        self.n_cells = int(prefix_valid.shape[0])
        self.slots: torch.Tensor | None = None  # None: all rows, in layout order
        self.suffix_valid: torch.Tensor | None = None  # (rows, capacity) bool
        self._bias_key: tuple | None = None
        self._bias: torch.Tensor | None = None

    @property
    def n_rows(self) -> int:
        return self.n_cells * self.group if self.slots is None else int(self.slots.numel())

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows ``keep`` (indices into the current rows)."""
        base = torch.arange(self.n_cells * self.group, device=keep.device) if self.slots is None else self.slots
        self.slots = base[keep]
        if self.suffix_valid is not None:
            self.suffix_valid = self.suffix_valid[keep]
        self._bias_key = None

    def to_cells(self, x: torch.Tensor) -> torch.Tensor:
        """(rows, kv, m, k) -> (cells, kv, group * m, k): a cell's rows stacked into one matrix.
        Rows dropped from the batch are zeros in their slot."""
        _, kv, m, k = x.shape
        if self.slots is not None:
            full = x.new_zeros((self.n_cells * self.group, kv, m, k))
            full[self.slots] = x
            x = full
        return x.reshape(self.n_cells, self.group, kv, m, k).transpose(1, 2).reshape(self.n_cells, kv, self.group * m, k)

    def to_rows(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_cells`, for the rows still in the batch."""
        _, kv, gm, k = x.shape
        m = gm // self.group
        x = x.view(self.n_cells, kv, self.group, m, k).transpose(1, 2).reshape(self.n_cells * self.group, kv, m, k)
        return x if self.slots is None else x[self.slots]

    def row_cells(self) -> torch.Tensor:
        device = self.prefix_valid.device
        rows = torch.arange(self.n_cells * self.group, device=device) if self.slots is None else self.slots
        return torch.div(rows, self.group, rounding_mode="floor")

    def bias(self, n_suffix: int, n_query: int, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask (rows, 1, 1, n_query, P + n_suffix): padding, and causality inside the suffix."""
        key = (n_suffix, n_query, dtype)
        if self._bias_key == key and self._bias is not None:
            return self._bias
        valid_p = self.prefix_valid[self.row_cells()]  # rows, P
        valid_s = self.suffix_valid[:, :n_suffix]  # rows, S
        allowed = torch.cat([valid_p, valid_s], dim=1)[:, None, :].expand(-1, n_query, -1)
        if n_query > 1:  # query i sits at suffix position n_suffix - n_query + i
            s_pos = torch.arange(n_suffix, device=allowed.device)
            q_pos = torch.arange(n_suffix - n_query, n_suffix, device=allowed.device)
            causal = torch.cat([torch.ones(n_query, valid_p.shape[1], dtype=torch.bool, device=allowed.device),
                                s_pos[None, :] <= q_pos[:, None]], dim=1)
            allowed = allowed & causal[None]
        bias = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        bias.masked_fill_(~allowed, torch.finfo(dtype).min)
        self._bias = bias[:, None, None]  # rows, 1 (kv head), 1 (rep), q, keys
        self._bias_key = key
        return self._bias


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None,  # noqa: ANN001, ANN201, PLR0913
              sliding_window=None, **kwargs):  # noqa: ANN003
    """``transformers`` attention function: prefix part per cell + suffix part per row.

    ``query`` (rows, heads, q, d); ``key``/``value`` (rows, kv heads, S, d) hold only the
    rows' own (suffix) positions. Returns (rows, q, heads, d) like the built-in functions.
    """
    state: SharedPrefix | None = kwargs.get(KWARG)
    if state is None:
        raise RuntimeError(f"attention implementation {NAME!r} needs the {KWARG!r} argument; it is set by "
                           "virtualcell's generation engine only.")
    rows, n_heads, n_q, d = query.shape
    n_kv = key.shape[1]
    rep = n_heads // n_kv
    n_s = key.shape[2]
    scale = scaling if scaling is not None else 1.0 / math.sqrt(d)
    kp, vp = state.prefix_kv[module.layer_idx]
    n_p = kp.shape[2]

    # Query heads that share a KV head, and the q positions, become rows of one matrix.
    q = query.reshape(rows, n_kv, rep * n_q, d)
    s_suffix = torch.matmul(q, key.transpose(-1, -2))  # rows, kv, rep*q, S
    s_prefix = state.to_rows(torch.matmul(state.to_cells(q), kp.transpose(-1, -2)))  # rows, kv, rep*q, P
    scores = torch.cat([s_prefix, s_suffix], dim=-1).float() * scale  # rows, kv, rep*q, P+S
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    bias = state.bias(n_s, n_q, scores.dtype)  # rows, 1, 1, q, P+S
    scores = (scores.view(rows, n_kv, rep, n_q, n_p + n_s) + bias).view(rows, n_kv, rep * n_q, n_p + n_s)
    probs = torch.softmax(scores, dim=-1).to(value.dtype)
    out = torch.matmul(probs[..., n_p:], value)  # rows, kv, rep*q, d
    o_prefix = state.to_rows(torch.matmul(state.to_cells(probs[..., :n_p]), vp))  # rows, kv, rep*q, d
    out = out + o_prefix
    out = out.view(rows, n_heads, n_q, d).transpose(1, 2).contiguous()
    return out, None


_REGISTERED = False


def _register() -> None:
    global _REGISTERED
    if not _REGISTERED:
        from transformers import AttentionInterface

        AttentionInterface.register(NAME, attention)
        _REGISTERED = True


_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model) -> threading.RLock:  # noqa: ANN001
    """``model``'s own reentrant lock, held by every forward pass of the generation engine and by :func:`active`.

    :func:`active` switches the attention implementation in the model's config, which every forward pass reads: two
    threads generating with one loaded model (a web service) read each other's switch, both failed ("needs the
    'virtualcell_shared_prefix' argument"), and one of them restored the other's value for good, so that every later
    call failed too. Under this lock their forward passes take turns (each generation keeps its own state between
    them, so both get what they get one after the other). Kept beside the model, not on it: a model deep-copied or
    pickled has no lock to copy."""
    with _LOCKS_LOCK:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = threading.RLock()
        return lock


@contextlib.contextmanager
def active(model) -> Iterator[None]:  # noqa: ANN001
    """Route the model's attention through :func:`attention` inside the block (which holds :func:`model_lock`)."""
    _register()
    with model_lock(model):
        config = model.config
        previous = config._attn_implementation
        config._attn_implementation = NAME
        try:
            yield
        finally:
            config._attn_implementation = previous


def window_below(model, total: int) -> int | None:  # noqa: ANN001
    """``model``'s sliding window where a sequence of ``total`` positions is longer than it (Gemma-2's layers attend
    to the last ``window`` positions only); else ``None``."""
    config = model.config
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) is not False and total > int(window):
        return int(window)
    return None


def supported(model, max_total: int) -> bool:  # noqa: ANN001
    """Whether the shared-prefix path may be used for ``model`` (structure only; the
    numerical check against the plain path is :func:`virtualcell.generation._check_shared_prefix`)."""
    config = model.config
    if window_below(model, max_total) is not None:
        # a sliding window would cut into the prefix: the plain path handles it, where every row's suffix has one
        # length (padding between prefix and suffix would take window positions; generation refuses that case)
        return False
    if getattr(config, "is_encoder_decoder", False):
        return False
    return True
