"""Fused multi-model optimizer steps: SGD and Adam/AdamW over stacked parameters ``[N, *shape]``, each model
with its own hyper-parameters, in one Triton launch per call (or the pure-PyTorch reference).

    from fusecc.kernels.optim import adam_step, sgd_step

This module never imports triton: only a call that picks the Triton backend does (``fusecc.kernels._backend``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _backend
from . import reference
from .reference import PerModel

__all__ = ["sgd_step", "adam_step"]


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]] = None,
             *, lr: PerModel, weight_decay: PerModel = 0.0, momentum: PerModel = 0.0, dampening: PerModel = 0.0,
             nesterov: bool = False, maximize: bool = False, first_step: bool = False,
             backend: Optional[str] = None) -> None:
    """One SGD step (``torch.optim.SGD``'s arithmetic) of N models, in place, in one launch.

    Args:
        params: stacked parameters, each ``[N, *shape]``, contiguous, one dtype (fp32, fp16 or bf16 for Triton).
        grads: their gradients, same shapes and dtype.
        momentum_buffers: one ``[N, *shape]`` buffer per param, or None for plain SGD. With ``first_step`` the
            buffers are only written (``buf = d``, torch's ``grad.clone()``): allocate them with ``torch.empty_like``.
        lr, weight_decay, momentum, dampening: a float, N floats or an ``[N]`` tensor each. A model whose
            momentum is 0 takes the plain (weight-decayed) gradient.
        nesterov, maximize: as torch.optim.SGD.
        backend: "auto", "triton" or "reference" (default: ``fusecc.kernels._backend.default_backend()``).

    Examples::

        >>> params = [torch.randn(3, 7, 5), torch.randn(3, 13)]
        >>> grads = [torch.randn_like(p) for p in params]
        >>> bufs = [torch.empty_like(p) for p in params]
        >>> sgd_step(params, grads, bufs, lr=[0.1, 0.01, 0.05], momentum=0.9, first_step=True)
    """
    n = _num_models("sgd_step", params)
    if momentum_buffers is None and any(float(m) != 0 for m in _values(momentum)):
        raise ValueError("fusecc.kernels.sgd_step: momentum != 0 needs momentum_buffers (one per param)")
    bufs = list(momentum_buffers) if momentum_buffers is not None else []
    tensors = list(params) + list(grads) + bufs
    hp = reference.sgd_hparams(n, params[0].device, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               dampening=dampening)
    if _backend.use_triton(tensors, backend, "sgd_step"):
        from . import triton as _triton  # noqa: F401  (registers torch.ops.fusecc.sgd_step)
        torch.ops.fusecc.sgd_step(list(params), list(grads), bufs, hp, nesterov, maximize, first_step)
    else:
        reference.sgd_step(params, grads, momentum_buffers, hp, nesterov=nesterov, maximize=maximize,
                           first_step=first_step)


def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]] = None, *, lr: PerModel,
              beta1: PerModel = 0.9, beta2: PerModel = 0.999, eps: PerModel = 1e-8, weight_decay: PerModel = 0.0,
              decoupled: bool = False, step: PerModel, maximize: bool = False,
              backend: Optional[str] = None) -> None:
    """One Adam (``decoupled=False``) or AdamW (``decoupled=True``) step of N models, in place, in one launch.

    Args:
        params: stacked parameters, each ``[N, *shape]``, contiguous, one dtype (fp32, fp16 or bf16 for Triton).
        grads, exp_avgs, exp_avg_sqs: gradients and moments, same shapes and dtype (zeros before the first step).
        max_exp_avg_sqs: amsgrad's running maxima (one per param), or None without amsgrad.
        lr, beta1, beta2, eps, weight_decay: a float, N floats or an ``[N]`` tensor each.
        step: the step being taken (1 for the first), for the bias corrections: a number or an ``[N]`` tensor
            (per-model step counts).
        maximize: as torch.optim.Adam.
        backend: "auto", "triton" or "reference".

    Examples::

        >>> params = [torch.randn(3, 7, 5), torch.randn(3, 13)]
        >>> grads = [torch.randn_like(p) for p in params]
        >>> m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
        >>> adam_step(params, grads, m, v, lr=[1e-3, 3e-4, 1e-2], weight_decay=0.01, decoupled=True, step=1)
    """
    n = _num_models("adam_step", params)
    maxs = list(max_exp_avg_sqs) if max_exp_avg_sqs is not None else []
    tensors = list(params) + list(grads) + list(exp_avgs) + list(exp_avg_sqs) + maxs
    hp = reference.adam_hparams(n, params[0].device, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                                weight_decay=weight_decay, step=step, decoupled=decoupled)
    if _backend.use_triton(tensors, backend, "adam_step"):
        from . import triton as _triton  # noqa: F401  (registers torch.ops.fusecc.adam_step)
        torch.ops.fusecc.adam_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), maxs, hp,
                                   decoupled, maximize)
    else:
        reference.adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hp, decoupled=decoupled,
                            maximize=maximize)


def _num_models(op: str, params: Sequence[Tensor]) -> int:
    if len(params) == 0:
        raise ValueError(f"fusecc.kernels.{op}: 'params' is empty")
    if params[0].dim() == 0:
        raise ValueError(f"fusecc.kernels.{op}: params must be stacked [N, ...]; params[0] is a scalar")
    return params[0].shape[0]


def _values(v: PerModel) -> Sequence[float]:
    if isinstance(v, Tensor):
        return v.detach().flatten().tolist()
    if isinstance(v, (int, float)):
        return [v]
    return list(v)
