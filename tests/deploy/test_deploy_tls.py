"""TLS and mutual TLS on loopback: real gRPC servers on port 0 with the certificates
``roost keys`` makes (:func:`roost.deploy.keys.make_federation`), and the plaintext rule
of :mod:`roost.deploy.tls` (plaintext only on loopback unless ``insecure=True``)."""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import grpc
import torch
from _deploy_helpers import RecordingCoordinator, spec

from roost.deploy.auth import AllowList, NodeKey, Verifier
from roost.deploy.backoff import Backoff
from roost.deploy.client import ClientConfig, NodeClient, TlsFailure, Unreachable
from roost.deploy.keys import make_federation
from roost.deploy.server import DeployServer
from roost.deploy.tls import (
    ClientTls,
    InsecureRefused,
    ServerTls,
    channel_credentials,
    server_credentials,
)

# A failed handshake is final at once (TlsFailure), so even a patient backoff (60 s in
# all, the first retry after 0.5 to 1 s) does not delay it: each refusal takes well under
# the 2 s the tests allow, and no retry is logged.
PATIENT = Backoff(initial_s=1.0, max_s=10.0, max_total_s=60.0)
FAST_ENOUGH_S = 2.0


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """``fed``: the server's federation (2 nodes); ``other``: a second federation whose CA
    the server's certificate was not signed by."""
    root = tmp_path_factory.mktemp("tls")
    make_federation(root / "fed", 2)
    make_federation(root / "other", 1)
    return root / "fed", root / "other"


def tls_server(keys_dir, coord, *, mutual=False) -> DeployServer:
    verifier = Verifier(AllowList.load(keys_dir / "allowlist.txt"))
    tls = ServerTls.from_dir(keys_dir, mutual=mutual)
    return DeployServer(coord, verifier, address="127.0.0.1:0", tls=tls)


def node_client(server, keys_dir, tls, node_id="node-0", **kwargs) -> NodeClient:
    """``node_id`` of ``keys_dir``'s federation (on the server's allow-list), with ``tls``
    and the PATIENT backoff."""
    key = NodeKey.load(keys_dir / "nodes" / node_id)
    config = ClientConfig(backoff=PATIENT, timeout_s=5.0)
    return NodeClient(server.address, key, tls=tls, config=config, **kwargs)


@contextlib.contextmanager
def refused_at_once(caplog) -> Iterator[pytest.ExceptionInfo[TlsFailure]]:
    """The block raises TlsFailure (an Unreachable) within FAST_ENOUGH_S, with no retry
    logged."""
    caplog.set_level(logging.INFO, "roost.deploy")
    start = time.monotonic()
    with pytest.raises(TlsFailure) as refused:
        yield refused
    assert time.monotonic() - start < FAST_ENOUGH_S
    assert isinstance(refused.value, Unreachable)
    assert [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()] == []


def assert_tls_advice(message: str, host: str) -> None:
    """The three causes a TlsFailure on a TLS channel suggests."""
    assert "the CA given with --ca is the one that signed the server's certificate" in message
    assert f"that {host!r} is one of the names in the server's certificate" in message
    assert "under mutual TLS" in message and "client certificate" in message


def test_a_node_trusting_the_federation_ca_registers_and_pulls_over_tls(dirs):
    """The whole path works encrypted: ServerTls.from_dir's certificate (SAN 127.0.0.1)
    verifies under ClientTls.from_dir's ca.pem, the node registers with its 40 examples and
    pulls its task with the payload bit-exact."""
    fed, _ = dirs
    coord = RecordingCoordinator()
    payload = {"params": torch.arange(5, dtype=torch.float32)}
    coord.add("node-0", spec("t-tls", payload))
    with (
        tls_server(fed, coord) as server,
        node_client(server, fed, ClientTls.from_dir(fed), num_examples=40) as node,
    ):
        assert server.tls is True
        info = node.register()
        task = node.pull_task()
    assert info.heartbeat_interval_s == 10.0 and info.max_message_bytes == 4 << 20
    assert task is not None and task.task_id == "t-tls"
    assert torch.equal(task.payload["params"], payload["params"])  # type: ignore[arg-type]
    assert [(n.node_id, n.num_examples) for n in coord.registered] == [("node-0", 40)]
    assert coord.pulls == ["node-0"]


