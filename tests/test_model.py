"""The C2S model: training, checkpoints, constrained and prefix-shared generation."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

import virtualcell as vc
from conftest import log1p_median
from virtualcell.errors import ModelError, PerturbationError, TrainingError, VocabularyError
from virtualcell.generation import GenerationConfig
from virtualcell.model import C2SModel
from virtualcell.prompts import C2S_PERTURBATION_PROMPT, PerturbationVocab
from virtualcell.sentences import Vocabulary


def gather(chunks):
    out = {}
    for ch in chunks:
        for i, (c, p) in enumerate(zip(ch.cell, ch.perturbation)):
            out[(int(c), int(p))] = ch.sentences[i].tolist()
    return out


def test_checkpoint_holds_codec_contract_and_config(tiny_model):
    model, path, data = tiny_model
    meta = json.loads((path / "virtualcell.json").read_text())
    assert meta["prompt_format"] == "compact"
    assert meta["rank_fit"]["slope"] < 0 and meta["contract"]["perturbation_key"] == "perturbation"
    assert meta["train_config"]["data_hash"] and meta["train_config"]["top_k"] == 30
    assert (path / "model.safetensors").exists()
    assert model.perturbations.labels["STAT1"] == "ko:STAT1"
    assert len(model.genes) == data.n_vars


def test_generation_is_valid_distinct_and_bounded(tiny_model):
    model, _, data = tiny_model
    cells = vc.encode(data[:6], vocab=model.genes, top_k=30)
    perts = model.resolve(["control", "STAT1", "ko:PSMB9", "IFNGR1+IRF1"])
    cfg = GenerationConfig(max_genes=25, batch_size=16, seed=1)
    chunks = list(model.generate(cells, perts, config=cfg))
    got = gather(chunks)
    assert len(got) == 24
    assert sum(ch.n_invalid + ch.n_duplicate for ch in chunks) == 0
    for genes in got.values():
        assert len(genes) == len(set(genes)) and 1 <= len(genes) <= 25
        assert all(0 <= g < len(model.genes) for g in genes)


def test_generation_is_seeded_and_batch_independent(tiny_model):
    model, _, data = tiny_model
    cells = vc.encode(data[:5], vocab=model.genes, top_k=30)
    perts = model.resolve(["control", "STAT1", "JAK2"])
    a = gather(model.generate(cells, perts, config=GenerationConfig(max_genes=20, batch_size=15, seed=3)))
    b = gather(model.generate(cells, perts, config=GenerationConfig(max_genes=20, batch_size=2, seed=3)))
    c = gather(model.generate(cells, perts, config=GenerationConfig(max_genes=20, batch_size=15, seed=4)))
    assert a == b
    assert a != c
    # a cell's result does not depend on which other cells share its batch
    sub = gather(model.generate(cells.subset([3, 4]), perts, config=GenerationConfig(max_genes=20, batch_size=15, seed=3),
                                cell_keys=[3, 4]))
    assert all(sub[(i, p)] == a[(i + 3, p)] for i in range(2) for p in range(3))


def _table_bias(model, tokens) -> torch.Tensor:  # noqa: ANN001
    """The model's token-bias rows of ``tokens`` summed (zeros without a table), read from what the checkpoint
    records: the table and the token of each of its rows."""
    from virtualcell import token_bias

    vocab = model.lm.config.vocab_size
    table = token_bias.table(model.lm)
    if table is None:
        return torch.zeros(vocab)
    row = {model.format.token_id[t]: i for i, t in enumerate(model.meta()["token_bias"])}
    return torch.as_tensor(sum((table[row[t]] for t in tokens if t in row), np.zeros(vocab, np.float32)))


def _plain_greedy(fmt, allowed, next_logits, steps: int) -> list[int]:  # noqa: ANN001
    """Greedy decoding as the engine masks it (genes only, no gene twice, stop at EOS), from ``next_logits(written)``."""
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            mixed = next_logits(out).masked_fill(~allowed, float("-inf"))
            if out:
                mixed[torch.tensor(out)] = float("-inf")
            tok = int(mixed.argmax())
            if tok == fmt.eos:
                break
            out.append(tok)
    return out


def test_prefix_sharing_matches_full_prompts(tiny_model):
    """Sharing a cell's cached prefix gives the same tokens as feeding each full prompt (greedy)."""
    model, _, data = tiny_model
    cells = vc.encode(data[:3], vocab=model.genes, top_k=30)
    perts = model.resolve(["STAT1", "IFNGR1+IRF1"])
    shared = gather(model.generate(cells, perts, config=GenerationConfig(max_genes=10, temperature=0, batch_size=8)))
    from virtualcell.generation import generate_grid

    fmt = model.format
    for (c, p), genes in shared.items():
        prompt = fmt.prefix(cells[c]) + fmt.suffix(perts[p])
        (_, _, toks), = generate_grid(model.lm, [prompt], [[]], cell_keys=[0], suffix_keys=[0],
                                      constraint=model.constraint(), eos_id=fmt.eos, pad_id=fmt.pad,
                                      config=GenerationConfig(max_genes=10, temperature=0),
                                      suffix_targets=model._suffix_targets([fmt.suffix(perts[p])]),
                                      suffix_bias=[_table_bias(model, fmt.suffix(perts[p])).numpy()])
        assert fmt.to_genes(toks).tolist() == genes


def test_guided_generation_matches_a_plain_guided_loop(tiny_model):
    """Guidance through twin rows (shared prefix, cache, batching, dropped rows) writes what a plain loop
    writes: full prompts under the perturbation and the generic condition, the target offsets on the
    specific logits, logits mixed as ``generic + w * (specific - generic)``, gene and no-repeat masks, greedy."""
    model, _, data = tiny_model
    fmt = model.format
    assert fmt.generic_own() is not None and model.train_config["generic_fraction"] > 0
    from virtualcell.target_offsets import KINDS

    offsets = model.target_offsets
    assert offsets is not None and offsets["knockout"] != 0  # the fixture's knockouts moved it
    cells = vc.encode(data[:3], vocab=model.genes, top_k=30)
    perts = model.resolve(["control", "STAT1", "IFNGR1+IRF1"])
    w = 3.0
    got = gather(model.generate(cells, perts, config=GenerationConfig(max_genes=8, temperature=0, batch_size=4,
                                                                      guidance=w)))
    plain = gather(model.generate(cells, perts, config=GenerationConfig(max_genes=8, temperature=0, batch_size=4)))
    allowed = torch.zeros(model.lm.config.vocab_size, dtype=torch.bool)
    allowed[torch.as_tensor(fmt.response_vocabulary())] = True
    for (c, p), genes in got.items():
        spec = fmt.prefix(cells[c]) + fmt.suffix(perts[p])
        generic = fmt.prefix(cells[c]) + ([*fmt.suffix(perts[p])] if p == 0 else fmt.generic_own())
        bias = _table_bias(model, fmt.suffix(perts[p]))
        for tok, kind in fmt.named_targets(fmt.suffix(perts[p])):
            bias[tok] += offsets[KINDS[kind]]
        generic_bias = _table_bias(model, generic[len(fmt.prefix(cells[c])):])
        def guided(out, spec=spec, generic=generic, bias=bias, generic_bias=generic_bias):  # noqa: ANN001, ANN202
            ls = model.lm(torch.tensor([spec + out])).logits[0, -1] + bias
            lg = model.lm(torch.tensor([generic + out])).logits[0, -1] + generic_bias
            return lg + w * (ls - lg)

        out = _plain_greedy(fmt, allowed, guided, 8)
        assert fmt.to_genes(out).tolist() == genes, (c, p)
    assert all(got[(c, 0)] == plain[(c, 0)] for c in range(3))  # control is not guided
    # the 12-step model's logits under a name and the generic condition differ by ~1e-3: a large scale shows it
    sampled = [gather(model.generate(cells, perts, config=GenerationConfig(max_genes=8, seed=1, guidance=g)))
               for g in (1.0, 1000.0)]
    assert all(sampled[0][(c, 0)] == sampled[1][(c, 0)] for c in range(3))
    assert any(sampled[0][k] != sampled[1][k] for k in got if k[1] > 0)  # guidance changes what is written


