"""The bytes of an exchange: LoRA factors <-> safetensors payload, payload <-> chunks, and the checks on both.

Pure and free of I/O, so both transports (gRPC and in-memory) and the tests share it. Payloads from the network
are decoded with safetensors only; nothing here unpickles. Every rejection is a `PayloadError` carrying a
`Reason` that the receiving node sends back to its peer.

torch is imported by the functions that touch tensors, not by the module: `tadlora-node status` and `certs` use
the reasons, errors and caps here through the gRPC client, and a healthcheck should not pay torch's seconds-long
import (see `tadlora.node.entry`).
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Final, NamedTuple

if TYPE_CHECKING:
    import torch

__all__ = [
    "MAX_CHUNK_BYTES",
    "MAX_PAYLOAD_BYTES",
    "ExchangeRefused",
    "FactorSpec",
    "Payload",
    "PayloadError",
    "Reason",
    "Reassembler",
    "TensorSpec",
    "chunk",
    "chunk_count",
    "decode_factors",
    "digest",
    "dtype_name",
    "encode_factors",
]

MAX_CHUNK_BYTES: Final = 1 << 20  # bytes (1 MiB); TESTBED: streaming 1 MiB chunks is fastest, well under gRPC's 4 MiB
MAX_PAYLOAD_BYTES: Final = 512 << 20  # bytes (512 MiB); default cap on one payload, ~400x a rank-8 BERT-base LoRA

_SHA256_HEX: Final = re.compile(r"[0-9a-f]{64}")
_HEADER_LENGTH_BYTES: Final = 8  # safetensors: little-endian u64 length of the JSON header that follows
_LISTED_KEYS: Final = 3  # how many offending keys an error message names before summarising
_LISTED_KEY_CHARS: Final = 120  # chars of each (peft's keys for a 7B model's layers are about 70)
# Room for a safetensors header around the tensors' bytes, for `FactorSpec.max_payload_bytes`. Generous on purpose:
# the bound refuses a declared size that no payload of the spec can have (a 512 MiB header for a 2 MB adapter),
# it is no place to judge formatting. A tensor's entry is {"dtype":"BF16","shape":[..],"data_offsets":[a,b]}.
_HEADER_FIXED_SLACK_BYTES: Final = 64 << 10  # bytes: the length prefix, braces, __metadata__, alignment padding
_ENTRY_SLACK_BYTES: Final = 256  # bytes per tensor besides its key and shape: dtype, two offsets, punctuation
_KEY_ESCAPE_FACTOR: Final = 6  # JSON may write one byte of a key as six (\u00XX)
_DIM_CHARS: Final = 24  # chars per dimension of a shape: up to 20 digits and a comma, rounded up


class Reason(enum.IntEnum):
    """Why a peer, payload or request was refused; mirrors `tadlora.v1.RefusalReason` value for value."""

    UNSPECIFIED = 0
    PROTOCOL_MISMATCH = 1
    CLUSTER_MISMATCH = 2
    FINGERPRINT_MISMATCH = 3
    ROUND_MISMATCH = 4
    NOT_A_NEIGHBOR = 5
    BAD_PAYLOAD = 6
    DIGEST_MISMATCH = 7
    TOO_LARGE = 8
    SHUTTING_DOWN = 9
    DEADLINE = 10
    INTERNAL = 11
    IDENTITY_MISMATCH = 12
    BUSY = 13
    SCHEDULE_MISMATCH = 14


class ExchangeRefused(Exception):
    """A refusal with a reason code and a detail a person can act on; raised by either side of an exchange."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = Reason(reason)
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.reason.name}: {self.detail}"


class PayloadError(ExchangeRefused):
    """A payload that is malformed, off the expected spec, over a cap, or corrupted in transit."""


class TensorSpec(NamedTuple):
    """Shape and dtype name (as in `dtype_name`) that one factor must have."""

    shape: tuple[int, ...]
    dtype: str


def dtype_name(dtype: torch.dtype) -> str:
    """`torch.bfloat16` -> `"bfloat16"`: the spelling `FactorSpec` uses."""
    return str(dtype).removeprefix("torch.")


def _canonical_dtype_name(name: str) -> str | None:
    """`dtype_name` of the torch dtype ``name`` names ("float" -> "float32"); None if it names none."""
    import torch

    dtype = getattr(torch, name, None)
    return dtype_name(dtype) if isinstance(dtype, torch.dtype) else None


