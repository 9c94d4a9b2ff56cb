"""A dependency-free progress bar on stderr.

On a terminal it redraws one line per round; when stderr is a file or pipe it prints a
line every 5% of the rounds (and the last), so logs stay short.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

__all__ = ["ProgressBar"]


class ProgressBar:
    def __init__(self, total: int, stream: TextIO | None = None, width: int = 24) -> None:
        self.total = total
        self.stream = stream or sys.stderr
        self.width = width
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = max(1, total // 20)
        self._t0 = time.perf_counter()

    def line(self, record: dict[str, Any]) -> str:
        r = record["round"]
        filled = int(self.width * r / self.total)
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"round {r}/{self.total} [{bar}]"]
        if record.get("accuracy") is not None:
            parts.append(f"acc {record['accuracy']:.3f}")
        if record.get("train_loss") is not None:
            parts.append(f"train_loss {record['train_loss']:.3f}")
        parts.append(f"virtual {record['virtual_time_s']:.1f}s")
        parts.append(f"wall {time.perf_counter() - self._t0:.1f}s")
        return "  ".join(parts)

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        r = record["round"]
        if self.tty:
            end = "\n" if r >= self.total else ""
            self.stream.write("\r" + self.line(record) + end)
        elif r % self.every == 0 or r >= self.total:
            self.stream.write(self.line(record) + "\n")
        self.stream.flush()
        return False, {}
