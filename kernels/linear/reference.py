"""Pure-PyTorch per-model linear: the test oracle, the CPU path and the export path (aten ops only)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS = ("none", "relu", "gelu", "silu")


def activation(z: Tensor, act: str) -> Tensor:
    """The epilogue activation (``gelu`` is the exact, erf-based one, as ``F.gelu``'s default)."""
    if act == "none":
        return z
    if act == "relu":
        return F.relu(z)
    if act == "gelu":
        return F.gelu(z)
    if act == "silu":
        return F.silu(z)
    raise ValueError(f"fusecc.kernels.linear: unknown activation {act!r}; expected one of {list(ACTIVATIONS)}")


def activation_(z: Tensor, act: str) -> Tensor:
    """``activation`` in place where torch has the in-place op (relu, silu): for a GEMM's fresh output, so a large
    fused activation is not allocated (and page-faulted in) twice. Autograd allows it: no GEMM backward reads its
    output."""
    if act == "relu":
        return z.relu_()
    if act == "silu":
        return F.silu(z, inplace=True)
    return activation(z, act)


class _BatchedLinear(torch.autograd.Function):
    """``baddbmm(b, x, W^T)`` with a backward that writes dW ``[N, M, K]`` contiguous, like W.

    Autograd's own baddbmm backward produces the gradient of ``W^T`` and transposes it, so accumulating it into
    ``W.grad`` is a strided copy of every weight: half of an MLP fleet's training step on the CPU (3.6 of 6.9 ms
    for 8 x Linear(784, 512), batch 8). Here dW = dy^T @ x is one bmm into the right layout.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        wt = weight.transpose(1, 2)
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, weight = ctx.saved_tensors
        # under autocast the forward ran in dy's dtype (bf16, say) on fp32 operands: compute in it, as autocast's
        # own backward does, and return each gradient in its input's dtype
        dt = dy.dtype
        dx = torch.bmm(dy, weight.to(dt)).to(x.dtype) if ctx.needs_input_grad[0] else None
        dw = torch.bmm(dy.transpose(1, 2), x.to(dt)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        db = dy.sum(1).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db


def batched_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none") -> Tensor:
    """``y[n] = act(x[n] @ weight[n]^T + bias[n])``: x ``[N, R, K]``, weight ``[N, M, K]``, bias ``[N, M]``."""
    if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad or bias is not None and bias.requires_grad):
        return activation_(_BatchedLinear.apply(x, weight, bias), act)
    wt = weight.transpose(1, 2)
    z = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)
    return activation_(z, act)


def batched_linear_out(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor) -> Tensor:
    """``x[n] @ weight[n]^T + bias[n]`` into ``out`` ``[N, R, M]`` (any strides), with no autograd."""
    wt = weight.transpose(1, 2)
    if bias is None:
        return torch.bmm(x, wt, out=out)
    return torch.baddbmm(bias.unsqueeze(1), x, wt, out=out)


def wide_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none") -> Tensor:
    """Shared input: x ``[R, K]`` -> ``[R, N*M]`` (model-major), ONE GEMM with the N weights concatenated."""
    return activation_(F.linear(x, weight.flatten(0, 1), None if bias is None else bias.reshape(-1)), act)
