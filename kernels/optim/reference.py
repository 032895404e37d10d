"""Pure-PyTorch fused optimizer steps: the test oracle for the Triton kernels and the fallback for CPU tensors.

A step updates every stacked parameter ``[N, *shape]`` of a list in place, model i with its own hyper-parameters.
Each per-model value arrives as a float (the same for all models), a sequence of N floats or an ``[N]`` tensor;
``sgd_hparams`` / ``adam_hparams`` turn them into the per-model coefficients both backends use (computed in
float64 like torch.optim's Python scalars, then rounded to fp32 once). The update itself runs in fp32, broadcasting
the coefficients over ``[N, 1, ..., 1]``, and is stored back in the parameter's dtype, with the same arithmetic as
``torch.optim``'s single-tensor SGD and Adam (torch's own CUDA and CPU kernels also compute in fp32 "opmath").
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor

PerModel = Union[float, Sequence[float], Tensor]  # a hyper-parameter: one value for all models, or one per model

# rows of the coefficient tables, in the order the kernels read them
SGD_ROWS = ("lr", "weight_decay", "momentum", "one_minus_dampening")
ADAM_ROWS = ("weight_decay", "decay", "one_minus_beta1", "beta2", "one_minus_beta2", "neg_step_size",
             "bias_correction2_sqrt", "eps")


def _per_model(name: str, value: PerModel, n: int) -> Tensor:
    """``value`` as a float64 ``[n]`` tensor (on its own device if it was a tensor, else on the CPU)."""
    if isinstance(value, Tensor):
        t = value.detach().to(torch.float64)
        if t.dim() == 0:
            return t.expand(n)
        if t.shape != (n,):
            raise ValueError(f"fusecc.kernels.optim: '{name}' has shape {list(t.shape)}, expected [] or [N={n}]")
        return t
    if isinstance(value, (int, float)):
        return torch.full((n,), float(value), dtype=torch.float64)
    vals = [float(v) for v in value]
    if len(vals) != n:
        raise ValueError(f"fusecc.kernels.optim: '{name}' has {len(vals)} values, expected 1 or N={n} (one per model)")
    return torch.tensor(vals, dtype=torch.float64)


def _table(rows: Sequence[Tensor], device: torch.device) -> Tensor:
    """Stack float64 ``[N]`` rows into the fp32 ``[R, N]`` coefficient table on ``device``."""
    dev = next((r.device for r in rows if r.device.type != "cpu"), torch.device("cpu"))
    return torch.stack([r.to(dev) for r in rows]).to(device=device, dtype=torch.float32)


def sgd_hparams(n: int, device: torch.device, *, lr: PerModel, weight_decay: PerModel = 0.0,
                momentum: PerModel = 0.0, dampening: PerModel = 0.0) -> Tensor:
    """The fp32 ``[4, N]`` table of SGD coefficients, rows ``SGD_ROWS``."""
    d = _per_model("dampening", dampening, n)
    return _table([_per_model("lr", lr, n), _per_model("weight_decay", weight_decay, n),
                   _per_model("momentum", momentum, n), 1 - d], device)


def adam_hparams(n: int, device: torch.device, *, lr: PerModel, beta1: PerModel, beta2: PerModel, eps: PerModel,
                 weight_decay: PerModel, step: PerModel, decoupled: bool) -> Tensor:
    """The fp32 ``[8, N]`` table of Adam coefficients, rows ``ADAM_ROWS``: torch.optim's Python-scalar (float64)
    arithmetic, ``step_size = lr / (1 - beta1**step)``, ``sqrt(1 - beta2**step)``, ``1 - lr * weight_decay``."""
    vals = [_per_model(k, v, n) for k, v in (("lr", lr), ("beta1", beta1), ("beta2", beta2),
                                              ("weight_decay", weight_decay), ("step", step))]
    dev = next((t.device for t in vals if t.device.type != "cpu"), torch.device("cpu"))
    lr_, b1, b2, wd, st = (t.to(dev) for t in vals)
    bias_correction1 = 1 - b1**st
    bias_correction2 = 1 - b2**st
    decay = 1 - lr_ * wd if decoupled else torch.ones_like(wd)
    return _table([wd, decay, 1 - b1, b2, 1 - b2, -(lr_ / bias_correction1), bias_correction2**0.5,
                   _per_model("eps", eps, n)], device)


def _bcast(row: Tensor, like: Tensor) -> Tensor:
    return row.view([-1] + [1] * (like.dim() - 1))


def sgd_step(params: Sequence[Tensor], grads: Sequence[Tensor], momentum_buffers: Optional[Sequence[Tensor]],
             hparams: Tensor, *, nesterov: bool = False, maximize: bool = False, first_step: bool = False) -> None:
    """SGD on ``[N, *shape]`` params in place; ``hparams`` is ``sgd_hparams(...)``. With ``first_step`` the
    momentum buffers are written (``buf = d``, as torch's first step clones the gradient), not read."""
    for i, (p, g) in enumerate(zip(params, grads)):
        lr, wd, mom, omd = (_bcast(h, p) for h in hparams)
        p32, g32 = p.float(), g.float()  # fp32 math, one rounding at the store (see the module docstring)
        if maximize:
            g32 = -g32
        d = torch.where(wd != 0, g32 + wd * p32, g32)  # torch skips the L2 term when weight_decay == 0
        if momentum_buffers is not None:
            buf = momentum_buffers[i]
            b32 = d if first_step else buf.float() * mom + omd * d
            upd = d + mom * b32 if nesterov else b32
            buf.copy_(b32)
            d = torch.where(mom != 0, upd, d)  # models without momentum take the plain gradient
        p.copy_(p32 + (-lr) * d)


def adam_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], max_exp_avg_sqs: Optional[Sequence[Tensor]], hparams: Tensor, *,
              decoupled: bool = False, maximize: bool = False) -> None:
    """Adam/AdamW on ``[N, *shape]`` params in place; ``hparams`` is ``adam_hparams(...)`` (which holds the step
    count); ``max_exp_avg_sqs`` turns on amsgrad."""
    for i, (p, g) in enumerate(zip(params, grads)):
        wd, decay, omb1, b2, omb2, neg_step_size, bc2_sqrt, eps = (_bcast(h, p) for h in hparams)
        p32, g32 = p.float(), g.float()  # fp32 math, one rounding at the store (see the module docstring)
        if maximize:
            g32 = -g32
        if decoupled:
            p32 = p32 * decay
        else:
            g32 = torch.where(wd != 0, g32 + wd * p32, g32)
        m, v = exp_avgs[i].float(), exp_avg_sqs[i].float()
        m = torch.where(omb1 < 0.5, m + omb1 * (g32 - m), g32 - (g32 - m) * (1 - omb1))  # aten's lerp
        v = v * b2 + (omb2 * g32) * g32
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        if max_exp_avg_sqs is not None:
            v = torch.maximum(max_exp_avg_sqs[i].float(), v)
            max_exp_avg_sqs[i].copy_(v)
        denom = v.sqrt() / bc2_sqrt + eps
        p.copy_(p32 + (neg_step_size * m) / denom)
