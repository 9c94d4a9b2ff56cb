"""``roost plot`` for split learning: the first iteration's Gantt chart and the utilisation
panels, checked on hand-written records (two clients, two micro-batches) whose numbers
are worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_plot import RECORDS, VIRTUAL, make_run

from roost.cli import main
from roost.track.plot_split import (
    Interval,
    has_split_keys,
    parse_split_timeline,
    plot_split_runs,
    plot_split_timeline,
    split_figure,
    split_path,
    timeline_stats,
    utilisation,
)

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"

# The first iteration of two clients, N=2 micro-batches. The server computes client 0's
# and client 1's micro-batch 0 in [0.5, 1.0], their micro-batch 1 in [1.5, 2.0]: busy 1.0
# of a makespan of 3.0 (0.0 .. client 1's last backward end), idle 2/3.
TIMELINE: list[list[Any]] = [
    ["device_compute", 0, 0, 0.0, 0.25, "forward"],
    ["uplink", 0, 0, 0.25, 0.5],
    ["device_compute", 1, 0, 0.0, 0.5, "forward"],
    ["uplink", 1, 0, 0.5, 0.75],
    ["server_compute", 0, 0, 0.5, 0.75],
    ["server_compute", 1, 0, 0.75, 1.0],
    ["downlink", 0, 0, 0.75, 1.0],
    ["downlink", 1, 0, 1.0, 1.25],
    ["device_compute", 0, 1, 0.25, 0.5, "forward"],
    ["uplink", 0, 1, 0.5, 0.75],
    ["device_compute", 1, 1, 0.5, 1.0, "forward"],
    ["uplink", 1, 1, 1.0, 1.25],
    ["device_compute", 0, 0, 1.0, 1.25, "backward"],
    ["device_compute", 1, 0, 1.25, 1.5, "backward"],
    ["server_compute", 0, 1, 1.5, 1.75],
    ["server_compute", 1, 1, 1.75, 2.0],
    ["downlink", 0, 1, 2.0, 2.25],
    ["downlink", 1, 1, 2.0, 2.5],
    ["device_compute", 0, 1, 2.25, 2.5, "backward"],
    ["device_compute", 1, 1, 2.5, 3.0, "backward"],
    ["uplink", 0, -1, 2.5, 2.75],  # client 0's device part, whole, at its task's end
]

# busy seconds per round: (round_span_s, server, device compute, uplink, downlink)
BUSY = [
    (4.0, 1.0, 2.0, 0.5, 1.0),
    (2.0, 1.5, 1.0, 0.25, 0.5),
    (None, 1.0, 1.0, 1.0, 1.0),  # no span: no utilisation point
    (5.0, 5.0, 2.5, 1.0, 0.0),
]


def split_records(timeline: list[list[Any]] = TIMELINE) -> list[dict[str, Any]]:
    out = []
    for rec, (span, server, dev, up, down) in zip(RECORDS, BUSY, strict=True):
        out.append(
            {
                **rec,
                "round_span_s": span,
                "server_busy_s": server,
                "server_idle_s": None if span is None else span - server,
                "device_compute_busy_s": dev,
                "uplink_busy_s": up,
                "downlink_busy_s": down,
            }
        )
    out[0]["split_timeline"] = timeline
    return out


def with_virtual(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records as plot reads them back from make_run's run directory."""
    return [{**r, "virtual_time_s": v} for r, v in zip(records, VIRTUAL, strict=True)]


@pytest.fixture
def figure():
    made = []

    def build(runs, x=("round", "virtual")):
        fig = split_figure(runs, x)
        made.append(fig)
        fig.canvas.draw()
        return fig

    yield build
    for fig in made:
        plt.close(fig)


def axes_by_gid(fig) -> dict[str, Any]:
    return {ax.get_gid(): ax for ax in fig.axes}


def line(ax, gid):
    (found,) = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    return found


def test_makespan_and_server_idle_fraction_by_hand():
    stats = timeline_stats(parse_split_timeline({"round": 1, "split_timeline": TIMELINE}))
    assert (stats.start_s, stats.end_s, stats.makespan_s) == (0.0, 3.0, 3.0)
    assert stats.server_busy_s == pytest.approx(1.0)
    assert stats.server_idle_fraction == pytest.approx(2 / 3)
    assert stats.clients == (0, 1)