def test_components_mix_logits_as_a_plain_loop_does(tiny_model):
    """A row decoded from weighted components (the engine's mix, shared prefix, batching, dropped rows) writes what
    a plain loop writes from the same weighted sum of full prompts' logits (each with its own target offsets),
    greedy; the weights are large so that the 12-step model's small differences between conditions show."""
    from virtualcell.generation import Component, generate_grid
    from virtualcell.perturbations import Perturbation
    from virtualcell.target_offsets import KINDS

    model, _, data = tiny_model
    fmt, offsets = model.format, model.target_offsets
    cells = vc.encode(data[:3], vocab=model.genes, top_k=30)
    a, b = model.resolve(["STAT1", "IRF1"])
    parts = [tuple(fmt.suffix(a)), tuple(fmt.suffix(b)), tuple(fmt.suffix(Perturbation("control")))]
    weights = [300.0, 300.0, -599.0]
    comps = [Component(t, wt, tuple(fmt.named_targets(list(t)))) for t, wt in zip(parts, weights)]
    prefixes = [fmt.prefix(cells[c]) for c in range(3)]
    cfg = GenerationConfig(max_genes=8, temperature=0, batch_size=5)

    def run(components):  # noqa: ANN001, ANN202
        out = generate_grid(model.lm, prefixes, [list(parts[0]), list(parts[2])], cell_keys=[0, 1, 2], suffix_keys=[0, 1],
                            constraint=model.constraint(), eos_id=fmt.eos, pad_id=fmt.pad, config=cfg,
                            suffix_targets=model._suffix_targets([list(parts[0]), list(parts[2])]), components=components)
        return {(c, s): toks for c, s, toks in out}

    got = run([comps, None])  # suffix 1 (the control) as itself
    allowed = torch.zeros(model.lm.config.vocab_size, dtype=torch.bool)
    allowed[torch.as_tensor(fmt.response_vocabulary())] = True
    for c in range(3):
        def summed(out, c=c):  # noqa: ANN001, ANN202
            mixed = torch.zeros(model.lm.config.vocab_size)
            for t, wt in zip(parts, weights):
                bias = _table_bias(model, list(t))
                for tok, kind in fmt.named_targets(list(t)):
                    bias[tok] += offsets[KINDS[kind]]
                mixed += wt * (model.lm(torch.tensor([prefixes[c] + list(t) + out])).logits[0, -1] + bias)
            return mixed

        assert got[(c, 0)] == _plain_greedy(fmt, allowed, summed, 8), c
    alone = run(None)
    assert all(got[(c, 1)] == alone[(c, 1)] for c in range(3))  # a suffix without components is itself
    assert any(got[(c, 0)] != alone[(c, 0)] for c in range(3))  # and the mix is not the first part alone


def test_a_combination_is_composed_only_when_asked(tiny_model):
    """compose=True writes 'STAT1+IRF1' from its parts' logits, not from a prompt naming both (the default, which
    scored higher on protocol 2); a single perturbation is never composed and is the same either way."""
    model, _, data = tiny_model
    pair, single = model.resolve(["STAT1+IRF1", "STAT1"])
    assert model.composes(pair, compose=True) and not model.composes(pair)
    assert not model.composes(single, compose=True)
    cells = vc.encode(data[:3], vocab=model.genes, top_k=30)
    run = {c: gather(model.generate(cells, [single, pair], config=GenerationConfig(max_genes=8, seed=2, compose=c)))
           for c in (False, True)}
    assert all(run[False][(c, 0)] == run[True][(c, 0)] for c in range(3))


def test_guidance_needs_a_generic_condition(tiny_model):
    model, _, data = tiny_model
    for bad in (-1, float("inf"), float("nan")):  # (inf and NaN sampled next to nothing: every delta 0)
        with pytest.raises(ValueError, match="guidance must be a number >= 0"):
            GenerationConfig(guidance=bad)
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            GenerationConfig(temperature=bad)
    from virtualcell.generation import generate_grid

    fmt = model.format
    cells = vc.encode(data[:1], vocab=model.genes, top_k=30)
    with pytest.raises(ValueError, match="generic condition"):
        list(generate_grid(model.lm, [fmt.prefix(cells[0])], [fmt.suffix(model.resolve(["STAT1"])[0])], cell_keys=[0],
                           suffix_keys=[0], constraint=model.constraint(), eos_id=fmt.eos, pad_id=fmt.pad,
                           config=GenerationConfig(max_genes=4, guidance=2.0)))


def test_unknown_perturbation_lists_close_matches(tiny_model):
    model, _, _ = tiny_model
    with pytest.raises(PerturbationError, match=r"does not know the perturbation 'STAT11'.*'STAT1'"):
        model.resolve(["STAT11"])
    with pytest.raises(PerturbationError, match="not trained on the drug"):
        model.resolve(["drug:aspirin@1uM"])
    # a knockout of any gene in the vocabulary is representable, seen perturbed or not
    assert model.resolve(["ko:PSMB9"])[0].target == "PSMB9"
    with pytest.raises(PerturbationError, match="neither a gene of this model"):
        model.resolve(["ko:NOTAGENE"])


def test_baseline_genes_must_match_vocabulary(tiny_model):
    model, _, data = tiny_model
    other = data[:5, :50].copy()
    other.var_names = [f"X{i}" if i < 10 else g for i, g in enumerate(other.var_names)]
    with pytest.raises(VocabularyError, match=r"10 of the data's 50 genes.*40 shared.*genes='shared'"):
        vc.encode(other, vocab=model.genes)
    with pytest.raises(ModelError, match="another vocabulary"):
        list(model.generate(vc.encode(data[:2, :20]), model.resolve(["STAT1"])))


def test_checkpoint_without_codec_is_refused(tmp_path, tiny_model):
    model, _, _ = tiny_model
    model.lm.save_pretrained(tmp_path)
    model.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match=r"no virtualcell.json.*genes=adata.var_names"):
        C2SModel.load(tmp_path)


def test_hub_id_offline_names_alternatives():
    with pytest.raises(ModelError, match=r"C2S-Scale-Gemma-2-2B.*local folder.*bundled"):
        C2SModel.load("vandijklab/C2S-Scale-Gemma-2-2B", genes=["A", "B"])


def test_max_minutes_too_small(papalexi_small, tmp_path):
    from virtualcell.train import TrainConfig, train

    with pytest.raises(TrainingError, match="too small"):
        train(papalexi_small[:300].copy(), out=tmp_path, progress=False,
              config=TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=5, max_minutes=1e-4))
    with pytest.raises(TrainingError, match="must be > 0"):
        TrainConfig(max_minutes=0)


