"""A split task's messages on the wire (issue 10, item 5): the server's replica answers a
micro-batch's activations with the gradient plain PyTorch computes, and every message it
cannot accept is refused with its reason before it reaches the replica's model: a shape
or dtype the task does not allow, NaN, a label out of range, a micro-batch out of order,
a different message for a micro-batch already answered, a field missing, a result
before the last iteration ended. A message resent after a lost answer is answered again
(the same answer), not computed twice.
"""

from __future__ import annotations

import time
import types

import pytest

pytest.importorskip("grpc")
pytest.importorskip("cryptography")

import torch
import torch.nn.functional as F
from _deploy_helpers import FAST
from _loopback import parts

from roost.algorithms.base import Payload
from roost.clock import WallClock
from roost.deploy.auth import AllowList, NodeKey, Verifier
from roost.deploy.client import ClientConfig, NodeClient, RemoteRefusal
from roost.deploy.coordinator import EngineCoordinator
from roost.deploy.errors import MalformedMessage
from roost.deploy.protocol import Exchange, RequestKind, Result
from roost.deploy.server import DeployServer
from roost.deploy.split import DEVICE_PARAMS, reply_from_wire
from roost.params import FlatModel
from roost.split import cut_module
from roost.split.messages import Activations, SplitExchange

SPLIT = RequestKind.SPLIT_ACTIVATIONS
FIELDS = {"iteration": 0, "micro_batch": 0, "micro_batches": 2, "examples": 5}


@pytest.fixture
def served():  # type: ignore[no-untyped-def]
    """A SplitFed task (cut 2 of the 16-unit MLP, 2 micro-batches of 5) given to node-0."""
    p = parts("splitfed", {"cut": 2, "micro_batches": 2}, seed=0)
    split = p.algorithm.split_serving(p.build, p.data.info)
    fleet = EngineCoordinator(WallClock(), 4, split=split)
    key = NodeKey.generate("node-0")
    with DeployServer(fleet, Verifier(AllowList({key.node_id: key.public_bytes}))) as server:
        client = NodeClient(
            server.address, key, properties={"client_id": 0}, config=ClientConfig(backoff=FAST)
        )
        client.register()
        task = types.SimpleNamespace(version=0, seed=1, round=1, settings=(), client_id=0)
        fleet.send(types.SimpleNamespace(key=7, client_id=0, task=task), Payload(p.init, 0))
        given = client.pull_task()
        assert given is not None
        yield types.SimpleNamespace(client=client, task=given, fleet=fleet, parts=p)
        client.close()


def _send(s, fields=FIELDS, **tensors):  # type: ignore[no-untyped-def]
    values = {
        "activations": tensors.pop("activations", torch.ones(5, 16)),
        "labels": tensors.pop("labels", torch.arange(5, dtype=torch.uint8)),
    }
    return s.client.exchange(Exchange(s.task.task_id, SPLIT, fields, values))


def _refused(s, kind: str, match: str, **kw):  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteRefusal, match=match) as info:
        _send(s, **kw)
    assert info.value.kind == kind


def test_the_node_gets_the_device_part_and_the_gradient_plain_pytorch_computes(served) -> None:  # type: ignore[no-untyped-def]
    """The payload is the device part alone (1,040 floats); the answer to activations
    a = 1 (5 x 16) with labels 0..4 is L = CE(f_s(a), y) / 2 and dL/da computed here with
    autograd on the server part of the initial model."""
    s = served
    assert set(s.task.payload) == {DEVICE_PARAMS}
    assert s.task.payload[DEVICE_PARAMS].shape == (64 * 16 + 16,)
    model = FlatModel(s.parts.build())
    model.load_(s.parts.init)  # the initial model
    server = cut_module(model.module, 2).server
    a = torch.ones(5, 16, requires_grad=True)
    loss = F.cross_entropy(server(a), torch.arange(5)) / 2
    loss.backward()
    answer = _send(s)
    assert answer.tensors["loss"].item() == pytest.approx(loss.item(), abs=1e-6)
    assert torch.allclose(answer.tensors["gradient"], a.grad, atol=1e-7)
    # resent after a lost answer: the same answer, computed once
    again = _send(s)
    assert torch.equal(again.tensors["gradient"], answer.tensors["gradient"])
    assert s.fleet._split[7].task.replica.answered == 1


