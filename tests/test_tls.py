"""Mutual TLS: only nodes with certificates from the cluster CA become peers; plaintext needs --insecure."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import socket
import stat
import threading
import types
from pathlib import Path
from typing import cast

import pytest

from nodeproc import SMALL_RUN, running_node, unique_tag
from tadlora.node.cli import main
from tadlora.node.daemon import Node
from tadlora.node.peerspec import PeersOption
from tadlora.node.state import read_rounds
from tadlora.node.wire import ExchangeRefused, Reason
from test_daemon import node_config, run_all


def make_certs(directory: Path, *names: str) -> Path:
    assert main(["certs", "init", str(directory), "--cluster", "test"]) == 0
    for name in names:
        assert main(["certs", "issue", name, "--dir", str(directory)]) == 0
    return directory


def test_certs_commands_make_a_ca_and_private_node_keys(tmp_path, capsys) -> None:
    certs = make_certs(tmp_path / "certs", "node-0")
    for name in ("ca.crt", "ca.key", "node-0.crt", "node-0.key"):
        assert (certs / name).is_file()
    for key in ("ca.key", "node-0.key"):
        assert stat.S_IMODE((certs / key).stat().st_mode) == 0o600
    # Both files each command wrote are named, the keys too (ca.key is the file to keep off the nodes).
    assert capsys.readouterr().out.splitlines() == [
        f"wrote {certs / 'ca.crt'} and {certs / 'ca.key'}",
        f"wrote {certs / 'node-0.crt'} and {certs / 'node-0.key'}",
    ]
    assert main(["certs", "init", str(certs)]) == 2  # never overwrites a CA by accident
    assert capsys.readouterr().err.endswith(" exist; pass --force to replace\n")
    (certs / "node-0.key").unlink()
    assert main(["certs", "issue", "node-0", "--dir", str(certs)]) == 2
    assert capsys.readouterr().err.endswith(f"{certs / 'node-0.crt'} exists; pass --force to replace\n")
    assert main(["certs", "issue", "x", "--dir", str(tmp_path / "nothing")]) == 2
    assert "certs init" in capsys.readouterr().err
    # A forced new CA leaves the node certificates of the old one in place: say they must be reissued.
    assert main(["certs", "issue", "node-1", "--dir", str(certs)]) == 0
    capsys.readouterr()
    assert main(["certs", "init", str(certs), "--force"]) == 0
    err = capsys.readouterr().err
    assert "2 node certificates" in err and "(node-0, node-1)" in err and "certs issue NAME" in err, err


def test_a_node_without_certificates_refuses_to_start_unless_insecure(tmp_path) -> None:
    with pytest.raises(ValueError, match="tadlora-node certs init"):
        node_config(tmp_path, 0, 1, PeersOption(False, (), ()), insecure=False)
    node_config(tmp_path, 0, 1, PeersOption(False, (), ()), insecure=True)  # said explicitly: allowed


def tls(tmp: Path, certs: Path, i: int, m: int, peers: tuple[str, ...], **changes):
    return node_config(tmp, i, m, PeersOption(False, peers, ()), insecure=False, tls_dir=certs, **changes)


@pytest.mark.asyncio
async def test_nodes_with_certificates_from_the_cluster_ca_train_together_over_tls(tmp_path) -> None:
    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(tls(tmp_path, certs, 0, 2, ())))
        b = await stack.enter_async_context(Node(tls(tmp_path, certs, 1, 2, (a.address,))))
        assert not a.local_info().insecure and not b.status().node.insecure
        await run_all([a, b])
    for i in (0, 1):
        rounds = read_rounds(tmp_path / f"n{i}")
        assert len(rounds) == 3 and all(r["degree"] == 1 and not r["missed"] for r in rounds)


@pytest.mark.asyncio
async def test_nodes_with_certificates_of_two_cas_train_together_when_ca_crt_bundles_both(tmp_path) -> None:
    """A cluster moving to a new CA (docs/deploy.md): node-0 still has a certificate of the old CA, node-1 one of the
    new; each trusts both. Each node's own certificate is checked at start against the bundle, not its first CA."""
    old, new = make_certs(tmp_path / "old", "node-0"), make_certs(tmp_path / "new", "node-1")
    bundle = (old / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes()
    for certs in (old, new):
        (certs / "ca.crt").write_bytes(bundle)
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(tls(tmp_path, old, 0, 2, ())))
        b = await stack.enter_async_context(Node(tls(tmp_path, new, 1, 2, (a.address,))))
        await run_all([a, b])
    for i in (0, 1):
        rounds = read_rounds(tmp_path / f"n{i}")
        assert len(rounds) == 3 and all(r["degree"] == 1 and not r["missed"] for r in rounds)


def test_certs_issue_in_a_bundle_directory_signs_with_the_ca_whose_key_it_holds(tmp_path, capsys) -> None:
    from cryptography import x509
    from cryptography.exceptions import InvalidSignature

    old, new = make_certs(tmp_path / "old"), make_certs(tmp_path / "new")
    old_ca, new_ca = (x509.load_pem_x509_certificate((d / "ca.crt").read_bytes()) for d in (old, new))
    (new / "ca.crt").write_bytes((old / "ca.crt").read_bytes() + (new / "ca.crt").read_bytes())  # new CA second
    assert main(["certs", "issue", "node-2", "--dir", str(new)]) == 0
    issued = x509.load_pem_x509_certificate((new / "node-2.crt").read_bytes())
    issued.verify_directly_issued_by(new_ca)
    with pytest.raises(InvalidSignature):  # both CAs have one subject name (one cluster): only the key tells
        issued.verify_directly_issued_by(old_ca)
    # A key of neither CA in the bundle is refused, naming the bundle.
    (new / "ca.key").write_bytes((make_certs(tmp_path / "third") / "ca.key").read_bytes())
    capsys.readouterr()
    assert main(["certs", "issue", "node-3", "--dir", str(new)]) == 2
    assert f"does not belong to any CA in {new / 'ca.crt'}" in capsys.readouterr().err


