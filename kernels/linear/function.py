"""autograd for the per-model linear: save, call the ops, nothing else."""

from __future__ import annotations

import torch

from . import triton as _t  # noqa: F401  (registers torch.ops.fusecc.linear_*)

_ops = torch.ops.fusecc


class LinearFunction(torch.autograd.Function):
    """``act(x @ W^T + b)`` per model; ``shared``: x ``[R, K]`` for all models; ``interleaved``: y stored
    ``[R, N, M]`` (returned as its ``[N, R, M]`` view)."""

    @staticmethod
    def forward(ctx, x, weight, bias, act: int, shared: bool, interleaved: bool):
        store_z = act >= 2 and any(ctx.needs_input_grad[:3])  # gelu/silu need z; relu's derivative reads y
        y, z = _ops.linear_fwd(x, weight, bias, act, shared, interleaved, store_z)
        ctx.save_for_backward(x, weight, z if store_z else y)
        ctx.act, ctx.shared, ctx.has_bias = act, shared, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, z = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _ops.linear_bwd_dx(dy, z, weight, x, ctx.act, ctx.shared)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            dw, db = _ops.linear_bwd_dw(dy, z, x, weight, ctx.act, ctx.shared, ctx.has_bias)
            db = db if ctx.has_bias else None
        return dx, dw, db, None, None, None
