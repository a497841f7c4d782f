"""Exceptions raised by virtualcell.

Every error says what is wrong *and* what to change. They all derive from
:class:`VirtualCellError`, and the data errors also from :class:`ValueError`,
so ``except ValueError`` keeps working for callers that do not know this package.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


class VirtualCellError(Exception):
    """Base class of every error raised on purpose by virtualcell."""


class DataError(VirtualCellError, ValueError):
    """The input data cannot be used as it is (values, genes, cells)."""


class ContractError(DataError):
    """The data does not match its data contract (columns, control label)."""


class VocabularyError(DataError):
    """Gene names cannot form a vocabulary, or do not match a model's vocabulary."""


class PerturbationError(VirtualCellError, ValueError):
    """A perturbation cannot be parsed, or the model cannot represent it."""


class ModelError(VirtualCellError):
    """A model or checkpoint cannot be loaded or used."""


class TrainingError(VirtualCellError):
    """Training cannot start or make progress with the given settings."""


class ScreenError(VirtualCellError):
    """A screen cannot run or resume as asked."""


class OutputError(VirtualCellError, ValueError):
    """An output cannot be written as asked: the path is a user's folder, not writable, or not a file."""


class VirtualCellWarning(UserWarning):
    """What virtualcell warns of (data you can fix, a setting it changed for you): a ``UserWarning``, so filters on
    that still apply; ``warnings.filterwarnings("ignore", category=VirtualCellWarning)`` selects virtualcell's own
    (they are attributed to the caller's line, so a ``module=`` filter cannot). Deprecations stay
    ``DeprecationWarning``."""


class FolderInUseError(OutputError):
    """Another virtualcell run holds the lock on this output folder."""


def close_matches(word: str, options: Iterable[str], n: int = 5) -> list[str]:
    """Options that look like ``word`` (case-insensitive), for 'did you mean' hints."""
    options = [str(o) for o in options]
    lower = {o.lower(): o for o in options}
    hits = difflib.get_close_matches(str(word).lower(), list(lower), n=n, cutoff=0.6)
    return [lower[h] for h in hits]


def with_hints(unknown: Iterable[str], known: Iterable[str], sep: str = ", ") -> str:
    """Names a call does not take, each with its closest match among ``known`` where there is one: the one wording of
    'did you mean' for unknown keywords and fields.

    >>> with_hints(["objectve", "zzz"], ["objective", "seed"])
    "'objectve' (did you mean 'objective'?), 'zzz'"
    """
    known = [str(k) for k in known]
    return sep.join(f"{u!r} (did you mean {n[0]!r}?)" if n else repr(u)
                    for u, n in ((u, close_matches(u, known, 1)) for u in unknown))


def preview(items: Iterable[object], n: int = 10) -> str:
    """A short, readable list: the first ``n`` items and how many more there are."""
    items = [str(i) for i in items]
    head = ", ".join(repr(i) for i in items[:n])
    return head + (f" … and {len(items) - n} more" if len(items) > n else "")


def a_kind_of(kinds: Sequence[str]) -> str:
    """Kinds as a message names one of them, with its article: ``"a knockout"``, ``"an activation"``, ``"a knockout,
    knockdown or activation"``.

    >>> a_kind_of(["activation"]), a_kind_of(["knockout", "knockdown", "activation"])
    ('an activation', 'a knockout, knockdown or activation')
    """
    kinds = list(kinds)
    said = ", ".join(kinds[:-1]) + (" or " if len(kinds) > 1 else "") + kinds[-1]
    return ("an " if said[0] in "aeiou" else "a ") + said


