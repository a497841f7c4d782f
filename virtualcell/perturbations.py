"""Typed perturbations: genetic (knockout, knockdown, activation), drugs, cytokines, combinations.

The text syntax, one perturbation per panel line::

    control
    ko:STAT1                    knockout        (also knockout:, crispr:, crispr-ko:)
    kd:STAT1                    knockdown       (also knockdown:, crispri:, sirna:, shrna:)
    act:STAT1                   activation      (also activation:, crispra:, oe:)
    drug:dexamethasone@10uM,24h drug with dose and time (both optional)
    cytokine:IFNB@100ng/ml      cytokine with dose
    drug:dexamethasone@{0.1,1,10}uM   one line a choice in {...}: a dose series (also ko:{STAT1,JAK2})
    ko:STAT1 + drug:ruxolitinib@1uM        a combination (parts joined by '+')
    STAT1                       a plain label, exactly as in a model's training data
    KLF1+MAP2K6                 a pair of plain labels

The prefixes are :data:`KIND_ALIASES`, the same names a training set's kind column may use.

Examples
--------
>>> from virtualcell.perturbations import parse
>>> p = parse("drug:dexamethasone@10uM,24h")
>>> p.kind, p.target, p.dose, p.dose_unit, p.time, p.time_unit
('drug', 'dexamethasone', 10.0, 'uM', 24.0, 'h')
>>> str(parse("ko:stat1 + act:MYC"))
'act:MYC + ko:STAT1'
>>> parse("ko:STAT1").describe()
'CRISPR knockout of STAT1'
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Any, Literal

from .errors import DataError, PerturbationError

__all__ = ["Perturbation", "Combination", "parse", "parse_panel", "panel_lines", "expand", "quantity_suffix",
           "without_quantities", "dose_on_one_scale", "known_dose_unit", "hours_per", "read_quantity", "in_units",
           "condition_in_units", "condition_parts", "written_kind", "units_text", "units_of_text", "first_quantity", "label_parts", "control_words",
           "parts_of", "KINDS", "GENETIC", "KIND_ALIASES"]

Kind = Literal["control", "knockout", "knockdown", "activation", "drug", "cytokine", "label"]
KINDS: tuple[str, ...] = ("control", "knockout", "knockdown", "activation", "drug", "cytokine", "label")
GENETIC = frozenset({"knockout", "knockdown", "activation"})

# every name of a kind, lower case: panel prefixes ("kd:MYC") and the values of a training set's
# kind column (TrainConfig.kind_key) both read this one table
KIND_ALIASES: dict[str, str] = {
    "ko": "knockout", "knockout": "knockout", "crispr": "knockout", "crispr-ko": "knockout", "crisprko": "knockout",
    "crispr-cas9": "knockout", "cas9": "knockout",  # (scPerturb's perturbation_type)
    "kd": "knockdown", "knockdown": "knockdown", "crispri": "knockdown", "sirna": "knockdown", "shrna": "knockdown",
    "act": "activation", "activation": "activation", "crispra": "activation", "oe": "activation",
    "overexpression": "activation",
    "drug": "drug", "compound": "drug", "chemical": "drug", "small molecule": "drug",
    "cytokine": "cytokine", "cyto": "cytokine", "ligand": "cytokine", "stimulation": "cytokine",
    "label": "label", "control": "control",
}
_SHORT = {"knockout": "ko", "knockdown": "kd", "activation": "act", "drug": "drug", "cytokine": "cytokine", "label": "label"}
_DESCRIBE = {"knockout": "CRISPR knockout of", "knockdown": "CRISPRi knockdown of", "activation": "CRISPRa activation of"}
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµμ/%]*)\s*$")  # µ: micro sign, μ: Greek mu
_TIME_UNITS = {"h": 1.0, "hr": 1.0, "hrs": 1.0, "hours": 1.0, "hour": 1.0, "min": 1 / 60, "m": 1 / 60, "d": 24.0, "day": 24.0, "days": 24.0}
_GENE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$")
# dose unit families: each unit's factor to its family's common unit (lower case, 'µ' read as 'u')
_MOLAR = {"pm": 1e-6, "nm": 1e-3, "um": 1.0, "mm": 1e3, "m": 1e6}
_MASS = {"pg/ml": 1e-3, "ng/ml": 1.0, "ug/ml": 1e3, "mg/ml": 1e6, "g/l": 1e6, "mg/l": 1e3, "ug/l": 1.0}
# activity (a cytokine's international units): U/ml, IU/ml and units/ml are one unit written three ways; kU/ml 1000
_ACTIVITY = {"u/ml": 1.0, "iu/ml": 1.0, "units/ml": 1.0, "unit/ml": 1.0, "ku/ml": 1e3, "kiu/ml": 1e3}
_COMMON = (("uM", _MOLAR), ("ng/ml", _MASS), ("U/ml", _ACTIVITY))


def _unit_key(unit: str | None) -> str:
    return (unit or "").strip().lower().replace("µ", "u").replace("μ", "u")


def _dose_family(unit: str | None) -> tuple[str, float] | None:
    key = _unit_key(unit)
    return next(((common, family[key]) for common, family in _COMMON if key in family), None)


def known_dose_unit(unit: str | None) -> bool:
    """Whether ``unit`` is a molar or mass concentration or an activity (``"nM"``, ``"µM"``, ``"ng/ml"``,
    ``"U/ml"``): those :func:`dose_on_one_scale` converts."""
    return _dose_family(unit) is not None


def dose_on_one_scale(unit: str | None) -> tuple[str, float]:
    """``(common unit, factor)`` of a dose unit: molar units to uM, mass concentrations to ng/ml, activities to U/ml
    (``"nM"`` -> ``("uM", 0.001)``; ``"IU/ml"`` and ``"units/ml"`` -> ``("U/ml", 1.0)``); a unit of no known family
    keeps itself (factor 1)."""
    return _dose_family(unit) or (unit or "", 1.0)


def read_kinds(adata: Any, kind_key: str, *, controls: Any = None) -> list[str]:
    """Each cell's perturbation kind from the column of kinds ``adata.obs[kind_key]`` (any alias of
    :data:`KIND_ALIASES`, any case: ``CRISPRa`` is ``activation``); a missing column or an unknown kind is refused.
    A combination's kinds may be written one per part, joined by '+' in the order of its label's parts
    (``drug+knockout`` for ``drugA+TF06``): each part is read as an alias, and the kinds come back joined the same
    way (``compound+ko`` is ``drug+knockout``). ``controls`` (a mask of the control cells): their value is not read,
    as a dose column's is not (an empty one stopped training as an unknown kind 'nan')."""
    if kind_key not in adata.obs.columns:
        raise DataError(f"kind column {kind_key!r} is not in adata.obs; columns: {list(adata.obs.columns)[:15]}.")
    raw = adata.obs[kind_key].astype(str).str.lower().to_numpy()
    if controls is not None:
        import numpy as np

        raw = np.where(np.asarray(controls, dtype=bool), "control", raw)
    from .errors import preview

    values = sorted(set(raw))
    # a value joined with '+' holds one kind per part of a combination's label ('drug+knockout'); each part is read
    per_part = {v: [x.strip() for x in v.split("+")] for v in values if "+" in v}
    unknown = sorted({v for v in values if v not in per_part and v not in KIND_ALIASES}
                     | {v for v, ks in per_part.items() if any(k not in KIND_ALIASES for k in ks)})
    if unknown:
        written = next(x for x in adata.obs[kind_key].astype(str) if x.lower() == unknown[0])  # (as the file spells it)
        bad = sorted({k for v in unknown if v in per_part for k in per_part[v] if k not in KIND_ALIASES})
        joined = ("" if not any(v in per_part for v in unknown) else
                  f" A combination's kinds are written one per part, joined by '+' in the order of its label's parts "
                  f"(e.g. 'drug+knockout' for 'drugA+TF06'): {preview(bad, 5)} in "
                  f"{preview([v for v in unknown if v in per_part], 5)} "
                  f"{'is' if len(bad) == 1 else 'are'} no kind.")
        mapped = "+".join(k if k in KIND_ALIASES else "knockout" for k in per_part.get(unknown[0], [unknown[0]]))
        raise DataError(
            f"Unknown perturbation kinds {unknown} in obs[{kind_key!r}]; known: {sorted(KIND_ALIASES)}.{joined} Map "
            f"each to one, e.g. adata.obs[{kind_key!r}] = adata.obs[{kind_key!r}].replace({{{written!r}: "
            f"{mapped!r}}}) (or 'knockdown', 'activation', 'drug', 'cytokine', "
            "'label' for a perturbation of no kind).")
    return ["+".join(KIND_ALIASES[k] for k in per_part[v]) if v in per_part else KIND_ALIASES[v] for v in raw]


