"""The trainer's parts: packed batches, loss, schedule, checkpoints (no training runs here)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from virtualcell.errors import TrainingError
from virtualcell.train import TrainConfig
from virtualcell.training import batching, checkpoint
from virtualcell.training.loss import response_loss
from virtualcell.training.schedule import lr_at

PAD = 0


def _tiny_lm(vocab: int = 40, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD)
    return LlamaForCausalLM(cfg).eval()


def _groups(rng: np.random.Generator, n_groups: int = 3, vocab: int = 40) -> list:
    groups = []
    for _ in range(n_groups):
        shared = rng.integers(1, vocab, size=int(rng.integers(2, 9))).tolist()
        pairs = [(rng.integers(1, vocab, size=int(rng.integers(1, 4))).tolist(),
                  rng.integers(1, vocab, size=int(rng.integers(1, 7))).tolist()) for _ in range(int(rng.integers(1, 4)))]
        groups.append((shared, pairs))
    return groups


def _reference_loss(lm, groups) -> torch.Tensor:  # noqa: ANN001
    """Each pair as one plain sequence (shared + own + response), HF forward, CE on the response tokens."""
    losses = []
    for shared, pairs in groups:
        for own, response in pairs:
            seq = torch.tensor([list(shared) + list(own) + list(response)])
            logits = lm(input_ids=seq).logits[0, :-1].float()
            target = seq[0, 1:].clone()
            target[: len(shared) + len(own) - 1] = -100
            losses.append(torch.nn.functional.cross_entropy(logits, target, reduction="none")[target != -100])
    return torch.cat(losses).mean()


def test_packed_loss_equals_the_plain_loss_of_each_pair():
    lm = _tiny_lm()
    rng = np.random.default_rng(0)
    for _ in range(3):
        groups = _groups(rng)
        ref = _reference_loss(lm, groups)
        packed = response_loss(lm, batching.pack(groups, PAD))[0]
        alone = response_loss(lm, batching.pack([(s, [p]) for s, ps in groups for p in ps], PAD))[0]
        assert torch.allclose(packed, ref, atol=1e-5), (packed, ref)
        assert torch.allclose(alone, ref, atol=1e-5)


def test_packed_gradients_equal_the_plain_gradients():
    groups = _groups(np.random.default_rng(1))
    grads = []
    for fn in (lambda m: _reference_loss(m, groups), lambda m: response_loss(m, batching.pack(groups, PAD))[0]):
        lm = _tiny_lm()
        lm.zero_grad()
        fn(lm).backward()
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def _reference_masked_loss(lm, groups, allowed: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
    """As _reference_loss, with generation's rules applied one response token at a time: only ``allowed`` tokens,
    never one the response already holds; each token's cross-entropy weighted by ``weight``."""
    losses, weights = [], []
    for shared, pairs in groups:
        for own, response in pairs:
            seq = torch.tensor([list(shared) + list(own) + list(response)])
            logits = lm(input_ids=seq).logits[0, :-1].float()
            start = len(shared) + len(own) - 1
            for i, token in enumerate(response):
                row = logits[start + i].masked_fill(~allowed, float("-inf"))
                if i:
                    row = row.masked_fill(torch.isin(torch.arange(row.numel()), torch.tensor(response[:i])),
                                          float("-inf"))
                losses.append(torch.nn.functional.cross_entropy(row[None], torch.tensor([token])))
                weights.append(weight[token])
    w = torch.stack(weights)
    return (torch.stack(losses) * w).sum() / w.sum()


def test_masked_weighted_loss_and_gradients_equal_the_plain_ones():
    """The gene-only and no-repeat masks and the token weights, applied to the packed batch at once, give each
    response token's loss and gradient as one plain sequence at a time does; a response that holds every allowed
    token (nothing left to write after it) leaves no NaN in the gradients."""
    vocab = 40
    allowed = torch.zeros(vocab, dtype=torch.bool)
    allowed[10:] = True
    weight = torch.linspace(0.5, 2.0, vocab)
    rng = np.random.default_rng(3)
    groups = []
    for _ in range(3):
        shared = rng.integers(1, vocab, size=4).tolist()
        pairs = [(rng.integers(1, vocab, size=2).tolist(), rng.choice(np.arange(10, vocab), size=int(k), replace=False).tolist())
                 for k in rng.integers(1, 8, size=3)]
        groups.append((shared, pairs))
    groups.append(([3, 4], [([5], list(range(10, vocab))), ([6], [12, 11])]))  # every allowed token, then a short one
    grads, losses = [], []
    for fn in (lambda m: _reference_masked_loss(m, groups, allowed, weight),
               lambda m: response_loss(m, batching.pack(groups, PAD), allowed=allowed, no_repeat=True, weight=weight)[0]):
        lm = _tiny_lm(vocab)
        lm.zero_grad()
        loss = fn(lm)
        loss.backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None]))
    assert torch.isfinite(losses[1]) and torch.isfinite(grads[1]).all()
    assert torch.allclose(losses[0], losses[1], atol=1e-5), losses
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def test_pack_without_shared_prompt_and_the_token_count():
    groups = [([], [([5], [6, 7, 8])]), ([], [([5, 9, 9], [3])])]
    b = batching.pack(groups, PAD)
    assert b.prefix_ids is None
    assert b.n_tokens == 4 + 4 and b.n_targets == 3 + 1
    assert b.targets[0].tolist() == [6, 7, 8, -100]
    assert b.targets[1].tolist() == [-100, -100, 3, -100]
    with pytest.raises(ValueError, match="cannot share a batch"):
        batching.pack([([1, 2], [([3], [4])]), ([], [([3], [4])])], PAD)


def test_masks_rule_out_forbidden_and_repeated_tokens():
    lm = _tiny_lm()
    groups = [([1, 2, 3], [([4], [10, 11, 10])])]  # the response repeats token 10
    allowed = torch.zeros(40, dtype=torch.bool)
    allowed[[10, 11, 12]] = True
    b = batching.pack(groups, PAD)
    assert torch.isinf(response_loss(lm, b, allowed=allowed, no_repeat=True)[0])  # a repeat gets no probability
    groups = [([1, 2, 3], [([4], [10, 11, 12])])]
    b = batching.pack(groups, PAD)
    free = response_loss(lm, b)[0]
    masked = response_loss(lm, b, allowed=allowed, no_repeat=True)[0]
    assert masked < free  # probability moves onto the allowed tokens
    # by hand: 3 allowed tokens; after 10 and 11 are written, only 12 is left (probability 1)
    logits = lm(input_ids=torch.tensor([[1, 2, 3, 4, 10, 11]])).logits[0, -3:].float()
    lp0 = torch.log_softmax(logits[0, [10, 11, 12]], 0)[0]
    lp1 = torch.log_softmax(logits[1, [11, 12]], 0)[0]
    assert torch.allclose(masked, -(lp0 + lp1 + 0.0) / 3, atol=1e-5)


def test_weighted_loss_is_the_weighted_mean_of_the_token_losses():
    lm = _tiny_lm()
    groups = _groups(np.random.default_rng(1))
    b = batching.pack(groups, PAD)
    plain = response_loss(lm, b)[0]
    assert torch.allclose(response_loss(lm, b, weight=torch.full((40,), 3.0))[0], plain, atol=1e-6)  # scale-free
    weight = torch.ones(40)
    weight[7] = 5.0
    per_token = []  # by hand, from the plain per-token losses
    for shared, pairs in groups:
        for own, response in pairs:
            seq = torch.tensor([list(shared) + list(own) + list(response)])
            logits = lm(input_ids=seq).logits[0, :-1].float()
            target = seq[0, 1:][len(shared) + len(own) - 1 :]
            ce = torch.nn.functional.cross_entropy(logits[len(shared) + len(own) - 1 :], target, reduction="none")
            per_token += list(zip(ce, weight[target]))
    want = sum(c * w for c, w in per_token) / sum(w for _, w in per_token)
    assert torch.allclose(response_loss(lm, b, weight=weight)[0], want, atol=1e-5)


