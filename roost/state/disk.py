"""DiskStateStore: client states in one sparse file of fixed-size, double-buffered slots,
shared by the server and its worker processes."""

from __future__ import annotations

import contextlib
import json
import operator
import os
import shutil
import struct
import sys
import time
import warnings
import weakref
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from roost.state.base import (
    CHECKPOINT_FORMAT,
    ClientStateStore,
    Spec,
    Tensors,
    _check_kind,
    _check_spec,
    _client_index,
    _flat_tensors,
    _Rounds,
    _spec_from,
    _spec_list,
)

_FILE_MAGIC = b"ROOSTST\x01"
_COPY_MAGIC = b"ROOSTCP\x01"
_CONTROL_MAGIC = b"ROOSTCB\x01"
_FILE_FORMAT = 1
_PAGE = 4096
_CONTROL_OFFSET = 64 * 1024
_DATA_OFFSET = 1024 * 1024
_COPY_HEADER = struct.Struct("<8sQqqQI20x")  # 64 bytes; the CRC covers the first 40
_COPY_CRC_START = 40
_CONTROL_HEADER = struct.Struct("<8sQqqQI4x")  # 48 bytes; the CRC covers the first 40
_SEGMENT = struct.Struct("<Qqq")  # session, first round, last committed round
_MAX_SEGMENTS = (_DATA_OFFSET - _CONTROL_OFFSET - _CONTROL_HEADER.size) // _SEGMENT.size


def _new_session() -> int:
    return (int.from_bytes(os.urandom(8), "little") >> 1) or 1


class _CopyHeader(NamedTuple):
    session: int
    round: int
    client_id: int
    nbytes: int
    crc: int
    prefix: bytes  # the 40 bytes the CRC starts with


@dataclass(frozen=True)
class _Control:
    """The store's round state, shared by every process that opens the file.

    ``segments`` is the lineage: (session, first round, last committed round) for each
    session (a run, or the run resumed after a kill) whose commits are part of the current
    history, the current session last. A copy counts as committed only if its (session,
    round) falls in a segment: a copy written by a killed run after its last checkpoint
    carries that run's session and a round outside its segment, so it is never read again
    even once a later session commits the same round number.
    """

    session: int
    committed: int
    current: int
    segments: tuple[tuple[int, int, int], ...]

    def is_committed(self, h: _CopyHeader) -> bool:
        return any(s == h.session and f <= h.round <= last for s, f, last in self.segments)

    def is_pending(self, h: _CopyHeader) -> bool:
        return h.session == self.session and self.committed < h.round <= self.current

    def pack(self) -> bytes:
        body = b"".join(_SEGMENT.pack(*seg) for seg in self.segments)
        head = _CONTROL_HEADER.pack(
            _CONTROL_MAGIC, self.session, self.committed, self.current, len(self.segments), 0
        )[:40]
        crc = zlib.crc32(body, zlib.crc32(head))
        return head + struct.pack("<I4x", crc) + body


def _pwrite_all(fd: int, buffers: Sequence[Any], offset: int) -> None:
    for buf in buffers:
        view = memoryview(buf).cast("B")
        while len(view):
            n = os.pwrite(fd, view, offset)
            if n <= 0:
                raise OSError(f"pwrite wrote {n} bytes")
            view, offset = view[n:], offset + n


def _pread_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        n = os.preadv(fd, [buf], offset)
        if n <= 0:
            raise OSError(f"unexpected end of the client state file at byte {offset}")
        buf, offset = buf[n:], offset + n


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _close_file(fd: int, remove_dir: str | None) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
    if remove_dir is not None:
        shutil.rmtree(remove_dir, ignore_errors=True)


