"""A sequential model cut after its ``P``-th top-level layer: a device part and a server part.

Split learning (Vepakomma et al. 2018; SplitFed, Thapa et al. AAAI 2022; PiPar, Zhang et
al. JPDC 2024) trains a model ``f = f_s ∘ f_c`` whose first layers ``f_c`` run on the
device and the rest ``f_s`` on the server. Here a model is an ``nn.Sequential`` and its
top-level children are the cut points: ``cut_module(model, P)`` gives
``device = Sequential(children[:P])`` and ``server = Sequential(children[P:])`` for
``1 <= P <= L - 1`` (``L`` children), so that ``server(device(x)) == model(x)``.

The two parts share the model's layers (nothing is copied): build a
:class:`~roost.params.FlatModel` on each part, not on the whole. Each part has its own
flat layout (its parameters, then its floating-point buffers such as BatchNorm's running
statistics, :mod:`roost.params`), and :class:`SplitLayout` maps between the whole model's
flat vector and the two parts' vectors, so a split run's checkpoints, payloads and
averages can use the whole model's vector (``join``) while each side trains its own
(``split``). Names: the device part keeps the model's child indices (``"0.weight"``), the
server part renumbers its children from 0 (child ``P`` of the model is the server's
``"0"``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from roost.params import ParamLayout

__all__ = ["SplitLayout", "SplitModule", "cut_module", "num_cut_points"]


def _children(module: nn.Module) -> list[nn.Module]:
    if not isinstance(module, nn.Sequential):
        raise TypeError(
            f"split learning cuts an nn.Sequential between its top-level layers; "
            f"{type(module).__name__} is not one"
        )
    return list(module.children())


def num_cut_points(module: nn.Module) -> int:
    """``L - 1``: the cuts ``P = 1 .. L - 1`` of a Sequential with ``L`` children."""
    return len(_children(module)) - 1


def _whole_name(server_name: str, cut: int) -> str:
    """The model's name of a server-part tensor: its first index shifted by ``cut``."""
    head, _, rest = server_name.partition(".")
    return f"{int(head) + cut}.{rest}" if rest else str(int(head) + cut)


@dataclass(frozen=True)
class SplitLayout:
    """The whole model's flat layout and its two parts': ``device_index[i]`` is where the
    device vector's element ``i`` sits in the whole vector (``server_index`` likewise)."""

    full: ParamLayout
    device: ParamLayout
    server: ParamLayout
    device_index: torch.Tensor
    server_index: torch.Tensor

    @staticmethod
    def of(module: nn.Module, device: nn.Module, server: nn.Module, cut: int) -> SplitLayout:
        full = ParamLayout.of(module)
        where = {s.name: s for s in full.slots}

        def index(part: ParamLayout, shift: int) -> torch.Tensor:
            pieces = []
            for slot in part.slots:
                whole = where[_whole_name(slot.name, shift)]
                pieces.append(torch.arange(whole.offset, whole.offset + whole.numel))
            return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.int64)

        d_layout, s_layout = ParamLayout.of(device), ParamLayout.of(server)
        return SplitLayout(full, d_layout, s_layout, index(d_layout, 0), index(s_layout, cut))

    def split(self, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device part's and the server part's flat vectors of a whole-model vector."""
        if full.numel() != self.full.numel:
            raise ValueError(
                f"a whole-model vector has {self.full.numel} values, not {full.numel()}"
            )
        return full[self.device_index], full[self.server_index]

    def join(self, device: torch.Tensor, server: torch.Tensor) -> torch.Tensor:
        """The whole-model vector of the two parts' vectors (the inverse of :meth:`split`)."""
        if device.numel() != self.device.numel or server.numel() != self.server.numel:
            raise ValueError(
                f"the parts have {self.device.numel} and {self.server.numel} values, got "
                f"{device.numel()} and {server.numel()}"
            )
        out = torch.empty(self.full.numel, dtype=device.dtype, device=device.device)
        out[self.device_index] = device
        out[self.server_index] = server
        return out


@dataclass(frozen=True)
class SplitModule:
    """A model cut after its ``cut``-th top-level layer (see the module docstring)."""

    device: nn.Sequential
    server: nn.Sequential
    cut: int
    layout: SplitLayout


def cut_module(module: nn.Module, cut: int) -> SplitModule:
    """Cut ``module`` (an ``nn.Sequential``) after its ``cut``-th child; the parts share
    its layers. ValueError names the allowed cuts."""
    children = _children(module)
    last = len(children) - 1
    if isinstance(cut, bool) or not isinstance(cut, int) or not 1 <= cut <= last:
        allowed = f"1 .. {last}" if last >= 1 else "none (it has a single layer)"
        raise ValueError(
            f"cut={cut!r}: a cut leaves at least one layer on each side; this model has "
            f"{len(children)} top-level layers, so the cuts allowed are {allowed}"
        )
    device = nn.Sequential(*children[:cut])
    server = nn.Sequential(*children[cut:])
    return SplitModule(device, server, cut, SplitLayout.of(module, device, server, cut))
