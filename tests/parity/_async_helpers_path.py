"""Make tests/unit's engine helpers importable from tests/parity."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from _async_helpers import make_engine

__all__ = ["make_engine"]