def test_training_resumes_from_last_checkpoint(papalexi_small, tmp_path):
    from virtualcell.train import TrainConfig, train

    data = papalexi_small[:400].copy()
    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=4, save_every=2, eval_every=2,
                      batch_size=4, warmup_steps=1)
    train(data, out=tmp_path, config=cfg, progress=False)
    train(data, out=tmp_path, config=replace(cfg, max_steps=6), progress=False)
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5, 6]
    # under settings that made the steps taken (a seed moves cells the model trained on into the verdict's split;
    # another width does not fit the weights), or asked for fewer steps than taken, it is refused, naming them;
    # how long it runs and how it runs may change
    for changed, match in ((dict(max_steps=8, seed=1), "seed: 0 there, 1 here"),
                           (dict(max_steps=8, lr=1e-4), "lr: "), (dict(max_steps=8, hidden_size=64), "hidden_size"),
                           (dict(max_steps=3), "at step 6, past the 3 steps asked")):
        with pytest.raises(vc.errors.TrainingError, match=match):
            train(data, out=tmp_path, config=replace(cfg, **changed), progress=False)
    train(data, out=tmp_path, config=replace(cfg, max_steps=7, threads=1, eval_every=7), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_training_on_a_gpu_puts_the_model_where_the_batches_are(papalexi_small, tmp_path):
    """On a GPU (the default device where there is one) the trainer's model, with its extras (target offsets, token
    bias), goes where it puts the batches (session 47's data parallel without accelerator.prepare(model) had left it on
    the CPU; fixed in session 48)."""
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=6, eval_every=3, save_every=3,
                      batch_size=4, warmup_steps=1, verdict_samples=(1,), verdict_temperatures=(1.0,))
    model = train(papalexi_small[:400].copy(), out=tmp_path, config=cfg, progress=False)
    assert {p.device.type for p in model.lm.parameters()} == {"cuda"} and model.train_config["device"].startswith("cuda")
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["step"] for h in history] == list(range(1, 7)) and all(np.isfinite(h["loss"]) for h in history if "loss" in h)


def test_pair_draws_change_the_pairs_from_the_second_epoch_on(papalexi_small, tmp_path):
    """pair_draws=2 trains the first epoch on the default's pairs (equal losses, step by step) and the second on
    another draw (other losses)."""
    from virtualcell.train import TrainConfig, train

    data = papalexi_small[:160].copy()
    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=40, batch_size=8, warmup_steps=1,
                      pretrain_fraction=0.0, verdict_fraction=0.0, eval_every=40, save_every=40, attention="eager",
                      precision="fp32", compile="off", threads=1)
    losses = {}
    for draws in (1, 2):
        model = train(data, out=tmp_path / str(draws), config=replace(cfg, pair_draws=draws), progress=False)
        history = json.loads((tmp_path / str(draws) / "history.json").read_text())
        losses[draws] = np.array([h["loss"] for h in history if "loss" in h])
    per_epoch = model.train_config["n_pairs"] // cfg.batch_size
    assert 0 < per_epoch < 30
    assert np.allclose(losses[1][:per_epoch], losses[2][:per_epoch])
    assert not np.allclose(losses[1][per_epoch : 2 * per_epoch], losses[2][per_epoch : 2 * per_epoch])


def test_repeat_mask_of_the_loss_matches_a_cumulative_one_hot():
    from virtualcell.training.loss import seen_before

    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        target = torch.randint(0, 11, (3, 17), generator=g)
        valid = torch.rand(3, 17, generator=g) > 0.3
        target[~valid] = -100
        onehot = torch.nn.functional.one_hot(target.clamp(min=0), 11) * valid[..., None]
        assert torch.equal(seen_before(target, valid, 11), (onehot.cumsum(1) - onehot) > 0)


# ----------------------------------------------------------------------------- multi-token genes (BPE)
@pytest.fixture(scope="module")
def bpe_model():
    """A text model whose BPE tokenizer splits gene names into several tokens (random weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    genes = ["HLA-DRA", "HLA-DRB1", "CD4", "CD44", "CD8A", "MT-CO1", "RP11-34P13.7", "STAT1", "STAT2", "IRF1", "GAPDH", "ACTB"]
    corpus = [C2S_PERTURBATION_PROMPT, "the quick brown fox"] + [" ".join(genes[i:] + genes[:i]) for i in range(len(genes))]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=len(hf), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096))
    model = C2SModel(lm, hf, genes=Vocabulary.from_names(genes), perturbations=PerturbationVocab(), prompt_format="c2s")
    multi = [g for g in genes if len(hf(" " + g, add_special_tokens=False)["input_ids"]) > 1]
    assert len(multi) >= 4, "the test needs genes that span several tokens"
    return model


def test_a_pretrained_text_model_is_fine_tuned_with_the_c2s_prompt(bpe_model, tmp_path):
    """`train(base=FOLDER)` fine-tunes a Hugging Face text model (as it would C2S-Scale, here a small BPE model whose
    tokenizer splits gene names) with the C2S prompt: the same trainer, without the gene-level extras, at the
    fine-tuning rate; the checkpoint loads again and simulates a perturbation through the trie-constrained decoder."""
    import anndata as ad
    import pandas as pd

    from virtualcell.train import FINETUNE_LR, TrainConfig, train

    base = tmp_path / "base"
    bpe_model.lm.save_pretrained(base)
    bpe_model.tokenizer.save_pretrained(base)
    genes = list(bpe_model.genes.genes)
    rng = np.random.default_rng(0)
    labels = np.array(["control"] * 80 + ["STAT1"] * 40 + ["IRF1"] * 40)
    X = rng.poisson(3.0, size=(labels.size, len(genes))).astype(np.float32)
    X[labels == "STAT1", genes.index("STAT1")] = 0
    cells = ad.AnnData(X, obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(labels.size)]),
                       var=pd.DataFrame(index=genes))
    contract = vc.DataContract(perturbation_key="perturbation", control="control")
    cfg = TrainConfig(top_k=12, max_steps=4, eval_every=2, save_every=2, batch_size=4, warmup_steps=1,
                      verdict_fraction=0.0, compile="off")
    model = train(cells, out=tmp_path / "out", contract=contract, config=cfg, base=str(base), progress=False,
                  device="cpu")
    record = model.train_config
    assert (record["base"], record["lr"], record["steps"], model.format.name) == (str(base), FINETUNE_LR, 4, "c2s")
    assert record["device"] == "cpu"
    history = json.loads((tmp_path / "out" / "history.json").read_text())
    assert all(np.isfinite(h["loss"]) for h in history if "loss" in h)
    again = C2SModel.load(tmp_path / "out")
    res = vc.Simulator(cells[:6].copy(), again).simulate(["ko:STAT1"], n_cells=6, max_genes=6, seed=0)
    assert res.aggregates["delta"].shape[-1] == len(genes)


def test_a_gemma2_base_fine_tunes_with_the_attention_transformers_allows_it(bpe_model, tmp_path, capsys):
    """C2S-Scale is Gemma-2, for which transformers refuses sdpa attention: `train --base` set it anyway and crashed
    before its first step (on a GPU sdpa was the only candidate); now it trains with eager attention, and asking for
    sdpa is refused with what to use instead."""
    import anndata as ad
    import pandas as pd
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from virtualcell.cli import main

    base = tmp_path / "gemma2"
    torch.manual_seed(0)
    Gemma2ForCausalLM(Gemma2Config(vocab_size=len(bpe_model.tokenizer), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                   max_position_embeddings=4096)).save_pretrained(base)
    bpe_model.tokenizer.save_pretrained(base)
    genes = list(bpe_model.genes.genes)
    rng = np.random.default_rng(0)
    labels = np.array(["control"] * 40 + ["STAT1"] * 20)
    cells = ad.AnnData(rng.poisson(3.0, size=(labels.size, len(genes))).astype(np.float32),
                       obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(labels.size)]),
                       var=pd.DataFrame(index=genes))
    data = tmp_path / "cells.h5ad"
    cells.write_h5ad(data)
    args = ["train", "--base", str(base), "--data", str(data), "--perturbation-key", "perturbation", "--control",
            "control", "--top-k", "8", "--max-steps", "2", "--batch-size", "4", "--verdict-fraction", "0"]
    assert main([*args, "--out", str(tmp_path / "sdpa"), "--attention", "sdpa"]) == 2
    assert "caps its attention logits" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert C2SModel.load(tmp_path / "out").train_config["steps"] == 2
    # transformers 4.56 to 5.20 flagged Gemma-2 as taking sdpa, which drops its logit soft-capping: the cap decides
    from types import SimpleNamespace

    from virtualcell.training.kernels import _supports_sdpa

    capped = SimpleNamespace(_supports_sdpa=True, config=SimpleNamespace(attn_logit_softcapping=50.0))
    assert not _supports_sdpa(capped)
    assert _supports_sdpa(SimpleNamespace(_supports_sdpa=True, config=SimpleNamespace(attn_logit_softcapping=None)))
    # ... and loaded with sdpa there, it is set to eager for training, the verdict and serving alike
    from virtualcell.model import eager_if_capped

    set_to = []
    loaded = SimpleNamespace(config=SimpleNamespace(attn_logit_softcapping=50.0, _attn_implementation="sdpa"),
                             set_attn_implementation=set_to.append)
    assert eager_if_capped(loaded) is loaded and set_to == ["eager"]
    assert C2SModel.load(tmp_path / "out").lm.config._attn_implementation == "eager"


def _text_base(bpe_model, folder, *, positions: int):  # noqa: ANN001, ANN202
    """A one-layer Llama base of ``positions`` positions with the BPE model's tokenizer, saved into ``folder``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(bpe_model.tokenizer), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=positions)).save_pretrained(folder)
    bpe_model.tokenizer.save_pretrained(folder)
    return folder


