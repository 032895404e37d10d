"""Reductions and ops along a dim (sum, mean, amax, softmax, cumsum, sort, ...): the dim is mapped around the
model dim; a full reduction reduces every dim but the model dim."""

from __future__ import annotations

from typing import Any, List

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..lower import S, V, norm_dim
from .registry import Decline, arg, const, register_rule, set_arg
from .shape import free_of, layout_after_removal


def _tuple_like(ctx, lay: Any) -> Any:
    meta = ctx.node.meta.get("fusecc_pm")
    if isinstance(meta, tuple):  # (values, indices) and friends
        return tuple(lay for _ in meta)
    return lay


def _dims(d: Any, rank: int) -> List[int]:
    d = const(d)
    if isinstance(d, int):
        return [norm_dim(d, rank)]
    return [norm_dim(p, rank) for p in d]


# name -> (position of dim, keyword of dim, position of keepdim or None)
_REDUCTIONS = {
    "sum": (1, 2), "mean": (1, 2), "nansum": (1, 2), "nanmean": (1, 2), "amax": (1, 2), "amin": (1, 2),
    "prod": (1, 2), "logsumexp": (1, 2), "all": (1, 2), "any": (1, 2), "argmax": (1, 2), "argmin": (1, 2),
    "max": (1, 2), "min": (1, 2), "median": (1, 2), "nanmedian": (1, 2), "mode": (1, 2),
    "std": (1, 3), "var": (1, 3), "std_mean": (1, 3), "var_mean": (1, 3), "count_nonzero": (1, None),
    "aminmax": (None, None), "kthvalue": (2, 3),
}


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else node.target.__name__


@register_rule(*[getattr(torch, n) for n in _REDUCTIONS if hasattr(torch, n)], *_REDUCTIONS)
def fuse_reduction(ctx, node: fx.Node, args: tuple, kwargs: dict) -> V:
    name = _name(node)
    x = args[0]
    if name in ("max", "min") and isinstance(arg(args, kwargs, 1, "other"), V) and arg(args, kwargs, 1, "other").is_tensor:
        from .pointwise import fuse_elementwise

        return fuse_elementwise(ctx, node, args, kwargs)
    dpos, kpos = _REDUCTIONS[name]
    if name == "aminmax":
        dim = kwargs.get("dim")
        keepdim = kwargs.get("keepdim", False)
        if dim is not None:  # keyword-only dim
            p = norm_dim(const(dim), x.rank)
            x = free_of(ctx, x, [p])
            k = dict(kwargs, dim=ctx.tdim(x, p))
            new = ctx.emit_like(node, (x,), k)
            lay = x.layout if keepdim else layout_after_removal(x.layout, [p])
            ctx.record("reduction", "along a per-model dim of the fused tensor")
            return ctx.out(new, (lay, lay))
    elif name == "kthvalue":
        dim = arg(args, kwargs, dpos, "dim", -1)
        keepdim = const(arg(args, kwargs, kpos, "keepdim", False))
    else:
        dim = arg(args, kwargs, dpos, "dim")
        keepdim = const(arg(args, kwargs, kpos, "keepdim", False)) if kpos is not None else False
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):
        # reduce every per-model dim: one result per model
        if name in ("argmax", "argmin", "median", "nanmedian", "mode", "max", "min", "count_nonzero", "aminmax",
                    "prod"):
            xs = ctx.stacked(x, 0)
            flat = ctx.method("reshape", xs, ctx.n, -1)
            if name in ("max", "min", "median", "nanmedian", "mode"):
                new = ctx.call(getattr(torch, name), flat, 1)
                new = ctx.call(__import__("operator").getitem, new, 0)
            elif name == "aminmax":
                new = ctx.call(torch.aminmax, flat, dim=1)
                return ctx.out(new, (S(0), S(0)))
            else:
                new = ctx.call(getattr(torch, name), flat, 1)
            if keepdim:
                new = ctx.method("reshape", new, [ctx.n] + [1] * x.rank)
            return ctx.out(new, S(0))
        xs = ctx.stacked(x)
        d = xs.layout.dim
        tdims = [p for p in range(x.rank + 1) if p != d]
        a, k = set_arg(args, kwargs, dpos, "dim", tdims)
        a = (xs,) + tuple(a[1:])
        new = ctx.emit_like(node, a, k)
        ctx.record("reduction", "over every per-model dim")
        return ctx.out(new, _tuple_like(ctx, S(d) if keepdim else S(0)))
    dims = _dims(dim, x.rank)
    x = free_of(ctx, x, dims)
    td = [ctx.tdim(x, p) for p in dims]
    a, k = set_arg(args, kwargs, dpos, "dim", td[0] if isinstance(const(dim), int) else td)
    a = (x,) + tuple(a[1:])
    new = ctx.emit_like(node, a, k)
    lay = x.layout if keepdim else layout_after_removal(x.layout, dims)
    ctx.record("reduction", "along a per-model dim of the fused tensor")
    return ctx.out(new, _tuple_like(ctx, lay))


