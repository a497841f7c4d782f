"""virtualcell: a virtual-cell perturbation simulator built on Cell2Sentence-style language models.

The data flows one way::

    AnnData -> cell sentences -> prompts -> language model -> generated sentences
            -> expression (xarray / AnnData) -> metrics and rankings

The public API (data first, options keyword-only; functions are verbs, modules are namespaces):

=========================================  =============================================================
``vc.datasets.load(name)``                 a screen as AnnData (embedded default, cached loaders)
``vc.encode(adata)`` / ``vc.decode(...)``  AnnData <-> cell sentences
``vc.Perturbation``, ``vc.Combination``    typed perturbations (``vc.perturbations.parse("ko:STAT1")``)
``vc.fit(adata, out=...)``                 train or fine-tune a model on a screen -> ``C2SModel``
``vc.C2SModel.load(path)``                 a trained model (``vc.model.bundled()``: the shipped one)
``vc.Simulator(baseline, model)``          baseline cells + model; ``.simulate(perturbations)`` ->
                                           ``SimulationResult`` (``.aggregates`` xarray, ``.to_anndata()``);
                                           ``.screen(panel, objective=...)`` -> ``ScreenResult``
``vc.objectives``                          what a screen ranks by (``raise_genes``, ``Signature`` ...)
``vc.evaluate``                            predicted vs measured, baselines, noise ceiling
=========================================  =============================================================

Provenance travels with results: ``SimulationResult.aggregates.attrs``, ``uns["virtualcell"]``
of predicted AnnData, ``ScreenResult.ranking.attrs["virtualcell"]``.

``import virtualcell`` is light: torch, transformers and pertpy are imported only by
the parts that use them.
"""

from __future__ import annotations

import warnings
from importlib import import_module
from typing import TYPE_CHECKING, Any

from . import datasets, errors, sentences
from .contract import DataContract
from .sentences import CellSentences, RankFit, Vocabulary, decode, encode

if TYPE_CHECKING:  # pragma: no cover - the lazy names below, for type checkers and editors
    import os

    import anndata as ad

    from . import evaluate, model, objectives, perturbations, screen, simulator, train, validation, viz
    from .model import C2SModel
    from .perturbations import Combination, Perturbation
    from .screen import ScreenResult
    from .simulator import SimulationResult, Simulator
    from .train import TrainConfig

__version__ = "0.1.0"

# heavy parts, imported on first use: name -> (module, attribute or None for the module)
_LAZY = {
    "perturbations": ("virtualcell.perturbations", None),
    "Perturbation": ("virtualcell.perturbations", "Perturbation"),
    "Combination": ("virtualcell.perturbations", "Combination"),
    "objectives": ("virtualcell.objectives", None),
    "model": ("virtualcell.model", None),
    "C2SModel": ("virtualcell.model", "C2SModel"),
    "TrainConfig": ("virtualcell.train", "TrainConfig"),
    "simulator": ("virtualcell.simulator", None),
    "Simulator": ("virtualcell.simulator", "Simulator"),
    "SimulationResult": ("virtualcell.simulator", "SimulationResult"),
    "screen": ("virtualcell.screen", None),
    "ScreenResult": ("virtualcell.screen", "ScreenResult"),
    "evaluate": ("virtualcell.evaluate", None),
    "viz": ("virtualcell.viz", None),
    # the trainer's module; the verb is vc.fit (see fit below)
    "train": ("virtualcell.train", None),
    # the validation verdict's parts (vc.validation.delta_noise, ...)
    "validation": ("virtualcell.validation", None),
}
# internals reachable as before for one release, with a DeprecationWarning
_DEPRECATED = {"prompts": ("virtualcell.prompts", "it is internal; import it by its full name")}

__all__ = [
    "DataContract",
    "CellSentences",
    "RankFit",
    "Vocabulary",
    "encode",
    "decode",
    "fit",
    "datasets",
    "errors",
    "sentences",
    *_LAZY,
]


def fit(adata: ad.AnnData, *, out: str | os.PathLike[str], **options: Any) -> C2SModel:
    """Train (or fine-tune) a model on a perturbation screen; returns the trained :class:`C2SModel`.

    The verb for :func:`virtualcell.train.train` (same options: ``config=TrainConfig(...)``,
    ``contract=``, ``base=`` a Hugging Face model to fine-tune, ``resume=``, ``progress=``,
    ``on_log=``). The checkpoint folder ``out`` rebuilds the model with ``C2SModel.load(out)``.

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load()
    >>> model = vc.fit(adata[:500], out="tiny-model", config=vc.TrainConfig(max_steps=4))  # doctest: +SKIP
    """
    from .train import train as run

    return run(adata, out=out, **options)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = import_module(module)
        return mod if attr is None else getattr(mod, attr)
    if name in _DEPRECATED:
        module, message = _DEPRECATED[name]
        warnings.warn(f"virtualcell.{name} is deprecated: {message}.", DeprecationWarning, stacklevel=2)
        return import_module(module)
    raise AttributeError(f"module 'virtualcell' has no attribute {name!r}")


def __dir__() -> list[str]:  # the package's names, not the helpers this file imports
    return sorted(set(globals()) - set(_DEPRECATED) - {"Any", "TYPE_CHECKING", "annotations", "import_module",
                                                        "warnings"} | set(_LAZY))
