"""``roost plot`` for split learning: where the first iteration's time went, and how busy
the server, the devices and the links were round by round.

The engine writes these keys into the ``metrics.jsonl`` records of split learning runs:

* every split round: ``server_busy_s`` and ``server_idle_s`` (seconds the one shared
  server computed / did not compute in the round's span), ``device_compute_busy_s``,
  ``uplink_busy_s`` and ``downlink_busy_s`` (the mean over the round's devices of the
  seconds each device's compute / uplink / downlink was busy) and ``round_span_s`` (the
  round's virtual duration, from dispatch to its end);
* the first split round only: ``split_timeline``, the intervals of the first iteration (one
  forward and backward pass over a minibatch, in N micro-batches) of every device of that
  round, each ``[resource, client, micro_batch, start_s, end_s]``: ``resource`` one of
  :data:`RESOURCES`, ``micro_batch`` the 0-based index within the iteration (-1: a
  whole-model transfer of the device's part of the model at a task's start or end),
  ``start_s``/``end_s`` virtual seconds from the round's start. A ``device_compute``
  interval has a 6th element, ``"forward"`` or ``"backward"`` (a ``server_compute`` one may
  have it too).

The figure (one PNG, ``<out stem>-split.png`` beside ``roost plot``'s usual PNG, see
:func:`split_path`) has, per split learning run, top to bottom:

1. the Gantt chart of ``split_timeline`` (the first record holding one): one row for the
   shared server (``server compute``, bars coloured by client) and, per client, a row each
   for its compute, uplink and downlink (bars coloured by micro-batch, whole-model
   transfers grey); backward passes are hatched, and each bar wide enough for it is
   labelled ``F<k>``/``B<k>`` (forward/backward of micro-batch k), ``m<k>`` or ``model``.
   The x axis is virtual seconds from the round's start; the title gives the iteration's
   makespan (last end minus first start over all intervals) and the fraction of it the
   server was idle (see :func:`timeline_stats`). Device rows are drawn for the first
   :data:`MAX_CLIENT_ROWS` clients only (the title says so); the server row has them all;
2. utilisation, one panel per x axis of ``roost plot --x`` (default round and virtual
   time): busy seconds / ``round_span_s`` of the server, the (mean) device compute, uplink
   and downlink, one point per round, at its ``round`` or at ``virtual_time_s`` /
   ``wall_time_s`` (the time the round ended). A record without a key (or with a null
   one, or a ``round_span_s`` that is not positive) has no point.

A run holding only one of the two kinds of keys gets only its panel; runs holding neither
are not drawn, and when no run holds any, no ``-split.png`` is written.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from roost.track.plot import DEFAULT_X, X_AXES, save_png
from roost.track.rundir import RunDir, RunDirError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "MAX_CLIENT_ROWS",
    "PHASES",
    "RESOURCES",
    "UTILISATION",
    "Interval",
    "TimelineStats",
    "has_split_keys",
    "parse_split_timeline",
    "plot_split_runs",
    "plot_split_timeline",
    "split_figure",
    "split_path",
    "timeline_stats",
    "utilisation",
]

RESOURCES = ("device_compute", "uplink", "server_compute", "downlink")
PHASES = ("forward", "backward")
# utilisation line name -> (busy-seconds key, legend label)
UTILISATION: dict[str, tuple[str, str]] = {
    "server": ("server_busy_s", "server"),
    "device_compute": ("device_compute_busy_s", "device compute (mean)"),
    "uplink": ("uplink_busy_s", "uplink (mean)"),
    "downlink": ("downlink_busy_s", "downlink (mean)"),
}
SPAN_KEY = "round_span_s"
TIMELINE_KEY = "split_timeline"
# the keys that make a run a split learning one for the plot (server_idle_s is not drawn)
SPLIT_KEYS = (TIMELINE_KEY, *(key for key, _ in UTILISATION.values()))
MAX_CLIENT_ROWS = 16
LABEL_MIN_WIDTH = 0.03  # a bar narrower than this fraction of the makespan is not labelled
_DEVICE_ROWS = (("device_compute", "compute"), ("uplink", "uplink"), ("downlink", "downlink"))
_ENTRY = "[resource, client, micro_batch, start_s, end_s]"


@dataclass(frozen=True)
class Interval:
    """One entry of ``split_timeline``."""

    resource: str
    client: int
    micro_batch: int
    start_s: float
    end_s: float
    phase: str | None = None


@dataclass(frozen=True)
class TimelineStats:
    """What the Gantt chart's title says about the first iteration."""

    start_s: float  # the first interval's start
    end_s: float  # the last interval's end
    makespan_s: float  # end_s - start_s
    server_busy_s: float  # the union of the server_compute intervals, within the makespan
    server_idle_fraction: float  # 1 - server_busy_s / makespan_s (0 for a zero makespan)
    clients: tuple[int, ...]


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_seconds(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def parse_split_timeline(record: Mapping[str, Any]) -> list[Interval]:
    """The intervals of ``record["split_timeline"]``; a malformed entry is a ValueError
    naming the record's round, the entry and what is allowed."""
    where = f"round {record.get('round', '?')}: {TIMELINE_KEY}"
    timeline = record.get(TIMELINE_KEY)
    if not isinstance(timeline, list | tuple) or not timeline:
        raise ValueError(f"{where}: expected a non-empty list of {_ENTRY} entries")
    out = []
    for i, entry in enumerate(timeline):
        at = f"{where}[{i}] = {entry!r}"
        if not isinstance(entry, list | tuple) or len(entry) not in (5, 6):
            n = f"{len(entry)} elements" if isinstance(entry, list | tuple) else "not a list"
            raise ValueError(
                f"{at}: {n}: expected {_ENTRY}, device_compute (optionally server_compute) "
                f"with a 6th element, one of {', '.join(PHASES)}"
            )
        resource, client, micro_batch, start, end = entry[:5]
        if resource not in RESOURCES:
            raise ValueError(
                f"{at}: unknown resource {resource!r}: allowed: {', '.join(RESOURCES)}"
            )
        if resource == "device_compute" and len(entry) != 6:
            raise ValueError(
                f"{at}: a device_compute interval needs a 6th element: {', '.join(PHASES)}"
            )
        if resource in ("uplink", "downlink") and len(entry) != 5:
            raise ValueError(f"{at}: a {resource} interval has 5 elements: {_ENTRY}")
        phase = entry[5] if len(entry) == 6 else None
        if len(entry) == 6 and phase not in PHASES:
            raise ValueError(f"{at}: phase {phase!r}: allowed: {', '.join(PHASES)}")
        if not _is_int(client) or client < 0:
            raise ValueError(f"{at}: client {client!r}: expected an int id >= 0")
        if not _is_int(micro_batch) or micro_batch < -1:
            raise ValueError(
                f"{at}: micro_batch {micro_batch!r}: expected an int >= 0, or -1 for a "
                "whole-model transfer"
            )
        if not (_is_seconds(start) and _is_seconds(end)) or end < start:
            raise ValueError(f"{at}: start_s, end_s: expected finite seconds, start_s <= end_s")
        out.append(Interval(resource, client, micro_batch, float(start), float(end), phase))
    return out


def _union_length(spans: Sequence[tuple[float, float]]) -> float:
    total, cur_lo, cur_hi = 0.0, None, None
    for lo, hi in sorted(spans):
        if cur_hi is None or lo > cur_hi:
            if cur_hi is not None and cur_lo is not None:
                total += cur_hi - cur_lo
            cur_lo, cur_hi = lo, hi
        else:
            cur_hi = max(cur_hi, hi)
    if cur_hi is not None and cur_lo is not None:
        total += cur_hi - cur_lo
    return total


def timeline_stats(intervals: Sequence[Interval]) -> TimelineStats:
    """Makespan (last end - first start, over all intervals) and the server's idle
    fraction within it (overlapping server intervals count once)."""
    if not intervals:
        raise ValueError(f"{TIMELINE_KEY}: no intervals")
    start = min(iv.start_s for iv in intervals)
    end = max(iv.end_s for iv in intervals)
    makespan = end - start
    busy = _union_length(
        [(iv.start_s, iv.end_s) for iv in intervals if iv.resource == "server_compute"]
    )
    idle = 1.0 - busy / makespan if makespan > 0 else 0.0
    clients = tuple(sorted({iv.client for iv in intervals}))
    return TimelineStats(start, end, makespan, busy, idle, clients)


def _has(record: Mapping[str, Any], key: str) -> bool:
    return record.get(key) is not None


def has_split_keys(records: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any record holds ``split_timeline`` or a busy key of :data:`UTILISATION`
    (non-null)."""
    return any(_has(r, k) for r in records for k in SPLIT_KEYS)


def utilisation(
    records: Sequence[Mapping[str, Any]], x_key: str = "round"
) -> dict[str, tuple[list[float], list[float]]]:
    """``{name: (xs, busy / round_span_s)}`` for each name of :data:`UTILISATION`, over the
    records where ``x_key``, the busy key and a positive ``round_span_s`` are all set."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for name, (key, _) in UTILISATION.items():
        xs: list[float] = []
        ys: list[float] = []
        for r in records:
            if not (_has(r, x_key) and _has(r, key) and _has(r, SPAN_KEY)):
                continue
            for k in (key, SPAN_KEY):
                if not _is_seconds(r[k]):
                    raise ValueError(
                        f"round {r.get('round', '?')}: {k} = {r[k]!r}: expected seconds"
                    )
            if r[SPAN_KEY] > 0:
                xs.append(r[x_key])
                ys.append(r[key] / r[SPAN_KEY])
        out[name] = (xs, ys)
    return out


def split_path(out: str | os.PathLike[str]) -> Path:
    """``runs/a/accuracy.png`` -> ``runs/a/accuracy-split.png`` (always ``.png``)."""
    p = Path(out)
    return p.with_name(f"{p.stem}-split.png")


def _first_timeline(records: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    return next((r for r in records if _has(r, TIMELINE_KEY)), None)


def _has_utilisation(records: Sequence[Mapping[str, Any]]) -> bool:
    return any(_has(r, key) for r in records for key, _ in UTILISATION.values())


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError:
        raise RunDirError("roost plot needs matplotlib: pip install 'roost[plot]'") from None
    return plt


def _bar_label(iv: Interval) -> str:
    if iv.micro_batch < 0:
        return "model"
    prefix = {"forward": "F", "backward": "B"}.get(iv.phase or "", "m")
    return f"{prefix}{iv.micro_batch}"


def _draw_timeline(
    ax: Axes, round_: Any, intervals: Sequence[Interval], label: str
) -> TimelineStats:
    import matplotlib
    from matplotlib.patches import Patch, Rectangle

    stats = timeline_stats(intervals)
    shown = stats.clients[:MAX_CLIENT_ROWS]
    rows = ["server compute"]
    row_of: dict[tuple[str, int], int] = {}
    for c in shown:
        for resource, name in _DEVICE_ROWS:
            row_of[(resource, c)] = len(rows)
            rows.append(f"client {c} {name}")
    n_mb = max((iv.micro_batch + 1 for iv in intervals), default=0)
    if n_mb <= 8:
        palette = [matplotlib.colormaps["Set2"](k) for k in range(max(n_mb, 1))]
    else:
        cmap = matplotlib.colormaps["viridis"]
        palette = [cmap(k / (n_mb - 1)) for k in range(n_mb)]
    model_colour = "#c8c8c8"
    min_width = LABEL_MIN_WIDTH * stats.makespan_s
    for iv in intervals:
        if iv.resource == "server_compute":
            y = 0
            colour: Any = f"C{iv.client % 10}"
        elif (iv.resource, iv.client) in row_of:
            y = row_of[(iv.resource, iv.client)]
            colour = model_colour if iv.micro_batch < 0 else palette[iv.micro_batch]
        else:
            continue  # a client beyond MAX_CLIENT_ROWS
        width = iv.end_s - iv.start_s
        ax.add_patch(
            Rectangle(
                (iv.start_s, y - 0.4),
                width,
                0.8,
                facecolor=colour,
                edgecolor="black",
                linewidth=0.4 if width >= min_width else 0.0,  # edges would hide thin bars
                hatch="///" if iv.phase == "backward" else None,
                gid=f"{iv.resource}/{iv.client}/{iv.micro_batch}/{iv.phase or ''}",
            )
        )
        if width > 0 and width >= min_width:
            ax.text(
                iv.start_s + width / 2,
                y,
                _bar_label(iv),
                ha="center",
                va="center",
                fontsize=7,
                clip_on=True,
                # legible over the hatching of a backward pass
                bbox={"facecolor": "white", "alpha": 0.8, "lw": 0, "pad": 1}
                if iv.phase == "backward"
                else None,
            )
    for k in range(len(shown)):
        ax.axhline(0.5 + 3 * k, color="gray", lw=0.5, alpha=0.6)
    ax.set_yticks(range(len(rows)), rows, fontsize="small")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    pad = 0.02 * stats.makespan_s or 0.5
    ax.set_xlim(min(0.0, stats.start_s), stats.end_s + pad)
    ax.set_xlabel("virtual time from the round's start (s)")
    ax.grid(axis="x", alpha=0.3)
    title = (
        f"{label + ': ' if label else ''}first iteration of round {round_}: "
        f"makespan {stats.makespan_s:.4g} s, server idle {stats.server_idle_fraction:.1%}"
    )
    if len(shown) < len(stats.clients):
        title += f"\n(device rows of the first {len(shown)} of {len(stats.clients)} clients)"
    ax.set_title(title, fontsize="medium")
    handles = [
        Patch(facecolor=palette[k], edgecolor="black", label=f"micro-batch {k}")
        for k in range(min(n_mb, 8))
    ]
    if n_mb > 8:
        handles.append(
            Patch(facecolor=palette[-1], edgecolor="black", label=f"… micro-batch {n_mb - 1}")
        )
    if any(iv.micro_batch < 0 for iv in intervals):
        handles.append(Patch(facecolor=model_colour, edgecolor="black", label="whole model"))
    handles += [
        Patch(facecolor="white", edgecolor="black", label="forward"),
        Patch(facecolor="white", edgecolor="black", hatch="///", label="backward"),
    ]
    handles += [
        Patch(facecolor=f"C{c % 10}", edgecolor="black", label=f"server: client {c}")
        for c in stats.clients[:10]
    ]
    if len(stats.clients) > 10:
        handles.append(Patch(fill=False, lw=0, label="(client colours repeat every 10)"))
    ax.legend(handles=handles, fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_gid(f"{label}/timeline")
    return stats


def _draw_utilisation(
    ax: Axes, records: Sequence[Mapping[str, Any]], x: str, label: str, legend: bool
) -> None:
    from matplotlib.ticker import MaxNLocator

    key, axis_label = X_AXES[x]
    top = 1.0
    points = utilisation(records, key)
    for i, (name, (xs, ys)) in enumerate(points.items()):
        ax.plot(
            xs,
            ys,
            marker=".",
            color=f"C{i}",
            label=UTILISATION[name][1],
            gid=f"{label}/{name}",
        )
        top = max([top, *ys])
    ax.set_ylim(0.0, 1.05 * top)
    ax.set_xlabel(axis_label)
    ax.set_ylabel("busy / round span")
    all_x = [v for px, _ in points.values() for v in px]
    if not all_x:
        ax.text(
            0.5,
            0.5,
            f"no round has {key}, a busy key and round_span_s",
            ha="center",
            transform=ax.transAxes,
        )
    if x == "round":
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if all_x and max(all_x) - min(all_x) < 2:  # else one or two rounds get 0.5 ticks
            ax.set_xlim(min(all_x) - 1, max(all_x) + 1)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"{label + ': ' if label else ''}utilisation", fontsize="medium")
    ax.set_gid(f"{label}/utilisation/{x}")


def split_figure(
    runs: Sequence[tuple[str, Sequence[Mapping[str, Any]]]],
    x: Sequence[str] = DEFAULT_X,
) -> Figure:
    """The figure of ``(label, records)`` runs (see the module docstring), not saved yet
    (close it with ``plt.close``). A run without split keys is left out; if none has any,
    ValueError.

    Axes gids: ``"LABEL/timeline"`` and ``"LABEL/utilisation/X"`` (X from ``x``); the
    utilisation lines' gids are ``"LABEL/NAME"`` (NAME a key of :data:`UTILISATION`), the
    timeline bars' ``"RESOURCE/CLIENT/MICRO_BATCH/PHASE"`` (PHASE empty when absent).
    """
    if not x or not all(name in X_AXES for name in x):
        raise ValueError(f"x axes {list(x)}: allowed: {', '.join(X_AXES)}")
    # (label, records, (round, intervals) or None, has utilisation) of the runs to draw;
    # a malformed timeline is refused here, before anything is drawn
    parts = []
    for label, records in runs:
        first = _first_timeline(records)
        timeline = None if first is None else (first.get("round", "?"), parse_split_timeline(first))
        if timeline is not None or _has_utilisation(records):
            parts.append((label, records, timeline, _has_utilisation(records)))
    if not parts:
        raise ValueError(f"no split learning keys ({', '.join(SPLIT_KEYS)}) in the records to plot")
    plt = _pyplot()
    heights: list[float] = []
    for _, _, timeline, has_util in parts:
        if timeline is not None:
            n_clients = len({iv.client for iv in timeline[1]})
            heights.append(1.6 + 0.28 * (1 + 3 * min(n_clients, MAX_CLIENT_ROWS)))
        if has_util:
            heights.append(3.2)
    fig = plt.figure(figsize=(max(11.0, 5.5 * len(x)), sum(heights)), constrained_layout=True)
    grid = fig.add_gridspec(len(heights), len(x), height_ratios=heights)
    row = 0
    try:
        for label, records, timeline, has_util in parts:
            if timeline is not None:
                _draw_timeline(fig.add_subplot(grid[row, :]), *timeline, label)
                row += 1
            if has_util:  # a busy key that is not a number is a ValueError here
                for col, name in enumerate(x):
                    ax = fig.add_subplot(grid[row, col])
                    _draw_utilisation(ax, records, name, label, legend=col == len(x) - 1)
                row += 1
    except BaseException:
        plt.close(fig)
        raise
    return fig


def plot_split_timeline(
    records: Sequence[Mapping[str, Any]],
    out_path: str | os.PathLike[str],
    x: Sequence[str] = DEFAULT_X,
    label: str = "",
) -> Path:
    """Write the split learning figure of one run's records (the Gantt chart of its first
    iteration above its utilisation panels) as a PNG to ``out_path``; return its path.
    Records without split keys are a ValueError."""
    return save_png(split_figure([(label, records)], x), out_path)


def plot_split_runs(
    dirs: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    x: Sequence[str] = DEFAULT_X,
) -> Path | None:
    """The split learning figure of the run directories whose ``metrics.jsonl`` holds
    split keys, written to ``out`` (what ``roost plot`` does beside its usual PNG, at
    :func:`split_path`); ``None``, writing nothing, when none of them holds any."""
    runs = []
    for d in dirs:
        rundir = RunDir(d)
        rundir.read_config()  # fails clearly if d is not a run directory
        records = rundir.read_metrics()
        if has_split_keys(records):
            runs.append((Path(d).name or str(d), records))
    if not runs:
        return None
    return save_png(split_figure(runs, x), out)
