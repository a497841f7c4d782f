"""A checkpoint's card: what the model is, what it was trained on, what it can be asked, and how it did.

``virtualcell info --model DIR`` prints it (``--json`` for a script); :func:`card` gives the same as a dict. Someone
handed a model folder reads here, before screening with it, which perturbations it knows (as the data named them),
which contexts it saw perturbed, how long it trained and on what, and its validation verdict with the weight it
serves. Everything comes from the checkpoint's own record; nothing is simulated.
"""

from __future__ import annotations

import textwrap
from collections import Counter
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from .model import C2SModel

__all__ = ["card", "card_text"]

def card(model: C2SModel) -> dict[str, Any]:
    """The model's card as plain data (JSON-ready): ``model``, ``genes``, ``data``, ``perturbations``,
    ``contexts``, ``measured`` (each condition of the served baselines and the contexts it was measured in,
    :meth:`C2SModel.measured_pairs`), ``training``, ``verdict``. A field the checkpoint did not record, or one it
    cannot tell, is ``None``."""
    from .perturbations import parse

    run = model.train_config
    vocab = model.perturbations
    contract = model.contract
    trained = vocab.trained()
    # a label trained as several kinds (vocab.forms) is each of them: "act:MAP2K3 | kd:MAP2K3"
    typed = {c: " | ".join(vocab.forms[c]) if c in vocab.forms else vocab.trained_form(c) for c in trained}
    kinds = Counter(_kind(parse(t)) for c, f in typed.items() if f for t in vocab.forms.get(c, [f]))
    genes = list(model.genes.genes)
    last = (run.get("history") or [{}])[-1]
    verdict = model.verdict or {}
    measured = model.measured_pairs()
    return {
        "model": {"source": model.source, "parameters": int(model.n_parameters), "format": model.format.name,
                  "top_k": int(model.top_k), "base": run.get("base")},
        "genes": {"n": len(genes), "ids": _are_ids(genes), "first": genes[:8]},
        "data": None if contract is None else {
            "perturbation_key": contract.perturbation_key, "control": contract.control,
            "other_controls": list(contract.other_controls), "context_key": contract.context_key,
            "dose_key": contract.dose_key, "dose_unit_key": contract.dose_unit_key, "time_key": contract.time_key,
            "gene_key": contract.gene_key,
            "data_hash": run.get("data_hash"), "holdout": run.get("holdout") or {}},
        "perturbations": {"n": len(trained), "kinds": dict(kinds), "trained": typed,
                          # the genetic kinds it can predict of any of its genes, never trained on (the kinds it trained
                          # on: C2SModel.resolve refuses another)
                          "untrained_genetic": [] if model.format.name == "c2s" or not genes else
                          vocab.trained_genetic_kinds()},
        "contexts": model.trained_contexts,
        "measured": None if measured is None else {name: list(c) for name, c in measured.items()},
        "training": None if not run else {
            "steps": run.get("steps"), "max_steps": run.get("max_steps"), "max_minutes": run.get("max_minutes"),
            "seed": run.get("seed"), "device": run.get("device"), "n_train_cells": run.get("n_train_cells"),
            "n_verdict_cells": run.get("n_verdict_cells"), "unseen_labels": run.get("unseen_labels") or [],
            "context_verdict": bool(run.get("context_verdict")), "minutes": _minutes(last),
            "final_loss": last.get("loss"), "hidden_size": run.get("hidden_size"), "n_layers": run.get("n_layers")},
        "verdict": None if not verdict else {
            "summary": verdict.get("summary"), "weight": verdict.get("weight"),
            "settings": verdict.get("settings") or {}, "decode": (verdict.get("codec") or {}).get("decode"),
            "unseen": _part(verdict.get("unseen")), "new_context": _part(verdict.get("new_context"))},
    }


