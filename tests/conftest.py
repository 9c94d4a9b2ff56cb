"""Shared fixtures: real `roost` processes for the kill-and-resume tests."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _start_run_until_round(
    overrides: Sequence[str],
    out: Path,
    rounds_done: int = 2,
    timeout_s: float = 180,
    new_session: bool = False,
) -> subprocess.Popen[str]:
    """Start ``roost run quickstart OVERRIDES --out OUT`` and return once its metrics file
    holds ``rounds_done`` rounds, with the process still running (else the test fails).
    ``new_session`` makes it the leader of its own process group, as a shell's foreground
    job is (Ctrl-C signals the whole group)."""
    cmd = [
        sys.executable,
        "-m",
        "roost",
        "run",
        "quickstart",
        *overrides,
        "--out",
        str(out),
        "--quiet",
    ]
    proc = subprocess.Popen(
        cmd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= rounds_done:
            break
        time.sleep(0.005)
    if proc.poll() is not None:
        pytest.fail(f"the run ended before it could be interrupted: {proc.stderr.read()}")
    return proc


def _resume(out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "roost", "run", "--resume", str(out), "--quiet"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def start_run_until_round() -> Callable[..., subprocess.Popen[str]]:
    return _start_run_until_round


@pytest.fixture
def resume_run() -> Callable[[Path], subprocess.CompletedProcess[str]]:
    return _resume
