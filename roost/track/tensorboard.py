"""TensorBoard logging: an engine callback that writes each round's scalars as events.

:class:`TensorBoardWriter` is a :class:`~roost.engine.Callback`. Every number in a
round's record (``accuracy``, ``loss``, ``train_loss``, ``update_norm``, ``clients``,
``dropped``, ``bytes_up``, ``virtual_time_s``, ``wall_time_s``, ``client_*``, ...) becomes
the scalar of the same tag at global step ``record["round"]``; ``None`` (a round that was
not evaluated), booleans, strings and lists are skipped. The events go to a log directory,
by convention the run directory's ``tensorboard/`` subfolder, and are flushed after every
round, so a killed run loses at most the round in progress. Place it after callbacks whose
extra metrics it should log: it sees the record as earlier callbacks left it.

Resume: a resumed run writes a new event file in the same directory. The writer opens it
with ``purge_step`` = the round of the first record it receives (the first round of this
session), so TensorBoard discards whatever earlier files hold for that round and later
ones, e.g. a round that was logged but not checkpointed before the run was killed. Every
step is shown once, with the values of the run that was kept.

It needs ``torch.utils.tensorboard`` and so the ``tensorboard`` package
(``pip install 'roost[tensorboard]'``), imported only when a writer is made.
"""

from __future__ import annotations

import numbers
import os
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["TensorBoardWriter", "scalars"]

MISSING = "roost's TensorBoard writer needs TensorBoard: pip install 'roost[tensorboard]'"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numeric fields except ``round``, as floats (no None, bools, lists)."""
    return {
        key: float(value)
        for key, value in record.items()
        if key != "round" and isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


class TensorBoardWriter:
    """Writes each round's numeric metrics to ``log_dir`` as TensorBoard scalars.

    Raises ValueError at once if TensorBoard is not installed. ``log_dir`` (created if
    needed) and its event file are made at the first record, so a run that fails before
    its first round leaves nothing behind; see the module docstring on resume. Call
    :meth:`close` (or use ``with``) when the run ends.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch raises ImportError when tensorboard is missing
            raise ValueError(MISSING) from None
        self._summary_writer_cls = SummaryWriter
        self.log_dir = Path(log_dir)
        self._writer: Any = None

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        step = int(record["round"])
        if self._writer is None:  # the first round of this session: see "Resume" above
            self.log_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._summary_writer_cls(str(self.log_dir), purge_step=step)
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=step)
        self._writer.flush()
        return False, {}

    def close(self) -> None:
        """Flush and close the event file (a no-op if nothing was written or already closed)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
