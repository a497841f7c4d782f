"""virtualcell: a virtual-cell perturbation simulator built on Cell2Sentence-style language models.

The data flows one way::

    AnnData -> cell sentences -> prompts -> language model -> generated sentences
            -> expression (xarray / AnnData) -> metrics and rankings

``import virtualcell`` is light: torch, transformers and pertpy are imported only by
the parts that use them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from . import datasets, errors, sentences
from .contract import DataContract
from .sentences import CellSentences, RankFit, Vocabulary, decode, encode

__version__ = "0.1.0"

# heavy parts, imported on first use: name -> (module, attribute or None for the module)
_LAZY = {
    "perturbations": ("virtualcell.perturbations", None),
    "Perturbation": ("virtualcell.perturbations", "Perturbation"),
    "prompts": ("virtualcell.prompts", None),
    "model": ("virtualcell.model", None),
    "C2SModel": ("virtualcell.model", "C2SModel"),
    "train": ("virtualcell.train", None),
    "simulator": ("virtualcell.simulator", None),
    "Simulator": ("virtualcell.simulator", "Simulator"),
    "screen": ("virtualcell.screen", None),
    "evaluate": ("virtualcell.evaluate", None),
}

__all__ = [
    "DataContract",
    "CellSentences",
    "RankFit",
    "Vocabulary",
    "encode",
    "decode",
    "datasets",
    "errors",
    "sentences",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'virtualcell' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