def test_messages_the_task_cannot_take_are_refused_with_the_reason(served) -> None:  # type: ignore[no-untyped-def]
    s = served
    _refused(s, "SpecMismatch", r"shape \[5, 16\], not \[5, 15\]", activations=torch.ones(5, 15))
    half = torch.ones(5, 16, dtype=torch.float16)
    _refused(s, "SpecMismatch", "must be float32, not float16", activations=half)
    _refused(s, "SpecMismatch", "must be uint8, not int64", labels=torch.arange(5))
    nan = torch.ones(5, 16)
    nan[2, 3] = float("nan")
    _refused(s, "NonFinite", "NaN", activations=nan)
    _refused(s, "ResultRefused", r"a label is not in 0 \.\. 9",
             labels=torch.tensor([0, 1, 2, 3, 10], dtype=torch.uint8))  # fmt: skip
    _refused(s, "ResultRefused", "expected iteration 0's micro-batch 0",
             fields={**FIELDS, "iteration": 1})  # fmt: skip
    _refused(s, "MalformedMessage", "'examples'",
             fields={k: v for k, v in FIELDS.items() if k != "examples"})  # fmt: skip
    _refused(s, "ResultRefused", r"N m <= the batch size 10",
             fields={**FIELDS, "micro_batches": 3})  # fmt: skip
    _send(s)  # micro-batch 0 of 2: accepted; now 1 of 2 is due
    _refused(s, "AlreadyArrived", "different content", activations=torch.zeros(5, 16))
    _refused(s, "ResultRefused", "expected iteration 0's micro-batch 1",
             fields={**FIELDS, "iteration": 1})  # fmt: skip
    # a result while iteration 0 waits for its second micro-batch is refused
    device = torch.zeros(64 * 16 + 16)
    with pytest.raises(RemoteRefusal, match="iteration 0 is not over"):
        s.client.push_result(Result(s.task.task_id, {DEVICE_PARAMS: device}, 1.0))
    # once iteration 0 is over, its micro-batches are not taken again
    _send(s, fields={**FIELDS, "micro_batch": 1})
    _refused(s, "ResultRefused", "expected iteration 1's micro-batch 0")


def test_an_exchange_for_a_task_that_does_not_split_is_refused(served) -> None:  # type: ignore[no-untyped-def]
    s = served
    s.fleet.split = None
    task = types.SimpleNamespace(version=0, seed=1, round=1, settings=(), client_id=0)
    s.fleet.send(types.SimpleNamespace(key=8, client_id=0, task=task), Payload(s.parts.init, 0))
    plain = s.client.pull_task()
    assert plain is not None and "params" in plain.payload
    values = {"activations": torch.ones(5, 16), "labels": torch.zeros(5, dtype=torch.uint8)}
    with pytest.raises(RemoteRefusal, match="no split-learning replica"):
        s.client.exchange(Exchange(plain.task_id, SPLIT, FIELDS, values))


def test_a_node_refuses_an_answer_that_is_not_the_gradient_of_its_message() -> None:
    message = SplitExchange(
        Activations(torch.ones(5, 16), torch.zeros(5, dtype=torch.uint8)), 0, 0, 1
    )
    loss = torch.ones(1)
    with pytest.raises(MalformedMessage, match=r"activations' shape \(5, 16\)"):
        reply_from_wire({"loss": loss, "gradient": torch.ones(5, 15)}, message, True)
    with pytest.raises(MalformedMessage, match="one float32 value"):
        reply_from_wire({"loss": torch.ones(2)}, message, False)
    with pytest.raises(MalformedMessage, match=r"holds \['gradient', 'loss'\]"):
        reply_from_wire({"loss": loss}, message, True)
    assert reply_from_wire({"loss": loss}, message, False).gradient is None


