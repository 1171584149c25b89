"""Adapter handling: deterministic init, factor-only I/O, freezing by factor, fingerprint, peft export."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TINY_LORA, tiny_spec
from tadlora import fsutil
from tadlora.adapter import (
    _PART_CAPS,
    FINGERPRINT_PARTS_MAX_CHARS,
    TINY_CONFIG,
    AdapterModel,
    LoraSpec,
    ModelSpec,
    _draw_portably,
    _identity,
    _load_base,
    _weights_digest,
    fingerprint,
    fingerprint_parts,
    portable_normal,
    portable_uniform,
    resolve_device,
    resolve_model_path,
)
from tadlora.core.factors import Factor, factor_of
from tadlora.node.limits import MAX_TEXT_CHARS


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
        {"init": "torch"},
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
    # The factors' file as readable as the config beside it (0666 less the umask), not safetensors' private 0600.
    named = ("adapter_model.safetensors", "adapter_config.json", "tadlora.json")
    assert {name: (out / name).stat().st_mode & 0o777 for name in named} == dict.fromkeys(
        named, 0o666 & ~fsutil._umask()
    )
    base, _, _ = _load_base(tiny_spec())  # the same base and seeded head, no adapter
    loaded = PeftModel.from_pretrained(base, str(out))
    ids = model.tokenizer(["a fine film", "dull"], return_tensors="pt", padding=True)
    model.model.eval()
    loaded.eval()
    with torch.no_grad():
        expected = model.model(**ids).logits
        got = loaded(**ids).logits
    torch.testing.assert_close(got, expected)


def test_an_export_loads_back_into_the_trained_model_and_classifies_as_it_does(tmp_path) -> None:
    """`AdapterModel.from_export` is what `examples/classify_with_adapter.py` stands on: the same base, built from
    the spec the export names, with the exported factors; `classify` gives the trained model's softmax, pairs as
    pairs, in the order of the label names."""
    from tadlora.training import classify

    spec = dataclasses.replace(tiny_spec(), label_names=("entailment", "neutral", "contradiction"))
    model = AdapterModel(spec)
    model.load_factors({k: torch.randn_like(v) * 0.1 for k, v in model.factors().items()})
    out = model.export(tmp_path / "adapter", max_length=32)
    info = json.loads((out / "tadlora.json").read_text())
    assert info["max_length"] == 32 and info["fingerprint_parts"] == model.fingerprint_parts

    loaded = AdapterModel.from_export(out)
    assert loaded.spec == spec and loaded.fingerprint == model.fingerprint
    assert all(torch.equal(loaded.factors()[k], v) for k, v in model.factors().items())
    first, second = ["a cat sat on the mat", "nobody came"], ["an animal sat", "everyone came"]
    probs = classify(loaded, first, second, max_length=32)
    ids = model.tokenizer(first, second, return_tensors="pt", padding="max_length", max_length=32, truncation=True)
    model.model.eval()
    with torch.no_grad():
        expected = torch.softmax(model.model(**ids).logits, dim=-1)
    assert probs.shape == (2, 3)
    torch.testing.assert_close(probs, expected)
    assert not torch.allclose(probs, classify(loaded, first, max_length=32))  # the second sentence counts
    with pytest.raises(ValueError, match="2 first texts but 1 second"):
        classify(loaded, first, second[:1])
    with pytest.raises(ValueError, match="nothing to classify"):
        classify(loaded, [])
    with pytest.raises(TypeError, match="a list of texts"):  # a str is a sequence of one-character texts
        classify(loaded, "a cat sat")


def test_an_export_is_refused_on_a_base_that_is_not_the_one_it_was_trained_on(tmp_path, monkeypatch) -> None:
    """The same path with other weights behind it (a model re-downloaded at another revision, another checkpoint
    copied there): the factors would compute something else than they were trained to. Refused, naming the part
    that differs; and a directory that holds no export, or a damaged one, says so."""
    from transformers import AutoModelForSequenceClassification

    base = tmp_path / "base"
    save_tiny_checkpoint(base)
    monkeypatch.chdir(tmp_path)
    spec = ModelSpec(model="base", lora=TINY_LORA)  # as a node given --model base, relative to where it ran
    out = AdapterModel(spec).export(tmp_path / "adapter")
    monkeypatch.chdir(out)
    AdapterModel.from_export(out)  # the same base, from another directory: loads
    other = AutoModelForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.weight.add_(0.01)
    other.save_pretrained(base)
    with pytest.raises(ValueError, match=r"is not the one the adapter in .* was trained on .*; weights differ\)"):
        AdapterModel.from_export(out)

    # A local model is recorded by its full path (a node's --model is often relative to where it ran), and may be
    # given anew where it lives elsewhere (another machine, outside a container), under its own name: checked.
    save_tiny_checkpoint(base)  # the weights it was trained on, back
    assert json.loads((out / "tadlora.json").read_text())["spec"]["model"] == str(base)
    moved = tmp_path / "elsewhere" / "base"
    shutil.copytree(base, moved)
    shutil.rmtree(base)
    with pytest.raises(RuntimeError, match="cannot load model"):
        AdapterModel.from_export(out)  # not where the export says any more
    trained = json.loads((out / "tadlora.json").read_text())["fingerprint"]
    assert AdapterModel.from_export(out, model=str(moved)).fingerprint == trained
    shutil.copytree(moved, tmp_path / "renamed")
    with pytest.raises(ValueError, match=r"model differ"):  # the fingerprint names a local model by its directory
        AdapterModel.from_export(out, model=str(tmp_path / "renamed"))

    with pytest.raises(ValueError, match=r"is no tadlora export: it has no tadlora\.json"):
        AdapterModel.from_export(tmp_path / "base")
    (out / "tadlora.json").write_text('{"fingerprint": "x"}')
    with pytest.raises(ValueError, match=r"tadlora\.json is damaged or not tadlora's: 'spec'"):
        AdapterModel.from_export(out)


def test_an_export_never_reads_the_base_models_config_which_for_a_hub_id_is_a_network_call(
    tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # peft's default export asks whether the vocabulary was resized: it loads the base's config by its name, which
    # for a model given by hub id means the hub, at every checkpoint of a node that may be offline.
    from transformers import BertConfig

    save_tiny_checkpoint(tmp_path / "base")
    model = AdapterModel(ModelSpec(model=str(tmp_path / "base"), lora=TINY_LORA))

    def no_config(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"the export read the base model's config: {args}")

    monkeypatch.setattr(BertConfig, "from_pretrained", no_config)
    out = model.export(tmp_path / "adapter")
    assert (out / "adapter_model.safetensors").exists()


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError):
        ModelSpec(label_names=("only",))
    with pytest.raises(ValueError, match="init must be one of portable, torch"):
        ModelSpec(init="xavier")
    with pytest.raises(ValueError):
        dataclasses.replace(TINY_LORA, r=0)
    with pytest.raises(ValueError, match="no module"):
        AdapterModel(dataclasses.replace(tiny_spec(), lora=dataclasses.replace(TINY_LORA, target_modules=("nope",))))


def test_lora_on_an_embedding_layer_is_refused_not_left_untrained() -> None:
    """peft names an embedding's factors lora_embedding_A/B: they were frozen with the base and never exchanged, a
    target that silently did nothing."""
    lora = dataclasses.replace(TINY_LORA, target_modules=("query", "word_embeddings"))
    with pytest.raises(ValueError, match=r"LoRA on embedding layers is not supported \(.*word_embeddings\)"):
        AdapterModel(dataclasses.replace(tiny_spec(), lora=lora))


def test_targets_another_family_names_otherwise_are_refused_with_the_model_s_own_linear_names(tmp_path) -> None:
    """The default targets are BERT's (query, value); DistilBERT calls them q_lin and v_lin. peft's message ("No
    modules were targeted for adaptation...") names neither, so the user had to read the model's code to find out."""
    from transformers import AutoTokenizer, DistilBertConfig, DistilBertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, hidden_dim=32)
    DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    spec = ModelSpec(model=str(tmp_path), lora=dataclasses.replace(TINY_LORA, target_modules=("query", "value")))
    with pytest.raises(ValueError, match="matches LoRA targets query,value") as caught:
        AdapterModel(spec)
    # The encoder's layers, not the head's (pre_classifier, classifier: frozen and saved whole, never targets).
    assert "its linear layers are named k_lin, lin1, lin2, out_lin, q_lin, v_lin;" in str(caught.value)
    assert "--lora-targets" in str(caught.value)
    model = AdapterModel(
        dataclasses.replace(spec, lora=dataclasses.replace(spec.lora, target_modules=("q_lin", "v_lin")))
    )
    assert {k.split(".")[-3] for k in model.factors()} == {"q_lin", "v_lin"}