def test_responsiveness_finds_the_genes_a_perturbation_moves_and_not_noise():
    from virtualcell.training.weights import responsiveness, token_weights

    rng = np.random.default_rng(0)
    n, genes = 600, 6
    labels = np.repeat(["control", "KO_A", "KO_B"], n // 3)
    contexts = np.tile(["c1", "c2"], n // 2)
    X = rng.normal(2.0, 0.5, size=(n, genes))
    X[labels == "KO_A", 1] -= 1.0  # A moves gene 1 in both contexts
    X[(labels == "KO_B") & (contexts == "c2"), 4] += 2.0  # B moves gene 4 in one context only
    X[contexts == "c2"] += 0.7  # a context offset is not a perturbation effect
    r = responsiveness(X, labels, contexts, labels == "control")
    assert r[1] > 0.4 and r[4] > 0.7
    assert np.all(r[[0, 2, 3, 5]] < 0.1)  # noise (and the context shift) give about nothing
    w = token_weights(r, np.array([10, 11, 12, 13, 14, 15]), 20, strength=1.0)
    assert w[11] > w[10] and w[14] > w[11] and w[0] == 1 and w[19] == 1
    assert torch.equal(token_weights(r, np.arange(6), 20, strength=0.0), torch.ones(20))
    with pytest.raises(ValueError, match="one entry per cell"):
        responsiveness(X, labels[:-1], contexts, labels == "control")


def test_response_weight_must_be_a_sane_strength():
    with pytest.raises(TrainingError, match="response_weight"):
        TrainConfig(response_weight=-1)
    with pytest.raises(TrainingError, match="keep_best must be True or False, got 'false'"):
        TrainConfig(keep_best="false")  # a string would read as true


def test_pair_schedule_is_deterministic_grouped_and_covers_each_pair_once():
    rng = np.random.default_rng(0)
    targets = np.arange(100, 197)
    sources = rng.integers(0, 12, size=targets.size)
    sched = batching.PairSchedule(targets, sources, batch_size=16, group_size=4, seed=3)
    assert sched.per_epoch == 6
    seen = np.concatenate([sched.at(k) for k in range(sched.per_epoch)])
    assert len(set(seen.tolist())) == seen.size == 96  # one epoch: no pair twice, the remainder dropped
    again = batching.PairSchedule(targets, sources, batch_size=16, group_size=4, seed=3)
    assert np.array_equal(again.at(7), sched.at(7)) and np.array_equal(again.at(2), sched.at(2))
    assert not np.array_equal(sched.at(0), sched.at(sched.per_epoch))  # a new epoch, a new order
    sizes = []
    for k in range(sched.per_epoch):
        for g in sched.groups(sched.at(k)):
            assert 1 <= g.size <= 4 and len(set(sources[g].tolist())) == 1
            sizes.append(g.size)
    assert np.mean(sizes) > 2  # sharing happens
    halves = [sched.at(1, rank=r, world=2) for r in (0, 1)]
    assert np.array_equal(np.concatenate(halves), sched.at(1))
    lone = batching.PairSchedule(targets, np.full(targets.size, -1), batch_size=16, group_size=4, seed=3)
    assert all(g.size == 1 for g in lone.groups(lone.at(0)))


def test_pair_schedule_cycles_through_draws_of_the_sources():
    """With several draws of the sources, epoch e uses draw e % draws: its groups share a source in that draw,
    and the draw a step uses is a pure function of the step (a resumed run pairs as the first did)."""
    rng = np.random.default_rng(1)
    targets = np.arange(64)
    draws = rng.integers(0, 8, size=(3, targets.size))
    sched = batching.PairSchedule(targets, draws, batch_size=16, group_size=4, seed=0)
    assert [sched.draw(k) for k in range(0, 13, 4)] == [0, 1, 2, 0]
    for k in range(12):
        for g in sched.groups(sched.at(k), k):
            assert len(set(draws[sched.draw(k)][g].tolist())) == 1
    assert np.array_equal(batching.PairSchedule(targets, draws[:1], batch_size=16, group_size=4, seed=0).at(2),
                          batching.PairSchedule(targets, draws[0], batch_size=16, group_size=4, seed=0).at(2))
    with pytest.raises(ValueError, match="one source per target"):
        batching.PairSchedule(targets, draws[:, :10], batch_size=16, group_size=4, seed=0)
    made = []
    lazy = batching.LazyDraws(3, lambda d: made.append(d) or draws[d])
    again = batching.PairSchedule(targets, lazy, batch_size=16, group_size=4, seed=0)
    assert made == [0] and np.array_equal(again.at(5), sched.at(5)) and made == [0, 1]  # a draw when first needed
    assert [again.groups(again.at(k), k) for k in (9, 1)] and made == [0, 1, 2]
    assert all(np.array_equal(a, b) for k in range(12)
               for a, b in zip(again.groups(again.at(k), k), sched.groups(sched.at(k), k)))
    assert made == [0, 1, 2]  # each made once
    with pytest.raises(ValueError, match="needs the step"):
        sched.groups(sched.at(0))


def test_learning_rate_schedule():
    assert lr_at(0, lr=1.0, warmup_steps=10, max_steps=100) == pytest.approx(0.1)
    assert lr_at(9, lr=1.0, warmup_steps=10, max_steps=100) == pytest.approx(1.0)
    assert lr_at(10, lr=1.0, warmup_steps=10, max_steps=100) == pytest.approx(1.0)
    assert lr_at(55, lr=1.0, warmup_steps=10, max_steps=100) == pytest.approx(0.55)
    assert lr_at(100, lr=1.0, warmup_steps=10, max_steps=100) == pytest.approx(0.1)
    # a spent time budget ends the decay early
    assert lr_at(20, lr=1.0, warmup_steps=10, max_steps=100, time_fraction=1.0) == pytest.approx(0.1)
    # a run shorter than its warm-up (--max-steps 30 beside the default 50) reached neither the peak nor the decay
    rates = [lr_at(s, lr=1.0, warmup_steps=50, max_steps=30) for s in range(31)]
    assert max(rates) == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    # ... or a time budget that gives fewer steps than the warm-up: half the budget ends the warm-up, then the rate
    # follows the time's decay, which a step past the warm-up finds too (no jump there)
    timed = [lr_at(s, lr=1.0, warmup_steps=50, max_steps=3000, time_fraction=(s + 1) / 20) for s in range(20)]
    assert timed[9] == pytest.approx(0.55) and timed[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(timed[9:], timed[10:]))
    for tf in (0.6, 0.75):
        assert lr_at(49, lr=1.0, warmup_steps=50, max_steps=200, time_fraction=tf) == pytest.approx(
            lr_at(50, lr=1.0, warmup_steps=50, max_steps=200, time_fraction=tf))
    with pytest.raises(TrainingError, match="warmup_steps must be >= 0"):
        TrainConfig(warmup_steps=-1)


def _state(step: int) -> dict:
    return {"model": {"w": torch.full((2,), float(step))}, "optimizer": {}, "step": step, "history": [], "pretrain_end": None}


def _write(folder):  # noqa: ANN001
    (folder / "model.txt").write_text("weights")


def test_checkpoint_round_trip_and_refuses_other_data(tmp_path):
    last = tmp_path / "last"
    assert checkpoint.load(last, data_hash="abc") is None
    checkpoint.save(last, _write, state=_state(5), run_config={"data_hash": "abc"})
    checkpoint.save(last, _write, state=_state(10), run_config={"data_hash": "abc"})
    assert checkpoint.load(last, data_hash="abc")["step"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]  # no temporary or previous folder left
    with pytest.raises(TrainingError, match="other data"):
        checkpoint.load(last, data_hash="xyz")


def test_a_kill_during_a_save_keeps_the_previous_checkpoint(tmp_path):
    last = tmp_path / "last"
    checkpoint.save(last, _write, state=_state(5), run_config={"data_hash": "abc"})

    def dies(folder):  # noqa: ANN001
        (folder / "model.txt").write_text("half")
        raise KeyboardInterrupt  # killed while writing the new checkpoint

    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(last, dies, state=_state(10), run_config={"data_hash": "abc"})
    assert checkpoint.load(last, data_hash="abc")["step"] == 5
    # the next save cleans up the half-written folder
    checkpoint.save(last, _write, state=_state(15), run_config={"data_hash": "abc"})
    assert checkpoint.load(last, data_hash="abc")["step"] == 15
    assert checkpoint.load(last, data_hash="abc")["step"] == 15
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]


def test_a_swap_cut_short_is_recovered_and_a_broken_checkpoint_names_restart(tmp_path):
    last = tmp_path / "last"
    checkpoint.save(last, _write, state=_state(5), run_config={"data_hash": "abc"})
    # a kill between the two renames of the swap leaves the good checkpoint under its old name
    last.rename(tmp_path / ".last.old")
    assert checkpoint.load(last, data_hash="abc")["step"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    (last / checkpoint.STATE_FILE).write_bytes(b"")  # 0 bytes, as an in-place write killed early left it (old code)
    with pytest.raises(TrainingError, match="--restart"):
        checkpoint.load(last, data_hash="abc")


def test_kernel_choice_sets_the_model_and_leaves_no_gradient():
    from virtualcell.training import kernels

    lm = _tiny_lm()
    b = batching.pack(_groups(np.random.default_rng(2)), PAD)
    before = torch.get_num_threads()
    k = kernels.choose(lm, torch.device("cpu"), lambda: response_loss(lm, b)[0], attention="eager", precision="fp32",
                       threads=1)
    assert k == kernels.Kernels("eager", "fp32", 1) and lm.config._attn_implementation == "eager"
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)
    k = kernels.choose(lm, torch.device("cpu"), lambda: response_loss(lm, b)[0])
    assert k.attention in kernels.ATTENTION and k.precision in kernels.PRECISION and k.threads >= 1
    assert lm.config._attn_implementation == k.attention and torch.get_num_threads() == k.threads
    torch.set_num_threads(before)
    assert all(p.grad is None for p in lm.parameters())
    with kernels.autocast(torch.device("cpu"), k.precision):
        loss = response_loss(lm, b)[0]
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="Unknown attention"):
        kernels.choose(lm, torch.device("cpu"), lambda: response_loss(lm, b)[0], attention="flash")


KILL_WORKER = r"""
import sys, numpy as np, virtualcell as vc
from virtualcell.train import TrainConfig, train
a = vc.datasets.load()
a = a[np.random.default_rng(0).choice(a.n_obs, 400, replace=False)].copy()
cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=int(sys.argv[2]), eval_every=1000,
                  save_every=1, batch_size=4, warmup_steps=2, seed=0, attention="sdpa", precision="fp32")
m = train(a, out=sys.argv[1], config=cfg, progress=False)
print("steps", m.train_config["steps"])
"""


