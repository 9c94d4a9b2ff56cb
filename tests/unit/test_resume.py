"""Checkpoints and --resume: a killed run continues to exactly the uninterrupted result."""

import json
import signal
from pathlib import Path

import pytest
import torch

from roost.cli import main
from roost.config import apply_overrides, load_config_source, resolve
from roost.registry import ConfigError
from roost.runner import resume, run

# Small enough to be quick, stateful enough to matter: FedAdam keeps server moments that a
# resume must restore, and Dirichlet clients on heterogeneous devices give distinct rounds.
# A checkpoint after every step (checkpoint_every_s=0), so that a crash after step k leaves
# step k's checkpoint, with what was in flight then.
OVERRIDES = [
    "rounds=4",
    "clients=20",
    "clients_per_round=5",
    "algorithm=fedadam",
    "checkpoint_every_s=0",
]


def _final_params(out: Path) -> torch.Tensor:
    return torch.load(out / "checkpoint.pt", weights_only=True)["strategy"]["params"]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


class Crash(Exception):
    pass


def test_resume_after_an_in_process_crash_matches_the_uninterrupted_run(tmp_path):
    cfg = resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES))
    run(cfg, tmp_path / "full")

    def crash_after_round_2(record):
        if record["round"] == 2:
            raise Crash
        return False, {}

    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[crash_after_round_2])
    # The crash hit before round 2's checkpoint: the directory holds round 1 only.
    assert [r["round"] for r in _records(tmp_path / "cut")] == [1]
    resume(tmp_path / "cut")
    assert torch.equal(_final_params(tmp_path / "cut"), _final_params(tmp_path / "full"))
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["round"] for r in cut] == [1, 2, 3, 4]
    for key in ("accuracy", "loss", "virtual_time_s", "train_loss"):
        assert [r[key] for r in cut] == [r[key] for r in full], key


def test_resume_after_sigkill_of_a_real_run(tmp_path, start_run_until_round, resume_run):
    """Kill a real `roost run` process mid-run with SIGKILL, then `roost run --resume`."""
    overrides = [
        "rounds=8",
        "clients=30",
        "clients_per_round=10",
        "model=cnn",
        "algorithm=fedadam",
        "algorithm.local_epochs=3",
        "algorithm.lr=0.05",  # the preset's lr 0.2 is tuned for its MLP, not for the CNN
    ]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    run(cfg, tmp_path / "full")

    cut = tmp_path / "cut"
    proc = start_run_until_round(overrides, cut)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = len(_records(cut))
    assert 2 <= done < 8

    resumed = resume_run(cut)
    assert resumed.returncode == 0, resumed.stderr
    assert torch.equal(_final_params(cut), _final_params(tmp_path / "full"))
    assert [r["round"] for r in _records(cut)] == list(range(1, 9))
    assert [r["accuracy"] for r in _records(cut)] == [
        r["accuracy"] for r in _records(tmp_path / "full")
    ]


@pytest.mark.parametrize(("every", "kept"), [("0", 3), ("1e9", 1)])
def test_checkpoints_every_so_many_seconds_resume_to_the_same_run(tmp_path, every, kept):
    """checkpoint_every_s=0: a checkpoint after every step, so a crash in step 4's
    callbacks leaves step 3's; 1e9 s: only the first step's (and the last's, for a run
    that ends). The metrics lines of the steps after the checkpoint are on disk at the
    crash, and a resume recomputes them to the same numbers."""
    cfg = resolve(
        apply_overrides(
            load_config_source("quickstart"),
            [*OVERRIDES, "rounds=6", f"checkpoint_every_s={every}"],
        )
    )
    run(cfg, tmp_path / "full")
    full_checkpoint = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)
    assert full_checkpoint["round"] == 6  # the last step is always checkpointed

    def crash_in_round_4(record):
        if record["round"] == 4:
            raise Crash
        return False, {}

    # the caller's callbacks run before the checkpointer: step 4 leaves no trace
    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[crash_in_round_4])
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == kept
    assert [r["round"] for r in _records(tmp_path / "cut")] == [1, 2, 3]
    resume(tmp_path / "cut")
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")
    assert [r["round"] for r in cut] == [1, 2, 3, 4, 5, 6]
    assert torch.equal(_final_params(tmp_path / "cut"), _final_params(tmp_path / "full"))
    for key in ("accuracy", "loss", "virtual_time_s", "train_loss"):
        assert [r[key] for r in cut] == [r[key] for r in full], key


def test_resume_of_a_missing_directory_fails_clearly(tmp_path):
    from roost.track.rundir import RunDirError

    with pytest.raises(RunDirError, match=r"config\.json is missing"):
        resume(tmp_path / "nothing")


def _crash_after_round_2(record):
    if record["round"] == 2:
        raise Crash
    return False, {}


