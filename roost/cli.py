"""The ``roost`` command line.

    roost run PRESET_OR_FILE [KEY=VALUE ...] [--out DIR]
    roost run --resume DIR [runtime=... runtime.FIELD=... workers=N threads=N]
    roost plot DIR [DIR ...] [--out FILE] [--x round,virtual,wall] [--loss-scale auto|linear|log]
    roost list [KIND] [imports=FILE.py]
    roost keys DIR --nodes N [--host NAME ...] [--no-client-certs] [--force]
    roost serve PRESET_OR_FILE [KEY=VALUE ...] --address HOST:PORT --out DIR --keys DIR
    roost serve --resume DIR --address HOST:PORT --keys DIR
    roost node --server HOST:PORT --key NODE_DIR [--client-id K] [--state DIR] [KEY=VALUE ...]
    roost --version

Bad input (an unknown key, a bad value, a file that does not parse, a run directory that
cannot be used) is one line on stderr and exit code 2. A run that diverges (NaN or Inf in
the model), loses a worker or is interrupted says so in one line and exits 1 (130 for
Ctrl-C), naming the run directory to ``--resume`` when it holds a checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from roost.engine import History

__all__ = ["main"]

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    from roost import __version__

    p = argparse.ArgumentParser(prog="roost", description="Federated learning at scale.")
    p.add_argument("--version", action="version", version=f"roost {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "run",
        help="run a preset or a config file",
        description="Run PRESET_OR_FILE with KEY=VALUE overrides, e.g. "
        "`roost run quickstart algorithm=fedprox algorithm.mu=0.01`.",
    )
    r.add_argument("items", nargs="*", metavar="PRESET_OR_FILE [KEY=VALUE ...]")
    r.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    r.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run kept in DIR (KEY=VALUE may then change only runtime, "
        "runtime.FIELD, workers and threads)",
    )
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    pl = sub.add_parser("plot", help="plot accuracy and loss curves of one or more runs")
    pl.add_argument("dirs", nargs="+", metavar="DIR")
    pl.add_argument(
        "--out",
        help="PNG file (default: DIR/accuracy.png for one run, roost-compare.png for several); "
        "split learning runs also get STEM-split.png beside it (timeline, utilisation)",
    )
    pl.add_argument(
        "--x",
        default="round,virtual",
        metavar="AXES",
        help="x axes, one column each, comma-separated: round, virtual (virtual time), "
        "wall (wall-clock time) (default: round,virtual)",
    )
    pl.add_argument(
        "--loss-scale",
        choices=["auto", "linear", "log"],
        default="auto",
        help="the loss axis: log, linear, or auto (log when the losses span more than "
        "100x, e.g. a run that diverged; default)",
    )
    ls = sub.add_parser(
        "list",
        help="list presets, run keys and the components of each kind",
        description="List presets, the run-level keys and every component with its "
        "parameters; imports=FILE.py (or a module) first imports plugins that register more.",
    )
    ls.add_argument(
        "kind", nargs="?", help="run, algorithm, data, partition, model, system, runtime"
    )
    k = sub.add_parser(
        "keys",
        help="make the keys and certificates of a test federation (docs/deployment.md)",
        description="Write a CA, a server certificate, one signing key (and client "
        "certificate) per node and the server's allow-list into DIR.",
    )
    k.add_argument("dir", metavar="DIR")
    k.add_argument("--nodes", type=int, required=True, metavar="N", help="how many nodes")
    k.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="NAME",
        help="another name or IP address of the server, for its certificate (repeatable)",
    )
    k.add_argument(
        "--no-client-certs",
        action="store_true",
        help="no client certificates (they are needed only for mutual TLS)",
    )
    k.add_argument(
        "--force",
        action="store_true",
        help="replace the federation already in DIR (its node files the new one does not "
        "write are removed; other files are left)",
    )
    sv = sub.add_parser(
        "serve",
        help="serve a run to nodes over gRPC (docs/deployment.md)",
        description="Run PRESET_OR_FILE with KEY=VALUE overrides as `roost run` does, with "
        "its tasks trained by the nodes that connect (roost node) instead of simulated.",
    )
    sv.add_argument("items", nargs="*", metavar="PRESET_OR_FILE [KEY=VALUE ...]")
    sv.add_argument("--address", required=True, metavar="HOST:PORT", help="where to listen")
    sv.add_argument("--out", help="run directory (default: runs/NAME-TIMESTAMP)")
    sv.add_argument("--resume", metavar="DIR", help="continue the served run kept in DIR")
    sv.add_argument(
        "--keys", metavar="DIR", help="a roost keys directory: allow-list and certificates"
    )
    sv.add_argument(
        "--allow-list", metavar="FILE", help="the nodes' public keys (default: DIR/allowlist.txt)"
    )
    sv.add_argument(
        "--plaintext", action="store_true", help="no TLS (refused unless the address is loopback)"
    )
    sv.add_argument(
        "--mutual-tls", action="store_true", help="nodes must present a client certificate"
    )
    sv.add_argument(
        "--task-timeout",
        type=float,
        default=600.0,
        metavar="S",
        help="a task with no result S seconds after dispatch is lost (default 600)",
    )
    sv.add_argument(
        "--heartbeat",
        type=float,
        default=10.0,
        metavar="S",
        help="how often a busy node heartbeats; a node silent for 3 of these is "
        "disconnected and its tasks are lost (default 10)",
    )
    sv.add_argument(
        "--min-nodes",
        type=int,
        default=0,
        metavar="N",
        help="start the run once N nodes are connected (default: as soon as the first "
        "round, or the asynchronous concurrency, can be filled)",
    )
    sv.add_argument("--quiet", action="store_true", help="no progress bar")
    nd = sub.add_parser(
        "node",
        help="train a served run's tasks on this machine's data (docs/deployment.md)",
        description="Connect to a roost serve server, receive the run's config and train "
        "the tasks it gives, until the run is over. KEY=VALUE (data, partition, clients, "
        "threads) give the node its own data instead of its client of the run's data.",
    )
    nd.add_argument("items", nargs="*", metavar="KEY=VALUE")
    nd.add_argument("--server", required=True, metavar="HOST:PORT")
    nd.add_argument(
        "--key",
        required=True,
        metavar="NODE_DIR",
        help="this node's directory of a roost keys federation (node.key, node.pub)",
    )
    nd.add_argument(
        "--ca",
        metavar="FILE",
        help="the CA of the server's certificate (default: "
        "NODE_DIR/../../ca.pem, where roost keys puts it)",
    )
    nd.add_argument("--plaintext", action="store_true", help="no TLS (loopback only)")
    nd.add_argument(
        "--mutual-tls", action="store_true", help="present NODE_DIR/client.pem to the server"
    )
    nd.add_argument(
        "--client-id",
        type=int,
        metavar="K",
        help="the client of the data this node holds (default: the one the server assigns; "
        "with KEY=VALUE data, client 0)",
    )
    nd.add_argument(
        "--state", metavar="DIR", help="keep the client state on disk in DIR (default: memory)"
    )
    return p


def _fail(message: str) -> int:
    print(f"roost: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _note(message: str) -> None:
    print(f"roost: note: {message}", file=sys.stderr)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Roost's own warnings as one line (``roost: warning: ...``); others as Python's."""
    from roost.errors import RoostWarning

    if issubclass(category, RoostWarning):
        print(f"roost: warning: {message}", file=file or sys.stderr)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def _torchrun_worker(args: argparse.Namespace) -> int:
    """Ranks >= 1 under torchrun: serve as a worker of rank 0's run."""
    from roost.config import apply_overrides, load_config_source, resolve
    from roost.runtime.workers import WorkersRuntimeConfig, worker_loop
    from roost.track.rundir import RunDir

    cfg = WorkersRuntimeConfig()
    try:  # the same options rank 0 uses, where this node can read them
        tree = (
            apply_overrides(RunDir(args.resume).read_config(), args.items)
            if args.resume
            else apply_overrides(load_config_source(args.items[0]), args.items[1:])
        )
        resolved = resolve(tree)
        if resolved.name("runtime") == "workers":
            cfg = resolved.config("runtime")
    except (ValueError, IndexError, OSError):
        pass
    worker_loop(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", cfg)
    return 0


def _run(args: argparse.Namespace) -> int:
    from roost.config import PRESETS, apply_overrides, load_config_source, resolve
    from roost.runner import resume, run
    from roost.runtime.workers import launched_by_torchrun

    if launched_by_torchrun() and int(os.environ["RANK"]) != 0:
        return _torchrun_worker(args)
    progress = not args.quiet
    if args.resume:
        not_overrides = [item for item in args.items if "=" not in item]
        if not_overrides or args.out:
            shown = f"{not_overrides[0]!r}" if not_overrides else "--out"
            return _fail(
                f"--resume DIR takes no preset or --out (got {shown}): the run continues "
                "with the config saved in DIR; KEY=VALUE may change runtime, "
                "runtime.FIELD, workers or threads"
            )
        out = Path(args.resume)
        history = _guarded(out, lambda: resume(out, overrides=args.items, progress=progress))
    else:
        if not args.items:
            return _fail(f"roost run needs PRESET_OR_FILE (presets: {', '.join(sorted(PRESETS))})")
        source, *overrides = args.items
        cfg = resolve(apply_overrides(load_config_source(source), overrides))
        for note in cfg.notes:
            _note(note)
        if launched_by_torchrun() and cfg.name("runtime") != "workers":
            return _fail(
                f"launched by torchrun with {os.environ['WORLD_SIZE']} processes, "
                f"but runtime={cfg.name('runtime')}; add runtime=workers"
            )
        out = (
            Path(args.out)
            if args.out
            else Path("runs", f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        )
        history = _guarded(out, lambda: run(cfg, out, progress=progress))
    if isinstance(history, int):
        return history
    _print_final(history, out)
    return 0


def _print_final(history: History, out: Path) -> None:
    """The last line of a run: final accuracy, rounds, clients and where the results are."""
    final = history.last_evaluated()
    acc = final.get("accuracy")
    shown = f"final accuracy {acc:.4f}, " if acc is not None else ""
    stopped = history.final.get("stopped")
    why = f" (stopped: {stopped})" if stopped else ""
    print(
        f"{shown}{len(history.records)} rounds{why}, {history.num_clients} clients; "
        f"results in {out}"
    )


EXIT_FAILED = 1
EXIT_INTERRUPTED = 130


def _guarded(
    out: Path, start: Callable[[], History], resume_with: str = "roost run --resume {out}"
) -> History | int:
    """Run ``start``; a run that fails mid-way (diverged, a worker lost, Ctrl-C) becomes
    one line naming ``out``, with ``resume_with`` suggested only where a checkpoint is."""
    from roost.errors import Diverged, WorkerFailure
    from roost.track.rundir import RunDir

    def resumable() -> str:
        if RunDir(out).has_checkpoint():
            return f"; continue with {resume_with.format(out=out)}"
        return "; nothing was written"

    try:
        return start()
    except Diverged as e:
        kept = (
            f"; {out} keeps the rounds before it"
            if RunDir(out).has_checkpoint()
            else "; no round finished, so nothing was written"
        )
        print(f"roost: error: {e}{kept}", file=sys.stderr)
        return EXIT_FAILED
    except WorkerFailure as e:
        print(f"roost: error: {e}{resumable()}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print(f"\nroost: interrupted{resumable()}", file=sys.stderr)
        return EXIT_INTERRUPTED


def _plot(args: argparse.Namespace) -> int:
    from roost.track.plot import parse_x_axes, plot_runs

    x = parse_x_axes(args.x)
    default = (
        Path(args.dirs[0]) / "accuracy.png" if len(args.dirs) == 1 else Path("roost-compare.png")
    )
    target = plot_runs(args.dirs, args.out or default, x=x, loss_scale=args.loss_scale)
    print(target)
    from roost.track.plot_split import plot_split_runs, split_path

    split = plot_split_runs(args.dirs, split_path(target), x=x)  # None: no split runs
    if split is not None:
        print(split)
    return 0


def _list(args: argparse.Namespace) -> int:
    import dataclasses

    from roost.config import ALIASES, PRESETS, RunConfig, component_registries, import_plugins
    from roost.registry import ConfigError

    for item in args.items:
        key, _, value = item.partition("=")
        if key != "imports":
            return _fail(f"{item}: roost list takes only imports=FILE.py (or a module)")
        import_plugins([v for v in value.split(",") if v])
    registries = component_registries()
    kinds = [args.kind] if args.kind else ["run", *registries]
    if args.kind and args.kind not in ("run", *registries):
        raise ConfigError("list", args.kind, f"allowed kinds: run, {', '.join(registries)}")
    if not args.kind:
        print("presets: " + ", ".join(sorted(PRESETS)))
    if "run" in kinds:
        print("run (top-level keys):")
        for f in dataclasses.fields(RunConfig):
            print(f"  {f.name}={_shown(f.default)}")
        for alias, (kind, field) in ALIASES.items():
            print(f"  {alias}: short for {kind}.{field}")
        kinds.remove("run")
    for kind in kinds:
        print(f"{kind}:")
        width = max([14, *(len(e.name) for e in registries[kind])])
        for entry in registries[kind]:
            fields = "  ".join(
                f"{f.name}={_shown(f.default)}" for f in dataclasses.fields(entry.config_cls)
            )
            print(f"  {entry.name:{width}s} {entry.summary}")
            if fields:
                print(f"  {'':{width}s} {fields}")
    return 0


def _shown(value: object) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if value == "":
        return '""'
    return str(value)


def _keys(args: argparse.Namespace) -> int:
    try:
        from roost.deploy.keys import run_cli
    except ImportError as e:  # no deploy extra: the message says what to install
        return _fail(str(e))
    try:
        return run_cli(args)
    except FileExistsError as e:
        return _fail(str(e))


def _serve(args: argparse.Namespace) -> int:
    from roost.config import PRESETS, apply_overrides, load_config_source, resolve
    from roost.deployment import ServeOptions, print_ready, return_large_blocks_to_os, serve

    try:
        import roost.deploy.server  # noqa: F401  (the deploy extra is installed)
    except ImportError as e:  # the message says what to install
        return _fail(str(e))

    options = ServeOptions(
        address=args.address,
        keys=Path(args.keys) if args.keys else None,
        allow_list=Path(args.allow_list) if args.allow_list else None,
        plaintext=args.plaintext,
        mutual_tls=args.mutual_tls,
        task_timeout_s=args.task_timeout,
        heartbeat_s=args.heartbeat,
        min_nodes=args.min_nodes,
    )
    return_large_blocks_to_os()  # a server process: its memory stays O(model) with many nodes
    progress = not args.quiet
    again = f"roost serve --resume {{out}} --address {args.address}" + (
        f" --keys {args.keys}" if args.keys else ""
    )
    if args.resume:
        if args.items or args.out:
            return _fail(
                "--resume DIR takes no preset, KEY=VALUE or --out: the run "
                "continues with the config saved in DIR"
            )
        out = Path(args.resume)
        history = _guarded(
            out,
            lambda: serve(None, out, options, resume=True, progress=progress, on_ready=print_ready),
            again,
        )
    else:
        if not args.items:
            return _fail(
                f"roost serve needs PRESET_OR_FILE (presets: {', '.join(sorted(PRESETS))})"
            )
        source, *overrides = args.items
        cfg = resolve(apply_overrides(load_config_source(source), overrides))
        for note in cfg.notes:
            _note(note)
        out = (
            Path(args.out)
            if args.out
            else Path("runs", f"{Path(source).stem}-{time.strftime('%Y%m%d-%H%M%S')}")
        )
        history = _guarded(
            out, lambda: serve(cfg, out, options, progress=progress, on_ready=print_ready), again
        )
    if isinstance(history, int):
        return history
    _print_final(history, out)
    return 0


def _node(args: argparse.Namespace) -> int:
    from roost.deployment import NodeOptions, run_node

    try:
        from roost.deploy.client import RemoteRefusal, Unreachable
    except ImportError as e:  # no deploy extra: the message says what to install
        return _fail(str(e))

    options = NodeOptions(
        server=args.server,
        key=Path(args.key),
        ca=Path(args.ca) if args.ca else None,
        plaintext=args.plaintext,
        mutual_tls=args.mutual_tls,
        client_id=args.client_id,
        overrides=tuple(args.items),
        state_dir=Path(args.state) if args.state else None,
    )
    try:
        trained = run_node(options)
    except (Unreachable, RemoteRefusal) as e:  # gave up, or turned away by the server
        print(f"roost: error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(f"the run is over; this node trained {trained} tasks")
    return 0


PRELOADED = {"run": "roost.runner", "serve": "roost.runner", "node": "roost.runner"}
"""What :func:`main` imports under :func:`imports_without_gc` before a command runs (the
modules the commands that train need; each always installed, torch among them)."""


@contextlib.contextmanager
def imports_without_gc() -> Iterator[None]:
    """Import with Python's cyclic garbage collector off, then freeze what was imported.

    Importing torch and Roost creates about 260,000 tracked objects that live as long
    as the process and almost no garbage, yet the collector runs meanwhile (measured
    before W3's ``roost run``: about 390 collections, three of them full, each full one
    scanning every object torch made; ``import torch`` alone took 1.30 s with the
    collector off against 1.55 s with it on, medians of 5 on the project's machine).
    :func:`gc.freeze` then moves those objects to the permanent generation, so later full
    collections skip them (and, the reason Python's documentation gives, forked worker
    processes do not copy their pages when a collection writes to them; not measured
    here). Only the command line does this: a library must leave its host
    program's collector alone, and :func:`main` does it once per process, when the
    modules are not imported yet (a test calling ``main`` many times freezes nothing)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def main(argv: Sequence[str] | None = None) -> int:
    from roost.errors import WorkerFailure

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand after options (`roost run w1 --out D model=cnn`);
    # `roost list` takes imports=... the same way.
    takes_items = args.command in ("run", "list", "serve", "node")
    stray = [e for e in extra if e.startswith("-") or "=" not in e or not takes_items]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if args.command == "list":
        args.items = extra
    elif extra:
        args.items = [*args.items, *extra]
    handlers = {
        "run": _run,
        "plot": _plot,
        "list": _list,
        "keys": _keys,
        "serve": _serve,
        "node": _node,
    }
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            preload = PRELOADED.get(args.command)
            if preload is not None and preload not in sys.modules:  # once per process
                with imports_without_gc():
                    importlib.import_module(preload)
            return handlers[args.command](args)
        except (FileNotFoundError, ValueError) as e:  # config, file and run-directory errors
            return _fail(str(e))
        except WorkerFailure as e:  # a worker lost before the run directory was known
            print(f"roost: error: {e}", file=sys.stderr)
            return EXIT_FAILED
        except KeyboardInterrupt:
            print("\nroost: interrupted; nothing was written", file=sys.stderr)
            return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
