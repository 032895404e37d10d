"""Frontends: N models' shared code captured as ONE graph with per-node metadata. Everything after a frontend
(shape propagation, the rewrite, code generation; fusecc/pipeline.py) is shared and never asks which one ran.

A frontend is a function ``capture(model, concrete_args, leaf_modules, stack_traces=False) -> fx.GraphModule``:
``model`` is the prototype (a copy of model 0: the models differ only in their weights), ``concrete_args`` the
forward's non-tensor arguments (Python constants, specialised), ``leaf_modules`` the module types or qualnames to
keep as opaque calls. The graph's get_attr nodes name the model's parameters, buffers and tensor attributes by
qualname, so the rewrite can swap in the stacked weights of all N models.

- ``"fx"``: torch.fx symbolic tracing (fusecc/frontends/fx.py). No data-dependent control flow.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from . import fx

FRONTENDS: Dict[str, Callable[..., Any]] = {"fx": fx.capture}


def capture(frontend: str, *args: Any, **kwargs: Any) -> Any:
    try:
        fn = FRONTENDS[frontend]
    except KeyError:
        raise ValueError(f"fusecc: unknown frontend {frontend!r}; expected one of {sorted(FRONTENDS)}") from None
    return fn(*args, **kwargs)
