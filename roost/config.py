"""Run configuration: presets, config files, ``key=value`` overrides, validation.

A run's configuration is a small tree. Top-level keys are the run's own settings
(:class:`RunConfig`); each *component* (``algorithm``, ``data``, ``partition``, ``model``,
``system``, ``runtime``) is chosen by name and configured by its own typed dataclass::

    roost run quickstart algorithm=fedprox algorithm.mu=0.01 rounds=20

(and ``compression``, which wraps any algorithm's uploads). ``KIND=NAME`` selects a
component and ``KIND.FIELD=VALUE`` sets a field. Switching a
component keeps every parameter set so far that the new choice also takes (quickstart's
tuned ``lr``, ``batch_size`` and ``local_epochs`` survive ``algorithm=fedprox``); the
others are dropped, and :attr:`ResolvedConfig.notes` says which (``roost run`` prints
them). Switching ``data`` to a loader whose data has natural clients (LEAF writers,
speakers, W1's generated clients) also sets ``partition=natural`` with every natural
client, unless the same overrides (or file) set ``partition`` or ``clients`` themselves
(the rules are in :mod:`roost.overrides`).

A file (TOML, YAML or JSON) holds the same tree, components either as ``algorithm =
"fedavg"`` or as a table with a ``name`` key, and may start from a preset with ``preset =
"NAME"``; its keys are then applied to the preset by the same rules as overrides. Unknown
keys and bad values raise :class:`~roost.registry.ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any, Literal

from roost.overrides import (
    COMPONENT_DEFAULTS,
    FOLLOW_DATA,
    apply_items,
    apply_overrides,
    component_entry,
    drop_carried,
    follow_natural_data,
)
from roost.presets import PRESETS
from roost.registry import (
    ConfigError,
    Registry,
    build_config,
    check,
    coerce_value,
    config_fields,
)

__all__ = [
    "COMPONENT_DEFAULTS",
    "PRESETS",
    "ConfigFileError",
    "ResolvedConfig",
    "RunConfig",
    "apply_overrides",
    "load_config_source",
    "resolve",
]


class ConfigFileError(ValueError):
    """A config file could not be read or parsed; the message says where."""


@dataclass(frozen=True)
class RunConfig:
    """The run's own settings.

    Attributes:
        rounds: number of server steps: synchronous rounds, or the steps of an
            asynchronous method (FedAsync steps on every arrival, FedBuff every K).
        clients: number of clients (None: as many as the data defines).
        clients_per_round: cohort size m; the round ends when m clients have reported.
        seed: seeds every random stream of the run.
        eval_every: evaluate on the central test split every N rounds (0: only after the
            last round); the last round is always evaluated.
        over_selection: select ceil(m * (1 + over_selection)) clients and count the first m
            to arrive (FedScale's over-commitment); the rest are dropped before they are
            computed.
        deadline_s: a round's deadline in virtual seconds; clients that would arrive later
            are dropped before they are computed (None: no deadline).
        late_results: what happens to a synchronous round's results that arrive after
            the round ended (past its deadline, or beyond the first ``clients_per_round``):
            ``drop`` them before they are computed, or ``carry`` them into the round
            during which they arrive, with their staleness (semi-asynchronous rounds).
        threads: torch intra-op threads of this process (None: one for a model of under
            1 M multiply-adds per example, else torch's default of one per core; see
            :mod:`roost.runtime.threads`). Worker processes set their own
            (``runtime.threads``).
        state_store: where stateful algorithms keep per-client state between rounds:
            ``memory`` (this process), or ``disk`` (fixed-size slots in
            ``client_state.bin`` in the run directory; resident memory does not grow with
            the number of clients, and worker processes read and write it directly).
        imports: Python modules (names, or paths ending in ``.py``) imported before the
            config is validated, so that algorithms, data loaders or models they register
            can be named; saved in ``config.json``, so ``--resume`` imports them again.
        target_accuracy: stop after the first evaluated round whose test accuracy is at
            least this (None: run every round).
        virtual_time_budget_s: stop after the first round that ends at or past this
            virtual time, in seconds (None: no budget).
        tensorboard: also write every round's metrics as TensorBoard scalars into
            ``tensorboard/`` in the run directory (``pip install 'roost[tensorboard]'``).
        checkpoint_every_s: with a run directory, wall seconds between checkpoints: one
            after the first step, then after the first step at least this long after the
            last one, and after the last step (0: after every step). Every step's
            metrics line is written at once; a resumed run continues from the last
            checkpoint and recomputes the steps after it, to the same numbers.
        split_costs: where split learning's per-layer compute shares come from:
            ``macs`` (each layer's multiply-adds, a backward twice its forward: the same
            on every machine) or ``profile`` (each layer's forward and backward seconds
            measured on this host once at the start, kept in the checkpoint so that a
            resumed run times its tasks as the run did).
    """

    rounds: int = 10
    clients: int | None = None
    clients_per_round: int = 10
    seed: int = 0
    eval_every: int = 1
    over_selection: float = 0.0
    deadline_s: float | None = None
    late_results: Literal["drop", "carry"] = "drop"
    threads: int | None = None
    state_store: Literal["memory", "disk"] = "memory"
    imports: tuple[str, ...] = ()
    target_accuracy: float | None = None
    virtual_time_budget_s: float | None = None
    tensorboard: bool = False
    checkpoint_every_s: float = 10.0
    split_costs: Literal["macs", "profile"] = "macs"

    def __post_init__(self) -> None:
        check(self.rounds >= 1, "rounds", self.rounds, "must be >= 1")
        check(self.clients is None or self.clients >= 1, "clients", self.clients, "must be >= 1")
        check(
            self.clients_per_round >= 1, "clients_per_round", self.clients_per_round, "must be >= 1"
        )
        check(self.seed >= 0, "seed", self.seed, "must be >= 0")
        check(self.eval_every >= 0, "eval_every", self.eval_every, "must be >= 0")
        check(
            self.over_selection >= 0 and math.isfinite(self.over_selection),
            "over_selection",
            self.over_selection,
            "must be >= 0",
        )
        check(
            self.deadline_s is None or self.deadline_s > 0,
            "deadline_s",
            self.deadline_s,
            "must be > 0 or none",
        )
        check(
            self.late_results in ("drop", "carry"),
            "late_results",
            self.late_results,
            "must be drop or carry",
        )
        check(self.threads is None or self.threads >= 1, "threads", self.threads, "must be >= 1")
        check(
            self.split_costs in ("macs", "profile"),
            "split_costs",
            self.split_costs,
            "must be macs or profile",
        )
        check(
            self.checkpoint_every_s >= 0 and math.isfinite(self.checkpoint_every_s),
            "checkpoint_every_s",
            self.checkpoint_every_s,
            "must be a number of seconds >= 0",
        )
        check(
            self.target_accuracy is None or 0 < self.target_accuracy <= 1,
            "target_accuracy",
            self.target_accuracy,
            "must be in (0, 1] or none",
        )
        check(
            self.virtual_time_budget_s is None
            or (self.virtual_time_budget_s > 0 and math.isfinite(self.virtual_time_budget_s)),
            "virtual_time_budget_s",
            self.virtual_time_budget_s,
            "must be a number > 0 or none",
        )


def component_registries() -> dict[str, Registry[Any]]:
    """The registries, imported here so that importing roost.config stays cheap."""
    import roost.algorithms  # noqa: F401  (registers the algorithms)
    from roost.algorithms.base import ALGORITHMS
    from roost.compression.component import COMPRESSIONS
    from roost.data import DATA
    from roost.data.partition import PARTITIONERS
    from roost.models import MODELS
    from roost.runtime import RUNTIMES
    from roost.system import SYSTEMS

    return {
        "algorithm": ALGORITHMS,
        "data": DATA,
        "partition": PARTITIONERS,
        "model": MODELS,
        "system": SYSTEMS,
        "runtime": RUNTIMES,
        "compression": COMPRESSIONS,
    }


@dataclass(frozen=True)
class ResolvedConfig:
    """A validated run configuration: the run settings and each component's (name, config).

    ``notes`` are what resolving decided for the user that they may not expect (parameters
    dropped when a component was switched, a partition chosen for data with natural
    clients); one line each, not part of the config itself.
    """

    run: RunConfig
    components: Mapping[str, tuple[str, Any]]
    notes: tuple[str, ...] = dataclass_field(default=(), compare=False)

    def name(self, kind: str) -> str:
        return self.components[kind][0]

    def config(self, kind: str) -> Any:
        return self.components[kind][1]

    def to_dict(self) -> dict[str, Any]:
        """The full tree, every default filled in; feeding it back resolves to the same."""
        out: dict[str, Any] = dataclasses.asdict(self.run)
        for kind, (name, cfg) in self.components.items():
            fields = {k: _jsonable(v) for k, v in dataclasses.asdict(cfg).items()}
            out[kind] = {"name": name, **fields}
        return out


def _jsonable(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# --------------------------------------------------------------------------- sources


def _parse_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigFileError(f"{path}: cannot read: {e.strerror or e}") from None
    suffix = path.suffix.lower()
    if suffix == ".toml":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover
            import tomli as tomllib
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigFileError(f"{path}: invalid TOML: {e}") from None
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ConfigFileError(
                f"{path}: reading YAML needs PyYAML: pip install 'roost[yaml]'"
            ) from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(e, "problem", None) or str(e).splitlines()[0]
            context = getattr(e, "context", None)
            what = f"{problem} ({context})" if context else problem
            raise ConfigFileError(f"{path}: invalid YAML: {where}{what}") from None
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigFileError(
                f"{path}: invalid JSON: line {e.lineno}, column {e.colno}: {e.msg}"
            ) from None
    else:
        raise ConfigFileError(
            f"{path}: unknown config format {suffix!r}; use .toml, .yaml or .json"
        )
    if not isinstance(data, dict):
        raise ConfigFileError(f"{path}: the top level must be a table of keys")
    return data


def load_config_source(source: str) -> dict[str, Any]:
    """A preset name or a config file path -> the raw config tree (not yet validated)."""
    if source in PRESETS:
        return PRESETS[source]()
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            "config", source, f"no such preset or file; presets: {', '.join(sorted(PRESETS))}"
        )
    tree = _parse_file(path)
    base_name = tree.pop("preset", None)
    if base_name is None:
        return tree
    if base_name not in PRESETS:
        raise ConfigError("preset", base_name, f"allowed: {', '.join(sorted(PRESETS))}")
    return apply_items(PRESETS[base_name](), list(tree.items()))


def import_plugins(names: Sequence[str]) -> None:
    """Import user modules that register components (``imports=my_algorithm``).

    A name ending in ``.py`` is loaded from that path; any other is a module name, looked
    up with the current directory on the path.
    """
    for name in names:
        looks_like_path = "/" in name or os.sep in name or Path(name).suffix not in ("", ".py")
        if not name.endswith(".py") and (looks_like_path or Path(name).is_file()):
            raise ConfigError(
                "imports",
                name,
                "not a Python file; give a path ending in .py or a module name "
                "(e.g. imports=my_algorithm.py or imports=my_package.plugins)",
            )
        try:
            if name.endswith(".py"):
                path = Path(name).resolve()
                module_name = f"roost_plugin_{path.stem}"
                if module_name in sys.modules:
                    continue
                spec = importlib.util.spec_from_file_location(module_name, path)
                if spec is None or spec.loader is None or not path.exists():
                    raise ConfigError("imports", name, "no such Python file")
                module = importlib.util.module_from_spec(spec)
                sys.modules[module_name] = module
                spec.loader.exec_module(module)
            else:
                if "" not in sys.path and str(Path.cwd()) not in sys.path:
                    sys.path.insert(0, str(Path.cwd()))
                importlib.import_module(name)
        except ModuleNotFoundError as e:
            raise ConfigError("imports", name, f"cannot import: {e}") from None
        except SyntaxError as e:
            where = f"{e.filename}, line {e.lineno}" if e.lineno else str(e.filename)
            raise ConfigError("imports", name, f"invalid Python: {where}: {e.msg}") from None


ALIASES: dict[str, tuple[str, str]] = {"workers": ("runtime", "workers")}
"""Top-level shorthands for a component field: ``workers=4`` is ``runtime.workers=4``."""


def _expand_aliases(tree: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for alias, (kind, field) in ALIASES.items():
        if alias not in out:
            continue
        value = out.pop(alias)
        entry = component_entry(kind, out.get(kind, {}))
        name = entry.get("name", COMPONENT_DEFAULTS[kind])
        registry = component_registries()[kind]
        if field not in config_fields(registry.get(name).config_cls):
            raise ConfigError(
                alias, value, f"sets {kind}.{field}, which {kind}={name} does not have"
            )
        entry[field] = value
        out[kind] = entry
    return out


def resolve(tree: Mapping[str, Any]) -> ResolvedConfig:
    """Validate a raw tree into a :class:`ResolvedConfig` (defaults filled in)."""
    imports = tree.get("imports", ())
    import_plugins(coerce_value("imports", imports, tuple[str, ...]))
    registries = component_registries()
    tree = {k: copy.deepcopy(v) for k, v in tree.items()}
    follow = tree.pop(FOLLOW_DATA, ())
    notes: list[str] = []
    for kind in COMPONENT_DEFAULTS:
        if kind in tree:
            entry = component_entry(kind, tree[kind])
            notes += drop_carried(kind, entry, registries)
            tree[kind] = entry
    notes += follow_natural_data(tree, follow, registries)
    tree = _expand_aliases(tree)
    run_values: dict[str, Any] = {}
    allowed_top = sorted([*config_fields(RunConfig), *COMPONENT_DEFAULTS, *ALIASES])
    for key, value in tree.items():
        if key in COMPONENT_DEFAULTS:
            continue
        if key not in config_fields(RunConfig):
            raise ConfigError(key, value, f"unknown key; allowed: {', '.join(allowed_top)}")
        run_values[key] = value
    run = build_config(RunConfig, run_values, "")
    components: dict[str, tuple[str, Any]] = {}
    for kind, default in COMPONENT_DEFAULTS.items():
        entry = component_entry(kind, tree.get(kind, {}))
        name = entry.pop("name", default)
        registry = registries[kind]
        registry.get(name)
        components[kind] = (name, registry.config(name, entry))
    return ResolvedConfig(run, components, tuple(notes))