def test_stats_count_overlapping_server_intervals_once_and_start_at_the_first_interval():
    ivs = [
        Interval("downlink", 0, -1, 1.0, 2.0),
        Interval("server_compute", 0, 0, 2.0, 3.0),
        Interval("server_compute", 1, 0, 2.5, 3.5),  # overlaps: [2.0, 3.5] counts 1.5
        Interval("server_compute", 1, 1, 4.0, 4.5),
        Interval("device_compute", 0, 0, 4.5, 5.0, "backward"),
    ]
    stats = timeline_stats(ivs)
    assert stats.makespan_s == 4.0  # 1.0 .. 5.0
    assert stats.server_busy_s == pytest.approx(2.0)
    assert stats.server_idle_fraction == pytest.approx(0.5)


def test_utilisation_is_busy_over_round_span_where_the_span_is_known():
    util = utilisation(with_virtual(split_records()))
    assert util["server"] == ([1, 2, 4], [0.25, 0.75, 1.0])
    assert util["device_compute"] == ([1, 2, 4], [0.5, 0.5, 0.5])
    assert util["uplink"] == ([1, 2, 4], [0.125, 0.125, 0.2])
    assert util["downlink"] == ([1, 2, 4], [0.25, 0.25, 0.0])
    virtual = utilisation(with_virtual(split_records()), "virtual_time_s")
    assert virtual["server"] == ([VIRTUAL[0], VIRTUAL[1], VIRTUAL[3]], [0.25, 0.75, 1.0])


def test_the_figure_shows_the_timeline_and_utilisation(figure):
    fig = figure([("a", with_virtual(split_records()))])
    axes = axes_by_gid(fig)
    assert set(axes) == {"a/timeline", "a/utilisation/round", "a/utilisation/virtual"}
    gantt = axes["a/timeline"]
    assert gantt.get_title() == ("a: first iteration of round 1: makespan 3 s, server idle 66.7%")
    rows = [t.get_text() for t in gantt.get_yticklabels()]
    assert rows == [
        "server compute",
        *(f"client {c} {r}" for c in (0, 1) for r in ("compute", "uplink", "downlink")),
    ]
    bars = {p.get_gid(): p for p in gantt.patches}
    assert len(bars) == len(TIMELINE)
    # the server row is row 0, bars coloured by client
    s0, s1 = bars["server_compute/0/0/"], bars["server_compute/1/0/"]
    assert s0.get_y() == -0.4 and s1.get_y() == -0.4
    assert (s0.get_x(), s0.get_width()) == (0.5, 0.25)
    assert s0.get_facecolor() != s1.get_facecolor()
    assert s0.get_facecolor() == bars["server_compute/0/1/"].get_facecolor()
    # client 1's compute row is row 4; backward hatched, forward not; colour = micro-batch
    fwd, bwd = bars["device_compute/1/1/forward"], bars["device_compute/1/1/backward"]
    assert fwd.get_y() == bwd.get_y() == 4 - 0.4
    assert not fwd.get_hatch() and bwd.get_hatch() == "///"
    assert fwd.get_facecolor() == bwd.get_facecolor()
    assert fwd.get_facecolor() != bars["device_compute/1/0/forward"].get_facecolor()
    assert bars["uplink/0/-1/"].get_y() == 2 - 0.4  # client 0's uplink row
    labels = sorted(t.get_text() for t in gantt.texts)
    assert labels.count("B1") == 2 and labels.count("F0") == 2 and "model" in labels
    util = axes["a/utilisation/round"]
    assert list(line(util, "a/server").get_xdata()) == [1, 2, 4]
    assert list(line(util, "a/server").get_ydata()) == [0.25, 0.75, 1.0]
    assert list(line(util, "a/uplink").get_ydata()) == [0.125, 0.125, 0.2]
    assert util.get_xlabel() == "round"
    assert axes["a/utilisation/virtual"].get_xlabel() == "virtual time (s)"
    v_server = line(axes["a/utilisation/virtual"], "a/server")
    assert list(v_server.get_xdata()) == [VIRTUAL[0], VIRTUAL[1], VIRTUAL[3]]


def test_a_run_with_only_busy_keys_gets_only_utilisation(figure):
    records = split_records()
    del records[0]["split_timeline"]
    fig = figure([("b", records)], x=("round",))
    assert set(axes_by_gid(fig)) == {"b/utilisation/round"}