def test_the_weights_digest_covers_scalar_tensors() -> None:
    norm = torch.nn.BatchNorm1d(2)  # its num_batches_tracked is a 0-d buffer
    before = _weights_digest(norm)
    norm.num_batches_tracked += 1
    assert _weights_digest(norm) != before


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")
def test_a_decoder_whose_config_has_no_pad_id_classifies_padded_batches_at_the_last_real_token(tmp_path) -> None:
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    # A tokenizer with a pad token and a config without one (as some hub checkpoints ship): the classifier pools
    # at the last token that is not the config's pad id, which must be the id batches are padded with.
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    config = GPT2Config(vocab_size=tokenizer.vocab_size, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    assert config.pad_token_id is None
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    model = AdapterModel(ModelSpec(model=str(tmp_path), lora=LoraSpec(r=2, alpha=4.0, target_modules=("c_attn",))))
    model.model.eval()
    texts = ["a fine film", "dull"]
    with torch.no_grad():
        batch = model.model(**model.tokenizer(texts, return_tensors="pt", padding=True)).logits
        alone = torch.cat([model.model(**model.tokenizer([x], return_tensors="pt")).logits for x in texts])
    torch.testing.assert_close(batch, alone)


def test_building_a_model_does_not_pass_peft_s_deprecation_warning_to_the_user() -> None:
    # pytest's own filter hides it (pyproject), so this test starts from "always" to see what a CLI user would see.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        AdapterModel(tiny_spec())
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_a_checkpoint_with_only_pickled_weights_is_refused_not_unpickled(tmp_path) -> None:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    model = BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, **TINY_CONFIG))
    model.config.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # the pre-safetensors format
    with pytest.raises(RuntimeError, match="safetensors files only"):
        AdapterModel(ModelSpec(model=str(tmp_path), lora=TINY_LORA))