class DiskStateStore(ClientStateStore):
    """Client states in one sparse file of fixed-size, double-buffered slots.

    ``DiskStateStore(path, spec, num_clients, create=True)`` makes a new file (replacing
    any); ``DiskStateStore(path)`` (or with spec and num_clients, which are then checked)
    opens an existing one, as workers do. The handle that created the file, or the one
    that restored it, is the *owner*: only it may call begin_round and commit (restore
    makes a handle the owner). Every handle, in any process, may get and put (each client
    written by one process in a round).

    **Slots.** Client ``i`` has two copies; ``put`` writes the copy that is not its newest
    committed one (or rewrites the one already pending in this session), stamped with the
    current round and session, header last and CRC32-checked; ``get`` returns the newest
    copy that is committed or pending in this session and whose checksum matches. A write
    torn by a crash is thus never returned, and the newest committed copy is never
    overwritten before a later round commits.

    **Memory.** States are moved with ``os.pread``/``os.pwrite`` into and from the caller's
    tensors; nothing is memory-mapped, so resident memory is O(one state) whatever the
    number of clients (the data lives in the page cache, which is not this process's
    RSS). Unlike a shared file mapping, a write into a sparse file on a full disk is an
    ``OSError`` and not a SIGBUS that kills the process.

    **Durability.** ``commit`` fsyncs the file: the page cache is per file, so this makes
    the puts of every process durable, provided they returned before the commit (workers
    reply after their puts). Workers may ``flush`` (fsync) too; it is not required.
    The round state (session, committed round, current round, lineage) lives in the
    file's control block, so workers that opened the file once follow the owner's rounds
    with no messages; the durable record of the committed round is the checkpoint
    (:meth:`checkpoint_state`), and ``restore`` rewrites the control block from it.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        spec: Spec | None = None,
        num_clients: int | None = None,
        create: bool = False,
    ) -> None:
        self.path = Path(path)
        self._owner = False
        self._session = 0
        if create:
            if spec is None or num_clients is None:
                raise ValueError("creating a DiskStateStore needs spec and num_clients")
            self.spec = _check_spec(spec)
            self.num_clients = operator.index(num_clients)
            self._set_geometry()
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            self._finalizer = weakref.finalize(self, _close_file, self._fd, None)
            self._create()
        else:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)
            self._finalizer = weakref.finalize(self, _close_file, self._fd, None)
            try:
                self._open(spec, num_clients)
            except BaseException:
                self._finalizer()
                raise

    # ---- layout
    def _set_geometry(self) -> None:
        if self.num_clients < 0:
            raise ValueError(f"num_clients must be >= 0, not {self.num_clients}")
        total = sum(self.spec.values())
        if total == 0:
            raise ValueError("a DiskStateStore needs a spec with at least one element")
        self.payload_nbytes = 4 * total
        self.copy_stride = -(-(_COPY_HEADER.size + self.payload_nbytes) // _PAGE) * _PAGE
        self.file_nbytes = _DATA_OFFSET + 2 * self.num_clients * self.copy_stride

    def _file_header(self) -> dict[str, Any]:
        return {
            "format": _FILE_FORMAT,
            "spec": _spec_list(self.spec),
            "num_clients": self.num_clients,
            "byteorder": sys.byteorder,
            "data_offset": _DATA_OFFSET,
            "copy_stride": self.copy_stride,
            "payload_nbytes": self.payload_nbytes,
        }

    def copy_offset(self, client_id: int, copy: int) -> int:
        """Byte offset of copy 0 or 1 of a client's slot (for tools and tests)."""
        cid = _client_index(client_id, self.num_clients)
        return _DATA_OFFSET + (2 * cid + copy) * self.copy_stride

    def _create(self) -> None:
        meta = json.dumps(self._file_header()).encode()
        if 12 + len(meta) > _CONTROL_OFFSET:
            raise ValueError("client state spec too long for the file header")
        _pwrite_all(self._fd, [_FILE_MAGIC + struct.pack("<I", len(meta)) + meta], 0)
        os.ftruncate(self._fd, self.file_nbytes)  # sparse: untouched slots take no disk
        self._become_owner(0, ())
        os.fsync(self._fd)
        _fsync_dir(self.path.parent)

    def _open(self, spec: Spec | None, num_clients: int | None) -> None:
        head = os.pread(self._fd, 12, 0)
        if len(head) < 12 or head[:8] != _FILE_MAGIC:
            raise ValueError(f"{self.path}: not a Roost client state file")
        (length,) = struct.unpack("<I", head[8:])
        meta = json.loads(os.pread(self._fd, length, 12))
        if meta.get("format") != _FILE_FORMAT:
            raise ValueError(f"{self.path}: client state file format {meta.get('format')!r}")
        if meta.get("byteorder") != sys.byteorder:
            raise ValueError(f"{self.path}: written on a {meta.get('byteorder')}-endian machine")
        self.spec = _spec_from(meta["spec"])
        self.num_clients = int(meta["num_clients"])
        if spec is not None and _check_spec(spec) != self.spec:
            raise ValueError(f"{self.path}: holds client state spec {self.spec}, not {dict(spec)}")
        if num_clients is not None and num_clients != self.num_clients:
            raise ValueError(f"{self.path}: holds {self.num_clients} clients, not {num_clients}")
        self._set_geometry()
        if meta != self._file_header():
            raise ValueError(f"{self.path}: inconsistent client state file header {meta}")
        size = os.fstat(self._fd).st_size
        if size < self.file_nbytes:
            raise ValueError(f"{self.path}: truncated ({size} < {self.file_nbytes} bytes)")

    # ---- control block
    def _read_control(self) -> _Control:
        for _ in range(100):
            head = os.pread(self._fd, _CONTROL_HEADER.size, _CONTROL_OFFSET)
            if len(head) == _CONTROL_HEADER.size:
                magic, session, committed, current, nseg, crc = _CONTROL_HEADER.unpack(head)
                if magic == _CONTROL_MAGIC and nseg <= _MAX_SEGMENTS:
                    body = os.pread(
                        self._fd, nseg * _SEGMENT.size, _CONTROL_OFFSET + _CONTROL_HEADER.size
                    )
                    if zlib.crc32(body, zlib.crc32(head[:40])) == crc:
                        segments = tuple(
                            _SEGMENT.unpack_from(body, i * _SEGMENT.size) for i in range(nseg)
                        )
                        return _Control(session, committed, current, segments)
            time.sleep(0.001)  # being rewritten by the owner (between rounds): retry
        raise RuntimeError(f"{self.path}: the client state control block is unreadable")

    def _write_control(self, control: _Control) -> None:
        if len(control.segments) > _MAX_SEGMENTS:
            raise RuntimeError(f"{self.path}: more than {_MAX_SEGMENTS} resumed sessions")
        _pwrite_all(self._fd, [control.pack()], _CONTROL_OFFSET)

    def _become_owner(self, committed: int, lineage: tuple[tuple[int, int, int], ...]) -> None:
        self._session = _new_session()
        segments = (*lineage, (self._session, committed + 1, committed))
        self._write_control(_Control(self._session, committed, committed + 1, segments))
        self._owner = True

    def _owned_control(self, what: str) -> _Control:
        if not self._owner:
            raise RuntimeError(
                f"{what}: only the handle that created or restored {self.path} may call it"
            )
        control = self._read_control()
        if control.session != self._session:
            raise RuntimeError(f"{what}: {self.path} was restored by another handle")
        return control

    @property
    def committed_round(self) -> int:
        return self._read_control().committed

    @property
    def current_round(self) -> int:
        return self._read_control().current

    # ---- copies
    def _read_header(self, cid: int, copy: int) -> _CopyHeader | None:
        raw = os.pread(self._fd, _COPY_HEADER.size, self.copy_offset(cid, copy))
        if len(raw) < _COPY_HEADER.size:
            return None
        magic, session, rnd, client, nbytes, crc = _COPY_HEADER.unpack(raw)
        if magic != _COPY_MAGIC or client != cid or nbytes != self.payload_nbytes:
            return None
        return _CopyHeader(session, rnd, client, nbytes, crc, raw[:_COPY_CRC_START])

    def get(self, client_id: int) -> Tensors | None:
        cid = _client_index(client_id, self.num_clients)
        control = self._read_control()
        candidates = []
        for copy in (0, 1):
            h = self._read_header(cid, copy)
            if h is not None and (control.is_committed(h) or control.is_pending(h)):
                candidates.append((h.round, copy, h))
        candidates.sort(reverse=True)
        for n, (_, copy, h) in enumerate(candidates):
            flat = torch.empty(self.payload_nbytes // 4, dtype=torch.float32)
            view = flat.numpy().data.cast("B")
            _pread_into(self._fd, view, self.copy_offset(cid, copy) + _COPY_HEADER.size)
            if zlib.crc32(view, zlib.crc32(h.prefix)) == h.crc:
                if n:
                    self._warn_corrupt(cid, candidates[:n])
                return dict(zip(self.spec, flat.split(list(self.spec.values())), strict=True))
        if candidates:
            self._warn_corrupt(cid, candidates)
        return None

    def _warn_corrupt(self, cid: int, bad: list[tuple[int, int, _CopyHeader]]) -> None:
        rounds = ", ".join(f"copy {copy} of round {r}" for r, copy, _ in bad)
        warnings.warn(
            f"{self.path}: client {cid}: checksum mismatch in {rounds} (torn write?); "
            "using the previous copy",
            RuntimeWarning,
            stacklevel=3,
        )

    def put(self, client_id: int, state: Mapping[str, torch.Tensor]) -> None:
        cid = _client_index(client_id, self.num_clients)
        tensors = _flat_tensors(self.spec, cid, state)
        control = self._read_control()
        copy = self._write_target(control, cid)
        offset = self.copy_offset(cid, copy)
        views = [t.numpy().data.cast("B") for t in tensors]
        prefix = _COPY_HEADER.pack(
            _COPY_MAGIC, control.session, control.current, cid, self.payload_nbytes, 0
        )[:_COPY_CRC_START]
        crc = zlib.crc32(prefix)
        for view in views:
            crc = zlib.crc32(view, crc)
        header = _COPY_HEADER.pack(
            _COPY_MAGIC, control.session, control.current, cid, self.payload_nbytes, crc
        )
        # Invalidate, write the payload, then the header: a crash leaves the copy invalid
        # (and were the writes reordered on the way to the disk, the CRC catches it).
        _pwrite_all(self._fd, [bytes(_COPY_HEADER.size)], offset)
        _pwrite_all(self._fd, views, offset + _COPY_HEADER.size)
        _pwrite_all(self._fd, [header], offset)

    def _write_target(self, control: _Control, cid: int) -> int:
        headers = [self._read_header(cid, copy) for copy in (0, 1)]
        for copy, h in enumerate(headers):
            if h is not None and control.is_pending(h):
                return copy  # already written in an uncommitted round of this session
        committed = [
            (h.round, copy)
            for copy, h in enumerate(headers)
            if h is not None and control.is_committed(h)
        ]
        if not committed:
            return 0
        if len(committed) == 1:
            return 1 - committed[0][1]
        return min(committed)[1]  # both committed: replace the older

    # ---- rounds
    def begin_round(self, round: int) -> None:
        control = self._owned_control("begin_round")
        rounds = _Rounds()
        rounds.committed, rounds.current = control.committed, control.current
        rounds.begin(round)
        self._write_control(
            _Control(control.session, control.committed, rounds.current, control.segments)
        )

    def commit(self, round: int) -> None:
        control = self._owned_control("commit")
        rounds = _Rounds()
        rounds.committed, rounds.current = control.committed, control.current
        rounds.commit(round)
        os.fsync(self._fd)  # every process's puts, before they count as committed
        *lineage, (session, first, _) = control.segments
        segments = (*lineage, (session, first, rounds.committed))
        self._write_control(_Control(session, rounds.committed, rounds.current, segments))

    def flush(self) -> None:
        os.fsync(self._fd)

    def checkpoint_state(self) -> dict[str, Any]:
        """Small: the file name, spec, committed round and lineage (no tensors)."""
        control = self._read_control()
        lineage = [[s, f, last] for s, f, last in control.segments if f <= last]
        return {
            "kind": "disk",
            "format": CHECKPOINT_FORMAT,
            "file": self.path.name,
            "spec": _spec_list(self.spec),
            "num_clients": self.num_clients,
            "round": control.committed,
            "lineage": lineage,
        }

    def restore(self, checkpoint_state: Mapping[str, Any]) -> None:
        """Roll back to the checkpoint's committed round, in a new session (this handle
        becomes the owner): copies written after that round are ignored and overwritten."""
        _check_kind(checkpoint_state, "disk")
        spec = _spec_from(checkpoint_state["spec"])
        if spec != self.spec or int(checkpoint_state["num_clients"]) != self.num_clients:
            raise ValueError(
                f"{self.path}: checkpoint client state ({spec}, "
                f"{checkpoint_state['num_clients']} clients) does not match the file "
                f"({self.spec}, {self.num_clients} clients)"
            )
        committed = int(checkpoint_state["round"])
        lineage = tuple(
            (int(s), int(f), min(int(last), committed))
            for s, f, last in checkpoint_state["lineage"]
            if int(f) <= min(int(last), committed)
        )
        self._become_owner(committed, lineage)

    def share(self) -> dict[str, Any]:
        """How another process opens this store: :func:`open_shared_store` (small)."""
        return {
            "kind": "disk",
            "path": str(self.path.resolve()),
            "spec": _spec_list(self.spec),
            "num_clients": self.num_clients,
        }

    def close(self) -> None:
        self._owner = False
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def allocated_nbytes(self) -> int:
        """Disk space the (sparse) file takes."""
        return os.fstat(self._fd).st_blocks * 512