# labels that name a control in most screens; one of them trained as a perturbation is worth a warning
CONTROL_LIKE = frozenset({"control", "ctrl", "non-targeting", "nontargeting", "non_targeting", "nt", "dmso", "vehicle",
                          "untreated", "mock", "unperturbed", "safe-targeting",
                          # (a stimulation's: cells left unstimulated, or given the carrier alone)
                          "unstim", "unstimulated", "pbs", "medium", "resting"})


def label_stem(label: str) -> str:
    """A label without a trailing number, lower case (``"NT_2"`` -> ``"nt"``): one guide of several, or a replicate."""
    return re.sub(r"[\W_]*\d+$", "", label).lower()


def looks_like_control(label: str) -> bool:
    """Whether ``label`` names a control in most screens (:data:`CONTROL_LIKE`), a trailing number aside
    (``NT_2``, ``DMSO1``)."""
    return label_stem(label) in CONTROL_LIKE or label.lower() in CONTROL_LIKE


def hours_per(unit: str | None) -> float | None:
    """Hours in one ``unit`` of time (no unit: hours), or None for a unit that is not a time (``M``, molar, is none:
    ``m`` is a minute)."""
    if (unit or "").strip() == "M":
        return None
    return _TIME_UNITS.get((unit or "h").strip().lower())


