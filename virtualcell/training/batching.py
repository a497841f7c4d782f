"""Which pairs go into a step, and how they become tensors.

A training pair is (source cell, perturbation, target cell): the prompt holds the source
cell's sentence and the perturbation, the response is the target cell's sentence. With a
cell-first prompt format the source cell's part of the prompt is the same for every
perturbation, so pairs that share a source cell are packed into one *group*: the shared
part is encoded once (the prefix pass), and each pair's own tokens and response attend to
it (the segment pass). The loss is exactly that of the unpacked pairs (tested), for less
work. Text formats whose prompt names the perturbation first have no shared part; each pair
is then its own group and nothing changes.

The batch at a step is a pure function of ``(seed, step)``, so a resumed run repeats no
batch and skips none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..target_offsets import row_tensors
from ..token_bias import row_tokens

__all__ = ["Group", "Batch", "pack", "pair_groups", "sentence_groups", "chunks_by_source", "generic_draw", "LazyDraws",
           "PairSchedule", "StepBatches", "validation_chunks"]

# (shared prompt tokens, [(own prompt tokens, response tokens), ...])
Group = tuple[Sequence[int], Sequence[tuple[Sequence[int], Sequence[int]]]]


@dataclass
class Batch:
    """Padded tensors for one step.

    ``prefix_*`` (cells x P) hold each group's shared prompt except its last token, or are
    ``None`` when no group has one. ``seg_*`` (rows x S) hold, for each pair, the last shared
    token, its own prompt tokens and its response; ``targets[r, t]`` is the token that
    position ``t`` must predict (``-100`` where there is no loss) and ``cell_of_row[r]`` the
    prefix row it attends to.
    """

    prefix_ids: torch.Tensor | None
    prefix_mask: torch.Tensor | None
    seg_ids: torch.Tensor
    seg_mask: torch.Tensor
    seg_pos: torch.Tensor
    targets: torch.Tensor
    cell_of_row: torch.Tensor
    n_tokens: int  # real (non-pad) tokens the model reads: the work done
    n_targets: int  # tokens with a loss
    # each row's genes named by a genetic perturbation, as virtualcell.target_offsets.row_tensors gives them
    # (tokens, kinds, valid); None where no row names one
    named: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # each row's own prompt tokens (rows x most, -1 pads), as virtualcell.token_bias.row_tokens gives them
    own: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        named = None if self.named is None else tuple(t.to(device) for t in self.named)
        return Batch(move(self.prefix_ids), move(self.prefix_mask), move(self.seg_ids), move(self.seg_mask),
                     move(self.seg_pos), move(self.targets), move(self.cell_of_row), self.n_tokens, self.n_targets,
                     named, move(self.own))


def pack(groups: Sequence[Group], pad: int, named: Callable[[Sequence[int]], list[tuple[int, int]]] | None = None
         ) -> Batch:
    """Pad a list of groups into a :class:`Batch` (right padding; positions count real tokens).

    A group's shared tokens minus the last go to the prefix pass; the last shared token
    starts every segment, so that the first response token is predicted inside the segment
    pass. Without shared tokens a segment is the pair's own prompt and response.
    ``named`` (the format's :meth:`~virtualcell.prompts.PromptFormat.named_targets`) reads the
    genes each pair's own prompt perturbs, for the target offsets (``Batch.named``).
    """
    if not groups:
        raise ValueError("pack() needs at least one group.")
    shared_lens = [len(shared) for shared, _ in groups]
    if any(shared_lens) and not all(shared_lens):
        raise ValueError("Groups with and without a shared prompt cannot share a batch.")
    with_prefix = shared_lens[0] > 0
    segs: list[list[int]] = []
    firsts: list[int] = []  # index in the segment of the first response token
    starts: list[int] = []  # position id of the segment's first token
    cells: list[int] = []
    prefixes: list[list[int]] = []
    targets_named: list[list[tuple[int, int]]] = []
    owns: list[list[int]] = []
    for c, (shared, pairs) in enumerate(groups):
        if not pairs:
            raise ValueError(f"Group {c} has no pairs.")
        head = list(shared[-1:])
        if with_prefix:
            prefixes.append(list(shared[:-1]))
        for own, response in pairs:
            seg = head + list(own) + list(response)
            if len(seg) < 2 or not response:
                raise ValueError(f"Group {c}: a pair needs a prompt token and a response.")
            segs.append(seg)
            targets_named.append(named(own) if named is not None else [])
            owns.append(list(own))
            firsts.append(len(head) + len(own))
            starts.append(len(shared) - 1 if with_prefix else 0)
            cells.append(c)
    S = max(len(s) for s in segs)
    R = len(segs)
    seg_ids = torch.full((R, S), pad, dtype=torch.long)
    seg_mask = torch.zeros((R, S), dtype=torch.long)
    targets = torch.full((R, S), -100, dtype=torch.long)
    for r, (seg, first) in enumerate(zip(segs, firsts)):
        t = torch.tensor(seg, dtype=torch.long)
        seg_ids[r, : len(seg)] = t
        seg_mask[r, : len(seg)] = 1
        if first > 0:  # position first-1 predicts the first response token
            targets[r, first - 1 : len(seg) - 1] = t[first:]
        else:
            targets[r, : len(seg) - 1] = t[1:]
    seg_pos = torch.tensor(starts, dtype=torch.long)[:, None] + torch.arange(S)[None, :]
    prefix_ids = prefix_mask = None
    n_tokens = int(seg_mask.sum())
    if with_prefix and max(len(p) for p in prefixes) > 0:
        P = max(len(p) for p in prefixes)
        prefix_ids = torch.full((len(prefixes), P), pad, dtype=torch.long)
        prefix_mask = torch.zeros((len(prefixes), P), dtype=torch.long)
        for c, p in enumerate(prefixes):
            prefix_ids[c, : len(p)] = torch.tensor(p, dtype=torch.long)
            prefix_mask[c, : len(p)] = 1
        if not bool(prefix_mask.any(1).all()):
            raise ValueError("Every shared prompt needs at least two tokens.")
        n_tokens += int(prefix_mask.sum())
    return Batch(prefix_ids, prefix_mask, seg_ids, seg_mask, seg_pos, targets,
                 torch.tensor(cells, dtype=torch.long), n_tokens, int((targets != -100).sum()),
                 row_tensors(targets_named), row_tokens(owns))


def pair_groups(fmt, chunks: Sequence[np.ndarray], *, sentences, sources: np.ndarray,  # noqa: ANN001
                perturbations: Sequence, generic: set[int] | frozenset[int] = frozenset(),
                plain: set[int] | frozenset[int] = frozenset()) -> list[Group]:
    """Token groups of ``chunks`` of target cells whose pairs share a source cell.

    ``fmt`` is the model's prompt format, ``sentences[i]`` cell ``i``'s gene ids,
    ``sources[t]`` the control cell target ``t`` is predicted from and
    ``perturbations[t]`` its typed perturbation; targets in ``generic`` are written under
    the generic condition instead (``fmt.generic_own()``: the perturbation not named), which
    teaches the model the average perturbed cell that guidance contrasts against. Targets in
    ``plain`` (and not in ``generic``) name their perturbation without the tokens a trained target or
    dose has of its own (``fmt.plain_own``), as an untrained one is named, so that form is learned too. A format
    whose prompts share nothing (text prompts naming the perturbation first) gives each pair
    its own group.
    """
    out: list[Group] = []
    generic_own = fmt.generic_own() if generic else None
    for chunk in chunks:
        parts = [fmt.prompt_parts(sentences[int(sources[t])], perturbations[int(t)]) for t in chunk]
        if generic_own is not None:
            parts = [(shared, generic_own if int(t) in generic else own) for (shared, own), t in zip(parts, chunk)]
        if plain:
            forms = [fmt.plain_own(perturbations[int(t)]) if int(t) in plain and int(t) not in generic else None
                     for t in chunk]
            parts = [(shared, own if form is None else form) for (shared, own), form in zip(parts, forms)]
        segs = [(own, fmt.response(sentences[int(t)])) for (_, own), t in zip(parts, chunk)]
        if parts[0][0]:
            out.append((parts[0][0], segs))
        else:
            out.extend(([], [seg]) for seg in segs)
    return out


def generic_draw(targets: np.ndarray, perturbed: np.ndarray, *, fraction: float, seed: int, step: int,
                 salt: int = 2) -> set[int]:
    """The step's perturbed targets written under the generic condition (each with probability
    ``fraction``; control pairs never): a pure function of ``(seed, step)``, so a resumed run draws the same.
    Another ``salt`` gives an independent draw (the trainer's ``own_token_dropout`` uses 3)."""
    if fraction <= 0 or targets.size == 0:
        return set()
    draw = np.random.default_rng([seed, step, salt]).random(targets.size) < fraction
    return {int(t) for t, d in zip(targets, draw) if d and perturbed[t]}


def sentence_groups(fmt, cells: Sequence[int], *, sentences) -> list[Group]:  # noqa: ANN001
    """Lone cell sentences (pre-training), one group each: every token after the first is a target."""
    return [([], [(s[:1], s[1:])]) for s in (fmt.sentence(sentences[int(c)]) for c in cells)]


def chunks_by_source(items: np.ndarray, keys: np.ndarray, group_size: int) -> list[np.ndarray]:
    """``items`` (sorted by ``keys``) cut into runs of one key, at most ``group_size`` each."""
    out: list[np.ndarray] = []
    for run in np.split(items, np.flatnonzero(np.diff(keys)) + 1):
        out.extend(np.array_split(run, int(np.ceil(run.size / group_size))))
    return out


class LazyDraws(Sequence[np.ndarray]):
    """``count`` draws of an index array, draw ``d`` made by ``make(d)`` when first asked for, then kept.

    A draw of the pairing can take a while (optimal transport on 50,000 cells: about 10 s;
    ``experiments/results/attempts/pair_draws/draw_time.py``), and a run on many cells may never
    finish its first epoch, so later draws are made when an epoch first needs them.
    """

    def __init__(self, count: int, make: Callable[[int], np.ndarray]) -> None:
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count}.")
        self.count, self.make = int(count), make
        self._made: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, d: int) -> np.ndarray:  # type: ignore[override]
        if not 0 <= d < self.count:
            raise IndexError(f"draw {d} of {self.count}")
        if d not in self._made:
            self._made[d] = np.asarray(self.make(d), dtype=np.int64)
        return self._made[d]

    def derived(self, how: Callable[[np.ndarray], np.ndarray]) -> LazyDraws:
        """The same draws passed through ``how`` (e.g. the training pairs' share), each made when first asked for."""
        return LazyDraws(self.count, lambda d: how(self[d]))


