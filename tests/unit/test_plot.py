"""``roost plot``: what the figure shows (integer round ticks, the loss panel's data, the
chosen x axes), checked on hand-written run directories with known numbers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from roost.cli import main
from roost.track.plot import parse_x_axes, plot_figure, plot_runs

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import AutoLocator  # noqa: E402

# A 4-round run evaluated on rounds 2 and 4 (eval_every=2).
RECORDS = [
    {"round": 1, "accuracy": None, "loss": None, "train_loss": 2.0},
    {"round": 2, "accuracy": 0.4, "loss": 1.8, "train_loss": 1.6},
    {"round": 3, "accuracy": None, "loss": None, "train_loss": 1.3},
    {"round": 4, "accuracy": 0.7, "loss": 1.1, "train_loss": 1.0},
]
VIRTUAL = [0.5, 1.25, 2.0, 3.5]
WALL = [0.11, 0.23, 0.31, 0.47]


def make_run(path: Path, records: list[dict[str, Any]] = RECORDS) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"rounds": len(records)}))
    lines = [
        json.dumps({**rec, "virtual_time_s": v, "wall_time_s": w})
        for rec, v, w in zip(records, VIRTUAL, WALL, strict=True)
    ]
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def figure(request):
    """``figure(dirs, x)``: the figure, closed after the test."""
    made = []

    def build(dirs, x=("round", "virtual")):
        fig = plot_figure(dirs, x)
        made.append(fig)
        fig.canvas.draw()  # tick labels are set at draw time
        return fig

    yield build
    for fig in made:
        plt.close(fig)


def line(ax, gid):
    (found,) = [ln for ln in ax.get_lines() if ln.get_gid() == gid]
    return found


def test_layout_is_accuracy_on_top_and_loss_below_with_shared_x_axes(tmp_path, figure):
    fig = figure([make_run(tmp_path / "a")])
    acc_round, acc_virtual, loss_round, loss_virtual = fig.axes
    assert [ax.get_ylabel() for ax in fig.axes] == ["test accuracy"] * 2 + ["loss"] * 2
    assert [loss_round.get_xlabel(), loss_virtual.get_xlabel()] == ["round", "virtual time (s)"]
    assert acc_round.get_shared_x_axes().joined(acc_round, loss_round)
    assert acc_virtual.get_shared_x_axes().joined(acc_virtual, loss_virtual)


def test_round_axes_have_integer_ticks_for_a_4_round_run(tmp_path, figure):
    fig = figure([make_run(tmp_path / "a")])
    acc_round, _, loss_round, _ = fig.axes
    lo, hi = loss_round.get_xlim()
    for ax in (acc_round, loss_round):
        ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    shown = [t.get_text() for t in loss_round.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert shown == ["1", "2", "3", "4"]
    # Control: matplotlib's default locator would put half rounds on this axis.
    loss_round.xaxis.set_major_locator(AutoLocator())
    assert any(not float(t).is_integer() for t in loss_round.get_xticks() if lo <= t <= hi)


def test_panels_plot_the_numbers_of_metrics_jsonl(tmp_path, figure):
    fig = figure([make_run(tmp_path / "a")])
    acc_round, acc_virtual, loss_round, loss_virtual = fig.axes
    acc = line(acc_round, "a/accuracy")
    assert list(acc.get_xdata()) == [2, 4] and list(acc.get_ydata()) == [0.4, 0.7]
    test_loss = line(loss_round, "a/loss")
    assert list(test_loss.get_xdata()) == [2, 4]
    assert list(test_loss.get_ydata()) == [1.8, 1.1]
    assert test_loss.get_linestyle() == "-"
    train = line(loss_round, "a/train_loss")
    assert list(train.get_xdata()) == [1, 2, 3, 4]
    assert list(train.get_ydata()) == [2.0, 1.6, 1.3, 1.0]
    assert train.get_linestyle() == "--"
    assert train.get_color() == test_loss.get_color() == acc.get_color()
    assert list(line(loss_virtual, "a/loss").get_xdata()) == [1.25, 3.5]
    assert list(line(acc_virtual, "a/accuracy").get_xdata()) == [1.25, 3.5]
    assert [t.get_text() for t in loss_round.get_legend().get_texts()] == [
        "test loss",
        "train loss",
    ]


def test_x_wall_puts_wall_time_on_the_x_axis(tmp_path, figure):
    fig = figure([make_run(tmp_path / "a")], x=("wall",))
    acc_wall, loss_wall = fig.axes
    assert loss_wall.get_xlabel() == "wall time (s)"
    assert list(line(loss_wall, "a/train_loss").get_xdata()) == WALL
    assert list(line(loss_wall, "a/loss").get_xdata()) == [0.23, 0.47]
    assert list(line(acc_wall, "a/accuracy").get_xdata()) == [0.23, 0.47]


def test_three_x_axes_give_three_columns_one_colour_per_run(tmp_path, figure):
    a, b = make_run(tmp_path / "a"), make_run(tmp_path / "b")
    fig = figure([a, b], x=("round", "virtual", "wall"))
    assert len(fig.axes) == 6
    assert [ax.get_xlabel() for ax in fig.axes[3:]] == [
        "round",
        "virtual time (s)",
        "wall time (s)",
    ]
    top = fig.axes[0]
    assert line(top, "a/accuracy").get_color() != line(top, "b/accuracy").get_color()
    assert [t.get_text() for t in top.get_legend().get_texts()] == ["a", "b"]


def test_a_run_evaluated_only_at_the_end_still_shows_train_loss(tmp_path, figure):
    records = [{**r, "accuracy": None, "loss": None} for r in RECORDS[:3]] + [RECORDS[3]]
    fig = figure([make_run(tmp_path / "e0", records)])
    loss_round = fig.axes[2]
    assert list(line(loss_round, "e0/train_loss").get_ydata()) == [2.0, 1.6, 1.3, 1.0]
    assert list(line(loss_round, "e0/loss").get_ydata()) == [1.1]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("round,virtual", ("round", "virtual")),
        ("wall", ("wall",)),
        ("round, wall,round", ("round", "wall")),
    ],
)
def test_parse_x_axes(spec, expected):
    assert parse_x_axes(spec) == expected


@pytest.mark.parametrize("spec", ["time", "round,", "", "round,Wall"])
def test_parse_x_axes_refuses_unknown_names(spec):
    with pytest.raises(ValueError, match=r": allowed: round, virtual, wall \(comma-separated\)$"):
        parse_x_axes(spec)


def test_plot_runs_writes_a_png(tmp_path):
    out = plot_runs([make_run(tmp_path / "a")], tmp_path / "sub" / "p.png", x=("wall",))
    assert out == tmp_path / "sub" / "p.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_with_x_wall(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    assert main(["plot", str(run), "--x", "round,wall"]) == 0
    assert capsys.readouterr().out == f"{run / 'accuracy.png'}\n"
    assert (run / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_plot_with_a_bad_x_is_one_line_naming_the_allowed_axes(tmp_path, capsys):
    run = make_run(tmp_path / "a")
    assert main(["plot", str(run), "--x", "round,time"]) == 2
    err = capsys.readouterr().err
    assert err == "roost: error: --x round,time: allowed: round, virtual, wall (comma-separated)\n"
    assert not (run / "accuracy.png").exists()


def test_a_run_with_no_losses_or_accuracy_fails_clearly(tmp_path, capsys):
    run = make_run(tmp_path / "a", [{"round": r} for r in range(1, 5)])
    assert main(["plot", str(run)]) == 2
    assert "no rounds with accuracy or loss in metrics.jsonl to plot" in capsys.readouterr().err


DIVERGED = [
    {"round": 1, "accuracy": 0.3, "loss": 2.0, "train_loss": 2.2},
    {"round": 2, "accuracy": 0.5, "loss": 0.9, "train_loss": 1.0},
    {"round": 3, "accuracy": 0.1, "loss": 4.0e5, "train_loss": 0.5},
    {"round": 4, "accuracy": 0.1, "loss": 1.0e6, "train_loss": 3.0e6},
]


def test_a_diverged_run_gets_a_log_loss_axis(tmp_path, figure):
    """The losses span 0.5 .. 3e6 (6e6 > 100x): auto picks log; the run of RECORDS
    (1.0 .. 2.0, 2x) stays linear; --loss-scale forces either."""
    bad = make_run(tmp_path / "bad", DIVERGED)
    good = make_run(tmp_path / "good")
    fig = figure([good, bad])
    assert [ax.get_yscale() for ax in fig.axes[2:]] == ["log", "log"]
    assert fig.axes[2].get_ylabel() == "loss (log scale)"
    assert [ax.get_yscale() for ax in figure([good]).axes[2:]] == ["linear", "linear"]
    linear = plot_figure([good, bad], ("round",), loss_scale="linear")
    log = plot_figure([good], ("round",), loss_scale="log")
    try:
        assert linear.axes[1].get_yscale() == "linear" and log.axes[1].get_yscale() == "log"
    finally:
        plt.close(linear)
        plt.close(log)


def test_loss_axis_scale_rule_and_its_errors():
    from roost.track.plot import loss_axis_scale

    assert loss_axis_scale([1.0, 100.0]) == "linear"  # exactly 100x: not more
    assert loss_axis_scale([1.0, 100.5]) == "log"
    assert loss_axis_scale([0.0, 1e9]) == "linear"  # a zero loss cannot go on a log axis
    assert loss_axis_scale([0.5, float("nan"), float("inf"), 2.0]) == "linear"
    assert loss_axis_scale([]) == "linear"
    with pytest.raises(ValueError, match="loss scale 'sqrt': allowed: auto, linear, log"):
        loss_axis_scale([1.0], "sqrt")


def test_cli_plot_loss_scale(tmp_path, capsys):
    run = make_run(tmp_path / "r", DIVERGED)
    assert main(["plot", str(run), "--loss-scale", "linear", "--out", str(tmp_path / "a.png")]) == 0
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as e:
        main(["plot", str(run), "--loss-scale", "sqrt"])
    assert e.value.code == 2
    assert "invalid choice: 'sqrt'" in capsys.readouterr().err
