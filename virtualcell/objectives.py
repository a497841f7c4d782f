"""Screen objectives: what makes a candidate intervention good.

Every objective scores the predicted mean shift of a perturbation, ``delta`` (a vector
over the model's genes, predicted mean − baseline mean), and says whether higher is
better (it always is: objectives are written so that the best candidate scores highest).

* :class:`LargestEffect` — the L2 norm of the mean shift.
* :class:`TowardState` — move the population toward a target state: a reference AnnData
  (e.g. healthy cells), scored as how much closer the mean gets to it.
* :class:`Signature` — raise the ``up`` genes and lower the ``down`` genes (e.g. the
  reverse of a disease signature): mean(delta[up]) − mean(delta[down]).
* :func:`raise_genes` / :func:`lower_genes` — raise or lower named genes or a program.
* :class:`Custom` — any Python callable ``f(delta: pandas.Series) -> float``.

:func:`parse_objective` reads the CLI forms ``largest``, ``raise:A,B``, ``lower:A,B``,
``signature:UP1,UP2/DOWN1,DOWN2``, ``reverse:UP1,UP2/DOWN1,DOWN2`` and ``toward:PATH.h5ad``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ScreenError, close_matches, preview

log = logging.getLogger(__name__)

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = ["Objective", "LargestEffect", "Signature", "TowardState", "Custom", "raise_genes", "lower_genes", "parse_objective"]


class Objective:
    """Base class: ``bind`` checks the genes once, ``score`` maps a delta vector to a number."""

    name = "objective"
    description = ""

    def bind(self, genes: Sequence[str], control_mean: np.ndarray) -> Objective:
        """Fix the objective to a screen's ``genes`` (the order of every ``delta`` :meth:`score` gets) and their mean
        baseline expression; returns the objective to score with. Unknown genes are refused here, before any
        generation. The default needs neither."""
        return self

    def on_simulator(self, simulator: Any) -> Objective:
        """Read what the objective needs from the Simulator it will score (before :meth:`bind`); nothing here."""
        return self

    def score(self, delta: np.ndarray) -> float:  # pragma: no cover - abstract
        """The candidate's score from its predicted mean change per gene (``delta``, in :meth:`bind`'s gene order, on
        the log1p scale): higher ranks first."""
        raise NotImplementedError

    def corrected(self, plug_in: float, boots: np.ndarray, n_buckets: int | None = None
                  ) -> tuple[float, float, float]:
        """``(score, low, high)`` from the score of the mean delta and its bootstrap resamples' scores:
        the bias-corrected estimate ``2 * plug_in - median(boots)`` and the basic bootstrap's 95% interval
        around the same correction, ``2 * plug_in - q97.5`` to ``2 * plug_in - q2.5`` (so the score lies
        inside its interval). For a score linear in the delta the correction is about nothing. ``n_buckets``:
        how many buckets of cells were resampled (:func:`widened`)."""
        low, mid, high = np.percentile(widened(plug_in, boots, n_buckets), [2.5, 50, 97.5])
        return 2 * plug_in - mid, 2 * plug_in - high, 2 * plug_in - low

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description}


def widened(plug_in: float, boots: np.ndarray, n_buckets: int | None, *, squared: bool = False) -> np.ndarray:
    """Bootstrap resamples of a score widened around ``plug_in`` by ``sqrt(B / (B - 1))`` for ``B`` resampled
    buckets (by ``B / (B - 1)`` for a squared score, ``squared``): resampling ``B`` buckets gives a mean's variance
    ``(B - 1) / B`` of its unbiased estimate, too little for the few buckets of a small screen (8 cells are 7-8
    buckets). As they are without ``n_buckets``.

    >>> widened(1.0, np.array([0.0, 2.0]), 2).tolist()
    [-0.41421356237309515, 2.414213562373095]
    """
    boots = np.asarray(boots, dtype=np.float64)
    if n_buckets is None or n_buckets < 2:
        return boots
    factor = n_buckets / (n_buckets - 1)
    return plug_in + (factor if squared else np.sqrt(factor)) * (boots - plug_in)


def _index(genes: Sequence[str], wanted: Sequence[str], what: str) -> np.ndarray:
    """The columns of ``wanted`` among ``genes``, matched as genes are everywhere (ignoring case and an Ensembl
    version suffix), each gene once however often it is named (``raise:Tf02,TF02`` weighed it twice)."""
    from .sentences import gene_match_key

    lookup = {gene_match_key(g): i for i, g in enumerate(genes)}
    missing = [w for w in wanted if gene_match_key(w) not in lookup]
    if missing:
        hints = {m: close_matches(m, genes, 2) for m in missing[:5]}
        hint = "; ".join(f"{m}: did you mean {preview(h, 2)}?" for m, h in hints.items() if h)
        one = len(missing) == 1
        raise ScreenError(
            f"The {what} names {len(missing)} gene{'' if one else 's'} the model does not have: {preview(missing)}. "
            f"{hint + ' ' if hint else ''}Use genes from the model's vocabulary ({len(genes)} genes), "
            f"or drop {'it' if one else 'them'}."
        )
    if not wanted:
        raise ScreenError(f"The {what} names no genes.")
    return np.array(list(dict.fromkeys(lookup[gene_match_key(w)] for w in wanted)), dtype=np.int64)


@dataclass
class LargestEffect(Objective):
    """The size of the predicted shift: L2 norm of the mean delta."""

    name: str = "largest_effect"
    description: str = "largest predicted effect: L2 norm of the mean expression shift"

    def score(self, delta: np.ndarray) -> float:
        return float(np.linalg.norm(delta))

    def corrected(self, plug_in: float, boots: np.ndarray, n_buckets: int | None = None
                  ) -> tuple[float, float, float]:
        """The correction made on the squared norm, where the noise adds (``E||mean delta||^2 = ||mu||^2 +
        noise``, and a resample adds it again), and brought back as ``sign(x) * sqrt(|x|)``: a perturbation
        with no effect scores about 0, below it as often as above, and its interval holds 0. (On the norm
        itself the noise does not subtract away: a null effect scored about 0.6 sqrt(noise), its interval
        above 0.) The resamples' spread is widened for the few buckets resampled (:func:`widened`, on the squared
        norm): with 8 cells a null effect scored above 0 in 82% of screens, not half.

        >>> s, lo, hi = LargestEffect().corrected(1.0, np.sqrt(np.linspace(1.5, 2.5, 101)))
        >>> abs(s) < 1e-6, lo < 0 < hi
        (True, True)
        """
        from ._stats import signed_root

        sq = plug_in ** 2
        b = widened(sq, np.square(np.asarray(boots, dtype=np.float64)), n_buckets, squared=True)
        low, high = np.percentile(b, [2.5, 97.5])
        return signed_root(2 * sq - b.mean()), signed_root(2 * sq - high), signed_root(2 * sq - low)


@dataclass
class Signature(Objective):
    """Raise ``up`` genes and lower ``down`` genes: mean(delta[up]) − mean(delta[down])."""

    up: Sequence[str] = ()
    down: Sequence[str] = ()
    name: str = "signature"
    description: str = ""
    _up: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _down: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _spelled: dict[str, str] = field(default_factory=dict, repr=False)  # a symbol alias -> the baseline's gene

    def __post_init__(self) -> None:
        self.up = [self.up] if isinstance(self.up, str) else list(self.up)  # one gene, not its letters
        self.down = [self.down] if isinstance(self.down, str) else list(self.down)
        if not self.up and not self.down:
            raise ScreenError("A signature needs up genes, down genes or both.")
        from .sentences import gene_match_key

        both = sorted({gene_match_key(g) for g in self.up} & {gene_match_key(g) for g in self.down})
        if both:
            raise ScreenError(f"A signature lists {preview(both, 5)} both to raise and to lower; name each gene once.")
        if not self.description:
            self.description = f"raise {preview(self.up, 5) or 'nothing'}; lower {preview(self.down, 5) or 'nothing'}"

    def on_simulator(self, simulator: Any) -> Signature:
        """Genes named by a symbol the training data linked to a gene id (``var['symbol']``; ``ko:TF02`` found its
        gene by it, ``raise:TF02`` did not), as the baseline spells that gene."""
        from .sentences import gene_match_key

        have = {gene_match_key(g) for g in simulator.gene_names}
        aliases = simulator.model.perturbations.aliases
        self._spelled = {}  # (this Simulator's spellings only, not an earlier one's)
        for name in (str(g) for g in (*self.up, *self.down)):
            i = simulator.model.genes.find(aliases.get(name.upper(), "")) if gene_match_key(name) not in have else -1
            if i >= 0:
                self._spelled[name] = simulator.gene_names[i]
        return self

    def bind(self, genes: Sequence[str], control_mean: np.ndarray) -> Signature:
        up, down = ([self._spelled.get(str(g), g) for g in names] for names in (self.up, self.down))
        what_up, what_down = {"raise": ("genes to raise", "signature's down list"),
                              "lower": ("signature's up list", "genes to lower")}.get(
            self.name, ("signature's up list", "signature's down list"))
        self._up = _index(genes, up, what_up) if up else np.zeros(0, np.int64)
        self._down = _index(genes, down, what_down) if down else np.zeros(0, np.int64)
        return self

    def score(self, delta: np.ndarray) -> float:
        up = float(delta[self._up].mean()) if self._up.size else 0.0
        down = float(delta[self._down].mean()) if self._down.size else 0.0
        return up - down

    def to_dict(self) -> dict[str, Any]:
        return super().to_dict() | {"up": list(self.up), "down": list(self.down)}


def raise_genes(genes: Sequence[str], *, name: str = "raise") -> Signature:
    """Raise the named genes (or a gene program)."""
    return Signature(up=genes, name=name)


def lower_genes(genes: Sequence[str], *, name: str = "lower") -> Signature:
    """Lower the named genes (or a gene program)."""
    return Signature(down=genes, name=name)


@dataclass
class TowardState(Objective):
    """Move the population mean toward a target state.

    Score = ||control − target|| − ||control + delta − target||: how much closer the
    predicted mean gets (positive = closer). ``target`` is an AnnData of reference
    cells or a mean-expression vector over ``genes``. In a screen the reference cells are put on
    the baseline's scale as the Simulator puts the baseline on the model's (:meth:`on_simulator`;
    raw counts, or log1p normalized to another total, all give the same target); bound without a
    Simulator, counts are log-normalized and log1p values taken as they are.
    """

    target: Any = None
    target_genes: Sequence[str] | None = None
    name: str = "toward_state"
    description: str = "move the mean toward a reference state"
    _target: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _control: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _shared: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]  # the genes the target measures
    # the reference cells' mean and genes on the last Simulator's scale (on_simulator), beside the target as given
    _resolved: tuple[np.ndarray, list[str]] | None = field(default=None, repr=False)

    def on_simulator(self, simulator: Any) -> TowardState:
        """The reference cells' mean on the Simulator's scale, over the model's genes they measure: a target
        left on another scale (log1p of scanpy's median total beside a baseline put onto 1e4 per cell) made
        the measured STAT1 knockout itself score -0.22 toward its own cells instead of +9.07. ``target`` stays as
        given: the objective reused with another Simulator (another model's genes or scale) reads it again."""
        self._resolved = None
        if hasattr(self.target, "var_names"):
            X, measured = simulator.expression_of(self.target, what="target state")
            keep = np.flatnonzero(measured)
            self._resolved = (np.asarray(X[:, keep].mean(axis=0), dtype=np.float64).ravel(),
                              [simulator.gene_names[i] for i in keep])
        return self

    def bind(self, genes: Sequence[str], control_mean: np.ndarray) -> TowardState:
        from .sentences import detect_scale, expression_matrix, gene_match_key, log_normalize

        if self._resolved is not None:  # on the Simulator's scale (on_simulator)
            mean, names = self._resolved
        elif hasattr(self.target, "var_names"):
            ref: ad.AnnData = self.target
            X = expression_matrix(ref)
            modelled = {gene_match_key(g) for g in genes}  # counts normalized over the model's genes, as its cells are
            cols = [i for i, g in enumerate(ref.var_names) if gene_match_key(g) in modelled] or list(range(ref.n_vars))
            X = log_normalize(X[:, cols], detect_scale(X))
            mean = np.asarray(X.mean(axis=0)).ravel()
            names = [str(ref.var_names[i]) for i in cols]
        else:
            mean = np.asarray(self.target, dtype=np.float64)
            names = list(genes if self.target_genes is None else self.target_genes)
            if mean.shape != (len(names),):
                raise ScreenError(f"The target vector has shape {mean.shape}; expected ({len(names)},) over target_genes.")
        lookup = {gene_match_key(g): i for i, g in enumerate(names)}
        shared = [i for i, g in enumerate(genes) if gene_match_key(g) in lookup]
        if len(shared) < max(2, len(genes) // 10):
            raise ScreenError(
                f"The target state shares only {len(shared)} of the model's {len(genes)} genes: check that it "
                "uses gene symbols of the same species."
            )
        if len(shared) < len(genes):  # the distance is taken on the genes the target measures, not the others
            log.info("the target state measures %d of the model's %d genes; the distance to it is taken on those",
                     len(shared), len(genes))
        self._shared = np.asarray(shared, dtype=np.int64)
        self._target = mean[[lookup[gene_match_key(genes[i])] for i in shared]].astype(np.float64)
        self._control = np.asarray(control_mean, dtype=np.float64)[self._shared]
        return self

    def score(self, delta: np.ndarray) -> float:
        before = np.linalg.norm(self._control - self._target)
        after = np.linalg.norm(self._control + np.asarray(delta)[self._shared] - self._target)
        return float(before - after)

    def to_dict(self) -> dict[str, Any]:
        """The record a screen keeps (``config.json``): once bound, with ``target_digest``, a digest of the target
        mean it scores toward and the genes it is taken on, so that two references are told apart by their cells,
        not by the path typed (a reference file rewritten in place ranked toward other cells under the same
        record)."""
        out = super().to_dict()
        if self._target is not None:
            import hashlib

            h = hashlib.blake2b(digest_size=12)
            h.update(np.asarray(self._shared, dtype=np.int64).tobytes())
            h.update(np.asarray(self._target, dtype=np.float32).tobytes())  # (float32: the last bits of a sum vary)
            out["target_digest"] = h.hexdigest()
        return out


@dataclass
class Custom(Objective):
    """A user function of the mean delta (a pandas Series indexed by gene); higher is better."""

    fn: Callable[[Any], float] = None  # type: ignore[assignment]
    name: str = "custom"
    description: str = "user-supplied objective"
    _genes: list[str] = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ScreenError("Custom objective needs a callable: Custom(fn=lambda delta: delta['MYC']).")
        if self.description == "user-supplied objective":
            self.description = f"user-supplied objective {getattr(self.fn, '__name__', '')}".strip()

    def bind(self, genes: Sequence[str], control_mean: np.ndarray) -> Custom:
        self._genes = list(genes)
        return self

    def score(self, delta: np.ndarray) -> float:
        import pandas as pd

        value = self.fn(pd.Series(delta, index=self._genes))
        try:
            return float(value)
        except (TypeError, ValueError) as err:
            raise ScreenError(f"The custom objective returned {type(value).__name__}, not a number.") from err


def parse_objective(text: str | Objective | Callable | None) -> Objective:
    """An objective from its CLI form (see the module docstring), an Objective, or a callable."""
    if text is None:
        return LargestEffect()
    if isinstance(text, Objective):
        return text
    if callable(text):
        return Custom(fn=text)
    kind, _, arg = str(text).partition(":")
    kind = kind.strip().lower()
    genes = [g.strip() for g in arg.replace(";", ",").split(",") if g.strip()]
    if kind in {"largest", "largest_effect", "effect"}:
        return LargestEffect()
    if kind == "raise":
        return raise_genes(genes)
    if kind == "lower":
        return lower_genes(genes)
    if kind in {"signature", "reverse"}:
        up_text, _, down_text = arg.partition("/")
        up = [g.strip() for g in up_text.split(",") if g.strip()]
        down = [g.strip() for g in down_text.split(",") if g.strip()]
        if kind == "reverse":  # the disease signature is up/down: push it the other way
            return Signature(up=down, down=up, name="reverse_signature")
        return Signature(up=up, down=down)
    if kind == "toward":
        from pathlib import Path

        from .datasets import _read

        if not Path(arg).exists():
            raise ScreenError(f"toward: no such reference file {arg!r}.")
        return TowardState(target=_read(arg, "the toward: reference"), description=f"move the mean toward {arg}")
    raise ScreenError(
        f"Unknown objective {text!r}. Use largest, raise:GENE1,GENE2, lower:GENE1,GENE2, "
        "signature:UP1,UP2/DOWN1,DOWN2, reverse:UP1,UP2/DOWN1,DOWN2 or toward:REFERENCE.h5ad."
    )
