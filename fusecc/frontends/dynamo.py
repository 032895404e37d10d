"""The dynamo frontend: one model captured by PyTorch's own bytecode tracer (torch._dynamo, the capture behind
torch.compile and torch.export), as a graph of torch-level calls that the rules already know.

Dynamo runs ``forward`` as Python on example inputs: Python control flow (``if new_h != H``, loops over config
values, transformers' mask builders) is resolved at capture time, and what it was resolved on is recorded as
guards. Sizes stay symbolic (every dim of size >= 2 is dynamic), so one capture serves every batch size and
sequence length its guards allow; :class:`ShapeGuard` checks them at each call and the fused module captures again
when they fail (a size 1, a sequence longer than the position table). Modules are inlined: the graph holds no
call_module nodes, so ``leaf_modules`` does not apply. What it cannot capture: data-dependent control flow on
tensor values (``if x.sum() > 0``), which is a graph break here and a FusionError naming the line.

The result follows the frontend contract (fusecc/frontends/__init__.py): one placeholder per forward argument, in
order; get_attr nodes named by the prototype's qualnames (dynamo's own names, ``L__self___bert_...``, are mapped
back by tensor identity); the output flattened, its structure (a ``ModelOutput``, a dict, a tuple) kept in
``gm.meta["fusecc_out_spec"]`` and rebuilt around the fused forward.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from ..errors import FusionError
from .fx import _user_frame


class _Call(nn.Module):
    """The prototype called with its tensor arguments positionally and its constants closed over (dynamo's export
    takes positional tensors; the model's own keywords go through unchanged)."""

    def __init__(self, model: nn.Module, names: Sequence[str], consts: Dict[str, Any]):
        super().__init__()
        self.model = model
        self.names = list(names)
        self.consts = dict(consts)

    def forward(self, *tensors: Tensor) -> Any:
        kw = dict(self.consts)
        kw.update(zip(self.names, tensors))
        return self.model(**kw)


class ShapeGuard:
    """The conditions on input sizes under which a dynamo capture is valid (``2 <= L['t1'].size()[1] <= 512``,
    ``L['t1'].size()[0] == L['t0'].size()[0]``), checked on the per-model sizes of each call's tensors."""

    def __init__(self, expr: str, per_model: Sequence[bool]):
        self.expr = expr
        self.per_model = list(per_model)
        self.code = compile(expr, "<fusecc shape guard>", "eval")

    def __call__(self, tensors: Sequence[Tensor]) -> bool:
        env = {f"t{i}": _Sizes(t.shape[1:] if pm else t.shape) for i, (t, pm) in enumerate(zip(tensors, self.per_model))}
        return bool(eval(self.code, _GUARD_GLOBALS, {"L": env}))  # noqa: S307 - an expression dynamo wrote

    def __repr__(self) -> str:
        return f"ShapeGuard({self.expr})"


# what dynamo's guard expressions call (math.ceil, torch.sym_float, ... on plain ints here)
_GUARD_GLOBALS = {"math": math, "torch": torch}


class _Sizes:
    """What a shape guard reads of a tensor: its per-model sizes, and the strides of a contiguous one (capture ran
    on contiguous examples; the fused forward never depends on the strides of its inputs)."""

    __slots__ = ("_size", "_stride")

    def __init__(self, size: Sequence[int]):
        self._size = tuple(size)
        st, acc = [], 1
        for s in reversed(self._size):
            st.append(acc)
            acc *= max(s, 1)
        self._stride = tuple(reversed(st))

    def size(self, d: Optional[int] = None) -> Any:
        return self._size if d is None else self._size[d]

    def stride(self, d: Optional[int] = None) -> Any:
        return self._stride if d is None else self._stride[d]

    def dim(self) -> int:
        return len(self._size)

    def storage_offset(self) -> int:
        return 0


# the size queries dynamo writes as aten calls, written as the tensor methods the rules know
_AS_METHOD = {torch.ops.aten.sym_size.int: "size", torch.ops.aten.sym_size.default: "size",
              torch.ops.aten.sym_numel.default: "numel", torch.ops.aten.sym_stride.int: "stride"}


def _dynamic_dims(t: Tensor) -> Dict[int, Any]:
    """The dims a capture keeps symbolic: the batch (dim 0) of every input, and every dim of integer and boolean
    inputs (token ids, attention masks, positions: the sequence length). The other dims of floating inputs (an
    image's channels and resolution, a hidden size) are specialised: symbolic reasoning over a conv net's spatial
    sizes costs minutes of capture, and a new resolution is rare where a new sequence length is every request."""
    from torch.export import Dim

    dims = range(t.dim()) if not (t.is_floating_point() or t.is_complex()) else range(min(t.dim(), 1))
    return {d: Dim.AUTO for d in dims}


def _qualnames(model: nn.Module) -> Dict[int, str]:
    """id(tensor) -> its qualname in ``model``: parameters, buffers (tied ones under their first name) and the
    public plain tensor attributes of its modules."""
    names: Dict[int, str] = {}
    for q, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), q)
    for path, mod in model.named_modules(remove_duplicate=False):
        for k, b in mod._buffers.items():
            if b is not None:
                names.setdefault(id(b), f"{path}.{k}" if path else k)
        for k, v in vars(mod).items():
            if isinstance(v, Tensor) and not isinstance(v, nn.Parameter) and not k.startswith("_"):
                names.setdefault(id(v), f"{path}.{k}" if path else k)
    return names


