"""Mutual TLS between nodes: a cluster CA, node certificates, and the gRPC credentials built from them.

Layout of a certificate directory (``tadlora-node certs init DIR`` / ``certs issue NAME --dir DIR``): ``ca.crt``
and ``ca.key`` (the cluster CA; keep ``ca.key`` off the nodes), and ``NAME.crt`` / ``NAME.key`` per node. A node
started with ``--tls-dir DIR --node-id NAME`` serves with its certificate, requires every caller to present one
signed by the same CA, and checks the callee's the same way, so a machine without a certificate from the cluster
CA cannot complete the TLS handshake and never becomes a peer. Nodes are dialled by IP address, so every node
certificate also carries the fixed DNS name `TLS_SERVER_NAME`, which clients verify instead of the address.

``ca.crt`` may hold several CA certificates (PEM blocks one after the other): a node then accepts peers, and its own
certificate, from any of them. That is how a cluster moves to a new CA without a flag day (docs/deploy.md).
"""

from __future__ import annotations

import datetime as dt
import errno
import ipaddress
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tadlora.node.peer_checks import node_id_problem

TLS_SERVER_NAME = "tadlora-node"  # DNS name in every node certificate; what clients verify (peers are dialled by IP)
CA_DAYS = 3650  # days a cluster CA is valid
NODE_DAYS = 825  # days a node certificate is valid (the CA/Browser Forum's former maximum)
CA_PASSPHRASE_ENV = "TADLORA_CA_PASSPHRASE"  # noqa: S105 -- a variable name: `certs` reads the ca.key passphrase there


class TlsFilesMissing(ValueError):
    """Some of a node's TLS files are not in its directory; ``fix`` says how to make them (`tadlora-node doctor`
    shows it as the check's fix)."""

    def __init__(self, missing: list[str], fix: str) -> None:
        super().__init__(f"TLS files missing: {', '.join(missing)}. {fix}")
        self.fix = fix


