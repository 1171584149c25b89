"""Local steps touch exactly the factors a method trains; mixing touches exactly the ones it mixes."""

from __future__ import annotations

import copy
import dataclasses
import threading

import numpy as np
import pytest
import torch

from conftest import TINY_TRAIN, sentence_pairs, tiny_spec
from tadlora.adapter import TINY_CONFIG, AdapterModel
from tadlora.core.factors import Factor, factor_of
from tadlora.core.methods import make_method
from tadlora.core.mixing import mh_matrix
from tadlora.core.topology import make_topology
from tadlora.data import TextDataset
from tadlora.sim.config import ALL_METHODS
from tadlora.sim.engine import SequentialEngine
from tadlora.sim.rounds import mix_round
from tadlora.training import (
    DROPOUT_STREAM,
    Interrupted,
    TrainSpec,
    autocast,
    cpu_has_bf16,
    device_name,
    encode,
    evaluate,
    local_steps,
    model_inputs,
    precision_warning,
    round_batches,
    seeded_rng,
)


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[Factor]:
    return {factor_of(k) for k in before if not torch.equal(before[k], after[k])}


def test_round_batches_are_deterministic_and_cover_the_shard() -> None:
    a = round_batches(0, 3, 7, n=10, batch_size=4, steps=3)
    assert [x.tolist() for x in a] == [x.tolist() for x in round_batches(0, 3, 7, 10, 4, 3)]
    assert sorted(np.concatenate(a)[:10].tolist()) == list(range(10))
    assert [x.tolist() for x in a] != [x.tolist() for x in round_batches(0, 3, 8, 10, 4, 3)]


def test_encoding_pads_on_the_right_and_a_left_padding_tokenizer_is_refused(tiny_model, sst2_small) -> None:
    data = sst2_small.subset(np.arange(4))
    enc = encode(tiny_model.tokenizer, data, 32)
    assert enc.attention_mask[:, 0].all() and not enc.attention_mask[:, -1].any()  # short sentences, padded right
    left = copy.deepcopy(tiny_model.tokenizer)
    left.padding_side = "left"
    with pytest.raises(ValueError, match="pads on the left"):
        encode(left, data, 32)


def test_a_max_length_past_the_model_s_positions_is_refused_and_one_up_to_them_evaluates(tiny_model) -> None:
    """tiny has 256 positions (its tokenizer, MiniLM's, says 512): a longer --max-length would fail in the first
    forward pass on a long text, as a shape error that names neither."""
    limit = TINY_CONFIG["max_position_embeddings"]
    long = TextDataset("long", (" ".join(["word"] * 1000), "short"), None, np.array([0, 1]), ("no", "yes"))
    with pytest.raises(ValueError, match=f"max_length {limit + 1} .* {limit} "):
        encode(tiny_model.tokenizer, long, limit + 1)
    accuracy, _ = evaluate(tiny_model, encode(tiny_model.tokenizer, long, limit))
    assert 0.0 <= accuracy <= 1.0


def test_a_batch_cut_wider_keeps_the_tokenizer_s_padding_and_a_width_that_cuts_real_tokens_is_refused(
    tiny_model, sst2_small
) -> None:
    tokenizer = copy.deepcopy(tiny_model.tokenizer)
    tokenizer.pad_token = tokenizer.unk_token  # a pad id other than 0
    enc = encode(tokenizer, sst2_small.subset(np.arange(4)), 32)
    narrow = enc.batch([0, 1], torch.device("cpu"))
    real = enc.width([0, 1])
    assert narrow["input_ids"].shape[1] == real
    wide = enc.batch([0, 1], torch.device("cpu"), width=real + 3)
    assert torch.equal(wide["input_ids"][:, :real], narrow["input_ids"])
    assert (wide["input_ids"][:, real:] == tokenizer.pad_token_id).all() and not wide["attention_mask"][:, real:].any()
    for width in (real - 1, 33):
        with pytest.raises(ValueError, match=f"to width {width}"):
            enc.batch([0, 1], torch.device("cpu"), width=width)


def test_a_frozen_factor_and_the_base_do_not_change_during_local_steps(tiny_shards) -> None:
    model = AdapterModel(tiny_spec())
    base_before = {n: p.clone() for n, p in model.model.named_parameters() if ".lora_" not in n}
    before = model.factors()
    local_steps(model, tiny_shards[0], frozenset({Factor.B}), TINY_TRAIN, seed=0, shard=0, t=0)
    mid = model.factors()
    assert changed(before, mid) == {Factor.B}
    local_steps(model, tiny_shards[0], frozenset({Factor.A}), TINY_TRAIN, seed=0, shard=0, t=1)
    assert changed(mid, model.factors()) == {Factor.A}
    for n, p in model.model.named_parameters():
        if ".lora_" not in n:
            assert torch.equal(p, base_before[n]), n


