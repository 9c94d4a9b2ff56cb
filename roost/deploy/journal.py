"""What a served run has accepted and decided since its last checkpoint, in SQLite (WAL).

A deployed run is not reproducible from its seed alone: which nodes were connected when
the engine selected, and the order in which results, losses and mid-task requests came,
are the network's. The run directory's checkpoint holds the state at a server step; this
journal holds, since that checkpoint, everything needed to replay the engine from it to
the moment the server died, deterministically:

* ``results``: every result the server acknowledged, written (and committed, with
  ``synchronous=FULL``) *before* its Ack is sent, keyed by task id: its tensors, weight,
  metrics, the node's compute seconds and the bytes it took on the wire. A result
  acknowledged is never lost; the other rows are committed with ``synchronous=NORMAL``
  (they survive a crash of the process, and a power loss once the next result is
  committed);
* ``events``: the network events the engine consumed, in order (a task's delivery or loss,
  a mid-task request, a wake), and the engine's own refills among them;
* ``connected``: each answer of "which clients are connected" that differed from the
  previous one, by the index of the engine's query.
* ``evaluations``: each evaluation of the clients' personal models (Ditto's), as the
  nodes measured it, by its index since the checkpoint.

Every row carries ``after_step``: the server step of the checkpoint it follows. Resuming
from the checkpoint of step ``s`` replays the rows with ``after_step = s``; older rows
(a checkpoint was written and the server died before :meth:`Journal.checkpointed`
pruned them) are ignored. ``meta`` keeps the run's task-id prefix, so a task keeps its
id across restarts.

SQLite ships with Python; nothing here imports grpc.
"""

from __future__ import annotations

import io
import json
import secrets
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roost.algorithms.base import ClientResult
from roost.engine.remote import ClientEvaluation, Delivery

__all__ = ["JOURNAL_FILE", "Journal", "LoggedEvent"]

JOURNAL_FILE = "deploy_journal.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT PRIMARY KEY, after_step INTEGER NOT NULL, tensors BLOB NOT NULL,
    weight REAL NOT NULL, scalars TEXT NOT NULL, metrics TEXT NOT NULL,
    compute_s REAL NOT NULL, upload_bytes INTEGER, download_bytes INTEGER);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, after_step INTEGER NOT NULL,
    kind TEXT NOT NULL, key INTEGER NOT NULL, task_id TEXT);
CREATE TABLE IF NOT EXISTS evaluations (
    after_step INTEGER NOT NULL, idx INTEGER NOT NULL, measured TEXT NOT NULL,
    PRIMARY KEY (after_step, idx));
CREATE TABLE IF NOT EXISTS connected (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, after_step INTEGER NOT NULL,
    query INTEGER NOT NULL, mask BLOB NOT NULL, size INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class LoggedEvent:
    """An event the engine consumed: ``kind`` ``task`` (with ``task_id`` when a result was
    delivered, None when the task was lost), ``request``, ``wake`` or ``refill``."""

    kind: str
    key: int
    task_id: str | None = None


def _pack(tensors: dict[str, torch.Tensor]) -> bytes:
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, buffer)
    return buffer.getvalue()


def _unpack(blob: bytes) -> dict[str, torch.Tensor]:
    loaded = torch.load(io.BytesIO(blob), weights_only=True)
    return dict(loaded)


