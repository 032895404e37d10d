"""Rewrite one model's FX graph into the fused graph of N models.

Every value of the fused graph is a :class:`V`: the fused-graph node, its *layout* (where the model dimension
sits) and its per-model example value (from shape propagation of the original graph). Layouts:

- ``None``: the value is the same for every model (a shared input, a constant, arithmetic on shared values);
- ``S(d)``: stacked, the model dim is its own tensor dim at position ``d`` (``S(0)`` is ``[N, *per_model]``);
- ``F(d)``: folded, the model dim is merged model-major into per-model dim ``d`` (``F(1)`` is ``[B, N*C, H, W]``,
  the layout in which grouped conv, BatchNorm and pooling of N models are one ordinary op).

``F(d)`` and ``S(d)`` convert by a free view (unflatten / flatten); ``S(d)`` and ``S(d')`` by movedim. Rules
(fusecc/rules/) ask for the layout they need; :class:`Lowerer` emits the conversions and counts the copies.
"""

from __future__ import annotations

import linecache
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from . import lowering
from .errors import FusionError


@dataclass(frozen=True)
class Layout:
    kind: str  # "S" stacked or "F" folded
    dim: int

    def __repr__(self) -> str:
        return f"{self.kind}({self.dim})"


def S(d: int) -> Layout:
    return Layout("S", d)


def Fo(d: int) -> Layout:
    return Layout("F", d)


def has_model(layout: Any) -> bool:
    """True if any leaf of a layout tree carries a model dim."""
    if layout is None:
        return False
    if isinstance(layout, Layout):
        return True
    if isinstance(layout, dict):
        return any(has_model(v) for v in layout.values())
    if isinstance(layout, (tuple, list)):
        return any(has_model(v) for v in layout)
    return False


class V:
    """A value of the fused graph: ``node`` (fx.Node or Python constant), ``layout`` and per-model ``meta``."""

    __slots__ = ("node", "layout", "meta")

    def __init__(self, node: Any, layout: Any, meta: Any):
        self.node = node
        self.layout = layout
        self.meta = meta

    @property
    def is_tensor(self) -> bool:
        return isinstance(self.meta, Tensor)

    @property
    def rank(self) -> int:
        return self.meta.dim()

    @property
    def per_model(self) -> bool:
        return has_model(self.layout)

    def __repr__(self) -> str:
        m = f"T{list(self.meta.shape)}" if self.is_tensor else type(self.meta).__name__
        return f"V({self.node}, {self.layout}, {m})"


def is_pm(x: Any) -> bool:
    """Is x a per-model value (a V whose layout carries a model dim)?"""
    return isinstance(x, V) and x.per_model


def to_meta(x: Any) -> Any:
    """Replace every tensor in a pytree by a meta tensor of the same shape and dtype (keeps no data)."""
    from torch.utils._pytree import tree_map

    return tree_map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta") if isinstance(t, Tensor) else t, x)


def norm_dim(d: int, rank: int) -> int:
    if rank == 0 and d in (0, -1):
        return 0
    if not -rank <= d < rank:
        raise IndexError(f"dim {d} out of range for a per-model tensor of rank {rank}")
    return d % rank


class Report:
    """What a compile did: fused ops per kind and lowering, layout copies, fallbacks."""

    def __init__(self) -> None:
        self.ops: Counter = Counter()  # (kind, lowering) -> count
        self.conversions: Counter = Counter()  # conversion kind -> count
        self.fallbacks: List[Tuple[str, str, str]] = []  # (qualname, type, reason)
        self.choices: List[Tuple[str, str, str, str]] = []  # (layer, kind, lowering picked, "rule" / timings)

    def record(self, kind: str, how: str) -> None:
        self.ops[(kind, how)] += 1

    def count(self, kind: str, how: Optional[str] = None) -> int:
        return sum(c for (k, h), c in self.ops.items() if k == kind and (how is None or h == how))

    def table(self) -> str:
        lines = []
        for (kind, how), c in sorted(self.ops.items()):
            lines.append(f"    {kind:<22} {c:>4}  {how}")
        if self.conversions:
            conv = ", ".join(f"{k} {c}" for k, c in sorted(self.conversions.items()))
            lines.append(f"    layout conversions: {conv}")
        if self.choices:
            lines.append("  per-layer lowering choices:")
            for layer, kind, how, why in self.choices:
                lines.append(f"    {layer:<28} {how}  ({why})")
        if self.fallbacks:
            lines.append("  fallbacks (run as a loop over the N models):")
            for q, t, why in self.fallbacks:
                lines.append(f"    {q} ({t}): {why}")
        else:
            lines.append("  fallbacks: none")
        return "\n".join(lines)


