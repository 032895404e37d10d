"""Per-model LayerNorm: N models' LayerNorms over the last dim in one kernel launch (``fusecc.kernels.layer_norm``).

    from fusecc.kernels.layer_norm import layer_norm, LayerNorm
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import _backend
from . import reference

__all__ = ["layer_norm", "LayerNorm"]


def _check_shapes(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> None:
    if x.dim() < 2:
        raise ValueError(f"fusecc.kernels.layer_norm: expected x of shape [N, *, D], got {list(x.shape)}; "
                         "stack the N models' inputs on a new dim 0")
    expected = [x.shape[0], x.shape[-1]]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and list(t.shape) != expected:
            raise ValueError(f"fusecc.kernels.layer_norm: expected {name} of shape [N, D] = {expected} for x "
                             f"{list(x.shape)}, got {list(t.shape)}; stack the N models' {name}s on dim 0")


def layer_norm(
    x: Tensor,
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    eps: float = 1e-5,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """LayerNorm of N models at once: ``y[n] = F.layer_norm(x[n], (D,), weight[n], bias[n], eps)``.

    Args:
        x: ``[N, R, D]``, or ``[N, *, D]`` with any number of middle dims (the N models' inputs, stacked). Any
            strides on the leading dims; the Triton kernel copies x only if its last dim is not contiguous.
        weight: ``[N, D]`` per-model scale, or None for no scale.
        bias: ``[N, D]`` per-model shift, or None for no shift.
        eps: added to the variance before the square root.
        backend: "auto" (Triton on CUDA tensors, the reference elsewhere), "triton" or "reference"; None takes
            the ``fusecc.kernels.use_backend`` / ``$FUSECC_KERNELS`` default.

    Returns:
        ``[N, *, D]`` in x's dtype. The Triton path computes the statistics and the affine in fp32; it takes
        rows of at most 64 KB (D <= 32768 in fp16/bf16, 16384 in fp32).

    Examples:
        >>> import torch
        >>> from fusecc.kernels.layer_norm import layer_norm
        >>> x = torch.randn(3, 16, 64)  # 3 models, 16 rows each, 64 features
        >>> w, b = torch.randn(3, 64), torch.randn(3, 64)
        >>> y = layer_norm(x, w, b)
        >>> y.shape
        torch.Size([3, 16, 64])
        >>> ref = torch.nn.functional.layer_norm(x[1], (64,), w[1], b[1])
        >>> torch.allclose(y[1], ref, atol=1e-5)
        True
    """
    _check_shapes(x, weight, bias)
    if not _backend.use_triton([x, weight, bias], backend, "layer_norm"):
        return reference.layer_norm(x, weight, bias, eps)
    _backend.check_dtypes("layer_norm", x=x, weight=weight, bias=bias)
    from .function import LayerNormFunction  # imports triton: only on this path

    n, d = x.shape[0], x.shape[-1]
    y = LayerNormFunction.apply(x.reshape(n, math.prod(x.shape[1:-1]), d), weight, bias, float(eps))
    return y.view(x.shape)


class LayerNorm(nn.Module):
    """N LayerNorms over the last dim, one per model: x ``[N, *, D]`` -> ``[N, *, D]``, weight and bias ``[N, D]``.

    Examples:
        >>> import torch
        >>> from fusecc.kernels.layer_norm import LayerNorm
        >>> m = LayerNorm(4, 32)
        >>> m(torch.randn(4, 10, 32)).shape
        torch.Size([4, 10, 32])
    """

    def __init__(self, n_models: int, dim: int, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 *, backend: Optional[str] = None, device=None, dtype=None) -> None:
        super().__init__()
        self.n_models, self.dim, self.eps, self.backend = n_models, dim, eps, backend
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.ones(n_models, dim, **kw)) if elementwise_affine else None
        self.bias = nn.Parameter(torch.zeros(n_models, dim, **kw)) if elementwise_affine and bias else None

    def forward(self, x: Tensor) -> Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"n_models={self.n_models}, dim={self.dim}, eps={self.eps}, "
                f"elementwise_affine={self.weight is not None}, bias={self.bias is not None}")
