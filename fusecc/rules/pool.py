"""Ops on the spatial dims only (pooling, upsampling, padding, pixel shuffle): run on the folded layout
``[B, N*C, *sp]``, where the model dim is just more channels."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..values import Folded, Value
from .registry import Decline, arg, const, register_rule

_POOL_MODULES = {
    nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3,
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3, nn.AdaptiveMaxPool1d: 1,
    nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3, nn.LPPool1d: 1, nn.LPPool2d: 2, nn.Upsample: None,
    nn.UpsamplingNearest2d: 2, nn.UpsamplingBilinear2d: 2, nn.PixelShuffle: 2, nn.PixelUnshuffle: 2,
    nn.ZeroPad1d: 1, nn.ZeroPad2d: 2, nn.ZeroPad3d: 3, nn.ConstantPad1d: 1, nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3, nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReflectionPad3d: 3,
    nn.ReplicationPad1d: 1, nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3, nn.CircularPad1d: 1,
    nn.CircularPad2d: 2, nn.CircularPad3d: 3, nn.ChannelShuffle: 2,
}
if hasattr(nn, "LPPool3d"):
    _POOL_MODULES[nn.LPPool3d] = 3

_POOL_FNS = {
    F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3, F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
    F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3, F.adaptive_max_pool1d: 1,
    F.adaptive_max_pool2d: 2, F.adaptive_max_pool3d: 3, F.lp_pool1d: 1, F.lp_pool2d: 2, F.interpolate: None,
    F.upsample: None, F.pixel_shuffle: 2, F.pixel_unshuffle: 2, F.max_pool2d_with_indices: 2,
    F.max_pool1d_with_indices: 1, F.max_pool3d_with_indices: 3, F.adaptive_max_pool2d_with_indices: 2,
}


def spatial(ctx, node: fx.Node, args: tuple, kwargs: dict, nd: int | None, kind: str) -> Value:
    x = args[0]
    if nd is None:  # interpolate: every dim after (batch, channel)
        nd = x.rank - 2 if x.rank >= 3 else x.rank - 1
    ch = x.rank - nd - 1
    if ch not in (0, 1):
        raise Decline(f"{kind} expects a {nd + 1}D or {nd + 2}D per-model input, got {x.rank}D")
    if ch == 1 and x.layout == Folded(0):  # the N*B batch of a shared-weight trunk: per sample, as it is
        xf = x
        ctx.record(kind, "on the N*B batch")
    else:
        xf = ctx.folded(x, ch)
        ctx.record(kind, "on the folded tensor (model dim as channels)")
    new = ctx.emit_like(node, (xf,) + tuple(args[1:]), kwargs)
    meta = ctx.node.meta.get("fusecc_pm")
    lay = tuple(xf.layout for _ in meta) if isinstance(meta, tuple) else xf.layout
    return ctx.out(new, lay)


@register_rule(*_POOL_MODULES)
def fuse_spatial_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    if not args[0].per_model:
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    nd = _POOL_MODULES[type(m)]
    if isinstance(m, nn.ChannelShuffle):
        raise Decline("ChannelShuffle mixes channels across the folded model dim")
    if isinstance(m, (nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d, nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d)):
        return _pad(ctx, node, args[0], m.padding, "constant")
    return spatial(ctx, node, args, kwargs, nd, type(m).__name__.lower())


@register_rule(*_POOL_FNS)
def fuse_spatial_fn(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    return spatial(ctx, node, args, kwargs, _POOL_FNS[node.target], node.target.__name__)


def _pad(ctx, node: fx.Node, x: Value, pad, mode: str) -> Value:
    """Padding by a module (constant: the module itself) or by F.pad with a non-constant mode."""
    pad = const(pad)
    k = len(pad) // 2
    r = x.rank
    if mode == "constant":
        # the model dim must lie outside the last k dims
        if x.layout.folded and x.layout.dim < r - k or x.layout.stacked and x.layout.dim <= r - k:
            xs = x
        else:
            xs = ctx.stacked(x, 0)
        ctx.record("pad", "constant pad of the fused tensor")
        return ctx.out(ctx.emit_like(node, (xs,), {}), xs.layout)
    ch = r - k - 1
    if ch not in (0, 1):
        raise Decline(f"{mode} padding of {k} dims expects a {k + 1}D or {k + 2}D per-model input, got {r}D")
    xf = ctx.folded(x, ch)
    ctx.record("pad", f"{mode} pad on the folded tensor")
    return ctx.out(ctx.call(F.pad, xf, pad, mode), xf.layout)


@register_rule(F.pad, by_name=True)
def fuse_pad(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, pad = args[0], arg(args, kwargs, 1, "pad")
    mode = const(arg(args, kwargs, 2, "mode", "constant"))
    value = arg(args, kwargs, 3, "value", None)
    if mode == "constant":
        r = x.rank
        k = len(const(pad)) // 2
        if x.layout.folded and x.layout.dim < r - k or x.layout.stacked and x.layout.dim <= r - k:
            xs = x
        else:
            xs = ctx.stacked(x, 0)
        ctx.record("pad", "constant pad of the fused tensor")
        return ctx.out(ctx.call(F.pad, xs, pad, "constant", value), xs.layout)
    return _pad(ctx, node, x, pad, mode)
