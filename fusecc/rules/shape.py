"""Shape ops: sizes, views, permutations, indexing, cat/stack/split.

Per-model dims are mapped to tensor dims around the model dim; per-model sizes (``x.size()``, ``x.shape``)
are returned without it, so a model's own ``x.view(x.size(0), -1)`` keeps working on the fused tensor.
"""

from __future__ import annotations

import operator
from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn

from .. import runtime
from ..values import Folded, Layout, Stacked, Value, norm_dim
from . import fallback
from .registry import Decline, arg, const, register_rule


def free_of(ctx, x: Value, dims: Sequence[int]) -> Value:
    """x in a layout whose model dim is none of the per-model ``dims`` (folded -> stacked when needed)."""
    if x.layout.folded and x.layout.dim in dims:
        return ctx.stacked(x)
    return x


def layout_after_removal(layout: Layout, removed: Sequence[int]) -> Layout:
    """Layout after per-model dims ``removed`` disappear (reductions without keepdim, select, unbind)."""
    k = sum(1 for p in removed if p < layout.dim)
    return Layout(layout.kind, layout.dim - k)


def _shape_args(args: tuple, start: int = 1) -> Tuple[Any, bool]:
    """The shape given to view/reshape/expand/repeat: varargs or one sequence. Returns (shape, is_single_node)."""
    rest = args[start:]
    if len(rest) == 1 and isinstance(rest[0], (tuple, list)):
        return list(rest[0]), False
    if len(rest) == 1 and isinstance(rest[0], Value) and not isinstance(rest[0].meta, (int, torch.SymInt)):
        return rest[0], True  # a runtime torch.Size / tuple
    return list(rest), False


def _is_size_of(a: Any, x: fx.Node, i: int) -> bool:
    """Is original-graph argument ``a`` literally ``x.size(i)`` or ``x.shape[i]``?"""
    if not isinstance(a, fx.Node):
        return False
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2 and a.args[0] is x and a.args[1] == i:
        return True
    if a.op == "call_function" and a.target is operator.getitem and a.args[1] == i:
        s = a.args[0]
        if isinstance(s, fx.Node) and s.op == "call_method" and s.target == "size" and s.args[0] is x and len(
            s.args
        ) == 1:
            return True
        if isinstance(s, fx.Node) and s.op == "call_function" and s.target is getattr and s.args == (x, "shape"):
            return True
    return False


# ------------------------------------------------------------------------------------------------ sizes


