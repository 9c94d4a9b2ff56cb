"""What the server and its worker processes agree on: options, messages, helpers.

See :mod:`roost.runtime.workers` for the protocol of a round."""

from __future__ import annotations

import contextlib
import math
import mmap
import os
import platform
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import torch

from roost.algorithms.base import Contribution, Payload
from roost.registry import check
from roost.runtime.base import Task
from roost.runtime.device import check_device_spec
from roost.state import ClientStateStore

Tensors = dict[str, torch.Tensor]

BACKEND = "gloo"
"""The backend of the group of all ranks (server and workers): objects, and tensors in
host memory. Workers on GPUs also form a group of their own over NCCL (``relay``)."""

RELAY_RANK = 1
"""The worker that relays between the server and the workers' group (``relay``)."""


@dataclass(frozen=True)
class WorkersRuntimeConfig:
    """workers: worker processes (0: one per GPU when the workers use GPUs, else 2).
    device: where each worker trains: auto (GPUs if CUDA is available, else the CPU), cpu,
    cuda (worker i on GPU i mod #GPUs) or cuda:K (all on GPU K).
    topology: how the round's model and sums travel. ``star``: the server broadcasts the
    payload to every worker and the workers' sums are reduced straight to it, all in host
    memory over gloo. ``relay``: the server sends the payload once to worker 1, which
    broadcasts it over the workers' own group, and the workers reduce their sums to worker
    1, which sends the total to the server; that group is NCCL when the workers use GPUs
    (the server, which has no GPU of its own in it, stays out). ``auto``: relay on GPUs,
    star on the CPU.
    timeout_s: the longest a collective
    may wait (a round's compute included) before the run is declared failed.
    threads: torch threads per worker (0: the machine's cores shared evenly).
    smoothing: the scheduler's moving-average weight for measured worker speeds.
    placement: ``lpt`` (longest predicted task first, to the earliest-finishing worker)
    or ``round_robin`` (task i to worker i mod N; the baseline).
    slowdown: per-worker factors that stretch each worker's compute time by sleeping
    (``1,2`` makes worker 2 take twice as long): emulates a heterogeneous cluster for
    scheduling experiments. Empty: no slowdown.
    start_method: how the worker processes start (not under torchrun). ``auto``: forked
    from the server as soon as the run's config is known, which saves each worker its
    own import of torch, when that is safe (see :mod:`roost.runtime.launch`), else from
    a ``forkserver`` that preloads torch; ``forkserver``; ``spawn`` (fresh
    interpreters)."""

    workers: int = 0
    device: str = "auto"
    topology: Literal["auto", "star", "relay"] = "auto"
    timeout_s: float = 1800.0
    threads: int = 0
    smoothing: float = 0.3
    placement: Literal["lpt", "round_robin"] = "lpt"
    slowdown: tuple[float, ...] = ()
    start_method: Literal["auto", "forkserver", "spawn"] = "auto"

    def __post_init__(self) -> None:
        check(self.workers >= 0, "workers", self.workers, "must be >= 1 (0: automatic)")
        check_device_spec("device", self.device)
        check(self.timeout_s > 0, "timeout_s", self.timeout_s, "must be > 0")
        check(self.threads >= 0, "threads", self.threads, "must be >= 0 (0: automatic)")
        check(0 < self.smoothing <= 1, "smoothing", self.smoothing, "must be in (0, 1]")
        check(
            all(f >= 1 for f in self.slowdown),
            "slowdown",
            self.slowdown,
            "factors must be >= 1 (1 = full speed)",
        )