class PairSchedule:
    """The pairs of every step: epochs of shuffled pairs, same-source pairs kept together.

    Each epoch shuffles the pairs, gathers each source cell's pairs into chunks of at most
    ``group_size``, shuffles the chunks and cuts the result into batches of ``batch_size``
    pairs (the epoch's remainder is dropped, as in the usual drop-last loader). With
    ``group_size=1`` this is plain shuffled batching.

    Parameters
    ----------
    targets
        The pairs' target cells.
    sources
        Each pair's source cell (``-1`` for single sentences, as in pre-training); or several
        draws of them (draws x pairs, or a :class:`LazyDraws`), of which epoch ``e`` uses draw
        ``e % draws`` (:meth:`draw`), so that a target is seen with other source cells from one
        epoch to the next.
    """

    def __init__(self, targets: np.ndarray, sources: np.ndarray | LazyDraws, *, batch_size: int, group_size: int,
                 seed: int, salt: int = 0) -> None:
        if batch_size < 1 or group_size < 1:
            raise ValueError(f"batch_size and group_size must be >= 1, got {batch_size} and {group_size}.")
        self.targets = np.asarray(targets, dtype=np.int64)
        self.draws = sources if isinstance(sources, LazyDraws) else np.atleast_2d(np.asarray(sources, dtype=np.int64))
        self._sources(0)
        self.batch_size, self.group_size, self.seed, self.salt = batch_size, group_size, seed, salt
        self.per_epoch = max(1, self.targets.size // batch_size)
        self._epoch: tuple[int, np.ndarray] | None = None

    def draw(self, step: int) -> int:
        """Which draw of the sources the pairs of ``step`` use."""
        return (step // self.per_epoch) % len(self.draws)

    def _sources(self, d: int) -> np.ndarray:
        sources = self.draws[d]
        if self.targets.ndim != 1 or sources.shape != self.targets.shape:
            raise ValueError("sources must hold one source per target (or draws x targets of them).")
        return sources

    def _order(self, epoch: int) -> np.ndarray:
        """The epoch's pair order (indices into ``targets``)."""
        rng = np.random.default_rng([self.seed, epoch, self.salt])
        order = rng.permutation(self.targets.size)
        if self.group_size == 1:
            return order
        sources = self._sources(epoch % len(self.draws))
        by_source = order[np.argsort(sources[order], kind="stable")]
        chunks = chunks_by_source(by_source, sources[by_source], self.group_size)
        return np.concatenate([chunks[i] for i in rng.permutation(len(chunks))])

    def at(self, step: int, rank: int = 0, world: int = 1) -> np.ndarray:
        """Indices (into ``targets`` and each draw of the sources) of the pairs of ``step``, this process's share."""
        epoch, k = divmod(step, self.per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self._order(epoch))
        chosen = self._epoch[1][k * self.batch_size : (k + 1) * self.batch_size]
        return np.array_split(chosen, world)[rank] if world > 1 else chosen

    def groups(self, chosen: np.ndarray, step: int | None = None) -> list[np.ndarray]:
        """Consecutive pairs with the same source (in ``step``'s draw), at most ``group_size`` each (single
        sentences alone). ``step`` may be left out where there is one draw."""
        if step is None and len(self.draws) > 1:
            raise ValueError("groups() needs the step when the sources have several draws (which one is the step's).")
        sources = self._sources(0 if step is None else self.draw(step))
        out: list[np.ndarray] = []
        start = 0
        for i in range(1, chosen.size + 1):
            if (i == chosen.size or sources[chosen[i]] != sources[chosen[start]]
                    or sources[chosen[start]] < 0 or i - start == self.group_size):
                out.append(chosen[start:i])
                start = i
        return out


def validation_chunks(targets: np.ndarray, sources: np.ndarray, *, batch_size: int, group_size: int
                      ) -> list[list[np.ndarray]]:
    """The validation pairs in a fixed order, same-source pairs together: batches of ``batch_size`` target cells,
    each cut into chunks that share a source cell (``sources[t]``: target ``t``'s source)."""
    order = targets[np.argsort(sources[targets], kind="stable")]
    return [chunks_by_source(part, sources[part], group_size)
            for part in (order[i : i + batch_size] for i in range(0, order.size, batch_size))]


@dataclass
class StepBatches:
    """The batch of every step, as tensors on ``device``: this process's share of the step's pairs, or of the
    lone sentences while pre-training.

    ``pairs`` and ``lone`` schedule them (:class:`PairSchedule`); the pairs' sources are the draws of the pairing
    (``sources``, each a source per cell), ``perturbations[t]`` is target ``t``'s typed perturbation and
    ``perturbed[t]`` whether it is one. A step's generic-condition targets (``generic_fraction``) and those named
    without their own tokens (``plain_fraction``) are drawn over the whole step's pairs (:func:`generic_draw`), so
    that ``world`` processes' shares draw as one process would. ``named`` finds the genes a prompt perturbs
    (target offsets; ``None`` without them)."""

    fmt: Any
    sentences: Any
    sources: LazyDraws
    perturbations: Sequence
    perturbed: np.ndarray
    pairs: PairSchedule
    lone: PairSchedule
    seed: int
    generic_fraction: float = 0.0
    plain_fraction: float = 0.0
    named: Callable[[Sequence[int]], list[tuple[int, int]]] | None = None
    device: torch.device | str = "cpu"
    rank: int = 0
    world: int = 1
    max_positions: int | None = None  # the model's (None: unchecked)

    def groups(self, chunks: Sequence[np.ndarray], pretrain: bool = False, *, generic: set[int] | frozenset[int] = frozenset(),
               plain: set[int] | frozenset[int] = frozenset(), draw: int = 0) -> list[Group]:
        """Token groups of ``chunks`` of target cells: lone sentences (``pretrain``) or pairs of draw ``draw``."""
        if pretrain:
            return sentence_groups(self.fmt, [t for c in chunks for t in c], sentences=self.sentences)
        return pair_groups(self.fmt, chunks, sentences=self.sentences, sources=self.sources[draw],
                           perturbations=self.perturbations, generic=generic, plain=plain)

    def at(self, step: int, pretrain: bool = False) -> Batch:
        """This process's share of the batch of ``step``, as tensors on ``device``."""
        return self.pack(self.groups_at(step, pretrain))

    def groups_at(self, step: int, pretrain: bool = False) -> list[Group]:
        """This process's share of the batch of ``step``, as token groups."""
        schedule = self.lone if pretrain else self.pairs
        chunks = [schedule.targets[c] for c in schedule.groups(schedule.at(step, self.rank, self.world), step)]
        generic: set[int] = set()
        plain: set[int] = set()
        if not pretrain:  # drawn over the whole step's pairs, so that a process's share draws as one process would
            targets = schedule.targets[schedule.at(step)]
            generic = generic_draw(targets, self.perturbed, seed=self.seed, fraction=self.generic_fraction, step=step)
            plain = generic_draw(targets, self.perturbed, seed=self.seed, fraction=self.plain_fraction, step=step,
                                 salt=3)
        return self.groups(chunks, pretrain, generic=generic, plain=plain, draw=schedule.draw(step))

    def of(self, chunks: Sequence[np.ndarray]) -> Batch:
        """The pairs of ``chunks`` (target cells, same source in each) as the first draw pairs them, each named as
        it is (no generic condition, no dropped tokens): the validation loss's batches."""
        return self.pack(self.groups(chunks))

    def pack(self, groups: Sequence[Group]) -> Batch:
        batch = pack(groups, self.fmt.pad, named=self.named)
        if self.max_positions is not None:  # (the first batch is packed before training, for the kernel choice)
            used = int(batch.seg_pos.masked_select(batch.seg_mask.bool()).max()) + 1
            if used > self.max_positions:
                from ..errors import TrainingError

                raise TrainingError(
                    f"A training pair needs {used} tokens, past the {self.max_positions} positions the model was "
                    "built for (a rotary model would read positions it never trained on, one with learned positions "
                    "fails). Use fewer genes a cell (--top-k), or a base model with a longer context.")
        return batch.to(self.device)
