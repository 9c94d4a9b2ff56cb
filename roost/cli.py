"""The ``roost`` command line.

    roost run PRESET_OR_FILE [KEY=VALUE ...] [--out DIR]
    roost run --resume DIR [runtime=... runtime.FIELD=... workers=N threads=N]
    roost plot DIR [DIR ...] [--out FILE]
    roost list [KIND]

Bad input (an unknown key, a bad value, a file that does not parse, a run directory that
cannot be used) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="roost", description="Federated learning at scale.")
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
    pl = sub.add_parser("plot", help="plot accuracy curves of one or more runs")
    pl.add_argument("dirs", nargs="+", metavar="DIR")
    pl.add_argument(
        "--out",
        help="PNG file (default: DIR/accuracy.png for one run, roost-compare.png for several)",
    )
    ls = sub.add_parser("list", help="list presets and the components of each kind")
    ls.add_argument("kind", nargs="?", help="algorithm, data, partition, model, system, runtime")
    return p


def _fail(message: str) -> int:
    print(f"roost: error: {message}", file=sys.stderr)
    return EXIT_USAGE


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
        history = resume(args.resume, overrides=args.items, progress=progress)
        out = Path(args.resume)
    else:
        if not args.items:
            return _fail(f"roost run needs PRESET_OR_FILE (presets: {', '.join(sorted(PRESETS))})")
        source, *overrides = args.items
        cfg = resolve(apply_overrides(load_config_source(source), overrides))
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
        history = run(cfg, out, progress=progress)
    final = history.last_evaluated()
    acc = final.get("accuracy")
    shown = f"final accuracy {acc:.4f}, " if acc is not None else ""
    print(f"{shown}{len(history.records)} rounds; results in {out}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from roost.track.plot import plot_runs

    default = (
        Path(args.dirs[0]) / "accuracy.png" if len(args.dirs) == 1 else Path("roost-compare.png")
    )
    target = plot_runs(args.dirs, args.out or default)
    print(target)
    return 0


def _list(args: argparse.Namespace) -> int:
    import dataclasses

    from roost.config import PRESETS, component_registries

    registries = component_registries()
    kinds = [args.kind] if args.kind else list(registries)
    if args.kind and args.kind not in registries:
        return _fail(f"list {args.kind}: allowed kinds: {', '.join(registries)}")
    if not args.kind:
        print("presets: " + ", ".join(sorted(PRESETS)))
    for kind in kinds:
        print(f"{kind}:")
        for entry in registries[kind]:
            fields = "  ".join(
                f"{f.name}={_shown(f.default)}" for f in dataclasses.fields(entry.config_cls)
            )
            print(f"  {entry.name:14s} {entry.summary}")
            if fields:
                print(f"  {'':14s} {fields}")
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


def main(argv: Sequence[str] | None = None) -> int:
    from roost.errors import WorkerFailure

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may stand after options (`roost run w1 --out D model=cnn`).
    stray = [e for e in extra if e.startswith("-") or "=" not in e or args.command != "run"]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.items = [*args.items, *extra]
    handlers = {"run": _run, "plot": _plot, "list": _list}
    try:
        return handlers[args.command](args)
    except (FileNotFoundError, ValueError) as e:  # config, file and run-directory errors
        return _fail(str(e))
    except WorkerFailure as e:
        print(f"roost: error: {e}; continue with roost run --resume DIR", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nroost: interrupted; continue with roost run --resume DIR", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
