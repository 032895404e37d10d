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


def batched_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none") -> Tensor:
    """``y[n] = act(x[n] @ weight[n]^T + bias[n])``: x ``[N, R, K]``, weight ``[N, M, K]``, bias ``[N, M]``."""
    wt = weight.transpose(1, 2)
    z = torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)
    return activation(z, act)


def wide_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none") -> Tensor:
    """Shared input: x ``[R, K]`` -> ``[R, N*M]`` (model-major), ONE GEMM with the N weights concatenated."""
    k = weight.shape[-1]
    return activation(F.linear(x, weight.reshape(-1, k), None if bias is None else bias.reshape(-1)), act)
