"""Progress bars for long work, and no bar at all when progress is off.

tqdm guards every bar, disabled ones too, with a lock shared across processes: creating or
closing a bar takes it. A worker process forked from the same parent and killed while it
holds that lock leaves it held, and every other worker of that parent then waits on it
forever. A quiet run (``progress=False``) therefore builds :class:`Silent` instead, which
touches no lock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any


class Silent:
    """The part of a tqdm bar the package uses (``n``, ``update``, ``refresh``, ``set_postfix``, ``set_postfix_str``, ``close``), doing nothing."""

    def __init__(self, total: int | None = None, initial: int = 0) -> None:
        self.total, self.n = total, initial

    def update(self, n: int = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int | None, enabled: bool, desc: str, unit: str, initial: int = 0) -> Any:
    """A tqdm bar (``tqdm.auto``: a widget in notebooks) when ``enabled``, else a :class:`Silent` one (also where the
    environment sets ``TQDM_DISABLE``, as ``virtualcell --quiet`` does)."""
    if not enabled or os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes"):
        return Silent(total, initial)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)


@contextlib.contextmanager
def library_bars(enabled: bool) -> Iterator[None]:
    """transformers' own bars (loading weights, writing shards) off for the block where ``enabled`` is false, and
    as they were afterwards: a quiet run (``progress=False``) printed them between its own silence."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
