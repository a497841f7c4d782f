"""The learned logit offsets on the gene a genetic perturbation names (virtualcell.target_offsets)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from virtualcell import target_offsets
from virtualcell.perturbations import parse
from virtualcell.training import batching
from virtualcell.training.loss import response_loss

from _by_hand import PAD, loss_by_hand, tiny_lm



def _named(own):  # noqa: ANN001
    """A toy format's reading: token 4 is a knockout, token 5 an activation, of the gene token after it."""
    kinds = {4: 0, 5: 2}
    return [(b, kinds[a]) for a, b in zip(own[:-1], own[1:]) if a in kinds]


def test_the_loss_adds_each_rows_offset_to_its_named_genes_logits_and_learns_it():
    lm = tiny_lm()
    param = target_offsets.attach(lm, {"knockout": -2.0, "activation": 1.5})
    groups = [([1, 2, 3], [([4, 20, 9], [10, 11, 12]), ([5, 21, 9], [21, 10])]), ([1, 7, 3], [([9], [12, 10])])]
    b = batching.pack(groups, PAD, named=_named)
    assert b.named is not None and b.named[2].sum() == 2  # one named gene in each of the first two rows
    loss = response_loss(lm, b, offsets=param)[0]
    # by hand: each pair as one sequence, the row's offset added to its named gene's logit
    def adjust(own, logits):  # noqa: ANN001, ANN202
        for tok, kind in _named(own):
            logits[:, tok] += (-2.0, 0.0, 1.5)[kind]

    assert torch.allclose(loss, loss_by_hand(lm, groups, adjust), atol=1e-5)
    lm.zero_grad()
    loss.backward()
    g = param.grad.tolist()
    assert g[0] > 0  # the knocked-out gene 20 is never written: the loss pushes its offset down (gradient > 0)
    assert g[2] < 0  # the activated gene 21 is written first: pushed up
    assert g[1] == 0  # no knockdown in the batch
    # zero offsets are the model without them
    zero = tiny_lm()
    plain = response_loss(zero, b)[0]
    assert torch.allclose(response_loss(zero, b, offsets=target_offsets.attach(zero))[0], plain)


def test_pretraining_batches_name_nothing_and_still_give_the_parameter_a_gradient():
    lm = tiny_lm()
    param = target_offsets.attach(lm)
    b = batching.pack([([], [([1], [10, 11, 12])])], PAD, named=_named)
    assert b.named is None
    response_loss(lm, b, offsets=param)[0].backward()
    assert param.grad is not None and param.grad.abs().sum() == 0  # defined for data-parallel reduction, and zero


def test_attach_refuses_an_unknown_kind_and_without_drops_the_parameter():
    lm = tiny_lm()
    with pytest.raises(ValueError, match="Unknown target-offset kinds"):
        target_offsets.attach(lm, {"drug": 1.0})
    target_offsets.attach(lm, {"knockdown": -3.0})
    assert target_offsets.values(lm) == {"knockout": 0.0, "knockdown": -3.0, "activation": 0.0}
    state = lm.state_dict()
    assert target_offsets.PARAMETER in state and target_offsets.PARAMETER not in target_offsets.without(state)
    assert target_offsets.values(tiny_lm()) is None


def test_the_compact_format_reads_genetic_targets_and_nothing_else(tiny_model):
    model, _, _ = tiny_model
    fmt = model.format
    gene = model.genes.genes[3]
    tok = int(fmt.gene_tokens[3])
    suffix = fmt.suffix(model.resolve([f"ko:{gene}"])[0])
    assert fmt.named_targets(suffix) == [(tok, target_offsets.KINDS.index("knockout"))]
    pair = fmt.suffix(parse(f"kd:{gene} + act:{model.genes.genes[5]}"))  # (kinds this model never trained on)
    assert sorted(fmt.named_targets(pair)) == sorted([(tok, 1), (int(fmt.gene_tokens[5]), 2)])  # parts in any order
    assert fmt.named_targets(fmt.suffix(model.resolve(["control"])[0])) == []


