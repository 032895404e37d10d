"""Attention: the model dim is folded into the batch for the attention itself; the projections of
``nn.MultiheadAttention`` are per-model batched GEMMs (or wide GEMMs for a shared input)."""

from __future__ import annotations

import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime
from ..values import Stacked, Value
from .registry import Decline, arg, const, register_rule


@register_rule(nn.MultiheadAttention)
def fuse_mha(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    q, k, v = arg(args, kwargs, 0, "query"), arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value")
    kpm = arg(args, kwargs, 3, "key_padding_mask")
    need_weights = const(arg(args, kwargs, 4, "need_weights", True))
    attn_mask = arg(args, kwargs, 5, "attn_mask")
    avg = const(arg(args, kwargs, 6, "average_attn_weights", True))
    is_causal = const(arg(args, kwargs, 7, "is_causal", False))
    for name, t in (("query", q), ("key", k), ("value", v)):
        if t.rank != 3:
            raise Decline(f"unbatched {name} (rank {t.rank}); only batched [B, T, E] inputs are fused")
    kpm_pm = isinstance(kpm, Value) and kpm.per_model
    mask_pm = isinstance(attn_mask, Value) and attn_mask.per_model
    if kpm_pm:
        kpm = ctx.stacked(kpm, 0)
    if mask_pm:
        attn_mask = ctx.stacked(attn_mask, 0)
    if is_causal and attn_mask is None:
        raise Decline("is_causal without attn_mask")
    t = {name: ctx.mod_tensor(node, name) for name in (
        "in_proj_weight", "in_proj_bias", "q_proj_weight", "k_proj_weight", "v_proj_weight", "bias_k", "bias_v",
        "out_proj.weight", "out_proj.bias")}
    qs = [ctx.stacked(x, 0) if x.per_model else x for x in (q, k, v)]
    ctx.record("multihead_attention", "batched GEMM projections + SDPA with N folded into the batch")
    y = ctx.call(
        runtime.attention.multi_head_attention, *qs, q.per_model, k.per_model, v.per_model, m.num_heads,
        t["in_proj_weight"], t["in_proj_bias"], t["q_proj_weight"], t["k_proj_weight"], t["v_proj_weight"],
        t["bias_k"], t["bias_v"], m.add_zero_attn, t["out_proj.weight"], t["out_proj.bias"],
        m.dropout if m.training else 0.0, kpm, need_weights, attn_mask, avg, False, m.batch_first, kpm_pm, mask_pm,
    )
    return ctx.out(y, (Stacked(0), Stacked(0) if need_weights else None))


@register_rule(F.scaled_dot_product_attention, by_name=True)
def fuse_sdpa(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    q, k, v = args[0], arg(args, kwargs, 1, "key"), arg(args, kwargs, 2, "value")
    mask = arg(args, kwargs, 3, "attn_mask")
    dropout_p = arg(args, kwargs, 4, "dropout_p", 0.0)
    is_causal = arg(args, kwargs, 5, "is_causal", False)
    scale = kwargs.get("scale")
    gqa = kwargs.get("enable_gqa", False)
    rank = max(q.rank, k.rank, v.rank)
    qs = [ctx.pad(ctx.stacked(x, 0), rank) for x in (q, k, v)]
    if isinstance(mask, Value):
        mask = ctx.pad(ctx.stacked(mask, 0), rank)
    ctx.record("scaled_dot_product_attention", "SDPA with N folded into the batch")
    y = ctx.call(runtime.attention.sdpa, *qs, mask, dropout_p, is_causal, scale, gqa)
    return ctx.out(y, Stacked(0))
