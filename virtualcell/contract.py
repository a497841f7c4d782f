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

import functools
import json
import logging
import re
import warnings
from collections.abc import Callable, Hashable, Iterable, Mapping, Set
from contextvars import ContextVar
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from .errors import ContractError, VirtualCellWarning, as_names, close_matches, preview, user_stacklevel
from .perturbations import (_JOINING_PLUS, dose_on_one_scale, first_quantity, hours_per,
                            known_dose_unit, negative_quantity, quantity_suffix, read_quantity, split_label)

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

log = logging.getLogger(__name__)

__all__ = ["DataContract", "UNS_KEY", "control_labels", "one_reading"]

UNS_KEY = "virtualcell"
PAIR_SEP = "+"
CONTEXT_SEP = "+"  # a context of several obs columns: context_key="cell_type+patient"
CONTEXT_VALUE_SEP = "|"  # ... whose values are joined: "CD4T|patient1"


# what has been said about the data in the public call now reading it (None: no such call; see one_reading)
_SAID: ContextVar[set[Hashable] | None] = ContextVar("virtualcell_said", default=None)
_F = TypeVar("_F", bound=Callable[..., Any])


def one_reading(fn: _F) -> _F:
    """Make ``fn`` (a public call: fit, simulate, evaluate) one reading of the user's data: what the contract says
    about the data (labels with spaces around them, dose units of no family) is said once in it, however many times
    the call reads the labels. A run read them some 30 times, on the whole file and on each of its splits, and said
    the same warning up to 31 times with three different counts. A call inside another is the outer one's reading."""
    @functools.wraps(fn)
    def read_once(*args: Any, **kwargs: Any) -> Any:
        if _SAID.get() is not None:
            return fn(*args, **kwargs)
        token = _SAID.set(set())
        try:
            return fn(*args, **kwargs)
        finally:
            _SAID.reset(token)

    return read_once  # type: ignore[return-value]


def _first_time(key: Hashable) -> bool:
    """Whether ``key`` (what is about to be said of the data) is new to the reading now under way (always, outside
    one): it is remembered as said."""
    said = _SAID.get()
    if said is None:
        return True
    if key in said:
        return False
    said.add(key)
    return True


