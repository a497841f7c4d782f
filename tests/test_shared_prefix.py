"""Shared-prefix attention gives the plain path's logits and cells, on several architectures."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import virtualcell as vc
from virtualcell import generation as G
from virtualcell.generation import GenerationConfig


def _tiny(arch: str):  # noqa: ANN202
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        cfg = tf.LlamaConfig(intermediate_size=64, num_key_value_heads=4, **common)
        return tf.LlamaForCausalLM(cfg).eval()
    if arch == "llama-gqa":
        cfg = tf.LlamaConfig(intermediate_size=64, num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg).eval()
    if arch == "gpt-neox":
        cfg = tf.GPTNeoXConfig(intermediate_size=64, rotary_pct=0.5, **common)
        return tf.GPTNeoXForCausalLM(cfg).eval()
    if arch == "gemma2":  # softcapping, GQA, sliding window layers, query_pre_attn_scalar
        cfg = tf.Gemma2Config(intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=64,
                              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, query_pre_attn_scalar=16, **common)
        return tf.Gemma2ForCausalLM(cfg).eval()
    raise ValueError(arch)


@pytest.mark.parametrize("arch", ["llama", "llama-gqa", "gpt-neox", "gemma2"])
def test_shared_prefix_logits_match_the_plain_path(arch):
    model = _tiny(arch)
    with torch.inference_mode():
        assert G._check_shared_prefix(model, 0, torch.device("cpu"))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_shared_and_repeated_prefix_write_the_same_cells(arch):
    """Greedy decoding of a padded grid (cells of different lengths, suffixes of different
    lengths, rows ending early) gives the same tokens on both paths."""
    model = _tiny(arch)
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(3, 50, size=n).tolist() for n in (9, 4, 7)]
    suffixes = [[5], [6, 7], [8, 9, 10], [11]]
    out = {}
    for mode in ("repeat", "shared"):
        cfg = GenerationConfig(max_genes=12, temperature=0, batch_size=8, constrain=False, prefix_attention=mode)
        with torch.inference_mode():
            out[mode] = sorted(G.generate_grid(model, prefixes, suffixes, cell_keys=[0, 1, 2], suffix_keys=[0, 1, 2, 3],
                                               constraint=None, eos_id=2, pad_id=0, config=cfg))
    assert len(out["shared"]) == 12
    assert out["shared"] == out["repeat"]


def test_shared_prefix_is_used_for_the_bundled_model_and_gives_the_same_cells():
    model = vc.model.bundled()
    adata = vc.datasets.load("papalexi2021")
    ctrl = adata[adata.obs["perturbation"] == "control"][:6].copy()
    cells = vc.sentences.encode(ctrl, vocab=model.genes, top_k=model.top_k)
    perts = model.resolve(["IRF1", "STAT1", "control"])
    got = {}
    for mode in ("repeat", "shared"):
        cfg = GenerationConfig(max_genes=30, batch_size=9, seed=1, temperature=0, prefix_attention=mode)
        chunks = list(model.generate(cells, perts, config=cfg))
        got[mode] = [c.sentences[i].tolist() for c in chunks for i in range(len(c.sentences))]
    assert got["shared"] == got["repeat"]
    assert G._SHARED_OK[model.lm][("cpu", "torch.float32")] is True  # auto picks it for this model


def test_shared_prefix_refuses_a_sliding_window_shorter_than_the_sentence():
    model = _tiny("gemma2")  # sliding window 64
    cfg = GenerationConfig(max_genes=100, temperature=0, constrain=False, prefix_attention="shared")
    with pytest.raises(ValueError, match="sliding window"), torch.inference_mode():
        list(G.generate_grid(model, [[5, 6, 7]], [[8]], cell_keys=[0], suffix_keys=[0], constraint=None,
                             eos_id=2, pad_id=0, config=cfg))
    # auto falls back to the plain path and still generates
    cfg = GenerationConfig(max_genes=100, temperature=0, constrain=False)
    with torch.inference_mode():
        (_, _, toks), = G.generate_grid(model, [[5, 6, 7]], [[8]], cell_keys=[0], suffix_keys=[0], constraint=None,
                                        eos_id=2, pad_id=0, config=cfg)
    assert len(toks) > 0


def test_bad_prefix_attention_value():
    with pytest.raises(ValueError, match="prefix_attention"):
        GenerationConfig(prefix_attention="fast")


def test_rows_are_capped_by_free_accelerator_memory_with_the_same_cells(monkeypatch):
    """On a GPU the engine lowers rows per forward pass to what fits; sampling does not
    depend on the batch, so the cells are the same. Simulated here by reporting little free memory."""
    model = _tiny("llama")
    prefixes = [[5, 6, 7, 8], [9, 10], [11, 12, 13]]
    suffixes = [[14], [15, 16]]
    cfg = GenerationConfig(max_genes=10, batch_size=6, constrain=False, seed=3)

    def run():  # noqa: ANN202
        with torch.inference_mode():
            return sorted(G.generate_grid(model, prefixes, suffixes, cell_keys=[0, 1, 2], suffix_keys=[0, 1],
                                          constraint=None, eos_id=2, pad_id=0, config=cfg))

    full = run()
    tokens = 4 + 2 + 11 + 1
    per_row = 2 * 2 * 4 * 8 * 4 * tokens + 4 * 50 * 4  # layers, k+v, heads, head dim, fp32 bytes, tokens; logits
    monkeypatch.setattr(G, "_free_memory", lambda device: 2 * per_row * 2)  # room for 2 rows in half of it
    assert G._rows_that_fit(model, torch.device("cpu"), tokens) == 2
    with pytest.warns(UserWarning, match="using 2 rows"):
        capped = run()
    assert capped == full


def test_suffixes_of_several_lengths_past_a_sliding_window_are_refused():
    """Left-padding between a cell's prefix and suffixes of several lengths puts pad positions inside a sliding window
    (a shorter suffix's row then sees less of its cell: 0.2-0.4 in log-probability against a plain forward pass on a
    Gemma-2 with an 8-token window). Refused; one suffix length runs."""
    import transformers as tf

    torch.manual_seed(0)
    model = tf.Gemma2ForCausalLM(tf.Gemma2Config(
        vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
        intermediate_size=64, num_key_value_heads=2, head_dim=8, sliding_window=8, query_pre_attn_scalar=16)).eval()
    prefix = [np.random.default_rng(0).integers(3, 50, size=6).tolist()]

    def run(suffixes, max_genes):  # noqa: ANN001, ANN202
        cfg = GenerationConfig(max_genes=max_genes, temperature=0, constrain=False)
        with torch.inference_mode():
            return list(G.generate_grid(model, prefix, suffixes, cell_keys=[0], suffix_keys=list(range(len(suffixes))),
                                        constraint=None, eos_id=2, pad_id=0, config=cfg))

    with pytest.raises(ValueError, match="sliding window of 8 tokens.*several lengths"):
        run([[5], [6, 7, 8]], 12)
    assert len(run([[5], [6]], 12)) == 2  # one length: no padding between prefix and suffix


def test_min_genes_above_the_genes_left_ends_the_sentence():
    """With min_genes above the genes there are, no token was allowed once every gene was written, and sampling wrote
    non-gene tokens (greedy, the pad id). EOS is allowed where no gene is left."""
    import transformers as tf

    from virtualcell.generation import GeneConstraint

    torch.manual_seed(0)
    lm = tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, num_key_value_heads=2)).eval()
    genes = [10, 11, 12, 13, 14]
    for temperature in (1.0, 0.0):
        cfg = GenerationConfig(max_genes=10, min_genes=8, temperature=temperature, seed=0)
        with torch.inference_mode():
            (_, _, tokens), = G.generate_grid(lm, [[1, 10, 3]], [[4]], cell_keys=[0], suffix_keys=[0],
                                              constraint=GeneConstraint(genes, 2, 20), eos_id=2, pad_id=0, config=cfg)
        assert sorted(tokens) == genes, (temperature, tokens)
