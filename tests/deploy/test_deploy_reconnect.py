"""Backoff and reconnection: the delays of :class:`~roost.deploy.backoff.Backoff`, a client
giving up on a server that is down (:class:`~roost.deploy.client.Unreachable`), and a
client registering again by itself with a server restarted on the same port."""

from __future__ import annotations

import contextlib
import logging
import random
import re
import socket
import threading
import time
from collections.abc import Iterator

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import torch
from _deploy_helpers import FAST, Federation, RecordingCoordinator, spec

from roost.deploy.backoff import Backoff
from roost.deploy.client import ClientConfig, NodeClient, RemoteRefusal, TlsFailure, Unreachable
from roost.deploy.errors import NotRegistered
from roost.deploy.server import DeployServer


def test_delays_grow_by_the_multiplier_up_to_the_cap_without_jitter():
    """jitter=0: 0.01 · 2^k capped at 0.05, six of them (max_attempts)."""
    b = Backoff(initial_s=0.01, max_s=0.05, multiplier=2.0, jitter=0.0, max_attempts=6)
    assert list(b.delays()) == pytest.approx([0.01, 0.02, 0.04, 0.05, 0.05, 0.05])


def test_jitter_scales_each_delay_into_one_minus_jitter_to_one_of_its_base():
    """jitter=0.5: delay k lies in [base_k / 2, base_k], and a seeded rng gives the same
    sequence twice (what lets the client test below know its delays in advance)."""
    b = Backoff(initial_s=0.1, max_s=0.4, jitter=0.5, max_attempts=5, max_total_s=None)
    bases = [0.1, 0.2, 0.4, 0.4, 0.4]
    delays = list(b.delays(random.Random(3)))
    assert len(delays) == 5
    for d, base in zip(delays, bases, strict=True):
        assert base / 2 <= d <= base
    assert list(b.delays(random.Random(3))) == delays


def test_the_delays_stop_before_their_sum_would_pass_max_total_s():
    """0.05 each (multiplier 1, no jitter) with max_total_s=0.12: 0.05 + 0.05 = 0.10, and a
    third would make 0.15 > 0.12, so there are two; max_attempts=0 gives none."""
    b = Backoff(initial_s=0.05, multiplier=1.0, jitter=0.0, max_total_s=0.12)
    assert list(b.delays()) == pytest.approx([0.05, 0.05])
    assert list(Backoff(max_attempts=0).delays()) == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_s": 0.0},
        {"initial_s": 2.0, "max_s": 1.0},
        {"multiplier": 0.5},
        {"jitter": 1.5},
        {"max_attempts": -1},
    ],
)
def test_bad_backoff_parameters_are_refused(kwargs):
    with pytest.raises(ValueError):
        Backoff(**kwargs)


# --- against real servers ---------------------------------------------------------------


def free_port() -> int:
    """A loopback port nothing listens on (bound and released at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_client_whose_server_is_down_retries_with_the_backoff_then_gives_up(caplog):
    """Backoff(initial 0.04 s, cap 0.1 s, jitter 0.5, 3 attempts): bases 0.04, 0.08, 0.1,
    so the three sleeps are at least 0.02 + 0.04 + 0.05 = 0.11 s and at most 0.22 s. With
    the client's rng seeded, they are exactly Backoff.delays(Random(7)): the client logs
    those three, sleeps at least their sum, then raises Unreachable (not TlsFailure: a
    refused connection is a server that is down) naming the call, the address and the last
    status (UNAVAILABLE: nothing listens on the port). What fails is the registration the
    heartbeat needs first, and the log lines and the error say so."""
    backoff = Backoff(initial_s=0.04, max_s=0.1, jitter=0.5, max_attempts=3, max_total_s=None)
    expected = list(backoff.delays(random.Random(7)))
    assert len(expected) == 3 and 0.11 <= sum(expected) <= 0.22
    address = f"127.0.0.1:{free_port()}"
    config = ClientConfig(backoff=backoff, timeout_s=5.0)
    node = NodeClient(address, Federation().alice, config=config, rng=random.Random(7))
    caplog.set_level(logging.INFO, "roost.deploy")
    start = time.monotonic()
    with node, pytest.raises(Unreachable) as gave_up:
        node.heartbeat()
    elapsed = time.monotonic() - start
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    logged = [float(re.search(r"retrying in ([0-9.]+) s$", m)[1]) for m in retries]  # type: ignore[index]
    assert logged == [round(d, 3) for d in expected]
    assert all(m.startswith("Register (before Heartbeat): UNAVAILABLE") for m in retries)
    assert all("Connection refused" in m for m in retries)
    assert sum(expected) <= elapsed < sum(expected) + 5.0
    assert type(gave_up.value) is Unreachable
    assert str(gave_up.value).startswith(
        f"Register (before Heartbeat): server {address} unreachable after retries (UNAVAILABLE"
    )
    assert node.server is None


@contextlib.contextmanager
def closing_at_once(port: int = 0) -> Iterator[int]:
    """A TCP listener on loopback ``port`` that accepts each connection and closes it at
    once, before any HTTP/2 (what a proxy whose server is down can do); yields its port."""
    listener = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        with contextlib.suppress(OSError):
            listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        thread.join(5.0)


def test_a_connection_closed_before_http2_is_final_only_before_the_server_was_reached(caplog):
    """Socket closed at connect is how a TLS server refuses a plaintext node, so before the
    node ever reached its server it raises TlsFailure at once (no retry, though Backoff
    allows 60 s). A node that has reached the server once retries it instead: here its
    server stops and a listener that closes every connection takes the port; the heartbeat
    is retried FEW's 3 times and ends in a plain Unreachable."""
    patient = ClientConfig(backoff=Backoff(initial_s=1.0, max_s=10.0, max_total_s=60.0))
    with closing_at_once() as port:
        node = NodeClient(f"127.0.0.1:{port}", Federation().alice, config=patient)
        start = time.monotonic()
        with node, pytest.raises(TlsFailure, match=r"Socket closed|Connection reset") as refused:
            node.register()
        assert time.monotonic() - start < 2.0
    assert "as a TLS server does to a plaintext client" in str(refused.value)

    few = Backoff(initial_s=0.01, max_s=0.02, max_attempts=3, max_total_s=None)
    fed, coord = Federation(), RecordingCoordinator()
    server = DeployServer(coord, fed.verifier(), address="127.0.0.1:0").start()
    port = server.port
    caplog.set_level(logging.INFO, "roost.deploy")
    with NodeClient(server.address, fed.alice, config=ClientConfig(backoff=few)) as node:
        assert node.heartbeat() is True
        server.stop()
        with closing_at_once(port), pytest.raises(Unreachable) as gave_up:
            node.heartbeat()
    assert type(gave_up.value) is Unreachable
    assert str(gave_up.value).startswith(
        f"Heartbeat: server 127.0.0.1:{port} unreachable after retries (UNAVAILABLE"
    )
    retries = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert len(retries) == 3
    # the listener's close is a "Socket closed", or a reset when it caught the client's bytes
    assert all(re.search("Socket closed|Connection reset by peer", m) for m in retries)


