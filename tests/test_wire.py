"""The exchange payload: safetensors encoding, spec checks, chunking and reassembly; and the generated proto code."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tadlora.node.wire import (
    MAX_CHUNK_BYTES,
    MAX_PAYLOAD_BYTES,
    ExchangeRefused,
    FactorSpec,
    PayloadError,
    Reason,
    Reassembler,
    TensorSpec,
    chunk,
    chunk_count,
    decode_factors,
    digest,
    dtype_name,
    encode_factors,
)
from tadlora.v1 import node_pb2 as pb

REPO = Path(__file__).resolve().parents[1]
PREFIX = "base_model.model.bert.encoder.layer.0.attention.self"
GENERATED = ("tadlora/v1/node_pb2.py", "tadlora/v1/node_pb2.pyi", "tadlora/v1/node_pb2_grpc.py")


Factors = dict[str, torch.Tensor]


def lora_factors(dtype: torch.dtype = torch.float32, rank: int = 4, width: int = 16, seed: int = 0) -> Factors:
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for proj in ("query", "value"):
        factors[f"{PREFIX}.{proj}.lora_A.weight"] = torch.randn(rank, width, generator=gen).to(dtype)
        factors[f"{PREFIX}.{proj}.lora_B.weight"] = torch.randn(width, rank, generator=gen).to(dtype)
    return factors


def bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality means bit-exact (and -0.0 differs from 0.0)."""
    return tensor.contiguous().view(torch.uint8)


def assert_bit_exact(actual: Factors, expected: Factors) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert actual[key].shape == tensor.shape, key
        assert torch.equal(bits(actual[key]), bits(tensor)), key


