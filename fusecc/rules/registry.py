"""The one table of rules: callable -> rule.

A rule turns one node of the original graph into fused-graph nodes. It is registered for every callable it
handles: module types (``nn.Linear``), torch functions (``F.linear``, ``torch.add``, ``operator.add``) and tensor
method names (``"add"``). Signature::

    @register_rule(nn.Linear, F.linear)
    def fuse_linear(ctx: Lowerer, node: fx.Node, args: tuple, kwargs: dict) -> V: ...

``args``/``kwargs`` are the node's arguments with every graph value replaced by a :class:`~fusecc.lower.V`.
A rule that can only handle some cases raises :class:`Decline`; for a module the node then runs as a loop
over the N models (with a warning saying why), for a function the compile fails with the reason.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from ..lower import S, V, is_pm

Rule = Callable[..., V]


@dataclass(frozen=True)
class Entry:
    """A registered rule and how it is called."""

    rule: Rule
    on_shared: bool = False  # called when no argument is per-model (else the node is emitted unchanged)
    by_name: bool = False  # arguments bound by the op's signature first (fusecc/rules/schema.py)
    rank0: bool = False  # 0-dim tensor arguments are lifted to rank 1 around the rule (see lift_rank0)


_MODULES: Dict[type, Entry] = {}
_FUNCTIONS: Dict[Any, Entry] = {}
_METHODS: Dict[str, Entry] = {}


class Decline(Exception):
    """Raised by a rule that cannot fuse this particular node; the message says why."""


def register_rule(*targets: Any, on_shared: bool = False, by_name: bool = False, rank0: bool = False
                  ) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module types, functions and method names.

    With ``on_shared=False`` a node whose inputs are all shared (the same for every model) does not reach the rule:
    it is emitted unchanged and its result is shared. Module rules always run (modules hold per-model weights).

    With ``by_name=True`` a function or method call reaches the rule bound to the overload torch would pick, as
    ``(first_argument,), {name: value}`` with every default filled in (:func:`fusecc.rules.schema.normalize`), so
    ``arg(args, kwargs, 1, "dim")`` finds the dim however the model passed it (``torch.var(x, True)`` has no dim:
    its ``True`` is ``unbiased``).

    With ``rank0=True`` a call on a 0-dim tensor runs the rule on the tensor viewed with one size-1 dim
    (:func:`lift_rank0`), which is how torch reads ``dim=0`` / ``dim=-1`` of a 0-dim tensor.
    """

    def deco(rule: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                _METHODS[t] = Entry(rule, on_shared, by_name, rank0)
            elif isinstance(t, type) and issubclass(t, nn.Module):
                _MODULES[t] = Entry(rule, True, False, rank0)
            else:
                _FUNCTIONS[t] = Entry(rule, on_shared, by_name, rank0)
        return rule

    return deco


def module_rule(mod: nn.Module) -> Optional[Rule]:
    """The rule for a module: its type's, or a base class's if the subclass keeps the base's forward."""
    entry = _module_entry(mod)
    return entry.rule if entry is not None else None


def _module_entry(mod: nn.Module) -> Optional[Entry]:
    for cls in type(mod).__mro__:
        entry = _MODULES.get(cls)
        if entry is not None:
            return entry if cls is type(mod) or type(mod).forward is cls.forward else None
    return None


def registered_ops() -> List[str]:
    names = [t.__name__ for t in _MODULES]
    for f in _FUNCTIONS:
        mod = getattr(f, "__module__", "") or ""
        short = {"torch.nn.functional": "F", "_operator": "operator", "builtins": ""}.get(mod, mod)
        nm = getattr(f, "__name__", repr(f))
        names.append(f"{short}.{nm}" if short else nm)
    names += [f"Tensor.{m}" for m in _METHODS]
    return sorted(set(names))


def registered_summary() -> str:
    """A short list for error messages: the module types, and how many functions and methods."""
    mods = sorted(t.__name__ for t in _MODULES)
    return (f"modules {mods}; plus {len(_FUNCTIONS)} functions and {len(_METHODS)} tensor methods "
            "(fusecc.rules.registered_ops() lists them)")


def _any_pm(args: Any, kwargs: Any) -> bool:
    found = []
    fx.node.map_aggregate((args, kwargs), lambda a: found.append(a) if is_pm(a) else None)
    return bool(found)


def passthrough(ctx: Any, node: fx.Node, args: Any, kwargs: Any) -> V:
    """Emit the node unchanged; its result is shared (no input carried a model dim)."""
    return ctx.out(ctx.emit_like(node, args, kwargs), None)


def lower_node(ctx: Any, node: fx.Node, args: tuple, kwargs: dict) -> V:
    from . import fallback

    if node.op == "call_module":
        mod = ctx.module(node)
        entry = _module_entry(mod)
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
            from .schema import normalize

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


def _call(ctx: Any, node: fx.Node, entry: Entry, args: tuple, kwargs: dict) -> V:
    if entry.rank0 and args and isinstance(args[0], V) and args[0].is_tensor and args[0].rank == 0:
        return lift_rank0(ctx, node, entry.rule, args, kwargs)
    return entry.rule(ctx, node, args, kwargs)


def lift_rank0(ctx: Any, node: fx.Node, rule: Rule, args: tuple, kwargs: dict) -> V:
    """Run ``rule`` on a 0-dim tensor as on a 1-element vector, then give the per-model results back their rank.

    torch reads ``dim=0`` and ``dim=-1`` of a 0-dim tensor as a virtual size-1 dim, and a full reduction of it as a
    reduction over that one element. The fused value of a per-model 0-dim tensor is ``[N]``, whose dim 0 is the
    model dim: mapped naively, ``x.sum()`` would sum over the models and ``x.softmax(0)`` would be out of range.
    Every 0-dim tensor argument (per-model ``[N]`` -> ``[N, 1]``, shared ``[]`` -> ``[1]``) gets that dim as a real
    one; every tensor the rule returns is reshaped to its per-model shape (from shape propagation) with the model
    dim in front.
    """

    def lift(a: Any) -> Any:
        if isinstance(a, V) and a.is_tensor and a.rank == 0:
            meta = a.meta.reshape(1)
            if a.per_model:
                s = ctx.stacked(a, 0)
                return V(ctx.call(operator.getitem, s, (slice(None), None)), S(0), meta)
            return V(ctx.method("reshape", a, 1), None, meta)
        if isinstance(a, (tuple, list)):
            return type(a)(lift(x) for x in a)
        return a

    y = rule(ctx, node, lift(tuple(args)), {k: lift(v) for k, v in kwargs.items()})

    def drop(v: V) -> V:
        if not isinstance(v.meta, Tensor):
            return v
        if not v.per_model:
            return V(ctx.method("reshape", v, list(v.meta.shape)), None, v.meta)
        s = ctx.stacked(V(v.node, v.layout, v.meta), 0)
        return V(ctx.method("reshape", s, [ctx.n] + list(v.meta.shape)), S(0), v.meta)

    return drop(y) if isinstance(y.meta, Tensor) else ctx.map_container(y, drop)


def warn_fallback(qualname: str, typename: str, reason: str) -> None:
    warnings.warn(
        f"fusecc: module '{qualname}' ({typename}) is not fused: {reason}; it runs as a loop over the N models "
        "(correct, but slower)",
        UserWarning,
        stacklevel=4,
    )


def arg(args: tuple, kwargs: dict, pos: int, name: str, default: Any = None) -> Any:
    """Argument by position or keyword."""
    if len(args) > pos:
        return args[pos]
    return kwargs.get(name, default)


def set_arg(args: tuple, kwargs: dict, pos: int, name: str, value: Any) -> Tuple[tuple, dict]:
    """Replace an argument given by position or keyword (keyword if it was absent)."""
    if len(args) > pos:
        a = list(args)
        a[pos] = value
        return tuple(a), dict(kwargs)
    k = dict(kwargs)
    k[name] = value
    return tuple(args), k


def const(x: Any) -> Any:
    """The Python value of a shared constant argument (V of a constant, or the value itself)."""
    if isinstance(x, V):
        if isinstance(x.node, fx.Node):
            return x.meta  # a runtime value: its example value stands in (used for ints that are structural)
        return x.node
    return x
