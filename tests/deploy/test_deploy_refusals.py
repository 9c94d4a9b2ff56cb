"""Every kind of bad message, one at a time, against a real server: the exact gRPC status,
the refusal kind, a log line, nothing at the coordinator, and the server still serving."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import grpc
import torch
from _deploy_helpers import (
    Federation,
    RecordingCoordinator,
    call,
    client,
    heartbeat_body,
    running_server,
    signed,
    spec,
)
from _hostile import GOOD_DELTA, HOSTILE, SPEC_NUMEL, Hostile, Scene

from roost.deploy.auth import Signer
from roost.deploy.client import RemoteRefusal
from roost.deploy.protocol import Result
from roost.deploy.tensors import TensorSpec

RESULT_SPEC = {"delta": TensorSpec("float32", (SPEC_NUMEL,))}


@pytest.fixture(scope="module")
def scene():
    """A server where mallory holds task m-1, has delivered m-done, and alice holds a-1."""
    fed = Federation()
    coord = RecordingCoordinator()
    coord.add("mallory", spec("m-done", {"p": torch.zeros(1)}, RESULT_SPEC))
    coord.add("mallory", spec("m-1", {"p": torch.zeros(1)}, RESULT_SPEC))
    coord.add("alice", spec("a-1", {"p": torch.zeros(1)}, RESULT_SPEC))
    with running_server(coord, fed) as server:
        mallory, alice = client(server, fed.mallory), client(server, fed.alice)
        assert mallory.pull_task().task_id == "m-done"  # type: ignore[union-attr]
        assert mallory.push_result(Result("m-done", {"delta": GOOD_DELTA}, 1.0)).accepted
        assert mallory.pull_task().task_id == "m-1"  # type: ignore[union-attr]
        assert alice.pull_task().task_id == "a-1"  # type: ignore[union-attr]
        channel = grpc.insecure_channel(server.address)
        yield Scene(fed), coord, server, channel, alice
        channel.close()
        mallory.close()
        alice.close()


@pytest.mark.parametrize("hostile", HOSTILE, ids=lambda h: h.label)
def test_each_bad_message_is_refused_with_its_status_and_never_reaches_the_coordinator(
    scene, hostile: Hostile, caplog
):
    s, coord, server, channel, alice = scene
    before = coord.calls()
    name, body, metadata = hostile.make(s)
    with caplog.at_level(logging.WARNING, logger="roost.deploy"):
        outcome = call(channel, name, body, metadata)
    assert (outcome.code, outcome.kind) == (hostile.code, hostile.kind), outcome.details
    assert coord.calls() == before  # the coordinator saw nothing of it
    if hostile.kind:  # refused by roost (not by gRPC's own size limit): one log line
        lines = [r.getMessage() for r in caplog.records if r.name == "roost.deploy"]
        assert len(lines) == 1 and hostile.kind in lines[0] and name in lines[0]
    # the task table is untouched: mallory's m-1 is still open, alice's a-1 too
    assert server.servicer.tasks.state("m-1").value == "given"
    assert server.servicer.tasks.state("a-1").value == "given"
    assert alice.heartbeat("a-1") is True  # and the server goes on serving


def test_the_refusal_messages_say_what_was_wrong_and_what_is_allowed(scene):
    s, _, _, channel, _ = scene
    by_label = {h.label: h for h in HOSTILE}

    def details(label: str) -> str:
        return call(channel, *by_label[label].make(s)).details

    assert "'complex64', which is not allowed; allowed: float32, float64" in details("wrong dtype")
    assert "31 bytes for 8 float32 elements; must be numel * 4 = 32" in details("wrong length")
    assert "holds 1 NaN and 0 Inf values" in details("NaN")
    assert "timestamp is -61.0 s from the server's clock; allowed ±60 s" in details(
        "stale timestamp"
    )
    assert "314572800 bytes of tensors in one message; at most 268435456" in details("oversized")
    assert "protocol_version 4; this side speaks version 3 only" in details("protocol version")


def test_a_replayed_request_is_refused_even_though_its_signature_is_valid(scene):
    s, coord, _, channel, _ = scene
    body = heartbeat_body("mallory", "m-1")
    metadata = signed(s.mallory, "Heartbeat", body)
    before = len(coord.heartbeats)
    assert call(channel, "Heartbeat", body, metadata).code == grpc.StatusCode.OK
    again = call(channel, "Heartbeat", body, metadata)
    assert (again.code, again.kind) == (grpc.StatusCode.UNAUTHENTICATED, "ReplayedNonce")
    assert len(coord.heartbeats) == before + 1  # the first one only


def test_a_signature_for_one_method_does_not_authorise_another(scene):
    """The method is inside the signed content: a Heartbeat's signature is no PullTask's."""
    s, coord, _, channel, _ = scene
    body = heartbeat_body("mallory")
    metadata = signed(s.mallory, "Heartbeat", body)
    pulls = len(coord.pulls)
    outcome = call(channel, "PullTask", body, metadata)
    assert (outcome.code, outcome.kind) == (grpc.StatusCode.UNAUTHENTICATED, "BadSignature")
    assert len(coord.pulls) == pulls


def test_an_identical_resubmission_is_acknowledged_and_delivered_once():
    fed, coord = Federation(), RecordingCoordinator()
    coord.add("alice", spec("t", {"p": torch.zeros(1)}, RESULT_SPEC))
    with running_server(coord, fed) as server, client(server, fed.alice) as alice:
        alice.pull_task()
        first = alice.push_result(Result("t", {"delta": GOOD_DELTA}, 2.0))
        second = alice.push_result(Result("t", {"delta": GOOD_DELTA}, 2.0))
        with pytest.raises(RemoteRefusal) as different:
            alice.push_result(Result("t", {"delta": GOOD_DELTA * 2}, 2.0))
    assert (first.accepted, first.duplicate) == (True, False)
    assert (second.accepted, second.duplicate, second.detail) == (True, True, first.detail)
    assert (different.value.code, different.value.kind) == ("ALREADY_EXISTS", "AlreadyArrived")
    assert len(coord.accepted) == 1


def test_registration_with_another_protocol_version_is_refused():
    """The handshake: a node speaking version 2 (before split learning's Exchange) is told
    which version the server speaks."""
    from roost.deploy._proto import pb

    fed, coord = Federation(), RecordingCoordinator()
    with running_server(coord, fed) as server:
        channel = grpc.insecure_channel(server.address)
        body = pb.RegisterRequest(
            protocol_version=2, node_id="alice", public_key=fed.alice.public_bytes
        ).SerializeToString()
        outcome = call(channel, "Register", body, signed(Signer(fed.alice), "Register", body))
        channel.close()
    assert (outcome.code, outcome.kind) == (grpc.StatusCode.FAILED_PRECONDITION, "VersionMismatch")
    assert "RegisterRequest has protocol_version 2; this side speaks version 3" in outcome.details
    assert coord.registered == []


def test_a_node_may_register_only_itself():
    from roost.deploy._proto import PROTOCOL_VERSION, pb

    fed, coord = Federation(), RecordingCoordinator()
    with running_server(coord, fed) as server:
        channel = grpc.insecure_channel(server.address)
        body = pb.RegisterRequest(
            protocol_version=PROTOCOL_VERSION, node_id="alice", public_key=fed.alice.public_bytes
        ).SerializeToString()
        outcome = call(channel, "Register", body, signed(Signer(fed.mallory), "Register", body))
        channel.close()
    assert (outcome.code, outcome.kind) == (grpc.StatusCode.PERMISSION_DENIED, "PermissionDenied")
    assert coord.registered == []


def test_a_coordinator_that_raises_gets_internal_and_the_server_goes_on(caplog):
    fed, coord = Federation(), RecordingCoordinator()

    def broken(node_id: str, task_id: str | None) -> bool:
        raise RuntimeError("engine bug")

    coord.heartbeat = broken  # type: ignore[method-assign]
    with running_server(coord, fed) as server, client(server, fed.alice) as alice:
        with (
            caplog.at_level(logging.ERROR, logger="roost.deploy"),
            pytest.raises(RemoteRefusal) as failed,
        ):
            alice.heartbeat()
        assert alice.pull_task() is None  # still serving
    assert failed.value.code == "INTERNAL" and "RuntimeError: engine bug" in failed.value.details
    assert any("failed inside the server" in r.getMessage() for r in caplog.records)