@pytest.mark.parametrize("name", ALL_METHODS)
def test_each_method_trains_and_mixes_exactly_its_factors(name: str, tiny_model, tiny_shards, tiny_dev) -> None:
    method = make_method(name, 2) if name in ("tad", "adf", "tad-nojoint") else make_method(name)
    engine = SequentialEngine(tiny_model, tiny_shards, tiny_dev, TINY_TRAIN, seed=0)
    initial = [engine.get_factors(i) for i in range(4)]
    assert all(torch.equal(initial[0][k], s[k]) for s in initial for k in s)  # all clients start identical
    topology = make_topology("complete", 4)  # every client has neighbours, so mixed factors must move
    for t in range(4):
        before = [engine.get_factors(i) for i in range(4)]
        engine.train_round(t, method.trained(t))
        trained = [engine.get_factors(i) for i in range(4)]
        for i in range(4):
            got = changed(before[i], trained[i])
            if t == 0 and method.trained(t) == {Factor.A, Factor.B}:
                # with B = 0 the first step gives A no gradient; B must move, A may move from step 2 on
                assert Factor.B in got
            else:
                assert got == method.trained(t), (name, t, got)
        mixed, _ = mix_round(method, t, topology, trained)
        w = mh_matrix(topology.adjacency(t))
        for i in range(4):
            for key in trained[i]:
                if method.product_mixing:
                    continue  # DeCAF's refactorisation is checked against the SVD in test_mixing
                if factor_of(key) in method.mixed(t):
                    expected = sum(w[i, j] * trained[j][key].double() for j in range(4))
                    torch.testing.assert_close(mixed[i][key].double(), expected, atol=1e-6, rtol=1e-6)
                else:
                    assert torch.equal(mixed[i][key], trained[i][key]), (name, t, key)
            engine.set_factors(i, mixed[i])


