"""The one idea: every value of the fused graph knows where its model dimension sits.

A value of the fused graph is the N per-model values of the original graph, as one tensor (or a Python value the
same for every model). Its *layout* says where the model dimension is:

- ``None`` (shared): the value is the same for every model: a shared input, a constant, arithmetic on shared values.
- ``Stacked(d)``: the model dim is a tensor dim of its own, at position ``d``; ``Stacked(0)`` is
  ``[N, *per_model_shape]``, ``Stacked(1)`` is ``[B, N, ...]``.
- ``Folded(d)``: the model dim is merged, model-major, into per-model dim ``d``; ``Folded(1)`` of per-model
  ``[B, C, H, W]`` is ``[B, N*C, H, W]``, the layout in which a grouped conv, BatchNorm and pooling of N models are
  one ordinary op.

``Folded(d)`` and ``Stacked(d)`` convert by a free view (unflatten / flatten); ``Stacked(d)`` and ``Stacked(d')`` by a
movedim. Rules (fusecc/rules/) ask for the layout they need and the rewriter (fusecc/rewrite.py) emits the
conversions. Nothing here depends on any other part of fusecc.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map


@dataclass(frozen=True)
class Layout:
    """Where a fused value's model dim is: ``kind`` "stacked" or "folded", at per-model/tensor dim ``dim``."""

    kind: str
    dim: int

    @property
    def stacked(self) -> bool:
        return self.kind == "stacked"

    @property
    def folded(self) -> bool:
        return self.kind == "folded"

    def __repr__(self) -> str:
        return f"{self.kind.capitalize()}({self.dim})"


def Stacked(dim: int) -> Layout:  # noqa: N802 - reads as a layout constructor
    """The model dim is tensor dim ``dim`` of its own."""
    return Layout("stacked", dim)


def Folded(dim: int) -> Layout:  # noqa: N802
    """The model dim is merged model-major into per-model dim ``dim``."""
    return Layout("folded", dim)


def has_model_dim(layout: Any) -> bool:
    """True if any leaf of a layout tree (a Layout, or a tuple/list/dict of them for a container value) is one."""
    if layout is None:
        return False
    if isinstance(layout, Layout):
        return True
    if isinstance(layout, dict):
        return any(has_model_dim(v) for v in layout.values())
    if isinstance(layout, (tuple, list)):
        return any(has_model_dim(v) for v in layout)
    return False


class Value:
    """A value of the fused graph: its ``node`` (an fx.Node of the fused graph, or a Python constant), its
    ``layout`` (see the module docstring) and ``meta``, the per-model value from shape propagation (a meta tensor
    of one model's shape and dtype, or a Python value)."""

    __slots__ = ("node", "layout", "meta")

    def __init__(self, node: Any, layout: Any, meta: Any):
        self.node = node
        self.layout = layout
        self.meta = meta

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.meta, Tensor)

    @property
    def rank(self) -> int:
        """The per-model rank (the fused tensor has one more dim when stacked)."""
        return self.meta.dim()

    @property
    def per_model(self) -> bool:
        return has_model_dim(self.layout)

    def __repr__(self) -> str:
        m = f"T{list(self.meta.shape)}" if self.is_tensor else type(self.meta).__name__
        return f"Value({self.node}, {self.layout}, {m})"


def is_per_model(x: Any) -> bool:
    """Is x a Value that differs between the models (its layout carries a model dim)?"""
    return isinstance(x, Value) and x.per_model


def to_meta(x: Any) -> Any:
    """Every tensor of a pytree replaced by a meta tensor of the same shape and dtype (keeps no data)."""
    return tree_map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, Tensor) else t, x)


def norm_dim(d: int, rank: int) -> int:
    """A per-model dim index, made non-negative (a 0-dim tensor takes 0 and -1, as torch does)."""
    if rank == 0 and d in (0, -1):
        return 0
    if not -rank <= d < rank:
        raise IndexError(f"dim {d} out of range for a per-model tensor of rank {rank}")
    return d % rank
