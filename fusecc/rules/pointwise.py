"""Element-wise ops and activations: the same op on the fused tensor, operands broadcast per model.

Per-model operands are brought to one layout (``Lowerer.broadcast_operands``): a per-model bias ``[C, 1, 1]``
against a folded activation ``[B, N*C, H, W]`` becomes ``[N, C, 1, 1]`` against the view ``[B, N, C, H, W]``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .. import runtime
from ..values import Stacked, Value
from .registry import Decline, arg, register_rule

_OPERATORS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.mod, operator.pow,
    operator.neg, operator.pos, operator.abs, operator.invert, operator.eq, operator.ne, operator.lt, operator.le,
    operator.gt, operator.ge, operator.and_, operator.or_, operator.xor,
]

_TORCH = [
    "add", "sub", "subtract", "mul", "multiply", "div", "divide", "true_divide", "floor_divide", "remainder", "fmod",
    "pow", "neg", "negative", "abs", "exp", "exp2", "expm1", "log", "log2", "log10", "log1p", "sqrt", "rsqrt", "sin",
    "cos", "tan", "asin", "acos", "atan", "atan2", "arctan2", "sinh", "cosh", "tanh", "sigmoid", "relu", "erf", "erfc",
    "erfinv", "sign", "sgn", "floor", "ceil", "round", "trunc", "frac", "clamp", "clip", "clamp_min", "clamp_max",
    "where", "maximum", "minimum", "fmax", "fmin", "lerp", "addcmul", "addcdiv", "reciprocal", "square",
    "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_xor",
    "bitwise_not", "eq", "ne", "lt", "le", "gt", "ge", "greater", "less", "greater_equal", "less_equal", "not_equal",
    "isnan", "isinf", "isfinite", "nan_to_num", "masked_fill", "hypot", "logaddexp", "xlogy", "heaviside",
    "copysign", "zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "logit", "selu",
    "celu", "rrelu", "hardshrink", "threshold", "sinc", "deg2rad", "rad2deg", "positive", "float_power", "angle",
]
_FUNCTIONAL = [
    "relu", "relu_", "relu6", "elu", "elu_", "selu", "celu", "gelu", "silu", "mish", "leaky_relu", "leaky_relu_",
    "hardtanh", "hardtanh_", "hardswish", "hardsigmoid", "sigmoid", "tanh", "softplus", "softshrink", "hardshrink",
    "tanhshrink", "softsign", "logsigmoid", "threshold", "threshold_", "rrelu", "rrelu_",
]
# tensor methods: the torch names plus in-place variants and dunder forms
_METHODS = sorted(
    (set(_TORCH) - {"zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like"})
    | {"hardtanh", "relu6", "silu", "gelu"}
)
_INPLACE = [m + "_" for m in _TORCH if hasattr(torch.Tensor, m + "_")]

ELEMENTWISE_FUNCTIONS = (
    _OPERATORS
    + [getattr(torch, n) for n in _TORCH if hasattr(torch, n)]
    + [getattr(F, n) for n in _FUNCTIONAL if hasattr(F, n)]
    + [torch.relu_, torch.sigmoid_, torch.tanh_]
)
ELEMENTWISE_METHODS = [m for m in _METHODS if hasattr(torch.Tensor, m)] + _INPLACE + [
    "__and__", "__or__", "__xor__", "__invert__", "masked_fill_", "clamp_", "copy_", "fill_", "zero_",
]

ELEMENTWISE_MODULES = [
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Softplus, nn.Softshrink, nn.Hardshrink, nn.Tanhshrink, nn.Softsign,
    nn.LogSigmoid, nn.Threshold, nn.Identity,
]


def _is_inplace(node: fx.Node, kwargs: dict) -> bool:
    t = node.target
    if node.op == "call_method":
        return isinstance(t, str) and t.endswith("_") and not t.startswith("__")
    if kwargs.get("inplace") is True:
        return True
    if getattr(t, "__module__", None) in ("_operator", "operator"):  # operator.and_/or_ are not in-place
        return False
    name = getattr(t, "__name__", "")
    return name.endswith("_") and not name.startswith("__")


@register_rule(*ELEMENTWISE_FUNCTIONS, *ELEMENTWISE_METHODS)
def fuse_elementwise(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """Any element-wise op: operands to one layout, then the same op; an in-place op keeps its target."""
    keys = list(kwargs)
    conv, layout = ctx.broadcast_operands(list(args) + [kwargs[k] for k in keys])
    new_args, new_kwargs = tuple(conv[: len(args)]), dict(zip(keys, conv[len(args):]))
    inplace = _is_inplace(node, kwargs)
    self_v = args[0] if args else None
    if inplace and isinstance(self_v, Value) and not self_v.per_model and layout is not None:
        ctx.unshare([self_v], "a model writes it in place with its own values")  # a buffer stored once: per model
    if inplace and isinstance(self_v, Value) and not self_v.per_model:
        # a shared tensor cannot hold per-model results in place: compute out of place instead, in the dtype the
        # in-place op keeps (x.lt_(y) stays float where x.lt(y) is bool)
        if node.op == "call_method" and node.target in ("copy_", "fill_"):  # x.copy_(y_per_model): y, as x holds it
            new = ctx.call(runtime.shape.broadcast_copy, new_args[0], new_args[1])
        elif node.op == "call_method":
            new = ctx.method(node.target[:-1], *new_args, **new_kwargs)
        else:
            new_kwargs.pop("inplace", None)
            new = ctx.call(node.target, *new_args, **new_kwargs)
        if self_v.is_tensor:
            new = ctx.method("to", new, self_v.meta.dtype)
    else:
        new = ctx.emit_like(node, new_args, new_kwargs)
    if inplace and isinstance(self_v, Value) and self_v.per_model:
        return ctx.out(self_v.node if layout != self_v.layout else new, self_v.layout)
    new, layout = ctx.finish_broadcast(new, layout)
    return ctx.out(new, layout)


# ``x += y`` as dynamo (and torch.fx) record it: on a tensor, the in-place method
_INPLACE_OPERATORS = {
    operator.iadd: "add_", operator.isub: "sub_", operator.imul: "mul_", operator.itruediv: "div_",
    operator.ifloordiv: "floor_divide_", operator.imod: "remainder_", operator.ipow: "pow_",
    operator.iand: "bitwise_and_", operator.ior: "bitwise_or_", operator.ixor: "bitwise_xor_",
}


class _AsMethod:
    """The node being rewritten, seen as a call of the in-place tensor method (what the element-wise rule reads)."""

    op = "call_method"

    def __init__(self, node: fx.Node, target: str):
        self.target = target
        self.name = node.name
        self.meta = node.meta


@register_rule(*_INPLACE_OPERATORS)
def fuse_inplace_operator(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    x = args[0]
    if not (isinstance(x, Value) and x.is_tensor):  # a Python number: ``n += 1`` rebinds, as ``n + 1``
        op = getattr(operator, node.target.__name__[1:] if node.target.__name__ != "iand" else "and_")
        if node.target in (operator.ior, operator.ixor):
            op = {operator.ior: operator.or_, operator.ixor: operator.xor}[node.target]
        return ctx.out(ctx.call(op, *args, **kwargs), None)
    return fuse_elementwise(ctx, _AsMethod(node, _INPLACE_OPERATORS[node.target]), args, kwargs)


@register_rule(*ELEMENTWISE_MODULES)
def fuse_activation_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """A parameter-free element-wise module: call it on the fused tensor as it is (its layout is kept)."""
    x = args[0]
    ctx.record(type(ctx.module(node)).__name__.lower(), "element-wise on the fused tensor")
    return ctx.out(ctx.emit_like(node, args, kwargs), x.layout)


@register_rule(nn.RReLU)
def fuse_rrelu_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """RReLU draws random slopes in training: a shared input gets a model dim so each model draws its own."""
    x = args[0]
    if ctx.module(node).training and not x.per_model:
        x = ctx.stacked(x, 0)
    ctx.record("rrelu", "element-wise on the fused tensor")
    return ctx.out(ctx.emit_like(node, (x,), kwargs), x.layout)


@register_rule(torch.masked_fill, "masked_fill", "masked_fill_")
def fuse_masked_fill(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """masked_fill of a per-model tensor by a shared fill value is an element-wise op of x and the mask. With a
    per-model fill value (a 0-dim tensor per model, stacked ``[N]``), or a shared x under a per-model mask (x must then
    broadcast to the mask's shape, which masked_fill does not do), it is ``where(mask, value, x)`` in x's dtype."""
    x, mask, value = args[0], arg(args, kwargs, 1, "mask"), arg(args, kwargs, 2, "value")
    value_pm = isinstance(value, Value) and value.is_tensor and value.per_model
    if not value_pm and x.per_model:
        return fuse_elementwise(ctx, node, args, kwargs)
    if isinstance(value, Value) and value.is_tensor and value.rank != 0:
        raise Decline(f"masked_fill takes a 0-dim fill value, got a tensor of rank {value.rank}")
    (xv, mv, vv), lay = ctx.broadcast_operands([x, mask, value])
    new = ctx.method("to", ctx.call(torch.where, mv, vv, xv), x.meta.dtype)
    if node.op == "call_method" and node.target == "masked_fill_" and x.per_model:  # write into x (through a view)
        ctx.method("copy_", xv, new)
        return ctx.out(x.node, x.layout)
    new, lay = ctx.finish_broadcast(new, lay)
    return ctx.out(new, lay)


_MEMORY_FORMAT_RANK = {torch.channels_last: 4, torch.channels_last_3d: 5}


@register_rule("type_as", "to", "float", "half", "double", "bfloat16", "long", "int", "bool", "short", "byte",
               "char", "detach", "detach_", "clone", "contiguous", "requires_grad_", "cpu", "cuda", "type",
               torch.clone, torch.detach)
def fuse_unary_keep(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """Dtype/device/memory ops: applied to the fused tensor as it is; other tensor arguments (``x.to(y)``,
    ``x.type_as(y)``) only lend their dtype/device."""
    x = args[0]
    if not (isinstance(x, Value) and x.per_model):
        return ctx.out(ctx.emit_like(node, args, kwargs), None)
    rank = _MEMORY_FORMAT_RANK.get(kwargs.get("memory_format"))
    if rank is not None and x.is_tensor and x.rank == rank:
        # channels-last is a format of 4-d (5-d) tensors: the fused tensor gets it with the model dim folded into the
        # channels ([B, N*C, H, W]), so every model's slice is channels-last as in the model
        x = ctx.folded(x, 1)
    return ctx.out(ctx.emit_like(node, (x,) + tuple(args[1:]), kwargs), x.layout)


@register_rule("new_zeros", "new_ones", "new_full", "new_empty", "new_tensor")
def fuse_new_tensor(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """``x.new_*(size)``: x only lends dtype and device; the size is given, so the result is shared."""
    return ctx.out(ctx.emit_like(node, args, kwargs), None)


@register_rule(nn.PReLU)
def fuse_prelu_module(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    """PReLU: per-model weight [N, P] (P = 1 or C) on the channel dim of a folded input."""
    return _prelu(ctx, args[0], ctx.mod_tensor(node, "weight"))


@register_rule(F.prelu, torch.prelu, "prelu", by_name=True)
def fuse_prelu(ctx, node: fx.Node, args: tuple, kwargs: dict) -> Value:
    return _prelu(ctx, args[0], arg(args, kwargs, 1, "weight"))


def _prelu(ctx, x: Value, w: Value) -> Value:
    """F.prelu reads its weight along dim 1 (dim 0 for 1-D input): fold the model dim into that dim."""
    p = w.meta.numel()
    if not w.per_model and p == 1:  # one shared slope: element-wise on any layout
        ctx.record("prelu", "element-wise on the fused tensor")
        return ctx.out(ctx.call(F.prelu, x, w), x.layout)
    if x.rank < 2:  # no channel dim: one slope per model (torch requires a single one), element-wise
        if p != 1:
            raise Decline(f"prelu of a {x.rank}-d input takes a single slope, got {p}")
        w0 = w
        if w.per_model:  # one slope per model: a per-model 0-dim value [N]
            w0 = Value(ctx.method("reshape", ctx.stacked(w, 0), ctx.n), Stacked(0), w.meta.reshape(()))
        (xv, wv), lay = ctx.broadcast_operands([x, w0])
        neg = ctx.call(operator.mul, xv, wv)
        new, lay = ctx.finish_broadcast(ctx.call(torch.where, ctx.call(operator.ge, xv, 0), xv, neg), lay)
        ctx.record("prelu", "element-wise on the fused tensor")
        return ctx.out(new, lay)
    ch = 1
    c = x.meta.shape[ch]
    xf = ctx.folded(x, ch)
    if w.per_model:
        wv = ctx.method("reshape", ctx.stacked(w, 0), ctx.n, p)
        if p == 1 and c != 1:
            wv = ctx.method("expand", wv, ctx.n, c)
        wv = ctx.method("reshape", wv, -1)
    else:
        wv = ctx.method("repeat", w, ctx.n)
    ctx.record("prelu", "prelu over N*C channels")
    return ctx.out(ctx.call(F.prelu, xf, wv), xf.layout)
