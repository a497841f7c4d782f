"""Importing a heavy dependency (pertpy, scikit-learn) as a guest in the caller's process.

The first ``import pertpy`` in a process draws from numpy's and Python's global random generators (rich's styles
draw from ``random``, jax's cluster detection from ``numpy.random``; ``sklearn.metrics`` imports rich too), so a
caller who seeded them got another stream after virtualcell's first screen or distance test than before it. And it
raises ``DeprecationWarning: JAXopt is no longer maintained``, which a caller's ``warnings.simplefilter("error")``
(or ``pytest -W error``) turned into a crash of that call, and of every retry. :func:`quiet_import` makes such an
import leave both generators as they were and ignores the deprecation and future warnings that the import itself
raises (a dependency's import noise, not virtualcell's own warnings); the warning filters the imported libraries
install for themselves stay, in their place. One first import runs at a time (two at once undid each other's
filters); a draw another thread makes from numpy's global generator while a first import runs is undone with it.
Every place that imports pertpy goes through :func:`import_pertpy`.
"""

from __future__ import annotations

import importlib
import random
import sys
import threading
import warnings
from types import ModuleType

__all__ = ["quiet_import", "import_pertpy"]

_NOISE = (DeprecationWarning, FutureWarning)
_LOCK = threading.RLock()


def quiet_import(name: str) -> ModuleType:
    """``importlib.import_module(name)``, leaving numpy's and ``random``'s global generators as they were and
    ignoring the deprecation and future warnings raised while the import runs. Once imported, a plain lookup."""
    module = sys.modules.get(name)
    if module is not None:
        return importlib.import_module(name)  # (the same module; import_module waits for one still initialising)
    import numpy as np

    with _LOCK:  # (the filters and the generators are the process's: two first imports at once undid each other's)
        module = sys.modules.get(name)
        if module is not None:
            return importlib.import_module(name)
        np_state, py_state = np.random.get_state(), random.getstate()
        with warnings.catch_warnings():
            for category in _NOISE:
                warnings.filterwarnings("ignore", category=category)
            outer = list(warnings.filters)
            try:
                module = importlib.import_module(name)
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
                # the filters the imported modules installed for themselves (catch_warnings would drop them): those
                # put before the filters in force go before the caller's again, those appended after them
                now = list(warnings.filters)
                first = now.index(outer[0]) if outer and outer[0] in now else len(now)
                before = [f for f in now[:first] if f not in outer]
                after = [f for f in now[first:] if f not in outer]
        for f in reversed(before):
            _add(f, append=False)
        for f in after:
            _add(f, append=True)
    return module


def _add(f: tuple, *, append: bool) -> None:
    action, message, category, module_re, lineno = f
    warnings.filterwarnings(action, message=message.pattern if message is not None else "", category=category,
                            module=module_re.pattern if module_re is not None else "", lineno=lineno, append=append)


def import_pertpy(what: str, name: str = "pertpy") -> ModuleType:
    """``pertpy`` (or its module ``name``, e.g. ``"pertpy.tools"``) through :func:`quiet_import`; where it cannot be
    imported, the ImportError :func:`virtualcell.errors.pertpy_unavailable` words for ``what`` (what needs it)."""
    from .errors import pertpy_unavailable

    try:
        return quiet_import(name)
    except Exception as err:  # noqa: BLE001 - not installed, or a library it loads failed (a warning made an error)
        raise pertpy_unavailable(what, err) from err
