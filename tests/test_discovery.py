"""Discovery: mDNS peers on 127.0.0.1 only, the --peers grammar, static peers, --mdns-interface.

mDNS SAFETY: every zeroconf instance here binds 127.0.0.1, IPv4 only; nothing multicasts on a real interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest.mock import patch

import pytest
from zeroconf import DNSOutgoing, DNSPointer, IPVersion, ServiceStateChange, _core
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
from zeroconf.const import _CLASS_IN, _FLAGS_AA, _FLAGS_QR_RESPONSE, _TYPE_PTR

import netns
from netns import Testbed
from tadlora.adapter import FINGERPRINT_PARTS_MAX_CHARS
from tadlora.node import discovery, netif
from tadlora.node.discovery import SERVICE_TYPE, Advertisement, MdnsDiscovery, PeerCandidate, service_instance_name
from tadlora.node.doctor import async_browse
from tadlora.node.netif import InterfaceError, interface_addresses
from tadlora.node.peerspec import PeersOption, StaticPeers, parse_peers_option

LOOPBACK = ["127.0.0.1"]
UNSPECIFIED = "0.0.0.0"  # noqa: S104 -- only passed in to check that it is refused
WAIT_S = 5.0  # s; generous bound for one discovery step on loopback (they take well under 0.5 s)
# s; a drop this soon is the goodbye's doing: expiry needs the 120 s host TTL / 75 min PTR TTL. Generous because the
# machine is shared: how fast a goodbye lands is not what the tests check, only that it, not expiry, drops the peer.
GOODBYE_BOUND_S = 30.0
REAL_TIMERS_WAIT_S = 30.0  # s; with RFC 6762 pacing (probing alone ~1.2 s) peers meet in ~2 s on an idle machine


@pytest.fixture
def quick_timing() -> Iterator[None]:
    """zeroconf's own test idiom: shrink probe/announce/goodbye intervals; loopback needs no RFC 6762 pacing."""
    with (
        patch.object(_core, "_CHECK_TIME", 10),
        patch.object(_core, "_REGISTER_TIME", 10),
        patch.object(_core, "_UNREGISTER_TIME", 10),
        patch.object(_core, "_PROBE_RANDOM_DELAY_INTERVAL", (1, 5)),
    ):
        yield


@dataclass(frozen=True)
class Names:
    """Node ids unique to one test: other test runs on this machine share 127.0.0.1:5353 and may be announcing."""

    tag: str

    def __call__(self, name: str) -> str:
        return f"{name}-{self.tag}"

    def ours(self, candidates: dict[str, PeerCandidate]) -> dict[str, PeerCandidate]:
        return {node_id: c for node_id, c in candidates.items() if node_id.endswith(f"-{self.tag}")}


@pytest.fixture
def n() -> Names:
    return Names(uuid.uuid4().hex[:8])


def advert(node_id: str, port: int = 50051, **overrides: object) -> Advertisement:
    fields: dict[str, object] = {
        "node_id": node_id,
        "port": port,
        "cluster": "lab",
        "fingerprint": "ab12",
        "protocol_version": 1,
        "secure": False,
    }
    fields.update(overrides)
    return Advertisement(**fields)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def running(*adverts: Advertisement) -> AsyncIterator[list[MdnsDiscovery]]:
    """Start one MdnsDiscovery per advert on 127.0.0.1 (concurrently) and always close them all."""
    nodes = [MdnsDiscovery(a, LOOPBACK) for a in adverts]
    try:
        await asyncio.gather(*(node.async_start() for node in nodes))
        yield nodes
    finally:
        await asyncio.gather(*(node.aclose() for node in nodes))


def raw_info(name: str, properties: dict[str, str], port: int = 40000) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"{name}.{SERVICE_TYPE}",
        port=port,
        properties=properties,
        server=f"{name}-raw.local.",
        addresses=LOOPBACK,
    )


@contextlib.asynccontextmanager
async def raw_responder(*infos: AsyncServiceInfo) -> AsyncIterator[AsyncZeroconf]:
    """Register services with arbitrary TXT through plain zeroconf (on 127.0.0.1), as a foreign responder would."""
    async with AsyncZeroconf(interfaces=LOOPBACK, ip_version=IPVersion.V4Only) as aiozc:
        for announced in await asyncio.gather(*(aiozc.async_register_service(info) for info in infos)):
            await announced
        yield aiozc


@contextlib.asynccontextmanager
async def pointer_spammer(aiozc: AsyncZeroconf, alias: str, every_s: float = 0.2) -> AsyncIterator[None]:
    """Announce a bare PTR ``SERVICE_TYPE -> alias`` (as any host on the LAN may) every ``every_s`` s meanwhile."""
    out = DNSOutgoing(_FLAGS_QR_RESPONSE | _FLAGS_AA)
    out.add_answer_at_time(DNSPointer(SERVICE_TYPE, _TYPE_PTR, _CLASS_IN, 4500, alias), 0)

    async def spam() -> None:
        while True:
            aiozc.zeroconf.async_send(out)
            await asyncio.sleep(every_s)

    task = asyncio.ensure_future(spam())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# Names a PTR of our type may point at that zeroconf cannot resolve as one of our instances (BadTypeInName).
FOREIGN_ALIASES = ["x._other._tcp.local.", "Upper._TADLORA._TCP.LOCAL."]


