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

This module needs ``tokenizers``/``transformers`` only to build a tokenizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import PerturbationError, close_matches, preview
from .perturbations import GENETIC, Combination, Perturbation, parse

__all__ = [
    "C2S_PERTURBATION_PROMPT",
    "SPECIAL_TOKENS",
    "PerturbationVocab",
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


def _dose_token(dose: float) -> str:
    v = math.log10(max(dose, 1e-12))
    b = min(DOSE_BINS, key=lambda x: abs(x - v))
    return f"<dose:{b:g}>"


def _time_token(hours: float) -> str:
    v = math.log2(max(hours, 1e-6))
    b = min(TIME_BINS, key=lambda x: abs(x - v))
    return f"<time:{b}>"


@dataclass
class PerturbationVocab:
    """What perturbations a model knows.

    ``labels`` maps each training label (as written in the data's perturbation column)
    to its typed form, so that users may write either. ``names`` holds the token-level
    names of drugs, cytokines and plain labels the model was trained on.
    """

    labels: dict[str, str] = field(default_factory=dict)
    names: dict[str, list[str]] = field(default_factory=lambda: {"drug": [], "cytokine": [], "label": [], "target": []})

    def resolve(self, p: str | Perturbation | Combination) -> Perturbation | Combination:
        """A typed perturbation; a plain label is looked up among the training labels."""
        if isinstance(p, str) and p in self.labels:
            return parse(self.labels[p])
        q = parse(p)
        parts = q.parts if isinstance(q, Combination) else (q,)
        out = []
        for part in parts:
            if part.kind == "label" and part.target in self.labels:
                out.append(parse(self.labels[part.target]))
            elif part.kind == "label" and part.target not in self.names["label"]:
                hint = close_matches(part.target, list(self.labels))
                did = f" Close matches it knows: {preview(hint, 5)}." if hint else ""
                raise PerturbationError(
                    f"The model does not know the perturbation {part.target!r}.{did} Known labels: "
                    f"{preview(sorted(self.labels), 12)}. Or write a typed perturbation, e.g. 'ko:{part.target}'."
                )
            else:
                out.append(part)
        flat: list[Perturbation] = []
        for x in out:
            flat.extend(x.parts if isinstance(x, Combination) else [x])
        return flat[0] if len(flat) == 1 else Combination(tuple(flat))

    def labels_for(self, perturbations: Sequence[Perturbation | Combination]) -> list[str]:
        """The training label written for each perturbation (``"STAT1"``, pairs ``"A+B"``), or its
        typed form when the training data had no such label; predictions then match measured data."""
        typed_to_label = {str(parse(t)): lab for lab, t in self.labels.items()}

        def one(p: Perturbation | Combination) -> str:
            if str(p) in typed_to_label:
                return typed_to_label[str(p)]
            parts = p.parts if isinstance(p, Combination) else (p,)
            labels = [typed_to_label.get(str(q)) for q in parts]
            return "+".join(labels) if len(parts) > 1 and all(labels) else str(p)

        return [one(p) for p in perturbations]

    def to_dict(self) -> dict[str, Any]:
        return {"labels": dict(self.labels), "names": {k: list(v) for k, v in self.names.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PerturbationVocab:
        names = {"drug": [], "cytokine": [], "label": [], "target": []}
        names.update({k: list(v) for k, v in d.get("names", {}).items()})
        return cls(dict(d.get("labels", {})), names)


def name_token(kind: str, name: str) -> str:
    return f"<{kind}:{name}>"


def build_gene_tokenizer(genes: Sequence[str], perturbations: PerturbationVocab):  # noqa: ANN201
    """A word-level tokenizer: one token per gene, plus special and perturbation tokens.

    It splits on white space only (``WhitespaceSplit``), so names such as ``HLA-DRA``
    stay one token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    extra = [name_token(k, n) for k in ("drug", "cytokine", "label", "target") for n in perturbations.names.get(k, [])]
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


class CompactFormat:
    """Token-level prompts for gene-level models; shares each cell's prefix across perturbations."""

    name = "compact"
    shares_prefix = True

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

    def prefix(self, cell_gene_ids: np.ndarray) -> list[int]:
        return [self.bos, *self.gene_tokens[cell_gene_ids].tolist(), self.sep]

    def perturbation_tokens(self, p: Perturbation | Combination) -> list[int]:
        parts = p.parts if isinstance(p, Combination) else (p,)
        if not parts:
            return [self.token_id[KIND_TOKENS["control"]]]
        toks: list[str] = []
        for part in parts:
            if part.kind in GENETIC:
                target = part.target if part.target in self.token_id else name_token("target", part.target)
                if target not in self.token_id:
                    raise PerturbationError(
                        f"{part}: {part.target!r} is neither a gene of this model nor a target it was trained on. "
                        "Genetic perturbations can target any gene in the model's vocabulary."
                    )
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
        return [self.token_id[t] for t in toks]

    def suffix(self, p: Perturbation | Combination) -> list[int]:
        return [*self.perturbation_tokens(p), self.out]

    def response(self, gene_ids: np.ndarray) -> list[int]:
        return [*self.gene_tokens[gene_ids].tolist(), self.eos]

    # the interface the trainer calls (one per format, no type checks)
    def prompt_parts(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> tuple[list[int], list[int]]:
        """``(shared, own)``: the prompt's part that is the same for every perturbation of the cell, and the rest."""
        return self.prefix(cell_gene_ids), self.suffix(p)

    def sentence(self, gene_ids: np.ndarray) -> list[int]:
        """A lone cell sentence, for pre-training (every token after the first is a target)."""
        return [self.bos, *self.response(gene_ids)]

    def response_vocabulary(self) -> np.ndarray | None:
        """The only tokens a response may hold (one per gene, and end-of-sentence)."""
        return np.append(self.gene_tokens, self.eos)

    def to_genes(self, tokens: Sequence[int]) -> np.ndarray:
        ids = self.token_to_gene[np.asarray(tokens, dtype=np.int64)] if len(tokens) else np.zeros(0, np.int64)
        return ids


class C2SFormat:
    """The official C2S natural-language perturbation prompt, for any text tokenizer."""

    name = "c2s"
    shares_prefix = False

    def __init__(self, tokenizer, genes: Sequence[str], perturbations: PerturbationVocab, template: str = C2S_PERTURBATION_PROMPT) -> None:  # noqa: ANN001
        self.tokenizer = tokenizer
        self.genes = list(genes)
        self.perturbations = perturbations
        self.template = template
        self.eos = tokenizer.eos_token_id
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos
        self.bos = tokenizer.bos_token_id

    def text(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> str:
        sentence = " ".join(self.genes[i] for i in cell_gene_ids)
        return self.template.format(n=len(cell_gene_ids), perturbation=p.describe(), sentence=sentence)

    def prompt(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> list[int]:
        ids = self.tokenizer(self.text(cell_gene_ids, p), add_special_tokens=False)["input_ids"]
        return ([self.bos] if self.bos is not None else []) + list(ids)

    def response(self, gene_ids: np.ndarray) -> list[int]:
        text = "".join(" " + self.genes[i] for i in gene_ids)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos]

    # the interface the trainer calls (one per format, no type checks)
    def prompt_parts(self, cell_gene_ids: np.ndarray, p: Perturbation | Combination) -> tuple[list[int], list[int]]:
        """``(shared, own)``: this prompt names the perturbation before the cell, so nothing is shared."""
        return [], self.prompt(cell_gene_ids, p)

    def sentence(self, gene_ids: np.ndarray) -> list[int]:
        """A lone cell sentence, for pre-training (every token after the first is a target)."""
        return self.response(gene_ids)

    def response_vocabulary(self) -> np.ndarray | None:
        """``None``: a text tokenizer writes genes in several tokens, so no token is ruled out."""
        return None
