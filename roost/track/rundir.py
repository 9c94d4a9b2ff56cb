"""The run directory: ``config.json``, ``metrics.jsonl``, ``summary.json``, ``checkpoint.pt``.

``metrics.jsonl`` holds one JSON object per round, appended (and flushed, so a reader
sees it at once) as each round ends. A checkpoint is written atomically after a round's
metrics line, as often as the run's ``checkpoint_every_s`` asks (the runner decides), and
``metrics.jsonl`` is fsynced just before it (:meth:`RunDir.sync_metrics`): the lines a
checkpoint names are on disk before it is, and the lines after it need not be, because on
resume lines for rounds past the checkpoint (and a torn last line) are dropped and
recomputed, so the file always matches the model.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

from roost.track.files import atomic_torch_save, atomic_write_json, atomic_write_text

__all__ = ["RunDir", "RunDirError"]

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
SNAPSHOTS = "snapshots"


class RunDirError(ValueError):
    """The run directory cannot be used as asked (exists, missing, or damaged)."""


def _finite_or_none(value: Any) -> Any:
    """NaN and Inf are not JSON: a metric that is one is written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


class RunDir:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._made_dir: Path | None = None
        self._made: list[Path] = []

    # ---- creation and reading
    def create(self, config: dict[str, Any]) -> None:
        """Start a run here. A directory whose run never finished a round (it failed at
        start: a bad device, a missing data file) holds nothing to lose and is reused."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"{self.path} is a file, not a run directory; choose another --out")
        metrics = self.path / METRICS
        if (self.path / CHECKPOINT).exists() or (metrics.exists() and metrics.stat().st_size):
            raise RunDirError(
                f"{self.path} already holds a run; continue it with --resume {self.path} "
                "or choose another --out"
            )
        for parent in reversed(self.path.parents):
            if parent.exists() and not parent.is_dir():
                raise RunDirError(f"{self.path}: {parent} is a file, not a directory")
        missing = [d for d in (self.path, *self.path.parents) if not d.exists()]
        self._made_dir = missing[-1] if missing else None  # the topmost directory made here
        self.path.mkdir(parents=True, exist_ok=True)
        for name in (CONFIG, METRICS):
            if not (self.path / name).exists():
                self._made.append(self.path / name)
        atomic_write_json(self.path / CONFIG, config)
        atomic_write_text(self.path / METRICS, "")

    def made(self, name: str) -> None:
        """Note that this run created ``name`` in the directory (e.g. the client-state
        file), so that :meth:`discard` removes it with the rest."""
        target = self.path / name
        if target not in self._made:
            self._made.append(target)

    def discard(self) -> None:
        """Undo :meth:`create` for a run that failed before its first round: remove the
        directories this run made (``runs/`` too, if it made that), else only the files it
        made (nothing of another run is touched; :meth:`create` refuses a directory that
        holds one)."""
        if self._made_dir is not None:
            shutil.rmtree(self._made_dir, ignore_errors=True)
        else:
            for f in self._made:
                if f.is_dir():
                    shutil.rmtree(f, ignore_errors=True)
                else:
                    f.unlink(missing_ok=True)
        self._made, self._made_dir = [], None

    def write_config(self, config: dict[str, Any]) -> None:
        """Replace ``config.json`` (atomically: a crash leaves the old or the new one)."""
        atomic_write_json(self.path / CONFIG, config)

    def read_config(self) -> dict[str, Any]:
        f = self.path / CONFIG
        if not f.exists():
            raise RunDirError(f"{self.path} is not a run directory: {CONFIG} is missing")
        try:
            config = json.loads(f.read_text())
        except json.JSONDecodeError as e:
            raise RunDirError(f"{f}: invalid JSON: line {e.lineno}: {e.msg}") from None
        if not isinstance(config, dict):
            raise RunDirError(f"{f}: expected a JSON object")
        return config

    def read_metrics(self) -> list[dict[str, Any]]:
        f = self.path / METRICS
        if not f.exists():
            return []
        records = []
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break  # a torn last line from a killed run
            if isinstance(rec, dict):
                records.append(rec)
        return records

    # ---- during the run
    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one round's line, flushed but not fsynced (see :meth:`sync_metrics`)."""
        with open(self.path / METRICS, "a") as f:
            f.write(json.dumps(_finite_or_none(record), sort_keys=True, allow_nan=False) + "\n")

    def sync_metrics(self) -> None:
        """Make every line appended so far durable: called before a checkpoint or summary
        that counts them (one fsync per checkpoint, not one per round)."""
        f = self.path / METRICS
        if f.exists():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        atomic_torch_save(self.path / CHECKPOINT, state)

    def save_snapshots(self, snapshots: dict[int, Any]) -> None:
        """Write each model snapshot an asynchronous run still needs, once: a version
        already on disk is not written again (it never changes). Called before the
        checkpoint that lists them."""
        folder = self.path / SNAPSHOTS
        if not folder.exists():
            folder.mkdir()
            self.made(SNAPSHOTS)
        for version, snapshot in snapshots.items():
            f = folder / f"v{int(version)}.pt"
            if not f.exists():
                atomic_torch_save(f, snapshot)

    def prune_snapshots(self, keep: set[int]) -> None:
        """Remove snapshots no checkpoint needs (after the checkpoint was written)."""
        folder = self.path / SNAPSHOTS
        if not folder.exists():
            return
        for f in folder.glob("v*.pt"):
            if f.stem[1:].isdigit() and int(f.stem[1:]) not in keep:
                f.unlink(missing_ok=True)

    def load_snapshots(self, versions: list[int]) -> dict[int, Any]:
        import torch

        out = {}
        for v in versions:
            f = self.path / SNAPSHOTS / f"v{int(v)}.pt"
            try:
                out[int(v)] = torch.load(f, weights_only=True)
            except Exception as e:  # missing or damaged: say which
                raise RunDirError(
                    f"{f}: cannot read the model snapshot of version {v}: {e}"
                ) from None
        return out

    def load_checkpoint(self) -> dict[str, Any] | None:
        f = self.path / CHECKPOINT
        if not f.exists():
            return None
        import torch

        try:
            state = torch.load(f, weights_only=True)
        except Exception as e:  # a damaged file: say which
            raise RunDirError(f"{f}: cannot read checkpoint: {e}") from None
        if not isinstance(state, dict) or "round" not in state:
            raise RunDirError(f"{f}: not a Roost checkpoint")
        return state

    def truncate_metrics(self, last_round: int) -> list[dict[str, Any]]:
        """Keep only the records of rounds <= ``last_round`` (atomically); return them."""
        kept = [r for r in self.read_metrics() if int(r.get("round", 0)) <= last_round]
        atomic_write_text(
            self.path / METRICS, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
        )
        return kept

    def write_summary(self, summary: dict[str, Any]) -> None:
        self.sync_metrics()
        atomic_write_json(self.path / SUMMARY, _finite_or_none(summary))

    def has_summary(self) -> bool:
        return (self.path / SUMMARY).exists()

    def has_checkpoint(self) -> bool:
        return (self.path / CHECKPOINT).exists()
