"""Trace one model with torch.fx and propagate per-model shapes through its graph."""

from __future__ import annotations

import traceback
from typing import Any, Dict, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn

from .errors import FusionError
from .lower import to_meta


class FuseTracer(fx.Tracer):
    """symbolic_trace's tracer, recording source lines, with extra leaf modules (run by a rule or the loop)."""

    def __init__(self, leaf_types: Tuple[Type[nn.Module], ...] = (), leaf_names: Sequence[str] = (),
                 stack_traces: bool = False):
        super().__init__()
        self.record_stack_traces = stack_traces  # costly (ms per node): only when an error needs the source line
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _user_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        if "/torch/" not in f.filename and "/fusecc/" not in f.filename:
            return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
    return "<unknown>"


def trace(
    model: nn.Module, concrete_args: Dict[str, Any], leaf_modules: Sequence[Any], stack_traces: bool = False
) -> fx.GraphModule:
    types = tuple(t for t in leaf_modules if isinstance(t, type))
    names = [t for t in leaf_modules if isinstance(t, str)]
    tracer = FuseTracer(types, names, stack_traces)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args or None)
    except Exception as e:
        raise FusionError(
            f"fusecc.fuse: torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            f"  at {_user_frame(e)}\n"
            "  hint: data-dependent control flow cannot be traced symbolically. Make the submodule that contains it a "
            "leaf (fuse(..., leaf_modules=[TheModuleClass or 'its.qualname']): it then runs as a loop over the N "
            "models), or turn the Python values it branches on into constant (non-tensor) forward arguments."
        ) from e
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


class _ShapeProp(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            from .lower import source_line

            line = source_line(n)
            raise ValueError(
                f"fusecc: running the model on one model's slice of the input failed at node '{n.name}' "
                f"({n.op} {n.target}): {type(e).__name__}: {e}" + (f"\n  at {line}" if line else "")
                + "\n  check the input shapes: every tensor argument needs a leading model dim of size N "
                "(or pass shared_inputs=True)"
            ) from e
        n.meta["fusecc_pm"] = to_meta(result)
        return result


def shape_prop(gm: fx.GraphModule, example_args: Sequence[Any]) -> None:
    """Run the graph on one model's example inputs; store every node's per-model value (as meta tensors).

    It runs under FakeTensorMode (shapes and dtypes only, no compute: seconds saved on conv nets); an op that fake
    tensors cannot run falls back to one real run of the model copy.
    """
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in example_args]
            _ShapeProp(gm).run(*fake)
        return
    except Exception:  # noqa: BLE001 - the real run below raises the error if it is a real one
        pass
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        _ShapeProp(gm).run(*example_args)