def payload_of(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


# ------------------------------------------------------------------------------------------ reasons


def test_reason_mirrors_the_proto_enum_value_for_value() -> None:
    wire = {name.removeprefix("REFUSAL_REASON_"): value for name, value in pb.RefusalReason.items()}
    assert wire == {reason.name: reason.value for reason in Reason}


def test_refusals_say_their_reason_and_payload_errors_are_refusals() -> None:
    error = PayloadError(Reason.DIGEST_MISMATCH, "sha256 differs")
    assert isinstance(error, ExchangeRefused)
    assert (error.reason, error.detail) == (Reason.DIGEST_MISMATCH, "sha256 differs")
    assert str(error) == "DIGEST_MISMATCH: sha256 differs"


PROTOCOL_DOC = REPO / "docs" / "protocol.md"


def _refusal_table(doc: str) -> list[str]:
    """The rows of docs/protocol.md's table of checks and their refusals."""
    section = doc.split("### What is checked, and the refusal each failure gets", 1)[1]
    table = section[section.index("\n| check |") :].split("\n\n", 1)[0]
    return [line for line in table.splitlines() if line.startswith("| ")][1:]  # past the head (the rule is "|-")


def test_every_refusal_reason_is_in_the_docs_table_and_the_table_names_no_other() -> None:
    """A peer implementer learns when each reason is sent from docs/protocol.md's table alone: every reason a node
    can send (all but UNSPECIFIED, which stands for one it does not know) has a row, and no row names a reason that
    does not exist."""
    doc = PROTOCOL_DOC.read_text(encoding="utf-8")
    refusals = [row.rsplit(" | ", 1)[1] for row in _refusal_table(doc)]  # the last column
    in_table = {name for cell in refusals for name in re.findall(r"`([A-Z][A-Z_]+)`", cell)}
    sent = {reason.name for reason in Reason} - {"UNSPECIFIED"}
    assert sent <= in_table, f"reasons without a row in docs/protocol.md: {sorted(sent - in_table)}"
    assert in_table - {"INVALID_ARGUMENT", "INTERNAL"} <= sent, sorted(in_table - sent)
    listed = set(re.findall(r"`([A-Z][A-Z_]+)`", doc.split("Refusals carry a `RefusalReason` (", 1)[1].split(")")[0]))
    assert listed == sent, "the list of reasons at the top of docs/protocol.md"


def test_the_caps_and_timeouts_docs_protocol_quotes_are_the_codes() -> None:
    """Each number docs/protocol.md gives a peer implementer is the constant the code enforces."""
    from tadlora.node import daemon, limits, peers, protocol_types, rounds, wire
    from tadlora.node.config import NodeConfig
    from tadlora.node.grpc_transport import GRPC_MAX_CONNECTION_AGE_MS, GRPC_MIN_CONNECTION_AGE_GRACE_MS

    doc = " ".join(PROTOCOL_DOC.read_text(encoding="utf-8").split())  # one line: quotes may wrap anywhere
    defaults = {f.name: f.default for f in dataclasses.fields(NodeConfig)}
    mib, kib = 1 << 20, 1 << 10
    quoted = {
        f"`MAX_DEGREE` ({limits.MAX_DEGREE})": True,
        "`MAX_ROUND` (2^40)": limits.MAX_ROUND == 2**40,
        f"more than {rounds.WAIT_GAP_ROUNDS} (`WAIT_GAP_ROUNDS`)": True,
        f"{limits.MAX_EXCHANGES_PER_CALLER} exchanges (`MAX_EXCHANGES_PER_CALLER`)": True,
        f"{limits.MAX_FETCHES_PER_CALLER} fetches (`MAX_FETCHES_PER_CALLER`)": True,
        f"over {limits.MAX_TEXT_CHARS} characters (`MAX_TEXT_CHARS`)": True,
        f"first {limits.MAX_DETAIL_CHARS} characters": True,
        f"`NodeConfig.max_payload_bytes`, {defaults['max_payload_bytes'] // mib} MiB)": True,
        f"chunks of at most {wire.MAX_CHUNK_BYTES // mib} MiB": wire.MAX_CHUNK_BYTES % mib == 0,
        f"a chunk over {wire.MAX_CHUNK_BYTES // mib} MiB": True,
        f"their bytes + {wire._HEADER_FIXED_SLACK_BYTES // kib} KiB, and per tensor {wire._ENTRY_SLACK_BYTES} bytes "
        f"+ {wire._KEY_ESCAPE_FACTOR} a byte of its key + {wire._DIM_CHARS} a dimension": True,
        "`--max-factor-norm` (default 1e4)": defaults["max_factor_norm"] == 1e4,
        f"`--exchange-timeout` (default {defaults['exchange_timeout']:g} s;": True,
        f"grace: 2 × `--exchange-timeout`, at least {GRPC_MIN_CONNECTION_AGE_GRACE_MS // 1000} s)": True,
        f"connection age, {GRPC_MAX_CONNECTION_AGE_MS // 60_000} min,": True,
        "message size 4 MiB + 64 KiB": limits.GRPC_MAX_MESSAGE_BYTES - 64 * kib == 4 * mib,
        f"{limits.GRPC_MAX_CONCURRENT_STREAMS} concurrent streams": True,
        f"{limits.GRPC_MAX_CONCURRENT_RPCS} concurrent RPCs": True,
        f"keepalive pings every {limits.GRPC_CLIENT_KEEPALIVE_MS // 1000} s (client) / "
        f"{limits.GRPC_SERVER_KEEPALIVE_MS // 1000} s (server) "
        f"with a {limits.GRPC_KEEPALIVE_TIMEOUT_MS // 1000} s ack": True,
        f"pings at most every {limits.GRPC_MIN_PING_INTERVAL_MS // 1000} s": True,
        f"handshake timeout ({peers.HANDSHAKE_TIMEOUT_S:g} s)": True,
        f"within {peers.LEAVE_TIMEOUT_S:g} s (`LEAVE_TIMEOUT_S`)": True,
        f"no answer within {daemon.FETCH_TIMEOUT_S:g} s": True,
        f"for {daemon.FETCH_RETRY_S / 60:g} minutes": True,
        f"Protocol version {protocol_types.PROTOCOL_VERSION};": True,
    }
    assert [quote for quote, holds in quoted.items() if not holds or quote not in doc] == []


# ------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_factors_and_metadata_round_trip_bit_exact(dtype: torch.dtype) -> None:
    factors = lora_factors(dtype)
    factors[f"{PREFIX}.query.lora_A.weight"][0, 0] = -0.0  # the sign of zero must survive too
    metadata = {"node_id": "n1", "round": "7"}

    decoded, decoded_metadata = decode_factors(encode_factors(factors, metadata), FactorSpec.from_factors(factors))

    assert_bit_exact(decoded, factors)
    assert decoded_metadata == metadata


def test_decoding_without_metadata_gives_empty_metadata() -> None:
    assert decode_factors(encode_factors(lora_factors()))[1] == {}


def test_empty_factor_dict_round_trips() -> None:
    assert decode_factors(encode_factors({}), FactorSpec({})) == ({}, {})


def test_encoding_accepts_non_contiguous_shared_and_trainable_tensors() -> None:
    base = torch.randn(4, 6)
    factors = {
        "transposed": base.t(),  # non-contiguous
        "tied": base,  # shares memory with the next one
        "tied_again": base,
        "trainable": torch.nn.Parameter(torch.randn(3, 2)),
    }
    decoded, _ = decode_factors(encode_factors(factors))
    assert_bit_exact(decoded, {k: v.detach() for k, v in factors.items()})


def test_decoded_tensors_are_writable_cpu_tensors() -> None:
    decoded, _ = decode_factors(encode_factors(lora_factors()))
    tensor = next(iter(decoded.values()))
    assert tensor.device.type == "cpu"
    tensor.add_(1.0)  # mixing updates received factors in place


def test_encoding_refuses_non_string_metadata() -> None:
    with pytest.raises(TypeError):
        encode_factors(lora_factors(), {"round": 7})  # type: ignore[dict-item]


def test_encoding_refuses_non_tensor_values() -> None:
    with pytest.raises(TypeError, match=r"str to torch\.Tensor"):
        encode_factors({"a": [1.0, 2.0]})  # type: ignore[dict-item]


# ---------------------------------------------------------------------------------------- the spec


def test_spec_from_factors_lists_shapes_and_dtype_names() -> None:
    spec = FactorSpec.from_factors({"a": torch.zeros(2, 3, dtype=torch.bfloat16), "b": torch.zeros(4)})
    assert dict(spec.tensors) == {"a": TensorSpec((2, 3), "bfloat16"), "b": TensorSpec((4,), "float32")}
    assert spec.tensors["a"] == ((2, 3), "bfloat16")  # plain (shape, dtype) tuples
    assert dtype_name(torch.float16) == "float16"


def test_specs_are_frozen_hashable_and_order_independent() -> None:
    one = FactorSpec({"a": ((2,), "float32"), "b": ((3,), "float16")})
    two = FactorSpec({"b": ([3], "float16"), "a": ((2,), "float32")})
    assert one == two
    assert hash(one) == hash(two)
    assert one.fingerprint() == two.fingerprint()
    assert one.fingerprint() != FactorSpec({"a": ((2,), "float32")}).fingerprint()
    with pytest.raises(TypeError):
        one.tensors["c"] = TensorSpec((1,), "float32")  # type: ignore[index]


@pytest.mark.parametrize(
    "entries",
    [{"a": ((2,), "fp32")}, {"a": ((-1,), "float32")}, {"": ((2,), "float32")}],
    ids=["unknown dtype", "negative dimension", "empty key"],
)
def test_malformed_specs_are_refused(entries: dict[str, tuple[tuple[int, ...], str]]) -> None:
    with pytest.raises(ValueError):
        FactorSpec(entries)


def _missing(f: Factors) -> None:
    del f[f"{PREFIX}.value.lora_B.weight"]


def _extra(f: Factors) -> None:
    f["classifier.weight"] = torch.zeros(2)


def _reshaped(f: Factors) -> None:
    key = f"{PREFIX}.query.lora_A.weight"
    f[key] = f[key].reshape(-1)


def _retyped(f: Factors) -> None:
    key = f"{PREFIX}.query.lora_A.weight"
    f[key] = f[key].to(torch.float16)


def _nan(f: Factors) -> None:
    f[f"{PREFIX}.query.lora_B.weight"][1, 2] = math.nan


def _inf(f: Factors) -> None:
    f[f"{PREFIX}.value.lora_A.weight"][0, 0] = -math.inf


@pytest.mark.parametrize(
    ("spoil", "says"),
    [
        (_missing, "1 missing"),
        (_extra, "1 unexpected"),
        (_reshaped, "shape"),
        (_retyped, "dtype"),
        (_nan, "NaN or infinite"),
        (_inf, "NaN or infinite"),
    ],
    ids=["missing key", "extra key", "wrong shape", "wrong dtype", "NaN", "Inf"],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_payload_off_the_spec_is_refused_as_bad_payload(
    spoil: Callable[[Factors], None], says: str, dtype: torch.dtype
) -> None:
    factors = lora_factors(dtype)
    spec = FactorSpec.from_factors(factors)
    spoil(factors)
    payload = encode_factors(factors)

    with pytest.raises(PayloadError, match=says) as refused:
        decode_factors(payload, spec)
    assert refused.value.reason is Reason.BAD_PAYLOAD
    decode_factors(payload)  # without a spec the same payload decodes: the spec is what refused it


def test_a_refusal_names_a_few_of_a_payloads_keys_each_cut_however_long_the_peer_made_them() -> None:
    """A payload's header may carry keys of 12,000 characters and still fit the size cap (its 64 KiB of header
    slack); naming three of them whole made a 36,000-character detail, logged by the callee and sent back."""
    spec = FactorSpec.from_factors(lora_factors())
    odd = {("k" * 12_000 + str(i)): torch.zeros(1) for i in range(5)}
    payload = encode_factors(odd)
    assert len(payload) <= spec.max_payload_bytes()
    with pytest.raises(PayloadError) as refused:
        decode_factors(payload, spec)
    detail = refused.value.detail
    assert len(detail) < 1000, len(detail)
    assert f"5 unexpected ({'k' * 117}..., {'k' * 117}..., {'k' * 117}... and 2 more)" in detail, detail


@pytest.mark.parametrize(
    "factors",
    [
        lora_factors(),
        lora_factors(torch.bfloat16, rank=64, width=384),
        {},
        {"x" * 300 + "\u00e9\u0001": torch.zeros(1, 2, 3, 4, 5, dtype=torch.float64), "s": torch.tensor(1.0)},
        {f"layer.{i}.lora_A.weight": torch.zeros(1, 1, dtype=torch.int8) for i in range(200)},
    ],
    ids=["lora", "bf16 rank 64", "empty", "odd keys and shapes", "many small tensors"],
)
def test_a_payload_meeting_its_spec_fits_the_specs_size_bound_and_the_bound_is_near_the_data(
    factors: Factors,
) -> None:
    """The bound is what a receiver refuses a declared size over (TOO_LARGE, from the header): never below a real
    payload of the spec, and not far above its tensors' bytes (so it protects where the 512 MiB cap does not)."""
    spec = FactorSpec.from_factors(factors)
    data = sum(t.numel() * t.element_size() for t in factors.values())
    assert len(encode_factors(factors)) <= spec.max_payload_bytes() <= data + (64 << 10) + 2000 * max(len(factors), 1)


@pytest.mark.parametrize(
    "factors",
    [
        {f"layer.{i}.lora_A.weight": torch.zeros(1, 1, dtype=torch.int8) for i in range(1000)},
        {"\u0001" * 20_000: torch.zeros(1)},
        {f"t{i}": torch.zeros((1,) * 200, dtype=torch.int8) for i in range(500)},
    ],
    ids=["a header over the fixed slack", "a key JSON writes six bytes a character", "200 dimensions a tensor"],
)
def test_the_specs_size_bound_leaves_room_for_each_tensors_entry_key_escapes_and_dimensions(factors: Factors) -> None:
    """Each payload here has a header larger than the bound's fixed 64 KiB slack: the bound must grow with the
    number of tensors, with keys JSON escapes six bytes a character, and with the dimensions of their shapes, or a
    receiver refuses (TOO_LARGE, from the header) a payload that meets its spec."""
    assert len(encode_factors(factors)) <= FactorSpec.from_factors(factors).max_payload_bytes()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_factors_are_checked_for_nan_like_any_others_and_raise_nothing_but_payload_error(
    dtype: torch.dtype,
) -> None:
    # torch has no isfinite for some 8-bit floats: the check must still refuse NaN, with the documented error.
    finite = {"a": torch.tensor([1.0, -0.5]).to(dtype)}
    spec = FactorSpec.from_factors(finite)
    assert_bit_exact(decode_factors(encode_factors(finite), spec)[0], finite)
    with pytest.raises(PayloadError, match="NaN or infinite") as refused:
        decode_factors(encode_factors({"a": torch.tensor([1.0, math.nan]).to(dtype)}), spec)
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_a_factor_whose_norm_is_over_the_cap_is_refused_and_one_at_the_cap_is_not() -> None:
    spec = FactorSpec({"a": ((2,), "float32"), "b": ((1,), "bfloat16")})
    spec.check({"a": torch.tensor([3.0, 4.0]), "b": torch.ones(1, dtype=torch.bfloat16)}, max_norm=5.0)  # norm 5
    with pytest.raises(PayloadError, match=r"'a' has norm 5\.01, over the cap of 5") as refused:
        spec.check({"a": torch.tensor([3.0, 4.01]), "b": torch.ones(1, dtype=torch.bfloat16)}, max_norm=5.0)
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_a_complex_factor_whose_norm_is_over_the_cap_is_refused_like_a_real_one() -> None:
    """`check` caps the Frobenius norm of every floating or complex factor: |3+4j| is 5, so the cap of 5 holds and
    4.9 does not (a cap read for real dtypes only passed the real-valued test above)."""
    spec = FactorSpec({"c": ((1,), "complex64")})
    spec.check({"c": torch.tensor([3 + 4j], dtype=torch.complex64)}, max_norm=5.0)
    with pytest.raises(PayloadError, match=r"'c' has norm 5, over the cap of 4\.9") as refused:
        spec.check({"c": torch.tensor([3 + 4j], dtype=torch.complex64)}, max_norm=4.9)
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_a_complex_factor_holding_nan_or_inf_is_refused_like_a_real_one() -> None:
    spec = FactorSpec({"c": ((2,), "complex64")})
    spec.check({"c": torch.tensor([1 + 2j, 3 - 1j], dtype=torch.complex64)})
    for bad in (complex(math.nan, 0.0), complex(0.0, math.inf)):
        with pytest.raises(PayloadError, match="NaN or infinite") as refused:
            spec.check({"c": torch.tensor([1 + 2j, bad], dtype=torch.complex64)})
        assert refused.value.reason is Reason.BAD_PAYLOAD


def test_a_norm_whose_square_overflows_float32_is_still_measured_not_infinite() -> None:
    """The squares of float32 values of 3e20 overflow float32: summed there, every such factor would measure
    infinite and be refused whatever the cap."""
    spec = FactorSpec({"a": ((2,), "float32")})
    spec.check({"a": torch.tensor([3e20, 4e20])}, max_norm=6e20)
    with pytest.raises(PayloadError, match=r"'a' has norm 5e\+20, over the cap of 4e\+20"):
        spec.check({"a": torch.tensor([3e20, 4e20])}, max_norm=4e20)


def test_many_missing_keys_are_summarised_not_dumped() -> None:
    spec = FactorSpec({f"k{i:03d}": ((1,), "float32") for i in range(100)})
    with pytest.raises(PayloadError, match=r"100 missing \(k000, k001, k002 and 97 more\)"):
        spec.check({})


@pytest.mark.parametrize(
    "payload", [b"", b"\x00" * 8, b"\xff" * 64, b"not safetensors at all", b"\x02\x00\x00\x00\x00\x00\x00\x00[]"]
)
def test_garbage_is_refused_as_bad_payload(payload: bytes) -> None:
    with pytest.raises(PayloadError) as refused:
        decode_factors(payload)
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_truncated_payload_is_refused() -> None:
    with pytest.raises(PayloadError):
        decode_factors(encode_factors(lora_factors())[:-1])


def test_pickles_are_never_unpickled() -> None:
    import pickle

    class Boom:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (pytest.fail, ("a pickle was executed",))

    with pytest.raises(PayloadError):
        decode_factors(pickle.dumps(Boom()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_bytes_raise_nothing_but_payload_error(payload: bytes) -> None:
    with contextlib.suppress(PayloadError):
        decode_factors(payload, FactorSpec({"a": ((2,), "float32")}))


_VALID = encode_factors({"a": torch.arange(4.0), "b": torch.ones(2, 2, dtype=torch.bfloat16)}, {"k": "v"})


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8))
def test_corrupted_valid_payloads_raise_nothing_but_payload_error(edits: list[tuple[int, int]]) -> None:
    corrupted = bytearray(_VALID)
    for index, value in edits:
        corrupted[index] = value
    with contextlib.suppress(PayloadError):
        decode_factors(bytes(corrupted), FactorSpec.from_factors(decode_factors(_VALID)[0]))


# ------------------------------------------------------------------------------- chunks, reassembly


def reassemble(
    pieces: Sequence[bytes | memoryview], total_bytes: int, sha256: str, num_chunks: int | None = None, **caps: int
) -> bytes:
    assembler = Reassembler(total_bytes, sha256, len(pieces) if num_chunks is None else num_chunks, **caps)
    for piece in pieces:
        assembler.add(bytes(piece))
    return assembler.finish()


def test_digest_is_sha256_hex() -> None:
    assert digest(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_limits_are_one_mib_chunks_and_512_mib_payloads() -> None:
    assert MAX_CHUNK_BYTES == 1 << 20
    assert MAX_PAYLOAD_BYTES == 512 << 20


@pytest.mark.parametrize(
    ("size", "sizes"),
    [
        (0, []),
        (1, [1]),
        (MAX_CHUNK_BYTES, [MAX_CHUNK_BYTES]),
        (2 * MAX_CHUNK_BYTES, [MAX_CHUNK_BYTES, MAX_CHUNK_BYTES]),
        (2 * MAX_CHUNK_BYTES + 1, [MAX_CHUNK_BYTES, MAX_CHUNK_BYTES, 1]),
    ],
    ids=["empty", "one byte", "exactly one chunk", "exact multiple", "one over a multiple"],
)
def test_chunks_cover_the_payload_in_order_and_reassemble(size: int, sizes: list[int]) -> None:
    payload = payload_of(size)
    pieces = chunk(payload)
    assert [len(p) for p in pieces] == sizes
    assert chunk_count(size) == len(sizes)
    assert reassemble(pieces, size, digest(payload)) == payload


def test_chunks_of_a_smaller_size_also_reassemble() -> None:
    payload = payload_of(1000)
    assert reassemble(chunk(payload, 7), 1000, digest(payload)) == payload


@pytest.mark.parametrize("size", [0, MAX_CHUNK_BYTES + 1])
def test_chunk_size_must_be_within_the_cap(size: int) -> None:
    with pytest.raises(ValueError):
        chunk(b"abc", size)


def test_chunk_over_the_cap_is_refused_too_large() -> None:
    payload = payload_of(300)
    assembler = Reassembler(300, digest(payload), 2, max_chunk_bytes=200)
    with pytest.raises(PayloadError) as refused:
        assembler.add(payload[:201])
    assert refused.value.reason is Reason.TOO_LARGE


def test_declared_total_over_the_cap_is_refused_before_any_chunk() -> None:
    with pytest.raises(PayloadError) as refused:
        Reassembler(MAX_PAYLOAD_BYTES + 1, digest(b""), 513)
    assert refused.value.reason is Reason.TOO_LARGE
    with pytest.raises(PayloadError, match="cap of 100"):
        Reassembler(101, digest(b""), 1, max_payload_bytes=100)


def test_a_payload_of_exactly_the_cap_is_taken() -> None:
    payload = payload_of(100)
    assert reassemble(chunk(payload), 100, digest(payload), max_payload_bytes=100) == payload


def test_a_header_declaring_fewer_chunks_than_this_nodes_chunk_cap_allows_is_refused() -> None:
    """The fewest chunks a payload takes follow the receiver's chunk cap, not the default 1 MiB."""
    Reassembler(400, digest(b""), 2, max_chunk_bytes=200)
    with pytest.raises(PayloadError, match="cannot carry") as refused:
        Reassembler(401, digest(b""), 2, max_chunk_bytes=200)
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_more_bytes_than_declared_are_refused_before_being_kept() -> None:
    payload = payload_of(10)
    assembler = Reassembler(10, digest(payload), 2)
    assembler.add(payload[:6])
    with pytest.raises(PayloadError, match="more bytes than the 10 declared") as refused:
        assembler.add(payload[:6])
    assert refused.value.reason is Reason.BAD_PAYLOAD
    assert assembler.received_bytes == 6


def test_more_chunks_than_declared_are_refused() -> None:
    payload = payload_of(10)
    assembler = Reassembler(10, digest(payload), 2)
    assembler.add(payload[:3])
    assembler.add(payload[3:6])
    with pytest.raises(PayloadError, match="more chunks"):
        assembler.add(payload[6:])


def test_truncated_stream_is_refused() -> None:
    payload = payload_of(10)
    with pytest.raises(PayloadError, match="truncated") as refused:
        reassemble([payload[:5]], 10, digest(payload), num_chunks=2)
    assert refused.value.reason is Reason.BAD_PAYLOAD


@pytest.mark.parametrize(
    ("received", "num_chunks"),
    [(9, 1), (10, 2)],
    ids=["a byte short in the chunks declared", "every byte in fewer chunks than declared"],
)
def test_a_stream_short_of_either_declared_count_is_refused_even_when_its_digest_matches(
    received: int, num_chunks: int
) -> None:
    """The header's total and chunk count are promises, each checked on its own: a sender picks the digest too, so
    a matching digest does not stand in for either."""
    payload = payload_of(received)
    assembler = Reassembler(10, digest(payload), num_chunks)
    assembler.add(payload)
    with pytest.raises(PayloadError, match="truncated") as refused:
        assembler.finish()
    assert refused.value.reason is Reason.BAD_PAYLOAD


def test_digest_mismatch_is_refused() -> None:
    payload = payload_of(10)
    corrupted = b"\xff" + payload[1:]
    with pytest.raises(PayloadError) as refused:
        reassemble([corrupted], 10, digest(payload))
    assert refused.value.reason is Reason.DIGEST_MISMATCH


def test_empty_chunks_are_refused() -> None:
    with pytest.raises(PayloadError, match="empty chunk"):
        Reassembler(1, digest(b"a"), 1).add(b"")


@pytest.mark.parametrize(
    ("total", "sha", "num_chunks", "says"),
    [
        (10, "ABC", 1, "sha256"),
        (10, digest(b"").upper(), 1, "sha256"),
        (10, digest(b"") + "0", 1, "sha256"),
        (10, "0" + digest(b""), 1, "sha256"),
        (MAX_CHUNK_BYTES + 1, digest(b""), 1, "cannot carry"),
        (3, digest(b""), 4, "cannot carry"),
        (0, digest(b""), 1, "cannot carry"),
        (-1, digest(b""), 0, "negative"),
    ],
    ids=[
        "short digest",
        "uppercase digest",
        "long digest",
        "digest after a prefix",
        "too few chunks",
        "too many chunks",
        "chunks for nothing",
        "negative",
    ],
)
def test_inconsistent_headers_are_refused_as_bad_payload(total: int, sha: str, num_chunks: int, says: str) -> None:
    with pytest.raises(PayloadError, match=says) as refused:
        Reassembler(total, sha, num_chunks)
    assert refused.value.reason is Reason.BAD_PAYLOAD


# ----------------------------------------------------------------------------------- generated code


# The version stamps protoc writes: the protobuf gencode version (a comment and the runtime check's arguments) and
# GRPC_GENERATED_VERSION. They name the grpcio-tools release that ran, not the proto, so a new patch release on the
# registry must not make the committed code "stale"; what they demand of the runtime is checked against
# pyproject.toml's floors below instead.
_PROTOBUF_STAMP = re.compile(rb"(# Protobuf Python Version: )[0-9.]+|(Domain\.PUBLIC,\n)\s*\d+,\n\s*\d+,\n\s*\d+,\n")
_GRPC_STAMP = re.compile(rb"(GRPC_GENERATED_VERSION = )'[0-9.]+'")


def _unstamped(code: bytes) -> bytes:
    code = _PROTOBUF_STAMP.sub(lambda m: (m.group(1) or m.group(2)) + b"<version>", code)
    return _GRPC_STAMP.sub(rb"\1<version>", code)


def test_committed_protobuf_code_is_what_protoc_generates_now(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    subprocess.run(
        ["/bin/sh", str(REPO / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=env, capture_output=True
    )
    for name in GENERATED:
        fresh = _unstamped((tmp_path / name).read_bytes())
        committed = _unstamped((REPO / "node" / name).read_bytes())
        assert fresh == committed, f"node/{name} is stale: run scripts/gen_proto.sh and commit the result"


def test_a_stamp_is_replaced_and_nothing_else() -> None:
    code = (REPO / "node" / GENERATED[0]).read_bytes()
    assert b"<version>" in _unstamped(code)
    assert _unstamped(code.replace(b"node.proto", b"other.proto")) != _unstamped(code)


def _floor(requirement: str) -> tuple[int, ...]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.fullmatch(rf"{requirement}>=[0-9.]+", d)]
    return tuple(int(part) for part in spec.split(">=")[1].split("."))


def test_committed_protobuf_code_needs_no_newer_runtime_than_the_package_declares() -> None:
    # The generated code refuses to import under a grpcio or protobuf older than the tools that wrote it. Code written
    # by a newer grpcio-tools than the floors in pyproject.toml would fail on an install pip calls valid.
    grpc_code = (REPO / "node" / GENERATED[2]).read_text()
    stamp = re.search(r"GRPC_GENERATED_VERSION = '([0-9.]+)'", grpc_code)
    assert stamp is not None
    assert tuple(int(part) for part in stamp.group(1).split(".")) <= _floor("grpcio")
    pb_code = (REPO / "node" / GENERATED[0]).read_text()
    pb_stamp = re.search(r"Domain\.PUBLIC,\n\s*(\d+),\n\s*(\d+),\n\s*(\d+),", pb_code)
    assert pb_stamp is not None
    assert tuple(int(part) for part in pb_stamp.groups()) <= _floor("protobuf")


def test_a_spec_written_with_a_dtype_alias_is_the_spec_of_its_dtype() -> None:
    # torch.float is torch.float32: a spec naming it "float" must accept float32 factors and equal the spec that
    # says "float32", not refuse every payload with "has dtype float32, expected float".
    spec = FactorSpec({"a": ((2,), "float"), "b": ((1,), "half")})
    assert spec == FactorSpec({"a": ((2,), "float32"), "b": ((1,), "float16")})
    assert spec.fingerprint() == FactorSpec({"a": ((2,), "float32"), "b": ((1,), "float16")}).fingerprint()
    spec.check({"a": torch.zeros(2), "b": torch.zeros(1, dtype=torch.float16)})
