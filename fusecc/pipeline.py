"""The compiler, stage by stage: a fleet and the arguments of a call in, the fused forward out.

    models ──check──> stack ──────────────────────────────────────────────> FusedModule (fusecc/api.py)
                                                                               │ first call with a new signature
    compile_fleet:  frontend ──> shape-prop ──> rewrite ──> epilogue ──> codegen ──> Compiled
                    (capture     (per-model     (one rule    (activations  (a Python
                     one graph)   shapes)        per node)    into GEMMs)   forward)

``fusecc.fuse`` checks the N models (fusecc/check.py) and stacks their weights into a FusedModule once. At its first
call with each new input signature the module describes itself as a :class:`~fusecc.fleet.Fleet` and calls
:func:`compile_fleet`; the stages read the fleet and never write into the module: the :class:`Compiled` result
carries everything the module must hold to run the generated forward (its new constants and fallback templates).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from . import frontends, lora
from .codegen import codegen, eliminate_dead_code
from .epilogue import fuse_activations
from .errors import FusionError, source_line
from .fleet import Fleet
from .frontends.dynamo import ShapeGuard
from .report import Report
from .rewrite import Rewriter
from .shape_prop import shape_prop
from .values import Stacked


@dataclass
class Compiled:
    """One compile's result: the generated forward and what the fused module must hold for it."""

    fn: Callable  # forward(module, *tensor_arguments)
    graph: fx.Graph
    report: Report
    constants: Dict[str, Tensor] = field(default_factory=dict)  # buffers the forward reads, to register
    templates: Dict[str, nn.Module] = field(default_factory=dict)  # modules the fallback loop runs, by qualname
    frontend: str = "fx"  # the frontend that captured the graph
    out_spec: Any = None  # the forward returns a flat list, rebuilt with this pytree spec (None: as it returns)
    guard: Optional[Callable[[Sequence[Tensor]], bool]] = None  # False: these input sizes need a new capture


def compile_fleet(fleet: Fleet, arguments: Sequence[Tuple[str, Any]], shared: Set[str],
                  frontend: str = "auto") -> Compiled:
    """Compile the fused forward of ``fleet`` for one call's ``arguments`` (name, value): tensors carry a leading
    model dim, except those named in ``shared``; Python constants are specialised. ``frontend``: "fx", "dynamo",
    or "auto" (torch.fx, then dynamo if torch.fx cannot trace the model)."""
    examples: List[Any] = []
    inputs: List[Tuple[str, Any]] = []  # per placeholder: ("tensor", layout) or ("const", value)
    for name, v in arguments:
        if isinstance(v, Tensor):
            examples.append(v if name in shared else v[0])
            inputs.append(("tensor", None if name in shared else Stacked(0)))
        else:
            examples.append(v)
            inputs.append(("const", v))
    per_model = [(name, e) for (name, _), e in zip(arguments, examples)]
    gm, frontend = _capture(fleet, per_model, frontend)
    shape_prop(gm, examples)
    rewriter = Rewriter(fleet, gm)
    try:
        graph = rewriter.run(inputs)
    except FusionError as e:
        raise _with_source_line(e, fleet, per_model, frontend) from e.__cause__
    fuse_activations(graph, fleet.prototype, rewriter.report)
    if fleet.kernels:  # (on the CPU the shrink and expand stay two batched GEMMs: the small-batch kernel's path)
        lora.fuse_low_rank_updates(graph, rewriter.report)
    eliminate_dead_code(graph)
    guard_expr = gm.meta.get("fusecc_guard")
    guard = None
    if guard_expr:
        guard = ShapeGuard(guard_expr, [name not in shared for name, v in arguments if isinstance(v, Tensor)])
    return Compiled(codegen(graph, fleet.source), graph, rewriter.report, rewriter.new_constants, rewriter.templates,
                    frontend, gm.meta.get("fusecc_out_spec"), guard)


def _capture(fleet: Fleet, per_model: Sequence[Tuple[str, Any]], frontend: str) -> Tuple[fx.GraphModule, str]:
    """The captured graph and the frontend that made it. "auto": torch.fx, else dynamo; if both fail, one
    FusionError with both reasons."""
    if frontend != "auto":
        return frontends.capture(frontend, fleet.prototype, per_model, fleet.leaf_modules), frontend
    try:
        return frontends.capture("fx", fleet.prototype, per_model, fleet.leaf_modules), "fx"
    except FusionError as fx_error:
        try:
            return frontends.capture("dynamo", fleet.prototype, per_model, fleet.leaf_modules), "dynamo"
        except FusionError as dyn_error:
            raise FusionError(f"{fx_error}\n\nand the dynamo frontend failed too:\n{dyn_error}") from dyn_error


def _with_source_line(err: FusionError, fleet: Fleet, per_model: Sequence[Tuple[str, Any]], frontend: str
                      ) -> FusionError:
    """Capture again with stack traces (costly, so only now) to add the user's source line to a rewrite error."""
    name = getattr(err, "node_name", None)
    if not name or frontend != "fx":  # (dynamo records every node's source line anyway)
        return err
    gm = frontends.capture(frontend, fleet.prototype, per_model, fleet.leaf_modules, stack_traces=True)
    node = next((nd for nd in gm.graph.nodes if nd.name == name), None)
    line = source_line(node) if node is not None else None
    return type(err)(f"{err}\n  at {line}") if line else err
