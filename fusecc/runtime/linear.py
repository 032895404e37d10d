"""Linear layers of N models: one batched GEMM (per-model inputs) or one wide GEMM (a shared input)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusecc.kernels import linear as kernels_linear
from fusecc.kernels import lora as kernels_lora


def batched_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none", impl: str = "bmm") -> Tensor:
    """Per-model linear: ``y[n] = act(x[n] @ weight[n]^T + bias[n])``.

    x ``[N, *, K]``, weight ``[N, M, K]``, bias ``[N, M]`` or None -> ``[N, *, M]``. ``impl`` "bmm": the Triton kernel
    on CUDA (bias and activation in its epilogue), ``baddbmm`` elsewhere (fusecc.kernels.linear); "loop": N
    ``F.linear`` calls, stacked (fusecc/choose.py picks it per layer when it measures faster).
    """
    if impl == "loop":
        # unbind, not x[i]: the backward of N unbinds is one stack, of N indexings N full-size scatters
        bs = [None] * weight.shape[0] if bias is None else bias.unbind(0)
        y = torch.stack([F.linear(xi, wi, bi) for xi, wi, bi in zip(x.unbind(0), weight.unbind(0), bs)])
        return kernels_linear.reference.activation_(y, act)
    return kernels_linear.batched_linear(x, weight, bias, act)


def low_rank_update(x: Tensor, a: Tensor, b: Tensor, scale: Tensor) -> Tensor:
    """Every model's LoRA update ``scale[n] * (x[n] @ a[n]^T) @ b[n]^T`` in ONE launch on CUDA (the Triton kernel of
    fusecc.kernels.lora: shrink and expand fused, like Punica's SGMV); the aten reference elsewhere.

    x ``[N, *, K]``, a ``[N, r, K]``, b ``[N, M, r]``, scale ``[N]`` (per-model) or ``[]`` (shared) -> ``[N, *, M]``.
    """
    n = a.shape[0]
    s = scale.detach().reshape(-1).to(torch.float32)
    if s.numel() == 1:
        s = s.expand(n)
    y = kernels_lora.batched_lora_update(x.reshape(n, -1, x.shape[-1]), a, b, s.contiguous())
    return y.reshape(x.shape[:-1] + (b.shape[1],))


def wide_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none") -> Tensor:
    """N linears on one shared input as ONE GEMM with the N weights concatenated.

    x ``[*, K]`` (the same for every model), weight ``[N, M, K]``, bias ``[N, M]`` -> ``[*, N*M]`` (model-major).
    """
    return kernels_linear.wide_linear(x, weight, bias, act)


def batched_bilinear(x1: Tensor, x2: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """Per-model bilinear: ``y[n] = F.bilinear(x1[n], x2[n], weight[n], bias[n])``, as ONE einsum.

    x1 ``[N, *, I]``, x2 ``[N, *, J]`` (a shared input arrives broadcast, an expanded view), weight ``[N, O, I, J]``,
    bias ``[N, O]`` or None -> ``[N, *, O]``.
    """
    n, o = weight.shape[0], weight.shape[1]
    lead = tuple(x1.shape[1:-1])
    a, c = x1.reshape(n, -1, x1.shape[-1]), x2.reshape(n, -1, x2.shape[-1])
    y = torch.einsum("nri,noij,nrj->nro", a, weight, c)
    if bias is not None:
        y = y + bias.unsqueeze(1)
    return y.reshape((n,) + lead + (o,))

