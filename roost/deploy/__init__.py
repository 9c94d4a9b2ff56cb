"""Deployment over gRPC: the wire protocol, tensor streaming, security, the engine's
coordinator, the journal that survives restarts, and a node's loop.

Needs the ``deploy`` extra (``pip install 'roost[deploy]'``). Importing this package loads
neither grpc, protobuf nor cryptography; each name below imports its module on first use:

* :mod:`roost.deploy.protocol`: ``Coordinator`` (the seam to the engine), ``TaskSpec``,
  ``Task``, ``Result``, ``Ack``, ``MidTaskRequest``, ``RequestKind``, ``Answer``,
  ``NodeInfo``, ``WireStats``;
* :mod:`roost.deploy.tensors`: ``Encoded``, ``TensorSpec``, ``Limits``, ``encode``, ``decode``;
* :mod:`roost.deploy.errors`: ``WireError`` and its subclasses, one per refusal;
* :mod:`roost.deploy.auth`: ``NodeKey``, ``AllowList``, ``Signer``, ``Verifier``;
* :mod:`roost.deploy.tls`: ``ServerTls``, ``ClientTls``, ``InsecureRefused``;
* :mod:`roost.deploy.server`: ``DeployServer``, ``ServerConfig``;
* :mod:`roost.deploy.client`: ``NodeClient``, ``ClientConfig``, ``RemoteRefusal``,
  ``Unreachable``, ``TlsFailure``; :mod:`roost.deploy.backoff`: ``Backoff``;
* :mod:`roost.deploy.keys`: ``make_federation`` (``roost keys``);
* :mod:`roost.deploy.coordinator`: ``EngineCoordinator``, the Coordinator that is the
  engine's :class:`~roost.engine.remote.RemoteFleet` (the engine on a wall clock), with
  its watchdog of silent nodes;
* :mod:`roost.deploy.journal`: ``Journal``, what a served run accepted and decided since
  its checkpoint (SQLite), replayed by ``roost serve --resume``;
* :mod:`roost.deploy.node`: ``NodeWorker``, a node's loop.

``roost serve`` and ``roost node`` are assembled in :mod:`roost.deployment`.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "protocol": (
        "Ack",
        "Answer",
        "Coordinator",
        "MidTaskRequest",
        "NodeInfo",
        "RequestKind",
        "Result",
        "Task",
        "TaskSpec",
        "WireStats",
    ),
    "tensors": ("Encoded", "Limits", "TensorSpec", "decode", "encode"),
    "errors": ("WireError",),
    "auth": ("AllowList", "NodeKey", "Signer", "Verifier"),
    "tls": ("ClientTls", "InsecureRefused", "ServerTls"),
    "server": ("DeployServer", "ServerConfig"),
    "client": ("ClientConfig", "NodeClient", "RemoteRefusal", "TlsFailure", "Unreachable"),
    "backoff": ("Backoff",),
    "keys": ("make_federation",),
    "coordinator": ("EngineCoordinator",),
    "journal": ("Journal",),
    "node": ("NodeWorker",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'roost.deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(f"roost.deploy.{module}"), name)