def test_resume_may_move_the_run_to_worker_processes(tmp_path):
    """A run started on the local runtime continues on 2 workers (``--resume DIR
    runtime=workers workers=2``): SCAFFOLD's client controls (memory store) and server
    state come from the checkpoint, so the final model is the uninterrupted local run's up
    to float summation order (tolerance of tests/parity/test_workers_parity.py)."""
    overrides = [*OVERRIDES[:3], "algorithm=scaffold"]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    run(cfg, tmp_path / "full")
    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[_crash_after_round_2])

    resume(tmp_path / "cut", overrides=["runtime=workers", "workers=2"])
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["strategy"]
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["strategy"]
    for key in ("params", "control"):
        torch.testing.assert_close(cut[key], full[key], rtol=1e-5, atol=1e-6)
    records = _records(tmp_path / "cut")
    assert [r["round"] for r in records] == [1, 2, 3, 4]
    assert ["worker_busy_s" in r for r in records] == [False, True, True, True]
    saved = json.loads((tmp_path / "cut" / "config.json").read_text())
    assert saved["runtime"]["name"] == "workers" and saved["runtime"]["workers"] == 2


@pytest.mark.parametrize("override", ["rounds=10", "algorithm.lr=0.5", "seed=3", "model=cnn"])
def test_resume_refuses_to_change_what_the_run_computes(tmp_path, override):
    cfg = resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES))
    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[_crash_after_round_2])
    before = (tmp_path / "cut" / "config.json").read_bytes()
    key = override.partition("=")[0]
    with pytest.raises(ConfigError, match="cannot change on --resume") as e:
        resume(tmp_path / "cut", overrides=[override])
    assert e.value.key == key
    assert (tmp_path / "cut" / "config.json").read_bytes() == before


def test_cli_resume_takes_overrides_but_no_preset(tmp_path, capsys):
    cfg = resolve(apply_overrides(load_config_source("quickstart"), OVERRIDES))
    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[_crash_after_round_2])
    assert main(["run", "--resume", str(tmp_path / "cut"), "quickstart", "--quiet"]) == 2
    assert "--resume DIR takes no preset or --out (got 'quickstart')" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "cut"), "threads=1", "--quiet"]) == 0
    assert [r["round"] for r in _records(tmp_path / "cut")] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "cut" / "config.json").read_text())["threads"] == 1


def test_a_runs_thread_count_does_not_leak_into_the_caller():
    # torch.set_num_threads is process-wide; a run with threads=1 used to leave it at 1,
    # so a later run in the same process computed with other float rounding
    before = torch.get_num_threads()
    torch.set_num_threads(2)  # a known caller setting, unlike the run's 1
    try:
        cfg = resolve(apply_overrides(load_config_source("quickstart"), [*OVERRIDES, "threads=1"]))
        run(cfg)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


ASYNC = [
    "rounds=6",
    "clients=20",
    "clients_per_round=5",
    "algorithm=fedbuff",
    "checkpoint_every_s=0",
]


@pytest.mark.parametrize("runtime", ["local", "workers"])
def test_an_asynchronous_run_resumes_to_the_uninterrupted_result(tmp_path, runtime):
    """FedBuff (K = 3, 5 in flight) on heterogeneous devices: at the crash after step 3
    tasks are in flight from several versions and the buffer may hold deltas; the resumed
    run restores them, the clock and every client's dispatch count, and ends bit for bit
    where the uninterrupted one does. Snapshots of versions no task needs are removed."""
    overrides = [*ASYNC, "algorithm.buffer_size=3", f"runtime={runtime}"]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    run(cfg, tmp_path / "full")

    def crash_after_step_3(record):
        if record["round"] == 4:
            raise Crash
        return False, {}

    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[crash_after_step_3])
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    versions = checkpoint["engine"]["flights"]["snapshot_versions"]
    # the cap is 5: at a step the arrival's slot waits for its refill (a pending dispatch)
    assert len(checkpoint["engine"]["flights"]["flights"]) == 4
    assert checkpoint["engine"]["policy"]["pending_refills"] == 1
    on_disk = sorted(int(f.stem[1:]) for f in (tmp_path / "cut" / "snapshots").glob("v*.pt"))
    assert on_disk == versions and versions[-1] <= 3
    resume(tmp_path / "cut")
    assert torch.equal(_final_params(tmp_path / "cut"), _final_params(tmp_path / "full"))
    full, cut = _records(tmp_path / "full"), _records(tmp_path / "cut")
    for key in ("accuracy", "virtual_time_s", "train_loss", "staleness_mean", "clients"):
        assert [r[key] for r in cut] == [r[key] for r in full], key


