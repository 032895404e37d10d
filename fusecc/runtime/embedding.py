"""Embedding tables of N models, looked up as one table."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def stacked_embedding(
    idx: Tensor,
    weight: Tensor,
    padding_idx: Optional[int],
    idx_stacked: bool,
    scale_grad_by_freq: bool,
    sparse: bool,
    max_norm: Optional[float] = None,
    norm_type: float = 2.0,
) -> Tensor:
    """Per-model embedding tables ``[N, V, D]`` looked up as ONE table ``[N*V, D]`` with per-model offsets.

    idx is ``[N, *]`` (idx_stacked) or shared ``[*]``; the result is ``[N, *, D]``. With a padding_idx the looked-up
    padding rows get no gradient (as in ``F.embedding``), for every model. With ``max_norm`` the rows looked up are
    renormalised in place in the stacked table (a view of it: each model's own rows), as ``F.embedding`` does.
    """
    n, v, _ = weight.shape
    if not idx_stacked:
        idx = idx.unsqueeze(0)
    offsets = torch.arange(n, device=idx.device, dtype=idx.dtype).view([n] + [1] * (idx.dim() - 1)) * v
    table = weight.view(n * v, -1) if max_norm is not None else weight.flatten(0, 1)  # view: renorm writes through
    out = F.embedding(idx + offsets, table, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    if padding_idx is not None:
        keep = (idx != padding_idx).unsqueeze(-1)
        out = torch.where(keep, out, out.detach())
    return out