@pytest.mark.parametrize("name", ["/no/such/model", "./no-such-model"])
def test_a_model_path_that_does_not_exist_is_named_as_a_missing_directory(tmp_path, monkeypatch, name) -> None:
    """It used to be passed to the hub as an id: "Repo id must be in the form 'repo_name' or ..."."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(RuntimeError, match=f"cannot load model '{name}': no such directory") as caught:
        AdapterModel(ModelSpec(model=name, lora=TINY_LORA))
    assert "Repo id" not in str(caught.value)


def test_a_model_directory_that_holds_no_model_is_named_in_the_error(tmp_path) -> None:
    """An empty directory (a wrong path, a download not yet done): transformers says "Couldn't instantiate the backend
    tokenizer from one of: (1) a `tokenizers` library serialization file, ...", naming neither model nor path."""
    with pytest.raises(RuntimeError, match=f"cannot load model '{tmp_path}'"):
        AdapterModel(ModelSpec(model=str(tmp_path), lora=TINY_LORA))


def save_tiny_checkpoint(directory, dtype: torch.dtype = torch.float32, **config_changes) -> None:
    """A tiny BERT classifier (weights from the seed 0) with the MiniLM tokenizer, saved as a local model."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("minilm"))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, **{**TINY_CONFIG, **config_changes})
    BertForSequenceClassification(config).to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def test_a_model_directory_with_another_tokenizer_has_another_fingerprint(tmp_path) -> None:
    """Same weights and directory name, a tokenizer that keeps case: the nodes would read every text differently
    (other ids for "Hello"), so they must not mix."""
    from transformers import AutoTokenizer

    for name in ("a", "b"):
        save_tiny_checkpoint(tmp_path / name / "model")
    cased = AutoTokenizer.from_pretrained(resolve_model_path("minilm"), do_lower_case=False)
    cased.save_pretrained(tmp_path / "b" / "model")
    spec = ModelSpec(model=str(tmp_path / "a" / "model"), lora=TINY_LORA)
    same = AdapterModel(spec)
    assert AdapterModel(spec).fingerprint == same.fingerprint
    other = AdapterModel(dataclasses.replace(spec, model=str(tmp_path / "b" / "model")))
    assert _weights_digest(other.model) == _weights_digest(same.model) and other.fingerprint != same.fingerprint


def test_a_model_directory_has_one_fingerprint_however_its_path_is_spelt(tmp_path, monkeypatch) -> None:
    """The fingerprint names a local model by its directory's name: `--model .` run inside the directory (a
    container's workdir) must mix with `--model /models/mine` on the next node, not differ as "." from "mine"."""
    save_tiny_checkpoint(tmp_path / "mine")
    monkeypatch.chdir(tmp_path / "mine" / "..")
    prints = {AdapterModel(ModelSpec(model=model, lora=TINY_LORA)).fingerprint
              for model in (str(tmp_path / "mine"), "mine/", "mine/.", "./mine/../mine")}  # fmt: skip
    monkeypatch.chdir(tmp_path / "mine")
    prints |= {AdapterModel(ModelSpec(model=model, lora=TINY_LORA)).fingerprint for model in (".", "./")}
    assert len(prints) == 1


