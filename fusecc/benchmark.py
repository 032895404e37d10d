"""A quick comparison on the user's own machine: the fused module against a loop over the N models and against
PyTorch's own ensembling (torch.func.stack_module_state + torch.vmap), interleaved, after checking each against the
loop. ``fusecc bench`` prints it; bench/ holds the project's full benchmarks.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence

import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state

from .verify import relative_error, run_each


@dataclass
class Timing:
    provider: str  # "loop", "vmap" or "fusecc"
    median_ms: float
    rel_error: float  # max |provider - loop| / max |loop|
    note: str = ""  # why a provider did not run (median_ms and rel_error are then nan)


def vmapped(models: Sequence[nn.Module], shared: bool, n_inputs: int, names: Sequence[str] = ()
            ) -> Callable[..., Any]:
    """PyTorch's ensembling recipe: one weightless copy called through torch.vmap over the stacked weights. With
    ``names``, the inputs are passed to the models as those keywords."""
    params, buffers = stack_module_state(list(models))
    base = copy.deepcopy(models[0]).to("meta")
    dims = tuple(None if shared else 0 for _ in range(n_inputs))

    def call(p: Any, b: Any, *x: Any) -> Any:
        if names:
            return functional_call(base, (p, b), (), dict(zip(names, x)))
        return functional_call(base, (p, b), x)

    def run(*xs: Any) -> Any:
        return torch.vmap(call, in_dims=(0, 0) + dims)(params, buffers, *xs)

    return run


def compare(models: Sequence[nn.Module], fused: nn.Module, inputs: Sequence[Any], shared: bool = False,
            repeat: int = 10, warmup: int = 2,
            rounds: Optional[Callable[[Iterable[int]], Iterable[int]]] = None) -> List[Timing]:
    """Median wall-clock ms per call of each provider over ``repeat`` interleaved rounds (after ``warmup``), under
    no_grad; ``rounds`` wraps the round counter (a progress bar, say)."""
    if isinstance(inputs, dict):  # keyword inputs (a transformers fleet)
        names, values = list(inputs), list(inputs.values())
        vm = vmapped(models, shared, len(values), names)
        providers: Dict[str, Callable[[], Any]] = {
            "loop": lambda: run_each(models, inputs, shared), "vmap": lambda: vm(*values),
            "fusecc": lambda: fused(**inputs)}
    else:
        vm = vmapped(models, shared, len(inputs))
        providers = {"loop": lambda: run_each(models, inputs, shared), "vmap": lambda: vm(*inputs),
                     "fusecc": lambda: fused(*inputs)}
    notes: Dict[str, str] = {}
    with torch.no_grad():
        ref = providers["loop"]()
        errors = {}
        for name, fn in list(providers.items()):
            try:
                errors[name] = relative_error(fn(), ref)
            except Exception as e:  # noqa: BLE001 - torch.vmap cannot run every model (data-dependent code)
                if name != "vmap":
                    raise
                notes[name] = f"does not run: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]
                del providers[name]
        times: Dict[str, List[float]] = {k: [] for k in providers}
        for _ in (rounds or (lambda r: r))(range(warmup + repeat)):
            for name, fn in providers.items():  # interleaved: a slow spell of the machine hits every provider
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    return [Timing(k, statistics.median(v[warmup:]) * 1e3, errors[k]) for k, v in times.items()] + [
        Timing(k, float("nan"), float("nan"), note) for k, note in notes.items()]