@dataclass(frozen=True)
class Perturbation:
    """One intervention. Genetic kinds target a gene symbol; drugs and cytokines have a name,
    an optional dose (value + unit) and time (value + unit); ``label`` is a plain training label."""

    kind: Kind
    target: str = ""
    dose: float | None = None
    dose_unit: str | None = None
    time: float | None = None
    time_unit: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise PerturbationError(f"Unknown perturbation kind {self.kind!r}; use one of {', '.join(KINDS)}.")
        if self.kind == "control":
            return
        if not self.target:
            raise PerturbationError(f"A {self.kind} needs a target (e.g. '{_SHORT[self.kind]}:NAME').")
        if self.kind in GENETIC:
            if not _GENE.match(self.target):
                # (a {a,b} group or a panel's lines: parse says what they are, with the whole text)
                grouped = any(c in self.target for c in "{}\n")
                joined = next((sep for sep in ("|", ",", ";", "&") if sep in self.target and not grouped), None)
                several = _listed(f"{_SHORT[self.kind]}:{self.target}") if joined == "," else None
                raise PerturbationError(
                    f"{self.target!r} is not a gene symbol (letters, digits, '.', '-', '_')."
                    + (f" A combination is written with '+' ({'+'.join(several)!r}), not ','; several "
                       f"perturbations are a list ({several!r})." if several else
                       f" A combination is written with '+' ({self.target.replace(joined, '+')!r}), not {joined!r}."
                       if joined and joined != "," else ""))
            object.__setattr__(self, "target", self.target.upper())
            if self.dose is not None or self.time is not None:
                raise PerturbationError(f"A {self.kind} takes no dose or time; use 'drug:' for compounds.")
        if self.dose is not None and self.dose < 0:
            raise PerturbationError(f"Dose must be >= 0, got {self.dose}.")
        if self.dose == 0:
            raise PerturbationError(
                f"{self.kind}:{self.target} at a dose of 0 is no {self.kind}: predict the control (or the vehicle's "
                "label) for untreated cells, or give a dose above 0. (A dose column reads 0 as no dose too.)")
        if self.time is not None and self.time < 0:
            raise PerturbationError(f"Time must be >= 0, got {self.time}.")

    @property
    def parts(self) -> tuple[Perturbation, ...]:
        return () if self.kind == "control" else (self,)

    @property
    def time_hours(self) -> float | None:
        """The time in hours (``24h``, ``90min`` -> 1.5, ``2d`` -> 48; a time without a unit reads as hours), or
        ``None`` without a time."""
        if self.time is None:
            return None
        return self.time * (hours_per(self.time_unit) or 1.0)

    def __str__(self) -> str:
        if self.kind == "control":
            return "control"
        if self.kind == "label":  # 'label:' where the bare name reads otherwise ('None' is the control, 'IL-2:high' a kind)
            bare = ":" not in self.target and self.target.strip().lower() not in CONTROL_WORDS
            return self.target if bare else f"label:{self.target}"
        s = f"{_SHORT[self.kind]}:{self.target}"
        return s + quantity_suffix(self.dose, self.time, dose_unit=self.dose_unit, time_unit=self.time_unit)

    def describe(self) -> str:
        """Natural-language text, as in C2S perturbation prompts."""
        if self.kind == "control":
            return "no perturbation (control)"
        if self.kind in GENETIC:
            return f"{_DESCRIBE[self.kind]} {self.target}"
        if self.kind == "label":
            return self.target
        text = self.target
        if self.dose is not None:
            text += f" at {_fmt(self.dose)} {self.dose_unit or ''}".rstrip()
        if self.time is not None:
            text += f" for {_fmt(self.time)} {self.time_unit or 'h'}"
        return text


@dataclass(frozen=True)
class Combination:
    """Several perturbations applied together; parts are kept in a canonical (sorted) order."""

    parts: tuple[Perturbation, ...]

    def __post_init__(self) -> None:
        flat: list[Perturbation] = []
        for p in self.parts:
            flat.extend(parts_of(p))
        flat = [p for p in flat if p.kind != "control"]
        if len(flat) < 2:
            raise PerturbationError("A combination needs at least two non-control parts.")
        if len(set(flat)) != len(flat):
            raise PerturbationError(f"A combination repeats a part: {' + '.join(map(str, flat))}.")
        genes = [p.target for p in flat if p.kind in GENETIC]
        if len(set(genes)) != len(genes):
            twice = sorted({g for g in genes if genes.count(g) > 1})
            raise PerturbationError(f"A combination perturbs {', '.join(twice)} twice ({' + '.join(map(str, flat))}): "
                                    "one gene takes one genetic perturbation (a knockout, knockdown or activation).")
        object.__setattr__(self, "parts", tuple(sorted(flat, key=str)))

    kind: str = "combination"

    def __str__(self) -> str:
        return " + ".join(str(p) for p in self.parts)

    def describe(self) -> str:
        return " and ".join(p.describe() for p in self.parts)