def test_the_packaged_minilm_has_one_fingerprint_by_alias_or_by_path(tmp_path) -> None:
    """A node given MiniLM's directory (one without the package on its path, say) mixes with one given `minilm`:
    before, the path named the model by its directory's name, "model", and the two refused each other."""
    path = resolve_model_path("minilm")
    (tmp_path / "link").symlink_to(path)
    prints = {AdapterModel(ModelSpec(model=model)).fingerprint for model in ("minilm", path, str(tmp_path / "link"))}
    assert len(prints) == 1
    save_tiny_checkpoint(tmp_path / "model")  # another directory of that name is another model
    assert _identity(str(tmp_path / "model"), str(tmp_path / "model")) == "model"


def test_a_checkpoint_s_head_for_another_label_count_is_drawn_anew_from_the_seed(tmp_path, caplog) -> None:
    """A classifier fine-tuned on 2 labels, brought for a 3-label task: its head cannot be used, so it is drawn
    from the seed like a missing one (and said so), not refused as transformers' "ignore_mismatched_sizes" error."""
    save_tiny_checkpoint(tmp_path)  # BertForSequenceClassification: a head of 2 labels
    spec = ModelSpec(model=str(tmp_path), label_names=("a", "b", "c"), lora=TINY_LORA)
    with caplog.at_level(logging.WARNING, logger="tadlora.adapter"):
        model = AdapterModel(spec)
    assert "classifier.weight" in caplog.text and "3 labels" in caplog.text
    heads = [{n: p for n, p in m.model.named_parameters() if "classifier" in n and "lora" not in n}
             for m in (model, AdapterModel(spec), AdapterModel(dataclasses.replace(spec, seed=1)))]  # fmt: skip
    assert {p.shape[0] for p in heads[0].values()} == {3}
    assert all(torch.equal(heads[0][n], heads[1][n]) for n in heads[0])
    assert any(not torch.equal(heads[0][n], heads[2][n]) for n in heads[0] if n.endswith("weight"))


def test_a_model_directory_without_its_tokenizer_is_refused_not_read_as_unknown_words(tmp_path) -> None:
    """model.save_pretrained without tokenizer.save_pretrained: transformers builds a BERT tokenizer of the five
    special tokens from config.json alone, which reads every word as [UNK], and the node would train on that."""
    save_tiny_checkpoint(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(RuntimeError, match=f"cannot load model '{tmp_path}': no tokenizer.*save_pretrained"):
        AdapterModel(ModelSpec(model=str(tmp_path), lora=TINY_LORA))


def test_a_half_precision_checkpoint_is_loaded_in_fp32(tmp_path) -> None:
    # transformers loads a checkpoint in the dtype it was saved in unless told otherwise; bf16 or fp16 base weights
    # would make precision "fp32" compute in half precision, and fp16 backward passes underflow without scaling.
    save_tiny_checkpoint(tmp_path, dtype=torch.bfloat16)
    model = AdapterModel(ModelSpec(model=str(tmp_path), lora=TINY_LORA))
    assert {p.dtype for p in model.model.parameters()} == {torch.float32}


def test_fingerprint_is_the_same_for_the_same_lora_settings_written_another_way() -> None:
    spec = ModelSpec(model="tiny", lora=LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("query", "value")))
    same = ModelSpec(model="tiny", lora=LoraSpec(r=4, alpha=8, dropout=0, target_modules=("value", "query")))
    assert fingerprint("tiny", "00", spec) == fingerprint("tiny", "00", same)
    # ... and unchanged for the settings the CLI writes, so runs kept in --out by earlier versions (which drew their
    # model with torch's init; `kept_init`) still resume.
    labels, lora = list(spec.label_names), dataclasses.asdict(spec.lora)
    old_style = {"base": "tiny", "weights": "00", "lora": lora, "labels": labels, "seed": spec.seed}
    old = hashlib.blake2b(json.dumps(old_style, sort_keys=True).encode(), digest_size=16).hexdigest()
    assert fingerprint("tiny", "00", dataclasses.replace(spec, init="torch")) == old
    assert fingerprint("tiny", "00", spec) != old


