"""autograd.Function over the two Triton custom ops ``fusecc::layer_norm_fwd`` / ``fusecc::layer_norm_bwd``."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from . import triton as _ops  # noqa: F401  (registers torch.ops.fusecc.layer_norm_fwd / _bwd)


class LayerNormFunction(torch.autograd.Function):
    """x ``[N, R, D]``, weight / bias ``[N, D]`` or None, eps -> y ``[N, R, D]``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float) -> Tensor:
        y, mean, rstd = torch.ops.fusecc.layer_norm_fwd(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]  # False for an absent weight / bias
        dx, dw, db = torch.ops.fusecc.layer_norm_bwd(dy, x, weight, mean, rstd, need_dw, need_db)
        return dx if need_dx else None, dw if need_dw else None, db if need_db else None, None