class LogWaiter(logging.Handler):
    """Lets a test await a log record instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []
        self._event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self._event.set()

    async def wait_for_message(self, fragment: str, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while not any(fragment in r.getMessage() for r in self.records):
                self._event.clear()
                await self._event.wait()


@pytest.fixture
def discovery_log() -> Iterator[LogWaiter]:
    waiter = LogWaiter()
    logger = logging.getLogger("tadlora.discovery")
    logger.addHandler(waiter)
    try:
        yield waiter
    finally:
        logger.removeHandler(waiter)


# ---------------------------------------------------------------------------------------------------------------
# mDNS on 127.0.0.1


@pytest.mark.asyncio
async def test_two_nodes_find_each_other_with_address_port_and_txt_but_not_themselves(
    quick_timing: None, n: Names
) -> None:
    async with running(advert(n("alpha"), 50051), advert(n("beta"), 50052, secure=True)) as (a, b):
        seen_by_a = n.ours(await a.async_wait_for(lambda c: n("beta") in c, WAIT_S))
        seen_by_b = n.ours(await b.async_wait_for(lambda c: n("alpha") in c, WAIT_S))
    assert seen_by_a == {
        n("beta"): PeerCandidate(
            node_id=n("beta"),
            address="127.0.0.1:50052",
            cluster="lab",
            fingerprint="ab12",
            protocol_version=1,
            secure=True,
            source="mdns",
            service_name=f"{n('beta')}@lab.{SERVICE_TYPE}",
        )
    }
    assert set(seen_by_b) == {n("alpha")}
    assert seen_by_b[n("alpha")].address == "127.0.0.1:50051"
    assert seen_by_b[n("alpha")].secure is False


@pytest.mark.asyncio
async def test_with_real_zeroconf_timers_peers_meet_and_a_goodbye_drops_before_any_ttl_could_expire(
    n: Names,
) -> None:
    async with running(advert(n("alpha"), 50051), advert(n("beta"), 50052)) as (a, b):
        await a.async_wait_for(lambda c: n("beta") in c, REAL_TIMERS_WAIT_S)
        await b.async_wait_for(lambda c: n("alpha") in c, REAL_TIMERS_WAIT_S)
        await b.aclose()
        await a.async_wait_for(lambda c: n("beta") not in c, GOODBYE_BOUND_S)  # raises TimeoutError past the bound


def sees_exactly(node_ids: set[str], n: Names) -> Callable[[dict[str, PeerCandidate]], bool]:
    return lambda candidates: set(n.ours(candidates)) == node_ids


@pytest.mark.asyncio
async def test_three_nodes_each_see_exactly_the_other_two(quick_timing: None, n: Names) -> None:
    ids = (n("n1"), n("n2"), n("n3"))
    async with running(*(advert(i, 50061 + k) for k, i in enumerate(ids))) as nodes:
        for node_id, node in zip(ids, nodes, strict=True):
            others = set(ids) - {node_id}
            seen = n.ours(await node.async_wait_for(sees_exactly(others, n), WAIT_S))
            assert {c.address for c in seen.values()} == {f"127.0.0.1:{50061 + ids.index(i)}" for i in others}


@pytest.mark.asyncio
async def test_a_node_started_later_finds_the_nodes_already_running(quick_timing: None, n: Names) -> None:
    async with running(advert(n("early"), 50141)) as (early,), running(advert(n("late"), 50142)) as (late,):
        seen = await late.async_wait_for(lambda c: n("early") in c, WAIT_S)
        await early.async_wait_for(lambda c: n("late") in c, WAIT_S)
    assert seen[n("early")].address == "127.0.0.1:50141"


@pytest.mark.asyncio
async def test_a_closed_node_is_dropped_promptly_by_its_goodbye(quick_timing: None, n: Names) -> None:
    async with running(advert(n("stay"), 50071), advert(n("leave"), 50072)) as (stay, leave):
        await stay.async_wait_for(lambda c: n("leave") in c, WAIT_S)
        closed_at = time.monotonic()
        await leave.aclose()
        await stay.async_wait_for(lambda c: n("leave") not in c, GOODBYE_BOUND_S)
        dropped_after = time.monotonic() - closed_at
    assert dropped_after < GOODBYE_BOUND_S  # far inside the 120 s host TTL: the goodbye did it, not expiry


@pytest.mark.asyncio
async def test_on_change_is_called_when_a_peer_appears_and_leaves(quick_timing: None, n: Names) -> None:
    snapshots: list[set[str]] = []
    seer = MdnsDiscovery(advert(n("seer")), LOOPBACK, on_change=lambda: snapshots.append(set(seer.candidates())))
    async with seer:
        async with running(advert(n("visitor"), 50081)):
            await seer.async_wait_for(lambda c: n("visitor") in c, WAIT_S)
        await seer.async_wait_for(lambda c: n("visitor") not in c, WAIT_S)
    visits = [n("visitor") in snapshot for snapshot in snapshots]
    assert True in visits
    assert visits[-1] is False


@pytest.mark.asyncio
async def test_a_txt_update_refreshes_the_candidate(quick_timing: None, n: Names) -> None:
    async with running(advert(n("watcher")), advert(n("changer"), 50091)) as (watcher, changer):
        await watcher.async_wait_for(lambda c: n("changer") in c, WAIT_S)
        await changer.async_update(advert(n("changer"), 50092, fingerprint="cafe", protocol_version=2))
        seen = await watcher.async_wait_for(lambda c: c[n("changer")].fingerprint == "cafe", WAIT_S)
        with pytest.raises(ValueError, match="node id"):
            await changer.async_update(advert(n("someone-else")))
    assert seen[n("changer")].protocol_version == 2
    assert seen[n("changer")].address == "127.0.0.1:50092"


@pytest.mark.asyncio
async def test_other_cluster_and_fingerprint_are_still_reported_so_the_node_can_say_why(
    quick_timing: None, n: Names
) -> None:
    stranger = advert(n("stranger"), 50101, cluster="other", fingerprint="ffff00", protocol_version=7, secure=True)
    async with running(advert(n("local")), stranger) as (local, _):
        seen = await local.async_wait_for(lambda c: n("stranger") in c, WAIT_S)
    candidate = seen[n("stranger")]
    assert (candidate.cluster, candidate.fingerprint, candidate.protocol_version, candidate.secure) == (
        "other",
        "ffff00",
        7,
        True,
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("clusters", [("lab-a", "lab-b"), ("Lab", "lab")])  # DNS names compare ignoring case
async def test_two_clusters_nodes_of_one_id_are_both_announced_each_at_its_own_address_and_port(
    quick_timing: None, n: Names, clusters: tuple[str, str]
) -> None:
    # Ids are unique only within a cluster: two clusters' "node-0" on one network must not share an mDNS instance or
    # host name, or one hides the other or takes its address. Distinct advertised addresses make a shared host name
    # (whose A records would mix) show up as a wrong address.
    twin, (one, other) = n("twin"), clusters
    expected = {(one, "127.0.0.2:41001"), (other, "127.0.0.3:41002")}
    a = advert(twin, 41001, cluster=one, advertise_address="127.0.0.2")
    b = advert(twin, 41002, cluster=other, advertise_address="127.0.0.3")
    async with running(a, b):
        deadline = asyncio.get_running_loop().time() + WAIT_S * 4
        while True:  # a browse may come before both have finished announcing
            browsed = await async_browse(LOOPBACK, 1.0)
            seen = {(c.cluster, c.address) for c in browsed.candidates if c.node_id == twin}
            if seen == expected or asyncio.get_running_loop().time() > deadline:
                break
    assert seen == expected
    names = {c.service_name for c in browsed.candidates if c.node_id == twin}
    assert names == {f"{service_instance_name(twin, c)}.{SERVICE_TYPE}" for c in clusters}
    assert f"{twin}@lab-a.{SERVICE_TYPE}" in names or one == "Lab"  # tame names are readable as they are


@pytest.mark.asyncio
async def test_another_clusters_node_of_our_id_is_not_logged_as_claiming_it(
    quick_timing: None, n: Names, discovery_log: LogWaiter
) -> None:
    """Only a node of our own cluster under our id is an impostor, or a misconfiguration, worth a warning
    (`test_another_service_claiming_our_node_id_is_ignored_with_a_warning`)."""
    twin = n("twin")
    lab_a, watcher_advert = advert(twin, 41011, cluster="lab-a"), advert(n("watcher"), 41013, cluster="lab-a")
    async with running(lab_a, watcher_advert) as (_, watcher), running(advert(twin, 41012, cluster="lab-b")):
        # Started after lab-a's twin has its name, so that twin resolves the other as a peer would.
        await watcher.async_wait_for(lambda _: {c.cluster for c in watcher._by_service.values()} >= {"lab-b"}, WAIT_S)
        await asyncio.sleep(2.0)  # the twins resolve each other about as fast as the watcher resolves them
    assert not [r.getMessage() for r in discovery_log.records if "claims our node id" in r.getMessage()]


@pytest.mark.asyncio
async def test_malformed_txt_is_ignored_with_a_logged_reason_and_browsing_goes_on(
    quick_timing: None, n: Names, discovery_log: LogWaiter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tadlora.discovery")
    ok_txt = advert("x").txt()
    no_fp, bad_proto, fixed_later = n("no-fp"), n("bad-proto"), n("fixed-later")
    broken = [
        raw_info(no_fp, {"id": no_fp, "cluster": "lab", "proto": "1", "sec": "tls"}),
        raw_info(bad_proto, {**ok_txt, "id": bad_proto, "proto": "one"}),
        raw_info(fixed_later, {"id": fixed_later}),
    ]
    async with running(advert(n("observer"))) as (observer,), raw_responder(*broken) as foreign:
        for name in (no_fp, bad_proto, fixed_later):
            await discovery_log.wait_for_message(name, WAIT_S)
        # Still broken after a refresh: not logged again.
        await (await foreign.async_update_service(raw_info(fixed_later, {"id": fixed_later, "cluster": "c"})))
        # The browser survived: a well-formed peer arriving later is found, and so is a broken one once fixed.
        await (await foreign.async_update_service(raw_info(fixed_later, {**ok_txt, "id": fixed_later})))
        await observer.async_wait_for(lambda c: fixed_later in c, WAIT_S)
        # Counted up to its fix, which ends "broken" (a later broken TXT is logged anew): three TXTs within a second
        # may all stay in the observer's cache (RFC 6762 §10.2 keeps records younger than 1 s on a cache flush), so
        # a resolution after the fix may still read an older one. Seen once in a suite run under heavy load.
        while_broken = [r.getMessage() for r in caplog.records if fixed_later in r.getMessage()]
        async with running(advert(n("late-but-fine"), 50111)):
            seen = await observer.async_wait_for(lambda c: {n("late-but-fine"), fixed_later} <= set(c), WAIT_S)
    assert set(n.ours(seen)) == {n("late-but-fine"), fixed_later}
    messages = [r.getMessage() for r in caplog.records if r.name == "tadlora.discovery"]
    assert any(no_fp in m and "lacks fp" in m for m in messages), messages
    assert any(bad_proto in m and "proto='one'" in m for m in messages), messages
    assert len(while_broken) == 1, while_broken  # once per service, not per refresh


@pytest.mark.asyncio
async def test_a_peer_whose_txt_turns_to_unicode_digits_is_dropped_without_an_error(
    quick_timing: None, n: Names, caplog: pytest.LogCaptureFixture
) -> None:
    """str.isdigit() holds for '²', which int() refuses: the TXT must be refused, not crash its resolution and
    leave the peer's previous candidate standing."""
    caplog.set_level(logging.WARNING, logger="tadlora.discovery")
    shifty = n("shifty")
    good = advert(shifty).txt()
    async with running(advert(n("watcher"))) as (watcher,), raw_responder(raw_info(shifty, good)) as foreign:
        await watcher.async_wait_for(lambda c: shifty in c, WAIT_S)
        await (await foreign.async_update_service(raw_info(shifty, {**good, "proto": "\u00b2"})))
        await watcher.async_wait_for(lambda c: shifty not in c, WAIT_S)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records


