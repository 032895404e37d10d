"""The one table of rules: callable -> rule.

A rule turns one node of the original graph into fused-graph nodes. It is registered for every callable it
handles: module types (``nn.Linear``), torch functions (``F.linear``, ``torch.add``, ``operator.add``) and tensor
method names (``"add"``). Signature::

    @register_rule(nn.Linear, F.linear)
    def fuse_linear(ctx: Rewriter, node: fx.Node, args: tuple, kwargs: dict) -> Value: ...

``args``/``kwargs`` are the node's arguments with every graph value replaced by a :class:`~fusecc.values.Value`.
``ctx`` is the :class:`~fusecc.rewrite.Rewriter`: it emits fused-graph nodes (``ctx.call``, ``ctx.method``) and
converts layouts (``ctx.stacked``, ``ctx.folded``). A rule that can only handle some cases raises :class:`Decline`;
for a module the node then runs as a loop over the N models (with a warning saying why), for a function the
compile fails with the reason. fusecc/rules/dispatch.py calls the rules; docs/adding-an-op.md walks through a new one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch.fx as fx
import torch.nn as nn

from ..values import Value

Rule = Callable[..., Value]


@dataclass(frozen=True)
class Entry:
    """A registered rule and how it is called."""

    rule: Rule
    on_shared: bool = False  # called when no argument is per-model (else the node is emitted unchanged)
    by_name: bool = False  # arguments bound by the op's signature first (fusecc/rules/schema.py)
    rank0: bool = False  # 0-dim tensor arguments are lifted to rank 1 around the rule (dispatch.lift_rank0)


_MODULES: Dict[type, Entry] = {}
_FUNCTIONS: Dict[Any, Entry] = {}
_METHODS: Dict[str, Entry] = {}


class Decline(Exception):
    """Raised by a rule that cannot fuse this particular node; the message says why."""


def register_rule(*targets: Any, on_shared: bool = False, by_name: bool = False, rank0: bool = False
                  ) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module types, functions and method names.

    With ``on_shared=False`` a node whose inputs are all shared (the same for every model) does not reach the rule:
    it is emitted unchanged and its result is shared. Module rules always run, except for a module in eval mode whose
    weights and inputs every model shares: unless its rule says ``on_shared=True`` (it computes that case once
    itself), it runs once as it is (fusecc/rules/fallback.py ``once``).

    With ``by_name=True`` a function or method call reaches the rule bound to the overload torch would pick, as
    ``(first_argument,), {name: value}`` with every default filled in (:func:`fusecc.rules.schema.normalize`), so
    ``arg(args, kwargs, 1, "dim")`` finds the dim however the model passed it (``torch.var(x, True)`` has no dim:
    its ``True`` is ``unbiased``).

    With ``rank0=True`` a call on a 0-dim tensor runs the rule on the tensor viewed with one size-1 dim
    (:func:`fusecc.rules.dispatch.lift_rank0`), which is how torch reads ``dim=0`` / ``dim=-1`` of a 0-dim tensor.
    """

    def deco(rule: Rule) -> Rule:
        for t in targets:
            if isinstance(t, str):
                _METHODS[t] = Entry(rule, on_shared, by_name, rank0)
            elif isinstance(t, type) and issubclass(t, nn.Module):
                _MODULES[t] = Entry(rule, on_shared, False, rank0)
            else:
                _FUNCTIONS[t] = Entry(rule, on_shared, by_name, rank0)
        return rule

    return deco


def module_entry(mod: nn.Module) -> Optional[Entry]:
    """The rule entry for a module: its type's, or a base class's if the subclass keeps the base's forward."""
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
    if isinstance(x, Value):
        if isinstance(x.node, fx.Node):
            return x.meta  # a runtime value: its example value stands in (used for ints that are structural)
        return x.node
    return x