def test_a_finished_asynchronous_run_keeps_no_snapshots_and_still_resumes_to_its_summary(
    tmp_path,
):
    """FedBuff (K = 3, 5 in flight) ends with tasks in flight, whose start versions an
    unfinished checkpoint would keep as snapshot files. A finished run is never continued
    (rounds cannot change on --resume), so its last checkpoint keeps none and the folder is
    emptied. Killed after that checkpoint but before summary.json, --resume computes
    nothing and writes the same summary (same final loss and accuracy, same 6 records)."""
    cfg = resolve(
        apply_overrides(load_config_source("quickstart"), [*ASYNC, "algorithm.buffer_size=3"])
    )
    out = tmp_path / "run"
    run(cfg, out)
    checkpoint = torch.load(out / "checkpoint.pt", weights_only=True)
    assert checkpoint["round"] == 6
    assert len(checkpoint["engine"]["flights"]["flights"]) == 4  # in flight at the end
    assert sorted((out / "snapshots").glob("*")) == []
    before = json.loads((out / "summary.json").read_text())
    records = _records(out)
    (out / "summary.json").unlink()
    resume(out)
    after = json.loads((out / "summary.json").read_text())
    assert (after["status"], after["rounds"]) == ("completed", 6)
    assert (after["final_loss"], after["final_accuracy"]) == (
        before["final_loss"],
        before["final_accuracy"],
    )
    assert _records(out) == records


def test_metrics_lines_are_fsynced_once_per_checkpoint_and_before_it(tmp_path, monkeypatch):
    """Lines after the last checkpoint are recomputed on resume, so they need not be
    durable; the ones a checkpoint counts must be, before it is. With a checkpoint only
    after step 1 and at the end (checkpoint_every_s=3600), 4 rounds fsync metrics.jsonl
    3 times (each checkpoint, then summary.json), not once per line, and each of those
    fsyncs comes before the checkpoint or summary's rename."""
    import os

    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name == "metrics.jsonl":
            events.append("fsync metrics")
        return real_fsync(fd)

    def replace(src, dst):
        events.append(f"replace {Path(dst).name}")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    overrides = [*OVERRIDES[:-1], "checkpoint_every_s=3600"]
    run(resolve(apply_overrides(load_config_source("quickstart"), overrides)), tmp_path / "r")
    assert [r["round"] for r in _records(tmp_path / "r")] == [1, 2, 3, 4]
    kept = [
        e for e in events if e in {"fsync metrics", "replace checkpoint.pt", "replace summary.json"}
    ]
    assert kept == [
        "fsync metrics",
        "replace checkpoint.pt",
        "fsync metrics",
        "replace checkpoint.pt",
        "fsync metrics",
        "replace summary.json",
    ]


@pytest.mark.parametrize(
    ("runtime", "policy"), [("local", "fixed"), ("workers", "fixed"), ("local", "qlearning")]
)
def test_fedasmu_resumes_with_suspended_procedures_controls_and_client_state(
    tmp_path, runtime, policy
):
    """FedASMU keeps per-device controls on the server, merge controls as client state,
    and tasks that were suspended at their fetch when the run was killed (their answers,
    the model versions they fetched, are in the checkpoint). The resumed run replays
    each such procedure to its request, hands it the recorded answer, and ends bit for bit
    where the uninterrupted run does; with request_policy=qlearning also the Q tables,
    the request slots and the actions of the tasks in flight."""
    overrides = [
        "rounds=8",
        "clients=20",
        "clients_per_round=5",
        "algorithm=fedasmu",
        f"algorithm.request_policy={policy}",
        f"runtime={runtime}",
        "checkpoint_every_s=0",
    ]
    cfg = resolve(apply_overrides(load_config_source("quickstart"), overrides))
    run(cfg, tmp_path / "full")

    def crash_after_step_4(record):
        if record["round"] == 5:
            raise Crash
        return False, {}

    with pytest.raises(Crash):
        run(cfg, tmp_path / "cut", callbacks=[crash_after_step_4])
    checkpoint = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)
    answered = [f for f in checkpoint["engine"]["flights"]["flights"] if f["answers"]]
    assert answered, "some task in flight had fetched its model when the run stopped"
    resume(tmp_path / "cut")
    full = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["strategy"]
    cut = torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["strategy"]
    assert torch.equal(cut["params"], full["params"])
    assert torch.equal(cut["controls"], full["controls"])
    if policy == "qlearning":
        assert torch.equal(cut["q"], full["q"]) and torch.equal(cut["slot"], full["slot"])
        assert bool(full["q"].abs().sum() > 0)  # rewards were learned from
    full_r, cut_r = _records(tmp_path / "full"), _records(tmp_path / "cut")
    for key in ("virtual_time_s", "train_loss", "client_merge_beta", "mixing_weight"):
        assert [r[key] for r in cut_r] == [r[key] for r in full_r], key
