"""Helpers behind the marimo notebooks (``notebooks/``): choosing data and models, picking
baseline cells, embedding cells for a PCA, and the plots the notebooks show.

The notebooks hold only UI and calls into the package; whatever they need beyond the
public API lives here, so that it is tested and importable. Importing this module is
light: anndata, torch, transformers, pertpy and matplotlib are imported inside the
functions that use them.

Examples
--------
>>> import virtualcell as vc
>>> from virtualcell import viz
>>> adata = viz.load_data("embedded")
>>> base = viz.baseline_cells(adata, n_cells=40, where={"bio_rep": "rep_3"})
>>> base.n_obs
40
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._stats import pca
from .contract import DataContract
from .errors import ContractError, DataError, VirtualCellError
from .perturbations import GENETIC, Perturbation, parse
from .sentences import model_expression

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .model import C2SModel
    from .screen import ScreenResult
    from .simulator import SimulationResult, Simulator

__all__ = [
    "DATA_SOURCES", "MODEL_SOURCES", "DATA_CHOICES", "MODEL_CHOICES", "chosen_data", "load_data", "load_model", "pertpy_loaders", "subset", "baseline_cells",
    "measured_labels", "measured_cells", "predict_as_measured", "pca_frame", "plot_pca", "screen_pca", "plot_history", "panel", "sample", "LiveLoss",
]

DATA_SOURCES = ("embedded", "h5ad", "pertpy")
MODEL_SOURCES = ("bundled", "folder", "hub")
# what the notebooks' pickers show -> the source; the first is the default
DATA_CHOICES = {"embedded default (Papalexi 2021)": "embedded", "local .h5ad file": "h5ad",
                "pertpy loader (downloads)": "pertpy"}
MODEL_CHOICES = {"bundled (trained on Papalexi 2021, rep_3 held out)": "bundled", "local folder": "folder",
                 "Hugging Face hub id": "hub"}


def pertpy_loaders() -> list[str]:
    """Names of the datasets :func:`virtualcell.datasets.load` downloads through ``pertpy.data``."""
    from . import datasets

    return sorted(name for name, info in datasets.available().items() if info.pertpy)


def chosen_data(source: str, *, path: str = "", loader: str | None = None) -> str | None:
    """The ``value`` :func:`load_data` needs for a data picker's choice: ``""`` for the embedded
    default, the ``path`` of an .h5ad, the pertpy ``loader``; ``None`` while the one needed is empty.

    >>> chosen_data("embedded"), chosen_data("h5ad", path=""), chosen_data("pertpy", loader="norman_2019")
    ('', None, 'norman_2019')
    """
    value = {"embedded": "", "h5ad": path, "pertpy": loader or ""}.get(source, "")
    return value if source == "embedded" or value else None


def load_data(source: str = "embedded", value: str = "", *, contract: DataContract | None = None) -> ad.AnnData:
    """A screen from ``source``: ``"embedded"`` (the default dataset), ``"h5ad"`` (``value`` is a
    path, validated against ``contract`` or the contract the file carries; a file without one is read
    as is) or ``"pertpy"`` (``value`` is a loader name)."""
    from . import datasets

    if source == "embedded":
        return datasets.load(datasets.DEFAULT)
    if source == "h5ad":
        if not value:
            raise DataError("Give the path of an .h5ad file.")
        try:
            return datasets.read_h5ad(value, contract=contract)
        except ContractError:
            if contract is not None:
                raise
            # a file without a contract: read it as is, so that its columns can be chosen
            import anndata

            return anndata.read_h5ad(value)
    if source == "pertpy":
        if not value:
            raise DataError(f"Give a pertpy loader name, one of {', '.join(pertpy_loaders())}.")
        return datasets.load(value)
    raise DataError(f"Unknown data source {source!r}; use one of {', '.join(DATA_SOURCES)}.")


def load_model(source: str = "bundled", value: str = "", *, fit_on: ad.AnnData | None = None) -> C2SModel:
    """A model from ``source``: ``"bundled"``, ``"folder"`` (a checkpoint folder) or ``"hub"`` (a
    Hugging Face id or a plain HF folder, e.g. a C2S-Scale model).

    A plain Hugging Face checkpoint may write the genes of ``fit_on`` (your data) and has no
    rank -> expression fit (codec); with ``fit_on`` one is fitted on up to 2,000 of its cells,
    so that the model's sentences can be decoded into expression.
    """
    from .model import C2SModel, bundled
    from .sentences import RankFit, encode

    if source == "bundled":
        return bundled()
    if source not in ("folder", "hub"):
        raise DataError(f"Unknown model source {source!r}; use one of {', '.join(MODEL_SOURCES)}.")
    if not value:
        raise DataError(f"Give the {'folder' if source == 'folder' else 'hub id'} of the model.")
    model = C2SModel.load(value, genes=None if fit_on is None else [str(g) for g in fit_on.var_names])
    if model.rank_fit is None and fit_on is not None:
        cells = sample(fit_on, 2000, seed=0)
        model.rank_fit = RankFit.fit(cells, encode(cells, vocab=model.genes, top_k=model.top_k, seed=0), seed=0)
    return model


def _mask(adata: ad.AnnData, where: Mapping[str, Any] | None) -> np.ndarray:
    keep = np.ones(adata.n_obs, dtype=bool)
    for col, value in (where or {}).items():
        if value is None or value == "":
            continue
        if col not in adata.obs.columns:
            raise DataError(f"Column {col!r} is not in adata.obs; columns: {list(adata.obs.columns)[:15]}.")
        values = [str(v) for v in value] if isinstance(value, (list, tuple, set)) else [str(value)]
        keep &= adata.obs[col].astype(str).isin(values).to_numpy()
    return keep


def subset(adata: ad.AnnData, where: Mapping[str, Any] | None = None) -> ad.AnnData:
    """The cells where ``obs[column]`` is the value (or one of the values) of every item of ``where``
    (items whose value is ``None`` or ``""`` are ignored), as a copy."""
    return adata[_mask(adata, where)].copy()


def baseline_cells(adata: ad.AnnData, *, contract: DataContract | None = None, n_cells: int | None = 40,
                   where: Mapping[str, Any] | None = None, seed: int = 0) -> ad.AnnData:
    """Up to ``n_cells`` control cells, drawn with ``seed`` (in their original order), optionally
    only where ``obs[column] == value`` for every item of ``where`` (e.g. a context or a replicate)."""
    contract = contract or DataContract.from_adata(adata)
    idx = np.flatnonzero(contract.is_control(adata) & _mask(adata, where))
    if idx.size == 0:
        raise DataError(f"No control cells (label {contract.control!r}) where {dict(where or {})}. Loosen the filter.")
    if n_cells is not None and idx.size > n_cells:
        idx = np.sort(np.random.default_rng(seed).choice(idx, int(n_cells), replace=False))
    return adata[idx].copy()


def data_contract(adata: ad.AnnData, model: C2SModel) -> DataContract:
    """The data's columns: its stored contract, else the model's where the data has the model's perturbation column
    (a file of the shared data folder, or any plain .h5ad, has no stored contract); else refused, naming the columns."""
    try:
        return DataContract.from_adata(adata)
    except ContractError:
        own = model.contract
        if own is not None and own.perturbation_key in adata.obs.columns:
            from dataclasses import replace

            # the model's contract, without the obs columns (context, dose and its unit, time) this data lacks
            return replace(own.without_quantities_absent_from(adata),
                           **({} if own.has_context(adata) else {"context_key": None}))
        raise ContractError(
            f"The data has no stored contract and not the model's perturbation column "
            f"({own.perturbation_key if own is not None else 'none recorded'!r}); obs columns: "
            f"{', '.join(map(str, adata.obs.columns)) or 'none'}. Attach one first (vc.DataContract(KEY, CONTROL)"
            ".attach(adata); notebooks/train.py has pickers for it).") from None


def measured_labels(model: C2SModel, adata: ad.AnnData, *, contract: DataContract | None = None) -> dict[str, str]:
    """Typed perturbation name (as the model writes it, e.g. ``ko:STAT1``) -> the label of the
    measured cells in ``adata`` (e.g. ``STAT1``), for the labels the model knows."""
    contract = contract or DataContract.from_adata(adata)
    present = set(contract.conditions(adata)) - {contract.control}
    vocab = model.perturbations
    # a label trained as several kinds (CRISPRa in one cell line, CRISPRi in others) names cells of both: left out,
    # since its cells here cannot be told apart by label (they were all drawn as the commonest kind's)
    forms = {c: vocab.trained_form(c) for c in sorted(present) if c not in vocab.forms}
    out = {str(parse(form)): c for c, form in forms.items() if form is not None}
    # perturbations the run held out of training whole: asked typed, as they are named in its kind of screen
    kinds = {q.kind for _, t in vocab.label_forms() if isinstance(q := parse(t), Perturbation)} & set(GENETIC)
    for label in (model.train_config or {}).get("unseen_labels") or []:
        if label in present and len(kinds) == 1:
            with contextlib.suppress(VirtualCellError):
                out[str(model.resolve([f"{next(iter(kinds))}:{label}"])[0])] = label
    return out


def measured_cells(adata: ad.AnnData, model: C2SModel, perturbations: Sequence[str], *,
                   contract: DataContract | None = None, where: Mapping[str, Any] | None = None,
                   n_cells: int = 100, seed: int = 0) -> dict[str, np.ndarray]:
    """Measured cells of each typed perturbation the dataset holds, as model-gene expression
    (at most ``n_cells`` each, drawn with ``seed``); perturbations without measurements are left out."""
    contract = contract or DataContract.from_adata(adata)
    labels = measured_labels(model, adata, contract=contract)
    rng = np.random.default_rng(seed)
    keep = _mask(adata, where)
    obs_labels = contract.conditions(adata)
    out = {}
    for name in perturbations:
        if name not in labels:
            continue
        idx = np.flatnonzero(keep & (obs_labels == labels[name]))
        if idx.size == 0:
            continue
        if idx.size > n_cells:
            idx = np.sort(rng.choice(idx, n_cells, replace=False))
        out[name] = model_expression(adata[idx], model.genes)[0].toarray()
    return out


def predict_as_measured(simulator: Simulator, labels: Sequence[str], *, n_cells: int | None = None, seed: int = 0,
                        contract: DataContract | None = None) -> ad.AnnData:
    """Predicted cells for the measured ``labels`` (training labels such as ``STAT1``), labelled like the
    measured data (``obs[contract.perturbation_key]``, and each cell's context from its baseline cell),
    plus the baseline cells as the control: ready for :func:`virtualcell.evaluate.evaluate`."""
    contract = contract or simulator.model.contract or DataContract()
    perturbation_key, control = contract.perturbation_key, contract.control
    import anndata as ad
    import pandas as pd

    res = simulator.simulate(list(labels), n_cells=n_cells, seed=seed, keep_cells=True, progress=False)
    pred = res.to_anndata(perturbation_key=perturbation_key)
    n = res.cells.sizes["cell"]
    base = np.asarray(simulator.expression[:n].toarray(), dtype=np.float32)
    ctrl = ad.AnnData(base, obs=pd.DataFrame({perturbation_key: control, "source_cell": res.source_cells},
                                             index=[f"control|{c}" for c in res.source_cells]),
                      var=pd.DataFrame(index=pred.var_names))
    out = ad.concat([pred, ctrl], merge="first")
    out.obs = out.obs[[perturbation_key, "source_cell"]]
    if contract.has_context(simulator.baseline):
        context = pd.Series(contract.contexts(simulator.baseline), index=simulator.baseline.obs_names)
        out.obs[contract.context_key] = context.reindex(out.obs["source_cell"]).to_numpy()
    out.uns["virtualcell"] = dict(pred.uns["virtualcell"])
    DataContract(perturbation_key, control, context_key=contract.context_key).attach(out)
    return out


def pca_frame(baseline: np.ndarray, groups: Mapping[str, np.ndarray], *, kind: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Cells on the first two principal axes of all the cells plotted (cells x genes, same genes everywhere).

    The axes are fitted on the baseline and every group together: fitted on the baseline alone (40 cells), they
    followed its own noise, which the predicted cells (made from those cells) share and independent measured cells
    do not, so measured controls looked squeezed toward the centre (their spread 2.5 against the baseline's 8.4).

    Returns a DataFrame with ``pc1``, ``pc2``, ``group`` (``"baseline"`` or the key of ``groups``)
    and ``kind`` (``kind[group]``, e.g. ``"predicted"`` / ``"measured"``).
    """
    import pandas as pd

    B = np.asarray(baseline, dtype=np.float64)
    basis = pca(np.vstack([B, *(np.asarray(X, dtype=np.float64) for X in groups.values())]), 2)
    frames = []
    for name, X in {"baseline": B, **dict(groups)}.items():
        E = basis.transform(np.asarray(X, dtype=np.float64))
        frames.append(pd.DataFrame({"pc1": E[:, 0], "pc2": E[:, 1] if E.shape[1] > 1 else 0.0, "group": name,
                                    "kind": "baseline" if name == "baseline" else (kind or {}).get(name, "")}))
    return pd.concat(frames, ignore_index=True)


def plot_pca(frame: pd.DataFrame, *, ax: Axes | None = None, return_fig: bool = False) -> Figure | None:
    """Scatter of :func:`pca_frame`: baseline grey, one colour per perturbation, predicted cells as
    dots and measured cells as crosses."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4.5))
    else:
        fig = ax.figure
    base = frame[frame["group"] == "baseline"]
    ax.scatter(base["pc1"], base["pc2"], s=12, color="#bbbbbb", label="baseline", linewidths=0)
    cmap = plt.get_cmap("tab10")
    names = [g for g in dict.fromkeys(frame["group"]) if g != "baseline"]
    perts = list(dict.fromkeys(n.split(" (")[0] for n in names))
    for name in names:
        sub = frame[frame["group"] == name]
        color = cmap(perts.index(name.split(" (")[0]) % 10)
        measured = (sub["kind"] == "measured").all()
        ax.scatter(sub["pc1"], sub["pc2"], s=16 if measured else 12, color=color, marker="x" if measured else "o",
                   alpha=0.8, linewidths=1 if measured else 0, label=name)
    ax.set_xlabel("PC1 of baseline")
    ax.set_ylabel("PC2 of baseline")
    ax.legend(fontsize=7, markerscale=1.2, loc="best")
    ax.set_title("baseline, predicted (dots) and measured (crosses) cells", fontsize=9)
    fig.tight_layout()
    return fig if return_fig else None


def screen_pca(simulator: Simulator, result: SimulationResult | ScreenResult, *,
               measured: Mapping[str, np.ndarray] | None = None, perturbations: Sequence[str] | None = None) -> pd.DataFrame:
    """:func:`pca_frame` of a screen's baseline, the predicted cells of ``result`` (from
    ``simulator.simulate(..., keep_cells=True)`` or ``simulator.screen(..., keep_cells=True)``; only
    ``perturbations`` if given) and optional measured cells (:func:`measured_cells`)."""
    if result.cells is None:
        raise DataError("The result kept no per-cell predictions; run simulate(..., keep_cells=True) "
                        "or screen(..., keep_cells=True).")
    n = result.cells.sizes["cell"]
    groups: dict[str, np.ndarray] = {}
    kind: dict[str, str] = {}
    names = [str(p) for p in result.cells["perturbation"].values] if perturbations is None else list(perturbations)
    for p in names:
        groups[f"{p} (predicted)"] = np.asarray(result.cells.sel(perturbation=p).values)
        kind[f"{p} (predicted)"] = "predicted"
        if measured and p in measured:
            groups[f"{p} (measured)"] = measured[p]
            kind[f"{p} (measured)"] = "measured"
    return pca_frame(simulator.expression[:n].toarray(), groups, kind=kind)


def plot_history(history: Sequence[Mapping[str, float]], *, ax: Axes | None = None,
                 return_fig: bool = False) -> Figure | None:
    """Training and validation loss by step, from the records ``train(..., on_log=...)`` reports."""
    import matplotlib.pyplot as plt

    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 3.2))
    else:
        fig = ax.figure
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["loss"] for r in history], lw=1, color="#1f77b4", label="training loss")
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r and np.isfinite(r["val_loss"])]
    if val:
        ax.plot(*zip(*val), "o-", color="#d62728", label="validation loss")
    pre = [r["step"] for r in history if r.get("phase") == 0.0]
    if pre:
        ax.axvspan(min(pre) - 0.5, max(pre) + 0.5, color="#eeeeee", zorder=0, label="pre-training")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig if return_fig else None


def panel(text: str = "", picked: Sequence[str] = ()) -> list[Any]:
    """A screening panel from text in the typed syntax (one perturbation a line, ``#`` comments)
    and perturbations picked from a list, in order, each once (by name). The text's perturbations come as parsed (a
    pair's string, 'IFNG@10 + TNF', read each part's own dose where the line 'TNF+IFNG@10' named the pair's)."""
    from .perturbations import parse_panel

    written = any(line.split("#")[0].strip() for line in (text or "").splitlines())
    if not written and picked:  # the text box left empty: the picks are the panel
        return list(dict.fromkeys(str(p) for p in picked))
    out: dict[str, Any] = {}
    for p in [*parse_panel(text or ""), *picked]:
        out.setdefault(str(p), p)
    return list(out.values())


def sample(adata: ad.AnnData, n_cells: int | None, *, seed: int = 0) -> ad.AnnData:
    """At most ``n_cells`` cells drawn with ``seed``, in their original order (all if ``None``), as a copy."""
    if n_cells is None or adata.n_obs <= n_cells:
        return adata.copy()
    return adata[np.sort(np.random.default_rng(seed).choice(adata.n_obs, int(n_cells), replace=False))].copy()


class LiveLoss:
    """A ``train(..., on_log=...)`` callback: keeps the records and, every ``every`` steps (and on
    every validation), hands a fresh :func:`plot_history` figure to ``show`` (e.g. ``mo.output.replace``).

    Examples
    --------
    >>> live = LiveLoss(lambda fig: None, every=10)
    >>> live({"step": 1, "loss": 3.2})
    >>> len(live.history)
    1
    """

    def __init__(self, show: Any, *, every: int = 10) -> None:
        self.show = show
        self.every = max(1, int(every))
        self.history: list[dict[str, float]] = []

    def __call__(self, record: Mapping[str, float]) -> None:
        self.history.append(dict(record))
        if record["step"] % self.every == 0 or "val_loss" in record:
            import matplotlib.pyplot as plt

            fig = plot_history(self.history, return_fig=True)
            self.show(fig)
            plt.close(fig)