def as_names(value: object) -> list[str]:
    """One name or several, as a list of strings: a bare string (or any single value) is one name, not its letters
    (``genes="TF01"`` was read as ``T``, ``F``, ``0``, ``1``); a list, tuple, set, array or Index gives its items. The
    one reading of an argument that takes "a name or a list of names".

    >>> as_names("TF01"), as_names(("TF01", "TF02"))
    (['TF01'], ['TF01', 'TF02'])
    """
    import numpy as np

    def one(x: object) -> str:  # (bytes are one name, as h5py may hand a string back)
        return x.decode(errors="replace") if isinstance(x, bytes) else str(x)

    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, str | bytes):
        return [one(value)]
    try:
        return [one(x) for x in value]  # type: ignore[attr-defined]
    except TypeError:  # (one value that is no sequence: a number naming a label)
        return [one(value)]


def whole_at_least(value: object, least: int = 1) -> bool:
    """An integer (not a bool, nor a float such as ``2.0`` or NaN) of at least ``least``: the one rule for counts a
    user passes (samples, cells, picks)."""
    import numpy as np

    return not isinstance(value, bool) and isinstance(value, int | np.integer) and value >= least


def finite_number(value: object) -> bool:
    """A real, finite number (an int or float, numpy's too; not a bool, a string such as ``"0.6"``, NaN or inf): the
    one rule for a number read back from a file someone else wrote (a checkpoint's codec, verdict or arrays)."""
    import math

    import numpy as np

    return (not isinstance(value, bool | np.bool_) and isinstance(value, int | float | np.integer | np.floating)
            and math.isfinite(value))


def non_finite(values: object) -> str:
    """``""`` where every value of the array ``values`` is a finite number, else what is wrong, for a message:
    ``"3 of 900 values are not finite (nan, inf)"``, or ``"it holds strings, not numbers"``."""
    import numpy as np

    a = np.asarray(values)
    if a.dtype.kind not in "biuf":
        return f"it holds {a.dtype} values, not numbers"
    if a.dtype.kind != "f":
        return ""
    bad = ~np.isfinite(a)
    if not bad.any():
        return ""
    kinds = sorted({str(v) for v in np.unique(a[bad])})
    return f"{int(bad.sum())} of {a.size} values are not finite ({', '.join(kinds)})"


def pertpy_unavailable(what: str, err: Exception) -> ImportError:
    """The error for ``what`` (e.g. ``"distance_test"``) where ``import pertpy`` failed: not installed, installed and
    failing to load a library of its own (out of memory under a limit, say), or stopped by a warning the caller's
    filter made an error, each with what to do."""
    if isinstance(err, ModuleNotFoundError):
        fix = "pip install pertpy."
    elif isinstance(err, Warning):
        fix = (f"a {type(err).__name__} raised while it was imported was turned into an error by a warnings filter "
               "(warnings.simplefilter('error'), pytest -W error): let that category through, e.g. "
               f"warnings.filterwarnings('default', category={type(err).__name__}).")
    else:
        fix = "it is installed, so a library it loads failed (out of memory under a limit?)."
    return ImportError(f"{what} needs pertpy, and it could not be imported ({type(err).__name__}: {err}): {fix}")


def no_such_column(name: str, columns: Iterable[object], *, what: str = "obs column") -> str:
    """The message for a column ``name`` that is not among ``columns``: a close match where there is one, and the
    columns there are."""
    columns = [str(c) for c in columns]
    hint = close_matches(name, columns)
    did = f" Did you mean {preview(hint, 3)}?" if hint else ""
    return f"{what} {name!r} does not exist.{did} Columns there: {preview(columns, 12) or 'none'}."


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a :func:`warnings.warn` called where this is called point at the first frame
    outside virtualcell: the user's line that called into the package, however deep in it the warning is said (a
    fixed ``stacklevel=3`` named a line of the package wherever the warning was reached from another way):
    ``warnings.warn(message, stacklevel=user_stacklevel())``."""
    import sys

    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and _in_package(frame):
        frame, level = frame.f_back, level + 1
    return level


def _in_package(frame: object) -> bool:
    """Whether ``frame`` runs virtualcell's own code (a module of the package, by its name)."""
    name = str(getattr(frame, "f_globals", {}).get("__name__", ""))
    return name == "virtualcell" or name.startswith("virtualcell.")
