"""The data contract: which columns of ``adata.obs`` describe the perturbation screen.

One contract names the perturbation column, the control label, and optionally the
context (cell type / line / patient), dose and time columns. It is validated once,
saved inside every checkpoint and results folder, and travels with an AnnData in
``adata.uns["virtualcell"]["contract"]``.

Examples
--------
>>> import virtualcell as vc
>>> adata = vc.datasets.load("papalexi2021")
>>> contract = vc.DataContract.from_adata(adata)
>>> contract.perturbation_key, contract.control
('perturbation', 'control')
>>> contract.validate(adata)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ContractError, close_matches, preview

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = ["DataContract", "UNS_KEY"]

UNS_KEY = "virtualcell"
PAIR_SEP = "+"


@dataclass(frozen=True)
class DataContract:
    """Which obs columns hold the perturbation, its control label, context, dose and time.

    ``gene_key`` names the var column that held the gene names a model was trained on
    (``None``: ``var_names``); a checkpoint keeps it, so that new cells with that column are
    read the same way.
    """

    perturbation_key: str = "perturbation"
    control: str = "control"
    context_key: str | None = None
    dose_key: str | None = None
    time_key: str | None = None
    gene_key: str | None = None

    # ------------------------------------------------------------------ #
    def validate(self, adata: ad.AnnData, *, require_control: bool = True) -> None:
        """Check ``adata`` against the contract; raise :class:`ContractError` naming the fix."""
        if adata.n_obs == 0:
            raise ContractError(
                "The AnnData has no cells. Check the filter or subset that produced it."
            )
        for role, key in self._keys():
            if key not in adata.obs.columns:
                hint = close_matches(key, adata.obs.columns)
                did = f" Did you mean {preview(hint, 3)}?" if hint else ""
                raise ContractError(
                    f"The {role} column {key!r} is not in adata.obs.{did} obs columns: "
                    f"{preview(adata.obs.columns, 15) or 'none'}. Pass the right name "
                    f"(CLI: --{role.replace(' ', '-')}-key)."
                )
            if adata.obs[key].isna().any():
                n = int(adata.obs[key].isna().sum())
                raise ContractError(
                    f"The {role} column {key!r} has {n} missing values. Fill them (e.g. with the "
                    f"control label {self.control!r} where that is true) or drop those cells."
                )
        if require_control:
            labels = self.labels(adata)
            if self.control not in set(labels):
                hint = close_matches(self.control, set(labels))
                did = f" Did you mean {preview(hint, 3)}?" if hint else ""
                raise ContractError(
                    f"The control label {self.control!r} does not occur in obs[{self.perturbation_key!r}].{did} "
                    f"Labels there: {preview(sorted(set(labels)), 12)}. Pass the label of the unperturbed "
                    "cells (CLI: --control)."
                )

    def _keys(self) -> list[tuple[str, str]]:
        pairs = [("perturbation", self.perturbation_key), ("context", self.context_key),
                 ("dose", self.dose_key), ("time", self.time_key)]
        return [(role, key) for role, key in pairs if key is not None]

    # ------------------------------------------------------------------ #
    def labels(self, adata: ad.AnnData) -> np.ndarray:
        """The perturbation label of every cell, as strings."""
        return adata.obs[self.perturbation_key].astype(str).to_numpy()

    def quantities(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Every cell's dose and time (in the data's units), NaN where the contract names no such
        column or the cell has none: a missing value, a value that is not a number, or a dose of 0."""
        def read(key: str | None, *, zero_is_none: bool) -> np.ndarray:
            if key is None:
                return np.full(adata.n_obs, np.nan)
            values, cell = np.unique(adata.obs[key].astype(str).to_numpy(), return_inverse=True)  # once per value
            numbers = np.array([np.nan if (v := _number(x)) is None or (zero_is_none and v == 0) else v for x in values])
            return numbers[cell]

        return read(self.dose_key, zero_is_none=True), read(self.time_key, zero_is_none=False)

    def conditions(self, adata: ad.AnnData) -> np.ndarray:
        """The condition of every cell, as strings: its label, followed by its dose and time where the
        contract names those columns (``"drugA@10"``, ``"drugA@10,24h"``; :func:`~virtualcell.perturbations.quantity_suffix`);
        control cells keep the control label. Pairing, the baselines, the validation verdict and
        evaluation group cells by condition, so the doses of a drug are never pooled into one group."""
        labels = self.labels(adata)
        if self.dose_key is None and self.time_key is None:
            return labels
        from .perturbations import quantity_suffix

        dose, time = self.quantities(adata)
        # one suffix per distinct (dose, time), NaN (none) written as -inf so that it is one value too
        pairs, cell = np.unique(np.nan_to_num(np.column_stack([dose, time]), nan=-np.inf), axis=0, return_inverse=True)
        suffix = np.array([quantity_suffix(*(None if np.isinf(x) else float(x) for x in pair)) for pair in pairs],
                          dtype=object)[cell.ravel()]
        out = labels.astype(object)
        quantified = (np.isfinite(dose) | np.isfinite(time)) & (labels != self.control)
        out[quantified] = out[quantified] + suffix[quantified]
        return out.astype(str)

    def without_quantities_absent_from(self, adata: ad.AnnData) -> DataContract:
        """This contract without the dose and time columns that ``adata`` lacks: predicted cells and
        baseline predictions carry no dose column, since their labels already name the condition
        (``"drugA@10"``), so their :meth:`conditions` are their labels."""
        from dataclasses import replace

        cols = adata.obs.columns
        return replace(self, dose_key=self.dose_key if self.dose_key in cols else None,
                       time_key=self.time_key if self.time_key in cols else None)

    def contexts(self, adata: ad.AnnData) -> np.ndarray:
        """The context of every cell (a single ``"all"`` context when there is no context column)."""
        if self.context_key is None:
            return np.full(adata.n_obs, "all", dtype=object)
        return adata.obs[self.context_key].astype(str).to_numpy()

    def is_control(self, adata: ad.AnnData) -> np.ndarray:
        return self.labels(adata) == self.control

    def perturbations(self, adata: ad.AnnData) -> list[str]:
        """The distinct non-control labels, sorted."""
        return sorted(set(self.labels(adata)) - {self.control})

    # ------------------------------------------------------------------ #
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataContract:
        # h5ad cannot store None, so attach() writes "" for an absent optional column
        known = {k: (None if d[k] == "" else d[k]) for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)

    @classmethod
    def from_adata(cls, adata: ad.AnnData) -> DataContract:
        """The contract stored in ``adata.uns["virtualcell"]["contract"]`` (datasets set it)."""
        stored = adata.uns.get(UNS_KEY, {}).get("contract") if isinstance(adata.uns.get(UNS_KEY), dict) else None
        if not stored:
            raise ContractError(
                "This AnnData carries no data contract. Build one: "
                "DataContract(perturbation_key='<obs column>', control='<control label>', context_key=...)."
            )
        if isinstance(stored, str):
            stored = json.loads(stored)
        return cls.from_dict(dict(stored))

    def attach(self, adata: ad.AnnData) -> None:
        """Store the contract in ``adata.uns`` so that it travels with the data."""
        adata.uns.setdefault(UNS_KEY, {})
        adata.uns[UNS_KEY]["contract"] = {k: ("" if v is None else v) for k, v in self.to_dict().items()}


def _number(x: Any) -> float | None:
    """A dose or time value as a float (``"10"``, ``10``; a pair's ``"1+1"`` reads as its first), or None."""
    import math

    try:
        v = float(str(x).split("+")[0])
    except ValueError:
        return None
    return v if math.isfinite(v) else None
