"""The rewrite: walk one model's graph and emit the fused graph of N models, node by node, through the rules.

For every node of the captured graph (fusecc/frontends/), with shapes from shape propagation, the
:class:`Rewriter` looks up the node's rule (fusecc/rules/registry.py) and lets it emit fused-graph nodes. Every value
is a :class:`~fusecc.values.Value` that knows where its model dimension sits; rules ask the rewriter for the layout
they need (``stacked``, ``folded``, ``pad``, ``broadcast_operands``) and it emits the conversions and counts them.
The rewriter reads the fleet (fusecc/fleet.py) and never writes into the fused module: constants the trace made
and the fallback's module templates are returned in ``new_constants`` and ``templates``.
"""

from __future__ import annotations

import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
from torch import Tensor

from . import runtime
from .choose import Chooser
from .errors import FusionError, Unshare, source_line
from .fleet import Fleet
from .report import Report
from .rules import dispatch
from .values import Folded, Stacked, Value, norm_dim

_SKIP_FUNCTIONS = {torch._assert}
try:  # concrete-argument guards inserted by symbolic_trace
    from torch.fx._symbolic_trace import _assert_is_none

    _SKIP_FUNCTIONS.add(_assert_is_none)
except ImportError:  # pragma: no cover
    pass


class Rewriter:
    """Walks the captured graph of one model and emits the fused graph of the fleet's N models."""

    def __init__(self, fleet: Fleet, traced: fx.GraphModule):
        self.fleet = fleet
        self.traced = traced
        self.n = fleet.n
        self.graph = fx.Graph()
        self.env: Dict[fx.Node, Any] = {}
        self.report = Report()
        self.node: Optional[fx.Node] = None  # the original node being rewritten
        self.chooser: Chooser = fleet.chooser
        # what the fused module must hold for the generated code, returned with it (never written into the module)
        self.new_constants: Dict[str, Tensor] = {}  # tensors the trace made (torch.tensor(...) in forward)
        self.templates: Dict[str, torch.nn.Module] = {}  # qualname -> module run by the fallback loop
        self.shared_tensors: Dict[fx.Node, str] = {}  # get_attr node of a tensor stored once -> its qualname

    @property
    def triton(self) -> bool:
        """Whether the fused ops with a Triton kernel will run it (parameters on CUDA and the backend not forced to
        the reference, or the backend forced to Triton, when compiling): the report says so, and lowerings that would
        bypass a kernel are not chosen. The backend itself is picked at each call, in fusecc.kernels."""
        return self.fleet.kernels

    # ------------------------------------------------------------------ emission
    def unwrap(self, x: Any) -> Any:
        if isinstance(x, Value):
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
        raise FusionError(f"fusecc: internal error: cannot re-emit a {node.op} node ('{node.name}')")

    def get_attr(self, target: str) -> fx.Node:
        return self.graph.get_attr(target)

    def out(self, new: Any, layout: Any, node: Optional[fx.Node] = None) -> Value:
        """The Value for the result of the node being rewritten (its per-model meta comes from shape propagation)."""
        node = node or self.node
        return Value(new, layout, node.meta.get("fusecc_pm"))

    def record(self, kind: str, how: str, why: Optional[str] = None) -> None:
        """Count a fused op; ``why`` marks a per-layer lowering choice (rule or measurement), listed per layer."""
        self.report.record(kind, how)
        if why is not None:
            node = self.node
            layer = node.target if node is not None and node.op == "call_module" else getattr(node, "name", "?")
            self.report.choices.append((str(layer), kind, how, why))

    @property
    def grad_needed(self) -> bool:
        """Whether the layer being rewritten trains (its module, or the fused module, is in training mode)."""
        node = self.node
        return self.fleet.is_training(node.target if node is not None and node.op == "call_module" else "")

    @property
    def device(self) -> torch.device:
        return self.fleet.device

    # ------------------------------------------------------------------ parameters
    def param(self, qualname: str) -> Optional[Value]:
        """The parameter/buffer of the original qualname, or None if absent: a ``Stacked(0)`` value, or a shared one
        (no model dim) if every model has the same (fusecc/fleet.py)."""
        t = self.fleet.tensor(qualname)
        if t is None:
            return None
        node = self.get_attr(t.name)
        if t.shared:
            self.shared_tensors[node] = t.name
            return Value(node, None, t.meta())
        if self.report.branch is None:  # the first layer that reads a per-model weight: where the fleet branches
            n = self.node
            self.report.branch = str(n.target) if n is not None and n.op == "call_module" else qualname
        return Value(node, Stacked(0), t.meta())

    def unshare(self, values: Sequence[Any], why: str) -> None:
        """Raise :class:`Unshare` for those of ``values`` that are tensors the models share (stored once), so the
        fused module gives each model its own copy and compiles again (fusecc/api.py)."""
        names = {self.shared_tensors[v.node] for v in values
                 if isinstance(v, Value) and isinstance(v.node, fx.Node) and v.node in self.shared_tensors}
        if names:
            raise Unshare(names, why)

    def mod_tensor(self, node: fx.Node, name: str) -> Optional[Value]:
        return self.param(f"{node.target}.{name}" if node.target else name)

    def module(self, node: fx.Node) -> torch.nn.Module:
        """The (prototype) module a call_module node calls: its configuration is that of every model."""
        return self.traced.get_submodule(node.target)

    # ------------------------------------------------------------------ layout conversions
    def _count_conversion(self, kind: str) -> None:
        self.report.conversions[kind] += 1

    def stacked(self, v: Value, d: Optional[int] = None) -> Value:
        """v with its model dim as a tensor dim (at ``d`` if given). Shared values are broadcast (no copy)."""
        if v.layout is None:
            d = 0 if d is None else d
            self._count_conversion("expand")
            return Value(self.call(runtime.shape.expand_model, v, d, self.n), Stacked(d), v.meta)
        node, lay = v.node, v.layout
        if lay.folded:
            node = self.method("unflatten", node, lay.dim, (self.n, -1))
            lay = Stacked(lay.dim)
            self._count_conversion("unfold")
        if d is not None and lay.dim != d:
            node = self.call(torch.movedim, node, lay.dim, d)
            lay = Stacked(d)
            self._count_conversion("movedim")
        return Value(node, lay, v.meta)

    def folded(self, v: Value, f: int) -> Value:
        """v with its model dim folded model-major into per-model dim ``f``."""
        if v.layout == Folded(f):
            return v
        if v.layout is None:
            reps = [1] * v.rank
            reps[f] = self.n
            self._count_conversion("repeat")
            return Value(self.method("repeat", v.node, reps), Folded(f), v.meta)
        s = self.stacked(v, f)
        self._count_conversion("fold")
        return Value(self.method("flatten", s.node, f, f + 1), Folded(f), v.meta)

    def pad(self, v: Value, rank: int) -> Value:
        """Pad a stacked value's per-model rank to ``rank`` with leading size-1 dims (a view).

        ``Stacked(0)`` stays ``Stacked(0)`` (``[N, 1, .., *shape]``); ``Stacked(d)`` becomes ``Stacked(d + k)``."""
        k = rank - v.rank
        if k <= 0:
            return v
        meta = v.meta.reshape((1,) * k + tuple(v.meta.shape))
        if v.layout == Stacked(0):  # insert right after the model dim: stays Stacked(0)
            return Value(self.call(operator.getitem, v.node, (slice(None),) + (None,) * k), Stacked(0), meta)
        node = self.call(operator.getitem, v.node, (None,) * k)
        return Value(node, Stacked(v.layout.dim + k), meta)

    def tensor_dim(self, v: Value, p: int) -> int:
        """Tensor dim of per-model dim p of a stacked (or folded: same index) value."""
        p = norm_dim(p, v.rank)
        if v.layout is not None and v.layout.stacked and p >= v.layout.dim:
            return p + 1
        return p

    def broadcast_operands(self, operands: Sequence[Any]) -> Tuple[List[Any], Any]:
        """Bring element-wise operands to one layout so that torch broadcasting gives per-model semantics.

        Returns the converted operands (non-V or non-tensor ones unchanged) and the result layout; a folded result
        is returned as ``("fold", d)`` meaning "stacked at d, fold back after the op".
        """
        tens = [o for o in operands if isinstance(o, Value) and o.is_tensor]
        pm = [o for o in tens if o.per_model]
        if not pm:
            return list(operands), None
        rank = max(o.rank for o in tens)
        lead = next((o for o in pm if o.rank == rank), pm[0])
        d = lead.layout.dim + (rank - lead.rank)
        fold_back = lead.layout.folded and lead.rank == rank
        shared = [o for o in tens if not o.per_model]
        if all(o.layout == lead.layout and o.rank == rank for o in pm):  # fast path: no conversion at all
            if lead.layout.stacked and all(o.rank <= rank - d for o in shared):
                return list(operands), lead.layout
            # folded: every per-model operand has the same size along the folded dim (else N*C and N*1 would not
            # broadcast), and shared operands do not vary along it
            if lead.layout.folded and all(o.meta.shape[d] == lead.meta.shape[d] for o in pm) and all(
                o.rank <= rank - d - 1 or o.meta.shape[d - (rank - o.rank)] == 1 for o in shared
            ):
                return list(operands), lead.layout
        out = []
        for o in operands:
            if not (isinstance(o, Value) and o.is_tensor):
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
                    out.append(Value(self.method("unsqueeze", o.node, pos), None, o.meta))
                else:
                    out.append(o)
        return out, (("fold", d) if fold_back else Stacked(d))

    def finish_broadcast(self, new: fx.Node, layout: Any) -> Tuple[fx.Node, Any]:
        if isinstance(layout, tuple) and layout and layout[0] == "fold":
            d = layout[1]
            return self.method("flatten", new, d, d + 1), Folded(d)
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
        placeholders = [n for n in self.traced.graph.nodes if n.op == "placeholder"]
        for node, (kind, what) in zip(placeholders, inputs):
            if kind == "tensor":
                self.env[node] = Value(self.graph.placeholder(node.name), what, node.meta.get("fusecc_pm"))
            else:
                self.env[node] = Value(what, None, what)
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
                self.env[node] = dispatch.rewrite_node(self, node, args, kwargs)
            except (FusionError, Unshare):
                raise
            except Exception as e:  # a rule failed: name the node
                raise self.error(f"{type(e).__name__}: {e}") from e
        self.graph.lint()
        return self.graph

    def _get_attr(self, node: fx.Node) -> Value:
        v = self.param(node.target)
        if v is not None:
            return v
        const = self.fleet.constants.get(node.target)
        if const is not None:
            meta = torch.empty(const.shape, dtype=const.dtype, device="meta")
            return Value(self.get_attr(const.buffer), Stacked(0) if const.stacked else None, meta)
        val = _getattr_path(self.traced, node.target)
        if isinstance(val, Tensor):  # a constant the trace made (torch.tensor(...) in forward): the same for all
            k = 0
            while f"_fusecc_traced_const{k}" in self.fleet.reserved or f"_fusecc_traced_const{k}" in self.new_constants:
                k += 1
            name = f"_fusecc_traced_const{k}"
            self.new_constants[name] = val.detach().clone()
            return Value(self.get_attr(name), None, torch.empty(val.shape, dtype=val.dtype, device="meta"))
        return Value(val, None, val)

    def _output(self, node: fx.Node) -> None:
        def conv(v: Any) -> Any:
            if isinstance(v, Value):
                if v.is_tensor:
                    return self.stacked(v, 0).node
                if v.per_model or _holds_tensor(v.meta):  # a container value: convert its leaves (shared ones too)
                    return self.map_container(v, lambda e: Value(conv(e), e.layout, e.meta)).node
                return v.node
            if isinstance(v, (tuple, list)):
                return type(v)(conv(a) for a in v)
            if isinstance(v, dict):
                return {k: conv(a) for k, a in v.items()}
            return v

        res = fx.node.map_arg(node.args[0], lambda n: self.env[n])
        self.graph.output(conv(res))

    def map_container(self, v: Value, f: Callable[[Value], Value]) -> Value:
        """A V holding a container (tuple, list, dict, ``torch.return_types`` of values) with ``f`` applied to each
        element V, rebuilt as the same kind of container (a ``torch.return_types.sort`` stays one, so ``.values``
        works on the fused result as on the model's)."""
        meta, lay = v.meta, v.layout

        def item(k: Any) -> Value:
            sub = lay[k] if isinstance(lay, (tuple, list, dict)) else lay
            return f(Value(self.call(operator.getitem, v.node, k), sub, meta[k]))

        if isinstance(meta, dict):
            items = {k: item(k) for k in meta}
            node = self.call(dict, {k: e.node for k, e in items.items()})
            return Value(node, {k: e.layout for k, e in items.items()}, meta)
        elems = [item(i) for i in range(len(meta))]
        node = self.call(runtime.shape.pack, container_kind(meta), [e.node for e in elems])
        return Value(node, tuple(e.layout for e in elems), meta)


def container_kind(meta: Any) -> str:
    """How :func:`fusecc.runtime.shape.pack` rebuilds a container like ``meta``: "tuple", "list" or a
    ``torch.return_types`` name."""
    if type(meta).__module__ == "torch.return_types":
        return type(meta).__name__
    return "list" if isinstance(meta, list) else "tuple"


def _holds_tensor(meta: Any) -> bool:
    """Whether a container value (tuple, list, dict, ``torch.return_types``) has a tensor among its elements."""
    if isinstance(meta, dict):
        return any(isinstance(v, Tensor) or _holds_tensor(v) for v in meta.values())
    if isinstance(meta, (tuple, list)):
        return any(isinstance(v, Tensor) or _holds_tensor(v) for v in meta)
    return False


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


