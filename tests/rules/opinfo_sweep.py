"""The OpInfo sweep: every op the rule registry claims, on PyTorch's own samples, fused vs the N models one by one.

PyTorch's OpInfo database (``torch.testing._internal.common_methods_invocations.op_db``, the table behind vmap's
exhaustive batching-rule tests) gives, per op, sample inputs that exercise its corner cases: 0-dim tensors,
negative dims, positional flags, integer index tensors, boolean masks, broadcasting. For every registry entry (a
torch function, ``F`` function, operator or tensor method name) the sweep finds the OpInfos that call it, in
every form it is registered under (function, method, in-place method, alias, operator), and turns each sample
into N tiny models that call the op. Each tensor of the sample plays one of these roles, per *variant*:

- ``input``: every tensor is a forward input with a model dim (per-model activations);
- ``param``: the first tensor is a per-model input, every other tensor a per-model buffer of the model (a weight);
  a sample with one tensor makes it a buffer (a reduction of a weight: ``self.w.sum().mean()``);
- ``shared``: the first tensor is a per-model input, every other tensor a forward input in ``shared_inputs``
  (a frozen weight or mask every model reads);
- ``shared0``: the first tensor is shared, the others per-model inputs.

Model 0 gets the sample's tensors as they are; model i > 0 a permutation of their values (scaled by U(0.5, 1) per
element for floating tensors), so index tensors stay valid and every model computes something different.

The oracle is the N models run one by one. Each op-sample ends in one :class:`Outcome` (see ``KINDS``); the test
(tests/rules/test_opinfo.py) requires ``match`` everywhere but for the exceptions it lists with their reasons, and
``python -m tests.rules.opinfo_sweep`` prints the whole table.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

import fusecc
from fusecc.rules import registry

N_MODELS = 3
MAX_SAMPLES = 3
VARIANTS = ("input", "param", "shared", "shared0")

# outcome kinds
MATCH = "match"  # fused == the N models (random ops: shape and dtype)
WRONG = "wrong"  # a result that differs from the N models, without an error: the serious class
ERROR = "error"  # an exception that is not a clean refusal (a crash where the loop works)
REFUSED = "refused"  # a FusionError at fuse/compile time that names the op: a stated limit
SKIP = "skip"  # the sample does not run as N models (the loop itself fails, ragged per-model results, ...)
KINDS = (MATCH, WRONG, ERROR, REFUSED, SKIP)

# fp32 results may differ in the last bits when a reduction runs over the fused tensor in another order
RTOL, ATOL = 1e-5, 1e-5


@functools.lru_cache(maxsize=None)
def op_db() -> Tuple[Any, ...]:
    from torch.testing._internal.common_methods_invocations import op_db as db

    return tuple(db)


# --------------------------------------------------------------------------------------------- what calls what


@dataclasses.dataclass(frozen=True)
class Form:
    """One way a registry entry is exercised: ``kind`` is function / method / inplace / operator."""

    entry: str  # the registry entry's name (``torch.add``, ``F.relu``, ``Tensor.add_``, ``operator.add``)
    kind: str  # (or inplace_operator: ``operator.iadd``, the ``x += y`` form)
    target: Any  # the callable (function, operator) or the method name
    adapter: Optional[Callable[..., Any]] = None  # (target, args, kwargs) -> result, where the OpInfo's order differs

    def call(self, args: Sequence[Any], kwargs: Dict[str, Any]) -> Any:
        if self.adapter is not None:
            return self.adapter(self.target, args, kwargs)
        if self.kind in ("method", "inplace"):
            return getattr(args[0], self.target)(*args[1:], **kwargs)
        return self.target(*args, **kwargs)


def entry_name(target: Any) -> str:
    if isinstance(target, str):
        return f"Tensor.{target}"
    mod = getattr(target, "__module__", None) or ""
    short = {"torch.nn.functional": "F", "_operator": "operator", "operator": "operator", "builtins": "builtins",
             "torch._C._nn": "torch._C._nn", "torch._C._VariableFunctions": "torch"}.get(mod, mod)
    if isinstance(target, type(torch.add)) and not mod:
        short = "torch"
    return f"{short}.{getattr(target, '__name__', repr(target))}"


def registry_entries() -> List[Tuple[str, Any, bool]]:
    """(name, target, is_method) for every function and tensor method the registry claims."""
    out = [(entry_name(f), f, False) for f in registry._FUNCTIONS]
    out += [(entry_name(m), m, True) for m in registry._METHODS]
    return out


def _name_of(v: Any) -> Optional[str]:
    return getattr(v, "__name__", None) if v is not None else None


def forms_of(opinfo: Any) -> Iterator[Tuple[str, Any]]:
    """(kind, function or method name) for every variant an OpInfo calls."""
    holders = [opinfo] + list(opinfo.aliases)
    for h in holders:
        if h.op is not None:
            yield "function", h.op
        if h.method_variant is not None:
            yield "method", _name_of(h.method_variant)
        if h.inplace_variant is not None:
            yield "inplace", _name_of(h.inplace_variant)
    if getattr(opinfo, "operator_variant", None) is not None:
        yield "operator", opinfo.operator_variant
    if getattr(opinfo, "inplace_operator_variant", None) is not None:  # ``x += y``
        yield "inplace_operator", opinfo.inplace_operator_variant


def _swap01(f: Callable[..., Any], a: Sequence[Any], k: Dict[str, Any]) -> Any:
    return f(a[1], a[0], *a[2:], **k)


# registry entries whose OpInfo calls them through a wrapper (a lambda, another spelling): entry -> (OpInfo name
# with its variant, form kind, adapter from the OpInfo's argument order)
EXTRA: Dict[str, List[Tuple[str, str, Optional[Callable[..., Any]]]]] = {
    "F.dropout": [("nn.functional.dropout", "function", None)],
    "F.alpha_dropout": [("nn.functional.alpha_dropout", "function", None)],
    "F.feature_alpha_dropout": [("nn.functional.feature_alpha_dropout.with_train", "function", None),
                                ("nn.functional.feature_alpha_dropout.without_train", "function", None)],
    "F.dropout2d": [("nn.functional.dropout2d", "function", None)],
    "F.dropout3d": [("nn.functional.dropout3d", "function", None)],
    "F.embedding": [("nn.functional.embedding", "function", _swap01)],
    "F.rrelu": [("nn.functional.rrelu", "function", None)],
    "torch.rrelu": [("nn.functional.rrelu", "function", None)],
    "F.upsample": [("nn.functional.upsample_nearest", "function", None)],
    "F.max_pool1d_with_indices": [("nn.functional.max_pool1d", "function", None)],
    "F.max_pool2d_with_indices": [("nn.functional.max_pool2d", "function", None)],
    "F.max_pool3d_with_indices": [("nn.functional.max_pool3d", "function", None)],
    "F.adaptive_max_pool2d_with_indices": [("nn.functional.adaptive_max_pool2d", "function", None)],
    "Tensor.__and__": [("bitwise_and", "method", None)],
    "Tensor.__or__": [("bitwise_or", "method", None)],
    "Tensor.__xor__": [("bitwise_xor", "method", None)],
    "Tensor.__invert__": [("bitwise_not", "method", None)],
    "Tensor.__matmul__": [("matmul", "method", None)],
    "Tensor.hardshrink": [("nn.functional.hardshrink", "method", None)],
    "Tensor.prelu": [("nn.functional.prelu", "method", None)],
    "Tensor.relu": [("nn.functional.relu", "method", None)],
    "Tensor.relu_": [("nn.functional.relu", "inplace", None)],
    "operator.truediv": [("div.no_rounding_mode", "operator", None)],
    "operator.floordiv": [("floor_divide", "operator", None)],
    "operator.pos": [("positive", "operator", None)],
    "operator.itruediv": [("div.no_rounding_mode", "inplace_operator", None)],
    "operator.ifloordiv": [("floor_divide", "inplace_operator", None)],
    "torch._C._nn.elu_": [("nn.functional.elu", "function", None)],
    "torch._C._nn.hardtanh_": [("nn.functional.hardtanh", "function", None)],
    "torch._C._nn.leaky_relu_": [("nn.functional.leaky_relu", "function", None)],
    "torch._C._nn.scaled_dot_product_attention": [("nn.functional.scaled_dot_product_attention", "function", None)],
    "torch.celu": [("nn.functional.celu", "function", None)],
    "torch.selu": [("nn.functional.selu", "function", None)],
    "torch.threshold": [("nn.functional.threshold", "function", None)],
    "torch.threshold_": [("nn.functional.threshold", "function", None)],
    "torch.relu": [("nn.functional.relu", "function", None)],
    "torch.relu_": [("nn.functional.relu", "function", None)],
    "torch.sigmoid_": [("sigmoid", "function", None)],
    "torch.tanh_": [("tanh", "function", None)],
    "torch.where": [("where", "function", _swap01)],
    "torch.functional.einsum": [("einsum", "function", lambda f, a, k: f(a[1], a[0], **k))],
    "torch.rand_like": [("rand_like", "function", None)],
    "torch.randn_like": [("randn_like", "function", None)],
}


@dataclasses.dataclass(frozen=True)
class Hand:
    """Samples written here for registry entries that have no OpInfo, or whose OpInfo samples cannot run (an OpInfo
    stand-in)."""

    name: str
    make: Callable[[], List[Any]]  # -> SampleInputs
    random: bool = False
    variant_test_name: str = ""

    @property
    def has_nondeterministic_output(self) -> bool:
        return self.random

    def sample_inputs(self, device: str, dtype: torch.dtype, requires_grad: bool = False) -> List[Any]:
        return self.make()

    def supports_dtype(self, dtype: torch.dtype, device: str) -> bool:
        return dtype == torch.float32


def _t(*shape: int) -> Tensor:
    return torch.randn(*shape)


def _hand() -> Dict[str, List[Hand]]:
    from torch.testing._internal.opinfo.core import SampleInput as SI

    def h(name: str, *samples: Callable[[], Any], random: bool = False) -> List[Hand]:
        return [Hand(name, lambda: [f() for f in samples], random)]

    return {
        "Tensor.size": h("size", lambda: SI(_t(2, 3, 4), args=(1,)), lambda: SI(_t(2, 3), args=(-1,)),
                         lambda: SI(_t(2, 3))),
        "Tensor.dim": h("dim", lambda: SI(_t(2, 3))),
        "Tensor.ndimension": h("ndimension", lambda: SI(_t(2, 3))),
        "Tensor.numel": h("numel", lambda: SI(_t(2, 3))),
        "Tensor.nelement": h("nelement", lambda: SI(_t(2, 3))),
        "builtins.getattr": h("getattr", lambda: SI(_t(2, 3), args=("shape",)), lambda: SI(_t(2, 3), args=("T",)),
                              lambda: SI(_t(2, 3, 4), args=("mT",))),
        "Tensor.type": h("type", lambda: SI(_t(2, 3), args=(torch.float64,))),
        "Tensor.type_as": h("type_as", lambda: SI(_t(2, 3), args=(torch.ones(2, dtype=torch.float64),))),
        "Tensor.cpu": h("cpu", lambda: SI(_t(2, 3))),
        "Tensor.detach": h("detach", lambda: SI(_t(2, 3))),
        "Tensor.detach_": h("detach_", lambda: SI(_t(2, 3))),
        "torch.detach": h("detach", lambda: SI(_t(2, 3))),
        "Tensor.requires_grad_": h("requires_grad_", lambda: SI(_t(2, 3), args=(False,))),
        "Tensor.copy_": h("copy_", lambda: SI(_t(2, 3), args=(_t(2, 3),)), lambda: SI(_t(2, 3), args=(_t(3),))),
        "Tensor.new_tensor": h("new_tensor", lambda: SI(_t(2, 3), args=([1.0, 2.0],))),
        "F.lp_pool1d": h("lp_pool1d", lambda: SI(_t(2, 3, 8), args=(2.0, 3)), lambda: SI(_t(3, 9), args=(1.5, 2))),
        "F.lp_pool2d": h("lp_pool2d", lambda: SI(_t(2, 3, 8, 8), args=(2.0, 2)),
                         lambda: SI(_t(3, 6, 6), args=(3.0, (2, 3)))),
        "F.dropout1d": h("dropout1d", lambda: SI(_t(2, 3, 8), args=(0.5, True)), lambda: SI(_t(3, 8), args=(0.3,)),
                         random=True),
        "torch.rrelu_": h("rrelu_", lambda: SI(_t(2, 3)), lambda: SI(_t(2, 3), args=(0.1, 0.3, True)), random=True),
        # in place, float_power needs a float64 base: its float32 OpInfo samples cannot run even in the loop
        "Tensor.float_power_": h("float_power_", lambda: SI(_t(2, 3).double().abs(), args=(2.5,)),
                                 lambda: SI(_t(3).double().abs(), args=(_t(2, 3).double(),))),
    }


# registry entries the sweep cannot run here, and why
NOT_SWEPT = {
    "Tensor.cuda": "needs a GPU (no CUDA on the CI machines); .cpu() and .to() share its rule",
}


@functools.lru_cache(maxsize=None)
def coverage() -> Dict[str, List[Tuple[Any, Form]]]:
    """Registry entry name -> the (OpInfo or hand-written stand-in, Form) pairs that exercise it."""
    funcs = {}
    for f in registry._FUNCTIONS:
        try:
            funcs[f] = entry_name(f)
        except TypeError:
            pass
    targets = {name: t for name, t, _ in registry_entries()}
    methods = set(registry._METHODS)
    cov: Dict[str, List[Tuple[Any, Form]]] = {name: [] for name in targets}
    by_name = {}
    for o in op_db():
        by_name[o.name + (f".{o.variant_test_name}" if o.variant_test_name else "")] = o
        for kind, t in forms_of(o):
            if kind in ("method", "inplace"):
                if t in methods:
                    cov[f"Tensor.{t}"].append((o, Form(f"Tensor.{t}", kind, t)))
            else:
                try:
                    name = funcs.get(t)
                except TypeError:
                    name = None
                if name is not None:
                    cov[name].append((o, Form(name, kind if kind in ("operator", "inplace_operator") else "function",
                                              t)))
    for name, uses in EXTRA.items():
        if name in cov:
            for oname, kind, adapter in uses:
                cov[name].append((by_name[oname], Form(name, kind, targets[name], adapter)))
    for name, hands in _hand().items():
        if name in cov:
            kind = "method" if name.startswith("Tensor.") else "function"
            cov[name] += [(hd, Form(name, "inplace" if kind == "method" and name.endswith("_") else kind,
                                    targets[name])) for hd in hands]
    return cov


# --------------------------------------------------------------------------------------------- one op-sample


class OpModule(nn.Module):
    """Calls one op; each tensor leaf of its arguments is a forward input (``t<k>``) or a buffer (``b<k>``).

    ``forward`` takes exactly the inputs the sample needs (:func:`op_module_class` makes one class per count): a
    forward with unused optional inputs would make every trace carry them."""

    def __init__(self, form: Form, spec: Any, leaves: List[Any], roles: List[str], buffers: Dict[int, Tensor]):
        super().__init__()
        self._form = form
        self._spec = spec
        self._leaves = leaves  # non-tensor leaves; tensor positions are filled from inputs / buffers
        self._roles = roles  # per leaf: "const", "in" or "buf"
        for k, t in buffers.items():
            self.register_buffer(f"b{k}", t)

    def _run(self, ins: Sequence[Any]) -> Any:
        vals = []
        j = 0
        for k, (role, leaf) in enumerate(zip(self._roles, self._leaves)):
            if role == "in":
                vals.append(ins[j])
                j += 1
            elif role == "buf":
                vals.append(getattr(self, f"b{k}"))
            else:
                vals.append(leaf)
        inp, args, kwargs = tree_unflatten(vals, self._spec)
        return self._form.call((inp,) + tuple(args), kwargs)


@functools.lru_cache(maxsize=None)
def op_module_class(n_inputs: int) -> type:
    """An OpModule subclass whose forward takes ``t0 .. t<n_inputs - 1>``."""
    names = ", ".join(f"t{j}" for j in range(n_inputs))
    ns: Dict[str, Any] = {}
    exec(f"def forward(self{', ' if names else ''}{names}):\n    return self._run([{names}])\n", ns)
    return type(f"OpModule{n_inputs}", (OpModule,), {"forward": ns["forward"]})


@dataclasses.dataclass
class Outcome:
    entry: str
    opinfo: str  # OpInfo name (+ variant_test_name)
    form: str
    variant: str
    sample: int
    kind: str
    detail: str = ""

    @property
    def key(self) -> Tuple[str, str, str]:
        return (self.entry, self.opinfo, self.variant)


def per_model_values(t: Tensor, n: int, gen: torch.Generator) -> List[Tensor]:
    """n values for one tensor of a sample: itself, then permutations of its values (floats scaled by U(0.5, 1))."""
    t = t.detach()
    vals = [t.clone()]
    for _ in range(1, n):
        flat = t.reshape(-1)
        v = flat[torch.randperm(flat.numel(), generator=gen)].reshape(t.shape)
        if t.is_floating_point():
            v = v * (0.5 + 0.5 * torch.rand(t.shape, generator=gen, dtype=t.dtype))
        vals.append(v.clone())
    return vals


def _roles(variant: str, n_tensors: int) -> List[str]:
    """Per tensor leaf: 'in' (per-model input), 'buf' (per-model buffer) or 'shared' (shared input)."""
    if variant == "input":
        return ["in"] * n_tensors
    if variant == "param":
        return ["buf"] if n_tensors == 1 else ["in"] + ["buf"] * (n_tensors - 1)
    if variant == "shared":
        return ["in"] + ["shared"] * (n_tensors - 1)
    if variant == "shared0":
        return ["shared"] + ["in"] * (n_tensors - 1)
    raise ValueError(variant)


def applicable_variants(n_tensors: int) -> List[str]:
    """Variants that differ for a sample with this many tensors (with one tensor, shared ones have nothing
    per-model)."""
    if n_tensors == 0:
        return []
    if n_tensors == 1:
        return ["input", "param"]
    return list(VARIANTS)


def _stack_leaves(outs: List[Any]) -> Tuple[Any, List[Any]]:
    """The N loop outputs as one spec and, per leaf, the N values; raises ValueError if the structures differ."""
    flats = [tree_flatten(o) for o in outs]
    spec = flats[0][1]
    for f, s in flats[1:]:
        if s != spec:
            raise ValueError("the models return different structures")
    return spec, [[f[0][k] for f in flats] for k in range(len(flats[0][0]))]


def compare(loop_outs: List[Any], fused_out: Any, random: bool) -> Optional[str]:
    """None if the fused output equals the N loop outputs; else what differs."""
    spec, leaves = _stack_leaves(loop_outs)
    fleaves, fspec = tree_flatten(fused_out)
    if fspec != spec:
        return f"output structure {fspec} != the models' {spec}"
    for k, (vals, f) in enumerate(zip(leaves, fleaves)):
        if isinstance(vals[0], Tensor):
            if not isinstance(f, Tensor):
                return f"leaf {k}: a {type(f).__name__} where the models return tensors"
            want = (len(vals),) + tuple(vals[0].shape)
            if any(v.shape != vals[0].shape for v in vals):
                return None  # ragged per-model results: the caller classifies it
            if tuple(f.shape) != want:
                return f"leaf {k}: shape {list(f.shape)} != {list(want)}"
            if f.dtype != vals[0].dtype:
                return f"leaf {k}: dtype {f.dtype} != {vals[0].dtype}"
            if random:
                continue
            ref = torch.stack(vals)
            if not torch.allclose(f, ref, rtol=RTOL, atol=ATOL, equal_nan=True) if (
                f.is_floating_point() or f.is_complex()
            ) else not torch.equal(f, ref):
                bad = (f != ref) & ~(f.isnan() & ref.isnan()) if f.is_floating_point() else f != ref
                i = bad.nonzero()[0].tolist() if bad.any() else []
                return f"leaf {k}: values differ (first at {i}: fused {f[tuple(i)].item() if i else '?'} vs " \
                       f"{ref[tuple(i)].item() if i else '?'})"
        else:
            if any(v != vals[0] for v in vals[1:]):
                return None
            if f != vals[0]:
                return f"leaf {k}: {f!r} != {vals[0]!r}"
    return None


def _clone(out: Any) -> Any:
    if isinstance(out, torch.Size):  # pytree would rebuild it as a plain tuple
        return out
    return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, out)


def _ragged(loop_outs: List[Any]) -> bool:
    try:
        _, leaves = _stack_leaves(loop_outs)
    except ValueError:
        return True
    for vals in leaves:
        if isinstance(vals[0], Tensor) and any(v.shape != vals[0].shape or v.dtype != vals[0].dtype for v in vals):
            return True
        if not isinstance(vals[0], Tensor) and any(v != vals[0] for v in vals[1:]):
            return True
    return False


def names_the_op(msg: str, form: Form) -> bool:
    """A refusal must say where: fusecc's FusionError names the node and the op it calls."""
    t = form.target if isinstance(form.target, str) else getattr(form.target, "__name__", "")
    return msg.startswith("fusecc") and ("node '" in msg or t in msg)