def card_text(c: dict[str, Any]) -> str:
    """The card for a person, a few labelled lines."""
    from .errors import a_kind_of, preview
    from .validation import settings_text

    m, g, d, p, t, v = c["model"], c["genes"], c["data"], c["perturbations"], c["training"], c["verdict"]
    lines = [f"model        {m['source'] or 'in memory'}: {m['parameters'] / 1e6:.2f}M parameters, prompt format "
             f"{m['format']!r}, {m['top_k']}-gene cell sentences" + (f", fine-tuned from {m['base']}" if m["base"] else ""),
             f"genes        {g['n']} ({'Ensembl ids' if g['ids'] else 'symbols'}: {', '.join(g['first'][:5])}"
             + (f" … and {g['n'] - 5} more)" if g["n"] > 5 else ")")]
    if d is not None:
        controls = ", ".join(repr(x) for x in [d["control"], *d["other_controls"]])
        extra = [f"{k.removesuffix('_key').replace('_', ' ')} obs[{d[k]!r}]"
                 for k in ("context_key", "dose_key", "dose_unit_key", "time_key") if d.get(k)]
        lines.append(f"data         perturbations in obs[{d['perturbation_key']!r}], control {controls}"
                     + (f"; {', '.join(extra)}" if extra else "")
                     + (f"; genes from var[{d['gene_key']!r}]" if d["gene_key"] else "")
                     + (f"; held out: {_holdout_text(d['holdout'])}" if d["holdout"] else ""))
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(p["kinds"].items()))
    named = [f"{c} ({f})" if f and c != f.split(":", 1)[-1] else c for c, f in p["trained"].items()]
    lines.append(f"knows        {p['n']} trained condition{'' if p['n'] == 1 else 's'} ({kinds or 'none'}): "
                 f"{preview(named, 60)}")
    if p["untrained_genetic"]:
        lines.append(f"             and {a_kind_of(p['untrained_genetic'])} of any of its genes, never trained on "
                     "(generated with the coexpression prior)")
    contexts = c["contexts"]
    if contexts is None and d is not None and d["context_key"]:
        lines.append("contexts     not recorded by this checkpoint")
    elif contexts is not None and list(contexts) != ["all"]:
        seen = [x for x, n in contexts.items() if n["perturbed"] > 0]
        held = ((v or {}).get("new_context") or {}).get("context")  # its perturbed cells judged, not trained on
        controls_only = [f"{x!r} (perturbed cells held out for the context verdict)" if x == held else repr(x)
                         for x, n in contexts.items() if n["perturbed"] == 0]
        lines.append(f"contexts     {len(contexts)}; seen perturbed: {preview(seen, 8)}"
                     + (f"; controls only: {', '.join(controls_only[:8])}"
                        + (f" … and {len(controls_only) - 8} more" if len(controls_only) > 8 else "")
                        if controls_only else "")
                     + ("; predicting cells of a context not seen perturbed is a transfer, which its verdict judged "
                        f"on {held!r} (below)" if held is not None else
                        "; predicting cells of a context not seen perturbed is a transfer its verdict did not check"))
    partly = _measured_partly(c.get("measured"))
    if partly:
        shown = [f"{name} in {', '.join(where) or 'none'}" for name, where in list(partly.items())[:6]]
        lines.append(f"measured     {len(partly)} of {len(c['measured'])} conditions in only some of the contexts "
                     f"seen perturbed: {'; '.join(shown)}" + (f" … and {len(partly) - 6} more" if len(partly) > 6 else "")
                     + "; a cell of another context is served their effect measured there (a transfer: a screen's "
                       "unmeasured_in column names such contexts)")
    if t is not None:
        took = f" in {t['minutes']:.1f} min" if t["minutes"] is not None else ""
        loss = f", final loss {t['final_loss']:.3f}" if t["final_loss"] is not None else ""
        lines.append(f"training     {t['steps'] if t['steps'] is not None else '?'} steps{took} on {t['device'] or '?'} "
                     f"(seed {t['seed']}{loss}; {_count(t['n_train_cells'])} training cells, "
                     f"{_count(t['n_verdict_cells'])} held out for the verdict)")
        if t["unseen_labels"]:
            lines.append(f"             held out whole for the verdict: {preview(t['unseen_labels'], 8)}")
    if v is None:
        lines.append("verdict      none in this checkpoint: predictions are the pure model's")
    else:
        w = v["weight"]
        lines.append(f"verdict      {v['summary'] or 'no summary'}")
        lines.append("serves       " + ("the pure model" if w is None else
                                        f"a blend, weight {w:.2f} on the model (1 - w on the training baseline)")
                     + (f"; {v['unseen']['weight']:.2f} for perturbations never trained on"
                        if w is not None and v["unseen"] and v["unseen"].get("weight") is not None else "")
                     + f"; generation {settings_text(v['settings'])}"
                     + (f"; decode {v['decode']}" if v["decode"] else ""))
        if v["new_context"] and v["new_context"].get("summary"):
            lines.append(f"new context  {v['new_context']['summary']}")
    return "\n".join(textwrap.fill(line, width=118, subsequent_indent=" " * 13, break_long_words=False,
                                   break_on_hyphens=False) for line in lines)


def _measured_partly(measured: dict[str, list[str]] | None) -> dict[str, list[str]]:
    """The conditions of a card's ``measured`` that were measured in some of the contexts any was measured in, not
    all, with those contexts."""
    if not measured:
        return {}
    everywhere = set().union(*map(set, measured.values()))
    return {name: list(where) for name, where in measured.items() if set(where) != everywhere}


def _count(n: int | None) -> str:
    return "?" if n is None else f"{int(n):,}"


def _kind(q: Any) -> str:
    from .perturbations import Combination

    return "combination" if isinstance(q, Combination) else q.kind


def _are_ids(genes: list[str]) -> bool:
    return bool(genes) and sum(str(x).upper().startswith("ENS") for x in genes) > len(genes) / 2


def _minutes(last: dict[str, Any]) -> float | None:
    return None if last.get("elapsed_s") is None else float(last["elapsed_s"]) / 60


def _part(part: Any) -> dict[str, Any] | None:
    """An unseen or new-context part of a verdict: its summary and weight."""
    if not part:
        return None
    return {"summary": part.get("summary"), "weight": part.get("weight"), "served": part.get("served"),
            "context": part.get("context")}


def _holdout_text(holdout: dict[str, Any]) -> str:
    return "; ".join(f"{col}={','.join(map(str, values))}" for col, values in holdout.items())