def test_sequences_past_the_models_context_are_refused_in_training_and_generation(bpe_model, tmp_path):
    """A base model with a short context (GPT-2's learned positions fail inside the embedding; a rotary model, as
    here, read positions it never trained on without a word) is refused where a prompt and its answer do not fit."""
    import anndata as ad
    import pandas as pd

    from virtualcell.errors import ModelError, TrainingError
    from virtualcell.train import TrainConfig, train

    base = _text_base(bpe_model, tmp_path / "short", positions=64)
    genes = list(bpe_model.genes.genes)
    labels = np.array(["control"] * 40 + ["STAT1"] * 20)
    cells = ad.AnnData(np.random.default_rng(0).poisson(3.0, size=(labels.size, len(genes))).astype(np.float32),
                       obs=pd.DataFrame({"perturbation": labels}, index=[f"c{i}" for i in range(labels.size)]),
                       var=pd.DataFrame(index=genes))
    cfg = TrainConfig(top_k=12, max_steps=2, batch_size=4, warmup_steps=1, verdict_fraction=0.0, compile="off")
    with pytest.raises(TrainingError, match=r"needs \d+ tokens, past the 64 positions.*--top-k"):
        train(cells, out=tmp_path / "out", contract=vc.DataContract(perturbation_key="perturbation", control="control"),
              config=cfg, base=str(base), progress=False, device="cpu")
    model = C2SModel.load(base, genes=genes)
    model.rank_fit = vc.sentences.RankFit.fit(cells, vc.encode(cells, vocab=model.genes))
    with pytest.raises(ModelError, match=r"past the 64 positions.*The prompt alone .* smaller --top-k"):
        vc.Simulator(cells[:2].copy(), model).simulate(["ko:STAT1"], max_genes=12, progress=False)


def test_a_plain_checkpoint_asked_to_predict_says_it_never_trained_on_the_prompt(bpe_model, tmp_path, caplog):
    """A released C2S-Scale checkpoint learned perturbations only in targeted fine-tuning, never on virtualcell's
    prompt: simulating with it as loaded gives guesses, and the Simulator says so, naming the fine-tuning command."""
    import anndata as ad
    import pandas as pd

    base = _text_base(bpe_model, tmp_path / "plain", positions=256)
    genes = list(bpe_model.genes.genes)
    cells = ad.AnnData(np.random.default_rng(0).poisson(3.0, size=(8, len(genes))).astype(np.float32),
                       obs=pd.DataFrame({"perturbation": ["control"] * 8}, index=[f"c{i}" for i in range(8)]),
                       var=pd.DataFrame(index=genes))
    model = C2SModel.load(base, genes=genes)
    model.rank_fit = vc.sentences.RankFit.fit(cells, vc.encode(cells, vocab=model.genes))
    with caplog.at_level("WARNING"):
        vc.Simulator(cells.copy(), model)
    assert "was not fine-tuned by virtualcell" in caplog.text and f"virtualcell train --base {base}" in caplog.text