@pytest.mark.slow
def test_training_killed_while_saving_resumes_from_the_last_good_checkpoint(tmp_path):
    """SIGKILL at random moments of a run that saves after every step; every rerun resumes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "worker.py"
    script.write_text(KILL_WORKER)
    out = tmp_path / "model"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rng = np.random.default_rng(0)
    steps_before = -1
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(out), "100000"], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while not (out / "last" / checkpoint.STATE_FILE).exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(float(rng.uniform(0.2, 1.5)))
        proc.send_signal(signal.SIGKILL)
        err = proc.communicate()[1]
        assert proc.returncode == -signal.SIGKILL, err[-2000:]
        state = checkpoint.load(out / "last", data_hash=_hash_of(out))
        assert state is not None and state["step"] >= steps_before  # never lost
        steps_before = state["step"]
    done = subprocess.run([sys.executable, str(script), str(out), str(steps_before + 3)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"steps {steps_before + 3}" in done.stdout
    assert not list(out.glob(".last.*"))  # no half-written or previous checkpoint left behind


def _hash_of(out):  # noqa: ANN001, ANN202
    import json

    for folder in (out / "last", out / ".last.previous"):
        if (folder / checkpoint.CONFIG_FILE).exists():
            return json.loads((folder / checkpoint.CONFIG_FILE).read_text())["data_hash"]
    raise AssertionError("no checkpoint config")


def test_vc_train_called_like_a_function_forwards_to_fit_with_a_warning():
    import virtualcell as vc

    with pytest.warns(DeprecationWarning, match="vc.fit"), pytest.raises(TypeError, match="out"):
        vc.train(vc.datasets.load()[:10])  # no out=: train's own signature answers
    assert vc.train.TrainConfig is vc.TrainConfig  # still the module namespace


def test_generic_condition_replaces_the_named_perturbation_of_drawn_pairs_only():
    """Pairs drawn for the generic condition read '<generic> <out>' instead of the perturbation; the draw
    is a pure function of (seed, step), about `fraction` of the perturbed pairs, never a control pair."""
    from virtualcell.perturbations import parse
    from virtualcell.prompts import GENERIC, CompactFormat, PerturbationVocab, build_gene_tokenizer

    genes = [f"G{i}" for i in range(12)]
    pv = PerturbationVocab({"G3": "ko:G3"})
    fmt = CompactFormat(build_gene_tokenizer(genes, pv), genes, pv)
    sentences = [np.array([i % 12, (i + 1) % 12, (i + 5) % 12]) for i in range(6)]
    perts = [parse("control"), parse("control"), parse("ko:G3"), parse("ko:G3"), parse("ko:G5"), parse("control")]
    sources = np.array([1, 0, 0, 0, 1, 0])
    plain = batching.pair_groups(fmt, [np.array([2, 3]), np.array([4])], sentences=sentences, sources=sources,
                                 perturbations=perts)
    mixed = batching.pair_groups(fmt, [np.array([2, 3]), np.array([4])], sentences=sentences, sources=sources,
                                 perturbations=perts, generic={3})
    generic = [fmt.token_id[GENERIC], fmt.out]
    assert fmt.generic_own() == generic
    assert mixed[0][1][0] == plain[0][1][0]  # target 2 keeps its name
    assert mixed[0][1][1] == (generic, plain[0][1][1][1])  # target 3: generic prompt, the same response
    assert mixed[1] == plain[1] and mixed[0][0] == plain[0][0]

    perturbed = np.array([i % 3 != 0 for i in range(3000)])
    targets = np.arange(3000)
    a = batching.generic_draw(targets, perturbed, fraction=0.15, seed=0, step=7)
    assert a == batching.generic_draw(targets, perturbed, fraction=0.15, seed=0, step=7)
    assert a != batching.generic_draw(targets, perturbed, fraction=0.15, seed=0, step=8)
    assert all(perturbed[t] for t in a) and 0.12 < len(a) / perturbed.sum() < 0.18
    assert batching.generic_draw(targets, perturbed, fraction=0.0, seed=0, step=7) == set()


def test_own_token_dropout_names_drawn_pairs_as_an_untrained_target_or_dose_is_named():
    """Pairs in ``plain`` are named without the trained target's or dose's own token (the form an untrained
    one gets), with the same response; the generic draw wins over it; a format without own tokens ignores it."""
    from virtualcell.perturbations import parse
    from virtualcell.prompts import CompactFormat, PerturbationVocab, build_gene_tokenizer, name_token, own_dose_name

    genes = [f"G{i}" for i in range(12)]
    dosed = parse("drug:dA@10")
    names = {"drug": ["dA"], "cytokine": [], "label": [], "target": ["G3"], "dose": [own_dose_name(dosed)]}
    pv = PerturbationVocab({"G3": "ko:G3", "dA": "drug:dA"}, names, own_targets=True, own_doses=True,
                           targets_with_gene=True)
    fmt = CompactFormat(build_gene_tokenizer(genes, pv), genes, pv)
    ko, own_ko, own_dose = fmt.token_id["G3"], fmt.token_id[name_token("target", "G3")], fmt.token_id[name_token("dose", own_dose_name(dosed))]
    assert fmt.suffix(parse("ko:G3"))[-3:] == [ko, own_ko, fmt.out]
    assert fmt.plain_own(parse("ko:G3"))[-2:] == [ko, fmt.out]  # the gene alone, as for an untrained target
    assert own_dose in fmt.suffix(dosed) and own_dose not in fmt.plain_own(dosed)
    assert fmt.plain_own(dosed) == [t for t in fmt.suffix(dosed) if t != own_dose]  # the shared dose token alone
    sentences = [np.array([i % 12, (i + 1) % 12, (i + 5) % 12]) for i in range(4)]
    perts = [parse("control"), parse("ko:G3"), parse("ko:G3"), dosed]
    sources = np.zeros(4, dtype=int)
    kw = dict(sentences=sentences, sources=sources, perturbations=perts)
    named = batching.pair_groups(fmt, [np.array([1, 2, 3])], **kw)
    mixed = batching.pair_groups(fmt, [np.array([1, 2, 3])], plain={2, 3}, generic={3}, **kw)
    assert mixed[0][1][0] == named[0][1][0]  # target 1: named in full
    assert mixed[0][1][1] == (fmt.plain_own(perts[2]), named[0][1][1][1])  # target 2: plain, same response
    assert mixed[0][1][2][0] == fmt.generic_own()  # target 3: drawn for both, generic wins
    gene_only = PerturbationVocab({"G3": "ko:G3"})
    assert CompactFormat(build_gene_tokenizer(genes, gene_only), genes, gene_only).plain_own(parse("ko:G3")) is None


def test_thread_guard_drops_to_one_thread_when_steps_slow_down_and_not_before():
    from virtualcell.generation import torch_threads
    from virtualcell.training.kernels import ThreadGuard

    with torch_threads(2):
        g = ThreadGuard(2, slowdown=4.0, window=10)
        steps = [0.1] * 10 + [0.1, 0.1, 0.1, 0.1, 0.9] * 6  # a few slow steps (checkpoints, a blip) move no median
        assert not any(g.observe(i, s, True) for i, s in enumerate(steps))
        assert g.observe(30, 0.5, False) is False  # a new phase starts a new reference
        fired = [i for i in range(31, 80) if g.observe(i, 0.1 if i < 41 else 0.6, False)]
        assert fired == [fired[0]] and 41 < fired[0] < 60 and g.fell_back_at == fired[0]
        assert torch.get_num_threads() == 1 and g.threads == 1
        assert not g.observe(90, 5.0, False)  # once only
    assert not ThreadGuard(1).observe(0, 9.0)  # one thread: nothing to drop


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile on a CPU needs a C++ compiler (the fallback without one is tested below)")
def test_compiled_layers_give_the_plain_loss_and_gradients_and_undo_cleanly():
    from virtualcell.training import kernels

    lm = _tiny_lm(layers=1).train()  # one layer: compiling costs ~30 s a layer on a cold 2-core machine
    lm.set_attn_implementation("eager")
    b = batching.pack(_groups(np.random.default_rng(5)), PAD)
    plain = response_loss(lm, b)[0]
    plain.backward()
    grads = [p.grad.clone() for p in lm.parameters()]
    lm.zero_grad(set_to_none=True)
    seconds = kernels.compile_layers(lm, lambda: response_loss(lm, b)[0].backward())
    assert seconds is not None and all(p.grad is None for p in lm.parameters())  # the probe leaves no gradient
    assert all(layer._compiled_call_impl is not None for layer in kernels.decoder_layers(lm))
    compiled = response_loss(lm, b)[0]
    compiled.backward()
    assert torch.allclose(compiled, plain, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(lm.parameters(), grads))
    kernels.uncompile_layers(lm)
    assert all(layer._compiled_call_impl is None for layer in kernels.decoder_layers(lm))


def test_a_compiler_failure_leaves_the_layers_plain_with_a_warning(caplog):
    from virtualcell.training import kernels

    lm = _tiny_lm()

    def broken() -> None:
        raise RuntimeError("no C++ compiler found")

    with caplog.at_level("WARNING"):
        assert kernels.compile_layers(lm, broken) is None
    assert all(layer._compiled_call_impl is None for layer in kernels.decoder_layers(lm))
    assert "compiling the model failed (RuntimeError: no C++ compiler found)" in caplog.text


def test_auto_compiles_only_runs_long_enough_to_repay_it(monkeypatch):
    from virtualcell.train import TrainConfig, _compile
    from virtualcell.training import kernels

    lm = _tiny_lm().train()
    b = batching.pack(_groups(np.random.default_rng(6)), PAD)
    calls = []
    monkeypatch.setattr(kernels, "compile_layers", lambda lm, probe: calls.append(probe) or 1.0)
    loss_of = lambda batch: response_loss(lm, batch)  # noqa: E731
    cpu = torch.device("cpu")
    assert _compile(lm, TrainConfig(max_steps=10), cpu, None, b, loss_of=loss_of) is None  # seconds of steps: not worth it
    assert _compile(lm, TrainConfig(max_steps=10**9), cpu, 60.0, b, loss_of=loss_of) is None  # a 1-minute budget caps it
    assert _compile(lm, TrainConfig(max_steps=10**9), torch.device("meta"), None, b, loss_of=loss_of) is None  # not a CPU
    assert not calls
    assert _compile(lm, TrainConfig(max_steps=10**9), cpu, None, b, loss_of=loss_of) == 1.0
    assert _compile(lm, TrainConfig(max_steps=1, compile="on"), cpu, None, b, loss_of=loss_of) == 1.0
    assert _compile(lm, TrainConfig(max_steps=10**9, compile="off"), cpu, None, b, loss_of=loss_of) is None
    assert len(calls) == 2 and all(p.grad is None for p in lm.parameters())
    with pytest.raises(TrainingError, match="compile='fast'"):
        TrainConfig(compile="fast")


def test_pca_gene_embeddings_put_co_expressed_genes_together():
    from virtualcell.training.embeddings import init_gene_embeddings, pca_directions

    rng = np.random.default_rng(0)
    n = 400
    a, b = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))  # two programs of 5 genes each, and 2 quiet genes
    X = np.hstack([a + 0.1 * rng.normal(size=(n, 5)), b + 0.1 * rng.normal(size=(n, 5)), 0.01 * rng.normal(size=(n, 2))])
    d = pca_directions(X, 4, seed=0)
    assert d.shape == (12, 4) and d.dtype == np.float32
    assert np.array_equal(d, pca_directions(X, 4, seed=0))  # seeded
    cos = (d / np.linalg.norm(d, axis=1, keepdims=True)) @ (d / np.linalg.norm(d, axis=1, keepdims=True)).T
    assert cos[:5, :5].min() > 0.9 and cos[5:10, 5:10].min() > 0.9 and np.abs(cos[:5, 5:10]).max() < 0.3
    norms = np.linalg.norm(d, axis=1)
    assert norms[:10].min() > 0.4 and norms[10:].max() < 0.1  # genes that barely vary stay near zero
    lm = _tiny_lm(vocab=40)
    before = lm.get_input_embeddings().weight.detach().clone()
    ids = np.arange(20, 32)
    init_gene_embeddings(lm, ids, d)
    after = lm.get_input_embeddings().weight.detach()
    assert torch.equal(after[:20], before[:20]) and torch.equal(after[ids, 4:], before[ids, 4:])  # only the genes' first k
    assert torch.allclose(after[ids, :4], torch.from_numpy(d) * 0.02 * 2)
    with pytest.raises(ValueError, match="at least 2 cells"):
        pca_directions(X[:1], 4)


def _shifted_screen(seed: int = 0):
    """Two contexts; controls in two states (half high on genes 10-19); a knockout that raises
    genes 0-9 by 60% in every cell; an off-target knockout with no effect. Raw counts."""
    import anndata as ad
    import pandas as pd

    rng = np.random.default_rng(seed)
    rows, obs = [], []
    for ctx in ("a", "b"):
        for label, n in (("control", 160), ("KO1", 60), ("KO2", 40)):
            lam = np.full((n, 40), 2.0)
            lam[: n // 2, 10:20] = 8.0  # a cell state that every label has
            if label == "KO1":
                lam[:, :10] *= 1.6
            rows.append(rng.poisson(lam))
            obs += [{"perturbation": label, "ctx": ctx}] * n
    a = ad.AnnData(np.vstack(rows).astype(np.float32), obs=pd.DataFrame(obs, index=[f"c{i}" for i in range(len(obs))]))
    a.var_names = [f"G{i}" for i in range(40)]
    return a


def test_ot_pairing_keeps_the_whole_effect_and_pairs_within_the_context():
    """ot: sources are controls of the target's context (never the cell itself), a fair draw (a
    perturbation with fewer cells than controls gets distinct sources), so mean(target - source)
    is the perturbation's whole effect; nearest pairs shrink it (the nearest controls are the
    ones that already look perturbed). Deterministic by seed."""
    from virtualcell import DataContract
    from virtualcell.train import build_pairs

    a = _shifted_screen()
    c = DataContract("perturbation", "control", context_key="ctx")
    X = a.X
    labels, ctx = a.obs["perturbation"].to_numpy(), a.obs["ctx"].to_numpy()
    ko = labels == "KO1"
    true = (X[ko].mean(0) - X[labels == "control"].mean(0))[:10].mean()
    shrink = {}
    for method in ("ot", "nearest", "random"):
        src, tgt = build_pairs(a, c, pairing=method, seed=3)
        assert (tgt == np.arange(a.n_obs)).all()
        assert (labels[src] == "control").all() and (ctx[src] == ctx).all() and (src != tgt).all()
        shrink[method] = (X[ko] - X[src[ko]]).mean(0)[:10].mean() / true
        if method == "ot":
            for cx in ("a", "b"):
                for lab in ("KO1", "KO2"):
                    m = (labels == lab) & (ctx == cx)
                    assert np.unique(src[m]).size == m.sum()  # fewer cells than controls: a draw without repeats
            assert (build_pairs(a, c, pairing="ot", seed=3)[0] == src).all()
            # the embedding kept by one draw and reused by the next gives the pairs made without it
            kept: dict = {}
            for d in (0, 1):
                assert (build_pairs(a, c, pairing="ot", seed=3, draw=d, embedded=kept)[0]
                        == build_pairs(a, c, pairing="ot", seed=3, draw=d)[0]).all()
            assert sorted(k[0] for k in kept) == ["a", "b"]
            # kept for those cells and settings only: other settings or other cells make their own
            assert (build_pairs(a, c, pairing="ot", seed=3, n_pcs=2, embedded=kept)[0]
                    == build_pairs(a, c, pairing="ot", seed=3, n_pcs=2)[0]).all()
            half = a[::2].copy()
            assert (build_pairs(half, c, pairing="ot", seed=3, embedded=kept)[0]
                    == build_pairs(half, c, pairing="ot", seed=3)[0]).all()
            assert not (build_pairs(a, c, pairing="ot", seed=4)[0] == src).all()
    assert 0.9 < shrink["ot"] < 1.1 and 0.9 < shrink["random"] < 1.1
    # the nearest controls of KO1's cells are the controls whose genes 0-9 happen to be highest
    assert shrink["nearest"] < shrink["ot"] - 0.08, shrink  # about 0.8 against 1.0


def test_ot_pairing_draws_differ_and_stay_fair():
    """draw > 0: other sources, still controls of the target's context (never itself), still a fair sample of
    them (the whole effect kept); a perturbation with as many cells as controls (one fixed matching at draw 0)
    gets other sources too. draw 0 is the default's pairing."""
    from virtualcell import DataContract
    from virtualcell.train import TrainConfig, build_pairs

    a = _shifted_screen()
    c = DataContract("perturbation", "control", context_key="ctx")
    X, labels, ctx = a.X, a.obs["perturbation"].to_numpy(), a.obs["ctx"].to_numpy()
    first = build_pairs(a, c, seed=3)[0]
    assert (build_pairs(a, c, seed=3, draw=0)[0] == first).all()
    ko = labels == "KO1"
    true = (X[ko].mean(0) - X[labels == "control"].mean(0))[:10].mean()
    for d in (1, 2):
        src = build_pairs(a, c, seed=3, draw=d)[0]
        assert (labels[src] == "control").all() and (ctx[src] == ctx).all() and (src != np.arange(a.n_obs)).all()
        assert (src != first).mean() > 0.3
        assert 0.85 < (X[ko] - X[src[ko]]).mean(0)[:10].mean() / true < 1.15
    even = a[(labels == "control") | ((labels == "KO1") & (ctx == "a"))].copy()  # 160 controls beside 60 KO1 in "a"
    even = even[np.r_[np.flatnonzero(even.obs["ctx"] == "a")[:60], np.flatnonzero(even.obs["perturbation"] == "KO1"),
                      np.flatnonzero(even.obs["ctx"] == "b")]].copy()
    ko_even = (even.obs["perturbation"] == "KO1").to_numpy()
    assert (build_pairs(even, c, seed=0)[0] == build_pairs(even, c, seed=1)[0])[ko_even].all()  # one matching
    assert (build_pairs(even, c, seed=0, draw=1)[0] != build_pairs(even, c, seed=0)[0])[ko_even].mean() > 0.3
    with pytest.raises(TrainingError, match="pair_draws"):
        TrainConfig(pair_draws=0)


