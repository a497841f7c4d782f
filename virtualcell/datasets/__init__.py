"""Datasets: the embedded default, real screens by name, local files, and a synthetic screen.

Every loader returns an AnnData that carries its :class:`~virtualcell.DataContract`
in ``adata.uns["virtualcell"]["contract"]``, already validated.

* ``load("papalexi2021")`` — the **embedded default**: Papalexi et al. 2021, CRISPR
  knockouts of 25 genes in IFN-gamma-stimulated THP-1 cells (ECCITE-seq), 20,729 cells ×
  299 genes, raw counts, three biological replicates. MIT license (sceptredata). Shipped
  inside the package: works offline.
* ``load("perturbench")`` — embedded too: Norman et al. 2019 K562 CRISPRa singles and
  pairs + McFaline-Figueroa et al. 2023 CRISPRi in glioma lines, log-normalized, 500 genes.
  BSD-3 (altoslabs/perturbench).
* ``load("kang2018_scgen")``, ``load("kang2018_harmony")`` — local copies of Kang et al.
  2018 IFN-beta PBMCs (GPL-3, not embedded); looked up in ``$VIRTUALCELL_DATA`` and
  ``../shared/data``.
* ``load("norman_2019")``, ``load("kang_2018")``, ``load("sciplex3")``, ``load("replogle_k562")``
  … — downloaded through :mod:`pertpy.data` and cached under :func:`cache_dir`. Offline,
  they fail with an error that says what to do instead.
* :func:`read_h5ad` — any local file, with the contract you give.
* :func:`synthetic_screen` — a known-answer screen simulated from a gene regulatory network.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..contract import DataContract
from ..errors import DataError, close_matches, preview, with_hints
from . import synthetic  # (light: numpy; networkx is imported when a screen is made)
from .synthetic import synthetic_screen  # a known-answer screen simulated from a gene regulatory network

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

log = logging.getLogger(__name__)

__all__ = ["load", "read_h5ad", "available", "cache_dir", "DEFAULT", "synthetic_screen", "synthetic", "DatasetInfo", "DataError"]

DEFAULT = "papalexi2021"


@dataclass(frozen=True)
class DatasetInfo:
    """Where a named dataset comes from and how to read it."""

    name: str
    description: str
    contract: DataContract
    license: str
    citation: str
    embedded: str | None = None  # file name inside virtualcell/data
    local: str | None = None  # file name searched in $VIRTUALCELL_DATA and ../shared/data
    pertpy: str | None = None  # function name in pertpy.data
    replicate_key: str | None = None


_REGISTRY: dict[str, DatasetInfo] = {
    info.name: info
    for info in [
        DatasetInfo(
            "papalexi2021",
            "CRISPR knockouts of 25 genes + non-targeting in IFN-gamma-stimulated THP-1 cells (ECCITE-seq); raw counts, 3 replicates",
            DataContract("perturbation", "control"),
            "MIT (sceptredata, Katsevich lab)",
            "Papalexi E. et al. Characterizing the molecular regulation of inhibitory immune checkpoints "
            "with multimodal single-cell screens. Nat Genet 53, 322-331 (2021).",
            embedded="papalexi2021_thp1_crispr_ko.h5ad",
            replicate_key="bio_rep",
        ),
        DatasetInfo(
            "perturbench",
            "Norman 2019 K562 CRISPRa singles and pairs + McFaline-Figueroa 2023 CRISPRi in A172/T98G/U87MG; log-normalized, 500 genes",
            DataContract("perturbation", "control", context_key="cell_type"),
            "BSD-3-Clause (altoslabs/perturbench)",
            "Norman T.M. et al. Science 365, 786-793 (2019); McFaline-Figueroa J.L. et al. Cell Genomics (2023); "
            "Wu Y. et al. PerturBench (2024).",
            embedded="perturbench_norman2019_mcfaline2023.h5ad",
        ),
        DatasetInfo(
            "kang2018_scgen",
            "Kang 2018 IFN-beta PBMCs, scGen validation split: 7 cell types, log-normalized",
            DataContract("condition", "control", context_key="cell_type"),
            "GPL-3 (theislab/scgen): read from a local copy, not embedded",
            "Kang H.M. et al. Nat Biotechnol 36, 89-94 (2018); Lotfollahi M. et al. Nat Methods (2019).",
            local="kang2018_ifnb_pbmc_scgen_valid_lognorm.h5ad",
        ),
        DatasetInfo(
            "kang2018_harmony",
            "Kang 2018 IFN-beta PBMCs, 2,000 cells, raw counts, no cell types",
            DataContract("perturbation", "control"),
            "GPL-3 (harmony): read from a local copy, not embedded",
            "Kang H.M. et al. Nat Biotechnol 36, 89-94 (2018).",
            local="kang2018_ifnb_pbmc_harmony_2000cells.h5ad",
        ),
        DatasetInfo(
            "papalexi2021_local",
            "Papalexi 2021 THP-1 CRISPR KO (the shared local copy of the embedded file)",
            DataContract("perturbation", "control"),
            "MIT (sceptredata)",
            "Papalexi E. et al. Nat Genet 53, 322-331 (2021).",
            local="papalexi2021_thp1_crispr_ko_sceptredata.h5ad",
            replicate_key="bio_rep",
        ),
        DatasetInfo(
            "norman_2019",
            "Norman 2019 K562 CRISPRa singles and pairs (pertpy.data.norman_2019, download)",
            DataContract("perturbation_name", "control"),
            "see pertpy",
            "Norman T.M. et al. Science 365, 786-793 (2019).",
            pertpy="norman_2019",
        ),
        DatasetInfo(
            "kang_2018",
            "Kang 2018 IFN-beta PBMCs, full (pertpy.data.kang_2018, download)",
            DataContract("label", "ctrl", context_key="cell_type"),
            "see pertpy",
            "Kang H.M. et al. Nat Biotechnol 36, 89-94 (2018).",
            pertpy="kang_2018",
        ),
        DatasetInfo(
            "sciplex3",
            "Srivatsan 2020 sci-Plex3 drug screen, 3 cell lines, 188 compounds, 4 doses (pertpy.data, download)",
            DataContract("perturbation", "control", context_key="cell_line", dose_key="dose_value", time_key="time",
                         dose_unit_key="dose_unit"),  # dose_value in the unit of dose_unit (nM)
            "see pertpy / scPerturb",
            "Srivatsan S.R. et al. Science 367, 45-51 (2020).",
            pertpy="srivatsan_2020_sciplex3",
        ),
        DatasetInfo(
            "replogle_k562",
            "Replogle 2022 K562 essential-gene CRISPRi Perturb-seq (pertpy.data, download)",
            DataContract("perturbation", "control"),
            "see pertpy / scPerturb",
            "Replogle J.M. et al. Cell 185, 2559-2575 (2022).",
            pertpy="replogle_2022_k562_essential",
        ),
        DatasetInfo(
            "papalexi2021_full",
            "Papalexi 2021 THP-1 ECCITE-seq, all genes (pertpy.data.papalexi_2021, a MuData; the rna modality is used)",
            DataContract("gene_target", "NT"),
            "see pertpy",
            "Papalexi E. et al. Nat Genet 53, 322-331 (2021).",
            pertpy="papalexi_2021",
        ),
    ]
}


def available() -> dict[str, DatasetInfo]:
    """Every dataset :func:`load` knows, by name."""
    return dict(_REGISTRY)


def cache_dir() -> Path:
    """Where downloads are cached: ``$VIRTUALCELL_CACHE`` or ``~/.cache/virtualcell``."""
    root = os.environ.get("VIRTUALCELL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "virtualcell")
    return Path(root)


def data_dirs() -> list[Path]:
    """Folders searched for local copies of datasets, in order: ``$VIRTUALCELL_DATA``, ``../shared/data``,
    ``./shared/data``, ``./data``, and ``shared/data`` beside the checkout the package runs from (the folder
    above ``virtualcell/``: an editable install finds it wherever it is run)."""
    dirs = [os.environ.get("VIRTUALCELL_DATA"), "../shared/data", "shared/data", "data"]
    here = Path(__file__).resolve().parents[2]
    if (here / "pyproject.toml").exists():  # a checkout (an installed copy sits in site-packages: no such folder)
        dirs.append(str(here.parent / "shared" / "data"))
    return [Path(d) for d in dirs if d]


def load(name: str = DEFAULT, **kwargs: Any) -> ad.AnnData:
    """Load a dataset by name; see the module docstring for the names.

    Parameters
    ----------
    name
        A name :func:`available` lists, or ``"synthetic"``. For your own file use :func:`read_h5ad`.
    **kwargs
        For ``"synthetic"``: the arguments of :func:`synthetic_screen` (``n_cells_per_condition=``, ``seed=``, ...).
        For a named dataset: ``contract=``, a :class:`~virtualcell.DataContract` read instead of the dataset's own
        (a context column, say: ``load("papalexi2021", contract=DataContract(context_key="bio_rep"))``), as
        :func:`read_h5ad` takes one. Any other keyword is refused with a :class:`DataError` naming the ones the
        loader takes (they were dropped without a word).

    Examples
    --------
    >>> import virtualcell as vc
    >>> adata = vc.datasets.load()  # the embedded default, offline
    >>> adata.shape
    (20729, 299)
    """
    if name == "synthetic":
        _refuse_keywords(name, kwargs)
        return synthetic_screen(**kwargs)
    if isinstance(name, os.PathLike) or (isinstance(name, str) and name.lower().endswith(".h5ad")):
        raise DataError(f"load() takes a dataset's name, and {str(name)!r} is a file: read it with "
                        "vc.datasets.read_h5ad(path) (with contract=DataContract(...) where the file carries none).")
    if name not in _REGISTRY:
        hint = close_matches(name, _REGISTRY)
        did = f" Did you mean {preview(hint, 3)}?" if hint else ""
        raise DataError(
            f"Unknown dataset {name!r}.{did} Known: {preview(sorted(_REGISTRY), 20)}, 'synthetic'. "
            "For your own file give its path, an .h5ad (CLI: --data cells.h5ad; Python: "
            "virtualcell.datasets.read_h5ad(path, contract=...))."
        )
    _refuse_keywords(name, kwargs)
    info = _REGISTRY[name]
    if info.embedded:
        path = resources.files("virtualcell") / "data" / info.embedded
        with resources.as_file(path) as p:
            adata = _read(p)
    elif info.local:
        found = [d / info.local for d in data_dirs() if (d / info.local).exists()]
        if not found:
            raise DataError(
                f"Dataset {name!r} is read from a local copy named {info.local!r} ({info.license}), "
                f"which is not in any of: {', '.join(str(d) for d in data_dirs())}. "
                "Put the file there or point $VIRTUALCELL_DATA at its folder; virtualcell.datasets.available() "
                "lists the datasets shipped in the package (embedded) and those that download (pertpy)."
            )
        adata = _read(found[0])
    else:
        adata = _from_pertpy(info)
    adata.uns.setdefault("virtualcell", {})
    adata.uns["virtualcell"]["dataset"] = {"name": info.name, "license": info.license, "citation": info.citation}
    contract = kwargs.get("contract") or info.contract
    if contract.dose_unit_key is not None and contract.dose_unit_key not in adata.obs.columns:
        from dataclasses import replace

        # (a release of the download without its unit column: its doses read as plain numbers, as they did before
        # the column was read, rather than the dataset refusing to load)
        log.warning("%s has no dose unit column %r: its doses are read as plain numbers, in the unit the data was "
                    "written in.", name, contract.dose_unit_key)
        contract = replace(contract, dose_unit_key=None)
    contract.attach(adata)
    contract.validate(adata)
    return adata


def _refuse_keywords(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse the keywords of ``load(name, **kwargs)`` that its loader does not take, naming the ones it does (with a
    close match where there is one): every keyword but ``contract`` was dropped without a word for a named dataset."""
    import inspect

    synthetic_args = sorted(inspect.signature(synthetic_screen).parameters)
    takes = synthetic_args if name == "synthetic" else ["contract"]
    unknown = [k for k in kwargs if k not in takes]
    if not unknown:
        if kwargs.get("contract") is not None and not isinstance(kwargs["contract"], DataContract):
            raise DataError(f"contract must be a virtualcell.DataContract, got {type(kwargs['contract']).__name__}: "
                            "e.g. contract=vc.DataContract('perturbation', 'control', context_key='bio_rep').")
        return
    named = with_hints(unknown, takes)
    said = []
    if name != "synthetic" and any(k in synthetic_args for k in unknown):
        said.append("the synthetic screen's arguments (n_cells_per_condition=, seed=, ...) are load('synthetic')'s; "
                    "take a subset of a named dataset's cells yourself (adata[:1000].copy())")
    if "backed" in unknown:
        said.append("virtualcell reads expression in memory, so a dataset is never read backed")
    if "cache_dir" in unknown:
        said.append("downloads are cached under $VIRTUALCELL_CACHE (vc.datasets.cache_dir()): set it to move them")
    advice = f" ({'; '.join(said)})" if said else ""
    own = "" if name == "synthetic" else " For a file of your own: vc.datasets.read_h5ad(path, contract=...)."
    raise DataError(f"load({name!r}) takes no keyword{'s' if len(unknown) > 1 else ''} {named}; it takes "
                    f"{preview(takes, 20)}{advice}.{own}")


