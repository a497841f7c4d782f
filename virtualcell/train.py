"""Fine-tuning: a perturbation screen (AnnData) → (prompt, response) pairs → a C2S model.

The recipe, from what was measured to make a tiny C2S-style model learn on a CPU
(README, "Fine-tune on your own screen"):

1. **Pairs by similarity.** Each perturbed cell is paired with one of its nearest
   control cells of the same context (PCA space), not a random one, so the control
   sentence carries information about the cell.
2. **Control → control pairs too**, so that the model's own drift can be cancelled
   at prediction time (predict ``x + decode(perturbed) − decode(control)``).
3. **Pre-training** on single cell sentences first, then fine-tuning on pairs, with
   the loss on the response only.
4. **The no-repeat mask inside the loss** (gene-level models): a gene already written
   and any non-gene token get no probability, so capacity goes to the perturbation
   rather than to learning not to repeat.
5. **Many small optimizer steps** beat a larger model in a fixed time budget.

The same entry point fine-tunes a real C2S checkpoint (``base=...``) with the C2S
prompt, on a GPU through ``accelerate``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .contract import DataContract
from .errors import DataError, TrainingError
from ._stats import pca
from .perturbations import GENETIC, KIND_ALIASES, Combination, Perturbation, parse
from .prompts import PerturbationVocab
from .sentences import RankFit, Vocabulary, detect_scale, encode, expression_matrix, log_normalize

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

    from .model import C2SModel

__all__ = ["TrainConfig", "train", "build_pairs", "KIND_ALIASES"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; saved inside the checkpoint."""

    top_k: int = 200
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    lr: float = 3e-3
    weight_decay: float = 0.01
    warmup_steps: int = 50
    batch_size: int = 16
    max_steps: int = 3000
    max_minutes: float | None = None
    pretrain_fraction: float = 0.1
    control_fraction: float = 0.2
    neighbours: int = 5
    n_pcs: int = 20
    val_fraction: float = 0.05
    eval_every: int = 200
    save_every: int = 200
    seed: int = 0
    kind: str = "auto"
    kind_key: str | None = None
    holdout: dict[str, list[str]] = field(default_factory=dict)
    mask_repeats_in_loss: bool = True
    max_pairs: int = 200_000

    def __post_init__(self) -> None:
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise TrainingError(f"--max-minutes must be > 0, got {self.max_minutes}.")
        if self.kind not in {"auto", *set(KIND_ALIASES.values())}:
            raise TrainingError(f"Unknown kind {self.kind!r}; use auto, knockout, knockdown, activation, drug, cytokine or label.")
        if self.hidden_size % self.n_heads:
            raise TrainingError(f"hidden_size {self.hidden_size} must be divisible by n_heads {self.n_heads}.")


# --------------------------------------------------------------------------- #
# Data → typed perturbations and pairs
# --------------------------------------------------------------------------- #
def typed_labels(adata: ad.AnnData, contract: DataContract, genes: Vocabulary, cfg: TrainConfig) -> tuple[np.ndarray, PerturbationVocab]:
    """The typed perturbation of every cell (as a string), and the model's perturbation vocabulary."""
    labels = contract.labels(adata)
    kinds = None
    if cfg.kind_key is not None:
        if cfg.kind_key not in adata.obs.columns:
            raise DataError(f"kind column {cfg.kind_key!r} is not in adata.obs; columns: {list(adata.obs.columns)[:15]}.")
        raw = adata.obs[cfg.kind_key].astype(str).str.lower().to_numpy()
        unknown = sorted(set(raw) - set(KIND_ALIASES))
        if unknown:
            raise DataError(f"Unknown perturbation kinds {unknown} in obs[{cfg.kind_key!r}]; known: {sorted(KIND_ALIASES)}.")
        kinds = np.array([KIND_ALIASES[k] for k in raw], dtype=object)
    dose = adata.obs[contract.dose_key].to_numpy() if contract.dose_key else None
    when = adata.obs[contract.time_key].to_numpy() if contract.time_key else None
    vocab = PerturbationVocab()
    typed = np.empty(adata.n_obs, dtype=object)
    cache: dict[tuple, str] = {}
    for i, label in enumerate(labels):
        kind = kinds[i] if kinds is not None else cfg.kind
        d = _number(dose[i]) if dose is not None else None
        t = _number(when[i]) if when is not None else None
        key = (label, kind, d, t)
        if key not in cache:
            cache[key] = str(_typed(label, kind, d, t, contract, genes, vocab))
        typed[i] = cache[key]
    # each training label maps to its most common typed form (doses dropped)
    for label in set(labels) - {contract.control}:
        forms = [_strip_quantities(s) for s in typed[labels == label]]
        vocab.labels[label] = max(set(forms), key=forms.count)
    return typed, vocab