def test_scarce_controls_are_trained_again_unless_control_copies_is_off():
    """A control share above what the controls give (0.8 asks 800 control pairs beside 200 perturbed cells; there
    are 320 controls): with control_copies on the training control pairs come again up to that share; off (the
    default since session 52) each trains once. Either way every perturbed cell is a target once and validation has
    no copies. A run recorded before the option existed trained the copies, and its record rebuilds so."""
    from dataclasses import asdict, replace

    from virtualcell import DataContract
    from virtualcell.train import TrainConfig, _pair_split

    a = _shifted_screen()
    c = DataContract("perturbation", "control", context_key="ctx")
    is_ctrl = (a.obs["perturbation"] == "control").to_numpy()
    cfg = TrainConfig(control_fraction=0.8, seed=2)
    split = {copies: _pair_split(a, c, replace(cfg, control_copies=copies), np.zeros(a.n_obs, int))
             for copies in (True, False)}
    for train_t, val_t in split.values():
        assert np.unique(val_t).size == val_t.size and not np.isin(val_t, train_t).any()
        targets = np.concatenate([train_t, val_t])
        assert np.sort(targets[~is_ctrl[targets]]).tolist() == np.flatnonzero(~is_ctrl).tolist()
    (copied, val), (once, val_once) = split[True], split[False]
    assert (val == val_once).all()  # the same split: only the copies differ
    ctrl_copied, ctrl_once = copied[is_ctrl[copied]], once[is_ctrl[once]]
    assert np.unique(ctrl_once).size == ctrl_once.size == (is_ctrl.sum() - is_ctrl[val].sum())
    assert ctrl_copied.size > 2 * ctrl_once.size and set(ctrl_copied) == set(ctrl_once)
    with pytest.raises(TrainingError, match="control_copies"):
        TrainConfig(control_copies="no")
    assert not TrainConfig().control_copies
    record = {k: v for k, v in asdict(cfg).items() if k != "control_copies"} | {"data_hash": "x"}
    assert TrainConfig.from_record(record) == replace(cfg, control_copies=True)
    assert TrainConfig.from_record(asdict(cfg)) == cfg


