"""``roost plot``: accuracy and loss curves of one or more runs, one line per run.

The figure has one column per x axis (``round``, ``virtual`` = ``virtual_time_s``,
``wall`` = ``wall_time_s``; default ``round,virtual``) and two rows that share it: test
accuracy on top, loss below: test loss (the ``loss`` field, solid, on evaluated rounds)
and the clients' mean training loss (``train_loss``, dashed, same colour, every round),
so a run evaluated only at the end (``eval_every=0``) still shows how training went. The
round axes have integer ticks. The loss axis is logarithmic when ``loss_scale="log"``, or,
with ``"auto"`` (the default), when every plotted loss is positive and the largest is
more than 100 times the smallest: a run that diverged (a loss of 1e6 beside 0.5) then
still shows its other curves instead of flat lines at the bottom.

matplotlib is imported only here (``pip install 'roost[plot]'``), with the non-interactive
Agg backend, so plotting works on a machine without a screen.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.track.files import atomic_write_bytes
from roost.track.rundir import RunDir, RunDirError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_X",
    "LOSS_SCALES",
    "X_AXES",
    "parse_x_axes",
    "plot_figure",
    "plot_runs",
    "save_png",
]

LOSS_SCALES = ("auto", "linear", "log")
AUTO_LOG_RATIO = 100.0

# x axis name -> (metrics.jsonl field, axis label)
X_AXES: dict[str, tuple[str, str]] = {
    "round": ("round", "round"),
    "virtual": ("virtual_time_s", "virtual time (s)"),
    "wall": ("wall_time_s", "wall time (s)"),
}
DEFAULT_X: tuple[str, ...] = ("round", "virtual")


def parse_x_axes(spec: str) -> tuple[str, ...]:
    """``"round,wall"`` -> ``("round", "wall")``; an unknown or missing name is a ValueError
    naming the allowed ones. A name given twice is plotted once."""
    names = [s.strip() for s in spec.split(",")]
    if not all(n in X_AXES for n in names):
        raise ValueError(f"--x {spec}: allowed: {', '.join(X_AXES)} (comma-separated)")
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True)
class _Run:
    label: str
    records: list[dict[str, Any]]


def _load(d: str | os.PathLike[str]) -> _Run:
    rundir = RunDir(d)
    rundir.read_config()  # fails clearly if d is not a run directory
    records = rundir.read_metrics()
    if not any(r.get(k) is not None for r in records for k in ("accuracy", "loss", "train_loss")):
        raise RunDirError(f"{d}: no rounds with accuracy or loss in metrics.jsonl to plot")
    return _Run(Path(d).name or str(d), records)


def _xy(records: list[dict[str, Any]], x: str, y: str) -> tuple[list[float], list[float]]:
    """The ``(x, y)`` points of the records where both fields are set."""
    pts = [(r[x], r[y]) for r in records if r.get(x) is not None and r.get(y) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def loss_axis_scale(losses: Sequence[float], loss_scale: str = "auto") -> str:
    """``"log"`` or ``"linear"`` for these plotted losses (see the module docstring)."""
    if loss_scale not in LOSS_SCALES:
        raise ValueError(f"loss scale {loss_scale!r}: allowed: {', '.join(LOSS_SCALES)}")
    if loss_scale != "auto":
        return loss_scale
    finite = [v for v in losses if v == v and abs(v) != float("inf")]
    if finite and min(finite) > 0 and max(finite) > AUTO_LOG_RATIO * min(finite):
        return "log"
    return "linear"


def plot_figure(
    dirs: Sequence[str | os.PathLike[str]],
    x: Sequence[str] = DEFAULT_X,
    loss_scale: str = "auto",
) -> Figure:
    """The figure of :func:`plot_runs`, not yet saved (close it with ``plt.close``).

    ``fig.axes`` is ``[accuracy vs x[0], accuracy vs x[1], ..., loss vs x[0], ...]``. Each
    line's gid is ``"RUN/FIELD"`` (FIELD: ``accuracy``, ``loss``, ``train_loss``), RUN being
    the run directory's name.
    """
    if not x or not all(name in X_AXES for name in x):
        raise ValueError(f"x axes {list(x)}: allowed: {', '.join(X_AXES)}")
    loss_axis_scale([], loss_scale)  # refuse an unknown scale before plotting
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D
        from matplotlib.ticker import MaxNLocator
    except ModuleNotFoundError:
        raise RunDirError("roost plot needs matplotlib: pip install 'roost[plot]'") from None
    runs = [_load(d) for d in dirs]
    fig, axes = plt.subplots(
        2,
        len(x),
        figsize=(5.5 * len(x), 7),
        sharex="col",
        squeeze=False,
        constrained_layout=True,
    )
    has_train = False
    losses: list[float] = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        for col, name in enumerate(x):
            key = X_AXES[name][0]
            ax_acc, ax_loss = axes[0][col], axes[1][col]
            xs, ys = _xy(run.records, key, "accuracy")
            ax_acc.plot(
                xs, ys, marker=".", color=color, label=run.label, gid=f"{run.label}/accuracy"
            )
            xs, ys = _xy(run.records, key, "loss")
            ax_loss.plot(xs, ys, marker=".", color=color, gid=f"{run.label}/loss")
            losses += ys
            xs, ys = _xy(run.records, key, "train_loss")
            losses += ys
            if xs:
                has_train = True
                ax_loss.plot(xs, ys, ls="--", color=color, gid=f"{run.label}/train_loss")
    styles = [Line2D([], [], color="gray", marker=".", label="test loss")]
    if has_train:
        styles.append(Line2D([], [], color="gray", ls="--", label="train loss"))
    for col, name in enumerate(x):
        ax_acc, ax_loss = axes[0][col], axes[1][col]
        ax_acc.set_ylabel("test accuracy")
        scale = loss_axis_scale(losses, loss_scale)
        ax_loss.set_yscale(scale)
        ax_loss.set_ylabel("loss (log scale)" if scale == "log" else "loss")
        ax_loss.set_xlabel(X_AXES[name][1])
        if name == "round":
            for ax in (ax_acc, ax_loss):
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for ax in (ax_acc, ax_loss):
            ax.grid(alpha=0.3)
        ax_acc.legend(fontsize="small")
        ax_loss.legend(handles=styles, fontsize="small")
    return fig


def plot_runs(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    x: Sequence[str] = DEFAULT_X,
    loss_scale: str = "auto",
) -> Path:
    """Write the PNG of :func:`plot_figure` to ``out`` (atomically); return its path."""
    return save_png(plot_figure(dirs, x, loss_scale), out)


def save_png(fig: Figure, out: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG to ``out`` atomically (creating its folder), close it, and
    return the path."""
    import matplotlib.pyplot as plt

    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, buf.getvalue())
    return target