@pytest.mark.asyncio
@pytest.mark.parametrize("intruder", ["another CA", "no TLS"])
async def test_a_node_without_a_certificate_from_the_cluster_ca_is_never_a_peer(tmp_path, intruder, caplog) -> None:
    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    rogue_certs = make_certs(tmp_path / "rogue", "node-2")  # a valid certificate, from the wrong CA
    caplog.set_level(logging.INFO, logger="tadlora")  # from the start: each node dials its peers as it starts
    async with contextlib.AsyncExitStack() as stack:
        # a waits for two peers, but only b can ever be verified: it starts alone with b after --peer-wait
        a = await stack.enter_async_context(Node(tls(tmp_path, certs, 0, 3, (), peer_wait=3.0)))
        if intruder == "another CA":
            rogue_cfg = tls(tmp_path, rogue_certs, 2, 3, (a.address,), min_peers=0, rounds=2)
        else:
            rogue_cfg = node_config(tmp_path, 2, 3, PeersOption(False, (a.address,), ()), min_peers=0, rounds=2)
        rogue = await stack.enter_async_context(Node(rogue_cfg))
        b = await stack.enter_async_context(Node(tls(tmp_path, certs, 1, 3, (a.address, rogue.address), min_peers=1)))
        async with asyncio.timeout(90):
            await run_all([a, b, rogue])
    # b dialled the rogue, which answered: the log says it is the certificates, not the network, and what to look at.
    why = {"another CA": "its certificate is not signed by this node's CA", "no TLS": "not in TLS: a node run with"}
    assert f"{rogue.address} (static) answers, but {why[intruder]}" in caplog.text
    assert f"{rogue.address} (static) does not answer" not in caplog.text
    if intruder == "no TLS":  # and the rogue, dialling a in plaintext, is told why a closes its connections
        said = "closes plaintext connections: a node that requires TLS? (this node runs --insecure)"
        assert f"{a.address} (static) answers, but {said}; retried up to every 30 s: " in caplog.text, caplog.text
        assert f"{a.address} (static) does not answer" not in caplog.text
    for i in (0, 1):
        for record in read_rounds(tmp_path / f"n{i}"):
            assert "node-2" not in [n["id"] for n in record["neighbours"]] + record["missed"]
    assert all(r["degree"] == 0 for r in read_rounds(tmp_path / "n2"))


def test_a_peer_that_does_not_speak_tls_is_logged_once_by_the_node_not_at_each_try_by_grpc(tmp_path) -> None:
    """A real `tadlora-node` with TLS whose static peer answers in plaintext (a TCP server that is no node): the
    node says what that means in its JSON log, and gRPC's core does not add its own "Handshake failed" lines to
    stderr at each try (the node defaults GRPC_VERBOSITY to ERROR)."""
    certs = make_certs(tmp_path / "certs", "node-0")
    with socket.create_server(("127.0.0.1", 0)) as plain:
        port = plain.getsockname()[1]

        def answer_in_plaintext() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = plain.accept()
                    with conn:
                        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")

        threading.Thread(target=answer_in_plaintext, daemon=True).start()
        args = ["--peers", f"127.0.0.1:{port}", "--listen", "127.0.0.1:0", "--cluster", unique_tag(),
                "--node-id", "node-0", "--out", str(tmp_path / "n0"), "--tls-dir", str(certs), "--log-format", "json",
                *SMALL_RUN, "--rounds", "1", "--min-peers", "1", "--peer-wait", "4"]  # fmt: skip
        with running_node(tmp_path / "logs", "n0", args, tmp_path / "n0") as node:
            assert node.wait_exit(120) == 0, node.tail()
    stderr = node.stderr_path.read_text()
    assert f"127.0.0.1:{port} (static) answers, but not in TLS: a node run with --insecure?" in stderr
    assert "Handshake failed" not in stderr and "ssl_transport_security" not in stderr, stderr[-2000:]


@pytest.mark.asyncio
async def test_a_cluster_certificate_cannot_be_used_to_claim_another_node_id(tmp_path) -> None:
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    (tmp_path / "stolen").mkdir()
    for name, src in (("ca.crt", "ca.crt"), ("node-9.crt", "node-0.crt"), ("node-9.key", "node-0.key")):
        (tmp_path / "stolen" / name).write_bytes((certs / src).read_bytes())
    with pytest.raises(ValueError, match="issued to"):  # a node refuses to start under a name its certificate lacks
        TlsMaterial.from_dir(tmp_path / "stolen", "node-9")
    # An impostor that skips that check: node-0's valid certificate, speaking as node-9.
    stolen = TlsMaterial.from_dir(certs, "node-0")
    async with contextlib.AsyncExitStack() as stack:
        honest = await stack.enter_async_context(Node(tls(tmp_path, certs, 1, 2, (), min_peers=0, rounds=3)))
        impostor_cfg = node_config(tmp_path, 9, 10, PeersOption(False, (honest.address,), ()), min_peers=0, rounds=2)
        impostor = await stack.enter_async_context(Node(impostor_cfg, transport=GrpcTransport.with_tls(stolen)))
        await run_all([honest, impostor])
        refused = honest.metrics.refusals.labels("IDENTITY_MISMATCH")._value.get()
    assert refused >= 1
    assert all(r["degree"] == 0 for r in read_rounds(tmp_path / "n1"))
    assert all(r["degree"] == 0 for r in read_rounds(tmp_path / "n9"))


@pytest.mark.asyncio
async def test_a_commit_is_taken_only_from_the_node_its_certificate_names(tmp_path) -> None:
    """A Commit decides whether a pair counts: a member of the cluster must not be able to commit, or cancel, the
    exchange of another node by naming it."""
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.rpc import ExchangeHeader
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1", "node-2")
    async with Node(tls(tmp_path, certs, 1, 3, (), min_peers=0)) as honest:
        header = ExchangeHeader(node_id="node-2", cluster=honest.config.cluster, fingerprint=honest.fingerprint,
                                round=0, degree=1)  # fmt: skip
        transport = GrpcTransport.with_tls(TlsMaterial.from_dir(certs, "node-0"))
        async with transport.connect(honest.address, node_id=honest.node_id) as conn:
            with pytest.raises(ExchangeRefused) as refused:
                await conn.commit(header, True, 10.0)
            await conn.commit(dataclasses.replace(header, node_id="node-0"), False, 10.0)  # its own: taken
    assert refused.value.reason is Reason.IDENTITY_MISMATCH, refused.value
    assert honest.metrics.refusals.labels("IDENTITY_MISMATCH")._value.get() == 1


@pytest.mark.asyncio
async def test_an_exchange_or_fetch_is_taken_only_from_the_node_its_certificate_names(tmp_path) -> None:
    """As a Commit: a member of the cluster that names another node in an exchange header or a fetch request is
    refused IDENTITY_MISMATCH, from the header (an exchange taken would be mixed as the other node's). The handshake
    refusal tested above keeps an honest node from calling such a peer; it does not keep the peer from calling."""
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.rpc import ExchangeHeader
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1", "node-2")
    async with Node(tls(tmp_path, certs, 1, 3, (), min_peers=0)) as honest:
        other = dataclasses.replace(honest.local_info(), node_id="node-2", address="")
        transport = GrpcTransport.with_tls(TlsMaterial.from_dir(certs, "node-0"))
        async with transport.connect(honest.address, node_id=honest.node_id) as conn:
            with pytest.raises(ExchangeRefused) as exchanged:
                await conn.exchange(ExchangeHeader.from_info(other), {}, 10.0)
            with pytest.raises(ExchangeRefused) as fetched:
                await conn.fetch(other, 10.0)
    for refused in (exchanged, fetched):
        assert refused.value.reason is Reason.IDENTITY_MISMATCH, refused.value
        assert "claims node id 'node-2' but its certificate is for 'node-0'" in refused.value.detail
    assert honest.metrics.refusals.labels("IDENTITY_MISMATCH")._value.get() == 2


