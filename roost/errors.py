"""Errors a user sees as one line (importable without torch)."""

from __future__ import annotations

__all__ = ["WorkerFailure"]


class WorkerFailure(RuntimeError):
    """A worker process died or stopped answering; the message names it and its clients."""
