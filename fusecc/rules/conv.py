"""Convolutions: N convs with stacked weights ``[N, Cout, Cin/g, *k]`` become ONE conv.

- per-model input, folded ``[B, N*Cin, *sp]``: grouped conv with ``groups = N*g`` (model n reads only its own
  channels), output folded ``[B, N*Cout, *sp]``, so BatchNorm, pooling and activations need no copy;
- shared input ``[B, Cin, *sp]``, g = 1: ONE ordinary conv with ``N*Cout`` output channels (no grouping at all).
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import choose, runtime
from ..values import Folded, Stacked, Value
from .registry import Decline, arg, const, register_rule

_CONV_FNS = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}
_CONVT_FNS = {F.conv_transpose1d: 1, F.conv_transpose2d: 2, F.conv_transpose3d: 3}
_CONV_OF = {nd: f for f, nd in _CONV_FNS.items()}
_CONVT_OF = {nd: f for f, nd in _CONVT_FNS.items()}


def conv(ctx, x: Value, w: Value, b, stride, padding, dilation, groups: int, nd: int) -> Value:
    ch = x.rank - nd - 1  # channel dim: 1 for a batched input, 0 for an unbatched one
    if ch not in (0, 1):
        raise Decline(f"conv{nd}d expects a {nd + 1}D or {nd + 2}D per-model input, got {x.rank}D")
    if w.per_model:
        if b is not None and not b.per_model:
            b = ctx.stacked(b, 0)
        if not x.per_model and groups == 1:
            ctx.record(f"conv{nd}d", "wide conv (shared input, N*Cout output channels)")
            y = ctx.call(runtime.conv.stacked_conv, x, w, b, stride, padding, dilation, 1, nd)
            return ctx.out(y, Folded(ch))
        xf = ctx.folded(x, ch)
        pointwise = (nd == 2 and groups == 1 and tuple(w.meta.shape[-2:]) == (1, 1)
                     and runtime.conv.all_equal(padding, 0) and runtime.conv.all_equal(dilation, 1))
        if ctx.triton and pointwise:
            ctx.record(f"conv{nd}d", "1x1 conv as a per-model GEMM, channels-last (Triton kernel)")
            impl = "grouped"
        elif ch == 1:  # batched input: pick a lowering for this layer (fusecc/choose.py)
            x_shape = list(xf.meta.shape)
            x_shape[1] *= ctx.n
            w_shape = [ctx.n] + list(w.meta.shape)
            impl, why = ctx.chooser.conv(x_shape, w_shape, b is not None, stride, padding, dilation, groups * ctx.n,
                                         nd, w.meta.dtype, ctx.device)
            ctx.record(f"conv{nd}d", choose.CONV_HOW[impl], why)
        else:
            impl = "grouped"
            ctx.record(f"conv{nd}d", "grouped conv (groups = N*g)")
        y = ctx.call(runtime.conv.stacked_conv, xf, w, b, stride, padding, dilation, groups * ctx.n, nd, impl)
        return ctx.out(y, Folded(ch))
    mb = b if b is not None and b.per_model else None  # a per-model bias: added after the shared conv
    if not x.per_model and mb is None:  # weight and input shared: one conv computes every model's result
        ctx.record(f"conv{nd}d", "one conv (weight and input shared by all models)")
        return ctx.out(ctx.call(_CONV_OF[nd], x, w, b, stride, padding, dilation, groups), None)
    if ch == 1 and mb is None:  # the models' batches one after another [N*B, C, *sp]: one ordinary conv
        xf = ctx.folded(x, 0)
        ctx.record(f"conv{nd}d", "one conv over the N*B batch (weight shared by all models)")
        return ctx.out(ctx.call(_CONV_OF[nd], xf, w, b, stride, padding, dilation, groups), Folded(0))
    xs = ctx.stacked(x, 0)
    ctx.record(f"conv{nd}d", "one conv (weight shared by all models), N folded into the batch")
    y = ctx.call(runtime.conv.shared_weight_conv, xs, nd, False, w, None if mb is not None else b, stride, padding,
                 dilation, groups, model_bias=mb)
    return ctx.out(y, Stacked(0))


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, on_shared=True)
def fuse_conv_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    x = arg(args, kwargs, 0, "input")
    nd = len(m.kernel_size)
    w, b = ctx.mod_tensor(node, "weight"), ctx.mod_tensor(node, "bias")
    padding = m.padding
    if m.padding_mode != "zeros":  # as torch's _conv_forward: pad first, then a conv without padding
        ch = x.rank - nd - 1
        x = ctx.folded(x, ch) if x.per_model else x
        lay = x.layout
        x = Value(ctx.call(F.pad, x, m._reversed_padding_repeated_twice, mode=m.padding_mode), lay, x.meta)
        padding = 0
    return conv(ctx, x, w, b, m.stride, padding, m.dilation, m.groups, nd)


@register_rule(*_CONV_FNS, by_name=True)
def fuse_conv(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    nd = _CONV_FNS[node.target]
    x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    b = arg(args, kwargs, 2, "bias")
    a = [arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 4, "padding", 0), arg(args, kwargs, 5, "dilation", 1)]
    groups = const(arg(args, kwargs, 6, "groups", 1))
    return conv(ctx, x, w, b if isinstance(b, Value) else None, *a, groups, nd)


def conv_transpose(ctx, x: Value, w: Value, b, stride, padding, output_padding, groups: int, dilation,
                   nd: int) -> Value:
    ch = x.rank - nd - 1
    if ch not in (0, 1):
        raise Decline(f"conv_transpose{nd}d expects a {nd + 1}D or {nd + 2}D per-model input, got {x.rank}D")
    if not w.per_model:
        mb = b if b is not None and b.per_model else None
        if not x.per_model and mb is None:
            ctx.record(f"conv_transpose{nd}d", "one transposed conv (weight and input shared by all models)")
            return ctx.out(ctx.call(_CONVT_OF[nd], x, w, b, stride, padding, output_padding, groups, dilation), None)
        ctx.record(f"conv_transpose{nd}d", "one transposed conv (weight shared by all models), N folded into the batch")
        y = ctx.call(runtime.conv.shared_weight_conv, ctx.stacked(x, 0), nd, True, w, None if mb is not None else b,
                     stride, padding, output_padding, groups, dilation, model_bias=mb)
        return ctx.out(y, Stacked(0))
    if b is not None and not b.per_model:
        b = ctx.stacked(b, 0)
    xf = ctx.folded(x, ch)
    ctx.record(f"conv_transpose{nd}d", "grouped transposed conv (groups = N*g)")
    y = ctx.call(runtime.conv.stacked_conv_transpose, xf, w, b, stride, padding, output_padding, groups * ctx.n,
                 dilation, nd)
    return ctx.out(y, Folded(ch))


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, on_shared=True)
def fuse_conv_transpose_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    x = arg(args, kwargs, 0, "input")
    nd = len(m.kernel_size)
    if arg(args, kwargs, 1, "output_size") is not None:
        raise Decline("ConvTranspose called with output_size")
    w, b = ctx.mod_tensor(node, "weight"), ctx.mod_tensor(node, "bias")
    return conv_transpose(ctx, x, w, b, m.stride, m.padding, m.output_padding, m.groups, m.dilation, nd)


@register_rule(*_CONVT_FNS, by_name=True)
def fuse_conv_transpose(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    nd = _CONVT_FNS[node.target]
    x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    b = arg(args, kwargs, 2, "bias")
    a = [arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 4, "padding", 0),
         arg(args, kwargs, 5, "output_padding", 0)]
    groups = const(arg(args, kwargs, 6, "groups", 1))
    dil = arg(args, kwargs, 7, "dilation", 1)
    return conv_transpose(ctx, x, w, b if isinstance(b, Value) else None, *a, groups, dil, nd)

