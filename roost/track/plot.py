"""``roost plot``: accuracy curves against round and against virtual time, one line per run.

matplotlib is imported only here (``pip install 'roost[plot]'``), with the non-interactive
Agg backend, so plotting works on a machine without a screen.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from roost.track.files import atomic_write_bytes
from roost.track.rundir import RunDir, RunDirError

__all__ = ["plot_runs"]


def plot_runs(dirs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str]) -> Path:
    """Write a PNG with two panels (accuracy vs round, accuracy vs virtual time)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise RunDirError("roost plot needs matplotlib: pip install 'roost[plot]'") from None
    runs = []
    for d in dirs:
        rundir = RunDir(d)
        rundir.read_config()  # fails clearly if d is not a run directory
        points = [r for r in rundir.read_metrics() if r.get("accuracy") is not None]
        if not points:
            raise RunDirError(f"{d}: no evaluated rounds in metrics.jsonl to plot")
        runs.append((Path(d).name or str(d), points))
    fig, (ax_round, ax_time) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for label, points in runs:
        acc = [p["accuracy"] for p in points]
        ax_round.plot([p["round"] for p in points], acc, marker=".", label=label)
        ax_time.plot([p["virtual_time_s"] for p in points], acc, marker=".", label=label)
    ax_round.set_xlabel("round")
    ax_time.set_xlabel("virtual time (s)")
    for ax in (ax_round, ax_time):
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buf.getvalue())
    return target
