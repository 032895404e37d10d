"""How a node reaches its rule: the rule's entry decides whether arguments are bound by name first (schema.py)
and whether 0-dim tensors are lifted; nodes with nothing per-model are emitted unchanged; modules with no rule run
as a loop over the models, functions with no rule under torch.vmap (fallback.py)."""

from __future__ import annotations

import operator
from typing import Any

import torch.fx as fx
from torch import Tensor

from ..values import Stacked, Value, is_per_model
from . import fallback
from .registry import _FUNCTIONS, _METHODS, Decline, Entry, Rule, module_entry
from .schema import normalize


def _any_pm(args: Any, kwargs: Any) -> bool:
    found = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if is_per_model(a) else None)
    return bool(found)


def _all_shared(ctx: Any, node: fx.Node, mod: Any, args: Any, kwargs: Any) -> bool:
    """A module in eval mode with weights, all stored once (every model has the same), on inputs every model shares:
    one call computes every model's result."""
    names = [n for n, _ in mod.named_parameters()] + [n for n, _ in mod.named_buffers()]
    if not names or any(m.training for m in mod.modules()) or _any_pm(args, kwargs):
        return False
    return all(ctx.fleet.is_shared(f"{node.target}.{n}") for n in names)


def passthrough(ctx: Any, node: fx.Node, args: Any, kwargs: Any) -> Value:
    """Emit the node unchanged; its result is shared (no input carried a model dim)."""
    return ctx.out(ctx.emit_like(node, args, kwargs), None)


def rewrite_node(ctx: Any, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """The fused form of one node of the model's graph (``args``/``kwargs``: its arguments as Values)."""
    if node.op == "call_module":
        mod = ctx.module(node)
        entry = module_entry(mod)
        if (entry is None or not entry.on_shared) and _all_shared(ctx, node, mod, args, kwargs):
            return fallback.once(ctx, node, args, kwargs)
        if entry is None:
            return fallback.loop(ctx, node, args, kwargs, f"no rule registered for {type(mod).__name__}")
        try:
            return _call(ctx, node, entry, args, kwargs)
        except Decline as e:
            return fallback.loop(ctx, node, args, kwargs, str(e))

    table = _FUNCTIONS if node.op == "call_function" else _METHODS
    try:
        entry = table.get(node.target)
    except TypeError:  # unhashable target
        entry = None
    pm = _any_pm(args, kwargs)
    if entry is not None and (pm or entry.on_shared):
        if entry.by_name:
            bound = normalize(node, args, kwargs)
            if bound is not None:
                args, kwargs = bound
        try:
            return _call(ctx, node, entry, args, kwargs)
        except Decline as e:
            raise ctx.error(f"cannot fuse this op: {e}") from None
    if not pm:
        return passthrough(ctx, node, args, kwargs)
    return fallback.vmap(ctx, node, args, kwargs, "fallback", "no rule registered for this op")


def _call(ctx: Any, node: fx.Node, entry: Entry, args: tuple, kwargs: dict) -> Value:
    if entry.rank0 and args and isinstance(args[0], Value) and args[0].is_tensor and args[0].rank == 0:
        return lift_rank0(ctx, node, entry.rule, args, kwargs)
    return entry.rule(ctx, node, args, kwargs)


def lift_rank0(ctx: Any, node: fx.Node, rule: Rule, args: tuple, kwargs: dict) -> Value:
    """Run ``rule`` on a 0-dim tensor as on a 1-element vector, then give the per-model results back their rank.

    torch reads ``dim=0`` and ``dim=-1`` of a 0-dim tensor as a virtual size-1 dim, and a full reduction of it as a
    reduction over that one element. The fused value of a per-model 0-dim tensor is ``[N]``, whose dim 0 is the
    model dim: mapped naively, ``x.sum()`` would sum over the models and ``x.softmax(0)`` would be out of range.
    Every 0-dim tensor argument (per-model ``[N]`` -> ``[N, 1]``, shared ``[]`` -> ``[1]``) gets that dim as a real
    one; every tensor the rule returns is reshaped to its per-model shape (from shape propagation) with the model
    dim in front.
    """

    def lift(a: Any) -> Any:
        if isinstance(a, Value) and a.is_tensor and a.rank == 0:
            meta = a.meta.reshape(1)
            if a.per_model:
                s = ctx.stacked(a, 0)
                return Value(ctx.call(operator.getitem, s, (slice(None), None)), Stacked(0), meta)
            return Value(ctx.method("reshape", a, 1), None, meta)
        if isinstance(a, (tuple, list)):
            return type(a)(lift(x) for x in a)
        return a

    y = rule(ctx, node, lift(tuple(args)), {k: lift(v) for k, v in kwargs.items()})

    def drop(v: Value) -> Value:
        if not isinstance(v.meta, Tensor):
            return v
        if not v.per_model:
            return Value(ctx.method("reshape", v, list(v.meta.shape)), None, v.meta)
        s = ctx.stacked(Value(v.node, v.layout, v.meta), 0)
        return Value(ctx.method("reshape", s, [ctx.n] + list(v.meta.shape)), Stacked(0), v.meta)

    return drop(y) if isinstance(y.meta, Tensor) else ctx.map_container(y, drop)
