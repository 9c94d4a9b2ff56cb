"""How a config tree is changed: ``KEY=VALUE`` overrides, a file's keys on a preset, and
what switching a component carries over.

Switching a component (``algorithm=fedprox``) keeps the parameters set so far, marked
with the component they were set for (:data:`CARRIED`); :func:`drop_carried` then drops
those the new component does not take, or takes with another meaning, and says so.
Switching ``data`` marks ``partition`` and ``clients`` as following it
(:data:`FOLLOW_DATA`) unless the same overrides set them; :func:`follow_natural_data`
then gives data with natural clients (registry tag ``natural_clients``) one client per
writer, user or speaker. Both markers live only in raw trees: :func:`roost.config.resolve`
removes them.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from roost.registry import ConfigError, Registry, coerce_value, config_fields

__all__ = [
    "CARRIED",
    "COMPONENT_DEFAULTS",
    "FOLLOW_DATA",
    "apply_items",
    "apply_overrides",
    "component_entry",
    "drop_carried",
    "follow_natural_data",
]

COMPONENT_DEFAULTS: dict[str, str] = {
    "algorithm": "fedavg",
    "data": "digits",
    "partition": "auto",
    "model": "mlp",
    "system": "homogeneous",
    "runtime": "local",
    "compression": "none",
}


def component_entry(key: str, value: Any) -> dict[str, Any]:
    if isinstance(value, str):
        return {"name": value}
    if isinstance(value, Mapping):
        entry = dict(value)
        if "name" in entry and not isinstance(entry["name"], str):
            raise ConfigError(f"{key}.name", entry["name"], "expected a string")
        return entry
    raise ConfigError(key, value, "expected a name or a table with a name key")


CARRIED = "_carried"
"""Key of a component entry: ``{param: name of the component it was set for}``, for the
parameters kept when the component was switched. :func:`resolve` drops those the new
component does not take, with a note."""

FOLLOW_DATA = "_follow_data"
"""Top-level key: which of ``partition`` and ``clients`` were left to follow a switch of
``data``; :func:`resolve` sets them for data with natural clients."""

_FOLLOWERS = ("partition", "clients")


def _set_component(tree: dict[str, Any], kind: str, value: Any) -> None:
    """Select (``value`` names another component) or update a component's entry.

    On a switch the old entry's parameters are carried into the new one, marked with the
    component they were set for; explicit parameters in ``value`` win.
    """
    new = component_entry(kind, value)
    old = component_entry(kind, tree.get(kind, {}))
    old_name = old.pop("name", COMPONENT_DEFAULTS[kind])
    old_carried: dict[str, str] = dict(old.pop(CARRIED, {}))
    if "name" in new and new["name"] != old_name:
        carried = {k: old_carried.get(k, old_name) for k in old if k not in new}
        entry = {**old, **new}
        if carried:
            entry[CARRIED] = carried
        tree[kind] = entry
    else:
        for k in new:
            old_carried.pop(k, None)
        entry = {"name": old_name, **old, **new}
        if old_carried:
            entry[CARRIED] = old_carried
        tree[kind] = entry


def _set_field(tree: dict[str, Any], kind: str, name: str, value: Any) -> None:
    entry = component_entry(kind, tree.get(kind, {}))
    entry[name] = value
    carried = {k: v for k, v in entry.get(CARRIED, {}).items() if k != name}
    entry.pop(CARRIED, None)
    if carried:
        entry[CARRIED] = carried
    tree[kind] = entry


def _data_name(tree: Mapping[str, Any]) -> Any:
    return component_entry("data", tree.get("data", {})).get("name", COMPONENT_DEFAULTS["data"])


def apply_items(tree: Mapping[str, Any], items: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Apply ``(key, value)`` pairs in order: ``KIND`` (a name or a table), ``KIND.FIELD``
    or a run-level key. Returns a new tree."""
    out = copy.deepcopy(dict(tree))
    data_before = _data_name(out)
    user_set: set[str] = set()
    for key, value in items:
        kind, dot, name = key.partition(".")
        if kind in COMPONENT_DEFAULTS:
            if not dot:
                _set_component(out, kind, value)
            else:
                _set_field(out, kind, name, value)
        elif dot:
            raise ConfigError(
                key, value, f"unknown section {kind!r}; sections: {', '.join(COMPONENT_DEFAULTS)}"
            )
        else:
            out[key] = value
        user_set.add(kind)
    follow = set(out.pop(FOLLOW_DATA, ()))
    if _data_name(out) != data_before:
        follow = set(_FOLLOWERS)
    follow -= user_set
    if follow:
        out[FOLLOW_DATA] = sorted(follow)
    return out


def apply_overrides(tree: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key=value`` strings in order; returns a new tree."""
    items: list[tuple[str, Any]] = []
    for item in overrides:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(item, "", "expected KEY=VALUE (e.g. rounds=20 or algorithm.mu=0.01)")
        items.append((key, value))
    return apply_items(tree, items)


def follow_natural_data(
    tree: dict[str, Any], follow: Sequence[str], registries: Mapping[str, Registry[Any]]
) -> list[str]:
    """After a switch to data with natural clients: ``partition=natural`` and every
    natural client, for whichever of the two the user left to follow; returns notes."""
    data = _data_name(tree)
    if not follow or not isinstance(data, str) or data not in registries["data"]:
        return []
    from roost.data import NATURAL_CLIENTS

    if NATURAL_CLIENTS not in registries["data"].get(data).tags:
        return []
    changed = []
    old_partition = component_entry("partition", tree.get("partition", {})).get("name")
    if "partition" in follow and old_partition not in ("natural", None):
        tree["partition"] = {"name": "natural"}
        changed.append(f"partition=natural (not {old_partition})")
    partition = component_entry("partition", tree.get("partition", {})).get("name")
    natural = partition in ("natural", "auto", None)
    if "clients" in follow and natural and tree.get("clients") is not None:
        changed.append(f"every natural client (not clients={tree['clients']})")
        tree["clients"] = None
    if not changed:
        return []
    return [
        f"data={data} has natural clients, so the run uses {' and '.join(changed)}; "
        "set partition= or clients= to choose otherwise"
    ]


def drop_carried(
    kind: str, entry: dict[str, Any], registries: Mapping[str, Registry[Any]]
) -> list[str]:
    """Remove carried parameters the entry's component does not take; returns a note."""
    carried: dict[str, str] = entry.pop(CARRIED, {})
    name = entry.get("name", COMPONENT_DEFAULTS[kind])
    if not carried or not isinstance(name, str) or name not in registries[kind]:
        return []
    cls = registries[kind].get(name).config_cls
    fields = config_fields(cls)
    hints = typing.get_type_hints(cls)

    def takes(key: str) -> bool:
        if key not in fields:
            return False
        try:  # same name, other meaning (mlp's hidden widths vs cnn's one width)
            coerce_value(f"{kind}.{key}", entry[key], hints[key])
        except ConfigError:
            return False
        return True

    dropped = [k for k in carried if not takes(k)]
    if not dropped:
        return []
    shown = ", ".join(f"{k}={entry.pop(k)} (set for {carried[k]})" for k in dropped)
    return [f"{kind}={name} does not take {shown}; dropped"]
