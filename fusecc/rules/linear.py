"""Linear layers and matmuls.

- per-model input, per-model weight: batched GEMM (``baddbmm``) on ``[N, B*, K]`` x ``[N, K, M]``;
- shared input, per-model weight: ONE wide GEMM with the N weights concatenated (``x @ [W_1; ...; W_N]^T``), whose
  output ``[*, N*M]`` is the folded layout ``F(last)``, so no copy is made;
- matmul / bmm / ``@`` / einsum between two activations: torch's batched matmul with the model dim as a batch dim.
"""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import choose, runtime
from ..values import Folded, Stacked, Value
from .registry import Decline, arg, const, register_rule


_KERNEL = {True: " (Triton kernel)", False: ""}


def linear(ctx, x: Value, w: Value, b: Value | None) -> Value:
    if w.per_model:
        if b is not None and not b.per_model:
            b = ctx.stacked(b, 0)
        if not x.per_model:
            ctx.record("linear", "wide GEMM (shared input, N weights concatenated)" + _KERNEL[ctx.triton])
            return ctx.out(ctx.call(runtime.linear.wide_linear, x, w, b), Folded(x.rank - 1))
        xs = ctx.stacked(x, 0)
        if ctx.triton:
            ctx.record("linear", "batched GEMM (Triton kernel)")
            return ctx.out(ctx.call(runtime.linear.batched_linear, xs, w, b), Stacked(0))
        x_shape = [ctx.n] + list(x.meta.shape)
        impl, why = ctx.chooser.linear(x_shape, [ctx.n] + list(w.meta.shape), b is not None, ctx.grad_needed,
                                       w.meta.dtype, ctx.device)
        ctx.record("linear", choose.LINEAR_HOW[impl], why if ctx.chooser.tune else None)
        kw = {} if impl == "bmm" else {"impl": impl}
        return ctx.out(ctx.call(runtime.linear.batched_linear, xs, w, b, **kw), Stacked(0))
    if b is not None and b.per_model:
        raise Decline("linear with a shared weight and a per-model bias")
    last = x.rank - 1
    if x.layout.folded and x.layout.dim == last or x.layout.stacked and x.layout.dim == x.rank:
        x = ctx.stacked(x, 0)
    ctx.record("linear", "one GEMM (weight shared by all models)")
    return ctx.out(ctx.call(F.linear, x, w, b), x.layout)


@register_rule(nn.Linear, on_shared=True)
def fuse_linear_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """N x Linear(K->M) on x [N, B, K] -> baddbmm with weight [N, M, K] (or one wide GEMM for a shared x)."""
    x = arg(args, kwargs, 0, "input")
    return linear(ctx, x, ctx.mod_tensor(node, "weight"), ctx.mod_tensor(node, "bias"))