@pytest.mark.asyncio
async def test_a_leave_is_taken_only_from_the_node_its_certificate_names(tmp_path) -> None:
    """A Leave makes a node drop a peer: a member of the cluster that names another node in it is refused
    IDENTITY_MISMATCH and that peer stays; the peer's own leave, under its own certificate, drops it."""
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1", "node-2")
    async with contextlib.AsyncExitStack() as stack:
        honest = await stack.enter_async_context(Node(tls(tmp_path, certs, 1, 3, (), min_peers=0)))
        peer = await stack.enter_async_context(Node(tls(tmp_path, certs, 2, 3, (honest.address,), min_peers=0)))
        async with asyncio.timeout(60):
            await honest.async_wait_until(lambda: "node-2" in honest._peer_ids())
        async with GrpcTransport.with_tls(TlsMaterial.from_dir(certs, "node-0")).connect(
            honest.address, node_id="node-1"
        ) as conn:
            with pytest.raises(ExchangeRefused) as refused:
                await conn.leave(peer.local_info(), 10.0)
        assert refused.value.reason is Reason.IDENTITY_MISMATCH, refused.value
        assert "claims node id 'node-2' but its certificate is for 'node-0'" in refused.value.detail
        assert honest._peer_ids() == ["node-2"]
        async with GrpcTransport.with_tls(TlsMaterial.from_dir(certs, "node-2")).connect(
            honest.address, node_id="node-1"
        ) as conn:
            assert await conn.leave(peer.local_info(), 10.0) is True
        assert honest._peer_ids() == []
    assert honest.metrics.refusals.labels("IDENTITY_MISMATCH")._value.get() == 1


@pytest.mark.asyncio
async def test_a_node_answering_under_an_id_its_certificate_lacks_is_never_a_peer(tmp_path) -> None:
    """The callee's side: the honest node dials the impostor (a static address), which answers as node-9 while
    holding node-0's valid certificate. Mixing would need the honest node to call it (node-1 < node-9)."""
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    stolen = TlsMaterial.from_dir(certs, "node-0")
    async with contextlib.AsyncExitStack() as stack:
        # The impostor takes the honest node's first (unbound) handshake for a peer and waits its exchange deadline
        # for a call that never comes: a short one, since its rounds are not what this test is about.
        impostor_cfg = node_config(
            tmp_path, 9, 10, PeersOption(False, (), ()), min_peers=0, rounds=2, exchange_timeout=3.0
        )
        impostor = await stack.enter_async_context(Node(impostor_cfg, transport=GrpcTransport.with_tls(stolen)))
        honest_cfg = tls(tmp_path, certs, 1, 2, (impostor.address,), min_peers=1, peer_wait=3.0, rounds=2)
        honest = await stack.enter_async_context(Node(honest_cfg))
        async with asyncio.timeout(90):
            await run_all([honest, impostor])
        assert honest.status().neighbors == ()
    assert all(r["degree"] == 0 for r in read_rounds(tmp_path / "n1"))


@pytest.mark.asyncio
async def test_a_connection_bound_to_a_node_id_needs_a_certificate_naming_it(tmp_path) -> None:
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.rpc import PeerUnavailable
    from tadlora.node.tls import TlsMaterial
    from tadlora.node.wire import ExchangeRefused

    name = "lab_box-0"  # every character class a node id may hold: lowercase letters, digits, '_', '-'
    certs = make_certs(tmp_path / "certs", name, "node-1")
    # TLS accepts the certificate for 'LAB_BOX-0' and 'lab_box-0.' too; the handshake must not.
    others = ("node-1", "lab_box", "LAB_BOX-0", "Lab_box-0", "lab_box-0.")
    async with contextlib.AsyncExitStack() as stack:
        server_cfg = tls(tmp_path, certs, 0, 2, (), min_peers=0, rounds=1, node_id=name)
        server = await stack.enter_async_context(Node(server_cfg))
        client = GrpcTransport.with_tls(TlsMaterial.from_dir(certs, "node-1"))
        me = node_config(tmp_path, 1, 2, PeersOption(False, (), ()))  # only for a plausible PeerInfo
        info = server.local_info()
        for expected, ok in ((None, True), (name, True), *((other, False) for other in others)):
            conn = client.connect(server.address, node_id=expected)
            try:
                if ok:
                    assert (await conn.handshake(_caller_info(info, me.cluster), timeout=10)).node_id == name
                else:
                    # TLS refuses another name (PeerUnavailable); another spelling passes TLS, not the handshake
                    with pytest.raises((PeerUnavailable, ExchangeRefused)):
                        await conn.handshake(_caller_info(info, me.cluster), timeout=10)
            finally:
                await conn.aclose()


def _caller_info(server_info, cluster: str):
    import dataclasses

    return dataclasses.replace(server_info, node_id="node-1", address="", cluster=cluster)


def test_the_shared_certificate_name_cannot_be_a_node_id(tmp_path, capsys) -> None:
    from tadlora.node.tls import TLS_SERVER_NAME, TlsMaterial

    certs = make_certs(tmp_path / "certs")
    assert main(["certs", "issue", TLS_SERVER_NAME, "--dir", str(certs)]) == 2
    assert "reserved" in capsys.readouterr().err
    with pytest.raises(ValueError, match="reserved"):
        TlsMaterial.from_dir(certs, TLS_SERVER_NAME)


def _swap_in(certs: Path, name: str, source: Path) -> None:
    """Replace ``certs/NAME`` by ``source``'s bytes (a file from another directory or node)."""
    (certs / name).write_bytes(source.read_bytes())


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("certificate from another CA", "is not signed by"),
        ("another node's key", "is not the key of"),
        ("expired", "is valid only from"),
        ("not yet valid", "is valid only from"),
    ],
)
def test_certificates_grpc_could_not_serve_with_are_refused_at_start_with_the_fix(
    tmp_path, monkeypatch, capsys, case, message
) -> None:
    """gRPC would only say "Failed to bind to address" (read as a taken port): refuse them before, naming why."""
    from tadlora.node import tls as tls_module
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    if case == "certificate from another CA":
        other = make_certs(tmp_path / "other", "node-0")
        _swap_in(certs, "node-0.crt", other / "node-0.crt")
        _swap_in(certs, "node-0.key", other / "node-0.key")
    elif case == "another node's key":
        _swap_in(certs, "node-0.key", certs / "node-1.key")
    elif case == "not yet valid":  # issued on a host whose clock is two days ahead
        later = _clock_ahead(dt.timedelta(days=2))
        with monkeypatch.context() as ahead:
            ahead.setattr(tls_module, "dt", types.SimpleNamespace(datetime=later, timedelta=dt.timedelta, UTC=dt.UTC))
            assert main(["certs", "issue", "node-0", "--dir", str(certs), "--force"]) == 0
    else:
        monkeypatch.setattr(tls_module, "NODE_DAYS", 0)  # valid until the second it was issued
        assert main(["certs", "issue", "node-0", "--dir", str(certs), "--force"]) == 0
    with pytest.raises(ValueError, match=message) as refused:
        TlsMaterial.from_dir(certs, "node-0")
    assert f"certs issue node-0 --dir {certs} --force" in str(refused.value)
    with pytest.raises(ValueError, match=message):
        Node(tls(tmp_path, certs, 0, 2, ()))  # the run stops here, before any port is bound
    TlsMaterial.from_dir(certs, "node-1")  # the other node's own files still serve