CONTROL_WORDS = frozenset({"control", "ctrl", "none"})  # read as the control when written alone
# words that follow a gene in a label to say what was done to it ('STAT1 KO', 'STAT1_ko'), not a second gene's name
EDIT_WORDS = frozenset({"KO", "KD", "OE", "KNOCKOUT", "KNOCKDOWN", "CRISPR", "CRISPRI", "CRISPRA", "SGRNA", "SG",
                        "GUIDE", "ACTIVATION", "OVEREXPRESSION"})


def parts_of(p: Perturbation | Combination) -> tuple[Perturbation, ...]:
    """The perturbations ``p`` applies: a combination's parts, or ``p`` alone (the control included, where
    :attr:`Perturbation.parts` is empty)."""
    return p.parts if isinstance(p, Combination) else (p,)


def _fmt(x: float) -> str:
    """A quantity as written in a name: six significant digits, never in exponent form (``1e+06`` would read as
    a combination, its ``+`` joining two parts)."""
    text = f"{x:g}"
    if "e" in text:
        text = f"{float(text):.15f}".rstrip("0").rstrip(".") if abs(x) < 1 else f"{float(text):.0f}"
    return text


# a '+' inside a number's exponent after '@' or ',' ("@1e+3nM"): not a combination's
_EXPONENT_PLUS = re.compile(r"([@,]\s*[0-9]*\.?[0-9]+[eE])\+([0-9])")


def split_label(text: str) -> list[str]:
    """A perturbation's or a label's parts, split at the '+' that join them: not one in a dose's exponent
    (``@1e+3nM``), nor one inside brackets, as a compound's name has (``(+)-JQ1`` is one drug, not '(' and ')-JQ1').
    The one reading of '+' for parsing, training labels, pairs' names and the baselines' parts.

    >>> split_label("(+)-JQ1+ko:STAT1"), split_label("drug:x@1e+3nM")
    (['(+)-JQ1', 'ko:STAT1'], ['drug:x@1e+3nM'])
    """
    text = _EXPONENT_PLUS.sub("\\1\x00\\2", text)
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == "+" and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    if depth:  # a bracket no one closes ('drug:a (b@1uM+ko:STAT1'): every '+' joins, as before brackets were read
        parts = text.split("+")
    return [p.replace("\x00", "+") for p in parts]


def label_parts(label: str, controls: Any = ()) -> list[str]:
    """A training label's parts (:func:`split_label`, stripped), without a part that names the control where another
    is left: GEARS-processed screens (Norman, Adamson, Dixit) write a single ``"KLF1+ctrl"``, which is KLF1, not a
    pair. ``controls``: the data's control labels, beside :data:`CONTROL_WORDS`.

    >>> label_parts("KLF1+ctrl"), label_parts("ctrl+KLF1+MAP2K6"), label_parts("NT_1+STAT1", ["NT_1"])
    (['KLF1'], ['KLF1', 'MAP2K6'], ['STAT1'])
    """
    parts = [x.strip() for x in split_label(label) if x.strip()]
    named = control_words(controls)
    rest = [x for x in parts if x.lower() not in named]
    return rest or parts


def control_words(controls: Any = ()) -> frozenset[str]:
    """The words (lower case) that name the control as a label's part: :data:`CONTROL_WORDS` and the data's own
    control labels ``controls``; what :func:`label_parts` drops and training's joined-labels warning reads."""
    return CONTROL_WORDS | {str(c).strip().lower() for c in controls}


_JOINING_PLUS = re.compile(r"(?<![0-9.][eE])\+")  # a '+' that joins two values, not an exponent's ('1.00E+01')


def first_quantity(text: str) -> str:
    """The first of the values a dose or time column's entry holds, its exponent kept: a spreadsheet's
    ``"1.00E+01"`` is 10, not ``"1.00E"``. A pair's entry reaches it once its parts are known to agree (``"1+1"``;
    the contract refuses ``"1+10"`` before, in ``_one_value_per_cell``)."""
    return _JOINING_PLUS.split(text, maxsplit=1)[0]


def without_quantities(p: Perturbation | Combination) -> Perturbation | Combination:
    """``p`` without its doses and times (``drug:A@10,24h`` -> ``drug:A``): the perturbation a training
    label stands for, whatever dose its cells had."""
    parts = parts_of(p)
    plain = [Perturbation(q.kind, q.target) if q.kind != "control" else q for q in parts]
    return plain[0] if len(plain) == 1 else Combination(tuple(plain))


def quantity_suffix(dose: float | None, time: float | None, *, dose_unit: str | None = None,
                    time_unit: str | None = None) -> str:
    """How a dose and a time are written after a name: ``"@10uM"``, ``"@10uM,24h"``, ``"@,24h"`` (a time
    without a dose), or ``""``. :func:`parse` reads every form back; a cell's condition in the data
    (:meth:`~virtualcell.contract.DataContract.conditions`) is its label with this suffix."""
    if dose is None and time is None:
        return ""
    text = f"@{_fmt(dose)}{dose_unit or ''}" if dose is not None else "@"
    return text + (f",{_fmt(time)}{time_unit or 'h'}" if time is not None else "")