def test_no_retries_means_one_attempt_and_no_sleep():
    """max_attempts=0: the first UNAVAILABLE is final; no backoff sleep happens (well
    under the 0.1 s a single initial delay would take)."""
    config = ClientConfig(backoff=Backoff(initial_s=0.1, max_attempts=0), timeout_s=5.0)
    node = NodeClient(f"127.0.0.1:{free_port()}", Federation().alice, config=config)
    start = time.monotonic()
    with node, pytest.raises(Unreachable, match=r"^Register: server .* \(UNAVAILABLE"):
        node.register()
    assert time.monotonic() - start < 1.0


def test_after_a_restart_on_the_same_port_the_client_registers_again_by_itself(caplog):
    """The first server knows alice; it stops and a new DeployServer with a fresh
    coordinator binds the same port. alice's next pull reaches it, is refused NotRegistered
    (the server's WARNING says so), and the client registers again (with its 12 examples)
    and repeats the pull, which returns the new coordinator's task. The old coordinator saw
    one registration, the new one one registration and one pull."""
    fed = Federation()
    old, new = RecordingCoordinator(), RecordingCoordinator()
    first = DeployServer(old, fed.verifier(), address="127.0.0.1:0").start()
    port = first.port
    node = NodeClient(first.address, fed.alice, num_examples=12, config=ClientConfig(backoff=FAST))
    try:
        assert node.heartbeat() is True
        assert [n.node_id for n in old.registered] == ["alice"]
        first.stop()
        new.add("alice", spec("t-after", {"params": torch.arange(3, dtype=torch.float32)}))
        second = DeployServer(new, fed.verifier(), address=f"127.0.0.1:{port}")
        assert second.port == port
        caplog.set_level(logging.WARNING, "roost.deploy")
        with second:
            task = node.pull_task()
    finally:
        node.close()
    assert task is not None and task.task_id == "t-after"
    assert torch.equal(task.payload["params"], torch.arange(3, dtype=torch.float32))  # type: ignore[arg-type]
    assert [(n.node_id, n.num_examples) for n in new.registered] == [("alice", 12)]
    assert new.pulls == ["alice"]
    assert old.calls() == (1, 0, 0, 0, 1)  # nothing after the restart reached the old one
    refusals = [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused")]
    assert len(refusals) == 1
    assert refusals[0].startswith("refused PullTask from ")
    assert "FAILED_PRECONDITION NotRegistered" in refusals[0]


def test_the_client_registers_again_only_once_per_call(monkeypatch):
    """A server that answers NotRegistered to every call even after a registration: the
    client registers again once, repeats the call once, and then raises the refusal rather
    than looping (2 registrations: the first and the one retry)."""
    fed, coord = Federation(), RecordingCoordinator()
    with DeployServer(coord, fed.verifier(), address="127.0.0.1:0") as server:

        def forgetful(caller, node_id):
            raise NotRegistered(f"node {node_id!r} has not registered with this server")

        monkeypatch.setattr(server.servicer, "_check_node", forgetful)
        with (
            NodeClient(server.address, fed.alice, config=ClientConfig(backoff=FAST)) as node,
            pytest.raises(RemoteRefusal) as refused,
        ):
            node.heartbeat()
    assert (refused.value.code, refused.value.kind) == ("FAILED_PRECONDITION", "NotRegistered")
    assert len(coord.registered) == 2
    assert coord.heartbeats == []