def _some(keys: set[str]) -> str:
    """A few of ``keys`` for a message, each cut to `_LISTED_KEY_CHARS`: they are a peer's (a payload's header
    may hold keys of 20,000 characters and still fit its size cap), and the message is logged and sent back."""
    listed = [
        k if len(k) <= _LISTED_KEY_CHARS else k[: _LISTED_KEY_CHARS - 3] + "..." for k in sorted(keys)[:_LISTED_KEYS]
    ]
    more = len(keys) - len(listed)
    return ", ".join(listed) + (f" and {more} more" if more else "")


@dataclass(frozen=True, init=False)
class FactorSpec:
    """The exact key set, shapes and dtypes a node accepts from its peers (a schema, as in hivemind)."""

    tensors: Mapping[str, TensorSpec]  # read-only, sorted by key

    def __init__(self, tensors: Mapping[str, tuple[Iterable[int], str]]) -> None:
        """`tensors` maps each factor key to (shape, dtype name), e.g. `{"...lora_A.weight": ((8, 768), "float32")}`."""
        entries: dict[str, TensorSpec] = {}
        for key, (shape, dtype) in tensors.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"factor keys must be non-empty strings, got {key!r}")
            dims = tuple(int(d) for d in shape)
            if any(d < 0 for d in dims):
                raise ValueError(f"factor {key!r}: negative dimension in shape {dims}")
            # Canonical, as `check` compares with `dtype_name`: an alias ("float", "half") would refuse every payload.
            canonical = _canonical_dtype_name(dtype)
            if canonical is None:
                raise ValueError(f"factor {key!r}: unknown dtype {dtype!r} (expected e.g. 'float32')")
            entries[key] = TensorSpec(dims, canonical)
        object.__setattr__(self, "tensors", MappingProxyType(dict(sorted(entries.items()))))

    def __hash__(self) -> int:
        return hash(tuple(self.tensors.items()))

    @classmethod
    def from_factors(cls, factors: Mapping[str, torch.Tensor]) -> FactorSpec:
        """The spec that `factors` satisfies (values aside)."""
        return cls({key: TensorSpec(tuple(t.shape), dtype_name(t.dtype)) for key, t in factors.items()})

    def max_payload_bytes(self) -> int:
        """The most bytes a safetensors payload (`encode_factors`) meeting this spec can take: its tensors' bytes
        plus generous room for the header. A payload declared larger cannot meet the spec, whatever it holds."""
        import torch

        data = sum(math.prod(s.shape) * int(getattr(torch, s.dtype).itemsize) for s in self.tensors.values())
        entries = sum(
            _ENTRY_SLACK_BYTES + _KEY_ESCAPE_FACTOR * len(key.encode()) + _DIM_CHARS * len(s.shape)
            for key, s in self.tensors.items()
        )
        return data + entries + _HEADER_FIXED_SLACK_BYTES

    def fingerprint(self) -> str:
        """sha256 hex of the canonical spec: equal for equal specs, on every machine."""
        canonical = json.dumps([[k, list(s.shape), s.dtype] for k, s in self.tensors.items()], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()

    def check(self, factors: Mapping[str, torch.Tensor], max_norm: float | None = None) -> None:
        """Raise `PayloadError(BAD_PAYLOAD)` unless `factors` has exactly these keys, shapes, dtypes, finite values
        and, with `max_norm`, no tensor of a Frobenius norm over it."""
        import torch

        missing = self.tensors.keys() - factors.keys()
        unexpected = factors.keys() - self.tensors.keys()
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"{len(missing)} missing ({_some(set(missing))})")
            if unexpected:
                parts.append(f"{len(unexpected)} unexpected ({_some(set(unexpected))})")
            raise PayloadError(Reason.BAD_PAYLOAD, "factor keys differ from the spec: " + "; ".join(parts))
        for key, spec in self.tensors.items():
            tensor = factors[key]
            if tuple(tensor.shape) != spec.shape:
                raise PayloadError(
                    Reason.BAD_PAYLOAD, f"factor {key!r} has shape {tuple(tensor.shape)}, expected {spec.shape}"
                )
            if dtype_name(tensor.dtype) != spec.dtype:
                raise PayloadError(
                    Reason.BAD_PAYLOAD, f"factor {key!r} has dtype {dtype_name(tensor.dtype)}, expected {spec.dtype}"
                )
            # torch has no isfinite for some 8-bit floats (float8_e4m3fn); float32 holds each of their values exactly.
            values = tensor.float() if tensor.is_floating_point() and tensor.element_size() == 1 else tensor
            if (tensor.is_floating_point() or tensor.is_complex()) and not bool(torch.isfinite(values).all()):
                raise PayloadError(Reason.BAD_PAYLOAD, f"factor {key!r} holds NaN or infinite values")
            if max_norm is not None and (tensor.is_floating_point() or tensor.is_complex()):
                norm = float(torch.linalg.vector_norm(tensor.detach().to(torch.float64 if tensor.is_floating_point()
                                                                          else torch.complex128)))  # fmt: skip
                if norm > max_norm:
                    raise PayloadError(
                        Reason.BAD_PAYLOAD, f"factor {key!r} has norm {norm:.3g}, over the cap of {max_norm:g}"
                    )


