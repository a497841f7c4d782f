"""The learned bias over the genes of each token that names a perturbation (virtualcell.token_bias)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from virtualcell import token_bias
from virtualcell.training import batching
from virtualcell.training.loss import response_loss

from _by_hand import PAD, loss_by_hand, tiny_lm

NAMED = [4, 5, 6, 7]  # the toy vocabulary's tokens that name a perturbation each (with a row in the table)


def _drop(lm) -> None:  # noqa: ANN001
    lm._parameters.pop(token_bias.PARAMETER, None)
    lm._buffers.pop(token_bias.ROWS, None)


def test_the_loss_adds_the_sum_of_each_rows_named_tokens_rows_and_learns_them():
    lm = tiny_lm()
    values = np.random.default_rng(0).normal(size=(len(NAMED), 40)).astype(np.float32)
    param = token_bias.attach(lm, NAMED, values)
    row = {t: i for i, t in enumerate(NAMED)}
    # own prompts: tokens 4 and 6 name the first pair's perturbation (2, a shared token, has no row); the second
    # names 5 and a gene (20), which adds nothing; the third names 7
    groups = [([1, 9, 3], [([4, 6, 2], [10, 11, 12]), ([5, 20, 2], [21, 10])]), ([1, 14, 3], [([7, 2], [12, 10])])]
    b = batching.pack(groups, PAD)
    loss = response_loss(lm, b, bias=token_bias.of(lm))[0]
    def adjust(own, logits):  # noqa: ANN001, ANN202
        logits += torch.as_tensor(sum(values[row[t]] for t in own if t in row))

    assert torch.allclose(loss, loss_by_hand(lm, groups, adjust), atol=1e-5)
    lm.zero_grad()
    loss.backward()
    g = param.grad
    assert float(g[row[4], 10]) < 0 and float(g[row[7], 12]) < 0  # a written gene is pushed up under its prompt's tokens
    # a zero table is the model without it
    zero = tiny_lm()
    plain = response_loss(zero, b)[0]
    token_bias.attach(zero, NAMED)
    assert torch.allclose(response_loss(zero, b, bias=token_bias.of(zero))[0], plain)
    # a batch whose prompts name none still gives the table a (zero) gradient
    lm.zero_grad()
    response_loss(lm, batching.pack([([], [([1], [10, 11])])], PAD), bias=token_bias.of(lm))[0].backward()
    assert param.grad is not None and float(param.grad.abs().sum()) == 0


def test_attach_checks_the_shape_and_without_drops_the_parameter():
    lm = tiny_lm()
    with pytest.raises(ValueError, match="expected"):
        token_bias.attach(lm, NAMED, np.zeros((len(NAMED), 39)))
    with pytest.raises(ValueError, match="distinct"):
        token_bias.attach(lm, [4, 4])
    token_bias.attach(lm, NAMED)
    state = lm.state_dict()
    assert token_bias.PARAMETER in state and token_bias.PARAMETER not in token_bias.without(state)
    assert token_bias.table(lm).shape == (len(NAMED), 40)


def test_generation_adds_the_bias_a_huge_entry_forces_the_gene_and_the_checkpoint_keeps_it(tiny_model, tmp_path):
    import virtualcell as vc
    from virtualcell.generation import GenerationConfig

    model, _, data = tiny_model
    fmt = model.format
    cells = vc.sentences.encode(data[:8], vocab=model.genes, top_k=model.top_k)
    names = token_bias.bias_tokens(fmt)
    ids = [fmt.token_id[t] for t in names]
    labels = list(model.perturbations.labels)
    panel = model.resolve([labels[0], labels[1]])
    own = [t for t in fmt.suffix(panel[0]) if t in ids and t not in fmt.suffix(panel[1])]
    assert own, "the first perturbation has no token of its own"
    g = 7
    cfg = GenerationConfig(max_genes=model.top_k, temperature=1.0)
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    saved = token_bias.table(model.lm)

    def written(values: np.ndarray | None) -> list[list[np.ndarray]]:
        if values is None:
            _drop(model.lm)
        else:
            token_bias.attach(model.lm, ids, values)
        out: list[list[np.ndarray]] = [[], []]
        for ch in model.generate(cells, panel, config=cfg):
            for p, k in zip(ch.perturbation, range(len(ch.sentences))):
                out[p].append(np.asarray(ch.sentences[k]))
        return out

    try:
        plain = written(None)
        zero = written(np.zeros((len(ids), vocab), np.float32))
        assert all((a == b).all() for x, y in zip(plain, zero) for a, b in zip(x, y))  # a zero table changes nothing
        # a huge entry for a name token of the first perturbation only: its gene is written first there, not elsewhere
        pushed = np.zeros((len(ids), vocab), np.float32)
        pushed[ids.index(own[-1]), fmt.gene_tokens[g]] = 1e4
        out = written(pushed)
        assert all(s.size and s[0] == g for s in out[0])
        assert not all(s.size and s[0] == g for s in out[1])
        model.save(tmp_path / "m")
        meta = json.loads((tmp_path / "m" / "virtualcell.json").read_text())
        assert meta["token_bias"] == names  # the rows' tokens, in order
        from safetensors.torch import load_file

        assert token_bias.PARAMETER not in load_file(tmp_path / "m" / "model.safetensors")
        back = vc.C2SModel.load(tmp_path / "m")
        assert np.array_equal(token_bias.table(back.lm), pushed)
        assert "token bias over" in repr(back)
        (tmp_path / "m" / token_bias.FILE).write_bytes(b"broken")
        with pytest.raises(vc.errors.ModelError, match="token-bias table"):
            vc.C2SModel.load(tmp_path / "m")
    finally:
        _drop(model.lm)
        if saved is not None:
            token_bias.attach(model.lm, ids, saved)


def test_training_learns_the_table_and_cannot_resume_across_the_setting(tmp_path):
    import virtualcell as vc
    from virtualcell.errors import TrainingError
    from virtualcell.train import TrainConfig, train

    data = vc.datasets.synthetic_screen(n_genes=60, n_tfs=8, n_knockouts=0, n_pairs=0, n_drugs=2, n_cytokines=1,
                                        doses=(1.0, 10.0), n_cells_per_condition=25, n_control_cells=60, n_contexts=1,
                                        seed=0)
    cfg = TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=10, eval_every=5, save_every=5,
                      batch_size=8, warmup_steps=2, seed=0, kind_key="perturbation_type", verdict_fraction=0.0,
                      token_bias=True)
    model = train(data, out=tmp_path / "tb", config=cfg, progress=False)
    table = token_bias.table(model.lm)
    names = token_bias.bias_tokens(model.format)
    assert {"<drug:drugA>", "<drug>", "<generic>", "<control>"} <= set(names)
    assert not set(names) & set(model.genes.genes)  # every token but the genes
    assert table.shape[0] == len(names) and np.abs(table[names.index("<drug:drugA>")]).sum() > 0  # trained
    assert np.array_equal(token_bias.table(vc.C2SModel.load(tmp_path / "tb").lm), table)
    import dataclasses

    with pytest.raises(TrainingError, match="token_bias: True there, False here"):
        train(data, out=tmp_path / "tb", config=dataclasses.replace(cfg, token_bias=False, max_steps=12),
              progress=False)
    # its own weight decay: a group of its own in the optimizer, and a resume may not change it
    with pytest.raises(TrainingError, match="token_bias_decay: .* there, 1.0 here"):
        train(data, out=tmp_path / "tb", config=dataclasses.replace(cfg, token_bias_decay=1.0, max_steps=12),
              progress=False)
    with pytest.raises(TrainingError, match="token_bias_decay"):
        dataclasses.replace(cfg, token_bias_decay=-1.0)


def test_the_table_gets_its_own_weight_decay_only_when_asked():
    from virtualcell.train import TrainConfig, _param_groups

    lm = tiny_lm()
    token_bias.attach(lm, [3, 4])
    param = token_bias.of(lm)
    n = len(list(lm.parameters()))
    one = _param_groups(lm, param, TrainConfig())
    assert len(one) == 1 and len(one[0]["params"]) == n
    assert _param_groups(lm, None, TrainConfig(token_bias_decay=1.0))[0]["params"] == list(lm.parameters())
    two = _param_groups(lm, param, TrainConfig(token_bias_decay=1.0))
    assert [len(g["params"]) for g in two] == [n - 1, 1] and two[1]["params"][0] is param[0]
    assert two[1]["weight_decay"] == 1.0 and "weight_decay" not in two[0]


def test_the_command_line_turns_it_on_and_off():
    from virtualcell.cli import build_parser

    base = ["train", "--data", "x", "--out", "y", "--perturbation-key", "p", "--control", "c"]
    assert build_parser().parse_args([*base, "--token-bias"]).token_bias is True
    assert build_parser().parse_args([*base, "--no-token-bias"]).token_bias is False
    assert build_parser().parse_args(base).token_bias_decay is None
    assert build_parser().parse_args([*base, "--token-bias-decay", "1"]).token_bias_decay == 1.0
