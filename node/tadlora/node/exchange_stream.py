"""An exchange's stream, as both sides send and read it: factors encoded within the cap, a payload as a header
and its chunks, and a stream read back (header, chunks, or an in-band refusal) into a verified payload.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING

from tadlora.node.pb_mapping import _header_from_pb, _peer_refusal
from tadlora.node.peer_checks import _check_node_id, check_sane
from tadlora.node.progress import Transfer
from tadlora.node.protocol_types import PROTOCOL_VERSION, ExchangeHeader
from tadlora.node.wire import Payload, PayloadError, Reason, Reassembler, chunk, chunk_count
from tadlora.v1 import node_pb2 as pb

if TYPE_CHECKING:
    from tadlora.node.protocol_types import Factors

# ---------------------------------------------------------------------------- the protocol, both sides


def _encode_capped(factors: Factors | Payload, max_payload_bytes: int) -> tuple[bytes, str]:
    """``factors`` encoded (or as already encoded), within the cap; in a worker thread, as encoding takes time."""
    payload = factors if isinstance(factors, Payload) else Payload.encode(factors)
    if len(payload.data) > max_payload_bytes:
        raise PayloadError(
            Reason.TOO_LARGE, f"own payload of {len(payload.data)} bytes is over the cap of {max_payload_bytes} bytes"
        )
    return payload.data, payload.sha256


def _payload_messages(
    header: ExchangeHeader, payload: bytes, sha256: str, progress: Transfer | None = None
) -> Iterator[pb.ExchangeMessage]:
    """Header, then the payload in chunks: lazily, so only the chunk in flight is copied; ``progress`` counts the
    bytes the transport has taken."""
    yield pb.ExchangeMessage(
        header=pb.ExchangeHeader(
            protocol_version=PROTOCOL_VERSION,
            node_id=header.node_id,
            cluster=header.cluster,
            fingerprint=header.fingerprint,
            round=header.round,
            degree=header.degree,
            total_bytes=len(payload),
            sha256=sha256,
            num_chunks=chunk_count(len(payload)),
            schedule=header.schedule,
        )
    )
    for piece in chunk(payload):
        yield pb.ExchangeMessage(chunk=bytes(piece))
        if progress is not None:
            progress.moved += len(piece)


async def _receive_payload(
    messages: AsyncIterable[pb.ExchangeMessage],
    *,
    max_payload_bytes: int,
    check: Callable[[pb.ExchangeHeader], None],
    opened: Callable[[pb.ExchangeHeader], None] | None = None,
    progress: Transfer | None = None,
) -> tuple[ExchangeHeader, bytes]:
    """Read a callee's reply, header + chunks (or a refusal, raised as `ExchangeRefused`), into a verified payload.
    ``opened`` is called once the reply opens with a header, before any check of it; ``progress`` follows its
    bytes."""
    iterator = aiter(messages)
    head = await _receive_header(iterator, check, from_callee=True, opened=opened)
    return await _receive_chunks(
        iterator, head, max_payload_bytes=max_payload_bytes, from_callee=True, progress=progress
    )


async def _receive_header(
    iterator: AsyncIterator[pb.ExchangeMessage],
    check: Callable[[pb.ExchangeHeader], None],
    *,
    from_callee: bool,
    opened: Callable[[pb.ExchangeHeader], None] | None = None,
) -> pb.ExchangeHeader:
    """Read a stream's first message: a header that passes the caps and ``check``, or, ``from_callee``, a refusal
    (raised). A caller has no refusal to send: in its stream one is BAD_PAYLOAD, never taken for this node's own
    (its reason would be counted here, its detail logged and sent back). ``opened``: called with the header once
    the stream is seen to open with one, before any check of it."""
    first = await anext(iterator, None)
    kind = None if first is None else first.WhichOneof("kind")
    if first is not None and kind == "refusal" and from_callee:
        raise _peer_refusal(first.refusal.reason, first.refusal.detail)
    if first is None or kind != "header":
        raise PayloadError(Reason.BAD_PAYLOAD, f"exchange stream opened with {kind or 'nothing'}, not a header")
    head = first.header
    if opened is not None:
        opened(head)
    texts = (head.node_id, head.cluster, head.fingerprint, head.sha256, head.schedule)
    check_sane("exchange header", round=head.round, degree=head.degree, texts=texts)
    _check_node_id(head.node_id, "exchange header")
    check(head)
    return head


async def _receive_chunks(
    iterator: AsyncIterator[pb.ExchangeMessage],
    head: pb.ExchangeHeader,
    *,
    max_payload_bytes: int,
    from_callee: bool,
    progress: Transfer | None = None,
) -> tuple[ExchangeHeader, bytes]:
    """Read the chunks ``head`` announced (or, ``from_callee``, a refusal, raised) into a verified payload;
    ``progress`` (if given) follows the bytes as they come."""
    assembler = Reassembler(head.total_bytes, head.sha256, head.num_chunks, max_payload_bytes=max_payload_bytes)
    progress = progress if progress is not None else Transfer()
    loop = asyncio.get_running_loop()
    progress.size, progress.began = head.total_bytes, loop.time()
    async for message in iterator:
        kind = message.WhichOneof("kind")
        if kind == "refusal" and from_callee:
            raise _peer_refusal(message.refusal.reason, message.refusal.detail)
        if kind != "chunk":
            raise PayloadError(Reason.BAD_PAYLOAD, f"unexpected {kind or 'empty message'} after the header")
        assembler.add(message.chunk)
        progress.moved = assembler.received_bytes
    progress.ended = loop.time()
    # finish() copies the whole payload (up to max_payload_bytes: ~0.1 s at 512 MiB): not on the event loop.
    return _header_from_pb(head), await asyncio.to_thread(assembler.finish)
