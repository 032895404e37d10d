"""The autograd.Functions around the lora Triton forward (the kernel takes strides: no copies needed).

The backward runs no lora kernel of its own (see ``triton.lora_bwd`` / ``triton.batched_lora_bwd``): routed rows
go through routed_linear's Triton ops (routed GEMMs for dt and dx, per-model segment sums for dA and dB, t
recomputed), batched ones through ``torch.bmm``. ``scale`` is a constant: it gets no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import triton as _t  # registers torch.ops.fusecc.lora_fwd / lora_batched_fwd

_ops = torch.ops.fusecc


class LoraFunction(torch.autograd.Function):
    """``y[i] = scale[n] * (x[i] @ A[n]^T) @ B[n]^T`` with ``n = idx[i]`` (zero where ``idx[i] == -1``)."""

    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(x, idx, lora_a, lora_b, scale)
        return _ops.lora_fwd(x, idx, lora_a, lora_b, scale)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, idx, lora_a, lora_b, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, da, db = _t.lora_bwd(dy, x, idx, lora_a, lora_b, scale, need[0], need[2], need[3])
        return dx, None, da, db, None


class BatchedLoraFunction(torch.autograd.Function):
    """``y[n] = scale[n] * (x[n] @ A[n]^T) @ B[n]^T``, x ``[N, T, K]``."""

    @staticmethod
    def forward(ctx, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
        ctx.save_for_backward(x, lora_a, lora_b, scale)
        return _ops.lora_batched_fwd(x, lora_a, lora_b, scale)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, lora_a, lora_b, scale = ctx.saved_tensors
        need = ctx.needs_input_grad
        dx, da, db = _t.batched_lora_bwd(dy, x, lora_a, lora_b, scale, need[0], need[1], need[2])
        return dx, da, db, None


lora_update = LoraFunction.apply
batched_lora_update = BatchedLoraFunction.apply
