"""Prompts: how a (cell, perturbation) pair becomes model input, in two formats.

* ``compact`` — for the project's own gene-level models (one token per gene)::

      <bos> g1 g2 … gn <sep> <ko> STAT1 <out>   →   h1 h2 … hm <eos>

  The cell comes first, so a screen computes each cell's prefix once and shares its
  cache across every candidate perturbation. A genetic target reuses the gene's own
  token: a knockout of a gene never seen perturbed still means something to the model.
* ``c2s`` — the official Cell2Sentence perturbation prompt (tutorial 10), for real
  C2S-Scale checkpoints and any text tokenizer::

      Given the following cell sentence of {n} expressed genes representing a cell's basal
      state, predict the cell sentence after applying the perturbation: {perturbation}.
      Control cell sentence: {sentence}.

      Perturbed cell sentence:

Both implement :class:`PromptFormat`, the one interface the model (generation) and the
trainer (training examples, loss mask) call; neither branches on the format.

This module needs ``tokenizers``/``transformers`` only to build a tokenizer, and torch only
to build a decoding constraint.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ModelError, PerturbationError, close_matches, preview
from .perturbations import (EDIT_WORDS, GENETIC, Combination, Perturbation, canonical_condition, split_label, in_units,
                            label_parts, list_syntax_hint, looks_like_control, parse, parts_of, quantity_suffix,
                            shared_suffix, unordered_label, without_quantities)
from .target_offsets import KINDS as TARGET_KINDS

if TYPE_CHECKING:  # pragma: no cover
    from .sentences import CellSentences, Vocabulary

__all__ = [
    "C2S_PERTURBATION_PROMPT",
    "GENERIC",
    "SPECIAL_TOKENS",
    "PerturbationVocab",
    "PromptFormat",
    "PromptGrid",
    "FORMATS",
    "CompactFormat",
    "C2SFormat",
    "build_gene_tokenizer",
]

C2S_PERTURBATION_PROMPT = (
    "Given the following cell sentence of {n} expressed genes representing a cell's basal state, "
    "predict the cell sentence after applying the perturbation: {perturbation}.\n"
    "Control cell sentence: {sentence}.\n\nPerturbed cell sentence:"
)

PAD, BOS, EOS, SEP, OUT, UNK = "<pad>", "<bos>", "<eos>", "<sep>", "<out>", "<unk>"
KIND_TOKENS = {
    "control": "<control>", "knockout": "<ko>", "knockdown": "<kd>", "activation": "<act>",
    "drug": "<drug>", "cytokine": "<cytokine>", "label": "<label>",
}
# dose: log10 of the value in its own unit, half-decade bins; time: log2 hours, whole bins
DOSE_BINS = [x / 2 for x in range(-8, 9)]
TIME_BINS = list(range(-3, 10))
SPECIAL_TOKENS = [PAD, BOS, EOS, SEP, OUT, UNK, *KIND_TOKENS.values()]
SPECIAL_TOKENS += [f"<dose:{b:g}>" for b in DOSE_BINS] + [f"<time:{b}>" for b in TIME_BINS]
# the generic condition ("some perturbation, not named"), for classifier-free guidance; last, so
# that the ids of the tokens before it match checkpoints written before it existed
GENERIC = "<generic>"
SPECIAL_TOKENS.append(GENERIC)
_GENE_LIKE = re.compile(r"^[A-Za-z][A-Za-z0-9._\-]*$")  # what may name a gene (a 'ko:' is worth suggesting)


def _dose_bin(dose: float) -> float:
    v = math.log10(max(dose, 1e-12))
    return min(DOSE_BINS, key=lambda x: abs(x - v))


def _time_bin(hours: float) -> int:
    v = math.log2(max(hours, 1e-6))
    return min(TIME_BINS, key=lambda x: abs(x - v))


def _dose_token(dose: float) -> str:
    return f"<dose:{_dose_bin(dose):g}>"


def _time_token(hours: float) -> str:
    return f"<time:{_time_bin(hours)}>"


def dose_prompt_key(p: Perturbation | Combination) -> tuple:
    """What a prompt holds of ``p``: each part's kind, target and dose and time bins. Two conditions with one key read
    one prompt (training warns of them)."""
    parts = parts_of(p)
    return tuple(sorted((x.kind, x.target, None if x.dose is None else _dose_bin(x.dose),
                         None if x.time_hours is None else _time_bin(x.time_hours)) for x in parts))


def own_dose_name(part: Perturbation) -> str | None:
    """The name of a drug's or cytokine's own token for its dose (and time) bins, e.g. ``"drug:drugA:1"``
    (``TrainConfig.dose_tokens="own"``), or None for a part without dose or time."""
    if part.kind not in ("drug", "cytokine") or (part.dose is None and part.time_hours is None):
        return None
    dose = f"{_dose_bin(part.dose):g}" if part.dose is not None else "-"
    time = f":{_time_bin(part.time_hours)}" if part.time_hours is not None else ""
    return f"{part.kind}:{part.target}:{dose}{time}"


def own_exact_name(part: Perturbation) -> str | None:
    """The name of a drug's or cytokine's own token for its very dose and time (``"drug:drugA@1,48h"``), which a model
    has where trained conditions would otherwise read one prompt, sharing :func:`own_dose_name`'s bins (48h and 72h
    share a log2-hour bin; 1 and 1.5 uM a half-decade): it follows the bins' own token in the prompt, so each trained
    condition reads its own prompt, and a dose or time between them reads the bins' token alone. None for a part
    without dose or time."""
    if own_dose_name(part) is None:
        return None
    dose = f"{part.dose:g}" if part.dose is not None else ""
    time = f",{part.time_hours:g}h" if part.time_hours is not None else ""
    return f"{part.kind}:{part.target}@{dose}{time}"


@dataclass
class PerturbationVocab:
    """What perturbations a model knows.

    ``labels`` maps each training label (as written in the data's perturbation column)
    to its typed form, so that users may write either. ``names`` holds the token-level
    names of drugs, cytokines and plain labels the model was trained on, and the genetic
    targets that have a token of their own: targets that are not genes of the model, or,
    with ``own_targets``, every trained target.
    """

    labels: dict[str, str] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=lambda: {"drug": [], "cytokine": [], "label": [], "target": [],
                                                                  "dose": []})
    own_targets: bool = False  # every trained genetic target has a token of its own (TrainConfig.target_tokens="own")
    # each trained (drug, dose bin) has a token of its own too (TrainConfig.dose_tokens="own"), and each part of
    # trained conditions that would read one prompt, one for its very dose and time (own_exact_name)
    own_doses: bool = False
    # a genetic target is written with its gene's token, then its own where it has one (TrainConfig.target_tokens="both")
    targets_with_gene: bool = False
    # each training condition with a dose or time ("drugA@10", DataContract.conditions) -> its typed form
    conditions: dict[str, str] = field(default_factory=dict)
    # a genetic target as the data's labels name it (upper case, e.g. a symbol "STAT1") -> the model's gene it is
    # (e.g. its Ensembl id), where the training data's gene names were not the labels' (train.target_aliases)
    aliases: dict[str, str] = field(default_factory=dict)
    # the unit each dosed training label's doses are in (DataContract.dose_units: {"drugA": "uM"}; {}: plain numbers);
    # a dose asked in another unit of that family is converted to it (perturbations.in_units)
    dose_units: dict[str, str] = field(default_factory=dict)
    # a training label that names several typed forms (a gene activated in one cell line and knocked down in another,
    # as a column of kinds says) -> each form; such a label alone is ambiguous, and ``labels`` holds its commonest
    forms: dict[str, list[str]] = field(default_factory=dict)

    def __repr__(self) -> str:  # (every label and condition was printed)
        from .errors import preview

        kinds = ", ".join(f"{len(v)} {k}" for k, v in self.names.items() if v)
        return (f"PerturbationVocab({len(self.labels)} labels: {preview(self.labels, 4)}; "
                f"{len(self.conditions)} conditions with a dose or time; tokens: {kinds or 'none'})")

    def resolve(self, p: str | Perturbation | Combination) -> Perturbation | Combination:
        """A typed perturbation; a plain label is looked up among the training labels, and a label
        with a dose or time (``"drugA@10"``, a condition of the data) among the training conditions,
        or else as that label's perturbation at that dose and time. Doses are put in the training doses' unit and
        times in hours (``"drugA@1000nM,1d"`` is ``drug:drugA@1uM,24h`` to a model trained in uM)."""
        q = self._resolve(p)
        if not self.dose_units:
            self._no_unit_asked(q)
        self._no_time_trained(q)
        return self._sole_time(in_units(q, self.dose_units))

    def _no_time_trained(self, q: Perturbation | Combination) -> None:
        """Refuse a time asked of a model that trained no condition with a time: its time tokens never trained, so
        '@1,24h' read a token nothing taught and changed the prediction unchecked (screen's warning of untrained
        conditions was the only word, and only where a blend weight was served)."""
        parts = parts_of(q)
        timed = [x for x in parts if x.time is not None]
        if not timed:
            return
        for typed in self.conditions.values():
            t = parse(typed)
            if any(x.time is not None for x in parts_of(t)):
                return
        bare = [replace(x, time=None, time_unit=None) for x in parts]
        raise PerturbationError(
            f"{q}: the model trained no condition with a time, so it cannot read one: ask without it "
            f"('{bare[0] if len(bare) == 1 else Combination(tuple(bare))}'), or train on data with a time column "
            "(--time-key).")

    def _sole_time(self, q: Perturbation | Combination) -> Perturbation | Combination:
        """``q`` with the time its agent was always trained at, on each dosed part asked without a time
        (``cytokine:IFNB@10ng/ml`` for a model that saw IFNB at 6 h only is ``@10ng/ml,6h``): written without it,
        the prompt would be a form no training cell had."""
        parts = parts_of(q)
        if not any(x.kind in ("drug", "cytokine") and x.dose is not None and x.time is None for x in parts):
            return q
        times: dict[tuple[str, str], set[float | None]] = {}
        for typed in self.conditions.values():
            t = parse(typed)
            for x in parts_of(t):
                times.setdefault((x.kind, x.target), set()).add(x.time_hours)
        out = []
        for x in parts:
            sole = times.get((x.kind, x.target), set())
            if x.kind not in ("drug", "cytokine") or x.dose is None or x.time is not None:
                pass
            elif len(sole) == 1 and (h := next(iter(sole))) is not None:
                x = replace(x, time=h, time_unit="h")
            elif len(sole) > 1 and None not in sole:  # trained at several times, never without one: which is meant?
                said = ", ".join(f"{h:g}h" for h in sorted(sole))
                raise PerturbationError(
                    f"{x}: {x.kind}:{x.target} was trained at several times ({said}) and never without one, so a dose "
                    f"without a time names no condition the model knows (its baseline would be one time's). Add the "
                    f"time, e.g. '{x.target}@{quantity_suffix(x.dose, None)[1:]},{min(sole):g}h'.")
            out.append(x)
        return out[0] if len(out) == 1 else Combination(tuple(out))

    def _no_unit_asked(self, q: Perturbation | Combination) -> None:
        """Refuse a dose with a unit asked of a model trained at doses written as plain numbers: it cannot know
        what unit those numbers were in, so ``drugA@10uM`` could be 1,000x off its ``drugA@10``."""
        parts = parts_of(q)
        with_unit = [x for x in parts if x.dose is not None and x.dose_unit]
        if not with_unit:
            return
        trained = sorted(c for c, t in self.conditions.items() if _has_dose(t))
        if trained:
            x = with_unit[0]
            raise PerturbationError(
                f"{x}: the model was trained on doses written as plain numbers ({preview(trained, 4)}), so it cannot "
                f"tell what {x.dose_unit} is in them. Ask for the dose as a number in the unit of its training data "
                f"(e.g. '{x.target}@{x.dose:g}' if that was {x.dose_unit}), or train on a dose column that carries "
                "its unit ('10uM').")

    def _resolve(self, p: str | Perturbation | Combination) -> Perturbation | Combination:
        if not isinstance(p, str) and parts_of(p) and all(x.kind == "label" for x in parts_of(p)):
            # labels parsed already (parse_panel's 'IFNG', 'IFNG+TNF@10'): read as the string they were, so that a
            # label trained at one dose is that dose's condition either way (parsed, it lost its dose, and a screen
            # resolving its name again met another perturbation)
            names = [x.target for x in parts_of(p)]
            dosed = [x for x in names if "@" in x]
            p = "+".join(names)
            if len(names) > 1 and len(dosed) == 1:
                # parse sorted the parts, keeping the line's one suffix on its part: 'TNF+IFNG@10' (the pair's shared
                # dose, as the data names a pair's condition) and 'IFNG@10+TNF' (IFNG's own) parse alike. The
                # trained pair at that dose where there is one (TNF took its own other dose, an untrained pair);
                # else each part as written
                name, _, suffix = dosed[0].rpartition("@")
                shared = "+".join(name if x == dosed[0] else x for x in names) + "@" + suffix
                if self._trained_condition(shared) is not None:
                    p = shared
        if isinstance(p, str) and p not in self.labels:  # a trained pair written in another order: "B+A" for "A+B"
            p = self._pairs_in_any_order().get(unordered_label(p), p)
        if isinstance(p, str) and p in self.labels:
            doses = self.conditions_of(p)
            if len(doses) == 1:  # trained at one dose and time only: that is the perturbation it names
                return parse(self.conditions[doses[0]])
            if len(doses) > 1 and len({str(parse(self.conditions[c])) for c in doses}) == 1:
                # its doses or times trained as one prompt (a knockout at 24h and 72h is ko:TF06 at both): that
                # perturbation, named by the label asked (labels_for), never by one of its conditions
                return parse(self.conditions[doses[0]])
            if len(doses) > 1:
                raise PerturbationError(
                    f"{p!r} was trained at {len(doses)} doses or times: {preview(doses, 8)}. Name one of them "
                    f"(e.g. {doses[0]!r}), or write the dose, e.g. '{p}@10'.")
            self._refuse_ambiguous(p, p)
            return parse(self.labels[p])
        if isinstance(p, str) and p not in self.conditions and len(split_label(p)) > 1:
            # a trained pair's condition written in another order: "ko:TF06+drugA@1,24h" for "drugA+ko:TF06@1,24h"
            p = self._trained_condition(p) or p
        if isinstance(p, str) and p in self.conditions:
            self._refuse_pooled(p)
            return parse(self.conditions[p])
        if isinstance(p, str) and (pair := self._with_shared_quantities(p)) is not None:
            return pair
        if (isinstance(p, str) and "@" in p and ":" not in p and p.rpartition("@")[0] in self.labels
                and len(split_label(p)) == 1):  # (a label at a dose, not a combination: 'drugA@100,24h+G5')
            q = _with_quantities(parse(self.labels[p.rpartition("@")[0]]), p.rpartition("@")[2], p)
            return self._with_trained_dose(q, p) if isinstance(q, Perturbation) else q
        q = parse(p)
        parts = parts_of(q)
        out = []
        for part in parts:
            if part.kind == "label" and part.target in self.labels:
                self._refuse_ambiguous(part.target, p)
                out.append(self._resolve(part.target))  # as the label alone is: at its one trained dose, if one
            elif part.kind == "label" and "@" in part.target and (
                    part.target in self.conditions or part.target.rpartition("@")[0] in self.labels):
                # a training condition as the data names it ("drugA@10"), in a panel or a combination: as alone
                out.append(self._resolve(part.target))
            elif part.kind == "label" and part.target not in self.names["label"]:
                hint = close_matches(part.target, list(self.labels))
                did = f" Close matches it knows: {preview(hint, 5)}." if hint else ""
                name = part.target.partition("@")[0]
                if looks_like_control(name):
                    typed = (" It looks like a control: a prediction is of the baseline cells under a perturbation, "
                             "and the baseline cells are the controls; leave it out of the panel.")
                else:  # (several perturbations written as one name, 'STAT1,JAK2', say that first)
                    typed = list_syntax_hint(part.target) or self._typed_hint(name)
                raise PerturbationError(
                    f"The model does not know the perturbation {part.target!r}.{did} Known labels: "
                    f"{preview(sorted(self.labels), 12) or 'none'}.{typed}"
                )
            elif part.kind in GENETIC and part.target.upper() in self.aliases:  # "ko:STAT1" -> its gene's id
                out.append(replace(part, target=self.aliases[part.target.upper()]))
            else:
                out.append(self._with_trained_dose(part, p))
        flat: list[Perturbation] = []
        for x in out:
            flat.extend(parts_of(x))
        return flat[0] if len(flat) == 1 else Combination(tuple(flat))

    def _typed_hint(self, name: str) -> str:
        """What to say of the typed forms an unknown label ``name`` could be written in: only of kinds the model
        trained on (its :meth:`trained_kinds`; every kind for a model that records none, a plain checkpoint), since
        another is refused ('ko:IL6' to a model of cytokines alone) or, of an auto-kind model, steers into a kind the
        name never was."""
        recorded = self.trained_kinds()
        kinds = recorded or {*GENETIC, "drug", "cytokine"}
        genetic = [k for k in ("knockout", "knockdown", "activation") if k in kinds]
        agents = [k for k in ("drug", "cytokine") if k in kinds]
        short = {"knockout": "ko", "knockdown": "kd", "activation": "act"}
        first = name.split()[0] if name.split() else name
        edited = first != name and _GENE_LIKE.match(first) and all(  # ('STAT1 KO': a gene, and what was done)
            w.upper() in EDIT_WORDS for w in name.split()[1:])
        gene = first if edited else name if _GENE_LIKE.match(name) else None
        if gene is not None and genetic:
            rest = [f"{short[k]}:" for k in genetic[1:]] + (["drug:NAME@DOSE"] if "drug" in agents and not edited
                                                            else [])
            lead = (f" For a gene's {genetic[0]}, write its typed form" if edited
                    else f" Or write a typed perturbation{' of a kind it trained on' if recorded else ''}")
            as_trained = next((f" (as it trained its label {lab!r}: {t})" for lab, t in sorted(self.label_forms())
                               if parse(t).kind == genetic[0]), "")  # (a label read as a knockout shows here)
            return (f"{lead}, e.g. '{short[genetic[0]]}:{gene}'{as_trained}"
                    + (f" (or {', '.join(rest)})." if rest else "."))
        if gene is not None and not genetic:
            words = {"drug": "drugs", "cytokine": "cytokines", "label": "plain labels"}
            trained = ", ".join(words[k] for k in sorted(kinds) if k in words)
            return (f" This model trained on no knockout, knockdown or activation (only on {trained}), so it has not "
                    "learned what one of a gene means: ask for one of its labels, or train on a screen of that kind.")
        example = {"drug": f"'drug:{name}@1uM'", "cytokine": "'cytokine:NAME@10ng/ml'"}
        said = [example[k] for k in agents]
        if said:
            return f" Or write a typed perturbation, e.g. {' or '.join(said)}."
        if not recorded:
            return ""
        can = f" or a {genetic[0]} of any of its genes (e.g. '{short[genetic[0]]}:GENE')" if genetic else ""
        return (f" This model trained on no drug or cytokine (only on {' and '.join(k + 's' for k in sorted(recorded))}"
                f"), so it cannot predict one it never saw: ask for one of its labels{can}, or train on a screen that "
                "holds it.")

    def _with_trained_dose(self, part: Perturbation, asked: object) -> Perturbation:
        """A typed part without a dose (``drug:drugA``, ``drugA@,24h``) of an agent every training cell had at a
        dose: the one trained dose (at the time asked, if any) where there is one, as its plain label gets; else
        refused, naming the doses, as its plain label is. (It was predicted from a prompt with no dose token, a
        form no training cell had.) Anything else as it is."""
        if part.dose is not None or part.kind in GENETIC or part.kind in ("label", "control"):
            return part
        trained = [parse(t) for t in (*self.conditions.values(),
                                      *(t for lab, t in self.labels.items() if not self.conditions_of(lab)))]
        same = [t for t in trained if isinstance(t, Perturbation) and (t.kind, t.target) == (part.kind, part.target)]
        if not same or any(t.dose is None for t in same):
            return part
        at_time = [t for t in same if part.time is None or t.time_hours == part.time_hours]
        if len({str(t) for t in at_time}) == 1:
            return at_time[0]
        doses = list(dict.fromkeys(str(t) for t in sorted(at_time or same, key=lambda t: (t.dose, t.time_hours or 0))))
        raise PerturbationError(
            f"{str(asked)!r}: {part.kind}:{part.target} was trained at doses only ({preview(doses, 6)}), so without "
            f"one it names no condition the model knows. Name one of them (e.g. {doses[0]!r}).")

    def _refuse_ambiguous(self, label: str, asked: object) -> None:
        """Refuse a label trained as several perturbations (:attr:`forms`): which one is meant, only the user knows."""
        if label in self.forms:
            forms = self.forms[label]
            raise PerturbationError(
                f"{str(asked)!r}: the label {label!r} was trained as {len(forms)} perturbations, {' and '.join(forms)} "
                "(its cells' kinds differ, e.g. by cell line), so it does not say which one is meant. Name one of "
                f"them (e.g. {forms[0]!r}); in a combination, name each part so.")

    def _pairs_in_any_order(self) -> dict[str, str]:
        """Each trained combination's label keyed by its parts in any order (:func:`~virtualcell.perturbations.unordered_label`)."""
        return {unordered_label(lab): lab for lab in self.labels if len(split_label(lab)) > 1}

    def _trained_condition(self, text: str) -> str | None:
        """The training condition ``text`` names, as written or with a combination's parts in another order (its
        numbers in any spelling), or None."""
        if text in self.conditions:
            return text
        return self._conditions_in_any_order().get(canonical_condition(unordered_label(text)))

    def _conditions_in_any_order(self) -> dict[str, str]:
        """Each trained combination's condition (``"drugA+ko:TF06@1,24h"``) keyed by its parts in any order, its
        numbers in one spelling."""
        return {canonical_condition(unordered_label(c)): c for c in self.conditions if len(split_label(c)) > 1}

    def pooled(self) -> dict[str, list[str]]:
        """Each typed form that several training conditions were trained as (``"ko:TF06"`` for ``"TF06@,24h"`` and
        ``"TF06@,72h"``: a knockout takes no dose or time, so their cells read one prompt) -> those conditions. The
        model cannot tell them apart: its prediction of that form is named by its label, never by one of them."""
        by_form: dict[str, list[str]] = {}
        for c, t in self.conditions.items():
            by_form.setdefault(str(parse(t)), []).append(c)
        return {t: sorted(cs) for t, cs in by_form.items() if len(cs) > 1}

    def _refuse_pooled(self, condition: str) -> None:
        """Refuse a training condition that shares its typed form with others (:meth:`pooled`): a prediction named
        after it would be theirs pooled, scored against its cells alone."""
        typed = str(parse(self.conditions[condition]))
        others = [c for c in self.pooled().get(typed, []) if c != condition]
        if not others:
            return
        label = condition.rpartition("@")[0] or typed
        genetic = any(x.kind in GENETIC for x in parts_of(parse(typed)))
        raise PerturbationError(
            f"{condition!r} was trained as {typed}, as {preview(others, 4)} {'was' if len(others) == 1 else 'were'}"
            + (" (a knockout, knockdown or activation takes no dose or time, so their cells read one prompt)"
               if genetic else " (their cells read one prompt)")
            + f": the model cannot predict {condition!r} apart from {'it' if len(others) == 1 else 'them'}, and a "
            f"prediction named {condition!r} would be theirs pooled. Ask {label!r} for that pooled prediction "
            f"(named {label!r}), or retrain with each of them a label of its own (e.g. one label per time).")

    def _with_shared_quantities(self, p: str) -> Perturbation | Combination | None:
        """A pair written as the data names a pair's condition, one dose and time after its parts
        (``"TF06+drugA@1,6h"``, ``"drugA+ko:TF06@1,6h"``, :func:`~virtualcell.perturbations.shared_suffix`): those
        quantities on each part that takes them (its drugs and cytokines), as training gave a pair's cells the dose and
        time of their row (the knockout in it takes none). A trained pair (in any order) is its trained typed form at
        them. ``None`` for anything else, and for the panel syntax's typed last part that takes a dose (``"ko:STAT1 +
        drug:X@1uM"``): its quantities are its own."""
        shared = shared_suffix(p)
        if shared is None:
            return None
        name, suffix = shared
        label = name if name in self.labels else self._pairs_in_any_order().get(unordered_label(name))
        if label is not None:
            self._refuse_ambiguous(label, p)
            plain = without_quantities(parse(self.labels[label]))
        else:
            texts = [x.strip() for x in split_label(name)]
            if ":" in texts[-1] and texts[-1] not in self.labels:
                try:
                    last = parse(texts[-1])
                except PerturbationError:
                    return None  # (read as before, and refused so)
                if last.kind in ("drug", "cytokine"):
                    return None  # ('ko:STAT1 + drug:X@1uM': the typed syntax, each part's quantities its own)
            parts: list[Perturbation] = []
            for x in texts:
                if x in self.labels:
                    self._refuse_ambiguous(x, p)
                    q = without_quantities(parse(self.labels[x]))
                else:
                    q = parse(x)
                    if isinstance(q, Perturbation) and q.kind == "label":
                        q = self._resolve(x)  # (an unknown label is refused here, with close matches)
                    elif isinstance(q, Perturbation) and q.kind in GENETIC and q.target.upper() in self.aliases:
                        q = replace(q, target=self.aliases[q.target.upper()])
                parts.extend(parts_of(q))
            plain = parts[0] if len(parts) == 1 else Combination(tuple(parts))
        q = _with_quantities(plain, suffix, p)
        if label is not None and all(x.dose is None for x in parts_of(q) if x.kind in ("drug", "cytokine")):
            # a trained pair asked at a time alone ('@,24h'): its one trained dose at that time, as a single's
            hours = next(x.time_hours for x in parts_of(q) if x.kind in ("drug", "cytokine"))
            at = [c for c in self.conditions_of(label) if {x.time_hours for x in parts_of(parse(self.conditions[c]))
                                                           if x.kind in ("drug", "cytokine")} == {hours}]
            if len(at) == 1:
                return parse(self.conditions[at[0]])
            if at:
                raise PerturbationError(f"{p!r}: {label!r} was trained at {len(at)} doses at that time "
                                        f"({preview(at, 6)}), so without one it names no condition the model knows. "
                                        f"Name one of them (e.g. {at[0]!r}).")
        out = [self._with_trained_dose(x, p) if x.kind in ("drug", "cytokine") else x for x in parts_of(q)]
        return out[0] if len(out) == 1 else Combination(tuple(out))

    def trained_form(self, condition: str) -> str | None:
        """The typed form a training condition (``"drugA@10"``, or a label without dose) was trained as;
        None for a condition the model was not trained on."""
        return self.conditions.get(condition) or self.labels.get(condition)

    def label_forms(self) -> list[tuple[str, str]]:
        """``(label, typed form)`` of every form each training label was trained as: one for most labels, each of
        :attr:`forms` for a label trained as several kinds."""
        return [(label, t) for label, typed in self.labels.items() for t in self.forms.get(label, [typed])]

    def typed_forms(self, *, conditions: bool = True) -> list[str]:
        """Every typed form a training label was trained as (:meth:`label_forms`), and with ``conditions`` each
        dosed condition's (``drug:drugA@10uM``)."""
        return [t for _, t in self.label_forms()] + (list(self.conditions.values()) if conditions else [])

    def trained_genetic_kinds(self) -> list[str]:
        """The genetic kinds the model trained on, in the order knockout, knockdown, activation: those it can be asked
        of any of its genes (:meth:`~virtualcell.model.C2SModel.resolve` refuses another)."""
        kinds = self.trained_kinds()
        return [k for k in ("knockout", "knockdown", "activation") if k in kinds]

    def trained_kinds(self) -> set[str]:
        """The kinds of perturbation the model trained on (``{"knockout"}``; a combination's parts count), from
        :meth:`typed_forms`; empty for a model with no training labels (a plain checkpoint)."""
        kinds: set[str] = set()
        for t in self.typed_forms():
            q = parse(t)
            kinds.update(x.kind for x in parts_of(q))
        return kinds

    def trained(self) -> list[str]:
        """Every condition the model was trained on, as the data names it: each label without a dose,
        and each dose of one that has doses (``["STAT1", "drugA@0.1", "drugA@10"]``); :meth:`panel` writes them as
        they can be asked."""
        return sorted({*self.conditions, *(lab for lab in self.labels if not self.conditions_of(lab))})

    def panel(self) -> list[str]:
        """Every trained condition as it can be asked (:meth:`trained`, with a label trained as several kinds
        written as each of its :attr:`forms`, and conditions trained as one typed form, :meth:`pooled`, as their label
        once): the panel of a screen of everything the model knows."""
        pooled = {c: t for t, cs in self.pooled().items() for c in cs}
        asked = [self._pooled_name(pooled[c]) if c in pooled else c for c in self.trained()]
        return list(dict.fromkeys(f for c in asked for f in self.forms.get(c, [c])))

    def _pooled_name(self, typed: str) -> str:
        """How a form several conditions were trained as is asked: its label, where one names it, else itself."""
        return next((lab for lab, t in self.label_forms() if str(parse(t)) == typed), typed)

    def conditions_of(self, label: str) -> list[str]:
        """The training conditions of ``label`` that carry a dose or time (``["drugA@0.1", "drugA@1"]``)."""
        return sorted(c for c in self.conditions if c.rpartition("@")[0] == label)

    def labels_for(self, perturbations: Sequence[Perturbation | Combination], *,
                   spelling: Mapping[str, str] | None = None) -> list[str]:
        """The training condition or label written for each perturbation (``"STAT1"``, pairs ``"A+B"``, a drug
        at a dose ``"drugA@10"``, also at a dose or time it never trained at), or its typed form when the
        training data had no such label; predictions are then named as
        :meth:`~virtualcell.contract.DataContract.conditions` names the measured cells. ``spelling``: the
        data's spelling of the model's genes (upper case -> as written), for a knockout never trained on named
        by its gene (``Tf06``, not the model's ``TF06``)."""
        typed_to_label = {str(parse(t)): lab for lab, t in self.label_forms()}  # each form of a label names it
        # (a form several conditions were trained as names none of them: its label names it, :meth:`pooled`)
        pooled = self.pooled()
        typed_to_condition = {typed: c for c, t in self.conditions.items() if (typed := str(parse(t))) not in pooled}
        symbol_of = {gene: symbol for symbol, gene in self.aliases.items()}
        by_gene = self._kinds_named_by_gene()
        # the words a screen writes beside a single's gene (its control label: 'KLF1+NT'), dropped from a pair's name
        beside = {x for _, form in by_gene.values() for x in form.split("+") if x != "{}"}

        def one(p: Perturbation | Combination) -> str:
            if str(p) in typed_to_condition:  # as the data names it, with its dose: "drugA@10"
                return typed_to_condition[str(p)]
            if str(p) in typed_to_label:
                return typed_to_label[str(p)]
            plain = without_quantities(p)
            parts = parts_of(p)
            shared = _shared_quantities(p) if plain != p else None
            if shared is not None and str(plain) in typed_to_label:
                # a trained label (a pair's too) at another dose or time, its numbers written as the data's conditions
                # are (in the agent's trained unit, no unit; hours, after the pair's parts as the data writes them):
                # "drugA@3", not "drugA@3uM", which no measured group is; "drugA+ko:TF06@1,6h", not its typed form
                return typed_to_label[str(plain)] + quantity_suffix(*shared)
            if len(parts) > 1 and (shared is not None or plain == p):
                # a pair as the data joins its parts' names, where each part has one, then the dose and time its
                # dosed parts share, as the data writes a pair's condition
                labels = [typed_to_label.get(str(without_quantities(q))) or gene_named(q) for q in parts]
                if all(labels):  # ('KLF1+ctrl' and 'MAP2K6+ctrl' join as the data's pair 'KLF1+MAP2K6')
                    return ("+".join(x for lab in labels for x in label_parts(str(lab), beside))
                            + (quantity_suffix(*shared) if shared is not None else ""))
            named = [replace(q, target=symbol_of.get(q.target, q.target)) if q.kind in GENETIC else q for q in parts]
            return (gene_named(parts[0]) if len(parts) == 1 else None) or str(
                named[0] if len(named) == 1 else Combination(tuple(named)))

        def gene_named(q: Perturbation) -> str | None:
            """A target never trained on, of a kind whose every training label is its gene's name (a knockout screen
            labelled STAT1, JAK2; GEARS' 'KLF1+ctrl'): named so too, "IRF9" ("IRF9+ctrl"), as the measured cells
            would be; not where that name is a training label already (of another kind)."""
            if q.kind not in by_gene or q.dose is not None or q.time is not None:
                return None
            taken, form = by_gene[q.kind]
            target = symbol_of.get(q.target, q.target)
            name = form.format((spelling or {}).get(target.upper(), target))
            return None if name.upper() in taken else name

        return [one(p) for p in perturbations]

    def _kinds_named_by_gene(self) -> dict[str, tuple[set[str], str]]:
        """The genetic kinds whose training labels are each their target gene's name (``"STAT1"`` for
        ``ko:STAT1``, also through :attr:`aliases`), or each that name beside one same control word (GEARS'
        ``"KLF1+ctrl"``), each with every training label (upper case), which such a name must not repeat, and the
        form of its names (``"{}"``, ``"{}+ctrl"``); a kind trained under any other label (``"STAT1_KO"``, a pair,
        names of several forms) is left out."""
        forms: dict[str, set[str | None]] = {}
        for label, typed in self.label_forms():
            q = parse(typed)
            if isinstance(q, Perturbation) and q.kind in GENETIC:
                parts = [x.strip() for x in split_label(label)]  # (a single of two parts: its other names a control)
                at = [i for i, x in enumerate(parts) if self.aliases.get(x.upper(), x.upper()) == q.target.upper()]
                form = "+".join("{}" if i == at[0] else x.replace("{", "{{").replace("}", "}}")
                                for i, x in enumerate(parts)) if len(at) == 1 and len(parts) <= 2 else None
                forms.setdefault(q.kind, set()).add(form)
        taken = {label.upper() for label in self.labels}
        return {kind: (taken, str(next(iter(f)))) for kind, f in forms.items() if len(f) == 1 and None not in f}

    def label_map(self, perturbations: Sequence[str | Perturbation | Combination]) -> dict[str, str]:
        """Typed name -> training label (:meth:`labels_for`) of each perturbation, e.g.
        ``{"ko:STAT1": "STAT1"}``: the one map from what the model writes to what measured data calls it."""
        perts = [parse(p) for p in perturbations]
        return dict(zip((str(p) for p in perts), self.labels_for(perts)))

    def to_dict(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "names": {k: list(v) for k, v in self.names.items()},
                "own_targets": self.own_targets, "own_doses": self.own_doses, "targets_with_gene": self.targets_with_gene,
                "conditions": dict(self.conditions), "aliases": dict(self.aliases), "dose_units": dict(self.dose_units),
                **({"forms": {k: list(v) for k, v in self.forms.items()}} if self.forms else {})}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerturbationVocab:
        names = {"drug": [], "cytokine": [], "label": [], "target": [], "dose": []}
        names.update({k: list(v) for k, v in d.get("names", {}).items()})
        return cls(dict(d.get("labels", {})), names, bool(d.get("own_targets", False)), bool(d.get("own_doses", False)),
                   bool(d.get("targets_with_gene", False)), dict(d.get("conditions", {})), dict(d.get("aliases", {})),
                   dict(d.get("dose_units", {})), {k: list(v) for k, v in d.get("forms", {}).items()})


def _shared_quantities(p: Perturbation | Combination) -> tuple[float | None, float | None] | None:
    """``(dose, hours)`` that every part of ``p`` that takes them (a drug, a cytokine: not a knockout, knockdown or
    activation) has, one of the two perhaps None: what one dose and time after a label names (``"drugA+ko:TF06@1,6h"``);
    None where its parts have doses or times of their own, or none has any."""
    dosable = [x for x in parts_of(p) if x.kind not in GENETIC and x.kind != "control"]
    quantities = {(x.dose, x.time_hours if x.time is not None else None) for x in dosable}
    if len(quantities) != 1 or quantities == {(None, None)}:
        return None
    return next(iter(quantities))


def _has_dose(typed: str) -> bool:
    q = parse(typed)
    return any(x.dose is not None for x in parts_of(q))


def _with_quantities(p: Perturbation | Combination, suffix: str, source: str) -> Perturbation | Combination:
    """``p`` with the dose and time of ``suffix`` (what follows ``@``) on each part that takes them."""
    name = source.rpartition("@")[0] or "_"  # (in a message, the label asked: 'drugA at a dose of 0')
    if len(split_label(name)) > 1:  # a pair's quantities ('TF06+drugA@1,6h'): read alone, said of the pair asked
        try:
            q = parse(f"drug:_@{suffix}")
        except PerturbationError as err:
            raise PerturbationError(str(err).replace(repr(f"drug:_@{suffix}"), repr(source))) from None
    else:
        try:
            q = parse(f"drug:{name}@{suffix}")  # reads the dose and time as parse reads any perturbation's
        except PerturbationError as err:  # a label that is no drug's name: read the quantities alone
            try:
                q = parse(f"drug:_@{suffix}")
            except PerturbationError:
                raise err from None  # (the quantities are wrong: said of the label asked)
    assert isinstance(q, Perturbation)
    parts = parts_of(p)
    if not any(x.kind in ("drug", "cytokine") for x in parts):
        raise PerturbationError(f"{source!r}: a dose or time ('@{suffix}') applies to drugs and cytokines, and "
                                f"{str(p)!r} has none; write the label without it.")
    out = [Perturbation(x.kind, x.target, q.dose, q.dose_unit, q.time, q.time_unit) if x.kind in ("drug", "cytokine")
           else x for x in parts]
    return out[0] if len(out) == 1 else Combination(tuple(out))


def name_token(kind: str, name: str) -> str:
    return f"<{kind}:{name}>"


def build_gene_tokenizer(genes: Sequence[str], perturbations: PerturbationVocab):  # noqa: ANN201
    """A word-level tokenizer: one token per gene, plus special and perturbation tokens.

    It splits on white space only (``WhitespaceSplit``), so names such as ``HLA-DRA``
    stay one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = [name_token(k, n) for k in ("drug", "cytokine", "label", "target", "dose")
             for n in perturbations.names.get(k, [])]
    tokens = SPECIAL_TOKENS + extra + list(genes)
    if len(set(tokens)) != len(tokens):
        dup = sorted({t for t in tokens if tokens.count(t) > 1})
        raise PerturbationError(f"Token names collide: {preview(dup)}.")
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK, sep_token=SEP,
    )


@dataclass
class PromptGrid:
    """The prompts of a (cell x perturbation) grid as the generation engine takes them: every
    prefix is followed by every suffix; ``pair(i, j)`` is the ``(cell, perturbation)`` that
    prefix ``i`` with suffix ``j`` stands for.

    ``shared``: one prefix per cell and one suffix per perturbation; otherwise one full
    prompt per (cell, perturbation) pair, cell-major, and a single empty suffix.
    """

    prefixes: list[list[int]]
    suffixes: list[list[int]]
    prefix_keys: list[int]
    suffix_keys: list[int]
    n_perturbations: int
    shared: bool
    guide_suffixes: list[list[int]] | None = None  # each suffix under the generic condition (None: no guidance)

    def pair(self, i: int, j: int) -> tuple[int, int]:
        return (i, j) if self.shared else divmod(i, self.n_perturbations)


class PromptFormat:
    """What a prompt format does for the model and the trainer.

    ``name`` is saved in checkpoints; ``eos`` and ``pad`` are token ids.
    """

    name = ""
    eos: int
    pad: int

    def check(self, p: Perturbation | Combination) -> None:
        """Raise :class:`~virtualcell.errors.PerturbationError` if ``p`` cannot be written for this model."""

    def grid(self, cells: Sequence[np.ndarray], perturbations: Sequence[Perturbation | Combination], *,
             cell_keys: Sequence[int], perturbation_keys: Sequence[int]) -> PromptGrid:
        """The prompts of every (cell, perturbation) pair (cells as gene ids)."""
        raise NotImplementedError

    def constraint(self, genes: Sequence[str], vocab_size: int):  # noqa: ANN201
        """The decoding constraint that lets only real, distinct genes (and EOS) be written."""
        raise NotImplementedError

    def max_new_tokens(self, max_genes: int, constraint: Any) -> int | None:
        """Decode steps for ``max_genes`` genes (None: one step a gene, plus EOS)."""
        return None

    def to_sentences(self, tokens: Sequence[Sequence[int]], genes: Vocabulary) -> tuple[CellSentences, int, int]:
        """Generated token lists -> cell sentences, with the counts of invalid and repeated genes dropped."""
        raise NotImplementedError

    def response(self, gene_ids: np.ndarray) -> list[int]:
        """The tokens that write a cell (its gene ids, in rank order), ending with EOS."""
        raise NotImplementedError

    def prompt_parts(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> tuple[list[int], list[int]]:
        """``(shared, own)``: the prompt's part that is the same for every perturbation of the cell, and the rest."""
        raise NotImplementedError

    def generic_own(self) -> list[int] | None:
        """The ``own`` prompt part of the generic condition (a perturbation not named), or ``None``
        where the format has none (then the trainer never drops a name and guidance is off)."""
        return None

    def plain_own(self, p: Perturbation | Combination) -> list[int] | None:
        """The ``own`` prompt part of ``p`` without the tokens a trained target or dose has of its own: how
        the model is asked about a target or dose it was not trained on. ``None`` where the format has no
        such tokens (then the trainer's ``own_token_dropout`` does nothing)."""
        return None

    def sentence(self, gene_ids: np.ndarray) -> list[int]:
        """A lone cell sentence, for pre-training (every token after the first is a target)."""
        raise NotImplementedError

    def response_vocabulary(self) -> np.ndarray | None:
        """The only tokens a response may hold, or ``None`` where no token is ruled out (no repeat mask)."""
        return None

    def named_targets(self, own: Sequence[int]) -> list[tuple[int, int]]:
        """``(gene token, kind index)`` of every gene a genetic perturbation in the prompt part ``own`` names
        by its one token (kind index into :data:`virtualcell.target_offsets.KINDS`); none for text prompts."""
        return []


def _dedupe(gene_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Valid (>= 0) gene ids in first-seen order without repeats, their places in ``gene_ids`` (their ranks: a word
    dropped does not move the genes after it, as :func:`~virtualcell.sentences.parse_text` reads text), and the
    counts dropped."""
    at = np.flatnonzero(gene_ids >= 0)
    _, first = np.unique(gene_ids[at], return_index=True)
    kept = at[np.sort(first)]
    return gene_ids[kept], kept, int(gene_ids.size - at.size), int(at.size - first.size)


class CompactFormat(PromptFormat):
    """Token-level prompts for gene-level models; shares each cell's prefix across perturbations."""

    name = "compact"

    def __init__(self, tokenizer, genes: Sequence[str], perturbations: PerturbationVocab) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.perturbations = perturbations
        self.token_id = tokenizer.get_vocab()
        missing = [g for g in genes[:50] if g not in self.token_id]
        if missing:
            raise PerturbationError(f"The tokenizer has no token for genes {preview(missing)}: not a gene-level tokenizer.")
        self.gene_tokens = np.array([self.token_id[g] for g in genes], dtype=np.int64)
        self.token_to_gene = np.full(len(self.token_id), -1, dtype=np.int64)
        self.token_to_gene[self.gene_tokens] = np.arange(len(genes))
        self.bos, self.eos, self.sep, self.out, self.pad = (self.token_id[t] for t in (BOS, EOS, SEP, OUT, PAD))
        self._genetic_kind = {self.token_id[KIND_TOKENS[k]]: i for i, k in enumerate(TARGET_KINDS)
                              if KIND_TOKENS[k] in self.token_id}

    def prefix(self, cell_gene_ids: np.ndarray) -> list[int]:
        return [self.bos, *self.gene_tokens[cell_gene_ids].tolist(), self.sep]

    def perturbation_tokens(self, p: Perturbation | Combination, own_tokens: bool = True) -> list[int]:
        """The tokens that name ``p``. ``own_tokens=False`` leaves out a trained target's own token after
        its gene's (``target_tokens="both"``) and a trained dose's own token (``dose_tokens="own"``): the
        form in which an untrained target or dose is written (``plain_own``)."""
        parts = parts_of(p)
        if not parts:
            return [self.token_id[KIND_TOKENS["control"]]]
        toks: list[str] = []
        for part in parts:
            if part.kind in GENETIC:
                own = name_token("target", part.target)  # a target's own token, where it has one, comes first
                if self.perturbations.targets_with_gene and part.target in self.token_id:  # the gene, then its own
                    toks += [KIND_TOKENS[part.kind], part.target] + ([own] if own_tokens and own in self.token_id else [])
                    continue
                target = own if own in self.token_id else part.target
                if target not in self.token_id:
                    raise PerturbationError(
                        f"{part}: {part.target!r} is neither a gene of this model nor a target it was trained on. "
                        "Genetic perturbations can target any gene in the model's vocabulary."
                    )
                if target == part.target and self.perturbations.own_targets:
                    raise PerturbationError(
                        f"{part}: this model gives each target it was trained on a token of its own (trained with "
                        f"--target-tokens own), and {part.target!r} is not one of them, so it never learned what "
                        "perturbing it means. Screen untrained targets with a model trained with --target-tokens gene.")
                toks += [KIND_TOKENS[part.kind], target]
            elif part.kind == "control":
                toks.append(KIND_TOKENS["control"])
            else:
                tok = name_token(part.kind, part.target)
                if tok not in self.token_id:
                    known = self.perturbations.names.get(part.kind, [])
                    hint = close_matches(part.target, known)
                    did = f" Close matches: {preview(hint, 5)}." if hint else ""
                    raise PerturbationError(
                        f"The model cannot represent {str(part)!r}: it was not trained on the {part.kind} "
                        f"{part.target!r}.{did} Known {part.kind}s: {preview(known) or 'none'}. Fine-tune on data "
                        "that includes it, or use a text model (C2S-Scale), which reads any name."
                    )
                toks += ([KIND_TOKENS[part.kind]] if part.kind != "label" else []) + [tok]
                if part.dose is not None:
                    toks.append(_dose_token(part.dose))
                if part.time_hours is not None:
                    toks.append(_time_token(part.time_hours))
                own = own_dose_name(part)  # this drug's own token for this dose, where it was trained at it
                if own_tokens and own is not None and name_token("dose", own) in self.token_id:
                    toks.append(name_token("dose", own))
                    exact = name_token("dose", own_exact_name(part))  # ... and for its very dose and time, where
                    if exact in self.token_id:                        # trained conditions share those bins
                        toks.append(exact)
        return [self.token_id[t] for t in toks]

    def suffix(self, p: Perturbation | Combination) -> list[int]:
        return [*self.perturbation_tokens(p), self.out]

    def response(self, gene_ids: np.ndarray) -> list[int]:
        return [*self.gene_tokens[gene_ids].tolist(), self.eos]

    # the interface the trainer calls (one per format, no type checks)
    def prompt_parts(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> tuple[list[int], list[int]]:
        """``(shared, own)``: the prompt's part that is the same for every perturbation of the cell, and the rest."""
        return self.prefix(cell_gene_ids), self.suffix(p)

    def generic_own(self) -> list[int] | None:
        """``<generic> <out>``, where the tokenizer has the token (checkpoints before it existed do not)."""
        return [self.token_id[GENERIC], self.out] if GENERIC in self.token_id else None

    def plain_own(self, p: Perturbation | Combination) -> list[int] | None:
        if not (self.perturbations.targets_with_gene or self.perturbations.own_doses):
            return None
        return [*self.perturbation_tokens(p, own_tokens=False), self.out]

    def sentence(self, gene_ids: np.ndarray) -> list[int]:
        """A lone cell sentence, for pre-training (every token after the first is a target)."""
        return [self.bos, *self.response(gene_ids)]

    def response_vocabulary(self) -> np.ndarray | None:
        """The only tokens a response may hold (one per gene, and end-of-sentence)."""
        return np.append(self.gene_tokens, self.eos)

    def named_targets(self, own: Sequence[int]) -> list[tuple[int, int]]:
        """A genetic kind's token followed by a gene's token (``<ko> STAT1``): that gene, with its kind."""
        out = []
        for a, b in zip(own[:-1], own[1:]):
            kind = self._genetic_kind.get(int(a))
            if kind is not None and 0 <= int(b) < self.token_to_gene.size and self.token_to_gene[int(b)] >= 0:
                out.append((int(b), kind))
        return out

    def to_genes(self, tokens: Sequence[int]) -> np.ndarray:
        ids = self.token_to_gene[np.asarray(tokens, dtype=np.int64)] if len(tokens) else np.zeros(0, np.int64)
        return ids

    # the interface the model calls
    def check(self, p: Perturbation | Combination) -> None:
        self.suffix(p)

    def grid(self, cells: Sequence[np.ndarray], perturbations: Sequence[Perturbation | Combination], *,
             cell_keys: Sequence[int], perturbation_keys: Sequence[int]) -> PromptGrid:
        """One prefix per cell, shared by one suffix per perturbation; each suffix's counterpart under the
        generic condition is the generic suffix (control's is itself: control is not guided)."""
        suffixes = [self.suffix(p) for p in perturbations]
        generic = self.generic_own()
        guide = None
        if generic is not None:
            guide = [s if isinstance(p, Perturbation) and p.kind == "control" else generic
                     for s, p in zip(suffixes, perturbations)]
        return PromptGrid([self.prefix(c) for c in cells], suffixes, list(cell_keys), list(perturbation_keys),
                          len(perturbations), shared=True, guide_suffixes=guide)

    def constraint(self, genes: Sequence[str], vocab_size: int):  # noqa: ANN201
        from .generation import GeneConstraint

        return GeneConstraint(self.gene_tokens, self.eos, vocab_size)

    def to_sentences(self, tokens: Sequence[Sequence[int]], genes: Vocabulary) -> tuple[CellSentences, int, int]:
        from .sentences import CellSentences

        out = [_dedupe(self.to_genes(t)) for t in tokens]
        gaps = any(o[1].size and o[1][-1] != o[1].size - 1 for o in out)  # (constrained decoding leaves none)
        ranks = np.concatenate([o[1] for o in out]) if gaps else None
        return (CellSentences.from_lists([o[0] for o in out], genes, ranks=ranks), sum(o[2] for o in out),
                sum(o[3] for o in out))



def in_sentence_tokens(tokenizer, genes: Sequence[str]) -> list[list[int]]:  # noqa: ANN001
    """Each gene's tokens as a text tokenizer writes it inside a sentence, after another word and a space: what a
    response is made of (:meth:`C2SFormat.response`) and what the decoding trie allows
    (:class:`~virtualcell.generation.TrieConstraint`), one rule for both. Read off ``"x " + gene`` past the tokens of
    ``"x"``: a tokenizer that puts a space marker before its text (Llama-2's, Mistral's ``▁``) writes ``" STAT1"`` on
    its own as ``▁ ▁STAT1``, which a sentence never holds; where the tokens of ``"x"`` do not lead (a merge across the
    space), the gene's own tokens after a space."""
    head = list(tokenizer("x", add_special_tokens=False)["input_ids"])
    joined = tokenizer(["x " + g for g in genes], add_special_tokens=False)["input_ids"]
    alone = None
    out = []
    for i, ids in enumerate(joined):
        ids = list(ids)
        if ids[: len(head)] == head and len(ids) > len(head):
            out.append(ids[len(head):])
            continue
        if alone is None:
            alone = tokenizer([" " + g for g in genes], add_special_tokens=False)["input_ids"]
        out.append(list(alone[i]))
    return out


class C2SFormat(PromptFormat):
    """The official C2S natural-language perturbation prompt (cell2sentence's tutorial 10 template), for any text
    tokenizer. The perturbation is named in words (:meth:`Perturbation.describe`) where the tutorial writes the bare
    label, and the answer ends at EOS without the tutorial's period."""

    name = "c2s"

    def __init__(self, tokenizer, genes: Sequence[str], perturbations: PerturbationVocab, template: str = C2S_PERTURBATION_PROMPT) -> None:  # noqa: ANN001
        from .sentences import require_symbols

        require_symbols(genes)  # a text model reads symbols; Ensembl ids need --gene-key
        self.tokenizer = tokenizer
        self.genes = list(genes)
        self.perturbations = perturbations
        self.template = template
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.bos = tokenizer.bos_token_id
        self._paths: list[list[int]] | None = None

    def gene_paths(self) -> list[list[int]]:
        """Each gene's tokens inside a sentence (:func:`in_sentence_tokens`), read once; each must decode back to its
        gene, as generated sentences are read (decoded, then split into words)."""
        if self._paths is None:
            paths = in_sentence_tokens(self.tokenizer, self.genes)
            texts = self.tokenizer.batch_decode(paths, skip_special_tokens=True)
            wrong = [(g, t) for g, t in zip(self.genes, texts) if t.strip().upper() != g.upper()]
            if wrong:
                g, t = wrong[0]
                raise ModelError(
                    f"{len(wrong)} of the {len(self.genes)} genes do not come back from the tokenizer as written (e.g. "
                    f"{g!r} decodes as {t.strip()!r}; others: {preview([w for w, _ in wrong[1:]], 4) or 'none'}): a "
                    "generated cell would lose them, or read them as other genes. Use a tokenizer whose decoding "
                    "gives back what it encoded (one with a decoder and byte fallback, as Gemma's, Llama's and "
                    "GPT-2's have), or leave these genes out.")
            self._paths = paths
        return self._paths

    def text(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> str:
        sentence = " ".join(self.genes[i] for i in cell_gene_ids)
        return self.template.format(n=len(cell_gene_ids), perturbation=p.describe(), sentence=sentence)

    def prompt(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> list[int]:
        ids = self.tokenizer(self.text(cell_gene_ids, p), add_special_tokens=False)["input_ids"]
        return ([self.bos] if self.bos is not None else []) + list(ids)

    def response(self, gene_ids: np.ndarray) -> list[int]:
        """The genes' tokens as a sentence holds them (each gene's :meth:`gene_paths`), then EOS: the sequence the
        decoding trie allows, token for token."""
        paths = self.gene_paths()
        return [t for i in gene_ids for t in paths[int(i)]] + [self.eos]

    # the interface the trainer calls (one per format, no type checks)
    def prompt_parts(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> tuple[list[int], list[int]]:
        """``(shared, own)``: this prompt names the perturbation before the cell, so nothing is shared."""
        return [], self.prompt(cell_gene_ids, p)

    def sentence(self, gene_ids: np.ndarray) -> list[int]:
        """A lone cell sentence, for pre-training (every token after the first is a target), after the tokenizer's
        BOS as every prompt is: Gemma (C2S-Scale's base) reads text without its BOS as noise."""
        return ([self.bos] if self.bos is not None else []) + self.response(gene_ids)

    def response_vocabulary(self) -> np.ndarray | None:
        """``None``: a text tokenizer writes genes in several tokens, so no token is ruled out."""
        return None

    # the interface the model calls
    def grid(self, cells: Sequence[np.ndarray], perturbations: Sequence[Perturbation | Combination], *,
             cell_keys: Sequence[int], perturbation_keys: Sequence[int]) -> PromptGrid:
        """One full prompt per (cell, perturbation) pair (the perturbation comes before the cell)."""
        pairs = [(i, j) for i in range(len(cells)) for j in range(len(perturbations))]
        return PromptGrid([self.prompt(cells[i], perturbations[j]) for i, j in pairs], [[]],
                          [cell_keys[i] * 1_000_003 + perturbation_keys[j] for i, j in pairs], [0], len(perturbations),
                          shared=False)

    def constraint(self, genes: Sequence[str], vocab_size: int):  # noqa: ANN201
        from .generation import TrieConstraint

        paths = self.gene_paths() if list(genes) == self.genes else in_sentence_tokens(self.tokenizer, genes)
        return TrieConstraint(paths, genes, self.eos, vocab_size)

    def max_new_tokens(self, max_genes: int, constraint: Any) -> int:
        """A gene is several tokens: enough steps for the ``max_genes`` longest genes (the constraint writes each gene
        once), plus EOS. Unconstrained decoding gets the same steps (``constraint`` is the model's gene paths
        whether or not decoding applies it): a sentence of real genes fits, and the context check refuses no run
        the constrained one would run."""
        lengths = sorted((len(t) for t in constraint.paths), reverse=True)
        return sum(lengths[:max_genes]) + 1

    def to_sentences(self, tokens: Sequence[Sequence[int]], genes: Vocabulary) -> tuple[CellSentences, int, int]:
        from .sentences import parse_text

        texts = self.tokenizer.batch_decode([list(t) for t in tokens], skip_special_tokens=True)
        sentences, report = parse_text(texts, genes)
        return sentences, report.n_invalid, report.n_duplicate


FORMATS: dict[str, type[PromptFormat]] = {"compact": CompactFormat, "c2s": C2SFormat}
