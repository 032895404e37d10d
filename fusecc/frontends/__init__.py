"""Frontends: N models' shared code captured as ONE graph with per-node metadata. Everything after a frontend
(shape propagation, the rewrite, code generation; fusecc/pipeline.py) is shared and never asks which one ran.

A frontend is a function ``capture(model, arguments, leaf_modules, stack_traces=False) -> fx.GraphModule``:
``model`` is the prototype (a copy of model 0: the models differ only in their weights), ``arguments`` the call's
forward arguments as ``(name, value)`` in order, tensors as one model's example (Python constants are specialised),
``leaf_modules`` the module types or qualnames to keep as opaque calls. The graph has one placeholder per argument,
in order; its get_attr nodes name the model's parameters, buffers and tensor attributes by qualname, so the rewrite
can swap in the stacked weights of all N models. Two optional entries of ``gm.meta``: ``"fusecc_out_spec"`` (the
graph returns a flat list, rebuilt with this pytree spec) and ``"fusecc_guard"`` (a Python expression over the
per-model sizes of the tensor arguments, ``L['t0'].size()[1] <= 512``, outside of which the graph is not valid).

- ``"fx"``: torch.fx symbolic tracing (fusecc/frontends/fx.py). Shape-generic; no Python control flow on tensor
  values or sizes; keeps leaf modules.
- ``"dynamo"``: torch._dynamo, torch.compile's capture (fusecc/frontends/dynamo.py). Python control flow on sizes
  and configuration is resolved and guarded; sizes stay symbolic; modules are inlined.

``fuse(..., frontend="auto")`` (the default) tries torch.fx first and moves to dynamo when torch.fx cannot trace.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from . import dynamo, fx

FRONTENDS: Dict[str, Callable[..., Any]] = {"fx": fx.capture, "dynamo": dynamo.capture}


def capture(frontend: str, *args: Any, **kwargs: Any) -> Any:
    try:
        fn = FRONTENDS[frontend]
    except KeyError:
        raise ValueError(f"fusecc: unknown frontend {frontend!r}; expected one of {sorted(FRONTENDS)}") from None
    return fn(*args, **kwargs)
