"""Reading a call's arguments by name, through the op's own signature.

A torch op can be called with its arguments in several ways, and overloads give the same position different
meanings: ``torch.var(x, 1)`` reduces dim 1, ``torch.var(x, True)`` is the unbiased flag of a full reduction;
``torch.mode(x)`` reduces dim -1 by default where ``torch.max(x)`` reduces everything. A rule that reads
arguments by hand-numbered positions gets such calls silently wrong. :func:`normalize` binds a call to the
overload torch itself would pick (the TorchScript schemas of the op, matched on the argument types that shape
propagation recorded, as torch.fx's ``normalize_function`` does) and returns it as ``(first,), {name: value}``
with every default filled in, so a rule reads ``kwargs["dim"]`` and means the dim.

Functions written in Python (``torch.nn.functional``) bind to their ``inspect.signature``; tensor methods to the
schemas of ``aten::<name>``. A call that binds to no signature (varargs such as ``x.view(2, 3)``) is left as it is.
"""

from __future__ import annotations

import functools
import inspect
import types
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor
from torch._jit_internal import boolean_dispatched
from torch.fx.operator_schemas import _torchscript_schema_to_signature, create_type_hint, type_matches
from torch.jit._builtins import _find_builtin

from ..values import Value


@functools.lru_cache(maxsize=None)
def _aten_signatures(name: str) -> Tuple[inspect.Signature, ...]:
    try:
        schemas = torch._C._jit_get_schemas_for_operator(f"aten::{name}")
    except RuntimeError:
        return ()
    out = []
    for s in schemas:
        if any(a.kwarg_only and a.name == "out" for a in s.arguments) or s.overload_name.endswith("out"):
            continue  # out= variants are never what a model's graph calls
        try:
            out.append(_torchscript_schema_to_signature(s))
        except Exception:  # noqa: BLE001 - a schema type python cannot express
            continue
    return tuple(out)


def _builtin_name(target: Any) -> Optional[str]:
    try:
        name = _find_builtin(target)
    except Exception:  # noqa: BLE001
        return None
    return name.split("::", 1)[1] if name and name.startswith("aten::") else None


def signatures(node: fx.Node) -> Tuple[inspect.Signature, ...]:
    """The signatures a call_function / call_method node may bind to (empty if unknown)."""
    if node.op == "call_method":
        return _aten_signatures(node.target) if isinstance(node.target, str) else ()
    return _function_signatures(node.target)


def _function_signatures(target: Any) -> Tuple[inspect.Signature, ...]:
    try:
        return _function_signatures_cached(target)
    except TypeError:  # unhashable target
        return ()


@functools.lru_cache(maxsize=None)
def _function_signatures_cached(target: Any) -> Tuple[inspect.Signature, ...]:
    if isinstance(target, types.BuiltinFunctionType) or isinstance(target, torch._ops.OpOverloadPacket):
        name = _builtin_name(target)
        return _aten_signatures(name) if name else ()
    fn = target
    if fn in boolean_dispatched:  # F.max_pool2d and friends: both branches have one signature
        d = boolean_dispatched[fn]
        if inspect.signature(d["if_true"]).parameters != inspect.signature(d["if_false"]).parameters:
            return ()
        fn = d["if_true"]
    try:
        return (inspect.signature(inspect.unwrap(fn)),)
    except (TypeError, ValueError):
        return ()


def _type_of(a: Any) -> Any:
    """The argument type an overload is matched on (what torch's argument parser would see)."""
    if isinstance(a, Value):
        m = a.meta
        if isinstance(m, Tensor):
            return Tensor
        if isinstance(m, torch.SymInt):
            return int
        return _type_of(m)
    if isinstance(a, (list, tuple)):
        return create_type_hint([_type_of(x) for x in a])
    if isinstance(a, torch.Size):
        return create_type_hint([int] * len(a))
    return type(a)


_SUPPORTED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _binds(sig: inspect.Signature, args: Sequence[Any], kwargs: Dict[str, Any]) -> Optional[inspect.BoundArguments]:
    if any(p.kind not in _SUPPORTED for p in sig.parameters.values()):
        return None
    try:
        return sig.bind(*args, **kwargs)
    except TypeError:
        return None


def _types_match(sig: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    with warnings.catch_warnings():  # type_matches warns on schema generics it does not read (List[t]): no match
        warnings.simplefilter("ignore")
        return _types_match_quiet(sig, bound)


def _types_match_quiet(sig: inspect.Signature, bound: inspect.BoundArguments) -> bool:
    for name, value in bound.arguments.items():
        ann = sig.parameters[name].annotation
        if ann is inspect.Parameter.empty or ann is Any:
            continue
        t = _type_of(value)
        if value is None or (isinstance(value, Value) and value.meta is None):
            if type_matches(ann, type(None)):
                continue
            return False
        if not type_matches(ann, t):
            return False
    return True


def normalize(node: fx.Node, args: tuple, kwargs: dict) -> Optional[Tuple[tuple, Dict[str, Any]]]:
    """``((first_argument,), {name: value, ...})`` with defaults filled in, as torch would bind the call; None when
    the call binds to no known signature (the rule then reads the arguments as written)."""
    sigs = signatures(node)
    if not sigs or not args:
        return None
    candidates: List[Tuple[inspect.Signature, inspect.BoundArguments]] = []
    for sig in sigs:
        b = _binds(sig, args, kwargs)
        if b is not None:
            candidates.append((sig, b))
    if not candidates:
        return None
    if len(candidates) > 1:
        typed = [(s, b) for s, b in candidates if _types_match(s, b)]
        if not typed:
            return None  # ambiguous and no overload fits the types: leave the call as written
        candidates = typed
    sig, bound = candidates[0]
    bound.apply_defaults()
    first = next(iter(sig.parameters))
    rest = {k: v for k, v in bound.arguments.items() if k != first}
    return (bound.arguments[first],), rest
