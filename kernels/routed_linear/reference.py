"""routed_linear in pure PyTorch: the CPU path and the test oracle.

Rows are sorted by model once; each model that has rows runs one ``F.linear`` on its contiguous segment, and the
results are scattered back to their rows. Unrouted rows (``idx == -1``) stay zero, and models without rows run
nothing (their weight gradient is exactly zero). One host sync: the segment sizes.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def routed_linear(x: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """``y[r] = x[r] @ weight[idx[r]].T + bias[idx[r]]``, and ``y[r] = 0`` where ``idx[r] == -1``.

    x [R, K], idx [R] (integers in [-1, N)), weight [N, M, K], bias [N, M] or None -> y [R, M].
    The inputs are assumed valid (the functional layer checks them).
    """
    rows, m = x.shape[0], weight.shape[1]
    order = torch.sort(idx, stable=True).indices
    # rows per segment: unrouted (-1) first, then model 0 .. N-1
    counts = torch.bincount(idx.long() + 1, minlength=weight.shape[0] + 1).tolist()
    segments = x.index_select(0, order).split(counts)
    outs = [F.linear(seg, weight[n], None if bias is None else bias[n])
            for n, seg in enumerate(segments[1:]) if seg.shape[0]]
    if not outs:  # nothing routed: an empty product keeps y in the autograd graph (zero gradients)
        outs = [F.linear(x[:0], weight[0], None if bias is None else bias[0])]
    return x.new_zeros((rows, m)).index_copy(0, order[counts[0]:], torch.cat(outs))