@pytest.mark.asyncio
async def test_another_service_claiming_our_node_id_is_ignored_with_a_warning(
    quick_timing: None, n: Names, discovery_log: LogWaiter
) -> None:
    me = advert(n("me"), 50131)
    async with running(me) as (node,), raw_responder(raw_info(n("impostor"), me.txt(), port=50132)):
        await discovery_log.wait_for_message("claims our node id", WAIT_S)
        assert n("me") not in node.candidates()
    assert any(n("impostor") in r.getMessage() and "127.0.0.1:50132" in r.getMessage() for r in discovery_log.records)


@pytest.mark.asyncio
async def test_a_node_started_under_the_id_of_one_already_announced_warns_too(
    n: Names, discovery_log: LogWaiter
) -> None:
    """The node that comes second under a taken id is the one to fix, and it browses before its own name is
    registered (RFC 6762 probing, ~1.2 s, so real timings here): the first node's service, resolved in that time, was
    dropped without a word, and only the first node warned."""
    me = advert(n("me"), 50133)
    async with raw_responder(raw_info(n("first"), me.txt(), port=50134)), running(me) as (node,):
        await discovery_log.wait_for_message("claims our node id", REAL_TIMERS_WAIT_S)
        assert n("me") not in node.candidates()
    assert any(n("first") in r.getMessage() and "127.0.0.1:50134" in r.getMessage() for r in discovery_log.records)


@pytest.mark.asyncio
@pytest.mark.parametrize("alias", FOREIGN_ALIASES)
async def test_a_pointer_to_a_name_that_is_not_our_service_is_ignored_with_one_warning_not_an_error(
    quick_timing: None, n: Names, discovery_log: LogWaiter, caplog: pytest.LogCaptureFixture, alias: str
) -> None:
    """Anyone on the LAN can announce a PTR of our type to any name: it must be refused like a bad TXT, not fail
    its resolution with a traceback at ERROR each time it is announced."""
    caplog.set_level(logging.WARNING, logger="tadlora.discovery")
    fine = n("fine")
    async with (
        running(advert(n("observer"))) as (observer,),
        raw_responder(raw_info(fine, advert(fine).txt())) as foreign,
        pointer_spammer(foreign, alias),
    ):
        await discovery_log.wait_for_message("not an instance of", WAIT_S)
        await observer.async_wait_for(lambda c: fine in c, WAIT_S)  # the browser goes on
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.records
    ignored = [r.getMessage() for r in discovery_log.records if "not an instance of" in r.getMessage()]
    assert len(ignored) == 1 and repr(alias) in ignored[0], ignored