def test_ot_pairing_matches_like_to_like():
    """Within the draw, the assignment pairs a cell with a control of its own state: the cells
    high on genes 10-19 get mostly high sources (a random pairing gets half)."""
    from virtualcell import DataContract
    from virtualcell.train import build_pairs

    a = _shifted_screen()
    c = DataContract("perturbation", "control", context_key="ctx")
    high = a.X[:, 10:20].mean(1) > 5
    knock = a.obs["perturbation"].to_numpy() != "control"
    for method, lo in (("ot", 0.7), ("random", 0.3)):
        src, _ = build_pairs(a, c, pairing=method, seed=0)
        agree = (high[src] == high)[knock].mean()
        assert agree > lo, (method, agree)
    assert (high[build_pairs(a, c, pairing="random", seed=0)[0]] == high)[knock].mean() < 0.65


def test_unknown_pairing_is_refused_with_the_choices():
    from virtualcell.errors import TrainingError
    from virtualcell.train import TrainConfig

    with pytest.raises(TrainingError, match="pairing='knn'.*ot.*nearest.*random"):
        TrainConfig(pairing="knn")


def test_own_target_tokens_name_trained_targets_apart_from_their_genes(papalexi_small):
    """With target_tokens="own" a trained knockout's target is written with a token of its own, not the gene token
    that cell sentences use (naming it then does not read as the gene being there); an untrained target is refused
    with the way out, and the choice survives the checkpoint's perturbation vocabulary."""
    from virtualcell.contract import DataContract
    from virtualcell.errors import PerturbationError
    from virtualcell.perturbations import parse
    from virtualcell.prompts import CompactFormat, PerturbationVocab, build_gene_tokenizer, name_token
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    contract = DataContract.from_adata(papalexi_small)
    genes = Vocabulary.from_adata(papalexi_small)
    trained = sorted({p for p in contract.labels(papalexi_small) if p != contract.control and p.upper() in genes})
    assert "STAT1" in trained
    untrained = next(g for g in genes.genes if g not in trained)

    def tokens(mode: str, target: str) -> tuple[list[int], dict[str, int]]:
        _, vocab = typed_labels(papalexi_small, contract, genes, TrainConfig(kind="knockout", target_tokens=mode))
        vocab = PerturbationVocab.from_dict(vocab.to_dict())  # as a checkpoint reads it back
        tok = build_gene_tokenizer(genes.genes, vocab)
        fmt = CompactFormat(tok, genes.genes, vocab)
        return fmt.perturbation_tokens(parse(f"ko:{target}")), fmt.token_id

    own, ids = tokens("own", "STAT1")
    assert own[-1] == ids[name_token("target", "STAT1")] != ids["STAT1"]
    gene, ids = tokens("gene", "STAT1")
    assert gene[-1] == ids["STAT1"] and name_token("target", "STAT1") not in ids
    assert tokens("gene", untrained)[0][-1] == tokens("gene", untrained)[1][untrained]  # any gene can be targeted
    with pytest.raises(PerturbationError, match="--target-tokens gene"):
        tokens("own", untrained)
    both, ids = tokens("both", "STAT1")  # the gene's token, then the target's own
    assert both[-2:] == [ids["STAT1"], ids[name_token("target", "STAT1")]]
    lone, ids = tokens("both", untrained)  # an untrained target: the gene's token alone, not refused
    assert lone[-1] == ids[untrained] and name_token("target", untrained) not in ids
    with pytest.raises(TrainingError, match="target_tokens"):
        TrainConfig(target_tokens="shared")


def test_singles_written_with_the_control_read_as_their_gene_as_gears_writes_them(caplog):
    """GEARS-processed screens write a single 'KLF1+ctrl' (control 'ctrl'): it trained as the pair of KLF1 and a gene
    named CTRL (or a plain label 'ctrl'), never linked to the pairs' KLF1. It reads as KLF1 now, saying so; written
    with '_' ('KLF1_ctrl'), it is named by the joined-labels warning, and scPerturb's kind 'CRISPR-cas9' is a knockout."""
    import anndata as ad
    import pandas as pd

    from virtualcell.contract import DataContract
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    labels = ["ctrl"] * 4 + ["KLF1+ctrl"] * 3 + ["ctrl+MAP2K6"] * 3 + ["KLF1+MAP2K6"] * 3 + ["CEBPE_ctrl"] * 3
    a = ad.AnnData(np.ones((len(labels), 3), dtype=np.float32),
                   obs=pd.DataFrame({"perturbation": labels, "kind": ["CRISPR-cas9"] * len(labels)},
                                    index=[str(i) for i in range(len(labels))]),
                   var=pd.DataFrame(index=["KLF1", "MAP2K6", "GATA1"]))
    contract = DataContract("perturbation", "ctrl")
    with caplog.at_level("INFO"):
        typed, vocab = typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig(kind="activation"))
    assert vocab.labels["KLF1+ctrl"] == "act:KLF1" and vocab.labels["ctrl+MAP2K6"] == "act:MAP2K6"
    assert vocab.labels["KLF1+MAP2K6"] == "act:KLF1 + act:MAP2K6"
    assert "2 labels name the control as a part ('KLF1+ctrl', 'ctrl+MAP2K6')" in caplog.text
    assert "labels join genes or other labels with '_' or '|' ('CEBPE_ctrl')" in caplog.text
    _, by_kind = typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig(kind_key="kind"), warn=False)
    assert by_kind.labels["KLF1+ctrl"] == "ko:KLF1"
    # a single never trained on is named as the screen names its singles, so evaluate finds its measured cells
    from virtualcell.perturbations import parse
    from virtualcell.prompts import PerturbationVocab

    gears = PerturbationVocab({"KLF1+ctrl": "act:KLF1", "MAP2K6+ctrl": "act:MAP2K6"})
    assert gears.labels_for([parse("act:CEBPE"), parse("act:KLF1")]) == ["CEBPE+ctrl", "KLF1+ctrl"]
    # and a pair as the screen joins its singles' names ('TF04+ctrl+TF05+ctrl' found no measured pair); one with a
    # target never trained on too (it was typed, 'act:CEBPE + act:KLF1', where the measured pair is 'CEBPE+KLF1')
    assert gears.labels_for([parse("act:KLF1 + act:MAP2K6"), parse("act:KLF1 + act:CEBPE")]) == [
        "KLF1+MAP2K6", "CEBPE+KLF1"]
    nt = PerturbationVocab({"KLF1+NT": "act:KLF1", "MAP2K6+NT": "act:MAP2K6"})  # the data's own control label
    assert nt.labels_for([parse("act:KLF1 + act:CEBPE"), parse("act:CEBPE")]) == ["CEBPE+KLF1", "CEBPE+NT"]
    assert PerturbationVocab({"KLF1": "act:KLF1"}).labels_for([parse("act:CEBPE")]) == ["CEBPE"]


