"""The fallback: a module with no rule runs as a loop over the N models inside the fused graph.

Each model runs the module with its own slice of the stacked parameters (``torch.func.functional_call``), so the
weights stay stacked in one place, gradients flow to them, and the result is right, only slower. A warning names
the module so the user knows what did not fuse.
"""

from __future__ import annotations

import warnings

import torch
import torch.fx as fx
from torch import Tensor
from torch.utils._pytree import tree_map

from .. import runtime
from ..errors import FusionError
from ..fleet import skeleton
from ..values import Stacked, Value, has_model_dim
from .registry import registered_summary


def warn_fallback(qualname: str, typename: str, reason: str) -> None:
    warnings.warn(
        f"fusecc: module '{qualname}' ({typename}) is not fused: {reason}; it runs as a loop over the N models "
        "(correct, but slower)",
        UserWarning,
        stacklevel=4,
    )


def loop(ctx, node: fx.Node, args: tuple, kwargs: dict, reason: str) -> Value:
    mod = ctx.module(node)
    qual = node.target
    own = list(mod.named_parameters()) + list(mod.named_buffers())
    if not own and not any(isinstance(a, Value) and a.per_model for a in list(args) + list(kwargs.values())):
        # no weights and nothing per-model in: one call serves every model
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    if ctx.fleet.strict:
        raise ctx.error(f"module '{qual}' ({type(mod).__name__}) is not fused: {reason}. fuse(..., strict=True) "
                        "refuses to run it as a loop over the N models; without strict=True it does (with a warning)")

    def prep(a):
        if isinstance(a, Value):
            if a.is_tensor:
                return (ctx.stacked(a, 0), True) if a.per_model else (a, False)
            if has_model_dim(a.layout):
                raise ctx.error(f"module '{qual}' takes a container of per-model tensors, which the fallback loop "
                                "cannot slice; pass the tensors as separate arguments")
            return a, False
        if isinstance(a, (tuple, list, dict)):
            found = []
            fx.node.map_aggregate(a, lambda x: found.append(x) if isinstance(x, Value) and x.per_model else None)
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
    if mod.training:  # a module in training may update its buffers in place: each model its own
        ctx.unshare([v for (n, _), v in zip(own, stacked) if n in dict(mod.named_buffers())],
                    "a module run as a loop in training mode may update its buffers")
    tmpl = _template(ctx, qual, mod)
    warn_fallback(qual, type(mod).__name__, reason)
    ctx.report.fallbacks.append((qual, type(mod).__name__, reason))
    ctx.record("fallback", "loop over the N models")
    y = ctx.call(
        runtime.loop.loop_module, tmpl, names, stacked, [a for a, _ in pa], [p for _, p in pa],
        {k: a for k, (a, _) in pk.items()}, {k: p for k, (_, p) in pk.items()}, ctx.n,
        [v.per_model for v in stacked],
    )
    meta = node.meta.get("fusecc_pm")
    layout = tree_map(lambda m: Stacked(0) if isinstance(m, Tensor) else None, meta)
    return ctx.out(y, layout)


def _template(ctx, qual: str, mod: torch.nn.Module) -> fx.Node:
    """The fused-graph node of the module the loop runs (its code and configuration; weights come per call)."""
    if qual not in ctx.templates:  # the fused module adds it to its _fusecc_templates with the compiled forward
        ctx.templates[qual] = skeleton(mod)
    return ctx.call(lambda_getitem, ctx.get_attr("_fusecc_templates"), qual)