@pytest.mark.asyncio
async def test_a_rebind_keeps_the_peers_it_had_seen_listed_throughout_and_is_seen_again_by_them(
    quick_timing: None, n: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rebind (the host renumbered) closes zeroconf and opens it again: its own view must not blink, or the
    node would drop every peer mid-round; the peers drop it at its goodbye and find it again at once. The view is
    sampled through the rebind and for a while past the handover's end, when only the new browser's own sighting
    can keep the peer listed. (Here that sighting takes about 1 s: the peer answered the old browser's query less
    than a second before, and RFC 6762 §6 holds back a record's next multicast for that long.)"""
    monkeypatch.setattr(discovery, "REBIND_GRACE_S", 2.0)
    async with running(advert(n("mover"), 50151), advert(n("peer"), 50152)) as (mover, peer):
        await mover.async_wait_for(lambda c: n("peer") in c, WAIT_S)
        await peer.async_wait_for(lambda c: n("mover") in c, WAIT_S)
        views: list[set[str]] = []

        async def sample(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                views.append(set(n.ours(mover.candidates())))
                await asyncio.sleep(0.005)

        sampler = asyncio.ensure_future(sample(60.0))
        try:
            await mover.async_rebind(LOOPBACK, advert(n("mover"), 50153))
        finally:
            sampler.cancel()
        await sample(discovery.REBIND_GRACE_S + 1.0)
        seen = await peer.async_wait_for(lambda c: n("mover") in c and c[n("mover")].address.endswith(":50153"), WAIT_S)
    assert len(views) > 10
    assert all(view == {n("peer")} for view in views), [v for v in views if v != {n("peer")}][:3]
    assert seen[n("mover")].service_name == f"{n('mover')}@lab.{SERVICE_TYPE}"  # the same name: no rename


@pytest.mark.asyncio
async def test_a_peer_that_leaves_while_a_node_rebinds_is_dropped_when_the_handover_ends(
    quick_timing: None, n: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its goodbye went out while the mover had no browser: the handed-over entry must not stay for ever."""
    monkeypatch.setattr(discovery, "REBIND_GRACE_S", 1.0)
    changes: list[float] = []
    mover = MdnsDiscovery(advert(n("mover")), LOOPBACK, on_change=lambda: changes.append(time.monotonic()))
    async with mover, running(advert(n("stay"), 50161), advert(n("leave"), 50162)) as (_stay, leave):
        await mover.async_wait_for(sees_exactly({n("stay"), n("leave")}, n), WAIT_S)
        # The two halves of a rebind, with a goodbye between them that no browser of the mover's can hear. The clock
        # is read before the unbind: it arms the grace timer first, then sends its own goodbyes (which take a while).
        unbound_at = time.monotonic()
        await mover._async_unbind()
        await leave.aclose()
        assert set(n.ours(mover.candidates())) == {n("stay"), n("leave")}  # handed over
        await mover._async_bind(name=None)
        await mover.async_wait_for(sees_exactly({n("stay")}, n), WAIT_S)
        dropped_at = time.monotonic()
    assert dropped_at - unbound_at >= 1.0  # the handover's end dropped it, not a goodbye
    assert changes and changes[-1] >= unbound_at + 1.0  # and told the owner, so that it rescans


@pytest.mark.asyncio
async def test_moves_that_keep_failing_do_not_keep_the_handed_over_peers_listed_past_the_grace(
    quick_timing: None, n: Names, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed move leaves discovery unbound, and its owner tries again at every look (5 s, under the 10 s grace).
    Each retry leaves a binding that saw nothing: it must not start the grace again for the peers seen before the
    first move, or a peer that left meanwhile stays listed for as long as the moves fail."""
    monkeypatch.setattr(discovery, "REBIND_GRACE_S", 1.0)
    mover = MdnsDiscovery(advert(n("mover")), LOOPBACK)
    async with mover, running(advert(n("peer"), 50171)):
        await mover.async_wait_for(sees_exactly({n("peer")}, n), WAIT_S)

        def unusable(*args: object, **kwargs: object) -> AsyncZeroconf:
            raise OSError(99, "Cannot assign requested address")

        monkeypatch.setattr(discovery, "AsyncZeroconf", unusable)
        first = time.monotonic()
        while time.monotonic() - first < 2.5 * discovery.REBIND_GRACE_S:
            with pytest.raises(OSError, match="mDNS cannot use"):
                await mover.async_rebind(LOOPBACK)
            listed = set(n.ours(mover.candidates()))
            if time.monotonic() - first > discovery.REBIND_GRACE_S + 0.5:
                assert listed == set(), "the handover outlived its grace"
            await asyncio.sleep(0.1)


@pytest.mark.asyncio
async def test_an_event_from_the_binding_being_left_is_not_acted_on(quick_timing: None, n: Names) -> None:
    """The old browser lives on while a move sends its goodbyes. An event it delivers then used to start a resolution
    on the old zeroconf whose answer landed in the new binding's list, where no browser would ever remove it: a
    peer that left at that moment stayed listed. Here the old browser's event is delivered during the goodbyes."""
    ghost = f"{n('ghost')}.{SERVICE_TYPE}"
    async with running(advert(n("mover"))) as (mover,):
        aiozc = mover._aiozc
        assert aiozc is not None
        old = aiozc.zeroconf
        real_unregister = aiozc.async_unregister_service
        started: list[bool] = []

        async def goodbyes_with_a_late_event(info: AsyncServiceInfo) -> Awaitable[None]:
            mover._on_service_state_change(old, SERVICE_TYPE, ghost, ServiceStateChange.Added)
            started.append(ghost in mover._resolving)
            return await real_unregister(info)

        aiozc.async_unregister_service = goodbyes_with_a_late_event  # type: ignore[method-assign]
        await mover.async_rebind(LOOPBACK)
        assert started == [False]  # the old binding's event was ignored
        assert mover._aiozc is not None and mover._aiozc.zeroconf is not old
        mover._on_service_state_change(mover._aiozc.zeroconf, SERVICE_TYPE, ghost, ServiceStateChange.Added)
        assert ghost in mover._resolving  # the new binding's events count


@pytest.mark.asyncio
async def test_rebind_refuses_another_node_id_a_foreign_address_and_a_closed_discovery(
    quick_timing: None, n: Names
) -> None:
    async with running(advert(n("mover"))) as (mover,):
        with pytest.raises(ValueError, match="node id"):
            await mover.async_rebind(LOOPBACK, advert(n("someone-else")))
        with pytest.raises(ValueError, match="not an address of this host"):
            await mover.async_rebind(["203.0.113.9"])
    with pytest.raises(RuntimeError, match="not running"):
        await mover.async_rebind(LOOPBACK)
    with pytest.raises(RuntimeError, match="not running"):
        await MdnsDiscovery(advert(n("idle")), LOOPBACK).async_rebind(LOOPBACK)


@pytest.mark.asyncio
async def test_close_is_idempotent_and_leaves_no_tasks_or_threads(quick_timing: None, n: Names) -> None:
    await asyncio.to_thread(int)  # the loop's default executor (discovery reads interfaces there) is the loop's own
    threads_before = set(threading.enumerate())
    tasks_before = asyncio.all_tasks()
    a = MdnsDiscovery(advert(n("tidy-a")), LOOPBACK)
    b = MdnsDiscovery(advert(n("tidy-b"), 50121), LOOPBACK)
    async with a, b:
        await a.async_wait_for(lambda c: n("tidy-b") in c, WAIT_S)
    await a.aclose()
    await b.aclose()
    assert asyncio.all_tasks() == tasks_before
    assert set(threading.enumerate()) == threads_before
    with pytest.raises(RuntimeError, match="once"):
        await a.async_start()


@pytest.mark.asyncio
async def test_closing_a_never_started_discovery_is_harmless() -> None:
    await MdnsDiscovery(advert("idle"), LOOPBACK).aclose()


@pytest.mark.parametrize("interfaces", [[], [UNSPECIFIED], ["224.0.0.251"], ["eth0"], ["::1"], ["203.0.113.9"]])
def test_mdns_refuses_anything_but_unicast_ipv4_addresses_of_this_host(interfaces: list[str]) -> None:
    with pytest.raises(ValueError, match="interface"):
        MdnsDiscovery(advert("x"), interfaces)


# ---------------------------------------------------------------------------------------------------------------
# TXT and names, on literal inputs


def _resolved(properties: dict[str, str] | dict[bytes, bytes], addresses: list[str] | None = None) -> AsyncServiceInfo:
    return AsyncServiceInfo(
        SERVICE_TYPE,
        f"peer.{SERVICE_TYPE}",
        port=50051,
        properties=properties,
        server="peer.local.",
        addresses=LOOPBACK if addresses is None else addresses,
    )


GOOD_TXT = {"id": "peer", "cluster": "lab", "fp": "ab12", "proto": "3", "sec": "tls"}


def test_a_well_formed_service_becomes_a_candidate() -> None:
    assert discovery.candidate_from_info(_resolved(GOOD_TXT)) == PeerCandidate(
        "peer", "127.0.0.1:50051", "lab", "ab12", 3, True, "mdns", f"peer.{SERVICE_TYPE}"
    )


def test_the_schedule_travels_in_the_txt_record_and_an_advert_without_it_parses_as_empty() -> None:
    """Nodes of another schedule refuse each other at handshake; the advert says it, so that a node need not dial
    them. An older node's advert has no ``sched`` key: its schedule is "" (unknown, not compared)."""
    schedule = "tad T=5 p=0.5 max-neighbors=all"
    txt = advert("peer", schedule=schedule).txt()
    assert txt["sched"] == schedule
    parsed = discovery.candidate_from_info(_resolved(txt))
    assert isinstance(parsed, PeerCandidate) and parsed.schedule == schedule
    assert "sched" not in advert("peer").txt()  # an advert built without one publishes none, as an older node
    old = discovery.candidate_from_info(_resolved(GOOD_TXT))
    assert isinstance(old, PeerCandidate) and old.schedule == ""


PARTS = "model=minilm labels=negative,positive lora=r8/a16/d0/query+value seed=0 init=portable weights=#1a03c612"


@pytest.mark.parametrize(
    "garbage",
    ["", "not parts", "seed=1 seed=2", "seed=0\nfp=ff", "seed=\x1b[2J", "init=portable  seed=0", "Seed=0"],
    ids=["empty", "no '='", "a key twice", "a line break", "a control character", "two spaces", "uppercase key"],
)
def test_the_fingerprint_parts_travel_in_the_txt_record_and_a_missing_or_bad_fpp_is_passed_over(garbage: str) -> None:
    """A node passes over an advert of another fingerprint naming the parts that differ, from ``fpp``. An advert
    without it (an older node) or with one that is not a parts text (anyone on the LAN may announce anything) is a
    candidate as before, with no parts: the key only helps say why a peer cannot be one."""
    txt = advert("peer", fingerprint_parts=PARTS).txt()
    assert txt["fpp"] == PARTS
    parsed = discovery.candidate_from_info(_resolved(txt))
    assert isinstance(parsed, PeerCandidate) and parsed.fingerprint_parts == PARTS
    assert "fpp" not in advert("peer").txt()  # an advert built without them publishes none, as an older node
    for properties in (GOOD_TXT, {**GOOD_TXT, "fpp": garbage}):
        candidate = discovery.candidate_from_info(_resolved(properties))
        assert candidate == dataclasses.replace(parsed, fingerprint="ab12", protocol_version=3, secure=True,
                                                fingerprint_parts="")  # fmt: skip


@pytest.mark.parametrize("garbage", ["0.1.0 (evil)", "0.1\n0", "1" * 65], ids=["a space", "a line break", "too long"])
def test_the_release_travels_in_the_txt_record_and_a_missing_or_bad_rel_is_passed_over(garbage: str) -> None:
    """The release is only said (a passed-over advert of another protocol names it), so an advert without ``rel``
    (an older node) or with one that is no version is a candidate as before, with none."""
    txt = advert("peer", release="0.2.0rc1").txt()
    assert txt["rel"] == "0.2.0rc1"
    parsed = discovery.candidate_from_info(_resolved(txt))
    assert isinstance(parsed, PeerCandidate) and parsed.release == "0.2.0rc1"
    assert "rel" not in advert("peer").txt()  # an advert built without one publishes none, as an older node
    for properties in (GOOD_TXT, {**GOOD_TXT, "rel": garbage}):
        candidate = discovery.candidate_from_info(_resolved(properties))
        assert isinstance(candidate, PeerCandidate) and candidate.release == ""
    with pytest.raises(ValueError, match="not a version"):
        advert("peer", release=garbage)


def test_the_longest_fingerprint_parts_fit_one_txt_string() -> None:
    longest = "model=" + "m" * (FINGERPRINT_PARTS_MAX_CHARS - len("model="))
    assert len(f"fpp={longest}".encode()) <= 255
    assert discovery.candidate_from_info(_resolved(advert("peer", fingerprint_parts=longest).txt())).fingerprint_parts \
        == longest  # fmt: skip


@pytest.mark.asyncio
async def test_a_browsed_advert_carries_its_schedule_and_fingerprint_parts(quick_timing: None, n: Names) -> None:
    schedule = "lora T=none p=1.0 max-neighbors=3"
    beta = advert(n("beta"), 50052, schedule=schedule, fingerprint_parts=PARTS)
    async with running(advert(n("alpha")), beta) as (a, b):
        seen_by_a = await a.async_wait_for(lambda c: n("beta") in c, WAIT_S)
        seen_by_b = await b.async_wait_for(lambda c: n("alpha") in c, WAIT_S)
    assert (seen_by_a[n("beta")].schedule, seen_by_a[n("beta")].fingerprint_parts) == (schedule, PARTS)
    assert (seen_by_b[n("alpha")].schedule, seen_by_b[n("alpha")].fingerprint_parts) == ("", "")


def test_of_a_peer_s_addresses_the_one_on_this_node_s_subnets_is_the_one_dialled() -> None:
    """An interface may carry addresses on several subnets (a secondary address), and an advert lists them all:
    the first one, taken blindly, may be one this node has no route to, and the peer is never reached."""
    info = _resolved(GOOD_TXT, addresses=["10.1.0.5", "192.168.7.5"])
    first = discovery.candidate_from_info(info)
    assert isinstance(first, PeerCandidate) and first.address == "10.1.0.5:50051"  # nothing known: zeroconf's first
    assert first.alternates == ("192.168.7.5:50051",)
    near = discovery.candidate_from_info(info, [ipaddress.IPv4Network("192.168.7.0/24")])
    assert isinstance(near, PeerCandidate) and near.address == "192.168.7.5:50051"
    assert near.alternates == ("10.1.0.5:50051",)  # still tried, if the one on our subnet does not answer


def test_an_advert_naming_hundreds_of_addresses_is_dialled_at_the_first_few_the_nearest_first() -> None:
    """Each address of an advert is dialled in turn, up to a handshake timeout each, and a scan waits for them: an
    advert (anyone on the LAN may send one, copying a node's TXT) naming 303 addresses held every scan for about 25
    minutes, and no other peer was verified meanwhile. Now `MAX_ADVERT_ADDRESSES` of them, ours first."""
    many = [f"10.9.{i // 250}.{i % 250 + 1}" for i in range(300)] + ["192.168.7.5", "192.168.7.6", "192.168.7.7"]
    cand = discovery.candidate_from_info(_resolved(GOOD_TXT, addresses=many), [ipaddress.IPv4Network("192.168.7.0/24")])
    assert isinstance(cand, PeerCandidate)
    assert (cand.address, *cand.alternates) == ("192.168.7.5:50051", "192.168.7.6:50051", "192.168.7.7:50051",
                                                "10.9.0.1:50051")  # fmt: skip
    assert discovery.MAX_ADVERT_ADDRESSES == 4


@pytest.mark.asyncio
async def test_a_peer_announcing_several_addresses_is_taken_at_the_one_on_the_mdns_interface_s_subnet(
    quick_timing: None, n: Names
) -> None:
    multi = n("multi")
    info = AsyncServiceInfo(
        SERVICE_TYPE, f"{multi}.{SERVICE_TYPE}", port=40000, properties={**advert("x").txt(), "id": multi},
        server=f"{multi}-raw.local.", addresses=["198.51.100.7", "127.0.0.1"],
    )  # fmt: skip
    async with running(advert(n("observer"))) as (observer,), raw_responder(info):
        seen = await observer.async_wait_for(lambda c: multi in c, WAIT_S)
    assert seen[multi].address == "127.0.0.1:40000"


@pytest.mark.parametrize(
    ("txt", "reason"),
    [
        ({k: v for k, v in GOOD_TXT.items() if k not in ("fp", "sec")}, "lacks fp, sec"),
        ({**GOOD_TXT, "id": ""}, "lacks id"),
        ({**GOOD_TXT, "proto": "1.5"}, "proto='1.5' is not a non-negative integer"),
        ({**GOOD_TXT, "proto": "-1"}, "not a non-negative integer"),
        ({**GOOD_TXT, "proto": "\u00b2"}, "not a non-negative integer"),  # isdigit(), yet int() refuses it
        ({**GOOD_TXT, "proto": "\u0661"}, "not a non-negative integer"),  # int() reads 1: a second spelling of 1
        ({**GOOD_TXT, "fp": "xyz"}, "fp='xyz' is not hex"),
        ({**GOOD_TXT, "sec": "maybe"}, "neither 'tls' nor 'insecure'"),
    ],
)
def test_malformed_txt_gives_a_reason_instead_of_a_candidate(txt: dict[str, str], reason: str) -> None:
    result = discovery.candidate_from_info(_resolved(txt))
    assert isinstance(result, str)
    assert reason in result


def test_non_utf8_txt_and_missing_ipv4_are_reasons_too() -> None:
    raw = {k.encode(): v.encode() for k, v in GOOD_TXT.items()} | {b"id": b"\xff\xfe"}
    assert "not UTF-8" in str(discovery.candidate_from_info(_resolved(raw)))
    assert "no IPv4" in str(discovery.candidate_from_info(_resolved(GOOD_TXT, addresses=["::1"])))


@pytest.mark.parametrize(
    "node_id",
    ["Peer", "PEER", "peer.", "pe.er", "-peer", "peer\n2026-01-01 INFO forged", "../peer", "p" * 64],
)
def test_a_txt_id_in_any_spelling_but_the_canonical_one_is_refused(node_id: str) -> None:
    """TLS would accept 'peer''s certificate for 'PEER' or 'peer.': one certificate must not make two peers."""
    result = discovery.candidate_from_info(_resolved({**GOOD_TXT, "id": node_id}))
    assert isinstance(result, str)
    assert "TXT id" in result and "\n" not in result  # quoted with repr: a newline cannot forge a log line


@pytest.mark.parametrize("multicast", ["224.0.0.251", "239.255.255.250"])
def test_a_multicast_address_is_never_a_peer_address(multicast: str) -> None:
    assert "no unicast IPv4" in str(discovery.candidate_from_info(_resolved(GOOD_TXT, addresses=[multicast])))
    both = discovery.candidate_from_info(_resolved(GOOD_TXT, addresses=[multicast, "127.0.0.1"]))
    assert isinstance(both, PeerCandidate) and both.address == "127.0.0.1:50051"


@pytest.mark.asyncio
async def test_a_service_name_is_logged_quoted_so_it_cannot_forge_log_lines(
    quick_timing: None, n: Names, discovery_log: LogWaiter
) -> None:
    bad = n("bad")  # zeroconf refuses to send control characters in a name, but another stack may not
    async with raw_responder(raw_info(bad, {**GOOD_TXT, "id": "x\nforged"})), running(advert(n("w"))):
        await discovery_log.wait_for_message(bad, WAIT_S)
    [message] = [r.getMessage() for r in discovery_log.records if bad in r.getMessage()]
    assert "\n" not in message and f"service '{bad}.{SERVICE_TYPE}'" in message and "TXT id" in message


def test_instance_names_are_id_at_cluster_when_tame_and_a_unique_short_label_otherwise() -> None:
    assert service_instance_name("node-7_a", "lab") == "node-7_a@lab"
    assert service_instance_name("node-0", "lab-a") != service_instance_name("node-0", "lab-b")
    long_a, long_b = "x" * 70 + "a", "x" * 70 + "b"
    assert len(service_instance_name(long_a, "lab").encode()) <= 63
    assert service_instance_name(long_a, "lab") != service_instance_name(long_b, "lab")
    assert service_instance_name("node", "x" * 60 + "a") != service_instance_name("node", "x" * 60 + "b")
    assert service_instance_name("gpu box/1", "lab") != service_instance_name("gpu-box-1", "lab")
    assert service_instance_name("gpu box/1", "lab").startswith("gpu-box-1@lab-")
    # "@" is the separator, so an id or cluster holding one is hashed: ("a@b", "c") and ("a", "b@c") differ.
    assert service_instance_name("a@b", "c") != service_instance_name("a", "b@c")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"port": 0}, "port"),
        ({"fingerprint": "not-hex"}, "fingerprint"),
        ({"node_id": ""}, "node_id"),
        ({"advertise_address": UNSPECIFIED}, "advertise_address"),
        ({"advertise_address": "host.example"}, "advertise_address"),
        ({"cluster": "c" * 300}, "TXT entry"),
        ({"schedule": "s" * 300}, "TXT entry"),
        ({"fingerprint_parts": "s=" + "s" * 253}, "TXT entry"),  # a parts text of 255 chars: 259 bytes with "fpp="
        ({"fingerprint_parts": "seed 0"}, "fingerprint_parts"),
    ],
)
def test_an_advertisement_refuses_what_it_could_not_announce(overrides: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {"node_id": "n", "port": 1, "cluster": "lab", "fingerprint": "ab", **overrides}
    with pytest.raises(ValueError, match=message):
        Advertisement(protocol_version=1, secure=True, **fields)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# --peers and static peers


def test_peers_auto_alone_enables_mdns_only() -> None:
    assert parse_peers_option("auto") == PeersOption(auto=True, static=(), dns=())


def test_peers_mixes_auto_static_and_dns_entries_in_order_without_duplicates() -> None:
    parsed = parse_peers_option(
        " auto, 10.0.0.2:50051,dns:tadlora.default.svc:50051, [::1]:7000,node-b.local:7000,10.0.0.2:50051,dns:peers.lab"
    )
    assert parsed == PeersOption(
        auto=True,
        static=("10.0.0.2:50051", "[::1]:7000", "node-b.local:7000"),
        dns=("tadlora.default.svc:50051", "peers.lab"),
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "--peers needs"),
        (" , ", "--peers needs"),
        ("auto,,10.0.0.2:1", "empty entry"),
        ("10.0.0.2", "expected HOST:PORT"),
        (":50051", "expected HOST:PORT"),
        ("10.0.0.2:0", "1..65535"),
        ("10.0.0.2:65536", "1..65535"),
        ("10.0.0.2:http", "1..65535"),
        ("999.0.0.1:50051", "neither an IPv4 address nor a host name"),
        ("bad_host:50051", "neither an IPv4 address nor a host name"),
        ("::1:50051", "need brackets"),
        ("[::1]50051", r"expected \[IPv6\]:PORT"),
        ("[not-v6]:50051", "not an IPv6 address"),
        ("dns:", "dns: needs a DNS name"),
        ("dns:10.0.0.1", "dns: needs a DNS name"),
        ("dns:svc.lab:99999", "1..65535"),
        # An empty label makes getaddrinfo raise UnicodeError (the idna codec), which no lookup expects.
        ("dns:tadlora..lab", "dns: needs a DNS name"),
        ("dns:tadlora.lab..", "dns: needs a DNS name"),
        ("node-b.lab..:7000", "neither an IPv4 address nor a host name"),
        # str.isdigit() holds for '²', which int() refuses with a message that names no entry.
        ("10.0.0.2:²", "1..65535"),
        ("dns:svc.lab:²", "1..65535"),
        ("10.0.0.2:80x", "1..65535"),  # digits first: a prefix match would leave int() to fail naming nothing
        ("fe80::1", "need brackets"),
        # RFC 1035 labels: 1-63 letters, digits or '-', neither first nor last; names of at most 253 characters
        ("-node.lab:7000", "neither an IPv4 address nor a host name"),
        ("node-.lab:7000", "neither an IPv4 address nor a host name"),
        ("n" * 64 + ".lab:7000", "neither an IPv4 address nor a host name"),
        ("n." * 126 + "nn:7000", "neither an IPv4 address nor a host name"),
    ],
)
def test_peers_refuses_bad_entries_with_a_message_naming_them(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_peers_option(value)


def test_host_names_at_the_rfc_1035_limits_are_taken() -> None:
    longest_label, longest_name = "n" * 63 + ".lab", "n." * 126 + "n"  # 63 characters; 253
    parsed = parse_peers_option(f"{longest_label}:1,{longest_name}:2")
    assert parsed.static == (f"{longest_label}:1", f"{longest_name}:2")


def test_a_fully_qualified_name_with_one_trailing_dot_is_a_host_name() -> None:
    assert parse_peers_option("dns:tadlora.lab.,node-b.lab.:7000") == PeersOption(
        auto=False, static=("node-b.lab.:7000",), dns=("tadlora.lab.",)
    )


def test_static_peers_parse_ipv4_host_names_and_bracketed_ipv6() -> None:
    peers = StaticPeers.parse("10.0.0.2:50051, gpu-2.lab:50051 ,[2001:DB8::0001]:443")
    assert peers.addresses == ("10.0.0.2:50051", "gpu-2.lab:50051", "[2001:db8::1]:443")


@pytest.mark.parametrize("value", ["", "10.0.0.2:50051,", "10.0.0.2", "fe80::1:50051", "[fe80::1]", "a b:1"])
def test_static_peers_refuse_bad_entries(value: str) -> None:
    with pytest.raises(ValueError, match="peer"):
        StaticPeers.parse(value)


# ---------------------------------------------------------------------------------------------------------------
# --mdns-interface


def test_an_interface_address_maps_to_itself() -> None:
    assert interface_addresses("127.0.0.1") == ["127.0.0.1"]


def test_an_interface_name_maps_to_its_ipv4_addresses() -> None:
    assert "127.0.0.1" in interface_addresses("lo")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (UNSPECIFIED, "not 0.0.0.0"),
        ("203.0.113.77", "no local interface has this address"),
        ("no-such-if0", "no such interface"),
        ("::1", "IPv6 address, but mDNS here is IPv4 only"),  # not "no such interface '::1'"
        ("fe80::1%lo", "IPv6 address, but mDNS here is IPv4 only"),
    ],
)
def test_an_interface_that_is_not_one_of_ours_is_refused(spec: str, message: str) -> None:
    with pytest.raises(InterfaceError, match=message):
        interface_addresses(spec)