@dataclass(frozen=True)
class DataContract:
    """Which obs columns hold the perturbation, its control label, context, dose and time.

    ``perturbation_key`` is the obs column of the perturbation labels, ``control`` the label of control cells,
    ``context_key`` the column of the cell type, line or patient (``None``: one context), ``dose_key`` and
    ``time_key`` the columns of each cell's dose (``"10uM"``, or a number) and time (``"24h"``) where the screen
    has them (:meth:`quantities`). ``dose_unit_key`` names the column of each dose's unit where a screen keeps it
    apart (sci-Plex's ``dose_value`` beside ``dose_unit``): each dose is read as its value joined with its unit, as
    ``"10nM"`` written in one column would be.

    ``gene_key`` names the var column that held the gene names a model was trained on
    (``None``: ``var_names``); a checkpoint keeps it, so that new cells with that column are
    read the same way.

    ``context_key`` may name several columns joined by ``+`` (``"cell_type+patient"``): each combination of
    their values is a context of its own (``"CD4T|patient1"``), and predicted cells carry it in a column of
    that name.

    One dose and one time per cell: a combination's parts share its cells' dose and time (``drugA+drugB`` at
    ``1uM``, 24h, is each of them at 1uM for 24h). A column that gives each part its own (``"1+1"``, ``"6h+6h"``) is
    read where the parts' values are one; where they differ (``"1+10"``, ``"6h+24h"``, ``"10ng/ml+1uM"``) it is
    refused, since a pair whose parts were given at different doses or times is not something virtualcell can train
    or ask for.

    ``other_controls`` names further labels of control cells (several non-targeting guides,
    ``"DMSO"`` beside ``"vehicle"``): :meth:`labels` reads them as ``control``, so every part of the
    package sees one control population (CLI: ``--control NT_1,NT_2``, the first is ``control``).
    ``control`` may be such a list too: ``DataContract("guide", ["NT_1", "NT_2"])`` is
    ``DataContract("guide", "NT_1", other_controls=("NT_2",))``, as ``--control NT_1,NT_2`` reads.
    """

    perturbation_key: str = "perturbation"
    control: str = "control"
    context_key: str | None = None
    dose_key: str | None = None
    time_key: str | None = None
    gene_key: str | None = None
    other_controls: tuple[str, ...] = ()
    dose_unit_key: str | None = None

    def __post_init__(self) -> None:
        others = self.other_controls
        if isinstance(others, str):
            raise ContractError(f"other_controls takes a list of labels, got the string {others!r}: write "
                                f"other_controls=[{others!r}].")
        control = self.control
        if isinstance(control, Set | Mapping):  # (no first label to be the control)
            raise ContractError(f"control={control!r} has no order, and the first of several control labels is the "
                                f"one the others are read as: pass a list, control={sorted(map(str, control))!r}.")
        # one label, or several, as the command line's --control NT_1,NT_2 gives them (control_labels): all read
        # as the first, which the others join (evaluate and split_controls take control=[...] so too)
        labels = [x.strip() for x in as_names(control) if x.strip()]
        if not labels:
            raise ContractError("control names no label: give the label of the control cells, or a list of them "
                                "(control=['NT_1', 'NT_2']: all read as the first).")
        control, others = labels[0], (*labels[1:], *others)
        # labels are read as strings, so a control given as a number (control=0 of integer labels) is its string
        object.__setattr__(self, "control", str(control).strip())
        # a tuple of distinct labels other than control (lists and arrays from JSON or h5ad become one)
        object.__setattr__(self, "other_controls",
                           tuple(dict.fromkeys(str(x).strip() for x in others if str(x).strip() != self.control)))

    @property
    def controls(self) -> tuple[str, ...]:
        """Every label of control cells: ``control``, then ``other_controls``."""
        return (self.control, *self.other_controls)

    # ------------------------------------------------------------------ #
    def validate(self, adata: ad.AnnData, *, require_control: bool = True) -> None:
        """Check ``adata`` against the contract; raise :class:`ContractError` naming the fix."""
        if adata.n_obs == 0:
            raise ContractError(
                "The AnnData has no cells. Check the filter or subset that produced it."
            )
        self.require_dose_key()
        for role, key in self._keys(adata):
            if key not in adata.obs.columns:
                raise _not_a_column(role, key, adata)
            if role not in _QUANTITY_ROLES and adata.obs[key].isna().any():  # a missing dose or time: none
                n = int(adata.obs[key].isna().sum())
                fill = (f"(e.g. with the control label {self.control!r} where that is true)"
                        if role == "perturbation" else "(with each cell's cell type, patient or batch)")
                raise ContractError(
                    f"The {role} column {key!r} has {n} missing values. Fill them {fill} or drop those cells."
                )
        if require_control:
            labels = self.labels(adata)
            if self.control not in set(labels):
                hint = close_matches(self.control, set(labels))
                did = f" Did you mean {preview(hint, 3)}?" if hint else ""
                listed = [x.strip() for x in self.control.split(",") if x.strip()]
                if len(listed) > 1 and set(listed) & set(labels):  # (the command line's comma list, in Python)
                    did = (f" Several control labels are a list in Python (the command line's --control "
                           f"{self.control} is one): control={listed!r}, all read as the first.")
                named = (f"The control label {self.control!r} does not occur" if not self.other_controls else
                         f"None of the control labels {preview(self.controls, 8)} occurs")
                raise ContractError(
                    f"{named} in obs[{self.perturbation_key!r}].{did} "
                    f"Labels there, most cells first: {preview(_by_count(labels), 12)}. Pass the label of the unperturbed "
                    "cells (CLI: --control)."
                )

    def _keys(self, adata: ad.AnnData) -> list[tuple[str, str]]:  # noqa: D102
        pairs = [("perturbation", self.perturbation_key), *(("context", c) for c in self.context_columns(adata)),
                 ("dose", self.dose_key), ("dose unit", self.dose_unit_key), ("time", self.time_key)]
        return [(role, key) for role, key in pairs if key is not None]

    def require_dose_key(self) -> None:
        """Refuse a ``dose_unit_key`` without a ``dose_key`` (the units of no dose would be read by nothing), or the
        same column as both."""
        if self.dose_unit_key is not None and self.dose_key is None:
            raise ContractError(
                f"The dose unit column {self.dose_unit_key!r} is named without a dose column, so no dose would be "
                "read in its units. Name the column of the dose values too (dose_key='<obs column>'; CLI: "
                "--dose-key), or leave out dose_unit_key (--dose-unit-key).")
        if self.dose_unit_key is not None and self.dose_unit_key == self.dose_key:
            raise ContractError(
                f"{self.dose_key!r} is named as both the dose column and the dose unit column. Name the column of "
                "each dose's unit (e.g. 'dose_unit'; CLI: --dose-unit-key), or leave dose_unit_key out where the "
                "doses carry their units ('10uM').")

    def context_columns(self, adata: ad.AnnData) -> list[str]:
        """The obs columns the context is read from: ``[context_key]``, or, for a context of several columns
        (``"cell_type+patient"``) that ``adata`` does not hold as one column, each of them; ``[]`` without one."""
        key = self.context_key
        if key is None:
            return []
        if key in adata.obs.columns or CONTEXT_SEP not in key:
            return [key]
        return [k.strip() for k in key.split(CONTEXT_SEP) if k.strip()]

    def has_context(self, adata: ad.AnnData) -> bool:
        """Whether ``adata`` holds this contract's context (its column, or every column of a composite one)."""
        cols = self.context_columns(adata)
        return bool(cols) and all(c in adata.obs.columns for c in cols)

    # ------------------------------------------------------------------ #
    def labels(self, adata: ad.AnnData) -> np.ndarray:
        """The perturbation label of every cell, as strings (each of ``other_controls`` read as ``control``), without
        spaces around them: ``'control '`` is ``'control'`` (a warning says so), in training, prediction, the split of
        the controls and evaluation alike (predict took the ``'control'`` cells alone, split_controls measured the
        others as a perturbation). The warning is said once per public call (:func:`one_reading`), at the user's
        line."""
        column = adata.obs[self.perturbation_key].astype(str)
        stripped = column.str.strip()
        spaced = stripped != column
        if spaced.any():
            examples = sorted({repr(x) for x in column[spaced.to_numpy()]})
            if _first_time(("spaced labels", self.perturbation_key, tuple(examples))):
                key = self.perturbation_key
                warnings.warn(f"{int(spaced.sum())} cells' labels in obs[{key!r}] have spaces around them "
                              f"({preview(examples, 4)}): read without them. To silence this, strip them: "
                              f"adata.obs[{key!r}] = adata.obs[{key!r}].astype(str).str.strip().",
                              VirtualCellWarning, stacklevel=user_stacklevel())
        labels = stripped.to_numpy()
        if self.other_controls:
            labels = np.where(np.isin(labels, self.other_controls), self.control, labels)
        return labels

    def quantities(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray]:
        """Every cell's dose and time, NaN where the contract names no such column or the cell has none (an
        empty value, ``NaN``/``none``/``-``, or a dose of 0).

        A value is a number with an optional unit (``10``, ``"10"``, ``"10uM"``, ``"24 h"``; a combination's
        ``"1+1"``, one value per part, reads as that value where the parts' values are one: a cell has one dose and
        one time, and parts given different ones, ``"1+10"``, are refused); with ``dose_unit_key``, a dose's unit is
        its cell's value in that column (``10000`` and ``"nM"`` read as ``"10000nM"``; a dose that holds a unit
        already keeps it where the column agrees or is empty). Times are read in hours (``"30min"`` is 0.5). Doses
        stay in the unit they are given in; where one family of units comes in several (``"100nM"`` and ``"1uM"``),
        its doses are put on the family's common unit (0.1 and 1, in uM; mass concentrations in ng/ml). Families
        may differ between agents (drugs in uM, cytokines in ng/ml), never within one. A perturbed cell's value that
        is no number, a unit that is not a time, some doses with a unit and others without, one agent's doses in
        units that do not convert to one another, a dose without a unit in the unit column, a dose whose own unit the
        unit column contradicts, or one value per part of a combination that differ, stop with a
        :class:`ContractError` naming them (a control cell's values are not read)."""
        dose, time, _ = self.read_quantities(adata)
        return dose, time

    def dose_units(self, adata: ad.AnnData) -> dict[str, str]:
        """The unit of the doses :meth:`quantities` reads, for each agent with a dose (a label, or each part of a
        pair's label, by its name: ``'drug:drugC'`` is ``drugC``, and a part written as a genetic one, ``'ko:TF06'``,
        none; ``{"drugA": "uM", "IFNB": "ng/ml"}``), or ``{}`` for plain numbers (each in the data's own unit) or no
        dose column."""
        return self._read(adata, self.dose_key, "dose")[1]

    def read_quantities(self, adata: ad.AnnData) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """:meth:`quantities` and :meth:`dose_units` from one reading of the columns: ``(dose, time, units)``."""
        dose, units = self._read(adata, self.dose_key, "dose")
        return dose, self._read(adata, self.time_key, "time")[0], units

    def _read(self, adata: ad.AnnData, key: str | None, what: str) -> tuple[np.ndarray, dict[str, str]]:
        if key is None:
            return np.full(adata.n_obs, np.nan), {}
        perturbed = ~self.is_control(adata)
        text = adata.obs[key].astype(str).to_numpy().astype(object)
        unit_key = self.dose_unit_key if what == "dose" else None
        if unit_key is not None:  # each dose beside its unit, read as one value ("10000" and "nM": "10000nM")
            if unit_key in adata.obs.columns:
                text = text + _UNIT_SEP + adata.obs[unit_key].astype(str).to_numpy().astype(object)
            elif perturbed.any():  # (control cells alone, as a baseline's: their units are not read)
                raise _not_a_column("dose unit", unit_key, adata)
        values, cell = np.unique(text, return_inverse=True)  # once per value
        cell = cell.ravel()
        read_by = np.zeros(values.size, dtype=bool)
        read_by[np.unique(cell[perturbed])] = True
        values, differ = _one_value_per_cell(values, read_by, what=what)
        if differ:
            self._refuse_values_per_part(adata, differ, cell, perturbed, what=what, key=key)
        number, unit = _column_values(values, read_by, what=what, key=key, unit_key=unit_key)
        if what == "time":
            unknown = sorted({str(u) for u in unit[read_by] if u and hours_per(u) is None})
            if unknown:
                raise ContractError(f"The time column {key!r} has units that are not times: {preview(unknown, 6)}. "
                                    "Write times in h, min or d (e.g. '24h').")
            return _rounded(number * np.array([hours_per(u) or 1.0 for u in unit]))[cell], {}
        number = np.where(number == 0, np.nan, number)  # a dose of 0 is no dose, whatever its unit
        factor, units = _dose_scale(number, unit, cell[perturbed], self.labels(adata)[perturbed], key=key)
        return _rounded(number * factor)[cell], units

    def _refuse_values_per_part(self, adata: ad.AnnData, differ: dict[int, str], cell: np.ndarray,
                                perturbed: np.ndarray, *, what: str, key: str) -> None:
        """Refuse the values of a dose or time column that give a cell one value per part, and not the same one
        (``differ``: each such value's index -> its text), naming the labels that carry them."""
        labels = self.labels(adata)
        said, named = [], set()
        for i, text in sorted(differ.items(), key=lambda kv: kv[1]):
            these = sorted(set(labels[perturbed & (cell == i)]))
            said.append(f"{preview(these, 2)} at {text!r}")
            named.update(these)
        raise ContractError(
            f"The {what} column {key!r} gives cells one {what} per part of their label, and not the same one ("
            f"{'; '.join(said[:4])}{'; ...' if len(said) > 4 else ''}): virtualcell reads one dose and one time per "
            f"cell, which a combination's parts share, so all but the first {what} would be dropped without a word. "
            f"Give each such cell one {what} for all its parts (the first part's, e.g., where a combination's {what}s "
            f"keep one ratio throughout the screen; a part that takes none, a knockout, may be left empty: '1uM+'), "
            f"or leave those cells out (adata = adata[~adata.obs[{self.perturbation_key!r}].isin("
            f"{sorted(named)[:3]!r})]).")

    def conditions(self, adata: ad.AnnData, quantities: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
        """The condition of every cell, as strings: its label, followed by its dose and time where the
        contract names those columns (``"drugA@10"``, ``"drugA@10,24h"``; :func:`~virtualcell.perturbations.quantity_suffix`);
        control cells keep the control label. Pairing, the baselines, the validation verdict and
        evaluation group cells by condition, so the doses of a drug are never pooled into one group.
        ``quantities``: ``adata``'s :meth:`quantities`, where the caller has read them already."""
        labels = self.labels(adata)
        if self.dose_key is None and self.time_key is None:
            return labels

        dose, time = self.quantities(adata) if quantities is None else quantities
        # one suffix per distinct (dose, time), NaN (none) written as -inf so that it is one value too
        pairs, cell = np.unique(np.nan_to_num(np.column_stack([dose, time]), nan=-np.inf), axis=0, return_inverse=True)
        suffix = np.array([quantity_suffix(*(None if np.isinf(x) else float(x) for x in pair)) for pair in pairs],
                          dtype=object)[cell.ravel()]
        out = labels.astype(object)
        quantified = (np.isfinite(dose) | np.isfinite(time)) & (labels != self.control)
        out[quantified] = out[quantified] + suffix[quantified]
        return out.astype(str)

    def without_quantities_absent_from(self, adata: ad.AnnData) -> DataContract:
        """This contract without the dose and time columns that ``adata`` lacks (and without the dose unit column
        where the dose column goes): predicted cells and baseline predictions carry no dose column, since their
        labels already name the condition (``"drugA@10"``), so their :meth:`conditions` are their labels."""
        from dataclasses import replace

        cols = adata.obs.columns
        dosed = self.dose_key is None or self.dose_key in cols  # (a unit column without a dose: validate refuses it)
        return replace(self, dose_key=self.dose_key if self.dose_key in cols else None,
                       time_key=self.time_key if self.time_key in cols else None,
                       dose_unit_key=self.dose_unit_key if dosed else None)

    @staticmethod
    def whole_floats(contexts: Iterable[str], known: Iterable[str]) -> str:
        """A sentence for contexts written as whole-number floats where ``known`` has them as integers ('1.0' for
        '1': a column of patients turned float by a merge with missing values); '' where there are none."""
        def whole(context: str) -> str:  # each value of a context of several columns ('CD4T|1.0') on its own
            return CONTEXT_VALUE_SEP.join(str(int(float(v))) if re.fullmatch(r"-?[0-9]+\.0", v) else v
                                          for v in context.split(CONTEXT_VALUE_SEP))

        known = {str(k) for k in known}
        floats = sorted({c for c in map(str, contexts) if c not in known and whole(c) in known})
        if not floats:
            return ""
        return (f" The contexts {preview(floats, 3)} are whole numbers written as floats, where the model and data "
                f"have {preview([whole(c) for c in floats], 3)}: make the column integers, e.g. adata.obs[col] = "
                "adata.obs[col].astype(int).")

    def contexts(self, adata: ad.AnnData) -> np.ndarray:
        """The context of every cell (a single ``"all"`` context when there is no context column). A context of
        several columns (``context_key="cell_type+patient"``) is their values joined: ``"CD4T|patient1"``."""
        if self.context_key is None:
            return np.full(adata.n_obs, "all", dtype=object)
        cols = self.context_columns(adata)
        for col in cols:  # (read as the string 'nan', a missing value was a context of its own in the Simulator)
            if adata.obs[col].isna().any():
                raise ContractError(f"The context column {col!r} has {int(adata.obs[col].isna().sum())} missing "
                                    "values. Fill them (with each cell's cell type, patient or batch) or drop those "
                                    "cells.")
        columns = [adata.obs[col].astype(str).to_numpy().astype(object) for col in cols]
        if len(cols) > 1:  # joined with CONTEXT_VALUE_SEP: a value holding it would merge two contexts into one
            for col, values in zip(cols, columns):
                joined = sorted({v for v in set(values) if CONTEXT_VALUE_SEP in v})
                if joined:
                    raise ContractError(
                        f"The context column {col!r} has values holding {CONTEXT_VALUE_SEP!r} ({preview(joined, 3)}), "
                        f"which joins the columns of the composite context {self.context_key!r}, so two contexts "
                        "could read as one. Replace it in those values, e.g. "
                        f"adata.obs[{col!r}] = adata.obs[{col!r}].astype(str).str.replace({CONTEXT_VALUE_SEP!r}, '/').")
        out = columns[0]
        for values in columns[1:]:
            out = out + CONTEXT_VALUE_SEP + values
        return out

    def is_control(self, adata: ad.AnnData) -> np.ndarray:
        """A boolean per cell: whether its label is the control (or one of :attr:`other_controls`)."""
        return self.labels(adata) == self.control

    def labels_elsewhere(self, adata: ad.AnnData, known: set[str]) -> list[tuple[str, str]]:
        """Where ``adata`` lacks the perturbation column: the other obs columns that hold a control label (any case)
        beside labels in ``known`` (upper case: what the model knows as perturbations or genes; a value's dose
        ``@10`` aside too), the perturbations under another name (``'pert'``), each with its control label as that
        column spells it; a column of controls and patients, or one with missing values, is none."""
        if self.perturbation_key in adata.obs.columns:
            return []
        controls = {c.upper() for c in self.controls}
        found = []
        for name in adata.obs.columns:
            column = adata.obs[name]
            if column.dtype.kind in "biuf":  # numbers are no labels
                continue
            values = {str(v).strip() for v in column.dropna().unique()} - {""}
            spelled = sorted(v for v in values if v.upper() in controls)
            others = {v.upper() for v in values if v.upper() not in controls}
            if spelled and (others & known or {v.rpartition("@")[0] for v in others if "@" in v} & known):
                found.append((str(name), spelled[0]))
        return found

    def perturbations(self, adata: ad.AnnData) -> list[str]:
        """The distinct non-control labels, sorted."""
        return sorted(set(self.labels(adata)) - {self.control})

    # ------------------------------------------------------------------ #
    def to_dict(self) -> dict[str, Any]:
        """The contract's fields as a dict (:meth:`from_dict` reads it back)."""
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataContract:
        """The contract :meth:`to_dict` (or :meth:`attach`, in ``uns``) wrote; keys it does not know are left out."""
        # h5ad cannot store None, so attach() writes "" for an absent optional column
        known = {k: (None if isinstance(d[k], str) and d[k] == "" else d[k]) for k in cls.__dataclass_fields__ if k in d}
        if "other_controls" in known:
            known["other_controls"] = () if known["other_controls"] is None else tuple(known["other_controls"])
        return cls(**known)

    @classmethod
    def from_adata(cls, adata: ad.AnnData) -> DataContract:
        """The contract stored in ``adata.uns["virtualcell"]["contract"]`` (datasets set it)."""
        stored = adata.uns.get(UNS_KEY, {}).get("contract") if isinstance(adata.uns.get(UNS_KEY), dict) else None
        if not stored:
            raise ContractError(
                "This AnnData carries no data contract (which obs columns hold the perturbations and controls). "
                "Pass one: contract=DataContract(perturbation_key='<obs column>', control='<control label>', "
                "context_key=...) (CLI: --perturbation-key, --control, --context-key)."
            )
        if isinstance(stored, str):
            stored = json.loads(stored)
        return cls.from_dict(dict(stored))

    def attach(self, adata: ad.AnnData) -> None:
        """Store the contract in ``adata.uns`` so that it travels with the data."""
        adata.uns.setdefault(UNS_KEY, {})
        adata.uns[UNS_KEY]["contract"] = {k: ("" if v is None or v == () else list(v) if isinstance(v, tuple) else v)
                                          for k, v in self.to_dict().items()}


def control_labels(text: str) -> tuple[str, tuple[str, ...]]:
    """``(control, other_controls)`` of a command line's ``--control``: one label, or several separated by commas
    (``"NT_1,NT_2"`` -> ``("NT_1", ("NT_2",))``)."""
    labels = [x.strip() for x in str(text).split(",") if x.strip()]
    if not labels:
        raise ContractError(f"--control {text!r} names no label: give the label of the control cells (several: "
                            "separate them with commas, e.g. --control NT_1,NT_2).")
    return labels[0], tuple(labels[1:])


# the values that mean "no dose" or "no time" in a column (lower case, stripped)
_NO_VALUE = frozenset({"", "nan", "none", "na", "n/a", "-", "null", "<na>"})
_QUANTITY_ROLES = ("dose", "dose unit", "time")  # columns where a missing value is no value (a control's)
_UNIT_SEP = "\x1f"  # joins a dose to its unit column's value while the distinct pairs are read


def _not_a_column(role: str, key: str, adata: ad.AnnData) -> ContractError:
    """The refusal of a contract's column that ``adata.obs`` lacks, with the names closest to it and the CLI flag."""
    hint = close_matches(key, adata.obs.columns)
    did = f" Did you mean {preview(hint, 3)}?" if hint else ""
    return ContractError(f"The {role} column {key!r} is not in adata.obs.{did} obs columns: "
                         f"{preview(adata.obs.columns, 15) or 'none'}. Pass the right name "
                         f"(CLI: --{role.replace(' ', '-')}-key).")


def _same_unit(a: str, b: str) -> bool:
    """Whether two spellings of a dose unit name one unit (``"uM"`` and ``"µM"``, ``"ug/ml"`` and ``"mg/l"``)."""
    return a.strip().lower() == b.strip().lower() or dose_on_one_scale(a) == dose_on_one_scale(b)


def _one_value_per_cell(values: np.ndarray, read_by: np.ndarray, *, what: str) -> tuple[np.ndarray, dict[int, str]]:
    """Each distinct value of a dose or time column that gives one value per part of a combination ('1+1', '6h+6h';
    a dose with its unit column's value joined by ``_UNIT_SEP``, either of which may be so written: '1+1' beside
    'uM+uM') as one value, where its parts' values are one (a part without a value, or a dose of 0, gives none; a part
    without a unit takes another part's: '1uM+1' is 1uM); and ``{index: text}`` of those ``read_by`` marks whose
    parts' values differ ('1+10', '6h+24h', '10ng/ml+1uM'). A part that is no number is left for the column's reading
    to refuse."""
    out = values.copy()
    differ: dict[int, str] = {}
    for i, v in enumerate(values):
        text, sep, given = str(v).partition(_UNIT_SEP)
        texts, givens = _JOINING_PLUS.split(text), _JOINING_PLUS.split(given)
        if len(texts) == 1 and len(givens) == 1:
            continue
        said = text.strip() + (f" {given.strip()}" if given.strip() else "")
        if len(texts) > 1 and len(givens) > 1 and len(texts) != len(givens):  # (parts that do not match)
            differ.update({i: said} if read_by[i] else {})
            continue
        n = max(len(texts), len(givens))
        valued = []  # (text, its unit column's value, (number, unit)) of each part with a value
        for k in range(n):
            t, g = texts[min(k, len(texts) - 1)].strip(), givens[min(k, len(givens) - 1)].strip()
            g = "" if g.lower() in _NO_VALUE else g
            if t.lower() in _NO_VALUE:
                continue
            q = read_quantity(t)
            if q is None:  # (no number: the column's reading refuses it, as this part)
                break
            if not (what == "dose" and q[0] == 0):  # (a dose of 0 is no dose)
                valued.append((t, g, q))
        else:
            unit = next((q[1] or g for _, g, q in valued if q[1] or g), "")  # (a part without a unit takes this)
            amounts = {_amount(q[0], q[1] or g or unit, what) for _, g, q in valued}
            if len(amounts) > 1:
                differ.update({i: said} if read_by[i] else {})
                continue
            if not valued:
                out[i] = sep
                continue
            t, g, q = valued[0]
            out[i] = t + (sep + (g or unit) if sep else ("" if q[1] else unit))
            continue
        out[i] = t + (sep + g if sep else "")
    return out, differ


def _amount(number: float, unit: str, what: str) -> tuple[str, float]:
    """A dose or time as one value to compare: its family's common unit and the number in it (a unit of no known
    family is its own; a time in hours)."""
    if what == "time":
        hours = hours_per(unit)
        return ("h", float(f"{number * hours:.12g}")) if hours is not None else (unit, number)
    common, factor = dose_on_one_scale(unit)
    return common.lower(), float(f"{number * factor:.12g}")


def _column_values(values: np.ndarray, read_by: np.ndarray, *, what: str, key: str,
                   unit_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The number and unit (``""``: none) of each distinct value of a dose or time column, NaN for no value;
    ``read_by`` marks the values perturbed cells carry, the only ones a value that is no number stops. With
    ``unit_key`` (the dose unit column), each value is a dose and its unit joined by ``_UNIT_SEP``: a dose without a
    unit of its own takes the column's, one with a unit keeps it where the column agrees or is empty."""
    number = np.full(values.size, np.nan)
    unit = np.full(values.size, "", dtype=object)
    bad, no_unit, disagree, numeric, unknown = [], [], [], [], set()
    for i, v in enumerate(values):
        text, _, given = str(v).partition(_UNIT_SEP)
        # a pair's units ('nM+uM') read as its first, as its doses ('1+1') are
        text, given = text.strip(), first_quantity(given.strip()).strip()
        given = "" if given.lower() in _NO_VALUE else given
        if text.lower() in _NO_VALUE:
            continue
        as_number = read_quantity(given) if given and read_by[i] else None
        if as_number is not None and as_number[1] == "":
            numeric.append(given)  # a number where a unit belongs: the wrong column
            continue
        if given and read_by[i] and given.isalpha() and not known_dose_unit(given):
            unknown.add(given)  # a word where a unit belongs ('drug', 'A'), not a unit of its own such as 'U/ml'
        q = read_quantity(first_quantity(text))
        if q is not None and given:
            if q[1] and not _same_unit(q[1], given):
                disagree += [f"{text} beside {given}"] if read_by[i] else []
            elif not q[1]:
                q = read_quantity(f"{first_quantity(text)}{given}")  # (None: a unit that is no unit, 'nM (approx.)')
        if q is None:
            bad += [str(v) if unit_key is None else f"{text} {given}".strip()] if read_by[i] else []
        else:
            number[i], unit[i] = q
            if unit_key is not None and not q[1] and q[0] != 0 and read_by[i]:  # (a dose of 0 is no dose)
                no_unit.append(text)
    if numeric:
        raise ContractError(
            f"The dose unit column {unit_key!r} holds numbers, not units: {preview(sorted(set(numeric)), 6)}. Name "
            f"the column of each dose's unit ('nM', 'uM', 'ng/ml'; CLI: --dose-unit-key), or leave dose_unit_key out "
            f"where the dose column {key!r} carries its units.")
    if unknown and _first_time(("units of no family", key, unit_key, tuple(sorted(unknown)))):
        log.warning("The dose unit column %r holds units of no molar or mass family (%s): each is read as a unit of "
                    "its own. If that column holds something else, name the column of each dose's unit "
                    "(--dose-unit-key).", unit_key, preview(sorted(unknown), 6))
    negative = [b for b in bad if negative_quantity(first_quantity(b.strip()))]
    if negative:
        raise ContractError(f"The {what} column {key!r} has negative values: {preview(negative, 6)}. A {what} is "
                            f"positive; leave it empty where a cell has no {what}.")
    if bad:
        example = "'10', '10uM'" if what == "dose" else "'24', '24h', '30min'"
        joined = f" (each read with its unit from the dose unit column {unit_key!r})" if unit_key is not None else ""
        raise ContractError(
            f"The {what} column {key!r} has values that are not a number with an optional unit{joined}: "
            f"{preview(bad, 6)}. Write each {what} as one ({example}), or leave it empty where a cell has no {what}.")
    if disagree:
        raise ContractError(
            f"The dose column {key!r} gives doses with a unit that the dose unit column {unit_key!r} contradicts (dose "
            f"beside unit): {preview(disagree, 6)}. Keep each dose's unit in one place: write the dose column as "
            f"numbers (their unit in {unit_key!r}), or correct {unit_key!r}; or leave out dose_unit_key (CLI: "
            "--dose-unit-key) to read the units the doses carry.")
    if no_unit:
        raise ContractError(
            f"The dose unit column {unit_key!r} has no unit for doses of perturbed cells: {preview(no_unit, 6)} "
            f"(in the dose column {key!r}). Give each dosed cell its unit (e.g. 'nM'), or leave its dose empty (or 0) "
            "where a cell has no dose.")
    return number, unit


def _dose_scale(number: np.ndarray, unit: np.ndarray, cell: np.ndarray, label: np.ndarray, *,
                key: str) -> tuple[np.ndarray, dict[str, str]]:
    """The factor that puts each distinct dose value on its family's one unit, and each dosed agent's unit (an
    agent: a label, or each part of a pair's label; ``{}``: plain numbers); ``cell``/``label``: the value index and
    label of every perturbed cell."""
    import pandas as pd

    seen = pd.DataFrame({"label": label, "value": cell}).drop_duplicates()
    seen = seen[np.isfinite(number[seen["value"].to_numpy()])]
    used = sorted({str(unit[v]) for v in seen["value"]})
    if used in ([], [""]):
        return np.ones(number.size), {}
    if "" in used:
        raise ContractError(f"The dose column {key!r} gives some doses in {preview(used[1:], 6)} and others without a "
                            "unit: give every dose its unit, or write every one as a plain number in one unit.")
    family = {u: dose_on_one_scale(u)[0] for u in used}  # (a unit of no known family is its own)
    seen["family"] = [family[str(unit[v])] for v in seen["value"]]
    # per agent: a pair's dose is its agents' too ('drugA+drugB' at 10nM beside drugB alone at 5ng/ml is drugB in two
    # families; checked per label, the pair's number took drugB's ng/ml)
    seen["agent"] = [_dosed_agents(str(lab)) for lab in seen["label"]]
    by_agent = seen.explode("agent").dropna(subset=["agent"])
    families = by_agent.groupby("agent")["family"].nunique()
    if (families > 1).any():
        agent = str(families.index[families.to_numpy() > 1][0])
        rows = by_agent[by_agent["agent"] == agent]
        units = sorted({f"{unit[v]} ({lab})" for v, lab in zip(rows["value"], rows["label"])})
        raise ContractError(
            f"The doses of {agent!r} in the dose column {key!r} are in units that do not convert to one another "
            f"({preview(units, 6)}): give each agent's doses in one unit (nM and uM convert to each other, as do "
            "ng/ml and ug/ml), also where it is part of a combination.")
    in_family = {f: sorted(u for u in used if family[u] == f) for f in set(family.values())}
    target = {f: us[0] if len(us) == 1 else f for f, us in in_family.items()}  # one unit kept; several: the common
    factor = np.array([dose_on_one_scale(str(u))[1] / dose_on_one_scale(target[family[str(u)]])[1]
                       if str(u) in family else 1.0 for u in unit])
    return factor, {str(a): target[f] for a, f in zip(by_agent["agent"], by_agent["family"])}


def _dosed_agents(label: str) -> list[str]:
    """The agents a label's dose may be of, each by its name as a typed perturbation has it: each part of its label
    (``'drugA+drugB'``), a part written typed by its name (``'drug:drugC'`` is the agent ``drugC``, as a label
    ``'drugC'`` is), and none for a part written as a genetic perturbation or a plain label (``'ko:TF06'`` takes no
    dose). One agent's doses in two families of units are refused, however its labels spell it."""
    from .perturbations import written_kind

    agents = []
    for part in (x.strip() for x in split_label(label)):
        typed = written_kind(part)
        if typed is None:
            agents += [part] if part else []
        elif typed[0] in ("drug", "cytokine"):
            agents.append(typed[1])
    return agents


def _rounded(x: np.ndarray) -> np.ndarray:
    """12 significant digits: 300nM is 0.3uM, not 0.30000000000000004."""
    return np.array([float(f"{v:.12g}") for v in x])


def _by_count(labels: np.ndarray) -> list[str]:
    """The distinct labels, the most frequent first (a screen's controls, usually the largest group, show among the
    first; sorted by name they hid behind a dozen perturbations), ties by name."""
    values, counts = np.unique(np.asarray(labels, dtype=str), return_counts=True)
    return [str(values[i]) for i in np.lexsort((values, -counts))]
