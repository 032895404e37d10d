"""The autograd.Function around the routed_linear Triton ops (the kernels take strides: no copies needed)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import triton as _ops  # noqa: F401  (registers torch.ops.fusecc.routed_linear_*)


class RoutedLinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, idx, weight)
        ctx.has_bias = bias is not None
        return torch.ops.fusecc.routed_linear_fwd(x, idx, weight, bias)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, idx, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.ops.fusecc.routed_linear_bwd_dx(dy, idx, weight)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            dw, db = torch.ops.fusecc.routed_linear_bwd_dw(dy, x, idx, weight.shape[0])
        return dx, None, dw, db if ctx.has_bias else None


routed_linear = RoutedLinearFunction.apply
