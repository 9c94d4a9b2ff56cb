"""The generated protobuf module (``pb``) and the protocol version this code speaks.

The generated code checks the protobuf runtime against the protoc that wrote it (the
``Protobuf Python Version`` line of ``_generated/roost_deploy_pb2.py``) and raises if the
runtime is older; that, like a missing protobuf, becomes an ImportError naming the extra.
"""

from __future__ import annotations

from roost.deploy._deps import missing_extra

try:
    from roost.deploy._generated import roost_deploy_pb2 as pb
except Exception as e:  # ImportError, or protobuf's VersionError
    raise missing_extra("protobuf at least as new as the protoc that generated its code", e) from e

__all__ = ["FRAME_OVERHEAD", "METHODS", "PROTOCOL_VERSION", "SERVICE", "pb"]

PROTOCOL_VERSION = 3
"""The ``protocol_version`` every message of this code carries and expects."""

SERVICE = "roost.deploy.v1.Deploy"

METHODS = {
    name: f"/{SERVICE}/{name}"
    for name in ("Register", "PullTask", "PushResult", "Request", "Exchange", "Heartbeat")
}
"""gRPC method paths by name, e.g. ``METHODS["PushResult"]``."""

FRAME_OVERHEAD = 1024
"""Bytes a chunk frame may need beyond its data (fields and tags): a side's chunk size must
stay at least this far below its message limit."""
