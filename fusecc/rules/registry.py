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

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from ..lower import V, is_pm

Rule = Callable[..., V]

_MODULES: Dict[type, Tuple[Rule, bool]] = {}
_FUNCTIONS: Dict[Any, Tuple[Rule, bool]] = {}
_METHODS: Dict[str, Tuple[Rule, bool]] = {}


class Decline(Exception):
    """Raised by a rule that cannot fuse this particular node; the message says why."""


def register_rule(*targets: Any, on_shared: bool = False) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module types, functions and method names.

    With ``on_shared=False`` a node whose inputs are all shared (the same for every model) does not reach the rule:
    it is emitted unchanged and its result is shared. Module rules always run (modules hold per-model weights).
    """

    def deco(rule: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                _METHODS[t] = (rule, on_shared)
            elif isinstance(t, type) and issubclass(t, nn.Module):
                _MODULES[t] = (rule, True)
            else:
                _FUNCTIONS[t] = (rule, on_shared)
        return rule

    return deco


def module_rule(mod: nn.Module) -> Optional[Rule]:
    """The rule for a module: its type's, or a base class's if the subclass keeps the base's forward."""
    for cls in type(mod).__mro__:
        entry = _MODULES.get(cls)
        if entry is not None:
            if cls is type(mod) or type(mod).forward is cls.forward:
                return entry[0]
            return None
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
        rule = module_rule(mod)
        if rule is None:
            return fallback.loop(ctx, node, args, kwargs, f"no rule registered for {type(mod).__name__}")
        try:
            return rule(ctx, node, args, kwargs)
        except Decline as e:
            return fallback.loop(ctx, node, args, kwargs, str(e))
    from . import fallback

    table = _FUNCTIONS if node.op == "call_function" else _METHODS
    try:
        entry = table.get(node.target)
    except TypeError:  # unhashable target
        entry = None
    pm = _any_pm(args, kwargs)
    if entry is not None and (pm or entry[1]):
        try:
            return entry[0](ctx, node, args, kwargs)
        except Decline as e:
            raise ctx.error(f"cannot fuse this op: {e}") from None
    if not pm:
        return passthrough(ctx, node, args, kwargs)
    return fallback.vmap(ctx, node, args, kwargs, "fallback", "no rule registered for this op")


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
