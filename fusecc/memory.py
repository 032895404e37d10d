"""Memory estimates of a fused forward, from its graph (no run of the real computation)."""

from __future__ import annotations

from typing import Any, Dict, Tuple, Union

import torch
from torch import Tensor

from .api import FusedModule


def activation_peak(fused: FusedModule, inputs: Union[Tuple[Tensor, ...], Dict[str, Any]]) -> int:
    """Peak bytes of live intermediate tensors in one fused forward (inference), from the fused graph's shapes and
    each value's last use (an estimate: aliasing views are counted as new tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx import GraphModule
    from torch.fx.passes.shape_prop import ShapeProp

    entry, tensors = fused._entry_for((), inputs) if isinstance(inputs, dict) else fused._entry_for(inputs, {})
    gm = GraphModule(fused, entry.graph)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        ShapeProp(gm, fake_mode=mode).propagate(*[mode.from_tensor(t) for t in tensors])

    def nbytes(node) -> int:
        meta = node.meta.get("tensor_meta")
        metas = [meta] if hasattr(meta, "shape") else list(meta or [])  # (TensorMetadata is itself a tuple)
        total = 0
        for m in metas:
            if hasattr(m, "shape") and hasattr(m, "dtype"):
                total += int(torch.Size(m.shape).numel()) * torch.empty((), dtype=m.dtype).element_size()
        return total

    order = list(gm.graph.nodes)  # (GraphModule holds its own copy of the graph)
    last = {n: i for i, n in enumerate(order)}
    for i, n in enumerate(order):
        for a in n.all_input_nodes:
            last[a] = max(last[a], i)
    live, peak, alive = 0, 0, {}
    for i, n in enumerate(order):
        if n.op in ("call_function", "call_method", "call_module"):
            alive[n] = nbytes(n)
            live += alive[n]
            peak = max(peak, live)
        for a in list(alive):
            if last[a] <= i:
                live -= alive.pop(a)
    return peak