class _ProbeTokenizer:
    """Just enough of a tokenizer for `tokenizer_digest`: a fixed vocabulary and ids for any text."""

    all_special_tokens = ("[CLS]", "[SEP]")

    def get_vocab(self) -> dict[str, int]:
        return {"[CLS]": 0, "[SEP]": 1, "a": 2}

    def __call__(self, text: str, pair: str | None = None) -> dict[str, list[int]]:
        ids = [0, *(2 for _ in text.split()), 1] + ([2, 1] if pair is not None else [])
        return {"input_ids": ids, "token_type_ids": [0] * len(ids)}


@pytest.mark.parametrize(
    ("identity", "digest", "spec", "tokenizer", "expected"),
    [
        ("tiny", "00", ModelSpec(model="tiny", lora=TINY_LORA), None, "5dcdf457007f122c4118680fc374281e"),
        ("tiny", "00", ModelSpec(model="tiny", lora=TINY_LORA), _ProbeTokenizer(), "f2f801d75b158ddad0b61bf8e98e2f9a"),
        ("minilm", "ab" * 16, ModelSpec(), _ProbeTokenizer(), "dc9a003565c7176f71f820ddc4ae9f58"),
        (
            "minilm",
            "ab" * 16,
            ModelSpec(init="torch", seed=3, label_names=("x", "y", "z")),
            None,
            "e2611a22afb50e16c3bd327dc5d7b2e7",
        ),
    ],
)
def test_fingerprint_values_stay_what_runs_recorded(
    identity: str, digest: str, spec: ModelSpec, tokenizer: object, expected: str
) -> None:
    # A fingerprint is kept in every checkpoint and node.json, and compared with peers of other versions: a change
    # to how it is computed would refuse every resume and split every mixed-version cluster.
    assert fingerprint(identity, digest, spec, tokenizer) == expected


_PORTABLE_PARTS = (
    "model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0 init=portable weights=#1a03c612 "
    "tokenizer=#468b5ab8"
)


def _parts(text: str) -> dict[str, str]:
    return dict(token.split("=", 1) for token in text.split(" "))


def test_fingerprint_parts_show_each_part_the_fingerprint_covers() -> None:
    tokenizer = _ProbeTokenizer()
    assert fingerprint_parts("minilm", "ab" * 16, ModelSpec(), tokenizer) == _PORTABLE_PARTS
    assert hashlib.blake2b(b"ab" * 16, digest_size=4).hexdigest() == "1a03c612"  # a digest: '#', 8 hex of BLAKE2b
    # torch's init: the fingerprint leaves out the tokenizer, and so do the parts; the init is shown, as the
    # fingerprint tells it apart from portable by leaving out both.
    torch_init = fingerprint_parts("minilm", "ab" * 16, ModelSpec(init="torch", seed=3), tokenizer)
    assert torch_init == "model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=3 init=torch " \
        "weights=#1a03c612"  # fmt: skip


@pytest.mark.parametrize(
    ("change", "key"),
    [
        ({"identity": "tiny"}, "model"),
        ({"weights": "cd" * 16}, "weights"),
        ({"tokenizer": None}, "tokenizer"),
        ({"label_names": ("no", "yes")}, "labels"),
        ({"lora": LoraSpec(r=4)}, "lora"),
        ({"lora": LoraSpec(alpha=32)}, "lora"),
        ({"lora": LoraSpec(dropout=0.1)}, "lora"),
        ({"lora": LoraSpec(target_modules=("query",))}, "lora"),
        ({"seed": 1}, "seed"),
    ],
)
def test_a_setting_changed_changes_its_part_alone(change: dict, key: str) -> None:
    args = {"identity": "minilm", "weights": "ab" * 16, "tokenizer": _ProbeTokenizer()}
    spec_change = {k: v for k, v in change.items() if k not in args}
    changed = {**args, **{k: v for k, v in change.items() if k in args}}
    base = _parts(fingerprint_parts(args["identity"], args["weights"], ModelSpec(), args["tokenizer"]))
    other_spec = dataclasses.replace(ModelSpec(), **spec_change)
    other = _parts(fingerprint_parts(changed["identity"], changed["weights"], other_spec, changed["tokenizer"]))
    assert {k for k in base if base[k] != other[k]} == {key}, (base, other)