def test_generation_adds_the_offsets_a_huge_one_forbids_or_forces_the_gene(tiny_model, tmp_path):
    import virtualcell as vc
    from virtualcell.generation import GenerationConfig

    model, _, data = tiny_model
    cells = vc.sentences.encode(data[:12], vocab=model.genes, top_k=model.top_k)
    counts = np.bincount(np.concatenate([cells[i][: model.top_k] for i in range(len(cells))]), minlength=len(model.genes))
    g = int(np.argmax(counts))  # a gene in nearly every cell
    gene = model.genes.genes[g]
    panel = [parse(f"ko:{gene}"), parse(f"act:{gene}")]  # the format's offsets, for a kind trained or not
    cfg = GenerationConfig(max_genes=model.top_k, temperature=1.0)

    def written(offsets: dict[str, float] | None) -> list[list[np.ndarray]]:
        setattr(model.lm, target_offsets.PARAMETER, None) if offsets is None else target_offsets.attach(model.lm, offsets)
        out: list[list[np.ndarray]] = [[], []]
        for ch in model.generate(cells, panel, config=cfg):
            for p, k in zip(ch.perturbation, range(len(ch.sentences))):
                out[p].append(np.asarray(ch.sentences[k]))
        return out

    from virtualcell import token_bias

    saved = target_offsets.values(model.lm)
    # the model without its token-bias table, whose rows for the kind and the target's own token learn the same drop
    table, rows = token_bias.table(model.lm), token_bias.bias_tokens(model.format)
    model.lm._parameters.pop(token_bias.PARAMETER, None)
    try:
        plain, zero = written(None), written({})
        assert all((a == b).all() for x, y in zip(plain, zero) for a, b in zip(x, y))  # 0 offsets change nothing
        assert sum(g in s for s in plain[0]) > 0  # untouched, the model writes the gene under its knockout
        pushed = written({"knockout": -1e4, "activation": 1e4})
        assert not any(g in s for s in pushed[0])  # forbidden under the knockout
        assert all(s.size and s[0] == g for s in pushed[1])  # written first under the activation
        # they travel with the checkpoint, in virtualcell.json, and not in the weights
        model.save(tmp_path / "m")
        meta = json.loads((tmp_path / "m" / "virtualcell.json").read_text())
        assert meta["target_offsets"] == {"knockout": -1e4, "knockdown": 0.0, "activation": 1e4}
        from safetensors.torch import load_file

        assert target_offsets.PARAMETER not in load_file(tmp_path / "m" / "model.safetensors")
        assert vc.C2SModel.load(tmp_path / "m").target_offsets == meta["target_offsets"]
    finally:
        setattr(model.lm, target_offsets.PARAMETER, None)
        if saved is not None:
            target_offsets.attach(model.lm, saved)
        if table is not None:
            token_bias.attach(model.lm, [model.format.token_id[t] for t in rows], table)


def test_training_learns_a_negative_offset_where_knocked_out_genes_vanish(tmp_path):
    """On the synthetic screen a knocked-out gene is never in its cells: every pair step pushes the knockout
    offset down, the kinds the screen lacks stay 0, and a screen without genetic perturbations gets none."""
    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    data = vc.datasets.synthetic_screen(n_genes=60, n_tfs=8, n_knockouts=4, n_pairs=0, n_drugs=1, n_cytokines=1,
                                        doses=(1.0,), n_cells_per_condition=25, n_control_cells=60, n_contexts=1, seed=0)
    cfg = TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=10, eval_every=5, save_every=5,
                      batch_size=8, warmup_steps=2, seed=0, kind_key="perturbation_type", verdict_fraction=0.0)
    model = train(data, out=tmp_path / "ko", config=cfg, progress=False)
    values = vc.C2SModel.load(tmp_path / "ko").target_offsets
    assert values == model.target_offsets
    assert values["knockout"] < 0 and values["knockdown"] == 0 and values["activation"] == 0
    chemical = data[data.obs["perturbation_type"].isin(["control", "drug", "cytokine"])].copy()
    assert train(chemical, out=tmp_path / "chem", config=cfg, progress=False).target_offsets is None
    assert "target offsets knockout -" in repr(model)  # the moved kinds, where a user looks at a model


