"""What the compiler reads about a fleet: N models stacked into one module (the pipeline's input, never written).

:class:`fusecc.api.FusedModule` holds the stacked parameters and buffers; each compile gets a :class:`Fleet`
describing them (names, per-model shapes and dtypes, tied names, train/eval modes, device) and returns what the
module must add (constants the trace made, fallback templates) in its result, instead of writing into the module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, Optional, Sequence, Tuple

import torch
import torch.nn as nn


@dataclass(frozen=True)
class StackedTensor:
    """One parameter or buffer of the fused module, under its canonical qualname: stacked ``[N, *shape]``, or, when
    it was bitwise equal in every model (a frozen trunk, a LoRA base), stored once as ``shape`` (``shared``)."""

    name: str
    shape: Tuple[int, ...]  # per model
    dtype: torch.dtype
    is_parameter: bool
    shared: bool = False  # one value for every model: no model dim

    def meta(self) -> torch.Tensor:
        """A meta tensor of one model's slice (shape and dtype, no data)."""
        return torch.empty(self.shape, dtype=self.dtype, device="meta")


@dataclass(frozen=True)
class Constant:
    """A plain tensor attribute of the models (neither parameter nor buffer), held by the fused module as a buffer:
    once if it is equal in every model, stacked ``[N, ...]`` if not."""

    buffer: str  # its name in the fused module
    stacked: bool
    shape: Tuple[int, ...]  # per model
    dtype: torch.dtype


@dataclass(frozen=True)
class Fleet:
    n: int
    prototype: nn.Module  # a copy of model 0: its code and configuration are every model's; traced, never run on data
    source: str  # the models' class name, for messages and generated code
    tensors: Dict[str, StackedTensor]  # canonical qualname -> the stacked tensor
    aliases: Dict[str, str]  # every parameter/buffer qualname (tied ones too) -> canonical qualname
    constants: Dict[str, Constant]  # tensor attribute qualname -> how the fused module holds it
    training: Dict[str, bool]  # module path ("" for the root) -> train mode now
    device: torch.device
    kernels: bool  # whether fused ops that have a Triton kernel will run it (parameters on CUDA, or forced)
    chooser: Any  # fusecc.choose.Chooser: the per-layer lowering choice (its tuning cache)
    leaf_modules: Sequence[Any] = ()
    strict: bool = False  # a fallback loop (a layer with no rule) is an error, not a warning
    reserved: FrozenSet[str] = field(default_factory=frozenset)  # attribute names taken on the module

    def tensor(self, qualname: str) -> Optional[StackedTensor]:
        canon = self.aliases.get(qualname)
        return None if canon is None else self.tensors[canon]

    def is_shared(self, qualname: str) -> bool:
        t = self.tensor(qualname)
        return t is not None and t.shared

    def is_training(self, path: str) -> bool:
        return self.training.get(path, self.training.get("", False))


def placeholders(module: nn.Module) -> Dict[int, Any]:
    """A deepcopy memo that replaces every parameter and buffer of ``module`` by an empty meta tensor."""
    memo: Dict[int, Any] = {}
    for t in list(module.parameters()) + list(module.buffers()):
        meta = torch.empty(t.shape, dtype=t.dtype, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return memo


def skeleton(module: nn.Module) -> nn.Module:
    """A copy of ``module`` (code, configuration, train/eval flags) whose parameters and buffers are empty meta
    tensors, to be filled in or run with ``functional_call``: the prototype's tensors are views of the fused module's
    stacked ones, and deepcopying them would copy every model."""
    return copy.deepcopy(module, placeholders(module))
