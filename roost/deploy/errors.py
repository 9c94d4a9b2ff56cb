"""Why the deployment layer refused a message, and the gRPC status that says so.

Every refusal is a :class:`WireError` subclass. ``code`` is the name of a
``grpc.StatusCode`` member (a string, so this module imports neither grpc nor protobuf);
:meth:`WireError.grpc_code` turns it into the member. The server answers a refused
request with that status, the exception's message as the details, and trailing metadata
``roost-refusal: <class name>`` (e.g. ``StaleTimestamp``), so a client or a test can tell
refusals apart without parsing the text.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AlreadyArrived",
    "BadSignature",
    "BadTensor",
    "MalformedMessage",
    "NonFinite",
    "NotRegistered",
    "Overloaded",
    "PermissionDenied",
    "ReplayedNonce",
    "SpecMismatch",
    "StaleTimestamp",
    "TamperedBody",
    "TaskNotFound",
    "TooLarge",
    "UnknownKey",
    "Unsigned",
    "VersionMismatch",
    "WireError",
    "WrongTask",
]


class WireError(Exception):
    """A message the deployment layer refuses; ``code`` names the gRPC status to answer."""

    code: ClassVar[str] = "INVALID_ARGUMENT"

    @property
    def kind(self) -> str:
        """The refusal's name as sent in the ``roost-refusal`` trailing metadata."""
        return type(self).__name__

    def grpc_code(self) -> Any:
        """This refusal's ``grpc.StatusCode`` member (imports grpc)."""
        import grpc

        return grpc.StatusCode[self.code]


class MalformedMessage(WireError):
    """Bytes that do not parse as the expected protobuf message, or frames out of order."""


class BadTensor(WireError):
    """A tensor entry whose dtype, shape, length or offsets are not allowed or inconsistent."""


class SpecMismatch(WireError):
    """Tensor names, shapes, dtypes or codecs other than the ones the receiver expects."""


class NonFinite(WireError):
    """NaN or Inf in a floating-point tensor (or weight, or metric) of a result."""


class TooLarge(WireError):
    """More bytes, tensors or entries than the receiver's configured cap."""

    code = "RESOURCE_EXHAUSTED"


class Overloaded(WireError):
    """The server cannot take the request now (e.g. its replay cache is full); retry later."""

    code = "RESOURCE_EXHAUSTED"


class VersionMismatch(WireError):
    """A ``protocol_version`` other than the one this side speaks."""

    code = "FAILED_PRECONDITION"


class Resuming(WireError):
    """The server is replaying its journal after a restart: retry shortly."""

    code = "UNAVAILABLE"


class NotRegistered(WireError):
    """A request from a node that has not registered (again) since the server started."""

    code = "FAILED_PRECONDITION"


class Unsigned(WireError):
    """A request without the signature metadata, or with it malformed."""

    code = "UNAUTHENTICATED"


class UnknownKey(WireError):
    """A request signed with a public key that is not on the allow-list."""

    code = "PERMISSION_DENIED"


class PermissionDenied(WireError):
    """An authenticated node asking for something that is not its own (another node id)."""

    code = "PERMISSION_DENIED"


class BadSignature(WireError):
    """A signature that does not verify under the node's public key."""

    code = "UNAUTHENTICATED"


class TamperedBody(WireError):
    """Request bytes whose SHA-256 differs from the digest the node signed."""

    code = "UNAUTHENTICATED"


class StaleTimestamp(WireError):
    """A signed timestamp outside the server's window (default ±60 s)."""

    code = "UNAUTHENTICATED"


class ReplayedNonce(WireError):
    """A nonce the server has already seen within the timestamp window."""

    code = "UNAUTHENTICATED"


class TaskNotFound(WireError):
    """A result or request for a task id the server never gave out."""

    code = "NOT_FOUND"


class WrongTask(WireError):
    """A result or request for a task that was given to another node."""

    code = "PERMISSION_DENIED"


class AlreadyArrived(WireError):
    """A second result for a task whose result already arrived, with different content.

    (A byte-identical resubmission is not refused: it is acknowledged as a duplicate.)"""

    code = "ALREADY_EXISTS"