def _read(path: Any, what: str = "") -> ad.AnnData:
    """``anndata.read_h5ad``, with a file that is not a readable h5ad turned into a :class:`DataError`."""
    import anndata as ad

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return ad.read_h5ad(path)
    except (OSError, KeyError, ValueError, TypeError) as err:
        if isinstance(err, DataError):
            raise
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        if "truncated" in reason:
            reason = "the file is truncated"
        elif "signature not found" in reason:
            reason = "it is not an HDF5 file"
        raise DataError(
            f"{str(path)!r}{f' ({what})' if what else ''} is not a readable .h5ad file ({reason}). "
            "Check the path, or write the file again (anndata's adata.write_h5ad)."
        ) from None


def _from_pertpy(info: DatasetInfo) -> ad.AnnData:
    """Download (once) through pertpy.data into the cache, with a clear error offline."""
    target = cache_dir() / "pertpy"
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"Cannot create the download cache {str(target)!r} ({err.strerror or err}): set "
                        "$VIRTUALCELL_CACHE to a folder you can write to.") from None
    from .._imports import import_pertpy

    try:
        loaders = import_pertpy(f"Loading {info.name!r}", "pertpy.data")
    except ImportError as err:  # pragma: no cover - pertpy is a dependency
        raise DataError(str(err)) from err
    import scanpy as sc

    # pertpy downloads into scanpy's dataset folder: pointed at the cache for this download only, the caller's setting
    # back afterwards, however it ends
    previous = sc.settings.datasetdir
    try:
        sc.settings.datasetdir = target
        fn: Callable[[], Any] = getattr(loaders, info.pertpy)  # type: ignore[arg-type]
        data = fn()
    except Exception as err:  # network errors come in many types
        raise DataError(
            f"Could not download {info.name!r} through pertpy.data.{info.pertpy}() ({type(err).__name__}: {err}). "
            f"This needs the internet. Offline: download it on a connected machine (it is cached in {target}), "
            "copy the .h5ad here and use virtualcell.datasets.read_h5ad(path, contract=...), or use the "
            "embedded default, load('papalexi2021')."
        ) from err
    finally:
        sc.settings.datasetdir = previous
        if not Path(previous).is_absolute():  # (the setter resolves it: scanpy's default, ./data, follows the cwd)
            with contextlib.suppress(AttributeError, TypeError):
                sc.settings._datasetdir = previous
    if hasattr(data, "mod"):  # MuData: take the RNA modality
        data = data.mod["rna"]
    return data


def read_h5ad(path: str | os.PathLike[str], *, contract: DataContract | None = None) -> ad.AnnData:
    """Read a local ``.h5ad`` and validate it against ``contract`` (or the contract it carries)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"No such file: {str(p)!r}. Check the path (relative paths start at {os.getcwd()}).")
    if p.suffix.lower() != ".h5ad":
        raise DataError(f"{str(p)!r} is not an .h5ad file. Convert it with anndata (e.g. sc.read_10x_mtx(...).write_h5ad(...)).")
    adata = _read(p)
    if contract is None:
        contract = DataContract.from_adata(adata)
    contract.attach(adata)
    contract.validate(adata)
    return adata
