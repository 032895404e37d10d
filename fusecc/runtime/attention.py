"""Attention of N models: per-model projections as batched GEMMs, the attention with N folded into the batch."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .linear import batched_linear, wide_linear


def _mha_proj(x: Tensor, w: Tensor, b: Optional[Tensor], stacked: bool) -> Tensor:
    # x: [N, B, T, E] (stacked) or [B, T, E] (shared); w [N, M, E] -> [N, B, T, M]
    if stacked:
        return batched_linear(x, w, b)
    y = wide_linear(x, w, b)  # [B, T, N*M]
    return y.unflatten(-1, (w.shape[0], -1)).permute(2, 0, 1, 3)


def multi_head_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    q_stacked: bool,
    k_stacked: bool,
    v_stacked: bool,
    num_heads: int,
    in_proj_weight: Optional[Tensor],
    in_proj_bias: Optional[Tensor],
    q_proj_weight: Optional[Tensor],
    k_proj_weight: Optional[Tensor],
    v_proj_weight: Optional[Tensor],
    bias_k: Optional[Tensor],
    bias_v: Optional[Tensor],
    add_zero_attn: bool,
    out_proj_weight: Tensor,
    out_proj_bias: Optional[Tensor],
    dropout_p: float,
    key_padding_mask: Optional[Tensor],
    need_weights: bool,
    attn_mask: Optional[Tensor],
    average_attn_weights: bool,
    is_causal: bool,
    batch_first: bool,
    kpm_stacked: bool,
    mask_stacked: bool,
) -> Tuple[Tensor, Optional[Tensor]]:
    """``nn.MultiheadAttention`` (batch_first layout) for N models with stacked weights.

    query ``[N, B, T, E]`` when q_stacked else shared ``[B, T, E]`` (same for key/value, length S). Masks are shared
    (``attn_mask`` ``[T, S]`` or ``[B*H, T, S]``, ``key_padding_mask`` ``[B, S]``) or stacked (a leading N, flagged by
    kpm_stacked / mask_stacked). Returns ``([N, B, T, E],
    [N, B, T, S] | [N, B, H, T, S] | None)``. The model dim is folded into the batch for the attention itself.
    """
    if not batch_first:  # [.., T, B, E] -> [.., B, T, E]
        query, key, value = query.transpose(-3, -2), key.transpose(-3, -2), value.transpose(-3, -2)
    e = out_proj_weight.shape[-1]
    n = out_proj_weight.shape[0]
    if in_proj_weight is not None:
        wq, wk, wv = in_proj_weight.split(e, dim=1)
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.split(e, dim=1)
    else:
        assert q_proj_weight is not None and k_proj_weight is not None and v_proj_weight is not None
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
        bq, bk, bv = (None, None, None) if in_proj_bias is None else in_proj_bias.split(e, dim=1)
    q = _mha_proj(query, wq, bq, q_stacked)
    k = _mha_proj(key, wk, bk, k_stacked)
    v = _mha_proj(value, wv, bv, v_stacked)
    bsz = q.shape[1]
    if bias_k is not None and bias_v is not None:  # [N, 1, 1, E] appended as one more key position
        k = torch.cat([k, bias_k.reshape(n, 1, 1, e).expand(n, bsz, 1, e)], dim=2)
        v = torch.cat([v, bias_v.reshape(n, 1, 1, e).expand(n, bsz, 1, e)], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    if add_zero_attn:
        k = torch.cat([k, k.new_zeros((n, bsz, 1, e))], dim=2)
        v = torch.cat([v, v.new_zeros((n, bsz, 1, e))], dim=2)
        if attn_mask is not None:
            attn_mask = F.pad(attn_mask, (0, 1))
        if key_padding_mask is not None:
            key_padding_mask = F.pad(key_padding_mask, (0, 1))
    h = num_heads
    t, s = q.shape[2], k.shape[2]
    hd = e // h
    # [N, B, T, E] -> [N*B, H, T, hd]
    q = q.reshape(n * bsz, t, h, hd).transpose(1, 2)
    k = k.reshape(n * bsz, s, h, hd).transpose(1, 2)
    v = v.reshape(n * bsz, s, h, hd).transpose(1, 2)
    # one additive mask [N, B, H, T, S] from the pieces, each viewed to broadcast against it
    mask: Optional[Tensor] = None
    if attn_mask is not None:
        am = attn_mask
        if am.dtype == torch.bool:
            am = torch.zeros_like(am, dtype=q.dtype).masked_fill(am, float("-inf"))
        lead = n if mask_stacked else 1
        full = am.dim() - (1 if mask_stacked else 0) == 3  # [B*H, T, S] per model
        mask = am.view(lead, bsz, h, t, s) if full else am.view(lead, 1, 1, t, s)
    if key_padding_mask is not None:
        kp = key_padding_mask
        if kp.dtype == torch.bool:
            kp = torch.zeros_like(kp, dtype=q.dtype).masked_fill(kp, float("-inf"))
        kp = kp.view(n if kpm_stacked else 1, bsz, 1, 1, s)
        mask = kp if mask is None else mask + kp
    if mask is not None:
        mask = mask.expand(n, bsz, h, t, s).reshape(n * bsz, h, t, s)
    if not need_weights:
        out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal and mask is None)
        weights = None
    else:
        scores = torch.matmul(q * (float(hd) ** -0.5), k.transpose(-2, -1))
        if is_causal and mask is None:
            causal = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if mask is not None:
            scores = scores + mask
        attn = torch.softmax(scores, dim=-1)
        weights = attn.reshape(n, bsz, h, t, s)
        weights = weights.mean(dim=2) if average_attn_weights else weights
        if dropout_p > 0.0:
            attn = F.dropout(attn, p=dropout_p)
        out = torch.matmul(attn, v)
    out = out.transpose(1, 2).reshape(n, bsz, t, e)
    out = batched_linear(out, out_proj_weight, out_proj_bias)
    if not batch_first:
        out = out.transpose(1, 2)
    return out, weights


def sdpa(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Optional[Tensor],
    dropout_p: float,
    is_causal: bool,
    scale: Optional[float],
    enable_gqa: bool,
) -> Tensor:
    """``F.scaled_dot_product_attention`` on stacked ``[N, *batch, L, E]`` operands (mask ``[N, *, L, S]``).

    With a batch dim, N is folded into it (``[N*B, H, L, E]``), the shape the fused CPU/GPU kernels take.
    """
    if query.dim() >= 4 and key.shape[:-2] == query.shape[:-2] and value.shape[:-2] == query.shape[:-2]:
        lead = (query.shape[0], query.shape[1])
        m = attn_mask
        if m is not None:
            m = m.expand(tuple(query.shape[:-2]) + tuple(m.shape[-2:])).flatten(0, 1)
        out = F.scaled_dot_product_attention(
            query.flatten(0, 1), key.flatten(0, 1), value.flatten(0, 1), m, dropout_p, is_causal, scale=scale,
            enable_gqa=enable_gqa,
        )
        return out.unflatten(0, lead)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )
