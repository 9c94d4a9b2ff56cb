"""``roost.run``: build a run from its config, drive the engine, keep the run directory.

This is where the pieces are wired: the dataset, model, algorithm and its strategy, the
system model, the runtime, and the callbacks that write metrics and checkpoints. The CLI's
``roost run`` is a thin layer over :func:`run`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from roost.algorithms.asynchronous import AsyncStrategy
from roost.algorithms.base import Algorithm, Strategy
from roost.build import RunParts, WorkerParts, build_parts, initial_params
from roost.clock import WallClock
from roost.config import ResolvedConfig, apply_overrides, resolve
from roost.engine import Callback, Engine, History
from roost.engine.remote import ConnectedNodes, RemoteFleet
from roost.errors import Diverged
from roost.models.cost import LayerCost, example_input, layer_costs, macs_per_example
from roost.registry import ConfigError
from roost.runtime.base import RUNTIMES, Job
from roost.runtime.launch import prestart, release
from roost.runtime.threads import default_threads
from roost.split.profile import profile_layers
from roost.state import ClientStateStore, make_state_store
from roost.state.base import STATE_FILE_NAME
from roost.system import build_system
from roost.track.progress import ProgressBar
from roost.track.resources import peak_rss_mb
from roost.track.rundir import RunDir, RunDirError
from roost.track.tensorboard import TensorBoardWriter

__all__ = ["RemoteFactory", "describe_run", "pacing_note", "resume", "run", "summarize"]

CHECKPOINT_FORMAT = 3

RemoteFactory = Callable[
    [WallClock, int, ResolvedConfig, "int | None", RunParts],
    AbstractContextManager[RemoteFleet],
]
"""A deployment's nodes, for :func:`run` and :func:`resume` with ``remote``: called with
the run's wall clock, its number of clients, its config, (resumed) the step of the
checkpoint it continues from and the run's parts (its algorithm, data and model), it
returns a context manager
that yields the :class:`~roost.engine.remote.RemoteFleet` (``roost serve``: the gRPC
server, started on entry, told the run is over and stopped on exit)."""


class _Checkpointer:
    """Callback: append the step's metrics line; save an atomic checkpoint when
    ``every_s`` wall seconds have passed since the last one (always after the first
    step), and, through :meth:`finish`, after the run's last step."""

    def __init__(
        self, rundir: RunDir, engine: Engine, store: ClientStateStore, every_s: float
    ) -> None:
        self.rundir, self.engine, self.store = rundir, engine, store
        self.every_s = every_s
        self.saved_at = -math.inf  # time.monotonic() of the last checkpoint
        self.pending: dict[str, Any] | None = None  # the last record not checkpointed

    def __call__(self, record: dict[str, Any]) -> tuple[bool, dict[str, Any]]:
        self.rundir.append_metrics(record)
        remote = self.engine.remote
        if time.monotonic() - self.saved_at < self.every_s or (
            remote is not None and remote.replaying()  # the journal still holds the truth
        ):
            self.pending = record
            return False, {}
        self.save(record)
        return False, {}

    def finish(self) -> None:
        """The run ended: checkpoint its last step if it was not."""
        if self.pending is not None:
            self.save(self.pending)

    def save(self, record: dict[str, Any]) -> None:
        """Checkpoint after ``record``'s step. The model snapshots of the tasks in flight
        are written (each version once) unless the step ends the run: a finished run is
        never continued (:func:`_finished`, ``rounds`` cannot change on resume), so its
        last checkpoint needs none and the snapshot files are removed."""
        self.pending = None
        self.saved_at = time.monotonic()
        self.store.commit(record["round"])  # durable before the checkpoint names it
        self.rundir.sync_metrics()  # the lines up to this step, likewise
        final = _finished(record["round"], record.get("stopped"), self.engine.run_config.rounds)
        snapshots = {} if final else self.engine.flights.snapshot_dicts()
        if snapshots:  # each version written once, not in every checkpoint
            self.rundir.save_snapshots(snapshots)
        self.rundir.save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "round": record["round"],
                "virtual_time_s": record["virtual_time_s"],
                "wall_time_s": record["wall_time_s"],
                "stopped": record.get("stopped"),
                "strategy": self.engine.strategy.state_dict(),
                "engine": self.engine.state_dict(with_snapshots=False),
                "runtime": self.engine.runtime.state_dict(),
                "client_state": self.store.checkpoint_state(),
            }
        )
        self.rundir.prune_snapshots(set(snapshots))
        if self.engine.remote is not None:  # its journal now follows this checkpoint
            self.engine.remote.checkpointed(record["round"], sorted(self.engine.flights.flights))


