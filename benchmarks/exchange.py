"""Throughput of one full adapter exchange over real gRPC on 127.0.0.1, against raw gRPC streaming.

For adapters of about 1, 20 and 200 MB (dicts of float32 LoRA-shaped tensors), in one process and one event loop:

* exchange: `GrpcTransport` client -> `RpcServer` serving a handler that returns fixed factors of the same size;
  one push-pull `PeerClient.exchange` (encode + sha256 + chunking + protobuf + reassembly + decode with a
  `FactorSpec` on both ends). Bytes moved = payload sent + payload received.
* raw: a bare `grpc.aio` bidi stream on generic handlers (bytes in, bytes out, no protobuf, no safetensors, no
  hashing): the client streams the same number of bytes in 1 MiB chunks, the server keeps them, then streams as
  many back. Same bytes in both directions, same chunk size, same loop.
* encode / decode / sha256 alone: `encode_factors`, `decode_factors(payload, spec)`, `digest(payload)`.

Exchange, raw, encode, decode and sha256 runs take turns within each repetition, so load on the shared machine hits
all of them alike; the ratio exchange/raw (time) is the number to read, not the absolute bytes/s.

    .venv/bin/python benchmarks/exchange.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import torch
from _common import add_out_argument, run_main, write_results

from tadlora.node.grpc_transport import GrpcTransport
from tadlora.node.rpc import ExchangeHeader, PeerInfo, StatusInfo
from tadlora.node.wire import MAX_CHUNK_BYTES, FactorSpec, decode_factors, digest, encode_factors

CLUSTER = "bench"
FINGERPRINT = "sha256:" + "ab" * 32
RANK, WIDTH = 8, 4096  # each factor (8, 4096) or (4096, 8) float32 = 128 KiB
TIMEOUT_S = 600.0
RAW_METHOD = "/bench.Raw/Echo"
RAW_OPTIONS = (
    ("grpc.max_send_message_length", 4 << 20),
    ("grpc.max_receive_message_length", 4 << 20),
)
Factors = dict[str, torch.Tensor]


def make_factors(target_mb: float, seed: int) -> Factors:
    """LoRA-shaped float32 factors adding up to about ``target_mb`` MB (1 MB = 10^6 bytes)."""
    per_pair = 2 * RANK * WIDTH * 4
    pairs = max(1, round(target_mb * 1e6 / per_pair))
    gen = torch.Generator().manual_seed(seed)
    out: Factors = {}
    for i in range(pairs):
        prefix = f"base_model.model.layer.{i}.attention.query"
        out[f"{prefix}.lora_A.weight"] = torch.randn((RANK, WIDTH), generator=gen)
        out[f"{prefix}.lora_B.weight"] = torch.randn((WIDTH, RANK), generator=gen)
    return out


class FixedNode:
    """A `NodeHandler` that answers every exchange with the same factors (checked against their spec)."""

    def __init__(self, node_id: str, factors: Factors) -> None:
        self.info = PeerInfo(node_id=node_id, cluster=CLUSTER, fingerprint=FINGERPRINT, address=f"{node_id}:0",
                             round=0, degree=1, method="lora")  # fmt: skip
        self.factors = factors
        self.spec = FactorSpec.from_factors(factors)

    def local_info(self) -> PeerInfo:
        return self.info

    def expected_spec(self) -> FactorSpec | None:
        return self.spec

    def status(self) -> StatusInfo:
        return StatusInfo(node=self.info)

    async def async_handshake(self, remote: PeerInfo) -> None:
        return None

    async def async_exchange(self, header: ExchangeHeader, factors: Factors) -> Factors:
        return self.factors

    async def async_fetch(self, remote: PeerInfo) -> tuple[int, Factors]:
        return 0, self.factors


async def _raw_echo(request_iterator, context):  # type: ignore[no-untyped-def]
    parts = [chunk async for chunk in request_iterator]
    for part in parts:
        yield part


@contextlib.asynccontextmanager
async def raw_server() -> AsyncIterator[int]:
    """The raw echo server's port, the server stopped on the way out, however it is left: one left to the garbage
    collector (a Ctrl-C while it started) failed with "Event loop is closed" after asyncio.run had returned."""
    server = grpc.aio.server(options=RAW_OPTIONS)
    echo = grpc.stream_stream_rpc_method_handler(_raw_echo)
    handler = grpc.method_handlers_generic_handler("bench.Raw", {"Echo": echo})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    started = asyncio.ensure_future(server.start())
    try:
        await asyncio.shield(started)
        yield port
    finally:
        # Cancelled while it started (a Ctrl-C), it lets the start finish: grpc refuses to stop a server in the middle
        # of its start ("invalid state").
        await started
        await server.stop(None)


async def raw_roundtrip(channel: grpc.aio.Channel, payload: bytes) -> tuple[float, int]:
    """Stream ``payload`` in 1 MiB chunks and read the echo; (seconds, bytes moved both ways)."""
    call = channel.stream_stream(RAW_METHOD)
    view = memoryview(payload)

    def chunks():  # type: ignore[no-untyped-def]
        for start in range(0, len(view), MAX_CHUNK_BYTES):
            yield bytes(view[start : start + MAX_CHUNK_BYTES])  # the exchange also copies each chunk once

    started = time.perf_counter()
    received = 0
    async for part in call(chunks(), timeout=TIMEOUT_S):
        received += len(part)
    elapsed = time.perf_counter() - started
    assert received == len(payload), (received, len(payload))
    return elapsed, 2 * len(payload)


def timed(fn) -> float:  # type: ignore[no-untyped-def]
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


async def bench_size(target_mb: float, reps: int) -> dict[str, Any]:
    """One adapter size's measurements: medians, every repetition's times (``*_all``), the rates and the
    exchange/raw ratio; JSON-ready."""
    ours = make_factors(target_mb, seed=1)
    theirs = make_factors(target_mb, seed=2)
    spec = FactorSpec.from_factors(theirs)
    payload = encode_factors(ours)
    size = len(payload)
    transport = GrpcTransport()
    node = FixedNode("bob", theirs)
    me = FixedNode("alice", ours)
    header = ExchangeHeader.from_info(me.info)
    exch_times, raw_times, encode_times, decode_times, sha_times = [], [], [], [], []
    async with (
        raw_server() as raw_port,
        transport.serve(node, "127.0.0.1:0") as server,
        transport.connect(server.address) as client,
        grpc.aio.insecure_channel(f"127.0.0.1:{raw_port}", options=RAW_OPTIONS) as channel,
    ):
        await client.exchange(header, ours, TIMEOUT_S, spec)  # warm-up: connection, thread pool
        await raw_roundtrip(channel, payload)
        for _ in range(reps):
            gc.collect()
            result = await client.exchange(header, ours, TIMEOUT_S, spec)
            assert result.bytes_sent == size and result.bytes_received == len(encode_factors(theirs))
            exch_times.append(result.elapsed_s)
            gc.collect()
            elapsed, _ = await raw_roundtrip(channel, payload)
            raw_times.append(elapsed)
            # In the same repetition as the exchange they are a share of: measured after the loop, they
            # would divide one moment's costs by another's.
            encode_times.append(timed(lambda: encode_factors(ours)))
            decode_times.append(timed(lambda: decode_factors(payload, spec)))
            sha_times.append(timed(lambda: digest(payload)))
    encode_s = statistics.median(encode_times)
    decode_s = statistics.median(decode_times)
    sha_s = statistics.median(sha_times)
    moved = 2 * size
    exch = statistics.median(exch_times)
    rawt = statistics.median(raw_times)
    return {
        "target_mb": target_mb,
        "payload_bytes": size,
        "tensors": len(ours),
        "repetitions": reps,
        "exchange_s_median": exch,
        "exchange_s_all": exch_times,
        "raw_s_median": rawt,
        "raw_s_all": raw_times,
        "exchange_bytes_per_s": moved / exch,
        "raw_bytes_per_s": moved / rawt,
        "ratio_exchange_over_raw_time": exch / rawt,
        "encode_s": encode_s,
        "encode_s_all": encode_times,
        "decode_validate_s": decode_s,
        "decode_validate_s_all": decode_times,
        "sha256_s": sha_s,
        "sha256_s_all": sha_times,
        "encode_bytes_per_s": size / encode_s,
        "decode_validate_bytes_per_s": size / decode_s,
        "sha256_bytes_per_s": size / sha_s,
        # Each exchange encodes twice, decodes twice and hashes four times (both payloads, both ends).
        "share_of_exchange_in_encode_decode_sha": (2 * encode_s + 2 * decode_s + 4 * sha_s) / exch,
    }


async def main_async(sizes: list[tuple[float, int]]) -> list[dict[str, Any]]:
    out = []
    for mb, reps in sizes:
        print(f"-- {mb:g} MB x {reps}", flush=True)
        out.append(await bench_size(mb, reps))
    return out


HEADERS = ["payload MB", "tensors", "reps", "exchange MB/s", "raw gRPC MB/s", "exchange/raw time", "encode MB/s",
           "decode+validate MB/s", "sha256 MB/s", "encode+decode+sha share"]  # fmt: skip


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[tuple[Any, ...]]]:
    """The Markdown table's headers and rows, from the JSON's ``sizes``."""
    mb = 1e6
    rows = [
        (f"{r['payload_bytes'] / mb:.1f}", r["tensors"], r["repetitions"], r["exchange_bytes_per_s"] / mb,
         r["raw_bytes_per_s"] / mb, r["ratio_exchange_over_raw_time"], r["encode_bytes_per_s"] / mb,
         r["decode_validate_bytes_per_s"] / mb, r["sha256_bytes_per_s"] / mb,
         f"{100 * r['share_of_exchange_in_encode_decode_sha']:.0f}%")
        for r in results
    ]  # fmt: skip
    return HEADERS, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the 200 MB adapter, fewer repetitions")
    add_out_argument(parser)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = [(1.0, 5), (20.0, 3)] if args.quick else [(1.0, 10), (20.0, 5), (200.0, 2)]
    results = asyncio.run(main_async(sizes))
    headers, rows = table(results)
    notes = (
        "MB = 10^6 bytes. Throughput counts the bytes moved both ways (2 x payload) over the median wall time of "
        "one push-pull. Exchange, raw, encode, decode and sha256 take turns in each repetition (medians over the "
        "repetitions); the shared 2-core machine makes the absolute numbers noisy, read the ratio. "
        "'encode+decode+sha share' = (2 encodes + 2 decodes + 4 sha256) measured alone / exchange time: the part of "
        "an exchange that is local CPU work outside gRPC."
    )
    write_results("exchange", {"quick": args.quick, "sizes": results}, headers, rows, notes, out=args.out)


if __name__ == "__main__":
    sys.exit(run_main(main))