def in_units(p: Perturbation | Combination, dose_units: Mapping[str, str]) -> Perturbation | Combination:
    """``p`` as a model trained on doses in ``dose_units`` (each dosed agent's unit,
    :meth:`~virtualcell.contract.DataContract.dose_units`) names it: each dose in its agent's trained unit and each
    time in hours, so that ``drugA@1000nM,1d`` asks a model trained in uM for ``drugA@1uM,24h``, and ``drugA@1``
    (no unit: the trained one) is ``drugA@1uM`` too. An agent never trained at a dose takes the trained unit of its
    dose's family. With no ``dose_units`` (a model trained on plain numbers) doses stay as written. A dose that does
    not convert to its agent's unit (or, for a new agent, to any trained unit) raises :class:`PerturbationError`."""
    by_family = {_unit_key(dose_on_one_scale(u)[0]): u for u in sorted(set(dose_units.values()))}

    def one(x: Perturbation) -> Perturbation:
        dose, unit, time, time_unit = x.dose, x.dose_unit, x.time, x.time_unit
        if time is not None:
            time, time_unit = float(f"{x.time_hours:.12g}"), "h"
        if dose is not None and dose_units:
            own = dose_units.get(x.target)
            if not unit:
                unit = own  # a plain number: in the agent's trained unit (None for an agent never trained at a dose)
            else:
                family = _unit_key(dose_on_one_scale(unit)[0])
                to = own or by_family.get(family)
                converted = None if to is None else _converted(dose, unit, to)
                if converted is None:
                    trained = f"doses of {x.target} in {own}" if own else f"doses in {' or '.join(by_family.values())}"
                    time_hint = (f" If {_fmt(dose)}{unit} is a time, it goes after the dose and a comma "
                                 f"('{x.target}@DOSE,{_fmt(dose)}{unit}')." if hours_per(unit) is not None else "")
                    raise PerturbationError(
                        f"{x}: the model was trained on {trained}, and {unit} does not convert to "
                        f"{'it' if own else 'any of them'}; write the dose in {own or 'one of them'}.{time_hint}")
                dose, unit = converted, to
        return Perturbation(x.kind, x.target, dose, unit, time, time_unit)

    if isinstance(p, Combination):
        return Combination(tuple(one(x) for x in p.parts))
    return one(p)


def unordered_label(label: str) -> str:
    """A combination label's parts sorted (``"B+A"`` -> ``"A+B"``, typed parts too: ``"drugC+cytokine:CYTO1"`` ->
    ``"cytokine:CYTO1+drugC"``), so that one pair has one name. A pair's condition as the data names it, one dose and
    time after its parts (:func:`shared_suffix`: ``"TF06+drugA@1,24h"``), keeps that suffix after its sorted parts;
    parts that each carry their own (``"B@10+A@1"``) are sorted with theirs. Anything else (a single label, a pair
    with some parts dosed and others not) as it is.

    >>> unordered_label("IRF1+IFNGR1"), unordered_label("STAT1"), unordered_label("TF06+drugA@1,24h")
    ('IFNGR1+IRF1', 'STAT1', 'TF06+drugA@1,24h')
    >>> unordered_label("drugA+ko:TF06@1,6h"), unordered_label("ko:TF06+drugA@1,6h")
    ('drugA+ko:TF06@1,6h', 'drugA+ko:TF06@1,6h')
    """
    parts = [x.strip() for x in split_label(label)]
    if len(parts) < 2:
        return label
    if not any("@" in x for x in parts):
        return "+".join(sorted(parts))
    shared = shared_suffix(label)
    if shared is not None:
        return unordered_label(shared[0]) + "@" + shared[1].strip()
    return "+".join(sorted(parts)) if all("@" in x for x in parts) else label


def shared_suffix(label: str) -> tuple[str, str] | None:
    """``(pair, quantities)`` of a combination written with one dose and time after its last part, as the data names
    a pair's condition (:meth:`~virtualcell.contract.DataContract.conditions`: its label, then the dose and time of
    its cells): ``"drugA+ko:TF06@1,24h"`` -> ``("drugA+ko:TF06", "1,24h")``. The quantities are the pair's, each dosed
    part's (a drug's, a cytokine's), not its last part's alone. ``None`` for a single, a pair without quantities, or
    parts written with quantities of their own (``"drugA@1+drugB@10"``).

    >>> shared_suffix("drugA+ko:TF06@1,24h"), shared_suffix("drugA@1+drugB@10"), shared_suffix("drugA@1")
    (('drugA+ko:TF06', '1,24h'), None, None)
    """
    parts = split_label(label)
    if len(parts) < 2 or "@" not in parts[-1] or any("@" in x for x in parts[:-1]):
        return None
    name, _, suffix = label.rpartition("@")
    return name, suffix