def test_a_tokenizer_whose_decoding_loses_genes_is_refused(bpe_model):
    """Generated cells are read by decoding their tokens to text: a tokenizer without a decoder (the tokenizers
    library's default) wrote 'RP11-34P13.7' back as 'RP11 - 34 P13 . 7', and every such gene was dropped as invalid
    without a word (one with an unknown character read as another gene)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from virtualcell.errors import ModelError

    genes = list(bpe_model.genes.genes)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # and no decoder
    tok.train_from_iterator([C2S_PERTURBATION_PROMPT, " ".join(genes)],
                            trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    model = C2SModel(bpe_model.lm, hf, genes=Vocabulary.from_names(genes), perturbations=PerturbationVocab(),
                     prompt_format="c2s")
    with pytest.raises(ModelError, match=r"genes do not come back from the tokenizer.*decodes as 'HLA - DRA'"):
        model.format.gene_paths()
    assert len(bpe_model.format.gene_paths()) == len(genes)  # a byte-level BPE with its decoder gives them back


def test_trie_constraint_gives_zero_invalid_and_zero_duplicate(bpe_model):
    m = bpe_model
    cells = vc.sentences.CellSentences.from_lists([[0, 2, 4], [7, 8, 9, 10]], m.genes)
    perts = [vc.perturbations.parse("ko:STAT1"), vc.perturbations.parse("drug:x@1uM")]
    chunks = list(m.generate(cells, perts, config=GenerationConfig(max_genes=8, min_genes=8, batch_size=4, seed=0)))
    assert sum(c.n_invalid for c in chunks) == 0 and sum(c.n_duplicate for c in chunks) == 0
    for c in chunks:
        assert (c.sentences.lengths == 8).all()
        for i in range(len(c.sentences)):
            assert len(set(c.sentences[i].tolist())) == 8
    # without constraints the same random model writes non-genes and repeats
    raw = list(m.generate(cells, perts, config=GenerationConfig(max_genes=8, constrain=False, batch_size=4, seed=0)))
    assert sum(c.n_invalid + c.n_duplicate for c in raw) > 0


def test_trie_constraint_holds_over_many_draws(bpe_model):
    """Regression: right after a gene's last token, starting that same gene again was allowed
    (its root token was only marked used once the next gene began), so a row could get stuck
    inside a repeated gene and end with a fragment."""
    m = bpe_model
    cells = vc.sentences.CellSentences.from_lists([[0, 2, 4], [7, 8, 9, 10]], m.genes)
    perts = [vc.perturbations.parse("ko:STAT1"), vc.perturbations.parse("drug:x@1uM")]
    for seed in range(6):
        chunks = list(m.generate(cells, perts, config=GenerationConfig(max_genes=8, min_genes=8, batch_size=4, seed=seed)))
        assert sum(c.n_invalid + c.n_duplicate for c in chunks) == 0, seed
        assert all((c.sentences.lengths == 8).all() for c in chunks), seed


def test_trie_mask_after_a_completed_gene_excludes_starting_it_again(bpe_model):
    from virtualcell.generation import TrieConstraint

    m = bpe_model
    trie = m.format.constraint(m.genes.genes, len(m.tokenizer))
    assert isinstance(trie, TrieConstraint)
    toks = m.tokenizer(" MT-CO1", add_special_tokens=False)["input_ids"]
    assert len(toks) > 1 and trie.children[0].get(toks[0]) is not None
    cfg = GenerationConfig(max_genes=8, min_genes=1)
    state = trie.start(1, torch.device("cpu"))
    for t in toks:
        trie.update(state, torch.tensor([t]), cfg)
    allowed = torch.isfinite(trie.mask(state, torch.zeros(1, len(m.tokenizer)), cfg))[0]
    assert not allowed[toks[0]]  # MT-CO1 is the only gene starting with this token, and it is written
    assert allowed[m.tokenizer.eos_token_id] and allowed[trie.root_tokens].sum() == len(trie.root_tokens) - 1


def test_the_bundled_model_command_still_runs(tmp_path):
    """The recorded command that built virtualcell/data/model runs today (2 steps) on the same data.

    The verdict of an untrained model is its slowest part (its sentences never end early), so it
    runs here with one sample per cell, one temperature and 1% of the cells held out instead of 10%
    (``--verdict-samples 1 --verdict-temperatures 1 --verdict-fraction 0.01``): the verdict's guidance
    candidates, decode choice and blend still run, on every one of the bundled data's 24 perturbations (a
    condition keeps at least one held-out cell), without the reruns at more samples and lower temperatures
    (test_validation covers those). The split's fraction changes which cells train, not the data, genes or
    architecture checked below."""
    import json

    from virtualcell.cli import main
    from virtualcell.model import BUNDLED

    record = json.loads((Path(BUNDLED) / "TRAINING.json").read_text())
    args = record["command"].split()[1:]
    assert args[0] == "train"
    args[args.index("--max-steps") + 1] = "2"
    args[args.index("--out") + 1] = str(tmp_path / "m")
    assert main([*args, "--verdict-samples", "1", "--verdict-temperatures", "1",
                 "--verdict-fraction", "0.01"]) == 0
    built = json.loads((tmp_path / "m" / "virtualcell.json").read_text())
    shipped = json.loads((Path(BUNDLED) / "virtualcell.json").read_text())
    assert built["train_config"]["data_hash"] == record["data_hash"]  # the same data, hashed the same way
    assert built["genes"] == shipped["genes"]
    assert built.get("target_offsets") == shipped.get("target_offsets")  # none: the recipe pins --no-target-offsets
    assert built.get("token_bias") == shipped.get("token_bias")  # none: the recipe pins --no-token-bias
    assert built["train_config"]["control_copies"] == shipped["train_config"]["control_copies"]  # off: the default
    arch = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    cfg_built = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg_shipped = json.loads((Path(BUNDLED) / "config.json").read_text())
    assert {k: cfg_built[k] for k in arch} == {k: cfg_shipped[k] for k in arch}
    judged = json.loads((tmp_path / "m" / "verdict.json").read_text())
    shipped_verdict = json.loads((Path(BUNDLED) / "verdict.json").read_text())
    assert judged["n_labels"] == shipped_verdict["n_labels"]  # 1% held out still judges every training perturbation


def test_info_prints_what_a_checkpoint_knows(tiny_model, capsys):
    """`virtualcell info`: the card read from the checkpoint's own record, for a person and as JSON."""
    from virtualcell.cli import main

    model, out, _ = tiny_model
    assert main(["info", "--model", str(out)]) == 0
    text = capsys.readouterr().out
    trained = model.perturbations.trained()
    assert f"{len(trained)} trained conditions ({len(trained)} knockout)" in text
    assert all(repr(c) in text for c in trained)
    assert "verdict      Validation" in text and "serves       " in text
    assert "contexts     " not in text  # trained without a context column: nothing to say about contexts
    assert main(["info", "--model", str(out), "--json"]) == 0
    card = json.loads(capsys.readouterr().out)
    assert card == json.loads(json.dumps(model.card(), default=str))  # the same card in Python
    assert card["genes"]["n"] == len(model.genes) and card["training"]["steps"] == model.train_config["steps"]
    assert card["contexts"] == {"all": {"control": card["contexts"]["all"]["control"],
                                        "perturbed": card["contexts"]["all"]["perturbed"]}}
    assert card["contexts"]["all"]["perturbed"] > 0 and card["verdict"]["weight"] == model.verdict.get("weight")


def test_a_baseline_lacking_some_of_the_models_genes_is_refused_unless_shared(tiny_model, caplog):
    """Read as not expressed, unmeasured genes would be predicted from a baseline of 0 nobody measured: refused by
    default, and with genes='shared' a warning and the result's attrs name them."""
    model, _, data = tiny_model
    cells = data[data.obs.perturbation == "control"][:6]
    part = cells[:, 50:].copy()
    n = len(model.genes)
    with pytest.raises(VocabularyError, match=rf"lacks 50 of the model's {n} genes.*genes='shared'"):
        vc.Simulator(part, model)
    with caplog.at_level("WARNING"):
        sim = vc.Simulator(part, model, genes="shared")
    assert "lacks 50 of the model's" in caplog.text and len(sim.absent_genes) == 50
    res = sim.simulate(["STAT1"], progress=False, samples=1)
    assert res.aggregates.attrs["absent_genes"].split("; ") == sim.absent_genes
    assert res.to_anndata().uns["virtualcell"]["absent_genes"] == res.aggregates.attrs["absent_genes"]
    assert vc.Simulator(cells.copy(), model).absent_genes == []
    # a gene subset taken after adata.raw = adata (scanpy's highly variable genes): the refusal names .raw
    kept = cells.copy()
    kept.raw = kept
    with pytest.raises(VocabularyError, match=r"baseline.raw holds 50 of them.*raw.to_adata\(\)"):
        vc.Simulator(kept[:, 50:].copy(), model)
    assert vc.Simulator(kept[:, 50:].copy().raw.to_adata(), model).absent_genes == []