def _finished(step: int, stopped: object, rounds: int) -> bool:
    """Whether a checkpoint after ``step`` ends the run: its last step, or stopped early."""
    return step >= rounds or bool(stopped)


def _as_resolved(config: ResolvedConfig | Mapping[str, Any]) -> ResolvedConfig:
    return config if isinstance(config, ResolvedConfig) else resolve(config)


SPLIT_PROFILE_BATCH = 32
"""Examples of the batch ``split_costs=profile`` times each layer on."""


def _split_layers(cfg: ResolvedConfig, parts: RunParts) -> tuple[LayerCost, ...]:
    """The per-layer costs of a split-learning run's model, which must be an
    ``nn.Sequential`` (its top-level layers are the cut points): multiply-adds, and with
    ``split_costs=profile`` the seconds measured on this host."""
    module = parts.build_module()
    if not isinstance(module, nn.Sequential):
        raise ConfigError(
            "model",
            cfg.name("model"),
            f"is a {type(module).__name__}; split learning cuts an nn.Sequential between its "
            "top-level layers (mlp, cnn, vgg5, vgg11, resnet are)",
        )
    layers = layer_costs(module, parts.dataset.info)
    if cfg.run.split_costs == "macs":
        return layers
    example = example_input(parts.dataset.info, SPLIT_PROFILE_BATCH)
    measured = profile_layers(module, example)
    return tuple(
        dataclasses.replace(layer, forward_s=f, backward_s=b)
        for layer, f, b in zip(layers, measured.forward_s, measured.backward_s, strict=True)
    )


def run(
    config: ResolvedConfig | Mapping[str, Any],
    out: str | Path | None = None,
    *,
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    remote: RemoteFactory | None = None,
) -> History:
    """Run a federated simulation; with ``out``, keep a run directory there.

    ``config`` is a :class:`ResolvedConfig` or a raw tree (as in a config file). Returns
    the :class:`History` of per-round records. With ``remote`` the run is deployed: the
    engine runs on a wall clock and its tasks are trained by the fleet's nodes (the
    system model is :class:`~roost.engine.remote.ConnectedNodes`).
    """
    cfg = _as_resolved(config)
    rundir = RunDir(out) if out is not None else None
    if rundir is None:
        return _execute(cfg, None, None, progress, callbacks, remote)
    rundir.create(cfg.to_dict())
    if cfg.run.state_store == "disk":
        rundir.made(STATE_FILE_NAME)
    try:
        return _execute(cfg, rundir, None, progress, callbacks, remote)
    except BaseException:
        if not rundir.has_checkpoint():  # failed before its first round: nothing to keep
            rundir.discard()
        raise


RESUME_KEYS = ("runtime", "workers", "threads")
"""What ``--resume`` may change: how the run computes, never what it computes."""


def resume(
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    progress: bool = False,
    callbacks: Sequence[Callback] = (),
    remote: RemoteFactory | None = None,
) -> History:
    """Continue the run kept in ``out`` from its last checkpoint (deployed with
    ``remote``, as in :func:`run`).

    ``overrides`` (``KEY=VALUE``, keys under :data:`RESUME_KEYS`) change how the rest of
    the run computes: another runtime, device or number of workers, e.g. a run started on
    GPUs continued on a laptop with ``runtime.device=cpu``. The run directory's
    ``config.json`` is rewritten with them, so later resumes keep them.
    """
    rundir = RunDir(out)
    tree = rundir.read_config()
    for item in overrides:
        key = item.partition("=")[0].strip()
        if key.partition(".")[0] not in RESUME_KEYS:
            raise ConfigError(
                key,
                item.partition("=")[2],
                "cannot change on --resume: the checkpoint fixes what the run computes; "
                "only how it computes may change (runtime, runtime.FIELD, workers, threads)",
            )
    cfg = resolve(apply_overrides(tree, overrides))
    checkpoint = rundir.load_checkpoint()
    if overrides:
        rundir.write_config(cfg.to_dict())
    return _execute(cfg, rundir, checkpoint, progress, callbacks, remote)


def _execute(
    cfg: ResolvedConfig,
    rundir: RunDir | None,
    checkpoint: dict[str, Any] | None,
    progress: bool,
    callbacks: Sequence[Callback],
    remote: RemoteFactory | None = None,
) -> History:
    """Run with the config's torch thread count, and give the caller back its own
    (``torch.set_num_threads`` is process-wide: a later run in the same process, or the
    caller's own torch code, must not inherit it)."""
    threads_before = torch.get_num_threads()
    if cfg.run.threads is not None:
        torch.set_num_threads(cfg.run.threads)
    try:
        if cfg.name("runtime") == "workers":  # its processes start while the run is built
            prestart("workers", cfg.config("runtime"), WorkerParts(cfg.to_dict()))
        with contextlib.ExitStack() as stack:  # a deployment's server lives as long as this
            return _execute_run(cfg, rundir, checkpoint, progress, callbacks, remote, stack)
    finally:
        release()  # prestarted processes no runtime claimed (the run failed first)
        torch.set_num_threads(threads_before)