def _clock_ahead(by: dt.timedelta) -> type[dt.datetime]:
    """A `datetime` class whose ``now`` is ``by`` ahead of the real clock."""

    class Later(dt.datetime):
        @classmethod
        def now(cls, tz: dt.tzinfo | None = None) -> Later:
            return cast("Later", dt.datetime.now(tz) + by)

    return Later


def test_a_certificate_naming_its_node_and_another_in_its_common_names_is_refused_at_start(tmp_path) -> None:
    """Peers take a caller's id from its certificate's common name: one with two names speaks for whichever of them
    its peers read, so it must name exactly the node it is given to."""
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs")
    foreign = _sign_node_certificate(certs, "node-0", ["node-0", "node-9"])
    with pytest.raises(ValueError, match=re.escape("is issued to ['node-0', 'node-9'], not to node id 'node-0'")):
        TlsMaterial.from_dir(foreign, "node-0")


def test_a_key_or_certificate_is_never_written_over_an_existing_file_unless_forced(tmp_path) -> None:
    """`_write` opens with O_EXCL itself: the callers' check for existing files comes before the key is generated,
    and a file made in between must not be written over."""
    from tadlora.node import tls as tls_module

    target = tmp_path / "node-0.key"
    target.write_bytes(b"theirs")
    with pytest.raises(FileExistsError, match="pass --force"):
        tls_module._write(target, b"ours", 0o600, force=False)
    assert target.read_bytes() == b"theirs"