def _number(x: Any) -> float | None:
    try:
        v = float(str(x).split("+")[0])
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _strip_quantities(s: str) -> str:
    p = parse(s)
    parts = p.parts if isinstance(p, Combination) else (p,)
    return " + ".join(str(Perturbation(q.kind, q.target)) if q.kind != "control" else "control" for q in parts) or "control"


def _typed(label: str, kind: str, dose: float | None, time_: float | None, contract: DataContract,
           genes: Vocabulary, vocab: PerturbationVocab) -> Perturbation | Combination:
    if label == contract.control or kind == "control":
        return Perturbation("control")
    parts = [x.strip() for x in label.split("+") if x.strip()]
    if kind == "auto":
        kind = "knockout" if all(x.upper() in genes for x in parts) or _all_gene_like(parts) else "label"
    out: list[Perturbation] = []
    for x in parts:
        if kind in GENETIC:
            target = x.upper()
            if target not in genes and target not in vocab.names["target"]:
                vocab.names["target"].append(target)
            out.append(Perturbation(kind, target))  # type: ignore[arg-type]
        elif kind in ("drug", "cytokine"):
            if x not in vocab.names[kind]:
                vocab.names[kind].append(x)
            out.append(Perturbation(kind, x, dose if dose else None, None, time_, "h" if time_ is not None else None))  # type: ignore[arg-type]
        else:
            if x not in vocab.names["label"]:
                vocab.names["label"].append(x)
            out.append(Perturbation("label", x))
    return out[0] if len(out) == 1 else Combination(tuple(out))


def _all_gene_like(parts: list[str]) -> bool:
    """Labels that look like gene symbols (upper case letters and digits) are read as genetic targets."""
    import re

    return all(re.fullmatch(r"[A-Z][A-Z0-9\-\.]{1,15}", x) is not None for x in parts)