def _softmax_dim(name: str, rank: int) -> int:
    # torch.nn.functional._get_softmax_dim: the legacy implicit choice
    return 0 if rank in (0, 1, 3) else 1


# ops that keep the rank and act along one (or a few) dims: name -> (position of dim, keyword, default)
_DIMWISE = {
    "softmax": (1, "dim", None), "log_softmax": (1, "dim", None), "softmin": (1, "dim", None),
    "cumsum": (1, "dim", None), "cumprod": (1, "dim", None), "logcumsumexp": (1, "dim", None),
    "cummax": (1, "dim", None), "cummin": (1, "dim", None), "sort": (1, "dim", -1), "argsort": (1, "dim", -1),
    "topk": (2, "dim", -1), "flip": (1, "dims", None), "normalize": (2, "dim", 1),
    "glu": (1, "dim", -1), "roll": (2, "dims", None), "diff": (2, "dim", -1), "renorm": (2, "dim", None),
}


@register_rule(
    F.softmax, F.log_softmax, F.softmin, F.normalize, F.glu, torch.softmax, torch.log_softmax, torch.cumsum,
    torch.cumprod, torch.logcumsumexp, torch.cummax, torch.cummin, torch.sort, torch.argsort, torch.topk,
    torch.flip, torch.roll, torch.diff, torch.renorm,
    "softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "argsort", "topk",
    "flip", "roll", "diff", "renorm", "cumsum_",
)
def fuse_dimwise(ctx, node: fx.Node, args: tuple, kwargs: dict) -> V:
    name = _name(node).rstrip("_")
    x = args[0]
    pos, kw, default = _DIMWISE[name]
    dim = arg(args, kwargs, pos, kw, default)
    if name == "normalize" and kw not in kwargs and len(args) <= pos:
        dim = 1
    if dim is None:
        if name in ("softmax", "log_softmax", "softmin"):
            dim = _softmax_dim(name, x.rank)
        elif name == "roll":  # roll over the flattened tensor
            raise Decline("roll without dims")
        else:
            raise Decline(f"{name} without a dim")
    dims = _dims(dim, x.rank)
    x = free_of(ctx, x, dims)
    td = [ctx.tdim(x, p) for p in dims]
    a, k = set_arg(args, kwargs, pos, kw, td[0] if isinstance(const(dim), int) else td)
    new = ctx.emit_like(node, (x,) + tuple(a[1:]), k)
    ctx.record(name, "along a per-model dim of the fused tensor")
    return ctx.out(new, _tuple_like(ctx, x.layout))


_DIM_MODULES = {nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax, nn.Softmin: F.softmin, nn.GLU: F.glu}


@register_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU, nn.Softmax2d)
def fuse_dim_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> V:
    m = ctx.module(node)
    x = args[0]
    if not x.per_model:
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    if isinstance(m, nn.Softmax2d):
        if x.rank not in (3, 4):
            raise Decline(f"Softmax2d expects a 3D or 4D per-model input, got {x.rank}D")
        fn, dim = F.softmax, -3
    else:
        fn = _DIM_MODULES[type(m)]
        dim = m.dim if m.dim is not None else _softmax_dim(fn.__name__, x.rank)
    p = norm_dim(dim, x.rank)
    x = free_of(ctx, x, [p])
    ctx.record(type(m).__name__.lower(), "along a per-model dim of the fused tensor")
    return ctx.out(ctx.call(fn, x, ctx.tdim(x, p)), x.layout)