def test_a_knockout_never_trained_on_is_named_as_the_screen_names_knockouts(tiny_model):
    """The embedded screen labels knockouts by their gene (STAT1): an untrained one is named so too, so that
    evaluate finds its measured cells; a kind the screen never trained keeps its typed name."""
    model, _, _ = tiny_model
    vocab = model.perturbations
    trained = {label.upper() for label in vocab.labels}
    never = next(g for g in model.genes.genes if g.upper() not in trained)
    assert vocab.labels_for([vocab.resolve(f"ko:{never}")]) == [never.upper()]
    assert vocab.labels_for([vocab.resolve(f"kd:{never}")]) == [f"kd:{never.upper()}"]
    label = sorted(vocab.labels)[0]
    assert vocab.labels_for([vocab.resolve(label)]) == [label]


def test_a_checkpoint_copied_without_its_verdict_or_baselines_says_what_it_serves_instead(tiny_model, tmp_path, caplog):
    """Weights and json copied alone load (deleting verdict.json is how one serves the pure model), but say so."""
    import shutil

    _, folder, _ = tiny_model
    for name in ("verdict.json", "baselines.npz"):
        copy = tmp_path / name
        shutil.copytree(folder, copy)
        (copy / name).unlink()
        caplog.clear()
        with caplog.at_level("WARNING"):
            C2SModel.load(copy)
        assert f"lacks {name}" in caplog.text and "serves the pure model" in caplog.text
        assert ("at default generation settings" in caplog.text) == (name == "verdict.json")
    caplog.clear()
    with caplog.at_level("WARNING"):
        C2SModel.load(folder)
        C2SModel.load(folder / "last")  # the training checkpoint: its run had not judged it yet, nothing is lost
    assert "lacks" not in caplog.text
    # a run that held cells out but made no verdict (they were all controls) records no verdict weight: nothing lost
    from virtualcell.model import META_FILE

    none = tmp_path / "no_verdict"
    shutil.copytree(folder, none)
    (none / "verdict.json").unlink()
    meta = json.loads((none / META_FILE).read_text())
    meta["train_config"].pop("verdict_weight")
    (none / META_FILE).write_text(json.dumps(meta))
    caplog.clear()
    with caplog.at_level("WARNING"):
        C2SModel.load(none)
    assert "lacks" not in caplog.text
    for name in ("config.json", "tokenizer.json"):  # without these it cannot load: named, not "truncated"
        copy = tmp_path / f"no-{name}"
        shutil.copytree(folder, copy)
        (copy / name).unlink()
        with pytest.raises(ModelError, match=f"lacks {name}, which every checkpoint virtualcell writes holds"):
            C2SModel.load(copy)


def test_a_backed_baseline_is_refused_with_how_to_load_it(tiny_model, tmp_path):
    import anndata as ad

    _, _, data = tiny_model
    data[:20].copy().write_h5ad(tmp_path / "b.h5ad")
    backed = ad.read_h5ad(tmp_path / "b.h5ad", backed="r")
    with pytest.raises(vc.errors.DataError, match=r"backed='r'.*adata.to_memory\(\)"):
        vc.encode(backed)


def test_bundled_names_the_shipped_model_and_a_control_like_label_is_said_to_be_a_control(tmp_path, monkeypatch):
    """'bundled' loads the shipped model wherever no folder of that name is (predict and screen as info did); a
    panel naming the control ('DMSO') is told the baseline cells are the controls, not to write 'ko:DMSO'."""
    monkeypatch.chdir(tmp_path)
    model = vc.C2SModel.load("bundled")
    assert Path(model.source) == Path(vc.model.BUNDLED)
    with pytest.raises(PerturbationError, match="looks like a control"):
        model.resolve(["DMSO"])
    # a drug asked of a model of knockouts: no typed drug form is suggested (it would be refused), what it can do is
    with pytest.raises(PerturbationError, match=r"'5FU'.*trained on no drug or cytokine \(only on knockouts\).*'ko:GENE'"):
        model.resolve(["5FU"])