def worker_threads(threads: int, world_size: int) -> int:
    """Torch threads of each worker: ``threads``, or the machine's cores shared evenly."""
    return threads or max(1, (os.cpu_count() or 1) // max(1, world_size - 1))


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class Transport:
    """How a run's workers exchange tensors, decided by the server and sent at join.

    ``worker_backend`` is the backend of the workers' own group (relay only): ``nccl``
    when they compute on GPUs, else ``gloo``. With NCCL the payload buffers and the sums
    live on each worker's GPU; otherwise in host memory.
    """

    topology: Literal["star", "relay"]
    worker_backend: Literal["gloo", "nccl"]

    @staticmethod
    def choose(topology: str, workers_use_gpus: bool, nccl_available: bool) -> Transport:
        chosen = topology if topology != "auto" else ("relay" if workers_use_gpus else "star")
        nccl = chosen == "relay" and workers_use_gpus and nccl_available
        return Transport("relay" if chosen == "relay" else "star", "nccl" if nccl else "gloo")

    @property
    def on_device(self) -> bool:
        """Whether payloads and sums travel between workers in GPU memory."""
        return self.worker_backend == "nccl"


# --------------------------------------------------------------------------- messages


@dataclass
class RoundOrder:
    """What the server broadcasts before each execute."""

    assignments: list[list[Task]]
    payload_layout: dict[int, list[tuple[str, int]]]
    num_groups: int
    shipped_states: dict[int, Tensors] | None
    defer_state: bool = False
    answers: dict[int, int] = field(default_factory=dict)  # task key -> payload version
    discard: list[int] = field(default_factory=list)  # suspended task keys to forget


@dataclass
class SumHeader:
    """A contribution without its tensors: their sizes, and the small fields."""

    sizes: dict[str, int]
    scalar_sums: dict[str, float]
    weight: float
    count: int
    clients: list[int]

    @staticmethod
    def of(c: Contribution) -> SumHeader:
        sizes = {k: v.numel() for k, v in c.sums.items()}
        return SumHeader(sizes, c.scalar_sums, c.weight, c.count, c.clients)


@dataclass
class WorkerReply:
    """What a worker sends back by gather. On the reduce path (one group) it carries the
    :class:`SumHeader` and the tensors follow in one reduce; otherwise it carries the
    per-group contributions whole."""

    busy_s: float
    client_metrics: list[tuple[int, dict[str, float]]]
    peak_rss_mb: float
    device: str
    header: SumHeader | None = None
    contributions: list[PackedContribution] = field(default_factory=list)
    new_states: dict[int, Tensors] = field(default_factory=dict)
    requests: dict[int, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------- results


@dataclass
class WireSums:
    """A contribution's sums as they travel between processes, one entry per tensor:
    ``(name, kind, shape)``. Kind ``"sum"``: the float64 sum itself. Otherwise the sum
    folds one result, and the entry is that result's tensor, of dtype ``kind``
    (``"float32"`` in every shipped method): the receiver folds it again
    (:meth:`Contribution.first_sum`), to the same float64 sum bit for bit, from half
    the bytes. And the contribution's small fields."""

    names: list[tuple[str, str, tuple[int, ...]]]
    weight: float
    scalar_sums: dict[str, float]
    count: int
    clients: list[int]


REFOLDABLE = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
"""Result dtypes sent as they are: their conversion to float64 is exact."""

DTYPES = {"sum": torch.float64, **{name: dtype for dtype, name in REFOLDABLE.items()}}


def _header(c: Contribution, names: list[tuple[str, str, tuple[int, ...]]]) -> WireSums:
    return WireSums(names, float(c.weight), dict(c.scalar_sums), c.count, list(c.clients))


def result_to_wire(
    c: Contribution, result: Mapping[str, torch.Tensor], copy: bool = True
) -> tuple[WireSums, list[torch.Tensor]]:
    """``c``, which folded the one result whose tensors are ``result``, as it travels:
    each tensor as the result's own where its dtype is refoldable (in host memory, and
    with ``copy`` a copy: it may alias the resident model), else its float64 sum. ``c``
    may lack the sums of the refoldable tensors (a worker's local runtime did not fold
    them)."""
    names: list[tuple[str, str, tuple[int, ...]]] = []
    tensors: list[torch.Tensor] = []
    host = torch.device("cpu")
    for name in dict.fromkeys([*result, *c.sums]):
        x = result.get(name)
        kind = REFOLDABLE.get(x.dtype) if x is not None and c.count == 1 else None
        if x is not None and kind is not None:
            names.append((name, kind, tuple(x.shape)))
            tensors.append(x.detach().to(host, copy=copy))
        else:
            s = c.sums[name]
            names.append((name, "sum", tuple(s.shape)))
            tensors.append(s.detach().to(host))
    return _header(c, names), tensors


def sums_to_wire(c: Contribution) -> tuple[WireSums, list[torch.Tensor]]:
    """``c``'s tensors in host memory, each as small as it can travel exactly, when the
    result it folded is not at hand.

    A contribution of one result of weight ``w`` holds ``s = float64(x) * w``; ``x`` is
    recovered as ``float32(s / w)`` and sent instead when refolding it gives ``s`` back
    exactly (checked, so a result that was not float32, or a weight that loses bits to
    overflow or underflow, travels as the float64 sum). Sums of several results are sent
    in float64."""
    names: list[tuple[str, str, tuple[int, ...]]] = []
    tensors: list[torch.Tensor] = []
    w = float(c.weight)
    host = torch.device("cpu")
    for name, s in c.sums.items():
        s = s.detach().to(host)
        if c.count == 1 and s.dtype == torch.float64:
            x = (s if w == 1.0 else s / w).to(torch.float32)
            if torch.equal(Contribution.first_sum(x, w), s):
                names.append((name, "float32", tuple(s.shape)))
                tensors.append(x)
                continue
        names.append((name, "sum", tuple(s.shape)))
        tensors.append(s)
    return _header(c, names), tensors


def sums_from_wire(
    header: WireSums, tensors: list[torch.Tensor], copy: bool = False
) -> Contribution:
    """The :class:`Contribution` that was sent (``copy``: the tensors are views of
    memory that will be reused, the sums sent as they are are copied)."""
    c = Contribution()
    for (name, kind, shape), t in zip(header.names, tensors, strict=True):
        t = t.reshape(shape)
        if kind == "sum":
            c.sums[name] = t.clone() if copy else t
        else:
            c.sums[name] = Contribution.first_sum(t, header.weight)
    c.scalar_sums = dict(header.scalar_sums)
    c.weight = header.weight
    c.count = header.count
    c.clients = list(header.clients)
    return c


@dataclass
class PackedContribution:
    """A contribution pickled compactly: its :class:`WireSums` and each tensor's raw
    bytes (pickled as bytes, a copy, where a tensor pickles through torch's storage
    serialisation, several times slower)."""

    header: WireSums
    data: list[bytes]

    @staticmethod
    def of(c: Contribution) -> PackedContribution:
        header, tensors = sums_to_wire(c)
        return PackedContribution(header, [bytes(_bytes_of(t.contiguous())) for t in tensors])

    def unpack(self) -> Contribution:
        tensors = [
            _from_bytes(b, DTYPES[kind])
            for (_, kind, _), b in zip(self.header.names, self.data, strict=True)
        ]
        return sums_from_wire(self.header, tensors)


def _from_bytes(data: bytes, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(dtype)


@dataclass
class StreamResult:
    """What a worker sends after each task it streams: which task (``seq``), its sums
    and metrics, how long it computed, the worker's peak memory and device. The sums'
    tensors are in the worker's :class:`ResultRing` at ``slot``, or with ``slot`` -1
    follow on the pipe, one raw message each. ``ring`` offers the server a ring, once
    (``(pid, fd, slot_bytes, slots)``)."""

    seq: int
    sums: WireSums
    metrics: dict[str, float]
    busy_s: float
    peak_rss_mb: float
    device: str
    slot: int = -1
    ring: tuple[int, int, int, int] | None = None


@dataclass
class WorkerNote:
    """A worker's answer on its results pipe: whether it could map what the server
    offered (``kind``: ``"payload_slots"``)."""

    kind: str
    ok: bool


class SharedSlots:
    """``slots`` slots of ``slot_bytes`` in shared memory (a memfd), after a ``HEADER``
    of 64 bytes: one process creates them and offers them (:meth:`offer`), another maps
    them through ``/proc/PID/fd`` (:meth:`open`). Tensors are written once into a slot
    and read from it in place, instead of being copied through a pipe and out again.

    Linux on x86 only (:meth:`supported`): whoever reuses a slot learns that the other
    side is done with it through a plain store and load (:class:`ResultRing`) or through
    a message on a pipe, in order with the slot's data under x86's memory model."""

    HEADER = 64
    ALIGN = 64

    def __init__(self, fd: int, slot_bytes: int, slots: int) -> None:
        self.fd, self.slot_bytes, self.slots = fd, slot_bytes, slots
        self.map = mmap.mmap(fd, self.HEADER + slot_bytes * slots)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    @staticmethod
    def supported() -> bool:
        machine = platform.machine().lower()
        return (
            sys.platform.startswith("linux")
            and hasattr(os, "memfd_create")
            and machine in ("x86_64", "amd64", "i386", "i686")
        )

    @classmethod
    def create(cls, slot_bytes: int, slots: int) -> Any:
        """New slots (this process's), or None where they are not supported."""
        if not SharedSlots.supported():
            return None
        try:
            fd = os.memfd_create(f"roost-{cls.__name__}", getattr(os, "MFD_CLOEXEC", 1))
            os.ftruncate(fd, cls.HEADER + slot_bytes * slots)
            return cls(fd, slot_bytes, slots)
        except OSError:
            return None

    @classmethod
    def open(cls, pid: int, fd: int, slot_bytes: int, slots: int) -> Any:
        """The slots process ``pid`` created and offered, mapped here."""
        own = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR)
        try:
            return cls(own, slot_bytes, slots)
        finally:
            os.close(own)  # the mapping stays

    def offer(self) -> tuple[int, int, int, int]:
        return os.getpid(), self.fd, self.slot_bytes, self.slots

    @classmethod
    def footprint(cls, tensors: list[torch.Tensor]) -> int:
        return sum(-(-t.numel() * t.element_size() // cls.ALIGN) * cls.ALIGN for t in tensors)

    @classmethod
    def slot_size(cls, tensors: list[torch.Tensor]) -> int:
        """Bytes of a slot for tensors like these (whole pages)."""
        return max(4096, -(-cls.footprint(tensors) // 4096) * 4096)

    def write(self, slot: int, tensors: list[torch.Tensor]) -> None:
        offset = self.HEADER + slot * self.slot_bytes
        for t in tensors:
            n = t.numel() * t.element_size()
            self.bytes[offset : offset + n].copy_(t.detach().reshape(-1).view(torch.uint8))
            offset += -(-n // self.ALIGN) * self.ALIGN

    def views(
        self, slot: int, layout: list[tuple[torch.dtype, tuple[int, ...]]]
    ) -> list[torch.Tensor]:
        """The tensors in ``slot``, as views of the shared memory."""
        offset = self.HEADER + slot * self.slot_bytes
        out = []
        for dtype, shape in layout:
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            out.append(self.bytes[offset : offset + n].view(dtype).reshape(shape))
            offset += -(-n // self.ALIGN) * self.ALIGN
        return out


class ResultRing(SharedSlots):
    """A worker's results: it writes its ``n``-th result in slot ``n mod slots`` once
    the server has read the one there before; the first 8 bytes count the results the
    server has read (a store after its loads of the slot, a load before the worker's
    stores to it)."""

    def __init__(self, fd: int, slot_bytes: int, slots: int) -> None:
        super().__init__(fd, slot_bytes, slots)
        self.read = self.bytes[:8].view(torch.int64)  # results the server has read
        self.written = 0

    def put(self, tensors: list[torch.Tensor], stopping: Any) -> int:
        """Write a result's tensors in the next slot (waiting, if need be, for the server
        to read the one there); its index, or -1 if they do not fit in a slot."""
        if self.footprint(tensors) > self.slot_bytes:
            return -1
        while self.written - int(self.read[0]) >= self.slots:
            if stopping.is_set():
                return -1
            time.sleep(0.0002)
        slot = self.written % self.slots
        self.write(slot, tensors)
        self.written += 1
        return slot

    def result(
        self, slot: int, names: list[tuple[str, str, tuple[int, ...]]]
    ) -> list[torch.Tensor]:
        """The tensors of the result in ``slot`` (views, valid until :meth:`release`)."""
        return self.views(slot, [(DTYPES[kind], shape) for _, kind, shape in names])

    def release(self) -> None:
        """The server has read the oldest result: its slot may be written again."""
        self.read[0] += 1


def send_tensor(conn: Any, t: torch.Tensor) -> None:
    """``t``'s bytes (host memory), raw on the pipe after the message that announced
    them: written straight from the tensor, read straight into one (no framing, no
    intermediate copy; a pipe's ``Connection`` would copy them twice more)."""
    data = _bytes_of(t.detach().contiguous())
    fd, done = conn.fileno(), 0
    while done < len(data):
        done += os.write(fd, data[done:])


def recv_tensor(conn: Any, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The tensor whose bytes :func:`send_tensor` wrote, received in place."""
    t = torch.empty(shape, dtype=dtype)
    data = _bytes_of(t)
    fd, done = conn.fileno(), 0
    while done < len(data):
        n = os.readv(fd, [data[done:]])
        if n == 0:
            raise EOFError("the pipe closed in the middle of a tensor")
        done += n
    return t


def _bytes_of(t: torch.Tensor) -> memoryview:
    """The memory of contiguous host tensor ``t`` as bytes (no copy)."""
    return memoryview(cast(Any, t.reshape(-1).view(torch.uint8).numpy()))


PIPE_BYTES = 1 << 20


def enlarge_pipe(conn: Any) -> None:
    """Linux: let the pipe hold ``PIPE_BYTES`` (a model of up to 256 k parameters goes in
    one write, without waiting for the reader); elsewhere, or above the system's limit,
    the pipe stays as it is."""
    with contextlib.suppress(Exception):
        import fcntl

        fcntl.fcntl(conn.fileno(), getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_BYTES)


def shared_store_info(store: ClientStateStore) -> dict[str, Any] | None:
    """How another process opens ``store`` (None: it lives in this process's memory)."""
    share = getattr(store, "share", None)
    return share() if share is not None else None


def open_store_from(info: dict[str, Any]) -> Any:
    from roost.state import open_shared_store

    return open_shared_store(info)


def payload_tensors(payload: Payload) -> list[tuple[str, torch.Tensor]]:
    return [("params", payload.params), *sorted(payload.extras.items())]


class ShippedStates(ClientStateStore):
    """A worker's view of the client states: read from states shipped with the tasks (an
    in-memory store) or from the shared store ``base``; new states collected to be sent
    back (the server commits them)."""

    def __init__(self, states: Mapping[int, Tensors], base: ClientStateStore | None = None) -> None:
        self.states = dict(states)
        self.base = base
        self.new: dict[int, Tensors] = {}

    def get(self, client_id: int) -> Tensors | None:
        if self.base is not None:
            return self.base.get(client_id)
        return self.states.get(client_id)

    def put(self, client_id: int, state: Tensors) -> None:
        self.new[client_id] = {k: v.detach().clone() for k, v in state.items()}