@dataclass(frozen=True)
class TlsMaterial:
    """PEM bytes of the CA certificate and of this node's certificate and key."""

    ca: bytes
    cert: bytes
    key: bytes = field(repr=False)  # a repr reaches logs and tracebacks

    @classmethod
    def from_dir(cls, directory: Path, name: str) -> TlsMaterial:
        """Read ``ca.crt``, ``NAME.crt`` and ``NAME.key``: ValueError, naming the file and the fix, if one is missing,
        or the certificate is not issued to NAME by this CA, the key is not its key, now is outside its validity, or
        peers would refuse it (`_check_usable`)."""
        _check_name(name)
        paths = [directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key"]
        try:
            missing = [str(p) for p in paths if not p.is_file()]  # PermissionError in a directory it cannot enter
            files = [] if missing else [p.read_bytes() for p in paths]
        except OSError as exc:
            # A key the node's user may not read (a volume or copy that kept root's 0600, a unit without the key's
            # group): no restart reads it either, so a ValueError (exit 2), naming the file, not a traceback.
            raise ValueError(
                f"cannot read {exc.filename or directory} as uid {os.geteuid()}: {exc.strerror or exc}; the user "
                "that runs the node must be able to read its TLS files (docs/deploy.md: the image runs as uid "
                "10001, the systemd unit reads them through the group tadlora-certs)"
            ) from exc
        if missing:
            issue = f"`tadlora-node certs issue {name} --dir {directory}`"
            # With the cluster's ca.crt there, `certs init` would refuse, and forced it replaces the CA every node
            # trusts: only this node's certificate is missing.
            how = (
                f"Issue this node's with {issue} where the cluster's ca.key is (--force to replace one it holds), and "
                f"copy {name}.crt and {name}.key here if that is another machine"
                if paths[0].is_file()
                else f"Create them with `tadlora-node certs init {directory}` (once per cluster) and {issue}"
            )
            raise TlsFilesMissing(missing, how)
        ca, cert, key = files
        _ca_certificates(paths[0], ca), _certificate(paths[1], cert)  # each parse error names its file
        material = cls(ca=ca, cert=cert, key=key)
        names = material.certificate().subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        if [n.value for n in names] != [name]:
            # Peers only accept a node under the name in its certificate; catch the mix-up here, at start-up.
            raise ValueError(f"{paths[1]} is issued to {[n.value for n in names]}, not to node id {name!r}")
        material._check_usable(directory, name)
        return material

    def certificate(self) -> x509.Certificate:
        """This node's certificate, parsed (ValueError if it is not PEM)."""
        return x509.load_pem_x509_certificate(self.cert)

    def _check_usable(self, directory: Path, name: str) -> None:
        """ValueError unless gRPC could serve with this material and peers would take it as node ``name``: the
        certificate is signed by the CA, the key is the certificate's, now is within its validity, it carries the
        DNS names ``name`` and `TLS_SERVER_NAME`, and it may serve as both TLS server and client. gRPC itself only
        says "Failed to bind to address" for the first three, and nothing for the others, which only its peers
        refuse."""
        ca_path, cert_path, key_path = directory / "ca.crt", directory / f"{name}.crt", directory / f"{name}.key"
        reissue = f"`tadlora-node certs issue {name} --dir {directory} --force`"
        cas, cert = _ca_certificates(ca_path, self.ca), self.certificate()
        problems = []
        for ca in cas:
            try:
                cert.verify_directly_issued_by(ca)
                break
            except (ValueError, TypeError, InvalidSignature) as exc:
                problems.append(str(exc) or "bad signature")
        else:
            by = "" if len(cas) == 1 else f"any of the {len(cas)} CAs in "
            raise ValueError(
                f"{cert_path} is not signed by {by}{ca_path} ({'; '.join(dict.fromkeys(problems))}); issue it from "
                f"this CA with {reissue}"
            ) from None
        try:
            key = serialization.load_pem_private_key(self.key, password=None)
        except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
            raise ValueError(f"{key_path} is not an unencrypted PEM private key: {exc}") from None
        if key.public_key() != cert.public_key():
            raise ValueError(f"{key_path} is not the key of {cert_path} (another node's key?); reissue: {reissue}")
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise ValueError(
                f"{cert_path} is valid only from {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC (now {now:%Y-%m-%d %H:%M}); "
                f"fix this host's clock, or issue a new certificate: {reissue}"
            )
        _check_peers_accept(cert, cert_path, name, reissue)

    def server_credentials(self) -> grpc.ServerCredentials:
        """Serve with our certificate; require a client certificate signed by the cluster CA."""
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Present our certificate; accept only a server certificate signed by the cluster CA."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )


def _check_peers_accept(cert: x509.Certificate, path: Path, name: str, reissue: str) -> None:
    """ValueError, naming ``path`` and the fix, unless peers would accept ``cert`` (read from ``path``) as node
    ``name`` in both directions: callers check a callee by a DNS name (`TLS_SERVER_NAME` before they know its id,
    then ``name``), callees take a caller's id from its common name only if that is one of its DNS names, and each
    end needs the certificate usable for its side of TLS (extended key usage, where the certificate has one).
    `issue` writes all of this; a certificate from another tool may lack some, and the node would start and then
    be refused by every peer, with nothing said here."""
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    # Exact: node ids have one spelling, and the callee's check of a caller compares them exactly.
    missing = [n for n in (name, TLS_SERVER_NAME) if n not in dns]
    if missing:
        raise ValueError(
            f"{path} lacks the DNS name(s) {', '.join(missing)} (it has {', '.join(dns) or 'none'}): peers accept a "
            f"node only under DNS names {name} and {TLS_SERVER_NAME}; issue it with {reissue}"
        )
    try:
        usages = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        return  # no extended key usage: any use
    # Exactly these two: gRPC's TLS (BoringSSL) refuses anyExtendedKeyUsage alone for either side.
    needed = (("server", ExtendedKeyUsageOID.SERVER_AUTH), ("client", ExtendedKeyUsageOID.CLIENT_AUTH))
    lacking = [what for what, oid in needed if oid not in usages]
    if lacking:
        raise ValueError(
            f"{path} may not be used as a TLS {' or '.join(lacking)} certificate (its extended key usage), and a "
            f"node is both, to the peers it calls and to those that call it; issue it with {reissue}"
        )


def _load_ca_key(path: Path, passphrase: Callable[[], bytes | None]) -> PrivateKeyTypes:
    """The private key in ``path``, decrypted with ``passphrase()`` if it is encrypted; ValueError naming ``path``."""
    pem = path.read_bytes()
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # encrypted: only now is a passphrase asked for
        pass
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM private key ({exc})") from None
    secret = passphrase()
    if not secret:
        raise ValueError(f"{path} is encrypted: give its passphrase in {CA_PASSPHRASE_ENV}, or type it when asked")
    try:
        return serialization.load_pem_private_key(pem, password=secret)
    except ValueError:  # cryptography says "Bad decrypt. Incorrect password?"
        raise ValueError(f"{path}: the passphrase given does not decrypt it") from None


def _ca_certificates(path: Path, pem: bytes) -> list[x509.Certificate]:
    """The CA certificates in ``pem`` (read from ``path``), in file order; ValueError naming ``path`` if it holds
    none or one that does not parse."""
    if b"PRIVATE KEY-----" in pem:
        # load_pem_x509_certificates skips other blocks: `cat new/ca.*` would put the CA key on every node unseen.
        raise ValueError(f"{path} holds a private key: it must hold CA certificates only (keep ca.key off the nodes)")
    try:
        cas = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate ({exc})") from None
    if not cas:  # load_pem_x509_certificates raises on none today; gRPC would take an empty bundle as no CA at all
        raise ValueError(f"{path} holds no PEM certificate")
    return cas


def _certificate(path: Path, pem: bytes) -> x509.Certificate:
    """``pem`` (read from ``path``) parsed; ValueError naming ``path`` if it is not a PEM certificate."""
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise ValueError(f"{path} is not a PEM certificate ({exc})") from None


def _check_name(name: str) -> None:
    """A certificate names one node id, in its only spelling (`node_id_problem`; this also keeps ``NAME.crt``
    inside the directory). It may not be TLS_SERVER_NAME: every certificate carries that name, so a client that
    expects that node would accept any node of the cluster."""
    if (problem := node_id_problem(name)) is not None:
        raise ValueError(f"{problem}; certificates are issued to node ids")
    if name == TLS_SERVER_NAME:
        raise ValueError(f"{name!r} is reserved (every node certificate carries it); choose another node id")


def _refuse_existing(paths: list[Path], force: bool) -> None:
    """FileExistsError naming every existing path, unless ``force``: checked before anything is written, so a
    refusal never leaves half a CA or a key without its certificate."""
    existing = [str(p) for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        raise FileExistsError(
            f"{', '.join(existing)} {'exists' if len(existing) == 1 else 'exist'}; pass --force to replace"
        )


def _write(path: Path, data: bytes, mode: int, force: bool) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``. Never through a symlink (one could point a key anywhere),
    never over an existing file unless ``force``. A replaced file is replaced whole: the data goes to a new file
    that is renamed over it, so whoever opened the old one (it may have been readable by others), or a hard link
    to it, never sees the new key, and a crash leaves the old file or the new one, never half of one."""
    if path.is_symlink():
        raise ValueError(f"{path} is a symbolic link; refusing to write through it")
    if not force:
        flags, target = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, path
    else:  # a fresh name next to it, so that the rename stays on one file system
        flags, target = os.O_WRONLY | os.O_CREAT | os.O_EXCL, path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    try:
        fd = os.open(target, flags, 0o600)  # never more than the owner's until it holds what it should
    except FileExistsError:
        raise FileExistsError(f"{path} exists; pass --force to replace it") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError(f"{path} is a symbolic link; refusing to write through it") from None
        raise
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if target != path:
            os.replace(target, path)
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey, passphrase: bytes | None = None) -> bytes:
    encryption = serialization.BestAvailableEncryption(passphrase) if passphrase else serialization.NoEncryption()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def init_ca(directory: Path, cluster: str = "default", force: bool = False, passphrase: bytes | None = None) -> Path:
    """Create the cluster CA (``ca.crt``, ``ca.key``) in ``directory``; return the certificate's path. With
    ``passphrase``, ``ca.key`` is encrypted under it (PKCS#8, the best encryption `cryptography` offers)."""
    if passphrase is not None and not passphrase:
        raise ValueError("the CA key's passphrase must not be empty")
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"tadlora cluster CA ({cluster})")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )  # digital_signature, key_cert_sign, crl_sign
        # RFC 5280 requires it of a CA; strict verifiers (OpenSSL's -x509_strict, Python 3.13's ssl) refuse without.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, path = directory / "ca.key", directory / "ca.crt"
    _refuse_existing([key_path, path], force)
    _write(key_path, _key_pem(key, passphrase), 0o600, force)
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return path


def issue(
    directory: Path,
    name: str,
    ips: tuple[str, ...] = (),
    force: bool = False,
    passphrase: Callable[[], bytes | None] = lambda: None,
) -> Path:
    """Issue ``NAME.crt``/``NAME.key`` signed by the CA in ``directory`` (for server and client use), valid for
    `NODE_DAYS` or until the CA expires, whichever comes first; ValueError if the CA has expired. ``passphrase`` is
    asked only if ``ca.key`` is encrypted (None: there is none to give, and that is an error naming the file). The
    node's own key is never encrypted: a node starts unattended."""
    _check_name(name)
    ca_key_path, ca_path = directory / "ca.key", directory / "ca.crt"
    missing = [p for p in (ca_key_path, ca_path) if not p.is_file()]
    if len(missing) == 2:
        raise ValueError(f"no CA in {directory}: run `tadlora-node certs init {directory}` first")
    if missing:
        # Not `certs init`: forced, it would replace the cluster's CA, which every node trusts (a node's directory
        # holds ca.crt alone; keeping ca.key off the nodes is what the docs ask).
        raise ValueError(
            f"{missing[0]} is missing: issue certificates in the directory that holds both ca.crt and ca.key of "
            "the cluster CA"
        )
    cas = _ca_certificates(ca_path, ca_path.read_bytes())
    ca_key = _load_ca_key(ca_key_path, passphrase)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key_path} is not an EC key made by `tadlora-node certs init`")
    # ca.crt may be a bundle (a cluster moving to a new CA): the key says which of its CAs issues.
    ca_cert = next((ca for ca in cas if ca.public_key() == ca_key.public_key()), None)
    if ca_cert is None:
        # Certificates signed with it would chain to nothing the nodes trust.
        raise ValueError(
            f"{ca_key_path} does not belong to {'any CA in ' if len(cas) > 1 else ''}{ca_path}: put back the key "
            "made with it (a new cluster CA, `certs init --force`, means issuing every node's certificate again)"
        )
    now = dt.datetime.now(dt.UTC)
    if now > ca_cert.not_valid_after_utc:
        # Its certificates would be refused by every peer: a new cluster CA, and new certificates from it, are due.
        raise ValueError(
            f"{directory / 'ca.crt'} expired on {ca_cert.not_valid_after_utc:%Y-%m-%d}: create a new cluster CA with "
            f"`tadlora-node certs init {directory} --force`, then issue every node's certificate again"
        )
    key_path, path = directory / f"{name}.key", directory / f"{name}.crt"
    _refuse_existing([key_path, path], force)
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.DNSName(TLS_SERVER_NAME), x509.DNSName(name)]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        # Never past the CA's end: a certificate that claims more would fail its handshakes then, not on its date.
        .not_valid_after(min(now + dt.timedelta(days=NODE_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )  # digital_signature only: the key signs TLS handshakes (ECDHE), nothing else
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        # RFC 5280 requires both of a certificate a CA issued; strict verifiers refuse one without them.
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600, force)
    _write(path, cert.public_bytes(serialization.Encoding.PEM), 0o644, force)
    return path
