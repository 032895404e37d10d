"""Embedding: per-model tables ``[N, V, D]`` looked up as ONE table ``[N*V, D]`` with per-model row offsets."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime
from ..values import Stacked, Value
from .registry import arg, const, register_rule


def embedding(ctx, idx: Value, w: Value, padding_idx, max_norm, scale_grad_by_freq, sparse, norm_type=2.0) -> Value:
    """With ``max_norm`` the rows looked up are renormalised in place first, as F.embedding does: in the stacked table
    (each model's own rows), or in a shared table (the rows any model looks up: renormalising a row twice changes
    nothing more, so the models' order does not matter)."""
    if not w.per_model and not idx.per_model:  # one table, shared indices: one lookup serves every model
        ctx.record("embedding", "one lookup (table and indices shared by all models)")
        return ctx.out(ctx.call(F.embedding, idx, w, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse),
                       None)
    if not w.per_model:  # one table, per-model indices: one ordinary lookup
        ctx.record("embedding", "one lookup in the shared table")
        return ctx.out(ctx.call(F.embedding, ctx.stacked(idx, 0), w, padding_idx, max_norm, norm_type,
                                scale_grad_by_freq, sparse), Stacked(0))
    v = w.meta.shape[0]
    if padding_idx is not None and padding_idx < 0:
        padding_idx += v
    ix = ctx.stacked(idx, 0) if idx.per_model else idx
    ctx.record("embedding", "one lookup in the N tables concatenated")
    y = ctx.call(runtime.embedding.stacked_embedding, ix, w, padding_idx, idx.per_model, scale_grad_by_freq, sparse,
                 max_norm, norm_type)
    return ctx.out(y, Stacked(0))


@register_rule(nn.Embedding, on_shared=True)
def fuse_embedding_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    return embedding(ctx, args[0], ctx.mod_tensor(node, "weight"), m.padding_idx, m.max_norm, m.scale_grad_by_freq,
                     m.sparse, m.norm_type)


@register_rule(F.embedding, by_name=True)
def fuse_embedding(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    idx, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
    return embedding(ctx, idx, w, const(arg(args, kwargs, 2, "padding_idx")), const(arg(args, kwargs, 3, "max_norm")),
                     const(arg(args, kwargs, 5, "scale_grad_by_freq", False)),
                     const(arg(args, kwargs, 6, "sparse", False)), const(arg(args, kwargs, 4, "norm_type", 2.0)))