def test_a_node_trusting_another_federations_ca_is_refused_at_once(dirs, caplog):
    """The node's key is on the allow-list, but it trusts the other federation's CA, so
    the server's certificate does not verify: gRPC's UNAVAILABLE says the TLS handshake
    failed, and the client raises TlsFailure at the first attempt (no retry) naming the
    address, gRPC's detail and what to check. Nothing reached the coordinator."""
    fed, other = dirs
    coord = RecordingCoordinator()
    with (
        tls_server(fed, coord) as server,
        node_client(server, fed, ClientTls.from_dir(other)) as node,
        refused_at_once(caplog) as refused,
    ):
        node.register()
    message = str(refused.value)
    assert message.startswith(
        f"Register: the TLS handshake with the server {server.address} failed (UNAVAILABLE: "
    )
    assert "tls handshake failed" in message.lower()  # gRPC's detail: TLS, not auth
    assert_tls_advice(message, "127.0.0.1")
    assert coord.calls() == (0, 0, 0, 0, 0)


def test_a_plaintext_node_cannot_talk_to_a_tls_server(dirs, caplog):
    """On loopback the client allows plaintext, but the server speaks only TLS and closes
    the connection before any HTTP/2: UNAVAILABLE "Socket closed", which (before the node
    ever reached the server) is a TlsFailure at once. The heartbeat has to register first,
    and the message says so; nothing reached the coordinator."""
    fed, _ = dirs
    coord = RecordingCoordinator()
    with (
        tls_server(fed, coord) as server,
        node_client(server, fed, None) as node,
        refused_at_once(caplog) as refused,
    ):
        node.heartbeat()
    message = str(refused.value)
    assert message.startswith(
        f"Register (before Heartbeat): the server {server.address} closed the connection "
        "before any gRPC was exchanged (UNAVAILABLE: "
    )
    assert "socket closed" in message.lower()
    assert "this node connects without TLS" in message and "--ca" in message
    assert coord.calls() == (0, 0, 0, 0, 0)


def test_a_tls_node_cannot_talk_to_a_plaintext_server(dirs, caplog):
    """The other way round: the node starts a TLS handshake and the plaintext server
    answers HTTP/2, so the handshake fails (WRONG_VERSION_NUMBER): TlsFailure at once."""
    fed, _ = dirs
    coord = RecordingCoordinator()
    verifier = Verifier(AllowList.load(fed / "allowlist.txt"))
    with (
        DeployServer(coord, verifier, address="127.0.0.1:0") as server,
        node_client(server, fed, ClientTls.from_dir(fed)) as node,
        refused_at_once(caplog) as refused,
    ):
        node.pull_task()
    message = str(refused.value)
    assert message.startswith(
        f"Register (before PullTask): the TLS handshake with the server {server.address} failed"
    )
    assert "tls handshake failed" in message.lower()
    assert coord.calls() == (0, 0, 0, 0, 0)


@pytest.mark.parametrize(
    ("server_name", "works"), [("localhost", True), ("roost.example.org", False)]
)
def test_server_name_overrides_the_name_checked_against_the_certificate(
    dirs, caplog, server_name, works
):
    """``ClientTls.server_name`` replaces the address's host (127.0.0.1) in the check:
    ``localhost`` is one of the certificate's SANs, ``roost.example.org`` is not (no --host
    was given), so the first registers and the second is refused at once, the message
    naming the name that is not in the certificate."""
    fed, _ = dirs
    coord = RecordingCoordinator()
    tls = ClientTls(fed / "ca.pem", server_name=server_name)
    with tls_server(fed, coord) as server, node_client(server, fed, tls) as node:
        if works:
            node.register()
        else:
            with refused_at_once(caplog) as refused:
                node.register()
            message = str(refused.value)
            assert f"the TLS handshake with the server {server.address} failed" in message
            assert "hostname verification check failed" in message.lower()
            assert_tls_advice(message, "roost.example.org")
    assert len(coord.registered) == (1 if works else 0)


def test_mutual_tls_refuses_a_node_without_a_client_certificate(dirs, caplog):
    """ServerTls.from_dir(mutual=True) requires a client certificate signed by ca.pem; a
    node that trusts the right CA but presents none is refused by the server (TLS 1.3: the
    client's side of the handshake is done, so it only sees "Socket closed"): TlsFailure at
    once, suggesting the client certificate, and nothing at the coordinator."""
    fed, _ = dirs
    coord = RecordingCoordinator()
    with (
        tls_server(fed, coord, mutual=True) as server,
        node_client(server, fed, ClientTls.from_dir(fed)) as node,
        refused_at_once(caplog) as refused,
    ):
        node.register()
    message = str(refused.value)
    assert f"Register: the TLS handshake with the server {server.address} failed" in message
    assert "socket closed" in message.lower()
    assert_tls_advice(message, "127.0.0.1")
    assert coord.calls() == (0, 0, 0, 0, 0)