def test_the_command_line_turns_them_off():
    from virtualcell.cli import build_parser

    base = ["train", "--data", "x", "--out", "y", "--perturbation-key", "p", "--control", "c"]
    assert build_parser().parse_args(base).target_offsets is True
    assert build_parser().parse_args([*base, "--no-target-offsets"]).target_offsets is False


def test_a_run_cannot_resume_across_the_offsets_setting(tmp_path):
    import virtualcell as vc
    from virtualcell.errors import TrainingError
    from virtualcell.train import TrainConfig, train

    data = vc.datasets.synthetic_screen(n_genes=40, n_tfs=4, n_knockouts=3, n_pairs=0, n_drugs=0, n_cytokines=0,
                                        doses=(1.0,), n_cells_per_condition=15, n_control_cells=40, n_contexts=1, seed=0)
    cfg = TrainConfig(top_k=20, hidden_size=16, n_layers=1, n_heads=2, max_steps=2, eval_every=2, save_every=2,
                      batch_size=4, warmup_steps=1, seed=0, kind_key="perturbation_type", verdict_fraction=0.0)
    train(data, out=tmp_path, config=cfg, progress=False)
    from dataclasses import replace

    with pytest.raises(TrainingError, match=r"target_offsets: True there, False here.*--restart"):
        train(data, out=tmp_path, config=replace(cfg, max_steps=3, target_offsets=False), progress=False)
    train(data, out=tmp_path, config=replace(cfg, max_steps=3, target_offsets=False), progress=False, resume=False)


# --------------------------------------------------------------------------- neighbour offsets
def test_neighbour_offsets_add_each_genes_correlation_with_the_named_gene_times_the_kinds_value():
    """By hand: every gene's correlation with the named gene (from the covariance factor), 0 on the named gene,
    times the row's kind's neighbour offset; summed over a row's named genes; on top of the target offsets."""
    rng = np.random.default_rng(0)
    genes, vocab = 6, 40
    tokens = np.arange(20, 26)  # gene g is token 20 + g
    F = rng.normal(size=(genes, 4))
    cov = F @ F.T
    corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))
    lm = tiny_lm(vocab)
    param = target_offsets.attach(lm, {"knockout": -1.0})
    near_param = target_offsets.attach_neighbours(lm, target_offsets.token_factor(F, tokens, vocab),
                                                  {"knockout": -3.0, "activation": 2.0})
    near = target_offsets.neighbours(lm)
    assert near[0] is near_param and target_offsets.neighbour_values(lm)["knockout"] == -3.0
    rows = target_offsets.row_tensors([[(21, 0)], [(22, 2), (24, 0)], []])
    logits = torch.zeros((3, vocab))
    got = target_offsets.add(logits, param, rows, near).detach().numpy()
    want = np.zeros((3, vocab))
    for r, named in enumerate([[(1, 0)], [(2, 2), (4, 0)], []]):
        for g, kind in named:
            value = (-3.0, 0.0, 2.0)[kind]
            for h in range(genes):
                want[r, tokens[h]] += 0.0 if h == g else value * corr[g, h]
            want[r, tokens[g]] += (-1.0, 0.0, 0.0)[kind]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert not set(target_offsets.without(lm.state_dict())) & {target_offsets.PARAMETER, target_offsets.NEIGHBOURS}