def test_fingerprint_parts_are_the_same_for_settings_written_another_way() -> None:
    spec = ModelSpec(lora=LoraSpec(r=4, alpha=8.0, dropout=0.0, target_modules=("query", "value")))
    same = ModelSpec(lora=LoraSpec(r=4, alpha=8, dropout=0, target_modules=("value", "query", "value")))
    assert fingerprint_parts("tiny", "00", spec) == fingerprint_parts("tiny", "00", same)
    assert "lora=r4/a8/d0/query+value" in fingerprint_parts("tiny", "00", same)
    # Numbers are shown exactly: 0.1 and 0.1 + 2^-56 are two alphas to peft and to the fingerprint.
    close = ModelSpec(lora=LoraSpec(alpha=0.1 + 2**-56))
    assert fingerprint_parts("t", "0", ModelSpec(lora=LoraSpec(alpha=0.1))) != fingerprint_parts("t", "0", close)


@pytest.mark.parametrize(
    ("identity", "labels", "key"),
    [
        ("hub model with spaces", ("negative", "positive"), "model"),
        ("m" * 41, ("negative", "positive"), "model"),  # over its cap
        ("tiny:" + json.dumps(TINY_CONFIG, sort_keys=True), ("negative", "positive"), "model"),
        ("minilm", ("a,b", "c"), "labels"),  # would read as three labels
        ("minilm", ("x=y", "z"), "labels"),
        ("minilm", ("positif", "négatif"), "labels"),  # not ASCII
        ("minilm", tuple(f"label{i}" for i in range(10)), "labels"),  # over its cap
    ],
)
def test_a_long_or_unsafe_value_is_shown_as_a_digest(identity: str, labels: tuple[str, ...], key: str) -> None:
    parts = _parts(fingerprint_parts(identity, "00", ModelSpec(label_names=labels)))
    assert re.fullmatch(r"#[0-9a-f]{8}", parts[key]), parts
    assert parts["model" if key == "labels" else "labels"] in ("minilm", "negative,positive")


def test_one_label_holding_a_comma_is_not_shown_as_two_labels() -> None:
    one = fingerprint_parts("m", "00", ModelSpec(label_names=("a,b", "c")))
    three = fingerprint_parts("m", "00", ModelSpec(label_names=("a", "b", "c")))
    assert _parts(one)["labels"] != _parts(three)["labels"] == "a,b,c"


def test_the_caps_keep_the_longest_parts_text_within_the_protocol_s_text_cap() -> None:
    # A value takes at most its cap in clear, or 9 chars as a digest; keys, '=' and the spaces between come on top.
    longest = sum(len(key) + 1 + max(cap, 9) for key, cap in _PART_CAPS.items()) + len(_PART_CAPS) - 1
    assert longest <= FINGERPRINT_PARTS_MAX_CHARS
    assert len("fpp=") + FINGERPRINT_PARTS_MAX_CHARS <= 255 and FINGERPRINT_PARTS_MAX_CHARS <= MAX_TEXT_CHARS


def test_values_at_their_caps_fit() -> None:
    lora = LoraSpec(r=123456789, alpha=0.12345678, dropout=0.12345678, target_modules=("q" * 15, "v" * 16))
    spec = ModelSpec(label_names=("a" * 21, "b" * 22), lora=lora, seed=10**19, init="portable")
    text = fingerprint_parts("m" * 40, "ab" * 16, spec, _ProbeTokenizer())
    assert "#" not in text.split(" weights=")[0]  # each at its cap, and in clear
    assert len(text) <= FINGERPRINT_PARTS_MAX_CHARS


_ANY_TEXT = st.text(min_size=1, max_size=400)


