"""Pure-PyTorch per-model LayerNorm: the test oracle, the CPU path and the export path (aten ops only)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def layer_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float = 1e-5) -> Tensor:
    """``y[n] = F.layer_norm(x[n], (D,), weight[n], bias[n], eps)``: x ``[N, *, D]``, weight and bias ``[N, D]``.

    One ``F.layer_norm`` without affine over all N models, then the per-model affine as one ``addcmul`` with
    weight and bias viewed as ``[N, 1, ..., 1, D]``.
    """
    y = F.layer_norm(x, (x.shape[-1],), None, None, eps)
    affine_shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    if weight is None and bias is None:
        return y
    if weight is None:
        return y + bias.reshape(affine_shape)
    if bias is None:
        return y * weight.reshape(affine_shape)
    return torch.addcmul(bias.reshape(affine_shape), y, weight.reshape(affine_shape))
