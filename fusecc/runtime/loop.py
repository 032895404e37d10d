"""Running a function or a module once per model: torch.vmap over the model dim (per-model indexing, functions
with no rule), and the loop over the N models of a module with no rule (the fallback)."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_unflatten


_VMAP_FNS: Dict[str, Any] = {}


def vmap_key(fn: Any) -> str:
    """A name for ``fn`` that generated code can carry (it cannot hold a function object as an argument)."""
    key = f"{getattr(fn, '__module__', None)}.{getattr(fn, '__qualname__', getattr(fn, '__name__', repr(fn)))}"
    if _VMAP_FNS.setdefault(key, fn) is not fn:
        key = f"{key}@{id(fn):x}"
        _VMAP_FNS[key] = fn
    return key


def keywords_last(f: Callable[..., Any], kw_names: Tuple[str, ...]) -> Callable[..., Any]:
    """``f`` called with its last ``len(kw_names)`` positional arguments passed by those keywords instead: torch.vmap
    maps positional arguments only, so keyword arguments travel as trailing positional ones."""
    k = len(kw_names)
    if not k:
        return f
    return lambda *a: f(*a[:len(a) - k], **dict(zip(kw_names, a[len(a) - k:])))


def vmap_call(fn: str, in_dims: Tuple[Any, ...], args: Tuple[Any, ...], kw_names: Tuple[str, ...] = ()) -> Any:
    """``fn(*args)`` per model: ``torch.vmap`` over dim 0 of the arguments whose in_dim is 0 (the last
    ``len(kw_names)`` passed by those keywords, see :func:`keywords_last`)."""
    return torch.vmap(keywords_last(_VMAP_FNS[fn], kw_names), in_dims=in_dims)(*args)


def loop_module(
    template: torch.nn.Module,
    names: List[str],
    stacked: List[Tensor],
    args: List[Any],
    per_model: List[bool],
    kwargs: Dict[str, Any],
    kw_per_model: Dict[str, bool],
    n: int,
    stacked_per_model: Optional[List[bool]] = None,
) -> Any:
    """Run ``template`` once per model with model i's slice of every stacked parameter/buffer and input.

    args[j] is ``[N, *]`` where per_model[j] (sliced), else passed to every model as is (same for kwargs). Tensor
    outputs are stacked on a new leading dim; non-tensor outputs are model 0's.
    """
    outs = []
    pm = stacked_per_model if stacked_per_model is not None else [True] * len(names)
    for i in range(n):
        params = {name: (t[i] if p else t) for name, t, p in zip(names, stacked, pm)}
        a = tuple(x[i] if pm else x for x, pm in zip(args, per_model))
        k = {key: (x[i] if kw_per_model[key] else x) for key, x in kwargs.items()}
        outs.append(functional_call(template, params, a, k, strict=False, tie_weights=False))
    leaves0, spec = tree_flatten(outs[0])
    all_leaves = [tree_flatten(o)[0] for o in outs]
    merged = [
        torch.stack([lv[j] for lv in all_leaves]) if isinstance(leaves0[j], Tensor) else leaves0[j]
        for j in range(len(leaves0))
    ]
    return tree_unflatten(merged, spec)


def call_once(template: torch.nn.Module, names: List[str], tensors: List[Tensor], args: tuple, kwargs: dict) -> Any:
    """``template`` run once with ``tensors`` as its parameters and buffers (every model's: they share them)."""
    return functional_call(template, dict(zip(names, tensors)), args, kwargs, strict=False, tie_weights=False)