@register_rule(F.linear, torch._C._nn.linear, by_name=True)
def fuse_linear(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
    if not w.per_model and not x.per_model and not (isinstance(b, Value) and b.per_model):
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    return linear(ctx, x, w, b if isinstance(b, Value) else None)


def matmul(ctx, a: Value, b: Value) -> Value:
    """Per-model ``a @ b`` with torch.matmul semantics (1-D operands, batch broadcasting)."""
    if not a.per_model and not b.per_model:  # both shared (addmm of shared matrices): an ordinary matmul
        return ctx.out(ctx.call(torch.matmul, a, b), None)
    a1, b1 = a.rank == 1, b.rank == 1
    A = ctx.stacked(a, 0) if a.per_model else a
    B = ctx.stacked(b, 0) if b.per_model else b
    if a1:
        A = Value(ctx.method("unsqueeze", A, -2), A.layout, a.meta.unsqueeze(0))
    if b1:
        B = Value(ctx.method("unsqueeze", B, -1), B.layout, b.meta.unsqueeze(-1))
    rank = max(A.rank, B.rank)
    if A.per_model:
        A = ctx.pad(A, rank)
    if B.per_model:
        B = ctx.pad(B, rank)
    y = ctx.call(torch.matmul, A, B)
    if a1:
        y = ctx.method("squeeze", y, -2)
    if b1:
        y = ctx.method("squeeze", y, -1)
    ctx.record("matmul", "batched matmul, model dim as a batch dim")
    return ctx.out(y, Stacked(0))


@register_rule(torch.matmul, operator.matmul, torch.bmm, torch.mm, torch.mv, torch.dot, torch.inner, "matmul", "bmm",
               "mm", "mv", "dot", "__matmul__")
def fuse_matmul(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    other = arg(args, kwargs, 1, "other", kwargs.get("mat2", kwargs.get("vec", kwargs.get("tensor"))))
    if node.target is torch.inner:
        return inner(ctx, args[0], other)
    return matmul(ctx, args[0], other)


def inner(ctx, a: Value, b: Value) -> Value:
    """torch.inner: a contraction over the last dims, result ``[*a[:-1], *b[:-1]]``, as an einsum with the model dim
    as one more subscript."""
    if a.rank == 0 or b.rank == 0:  # a scalar operand: inner is a product
        conv, lay = ctx.broadcast_operands([a, b])
        new, lay = ctx.finish_broadcast(ctx.call(operator.mul, conv[0], conv[1]), lay)
        return ctx.out(new, lay)
    letters = "abcdefghijklmnopqrstuvwxy"
    sa = letters[: a.rank - 1] + "z"
    sb = letters[a.rank - 1: a.rank + b.rank - 2] + "z"
    ops, subs = [], []
    for v, sub in ((a, sa), (b, sb)):
        if v.per_model:
            ops.append(ctx.stacked(v, 0))
            subs.append("Z" + sub)
        else:
            ops.append(v)
            subs.append(sub)
    eq = ",".join(subs) + "->Z" + sa[:-1] + sb[:-1]
    ctx.record("inner", "einsum with a model subscript")
    return ctx.out(ctx.call(torch.einsum, eq, *ops), Stacked(0))


@register_rule(torch.baddbmm, torch.addmm, torch.addbmm, "baddbmm", "addmm", "addbmm", by_name=True)
def fuse_addmm(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """beta * input + alpha * (a @ b), composed from the matmul and element-wise rules; addbmm sums the products
    over each model's batch."""
    inp = args[0]
    a = arg(args, kwargs, 1, "mat1", kwargs.get("batch1"))
    b = arg(args, kwargs, 2, "mat2", kwargs.get("batch2"))
    beta, alpha = const(kwargs.get("beta", 1)), const(kwargs.get("alpha", 1))
    prod = matmul(ctx, a, b)
    name = node.target if isinstance(node.target, str) else node.target.__name__
    if name == "addbmm":  # [N, B, n, p] -> [N, n, p] (or a shared [B, n, p] -> [n, p])
        prod = Value(ctx.call(torch.sum, prod, 1 if prod.per_model else 0), prod.layout, None)
    if alpha != 1:
        prod = Value(ctx.call(operator.mul, prod, alpha), prod.layout, None)
    prod = Value(prod.node, prod.layout, ctx.node.meta.get("fusecc_pm"))
    if beta == 0:  # torch ignores input then (even NaN in it)
        return ctx.out(prod.node, prod.layout)
    if beta != 1:
        inp = Value(ctx.call(operator.mul, inp, beta), inp.layout, inp.meta)
    conv, lay = ctx.broadcast_operands([inp, prod])
    new, lay = ctx.finish_broadcast(ctx.call(operator.add, conv[0], conv[1]), lay)
    return ctx.out(new, lay)


def bilinear(ctx, x1: Value, x2: Value, w: Value, b: Optional[Value]) -> Value:
    """``x1^T W x2 + b`` per model. Per-model weights: one einsum over the stacked operands
    (runtime.linear.batched_bilinear); a weight every model shares: F.bilinear itself on the stacked inputs, whose
    leading dims it treats as batch dims."""
    xs1, xs2 = ctx.stacked(x1, 0), ctx.stacked(x2, 0)  # (a shared input is broadcast: an expanded view, no copy)
    if not w.per_model and not (b is not None and b.per_model):
        ctx.record("bilinear", "one bilinear (weight shared by all models)")
        return ctx.out(ctx.call(F.bilinear, xs1, xs2, w, b), Stacked(0))
    ctx.record("bilinear", "one einsum with per-model weights")
    bias = None if b is None else ctx.stacked(b, 0)
    return ctx.out(ctx.call(runtime.linear.batched_bilinear, xs1, xs2, ctx.stacked(w, 0), bias), Stacked(0))


@register_rule(nn.Bilinear)
def fuse_bilinear_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x1, x2 = arg(args, kwargs, 0, "input1"), arg(args, kwargs, 1, "input2")
    return bilinear(ctx, x1, x2, ctx.mod_tensor(node, "weight"), ctx.mod_tensor(node, "bias"))


@register_rule(F.bilinear, by_name=True)
def fuse_bilinear(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    b = arg(args, kwargs, 3, "bias")
    return bilinear(ctx, args[0], arg(args, kwargs, 1, "input2"), arg(args, kwargs, 2, "weight"),
                    b if isinstance(b, Value) else None)


@register_rule(torch.einsum)
def fuse_einsum(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """einsum: the model dim becomes one more subscript letter on every per-model operand and on the output."""
    eq = args[0]
    ops = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) else list(args[1:])
    eq = eq.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    subs = lhs.split(",")
    if not _:
        letters = [c for c in lhs if c.isalpha()]
        rhs = ("..." if "..." in lhs else "") + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    free = next(c for c in "zyxwvutsrqponmlkjihgfedcbaZYXWVUTSRQPONMLKJIHGFEDCBA" if c not in eq)
    new_ops, new_subs = [], []
    for s, o in zip(subs, ops):
        if o.per_model:
            new_ops.append(ctx.stacked(o, 0))
            new_subs.append(free + s)
        else:
            new_ops.append(o)
            new_subs.append(s)
    new_eq = ",".join(new_subs) + "->" + free + rhs
    ctx.record("einsum", "einsum with a model subscript")
    return ctx.out(ctx.call(torch.einsum, new_eq, *new_ops), Stacked(0))