_SKIP_FUNCTIONS = {torch._assert}
try:  # concrete-argument guards inserted by symbolic_trace
    from torch.fx._symbolic_trace import _assert_is_none

    _SKIP_FUNCTIONS.add(_assert_is_none)
except ImportError:  # pragma: no cover
    pass


def source_line(node: fx.Node) -> Optional[str]:
    """'file:line: code' of the user code that created ``node``, if the trace recorded it."""
    st = getattr(node, "stack_trace", None) or node.meta.get("stack_trace")
    if not st:
        return None
    lines = st.splitlines()
    best = None
    for i, ln in enumerate(lines):
        ln = ln.strip()
        if ln.startswith("File ") and "/torch/" not in ln and "/fusecc/" not in ln:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            best = f"{ln} : {code}"
    return best


class Lowerer:
    """Walks the traced graph of one model and emits the fused graph for ``n`` models."""

    def __init__(self, fused: Any, traced: fx.GraphModule, n: int):
        self.fused = fused
        self.traced = traced
        self.n = n
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, Any] = {}
        self.report = Report()
        self.node: Optional[fx.Node] = None  # the original node being lowered
        self._triton: Optional[bool] = None
        from .choose import Chooser

        self.chooser: Chooser = getattr(fused, "_fusecc_chooser", None) or Chooser()

    @property
    def triton(self) -> bool:
        """Whether the fused ops with a Triton kernel will run it (parameters on CUDA and the backend not forced to
        the reference, or the backend forced to Triton, when compiling): the report says so, and lowerings that would
        bypass a kernel are not chosen. The backend itself is picked at each call, in fusecc.kernels."""
        if self._triton is None:
            from fusecc.kernels._backend import use_triton

            p = next(iter(self.fused.parameters()), None)
            self._triton = p is not None and use_triton([p])  # (CPU tensors too when forced: the interpreter)
        return self._triton

    # ------------------------------------------------------------------ emission
    def unwrap(self, x: Any) -> Any:
        if isinstance(x, V):
            return x.node
        if isinstance(x, tuple):
            return tuple(self.unwrap(a) for a in x)
        if isinstance(x, list):
            return [self.unwrap(a) for a in x]
        if isinstance(x, dict):
            return {k: self.unwrap(a) for k, a in x.items()}
        if isinstance(x, slice):
            return slice(self.unwrap(x.start), self.unwrap(x.stop), self.unwrap(x.step))
        return x

    def call(self, fn: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(fn, self.unwrap(args), self.unwrap(kwargs))

    def method(self, name: str, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_method(name, self.unwrap(args), self.unwrap(kwargs))

    def emit_like(self, node: fx.Node, args: Any, kwargs: Any) -> fx.Node:
        """Emit the same op as the original node with new arguments."""
        a, k = self.unwrap(tuple(args)), self.unwrap(dict(kwargs))
        if node.op == "call_function":
            return self.graph.call_function(node.target, a, k)
        if node.op == "call_method":
            return self.graph.call_method(node.target, a, k)
        if node.op == "call_module":
            return self.graph.call_module(node.target, a, k)
        raise AssertionError(node.op)

    def get_attr(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def out(self, new: Any, layout: Any, node: Optional[fx.Node] = None) -> V:
        """The V for the result of the node being lowered (its per-model meta comes from shape propagation)."""
        node = node or self.node
        return V(new, layout, node.meta.get("fusecc_pm"))

    def record(self, kind: str, how: str, why: Optional[str] = None) -> None:
        """Count a fused op; ``why`` marks a per-layer lowering choice (rule or measurement), listed per layer."""
        self.report.record(kind, how)
        if why is not None:
            node = self.node
            layer = node.target if node is not None and node.op == "call_module" else getattr(node, "name", "?")
            self.report.choices.append((str(layer), kind, how, why))

    @property
    def grad_needed(self) -> bool:
        """Whether the layer being lowered trains (its module, or the fused module, is in training mode)."""
        node = self.node
        mod = self.fused
        if node is not None and node.op == "call_module":
            try:
                mod = self.fused.get_submodule(node.target)
            except AttributeError:
                pass
        return bool(mod.training)

    @property
    def device(self) -> torch.device:
        p = next(iter(self.fused.parameters()), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------ parameters
    def param(self, qualname: str) -> Optional[V]:
        """The stacked parameter/buffer of the original qualname as an ``S(0)`` value, or None if absent."""
        canon = self.fused._fusecc_alias.get(qualname)
        if canon is None:
            return None
        t = self.fused.get_parameter(canon) if canon in self.fused._fusecc_param_names else self.fused.get_buffer(
            canon
        )
        return V(self.get_attr(canon), S(0), torch.empty(t.shape[1:], dtype=t.dtype, device="meta"))

    def mod_tensor(self, node: fx.Node, name: str) -> Optional[V]:
        return self.param(f"{node.target}.{name}" if node.target else name)

    def module(self, node: fx.Node) -> torch.nn.Module:
        """The (prototype) module a call_module node calls: its configuration is that of every model."""
        return self.traced.get_submodule(node.target)

    # ------------------------------------------------------------------ layout conversions
    def _conv(self, kind: str) -> None:
        self.report.conversions[kind] += 1

    def stacked(self, v: V, d: Optional[int] = None) -> V:
        """v with its model dim as a tensor dim (at ``d`` if given). Shared values are broadcast (no copy)."""
        if v.layout is None:
            d = 0 if d is None else d
            self._conv("expand")
            return V(self.call(lowering.expand_model, v, d, self.n), S(d), v.meta)
        node, lay = v.node, v.layout
        if lay.kind == "F":
            node = self.method("unflatten", node, lay.dim, (self.n, -1))
            lay = S(lay.dim)
            self._conv("unfold")
        if d is not None and lay.dim != d:
            node = self.call(torch.movedim, node, lay.dim, d)
            lay = S(d)
            self._conv("movedim")
        return V(node, lay, v.meta)

    def folded(self, v: V, f: int) -> V:
        """v with its model dim folded model-major into per-model dim ``f``."""
        if v.layout == Fo(f):
            return v
        if v.layout is None:
            reps = [1] * v.rank
            reps[f] = self.n
            self._conv("repeat")
            return V(self.method("repeat", v.node, reps), Fo(f), v.meta)
        s = self.stacked(v, f)
        self._conv("fold")
        return V(self.method("flatten", s.node, f, f + 1), Fo(f), v.meta)

    def pad(self, v: V, rank: int) -> V:
        """Pad a stacked value's per-model rank to ``rank`` with leading size-1 dims (a view).

        ``S(0)`` stays ``S(0)`` (``[N, 1, .., *shape]``); ``S(d)`` becomes ``S(d + k)``."""
        k = rank - v.rank
        if k <= 0:
            return v
        meta = v.meta.reshape((1,) * k + tuple(v.meta.shape))
        if v.layout == S(0):  # insert right after the model dim: stays S(0)
            return V(self.call(operator.getitem, v.node, (slice(None),) + (None,) * k), S(0), meta)
        node = self.call(operator.getitem, v.node, (None,) * k)
        return V(node, S(v.layout.dim + k), meta)

    def tdim(self, v: V, p: int) -> int:
        """Tensor dim of per-model dim p of a stacked (or folded: same index) value."""
        p = norm_dim(p, v.rank)
        if v.layout is not None and v.layout.kind == "S" and p >= v.layout.dim:
            return p + 1
        return p

    def broadcast_operands(self, operands: Sequence[Any]) -> Tuple[List[Any], Any]:
        """Bring element-wise operands to one layout so that torch broadcasting gives per-model semantics.

        Returns the converted operands (non-V or non-tensor ones unchanged) and the result layout; a folded result
        is returned as ``("fold", d)`` meaning "stacked at d, fold back after the op".
        """
        tens = [o for o in operands if isinstance(o, V) and o.is_tensor]
        pm = [o for o in tens if o.per_model]
        if not pm:
            return list(operands), None
        rank = max(o.rank for o in tens)
        lead = next((o for o in pm if o.rank == rank), pm[0])
        d = lead.layout.dim + (rank - lead.rank)
        fold_back = lead.layout.kind == "F" and lead.rank == rank
        shared = [o for o in tens if not o.per_model]
        if all(o.layout == lead.layout and o.rank == rank for o in pm):  # fast path: no conversion at all
            if lead.layout.kind == "S" and all(o.rank <= rank - d for o in shared):
                return list(operands), lead.layout
            # folded: every per-model operand has the same size along the folded dim (else N*C and N*1 would not
            # broadcast), and shared operands do not vary along it
            if lead.layout.kind == "F" and all(o.meta.shape[d] == lead.meta.shape[d] for o in pm) and all(
                o.rank <= rank - d - 1 or o.meta.shape[d - (rank - o.rank)] == 1 for o in shared
            ):
                return list(operands), lead.layout
        out = []
        for o in operands:
            if not (isinstance(o, V) and o.is_tensor):
                out.append(o)
            elif o.per_model:
                s = self.stacked(o)
                s = self.pad(s, rank)
                if s.layout.dim != d:
                    s = self.stacked(s, d)
                out.append(s)
            else:
                r = o.rank
                if r > rank - d:
                    pos = d - (rank - r)
                    out.append(V(self.method("unsqueeze", o.node, pos), None, o.meta))
                else:
                    out.append(o)
        return out, (("fold", d) if fold_back else S(d))

    def finish_broadcast(self, new: fx.Node, layout: Any) -> Tuple[fx.Node, Any]:
        if isinstance(layout, tuple) and layout and layout[0] == "fold":
            d = layout[1]
            return self.method("flatten", new, d, d + 1), Fo(d)
        return new, layout

    # ------------------------------------------------------------------ the walk
    def error(self, msg: str, node: Optional[fx.Node] = None) -> FusionError:
        node = node or self.node
        where = f"node '{node.name}' ({node.op} {_target_name(node)})" if node is not None else "graph"
        line = source_line(node) if node is not None else None
        err = FusionError(f"fusecc: {where}: {msg}" + (f"\n  at {line}" if line else ""))
        err.node_name = node.name if node is not None and not line else None  # the caller may find the line
        return err

    def run(self, inputs: Sequence[Tuple[str, Any]]) -> fx.Graph:
        """inputs: per placeholder of the traced graph, ("tensor", layout) or ("const", value)."""
        from .rules import registry

        placeholders = [n for n in self.traced.graph.nodes if n.op == "placeholder"]
        for node, (kind, what) in zip(placeholders, inputs):
            if kind == "tensor":
                self.env[node] = V(self.graph.placeholder(node.name), what, node.meta.get("fusecc_pm"))
            else:
                self.env[node] = V(what, None, what)
        for node in self.traced.graph.nodes:
            if node.op == "placeholder":
                continue
            self.node = node
            if node.op == "output":
                self._output(node)
                continue
            if node.op == "call_function" and node.target in _SKIP_FUNCTIONS:
                continue
            args = fx.node.map_arg(node.args, lambda n: self.env[n])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
            if node.op == "get_attr":
                self.env[node] = self._get_attr(node)
                continue
            try:
                self.env[node] = registry.lower_node(self, node, args, kwargs)
            except FusionError:
                raise
            except Exception as e:  # a rule failed: name the node
                raise self.error(f"{type(e).__name__}: {e}") from e
        self.graph.lint()
        return self.graph

    def _get_attr(self, node: fx.Node) -> V:
        v = self.param(node.target)
        if v is not None:
            return v
        const = self.fused._fusecc_constants.get(node.target)
        if const is not None:
            name, stacked = const
            t = self.fused.get_buffer(name)
            meta = torch.empty(t.shape[1:] if stacked else t.shape, dtype=t.dtype, device="meta")
            return V(self.get_attr(name), S(0) if stacked else None, meta)
        val = _getattr_path(self.traced, node.target)
        if isinstance(val, Tensor):  # a constant the trace made (torch.tensor(...) in forward): the same for all
            name = f"_fusecc_traced_const{len(self.fused._fusecc_traced_consts)}"
            self.fused._fusecc_traced_consts.append(name)
            self.fused.register_buffer(name, val.detach().clone(), persistent=False)
            return V(self.get_attr(name), None, torch.empty(val.shape, dtype=val.dtype, device="meta"))
        return V(val, None, val)

    def _output(self, node: fx.Node) -> None:
        def conv(v: Any) -> Any:
            if isinstance(v, V):
                if v.is_tensor:
                    return self.stacked(v, 0).node
                if v.per_model:  # a container value: convert its leaves
                    return self.map_container(v, lambda e: V(conv(e), S(0) if e.per_model else None, e.meta)).node
                return v.node
            if isinstance(v, (tuple, list)):
                return type(v)(conv(a) for a in v)
            if isinstance(v, dict):
                return {k: conv(a) for k, a in v.items()}
            return v

        res = fx.node.map_arg(node.args[0], lambda n: self.env[n])
        self.graph.output(conv(res))

    def map_container(self, v: V, f: Callable[[V], V]) -> V:
        """A V holding a container (tuple, list, dict, ``torch.return_types`` of values) with ``f`` applied to each
        element V, rebuilt as the same kind of container (a ``torch.return_types.sort`` stays one, so ``.values``
        works on the fused result as on the model's)."""
        meta, lay = v.meta, v.layout

        def item(k: Any) -> V:
            sub = lay[k] if isinstance(lay, (tuple, list, dict)) else lay
            return f(V(self.call(operator.getitem, v.node, k), sub, meta[k]))

        if isinstance(meta, dict):
            items = {k: item(k) for k in meta}
            node = self.call(dict, {k: e.node for k, e in items.items()})
            return V(node, {k: e.layout for k, e in items.items()}, meta)
        elems = [item(i) for i in range(len(meta))]
        node = self.call(lowering.pack, container_kind(meta), [e.node for e in elems])
        return V(node, tuple(e.layout for e in elems), meta)


def container_kind(meta: Any) -> str:
    """How :func:`fusecc.lowering.pack` rebuilds a container like ``meta``: "tuple", "list" or a
    ``torch.return_types`` name."""
    if type(meta).__module__ == "torch.return_types":
        return type(meta).__name__
    return "list" if isinstance(meta, list) else "tuple"


def _target_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return t
    mod = getattr(t, "__module__", None) or ""
    name = getattr(t, "__qualname__", None) or getattr(t, "__name__", repr(t))
    return f"{mod}.{name}" if mod and mod != "builtins" else name


def _getattr_path(obj: Any, path: str) -> Any:
    for a in path.split("."):
        obj = getattr(obj, a)
    return obj


_PURE_METHODS = {"unflatten", "flatten", "size", "reshape", "view", "permute", "transpose", "unsqueeze", "squeeze",
                 "expand", "repeat", "dim", "numel", "contiguous"}
_PURE_FUNCTIONS = {operator.getitem, operator.add, operator.floordiv, torch.movedim, getattr, lowering.model_size,
                   lowering.expand_model, lowering.pack, dict}


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Drop unused nodes that are known to be pure (views, sizes, attribute reads); never an op that may mutate."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        pure = node.op == "get_attr" or (
            node.op == "call_method" and node.target in _PURE_METHODS
        ) or (node.op == "call_function" and node.target in _PURE_FUNCTIONS)
        if pure:
            graph.erase_node(node)
            removed += 1
    return removed


def codegen(graph: fx.Graph, name: str) -> Callable:
    """Compile a fused graph to a Python function ``forward(self, *inputs)`` that reads ``self``'s attributes."""
    code = graph.python_code(root_module="self")
    src = code.src
    key = f"<fusecc-{name}-{id(graph):x}>"
    linecache.cache[key] = (len(src), None, src.splitlines(True), key)
    glob = dict(code.globals)
    exec(compile(src, key, "exec"), glob)
    fn = glob["forward"]
    fn.__fusecc_src__ = src
    return fn
