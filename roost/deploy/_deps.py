"""The message a user without the ``deploy`` extra sees.

``roost.deploy``'s modules import grpc, protobuf and cryptography at their top, each
through a ``try`` that raises :func:`missing_extra`'s ImportError. None of them is imported
by ``import roost``, ``import roost.cli`` or ``import roost.deploy`` (tests/deploy/
test_lazy_imports.py checks that), so the rest of Roost works without the extra.
"""

from __future__ import annotations

__all__ = ["INSTALL_HINT", "missing_extra"]

INSTALL_HINT = "pip install 'roost[deploy]'"


def missing_extra(package: str, cause: BaseException | None = None) -> ImportError:
    """The ImportError to raise when ``package`` (grpcio, protobuf, cryptography) is absent
    or unusable; ``cause`` (the original error) is quoted."""
    why = f" ({cause})" if cause else ""
    return ImportError(
        f"roost.deploy needs {package}{why}, which comes with the deploy extra: {INSTALL_HINT}"
    )
