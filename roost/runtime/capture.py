"""An algorithm wrapper that keeps the last client result a plain update returned.

The local runtime folds every result into a float64 :class:`Contribution` at once; a
process that must send the result itself elsewhere (a worker streaming results to its
server, a deployed node uploading to its server) wraps the job's algorithm in
:class:`CapturingAlgorithm` and reads :attr:`CapturingAlgorithm.last` after each task:
the update's own tensors, weight and scalars, which the receiver folds exactly as the
local runtime would have.
"""

from __future__ import annotations

import inspect
from collections.abc import Collection, Generator
from typing import Any

import torch

from roost.algorithms.base import ClientResult, UpdateOutput

__all__ = ["CapturingAlgorithm"]


class CapturingAlgorithm:
    """The job's algorithm, keeping the last result an update returned: a plain update's,
    or, when not ``streaming``, the one a generator procedure returned at its end (None
    while it is suspended at a request).

    While ``streaming``, a result whose tensors all have a dtype in ``strippable``
    reaches the local runtime without them, so that it folds only the weight and the
    scalars: the tensors travel on their own and the receiver folds them."""

    def __init__(self, algorithm: Any, strippable: Collection[torch.dtype] = ()) -> None:
        self.algorithm = algorithm
        self.last: ClientResult | None = None
        self.streaming = False
        self._strippable = frozenset(strippable)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.algorithm, name)

    def update(self, *args: Any) -> Any:
        out = self.algorithm.update(*args)
        if not isinstance(out, UpdateOutput):
            self.last = None
            if inspect.isgenerator(out) and not self.streaming:
                return self._capturing(out)  # a procedure: its final result is kept
            return out
        self.last = result = out.result
        strippable = self._strippable
        if self.streaming and all(t.dtype in strippable for t in result.tensors.values()):
            return out._replace(result=ClientResult({}, result.weight, result.scalars))
        return out

    def _capturing(self, procedure: Generator[Any, Any, Any]) -> Generator[Any, Any, Any]:
        """``procedure`` as it is (its requests and answers pass through), keeping the
        result it returns in :attr:`last`."""
        out = yield from procedure
        if isinstance(out, UpdateOutput):
            self.last = out.result
        return out