async def status(argv: list[str], capsys) -> tuple[int, str, str]:
    """`tadlora-node status` (its own event loop, in a thread: ours serves the node meanwhile)."""
    capsys.readouterr()
    code = await asyncio.to_thread(main, ["status", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.asyncio
async def test_status_asks_a_tls_node_with_the_runs_tls_settings_and_says_what_to_pass_without_them(
    tmp_path, capsys, monkeypatch
) -> None:
    import json

    for name in (
        "TADLORA_TLS_DIR",
        "TADLORA_NODE_ID",
        "TADLORA_OUT",
        "TADLORA_INSECURE",
        "TADLORA_PEER_ID",
        "TADLORA_ANY_PEER",
    ):
        monkeypatch.delenv(name, raising=False)
    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    async with Node(tls(tmp_path, certs, 0, 1, (), min_peers=0, rounds=1)) as node:
        code, _, err = await status([node.address, "--timeout", "5"], capsys)  # plaintext to a TLS node
        assert code == 1 and "--tls-dir" in err and "TADLORA_NODE_ID" in err
        # The healthcheck's case: the node's own variables, nothing on the command line.
        monkeypatch.setenv("TADLORA_TLS_DIR", str(certs))
        monkeypatch.setenv("TADLORA_NODE_ID", "node-0")
        code, out, err = await status([node.address], capsys)
        assert code == 0, err
        assert json.loads(out)["node_id"] == "node-0" and json.loads(out)["insecure"] is False
        # Another node's certificate, asking for the node by its id.
        code, out, _ = await status([node.address, "--node-id", "node-1", "--peer-id", "node-0"], capsys)
        assert code == 0 and json.loads(out)["node_id"] == "node-0"
        # The id the node keeps in --out stands in for --node-id.
        monkeypatch.delenv("TADLORA_NODE_ID")
        code, out, _ = await status([node.address, "--out", str(tmp_path / "n0")], capsys)
        assert code == 0 and json.loads(out)["node_id"] == "node-0"
        # A certificate that must name another node than the one answering: refused, with the flag to change.
        code, _, err = await status([node.address, "--node-id", "node-0", "--peer-id", "node-1"], capsys)
        assert code == 1 and "--peer-id" in err
        # ... unless any node of the cluster may answer: the JSON then says which one did.
        code, out, err = await status([node.address, "--node-id", "node-1", "--any-peer"], capsys)
        assert code == 0 and json.loads(out)["node_id"] == "node-0", err
        other = make_certs(tmp_path / "other-ca", "node-0")  # same id, another cluster's CA: still refused
        code, _, err = await status(
            [node.address, "--tls-dir", str(other), "--node-id", "node-0", "--any-peer"], capsys
        )
        assert code == 1 and str(other / "ca.crt") in err and "must name" not in err
        code, _, err = await status([node.address, "--node-id", "node-1", "--any-peer", "--peer-id", "x"], capsys)
        assert code == 2 and "pass one of them" in err
        code, _, err = await status([node.address], capsys)  # no id known
        assert code == 2 and "--node-id" in err
        code, _, err = await status([node.address, "--node-id", "node-7"], capsys)  # no such certificate
        assert code == 2 and "node-7.crt" in err and "certs issue node-7" in err


@pytest.mark.asyncio
async def test_status_all_walks_a_chain_of_tls_nodes_checking_each_certificate_against_the_id_it_is_listed_by(
    tmp_path, capsys, monkeypatch
) -> None:
    """node-0 - node-1 - node-2 in a chain (each lists the one before it): asked at node-0 with node-0's own
    variables, as in its container, the walk reaches node-2 through node-1's list; each certificate must name the id
    the node is listed by, and it does."""
    import json

    import tadlora

    for name in ("TADLORA_OUT", "TADLORA_INSECURE", "TADLORA_PEER_ID", "TADLORA_ANY_PEER"):
        monkeypatch.delenv(name, raising=False)
    certs = make_certs(tmp_path / "certs", "node-0", "node-1", "node-2")
    monkeypatch.setenv("TADLORA_TLS_DIR", str(certs))
    monkeypatch.setenv("TADLORA_NODE_ID", "node-0")
    async with contextlib.AsyncExitStack() as stack:
        a = await stack.enter_async_context(Node(tls(tmp_path, certs, 0, 3, (), min_peers=1, rounds=2)))
        b = await stack.enter_async_context(Node(tls(tmp_path, certs, 1, 3, (a.address,), min_peers=2, rounds=2)))
        c = await stack.enter_async_context(Node(tls(tmp_path, certs, 2, 3, (b.address,), min_peers=1, rounds=2)))
        await run_all([a, b, c])
        code, out, err = await status([a.address, "--all"], capsys)
        table_code, table, _ = await status([a.address, "--all", "--table"], capsys)
    assert code == table_code == 0, err
    walked = json.loads(out)
    assert [(n["node_id"], n["address"]) for n in walked["nodes"]] == [(x.node_id, x.address) for x in (a, b, c)]
    assert walked["unreachable"] == [] and walked["complete"] is True
    assert [sorted(x["id"] for x in n["neighbours"]) for n in walked["nodes"]] == [
        ["node-1"],
        ["node-0", "node-2"],
        ["node-1"],
    ]
    rows = [line.split() for line in table.splitlines()]
    assert [r[:3] for r in rows[1:4]] == [[x.node_id, x.address, "2"] for x in (a, b, c)]
    assert [r[5] for r in rows[1:4]] == ["1", "2", "1"]  # peers
    assert table.splitlines()[-1] == f"3 nodes answered; round 2; release {tadlora.__version__}"


@pytest.mark.asyncio
async def test_status_all_refuses_a_node_whose_certificate_names_another_id_than_it_is_listed_by(
    tmp_path, capsys, monkeypatch
) -> None:
    """node-2 (a stand-in serving with node-2's certificate) lists node-0 at node-0's address, and node-7 there too.
    The walk asks node-7's address for a certificate naming node-7: node-0's answers there, and TLS refuses it
    before any reply is read (not only the reply's id, as in plaintext)."""
    import json

    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.protocol_types import NeighborStatus, StatusInfo
    from tadlora.node.tls import TlsMaterial
    from test_rpc import FakeNode, lora_factors

    for name in ("TADLORA_OUT", "TADLORA_INSECURE", "TADLORA_PEER_ID", "TADLORA_ANY_PEER", "TADLORA_NODE_ID"):
        monkeypatch.delenv(name, raising=False)
    certs = make_certs(tmp_path / "certs", "node-0", "node-2")
    monkeypatch.setenv("TADLORA_TLS_DIR", str(certs))
    stand_in = FakeNode("node-2", lora_factors(1))
    transport = GrpcTransport.with_tls(TlsMaterial.from_dir(certs, "node-2"))
    async with (
        Node(tls(tmp_path, certs, 0, 3, (), min_peers=0, rounds=1)) as a,
        transport.serve(stand_in, "127.0.0.1:0") as served,
    ):
        await run_all([a])
        stand_in.info = dataclasses.replace(stand_in.info, address=served.address)
        listed = (
            NeighborStatus(node_id="node-0", address=a.address),
            NeighborStatus(node_id="node-7", address=a.address),
        )
        stand_in.status_info = StatusInfo(node=stand_in.info, neighbors=listed)
        code, out, err = await status([served.address, "--all", "--node-id", "node-2"], capsys)
    walked = json.loads(out)
    assert code == 1, err
    assert [n["node_id"] for n in walked["nodes"]] == ["node-0", "node-2"]
    [seven] = walked["unreachable"]
    assert (seven["node_id"], seven["address"], seven["listed_by"]) == ("node-7", a.address, ["node-2"])
    assert seven["error"].startswith(f"peer {a.address} unavailable: ") and "answers at" not in seven["error"], seven


@pytest.mark.asyncio
async def test_the_health_port_answers_serving_in_plaintext_while_the_main_port_requires_tls(tmp_path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tadlora.v1 import node_pb2, node_pb2_grpc
    from test_node_cli import free_port

    certs = make_certs(tmp_path / "certs", "node-0")
    health_port = free_port()
    async with Node(tls(tmp_path, certs, 0, 1, (), min_peers=0, rounds=1, health_port=health_port)) as node:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            for service in ("", "tadlora.v1.Node"):
                reply = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=10
                )
                assert reply.status == health_pb2.HealthCheckResponse.SERVING
            with pytest.raises(grpc.aio.AioRpcError) as only_health:  # the node's service stays behind mutual TLS
                await node_pb2_grpc.NodeStub(channel).Status(node_pb2.StatusRequest(), timeout=10)
            assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
            # Watch streams stay open: anyone could hold every call slot of the port with them and fail the probes.
            watches = [health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest()) for _ in range(20)]
            for watch in watches:
                with pytest.raises(grpc.aio.AioRpcError) as watched:
                    await watch.read()
                assert watched.value.code() == grpc.StatusCode.UNIMPLEMENTED
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        async with grpc.aio.insecure_channel(node.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as plaintext:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert plaintext.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ConnectionRefusedError):  # closed with the node
        socket.create_connection(("127.0.0.1", health_port), timeout=5).close()


def test_the_health_port_may_not_be_the_listen_port(tmp_path) -> None:
    with pytest.raises(ValueError, match="--health-port"):
        node_config(tmp_path, 0, 1, PeersOption(False, (), ()), listen="127.0.0.1:7070", health_port=7070)
    node_config(tmp_path, 0, 1, PeersOption(False, (), ()), listen="127.0.0.1:7070", health_port=7071)


def test_a_given_transport_must_serve_the_configured_health_port(tmp_path) -> None:
    """The health server is the transport's: a node given one that does not serve --health-port refuses to start
    instead of leaving every probe failing."""
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.memory_transport import InMemoryNetwork

    cfg = node_config(tmp_path, 0, 1, PeersOption(False, (), ()), listen="127.0.0.1:7070", health_port=7071)
    for transport in (GrpcTransport(), GrpcTransport(health_port=7072), InMemoryNetwork()):
        with pytest.raises(ValueError, match="health_port=7071"):
            Node(cfg, transport=transport)
    assert Node(cfg, transport=GrpcTransport(health_port=7071)).transport.health_port == 7071  # type: ignore[attr-defined]


@pytest.mark.parametrize("name", ["Node-0", "node-0.", "../evil", "a.b", "_x", "x" * 64])
def test_certificates_are_issued_only_to_node_ids_in_their_one_spelling(tmp_path, capsys, name) -> None:
    from tadlora.node.tls import issue

    certs = make_certs(tmp_path / "certs")
    assert main(["certs", "issue", name, "--dir", str(certs)]) == 2
    assert "lowercase" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lowercase"):
        issue(certs, name)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["ca.crt", "ca.key"]
    with pytest.raises(ValueError, match="lowercase"):
        node_config(tmp_path, 0, 1, PeersOption(False, (), ()), node_id=name)


def test_init_refuses_before_writing_anything_so_a_lone_ca_crt_keeps_no_stray_key(tmp_path, capsys) -> None:
    from tadlora.node.tls import issue

    certs = make_certs(tmp_path / "certs")
    (certs / "ca.key").unlink()
    assert main(["certs", "init", str(certs)]) == 2
    assert "--force" in capsys.readouterr().err
    assert not (certs / "ca.key").exists()
    # A CA key that does not match ca.crt would sign certificates that chain to nothing.
    other = make_certs(tmp_path / "other")
    (certs / "ca.key").write_bytes((other / "ca.key").read_bytes())
    with pytest.raises(ValueError, match="does not belong to"):
        issue(certs, "node-0")
    assert not (certs / "node-0.key").exists()


def test_keys_are_private_even_when_forced_over_a_public_file_and_never_written_through_a_link(tmp_path) -> None:
    from tadlora.node.tls import issue

    certs = make_certs(tmp_path / "certs", "node-0")
    (certs / "node-0.key").chmod(0o644)
    issue(certs, "node-0", force=True)
    assert stat.S_IMODE((certs / "node-0.key").stat().st_mode) == 0o600
    outside = tmp_path / "outside"
    outside.write_bytes(b"untouched")
    (certs / "node-1.key").symlink_to(outside)
    with pytest.raises(FileExistsError):
        issue(certs, "node-1")
    with pytest.raises(ValueError, match="symbolic link"):
        issue(certs, "node-1", force=True)
    assert outside.read_bytes() == b"untouched"


def test_a_node_certificate_never_outlives_its_ca_and_an_expired_ca_issues_none(tmp_path, monkeypatch, capsys) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    from tadlora.node import tls

    monkeypatch.setattr(tls, "CA_DAYS", 10)  # a CA near its end: a node certificate of 825 days would outlive it
    certs = make_certs(tmp_path / "certs", "node-0")
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    cert = x509.load_pem_x509_certificate((certs / "node-0.crt").read_bytes())
    assert cert.not_valid_after_utc <= ca.not_valid_after_utc
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=9)

    # The same CA, re-signed as it would read once its ten years are over.
    key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    now = dt.datetime.now(dt.UTC)
    expired = (
        x509.CertificateBuilder(ca.issuer, ca.subject, ca.public_key(), ca.serial_number, extensions=ca.extensions)
        .not_valid_before(now - dt.timedelta(days=20))
        .not_valid_after(now - dt.timedelta(days=10))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (certs / "ca.crt").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    assert main(["certs", "issue", "node-1", "--dir", str(certs)]) == 2
    err = capsys.readouterr().err
    assert "ca.crt expired on" in err and "certs init" in err
    assert not (certs / "node-1.key").exists()


def test_certs_flags_it_cannot_use_exit_2_naming_them(tmp_path, capsys) -> None:
    certs = make_certs(tmp_path / "certs")
    with pytest.raises(SystemExit) as exited:  # argparse's error: usage, then the flag and why
        main(["certs", "issue", "node-0", "--dir", str(certs), "--ip", "bogus"])
    assert exited.value.code == 2
    assert "argument --ip: 'bogus' does not appear to be an IPv4 or IPv6 address" in capsys.readouterr().err
    assert not (certs / "node-0.key").exists()
    # An unset shell variable (`certs init $DIR`) used to put the CA into the working directory.
    assert main(["certs", "init", ""]) == 2
    assert "DIR must not be empty" in capsys.readouterr().err
    assert main(["certs", "issue", "node-0", "--dir", ""]) == 2
    assert "--dir must not be empty" in capsys.readouterr().err


def test_a_forced_reissue_replaces_the_key_file_whole_so_no_earlier_reader_or_link_sees_the_new_key(tmp_path) -> None:
    """A key file written over in place would hand the new private key to whoever opened the old (perhaps public)
    file before, and write it into every hard link of it; a crash mid-write would leave half a key. A forced
    reissue or CA replacement writes a new file and renames it over the old one."""
    import os

    from tadlora.node.tls import init_ca, issue

    certs = make_certs(tmp_path / "certs", "node-0")
    key = certs / "node-0.key"
    key.chmod(0o644)  # e.g. copied with the wrong mode: someone may have it open
    backup = tmp_path / "node-0.key.bak"
    os.link(key, backup)
    old = key.read_bytes()
    with key.open("rb") as earlier_reader:
        issue(certs, "node-0", force=True)
        assert earlier_reader.read() == old  # the old file, not the new key
    assert backup.read_bytes() == old and key.read_bytes() != old
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    os.link(certs / "ca.key", tmp_path / "ca.key.bak")
    old_ca = (certs / "ca.key").read_bytes()
    init_ca(certs, force=True)
    assert (tmp_path / "ca.key.bak").read_bytes() == old_ca != (certs / "ca.key").read_bytes()
    assert sorted(p.name for p in certs.iterdir()) == ["ca.crt", "ca.key", "node-0.crt", "node-0.key"]  # no temp


def test_certificates_follow_rfc_5280_so_strict_verifiers_accept_nodes_for_server_and_client_use(tmp_path) -> None:
    """An RFC 5280 path validator (cryptography's, as OpenSSL's -x509_strict and Python 3.13's default ssl
    context) needs the key identifiers; a node key signs TLS handshakes only, and may never sign a certificate."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store

    certs = make_certs(tmp_path / "certs", "node-0")
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    node = x509.load_pem_x509_certificate((certs / "node-0.crt").read_bytes())
    policy = PolicyBuilder().store(Store([ca]))
    for name in ("node-0", "tadlora-node"):
        assert policy.build_server_verifier(x509.DNSName(name)).verify(node, [])[-1] == ca
    if hasattr(policy, "build_client_verifier"):
        # cryptography 43 and later; the runtime's floor, 42, makes certificates as well but verifies servers only
        # (.ci/floors runs this test there).
        assert policy.build_client_verifier().verify(node, []).chain[-1] == ca
    usage = node.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign
    assert not usage.value.key_encipherment  # an EC key: no RSA key transport
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = node.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


@pytest.mark.parametrize("case", ["no ca.key", "encrypted ca.key", "garbled ca.key", "garbled ca.crt"])
def test_certs_issue_names_the_ca_file_it_cannot_use_and_never_advises_replacing_the_ca(
    tmp_path, capsys, monkeypatch, case
) -> None:
    """Exit 2 naming the file, without a traceback. A machine with ``ca.crt`` but no ``ca.key`` (the documented
    node layout) must not be told to run ``certs init``: forced, that replaces the cluster's CA."""
    from cryptography.hazmat.primitives import serialization

    monkeypatch.delenv("TADLORA_CA_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal, even under `pytest -s` at one
    certs = make_certs(tmp_path / "certs")
    capsys.readouterr()
    if case == "no ca.key":
        (certs / "ca.key").unlink()
    elif case == "encrypted ca.key":  # a CA key kept under a passphrase, as it well may be
        key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
        encryption = serialization.BestAvailableEncryption(b"passphrase")
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
        (certs / "ca.key").write_bytes(pem)
    else:
        (certs / case.split()[1]).write_bytes(b"not PEM\n")
    assert main(["certs", "issue", "node-0", "--dir", str(certs)]) == 2
    err = capsys.readouterr().err
    assert str(certs / case.split()[1]) in err and "certs init" not in err, err
    assert not (certs / "node-0.key").exists()


def test_an_encrypted_ca_key_issues_with_its_passphrase_and_only_with_it(tmp_path, capsys, monkeypatch) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certs = tmp_path / "certs"
    monkeypatch.setenv("TADLORA_CA_PASSPHRASE", "correct horse")
    assert main(["certs", "init", str(certs), "--encrypt"]) == 0
    with pytest.raises(TypeError):  # encrypted: no key without the passphrase
        serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    assert main(["certs", "issue", "node-0", "--dir", str(certs)]) == 0
    issued = x509.load_pem_x509_certificate((certs / "node-0.crt").read_bytes())
    issued.verify_directly_issued_by(x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes()))
    serialization.load_pem_private_key((certs / "node-0.key").read_bytes(), password=None)  # a node starts unattended
    capsys.readouterr()
    monkeypatch.setenv("TADLORA_CA_PASSPHRASE", "wrong")
    assert main(["certs", "issue", "node-1", "--dir", str(certs)]) == 2
    assert f"{certs / 'ca.key'}: the passphrase given does not decrypt it" in capsys.readouterr().err
    monkeypatch.delenv("TADLORA_CA_PASSPHRASE")  # and no terminal to ask on: the variable is named
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal, even under `pytest -s` at one
    assert main(["certs", "issue", "node-1", "--dir", str(certs)]) == 2
    assert "TADLORA_CA_PASSPHRASE" in capsys.readouterr().err
    assert not (certs / "node-1.key").exists() and not (certs / "node-1.crt").exists()


def test_certs_init_encrypt_asks_twice_on_a_terminal_and_writes_nothing_without_a_passphrase(
    tmp_path, capsys, monkeypatch
) -> None:
    import getpass
    import sys

    from cryptography.hazmat.primitives import serialization

    monkeypatch.delenv("TADLORA_CA_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO())  # no terminal, even under `pytest -s` at one
    assert main(["certs", "init", str(tmp_path / "script"), "--encrypt"]) == 2  # no variable, no terminal
    assert "TADLORA_CA_PASSPHRASE" in capsys.readouterr().err and not (tmp_path / "script").exists()
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    answers = iter(["one", "another"])
    monkeypatch.setattr(getpass, "getpass", lambda prompt="": next(answers))
    assert main(["certs", "init", str(tmp_path / "typo"), "--encrypt"]) == 2
    assert "differ" in capsys.readouterr().err and not (tmp_path / "typo").exists()
    answers = iter([""])
    assert main(["certs", "init", str(tmp_path / "empty"), "--encrypt"]) == 2
    assert "passphrase is empty" in capsys.readouterr().err and not (tmp_path / "empty").exists()
    answers = iter(["same", "same", "same"])  # init asks twice, issue once
    assert main(["certs", "init", str(tmp_path / "typed"), "--encrypt"]) == 0
    assert main(["certs", "issue", "node-0", "--dir", str(tmp_path / "typed")]) == 0
    serialization.load_pem_private_key((tmp_path / "typed" / "ca.key").read_bytes(), password=b"same")


@pytest.mark.parametrize("order", ["key last", "key first"])
def test_a_ca_crt_holding_a_private_key_is_refused_so_no_node_carries_the_ca_key_unseen(tmp_path, order) -> None:
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0")
    cert, key = (certs / "ca.crt").read_bytes(), (certs / "ca.key").read_bytes()
    (certs / "ca.crt").write_bytes(cert + key if order == "key last" else key + cert)
    with pytest.raises(ValueError, match=f"{certs / 'ca.crt'} holds a private key"):
        TlsMaterial.from_dir(certs, "node-0")


@pytest.mark.parametrize("file", ["ca.crt", "node-0.crt"])
def test_a_node_names_the_certificate_file_it_cannot_parse(tmp_path, file) -> None:
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0")
    (certs / file).write_bytes(b"not PEM\n")
    with pytest.raises(ValueError, match=f"{certs / file} is not a PEM certificate"):
        TlsMaterial.from_dir(certs, "node-0")


def test_the_documented_docker_run_gives_the_node_only_its_own_key_and_never_ca_key() -> None:
    """`certs init certs/` leaves ca.key (and `certs issue`, every node's key) in certs/: mounting the directory
    would put the cluster's CA key, and other nodes' keys, inside the node's container. Checked in docs/deploy.md
    and in the Dockerfile's own comment."""
    import itertools
    import re
    import shlex

    root = Path(__file__).parents[1]
    dockerfile_comments = re.sub(r"^#\s*", "", (root / "deploy" / "Dockerfile").read_text(), flags=re.M)
    text = (root / "docs" / "deploy.md").read_text() + "\n" + dockerfile_comments
    runs = [
        shlex.split(run.replace("\\\n", " ")) for run in re.findall(r"^docker run (?:.*\\\n)*.*$", text, flags=re.M)
    ]
    checked = 0
    for words in (w for w in runs if "TADLORA_TLS_DIR" in " ".join(w)):
        tls_dir = next(w.split("=", 1)[1] for w in words if w.startswith("TADLORA_TLS_DIR="))
        node_id = next(w.split("=", 1)[1] for w in words if w.startswith("TADLORA_NODE_ID="))
        mounts = [v.split(":") for flag, v in itertools.pairwise(words) if flag == "-v"]
        into_tls_dir = sorted(Path(target).name for _, target, *_ in mounts if target.startswith(tls_dir))
        assert into_tls_dir == sorted(["ca.crt", f"{node_id}.crt", f"{node_id}.key"]), mounts
        checked += 1
    assert checked


def test_the_private_key_never_shows_in_the_materials_repr(tmp_path) -> None:
    """A repr reaches logs and tracebacks (those that print locals, an error reporter's): the key must not."""
    from tadlora.node.tls import TlsMaterial

    material = TlsMaterial.from_dir(make_certs(tmp_path / "certs", "node-0"), "node-0")
    assert b"PRIVATE KEY" in material.key
    assert "PRIVATE KEY" not in repr(material) and "PRIVATE KEY" not in str(material)
    assert "BEGIN CERTIFICATE" in repr(material)  # the public parts still show


def _sign_node_certificate(
    certs: Path,
    name: str,
    common_names: list[str],
    *,
    dns_names: list[str] | None = None,
    usages: tuple[str, ...] | None = ("server", "client"),
) -> Path:
    """A directory holding ``ca.crt`` and ``NAME.crt``/``.key``, signed by the CA in ``certs`` for DNS names
    TLS_SERVER_NAME and NAME (or ``dns_names``) with ``common_names`` in its subject and extended key usages
    ``usages`` (None: no such extension): as another tool with the CA key might issue it."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from tadlora.node.tls import TLS_SERVER_NAME

    ca_key = serialization.load_pem_private_key((certs / "ca.key").read_bytes(), password=None)
    ca = x509.load_pem_x509_certificate((certs / "ca.crt").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    dns = [TLS_SERVER_NAME, name] if dns_names is None else dns_names
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn) for cn in common_names]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns]), False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    if usages is not None:
        oids = {"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}
        builder = builder.add_extension(x509.ExtendedKeyUsage([oids[u] for u in usages]), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    out = certs.parent / "foreign"
    out.mkdir()
    (out / "ca.crt").write_bytes((certs / "ca.crt").read_bytes())
    (out / f"{name}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    no_password = serialization.NoEncryption()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, no_password)
    (out / f"{name}.key").write_bytes(pem)
    return out


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "common_names", [[], ["node-2"]], ids=["no common name", "common name not among its DNS names"]
)
async def test_a_certificate_whose_common_name_is_not_one_of_its_dns_names_speaks_for_no_node(
    tmp_path, common_names
) -> None:
    """Callers verify a node by a DNS name of its certificate, the node its callers by the common name: a certificate
    must name its node in both, or one certificate could speak for one node and answer for another. (`certs issue`
    writes both; another tool with the CA key may not, and cert-manager writes no common name.)"""
    from tadlora.node.grpc_transport import GrpcTransport
    from tadlora.node.rpc import ExchangeHeader
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs", "node-0", "node-1")
    foreign = _sign_node_certificate(certs, "node-0", common_names)
    files = (foreign / "ca.crt", foreign / "node-0.crt", foreign / "node-0.key")
    material = TlsMaterial(*(f.read_bytes() for f in files))  # as an impostor would, without from_dir's checks
    async with Node(tls(tmp_path, certs, 1, 3, (), min_peers=0)) as honest:
        header = ExchangeHeader(node_id="node-2", cluster=honest.config.cluster, fingerprint=honest.fingerprint,
                                round=0, degree=1)  # fmt: skip
        async with GrpcTransport.with_tls(material).connect(honest.address, node_id=honest.node_id) as conn:
            for claimed in ("node-0", "node-2"):
                with pytest.raises(ExchangeRefused) as refused:
                    await conn.commit(dataclasses.replace(header, node_id=claimed), True, 10.0)
                assert refused.value.reason is Reason.IDENTITY_MISMATCH, (claimed, refused.value)
                assert "certificate is for no node id" in refused.value.detail  # not "for ''"


@pytest.mark.parametrize(
    ("dns_names", "usages", "message"),
    [
        (["node-0"], ("server", "client"), "lacks the DNS name(s) tadlora-node"),
        (["tadlora-node"], ("server", "client"), "lacks the DNS name(s) node-0"),
        (["tadlora-node", "Node-0"], ("server", "client"), "lacks the DNS name(s) node-0"),
        (["tadlora-node", "node-0"], ("client",), "may not be used as a TLS server certificate"),
        (["tadlora-node", "node-0"], ("server",), "may not be used as a TLS client certificate"),
        (["tadlora-node", "node-0"], None, None),  # no extended key usage: any use, and gRPC takes it
    ],
    ids=["no shared name", "no node id", "node id in another spelling", "client only", "server only", "no EKU"],
)
def test_a_certificate_every_peer_would_refuse_is_refused_at_start_naming_what_it_lacks(
    tmp_path, dns_names, usages, message
) -> None:
    """gRPC serves with such a certificate (another tool with the CA key may issue one), and then every peer
    refuses the node: a caller with "Hostname Verification Check failed" or "unsupported certificate purpose", a
    callee as IDENTITY_MISMATCH. Refuse it at start, as the other unusable certificates are, with the fix."""
    from tadlora.node.tls import TlsMaterial

    certs = make_certs(tmp_path / "certs")
    foreign = _sign_node_certificate(certs, "node-0", ["node-0"], dns_names=dns_names, usages=usages)
    if message is None:
        TlsMaterial.from_dir(foreign, "node-0")
        return
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        TlsMaterial.from_dir(foreign, "node-0")
    assert f"certs issue node-0 --dir {foreign} --force" in str(refused.value)


def test_a_closed_connection_is_read_as_a_tls_node_only_by_a_node_that_dials_in_plaintext() -> None:
    """gRPC says only "Socket closed" when a TLS node closes a plaintext connection. A TLS node that sees it was not
    refused for speaking plaintext (a peer restarting, say): it is told nothing of TLS."""
    from tadlora.node.peers import _tls_failure

    closed = "peer 10.0.0.2:7070 unavailable: UNAVAILABLE: ipv4:10.0.0.2:7070: Socket closed"
    assert _tls_failure(closed, insecure=True) == (
        "closes plaintext connections: a node that requires TLS? (this node runs --insecure)"
    )
    assert _tls_failure(closed, insecure=False) is None
    assert _tls_failure("ipv4:10.0.0.2:7070: Connection refused", insecure=True) is None


def test_tls_files_the_user_cannot_read_are_exit_2_naming_the_file_not_a_traceback(tmp_path) -> None:
    """A key the node's user may not read (a volume that kept root's 0600 under the image's uid 10001, a unit
    without the key's group): the run died on a PermissionError traceback, exit 1, restarted every 5 s for ever.
    Now exit 2 (what no restart fixes) with a line naming the file and whose it must be; `status` and `doctor`
    say the same. Root reads any file, so as root the children run without CAP_DAC_OVERRIDE and
    CAP_DAC_READ_SEARCH, and the key belongs to nobody (uid 65534), mode 600."""
    import shutil
    import subprocess

    from nodeproc import console_script, node_env

    certs = make_certs(tmp_path / "certs", "node-0")
    key = certs / "node-0.key"
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("needs setpriv (util-linux) to drop root's right to read any file")
        os.chown(key, 65534, 65534)
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    else:
        key.chmod(0o000)
        prefix = []
    tls_flags = ["--tls-dir", str(certs), "--node-id", "node-0"]
    commands = {
        "run": ["--model", "tiny", "--peers", "127.0.0.1:1", "--out", str(tmp_path / "out"), *tls_flags],
        "status": ["status", "127.0.0.1:1", *tls_flags],
        "doctor": ["doctor", "--model", "tiny", "--peers", "127.0.0.1:1", "--out", str(tmp_path / "out"),
                   "--browse-seconds", "0", "--json", *tls_flags],
    }  # fmt: skip
    said = {
        name: subprocess.run([*prefix, console_script("tadlora-node"), *argv], capture_output=True, text=True,
                             env=node_env(), timeout=120)
        for name, argv in commands.items()
    }  # fmt: skip
    for name in ("run", "status"):
        assert said[name].returncode == 2, (name, said[name].stderr)
        assert "Traceback" not in said[name].stderr
        assert f"error: cannot read {key} as uid" in said[name].stderr and "Permission denied" in said[name].stderr
        assert "must be able to read its TLS files" in said[name].stderr
    doctor = said["doctor"]
    [check] = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "tls"]
    assert check["status"] == "FAIL" and f"cannot read {key}" in check["detail"], doctor.stdout + doctor.stderr
