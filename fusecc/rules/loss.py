"""Losses computed inside a model (a Hugging Face model given ``labels``): each model's own loss, reduced over its
own batch, as ``torch.vmap`` over the model dim runs it (the reductions, class weights, ``ignore_index`` and label
smoothing stay exactly torch's). A deliberate lowering, not a fallback: no warning."""

from __future__ import annotations

import torch.fx as fx
import torch.nn.functional as F

from ..values import Value
from . import fallback
from .registry import register_rule

LOSSES = [F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
          F.binary_cross_entropy_with_logits, F.kl_div]


@register_rule(*LOSSES)
def fuse_loss(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    return fallback.vmap(ctx, node, args, kwargs, "loss", None)