class Journal:
    """The journal of one run directory (see the module docstring); thread-safe."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # the engine's events and connected sets: durable against a crash of the process
        # (kill -9: WAL frames are in the OS's hands at commit), synced with the next result
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(results)")}
        if "upload_bytes" not in columns:  # a journal written before results counted bytes
            self._db.execute("ALTER TABLE results ADD COLUMN upload_bytes INTEGER")
        if "download_bytes" not in columns:  # ... or before split tasks counted theirs
            self._db.execute("ALTER TABLE results ADD COLUMN download_bytes INTEGER")
        self.after_step = 0

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- meta
    def task_prefix(self) -> str:
        """The run's task-id prefix, made on first use and kept."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key='task_prefix'").fetchone()
            if row is not None:
                return str(row[0])
            prefix = secrets.token_hex(4)
            self._db.execute("INSERT INTO meta VALUES ('task_prefix', ?)", (prefix,))
            return prefix

    # ---- writing (the live run)
    def add_result(self, task_id: str, delivery: Delivery) -> None:
        """Record an accepted result; durable when this returns (before its Ack), also
        against a power loss (its commit syncs the write-ahead log, and with it every
        event logged before)."""
        r = delivery.result
        blob = _pack(dict(r.tensors))  # serialized before the lock: the engine logs meanwhile
        with self._lock:
            row = (
                task_id,
                self.after_step,
                blob,
                float(r.weight),
                json.dumps(dict(r.scalars)),
                json.dumps(delivery.metrics),
                float(delivery.compute_s),
                delivery.upload_bytes,
                delivery.download_bytes,
            )
            self._db.execute("PRAGMA synchronous=FULL")
            try:
                self._db.execute(
                    "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row
                )
            finally:
                self._db.execute("PRAGMA synchronous=NORMAL")

    def add_event(self, event: LoggedEvent) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO events (after_step, kind, key, task_id) VALUES (?, ?, ?, ?)",
                (self.after_step, event.kind, event.key, event.task_id),
            )

    def add_evaluation(self, index: int, measured: list[ClientEvaluation]) -> None:
        """Record evaluation ``index`` (since the checkpoint) of the clients' personal
        models: what each client's node measured."""
        rows = [[e.client_id, e.loss, e.accuracy, e.examples] for e in measured]
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO evaluations VALUES (?, ?, ?)",
                (self.after_step, index, json.dumps(rows)),
            )

    def evaluation(self, index: int) -> list[ClientEvaluation] | None:
        """Evaluation ``index`` since the checkpoint of ``after_step``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT measured FROM evaluations WHERE after_step = ? AND idx = ?",
                (self.after_step, index),
            ).fetchone()
        if row is None:
            return None
        return [
            ClientEvaluation(int(c), float(loss), float(acc), int(n))
            for c, loss, acc, n in json.loads(row[0])
        ]

    def add_connected(self, query: int, mask: np.ndarray) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO connected (after_step, query, mask, size) VALUES (?, ?, ?, ?)",
                (self.after_step, query, np.packbits(mask).tobytes(), len(mask)),
            )

    def checkpointed(self, step: int, keep_results: Iterable[str]) -> None:
        """A checkpoint of ``step`` is on disk: later rows follow it; the rows before it
        go, and so do the results of tasks other than ``keep_results`` (those of tasks
        still in flight at the checkpoint)."""
        keep = sorted(set(keep_results))
        with self._lock:
            self.after_step = step
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("DELETE FROM events WHERE after_step < ?", (step,))
            self._db.execute("DELETE FROM connected WHERE after_step < ?", (step,))
            self._db.execute("DELETE FROM evaluations WHERE after_step < ?", (step,))
            self._db.execute("CREATE TEMP TABLE IF NOT EXISTS keep (task_id TEXT PRIMARY KEY)")
            self._db.execute("DELETE FROM keep")
            self._db.executemany("INSERT INTO keep VALUES (?)", [(t,) for t in keep])
            self._db.execute(
                "DELETE FROM results WHERE after_step < ? AND task_id NOT IN keep", (step,)
            )
            self._db.execute("COMMIT")

    # ---- reading (a resumed run)
    def events(self, step: int) -> list[LoggedEvent]:
        """The events logged after the checkpoint of ``step``, in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, key, task_id FROM events WHERE after_step = ? ORDER BY seq",
                (step,),
            ).fetchall()
        return [LoggedEvent(str(k), int(key), t) for k, key, t in rows]

    def connected(self, step: int) -> list[tuple[int, np.ndarray]]:
        """The connected-set changes logged after the checkpoint of ``step``: (query
        index, mask), in order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT query, mask, size FROM connected WHERE after_step = ? ORDER BY seq",
                (step,),
            ).fetchall()
        return [
            (int(q), np.unpackbits(np.frombuffer(m, dtype=np.uint8))[: int(n)].astype(bool))
            for q, m, n in rows
        ]

    def result(self, task_id: str) -> Delivery | None:
        """The accepted result of ``task_id``, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT tensors, weight, scalars, metrics, compute_s, upload_bytes, "
                "download_bytes FROM results WHERE task_id = ?",
                (task_id,),
            ).fetchone()
        if row is None:
            return None
        tensors, weight, scalars, metrics, compute_s, upload_bytes, download_bytes = row
        result = ClientResult(_unpack(tensors), float(weight), json.loads(scalars))
        up = None if upload_bytes is None else int(upload_bytes)
        down = None if download_bytes is None else int(download_bytes)
        return Delivery(result, json.loads(metrics), float(compute_s), up, down)

    def result_ids(self) -> set[str]:
        with self._lock:
            return {str(r[0]) for r in self._db.execute("SELECT task_id FROM results")}