def test_labels_that_train_but_hardly_as_meant_are_named(caplog):
    """A drug with a dose in some cells and none in others, and pairs joined by '_' instead of '+', train (they may
    be meant), but the run says so, naming them and the fix; 'A|B' as a gene is refused with how pairs are written."""
    import anndata as ad
    import pandas as pd

    from virtualcell.contract import DataContract
    from virtualcell.errors import DataError, PerturbationError
    from virtualcell.perturbations import parse
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig, typed_labels

    labels = ["control"] * 4 + ["drugA"] * 6 + ["KLF1_MAP2K6"] * 2 + ["KLF1"] * 2 + ["NT_2"] * 2 + ["KLF1_KNOCKOUT"] * 3
    dose = [""] * 4 + ["1uM", "1uM", "1uM", "10uM", "", "nan"] + [""] * 9
    a = ad.AnnData(np.ones((len(labels), 3), dtype=np.float32),
                   obs=pd.DataFrame({"perturbation": labels, "dose": dose}, index=[str(i) for i in range(len(labels))]),
                   var=pd.DataFrame(index=["KLF1", "MAP2K6", "GATA1"]))
    contract = DataContract("perturbation", "control", dose_key="dose")
    with caplog.at_level("WARNING"):
        typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig())
    assert "2 cells of 'drugA' have no dose in obs['dose']" in caplog.text and "its other 4 cells" in caplog.text
    assert "1 labels join genes or other labels with '_' or '|' ('KLF1_MAP2K6')" in caplog.text
    assert "NT_2" not in caplog.text.split("join genes")[1]  # a guide's number is not a gene
    assert "KLF1_KNOCKOUT" not in caplog.text  # nor what was done to a gene (the words prompts' hint reads too)
    assert "3 perturbations have fewer than 3 cells ('KLF1', 'KLF1_MAP2K6', 'NT_2')" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # a second control under another label, not named as one
        typed_labels(a, DataContract("perturbation", "NT_1"), Vocabulary.from_adata(a), TrainConfig())
    assert "labels look like control labels ('NT_2'" in caplog.text and "--control NT_1,NT_2" in caplog.text
    caplog.clear()
    a.obs["perturbation"] = [x.lower() if x == "KLF1" and i % 2 else x for i, x in enumerate(labels)]
    with pytest.raises(DataError, match=r"'KLF1' and 'klf1' are ko:KLF1"):  # half of KLF1's cells as 'klf1': one knockout
        typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig())
    a.obs["perturbation"] = [x.lower() if x == "NT_2" and i % 2 else x for i, x in enumerate(labels)]
    with caplog.at_level("WARNING"):  # plain labels in two cases stay two perturbations, and that is said
        typed_labels(a, contract, Vocabulary.from_adata(a), TrainConfig())
    assert "1 perturbation is named in more than one case ('NT_2 / nt_2')" in caplog.text
    a.obs["perturbation"] = labels
    with pytest.raises(PerturbationError, match=r"combination is written with '\+' \('KLF1\+MAP2K6'\)"):
        parse("act:KLF1|MAP2K6")
    caplog.clear()  # a knockout time course: a gene outside the panel, given a time and no dose, reads as a drug
    a.obs["time"] = ["" if x == "control" else "24h" for x in labels]
    a.obs["perturbation"] = ["IRF1" if x == "drugA" else x for x in labels]
    with caplog.at_level("WARNING"):
        typed, _ = typed_labels(a, DataContract("perturbation", "control", time_key="time"),
                                Vocabulary.from_adata(a), TrainConfig())
    assert "1 labels that look like gene symbols ('IRF1') are read as drugs" in caplog.text
    assert "--kind knockout" in caplog.text  # (KLF1, a gene of the panel, stays a knockout: the list is IRF1 alone)
    caplog.clear()  # a dose column that gives no cell a dose: most likely the wrong column
    a.obs["empty"] = [""] * a.n_obs
    with caplog.at_level("WARNING"):
        typed_labels(a, DataContract("perturbation", "control", dose_key="empty"), Vocabulary.from_adata(a),
                     TrainConfig())
    assert "obs['empty'], named as the dose column, gives no perturbed cell a dose" in caplog.text


# --------------------------------------------------------------------------- the weights of the lowest validation loss
def test_the_loop_keeps_the_weights_of_the_lowest_validation_loss():
    import time
    from types import SimpleNamespace

    from virtualcell.training import loop

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    scripted = iter([3.0, 2.0, 2.5, 2.2])  # validation losses at steps 2, 4, 6, 8: lowest at step 4
    seen = {}

    def validate() -> float:
        seen[len(seen)] = {k: v.clone() for k, v in net.state_dict().items()}
        return next(scripted)

    best = loop.BestWeights()
    state = loop.fit(net, opt, batch_at=lambda step, pre: SimpleNamespace(n_tokens=16),
                     loss_of=lambda b: (((net(x) - y) ** 2).mean(), 16), validate=validate,
                     checkpoint=lambda st: None, state=loop.LoopState(),
                     budget=loop.Budget(8, 0, 0.0, None, time.perf_counter()), lr=0.1, warmup_steps=0,
                     eval_every=2, save_every=100, progress=False, best=best)
    assert state.step == 8 and best.step == 4 and best.val_loss == 2.0
    for k, v in best.state.items():  # the copy is the weights at step 4, untouched by the later steps
        torch.testing.assert_close(v, seen[1][k])
        assert not torch.equal(v, net.state_dict()[k])
    best.restore(net)
    torch.testing.assert_close(net.state_dict()["weight"], seen[1]["weight"])
    # through a checkpoint and back; a record without the weights starts over when weights are wanted
    again = loop.BestWeights.from_dict(best.to_dict())
    assert again.step == 4 and again.state is not None
    light = loop.BestWeights(keep_state=False)
    assert light.observe(3, 1.0, net) and light.state is None and light.step == 3
    assert loop.BestWeights.from_dict(light.to_dict()).step == 0
    assert not light.observe(5, float("nan"), net) and light.step == 3


def test_a_run_ends_on_its_best_weights_only_when_asked_and_warns_of_a_rise(caplog):
    from types import SimpleNamespace

    from virtualcell.train import TrainConfig, _end_on_best
    from virtualcell.training import loop

    net = torch.nn.Linear(3, 1)
    best = loop.BestWeights()
    best.observe(4, 2.0, net)
    at_best = {k: v.clone() for k, v in net.state_dict().items()}

    def run(keep: bool, final: float):
        with torch.no_grad():
            net.weight.add_(1.0)  # the later steps moved the weights
        model, run_config = SimpleNamespace(lm=net, train_config={}), {}
        caplog.clear()
        with caplog.at_level("WARNING"):
            _end_on_best(model, best, loop.LoopState(8, [{"step": 8, "val_loss": final}]), TrainConfig(keep_best=keep),
                         run_config)
        return model, caplog.text

    model, text = run(True, 2.5)
    assert model.train_config == {"best_val": {"step": 4, "val_loss": 2.0}, "kept_step": 4} and not text
    torch.testing.assert_close(net.state_dict()["weight"], at_best["weight"])
    model, text = run(False, 2.5)  # not asked: the last weights stay, and the rise is reported
    assert "kept_step" not in model.train_config and not torch.equal(net.state_dict()["weight"], at_best["weight"])
    assert "lowest at step 4 (2.0000) and ends at 2.5000 at step 8: the run may overfit" in text and "compare the validation verdict" in text
    assert not run(False, 2.01)[1]  # within 1% of the lowest: no warning


def test_keep_best_saves_the_kept_weights_and_the_last_for_resuming(papalexi_small, tmp_path):
    import virtualcell as vc
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=20, hidden_size=32, n_layers=1, n_heads=2, max_steps=12, eval_every=2, save_every=100,
                      batch_size=8, warmup_steps=0, lr=0.05, seed=0, verdict_fraction=0.0, keep_best=True)
    model = train(papalexi_small, out=tmp_path / "m", config=cfg, progress=False)
    saved = vc.C2SModel.load(tmp_path / "m").lm.state_dict()
    last = torch.load(tmp_path / "m" / "last" / checkpoint.STATE_FILE, weights_only=False)
    assert last["best"]["step"] == model.train_config["best_val"]["step"]
    for k, v in last["best"]["state"].items():  # the model is the lowest validation loss's weights...
        torch.testing.assert_close(saved[k], v)
    # ... and the checkpoint a longer run resumes from holds the last step's
    assert last["step"] == 12 and (model.train_config.get("kept_step") is None) == (last["best"]["step"] == 12)


def test_blas_threads_holds_numpys_pools_and_gives_them_back():
    """--threads must hold numpy's BLAS too: OMP_NUM_THREADS set after numpy loaded changes nothing, and two runs
    at 1 torch thread each then busy-waited on each other's BLAS threads (a gene map's SVDs took minutes)."""
    import os

    from threadpoolctl import threadpool_info

    from virtualcell.generation import blas_threads

    def blas() -> list[int]:
        return [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]

    before = blas()
    with blas_threads(1):
        assert blas() and set(blas()) == {1}
    assert blas() == before
    with blas_threads(None):
        assert blas() == before
    if (os.cpu_count() or 1) > 1 and "OMP_NUM_THREADS" not in os.environ:
        assert max(before) > 1  # the pool the context manager must hold (CI's 2 cores)


def test_the_loop_reads_the_agreed_clock_and_hands_gradients_to_average():
    """Under a multi-process launch the loop asks ``budget.agree`` for every time reading and stops when the
    agreed share is spent (another process further along stops this one too), and hands each step's loss and
    target count to ``average`` before clipping, recording the loss it returns."""
    import time
    from types import SimpleNamespace

    from virtualcell.training import loop

    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    asked, averaged = [], []

    def agree(f: float) -> float:  # the other process: past its budget once this one has asked 6 times
        asked.append(f)
        return 2.0 if len(asked) > 6 else f

    def average(loss: float, n: float, tokens: float) -> tuple[float, float]:
        assert net.weight.grad is not None  # after backward, before the update
        averaged.append((n, tokens))
        return 42.0, 2 * tokens  # the whole batch: two processes' shares

    state = loop.fit(net, opt, batch_at=lambda step, pre: SimpleNamespace(n_tokens=16),
                     loss_of=lambda b: (((net(x) - y) ** 2).mean(), 16), validate=lambda: 1.0,
                     checkpoint=lambda st: None, state=loop.LoopState(),
                     budget=loop.Budget(1000, 0, 0.0, 3600.0, time.perf_counter(), agree=agree), lr=0.1,
                     warmup_steps=0, eval_every=100, save_every=1000, progress=False, average=average)
    # two readings a step (its start, its end) and one more after the first (the agreed "budget too small"): the
    # 7th, at step 3's end, says time is up
    assert state.step == 3 and len(asked) == 7 and all(f < 0.01 for f in asked[:6])
    assert averaged == [(16, 16)] * 3 and {h["loss"] for h in state.history} == {42.0}
    # the job's throughput, not this process's share of it
    last = state.history[-1]
    assert last["tokens_per_s"] * last["elapsed_s"] == pytest.approx(2 * 16 * 3, rel=0.5)


