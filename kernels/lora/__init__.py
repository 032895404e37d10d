"""lora: the low-rank (LoRA) update of many adapters in one launch, each row through its own model's adapter
(Punica's SGMV, S-LoRA): ``y = scale * (x @ A^T) @ B^T`` per model, as peft's ``lora.Linear`` adds it to the
base layer's output.

    from fusecc.kernels.lora import lora_update, batched_lora_update

On CUDA tensors this runs one Triton kernel (``triton.py``) that fuses the shrink (to the rank) and the expand;
elsewhere, or with ``backend="reference"``, the pure PyTorch ``reference.py`` (peft's maths per model). Triton is
imported only when a call picks it.

Adapters of different ranks share one ``r``: zero-pad each model's ``lora_A.weight`` with zero rows and its
``lora_B.weight`` with zero columns. The padding is exact (it adds zero products), and its gradients are zero.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .. import _backend
from . import reference

__all__ = ["lora_update", "batched_lora_update"]

_OP = "lora"


def _check_adapters(p: str, k: int, lora_a: Tensor, lora_b: Tensor, scale: Tensor, where: str) -> None:
    """lora_a [N, r, K], lora_b [N, M, r], scale [N] float, N >= 1, K matching the input's."""
    if lora_a.dim() != 3:
        raise ValueError(f"{p}: expected lora_a of shape [N, r, K], got {list(lora_a.shape)}")
    if lora_b.dim() != 3:
        raise ValueError(f"{p}: expected lora_b of shape [N, M, r], got {list(lora_b.shape)}")
    n, r, ka = lora_a.shape
    if n == 0:
        raise ValueError(f"{p}: lora_a holds no model (shape {list(lora_a.shape)}); expected N >= 1")
    if ka != k:
        raise ValueError(f"{p}: {where} has K = {k} but lora_a [N, r, K] = {list(lora_a.shape)} has K = {ka}")
    if lora_b.shape[0] != n or lora_b.shape[2] != r:
        raise ValueError(f"{p}: expected lora_b of shape [N, M, r] with N = {n}, r = {r} (from lora_a [N, r, K] = "
                         f"{list(lora_a.shape)}), got {list(lora_b.shape)}; pad every adapter to one rank")
    if tuple(scale.shape) != (n,):
        raise ValueError(f"{p}: expected scale of shape [N] = [{n}] (one scaling per model), got {list(scale.shape)}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"{p}: scale must be a float tensor (lora_alpha / r per model), got {scale.dtype}")


def _check_devices(p: str, **tensors: Tensor) -> None:
    devices = {str(t.device) for t in tensors.values()}
    if len(devices) > 1:
        got = ", ".join(f"{k} on {t.device}" for k, t in tensors.items())
        raise ValueError(f"{p}: expected every tensor on one device, got {got}")


def _check_inputs(x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> None:
    p = f"fusecc.kernels.{_OP}.lora_update"
    if x.dim() != 2:
        raise ValueError(f"{p}: expected x of shape [R, K], got {list(x.shape)}; flatten the leading dims first")
    _check_adapters(p, x.shape[1], lora_a, lora_b, scale, f"x [R, K] = {list(x.shape)}")
    n = lora_a.shape[0]
    _check_devices(p, x=x, idx=idx, lora_a=lora_a, lora_b=lora_b, scale=scale)
    _backend.check_model_index(_OP, idx, x.shape[0], n, f"N = {n} adapters")


def lora_update(
    x: Tensor,
    idx: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Apply to each row of ``x`` the LoRA update of the model it is routed to.

    ``y[i] = scale[n] * ((x[i] @ lora_a[n].T) @ lora_b[n].T)`` with ``n = idx[i]``: peft's
    ``lora_B(lora_A(x)) * scaling`` per model. A row with ``idx[i] == -1`` belongs to no model: its output is zero
    and it gets zero gradient. Rows need not be sorted by model, and models without rows cost nothing. On CUDA, one
    kernel launch for all models (after a device-side sort of ``idx``).

    Gradients flow to ``x``, ``lora_a`` and ``lora_b``; ``scale`` is a constant (no gradient). The Triton backward
    chains routed_linear's Triton ops (see ``fusecc.kernels.lora.function``).

    Args:
        x (Tensor): the rows, ``[R, K]``.
        idx (Tensor): integer model index of each row, ``[R]``, in ``[-1, N)``.
        lora_a (Tensor): the N down projections, ``[N, r, K]`` (peft's ``lora_A.weight`` per model). Adapters of
            lower rank are padded with zero rows to one ``r``.
        lora_b (Tensor): the N up projections, ``[N, M, r]`` (peft's ``lora_B.weight``; zero columns as padding).
        scale (Tensor): per-model scaling ``lora_alpha / r``, ``[N]``; keep it float32 (Triton computes in it).
        backend (Optional[str]): ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or
            ``"reference"``; None follows ``fusecc.kernels.use_backend`` / ``$FUSECC_KERNELS``.

    Returns:
        Tensor: ``[R, M]``, in the dtype of ``x``.

    Raises:
        TypeError: ``idx`` is not an integer tensor or ``scale`` not a float one (or, on Triton, x / lora_a / lora_b
            differ in dtype or have one the kernels do not take).
        ValueError: wrong shapes or devices, an index outside ``[-1, N)`` (the check reads ``idx`` on the host,
            except while compiling or capturing a CUDA graph), or on Triton a rank above 256.

    Examples::

        >>> import torch
        >>> from fusecc.kernels.lora import lora_update
        >>> x = torch.randn(5, 8)                                  # [R, K]
        >>> a, b = torch.randn(3, 4, 8), torch.randn(3, 6, 4)      # N=3 adapters of rank 4: [N, r, K], [N, M, r]
        >>> scale = torch.tensor([2.0, 0.5, 1.0])                  # lora_alpha / r per adapter
        >>> idx = torch.tensor([2, 0, -1, 2, 1])                   # [R]: row 2 goes to no model
        >>> y = lora_update(x, idx, a, b, scale)                   # [R, M] = [5, 6]
        >>> torch.allclose(y[0], (x[0] @ a[2].T) @ b[2].T, atol=1e-5), bool((y[2] == 0).all())
        (True, True)
    """
    _check_inputs(x, idx, lora_a, lora_b, scale)
    if not _backend.use_triton([x, lora_a, lora_b, scale], backend, _OP):
        return reference.lora_update(x, idx, lora_a, lora_b, scale)
    _backend.check_dtypes(_OP, x=x, lora_a=lora_a, lora_b=lora_b)
    if idx.dtype not in (torch.int32, torch.int64):  # the launcher sorts idx and compares it with -1
        idx = idx.long()
    from .function import LoraFunction

    return LoraFunction.apply(x, idx, lora_a, lora_b, scale.detach().to(torch.float32))


def batched_lora_update(
    x: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scale: Tensor,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""The LoRA update of N models, model n on its own rows ``x[n]``.

    ``y[n] = scale[n] * ((x[n] @ lora_a[n].T) @ lora_b[n].T)``: ``lora_update`` with every model owning T rows
    (``idx = arange(N).repeat_interleave(T)``), on a path that needs no sort: one kernel launch, which reads ``x``
    through its strides.

    Gradients flow to ``x``, ``lora_a`` and ``lora_b`` (the Triton backward runs ``torch.bmm``); ``scale`` is a
    constant.

    Args:
        x (Tensor): model n's rows in ``x[n]``, ``[N, T, K]``.
        lora_a (Tensor): ``[N, r, K]`` (peft's ``lora_A.weight`` per model, zero rows as rank padding).
        lora_b (Tensor): ``[N, M, r]`` (peft's ``lora_B.weight`` per model, zero columns as rank padding).
        scale (Tensor): per-model scaling ``lora_alpha / r``, ``[N]``; keep it float32.
        backend (Optional[str]): ``"auto"``, ``"triton"`` or ``"reference"`` (see ``lora_update``).

    Returns:
        Tensor: ``[N, T, M]``, in the dtype of ``x``.

    Raises:
        TypeError: ``scale`` is not a float tensor (or, on Triton, the dtypes differ or are unsupported).
        ValueError: wrong shapes or devices, or on Triton a rank above 256.

    Examples::

        >>> import torch
        >>> from fusecc.kernels.lora import batched_lora_update
        >>> x = torch.randn(3, 5, 8)                               # [N, T, K]
        >>> a, b = torch.randn(3, 4, 8), torch.randn(3, 6, 4)      # [N, r, K], [N, M, r]
        >>> y = batched_lora_update(x, a, b, torch.full((3,), 2.0))
        >>> y.shape, torch.allclose(y[1], 2.0 * (x[1] @ a[1].T) @ b[1].T, atol=1e-5)
        (torch.Size([3, 5, 6]), True)
    """
    p = f"fusecc.kernels.{_OP}.batched_lora_update"
    if x.dim() != 3:
        raise ValueError(f"{p}: expected x of shape [N, T, K], got {list(x.shape)}")
    _check_adapters(p, x.shape[2], lora_a, lora_b, scale, f"x [N, T, K] = {list(x.shape)}")
    if x.shape[0] != lora_a.shape[0]:
        raise ValueError(f"{p}: x [N, T, K] = {list(x.shape)} has N = {x.shape[0]} but lora_a [N, r, K] = "
                         f"{list(lora_a.shape)} has N = {lora_a.shape[0]}")
    _check_devices(p, x=x, lora_a=lora_a, lora_b=lora_b, scale=scale)
    if not _backend.use_triton([x, lora_a, lora_b, scale], backend, _OP):
        return reference.batched_lora_update(x, lora_a, lora_b, scale)
    _backend.check_dtypes(_OP, x=x, lora_a=lora_a, lora_b=lora_b)
    from .function import BatchedLoraFunction

    return BatchedLoraFunction.apply(x, lora_a, lora_b, scale.detach().to(torch.float32))
