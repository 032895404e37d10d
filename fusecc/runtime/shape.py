"""Shapes: a fused value's per-model size, a shared value given a model dim, per-model concatenation, indexing
with per-model tensors, containers of results."""

from __future__ import annotations

from typing import Any, List

import torch
from torch import Tensor


def pack(kind: str, items: List[Any]) -> Any:
    """A container of the fused results: ``kind`` "tuple", "list", or a ``torch.return_types`` name (``"sort"``), so
    an op's named result keeps its fields (``.values``, ``.indices``)."""
    if kind == "tuple":
        return tuple(items)
    if kind == "list":
        return list(items)
    return getattr(torch.return_types, kind)(items)


def index_select_per_model(x: Tensor, dim: int, index: Tensor) -> Tensor:
    """``x [N, ...]`` indexed along ``dim`` (a tensor dim, > 0) by a per-model ``index [N, K]`` (or ``[N]``, a 0-dim
    index per model): model n gets ``x[n].index_select(dim - 1, index[n])``, as one gather."""
    n = x.shape[0]
    idx = index.reshape(n, -1)
    view = [n] + [1] * (x.dim() - 1)
    view[dim] = idx.shape[1]
    out_shape = list(x.shape)
    out_shape[dim] = idx.shape[1]
    return torch.gather(x, dim, idx.reshape(view).expand(out_shape))


def narrow_per_model(x: Tensor, dim: int, start: Tensor, length: int) -> Tensor:
    """``x [N, ...]`` narrowed along ``dim`` (a tensor dim, > 0) from a per-model ``start [N]``: model n gets
    ``x[n].narrow(dim - 1, start[n], length)``, as one gather."""
    start = start.reshape(-1)
    start = torch.where(start < 0, start + x.shape[dim], start)
    return index_select_per_model(x, dim, start[:, None] + torch.arange(length, device=x.device, dtype=start.dtype))


def broadcast_copy(x: Tensor, src: Tensor) -> Tensor:
    """What ``x.copy_(src)`` (or ``x.fill_(src)``) leaves in a shared ``x`` for per-model ``src``: src broadcast to the
    joint shape, in x's dtype, as a new tensor (the shared x itself is not written)."""
    return src.to(x.dtype).expand(torch.broadcast_shapes(x.shape, src.shape)).clone()


def cat_folded(xs: List[Tensor], n: int, d: int) -> Tensor:
    """Per-model cat of folded tensors along their folded dim d (``[.., N*C_i, ..]`` -> ``[.., N*sum(C_i), ..]``):
    model n's channels of every input, then the next model's. Channels-last inputs (``[B, N*C, H, W]`` whose
    channels are the innermost dim in memory, as the convs and the GEMM convs write them) give a channels-last
    output, so the convs that read it need no copy; anything else is concatenated in its logical (NCHW) order."""
    if d == 1 and all(x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) for x in xs):
        parts = [x.permute(0, 2, 3, 1).unflatten(3, (n, -1)) for x in xs]  # [B, H, W, N, C_i] views
        return torch.cat(parts, 4).flatten(3).permute(0, 3, 1, 2)
    return torch.cat([x.unflatten(d, (n, -1)) for x in xs], d + 1).flatten(d, d + 1)


def model_size(x: Tensor, kind: str, dim: int, n: int) -> torch.Size:
    """The per-model ``x.size()`` of a fused value (kind "stacked": model dim at ``dim``; "folded": folded into
    ``dim``)."""
    s = list(x.shape)
    if kind == "stacked":
        del s[dim]
    else:
        s[dim] = s[dim] // n
    return torch.Size(s)


def expand_model(x: Tensor, dim: int, n: int) -> Tensor:
    """Give a shared value a model dim of size n at ``dim`` (a broadcast view, no copy)."""
    x = x.unsqueeze(dim)
    sizes = [-1] * x.dim()
    sizes[dim] = n
    return x.expand(sizes)
