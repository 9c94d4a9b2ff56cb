"""``roost keys DIR --nodes N [--host NAME ...]``: the keys and certificates of a test federation.

Writes, in DIR::

    ca.pem, ca.key               a CA (ECDSA P-256, valid 365 days) that signs the others
    server.pem, server.key       the server's certificate, SANs localhost, 127.0.0.1, ::1
                                 and each --host (an IP address or a DNS name)
    allowlist.txt                the server's allow-list: one line per node (roost.deploy.auth)
    nodes/node-I/node.key        node I's Ed25519 signing key (PEM, PKCS #8)
    nodes/node-I/node.pub        its public key, the node's allow-list line
    nodes/node-I/client.pem,     node I's client certificate (CN node-I) and key, for
    nodes/node-I/client.key      mutual TLS; omitted with --no-client-certs

Every file is written to a temporary file in its directory and moved into place
(``os.replace``); private keys (``*.key``) are created with mode 0600, new directories with
0700. If any of these files exists already, nothing is written and FileExistsError names
it, unless ``force``.

``force`` replaces a previous federation in DIR with the new one, so none of its files
survive: after writing, it removes those of roost keys' files that the new federation did
not write, i.e. the client.pem and client.key of a previous run with client certificates
(under --no-client-certs) and the node.key, node.pub, client.pem and client.key of each
nodes/node-I the new one has no node I for (fewer --nodes), then each such node-I directory
that is left empty. Nothing else is touched: a file roost keys does not make (any other
name, or one outside DIR's top level and nodes/node-I) stays where it is, silently, and so
does the node directory holding it. These are test credentials: the CA key sits next to the
rest, and no key is encrypted. Imports only cryptography (not grpc).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from roost.deploy._deps import missing_extra
from roost.deploy.auth import AllowList, NodeKey
from roost.track.files import atomic_write_bytes

try:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
except ImportError as e:
    raise missing_extra("cryptography", e) from e

__all__ = [
    "DEFAULT_HOSTS",
    "Federation",
    "make_federation",
    "run_cli",
    "write_atomic",
]

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


@dataclass(frozen=True)
class Federation:
    """What :func:`make_federation` wrote."""

    root: Path
    node_ids: tuple[str, ...]
    hosts: tuple[str, ...]
    client_certs: bool
    files: tuple[Path, ...]
    removed: tuple[Path, ...] = ()
    """Files of a previous federation that ``force`` removed (the module docstring says
    which)."""


def write_atomic(path: Path, data: bytes, *, private: bool = False) -> None:
    """Write ``data`` atomically to ``path`` with mode 0600 when ``private``, else 0644."""
    atomic_write_bytes(path, data, 0o600 if private else 0o644)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Roost test federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    hosts: Sequence[str] = (),
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    """A CA certificate when ``issuer`` is None (self-signed), else a leaf signed by it."""
    now = datetime.datetime.now(datetime.timezone.utc)
    name = _name(subject)
    issuer_name, signing_key = issuer if issuer else (name, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is None:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    if hosts:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False
        )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _mkdir(path: Path) -> None:
    """Create ``path`` and any missing parents, each with mode 0700."""
    for d in [*reversed(path.parents), path]:
        if not d.exists():
            d.mkdir(mode=0o700)


NODE_DIR = re.compile(r"node-(0|[1-9][0-9]*)")
"""The name of a node directory roost keys makes (nodes/node-I)."""
NODE_FILE_NAMES = ("node.key", "node.pub", "client.pem", "client.key")


def _stale(root: Path, written: set[Path]) -> tuple[list[Path], list[Path]]:
    """The node files of a previous federation in ``root`` that are not in ``written``, and
    the node directories they are in. (The top-level files are always rewritten.)"""
    nodes = root / "nodes"
    if not nodes.is_dir():
        return [], []
    node_dirs = [
        d
        for d in nodes.iterdir()
        if NODE_DIR.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
    ]
    files, dirs = [], []
    for d in sorted(node_dirs, key=lambda d: int(d.name[len("node-") :])):
        stale = [
            f
            for f in (d / name for name in NODE_FILE_NAMES)
            if f not in written and (f.is_file() or f.is_symlink())
        ]
        files += stale
        if stale:
            dirs.append(d)
    return files, dirs


def _remove_stale(root: Path, written: set[Path]) -> list[Path]:
    """Remove what :func:`_stale` finds, then each of its directories left empty."""
    files, dirs = _stale(root, written)
    for f in files:
        f.unlink()
    for d in dirs:
        if not any(d.iterdir()):
            d.rmdir()
    return files


def make_federation(
    root: str | Path,
    nodes: int,
    hosts: Sequence[str] = (),
    *,
    client_certs: bool = True,
    force: bool = False,
) -> Federation:
    """Write the files listed in the module docstring for ``nodes`` nodes into ``root``;
    with ``force``, replacing those there and removing the previous federation's files the
    new one does not write (see the module docstring)."""
    if nodes < 1:
        raise ValueError(f"--nodes must be >= 1, got {nodes}")
    root = Path(root)
    all_hosts = tuple(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    node_ids = tuple(f"node-{i}" for i in range(nodes))
    plan: dict[Path, tuple[bytes, bool]] = {}  # path -> (data, private)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("Roost test CA", ca_key, None)
    plan[root / "ca.pem"] = (_pem(ca), False)
    plan[root / "ca.key"] = (_pem_key(ca_key), True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "roost server",
        server_key,
        (ca.subject, ca_key),
        hosts=all_hosts,
        usage=ExtendedKeyUsageOID.SERVER_AUTH,
    )
    plan[root / "server.pem"] = (_pem(server) + _pem(ca), False)
    plan[root / "server.key"] = (_pem_key(server_key), True)
    allowed: dict[str, bytes] = {}
    for node_id in node_ids:
        d = root / "nodes" / node_id
        node = NodeKey.generate(node_id)
        allowed[node_id] = node.public_bytes
        plan[d / "node.key"] = (node.private_pem(), True)
        plan[d / "node.pub"] = ((node.public_line() + "\n").encode(), False)
        if client_certs:
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _certificate(
                node_id, key, (ca.subject, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH
            )
            plan[d / "client.pem"] = (_pem(cert), False)
            plan[d / "client.key"] = (_pem_key(key), True)
    plan[root / "allowlist.txt"] = (AllowList(allowed).text().encode(), False)

    existing = [p for p in plan if p.exists()]
    if existing and not force:
        shown = ", ".join(str(p) for p in existing[:3]) + (" ..." if len(existing) > 3 else "")
        raise FileExistsError(
            f"{root} already holds keys ({shown}); refusing to overwrite them "
            "(use --force to replace them)"
        )
    for path, (data, private) in plan.items():
        _mkdir(path.parent)
        write_atomic(path, data, private=private)
    removed = _remove_stale(root, set(plan)) if force else []
    return Federation(root, node_ids, all_hosts, client_certs, tuple(plan), tuple(removed))


def run_cli(args: argparse.Namespace) -> int:
    """``roost keys`` (:mod:`roost.cli` parses ``args``): make the federation and print
    what was written."""
    fed = make_federation(
        args.dir,
        args.nodes,
        args.host,
        client_certs=not args.no_client_certs,
        force=args.force,
    )
    root = args.dir.rstrip("/")
    node_files = "node.key, node.pub" + (", client.pem, client.key" if fed.client_certs else "")
    print(f"{root}/ca.pem: the CA certificate every node trusts (ca.key signs)")
    print(f"{root}/server.pem, {root}/server.key: the server's, for {', '.join(fed.hosts)}")
    print(f"{root}/allowlist.txt: the server's allow-list of {len(fed.node_ids)} node keys")
    last = f" to {fed.node_ids[-1]}" if len(fed.node_ids) > 1 else ""
    print(f"{root}/nodes/{fed.node_ids[0]}{last}: {node_files} each")
    if fed.removed:
        names = ", ".join(str(p.relative_to(fed.root)) for p in fed.removed)
        print(f"{root}: removed the previous federation's {names}")
    return 0
