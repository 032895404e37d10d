"""routed_linear: each row of a batch goes through the linear layer of its own model (Punica / S-LoRA style
serving of many fine-tuned models in one batch).

    from fusecc.kernels.routed_linear import routed_linear, RoutedLinear

On CUDA tensors this runs Triton kernels (``triton.py``); elsewhere, or with ``backend="reference"``, the pure
PyTorch ``reference.py``. Triton is imported only when a call picks it.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .. import _backend
from . import reference

__all__ = ["routed_linear", "RoutedLinear"]

_OP = "routed_linear"


def _check_inputs(x: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor]) -> None:
    p = f"fusecc.kernels.{_OP}"
    if x.dim() != 2:
        raise ValueError(f"{p}: expected x of shape [R, K], got {list(x.shape)}; flatten the leading dims first")
    if weight.dim() != 3:
        raise ValueError(f"{p}: expected weight of shape [N, M, K], got {list(weight.shape)}")
    n, m, k = weight.shape
    if n == 0:
        raise ValueError(f"{p}: weight holds no model (shape {list(weight.shape)}); expected N >= 1")
    if x.shape[1] != k:
        raise ValueError(f"{p}: x [R, K] = {list(x.shape)} has K = {x.shape[1]} but weight [N, M, K] = "
                         f"{list(weight.shape)} has K = {k}")
    if bias is not None and tuple(bias.shape) != (n, m):
        raise ValueError(f"{p}: expected bias of shape [N, M] = {[n, m]}, got {list(bias.shape)}")
    if idx.device != x.device:
        raise ValueError(f"{p}: idx is on {idx.device} but x is on {x.device}; move them to one device")
    _backend.check_model_index(_OP, idx, x.shape[0], n, f"weight with N = {n} models")


def routed_linear(
    x: Tensor,
    idx: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    r"""Apply to each row of ``x`` the linear layer of the model it is routed to.

    ``y[r] = x[r] @ weight[idx[r]].T + bias[idx[r]]``; a row with ``idx[r] == -1`` belongs to no model: its output
    is zero and it gets zero gradient. Rows need not be sorted by model, and models without rows cost nothing.

    Args:
        x (Tensor): the rows, ``[R, K]``.
        idx (Tensor): integer model index of each row, ``[R]``, in ``[-1, N)``.
        weight (Tensor): the N models' weights, ``[N, M, K]`` (``nn.Linear`` layout per model).
        bias (Optional[Tensor]): the N models' biases, ``[N, M]``, or None.
        backend (Optional[str]): ``"auto"`` (Triton on CUDA, else the reference), ``"triton"`` or
            ``"reference"``; None follows ``fusecc.kernels.use_backend`` / ``$FUSECC_KERNELS``.

    Returns:
        Tensor: ``[R, M]``, in the dtype of ``x``.

    Raises:
        TypeError: ``idx`` is not an integer tensor (or, on Triton, the float dtypes differ or are unsupported).
        ValueError: wrong shapes or devices, or an index outside ``[-1, N)`` (the check reads ``idx`` on the host,
            except while compiling or capturing a CUDA graph).

    Examples::

        >>> import torch
        >>> from fusecc.kernels.routed_linear import routed_linear
        >>> x = torch.randn(5, 8)                       # [R, K]
        >>> w, b = torch.randn(3, 4, 8), torch.randn(3, 4)  # N=3 models, [N, M, K] and [N, M]
        >>> idx = torch.tensor([2, 0, -1, 2, 1])        # [R]: row 2 goes to no model
        >>> y = routed_linear(x, idx, w, b)             # [R, M] = [5, 4]
        >>> torch.allclose(y[0], x[0] @ w[2].T + b[2], atol=1e-6), bool((y[2] == 0).all())
        (True, True)
    """
    _check_inputs(x, idx, weight, bias)
    if not _backend.use_triton([x, weight, bias], backend, _OP):
        return reference.routed_linear(x, idx, weight, bias)
    _backend.check_dtypes(_OP, x=x, weight=weight, bias=bias)
    if idx.dtype not in (torch.int32, torch.int64):  # the launcher sorts idx and compares it with -1
        idx = idx.long()
    from .function import RoutedLinearFunction

    return RoutedLinearFunction.apply(x, idx, weight, bias)


class RoutedLinear(nn.Module):
    """N linear layers ``in_features -> out_features`` (one per model); ``forward(x, idx)`` sends row r of x
    ``[R, in_features]`` through model ``idx[r]`` (-1: a zero row). Initialised like N separate ``nn.Linear``."""

    def __init__(self, num_models: int, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.num_models, self.in_features, self.out_features = num_models, in_features, out_features
        kw = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(num_models, out_features, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(num_models, out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_features) if self.in_features else 0.0  # nn.Linear's bounds
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor, idx: Tensor) -> Tensor:
        return routed_linear(x, idx, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"num_models={self.num_models}, in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")
