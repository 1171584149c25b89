"""Adapter handling: deterministic init, factor-only I/O, freezing by factor, fingerprint, peft export."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import TINY_LORA, tiny_spec
from tadlora.adapter import AdapterModel, ModelSpec, _load_base
from tadlora.core.factors import Factor, factor_of


def test_every_node_starts_identical_with_b_zero(tiny_model: AdapterModel) -> None:
    other = AdapterModel(tiny_spec())
    mine, theirs = tiny_model.factors(), other.factors()
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key])
        if factor_of(key) is Factor.B:
            assert not mine[key].any()
        else:
            assert mine[key].abs().sum() > 0
    # the frozen head (and every base weight) is identical too
    for (n1, p1), (n2, p2) in zip(tiny_model.model.named_parameters(), other.model.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2)
    assert tiny_model.fingerprint == other.fingerprint


def test_initial_factors_are_the_seed_s_init_whatever_the_model_holds_now() -> None:
    model = AdapterModel(tiny_spec())
    init = model.factors()
    model.load_factors({k: torch.randn_like(v) for k, v in init.items()})  # as after a client's training
    again = model.initial_factors()
    assert again.keys() == init.keys() and all(torch.equal(again[k], init[k]) for k in init)
    other_seed = AdapterModel(dataclasses.replace(tiny_spec(), seed=1)).initial_factors()
    assert any(not torch.equal(other_seed[k], init[k]) for k in init)


def test_factors_hold_only_lora_a_and_b(tiny_model: AdapterModel) -> None:
    keys = list(tiny_model.factors())
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert len(keys) == 2 * 2 * len(TINY_LORA.target_modules)  # 2 layers × targets × (A, B)


def test_no_base_weight_is_trainable_and_freezing_is_per_factor(tiny_model: AdapterModel) -> None:
    params = tiny_model.set_trainable(frozenset({Factor.A}))
    trainable = [n for n, p in tiny_model.model.named_parameters() if p.requires_grad]
    assert len(params) == len(trainable) and all(".lora_A." in n for n in trainable)
    tiny_model.set_trainable(frozenset())
    assert not any(p.requires_grad for p in tiny_model.model.parameters())


@pytest.mark.parametrize(
    "change",
    [
        {"seed": 1},
        {"label_names": ("a", "b", "c")},
        {"lora": dataclasses.replace(TINY_LORA, r=2)},
        {"lora": dataclasses.replace(TINY_LORA, target_modules=("query",))},
    ],
)
def test_fingerprint_changes_with_anything_nodes_must_share(tiny_model: AdapterModel, change: dict) -> None:
    other = AdapterModel(dataclasses.replace(tiny_spec(), **change))
    assert other.fingerprint != tiny_model.fingerprint


def test_load_factors_reports_missing_unexpected_and_misshapen_keys(tiny_model: AdapterModel) -> None:
    good = tiny_model.factors()
    key = next(iter(good))
    with pytest.raises(ValueError, match="missing"):
        tiny_model.load_factors({k: v for k, v in good.items() if k != key})
    with pytest.raises(ValueError, match="unexpected"):
        tiny_model.load_factors({**good, "bogus.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shapes"):
        tiny_model.load_factors({**good, key: torch.zeros(1, 1)})
    tiny_model.load_factors(good)


def test_export_loads_with_peft_from_pretrained_and_computes_the_same_logits(tmp_path) -> None:
    from peft import PeftModel

    model = AdapterModel(tiny_spec())
    factors = model.factors()
    model.load_factors({k: torch.randn_like(v) * 0.1 for k, v in factors.items()})  # a non-trivial adapter
    out = model.export(tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()
    base, _, _ = _load_base(tiny_spec())  # the same base and seeded head, no adapter
    loaded = PeftModel.from_pretrained(base, str(out))
    ids = model.tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    model.model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = model.model(**ids).logits
        got = loaded(**ids).logits
    torch.testing.assert_close(got, expected)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        ModelSpec(label_names=("only",))
    with pytest.raises(ValueError):
        dataclasses.replace(TINY_LORA, r=0)
    with pytest.raises(ValueError, match="no module"):
        AdapterModel(dataclasses.replace(tiny_spec(), lora=dataclasses.replace(TINY_LORA, target_modules=("nope",))))