def written_kind(part: str) -> tuple[str, str] | None:
    """``(kind, name)`` of a label's part written typed, with a kind the perturbation language knows and no dose or
    time of its own ('ko:STAT1', 'drug:5-FU'; the dose columns give doses); ``None`` for any other part, which is
    read by its kind ('IL-2:high' is a plain label: 'IL-2' is no kind). The one reading of a typed part of a training
    label, for training's labels and the contract's dosed agents.

    >>> written_kind("ko:STAT1"), written_kind("drug:5-FU"), written_kind("IL-2:high"), written_kind("STAT1")
    (('knockout', 'STAT1'), ('drug', '5-FU'), None, None)
    """
    if ":" not in part:
        return None
    try:
        p = parse(part)
    except ValueError:
        return None
    if not isinstance(p, Perturbation) or p.kind == "control" or p.dose is not None or p.time is not None:
        return None
    return p.kind, p.target


def condition_parts(label: str) -> tuple[str, str | None, str | None]:
    """``(name, dose, time)`` as a condition's name writes them, after its last ``@`` (``"drugA@10uM,24h"`` ->
    ``("drugA", "10uM", "24h")``; ``"TF06@,24h"`` -> ``("TF06", None, "24h")``), None where one is not written; a
    label without ``@`` is its own name. The one reading of a condition's name into its parts, for those that compare
    or convert them (evaluate's baselines and its unmatched groups).

    >>> condition_parts("drugA@10uM,24h"), condition_parts("TF06@,24h"), condition_parts("STAT1")
    (('drugA', '10uM', '24h'), ('TF06', None, '24h'), ('STAT1', None, None))
    """
    name, at, suffix = label.rpartition("@")
    if not at or not name:
        return label, None, None
    dose, _, time = suffix.partition(",")
    return name, dose.strip() or None, time.strip() or None


def canonical_condition(label: str) -> str:
    """A condition's name with its numbers written as :func:`quantity_suffix` writes them (``"drugA@1.0"`` and
    ``"drugA@1.00,24.0h"`` are ``"drugA@1"`` and ``"drugA@1,24h"``), units kept; anything else as it is. Two
    spellings of one dose then name one group."""
    name, at, suffix = label.rpartition("@")
    if not at or not name:
        return label
    parts = suffix.split(",")
    read = [read_quantity(x) if x.strip() else None for x in parts]
    if len(parts) > 2 or any(q is None and x.strip() for q, x in zip(read, parts)):
        return label
    return name + "@" + ",".join(f"{_fmt(q[0])}{q[1]}" if q is not None else "" for q in read)


def condition_in_units(condition: str, have: Mapping[str, str], want: Mapping[str, str]) -> str:
    """A condition's name (``"drugA@1,24h"``: doses in each agent's unit ``have``, as
    :meth:`~virtualcell.contract.DataContract.dose_units` read them) with its dose in the agents' units ``want`` (a
    prediction's, its model's training units): ``"drugA@1000,24h"`` for ``have={"drugA": "uM"}``,
    ``want={"drugA": "nM"}``. Condition names carry no unit, and a file puts an agent's doses on its family's common
    unit only where it holds several of its units, so one dose was ``drugA@1`` in one file and ``drugA@0.001`` in
    another (evaluate matched a 1 nM prediction with 1 uM cells). Unchanged where either unit is unknown or the two do
    not convert; a pair's dose is that of its first part with a unit on both sides, whatever the order of its parts
    (``"TF06+drugA@1"`` is drugA's, as ``"drugA+TF06@1"`` is).

    >>> condition_in_units("drugA@1,24h", {"drugA": "uM"}, {"drugA": "nM"})
    'drugA@1000,24h'
    >>> condition_in_units("TF06+drugA@1,24h", {"drugA": "uM"}, {"drugA": "nM"})
    'TF06+drugA@1000,24h'
    """
    name, at, suffix = condition.rpartition("@")
    parts = [x.strip() for x in split_label(name)]
    agent = next((x for x in parts if x in have and x in want), parts[0])
    if not at or agent not in have or agent not in want or have[agent] == want[agent]:
        return condition
    dose, comma, time = suffix.partition(",")
    q = read_quantity(dose) if dose.strip() else None
    value = None if q is None or q[1] else _converted(q[0], have[agent], want[agent])
    return condition if value is None else f"{name}@{_fmt(value)}{comma}{time}"


def _converted(dose: float, unit: str, to: str) -> float | None:
    """``dose`` in ``unit`` written in ``to`` (12 significant digits: 300nM is 0.3uM, not 0.30000000000000004), or None
    where the two units are not of one family (a unit of no known family is one of its own)."""
    (common, factor), (common_to, factor_to) = dose_on_one_scale(unit), dose_on_one_scale(to)
    if _unit_key(common) != _unit_key(common_to):
        return None
    return float(f"{dose * factor / factor_to:.12g}")


def units_text(units: Mapping[str, str]) -> str:
    """Each agent's dose unit as one string (``"IFNB=ng/ml;drugA=nM"``), for a file's flat attributes; read back by
    :func:`units_of_text`."""
    return ";".join(f"{a}={u}" for a, u in sorted(units.items()))


