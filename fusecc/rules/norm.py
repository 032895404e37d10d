"""Normalisation that never mixes models.

BatchNorm / GroupNorm / InstanceNorm run as ONE op over ``N*C`` channels (``N*G`` groups) of the folded layout;
running statistics are the stacked buffers ``[N, C]``, updated in place. LayerNorm / RMSNorm normalise the last
dims of a layout whose model dim lies outside them, then apply the per-model affine as ``[N, 1, .., *shape]``.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime
from ..values import Folded, Stacked, Value
from .registry import Decline, arg, const, register_rule


def _per_model(ctx, t):
    """A stacked view of an optional tensor argument (shared ones broadcast to [N, ...])."""
    if not isinstance(t, Value):
        return None
    return ctx.stacked(t, 0)


def batch_norm(ctx, x: Value, rm, rv, w, b, training: bool, momentum, eps, nbt=None, kind="batch_norm") -> Value:
    if x.rank < 2:
        raise Decline(f"{kind} expects a per-model input with a channel dim (rank >= 2), got rank {x.rank}")
    if training:  # running statistics stored once (equal in every model) must become each model's own to be updated
        ctx.unshare([rm, rv, nbt], f"{kind} in training mode updates each model's running statistics")
    if training and any(isinstance(t, Value) and not t.per_model for t in (rm, rv)):
        raise Decline(f"{kind} in training mode with running statistics shared by all models: each model would "
                      "update the same tensor in turn. Give each model its own running statistics (buffers)")
    if not training and not any(isinstance(t, Value) and t.per_model for t in (rm, rv, w, b)):
        # statistics and affine shared (a frozen trunk): the plain op, on the shared input or on the N*B batch
        if not x.per_model:
            ctx.record(kind, "one batch_norm (statistics, affine and input shared by all models)")
            return ctx.out(ctx.call(F.batch_norm, x, rm, rv, w, b, False, momentum, eps), None)
        if x.layout in (Folded(0), Stacked(0)):
            xb = ctx.folded(x, 0)
            ctx.record(kind, "one batch_norm over the N*B batch (statistics and affine shared)")
            return ctx.out(ctx.call(F.batch_norm, xb, rm, rv, w, b, False, momentum, eps), Folded(0))
    xf = ctx.folded(x, 1)
    args = [_per_model(ctx, t) for t in (rm, rv, w, b)]
    ctx.record(kind, "one batch_norm over N*C channels" + (" (train)" if training else " (eval)"))
    y = ctx.call(runtime.norm.batch_norm, xf, *args, training, momentum, eps, nbt)
    return ctx.out(y, xf.layout)


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, on_shared=True)
def fuse_batch_norm_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    x = args[0]
    t = {k: ctx.mod_tensor(node, k) for k in ("running_mean", "running_var", "weight", "bias", "num_batches_tracked")}
    nbt = t["num_batches_tracked"] if m.track_running_stats and m.training else None
    return batch_norm(ctx, x, t["running_mean"], t["running_var"], t["weight"], t["bias"],
                      m.training, m.momentum, m.eps, nbt)


@register_rule(F.batch_norm, by_name=True)
def fuse_batch_norm(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    rm, rv = arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
    w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
    training = const(arg(args, kwargs, 5, "training", False))
    momentum, eps = const(arg(args, kwargs, 6, "momentum", 0.1)), const(arg(args, kwargs, 7, "eps", 1e-5))
    return batch_norm(ctx, x, rm, rv, w, b, training, momentum, eps)


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def fuse_instance_norm_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    x = args[0]
    nd = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(m)]
    if x.rank == nd + 1:
        raise Decline("unbatched input to InstanceNorm")
    xf = ctx.folded(x, 1)
    t = [_per_model(ctx, ctx.mod_tensor(node, k)) for k in ("running_mean", "running_var", "weight", "bias")]
    use_input_stats = m.training or not m.track_running_stats
    ctx.record("instance_norm", "one instance_norm over N*C channels")
    momentum = m.momentum if m.momentum is not None else 0.1
    y = ctx.call(runtime.norm.instance_norm, xf, *t, use_input_stats, momentum, m.eps)
    return ctx.out(y, xf.layout)


@register_rule(nn.GroupNorm, on_shared=True)
def fuse_group_norm_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    return group_norm(ctx, args[0], m.num_groups, ctx.mod_tensor(node, "weight"), ctx.mod_tensor(node, "bias"), m.eps)


def group_norm(ctx, x: Value, groups: int, w, b, eps) -> Value:
    if x.rank < 2:
        raise Decline("group_norm expects a per-model input with a channel dim")
    if not any(isinstance(t, Value) and t.per_model for t in (w, b)):  # a shared affine: per sample, any batch
        if not x.per_model:
            ctx.record("group_norm", "one group_norm (affine and input shared by all models)")
            return ctx.out(ctx.call(F.group_norm, x, groups, w, b, eps), None)
        if x.layout in (Folded(0), Stacked(0)) and x.rank > 2 or x.layout == Folded(0):
            xb = ctx.folded(x, 0)
            ctx.record("group_norm", "one group_norm over the N*B batch (affine shared)")
            return ctx.out(ctx.call(F.group_norm, xb, groups, w, b, eps), Folded(0))
    xf = ctx.folded(x, 1)
    ctx.record("group_norm", "one group_norm with N*G groups")
    y = ctx.call(runtime.norm.group_norm, xf, groups * ctx.n, _per_model(ctx, w), _per_model(ctx, b), eps)
    return ctx.out(y, xf.layout)


@register_rule(F.group_norm, by_name=True)
def fuse_group_norm(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, g = args[0], const(arg(args, kwargs, 1, "num_groups"))
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    return group_norm(ctx, x, g, w, b, const(arg(args, kwargs, 4, "eps", 1e-5)))


def _norm_input(ctx, x: Value, k: int) -> Value:
    """x with its model dim outside the last k per-model dims."""
    r = x.rank
    if x.per_model:
        if x.layout.folded and x.layout.dim < r - k:
            return x
        if x.layout.stacked and x.layout.dim <= r - k:
            return x
        return ctx.stacked(x, 0)
    return x


def _affine_shape(ctx, x: Value, k: int, shape) -> list:
    """How a stacked [N, *shape] weight must be viewed to broadcast against x's layout."""
    r = x.rank
    if not x.per_model:
        return [ctx.n] + [1] * (r - k) + list(shape)
    d = x.layout.dim
    if x.layout.folded:  # model dim folded into per-model dim d < r - k: view it as [.., N, C_d, ..]
        return None
    return [ctx.n] + [1] * (r - k - d) + list(shape)


