"""Compile Roost's bytecode before a benchmark times fresh processes.

A ``pip install`` compiles every module to ``__pycache__`` at install time, and an
editable install writes it at the first import, so a user's ``roost run`` reads bytecode.
With ``PYTHONDONTWRITEBYTECODE`` set (the project machines set it), nothing is ever
written and every process compiles all of Roost's modules from source again: 0.1-0.3 s
of pure compilation per process that no installed copy pays, and that the single-file
floors barely pay. The benchmarks therefore compile the package once, explicitly,
before measuring (``compileall`` writes regardless of the variable), and say so.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

import roost

__all__ = ["compile_roost"]


def compile_roost() -> str:
    """Write the bytecode of every module of the installed ``roost`` package; returns a
    line for the benchmark's output saying what was done and why."""
    package = Path(roost.__file__).resolve().parent
    ok = compileall.compile_dir(str(package), quiet=1)
    flag = os.environ.get("PYTHONDONTWRITEBYTECODE")
    why = f" (PYTHONDONTWRITEBYTECODE={flag} is set)" if flag else ""
    state = "compiled" if ok else "compiled with errors"
    return f"bytecode of {package} {state} before timing{why}, as an installed copy has it"