def units_of_text(text: object) -> dict[str, str]:
    """:func:`units_text`'s string back as ``{agent: unit}`` (``{}`` for none)."""
    pairs = (x.rpartition("=") for x in str(text or "").split(";") if "=" in x)
    return {a: u for a, _, u in pairs if a}


def read_quantity(text: str) -> tuple[float, str] | None:
    """``(number, unit)`` of a dose or time as written (``"10uM"`` -> ``(10.0, "uM")``, ``"24"`` -> ``(24.0, "")``),
    or None where ``text`` is not a finite number with an optional unit."""
    m = _QUANTITY.match(text)
    if m is None or not math.isfinite(value := float(m.group(1))):
        return None
    return value, m.group(2)


def negative_quantity(text: str) -> tuple[float, str] | None:
    """``(number, unit)`` of a dose or time written with a minus sign (``"-3uM"`` -> ``(3.0, "uM")``), else None:
    what a name and a dose column refuse as negative rather than unreadable."""
    t = text.strip()
    return read_quantity(t[1:]) if t.startswith("-") else None


def _quantity(text: str, what: str, source: str) -> tuple[float, str]:
    q = read_quantity(text)
    if q is None and (neg := negative_quantity(text)) is not None:
        raise PerturbationError(f"The {what} {text!r} in {source!r} is negative: write a positive {what} "
                                f"(e.g. '{_fmt(neg[0])}{neg[1]}').")
    if q is None:
        raise PerturbationError(
            f"Cannot read the {what} {text!r} in {source!r}: write a number with an optional unit, e.g. "
            + ("'10uM'." if what == "dose" else "'24h'.")
        )
    return q


def _parse_part(text: str, source: str) -> Perturbation:
    t = text.strip()
    if not t:
        raise PerturbationError("An empty perturbation: write one, e.g. 'ko:STAT1'." if not source.strip() else
                                f"Empty part in {source!r}: check for a stray '+'.")
    if t.lower() in {*CONTROL_WORDS, "dmso", "vehicle", "non-targeting"} and ":" not in t:
        return Perturbation("control") if t.lower() in CONTROL_WORDS else Perturbation("label", t)
    if ":" not in t:  # a label as the data names it, spaces and all ('Givinostat (ITF2357)@1', sci-Plex's)
        return Perturbation("label", t)
    prefix, _, rest = t.partition(":")
    kind = KIND_ALIASES.get(prefix.strip().lower())
    if kind == "control":
        return Perturbation("control")
    if kind is None:
        raise PerturbationError(
            f"Unknown perturbation type {prefix!r} in {source!r}. Use ko:, kd:, act:, drug:, cytokine: or label:."
        )
    name, _, quantities = rest.partition("@")
    name = name.strip()
    dose = dose_unit = time = time_unit = None
    if quantities:
        if kind in GENETIC:
            raise PerturbationError(f"{source!r}: a {kind} takes no dose or time ('@...'); remove it.")
        fields = [f for f in quantities.split(",")]
        if len(fields) > 2:
            raise PerturbationError(f"{source!r}: after '@' write a dose and optionally a time, e.g. '@10uM,24h'.")
        if fields[0].strip() or len(fields) == 1:  # '@,24h': a time without a dose
            dose, dose_unit = _quantity(fields[0], "dose", source)
        if len(fields) == 2:
            time, time_unit = _quantity(fields[1], "time", source)
            if time_unit and hours_per(time_unit) is None:
                raise PerturbationError(f"{source!r}: unknown time unit {time_unit!r}; use h, min or d.")
            time_unit = time_unit or "h"
    return Perturbation(kind, name, dose, dose_unit or None, time, time_unit)  # type: ignore[arg-type]


def parse(text: str | Perturbation | Combination) -> Perturbation | Combination:
    """Parse one perturbation (see the module docstring for the syntax)."""
    if isinstance(text, (Perturbation, Combination)):
        return text
    if not isinstance(text, str):
        raise PerturbationError(f"Expected a perturbation string, got {type(text).__name__}.")
    try:
        parts = [_parse_part(p, text) for p in split_label(text)]
    except PerturbationError as err:  # a panel's syntax for several, given as one: say so
        hint = list_syntax_hint(text, comma=False)
        if hint:
            raise PerturbationError(f"{err}{hint}") from None
        raise
    parts = [p for p in parts if p.kind != "control"] or [Perturbation("control")]
    if len(parts) == 1:
        return parts[0]
    return Combination(tuple(parts))