def test_a_prune_mode_replica_takes_exactly_its_budget_of_increasing_channel_ids() -> None:
    """deprune's replica in a round of b = 2 of 4 channels (2 x 2 maps): 2 ids that
    increase below 4, values (m, 2, 2, 2); anything else is refused before the server
    part runs; a message of all channels is refused too (this round prunes)."""
    from torch import nn

    from roost.split.bottleneck import KeptActivations, KeptChannels
    from roost.split.step import ServerReplica

    server = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    replica = ServerReplica(server, num_classes=3, activation_shape=(4, 2, 2), budget=2)
    labels = torch.zeros(3, dtype=torch.uint8)

    def kept(ids: list[int], b: int = 2) -> SplitExchange:
        values = torch.ones(3, b, 2, 2, dtype=torch.float16)
        channels = KeptChannels(values, torch.tensor(ids, dtype=torch.uint8), 4)
        return SplitExchange(KeptActivations(channels, labels), 0, 0, 1)

    with pytest.raises(ValueError, match="3 kept channels; this task keeps 2"):
        replica.check(kept([0, 1, 2], b=3))
    with pytest.raises(ValueError, match=r"ids must increase within 0 \.\. 3"):
        replica.check(kept([2, 1]))
    with pytest.raises(ValueError, match=r"ids must increase within 0 \.\. 3"):
        replica.check(kept([1, 4]))
    whole = SplitExchange(Activations(torch.ones(3, 4, 2, 2), labels), 0, 0, 1)
    with pytest.raises(ValueError, match="sends 2 kept channels, not all of them"):
        replica.check(whole)
    reply = replica.answer(kept([1, 3]))
    assert reply.gradient is not None and reply.gradient.values.shape == (3, 4, 2, 2)


def test_a_node_forwards_the_next_micro_batch_while_the_server_answers_this_one() -> None:
    """The node's link returns at once and sends in order on its own thread: the device
    procedure goes on with micro-batch j + 1 while j is on the network; reading a reply
    waits for it. Here the 'server' holds every answer until released: both messages
    are handed to the link, and the first is being sent, before any answer exists."""
    import threading

    from roost.deploy.node import _SplitLink
    from roost.deploy.protocol import Answer

    release, sent = threading.Event(), []

    class Server:
        def exchange(self, exchange: Exchange) -> Answer:
            sent.append(exchange.fields["micro_batch"])
            release.wait(10)
            gradient = torch.full((5, 16), float(exchange.fields["micro_batch"]))
            return Answer(0, {"loss": torch.ones(1), "gradient": gradient})

    link = _SplitLink(Server(), "t", trains=True)  # type: ignore[arg-type]
    labels = torch.zeros(5, dtype=torch.uint8)
    replies = [
        link.send(SplitExchange(Activations(torch.ones(5, 16), labels), 0, j, 2)) for j in (0, 1)
    ]
    deadline = time.monotonic() + 10
    while not sent and time.monotonic() < deadline:
        time.sleep(0.001)
    assert sent == [0]  # the first is out; the second waits its turn, neither answered
    release.set()
    assert [float(r.gradient.values[0, 0]) for r in replies] == [0.0, 1.0]
    assert sent == [0, 1]
    link.close()


def test_the_journal_keeps_a_deliverys_bytes_both_ways_and_migrates_old_journals(
    tmp_path,  # type: ignore[no-untyped-def]
) -> None:
    """A split task's delivery carries the bytes sent to its node (device part and
    gradients): the journal keeps them, so a resumed run counts them as the live one did;
    a journal made before the column existed gains it; a delivery without them reads
    None (the predicted download counts)."""
    import sqlite3

    from roost.algorithms.base import ClientResult
    from roost.deploy.journal import Journal
    from roost.engine.remote import Delivery

    old = tmp_path / "old.sqlite"
    with sqlite3.connect(old) as db:  # the results table as the previous version made it
        db.execute(
            "CREATE TABLE results (task_id TEXT PRIMARY KEY, after_step INTEGER NOT NULL, "
            "tensors BLOB NOT NULL, weight REAL NOT NULL, scalars TEXT NOT NULL, "
            "metrics TEXT NOT NULL, compute_s REAL NOT NULL, upload_bytes INTEGER)"
        )
    journal = Journal(old)
    result = ClientResult({"params": torch.ones(3)}, 2.0)
    journal.add_result("t-1", Delivery(result, {"train_loss": 0.5}, 0.1, 160, 4280))
    journal.add_result("t-2", Delivery(result, {}, 0.1, 12))
    got = journal.result("t-1")
    assert got is not None and (got.upload_bytes, got.download_bytes) == (160, 4280)
    other = journal.result("t-2")
    assert other is not None and other.download_bytes is None
    journal.close()