def once(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """A module whose weights every model shares, in eval mode, on inputs every model shares: ONE call serves all
    models (its result is shared), with the shared tensors (``torch.func.functional_call``)."""
    mod = ctx.module(node)
    qual = node.target
    own = list(mod.named_parameters()) + list(mod.named_buffers())
    tensors = [ctx.param(f"{qual}.{n}") for n, _ in own]
    ctx.record("shared module", f"one {type(mod).__name__} call (weights and inputs shared by all models)")
    y = ctx.call(runtime.loop.call_once, _template(ctx, qual, mod), [n for n, _ in own], tensors, tuple(args),
                 dict(kwargs))
    return ctx.out(y, None)


def lambda_getitem(d: dict, key: str):
    """``d[key]`` (a named function, so generated code stays readable)."""
    return d[key]


def vmap(ctx, node: fx.Node, args: tuple, kwargs: dict, kind: str, warn_reason: str | None) -> Value:
    """Run a function per model under ``torch.vmap`` over the model dim, checked now on meta tensors.

    Used as the lowering of per-model indexing, and as the fallback of functions with no rule (then with a
    warning). If vmap cannot run the function (data-dependent output shapes, randomness), the compile fails with
    vmap's reason.
    """
    if warn_reason is not None and ctx.fleet.strict:
        raise ctx.error(f"no rule registered for this op ({warn_reason}); fuse(..., strict=True) refuses to run it "
                        "under torch.vmap over the model dim; without strict=True it does (with a warning)")
    n = ctx.n

    def prep(a):
        """(fused-graph argument, in_dim, meta stand-in) for one (possibly nested) argument."""
        if isinstance(a, Value):
            if a.is_tensor and a.per_model:
                s = ctx.stacked(a, 0)
                meta = torch.empty((n,) + tuple(a.meta.shape), dtype=a.meta.dtype, device="meta")
                return s, 0, meta
            if has_model_dim(a.layout):
                raise ctx.error("a container of per-model values cannot be passed through torch.vmap")
            return a, None, a.meta
        if isinstance(a, (tuple, list)):
            parts = [prep(x) for x in a]
            return type(a)(p[0] for p in parts), type(a)(p[1] for p in parts), type(a)(p[2] for p in parts)
        return a, None, a

    # keyword arguments travel as trailing positional ones (vmap maps positional arguments only), named by kw_names
    kw_names = tuple(kwargs)
    parts = [prep(a) for a in tuple(args) + tuple(kwargs.values())]
    fargs = tuple(p[0] for p in parts)
    in_dims = tuple(p[1] for p in parts)
    metas = tuple(p[2] for p in parts)
    if node.op == "call_method":
        fn = getattr(torch.Tensor, node.target, None)
        if fn is None:
            raise ctx.error(f"tensor method '{node.target}' unknown")
    else:
        fn = node.target
    try:
        out = torch.vmap(runtime.loop.keywords_last(fn, kw_names), in_dims=in_dims)(*metas)
    except Exception as e:  # noqa: BLE001 - any failure means: no safe way to run it per model
        raise ctx.error(
            f"no rule registered for this op on per-model values, and torch.vmap cannot run it per model "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Wrap the code in a submodule and "
            f"pass it in fuse(..., leaf_modules=[...]) to run it as a loop over the N models. "
            f"Registered: {registered_summary()}"
        ) from None
    meta = node.meta.get("fusecc_pm")
    got = tree_map(lambda t: tuple(t.shape[1:]) if isinstance(t, Tensor) else None, out)
    want = tree_map(lambda t: tuple(t.shape) if isinstance(t, Tensor) else None, meta)
    if got != want:
        raise ctx.error(f"torch.vmap gives per-model shapes {got}, the model gives {want}")
    if warn_reason is not None:
        where = f"node '{node.name}'"
        warnings.warn(f"fusecc: {where} ({node.target}) has no rule ({warn_reason}); it runs under torch.vmap over "
                      "the model dim", UserWarning, stacklevel=4)
        ctx.report.fallbacks.append((node.name, str(getattr(node.target, "__name__", node.target)), "torch.vmap"))
    ctx.record(kind, "torch.vmap over the model dim")
    y = ctx.call(runtime.loop.vmap_call, runtime.loop.vmap_key(fn), in_dims, fargs, kw_names)
    return ctx.out(y, tree_map(lambda m: Stacked(0) if isinstance(m, Tensor) else None, meta))
