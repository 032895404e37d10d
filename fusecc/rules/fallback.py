"""The fallback: a module with no rule runs as a loop over the N models inside the fused graph.

Each model runs the module with its own slice of the stacked parameters (``torch.func.functional_call``), so the
weights stay stacked in one place, gradients flow to them, and the result is right, only slower. A warning names
the module so the user knows what did not fuse.
"""

from __future__ import annotations

import copy

import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_map

from .. import lowering
from ..errors import FusionError
from ..lower import S, V, has_model
from .registry import warn_fallback


def loop(ctx, node: fx.Node, args: tuple, kwargs: dict, reason: str) -> V:
    mod = ctx.module(node)
    qual = node.target
    own = list(mod.named_parameters()) + list(mod.named_buffers())
    if not own and not any(isinstance(a, V) and a.per_model for a in list(args) + list(kwargs.values())):
        # no weights and nothing per-model in: one call serves every model
        return ctx.out(ctx.emit_like(node, args, kwargs), None)

    def prep(a):
        if isinstance(a, V):
            if a.is_tensor:
                return (ctx.stacked(a, 0), True) if a.per_model else (a, False)
            if has_model(a.layout):
                raise ctx.error(f"module '{qual}' takes a container of per-model tensors, which the fallback loop "
                                "cannot slice; pass the tensors as separate arguments")
            return a, False
        if isinstance(a, (tuple, list, dict)):
            found = []
            fx.node.map_aggregate(a, lambda x: found.append(x) if isinstance(x, V) and x.per_model else None)
            if found:
                raise ctx.error(f"module '{qual}' takes a container of per-model tensors, which the fallback loop "
                                "cannot slice; pass the tensors as separate arguments")
        return a, False

    pa = [prep(a) for a in args]
    pk = {k: prep(a) for k, a in kwargs.items()}
    names = [n for n, _ in own]
    stacked = []
    for n in names:
        v = ctx.param(f"{qual}.{n}")
        if v is None:
            raise FusionError(f"fusecc: module '{qual}': tensor '{n}' is not a parameter or buffer of the models")
        stacked.append(v)
    templates = ctx.fused._fusecc_templates
    if qual not in templates:
        templates[qual] = copy.deepcopy(mod)
    tmpl = ctx.call(lambda_getitem, ctx.get_attr("_fusecc_templates"), qual)
    warn_fallback(qual, type(mod).__name__, reason)
    ctx.report.fallbacks.append((qual, type(mod).__name__, reason))
    ctx.record("fallback", "loop over the N models")
    y = ctx.call(
        lowering.loop_module, tmpl, names, stacked, [a for a, _ in pa], [p for _, p in pa],
        {k: a for k, (a, _) in pk.items()}, {k: p for k, (_, p) in pk.items()}, ctx.n,
    )
    meta = node.meta.get("fusecc_pm")
    layout = tree_map(lambda m: S(0) if isinstance(m, Tensor) else None, meta)
    return ctx.out(y, layout)


def lambda_getitem(d: dict, key: str):
    """``d[key]`` (a named function, so generated code stays readable)."""
    return d[key]