def test_precision_bf16_autocasts_on_the_cpu_and_auto_does_only_on_cuda() -> None:
    layer, x = torch.nn.Linear(4, 4), torch.ones(2, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert layer(x).dtype == torch.bfloat16
    for precision in ("auto", "fp32"):
        with autocast(torch.device("cpu"), precision):
            assert layer(x).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        TrainSpec(precision="fp16")


AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu sse2 avx avx2 fma\n"
WITH_BF16 = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16\n"


def test_a_device_is_named_by_its_model_where_the_machine_says_it(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    xeon = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\nflags\t\t: avx2\n"
    assert device_name(cpu, xeon) == "cpu: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert device_name(cpu, AVX2_ONLY) == "cpu"  # no model name line (an ARM board's cpuinfo may lack one)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_name(torch.device("cuda:1")) == "cuda:1: NVIDIA H100 80GB HBM3"


def test_bf16_on_a_cpu_without_native_bf16_is_warned_about_and_nothing_else_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # a GPU with native bf16
    assert cpu_has_bf16(AVX2_ONLY) is False
    assert cpu_has_bf16(WITH_BF16) is True
    assert cpu_has_bf16("processor\t: 0\n") is None  # no flags line: cannot tell, so no warning
    warning = precision_warning("bf16", cpu, AVX2_ONLY)
    assert warning is not None and "--precision auto" in warning and "avx512_bf16" in warning
    assert precision_warning("bf16", cpu, WITH_BF16) is None
    assert precision_warning("bf16", cpu, "") is None
    for precision in ("auto", "fp32"):
        assert precision_warning(precision, cpu, AVX2_ONLY) is None
    assert precision_warning("bf16", cuda, AVX2_ONLY) is None  # the GPU's bf16 does not depend on the CPU's


def test_bf16_local_steps_keep_fp32_factors_and_stay_close_to_fp32(tiny_shards) -> None:
    updates = {}
    for precision in ("fp32", "bf16"):
        model = AdapterModel(tiny_spec())
        before = model.factors()
        spec = TrainSpec(local_steps=2, batch_size=4, max_length=32, lr=1e-2, precision=precision)
        local_steps(model, tiny_shards[0], frozenset({Factor.A, Factor.B}), spec, seed=0, shard=0, t=0)
        after = model.factors()
        assert all(v.dtype == torch.float32 for v in after.values())
        updates[precision] = torch.cat([(after[k] - before[k]).flatten() for k in before])
    distance = float((updates["bf16"] - updates["fp32"]).norm() / updates["fp32"].norm())
    assert 0 < distance < 0.25  # another computation (the flag is live), the same step up to rounding


def test_sgd_steps_follow_the_gradient_and_adamw_first_steps_are_sign_steps(tiny_shards) -> None:
    """One local step from the same point: plain SGD's update is linear in lr (it is −lr·grad), AdamW's is
    about lr on every coordinate with a gradient, whatever the gradient's size (why the setting exists)."""

    def one_step(optimizer: str, lr: float) -> torch.Tensor:
        model = AdapterModel(tiny_spec())
        before = model.factors()
        spec = TrainSpec(local_steps=1, batch_size=4, max_length=32, lr=lr, optimizer=optimizer)
        local_steps(model, tiny_shards[0], frozenset({Factor.B}), spec, seed=0, shard=0, t=0)
        after = model.factors()
        return torch.cat([(after[k] - before[k]).flatten() for k in before if factor_of(k) is Factor.B])

    sgd, sgd2 = one_step("sgd", 0.1), one_step("sgd", 0.2)
    torch.testing.assert_close(sgd2, 2 * sgd, rtol=1e-4, atol=1e-9)
    assert float(sgd.abs().max() / sgd.abs()[sgd != 0].min()) > 100  # the gradients' sizes span decades
    moved = sgd.abs() > 1e-6  # |grad| > 1e-5: far above AdamW's eps (1e-8), so its step is ~lr there
    assert moved.sum() > 100
    adamw = one_step("adamw", 1e-3)[moved]
    assert float((adamw.abs() - 1e-3).abs().max()) < 1e-5  # every coordinate by lr, the gradients' sizes gone
    assert torch.equal(torch.sign(adamw), torch.sign(sgd[moved]))  # in the same direction as SGD
    with pytest.raises(ValueError, match="optimizer"):
        TrainSpec(optimizer="adam")


def test_persistent_optimizer_state_continues_one_adamw_across_rounds(tiny_shards) -> None:
    """Two rounds with persistent state take exactly the steps of ONE AdamW run over both rounds' batches (a
    reference written here from torch's AdamW), and a fresh state does not: the setting is live."""
    spec = dataclasses.replace(TINY_TRAIN, optimizer_state="persistent")
    shard, both = tiny_shards[0], frozenset({Factor.A, Factor.B})

    model = AdapterModel(tiny_spec())
    state: dict[str, torch.Tensor] = {}
    for t in (0, 1):
        local_steps(model, shard, both, spec, seed=0, shard=0, t=t, state=state)
    got = model.factors()

    ref = AdapterModel(tiny_spec())
    params = ref.set_trainable(both)
    optimizer = torch.optim.AdamW(params, lr=spec.lr, weight_decay=spec.weight_decay)
    ref.model.train()
    for t in (0, 1):
        with seeded_rng(ref.device, 0, 0, t, DROPOUT_STREAM):
            for indices in round_batches(0, 0, t, len(shard), spec.batch_size, spec.local_steps):
                batch = shard.batch(indices, ref.device)
                logits = ref.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                optimizer.zero_grad(set_to_none=True)
                torch.nn.functional.cross_entropy(logits, batch["labels"]).backward()
                optimizer.step()
    want = ref.factors()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    assert {float(v) for k, v in state.items() if k.endswith("/step")} == {2.0 * spec.local_steps}

    fresh = AdapterModel(tiny_spec())
    for t in (0, 1):
        local_steps(fresh, shard, both, TINY_TRAIN, seed=0, shard=0, t=t)
    assert any(not torch.equal(fresh.factors()[k], got[k]) for k in got)


def test_persistent_state_keeps_the_frozen_factors_entries_and_an_interrupted_round_leaves_it(tiny_shards) -> None:
    spec = dataclasses.replace(TINY_TRAIN, optimizer_state="persistent")
    model = AdapterModel(tiny_spec())
    state: dict[str, torch.Tensor] = {}
    local_steps(model, tiny_shards[0], frozenset({Factor.B}), spec, seed=0, shard=0, t=0, state=state)
    assert state and all(factor_of(k.rsplit("/", 1)[0]) is Factor.B for k in state)
    after_b = {k: v.clone() for k, v in state.items()}
    local_steps(model, tiny_shards[0], frozenset({Factor.A}), spec, seed=0, shard=0, t=1, state=state)
    for key, value in after_b.items():  # B's moments wait, untouched, for B's next turn
        assert torch.equal(state[key], value)
    assert {factor_of(k.rsplit("/", 1)[0]) for k in state} == {Factor.A, Factor.B}
    before = {k: v.clone() for k, v in state.items()}
    stop = threading.Event()
    stop.set()
    with pytest.raises(Interrupted):
        local_steps(model, tiny_shards[0], frozenset({Factor.B}), spec, seed=0, shard=0, t=2, stop=stop, state=state)
    assert state.keys() == before.keys() and all(torch.equal(state[k], before[k]) for k in state)
    with pytest.raises(ValueError, match="no state was passed"):
        local_steps(model, tiny_shards[0], frozenset({Factor.B}), spec, seed=0, shard=0, t=3)
    with pytest.raises(ValueError, match="needs adamw"):
        TrainSpec(optimizer="sgd", optimizer_state="persistent")
    with pytest.raises(ValueError, match="optimizer_state"):
        TrainSpec(optimizer_state="kept")


def test_dropout_masks_are_a_function_of_seed_shard_and_round(tiny_shards, monkeypatch) -> None:
    """A resumed or shared simulator cell, and a daemon, draw the masks the uninterrupted run drew."""
    from conftest import TINY_LORA
    from tadlora import training
    from tadlora.adapter import ModelSpec

    model = AdapterModel(ModelSpec(model="tiny", lora=dataclasses.replace(TINY_LORA, dropout=0.5), seed=0))
    init = model.factors()

    def run(t: int, shard: int = 0, seed: int = 0) -> dict[str, torch.Tensor]:
        model.load_factors(init)
        local_steps(model, tiny_shards[0], frozenset({Factor.A, Factor.B}), TINY_TRAIN, seed=seed, shard=shard, t=t)
        return model.factors()

    first = run(0)
    torch.rand(1000)  # the process's RNG stream moves on, as other cells or rounds would move it
    state = torch.get_rng_state()
    again = run(0)
    assert torch.equal(torch.get_rng_state(), state)  # and the stream outside local steps is left alone
    assert all(torch.equal(first[k], again[k]) for k in first)
    # Each part of the key draws other masks: with every run's batches held to those of (seed 0, shard 0, round 0),
    # only the masks can differ (the tiny base has no dropout of its own).
    batches = training.round_batches
    monkeypatch.setattr(training, "round_batches", lambda _seed, _shard, _t, *rest: batches(0, 0, 0, *rest))
    assert all(torch.equal(run(0)[k], first[k]) for k in first)
    for other in ({"t": 1}, {"t": 0, "shard": 1}, {"t": 0, "seed": 1}):
        assert any(not torch.equal(run(**other)[k], first[k]) for k in first), other


def test_sentence_pairs_keep_their_segment_ids_and_training_and_evaluation_pass_them(tiny_model) -> None:
    """A BERT-style encoder tells premise from hypothesis by its segment ids; dropped, it reads each pair as one
    sentence. A single sentence keeps the inputs it always had (no segment ids: the model's zeros)."""
    pairs = sentence_pairs(8)
    enc = encode(tiny_model.tokenizer, pairs, 32)
    single = encode(tiny_model.tokenizer, dataclasses.replace(pairs, text_b=None), 32)
    assert single.token_type_ids is None and "token_type_ids" not in single.batch(range(8), tiny_model.device)
    assert enc.token_type_ids is not None and bool((enc.token_type_ids == 1).any())
    batch = enc.batch(range(8), tiny_model.device)
    assert batch["token_type_ids"].shape == batch["input_ids"].shape
    tiny_model.model.eval()
    with torch.no_grad():
        with_types = tiny_model.model(**model_inputs(batch)).logits
        without = tiny_model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert not torch.allclose(with_types, without)  # the segment ids matter to this model
    _, loss = evaluate(tiny_model, enc, batch_size=8, precision="fp32")
    expected = float(torch.nn.functional.cross_entropy(with_types, batch["labels"]))
    assert loss == pytest.approx(expected, rel=1e-5)


def test_evaluating_on_an_empty_dev_set_is_a_clear_error_not_a_division_by_zero(tiny_model, tiny_dev) -> None:
    empty = tiny_dev.subset(np.arange(0))
    with pytest.raises(ValueError, match="the dev set is empty"):
        evaluate(tiny_model, empty)
