"""A deployed node's loop: pull a task, train it with the algorithm's own update on the
node's own data, answer the procedure's mid-task requests over the network, push the
result.

The node computes with the :class:`~roost.runtime.local.LocalRuntime` of a job whose
dataset holds the node's data and whose state store is the node's own (client state
stays on the device), exactly as the simulation computes a task, so a task computed here
and one computed in simulation from the same payload, data, state and seed are the same
bits. The result sent is the update's own tensors, weight and scalars
(:class:`~roost.runtime.capture.CapturingAlgorithm`), which the server folds as the local
runtime would.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import torch

from roost.algorithms.base import ClientResult
from roost.deploy.client import NodeClient, RemoteRefusal
from roost.deploy.coordinator import evaluation_to_wire, payload_from_wire, result_to_wire
from roost.deploy.errors import WireError
from roost.deploy.protocol import Exchange, RequestKind, TaskKind
from roost.deploy.protocol import Result as WireResult
from roost.deploy.split import (
    DEVICE_PARAMS,
    SplitServingLike,
    exchange_to_wire,
    reply_from_wire,
)
from roost.runtime.base import Task
from roost.runtime.capture import CapturingAlgorithm
from roost.runtime.local import LocalRuntime

if TYPE_CHECKING:
    from roost.data.base import ClientData
    from roost.deploy.protocol import Task as WireTask
    from roost.deploy.tensors import WireValue
    from roost.split.messages import SplitExchange, SplitReply
    from roost.state.base import ClientStateStore

__all__ = ["NodeWorker"]


class _PendingReply:
    """A split reply still on its way. The device's procedure reads a micro-batch's reply
    only after it has forwarded the iteration's last one
    (:func:`~roost.split.step.device_iteration`), so it forwards micro-batch ``j + 1``
    while the network and the server work on ``j``: PiPar's pipeline, on a real node.
    Reading ``loss``, ``gradient`` or ``nbytes`` waits for the answer (and raises what
    the exchange raised)."""

    def __init__(self, future: Future[SplitReply]) -> None:
        self._future = future

    @property
    def loss(self) -> torch.Tensor:
        return self._future.result().loss

    @property
    def gradient(self) -> Any:
        return self._future.result().gradient

    @property
    def nbytes(self) -> int:
        return self._future.result().nbytes


class _SplitLink:
    """A split task's messages to the server's replica: sent in order, one at a time, by
    a thread of their own, each answered by a :class:`_PendingReply`."""

    def __init__(self, client: NodeClient, task_id: str, trains: bool) -> None:
        self.client, self.task_id, self.trains = client, task_id, trains
        self._sender = ThreadPoolExecutor(1, thread_name_prefix=f"split-{task_id}")

    def _exchange(self, message: SplitExchange) -> SplitReply:
        fields, values = exchange_to_wire(message)
        kind = RequestKind.SPLIT_ACTIVATIONS
        answer = self.client.exchange(Exchange(self.task_id, kind, fields, values))
        return reply_from_wire(answer.tensors, message, self.trains)

    def send(self, message: SplitExchange) -> SplitReply:
        return cast("SplitReply", _PendingReply(self._sender.submit(self._exchange, message)))

    def close(self) -> None:
        """Stop sending (a task that failed drops what was not sent yet)."""
        self._sender.shutdown(wait=True, cancel_futures=True)


log = logging.getLogger("roost.deploy")


class NodeWorker:
    """Trains the tasks the server gives ``client`` for client ``client_id`` of the run.

    ``runtime`` must have been started with a job whose algorithm is ``capture`` (the
    algorithm wrapped in :class:`CapturingAlgorithm`) and whose dataset holds the node's
    data as its client ``data_client`` (default: ``client_id``, a client of the run's own
    partitioned set). While a task trains, the node heartbeats every interval the server
    gave; if the server says the task no longer counts, its result is not sent.

    ``store`` (the job's client state store), if given, brackets each task as one step
    (``begin_round``/``commit``, numbered from ``first_step + 1``), and ``on_commit`` is
    called after each commit (a node on disk records there what it committed).

    An evaluation task (:attr:`TaskKind.EVALUATE`) measures the client's personal model
    (the algorithm's ``personal_params`` of its state in ``store``; the payload's model
    when it has no state yet) on ``test_data``, its own test split, and sends the loss,
    accuracy and number of examples (0 without a test split); it changes no state.

    ``split`` (a split-learning method's :class:`~roost.deploy.split.SplitServingLike`):
    a task's payload is the device part of the model; the node trains it with the
    method's own procedure, sending each micro-batch's activations to the server's
    replica and back-propagating the gradient it answers, and returns the device part.
    """

    def __init__(
        self,
        client: NodeClient,
        runtime: LocalRuntime,
        capture: CapturingAlgorithm,
        client_id: int,
        data_client: int | None = None,
        *,
        store: ClientStateStore | None = None,
        first_step: int = 0,
        on_commit: Callable[[], None] | None = None,
        test_data: ClientData | None = None,
        split: SplitServingLike | None = None,
    ) -> None:
        self.client = client
        self.runtime = runtime
        self.capture = capture
        self.client_id = client_id
        self.data_client = client_id if data_client is None else data_client
        self.store = store
        self.step = first_step
        self.on_commit = on_commit
        self.test_data = test_data
        self.split = split
        self.evaluated = 0
        self.received_bytes = 0
        """Bytes of the training tasks' payloads received (a split method's: the device
        part alone)."""
        self.done = 0
        self.dropped = 0
        self._keys = 0
        self._kept: tuple[tuple[str, int, int, int], WireResult] | None = None

    def run_one(self, task: WireTask) -> bool:
        """Train one task and push its result; True if the server accepted it.

        A task the server sends again (the same id, version and seed: it restarted before
        it accepted the result) is not trained again: the result kept from the first time
        is sent, so the client's state advances once per task. A refusal of the result or
        of a mid-task request (the task no longer counts) drops the task."""
        if task.client_id != self.client_id:
            raise ValueError(
                f"the server sent a task of client {task.client_id} to the node of client "
                f"{self.client_id}"
            )
        if task.kind is TaskKind.EVALUATE:
            return self._evaluate(task)
        identity = (task.task_id, task.model_version, task.seed, task.round)
        if self._kept is not None and self._kept[0] == identity:
            return self._push(task.task_id, self._kept[1])
        self._keys += 1
        self.received_bytes += task.wire.payload_bytes
        local = Task(
            self.data_client,
            task.round,
            task.model_version,
            task.seed,
            key=self._keys,
            settings=tuple(sorted(task.settings.items())),
        )
        tensors, server, link = task.payload, None, None
        if self.split is not None:
            link = _SplitLink(self.client, task.task_id, self.split.device_trains(task.settings))
            tensors, server = self._split_payload(task), link.send
        payload = payload_from_wire(tensors, task.model_version)
        start = time.perf_counter()
        if self.store is not None:
            self.step += 1
            self.store.begin_round(self.step)
        try:
            with self.client.keep_alive(task.task_id) as drop:
                out = self.runtime.execute([local], {payload.version: payload}, 1, server=server)
                while out.requests:
                    answer = self.client.request(task.task_id, RequestKind.FETCH_MODEL)
                    answered = payload_from_wire(answer.tensors, answer.model_version)
                    out = self.runtime.execute([local], {}, 1, answers={local.key: answered})
        except (RemoteRefusal, WireError) as e:  # a mid-task request refused or malformed
            log.warning("task %s dropped: %s", task.task_id, e)
            self.runtime.discard([local.key])
            self.dropped += 1
            return False
        finally:
            if link is not None:
                link.close()
            if self.store is not None:
                self.store.commit(self.step)
                if self.on_commit is not None:
                    self.on_commit()
        compute_s = time.perf_counter() - start
        result = self.capture.last
        if result is None:
            raise RuntimeError("the algorithm's update returned no plain result")
        if self.split is not None:  # the device part goes back; the server has the rest
            device = self.split.device_params(result.tensors["params"], task.settings)
            result = ClientResult({DEVICE_PARAMS: device}, result.weight, result.scalars)
        self.done += 1
        if drop.is_set():  # the server no longer wants it (its round closed)
            self.dropped += 1
            return False
        (_, metrics), *_ = out.client_metrics
        wire = result_to_wire(task.task_id, result, metrics, compute_s)
        self._kept = (identity, wire)
        return self._push(task.task_id, wire)

    def _split_payload(self, task: WireTask) -> dict[str, WireValue]:
        """A split task's payload as the node's whole model (the server part's entries
        zero)."""
        assert self.split is not None
        device = task.payload.get(DEVICE_PARAMS)
        if not isinstance(device, torch.Tensor):
            raise ValueError(
                f"task {task.task_id} of a split method carries no {DEVICE_PARAMS!r} tensor"
            )
        tensors: dict[str, WireValue] = {"params": self.split.whole_params(device, task.settings)}
        tensors.update({k: v for k, v in task.payload.items() if k != DEVICE_PARAMS})
        return tensors

    def _evaluate(self, task: WireTask) -> bool:
        """Measure the personal model on the test split and push the three metrics."""
        test = self.test_data
        loss, accuracy, examples = 0.0, 0.0, 0
        if test is not None and len(test) > 0:
            state = self.store.get(self.data_client) if self.store is not None else None
            if state is None:
                params = payload_from_wire(task.payload, task.model_version).params
            else:
                params = self.capture.personal_params(state)
            loss, accuracy = self.runtime.evaluate(params, test)
            examples = len(test)
        self.evaluated += 1
        return self._push(task.task_id, evaluation_to_wire(task.task_id, loss, accuracy, examples))

    def _push(self, task_id: str, result: WireResult) -> bool:
        try:
            return self.client.push_result(result).accepted
        except RemoteRefusal as e:  # e.g. the server restarted and sends the task again
            log.warning("result of task %s refused: %s", task_id, e)
            return False

    def run(self, stop: threading.Event, max_tasks: int | None = None) -> int:
        """Register, then pull and train tasks until ``stop`` is set, the server says the
        run is over, or ``max_tasks`` were trained; returns how many were trained."""
        if self.client.server is None:
            self.client.register()
        while not stop.is_set() and (max_tasks is None or self.done < max_tasks):
            task = self.client.pull_task()
            if task is None:
                if self.client.finished:
                    break
                stop.wait(min(self.client.retry_after_s or 0.05, 1.0))
                continue
            self.run_one(task)
        return self.done
