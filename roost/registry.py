"""Named components with typed, validated configs.

Every pluggable part of a run (algorithm, data loader, partitioner, model, system model,
runtime) is registered under a name together with a frozen dataclass config. The command
line selects one with ``KIND=NAME`` and sets its fields with ``KIND.FIELD=VALUE``; this
module turns those strings into a validated config object, or a :class:`ConfigError` that
names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, Generic, Literal, TypeVar, Union, get_args, get_origin

__all__ = ["ConfigError", "Registry", "build_config", "check", "coerce_value", "config_fields"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is wrong. ``str(err)`` is one line for the user."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        shown = value if isinstance(value, str) else repr(value)
        super().__init__(f"{key}={shown}: {allowed}")


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise :class:`ConfigError` unless ``ok``; the validation helper of every config."""
    if not ok:
        raise ConfigError(key, value, allowed)


def config_fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    return {f.name: f for f in dataclasses.fields(cls) if f.init}


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def coerce_value(key: str, raw: Any, tp: Any) -> Any:
    """Convert ``raw`` (a parsed file value or a command-line string) to type ``tp``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce_value(key, raw, arg)
            except ConfigError:
                continue
        raise ConfigError(key, raw, f"expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        for a in allowed:
            if raw == a or (isinstance(raw, str) and str(a) == raw):
                return a
        raise ConfigError(key, raw, f"allowed: {', '.join(str(a) for a in allowed)}")
    if origin is tuple:
        args = get_args(tp)
        items = raw
        if isinstance(raw, str):
            items = [s for s in raw.strip("()[]").split(",") if s.strip()]
        if not isinstance(items, (list, tuple)):
            raise ConfigError(key, raw, f"expected a list of {_type_name(args[0])}")
        elem = args[0]
        return tuple(coerce_value(key, v.strip() if isinstance(v, str) else v, elem) for v in items)
    if tp is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(raw, str) and raw.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(key, raw, "expected true or false")
    if tp is int:
        if isinstance(raw, bool):
            raise ConfigError(key, raw, "expected an integer")
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(key, raw, "expected an integer")
    if tp is float:
        if isinstance(raw, bool):
            raise ConfigError(key, raw, "expected a number")
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        raise ConfigError(key, raw, "expected a number")
    if tp is str:
        if isinstance(raw, str):
            return raw
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return str(raw)
        raise ConfigError(key, raw, "expected a string")
    if tp is Any:
        return raw
    raise TypeError(f"config field {key} has unsupported type {tp!r}")


def build_config(cls: type[T], values: Mapping[str, Any], prefix: str) -> T:
    """Build dataclass ``cls`` from ``values``; unknown keys and bad values raise ConfigError.

    ``prefix`` is how the user addresses these fields (``"algorithm"`` gives
    ``algorithm.mu``), so that errors name the key as it was typed.
    """
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)
    kwargs: dict[str, Any] = {}
    for k, raw in values.items():
        key = f"{prefix}.{k}" if prefix else k
        if k not in fields:
            allowed = ", ".join(sorted(fields)) or "(no parameters)"
            raise ConfigError(key, raw, f"unknown key; allowed: {allowed}")
        kwargs[k] = coerce_value(key, raw, hints[k])
    try:
        return cls(**kwargs)
    except ConfigError as e:
        # Name the key as the user typed it, with the value as the user typed it.
        field = e.key.rsplit(".", 1)[-1]
        key = f"{prefix}.{field}" if prefix else field
        raise ConfigError(key, values.get(field, e.value), e.allowed) from None


@dataclasses.dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    config_cls: type
    factory: T
    summary: str
    tags: frozenset[str] = frozenset()


class Registry(Generic[T]):
    """Name -> (config dataclass, factory). ``kind`` is the config key, e.g. ``"model"``."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def register(
        self, name: str, config_cls: type, summary: str = "", tags: Iterable[str] = ()
    ) -> Callable[[T], T]:
        """Register ``factory`` under ``name``. ``tags`` are facts the assembly layer may
        ask about before building anything (e.g. data with ``natural_clients``)."""

        def deco(factory: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = summary or (getattr(factory, "__doc__", "") or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, config_cls, factory, doc, frozenset(tags))
            return factory

        return deco

    def get(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.kind, name, f"allowed: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def config(self, name: str, params: Mapping[str, Any]) -> Any:
        return build_config(self.get(name).config_cls, params, self.kind)
