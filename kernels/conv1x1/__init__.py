"""Per-model 1x1 (pointwise) convolution as a per-model GEMM on channels-last data.

A 1x1 conv of N models on the folded activation ``[B, N*C, H, W]`` is, in channels-last memory
(``[B*H*W, N, C]``), the per-model GEMM ``y[:, n, :] = x[:, n, :] @ W[n]^T``: the linear kernels
(kernels/linear/triton.py) run it through strides with no copy, and write the output channels-last. These layers
hold most of the FLOPs of MobileNet, DenseNet and ResNet bottlenecks. On CUDA tensors this runs the Triton kernels;
anywhere else one grouped ``F.conv2d`` (``reference.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ..linear.reference import ACTIVATIONS
from . import reference

__all__ = ["conv1x1"]


def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none", *,
            stride: Union[int, Tuple[int, int]] = 1, shared_input: bool = False,
            backend: Optional[str] = None) -> Tensor:
    """N 1x1 convolutions (no padding), model n reading channels ``n*C:(n+1)*C``.

    Args:
        x: ``[B, N*C, H, W]`` (model-major channels), or ``[B, C, H, W]`` read by every model if shared_input.
        weight: ``[N, M, C]`` or ``[N, M, C, 1, 1]``.
        bias: ``[N, M]`` or None.
        act: ``"none"``, ``"relu"``, ``"gelu"`` or ``"silu"``, applied in the epilogue.
        stride: an int or a pair; a stride > 1 reads every stride-th pixel (the Triton path subsamples x into a
            channels-last copy of ``1/stride^2`` of its size first).
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"reference"``.

    Returns:
        ``[B, N*M, H, W]`` (channels-last memory on the Triton path).

    Examples::

        >>> x, w = torch.randn(2, 4 * 8, 5, 5), torch.randn(4, 16, 8)
        >>> conv1x1(x, w).shape
        torch.Size([2, 64, 5, 5])
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"fusecc.kernels.conv1x1: unknown activation {act!r}; expected one of {list(ACTIVATIONS)}")
    if weight.dim() == 5:
        if tuple(weight.shape[-2:]) != (1, 1):
            raise ValueError(f"fusecc.kernels.conv1x1: weight must be [N, M, C, 1, 1], got {tuple(weight.shape)}")
        weight = weight.flatten(2)
    if weight.dim() != 3:
        raise ValueError(f"fusecc.kernels.conv1x1: weight must be [N, M, C], got shape {tuple(weight.shape)}")
    n, m, c = weight.shape
    cin = c if shared_input else n * c
    if x.dim() != 4 or x.shape[1] != cin:
        raise ValueError(f"fusecc.kernels.conv1x1: x must be [B, {'C' if shared_input else 'N*C'}, H, W] with "
                         f"{'C' if shared_input else 'N*C'}={cin}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n, m):
        raise ValueError(f"fusecc.kernels.conv1x1: bias must be [N, M] = [{n}, {m}], got shape {tuple(bias.shape)}")
    if not _backend.use_triton([x, weight, bias], backend, "conv1x1"):
        return reference.conv1x1(x, weight, bias, act, shared_input, stride)
    _backend.check_dtypes("conv1x1", x=x, weight=weight, bias=bias)
    from ..linear.function import LinearFunction
    from ..linear.triton import ACT_CODES

    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride)
    if (sh, sw) != (1, 1):
        x = x[:, :, ::sh, ::sw]
    b, _, h, w = x.shape
    rows = b * h * w
    xl = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # [B, H, W, Cin], a view
    if shared_input:
        x3 = xl.reshape(rows, c)
    else:
        x3 = xl.reshape(rows, n, c).permute(1, 0, 2)  # [N, rows, C], strides (C, N*C, 1): no copy
    y = LinearFunction.apply(x3, weight, bias, ACT_CODES[act], shared_input, True)  # [N, rows, M] of [rows, N, M]
    return y.permute(1, 0, 2).reshape(b, h, w, n * m).permute(0, 3, 1, 2)