def test_mutual_tls_refuses_a_client_certificate_of_another_ca(dirs, caplog):
    """A client certificate signed by the other federation's CA is not one the server's
    client CA (fed/ca.pem) signed: refused at once like no certificate at all."""
    fed, other = dirs
    coord = RecordingCoordinator()
    foreign = other / "nodes" / "node-0"
    tls = ClientTls(fed / "ca.pem", foreign / "client.pem", foreign / "client.key")
    with (
        tls_server(fed, coord, mutual=True) as server,
        node_client(server, fed, tls) as node,
        refused_at_once(caplog) as refused,
    ):
        node.register()
    assert f"the TLS handshake with the server {server.address} failed" in str(refused.value)
    assert coord.calls() == (0, 0, 0, 0, 0)


def test_mutual_tls_accepts_a_node_with_its_client_certificate(dirs):
    """ClientTls.from_dir(dir, node_id) adds nodes/node-1/client.pem and client.key; with
    them node-1 registers, pulls its task and heartbeats through the mutual-TLS server."""
    fed, _ = dirs
    coord = RecordingCoordinator()
    coord.add("node-1", spec("t-m", {"params": torch.ones(3)}))
    tls = ClientTls.from_dir(fed, "node-1")
    assert (tls.cert, tls.key) == (
        fed / "nodes" / "node-1" / "client.pem",
        fed / "nodes" / "node-1" / "client.key",
    )
    with (
        tls_server(fed, coord, mutual=True) as server,
        node_client(server, fed, tls, node_id="node-1") as node,
    ):
        task = node.pull_task()
        beat = node.heartbeat("t-m")
    assert task is not None and task.task_id == "t-m"
    assert beat is True
    assert [n.node_id for n in coord.registered] == ["node-1"]
    assert coord.heartbeats == [("node-1", "t-m")]


NOT_LOOPBACK = ["10.1.2.3:5000", "0.0.0.0:5000", "[2001:db8::1]:5000", "roost.example.org:443"]
LOOPBACK = ["127.0.0.1:5000", "127.9.8.7:1", "localhost:5000", "[::1]:5000"]


@pytest.mark.parametrize("address", NOT_LOOPBACK)
def test_plaintext_is_refused_off_loopback_unless_insecure(address):
    """Without TLS files both sides refuse plaintext on an address that is not loopback
    (0.0.0.0 included: it listens on every interface), naming the address and the way
    out; with insecure=True both return None, i.e. plaintext. Nothing is bound."""
    with pytest.raises(InsecureRefused, match=f"serving on {re.escape(address)},"):
        server_credentials(address, None)
    with pytest.raises(InsecureRefused, match="insecure=True") as refused:
        channel_credentials(address, None)
    assert f"connecting to {address}, which is not a loopback address" in str(refused.value)
    assert server_credentials(address, None, insecure=True) is None
    assert channel_credentials(address, None, insecure=True) is None


@pytest.mark.parametrize("address", LOOPBACK)
def test_plaintext_is_allowed_on_loopback(address):
    """localhost, 127.0.0.0/8 and ::1 are loopback: plaintext (None) without insecure."""
    assert server_credentials(address, None) is None
    assert channel_credentials(address, None) is None


def test_the_server_and_the_client_check_before_binding_or_connecting():
    """DeployServer raises InsecureRefused before binding 10.1.2.3 (not an address of this
    machine, so binding would fail with OSError instead); NodeClient raises it before
    making a channel, and with insecure=True makes one without connecting."""
    key = NodeKey.generate("node-0")
    verifier = Verifier(AllowList({"node-0": key.public_bytes}))
    with pytest.raises(InsecureRefused, match=r"serving on 10\.1\.2\.3:5000"):
        DeployServer(RecordingCoordinator(), verifier, address="10.1.2.3:5000")
    with pytest.raises(InsecureRefused, match=r"connecting to 10\.1\.2\.3:5000"):
        NodeClient("10.1.2.3:5000", key)
    with NodeClient("10.1.2.3:5000", key, insecure=True) as node:  # lazy: no connection
        assert node.address == "10.1.2.3:5000"


def test_credentials_from_the_tls_files(dirs):
    """With TLS files the address does not matter: both sides return gRPC credentials
    objects, and a ClientTls with a certificate but no key is a ValueError."""
    fed, _ = dirs
    creds = server_credentials("0.0.0.0:5000", ServerTls.from_dir(fed, mutual=True))
    assert isinstance(creds, grpc.ServerCredentials)
    channel = channel_credentials("10.1.2.3:5000", ClientTls.from_dir(fed, "node-0"))
    assert isinstance(channel, grpc.ChannelCredentials)
    half = ClientTls(fed / "ca.pem", cert=fed / "nodes" / "node-0" / "client.pem")
    with pytest.raises(ValueError, match="both cert and key"):
        channel_credentials("10.1.2.3:5000", half)