def _execute_run(
    cfg: ResolvedConfig,
    rundir: RunDir | None,
    checkpoint: dict[str, Any] | None,
    progress: bool,
    callbacks: Sequence[Callback],
    remote: RemoteFactory | None,
    stack: contextlib.ExitStack,
) -> History:
    started = time.perf_counter()
    rc = cfg.run
    parts = build_parts(cfg)
    dataset, algorithm = parts.dataset, parts.algorithm
    if rc.threads is None:
        threads = default_threads(parts.build_module(), dataset.info)
        if threads is not None:
            torch.set_num_threads(threads)
    init = initial_params(cfg, parts)
    num_params = init.numel()
    if type(algorithm).bind_model is not Algorithm.bind_model:  # it needs the model
        algorithm.bind_model(parts.build_module())
    strategy = algorithm.make_strategy()
    strategy.initialize(init, dataset.num_clients)
    strategy.clients_per_round = rc.clients_per_round
    # w^0 is kept only where personal models that were never trained are measured at it
    initial = init if algorithm.evaluates_personal_models() else None
    del init
    if checkpoint is not None:
        assert rundir is not None
        if int(checkpoint.get("format", 0)) != CHECKPOINT_FORMAT:
            raise RunDirError(
                f"{rundir.path}: checkpoint format {checkpoint.get('format')} "
                f"is not {CHECKPOINT_FORMAT}"
            )
    store = make_state_store(
        rc.state_store,
        algorithm.client_state_spec(num_params),
        dataset.num_clients,
        rundir.path if rundir is not None else None,
        checkpoint=checkpoint["client_state"] if checkpoint is not None else None,
    )
    runtime = RUNTIMES.get(cfg.name("runtime")).factory(cfg.config("runtime"))
    clock: WallClock | None = None
    fleet: RemoteFleet | None = None
    if remote is None:
        system = build_system(
            cfg.name("system"), cfg.config("system"), rc.seed, dataset.num_clients
        )
        # a model the count cannot run on one zero example keeps the system's own cost
        with contextlib.suppress(Exception):
            system.set_model_cost(macs_per_example(parts.build_module(), dataset.info))
    else:  # deployed: wall time, and the nodes that are connected
        if (
            algorithm.splits_the_model
            and algorithm.split_serving(parts.build_module, parts.dataset.info) is None
        ):
            raise ConfigError(
                "algorithm",
                cfg.name("algorithm"),
                "trains the model split between device and server; deploying it (the "
                "device part on the nodes, the server part here) is not built yet for "
                "this method",
            )
        start_s = float(checkpoint["virtual_time_s"]) if checkpoint is not None else 0.0
        clock = WallClock(start_s)
        step = int(checkpoint["round"]) if checkpoint is not None else None
        fleet = stack.enter_context(remote(clock, dataset.num_clients, cfg, step, parts))
        system = ConnectedNodes(fleet, dataset.num_clients)
    engine = Engine(
        run=rc,
        algorithm=algorithm,
        strategy=strategy,
        runtime=runtime,
        dataset=dataset,
        system=system,
        num_params=num_params,
        state_store=store,
        initial_params=initial,
        clock=clock,
        remote=fleet,
        split_layers=_split_layers(cfg, parts) if algorithm.splits_the_model else None,
    )
    history = History(num_clients=dataset.num_clients)
    start_round = 1
    finished = False
    if checkpoint is not None:
        assert rundir is not None
        start_round = int(checkpoint["round"]) + 1
        finished = _finished(start_round - 1, checkpoint.get("stopped"), rc.rounds)
        if not finished:  # a finished run computes nothing more (its snapshots are gone)
            strategy.load_state_dict(checkpoint["strategy"])
            engine_state = checkpoint["engine"]
            flights = engine_state["flights"]
            if flights.get("snapshots") is None:
                flights["snapshots"] = rundir.load_snapshots(flights["snapshot_versions"])
            engine.load_state_dict(engine_state)
        engine.wall_offset_s = float(checkpoint["wall_time_s"])
        history.records = rundir.truncate_metrics(start_round - 1)
    elif rundir is not None and rundir.read_metrics():
        history.records = rundir.truncate_metrics(0)
    if finished and rundir is not None and rundir.has_summary():
        store.close()  # a finished run resumed: nothing to compute, its summary stands
        return history
    engine.callbacks = list(callbacks)
    checkpointer = None
    if rundir is not None:
        checkpointer = _Checkpointer(rundir, engine, store, rc.checkpoint_every_s)
        engine.callbacks.append(checkpointer)
    tensorboard = None
    if rc.tensorboard:
        if rundir is None:
            raise ConfigError("tensorboard", True, "needs a run directory (--out DIR)")
        tensorboard = TensorBoardWriter(rundir.path / "tensorboard")
        rundir.made("tensorboard")
        engine.callbacks.append(tensorboard)
    if progress:
        print(describe_run(cfg, dataset.num_clients), file=sys.stderr)
        note = pacing_note(cfg, strategy)
        if note:
            print(f"roost: note: {note}", file=sys.stderr)
        engine.callbacks.append(ProgressBar(rc.rounds))
    if checkpointer is not None and fleet is not None and checkpoint is None:
        # deployed: the state before round 1 too, so that a server killed in round 1
        # resumes (its journal then replays from step 0)
        checkpointer.save(
            {"round": 0, "virtual_time_s": clock.now if clock else 0.0, "wall_time_s": 0.0}
        )
    try:
        if not finished:  # a finished run resumed starts no processes
            worker_parts = WorkerParts(cfg.to_dict())
            runtime.start(Job(algorithm, dataset, parts.build_module, store, worker_parts))
            if checkpoint is not None:
                runtime.load_state_dict(checkpoint.get("runtime", {}))
            engine.run(start_round, history)
            if checkpointer is not None:
                checkpointer.finish()
    except Diverged as e:
        if rundir is not None and rundir.has_checkpoint():
            rundir.write_summary(
                {
                    **summarize(history, engine.wall_offset_s + time.perf_counter() - started),
                    "status": "diverged",
                    "error": str(e),
                }
            )
        raise
    except BaseException:
        runtime.abort()
        raise
    finally:
        runtime.close()
        store.close()
        if tensorboard is not None:
            tensorboard.close()
    if rundir is not None:
        rundir.write_summary(
            summarize(history, engine.wall_offset_s + time.perf_counter() - started)
        )
    return history