def _step_batches(rank: int = 0, world: int = 1, generic: float = 0.3) -> batching.StepBatches:
    from virtualcell.perturbations import parse
    from virtualcell.prompts import CompactFormat, PerturbationVocab, build_gene_tokenizer

    genes = [f"G{i}" for i in range(12)]
    pv = PerturbationVocab({"G3": "ko:G3"})
    fmt = CompactFormat(build_gene_tokenizer(genes, pv), genes, pv)
    n = 60
    rng = np.random.default_rng(0)
    sentences = [rng.permutation(12)[:4] for _ in range(n)]
    perts = [parse("control") if i % 4 == 0 else parse("ko:G3") for i in range(n)]
    sources = np.where(np.arange(n) % 4 == 0, np.arange(n), (np.arange(n) // 8) * 4)  # controls pair with themselves
    targets = np.arange(n)
    draws = batching.LazyDraws(1, lambda d: sources)
    return batching.StepBatches(
        fmt, sentences, draws, perts, np.array([i % 4 != 0 for i in range(n)]),
        pairs=batching.PairSchedule(targets, draws.derived(lambda s: s[targets]), batch_size=16, group_size=4, seed=0),
        lone=batching.PairSchedule(targets, np.full(n, -1), batch_size=16, group_size=1, seed=0, salt=1),
        seed=0, generic_fraction=generic, rank=rank, world=world)


def test_step_batches_shares_of_two_processes_make_the_one_process_batch():
    """Each process's share of a step, put together in rank order, holds the one-process batch's pairs with the same
    prompts (the generic draws are made over the whole step); the batch of a step is the same every time it is asked
    for; pre-training steps hold lone sentences; validation batches name every pair as it is."""
    from virtualcell.prompts import GENERIC

    def segments(groups) -> list:  # noqa: ANN001
        return [(tuple(shared), tuple(own), tuple(resp)) for shared, pairs in groups for own, resp in pairs]

    one, shares = _step_batches(), [_step_batches(r, 2) for r in range(2)]
    generic_seen = 0
    for step in (0, 1, 5, 9):
        whole = segments(one.groups_at(step))
        assert len(whole) == 16
        assert whole == segments(shares[0].groups_at(step)) + segments(shares[1].groups_at(step))
        assert whole == segments(_step_batches().groups_at(step))  # a pure function of the step
        generic_seen += sum(own[0] == one.fmt.token_id[GENERIC] for _, own, _ in whole)
        b = one.at(step)
        assert b.n_targets == sum(len(resp) for _, _, resp in whole)
    assert generic_seen > 0
    assert all(len(p) == 1 and len(p[0][0]) == 1 for _, p in one.groups_at(0, pretrain=True))  # lone sentences
    chunks = batching.validation_chunks(np.arange(60), one.sources[0], batch_size=16, group_size=4)
    assert sorted(int(t) for b in chunks for c in b for t in c) == list(range(60))
    assert all(len(set(one.sources[0][c])) == 1 and len(c) <= 4 for b in chunks for c in b)
    assert not any(own[0] == one.fmt.token_id[GENERIC] for _, own, _ in segments(one.groups(chunks[0])))
    assert _step_batches(generic=0.0).of(chunks[0]).n_targets == one.of(chunks[0]).n_targets


def test_validation_loss_weighs_batches_by_their_targets_in_eval_mode_and_shares_them_out():
    from virtualcell.training.loop import validation_loss

    module = torch.nn.Linear(2, 2)
    module.train()
    modes = []

    def loss_of(b):  # noqa: ANN001, ANN202
        modes.append((module.training, torch.is_grad_enabled()))
        return torch.tensor(b[0]), b[1]

    batches = [lambda: (2.0, 1), lambda: (4.0, 3)]
    assert validation_loss(module, loss_of, batches) == pytest.approx(3.5)  # (2 * 1 + 4 * 3) / 4
    assert modes == [(False, False)] * 2 and module.training
    assert validation_loss(module, loss_of, batches, mine=lambda i: i == 0) == pytest.approx(2.0)
    # another process's share, summed in: [loss sum, count] of batch 1 added to this one's batch 0
    assert validation_loss(module, loss_of, batches, mine=lambda i: i == 0,
                           total=lambda v: v + np.array([12.0, 3.0])) == pytest.approx(3.5)
    assert np.isnan(validation_loss(module, loss_of, []))


def test_objective_is_the_response_loss_with_the_runs_rules_and_weights():
    from virtualcell.training.loss import Objective

    lm = _tiny_lm()
    batch = batching.pack(_groups(np.random.default_rng(3)), PAD)
    allowed = torch.ones(40, dtype=torch.bool)
    allowed[:5] = False
    weight = torch.linspace(0.5, 2.0, 40)
    objective = Objective(lm, "cpu", allowed=allowed, weight=weight)
    loss, n = objective(batch)
    ref, ref_n = response_loss(lm, batch, allowed=allowed, no_repeat=True, weight=weight)
    assert float(loss.detach()) == pytest.approx(float(ref.detach())) and n == pytest.approx(ref_n)
    plain, count = objective(batch, weighted=False)
    ref, ref_n = response_loss(lm, batch, allowed=allowed, no_repeat=True)
    assert float(plain.detach()) == pytest.approx(float(ref.detach())) and count == ref_n == batch.n_targets
    assert float(Objective(lm)(batch)[0].detach()) == pytest.approx(float(response_loss(lm, batch)[0].detach()))


def test_resume_loads_the_checkpoint_and_refuses_one_with_other_extras(tmp_path):
    from virtualcell.training import loop

    last = tmp_path / "last"
    lm = _tiny_lm(seed=1)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    assert checkpoint.resume(last, data_hash="abc", module=lm, optimizer=opt, extras=[], keep_best=False) is None
    best = loop.BestWeights(3, 1.5, None, keep_state=False)
    checkpoint.save(last, _write, run_config={"data_hash": "abc"},
                    state={"model": lm.state_dict(), "optimizer": opt.state_dict(), "step": 7,
                           "history": [{"step": 7}], "pretrain_end": 2, "best": best.to_dict()})
    fresh = _tiny_lm(seed=2)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state, kept = checkpoint.resume(last, data_hash="abc", module=fresh, optimizer=opt2, extras=[], keep_best=False)
    assert (state.step, state.history, state.pretrain_end) == (7, [{"step": 7}], 2)
    assert (kept.step, kept.val_loss) == (3, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(lm.state_dict().values(), fresh.state_dict().values()))
    with pytest.raises(TrainingError, match="without a token-bias table"):
        checkpoint.resume(last, data_hash="abc", module=fresh, optimizer=opt2, keep_best=False,
                          extras=[("virtualcell_token_bias", True, "a token-bias table", "--no-token-bias")])
    other = torch.optim.AdamW(fresh.parameters(), lr=1e-3, weight_decay=0.5)
    with pytest.raises(TrainingError, match="weight decay"):
        checkpoint.resume(last, data_hash="abc", module=fresh, optimizer=other, extras=[], keep_best=False)


def _fit_linear(state, budget, phases):  # noqa: ANN001, ANN202
    """Loop ``state`` on under ``budget`` with a linear model, noting each step's (step, pre-training?)."""
    from types import SimpleNamespace

    from virtualcell.training import loop

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)

    def batch_at(step: int, pre: bool):  # noqa: ANN202
        phases.append((step, pre))
        return SimpleNamespace(n_tokens=16)

    return loop.fit(net, opt, batch_at=batch_at, loss_of=lambda b: (((net(x) - y) ** 2).mean(), 16),
                    validate=lambda: 1.0, checkpoint=lambda st: None, state=state, budget=budget, lr=0.1,
                    warmup_steps=0, eval_every=100, save_every=1000, progress=False)


def test_a_resumed_run_with_more_steps_does_not_go_back_to_pretraining():
    """Pre-training's end was recomputed from the new --max-steps (10% of 400 = 40), so a 20-step run resumed to 400
    trained lone sentences again for steps 20-39; the end is now recorded when it comes."""
    import time

    from virtualcell.training import loop

    state = _fit_linear(loop.LoopState(), loop.Budget(20, 2, 0.1, None, time.perf_counter()), [])
    assert state.pretrain_end == 2
    phases = []
    _fit_linear(state, loop.Budget(400, 40, 0.1, None, time.perf_counter()), phases)
    assert phases[0][0] == 20 and not any(pre for _, pre in phases)


def test_a_resumed_time_budget_counts_the_time_spent_before():
    """A --max-minutes run resumed started its budget (and its learning-rate decay) over: a 24 s run killed at 17 s
    trained 24 s more from the peak rate. The earlier seconds now count (Budget.before); with the budget spent, no
    step is taken."""
    import time

    from virtualcell.training import loop

    state = _fit_linear(loop.LoopState(5, [{"step": 5, "lr": 0.05}]),
                        loop.Budget(1000, 0, 0.0, 10.0, time.perf_counter(), before=7.0), [])
    assert state.step > 5 and state.history[1]["lr"] < 0.06  # the decay 70% of the way, not the peak rate 0.1
    assert state.history[1]["elapsed_s"] >= 7.0
    spent = loop.LoopState(5, [{"step": 5}])
    assert _fit_linear(spent, loop.Budget(1000, 0, 0.0, 10.0, time.perf_counter(), before=11.0), []).step == 5


def test_pretraining_leaves_out_the_validation_targets_and_a_pair_cap_is_said(papalexi_small, caplog):
    """Pre-training wrote every training cell's sentence, the validation loss's targets too (88 of 88 in a 3,000-step
    run), so that loss (keep_best, the overfitting warning) scored sentences already fitted whole. And max_pairs
    dropped cells without a word."""
    import logging
    from dataclasses import replace

    from virtualcell import DataContract
    from virtualcell.train import TrainConfig, _pair_split, _prepare, lone_schedule, with_learning_rate

    contract = DataContract.from_adata(papalexi_small)
    cfg = with_learning_rate(TrainConfig(top_k=30, batch_size=16, seed=0), None)
    cells = _prepare(papalexi_small, contract, cfg)
    lone = lone_schedule(cells, cfg)
    written = lone.targets[np.concatenate([lone.at(s) for s in range(2 * lone.per_epoch)])]  # two epochs
    assert cells.val_targets.size and not np.isin(cells.val_targets, written).any()
    assert sorted(lone.targets) == sorted(set(range(cells.data.n_obs)) - set(cells.val_targets))
    with caplog.at_level(logging.WARNING, logger="virtualcell.train"):
        _pair_split(cells.data, contract, replace(cfg, max_pairs=100), cells.sources[0])
    assert "max_pairs is 100" in caplog.text


def test_a_diverging_run_stops_instead_of_saving_a_broken_model(papalexi_small, tmp_path):
    """lr=1e4 (a typo for 1e-4): the loss went NaN, the run saved NaN weights, and its verdict called the model
    (which predicted no change at all) better than the baselines. It stops naming the learning rate; a learning rate
    that is no finite number is refused before training."""
    from virtualcell.errors import TrainingError
    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=20, hidden_size=16, n_layers=1, n_heads=2, max_steps=8, eval_every=4, save_every=4,
                      batch_size=8, warmup_steps=1, seed=0, lr=1e4, attention="eager", precision="fp32", threads=1)
    with pytest.raises(TrainingError, match=r"The training loss is (nan|inf) at step \d+: the run diverged.*--lr"):
        train(papalexi_small[::4].copy(), out=tmp_path / "m", config=cfg, progress=False)
    assert not (tmp_path / "m" / "model.safetensors").exists()
    for lr in (float("inf"), float("nan")):
        with pytest.raises(TrainingError, match="lr must be > 0"):
            TrainConfig(lr=lr)