def test_a_baseline_on_another_scale_is_put_on_the_model_s(tmp_path):
    """The bundled model trained on raw counts of its 299 genes. The same control cells as log1p of scanpy's default
    normalize_total (the median library, not 1e4), or as counts beside 1,000 more genes (genes='shared'), predict
    what the counts predict: each prediction adds the model's change to a baseline on the model's scale."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    model = vc.C2SModel.load()
    data = vc.datasets.load("papalexi2021")
    ctrl = data[data.obs["perturbation"] == "control"][:24]
    counts = sp.csr_matrix(ctrl.X, dtype=np.float32)
    logged = log1p_median(ctrl).X
    rng = np.random.default_rng(0)
    extra = sp.random(24, 1000, density=0.3, random_state=1, format="csr",
                      data_rvs=lambda k: rng.integers(1, 9, k)).astype(np.float32)
    wide_var = pd.DataFrame(index=[*ctrl.var_names, *(f"PAD{i}" for i in range(1000))])
    variants = [(ad.AnnData(counts, obs=ctrl.obs, var=ctrl.var), {}),
                (ad.AnnData(logged, obs=ctrl.obs, var=ctrl.var), {}),
                (ad.AnnData(sp.hstack([counts, extra]).tocsr(), obs=ctrl.obs, var=wide_var), {"genes": "shared"})]
    means, scales = [], []
    for adata, kw in variants:
        sim = vc.Simulator(adata, model, **kw)
        means.append(sim.simulate(["STAT1"], seed=0, progress=False).to_anndata().X.mean(axis=0))
        scales.append(sim.normalization)
    assert scales == ["log1p_cp10k"] * 3  # what the values are once on the model's scale
    np.testing.assert_allclose(means[1], means[0], atol=2e-3)
    np.testing.assert_allclose(means[2], means[0], atol=1e-5)


def test_a_dtype_that_is_no_floating_point_type_is_refused_by_name():
    """torch.int8 was blamed on a possibly truncated model.safetensors."""
    from virtualcell.errors import ModelError

    for bad in (torch.int8, torch.float8_e4m3fn, np.float32):  # (a float8 was blamed on the weights file too)
        with pytest.raises(ModelError, match=r"dtype .* is not one a model runs in"):
            vc.C2SModel.load(dtype=bad)


def test_a_baseline_holding_perturbed_cells_is_warned_of(caplog):
    model = vc.C2SModel.load()
    data = vc.datasets.load("papalexi2021")
    mixed = data[:60]
    assert (mixed.obs["perturbation"] != "control").any()
    with caplog.at_level("WARNING", logger="virtualcell"):
        vc.Simulator(mixed, model)
    assert any("baseline cells are not controls" in r.message for r in caplog.records)
    caplog.clear()
    renamed = mixed.copy()  # the same cells, their perturbations under another column name
    renamed.obs = renamed.obs.rename(columns={"perturbation": "pert"})
    with caplog.at_level("WARNING", logger="virtualcell"):
        vc.Simulator(renamed, model)
    assert any("obs['pert'] holds its control label ('control')" in r.getMessage() for r in caplog.records)
    # a column of controls beside labels the model does not know (healthy donors and patients), or with missing
    # values, is no perturbation column: no warning
    import pandas as pd

    caplog.clear()
    ctrl = data[data.obs["perturbation"] == "control"][:20].copy()
    ctrl.obs = pd.DataFrame({"status": ["control"] * 10 + ["patient"] * 10,
                             "treatment": ["control"] * 15 + [None] * 5}, index=ctrl.obs_names)
    with caplog.at_level("WARNING", logger="virtualcell"):
        vc.Simulator(ctrl, model)
    assert not any("holds its control label" in r.getMessage() for r in caplog.records)
    # the columns are found whatever the control's case, and by a label's dose too ('drugA@10', as predictions name
    # conditions); each with the control as it spells it
    import anndata as ad

    cells = ad.AnnData(obs=pd.DataFrame({"batch": ["b1", "b2"] * 2, "cond": ["Control", "STAT1", "Control", "JAK2"],
                                         "drug": ["control", "drugA@10", "control", "drugA@1"]},
                                        index=list("wxyz")))
    known = {"STAT1", "JAK2", "DRUGA"}
    assert vc.DataContract().labels_elsewhere(cells, known) == [("cond", "Control"), ("drug", "control")]


def test_a_genetic_kind_the_model_never_trained_on_is_refused_and_the_card_offers_the_trained_kinds():
    """The bundled model trained on knockouts only. Asked an activation of STAT1 it predicted STAT1 going down (a
    loss, correlated 0.72 with the STAT1 knockout), served with the knockouts' mean effect: its activation token was
    never trained. Such a kind is refused, naming what it can be asked; its card offers knockouts of any gene only."""
    import virtualcell as vc
    from virtualcell.card import card, card_text
    from virtualcell.errors import PerturbationError

    model = vc.C2SModel.load("bundled")
    assert model.perturbations.trained_kinds() == {"knockout"}
    for asked in ("act:STAT1", "kd:CMTM6", "ko:STAT1 + act:IRF1"):
        with pytest.raises(PerturbationError, match=r"never trained on an? (activation|knockdown) \(it trained on "
                                                    r"knockouts\).*can predict a knockout of any of its genes"):
            model.resolve([asked])
    assert [str(p) for p in model.resolve(["ko:CMTM6", "STAT1"])] == ["ko:CMTM6", "ko:STAT1"]
    c = card(model)
    assert c["perturbations"]["untrained_genetic"] == ["knockout"]
    assert "and a knockout of any of its genes, never trained on" in card_text(c)


def test_a_tokenizer_that_marks_its_first_space_writes_genes_as_sentences_hold_them(bpe_model):
    """A SentencePiece-style tokenizer that puts '▁' before its text (Llama-2, Mistral) writes ' STAT1' alone as
    '▁ ▁STAT1', so the trie built from each gene alone forced an extra '▁' before every gene, a sequence the model was
    never fine-tuned to write (its responses were tokenized whole). Responses and the trie now take each gene's tokens
    as a sentence holds them (prompts.in_sentence_tokens): every trained token is allowed, in order. A byte-level BPE
    writes what it wrote before."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from virtualcell.generation import TrieConstraint
    from virtualcell.prompts import C2SFormat

    genes = ["CD4", "CD44", "STAT1", "STAT2", "IRF1", "GAPDH", "ACTB", "HLA-DRA"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    corpus = [C2S_PERTURBATION_PROMPT] + [" ".join(genes[i:] + genes[:i]) for i in range(len(genes))]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<pad>", "<s>", "</s>", "<unk>"]))
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    fmt = C2SFormat(hf, genes, PerturbationVocab())
    response = fmt.response(np.array([0, 2, 4]))
    assert hf.convert_ids_to_tokens(response[1:2]) == ["▁STAT1"]  # one token, as in a sentence, not '▁' '▁STAT1'
    trie = fmt.constraint(genes, len(hf))
    assert isinstance(trie, TrieConstraint)
    cfg = GenerationConfig(max_genes=8)
    state = trie.start(1, torch.device("cpu"))
    for t in response:
        assert torch.isfinite(trie.mask(state, torch.zeros(1, len(hf)), cfg))[0, t], hf.convert_ids_to_tokens([t])
        trie.update(state, torch.tensor([t]), cfg)
    # a byte-level BPE: the same tokens as the whole sentence tokenized at once
    b = bpe_model.format
    ids = np.array([0, 3, 5, 6])
    text = "".join(" " + b.genes[i] for i in ids)
    assert b.response(ids) == list(b.tokenizer(text, add_special_tokens=False)["input_ids"]) + [b.eos]
    # a lone sentence (pre-training) starts with the BOS every prompt starts with: Gemma, C2S-Scale's base, reads
    # text without it as noise, and the first gene is then a target too
    assert b.sentence(ids) == [b.bos, *b.response(ids)] and b.bos == b.tokenizer.bos_token_id is not None


def test_unconstrained_decoding_fits_the_context_constrained_decoding_fits(bpe_model, tmp_path):
    """Unconstrained decoding of a text model gets the steps of the ``max_genes`` longest genes, as constrained
    decoding does: it budgeted 8 tokens a gene and refused runs that fit the model's context."""
    import anndata as ad
    import pandas as pd

    from virtualcell.generation import GenerationConfig

    base = _text_base(bpe_model, tmp_path / "base", positions=256)
    genes = list(bpe_model.genes.genes)
    cells = ad.AnnData(np.random.default_rng(0).poisson(3.0, size=(2, len(genes))).astype(np.float32),
                       var=pd.DataFrame(index=genes))
    model = C2SModel.load(base, genes=genes)
    steps = model.format.max_new_tokens(12, model.constraint())
    assert steps == sum(sorted((len(p) for p in model.constraint().paths), reverse=True)[:12]) + 1
    assert steps < 8 * 12 + 1  # below the old budget (8 tokens a gene), which this model's 256 positions refused
    cs = vc.encode(cells, vocab=model.genes)
    for constrain in (True, False):
        out = list(model.generate(cs, [vc.perturbations.parse("ko:STAT1")],
                                  config=GenerationConfig(max_genes=12, constrain=constrain, seed=0)))
        assert sum(len(chunk.sentences) for chunk in out) == 2
    # where the prompt fits and the answer does not, the refusal names max_genes and the positions left for it
    model.lm.config.max_position_embeddings = 230
    with pytest.raises(vc.errors.ModelError, match=r"past the 230 positions.*--max-genes\), whose tokens must fit "
                                                   r"the \d+ positions left after the prompt"):
        list(model.generate(cs, [vc.perturbations.parse("ko:STAT1")], config=GenerationConfig(max_genes=12, seed=0)))


def test_python_api_misuse_is_refused_by_name(tiny_model, tmp_path):
    """Python-only arguments the CLI never passes: each refused as a virtualcell error naming the fix (cell_chunk=-1
    generated no cell and returned zeros labelled as the perturbation; an empty list gave a result whose repr raised;
    a dict config, a matrix baseline, a folder to write to and a holdout string failed deep inside)."""
    from virtualcell.errors import DataError, OutputError, ScreenError, VirtualCellError

    model, _, data = tiny_model
    base = data[data.obs.perturbation == "control"][:4].copy()
    sim = vc.Simulator(base, model)
    for chunk in (-1, 0, 2.0):
        with pytest.raises(DataError, match=rf"cell_chunk must be a whole number of at least 1.*got {chunk!r}"):
            sim.simulate(["STAT1"], cell_chunk=chunk, progress=False)
    with pytest.raises(ScreenError, match="no perturbation"):
        sim.simulate([], progress=False)
    for bad in ({"temperature": -1}, {"guidance": -1}, {"batch_size": 0}):
        with pytest.raises(VirtualCellError, match=next(iter(bad))):
            sim.simulate(["STAT1"], progress=False, **bad)
    with pytest.raises(DataError, match=r"baseline must be an AnnData.*got csr_matrix"):
        vc.Simulator(base.X, model)
    res = sim.simulate(["STAT1"], progress=False, samples=1)
    with pytest.raises(OutputError, match="is a folder; give the name of a file"):
        res.write_h5ad(tmp_path)
    # short reprs for a notebook (every gene, rank and label was printed)
    assert len(repr(model.genes)) < 200 and len(repr(model.rank_fit)) < 200 and len(repr(model.perturbations)) < 300
    assert not {"Any", "TYPE_CHECKING", "import_module", "warnings"} & set(dir(vc))
    # a dict config is a TrainConfig's fields; a key that is none is named with the close one
    from virtualcell.train import as_config

    assert as_config({"top_k": 30}) == vc.TrainConfig(top_k=30)
    with pytest.raises(TrainingError, match=r"'top_kk' \(did you mean 'top_k'\?\)"):
        as_config({"top_kk": 30})
    with pytest.raises(TrainingError, match="holdout must map obs columns"):
        vc.TrainConfig(holdout=["STAT1"])
    assert vc.TrainConfig(holdout={"perturbation": "STAT1"}).holdout == {"perturbation": ["STAT1"]}
    assert vc.TrainConfig(verdict_samples=[1, 4]).verdict_samples == (1, 4)
    assert vc.TrainConfig(holdout={"bio_rep": np.int64(1)}).holdout == {"bio_rep": [1]}
    with pytest.raises(TrainingError, match=r"holdout gives no values for \['perturbation'\]"):
        vc.TrainConfig(holdout={"perturbation": None})
    # a context column of mixed types (1, 2 and '3', built in Python) is written as strings, not refused by h5py
    mixed = base.copy()
    mixed.obs["bio_rep"] = np.array([1, 2, "3", 4], dtype=object)
    model.contract = replace(model.contract, context_key="bio_rep")
    try:
        res = vc.Simulator(mixed, model, warn_new_contexts=False).simulate(["STAT1"], progress=False, samples=1)
        assert list(res.write_h5ad(tmp_path / "mixed.h5ad") and res.to_anndata().obs["bio_rep"]) == ["1", "2", "3", "4"]
    finally:
        model.contract = replace(model.contract, context_key=None)


def test_a_verdict_rewrite_cut_half_way_serves_the_pure_model_not_one_runs_codec_with_anothers_verdict(
        tiny_model, tmp_path, caplog):
    """`virtualcell verdict` in place rewrites the verdict files and the codec apart: cut between them (a full disk, a
    kill), the folder loaded one run's codec with the other run's verdict, baselines and gene map, without a word.
    The codec records each verdict file's digest, and a folder where one differs serves the pure model, saying so;
    a file deleted (how one serves the pure model) still loads as before."""
    import shutil

    from virtualcell.model import META_FILE, verdict_files

    _, folder, _ = tiny_model
    out = tmp_path / "m"
    shutil.copytree(folder, out)
    model = C2SModel.load(out)
    assert model.verdict is not None and model.baselines is not None
    model.save_verdict(out)  # (a folder saved by this virtualcell records the digests)
    meta = json.loads((out / META_FILE).read_text())
    assert meta["verdict_files"] == verdict_files(out) and meta["verdict_files"]["verdict.json"] is not None
    caplog.clear()
    with caplog.at_level("WARNING"):
        again = C2SModel.load(out)
    assert again.verdict == model.verdict and again.baselines is not None and "changed after" not in caplog.text

    # the new verdict written, the codec not yet: the old codec with the new verdict
    verdict = json.loads((out / "verdict.json").read_text())
    (out / "verdict.json").write_text(json.dumps(verdict | {"weight": 0.123}))
    caplog.clear()
    with caplog.at_level("WARNING"):
        cut = C2SModel.load(out)
    assert cut.verdict is None and cut.baselines is None and cut.gene_map is None
    assert "verdict.json changed after its virtualcell.json was written" in caplog.text
    assert f"virtualcell verdict --model {out} --data" in caplog.text
    # judged again (save_verdict writes the files, then the codec): served again, without a warning
    cut.verdict, cut.baselines = model.verdict, model.baselines
    cut.save_verdict(out)
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert C2SModel.load(out).verdict == model.verdict
    assert "changed after" not in caplog.text


def test_a_model_with_neighbour_offsets_loads_and_is_judged_again_after_a_verdict_rewrite_was_cut(tmp_path, caplog):
    """From a review: where the verdict files no longer matched the codec, a model with neighbour offsets could not
    load at all (its offsets need the covariance factor in baselines.npz, which the mismatch skipped), nor could the
    `virtualcell verdict` the warning names. It loads as the pure model with its offsets, and is judged again."""
    import json

    from virtualcell.cli import main
    from virtualcell.train import TrainConfig, train

    a = vc.datasets.synthetic_screen(n_genes=60, n_tfs=6, n_knockouts=6, n_pairs=0, n_drugs=0, n_cytokines=0,
                                     n_cells_per_condition=30, n_control_cells=150, n_contexts=1)
    out = tmp_path / "m"
    train(a, out=out, config=TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=12, eval_every=6,
                                         save_every=6, batch_size=8, warmup_steps=2, seed=0, neighbour_offsets=True),
          progress=False)
    verdict = json.loads((out / "verdict.json").read_text())
    (out / "verdict.json").write_text(json.dumps(verdict, indent=2))  # the same verdict, written otherwise
    with caplog.at_level("WARNING"):
        cut = C2SModel.load(out)
    assert cut.verdict is None and cut.neighbour_offsets is not None and "virtualcell verdict --model" in caplog.text
    a.write_h5ad(tmp_path / "data.h5ad")
    assert main(["verdict", "--model", str(out), "--data", str(tmp_path / "data.h5ad")]) == 0
    assert C2SModel.load(out).verdict is not None


def test_a_save_cut_half_way_leaves_a_folder_that_is_refused_not_a_mix(tiny_model, tmp_path, monkeypatch):
    """A full disk stopped the final save after the weights: the new weights loaded beside the last run's verdict and
    baselines, without a word. The codec is now removed first and written last, so such a folder is refused, naming
    the rerun; and a model saved without a verdict over a folder that held one no longer serves the old one."""
    import errno
    import shutil

    from virtualcell.model import META_FILE

    _, folder, _ = tiny_model
    out = tmp_path / "m"
    shutil.copytree(folder, out)
    model = C2SModel.load(out)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(type(model.tokenizer), "save_pretrained", full)
    with pytest.raises(OSError):
        model.save(out)
    monkeypatch.undo()
    assert not (out / META_FILE).exists() and (out / "verdict.json").exists()
    with pytest.raises(ModelError, match=r"has no virtualcell\.json.*a save that was cut.*run the training command"):
        C2SModel.load(out)
    model.verdict = None
    model.save(out)
    assert not (out / "verdict.json").exists() and C2SModel.load(out).verdict is None
