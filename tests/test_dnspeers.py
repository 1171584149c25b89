"""`--peers dns:NAME[:PORT]`: a name's A/AAAA records are followed as they appear and disappear, and two nodes
find each other through a name."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from tadlora.node.daemon import Node
from tadlora.node.dnspeers import DnsPeers, host_port, resolve_addresses, split_name
from tadlora.node.peerspec import PeersOption
from test_daemon import NO_PEERS, _rounds, node_config, run_all

FAST_S = 0.01  # s between lookups in tests (the real interval is seconds)


class FakeResolver:
    """A DNS server in a dict: name -> IPs, or an exception to raise; counts lookups."""

    def __init__(self, records: dict[str, list[str] | Exception]) -> None:
        self.records = records
        self.lookups = 0
        self._looked_up = asyncio.Condition()

    async def wait_for_lookups(self, n: int) -> None:
        async with self._looked_up:
            await self._looked_up.wait_for(lambda: self.lookups >= n)

    async def __call__(self, host: str, port: int) -> list[str]:
        async with self._looked_up:
            self.lookups += 1
            self._looked_up.notify_all()
        answer = self.records.get(host, socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


def test_names_default_to_port_7070_and_ipv6_gets_brackets() -> None:
    assert split_name("tadlora-headless.default.svc.cluster.local") == (
        "tadlora-headless.default.svc.cluster.local",
        7070,
    )
    assert split_name("peers:5000") == ("peers", 5000)
    assert host_port("10.0.0.5", 7070) == "10.0.0.5:7070"
    assert host_port("fd00::5", 7070) == "[fd00::5]:7070"


@pytest.mark.asyncio
async def test_localhost_resolves_to_its_loopback_address() -> None:
    async with DnsPeers(["localhost:5000", "localhost"]) as dns:
        addresses = await dns.async_wait_for(lambda a: "127.0.0.1:5000" in a, timeout=10)
    assert "127.0.0.1:7070" in addresses  # no port: the default
    assert all(a.startswith(("127.", "[::1]")) for a in addresses), addresses


def test_a_lookup_the_resolver_leaves_hanging_does_not_hold_up_the_end_of_asyncio_run(monkeypatch) -> None:
    """A DNS server that does not answer keeps getaddrinfo for ~10 s; the node must exit meanwhile. Run in a
    thread of its own, `asyncio.run` must return while the lookup still hangs (bound: 30 s, i.e. not waiting)."""
    release = threading.Event()

    def hanging_getaddrinfo(host: str, *args: object, **kwargs: object) -> list[object]:
        release.wait(60)  # bounded, so the thread ends even if the test fails
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    async def give_up_on_it() -> None:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await resolve_addresses("hung.example", 7070)

    monkeypatch.setattr(socket, "getaddrinfo", hanging_getaddrinfo)
    runner = threading.Thread(target=asyncio.run, args=(give_up_on_it(),))
    try:
        runner.start()
        runner.join(30)
        assert not runner.is_alive() and not release.is_set(), "asyncio.run waited for the hanging lookup"
    finally:
        release.set()
        runner.join()


@pytest.mark.asyncio
async def test_a_lookup_error_reaches_the_caller_as_the_resolver_raised_it(monkeypatch) -> None:
    def no_such_name(host: str, *args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_name)
    with pytest.raises(socket.gaierror) as raised:
        await resolve_addresses("gone.example", 7070)
    assert raised.value.errno == socket.EAI_NONAME


@pytest.mark.asyncio
async def test_records_that_appear_and_disappear_are_followed() -> None:
    resolver = FakeResolver({"peers": ["10.0.0.1"]})
    changes = 0

    def changed() -> None:
        nonlocal changes
        changes += 1

    async with DnsPeers(["peers:7000"], interval=FAST_S, resolver=resolver, on_change=changed) as dns:
        assert await dns.async_wait_for(bool, timeout=5) == ("10.0.0.1:7000",)
        resolver.records["peers"] = ["10.0.0.2", "10.0.0.1", "fd00::3", "10.0.0.2"]  # a pod appears (twice)
        assert await dns.async_wait_for(lambda a: len(a) == 3, timeout=5) == (
            "10.0.0.1:7000",
            "10.0.0.2:7000",
            "[fd00::3]:7000",
        )
        resolver.records["peers"] = ["10.0.0.2"]  # two disappear
        assert await dns.async_wait_for(lambda a: len(a) == 1, timeout=5) == ("10.0.0.2:7000",)
        del resolver.records["peers"]  # NXDOMAIN: the name is gone, and so are its peers
        assert await dns.async_wait_for(lambda a: not a, timeout=5) == ()
    assert changes == 4  # one call per change, none for lookups that changed nothing


@pytest.mark.asyncio
async def test_an_answer_is_kept_to_host_addresses_and_its_first_1024_said_once(caplog, monkeypatch) -> None:
    """The DNS server chooses the answer, and each address in it is dialled every scan: one of no host (0.0.0.0, a
    group address) is left out, and past `MAX_NAME_ADDRESSES` (a neighbour count no cluster reaches) the rest, with a
    warning once while it lasts."""
    from tadlora.node import dnspeers

    monkeypatch.setattr(dnspeers, "MAX_NAME_ADDRESSES", 3)
    no_host = "0.0.0.0"  # noqa: S104 - an answer, never bound
    resolver = FakeResolver({"peers": [no_host, "10.0.0.1", "224.0.0.251", "255.255.255.255", "::", "ff02::1",
                                       "10.0.0.2", "fd00::3", "10.0.0.4", "10.0.0.5"]})  # fmt: skip
    async with DnsPeers(["peers"], interval=FAST_S, resolver=resolver) as dns:
        assert await dns.async_wait_for(bool, timeout=5) == ("10.0.0.1:7070", "10.0.0.2:7070", "[fd00::3]:7070")
        await asyncio.wait_for(resolver.wait_for_lookups(resolver.lookups + 3), timeout=5)
        resolver.records["peers"] = ["10.0.0.1", no_host]
        assert await dns.async_wait_for(lambda a: len(a) == 1, timeout=5) == ("10.0.0.1:7070",)
        resolver.records["peers"] = [no_host, "224.0.0.251"]  # nothing left to dial: said, not silent
        assert await dns.async_wait_for(lambda a: not a, timeout=5) == ()
        await asyncio.wait_for(resolver.wait_for_lookups(resolver.lookups + 3), timeout=5)
    warnings = [r.getMessage() for r in caplog.records if "answers" in r.getMessage()]
    assert warnings == [
        "DNS peers: peers answers 5 addresses; the first 3 are dialled",
        "DNS peers: peers answers no address of one host (0.0.0.0, 224.0.0.251), which nodes cannot be at; none is "
        "dialled",
    ]


@pytest.mark.asyncio
async def test_a_failing_lookup_keeps_the_last_answer(caplog) -> None:
    resolver = FakeResolver({"peers": ["10.0.0.1"]})
    async with DnsPeers(["peers"], interval=FAST_S, resolver=resolver) as dns:
        await dns.async_wait_for(bool, timeout=5)
        resolver.records["peers"] = socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        await asyncio.wait_for(resolver.wait_for_lookups(resolver.lookups + 3), timeout=5)
        assert dns.addresses() == ("10.0.0.1:7070",)
    warnings = [r.getMessage() for r in caplog.records if "cannot resolve peers" in r.getMessage()]
    assert len(warnings) == 1 and "keeping the last answer" in warnings[0]  # logged once, not every lookup


@pytest.mark.asyncio
async def test_a_lookup_failing_with_no_os_error_keeps_the_last_answer_and_the_lookups_going(caplog) -> None:
    """getaddrinfo raises UnicodeError for a name the idna codec refuses (an empty or over-long label): the lookup
    task used to die of it, silently, and DNS peers stopped for the rest of the run."""
    resolver = FakeResolver({"peers": ["10.0.0.1"]})
    async with DnsPeers(["peers"], interval=FAST_S, resolver=resolver) as dns:
        await dns.async_wait_for(bool, timeout=5)
        resolver.records["peers"] = UnicodeError("encoding with 'idna' codec failed (label empty or too long)")
        await asyncio.wait_for(resolver.wait_for_lookups(resolver.lookups + 2), timeout=5)
        assert dns.addresses() == ("10.0.0.1:7070",)
        resolver.records["peers"] = ["10.0.0.2"]  # and it goes on looking
        assert await dns.async_wait_for(lambda a: a == ("10.0.0.2:7070",), timeout=5)
    assert any("UnicodeError" in r.getMessage() and "keeping the last answer" in r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_a_slow_lookup_times_out_and_close_is_safe_twice() -> None:
    async def hangs(host: str, port: int) -> list[str]:
        await asyncio.sleep(3600)
        return []

    dns = DnsPeers(["peers"], interval=FAST_S, timeout=FAST_S, resolver=hangs)
    async with dns:
        await asyncio.sleep(0.1)
        assert dns.addresses() == ()
    await dns.aclose()
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not pending, pending


@pytest.mark.asyncio
async def test_two_nodes_find_each_other_through_a_dns_name(tmp_path) -> None:
    async with Node(node_config(tmp_path, 0, 2, NO_PEERS, method="lora", rounds=2)) as a:
        port = a.address.rpartition(":")[2]
        by_name = PeersOption(auto=False, static=(), dns=(f"localhost:{port}",))
        async with Node(node_config(tmp_path, 1, 2, by_name, method="lora", rounds=2)) as b:
            await run_all([a, b])
    for i, other in ((0, "node-1"), (1, "node-0")):
        records = _rounds(tmp_path / f"n{i}")
        assert [r["round"] for r in records] == [0, 1]
        assert all([n["id"] for n in r["neighbours"]] == [other] and not r["missed"] for r in records)


@pytest.mark.asyncio
async def test_a_lookup_that_times_out_says_so_in_its_warning(caplog: pytest.LogCaptureFixture) -> None:
    started = asyncio.Queue[None]()

    async def hangs(host: str, port: int) -> list[str]:
        started.put_nowait(None)
        await asyncio.sleep(3600)
        return []

    async with DnsPeers(["peers"], interval=FAST_S, timeout=FAST_S, resolver=hangs):
        async with asyncio.timeout(5):
            await started.get()
            while not any("cannot resolve peers" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110 - a log
                await asyncio.sleep(FAST_S)
    [warning] = [r.getMessage() for r in caplog.records if "cannot resolve peers" in r.getMessage()]
    assert f"no answer in {FAST_S} s" in warning, warning  # a person must see why, not an empty reason


@pytest.mark.asyncio
async def test_closing_does_not_swallow_a_cancel_of_the_task_that_closes() -> None:
    """A lookup whose cancellation takes a while to finish (a resolver cleaning up) keeps `aclose` waiting; a cancel
    of the task closing it (a shutdown bounded by a timeout) must still end that task, not vanish in `aclose`."""
    looking_up, cleaning_up = asyncio.Event(), asyncio.Event()

    async def slow_to_cancel(host: str, port: int) -> list[str]:
        looking_up.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaning_up.set()
            await asyncio.sleep(3600)  # interrupted only by a second cancel
        return []

    dns = DnsPeers(["peers"], interval=FAST_S, resolver=slow_to_cancel)
    dns.async_start()
    async with asyncio.timeout(5):
        await looking_up.wait()
        closing = asyncio.ensure_future(dns.aclose())
        await cleaning_up.wait()
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
    assert closing.cancelled()


@pytest.mark.asyncio
async def test_a_resolver_that_hangs_holds_one_lookup_thread_per_name_not_one_per_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A lookup that outlasts its timeout is abandoned, but its thread waits on in the resolver (a hung NSS module,
    say). Each later lookup of the name must wait for that one, not start a thread more every interval: else a
    resolver hung for an hour leaves hundreds of threads."""
    release = threading.Event()

    def hanging(*args: object, **kwargs: object) -> list[object]:
        release.wait(30)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", hanging)
    try:
        async with DnsPeers(["peers.example:7070"], interval=0.01, timeout=0.01):
            await asyncio.sleep(0.5)  # dozens of intervals
            hung = [t for t in threading.enumerate() if t.name == "tadlora-dns-peers.example"]
    finally:
        release.set()
    assert len(hung) == 1, f"{len(hung)} lookup threads of one name"


@pytest.mark.asyncio
async def test_a_close_cancelled_while_it_ends_the_lookups_still_ends_the_lookup_task() -> None:
    """`aclose` takes the lookup task out of the object before it waits for anything: a close cancelled while it
    waited for the lookups (a shutdown bounded by a timeout) used to leave the task looking names up for ever,
    owned by no one (a second close finds none to cancel)."""
    resolver = FakeResolver({"peers": ["10.0.0.1"]})
    dns = DnsPeers(["peers"], interval=3600, resolver=resolver)
    dns.async_start()
    task = dns._task
    assert task is not None
    async with asyncio.timeout(5):
        await resolver.wait_for_lookups(1)
        await asyncio.sleep(0)  # the lookup task is asleep until its next interval
        closing = asyncio.ensure_future(dns.aclose())
        await asyncio.sleep(0)  # the close waits for the (finished) lookups
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        await dns.aclose()  # finds nothing left to close
        await asyncio.sleep(0)
    assert task.done(), "the lookup task outlived the close"