def test_training_leaves_the_callers_random_state_alone(papalexi_small, tmp_path, capfd):
    """train() reseeded the caller's global torch generator with its own seed (a user's later torch.rand changed
    with the training seed); the model's initial weights are the seed's under the caller's state untouched. A quiet
    run prints no bar of transformers' either (its 'Writing model shards' came through progress=False)."""
    from transformers.utils import logging as hf_logging

    from virtualcell.train import TrainConfig, train

    cfg = TrainConfig(top_k=20, hidden_size=16, n_layers=1, n_heads=2, max_steps=1, eval_every=1, save_every=1,
                      batch_size=8, warmup_steps=1, seed=0, attention="eager", precision="fp32", threads=1)
    torch.manual_seed(123)
    want = torch.rand(1)
    torch.manual_seed(123)
    capfd.readouterr()
    train(papalexi_small[::4].copy(), out=tmp_path / "m", config=cfg, progress=False)
    assert torch.equal(torch.rand(1), want)
    assert "model shards" not in capfd.readouterr().err
    assert hf_logging.is_progress_bar_enabled()  # as it was


def test_a_budget_too_small_names_the_minutes_given_and_the_verdicts_share():
    """The refusal named the training's share of --max-minutes as if it were the whole (--max-minutes 1 was
    reported as 0.5 when the verdict kept half)."""
    import time
    from types import SimpleNamespace

    from virtualcell.training import loop

    net = torch.nn.Linear(3, 1)
    x, y = torch.randn(16, 3), torch.randn(16, 1)
    with pytest.raises(TrainingError, match=r"--max-minutes 1 \(60\.0 s, of which 30\.0 s are kept for the "
                                            r"validation verdict\) is too small: setting up took 9[0-9]\.\d s"):
        loop.fit(net, torch.optim.SGD(net.parameters(), lr=0.1), batch_at=lambda s, p: SimpleNamespace(n_tokens=16),
                 loss_of=lambda b: (((net(x) - y) ** 2).mean(), 16), validate=lambda: 1.0,
                 checkpoint=lambda st: None, state=loop.LoopState(),
                 budget=loop.Budget(1000, 0, 0.0, 30.0, time.perf_counter() - 90.0, reserved=30.0), lr=0.1,
                 warmup_steps=0, eval_every=100, save_every=1000, progress=False)


def test_labels_that_cannot_be_names_are_refused_before_training(papalexi_small):
    """A label with spaces, or with ';' (a screen's files join lists of labels with it: 'IRF1;v2' came back from
    vc.screen.load as two labels), is refused naming the fix."""
    from virtualcell.contract import DataContract
    from virtualcell.errors import DataError
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig
    from virtualcell.training.labels import typed_labels

    contract = DataContract.from_adata(papalexi_small)
    genes = Vocabulary.from_adata(papalexi_small)
    for bad, match in (("IRF1;v2", r"hold ';' \('IRF1;v2'\).*str\.replace"), ("IRF1 KO", "hold spaces")):
        cells = papalexi_small[:200].copy()
        labels = cells.obs["perturbation"].astype(str).to_numpy()
        labels[labels == "IRF1"] = bad
        cells.obs["perturbation"] = labels
        if bad not in set(labels):
            cells.obs.iloc[-1, cells.obs.columns.get_loc("perturbation")] = bad
        with pytest.raises(DataError, match=match):
            typed_labels(cells, contract, genes, TrainConfig())


def test_labels_that_would_read_as_something_else_are_refused_or_kept_as_written(papalexi_small, caplog):
    """Each label trains as the perturbation it names, or is refused by name before training:
    'None' and 'ctrl' trained as the control prompt while counted as perturbed (now plain labels, written 'label:None'
    so that they read back as themselves); 'IL-2:high' (no kind) is a plain label and 'drug:5-FU' the drug it writes;
    'STAT1+' trained as STAT1 merged with its cells, and 'STAT1' beside 'stat1' merged under a warning saying the
    opposite, then failed when training ended: both refused; an Ensembl id without its version suffix names the
    panel's gene as the panel spells it; a label holding ',' trains with a warning that the command line cannot list
    it."""
    from virtualcell.contract import DataContract
    from virtualcell.errors import DataError
    from virtualcell.perturbations import Perturbation, parse
    from virtualcell.sentences import Vocabulary
    from virtualcell.train import TrainConfig
    from virtualcell.training.labels import typed_labels

    contract = DataContract.from_adata(papalexi_small)
    cells = papalexi_small[:200].copy()
    labels = cells.obs["perturbation"].astype(str).to_numpy()
    perturbed = np.flatnonzero(labels != contract.control)

    def relabel(new):
        out = cells.copy()
        values = labels.copy()
        values[perturbed[: len(new) * 3]] = np.repeat(new, 3)
        out.obs["perturbation"] = values
        return out

    genes = Vocabulary.from_adata(cells)
    with caplog.at_level("WARNING"):
        typed, vocab = typed_labels(relabel(["None", "ctrl", "IL-2:high", "drug:5-FU", "anti-CD3,CD28"]), contract,
                                    genes, TrainConfig())
    assert {k: vocab.labels[k] for k in ("None", "ctrl", "IL-2:high", "drug:5-FU", "anti-CD3,CD28")} == {
        "None": "label:None", "ctrl": "label:ctrl", "IL-2:high": "label:IL-2:high", "drug:5-FU": "drug:5-FU",
        "anti-CD3,CD28": "anti-CD3,CD28"}
    assert parse(str(Perturbation("label", "None"))) == Perturbation("label", "None")
    assert vocab.resolve("None") == Perturbation("label", "None")
    assert "hold ','" in caplog.text and "panel file" in caplog.text
    for new, match in ((["STAT1+"], r"empty part around '\+' \('STAT1\+'\)"), ([""], "are empty"),
                       (["STAT1", "stat1"], r"'STAT1' and 'stat1' are ko:STAT1.*one way"),
                       (["A:B@3", "drug:X@10uM"], r"cannot be written so that they read back.*'A:B@3', 'drug:X@10uM'")):
        with pytest.raises(DataError, match=match):
            typed_labels(relabel(new), contract, genes, TrainConfig())
    typed, vocab = typed_labels(relabel(["(+)-JQ1", "(+)-JQ1+STAT1"]), contract, genes, TrainConfig())
    assert vocab.labels["(+)-JQ1"] == "(+)-JQ1"  # one compound (sci-Plex's), not '(' and ')-JQ1' as a pair
    assert [q.target for q in parse(vocab.labels["(+)-JQ1+STAT1"]).parts] == ["(+)-JQ1", "STAT1"]  # a pair of two
    versioned = cells.copy()
    versioned.var_names = ["ENSG00000115415.20" if g == "STAT1" else g for g in versioned.var_names]
    typed, vocab = typed_labels(relabel(["ENSG00000115415"]), contract, Vocabulary.from_adata(versioned),
                                TrainConfig())
    assert vocab.labels["ENSG00000115415"] == "ko:ENSG00000115415.20"


def test_a_checkpoint_that_read_labels_otherwise_is_not_resumed_and_warns_when_loaded(tiny_model, tmp_path, caplog):
    """A version before 'None' trained as a plain label read it as the control prompt: a resume would train those
    cells two ways (refused, naming the label), and loading such a checkpoint says what it serves."""
    import json
    import shutil

    from virtualcell.errors import TrainingError
    from virtualcell.model import META_FILE, C2SModel
    from virtualcell.training.checkpoint import same_labels

    _, folder, _ = tiny_model
    old = tmp_path / "old"
    shutil.copytree(folder, old)
    meta = json.loads((old / META_FILE).read_text())
    meta["perturbations"]["labels"]["None"] = "control"
    (old / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(TrainingError, match=r"'None': control there, label:None here.*--restart"):
        same_labels(old, {"None": "label:None", "STAT1": meta["perturbations"]["labels"]["STAT1"]})
    same_labels(old, {"STAT1": meta["perturbations"]["labels"]["STAT1"]})  # the labels both read alike: fine
    with caplog.at_level("WARNING"):
        C2SModel.load(old)
    assert "trained the perturbation label 'None' as the control prompt" in caplog.text