def test_a_run_with_neighbour_offsets_learns_them_and_its_checkpoint_serves_them(tmp_path):
    """Training moves the knockout's neighbour offset, the checkpoint keeps it (virtualcell.json) and reads its
    correlations back from baselines.npz, and generation under it differs from generation without it."""
    import virtualcell as vc
    from virtualcell.errors import ModelError
    from virtualcell.train import TrainConfig, train

    data = vc.datasets.synthetic_screen(n_genes=60, n_tfs=8, n_knockouts=6, n_pairs=0, n_drugs=0, n_cytokines=0,
                                        doses=(1.0,), n_cells_per_condition=25, n_control_cells=60, n_contexts=1, seed=0)
    cfg = TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=10, eval_every=5, save_every=5,
                      batch_size=8, warmup_steps=2, seed=0, kind_key="perturbation_type", verdict_fraction=0.0,
                      neighbour_offsets=True)
    model = train(data, out=tmp_path / "m", config=cfg, progress=False)
    values = model.neighbour_offsets
    assert values is not None and values["knockout"] != 0 and values["activation"] == 0
    again = vc.C2SModel.load(tmp_path / "m")
    assert again.neighbour_offsets == values and "neighbour offsets knockout" in repr(again)
    meta = json.loads((tmp_path / "m" / "virtualcell.json").read_text())
    assert meta["neighbour_offsets"] == values
    # a huge negative one keeps every gene that goes with the knocked-out gene out of its sentences
    F = again.baselines.response.astype(np.float64)
    cov = F @ F.T
    corr = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)).clip(1e-12))
    target = int(np.argmax((corr > 0.2).sum(axis=1)))  # the gene with the most partners
    partners = set(np.flatnonzero(corr[target] > 0.2)) - {target}
    cells = vc.sentences.encode(data[:20], vocab=again.genes, top_k=again.top_k)
    panel = again.resolve([f"ko:{again.genes.genes[target]}"])

    def written(value: float) -> set[int]:
        from virtualcell.generation import GenerationConfig

        target_offsets.neighbours(again.lm)[0].data[0] = value / target_offsets.SCALE
        return {int(g) for ch in again.generate(cells, panel, config=GenerationConfig(max_genes=again.top_k))
                for i in range(len(ch.sentences)) for g in ch.sentences[i]}

    assert written(0.0) & partners  # without it the model writes some of them
    assert not written(-1e4) & partners
    (tmp_path / "m" / "baselines.npz").unlink()
    with pytest.raises(ModelError, match="covariance factor"):
        vc.C2SModel.load(tmp_path / "m")
    assert build_parser_flag()


def build_parser_flag() -> bool:
    from virtualcell.cli import build_parser

    base = ["train", "--data", "x", "--out", "y", "--perturbation-key", "p", "--control", "c"]
    return (build_parser().parse_args(base).neighbour_offsets is False
            and build_parser().parse_args([*base, "--neighbour-offsets"]).neighbour_offsets is True)


def test_an_untrained_knockout_gets_the_coexpression_prior_and_a_trained_one_does_not(tiny_model):
    """``GenerationConfig.coexpression_prior``: a knockout of a model gene the model never trained on gets the served
    coexpression baseline's shift on its logits (its own gene left to the target offsets); a trained one gets none,
    and turning it off gives the model's sentences back unchanged."""
    import virtualcell as vc
    from virtualcell.generation import GenerationConfig
    from virtualcell.perturbations import parse

    model, _, data = tiny_model
    trained = sorted(model.perturbations.labels)[0]
    targets = {str(parse(v).target).upper() for v in model.perturbations.labels.values() if ":" in v}
    gene = next(g for g in model.genes.genes if g not in targets)
    panel = model.resolve([trained, f"ko:{gene}"])
    priors = model.coexpression_priors(panel)
    assert priors is not None and priors[0] is None
    b = model.baselines
    expected, name = b.unseen_delta(parse(f"ko:{gene}"))
    assert name == "coexpression"
    shift = priors[1][np.asarray(model.format.gene_tokens)]
    g = model.genes.genes.index(gene)
    assert shift[g] == 0.0  # the target's own logit is the target offsets'
    keep = np.arange(len(shift)) != g
    np.testing.assert_allclose(shift[keep], (expected - b.pertmean)[keep], rtol=1e-5, atol=1e-6)
    assert np.abs(shift).max() > 0
    # the factor is fitted once per set left out (cached), and a different set gives a different fit
    one = b.coexpression_shift(parse(f"ko:{gene}"), without=[model.perturbations.labels[trained]])
    assert not np.allclose(one, b.coexpression_shift(parse(f"ko:{gene}")))
    np.testing.assert_array_equal(one, b.coexpression_shift(parse(f"ko:{gene}"),
                                                            without=[model.perturbations.labels[trained]]))
    # the perturbations the model trained on are the ones the prior learns from: none of them is left out
    assert model.coexpression_priors(model.resolve([trained])) is None

    cells = vc.sentences.encode(data[:12], vocab=model.genes, top_k=model.top_k)

    def written(prior: bool) -> list[list[np.ndarray]]:
        out: list[list[np.ndarray]] = [[], []]
        cfg = GenerationConfig(max_genes=model.top_k, coexpression_prior=prior)
        for ch in model.generate(cells, panel, config=cfg):
            for p, k in zip(ch.perturbation, range(len(ch.sentences))):
                out[p].append(np.asarray(ch.sentences[k]))
        return out

    on, off = written(True), written(False)
    assert all(np.array_equal(a, c) for a, c in zip(on[0], off[0]))  # the trained one: untouched
    assert not all(np.array_equal(a, c) for a, c in zip(on[1], off[1]))  # the untrained one: moved


