"""Training helpers for fused modules: per-model losses and per-model gradient clipping."""

from __future__ import annotations

import math
from typing import Any, Callable, List

import torch
from torch import Tensor

from .kernels.optim import PerModel  # a scalar, or one value per model


def per_model_loss(loss_fn: Callable[..., Tensor], outputs: Any, targets: Any, *, shared_targets: bool = False,
                   **kwargs: Any) -> Tensor:
    """Apply any torch loss per model: ``[loss_fn(outputs[i], targets[i]) for i in range(N)]`` as a tensor ``[N]``.

    Sum the result (``loss.sum().backward()``), don't average it: the gradient of the sum with respect to model
    i's weights is exactly model i's own gradient (each term depends on one model only). A mean would scale every
    gradient by 1/N, which changes each model's effective learning rate.

    Args:
        loss_fn: e.g. ``F.cross_entropy`` or an ``nn.Module`` loss; extra keyword arguments are passed to it.
        outputs: the fused module's output ``[N, B, ...]``.
        targets: ``[N, B, ...]``, or the same targets for every model with ``shared_targets=True``.
    """
    if not isinstance(outputs, Tensor) or outputs.dim() == 0:
        raise ValueError("fusecc.per_model_loss: outputs must be the fused output [N, B, ...]")
    n = outputs.shape[0]
    if not shared_targets and isinstance(targets, Tensor) and (targets.dim() == 0 or targets.shape[0] != n):
        raise ValueError(
            f"fusecc.per_model_loss: targets have shape {list(targets.shape)}, expected a leading model dim of size "
            f"{n}; pass shared_targets=True if every model has the same targets"
        )
    return torch.stack([loss_fn(outputs[i], targets if shared_targets else targets[i], **kwargs) for i in range(n)])


def _grads(module_or_params: Any) -> List[Tensor]:
    params = module_or_params.parameters() if hasattr(module_or_params, "parameters") else module_or_params
    return [p.grad for p in params if p.grad is not None]


def _per_model_values(value: PerModel, n: int, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float32 if not like.is_floating_point() else like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.shape != (n,):
        raise ValueError(f"fusecc.utils: '{name}' has {t.numel()} values, expected 1 or num_models={n}")
    return t


def clip_grad_norm_(module_or_params: Any, max_norm: PerModel, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False) -> Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for each model separately. Returns the N total norms ``[N]``.

    Model i's norm is taken over slice i of every stacked gradient; ``max_norm`` may differ per model.
    """
    grads = _grads(module_or_params)
    if not grads:
        return torch.zeros(0)
    n = grads[0].shape[0]
    if norm_type == math.inf:
        norms = torch.stack([g.detach().abs().flatten(1).amax(1) for g in grads]).amax(0)
    else:
        per = torch.stack([torch.linalg.vector_norm(g.detach().flatten(1), norm_type, dim=1) for g in grads])
        norms = torch.linalg.vector_norm(per, norm_type, dim=0)
    if error_if_nonfinite and not torch.isfinite(norms).all():
        bad = int((~torch.isfinite(norms)).nonzero()[0])
        raise RuntimeError(f"fusecc.utils.clip_grad_norm_: the gradient norm of model {bad} is non-finite")
    mx = _per_model_values(max_norm, n, norms, "max_norm")
    coef = torch.clamp(mx / (norms + 1e-6), max=1.0)
    for g in grads:
        g.detach().mul_(coef.to(g.dtype).view([n] + [1] * (g.dim() - 1)))
    return norms


def clip_grad_value_(module_or_params: Any, clip_value: PerModel) -> None:
    """``torch.nn.utils.clip_grad_value_`` with a clip value per model (scalar or length N)."""
    for g in _grads(module_or_params):
        n = g.shape[0]
        c = _per_model_values(clip_value, n, g, "clip_value").view([n] + [1] * (g.dim() - 1))
        g.detach().copy_(torch.maximum(torch.minimum(g.detach(), c), -c))

