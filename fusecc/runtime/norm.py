"""Normalisation that never mixes models: BatchNorm / InstanceNorm / GroupNorm over N*C channels (N*G groups) of the
folded layout, LayerNorm / RMSNorm with a per-model affine."""

from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fusecc.kernels import layer_norm as kernels_layer_norm


def batch_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    momentum: Optional[float],
    eps: float,
    num_batches_tracked: Optional[Tensor],
) -> Tensor:
    """BatchNorm of N models on a folded input ``[B, N*C, *]``; stats and affine are stacked ``[N, C]``.

    Statistics are per channel of ``N*C``, so they never mix models; running stats are updated in place through
    views of the stacked buffers. Mirrors ``torch.nn.modules.batchnorm._BatchNorm.forward``.
    """
    eaf = 0.0 if momentum is None else momentum
    if training and num_batches_tracked is not None:
        num_batches_tracked.add_(1)
        if momentum is None:
            eaf = 1.0 / float(num_batches_tracked[0])
    bn_training = training or (running_mean is None and running_var is None)
    # in training the running statistics are updated through views of the stacked buffers (view, never a copy);
    # in eval they are only read, and may be a shared tensor broadcast to [N, C] (reshape copies it)
    flat = (lambda t: t.view(-1)) if bn_training else (lambda t: t.reshape(-1))
    return F.batch_norm(
        x,
        None if running_mean is None else flat(running_mean),
        None if running_var is None else flat(running_var),
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        bn_training,
        eaf,
        eps,
    )


def instance_norm(
    x: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    use_input_stats: bool,
    momentum: float,
    eps: float,
) -> Tensor:
    """InstanceNorm of N models on a folded input ``[B, N*C, *]``."""
    return F.instance_norm(
        x,
        None if running_mean is None else running_mean.view(-1),
        None if running_var is None else running_var.view(-1),
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        use_input_stats,
        momentum,
        eps,
    )


def group_norm(x: Tensor, num_groups: int, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
    """GroupNorm of N models on a folded input ``[B, N*C, *]`` as ONE group norm with ``N*G`` groups."""
    return F.group_norm(
        x,
        num_groups,
        None if weight is None else weight.reshape(-1),
        None if bias is None else bias.reshape(-1),
        eps,
    )


def affine(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor]) -> Tensor:
    """``y * weight + bias`` with weight/bias already viewed to broadcast per model (None = absent)."""
    if weight is not None and bias is not None:
        return torch.addcmul(bias, y, weight)
    if weight is not None:
        return y * weight
    if bias is not None:
        return y + bias
    return y


def layer_norm(
    x: Tensor,
    normalized_shape: List[int],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    affine_shape: List[int],
) -> Tensor:
    """LayerNorm with per-model affine: normalise (no affine), then ``addcmul`` with weight viewed as affine_shape.

    Over the last dim with a stacked x (model dim at ``md``), fusecc.kernels.layer_norm does both in one pass on
    ``[N, *, D]`` strided views (the Triton kernel on CUDA; this same normalise-then-addcmul elsewhere).
    """
    n, md = affine_shape[0], x.dim() - len(affine_shape)
    if len(normalized_shape) == 1 and md >= 0 and x.shape[md] == n and all(s == 1 for s in affine_shape[1:-1]):
        y = kernels_layer_norm.layer_norm(
            x.movedim(md, 0), None if weight is None else weight.reshape(n, -1),
            None if bias is None else bias.reshape(n, -1), eps,
        )
        return y.movedim(0, md)
    y = F.layer_norm(x, normalized_shape, None, None, eps)
    return affine(
        y,
        None if weight is None else weight.reshape(affine_shape),
        None if bias is None else bias.reshape(affine_shape),
    )


def rms_norm(
    x: Tensor, normalized_shape: List[int], weight: Optional[Tensor], eps: Optional[float], affine_shape: List[int]
) -> Tensor:
    """RMSNorm with per-model weight viewed as affine_shape."""
    y = F.rms_norm(x, normalized_shape, None, eps)
    return y if weight is None else y * weight.reshape(affine_shape)
