"""What a plot function does with the figure it drew when the caller did not ask for it (``return_fig=False``).

Left open in pyplot, such figures piled up in a script or a pipeline that plots each screen: at the 21st, matplotlib
warns ("More than 20 figures have been opened"), which a caller's ``warnings.simplefilter("error")`` made a crash.
:func:`finish` shows the figure where it can be seen, pertpy's way (``plt.show()``: in a Jupyter or marimo notebook
it is drawn into the cell's output; a window waits for it outside interactive mode), and closes it. A file backend
(Agg, in a script or a test) has nowhere to show it: it is closed. A window of an interactive session
(``plt.ion()``, ``ipython --pylab``) is the figure being shown: it stays open for the user to close.
"""

from __future__ import annotations

from typing import Any

__all__ = ["finish"]

# matplotlib's backends that draw into files only (backend_registry's NON_INTERACTIVE, matplotlib >= 3.9)
_FILE_BACKENDS = ("agg", "cairo", "pdf", "pgf", "ps", "svg", "template")


def finish(fig: Any, return_fig: bool, *, drawn_here: bool = True) -> Any:
    """``fig`` where ``return_fig``; else ``None``, with ``fig`` shown and closed if this call made it
    (``drawn_here``; a figure the caller's ``ax=`` belongs to is the caller's, left as it is)."""
    if return_fig:
        return fig
    if not drawn_here:
        return None
    import matplotlib
    import matplotlib.pyplot as plt

    try:
        if matplotlib.get_backend().lower() not in _FILE_BACKENDS:
            plt.show()  # (a notebook's backend draws and closes it here; a window outside interactive mode waits)
    finally:
        if plt.fignum_exists(fig.number) and not (plt.isinteractive() and
                                                  matplotlib.get_backend().lower() not in _FILE_BACKENDS):
            plt.close(fig)
    return None