def describe_run(cfg: ResolvedConfig, num_clients: int) -> str:
    """The line ``roost run`` prints first: what runs, on how many clients."""
    rc = cfg.run
    return (
        f"roost: {cfg.name('algorithm')} on data={cfg.name('data')}, {num_clients} clients "
        f"(partition={cfg.name('partition')}), {rc.clients_per_round} per round, "
        f"{rc.rounds} rounds, model={cfg.name('model')}, runtime={cfg.name('runtime')}"
    )


def pacing_note(cfg: ResolvedConfig, strategy: Strategy) -> str | None:
    """For an asynchronous method: what ``rounds`` counts, when a step folds fewer results
    than a synchronous round of the same config would (FedAsync: one)."""
    if not isinstance(strategy, AsyncStrategy):
        return None
    rc, per = cfg.run, strategy.arrivals_per_step
    concurrency = strategy.concurrency or rc.clients_per_round
    if per is None or per >= rc.clients_per_round:
        return None
    return (
        f"{cfg.name('algorithm')} steps the server every {per} arrival(s) with "
        f"{concurrency} clients in flight; rounds={rc.rounds} counts server steps, so "
        f"this run trains {rc.rounds * per} client tasks where {rc.rounds} synchronous "
        f"rounds of {rc.clients_per_round} would train {rc.rounds * rc.clients_per_round} "
        f"(rounds={rc.rounds * rc.clients_per_round // per} for as many)"
    )


def summarize(history: History, wall_s: float) -> dict[str, Any]:
    """summary.json: how the run ended (``status``: completed, stopped early with the
    reason in ``stopped``, or diverged), final metrics, clients, time, and peak memory
    (this process's, and with worker processes each worker's and the sum over all)."""
    final = history.final
    evaluated = history.last_evaluated()
    stopped = final.get("stopped")
    summary = {
        "status": "stopped" if stopped else "completed",
        "stopped": stopped,
        "rounds": final.get("round", 0),
        "clients": history.num_clients,
        "rounds_without_clients": sum(1 for r in history.records if r.get("clients") == 0),
        "final_accuracy": evaluated.get("accuracy"),
        "final_loss": evaluated.get("loss"),
        "virtual_time_s": final.get("virtual_time_s", 0.0),
        "wall_s": wall_s,
        "peak_rss_mb": peak_rss_mb(),
    }
    workers = final.get("worker_peak_rss_mb")
    if workers:
        summary["peak_rss_mb_workers"] = workers
        summary["peak_rss_mb_total"] = summary["peak_rss_mb"] + sum(workers)
    return summary