@settings(max_examples=300, deadline=None)
@given(
    identity=_ANY_TEXT,
    labels=st.lists(_ANY_TEXT, min_size=2, max_size=50, unique=True),
    targets=st.lists(_ANY_TEXT, min_size=1, max_size=50),
    r=st.integers(min_value=1, max_value=10**60),
    alpha=st.floats(min_value=0, max_value=1e300, exclude_min=True),
    dropout=st.floats(min_value=0, max_value=1, exclude_max=True),
    seed=st.integers(min_value=-(10**60), max_value=10**60),
    init=st.sampled_from(["portable", "torch"]),
)
def test_fingerprint_parts_fit_whatever_the_model_path_labels_or_numbers(
    identity: str, labels: list[str], targets: list[str], r: int, alpha: float, dropout: float, seed: int, init: str
) -> None:
    lora = LoraSpec(r=r, alpha=alpha, dropout=dropout, target_modules=tuple(targets))
    text = fingerprint_parts(identity, "ab" * 16, ModelSpec(label_names=tuple(labels), lora=lora, seed=seed, init=init))
    assert len(text) <= FINGERPRINT_PARTS_MAX_CHARS
    # One line of printable ASCII, "key=value" tokens, whatever the inputs held (newlines, '=', spaces, non-ASCII).
    assert re.fullmatch(r"[a-z]+=[!-~]+( [a-z]+=[!-~]+)*", text), text
    assert list(_parts(text)) == [k for k in _PART_CAPS if k != "tokenizer" or init == "portable"]


def test_a_model_s_parts_are_those_of_its_fingerprint(tiny_model: AdapterModel) -> None:
    parts = _parts(tiny_model.fingerprint_parts)
    assert parts["lora"] == "r4/a8/d0/query+value" and parts["seed"] == "0" and parts["init"] == "portable"
    other = AdapterModel(dataclasses.replace(tiny_spec(), seed=1))
    assert {k for k, v in _parts(other.fingerprint_parts).items() if v != parts[k]} == {"weights", "seed"}


@pytest.mark.parametrize("name", ["gpu", "cuda0", "CPU", ""])
def test_a_device_string_torch_cannot_read_is_refused_with_the_ones_to_use(name: str) -> None:
    with pytest.raises(ValueError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device(name)


def test_building_a_model_leaves_torch_s_global_rng_where_it_was() -> None:
    # peft draws A's throwaway init from torch's global RNG, which every thread shares: drawn outside `rng.seeded`'s
    # lock, it would move the stream another node's local steps (in their own thread) draw dropout masks from.
    before = torch.get_rng_state()
    AdapterModel(tiny_spec())
    assert torch.equal(torch.get_rng_state(), before)


def test_a_label_set_naming_one_label_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="distinct"):
        ModelSpec(label_names=("yes", "no", "yes"))


_DRAW = """
import hashlib, sys, torch
from tadlora.adapter import AdapterModel, ModelSpec
print(torch.backends.cpu.get_cpu_capability())
for name in sys.argv[1:]:
    model = AdapterModel(ModelSpec(model=name))
    start = b"".join(t.numpy().tobytes() for t in model.initial_factors().values())
    print(name, model.fingerprint, hashlib.sha256(start).hexdigest())
"""


