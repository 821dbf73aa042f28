"""How a family declares its exportable components once, as data.

Export, parity, calibration, engine build and runtime binding all read these declarations
(through the manifest); none of them names a family or a component. A component's `role`
(`runtime.sections.ROLES`) says what it does; components on a path (image, text) are chained in
declaration order, each input bound to the earlier output or path source of the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import INSTRUCTION_SOURCES, role_paths


@dataclass(frozen=True)
class ComponentDecl:
    """One exportable graph of a family."""

    name: str
    role: str  # runtime.sections.ROLES
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    dims: dict[str, DimRange]
    build: Callable[[nn.Module], nn.Module]  # model -> module whose forward(*inputs) returns outputs
    calibration_data: str = "images"  # "images" | "texts": fed through its path; "none": weight-only
    parity_atol: float = 1e-4
    int_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # integer inputs: [low, high)
    # The paths it runs on, where its role may run on several (`sections.role_paths`): a shared
    # encoder lists every modality's path, a tokenizer its own; empty: every path of its role.
    paths: tuple[str, ...] = ()


def decl_paths(decl: ComponentDecl) -> tuple[str, ...]:
    """The paths a component runs on: those it names, else its role's."""
    return decl.paths or role_paths(decl.role)


def reads_instruction(decls: tuple[ComponentDecl, ...]) -> bool:
    """Whether a component takes the image path's instruction (it needs an instruction tokenizer)."""
    return any(s.name in INSTRUCTION_SOURCES for d in decls for s in d.inputs)


class _Bound(nn.Module):
    def __init__(self, model: nn.Module, attr: str):
        super().__init__()
        self.model, self.attr = model, attr

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.attr)(*inputs)


def bound(attr: str) -> Callable[[nn.Module], nn.Module]:
    """A component builder whose module's forward is `model.<attr>(*inputs)` (a method or submodule)."""
    return lambda model: _Bound(model, attr)


def within(attr: str, builder: Callable[[nn.Module], nn.Module]) -> Callable[[nn.Module], nn.Module]:
    """A builder applied to the submodule `model.<attr>` (a family reusing another's declarations)."""
    return lambda model: builder(getattr(model, attr))
