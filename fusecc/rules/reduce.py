"""Reductions and ops along a dim (sum, mean, amax, softmax, cumsum, sort, ...): the dim is mapped around the
model dim; a full reduction reduces every dim but the model dim."""

from __future__ import annotations

from typing import Any, List

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..values import Stacked, Value, norm_dim
from .pointwise import fuse_elementwise
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


@register_rule(*[getattr(torch, n) for n in _REDUCTIONS if hasattr(torch, n)],
               *[n for n in _REDUCTIONS if hasattr(torch.Tensor, n)], by_name=True, rank0=True)
def fuse_reduction(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    name = _name(node)
    x = args[0]
    other = arg(args, kwargs, 1, "other")
    if name in ("max", "min") and isinstance(other, Value) and other.is_tensor:
        return fuse_elementwise(ctx, node, args, kwargs)
    dpos, kpos = _REDUCTIONS[name]
    if name == "aminmax":
        dim = kwargs.get("dim")
        keepdim = kwargs.get("keepdim", False)
        if dim is not None:  # keyword-only dim
            p = norm_dim(const(dim), x.rank)
            x = free_of(ctx, x, [p])
            k = dict(kwargs, dim=ctx.tensor_dim(x, p))
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
                return ctx.out(new, (Stacked(0), Stacked(0)))
            else:
                new = ctx.call(getattr(torch, name), flat, 1)
            if keepdim:
                new = ctx.method("reshape", new, [ctx.n] + [1] * x.rank)
            return ctx.out(new, Stacked(0))
        xs = ctx.stacked(x)
        d = xs.layout.dim
        tdims = [p for p in range(x.rank + 1) if p != d]
        a, k = set_arg(args, kwargs, dpos, "dim", tdims)
        a = (xs,) + tuple(a[1:])
        new = ctx.emit_like(node, a, k)
        ctx.record("reduction", "over every per-model dim")
        return ctx.out(new, _tuple_like(ctx, Stacked(d) if keepdim else Stacked(0)))
    dims = _dims(dim, x.rank)
    x = free_of(ctx, x, dims)
    td = [ctx.tensor_dim(x, p) for p in dims]
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
    "glu": (1, "dim", -1), "roll": (2, "dims", None), "diff": (2, "dim", -1),
}


@register_rule(
    F.softmax, F.log_softmax, F.softmin, F.normalize, F.glu, torch.softmax, torch.log_softmax, torch.cumsum,
    torch.cumprod, torch.logcumsumexp, torch.cummax, torch.cummin, torch.sort, torch.argsort, torch.topk,
    torch.flip, torch.roll, torch.diff,
    "softmax", "log_softmax", "cumsum", "cumprod", "logcumsumexp", "cummax", "cummin", "sort", "argsort", "topk",
    "flip", "roll", "diff", "cumsum_", by_name=True, rank0=True,
)
def fuse_dimwise(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    name = _name(node).rstrip("_")
    x = args[0]
    pos, kw, default = _DIMWISE[name]
    dim = arg(args, kwargs, pos, kw, default)
    if name == "normalize" and kw not in kwargs and len(args) <= pos:
        dim = 1
    if name == "roll" and (dim is None or isinstance(const(dim), (list, tuple)) and len(const(dim)) == 0):
        xs = ctx.stacked(x, 0)  # roll over each model's flattened tensor
        flat = ctx.method("reshape", xs, ctx.n, -1)
        rolled = ctx.call(torch.roll, flat, arg(args, kwargs, 1, "shifts"), 1)
        ctx.record("roll", "over each model's flattened tensor")
        return ctx.out(ctx.method("reshape", rolled, [ctx.n] + list(x.meta.shape)), Stacked(0))
    if dim is None:
        if name in ("softmax", "log_softmax", "softmin"):
            dim = _softmax_dim(name, x.rank)
        else:
            raise Decline(f"{name} without a dim")
    if name == "diff":
        return _diff(ctx, node, args, kwargs, norm_dim(const(dim), x.rank))
    dims = _dims(dim, x.rank)
    x = free_of(ctx, x, dims)
    td = [ctx.tensor_dim(x, p) for p in dims]
    # flip/roll take a list of dims (by keyword, an int is not accepted)
    a, k = set_arg(args, kwargs, pos, kw, td[0] if isinstance(const(dim), int) and kw == "dim" else td)
    new = ctx.emit_like(node, (x,) + tuple(a[1:]), k)
    ctx.record(name, "along a per-model dim of the fused tensor")
    return ctx.out(new, _tuple_like(ctx, x.layout))


def _diff(ctx, node: fx.Node, args: tuple, kwargs: dict, p: int) -> Value:
    """diff(x, n, dim, prepend, append): x and the tensors it is concatenated with, in one stacked layout (a shared
    one broadcast to every model), then diff along the mapped dim."""
    x = args[0]
    n = arg(args, kwargs, 1, "n", 1)
    pre, app = arg(args, kwargs, 3, "prepend"), arg(args, kwargs, 4, "append")
    xs = ctx.stacked(x, 0)
    extra = {}
    for name, t in (("prepend", pre), ("append", app)):
        if isinstance(t, Value) and t.is_tensor:
            if t.rank != x.rank:  # a 0-dim prepend/append is broadcast along dim by torch: give it x's other sizes
                raise Decline(f"diff with a {name} of rank {t.rank} on a per-model input of rank {x.rank}")
            extra[name] = ctx.stacked(t, 0)
        elif t is not None:
            extra[name] = t
    ctx.record("diff", "along a per-model dim of the fused tensor")
    return ctx.out(ctx.call(torch.diff, xs, n, p + 1, **extra), Stacked(0))


_DIM_MODULES = {nn.Softmax: F.softmax, nn.LogSoftmax: F.log_softmax, nn.Softmin: F.softmin, nn.GLU: F.glu}


@register_rule(torch.renorm, "renorm", "renorm_", by_name=True)
def fuse_renorm(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """renorm(x, p, dim, maxnorm) rescales each slice ``x.select(dim, i)`` whose p-norm over ALL its other dims exceeds
    maxnorm. On the fused tensor those other dims would include the model dim, so the models' slices are made rows of
    their own: ``[N, D, rest]`` viewed as ``[N*D, rest]``, renormed along dim 0, and put back."""
    x = args[0]
    if x.rank == 0:
        raise Decline("renorm of a 0-dim tensor")
    p = norm_dim(const(arg(args, kwargs, 2, "dim")), x.rank)
    xs = ctx.stacked(x, 0)
    moved = ctx.call(torch.movedim, xs, p + 1, 1)  # [N, D, *rest]
    rows = ctx.method("reshape", moved, ctx.n * x.meta.shape[p], -1)
    normed = ctx.call(torch.renorm, rows, arg(args, kwargs, 1, "p"), 0, arg(args, kwargs, 3, "maxnorm"))
    shape = [ctx.n, x.meta.shape[p]] + [s for i, s in enumerate(x.meta.shape) if i != p]
    y = ctx.call(torch.movedim, ctx.method("reshape", normed, shape), 1, p + 1)
    ctx.record("renorm", "per model, slices as rows")
    if node.op == "call_method" and node.target == "renorm_":
        return ctx.out(ctx.method("copy_", xs, y), Stacked(0))
    return ctx.out(y, Stacked(0))


@register_rule(nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.GLU, nn.Softmax2d, rank0=True)
def fuse_dim_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
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
    return ctx.out(ctx.call(fn, x, ctx.tensor_dim(x, p)), x.layout)