def test_nodes_on_cpus_with_other_vector_instructions_start_from_the_same_bits() -> None:
    """An x86 lab box (AVX2) and an ARM edge board must build the same model, or their fingerprints differ and they
    never mix. torch's uniform_ and normal_ draw other bits for one seed on its vector code paths; the portable
    init (the default) does not. The paths are chosen here as torch lets one (ATEN_CPU_CAPABILITY); a CPU without
    AVX2 runs both processes on the default path and compares it with itself. `tiny` draws every weight, MiniLM
    its head: the fingerprint covers both, and the digest covers A."""
    import os
    import subprocess
    import sys

    seen = {}
    for capability in ("default", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
        out = subprocess.run([sys.executable, "-c", _DRAW, "tiny", "minilm"], env=env, capture_output=True,
                             text=True, timeout=180, check=True).stdout.splitlines()  # fmt: skip
        seen[out[0]] = out[1:]
    assert len(seen) == 1 or len({tuple(v) for v in seen.values()}) == 1, seen
    assert all(len(v) == 2 for v in seen.values())


# The packaged MiniLM as every node builds it (portable init): its fingerprint, and a digest of every tensor of the
# model (base, head, A and B) by name. Measured alike on transformers 4.56.0 with peft 0.13.0 (.ci/floors.txt) and
# on 5.25.0 with peft 0.21.2: nodes of a mixed fleet build the same bits, and this test is what says so when
# .ci/floors runs. A change that means to change them (another init, another fingerprint) updates both.
MINILM_FINGERPRINT = "d8b7da781f19a616"
MINILM_DIGEST = "3af3cde6c7e21d8b"


def test_the_packaged_model_builds_to_the_same_bits_on_every_supported_library_release() -> None:
    model = AdapterModel(ModelSpec(model="minilm"))
    digest = hashlib.sha256()
    for name, tensor in sorted(model.model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.float().numpy().tobytes())
    assert (model.fingerprint[:16], digest.hexdigest()[:16]) == (MINILM_FINGERPRINT, MINILM_DIGEST)


def test_portable_draws_have_the_distributions_they_stand_in_for() -> None:
    gen = torch.Generator().manual_seed(0)
    u = portable_uniform((200_000,), 0.25, gen)
    assert u.dtype == torch.float32 and float(u.min()) > -0.25 and float(u.max()) < 0.25
    assert abs(float(u.mean())) < 2e-3 and abs(float(u.std()) - 0.25 / 3**0.5) < 2e-3
    n = portable_normal((200_000,), 0.02, gen)
    assert abs(float(n.mean())) < 2e-4 and abs(float(n.std()) - 0.02) < 2e-4
    assert abs(float(((n / 0.02) ** 4).mean()) - 3.0) < 0.1  # kurtosis near a normal's 3 (Irwin-Hall's: 2.9)
    again = torch.Generator().manual_seed(0)
    assert torch.equal(portable_uniform((200_000,), 0.25, again), u)


def test_portable_normal_draws_the_bits_of_its_definition_summand_by_summand() -> None:
    # Its bits are in every portable run's fingerprint, so drawing the 12 summands one at a time (a twelfth of the
    # memory) must give exactly what one (12, *shape) draw summed gives, and leave the generator where that does.
    for shape in [(5,), (33, 7), (2, 1, 3)]:
        ref_gen, gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
        k = torch.randint(0, 1 << 24, (12, *shape), generator=ref_gen, dtype=torch.int64).sum(dim=0)
        ref = (((k.double() + 6.0) * (1.0 / (1 << 24)) - 6.0) * 0.02).float()
        assert torch.equal(portable_normal(shape, 0.02, gen), ref), shape
        after = torch.randint(0, 1 << 30, (4,), generator=gen)
        assert torch.equal(after, torch.randint(0, 1 << 30, (4,), generator=ref_gen)), shape
    # And the values themselves, as drawn when the portable init was introduced.
    drawn = portable_normal((4,), 1.0, torch.Generator().manual_seed(0)).tolist()
    assert drawn == [-1.6853983402252197, 0.5305216908454895, -0.6888291239738464, -0.3263266086578369]


def test_the_portable_init_draws_what_the_checkpoint_lacks_and_nothing_it_holds() -> None:
    """MiniLM's checkpoint holds the encoder, not the classification head: the head is drawn (linear weight
    ~ N(0, 0.02²), bias 0), every loaded weight is the checkpoint's, whatever the init."""
    portable, _, _ = _load_base(ModelSpec(model="minilm"))
    legacy, _, _ = _load_base(ModelSpec(model="minilm", init="torch"))
    differ = {k for k, v in portable.state_dict().items() if not torch.equal(v, legacy.state_dict()[k])}
    assert differ == {"classifier.weight"}
    weight, bias = portable.classifier.weight.detach(), portable.classifier.bias.detach()
    assert abs(float(weight.std()) - 0.02) < 0.003 and float(bias.abs().max()) == 0.0
    with pytest.raises(ValueError, match=r"cannot draw 0\.weight \(Conv1d\) portably"):
        _draw_portably(torch.nn.Sequential(torch.nn.Conv1d(2, 2, 1)), {"0.weight"}, seed=0)


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_factors_read_and_trained_are_the_moved_model_s_own(overwrite: bool) -> None:
    # Moving a module to a device may replace its Parameter objects: always for tensors that cannot take the old
    # data in place (meta stands in for such a device on every machine), and on any device, CUDA included, under
    # torch.__future__.set_overwrite_module_params_on_conversion(True). Factors collected before the move are then
    # parameters the model no longer computes with: local steps would train nothing and `factors` read stale values.
    before = torch.__future__.get_overwrite_module_params_on_conversion()
    torch.__future__.set_overwrite_module_params_on_conversion(overwrite)
    try:
        model = AdapterModel(tiny_spec(), device="meta" if not overwrite else "cpu")
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(before)
    own = {id(p) for p in model.model.parameters()}
    assert all(id(p) in own for p in model.factor_parameters().values())
    assert all(id(p) in own for p in model._frozen)
    assert next(iter(model.factor_parameters().values())).device == model.device
