"""How far an exchange got, and what a link that is too slow for it would need: pure bookkeeping and the words an
operator reads when an exchange runs into its deadline.

An exchange moves two payloads one after the other over one stream: the caller's, then the callee's reply (of the
same size: both ends run the same method). Each end fills in an `ExchangeProgress` as the bytes go and come, and
one cut short by a deadline is described by `describe`: what had moved, at what rate the payload this end was
receiving came, and so about how long the whole exchange needs at that rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Final

__all__ = ["ExchangeProgress", "Transfer", "describe", "size_text"]

# What an exchange needs at a measured rate is rounded up by this factor in the suggested --exchange-timeout: the
# rate of a shared link varies from round to round, and the round also holds the slower end's local steps.
TIMEOUT_HEADROOM: Final = 1.5


@dataclass(kw_only=True, eq=False)
class Transfer:
    """One payload on its way: its size in bytes (0 until its header says), the bytes moved so far (received; or,
    on the sending end, handed to the transport, which runs ahead of the wire by its buffers), the loop time its
    header went or came, and, on the receiving end, the loop time its last byte came (None: not yet)."""

    size: int = 0
    moved: int = 0
    began: float | None = None
    ended: float | None = None


@dataclass(kw_only=True, eq=False)
class ExchangeProgress:
    """How far one exchange got, seen from one end; filled in while it runs."""

    sent: Transfer = field(default_factory=Transfer)
    received: Transfer = field(default_factory=Transfer)

    def rate(self, now: float) -> float | None:
        """Bytes per second at which the payload this end receives came (measured where it arrives, so exact);
        None before any of it came."""
        got = self.received
        if got.began is None or got.moved <= 0:
            return None
        took = (got.ended if got.ended is not None else now) - got.began
        return got.moved / took if took > 0 else None

    def needed_s(self, now: float) -> float | None:
        """About how many seconds the exchange's two payloads need on the link at `rate` (one after the other, as
        they go), not counting the wait for the callee's round. A payload whose size is not known yet is taken as
        large as the other (the same method runs at both ends). None without a rate."""
        rate = self.rate(now)
        if rate is None:
            return None
        return ((self.sent.size or self.received.size) + (self.received.size or self.sent.size)) / rate


def size_text(n: int) -> str:
    """Bytes as a person reads them: 812 B, 64.0 KiB, 1.0 MiB, 2.5 GiB."""
    value, unit = float(n), "B"
    for bigger in ("KiB", "MiB", "GiB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def describe(progress: ExchangeProgress, now: float, timeout: float) -> tuple[str, bool]:
    """What an exchange cut at ``now`` by a deadline of ``timeout`` s had moved, and, where a rate was measured,
    what it needs and the --exchange-timeout to set; and whether the link is shown to be too slow for it (its
    payloads need more than ``timeout`` on it, whatever the wait for the peer's round). One sentence, no trailing
    period."""
    sent, got = progress.sent, progress.received
    parts = []
    if sent.size:
        parts.append(f"{size_text(sent.moved)} of {size_text(sent.size)} sent")
    if got.began is not None:
        parts.append(f"{size_text(got.moved)} of {size_text(got.size)} received")
    else:
        parts.append("nothing received yet")
    text = ", ".join(parts)
    rate, needed = progress.rate(now), progress.needed_s(now)
    if rate is None or needed is None:
        return text, False
    text += f" at {rate * 8 / 1e6:.3g} Mbit/s"
    if needed <= timeout:
        return text, False
    suggested = math.ceil(needed * TIMEOUT_HEADROOM)
    return (
        f"{text}: at that rate its two payloads need ~{needed:.0f} s on the link, over the {timeout:g} s of "
        "--exchange-timeout: "
        f"the link is too slow for this adapter; set --exchange-timeout {suggested} (or more) on every node, or "
        "send less (a smaller --lora-r)",
        True,
    )
