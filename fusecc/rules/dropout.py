"""Dropout: identity in eval; in training an independent mask per model.

Dropping elements of the fused tensor draws every element independently, so the N models' masks are
independent already; a shared input first gets a model dim (a broadcast view), so each model draws its own mask.
Feature dropout (Dropout1d/2d/3d) drops whole channels: on the folded layout ``[B, N*C, *sp]`` each model's
channels are dropped independently.
"""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..values import Value
from .registry import Decline, arg, const, register_rule

_FEATURE = {nn.Dropout1d: 1, nn.Dropout2d: 2, nn.Dropout3d: 3, nn.FeatureAlphaDropout: None}
_FEATURE_FNS = {F.dropout1d: 1, F.dropout2d: 2, F.dropout3d: 3, F.feature_alpha_dropout: None}


def dropout(ctx, fn, x: Value, p: float, training: bool, inplace: bool, nd) -> Value:
    if not training or p == 0:
        ctx.record("dropout", "identity (eval)")
        return ctx.out(x.node, x.layout)
    ctx.record("dropout", "one mask draw for all models (independent per model)")
    if nd is None and fn not in (F.feature_alpha_dropout,):  # element-wise dropout
        xs = x if x.per_model else ctx.stacked(x, 0)
        return ctx.out(ctx.call(fn, xs, p, True, inplace and x.per_model), xs.layout)
    if nd is None:
        nd = x.rank - 2
    ch = x.rank - nd - 1
    if ch not in (0, 1):
        raise Decline(f"feature dropout expects a {nd + 1}D or {nd + 2}D per-model input, got {x.rank}D")
    xf = ctx.folded(x, ch)
    return ctx.out(ctx.call(fn, xf, p, True, inplace and x.per_model), xf.layout)


@register_rule(nn.Dropout, nn.AlphaDropout, *_FEATURE)
def fuse_dropout_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    fn = {nn.Dropout: F.dropout, nn.AlphaDropout: F.alpha_dropout, nn.Dropout1d: F.dropout1d,
          nn.Dropout2d: F.dropout2d, nn.Dropout3d: F.dropout3d,
          nn.FeatureAlphaDropout: F.feature_alpha_dropout}[type(m)]
    return dropout(ctx, fn, args[0], m.p, m.training, m.inplace, _FEATURE.get(type(m)))


@register_rule(F.dropout, F.alpha_dropout, *_FEATURE_FNS, on_shared=True, by_name=True)
def fuse_dropout(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    p = const(arg(args, kwargs, 1, "p", 0.5))
    training = const(arg(args, kwargs, 2, "training", True))
    inplace = const(arg(args, kwargs, 3, "inplace", False))
    return dropout(ctx, node.target, x, p, training, inplace, _FEATURE_FNS.get(node.target))
