"""Errors and warnings a user sees as one line (importable without torch)."""

from __future__ import annotations

__all__ = ["Diverged", "RoostWarning", "WorkerFailure"]


class WorkerFailure(RuntimeError):
    """A worker process died or stopped answering; the message names it and its clients."""


class Diverged(RuntimeError):
    """The global model became NaN or Inf; the message names the round and what to try.

    The run stops at once: the run directory keeps the last good round's checkpoint and
    metrics, and ``summary.json`` says ``"status": "diverged"``.
    """


class RoostWarning(UserWarning):
    """Something in a run the user should know about that does not stop it (e.g. a round
    in which every selected client was dropped). ``roost run`` prints it as one line."""
