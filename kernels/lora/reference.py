"""lora in pure PyTorch: the CPU path and the test oracle, computed per model exactly as peft's ``lora.Linear`` does:
``t = F.linear(x, lora_A.weight)``, ``u = F.linear(t, lora_B.weight)``, then ``u * scaling`` (no dropout: eval).

- ``lora_update``: rows sorted by model once; each model that has rows runs the two ``F.linear`` on its contiguous
  segment, and the results are scattered back to their rows. Unrouted rows (``idx == -1``) stay zero and models
  without rows run nothing (their gradients are exactly zero). One host sync: the segment sizes.
- ``batched_lora_update``: the same two GEMMs as ``torch.bmm`` over the model dimension.

``scale`` is a constant: it is detached (no gradient), on every backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def lora_update(x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
    """``y[i] = scale[idx[i]] * ((x[i] @ lora_a[idx[i]].T) @ lora_b[idx[i]].T)``, and ``y[i] = 0`` where
    ``idx[i] == -1``.

    x [R, K], idx [R] (integers in [-1, N)), lora_a [N, r, K], lora_b [N, M, r], scale [N] -> y [R, M] (x's dtype).
    The inputs are assumed valid (the functional layer checks them).
    """
    rows, m = x.shape[0], lora_b.shape[1]
    scale = scale.detach()
    order = torch.sort(idx, stable=True).indices
    # rows per segment: unrouted (-1) first, then model 0 .. N-1
    counts = torch.bincount(idx.long() + 1, minlength=lora_a.shape[0] + 1).tolist()
    segments = x.index_select(0, order).split(counts)
    # scale[n] is 0-dim: the product keeps u's dtype, as peft's `u * scaling` (a Python float) does
    outs = [F.linear(F.linear(seg, lora_a[n]), lora_b[n]) * scale[n]
            for n, seg in enumerate(segments[1:]) if seg.shape[0]]
    if not outs:  # nothing routed: an empty product keeps y in the autograd graph (zero gradients)
        outs = [F.linear(F.linear(x[:0], lora_a[0]), lora_b[0])]
    return x.new_zeros((rows, m)).index_copy(0, order[counts[0]:], torch.cat(outs).to(x.dtype))


def batched_lora_update(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
    """``y[n] = scale[n] * ((x[n] @ lora_a[n].T) @ lora_b[n].T)``.

    x [N, T, K], lora_a [N, r, K], lora_b [N, M, r], scale [N] -> y [N, T, M] (x's dtype).
    """
    t = torch.bmm(x, lora_a.transpose(1, 2))  # [N, T, r]: lora_A per model
    u = torch.bmm(t, lora_b.transpose(1, 2))  # [N, T, M]: lora_B per model
    # the product is computed in fp32 (scale's dtype) and rounded once to x's dtype, as `u * scaling` does per model
    return (u * scale.detach()[:, None, None]).to(x.dtype)