def run_sample(form: Form, opinfo: Any, sample: Any, variant: str, idx: int, random: bool,
               n: int = N_MODELS, seed: int = 0) -> Outcome:
    name = opinfo.name + (f".{opinfo.variant_test_name}" if opinfo.variant_test_name else "")
    out = functools.partial(Outcome, form.entry, name, form.kind, variant, idx)
    leaves, spec = tree_flatten((sample.input, tuple(sample.args), dict(sample.kwargs)))
    tens = [k for k, v in enumerate(leaves) if isinstance(v, Tensor)]
    roles_t = _roles(variant, len(tens))
    gen = torch.Generator().manual_seed(seed + 1000 * idx)
    values = {k: per_model_values(leaves[k], n, gen) for k in tens}
    roles = ["const"] * len(leaves)
    for k, r in zip(tens, roles_t):
        roles[k] = "buf" if r == "buf" else "in"
    consts = [None if isinstance(v, Tensor) else v for v in leaves]
    in_keys = [k for k, r in zip(tens, roles_t) if r in ("in", "shared")]
    cls = op_module_class(len(in_keys))
    models = [cls(form, spec, consts, roles, {k: values[k][i] for k, r in zip(tens, roles_t) if r == "buf"})
              for i in range(n)]
    shared = [f"t{j}" for j, k in enumerate(in_keys) if roles_t[tens.index(k)] == "shared"]

    def loop_inputs(i: int) -> List[Tensor]:
        return [values[k][0 if roles_t[tens.index(k)] == "shared" else i].clone() for k in in_keys]

    try:  # fused first: a model that writes its buffers in place must not change what is stacked
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # share=False: the per-model buffers stay per model even where a permutation left them equal (a single
            # value); buffers every model shares are the path of shared inputs, swept by the "shared" variants
            fused = fusecc.fuse(models, shared_inputs=shared, share=False)
    except Exception as e:  # noqa: BLE001
        return out(ERROR, f"fuse(): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # cloned: an in-place op returns the model's own buffer, which a later run would change again
            loop = [_clone(m(*loop_inputs(i))) for i, m in enumerate(models)]
    except Exception as e:  # noqa: BLE001 - the sample does not run per model: nothing to compare
        return out(SKIP, f"the loop fails: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    ragged = _ragged(loop)
    fused_in = [
        values[k][0].clone() if roles_t[tens.index(k)] == "shared" else torch.stack(values[k])
        for k in in_keys
    ]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = fused(*fused_in)
    except fusecc.FusionError as e:
        msg = str(e)
        if ragged:
            return out(SKIP, "ragged per-model results, refused: " + msg.splitlines()[0])
        # a refusal states a limit (a rule declined, or nothing can run the op per model); a FusionError caused by
        # another exception is a rule that crashed
        kind = REFUSED if e.__cause__ is None and names_the_op(msg, form) else ERROR
        return out(kind, f"FusionError: {msg.splitlines()[0]}")
    except Exception as e:  # noqa: BLE001
        if ragged:
            return out(SKIP, f"ragged per-model results, {type(e).__name__}")
        return out(ERROR, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    if random and form.entry.split(".")[-1].rstrip("_") not in UNINITIALISED:
        # random by design, or only in some modes (rrelu in training): values are compared when model 0, run twice
        # under two seeds, gives the same result
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(1)
                a = copy.deepcopy(models[0])(*loop_inputs(0))
                torch.manual_seed(2)
                b = copy.deepcopy(models[0])(*loop_inputs(0))
            random = compare([a], tree_map(lambda t: t.unsqueeze(0) if isinstance(t, Tensor) else t, b), False) \
                is not None
        except Exception:  # noqa: BLE001
            pass
    if ragged:
        return out(WRONG, "the models' results differ in shape or value per model, yet the fused module returned one")
    diff = compare(loop, got, random)
    if diff and "values differ" in diff and _within_rounding(models, loop_inputs, loop, got):
        diff = None
    return out(WRONG, diff) if diff else out(MATCH)


def _within_rounding(models: List[nn.Module], loop_inputs: Callable[[int], List[Tensor]], loop: List[Any],
                     got: Any) -> bool:
    """Whether the fused float32 results differ from the loop's only by rounding: every element as close to the exact
    answer (the models run in float64) as 4x the loop's largest float32 error on that output, plus the tolerance.
    Sums reordered over a fused tensor (addbmm over a batch of 25 products of magnitude 10) differ from the loop by
    more than a fixed tolerance, and by no more than the loop itself differs from the exact result."""
    def dbl(t: Any) -> Any:
        return t.double() if isinstance(t, Tensor) and t.dtype == torch.float32 else t

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref = [tree_map(dbl, copy.deepcopy(m).double()(*[dbl(t) for t in loop_inputs(i)]))
                   for i, m in enumerate(models)]
    except Exception:  # noqa: BLE001 - the op has no float64 form
        return False
    _, loop_leaves = _stack_leaves(loop)
    _, ref_leaves = _stack_leaves(ref)
    for vals, rvals, f in zip(loop_leaves, ref_leaves, tree_flatten(got)[0]):
        if not (isinstance(f, Tensor) and f.is_floating_point()):
            continue
        lo, r = torch.stack(vals).double(), torch.stack(rvals).double()
        f = f.double()
        if not torch.equal(lo.isnan(), f.isnan()):
            return False
        err = (lo - r).abs().nan_to_num(0.0, 0.0, 0.0).max()
        ok = ((f - r).abs() <= 4 * err + ATOL + RTOL * r.abs()) | (lo.isnan() & f.isnan()) | (f == lo)
        if not bool(ok.all()):
            return False
    return True


def sample_dtype(opinfo: Any) -> Optional[torch.dtype]:
    """float32 where the op supports it (the sweep's dtype), else its integer or bool form (bitwise ops)."""
    for dt in (torch.float32, torch.int64, torch.bool):
        if opinfo.supports_dtype(dt, "cpu"):
            return dt
    return None


def is_random(opinfo: Any, form: Form) -> bool:
    return bool(getattr(opinfo, "has_nondeterministic_output", False)) or opinfo.name.split(".")[-1] in RANDOM_OPS or (
        form.entry.split(".")[-1].rstrip("_") in RANDOM_OPS)


# results that may be random (or are uninitialised) by design: checked for shape and dtype only, unless the sample
# turns out deterministic (dropout with training=False, rrelu in eval)
RANDOM_OPS = {"rand_like", "randn_like", "empty_like", "new_empty", "rrelu", "dropout", "alpha_dropout",
              "feature_alpha_dropout", "dropout1d", "dropout2d", "dropout3d", "randint_like", "bernoulli",
              "empty", "new_empty_strided", "empty_strided"}
UNINITIALISED = {"empty_like", "new_empty", "empty", "new_empty_strided", "empty_strided"}


def samples_of(opinfo: Any, form: Form, max_samples: Optional[int] = MAX_SAMPLES) -> List[Any]:
    dt = sample_dtype(opinfo)
    if dt is None:
        return []
    torch.manual_seed(0)
    out = []
    try:
        for s in opinfo.sample_inputs("cpu", dt, requires_grad=False):
            if form.kind in ("inplace", "inplace_operator") and getattr(s, "broadcasts_input", False):
                continue  # the in-place form cannot write a broadcast result into its input
            if form.kind in ("operator", "inplace_operator") and (s.kwargs or len(s.args) > 1):
                continue  # operator.add(a, b) takes no keywords
            out.append(s)
            if len(out) == max_samples:
                break
    except Exception:  # noqa: BLE001 - a sample generator that needs something absent (a GPU, scipy)
        return out
    return out


def sweep_entry(entry: str, variants: Sequence[str] = VARIANTS, max_samples: Optional[int] = MAX_SAMPLES,
                first: int = 0) -> List[Outcome]:
    """Samples ``first`` to ``max_samples`` (None: all) of every OpInfo that calls ``entry``, in every applicable
    variant."""
    outs: List[Outcome] = []
    for opinfo, form in coverage()[entry]:
        rnd = is_random(opinfo, form)
        for idx, s in enumerate(samples_of(opinfo, form, max_samples)):
            if idx < first:
                continue
            nt = sum(isinstance(v, Tensor) for v in tree_flatten((s.input, tuple(s.args), dict(s.kwargs)))[0])
            for variant in applicable_variants(nt):
                if variant in variants:
                    outs.append(run_sample(form, opinfo, s, variant, idx, rnd))
    return outs


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse
    import collections
    import time

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--entry", action="append", help="only these registry entries (repeatable)")
    ap.add_argument("--show", default="wrong,error,refused", help="outcome kinds to list one by one")
    ap.add_argument("--all-samples", action="store_true", help=f"every sample, not the first {MAX_SAMPLES}")
    args = ap.parse_args(argv)
    t0 = time.time()
    entries = args.entry or sorted(coverage())
    counts: collections.Counter = collections.Counter()
    show = set(args.show.split(","))
    uncovered = []
    for e in entries:
        res = sweep_entry(e, max_samples=None if args.all_samples else MAX_SAMPLES)
        if not coverage()[e]:
            uncovered.append(e)
        for o in res:
            counts[o.kind] += 1
            if o.kind in show:
                print(f"{o.kind:8} {o.entry:28} {o.opinfo:32} {o.form:8} {o.variant:8} #{o.sample} {o.detail[:160]}")
    print(f"\n{sum(counts.values())} op-samples: " + ", ".join(f"{counts[k]} {k}" for k in KINDS))
    print(f"registry entries with no OpInfo: {len(uncovered)}")
    print(f"{time.time() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