def build_pairs(
    adata: ad.AnnData, contract: DataContract, *, neighbours: int = 5, n_pcs: int = 20, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Pair every cell with one of its ``neighbours`` nearest control cells of the same context.

    Returns ``(source, target)`` index arrays: target cell ``target[i]`` is predicted from
    control cell ``source[i]``. Control cells are paired with another control cell
    (never themselves), which teaches the model its control → control map.
    """
    from scipy.spatial import cKDTree

    rng = np.random.default_rng(seed)
    X = expression_matrix(adata)
    Xn = log_normalize(X, detect_scale(X))
    ctx = contract.contexts(adata)
    is_ctrl = contract.is_control(adata)
    src = np.full(adata.n_obs, -1, dtype=np.int64)
    for c in np.unique(ctx):
        members = np.flatnonzero(ctx == c)
        controls = members[is_ctrl[members]]
        if controls.size < 2:
            raise DataError(
                f"Context {c!r} has {controls.size} control cells; pairs need at least 2. Add control cells for it "
                "or drop the context."
            )
        emb = pca(Xn[members], n_pcs, seed=seed).transform(Xn[members])
        pos = {m: i for i, m in enumerate(members)}
        tree = cKDTree(emb[[pos[m] for m in controls]])
        k = min(neighbours + 1, controls.size)
        _, nn = tree.query(emb, k=k)
        nn = np.atleast_2d(nn)
        for row, m in enumerate(members):
            cand = controls[nn[row]]
            cand = cand[cand != m][: max(1, k - 1)]
            src[m] = cand[rng.integers(cand.size)]
    return src, np.arange(adata.n_obs)


# --------------------------------------------------------------------------- #
# Training
# --------------------------------------------------------------------------- #
def data_hash(adata: ad.AnnData, contract: DataContract) -> str:
    X = expression_matrix(adata)
    h = hashlib.sha256()
    for arr in (X.data, X.indices, X.indptr):
        h.update(np.ascontiguousarray(arr).tobytes())
    h.update("\n".join(contract.labels(adata)).encode())
    h.update("\n".join(map(str, adata.var_names)).encode())
    return h.hexdigest()[:16]


def _holdout_mask(adata: ad.AnnData, holdout: dict[str, list[str]]) -> np.ndarray:
    keep = np.ones(adata.n_obs, dtype=bool)
    for col, values in holdout.items():
        if col not in adata.obs.columns:
            raise DataError(f"holdout column {col!r} is not in adata.obs.")
        keep &= ~adata.obs[col].astype(str).isin([str(v) for v in values]).to_numpy()
    return keep


def train(
    adata: ad.AnnData,
    *,
    out: str | Path,
    contract: DataContract | None = None,
    config: TrainConfig | None = None,
    base: str | None = None,
    resume: bool = True,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
) -> C2SModel:
    """Train (or fine-tune) a C2S model on a perturbation screen; returns the trained model.

    Parameters
    ----------
    adata
        The screen: control and perturbed cells, raw counts or log-normalized.
    out
        Checkpoint folder. A run that finds ``out/last`` resumes from it (``resume=True``).
    contract
        Columns of the screen (default: the contract stored in ``adata``).
    config
        :class:`TrainConfig`; ``max_minutes`` bounds the wall time.
    base
        A Hugging Face causal LM to fine-tune (hub id or folder), e.g. a C2S-Scale model;
        default: a new small gene-level Llama model.
    on_log
        Called with each log record (step, loss, val_loss, tokens/s), e.g. for live plots.
    """
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from .model import C2SModel

    cfg = config or TrainConfig()
    contract = contract or DataContract.from_adata(adata)
    contract.validate(adata)
    out = Path(out)
    t_start = time.perf_counter()
    budget = None if cfg.max_minutes is None else cfg.max_minutes * 60.0

    train_mask = _holdout_mask(adata, cfg.holdout)
    data = adata[train_mask]
    if data.n_obs == 0:
        raise DataError(f"The holdout {cfg.holdout} leaves no cells to train on.")
    genes = Vocabulary.from_adata(data)
    sentences = encode(data, top_k=cfg.top_k, seed=cfg.seed)
    fit = RankFit.fit(data, sentences, seed=cfg.seed)
    typed, pvocab = typed_labels(data, contract, genes, cfg)
    src, tgt = build_pairs(data, contract, neighbours=cfg.neighbours, n_pcs=cfg.n_pcs, seed=cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    is_ctrl = contract.is_control(data)
    pert_idx = np.flatnonzero(~is_ctrl)
    ctrl_idx = np.flatnonzero(is_ctrl)
    n_ctrl_wanted = int(round(cfg.control_fraction / max(1e-9, 1 - cfg.control_fraction) * pert_idx.size)) or ctrl_idx.size
    n_ctrl_pairs = min(ctrl_idx.size, n_ctrl_wanted)
    pair_targets = np.concatenate([pert_idx, rng.choice(ctrl_idx, size=n_ctrl_pairs, replace=False)])
    if pair_targets.size > cfg.max_pairs:
        pair_targets = rng.choice(pair_targets, size=cfg.max_pairs, replace=False)
    rng.shuffle(pair_targets)
    n_val = max(1, int(round(cfg.val_fraction * pair_targets.size))) if pair_targets.size > 20 else 0
    val_targets, train_targets = pair_targets[:n_val], pair_targets[n_val:]
    if n_ctrl_wanted > n_ctrl_pairs and pair_targets.size <= cfg.max_pairs:
        # Fewer control cells than control_fraction asks for (e.g. 50 controls beside 3,000 perturbed
        # cells): repeat the training control pairs, so that the control -> control map the simulator
        # calibrates against is still trained on its share of the steps.
        ctrl_train = train_targets[is_ctrl[train_targets]]
        n_extra = int(round((n_ctrl_wanted - n_ctrl_pairs) * train_targets.size / max(pair_targets.size, 1)))
        if ctrl_train.size and n_extra > 0:
            train_targets = np.concatenate([train_targets, rng.choice(ctrl_train, size=n_extra, replace=True)])
            rng.shuffle(train_targets)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if base is None:
        from .prompts import build_gene_tokenizer

        tokenizer = build_gene_tokenizer(genes.genes, pvocab)
        lm_config = LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=cfg.hidden_size, intermediate_size=cfg.hidden_size * 4,
            num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_heads,
            max_position_embeddings=2 * cfg.top_k + 64, rms_norm_eps=1e-5, tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )
        torch.manual_seed(cfg.seed)
        lm = LlamaForCausalLM(lm_config)
        fmt_name = "compact"
    else:
        tokenizer = AutoTokenizer.from_pretrained(base)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        lm = AutoModelForCausalLM.from_pretrained(base)
        fmt_name = "c2s"
    run_config = asdict(cfg) | {"base": base, "data_hash": data_hash(data, contract), "n_train_cells": int(data.n_obs),
                                "n_pairs": int(train_targets.size), "n_val_pairs": int(n_val)}
    model = C2SModel(lm, tokenizer, genes=genes, perturbations=pvocab, prompt_format=fmt_name, rank_fit=fit,
                     contract=contract, top_k=cfg.top_k, train_config=run_config, source=str(out))
    fmt = model.format
    parsed = {s: parse(s) for s in set(typed)}

    def example(target: int, pretrain: bool) -> tuple[list[int], list[int]]:
        tgt_ids = sentences[target]
        if pretrain:
            ids = fmt.sentence(tgt_ids)
            return ids, [-100] + ids[1:]
        shared, own = fmt.prompt_parts(sentences[src[target]], parsed[typed[target]])
        resp = fmt.response(tgt_ids)
        return shared + own + resp, [-100] * (len(shared) + len(own)) + resp

    def batch(indices: np.ndarray, pretrain: bool) -> dict[str, torch.Tensor]:
        seqs = [example(int(i), pretrain) for i in indices]
        width = max(len(s) for s, _ in seqs)
        pad = tokenizer.pad_token_id
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        lab = torch.full((len(seqs), width), -100, dtype=torch.long)
        att = torch.zeros((len(seqs), width), dtype=torch.long)
        for r, (s, lb) in enumerate(seqs):
            ids[r, : len(s)] = torch.tensor(s)
            lab[r, : len(s)] = torch.tensor(lb)
            att[r, : len(s)] = 1
        return {"input_ids": ids, "labels": lab, "attention_mask": att}

    vocab_size = lm.get_output_embeddings().weight.shape[0]
    response_tokens = fmt.response_vocabulary()
    use_mask = cfg.mask_repeats_in_loss and response_tokens is not None
    allowed = torch.zeros(vocab_size, dtype=torch.bool)
    if use_mask:
        allowed[torch.as_tensor(response_tokens)] = True

    def loss_of(lm_, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        logits = lm_(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1].float()
        target = b["labels"][:, 1:]
        valid = target != -100
        if use_mask:
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
            logits = logits.masked_fill(seen_before(target, valid, vocab_size), float("-inf"))
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, vocab_size), target.reshape(-1), ignore_index=-100)
        return loss, int(valid.sum())

    optimizer = torch.optim.AdamW(lm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        """Warm-up, then cosine decay to 10%, over max_steps or the time budget, whichever ends first."""
        if step < cfg.warmup_steps:
            return cfg.lr * (step + 1) / cfg.warmup_steps
        frac = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
        if budget is not None:
            frac = max(frac, (time.perf_counter() - t_start) / budget)
        return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    lm, optimizer = accelerator.prepare(lm, optimizer)
    state: dict[str, Any] = {"step": 0, "history": [], "pretrain_end": None}
    last = out / "last"
    if resume and (last / "trainer_state.pt").exists():
        saved = json.loads((last / "run_config.json").read_text())
        if saved.get("data_hash") != run_config["data_hash"]:
            raise TrainingError(
                f"{last} holds a run on other data (hash {saved.get('data_hash')} vs {run_config['data_hash']}). "
                "Use another --out, or delete it to start over."
            )
        st = torch.load(last / "trainer_state.pt", weights_only=False)
        accelerator.unwrap_model(lm).load_state_dict(st["model"])
        optimizer.load_state_dict(st["optimizer"])
        state = {"step": st["step"], "history": st["history"], "pretrain_end": st.get("pretrain_end")}
        log.info("resuming from step %d", state["step"])

    n_pre = int(cfg.pretrain_fraction * cfg.max_steps)
    rank, world = accelerator.process_index, accelerator.num_processes

    def indices_for(step: int) -> tuple[np.ndarray, bool]:
        """The batch at a step is a pure function of (seed, step, end of pre-training): resuming repeats nothing."""
        pretrain = step < (n_pre if state.get("pretrain_end") is None else state["pretrain_end"])
        pool = np.arange(data.n_obs) if pretrain else train_targets
        per_epoch = max(1, pool.size // cfg.batch_size)
        epoch, k = divmod(step, per_epoch)
        order = np.random.default_rng([cfg.seed, epoch, int(pretrain)]).permutation(pool.size)
        chosen = pool[order[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
        return chosen[rank::world], pretrain

    def validate() -> float:
        if n_val == 0:
            return float("nan")
        lm.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, n_val, cfg.batch_size):
                b = {k: v.to(accelerator.device) for k, v in batch(val_targets[i : i + cfg.batch_size], False).items()}
                loss, n = loss_of(lm, b)
                total += float(loss) * n
                count += n
        lm.train()
        return total / max(count, 1)

    def save(where: Path) -> None:
        if not accelerator.is_main_process:
            return
        where.mkdir(parents=True, exist_ok=True)
        model.lm = accelerator.unwrap_model(lm)
        model.train_config = run_config | {"steps": state["step"], "history": state["history"][-50:]}
        model.save(where)
        (where / "run_config.json").write_text(json.dumps(run_config, indent=1))
        torch.save({"model": model.lm.state_dict(), "optimizer": optimizer.state_dict(), "step": state["step"],
                    "history": state["history"], "pretrain_end": state.get("pretrain_end")}, where / "trainer_state.pt")

    bar = _progress(total=cfg.max_steps, initial=state["step"], enabled=progress and accelerator.is_main_process)
    lm.train()
    tokens_seen, t_loop, first_step_s = 0, time.perf_counter(), None
    while state["step"] < cfg.max_steps:
        step = state["step"]
        t_step = time.perf_counter()
        if (budget is not None and state.get("pretrain_end") is None and step < n_pre
                and t_step - t_start > cfg.pretrain_fraction * budget):
            # pre-training gets pretrain_fraction of the time budget when that ends before its share of max_steps
            state["pretrain_end"] = step
            log.info("pre-training ends at step %d: its share of --max-minutes is used", step)
        idx, pretrain = indices_for(step)
        b = {k: v.to(accelerator.device) for k, v in batch(idx, pretrain).items()}
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step)
        loss, n_tok = loss_of(lm, b)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(lm.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        tokens_seen += int(b["attention_mask"].sum())
        elapsed = time.perf_counter() - t_start
        if first_step_s is None:
            first_step_s = time.perf_counter() - t_step
            if budget is not None and elapsed > budget:
                raise TrainingError(
                    f"--max-minutes {cfg.max_minutes:g} ({budget:.1f} s) is too small: setting up took "
                    f"{elapsed - first_step_s:.1f} s and one optimizer step {first_step_s:.2f} s here. Give at least "
                    f"{math.ceil(elapsed * 20 / 60 * 10) / 10:g} minutes for a useful run."
                )
        record = {"step": state["step"], "loss": loss.item(), "lr": lr_at(step), "phase": 0.0 if pretrain else 1.0,
                  "tokens_per_s": tokens_seen / max(1e-9, time.perf_counter() - t_loop), "elapsed_s": elapsed}
        if state["step"] % cfg.eval_every == 0 or state["step"] == cfg.max_steps:
            record["val_loss"] = validate()
        state["history"].append(record)
        if on_log is not None:
            on_log(record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['loss']:.3f}", phase="pre" if pretrain else "pairs")
        if state["step"] % cfg.save_every == 0:
            save(last)
        if budget is not None and elapsed + (time.perf_counter() - t_step) > budget:
            log.info("stopping at step %d: --max-minutes %.2f reached", state["step"], cfg.max_minutes)
            break
    bar.close()
    if not state["history"] or "val_loss" not in state["history"][-1]:
        state["history"][-1]["val_loss"] = validate() if state["history"] else float("nan")
    save(last)
    model.lm = accelerator.unwrap_model(lm)
    model.lm.eval()
    if accelerator.is_main_process:
        model.save(out)
        (out / "history.json").write_text(json.dumps(state["history"]))
    return model


def seen_before(target, valid, vocab_size: int):  # noqa: ANN001, ANN201
    """``seen[b, t, v]``: token ``v`` is a valid target of row ``b`` at a position before ``t``.

    Computed from each token's first valid position (a scatter-min over ``B x V``) and one
    broadcast comparison, instead of a cumulative sum over a ``B x T x V`` int64 one-hot: the
    same mask with 8x less memory, which matters for vocabularies of thousands of genes.
    """
    import torch

    B, T = target.shape
    pos = torch.arange(T, device=target.device).expand(B, T)
    first = torch.full((B, vocab_size), T, dtype=torch.long, device=target.device)
    first.scatter_reduce_(1, target.clamp(min=0), torch.where(valid, pos, torch.full_like(pos, T)), reduce="amin")
    return first[:, None, :] < pos[:, :, None]


def _progress(total: int, initial: int, enabled: bool):  # noqa: ANN202
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


