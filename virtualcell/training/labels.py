"""Each cell's typed perturbation, read from the screen's labels, kinds, doses and times.

:func:`typed_labels` turns the labels a screen gives (``STAT1``, ``drugA`` at dose 10, ``A+B``) into the typed
perturbations the model is prompted with (``ko:STAT1``, ``drug:drugA@10uM``, a combination), and fills the model's
:class:`~virtualcell.prompts.PerturbationVocab`: the names it learns, each label's and each condition's typed form,
the aliases by which labels name the panel's genes. ``kind="auto"`` reads genes as knockouts and dosed agents as drugs
(:func:`_auto_kind`); a column of kinds gives each cell one kind, or one per part of a combination (``drug+knockout``).

What a prompt cannot say is refused, not pooled: a genetic perturbation at several times or doses (its prompt carries
neither), and one kind for a combination that types a part against how it trains alone.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from ..contract import DataContract
from ..errors import DataError, preview
from ..perturbations import (EDIT_WORDS, GENETIC, KIND_ALIASES, Combination, Perturbation, control_words,
                             dose_on_one_scale, label_parts, label_stem, looks_like_control, parse, parts_of,
                             read_kinds, split_label, without_quantities, written_kind)
from ..prompts import DOSE_BINS, PerturbationVocab, dose_prompt_key, own_dose_name, own_exact_name
from ..sentences import Vocabulary, target_aliases

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from ..train import TrainConfig

__all__ = ["typed_labels"]

log = logging.getLogger(__name__)

# words that follow a gene in a label without naming a second one: what was done to it ("STAT1_KO"; "JAK2_sg1" is not
# gene-like anyway) or that a part is none ("STAT1_ctrl", "STAT1_NT")
NOT_GENES = EDIT_WORDS | {"CTRL", "NT", "WT", "MUT"}

FEW_CELLS = 3  # a perturbation with fewer cells than this is named: its effect is mostly noise


def typed_labels(adata: ad.AnnData, contract: DataContract, genes: Vocabulary, cfg: TrainConfig, *,
                 warn: bool = True) -> tuple[np.ndarray, PerturbationVocab]:
    """The typed perturbation of every cell (as a string), and the model's perturbation vocabulary. ``warn``: log
    the labels that train but hardly as meant (:func:`_warn_odd_labels`); off for a second reading of the same
    labels in one run (:func:`~virtualcell.training.holdout.unseen_labels`), so each warning is said once."""
    labels = contract.labels(adata)
    kinds = None
    if cfg.kind_key is not None:
        kinds = np.array(read_kinds(adata, cfg.kind_key, controls=labels == contract.control), dtype=object)
    semicolon = sorted({x for x in set(labels) if ";" in x})
    if semicolon:  # (a screen's lists of labels are ';'-joined in ranking.csv/.parquet: one came back as two)
        raise DataError(
            f"{len(semicolon)} perturbation labels in obs[{contract.perturbation_key!r}] hold ';' "
            f"({preview(semicolon, 5)}), which separates labels in a screen's files: rename them in the file, e.g. "
            "adata.obs[key] = adata.obs[key].astype(str).str.replace(';', '_').")
    empty = sorted({x for x in set(labels) - {contract.control} if not all(p.strip() for p in split_label(x))})
    if empty:  # ('STAT1+' trained as the knockout of STAT1, merged with the STAT1 cells; '' failed as a pair)
        raise DataError(
            f"{len(empty)} perturbation labels in obs[{contract.perturbation_key!r}] are empty or have an empty part "
            f"around '+' ({preview(empty, 5)}): '+' joins the parts of a combination ('A+B'), so 'CD14+' would train "
            "as CD14 alone. Rename them in the file, e.g. adata.obs[key] = adata.obs[key].astype(str).str.replace("
            "'+', '_pos'), and give an empty label its perturbation (or drop those cells).")
    dose, when, units = contract.read_quantities(adata)  # (the dose and time columns, read once)
    conditions = contract.conditions(adata, (dose, when))
    vocab = PerturbationVocab(own_targets=cfg.target_tokens in ("own", "both"), own_doses=cfg.dose_tokens == "own",
                              targets_with_gene=cfg.target_tokens == "both", dose_units=units)
    if kinds is not None or cfg.kind in ("auto", *GENETIC):
        vocab.aliases = target_aliases(adata, sorted(set(labels) - {contract.control}), genes)
    typed = np.empty(adata.n_obs, dtype=object)
    cache: dict[tuple, str] = {}
    for i, label in enumerate(labels):
        kind = kinds[i] if kinds is not None else cfg.kind
        d = None if np.isnan(dose[i]) else float(dose[i])
        t = None if np.isnan(when[i]) else float(when[i])
        key = (label, kind, d, t)
        if key not in cache:
            cache[key] = str(_typed(label, kind, d, t, contract, genes, vocab))
        typed[i] = cache[key]
    _refuse_spaced(labels, typed, contract)
    _refuse_merged(labels, typed, contract)
    _refuse_timed_genetic(labels, typed, conditions, (dose, when), contract)
    if kinds is not None:
        _refuse_kind_for_all_parts(cache, contract, genes, vocab, cfg.kind_key, warn=warn)
    if warn:
        _warn_odd_labels(labels, (dose, when), contract, genes)
        _warn_unlistable(labels, contract)
        _warn_dosed_genetic(labels, typed, dose, units, contract)
        _warn_rising_targets(adata, labels, typed, contract)
    if warn and kinds is None and cfg.kind == "auto":
        _warn_unmeasured_knockouts(labels, typed, contract, genes)
        _warn_kind_column(adata, contract, labels, typed)
    if warn and kinds is None and cfg.kind == "auto":  # a time course of knockouts outside the panel reads as drugs
        timed = sorted({str(lab) for lab, form in zip(labels, typed)
                        if form.startswith("drug:") and _all_gene_like(split_label(str(lab)))}
                       - {str(lab) for lab, d in zip(labels, dose) if np.isfinite(d)})
        if timed:
            log.warning("%d labels that look like gene symbols (%s) are read as drugs: their cells carry a time and "
                        "they name no gene of the panel (kind auto). If they are genetic perturbations, pass --kind "
                        "knockout (or activation, knockdown; --kind-key for a column of kinds).", len(timed),
                        preview(timed, 5))
    # each training label maps to its most common typed form (doses dropped); one trained as several kinds (a gene
    # activated in one cell line, knocked down in another) keeps them all, and alone names none of them
    for label in set(labels) - {contract.control}:
        forms = [str(without_quantities(parse(s))) for s in typed[labels == label]]
        vocab.labels[label] = max(set(forms), key=forms.count)
        if kinds is not None and len(set(forms)) > 1:
            vocab.forms[label] = sorted(set(forms))
    if vocab.forms:
        log.info("%d labels name perturbations of several kinds in obs[%r] (%s): each kind trains as its own "
                 "perturbation, and a prediction names it typed (e.g. %r).", len(vocab.forms), cfg.kind_key,
                 preview(sorted(vocab.forms), 5), next(iter(sorted(vocab.forms.items())))[1][0])
    # and each condition with a dose or time (``drugA@10``) to its typed form, which names the model's predictions
    for condition, form in zip(conditions, typed):
        if condition not in vocab.labels and condition != contract.control:
            vocab.conditions.setdefault(str(condition), str(form))
    if vocab.own_doses:
        _add_exact_tokens(vocab)
    if warn:
        _warn_shared_prompts(vocab)
    return typed, vocab


def _add_exact_tokens(vocab: PerturbationVocab) -> None:
    """Where trained conditions read one prompt (:func:`dose_prompt_key`: 48h and 72h share a whole bin of log2
    hours; 1 and 1.5 uM a half-decade), give each part of theirs that the others write in the same bins at another
    dose or time a token for its very dose and time (:func:`own_exact_name`), so they train apart. Conditions that
    already read prompts of their own get none, so their prompts are as before."""
    by_prompt: dict[tuple, list[str]] = {}
    for form in vocab.conditions.values():
        by_prompt.setdefault(dose_prompt_key(parse(form)), []).append(form)
    added: set[str] = set()
    for forms in by_prompt.values():
        if len(set(forms)) < 2:
            continue
        exact: dict[str, set[str]] = {}  # an own bin token's name -> the exact names the group writes under it
        for form in forms:
            for part in parts_of(parse(form)):
                own = own_dose_name(part)
                if own is not None:
                    exact.setdefault(own, set()).add(own_exact_name(part))
        added |= {n for names in exact.values() if len(names) > 1 for n in names}
    # (sorted, after the bins' tokens: ids are stable run to run)
    vocab.names["dose"] += [n for n in sorted(added) if n not in vocab.names["dose"]]


def _refuse_spaced(labels: np.ndarray, typed: np.ndarray, contract: DataContract) -> None:
    """Refuse labels holding spaces, but a drug's or cytokine's name ('Givinostat (ITF2357)' at its doses, as sci-Plex
    names its compounds: its typed form 'drug:Givinostat (ITF2357)@1' reads back, and its tokens are its own). A plain
    label or a gene cannot ('STAT1 KO' is the knockout of STAT1, written 'STAT1')."""
    def agents_only(form: str) -> bool:
        try:
            q = parse(form)
        except ValueError:
            return False
        return all(x.kind in ("drug", "cytokine") for x in parts_of(q))

    spaced = sorted({str(lab) for lab, form in set(zip(labels, typed))
                     if lab != contract.control and any(c.isspace() for c in str(lab)) and not agents_only(str(form))})
    if spaced:
        raise DataError(
            f"{len(spaced)} perturbation labels in obs[{contract.perturbation_key!r}] hold spaces ({preview(spaced, 5)}), "
            "which the name of a gene or a plain label cannot: rename them in the file, e.g. to the gene alone "
            "('STAT1' for 'STAT1 KO') so that a knockout is read as its gene's, or adata.obs[key] = "
            "adata.obs[key].astype(str).str.replace(' ', '_')"
            + (r", or, for spaces around the '+' of a pair, .str.replace(r'\s*\+\s*', '+', regex=True)"
               if any(not any(c.isspace() for c in re.sub(r"\s*\+\s*", "+", x)) for x in spaced) else "")
            + ". A drug's or a cytokine's name may hold spaces: name its dose column (--dose-key) or its kind "
            "(--kind drug, --kind-key).")


def _refuse_merged(labels: np.ndarray, typed: np.ndarray, contract: DataContract) -> None:
    """Refuse a label whose typed form does not read back as itself, and two labels read as one perturbation ('STAT1'
    and 'stat1' are both the knockout of STAT1; 'A+B' and 'B+A' one pair): trained as one, measured as two, they
    failed at the end of training (the verdict simulated it twice) or trained merged under a warning that said
    otherwise."""
    unread = []
    for label, form in sorted(set(zip(labels, typed))):
        try:
            same = str(parse(form)) == form
        except ValueError:
            same = False
        if not same:
            unread.append(label)
    if unread:  # ('A:B@3' is a plain label, written 'label:A:B@3', which reads as 'A:B' at a dose of 3)
        raise DataError(
            f"{len(unread)} perturbation labels in obs[{contract.perturbation_key!r}] cannot be written so that they "
            f"read back as themselves ({preview(unread, 5)}): a label holding ':' after a name that is no kind, or a "
            "kind with a dose ('drug:X@10uM'), mixes the perturbation language's marks. Rename them in the file (e.g. "
            "adata.obs[key] = adata.obs[key].astype(str).str.replace(':', '_')), and give doses in a dose column "
            "(--dose-key).")
    by_form: dict[str, set[str]] = {}
    for label, form in set(zip(labels, typed)):
        if label != contract.control:
            by_form.setdefault(str(form), set()).add(str(label))
    merged = sorted((form, sorted(named)) for form, named in by_form.items() if len(named) > 1)
    if merged:
        said = "; ".join(f"{' and '.join(map(repr, named))} are {form}" for form, named in merged[:5])
        raise DataError(
            f"{len(merged)} perturbations are named by more than one label in obs[{contract.perturbation_key!r}] "
            f"({said}{'; ...' if len(merged) > 5 else ''}): the model would train them as one while the data measures "
            "them apart. Write each one way in the file, e.g. adata.obs[key] = adata.obs[key].astype(str).replace("
            "{'stat1': 'STAT1'}).")


def _refuse_timed_genetic(labels: np.ndarray, typed: np.ndarray, conditions: np.ndarray,
                          quantities: tuple[np.ndarray, np.ndarray], contract: DataContract) -> None:
    """Refuse a genetic perturbation (every part a knockout, knockdown or activation) whose cells carry more than one
    time or dose (a knockout measured at 24h and at 72h; some cells with a time, some without): its prompt carries
    neither, so the model trained the conditions as one perturbation, their effects pooled, and named its
    predictions after one of them, while the only word was that two conditions read one prompt. One time (or dose)
    for all its cells trains as before: dropped from the prompt, its predictions named as the data names the
    condition (``'TF06@,24h'``)."""
    import pandas as pd

    if contract.dose_key is None and contract.time_key is None:
        return
    genetic = {f: _genetic_form(str(f)) for f in set(typed)}
    mask = np.array([genetic[f] for f in typed], dtype=bool) & (labels != contract.control)
    if not mask.any():
        return
    dose, when = quantities
    # (a label trained as several kinds, a column of kinds says, is several perturbations: each its own prompt)
    seen = pd.DataFrame({"label": labels[mask], "form": typed[mask], "condition": conditions[mask],
                         "dose": dose[mask], "time": when[mask]}).drop_duplicates(["label", "form", "condition"])
    counts = seen.groupby(["label", "form"])["condition"].nunique()
    many = sorted({str(lab) for lab, _ in counts.index[counts.to_numpy() > 1]})
    if not many:
        return
    rows = seen[seen["label"].isin(many)]
    varies = rows.groupby(["label", "form"])[["dose", "time"]].nunique(dropna=False).max()
    what = " and ".join(w for w in ("dose", "time") if varies[w] > 1) or "time"
    keys = [k for k, w in ((contract.dose_key, "dose"), (contract.time_key, "time")) if w in what and k is not None]
    key = keys[-1] if keys else "time"
    said = "; ".join(f"{lab!r} at {preview(sorted(set(rows['condition'][rows['label'] == lab])), 4)}"
                     for lab in many[:4])
    context = f"{contract.context_key}+{key}" if contract.context_key else key
    flag = "--time-key" if key == contract.time_key else "--dose-key"
    raise DataError(
        f"{len(many)} genetic perturbation label{'s' if len(many) != 1 else ''} in obs[{contract.perturbation_key!r}] "
        f"{'have' if len(many) != 1 else 'has'} cells at more than one {what} ({said}"
        f"{'; ...' if len(many) > 4 else ''}): a knockout's, knockdown's or activation's prompt carries no dose or "
        f"time, so its cells at each {what} would train as one perturbation (their effects pooled where one context "
        f"holds several), and its predictions, in every context, would be named after one of them. Train the {what} as a context: --context-key {context} without {flag} "
        f"(DataContract(context_key={context!r}, ...)), each {what} a context of its own with its control cells; or "
        f"train one model per {what} (e.g. adata[adata.obs[{key!r}] == ...]). Where some of its cells lack the {what}, "
        "fill it in or drop those cells."
        + (" If the label names an agent given at doses rather than a gene edit (a cytokine named by its gene, IFNG "
           "at 10ng/ml), read it as one: --kind cytokine or --kind drug (or a column of kinds, --kind-key), and "
           "each dose trains as a condition of its own." if "dose" in what else ""))


def _refuse_kind_for_all_parts(cache: Mapping[tuple, str], contract: DataContract, genes: Vocabulary,
                               vocab: PerturbationVocab, kind_key: str | None, *, warn: bool = True) -> None:
    """Refuse a combination whose cells' one kind (a column of kinds gives a cell one) types a part against how it
    trains elsewhere: 'drugA+TF06' of kind 'drug' trained TF06 as a drug while TF06 alone trained as a knockout (two
    perturbations under one name). A part never trained alone is as the column says (a cytokine pair 'IFNG+TNF' names
    genes of the panel), with a warning where a drug part names a gene. A part written typed in the label ('ko:TF06')
    or given its kind per part ('drug+knockout') is as the data says."""
    def family(kind: str) -> str:
        return "genetic" if kind in GENETIC else kind

    alone: dict[str, set[str]] = {}  # each single label's name (upper case) -> the kinds it trained as
    for (label, kind, _, _), form in cache.items():
        parts = label_parts(label, contract.controls)
        if label != contract.control and kind != "control" and len(parts) == 1:
            name = (written_kind(parts[0]) or ("", parts[0]))[1]
            alone.setdefault(name.upper(), set()).add(parts_of(parse(form))[0].kind)
    wrong: dict[str, str] = {}
    drug_genes: dict[str, list[str]] = {}  # parts never trained alone that name genes, typed drugs by the column
    for label, kind, _, _ in cache:
        parts = label_parts(label, contract.controls)
        if label == contract.control or kind in ("control", "auto") or "+" in kind or len(parts) < 2:
            continue
        for x in parts:
            if written_kind(x) is not None:
                continue
            trained = alone.get(x.upper(), set())
            if trained and family(kind) not in {family(k) for k in trained}:
                wrong.setdefault(label, f"{label!r} ({kind}): {x!r} trains alone as {' and '.join(sorted(trained))}")
            elif not trained and kind == "drug" and (x.upper() in genes or x.upper() in vocab.aliases):
                drug_genes.setdefault(label, []).append(x)
    # the column's kind is believed where nothing contradicts it (a cytokine is named by its gene, IFNG+TNF), but a
    # drug named like a gene of the panel is worth a word
    if drug_genes and warn:  # (not again where training reads the labels a second time, warn=False)
        first = sorted(drug_genes)[0]
        many, gene_parts = len(drug_genes) != 1, drug_genes[first]
        parts = label_parts(first, contract.controls)
        log.warning("%d combination label%s in obs[%r] take%s the kind 'drug' from obs[%r] for every part, and %s "
                    "name%s a gene of the panel (%s in %r): %s as a drug of that name. If %s a knockout, give the "
                    "kinds per part (%r) or write it in the label (%r).", len(drug_genes), "s" if many else "",
                    contract.perturbation_key, "" if many else "s", kind_key,
                    "a part" if len(gene_parts) == 1 else "parts", "s" if len(gene_parts) == 1 else "",
                    preview(gene_parts, 4), first, "it trains" if len(gene_parts) == 1 else "each trains",
                    "it is" if len(gene_parts) == 1 else "one is",
                    "+".join("knockout" if x in gene_parts else "drug" for x in parts),
                    "+".join(f"ko:{x}" if x in gene_parts else x for x in parts))
    if wrong:
        first = sorted(wrong)[0]
        kind = next(k for (lab, k, _, _) in cache if lab == first)
        guessed = [(x, _part_kind_guess(x, kind, alone, genes, vocab)) for x in label_parts(first, contract.controls)]
        per_part = "+".join(k for _, k in guessed)
        typed = "+".join(x if k == kind else f"{_SHORT_KIND.get(k, k)}:{x}" for x, k in guessed)
        n_parts = len(guessed)
        as_column = "+".join([kind] * n_parts)  # (the other reading: the part is what the column says, not its single)
        raise DataError(
            f"{len(wrong)} combination label{'s' if len(wrong) != 1 else ''} in obs[{contract.perturbation_key!r}] "
            f"take{'s' if len(wrong) == 1 else ''} one kind from obs[{kind_key!r}] for every part, which types a part "
            f"against how it trains alone ({'; '.join(wrong[k] for k in sorted(wrong)[:4])}"
            f"{'; ...' if len(wrong) > 4 else ''}): which one is meant cannot be read from the data. Give such a "
            f"combination its kinds per part, in the order of its label's parts: obs[{kind_key!r}] {per_part!r} for "
            f"{first!r} where the part is the perturbation it is alone (or write it in the label, {typed!r}), or "
            f"{as_column!r} where it is what the column says (a cytokine pair named by genes whose knockouts are "
            "screened too); or read the kinds from the labels (kind auto: leave out --kind-key).")


_SHORT_KIND = {"knockout": "ko", "knockdown": "kd", "activation": "act", "drug": "drug", "cytokine": "cytokine",
               "label": "label"}


def _part_kind_guess(part: str, kind: str, alone: Mapping[str, set[str]], genes: Vocabulary,
                     vocab: PerturbationVocab) -> str:
    """A combination part's kind as it trains alone (or a knockout, for a gene of the panel in a drug's label), else
    ``kind``: what a refusal suggests writing per part (never a genetic kind for a part the data calls a cytokine)."""
    trained = sorted(alone.get(part.upper(), set()))
    if trained:
        return kind if kind in trained else trained[0]
    return "knockout" if kind == "drug" and (part.upper() in genes or part.upper() in vocab.aliases) else kind


# characters a label may hold that the command line reads otherwise, and where that is
_LIST_CHARACTERS = {",": ("separates the perturbations of predict --perturbations",
                          "list them in a screen's panel file (one a line) or ask for them from Python"),
                    "{": ("opens a group of choices ({a,b})", "ask for them from Python (sim.simulate([...]))"),
                    "}": ("closes a group of choices ({a,b})", "ask for them from Python (sim.simulate([...]))"),
                    "#": ("starts a comment in a panel file", "ask for them from Python (sim.simulate([...]))")}


def _warn_unlistable(labels: np.ndarray, contract: DataContract) -> None:
    """Warn of labels that train but that the command line cannot list as they are: 'anti-CD3,CD28' was asked as
    'anti-CD3' and 'CD28', and the refusal named 'anti-CD3,CD28' as the close match."""
    for ch, (what, instead) in _LIST_CHARACTERS.items():
        held = sorted({x for x in set(labels) if ch in x} - {contract.control})
        if held:
            log.warning("%d perturbation labels hold %r (%s), which %s: %s, or rename them in the file.",
                        len(held), ch, preview(held, 3), what, instead)


def _warn_shared_prompts(vocab: PerturbationVocab) -> None:
    """Warn where trained conditions of one agent read one prompt: doses are written as half-decade bins of log10 of
    the value in its unit, from 1e-4 to 1e4, so doses closer than that, or beyond the range (1e-9 .. 1e-6 written in
    M all read the 1e-4 bin), are one condition to the model; times as whole bins of log2 hours (48h and 72h are
    one). Each is said with its own fix. With tokens of their own for each dose (``dose_tokens="own"``, the default)
    such conditions train apart (:func:`_add_exact_tokens`): said at info, but for doses beyond the bins' range, which
    the model can then tell apart yet not order (a dose between them reads as all of them)."""
    by_prompt: dict[tuple, list[str]] = {}
    for condition, form in vocab.conditions.items():
        by_prompt.setdefault(dose_prompt_key(parse(form)), []).append(condition)
    shared = [sorted(v) for v in by_prompt.values() if len(v) > 1]

    def doses(group: list[str]) -> set:  # each part's dose, without the times
        return {tuple(x.dose for x in parts_of(parse(vocab.conditions[c]))) for c in group}

    def beyond(group: list[str]) -> bool:  # a dose outside the bins' range (each bin is half a decade wide)
        return any(x.dose is not None and not DOSE_BINS[0] - 0.25 <= np.log10(max(x.dose, 1e-300)) <= DOSE_BINS[-1] + 0.25
                   for c in group for x in parts_of(parse(vocab.conditions[c])))

    by_time = [v for v in shared if len(doses(v)) == 1]  # conditions apart by their times alone
    by_dose = [v for v in shared if len(doses(v)) > 1]
    if vocab.own_doses:
        if shared:
            log.info("%d groups of trained conditions share their dose and time bins (%s): each has a token of its own, "
                     "so they train apart; a dose or time between them is read as their shared bins.", len(shared),
                     "; ".join(" = ".join(v) for v in shared[:3]))
        by_dose, by_time = [v for v in by_dose if beyond(v)], []
    if by_dose and vocab.own_doses:
        log.warning("%d groups of trained conditions read one dose token each (%s): a dose is written as a half-decade "
                    "bin of log10 of its value in its unit, from 1e-4 to 1e4, and these lie outside it. Each trained "
                    "dose has a token of its own, so they train apart, but the model cannot order them, and any other "
                    "dose of the agent reads as all of them. Write the doses in a unit that puts them inside that "
                    "range (nM for 1e-9 M).", len(by_dose), "; ".join(" = ".join(v) for v in by_dose[:3]))
    elif by_dose:
        log.warning("%d groups of trained conditions read one prompt each, so the model cannot tell them apart (%s): "
                    "a dose is written as a half-decade bin of log10 of its value in its unit, from 1e-4 to 1e4. "
                    "Where the doses are far apart, write them in a unit that puts them inside that range (nM for "
                    "1e-9 M); where they are close, train with tokens of their own for each dose (--dose-tokens own, "
                    "the default).", len(by_dose), "; ".join(" = ".join(v) for v in by_dose[:3]))
    if by_time:
        log.warning("%d groups of trained conditions read one prompt each, so the model cannot tell them apart (%s): "
                    "a time is written as a whole bin of log2 hours (48h and 72h share one; so do 3h and 4h), from "
                    "2^-3 to 2^9 hours. To keep such times apart, train with tokens of their own for each dose and "
                    "time (--dose-tokens own, the default), with the time as a context (--context-key with the time "
                    "column, not --time-key; each time with its own control cells), or one model per time.",
                    len(by_time), "; ".join(" = ".join(v) for v in by_time[:3]))


def _warn_odd_labels(labels: np.ndarray, quantities: tuple[np.ndarray, np.ndarray], contract: DataContract,
                     genes: Vocabulary) -> None:
    """Warn about labels that train, but hardly as meant: a dose (or time) column that gives no perturbed cell a
    value (the wrong column?); a perturbation given a dose (or time) in some cells and none in others (missing values,
    not a condition of their own); perturbations of fewer than :data:`FEW_CELLS` cells; labels that look like a
    second control; and labels that join genes or training labels with '_' or '|' (a combination is read only as
    'A+B')."""
    perturbed = labels != contract.control
    for values, what, key in zip(quantities, ("dose", "time"), (contract.dose_key, contract.time_key)):
        if key is None:
            continue
        given = np.isfinite(values) & perturbed
        if perturbed.any() and not given.any():
            log.warning("obs[%r], named as the %s column, gives no perturbed cell a %s (every value empty, NaN or 0): "
                        "check the column's name, or leave the %s key unset.", key, what, what, what)
        for label in sorted(set(labels[given])):
            missing = (labels == label) & ~np.isfinite(values)
            if missing.any():
                log.warning("%d cells of %r have no %s in obs[%r] (empty, NaN or 0) while its other %d cells have "
                            "one: they train as a condition of their own, %r without a %s, beside its %ss. If their "
                            "%s is missing, fill it in or drop those cells.", int(missing.sum()), label, what, key,
                            int(((labels == label) & given).sum()), label, what, what, what)
    names_, n_cells = np.unique(labels[perturbed], return_counts=True)
    tiny = [str(x) for x, n in zip(names_, n_cells) if n < FEW_CELLS]
    if tiny:
        log.warning("%d perturbation%s fewer than %d cells (%s): their measured effect is mostly noise, which the "
                    "model trains on and the baselines serve as it is.", len(tiny),
                    "s have" if len(tiny) != 1 else " has", FEW_CELLS, preview(tiny, 5))
    by_case: dict[str, list[str]] = {}
    for x in sorted(set(labels[perturbed])):
        by_case.setdefault(x.upper(), []).append(x)
    cased = [" / ".join(v) for v in by_case.values() if len(v) > 1]  # (twins read as one perturbation are refused)
    if cased:
        log.warning("%d perturbation%s named in more than one case (%s): each spelling trains as a perturbation of "
                    "its own. If they are one, write them one way in obs[%r].", len(cased),
                    "s are" if len(cased) != 1 else " is", preview(cased, 5), contract.perturbation_key)
    stem = label_stem(contract.control)
    alike = sorted(x for x in set(labels[perturbed])
                   if looks_like_control(x) or (stem and label_stem(x) == stem))
    if alike:
        log.warning("%d labels look like control labels (%s) and train as perturbations; if they are controls, "
                    "name them all (--control %s; DataContract(..., other_controls=...)).", len(alike),
                    preview(alike, 5), ",".join([contract.control, *alike[:3]]))
    controls = control_words(contract.controls)

    def beside_control(x: str) -> list[str]:  # the genes of a single written with the control ('KLF1_ctrl'), or []
        parts = re.split(r"[_|]", x)
        rest = [p for p in parts if p.lower() not in controls]
        return rest if 0 < len(rest) < len(parts) and _all_gene_like(rest) and not {
            p.upper() for p in rest} & NOT_GENES else []

    names = ({g.upper() for g in genes.genes} | {str(x).upper() for x in labels[perturbed]}
             | {p.upper() for x in set(labels[perturbed]) for p in beside_control(x)})
    joined = sorted(x for x in set(labels[perturbed]) if beside_control(x) or (
        len(parts := re.split(r"[_|]", x)) > 1 and _all_gene_like(parts) and not {part.upper() for part in parts}
        & NOT_GENES and any(part.upper() in names for part in parts)))
    if joined:
        log.warning("%d labels join genes or other labels with '_' or '|' (%s): each is read as one perturbation "
                    "of its own, not a combination. A combination is written 'A+B': rename them (e.g. "
                    "adata.obs[%r] = adata.obs[%r].str.replace('_', '+')) to train them as pairs (a part naming "
                    "the control, 'KLF1+ctrl', then reads as the other alone).", len(joined),
                    preview(joined, 5), contract.perturbation_key, contract.perturbation_key)
    single = sorted(x for x in set(labels[perturbed]) if len(label_parts(x, contract.controls)) < len(
        [p for p in split_label(x) if p.strip()]))
    if single:
        log.info("%d labels name the control as a part (%s): each is read as its other parts ('%s' as %r), as "
                 "GEARS writes a single.", len(single), preview(single, 5), single[0],
                 "+".join(label_parts(single[0], contract.controls)))


# the fixes for labels that kind auto (or a genetic --kind) reads as gene edits while the data says they are not
_KIND_FIXES = ("pass --kind activation for a CRISPRa screen, --kind cytokine (or drug) for ligands and compounds named "
               "by their genes, or name a column of each cell's kind (--kind-key)")

# a label read as a knockout or knockdown whose own gene's mean log1p expression in its cells is this much above the
# controls' (about 1.65-fold) raises its target, which a knockout does not: half a natural-log unit, far past the
# noise of a mean over a few cells, far below what an activation or a self-inducing cytokine does
RISE = 0.5


def _genetic_form(form: str) -> bool:
    try:
        return all(x.kind in GENETIC for x in parts_of(parse(form)))
    except ValueError:
        return False


def _warn_dosed_genetic(labels: np.ndarray, typed: np.ndarray, dose: np.ndarray, units: Mapping[str, str],
                        contract: DataContract) -> None:
    """Warn of labels read as genetic perturbations whose cells carry doses in a unit of mass or activity (ng/ml,
    U/ml): a gene edit takes no dose, so the dose is dropped, and the label is likely an agent named by its gene (a
    cytokine). Plain numbers (perturbench's '1+1' for its knockouts) and molar units say nothing of the kind."""
    dosed = np.isfinite(dose) & (labels != contract.control)
    said: dict[str, str] = {}
    for label, form in sorted(set(zip(labels[dosed], typed[dosed]))):
        if not _genetic_form(str(form)):
            continue
        for part in label_parts(str(label), contract.controls):
            unit = units.get(part)
            if unit and dose_on_one_scale(unit)[0] in ("ng/ml", "U/ml"):
                said.setdefault(str(label), unit)
    if said:
        shown = [f"{lab} ({u})" for lab, u in sorted(said.items())]
        log.warning("%d label%s read as genetic perturbations (knockouts, knockdowns or activations) %s cells dosed "
                    "in a unit of mass or activity (%s): a gene edit takes no dose, so the dose is dropped from %s "
                    "prompt%s. If they are agents named by their genes (a cytokine such as IFNG at 10ng/ml), pass "
                    "--kind cytokine (or --kind drug; --kind-key for a column of kinds).", len(said),
                    "s" if len(said) != 1 else "", "have" if len(said) != 1 else "has", preview(shown, 5),
                    "their" if len(said) != 1 else "its", "s" if len(said) != 1 else "")


def _warn_unmeasured_knockouts(labels: np.ndarray, typed: np.ndarray, contract: DataContract,
                               genes: Vocabulary) -> None:
    """Warn (kind auto) where labels are read as knockouts and not one of them names a gene of the panel ('IFNB'
    alone, Kang's interferon): a knockout screen measures some of its targets, so these are likely agents named like
    genes. Trained as knockouts, every knockout the model is asked about, of any gene, is served their effect."""
    knocked: set[str] = set()
    for label, form in set(zip(labels, typed)):
        if label == contract.control or not _genetic_form(str(form)):
            continue
        parts = parts_of(parse(str(form)))
        if any(x.target in genes for x in parts):
            return
        knocked.add(str(label))
    if knocked:
        many = len(knocked) != 1
        log.warning("%d label%s (%s) %s read as %s, as kind auto reads a name like a gene's, and %s gene of "
                    "the panel: a knockout screen measures some of its targets, so %s likely no gene edit%s. Trained "
                    "as knockouts, the model would serve %s effect for a knockout of any gene. If %s, %s. If %s gene "
                    "edits whose targets the panel leaves out, pass --kind knockout to say so.", len(knocked),
                    "s" if many else "", preview(sorted(knocked), 5), "are" if many else "is",
                    "knockouts" if many else "a knockout", "none names a" if many else "it names no",
                    "these are" if many else "it is", "s" if many else "", "their" if many else "its",
                    "they are agents or stimulations" if many else "it is an agent or a stimulation", _KIND_FIXES,
                    "they are" if many else "it is")


def _warn_rising_targets(adata: ad.AnnData, labels: np.ndarray, typed: np.ndarray, contract: DataContract) -> None:
    """Warn where most labels read as knockouts or knockdowns of a gene of the panel raise that gene's own
    expression in their cells (mean log1p, against the controls of each cell's context, by more than :data:`RISE`):
    a knockout lowers its target's expression or leaves it, an activation (CRISPRa) or a cytokine that induces its
    own gene (TNF) raises it. Singles with :data:`FEW_CELLS` cells or more are judged."""
    import scipy.sparse as sp

    from ..sentences import TARGET_SUM, detect_scale

    local = Vocabulary.from_adata(adata)
    target: dict[str, int] = {}  # each single knockout or knockdown label -> its gene's column
    for label, form in set(zip(labels, typed)):
        if label == contract.control:
            continue
        try:
            p = parse(str(form))
        except ValueError:
            continue
        if isinstance(p, Perturbation) and p.kind in ("knockout", "knockdown") and local.find(p.target) >= 0:
            target[str(label)] = local.find(p.target)
    if not target:
        return
    X = adata.X
    scale = detect_scale(X)
    totals = np.asarray(X.sum(axis=1)).ravel().astype(np.float64)
    totals[totals == 0] = 1.0
    cols = np.array(sorted(set(target.values())))
    col_at = {c: i for i, c in enumerate(cols)}

    def normalized(values: np.ndarray, rows: np.ndarray) -> np.ndarray:  # log1p values, as training reads them
        values = np.asarray(values, dtype=np.float64)
        if scale == "log1p":
            return values
        factor = TARGET_SUM / totals[rows]
        return np.log1p(values * (factor[:, None] if values.ndim == 2 else factor))

    contexts = contract.contexts(adata)
    is_control = contract.is_control(adata)
    control_mean: dict[str, np.ndarray] = {}
    for c in np.unique(contexts[is_control]):
        rows = np.flatnonzero(is_control & (contexts == c))
        sub = X[rows][:, cols]
        if sp.issparse(sub):  # kept sparse (a large screen's controls by its targets, dense in float64, took GBs)
            sub = sp.csr_matrix(sub, dtype=np.float64)
            if scale != "log1p":
                sub = sp.csr_matrix(sp.diags(TARGET_SUM / totals[rows]) @ sub)
                sub.data = np.log1p(sub.data)
            control_mean[str(c)] = np.asarray(sub.mean(axis=0)).ravel()
        else:
            control_mean[str(c)] = normalized(np.asarray(sub), rows).mean(axis=0)
    changes: dict[str, float] = {}
    import pandas as pd

    judged = np.isin(contexts, list(control_mean))
    rows_of = pd.Series(np.arange(len(labels))).groupby(np.asarray(labels, dtype=str)).indices  # (one pass)
    for label, col in target.items():
        rows = rows_of.get(str(label), np.array([], dtype=np.int64))
        rows = rows[judged[rows]]
        if rows.size < FEW_CELLS:
            continue
        values = X[rows, np.full(rows.size, col)]
        own = normalized(np.asarray(values).ravel(), rows)
        base = np.array([control_mean[str(c)][col_at[col]] for c in contexts[rows]])
        changes[label] = float(np.mean(own - base))
    rising = {lab: d for lab, d in changes.items() if d > RISE}
    if changes and len(rising) * 2 > len(changes):
        shown = [f"{lab} {d:+.2f}" for lab, d in sorted(rising.items(), key=lambda kv: -kv[1])]
        log.warning("%d of %d labels read as knockouts or knockdowns of a gene of the panel raise that gene's own "
                    "expression in their cells against the controls (mean log1p: %s): a knockout lowers its target "
                    "or leaves it, so they are likely activations (CRISPRa) or agents that induce their own gene (a "
                    "cytokine named by its gene, such as TNF). If so, %s.", len(rising), len(changes),
                    preview(shown, 5), _KIND_FIXES)


def _warn_kind_column(adata: ad.AnnData, contract: DataContract, labels: np.ndarray, typed: np.ndarray) -> None:
    """Warn (kind auto, no column of kinds named) of an obs column whose values, over the perturbed cells, are mostly
    perturbation kinds (:data:`~virtualcell.perturbations.KIND_ALIASES`: scPerturb's 'perturbation_type', as the
    synthetic screen ships it) and that types some cells otherwise than kind auto read their labels (``typed``): kind
    auto reads kinds from the labels alone, never from it. A column that agrees with the reading is not worth a word
    (a knockout screen's 'CRISPR', a drug screen's 'drug')."""
    import pandas as pd

    perturbed = ~contract.is_control(adata)
    if not perturbed.any():
        return
    named = {contract.perturbation_key, contract.dose_key, contract.time_key, contract.dose_unit_key,
             *(contract.context_key or "").split("+")}
    for col in adata.obs.columns:
        values = adata.obs[col]
        if col in named or not (values.dtype == object or isinstance(values.dtype, (pd.CategoricalDtype,
                                                                                    pd.StringDtype))):
            continue
        counts = values[perturbed].astype(str).str.strip().str.lower().value_counts()
        known = [v for v in counts.index if all(k.strip() in KIND_ALIASES for k in str(v).split("+"))]
        kinds = {KIND_ALIASES.get(k.strip()) for v in known for k in str(v).split("+")} - {"control", "label"}
        if not (kinds and counts[known].sum() * 2 > counts.sum()):
            continue
        said = values[perturbed].astype(str).str.strip().str.lower().to_numpy()
        differ = set()
        for label, form, value in set(zip(labels[perturbed], typed[perturbed], said)):  # (each reading once)
            if value not in KIND_ALIASES and not all(k.strip() in KIND_ALIASES for k in value.split("+")):
                continue
            column = [KIND_ALIASES[k.strip()] for k in value.split("+")]
            try:
                read = [x.kind for x in parts_of(parse(str(form)))]
            except ValueError:
                continue
            column = [k for k in column if k != "control"]  # (GEARS' 'KLF1+ctrl' as 'CRISPR+control')
            if not (sorted(column) == sorted(read) or (len(column) == 1 and set(read) == set(column))):
                differ.add(f"{label} ({'+'.join(read)}; the column: {'+'.join(column)})")
        if differ:
            log.warning("obs[%r] holds perturbation kinds (%s), which kind auto does not read: it types each label "
                        "by its name (a gene of the panel as a knockout, a dosed agent as a drug), and %d label%s "
                        "read otherwise than the column says (%s). To train each cell as that column says, pass "
                        "--kind-key %s (TrainConfig(kind_key=%r)).", col, preview(sorted(known), 5),
                        len(differ), "s" if len(differ) != 1 else "", preview(sorted(differ), 3), col, col)
            return


def _typed(label: str, kind: str, dose: float | None, time_: float | None, contract: DataContract,
           genes: Vocabulary, vocab: PerturbationVocab) -> Perturbation | Combination:
    if label == contract.control or kind == "control":
        return Perturbation("control")
    parts = label_parts(label, contract.controls)  # ('KLF1+ctrl', as GEARS writes a single, is KLF1)
    dosed = dose is not None or time_ is not None
    part_kinds = None
    given = _kinds_per_part(label, kind, parts, contract) if "+" in kind else None  # ('drug+knockout')
    written = [written_kind(x) for x in parts]  # a part the data writes typed ('ko:STAT1', 'drug:5-FU')
    if any(written):
        parts = [w[1] if w else x for x, w in zip(parts, written)]
        rest = [x for x, w in zip(parts, written) if not w]
        if kind == "auto":
            kind = _auto_kind(rest, genes, vocab.aliases, dosed=dosed) if rest else written[0][0]
        part_kinds = [w[0] if w else (given[i] if given else kind) for i, w in enumerate(written)]
    elif given is not None:
        part_kinds = given
    elif kind == "auto":
        gene_parts = [x.upper() in genes or x.upper() in vocab.aliases for x in parts]
        if dosed and any(gene_parts) and not all(gene_parts):
            # a dosed drug with a knockout of a panel gene ('drugA+G5' at 10 nM): each part its own kind, the dose
            # the drug's (one kind for the label read G5 as a drug at 10 nM, a form no one asks)
            part_kinds = ["knockout" if g else "drug" for g in gene_parts]
        kind = _auto_kind(parts, genes, vocab.aliases, dosed=dosed)
    if dosed and all(k == "label" for k in part_kinds or [kind]):
        raise DataError(
            f"Perturbation {label!r} is read as a plain label (kind 'label'), which carries no dose or time, but its "
            f"cells have a dose or time (the contract's dose_key {contract.dose_key!r} / time_key "
            f"{contract.time_key!r}); they would be dropped. Pass kind='drug' or 'cytokine' (--kind, or --kind-key "
            "for a column of kinds), or leave the dose and time keys unset if they do not apply.")
    out: list[Perturbation] = []
    for x, kind in zip(parts, part_kinds or [kind] * len(parts)):
        if kind in GENETIC:
            target = vocab.aliases.get(x.upper(), x.upper())  # the gene it names, where the labels name genes otherwise
            if target in genes:  # as the model spells it ('ENSG00000096968' is the panel's 'ENSG00000096968.21')
                target = genes.genes[genes.find(target)]
            if (target not in genes or vocab.own_targets) and target not in vocab.names["target"]:
                vocab.names["target"].append(target)
            out.append(Perturbation(kind, target))  # type: ignore[arg-type]
        elif kind in ("drug", "cytokine"):
            if x not in vocab.names[kind]:
                vocab.names[kind].append(x)
            unit = vocab.dose_units.get(x) if dose is not None else None  # the data's unit ("10uM"), if it gave one
            out.append(Perturbation(kind, x, dose, unit, time_, "h" if time_ is not None else None))  # type: ignore[arg-type]
            own = own_dose_name(out[-1])
            if vocab.own_doses and own is not None and own not in vocab.names["dose"]:
                vocab.names["dose"].append(own)
        else:
            if x not in vocab.names["label"]:
                vocab.names["label"].append(x)
            out.append(Perturbation("label", x))
    return out[0] if len(out) == 1 else Combination(tuple(out))


def _kinds_per_part(label: str, kind: str, parts: list[str], contract: DataContract) -> list[str]:
    """The kinds a column of kinds gives a combination one per part (``'drug+knockout'`` for ``'drugA+TF06'``), in
    the order of the label's parts; refused where their number is not the label's parts' (a part naming the control,
    'KLF1+ctrl', may have its kind or not) or one of them is the control."""
    kinds = kind.split("+")
    written = [x.strip() for x in split_label(label) if x.strip()]
    if len(kinds) == len(written) != len(parts):  # (a kind for the part naming the control too: dropped with it)
        kinds = [k for k, x in zip(kinds, written) if x.lower() not in control_words(contract.controls)]
    if len(kinds) != len(parts) or "control" in kinds:
        example = [k if k != "control" else "knockout" for k in (kinds + kinds[-1:] * len(parts))[:len(parts)]]
        raise DataError(
            f"Perturbation {label!r} is given the kinds {kind!r}, one per part joined by '+', but "
            + (f"it has {len(parts)} part{'s' if len(parts) != 1 else ''} ({preview(parts, 5)})"
               if len(kinds) != len(parts) else "a part's kind is the control")
            + f". Give it one kind per part in the order of its label's parts in the column of kinds (e.g. "
            f"{'+'.join(example)!r}), or one kind for all its parts.")
    return kinds


def _auto_kind(parts: list[str], genes: Vocabulary, aliases: Mapping[str, str], *, dosed: bool) -> str:
    """``kind="auto"``: labels that name the panel's genes (or their aliases) are knockouts; otherwise a label whose
    cells carry a dose or time is a drug (a compound given at doses, not a gene edit), and labels that look like
    gene symbols are knockouts of unmeasured genes; anything else is a plain label."""
    if all(x.upper() in genes or x.upper() in aliases for x in parts):
        return "knockout"
    if dosed:
        return "drug"
    return "knockout" if _all_gene_like(parts) else "label"


def _all_gene_like(parts: list[str]) -> bool:
    """Labels that look like gene symbols (upper case letters and digits) are read as genetic targets."""
    return all(re.fullmatch(r"[A-Z][A-Z0-9\-\.]{1,15}", x) is not None for x in parts)