ROUTES_HEADER = "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"


def test_the_default_route_interfaces_are_read_lowest_metric_first() -> None:
    table = ROUTES_HEADER + (
        "wlan0\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
        "eth0\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
        "down0\t00000000\t01010101\t0002\t0\t0\t0\t00000000\t0\t0\t0\n"
    )
    assert netif._default_route_interfaces(table) == ["eth0", "wlan0"]


def test_no_interface_means_the_default_route_interface(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    routes = tmp_path / "route"
    routes.write_text(ROUTES_HEADER + "lo\t00000000\t00000000\t0001\t0\t0\t0\t00000000\t0\t0\t0\n")
    monkeypatch.setattr(netif, "_ROUTE_TABLE", routes)
    assert interface_addresses(None) == ["127.0.0.1"]


def test_of_several_default_routes_the_lowest_metric_s_interface_alone_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host with wired and Wi-Fi default routes: mDNS goes on the one the kernel uses, and the node announces its
    address there only (announced on both, the other network would be told an address it may not reach)."""
    by_name = netif.ipv4_by_interface()
    other = next((name for name, addrs in by_name.items() if addrs and name != "lo"), None)
    if other is None or not by_name.get("lo"):
        pytest.skip("needs lo and one more interface with an IPv4 address")
    routes = tmp_path / "route"
    for first, second in (("lo", other), (other, "lo")):
        routes.write_text(
            ROUTES_HEADER
            + f"{second}\t00000000\t0101A8C0\t0003\t0\t0\t600\t00000000\t0\t0\t0\n"
            + f"{first}\t00000000\t010200C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        )
        monkeypatch.setattr(netif, "_ROUTE_TABLE", routes)
        assert interface_addresses(None) == by_name[first]


@pytest.fixture
def no_default_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host with no IPv4 default route (only lo's own), nor an IPv6 one (this host's own may have one)."""
    routes = tmp_path / "route"
    routes.write_text(ROUTES_HEADER + "lo\t0000007F\t00000000\t0001\t0\t0\t0\t000000FF\t0\t0\t0\n")
    monkeypatch.setattr(netif, "_ROUTE_TABLE", routes)
    ipv6_routes = tmp_path / "ipv6_route"
    ipv6_routes.write_text("")
    monkeypatch.setattr(netif, "_IPV6_ROUTE_TABLE", ipv6_routes)


def test_no_default_route_and_no_interface_but_loopback_is_a_clear_error(
    no_default_route: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(netif, "ipv4_by_interface", lambda: {"lo": ["127.0.0.1"], "eth0": []})
    with pytest.raises(InterfaceError, match="no IPv4 default route; choose one with --mdns-interface"):
        interface_addresses(None)


def test_no_default_route_takes_the_one_interface_with_an_address_and_a_link(
    no_default_route: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A LAN testbed or an air-gapped lab has no default route: --peers auto was an error there unless every node
    was given --mdns-interface. The one interface with an IPv4 address and a link is the LAN; a bridge with nothing
    attached (docker0 with no container) has no link, and loopback is never it."""
    interfaces = {"lo": ["127.0.0.1"], "eth0": ["10.0.0.5"], "docker0": ["172.17.0.1"], "wlan0": []}
    monkeypatch.setattr(netif, "ipv4_by_interface", lambda: interfaces)
    monkeypatch.setattr(netif, "has_link", lambda name: name != "docker0")
    assert interface_addresses(None) == ["10.0.0.5"]
    # Two with a link: which network the peers are on is the user's to say.
    monkeypatch.setattr(netif, "has_link", lambda name: True)
    with pytest.raises(InterfaceError) as refused:
        interface_addresses(None)
    assert str(refused.value) == (
        "no IPv4 default route to choose by, and 2 interfaces with an IPv4 address and a link: docker0 (172.17.0.1), "
        "eth0 (10.0.0.5); choose the peers' one with --mdns-interface (a name or an address)"
    )


def test_an_interface_s_link_is_read_from_sys_class_net(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, flags, operstate in [("up0", "0x1003", "up"), ("lo", "0x9", "unknown"), ("cable0", "0x1003", "down"),
                                   ("off0", "0x1002", "down"), ("bad0", "garbage", "up")]:  # fmt: skip
        (tmp_path / name).mkdir()
        (tmp_path / name / "flags").write_text(flags + "\n")
        (tmp_path / name / "operstate").write_text(operstate + "\n")
    monkeypatch.setattr(netif, "SYS_NET", tmp_path)
    linked = [n for n in ("up0", "lo", "cable0", "off0", "bad0", "gone0") if netif.has_link(n)]
    assert linked == ["up0", "lo", "bad0", "gone0"]  # unreadable: counted as linked (no sysfs, a sandbox)


testbeds = netns.testbeds  # the fixture


@pytest.mark.netns
def test_an_interface_that_exists_without_an_ipv4_address_is_named_as_such_not_as_missing(
    testbeds: Callable[[int], Testbed],
) -> None:
    """An interface whose DHCP lease has not come yet is there: "no such interface" would send the user looking
    for a typo. Checked in a namespace of our own, whose veth1 has its address removed."""
    bed = testbeds(1)
    [host] = bed.hosts
    assert bed.run(host, "ip", "addr", "flush", "dev", host.interface).returncode == 0
    code = (
        "from tadlora.node.netif import InterfaceError, interface_addresses\n"
        "try:\n"
        f"    interface_addresses({host.interface!r})\n"
        "except InterfaceError as exc:\n"
        "    print(exc)\n"
    )
    result = bed.run(host, sys.executable, "-c", code)
    assert result.returncode == 0, result.stderr
    assert f"--mdns-interface {host.interface!r} has no IPv4 address" in result.stdout, result.stdout