def layer_norm(ctx, x: Value, shape, w, b, eps, rms: bool = False) -> Value:
    shape = [const(s) for s in (shape if isinstance(shape, (tuple, list)) else [shape])]
    k = len(shape)
    if x.rank < k:
        raise Decline("normalized_shape longer than the input")
    wp = isinstance(w, Value) and w.per_model or isinstance(b, Value) and b.per_model
    x = _norm_input(ctx, x, k)
    kind = "rms_norm" if rms else "layer_norm"
    if not wp:  # shared (or no) affine: the plain op, any layout whose model dim is outside the normalized dims
        ctx.record(kind, f"one {kind} (shared affine)")
        if rms:
            return ctx.out(ctx.call(F.rms_norm, x, shape, w, eps), x.layout)
        return ctx.out(ctx.call(F.layer_norm, x, shape, w, b, eps), x.layout)
    if x.per_model and x.layout.folded:
        x = ctx.stacked(x)
    aff = _affine_shape(ctx, x, k, shape)
    w = _per_model(ctx, w)
    if ctx.triton and not rms and k == 1 and x.per_model and x.layout.stacked:
        ctx.record(kind, "per-model layer_norm in one pass (Triton kernel)")
    else:
        ctx.record(kind, f"one {kind}, per-model affine as addcmul")
    if rms:
        y = ctx.call(runtime.norm.rms_norm, x, shape, w, eps, aff)
    else:
        y = ctx.call(runtime.norm.layer_norm, x, shape, w, _per_model(ctx, b), eps, aff)
    return ctx.out(y, x.layout if x.per_model else Stacked(0))


@register_rule(nn.LayerNorm, on_shared=True)
def fuse_layer_norm_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    w, b = ctx.mod_tensor(node, "weight"), ctx.mod_tensor(node, "bias")
    return layer_norm(ctx, args[0], m.normalized_shape, w, b, m.eps)


@register_rule(F.layer_norm, by_name=True)
def fuse_layer_norm(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
    w, b = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias")
    return layer_norm(ctx, x, shape, w, b, const(arg(args, kwargs, 4, "eps", 1e-5)))


if hasattr(nn, "RMSNorm"):

    @register_rule(nn.RMSNorm, on_shared=True)
    def fuse_rms_norm_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
        m = ctx.module(node)
        return layer_norm(ctx, args[0], m.normalized_shape, ctx.mod_tensor(node, "weight"), None, m.eps, rms=True)

    @register_rule(F.rms_norm, by_name=True)
    def fuse_rms_norm(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
        x, shape = args[0], arg(args, kwargs, 1, "normalized_shape")
        w = arg(args, kwargs, 2, "weight")
        return layer_norm(ctx, x, shape, w, None, const(arg(args, kwargs, 3, "eps")), rms=True)