def encode_factors(factors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Serialize `factors` (any device, any layout) and str->str `metadata` as one safetensors payload."""
    import torch
    from safetensors.torch import save as safetensors_save

    prepared: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for key, tensor in factors.items():
        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            kinds = f"{type(key).__name__} -> {type(tensor).__name__}"
            raise TypeError(f"factors must map str to torch.Tensor, got {kinds}")
        flat = tensor.detach().to("cpu").contiguous()
        storage = flat.untyped_storage().data_ptr()
        if storage in storages and flat.numel():
            flat = flat.clone()  # safetensors refuses tensors that share memory (tied or sliced factors)
        storages.add(flat.untyped_storage().data_ptr())
        prepared[key] = flat
    return safetensors_save(prepared, metadata=dict(metadata) if metadata is not None else None)


@dataclass(frozen=True, eq=False, repr=False)
class Payload:
    """Factors encoded once (`encode_factors`) with their sha256 (`digest`). An exchange sends one as it is, so any
    number of exchanges can share one encoding: a node answering d neighbours with one snapshot holds it once,
    not d times (bytes are immutable, so sharing them is safe)."""

    data: bytes
    sha256: str

    @classmethod
    def encode(cls, factors: Mapping[str, torch.Tensor]) -> Payload:
        data = encode_factors(factors)
        return cls(data, digest(data))


def decode_factors(
    payload: bytes, expected: FactorSpec | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Decode a safetensors payload into CPU tensors and its metadata; with `expected`, enforce that spec.

    Any defect of the payload raises `PayloadError`; nothing else escapes, whatever the bytes.
    """
    from safetensors.torch import load as safetensors_load  # safetensors: parses, never executes

    data = bytes(payload)
    try:
        factors = safetensors_load(data)
    except Exception as exc:  # untrusted bytes: every failure is the sender's defect
        raise PayloadError(Reason.BAD_PAYLOAD, f"not a valid safetensors payload: {exc}") from exc
    metadata = _read_metadata(data)
    if expected is not None:
        expected.check(factors)
    return factors, metadata


def _read_metadata(data: bytes) -> dict[str, str]:
    # safetensors_load has already validated the header's framing and JSON; only __metadata__ is left.
    length = int.from_bytes(data[:_HEADER_LENGTH_BYTES], "little")
    try:
        header = json.loads(data[_HEADER_LENGTH_BYTES : _HEADER_LENGTH_BYTES + length], object_pairs_hook=_unique)
    except ValueError as exc:
        raise PayloadError(Reason.BAD_PAYLOAD, f"unreadable safetensors header: {exc}") from exc
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise PayloadError(Reason.BAD_PAYLOAD, "safetensors __metadata__ must map strings to strings")
    return metadata


def _unique(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object without repeated keys: two entries for one tensor would make the payload mean two things."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        repeated = {k for k, _ in pairs if k in seen or seen.add(k)}  # type: ignore[func-returns-value]
        raise ValueError(f"repeated keys in the header: {_some(repeated)}")
    return obj


def digest(payload: bytes | memoryview) -> str:
    """sha256 of the payload as lowercase hex, as carried in the exchange header."""
    return hashlib.sha256(payload).hexdigest()


def chunk_count(total_bytes: int, chunk_size: int = MAX_CHUNK_BYTES) -> int:
    """How many chunks `chunk` cuts a payload of `total_bytes` into (0 for an empty payload)."""
    return -(-total_bytes // chunk_size)


def chunk(payload: bytes | memoryview, chunk_size: int = MAX_CHUNK_BYTES) -> list[memoryview]:
    """Zero-copy slices of at most `chunk_size` bytes covering `payload`; none for an empty payload."""
    if not 0 < chunk_size <= MAX_CHUNK_BYTES:
        raise ValueError(f"chunk_size must be in 1..{MAX_CHUNK_BYTES} bytes, got {chunk_size}")
    view = memoryview(payload).cast("B")
    return [view[start : start + chunk_size] for start in range(0, len(view), chunk_size)]


class Reassembler:
    """Collects one payload's chunks and refuses anything that breaks the header's promises or this node's caps.

    Memory follows the bytes actually received (never more than the declared, capped total), whatever the chunk
    sizes: the payload is kept in one buffer, not as one object per chunk.
    """

    def __init__(
        self,
        total_bytes: int,
        sha256: str,
        num_chunks: int,
        *,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
        max_chunk_bytes: int = MAX_CHUNK_BYTES,
    ) -> None:
        if total_bytes > max_payload_bytes:
            raise PayloadError(
                Reason.TOO_LARGE, f"declared payload of {total_bytes} bytes is over the cap of {max_payload_bytes}"
            )
        if total_bytes < 0 or num_chunks < 0:
            raise PayloadError(Reason.BAD_PAYLOAD, "negative payload size or chunk count in header")
        if not _SHA256_HEX.fullmatch(sha256):
            raise PayloadError(Reason.BAD_PAYLOAD, "header sha256 is not 64 lowercase hex digits")
        fewest = chunk_count(total_bytes, max_chunk_bytes)
        if not fewest <= num_chunks <= total_bytes:
            raise PayloadError(
                Reason.BAD_PAYLOAD,
                f"{num_chunks} chunks cannot carry {total_bytes} bytes in chunks of 1..{max_chunk_bytes} bytes",
            )
        self.total_bytes = total_bytes
        self.num_chunks = num_chunks
        self._sha256 = sha256
        self._max_chunk_bytes = max_chunk_bytes
        self._hash = hashlib.sha256()
        # One growing buffer, not a list of chunks: a peer picks the chunk sizes, and kept one object apiece, 2-byte
        # chunks would cost ~25 times the payload in object headers. Not reserved ahead: the size is only declared.
        self._buffer = bytearray()
        self._chunks = 0
        self._received = 0

    @property
    def received_bytes(self) -> int:
        return self._received

    def add(self, data: bytes) -> None:
        """Take the next chunk, or raise `PayloadError` (TOO_LARGE, BAD_PAYLOAD) before keeping any of it."""
        size = len(data)
        if size > self._max_chunk_bytes:
            raise PayloadError(Reason.TOO_LARGE, f"chunk of {size} bytes is over the cap of {self._max_chunk_bytes}")
        if size == 0:
            raise PayloadError(Reason.BAD_PAYLOAD, "empty chunk")
        if self._chunks >= self.num_chunks:
            raise PayloadError(Reason.BAD_PAYLOAD, f"more chunks than the {self.num_chunks} declared")
        if self._received + size > self.total_bytes:
            raise PayloadError(
                Reason.BAD_PAYLOAD, f"more bytes than the {self.total_bytes} declared ({self._received + size} so far)"
            )
        self._hash.update(data)
        self._buffer += data
        self._chunks += 1
        self._received += size

    def finish(self) -> bytes:
        """The whole payload, once every declared byte has arrived and its sha256 matches the header's."""
        if self._received != self.total_bytes or self._chunks != self.num_chunks:
            raise PayloadError(
                Reason.BAD_PAYLOAD,
                f"payload truncated: {self._received} of {self.total_bytes} bytes "
                f"in {self._chunks} of {self.num_chunks} chunks",
            )
        actual = self._hash.hexdigest()
        if actual != self._sha256:
            raise PayloadError(Reason.DIGEST_MISMATCH, f"payload sha256 is {actual}, header says {self._sha256}")
        payload = bytes(self._buffer)
        self._buffer = bytearray()
        return payload
