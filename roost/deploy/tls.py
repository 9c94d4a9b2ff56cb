"""TLS for the server and its nodes, on by default outside loopback.

:func:`server_credentials` and :func:`channel_credentials` turn an address and the TLS
files into gRPC credentials. Without TLS files they return None (plaintext), which they
allow only when the address is loopback (``localhost``, ``127.0.0.0/8``, ``::1``) or the
caller passes ``insecure=True``; otherwise they raise :class:`InsecureRefused` saying how
to fix it. Mutual TLS is optional: a :class:`ServerTls` with ``client_ca`` requires every
node to present a certificate signed by it (a :class:`ClientTls` with ``cert`` and
``key``). ``roost keys`` writes a test federation's files (:mod:`roost.deploy.keys`);
:meth:`ServerTls.from_dir` and :meth:`ClientTls.from_dir` read them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from roost.deploy._deps import missing_extra

try:
    import grpc
except ImportError as e:
    raise missing_extra("grpcio", e) from e

__all__ = [
    "ClientTls",
    "InsecureRefused",
    "ServerTls",
    "channel_credentials",
    "host_of",
    "is_loopback",
    "server_credentials",
]


class InsecureRefused(ValueError):
    """Plaintext gRPC asked for on an address that is not loopback."""


@dataclass(frozen=True)
class ServerTls:
    """The server's certificate chain and key (PEM files); ``client_ca``: require nodes to
    present a certificate signed by this CA (mutual TLS)."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_dir(cls, keys_dir: str | Path, *, mutual: bool = False) -> ServerTls:
        """``server.pem``/``server.key`` of a ``roost keys`` directory (``ca.pem`` as the
        client CA when ``mutual``)."""
        d = Path(keys_dir)
        return cls(d / "server.pem", d / "server.key", d / "ca.pem" if mutual else None)


@dataclass(frozen=True)
class ClientTls:
    """What a node trusts (``ca``: the CA that signed the server's certificate) and, for
    mutual TLS, its own certificate and key. ``server_name`` overrides the name checked
    against the server's certificate (default: the host of the address)."""

    ca: Path
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None

    @classmethod
    def from_dir(cls, keys_dir: str | Path, node_id: str | None = None) -> ClientTls:
        """``ca.pem`` of a ``roost keys`` directory and, given ``node_id``, that node's
        ``client.pem``/``client.key`` (for mutual TLS)."""
        d = Path(keys_dir)
        if node_id is None:
            return cls(d / "ca.pem")
        node = d / "nodes" / node_id
        return cls(d / "ca.pem", node / "client.pem", node / "client.key")


def host_of(address: str) -> str:
    """The host part of ``HOST:PORT`` or ``[IPV6]:PORT`` (brackets removed)."""
    if address.startswith("["):
        end = address.find("]")
        if end < 0:
            raise ValueError(f"address {address!r}: unclosed '['")
        return address[1:end]
    host, sep, _ = address.rpartition(":")
    if not sep:
        raise ValueError(f"address {address!r} must be HOST:PORT")
    return host


def is_loopback(address: str) -> bool:
    """True for ``localhost``, ``127.0.0.0/8`` and ``::1`` addresses (``0.0.0.0`` is not)."""
    host = host_of(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(address: str, side: str, option: str) -> InsecureRefused:
    return InsecureRefused(
        f"refusing plaintext gRPC {side} {address}, which is not a loopback address: give "
        f"{option} (roost keys DIR makes test certificates), or pass insecure=True to "
        "accept unencrypted, unauthenticated-server traffic on this network"
    )


def server_credentials(address: str, tls: ServerTls | None, *, insecure: bool = False) -> Any:
    """``grpc.ServerCredentials`` for ``tls``; None (plaintext) when ``tls`` is None and the
    address is loopback or ``insecure``; else InsecureRefused."""
    if tls is None:
        if insecure or is_loopback(address):
            return None
        raise _refuse(address, "serving on", "a ServerTls (certificate and key)")
    client_ca = tls.client_ca.read_bytes() if tls.client_ca else None
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(address: str, tls: ClientTls | None, *, insecure: bool = False) -> Any:
    """``grpc.ChannelCredentials`` for ``tls``; None (plaintext) when ``tls`` is None and the
    address is loopback or ``insecure``; else InsecureRefused."""
    if tls is None:
        if insecure or is_loopback(address):
            return None
        raise _refuse(address, "connecting to", "a ClientTls (the CA's certificate)")
    if (tls.cert is None) != (tls.key is None):
        raise ValueError("ClientTls needs both cert and key for mutual TLS, or neither")
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca.read_bytes(),
        private_key=tls.key.read_bytes() if tls.key else None,
        certificate_chain=tls.cert.read_bytes() if tls.cert else None,
    )