def test_generation_adds_a_suffix_bias_to_its_rows_only(tiny_model):
    """The engine's ``suffix_bias``: a huge negative entry keeps its gene out of that suffix's sentences, at every
    step and after finished rows leave the batch, and leaves the other suffix alone."""
    import virtualcell as vc
    from virtualcell.generation import GenerationConfig

    model, _, data = tiny_model
    cells = vc.sentences.encode(data[:12], vocab=model.genes, top_k=model.top_k)
    counts = np.bincount(np.concatenate([cells[i][: model.top_k] for i in range(len(cells))]), minlength=len(model.genes))
    g = int(np.argmax(counts))
    panel = model.resolve(sorted(model.perturbations.labels)[:2])
    vocab = model.lm.get_output_embeddings().weight.shape[0]
    row = np.zeros(vocab, dtype=np.float32)
    row[model.format.gene_tokens[g]] = -1e4
    original = model.coexpression_priors
    model.coexpression_priors = lambda perturbations: [row, None]
    try:
        seen: list[set[int]] = [set(), set()]
        for ch in model.generate(cells, panel, config=GenerationConfig(max_genes=model.top_k)):
            for p, k in zip(ch.perturbation, range(len(ch.sentences))):
                seen[p] |= {int(x) for x in ch.sentences[k]}
    finally:
        model.coexpression_priors = original
    assert g not in seen[0] and g in seen[1]


def test_the_verdict_keeps_or_drops_the_coexpression_prior_by_the_knockouts_it_held_out_whole(tmp_path, papalexi):
    """With ``unseen_fraction`` the verdict scores the perturbations held out whole with and without the prior, keeps
    the one with the lower error (``verdict["unseen"]["settings"]``), and the Simulator then serves that choice."""
    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    rng = np.random.default_rng(1)
    data = papalexi[np.sort(rng.choice(papalexi.n_obs, 2500, replace=False))].copy()
    cfg = TrainConfig(top_k=30, hidden_size=32, n_layers=2, n_heads=2, max_steps=12, eval_every=6, save_every=6,
                      batch_size=8, warmup_steps=2, seed=0, unseen_fraction=0.2)
    model = train(data, out=tmp_path / "m", config=cfg, progress=False)
    unseen = model.verdict["unseen"]
    prior = unseen["coexpression_prior"]
    assert prior["kept"] == (prior["with"]["mse"] <= prior["without"]["mse"])
    assert unseen["model"] == (prior["with"] if prior["kept"] else prior["without"])
    assert unseen["settings"] == {"coexpression_prior": prior["kept"]} and "coexpression prior" in unseen["summary"]
    again = vc.C2SModel.load(tmp_path / "m")
    assert again.setting("coexpression_prior") is prior["kept"]
    controls = data[data.obs["perturbation"] == "control"][:6].copy()
    held = unseen["perturbations"][0]
    res = vc.Simulator(controls, again).simulate([f"ko:{held}"], progress=False)
    assert res.aggregates.attrs["coexpression_prior"] == int(prior["kept"])
    forced = vc.Simulator(controls, again).simulate([f"ko:{held}"], progress=False, coexpression_prior=True)
    assert forced.aggregates.attrs["coexpression_prior"] == 1