def test_runs_without_split_keys_are_left_out(figure):
    assert not has_split_keys(RECORDS)
    assert has_split_keys(split_records())
    fig = figure([("fl", RECORDS), ("sl", split_records())], x=("round",))
    assert set(axes_by_gid(fig)) == {"sl/timeline", "sl/utilisation/round"}
    with pytest.raises(ValueError, match="no split learning keys"):
        split_figure([("fl", RECORDS)])


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        (["uplink", 0, 0, 0.25], r"4 elements: expected \[resource, client"),
        (["gpu", 0, 0, 0.0, 1.0], r"unknown resource 'gpu': allowed: device_compute, uplink, "),
        (["device_compute", 0, 0, 0.0, 1.0], "needs a 6th element: forward, backward"),
        (["device_compute", 0, 0, 0.0, 1.0, "sideways"], "phase 'sideways': allowed: forward"),
        (["downlink", 0, 0, 0.0, 1.0, "forward"], "a downlink interval has 5 elements"),
        (["uplink", 0, -2, 0.0, 1.0], "micro_batch -2: expected an int >= 0, or -1"),
        (["uplink", "0", 0, 0.0, 1.0], "client '0': expected an int id"),
        (["uplink", 0, 0, 1.0, 0.5], "start_s <= end_s"),
        ("uplink", "not a list"),
    ],
)
def test_a_malformed_timeline_entry_names_the_round_and_what_is_allowed(entry, message):
    records = split_records([*TIMELINE[:3], entry])
    records[0]["round"] = 7
    with pytest.raises(ValueError, match=r"^round 7: split_timeline\[3\] = ") as e:
        split_figure([("a", records)])
    assert e.match(message)


def test_an_empty_timeline_is_refused():
    with pytest.raises(ValueError, match="round 1: split_timeline: expected a non-empty list"):
        split_figure([("a", split_records([]))])


def test_plot_split_timeline_writes_a_png(tmp_path):
    out = plot_split_timeline(split_records(), tmp_path / "sub" / "s.png", x=("round",))
    assert out == tmp_path / "sub" / "s.png"
    data = out.read_bytes()
    assert data[:8] == PNG and len(data) > 20_000


def test_split_path():
    assert split_path("runs/a/accuracy.png") == Path("runs/a/accuracy-split.png")
    assert split_path("cmp") == Path("cmp-split.png")


def test_cli_plot_writes_the_split_png_beside_the_usual_one(tmp_path, capsys):
    run = make_run(tmp_path / "sl", split_records())
    assert main(["plot", str(run)]) == 0
    split = run / "accuracy-split.png"
    assert capsys.readouterr().out == f"{run / 'accuracy.png'}\n{split}\n"
    data = split.read_bytes()
    assert data[:8] == PNG and len(data) > 20_000
    assert (run / "accuracy.png").read_bytes()[:8] == PNG


def test_cli_plot_of_several_runs_with_out(tmp_path, capsys):
    fl = make_run(tmp_path / "fl")
    sl = make_run(tmp_path / "sl", split_records())
    out = tmp_path / "o" / "cmp.png"
    assert main(["plot", str(fl), str(sl), "--x", "wall", "--out", str(out)]) == 0
    assert capsys.readouterr().out == f"{out}\n{tmp_path / 'o' / 'cmp-split.png'}\n"
    assert (tmp_path / "o" / "cmp-split.png").read_bytes()[:8] == PNG


def test_cli_plot_of_runs_without_split_keys_writes_no_split_png(tmp_path, capsys):
    run = make_run(tmp_path / "fl")
    assert main(["plot", str(run)]) == 0
    assert capsys.readouterr().out == f"{run / 'accuracy.png'}\n"
    assert sorted(p.name for p in run.iterdir()) == ["accuracy.png", "config.json", "metrics.jsonl"]
    assert plot_split_runs([run], tmp_path / "x.png") is None
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_with_a_malformed_timeline_is_one_line(tmp_path, capsys):
    run = make_run(tmp_path / "bad", split_records([["cpu", 0, 0, 0.0, 1.0]]))
    assert main(["plot", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("roost: error: round 1: split_timeline[0] = ['cpu', 0, 0, 0.0, 1.0]")
    assert "allowed: device_compute, uplink, server_compute, downlink" in err
    assert err.count("\n") == 1
    assert not (run / "accuracy-split.png").exists()


def test_records_round_trip_through_metrics_jsonl(tmp_path):
    """What the engine appends (json.dumps of the record) is what the plot reads."""
    run = make_run(tmp_path / "sl", split_records())
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["split_timeline"] == TIMELINE
    assert plot_split_runs([run], tmp_path / "p.png") == tmp_path / "p.png"


def test_a_busy_key_that_is_not_seconds_is_refused():
    records = split_records()
    records[1]["uplink_busy_s"] = "fast"
    with pytest.raises(ValueError, match="round 2: uplink_busy_s = 'fast': expected seconds"):
        split_figure([("a", records)])
