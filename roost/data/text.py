"""Plain-text plays split by speaker (Tiny Shakespeare style), for next-character prediction.

Reads one UTF-8 text file. Blocks are separated by blank lines; a block whose first line ends
with ``:`` is a speech by the speaker that line names (``GLOUCESTER:``), and its other lines are
the speech. Blocks of any other form, and speeches with no lines, are skipped. A speaker's
text is their speeches joined by ``\\n`` in file order; one speaker is one client (clients
numbered by first appearance). Speakers whose text is shorter than ``min_chars`` are dropped.

Examples are windows over a speaker's text: ``x`` = ``seq_len`` character ids, ``y`` = the
id of the character that follows. Windows start every ``stride`` characters (default 8, so
neighbouring windows overlap by ``seq_len - stride``; stride 1 gives every window but
``seq_len`` times the memory: the windows are stored as int64, ``8 * seq_len`` bytes each,
about 90 MB for Tiny Shakespeare at the defaults). A speaker's text of L characters gives
``(L - seq_len - 1) // stride + 1`` windows (none when ``L <= seq_len``).

The vocabulary is the sorted set of distinct characters of the whole file (65 for Tiny
Shakespeare); ids are positions in it. Each speaker's last ``floor(test_fraction * windows)``
windows form their test split, so no test target is ever a train target or inside a train
window. The central test split is the union of those, capped at ``max_test`` windows
(0 = no cap) by taking evenly spaced ones (window ``floor(j * n / max_test)`` for
``j < max_test``); per-client test splits are never capped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from roost.data.arrays import CentralData
from roost.data.base import ClientData, DatasetInfo
from roost.registry import check

__all__ = [
    "TextConfig",
    "char_windows",
    "load_text_data",
    "read_speeches",
    "speaker_texts",
]


@dataclass(frozen=True)
class TextConfig:
    """path: the text file. seq_len, stride: window length and step in characters.
    test_fraction: each speaker's held-out share of windows. max_test: cap of the central
    test split (0 = none). min_chars: drop speakers with shorter text."""

    path: str = ""
    seq_len: int = 80
    stride: int = 8
    test_fraction: float = 0.1
    max_test: int = 2000
    min_chars: int = 0

    def __post_init__(self) -> None:
        check(
            bool(self.path) and Path(self.path).is_file(),
            "path",
            self.path,
            "expected a plain-text file of speeches ('NAME:' line, then the speech, "
            "blocks separated by blank lines)",
        )
        check(self.seq_len >= 1, "seq_len", self.seq_len, "must be >= 1")
        check(self.stride >= 1, "stride", self.stride, "must be >= 1")
        check(0 <= self.test_fraction < 1, "test_fraction", self.test_fraction, "must be in [0, 1)")
        check(self.max_test >= 0, "max_test", self.max_test, "must be >= 0 (0 = no cap)")
        check(self.min_chars >= 0, "min_chars", self.min_chars, "must be >= 0")


def read_speeches(text: str) -> list[tuple[str, str]]:
    """The speeches of ``text`` as ``(speaker, speech)`` pairs in file order."""
    speeches = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.strip():
            block.append(line)
            continue
        if len(block) > 1 and block[0].endswith(":"):
            speeches.append((block[0][:-1].strip(), "\n".join(block[1:])))
        block = []
    return speeches


def speaker_texts(text: str) -> dict[str, str]:
    """Each speaker's speeches joined by newlines, speakers in order of first appearance."""
    parts: dict[str, list[str]] = {}
    for speaker, speech in read_speeches(text):
        parts.setdefault(speaker, []).append(speech)
    return {speaker: "\n".join(speeches) for speaker, speeches in parts.items()}


def char_windows(ids: np.ndarray, seq_len: int, stride: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows of ``ids``: x (m, seq_len) starting every ``stride``, y (m,) the next id."""
    if len(ids) <= seq_len:
        return np.zeros((0, seq_len), ids.dtype), np.zeros(0, ids.dtype)
    spans = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)[::stride]
    return spans[:, :seq_len], spans[:, seq_len]


def _encode(text: str, vocab: np.ndarray) -> np.ndarray:
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    ids = np.searchsorted(vocab, codes)
    if np.any(vocab[np.minimum(ids, len(vocab) - 1)] != codes):
        raise ValueError("text holds characters outside the vocabulary")
    return ids.astype(np.int64)


def load_text_data(cfg: TextConfig, seed: int) -> CentralData:
    """Read ``cfg.path`` and cut every speaker's text into windows (``seed`` is unused)."""
    path = Path(cfg.path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e})") from None
    vocab = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32))
    speakers = speaker_texts(text)
    if not speakers:
        raise ValueError(
            f"{path}: no speeches found; expected blocks separated by blank lines, each "
            "starting with a 'NAME:' line"
        )
    train_x, train_y, train_g, test_x, test_y, test_g = [], [], [], [], [], []
    for key, speech in enumerate(speakers.values()):
        if len(speech) < cfg.min_chars:
            continue
        x, y = char_windows(_encode(speech, vocab), cfg.seq_len, cfg.stride)
        n_test = int(cfg.test_fraction * len(y))
        cut = len(y) - n_test
        train_x.append(x[:cut])
        train_y.append(y[:cut])
        train_g.append(np.full(cut, key, dtype=np.int64))
        test_x.append(x[cut:])
        test_y.append(y[cut:])
        test_g.append(np.full(n_test, key, dtype=np.int64))
    if not train_x or sum(len(y) for y in train_y) == 0:
        raise ValueError(
            f"{path}: no speaker has more than seq_len={cfg.seq_len} characters "
            f"(and at least min_chars={cfg.min_chars})"
        )
    info = DatasetInfo((cfg.seq_len,), len(vocab), vocab_size=len(vocab))
    train = ClientData(
        torch.from_numpy(np.concatenate(train_x)), torch.from_numpy(np.concatenate(train_y))
    )
    n_test = sum(len(y) for y in test_y)
    if n_test == 0:
        return CentralData(train, None, info, groups=np.concatenate(train_g))
    test = ClientData(
        torch.from_numpy(np.concatenate(test_x)), torch.from_numpy(np.concatenate(test_y))
    )
    central = None
    if cfg.max_test and n_test > cfg.max_test:
        central = np.arange(cfg.max_test, dtype=np.int64) * n_test // cfg.max_test
    return CentralData(
        train,
        test,
        info,
        groups=np.concatenate(train_g),
        test_groups=np.concatenate(test_g),
        central_test=central,
    )