@register_rule("size")
def fuse_size(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    dim = arg(args, kwargs, 1, "dim")
    if dim is None:
        return ctx.out(ctx.call(runtime.shape.model_size, x, x.layout.kind, x.layout.dim, ctx.n), None)
    p = norm_dim(const(dim), x.rank)
    if x.layout.folded and p == x.layout.dim:
        return ctx.out(ctx.call(operator.floordiv, ctx.method("size", x, p), ctx.n), None)
    return ctx.out(ctx.method("size", x, ctx.tensor_dim(x, p)), None)


@register_rule("dim", "ndimension")
def fuse_dim(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    return Value(args[0].rank, None, args[0].rank)


@register_rule("numel", "nelement")
def fuse_numel(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    return ctx.out(ctx.call(operator.floordiv, ctx.method("numel", args[0]), ctx.n), None)


@register_rule(getattr)
def fuse_getattr(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, name = args[0], const(args[1])
    if not x.is_tensor:  # a field of a per-model container: torch.return_types (values, indices), ...
        lay = None
        if isinstance(x.layout, (tuple, list)) and isinstance(x.meta, tuple):
            field = getattr(x.meta, name)
            lay = next((lo for m, lo in zip(x.meta, x.layout) if m is field), None)
        return ctx.out(ctx.emit_like(node, args, kwargs), lay)
    if name == "shape":
        return ctx.out(ctx.call(runtime.shape.model_size, x, x.layout.kind, x.layout.dim, ctx.n), None)
    if name == "ndim":
        return Value(x.rank, None, x.rank)
    if name in ("T", "mT", "H", "mH"):
        r = x.rank
        perm = list(range(r))[::-1] if name in ("T", "H") else list(range(r - 2)) + [r - 1, r - 2]
        y = _permute(ctx, x, perm)
        if name in ("H", "mH"):
            y = Value(ctx.method("conj", y), y.layout, y.meta)
        return ctx.out(y.node, y.layout)
    if name in ("dtype", "device", "is_cuda", "requires_grad", "layout", "is_floating_point", "is_sparse"):
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    if name in ("data",):
        return ctx.out(ctx.emit_like(node, args, kwargs), x.layout)
    raise Decline(f"attribute '{name}' of a per-model tensor is not supported")


# ------------------------------------------------------------------------------------------------ views


@register_rule("view", "reshape", torch.reshape)
def fuse_view(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    if "shape" in kwargs:
        args, kwargs = (x, kwargs["shape"]), {}
    shape, single = _shape_args(args)
    if not single and len(shape) == 1 and isinstance(const(shape[0]), torch.dtype):
        if torch.empty((), dtype=const(shape[0])).element_size() != x.meta.element_size():
            raise Decline("view(dtype) with another element size on a per-model tensor")
        return ctx.out(ctx.emit_like(node, args, kwargs), x.layout)
    kind = "reshape"
    if single:
        s0 = ctx.stacked(x, 0)
        new_shape = ctx.call(operator.add, (ctx.n,), shape)
        return ctx.out(ctx.method(kind, s0, new_shape), Stacked(0))
    # how many leading dims does the model keep as they are (x.view(x.size(0), -1))?
    orig = node.args[1:] if len(node.args) > 2 or not isinstance(node.args[1], (tuple, list)) else node.args[1]
    keep = 0
    for i, a in enumerate(orig):
        if _is_size_of(a, node.args[0], i):
            keep = i + 1
        else:
            break
    xs = ctx.stacked(x)
    d = xs.layout.dim
    if d > keep:
        xs, d = ctx.stacked(x, 0), 0
    new_shape = list(shape[:d]) + [ctx.n] + list(shape[d:])
    return ctx.out(ctx.method(kind, xs, new_shape), Stacked(d))


@register_rule("view_as", "reshape_as")
def fuse_view_as(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, other = args[0], args[1]
    xs = ctx.stacked(x, 0)
    size = Value(
        ctx.call(runtime.shape.model_size, other, other.layout.kind, other.layout.dim, ctx.n)
        if other.per_model else ctx.method("size", other), None, other.meta.shape)
    return ctx.out(ctx.method("reshape", xs, ctx.call(operator.add, (ctx.n,), size)), Stacked(0))


def _flatten(ctx, x: Value, start: int, end: int) -> Value:
    r = x.rank
    if r == 0:
        return Value(ctx.method("reshape", ctx.stacked(x, 0), ctx.n, 1), Stacked(0), None)
    start, end = norm_dim(start, r), norm_dim(end, r)
    if start == end:
        return Value(x.node, x.layout, None)
    lay = x.layout
    if lay.folded:
        if start <= lay.dim <= end:
            x = ctx.stacked(x)
            lay = x.layout
        else:
            new = ctx.method("flatten", x, start, end)
            return Value(new, lay if lay.dim < start else Folded(lay.dim - (end - start)), None)
    d = lay.dim
    if start < d <= end:  # the model dim sits inside the range: move it in front of it
        x = ctx.stacked(x, start)
        d = start
    ts = start if start < d else start + 1
    te = end if end < d else end + 1
    new = ctx.method("flatten", x, ts, te)
    return Value(new, Stacked(d if d <= start else d - (end - start)), None)


@register_rule("flatten", torch.flatten, by_name=True)
def fuse_flatten(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    y = _flatten(ctx, x, const(arg(args, kwargs, 1, "start_dim", 0)), const(arg(args, kwargs, 2, "end_dim", -1)))
    return ctx.out(y.node, y.layout)


@register_rule(nn.Flatten)
def fuse_flatten_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    x = args[0]
    if not x.per_model:
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    y = _flatten(ctx, x, m.start_dim, m.end_dim)
    ctx.record("flatten", "view around the model dim")
    return ctx.out(y.node, y.layout)


def _unflatten(ctx, x: Value, dim: int, sizes: Any) -> Value:
    dim = norm_dim(dim, x.rank)
    x = free_of(ctx, x, [dim])
    k = len(sizes) - 1
    lay = x.layout
    new = ctx.method("unflatten", x, ctx.tensor_dim(x, dim), sizes)
    return Value(new, Layout(lay.kind, lay.dim + k) if lay.dim > dim else lay, None)


@register_rule("unflatten", torch.unflatten, by_name=True)
def fuse_unflatten(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    y = _unflatten(ctx, args[0], const(arg(args, kwargs, 1, "dim")), arg(args, kwargs, 2, "sizes"))
    return ctx.out(y.node, y.layout)


@register_rule(nn.Unflatten)
def fuse_unflatten_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    m = ctx.module(node)
    if not args[0].per_model:
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    y = _unflatten(ctx, args[0], m.dim, tuple(m.unflattened_size))
    return ctx.out(y.node, y.layout)


def _permute(ctx, x: Value, perm: Sequence[int]) -> Value:
    r = x.rank
    perm = [norm_dim(const(p), r) for p in perm]
    xs = ctx.stacked(x)
    d = xs.layout.dim
    tperm = [d] + [p if p < d else p + 1 for p in perm]
    return Value(ctx.method("permute", xs, tperm), Stacked(0), None)


@register_rule("permute", torch.permute)
def fuse_permute(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    dims = arg(args, kwargs, 1, "dims")
    perm = list(dims) if isinstance(dims, (tuple, list)) else list(args[1:])
    y = _permute(ctx, x, perm)
    return ctx.out(y.node, y.layout)


@register_rule("transpose", "swapaxes", "swapdims", torch.transpose, torch.swapaxes, torch.swapdims, by_name=True,
               rank0=True)
def fuse_transpose(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    a = norm_dim(const(arg(args, kwargs, 1, "dim0", kwargs.get("axis0"))), x.rank)
    b = norm_dim(const(arg(args, kwargs, 2, "dim1", kwargs.get("axis1"))), x.rank)
    x = free_of(ctx, x, [a, b])
    return ctx.out(ctx.method("transpose", x, ctx.tensor_dim(x, a), ctx.tensor_dim(x, b)), x.layout)


@register_rule("t", torch.t)
def fuse_t(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    if x.rank < 2:
        return ctx.out(x.node, x.layout)
    x = free_of(ctx, x, [0, 1])
    return ctx.out(ctx.method("transpose", x, ctx.tensor_dim(x, 0), ctx.tensor_dim(x, 1)), x.layout)


@register_rule("movedim", "moveaxis", torch.movedim, torch.moveaxis, by_name=True, rank0=True)
def fuse_movedim(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    src = const(arg(args, kwargs, 1, "source"))
    dst = const(arg(args, kwargs, 2, "destination"))
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    r = x.rank
    order = list(range(r))
    src = [norm_dim(s, r) for s in src]
    dst = [norm_dim(s, r) for s in dst]
    rest = [p for p in order if p not in src]
    out: List[Optional[int]] = [None] * r
    for s, t in zip(src, dst):
        out[t] = s
    it = iter(rest)
    out = [o if o is not None else next(it) for o in out]
    y = _permute(ctx, x, out)
    return ctx.out(y.node, y.layout)


@register_rule("unsqueeze", torch.unsqueeze, by_name=True)
def fuse_unsqueeze(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    p = norm_dim(const(arg(args, kwargs, 1, "dim")), x.rank + 1)
    lay = x.layout
    if lay.folded:
        return ctx.out(ctx.method("unsqueeze", x, p), Folded(lay.dim + 1) if p <= lay.dim else lay)
    d = lay.dim
    if p <= d:
        return ctx.out(ctx.method("unsqueeze", x, p), Stacked(d + 1))
    return ctx.out(ctx.method("unsqueeze", x, p + 1), lay)


@register_rule("squeeze", torch.squeeze, by_name=True, rank0=True)
def fuse_squeeze(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    dim = const(arg(args, kwargs, 1, "dim"))
    # which per-model dims go is known from the per-model shapes (size-1 dims are part of the compile signature)
    if dim is None:
        cand = range(x.rank)
    else:
        cand = [norm_dim(p, x.rank) for p in ([dim] if isinstance(dim, int) else dim)]
    removed = sorted(p for p in cand if x.meta.shape[p] == 1)
    if not removed:
        return ctx.out(x.node, x.layout)
    xs = ctx.stacked(x)
    d = xs.layout.dim
    new = ctx.method("squeeze", xs, tuple(ctx.tensor_dim(xs, p) for p in removed))
    return ctx.out(new, Stacked(d - sum(1 for p in removed if p < d)))


@register_rule("expand", "broadcast_to", torch.broadcast_to)
def fuse_expand(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    if "size" in kwargs or "shape" in kwargs:
        args = (x, kwargs.get("size", kwargs.get("shape")))
    shape, single = _shape_args(args)
    if single:  # a runtime torch.Size: its length is known from the per-model example
        xs = ctx.stacked(ctx.pad(ctx.stacked(x, 0), len(shape.meta)), 0)
        return ctx.out(ctx.method("expand", xs, ctx.call(operator.add, (ctx.n,), shape)), Stacked(0))
    xs = ctx.pad(ctx.stacked(x, 0), len(shape))
    xs = ctx.stacked(xs, 0)
    return ctx.out(ctx.method("expand", xs, [ctx.n] + list(shape)), Stacked(0))


@register_rule("expand_as")
def fuse_expand_as(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, other = args
    if not other.per_model:
        xs = ctx.stacked(x)
        size = ctx.method("size", other)
        xs = ctx.pad(ctx.stacked(x, 0), other.rank)
        xs = ctx.stacked(xs, 0)
        return ctx.out(ctx.method("expand", xs, ctx.call(operator.add, (ctx.n,), size)), Stacked(0))
    o = ctx.stacked(other, 0)
    xs = ctx.stacked(ctx.pad(ctx.stacked(x, 0), other.rank), 0)
    return ctx.out(ctx.method("expand_as", xs, o), Stacked(0))


@register_rule("repeat")
def fuse_repeat(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    reps, single = _shape_args(args)
    if single:
        raise Decline("repeat with a runtime size")
    xs = ctx.stacked(ctx.pad(ctx.stacked(x, 0), len(reps)), 0)
    return ctx.out(ctx.method("repeat", xs, [1] + list(reps)), Stacked(0))


# ------------------------------------------------------------------------------------------------ indexing


@register_rule(operator.getitem)
def fuse_getitem(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, idx = args
    if not x.is_tensor:  # a container (tuple of per-model tensors, dict of outputs, ...)
        i = const(idx)
        lay = x.layout[i]
        return ctx.out(ctx.call(operator.getitem, x, idx), lay)
    items = idx if isinstance(idx, tuple) else (idx,)

    def is_index_tensor(it: Any) -> bool:
        return (isinstance(it, Value) and it.is_tensor) or isinstance(it, list)

    adv = [i for i, it in enumerate(items) if is_index_tensor(it)]
    if any(isinstance(items[i], Value) and items[i].per_model and items[i].meta.dtype == torch.bool
           and items[i].rank > 0 for i in adv):
        raise Decline("indexing with a per-model boolean mask: how many elements it selects depends on each model's "
                      "data, so the models' results would differ in shape. Use torch.where or masked_fill, or a mask "
                      "shared by all models")
    if any(isinstance(items[i], Value) and items[i].per_model for i in adv):
        return fallback.vmap(ctx, node, args, kwargs, "getitem", None)
    if any(isinstance(items[i], Value) and items[i].meta.dtype == torch.bool for i in adv):
        if len(adv) > 1:
            raise Decline("boolean mask together with other index tensors")
    xs = ctx.stacked(x, 0)
    new_items = (slice(None),) + tuple(items)
    layout = Stacked(0)
    if len(adv) > 1 and adv != list(range(adv[0], adv[0] + len(adv))):
        # non-adjacent index tensors: torch puts the broadcast index dims first, then the model dim
        metas = [items[i].meta if isinstance(items[i], Value) else torch.tensor(items[i]) for i in adv]
        layout = Stacked(torch.broadcast_shapes(*[m.shape for m in metas]).__len__())
    return ctx.out(ctx.call(operator.getitem, xs, new_items), layout)


@register_rule("narrow", torch.narrow, by_name=True, rank0=True)
def fuse_narrow(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    p = norm_dim(const(arg(args, kwargs, 1, "dim")), x.rank)
    start, length = arg(args, kwargs, 2, "start"), arg(args, kwargs, 3, "length")
    if isinstance(start, Value) and start.per_model:  # each model its own window: one gather
        xs = ctx.stacked(x, 0)
        ctx.record("narrow", "per-model start: one gather")
        return ctx.out(ctx.call(runtime.shape.narrow_per_model, xs, p + 1, ctx.stacked(start, 0), length), Stacked(0))
    x = free_of(ctx, x, [p])
    return ctx.out(ctx.method("narrow", x, ctx.tensor_dim(x, p), start, length), x.layout)


@register_rule("select", torch.select, by_name=True, rank0=True)
def fuse_select(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    p = norm_dim(const(arg(args, kwargs, 1, "dim")), x.rank)
    x = free_of(ctx, x, [p])
    new = ctx.method("select", x, ctx.tensor_dim(x, p), arg(args, kwargs, 2, "index"))
    return ctx.out(new, layout_after_removal(x.layout, [p]))


@register_rule("index_select", torch.index_select, by_name=True, rank0=True)
def fuse_index_select(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, index = args[0], arg(args, kwargs, 2, "index")
    p = norm_dim(const(arg(args, kwargs, 1, "dim")), x.rank)
    if isinstance(index, Value) and index.per_model:  # each model its own indices: one gather
        ctx.record("index_select", "per-model indices: one gather")
        return ctx.out(ctx.call(runtime.shape.index_select_per_model, ctx.stacked(x, 0), p + 1, ctx.stacked(index, 0)),
                       Stacked(0))
    x = free_of(ctx, x, [p])
    return ctx.out(ctx.method("index_select", x, ctx.tensor_dim(x, p), index), x.layout)


@register_rule("gather", torch.gather, by_name=True, rank0=True)
def fuse_gather(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, index = args[0], arg(args, kwargs, 2, "index")
    p = norm_dim(const(arg(args, kwargs, 1, "dim")), x.rank)
    xs = ctx.stacked(x, 0)
    ix = ctx.stacked(index, 0)
    return ctx.out(ctx.method("gather", xs, p + 1, ix), Stacked(0))


# ------------------------------------------------------------------------------------------------ cat / stack / split


def _common_stacked(ctx, vs: Sequence[Value]) -> Tuple[List[Value], int]:
    """All tensors to one stacked layout Stacked(d) (shared ones broadcast). Returns (values, d)."""
    d = next(v for v in vs if v.per_model).layout.dim
    return [ctx.stacked(v, d) for v in vs], d


@register_rule(torch.cat, torch.concat, torch.concatenate, by_name=True)
def fuse_cat(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    ts = list(arg(args, kwargs, 0, "tensors"))
    # torch.cat skips 1-D empty tensors (shape [0]) whatever the others' rank: so does the fused cat
    full = [t for t in ts if not (isinstance(t, Value) and t.is_tensor and t.rank == 1 and t.meta.shape[0] == 0)]
    if full and len(full) < len(ts):
        ts = full
        if not any(isinstance(t, Value) and t.per_model for t in ts):  # only shared tensors are left
            return ctx.out(ctx.call(torch.cat, ts, arg(args, kwargs, 1, "dim", 0)), None)
    if not any(isinstance(t, Value) and t.per_model for t in ts):
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    r = next(t for t in ts if t.per_model).rank
    p = norm_dim(const(arg(args, kwargs, 1, "dim", 0)), r)
    lays = {t.layout for t in ts}
    ctx.record("cat", "one cat on the fused tensors")
    if len(lays) == 1:
        lay = next(iter(lays))
        if lay.stacked or lay.dim != p:  # same layout, model dim not the cat dim: one cat
            return ctx.out(ctx.call(torch.cat, ts, ctx.tensor_dim(ts[0], p)), lay)
        # every input folded at the cat dim (DenseNet's feature concatenation): a per-model cat that keeps
        # channels-last data channels-last (runtime.shape.cat_folded)
        return ctx.out(ctx.call(runtime.shape.cat_folded, ts, ctx.n, p), lay)
    vs, d = _common_stacked(ctx, ts)
    return ctx.out(ctx.call(torch.cat, vs, p if p < d else p + 1), Stacked(d))


@register_rule(torch.stack, by_name=True)
def fuse_stack(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    ts = list(arg(args, kwargs, 0, "tensors"))
    if not any(isinstance(t, Value) and t.per_model for t in ts):
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    r = next(t for t in ts if t.per_model).rank
    p = norm_dim(const(arg(args, kwargs, 1, "dim", 0)), r + 1)
    vs, d = _common_stacked(ctx, ts)
    if p <= d:
        return ctx.out(ctx.call(torch.stack, vs, p), Stacked(d + 1))
    return ctx.out(ctx.call(torch.stack, vs, p + 1), Stacked(d))


def _tuple_layout(ctx, lay: Layout) -> Any:
    meta = ctx.node.meta.get("fusecc_pm")
    return type(meta)(lay for _ in meta) if isinstance(meta, (tuple, list)) else lay


@register_rule("split", "chunk", "tensor_split", torch.split, torch.chunk, torch.tensor_split, by_name=True,
               rank0=True)
def fuse_split(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    p = norm_dim(const(arg(args, kwargs, 2, "dim", 0)), x.rank)
    if len(args) > 1:
        sizes = args[1]
    else:  # bound by name: the one argument besides the tensor and dim (split_size, sections, indices, chunks, ...)
        sizes = next(v for k, v in kwargs.items() if k != "dim")
    if isinstance(sizes, Value) and sizes.per_model:
        raise Decline("the split points are a per-model tensor: how many pieces there are, and their sizes, would "
                      "differ between the models. Pass them as Python ints or a tensor shared by all models")
    x = free_of(ctx, x, [p])
    name = node.target if isinstance(node.target, str) else node.target.__name__
    new = ctx.method(name, x, sizes, ctx.tensor_dim(x, p))
    return ctx.out(new, _tuple_layout(ctx, x.layout))


@register_rule("unbind", torch.unbind, by_name=True, rank0=True)
def fuse_unbind(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    p = norm_dim(const(arg(args, kwargs, 1, "dim", 0)), x.rank)
    x = free_of(ctx, x, [p])
    layout = _tuple_layout(ctx, layout_after_removal(x.layout, [p]))
    return ctx.out(ctx.method("unbind", x, ctx.tensor_dim(x, p)), layout)