def capture(model: nn.Module, arguments: Sequence[Tuple[str, Any]], leaf_modules: Sequence[Any],
            stack_traces: bool = False) -> fx.GraphModule:
    import torch._dynamo as dynamo  # (imported here: seconds that `import fusecc` need not pay)

    names = [n for n, v in arguments if isinstance(v, Tensor)]
    consts = {n: v for n, v in arguments if not isinstance(v, Tensor)}
    # contiguous copies: dynamo guards on the strides of what it saw, and the fused forward never sees per-model
    # slices; real values, not fakes: a model may read a value at capture (an int from a tensor)
    examples = [v.detach().clone(memory_format=torch.contiguous_format) for n, v in arguments if isinstance(v, Tensor)]
    wrapper = _Call(model, names, consts)
    dynamo.reset()  # a fresh capture: nothing cached from an earlier model or mode
    try:
        res = dynamo.export(wrapper, aten_graph=False, assume_static_by_default=True,
                            dynamic_shapes=(tuple(_dynamic_dims(t) for t in examples),))(*examples)
    except Exception as e:
        if "cache_utils" in str(e) and "outputs" in str(e):
            raise FusionError(
                f"fusecc.fuse: {type(model).__name__} returns a key/value cache (past_key_values), which a fused "
                "module does not carry between calls: call the fused module with use_cache=False (or set "
                "config.use_cache = False on the models before fusing); every tensor output is then returned"
            ) from None
        where = _user_frame(e)
        msg = str(e).strip().split("\n")
        raise FusionError(
            f"fusecc.fuse: torch._dynamo cannot capture {type(model).__name__} as one graph: {type(e).__name__}: "
            f"{' '.join(msg[:6])[:1200]}" + (f"\n  at {where}" if where != "<unknown>" else "") +
            "\n  hint: dynamo resolves Python control flow at capture time, but not control flow on tensor values "
            "(`if x.sum() > 0`) or calls it cannot trace (graph breaks). Rewrite that branch with torch.where, or "
            "make it depend on constant (non-tensor) forward arguments."
        ) from e
    finally:
        dynamo.reset()
    src = res.graph_module
    return _to_contract(src, model, arguments, names)


def _to_contract(src: fx.GraphModule, model: nn.Module, arguments: Sequence[Tuple[str, Any]],
                 names: Sequence[str]) -> fx.GraphModule:
    """Dynamo's graph in the frontend contract: a placeholder per argument, qualname get_attrs, a flat output."""
    qual = _qualnames(model)
    graph = fx.Graph()
    env: Dict[fx.Node, fx.Node] = {}
    root: Dict[str, Any] = {}
    ph_new = {}
    for name, v in arguments:
        ph_new[name] = graph.placeholder(name)
    src_ph = [n for n in src.graph.nodes if n.op == "placeholder"]
    if len(src_ph) != len(names):
        raise FusionError(f"fusecc: internal error: dynamo's graph has {len(src_ph)} inputs for {len(names)} tensors")
    for node, name in zip(src_ph, names):
        env[node] = ph_new[name]
    fake_inputs = [n.meta.get("example_value") for n in src_ph]
    out_spec = None
    for node in src.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr":
            val = getattr(src, node.target)
            q = qual.get(id(val))
            if q is None:  # a tensor the capture made (a constant in forward): kept under its own name
                q = f"_fusecc_dynamo_{node.target}"
            root[q] = val
            env[node] = graph.get_attr(q)
            env[node].meta = dict(node.meta)
            continue
        if node.op == "output":
            graph.output(fx.node.map_arg(node.args[0], lambda n: env[n]))
            continue
        if node.op == "call_function" and node.target in _AS_METHOD:  # aten.sym_size.int(x, 1) -> x.size(1)
            new = graph.call_method(_AS_METHOD[node.target], fx.node.map_arg(node.args, lambda n: env[n]),
                                    fx.node.map_arg(node.kwargs, lambda n: env[n]))
            new.meta = dict(node.meta)
        else:
            new = graph.node_copy(node, lambda n: env[n])
        env[node] = new
    codegen = src.graph._codegen
    pytree_info = getattr(codegen, "pytree_info", None)
    if pytree_info is not None:
        out_spec = pytree_info.out_spec
    gm = fx.GraphModule(_Root(root), graph, type(model).__name__)
    gm.meta["fusecc_out_spec"] = out_spec
    gm.meta["fusecc_guard"] = _guard(fake_inputs)
    return gm


class _Root(nn.Module):
    """The attributes a dynamo graph reads, at their qualnames (fx.GraphModule copies what get_attr names)."""

    def __init__(self, tensors: Dict[str, Any]):
        super().__init__()
        for q, t in tensors.items():
            *path, leaf = q.split(".")
            mod: nn.Module = self
            for p in path:
                if not hasattr(mod, p):
                    mod.add_module(p, nn.Module())
                mod = getattr(mod, p)
            if isinstance(t, nn.Parameter):
                mod.register_parameter(leaf, t)
            elif isinstance(t, Tensor):
                mod.register_buffer(leaf, t)
            else:
                setattr(mod, leaf, copy.copy(t))


def _guard(fake_inputs: List[Any]) -> Optional[str]:
    """The shape guards of the capture as one Python expression over ``L['t<i>']`` (None: no condition)."""
    fakes = [f for f in fake_inputs if isinstance(f, Tensor)]
    if not fakes:
        return None
    mode = getattr(fakes[0], "fake_mode", None)
    shape_env = getattr(mode, "shape_env", None)
    if shape_env is None:
        return None
    # ignore_static=False: the specialised sizes (an image's resolution) are conditions too
    return shape_env.produce_guards_expression(fake_inputs, ignore_static=False) or None