def list_syntax_hint(text: str, *, comma: bool = True) -> str:
    """What to add to a refusal of ``text``, given as one perturbation, where it is written in a panel's or the
    command line's syntax for several: a panel's lines, a ``{a,b}`` group (a panel's shorthand), or names separated by
    ',' before any '@' (``comma``); ``""`` where it is none of those.

    >>> list_syntax_hint("STAT1,JAK2")
    " ',' separates no perturbations in a name: pass several as a list (['STAT1', 'JAK2']); a combination is written with '+' ('STAT1+JAK2')."
    """
    if "\n" in text.strip():
        return (" It holds several lines, as a panel's text does: read it with vc.perturbations.parse_panel(text) "
                "and pass the list that gives.")
    if "{" in text or "}" in text:
        try:
            written = f"write them out with vc.perturbations.expand({text.strip()!r}) (gives {expand(text.strip())!r})"
        except PerturbationError:  # (a malformed group: expand's own refusal would say why)
            written = "write them out with vc.perturbations.expand(line)"
        return (f" A {{a,b}} group is a panel's shorthand for one perturbation per choice, which a single "
                f"perturbation does not expand: {written}, or read a whole panel with "
                "vc.perturbations.parse_panel(text), and pass the list.")
    parts = _listed(text) if comma else None
    if parts:
        return (f" ',' separates no perturbations in a name: pass several as a list ({parts!r}); a combination is "
                f"written with '+' ({'+'.join(parts)!r}).")
    return ""


_NAMED = re.compile(r"^[A-Za-z][A-Za-z0-9._\-]*$")  # what a listed perturbation's name looks like (not '48h', '2')


def _listed(text: str) -> list[str] | None:
    """The perturbations ``text`` lists with ',' before any '@' (``"ko:STAT1,JAK2"`` is ``['ko:STAT1', 'ko:JAK2']``:
    a part without a kind takes the first part's), or ``None`` where it lists fewer than two names or a part looks
    like no perturbation's name (``"drugA,48h"``, a time; ``"2,4-DNP"``, one drug's name): the one reading behind
    every hint that a list was written as one perturbation."""
    name = text.partition("@")[0]  # (after '@', ',' parts a dose from a time)
    if "," not in name:
        return None
    parts = [x.strip() for x in name.split(",")]
    if len(parts) < 2 or not all(parts):
        return None
    kind = lambda x: x.partition(":")[0] if x.partition(":")[0].lower() in KIND_ALIASES and ":" in x else None  # noqa: E731
    prefix = kind(parts[0])
    out = [x if kind(x) or prefix is None else f"{prefix}:{x}" for x in parts]
    if not all(_NAMED.match(x.partition(":")[2] if kind(x) else x) for x in out):
        return None
    return out


def expand(line: str) -> list[str]:
    """One panel line's perturbations: a ``{a,b,c}`` group is written out once per choice, so a dose
    series or a family of targets takes one line.

    >>> expand("drug:dexamethasone@{0.1,1,10}uM,24h")
    ['drug:dexamethasone@0.1uM,24h', 'drug:dexamethasone@1uM,24h', 'drug:dexamethasone@10uM,24h']
    >>> expand("ko:{STAT1,JAK2} + drug:ruxolitinib@1uM")
    ['ko:STAT1 + drug:ruxolitinib@1uM', 'ko:JAK2 + drug:ruxolitinib@1uM']
    """
    opened, closed = line.count("{"), line.count("}")
    if opened == closed == 0:
        return [line]
    if opened != closed:
        which = "a '{' that no '}' closes" if opened > closed else "a '}' that no '{' opens"
        raise PerturbationError(f"{line!r} has {which}: write a group of choices as {{a,b,c}}, e.g. "
                                "'drug:NAME@{0.1,1,10}uM'.")
    if opened != 1 or line.index("{") > line.index("}"):
        raise PerturbationError(f"{line!r}: write one {{...}} group a line, e.g. 'drug:NAME@{{0.1,1,10}}uM'.")
    head, rest = line.split("{", 1)
    inner, tail = rest.split("}", 1)
    choices = [c.strip() for c in inner.split(",")]
    if not all(choices):
        raise PerturbationError(f"{line!r}: the {{...}} group has an empty choice; separate choices with one comma.")
    return [f"{head}{c}{tail}" for c in choices]


def panel_lines(text: str) -> list[tuple[int, str]]:
    """A panel's perturbations as ``(line number, text)``, comments ('#' on) and blank lines left out, each
    ``{a,b,c}`` group written out (:func:`expand`); a line with a malformed group raises
    :class:`PerturbationError` naming its number."""
    out: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        body = line.split("#", 1)[0].strip()
        if not body:
            continue
        try:
            out.extend((number, b) for b in expand(body))
        except PerturbationError as err:
            raise PerturbationError(f"panel line {number}: {err}") from None
    return out


def parse_panel(text: str) -> list[Perturbation | Combination]:
    """Parse a panel: one perturbation a line (a ``{a,b,c}`` group writes one a choice, :func:`expand`);
    '#' starts a comment; blank lines are skipped.

    A line that does not parse raises :class:`PerturbationError` naming its line number.
    """
    out: list[Perturbation | Combination] = []
    seen: dict[str, int] = {}
    for number, body in panel_lines(text):
        try:
            p = parse(body)
        except PerturbationError as err:
            raise PerturbationError(f"panel line {number}: {err}") from None
        key = str(p)
        if key in seen:
            raise PerturbationError(f"panel line {number}: {key!r} repeats line {seen[key]}; list each perturbation once.")
        seen[key] = number
        out.append(p)
    if not out:
        raise PerturbationError("The panel is empty: write one perturbation a line (e.g. 'ko:STAT1').")
    return out
