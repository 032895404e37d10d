"""The oracle, as a library: the N original models run one by one, and how far a fused result is from them.

Every claim fusecc makes is checked against :func:`run_each`: the tests, ``fusecc export`` (which loads the artifact
back and compares before writing it), ``fusecc bench``, the benchmarks and the GPU check.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

# the bound a fused result must meet: max |fused - models| / max |models|, per dtype
TOLERANCE: Dict[torch.dtype, float] = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2,
                                       torch.bfloat16: 5e-2}


class VerificationError(ValueError):
    """A fused result (or an exported artifact) that differs from the N models by more than the tolerance."""


def run_each(models: Sequence[nn.Module], inputs: Sequence[Any], shared: bool = False, grad: bool = False) -> Any:
    """Model i on its own inputs (``x[i]`` of every tensor; all of them as they are when ``shared``); the outputs
    stacked on a leading model dim, in the structure the models return. Under no_grad unless ``grad`` (the tests
    compare gradients through it)."""
    with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
        if isinstance(inputs, dict):  # keyword inputs (a transformers fleet)
            outs = [m(**(inputs if shared else {k: x[i] if isinstance(x, Tensor) else x for k, x in inputs.items()}))
                    for i, m in enumerate(models)]
        else:
            outs = [m(*(inputs if shared else tuple(x[i] if isinstance(x, Tensor) else x for x in inputs)))
                    for i, m in enumerate(models)]
    leaves = [tree_flatten(o)[0] for o in outs]
    spec = tree_flatten(outs[0])[1]
    return tree_unflatten([torch.stack([lv[j] for lv in leaves]) if isinstance(leaves[0][j], Tensor)
                           else leaves[0][j] for j in range(len(leaves[0]))], spec)


def relative_error(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref| over the tensor leaves, paired in order, in float64; inf if their number or a
    shape differs. (Only the leaves: an exported artifact may return a plain tuple where the models return a named
    one.)"""
    g, r = tree_flatten(got)[0], tree_flatten(ref)[0]
    if len(g) != len(r):
        return float("inf")
    worst = 0.0
    for a, b in zip(g, r):
        if not isinstance(b, Tensor):
            continue
        if not isinstance(a, Tensor) or tuple(a.shape) != tuple(b.shape):
            return float("inf")
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        if b64.numel():
            worst = max(worst, float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-12)))
    return worst


def verify(fn: Callable[..., Any], models: Sequence[nn.Module], inputs: Sequence[Any], shared: bool = False,
           what: str = "the fused module") -> float:
    """Run ``fn(*inputs)`` (a fused module, a loaded artifact) and the models one by one; return the relative error,
    or raise :class:`VerificationError` when it exceeds ``TOLERANCE`` for the models' dtype."""
    with torch.no_grad():
        got = fn(**inputs) if isinstance(inputs, dict) else fn(*inputs)
    return check_outputs(got, models, inputs, shared, what)


def check_outputs(got: Any, models: Sequence[nn.Module], inputs: Sequence[Any], shared: bool = False,
                  what: str = "the fused module") -> float:
    """:func:`verify` for outputs already computed."""
    err = relative_error(got, run_each(models, inputs, shared))
    dtype = next((p.dtype for p in models[0].parameters()), torch.float32)
    tol = TOLERANCE.get(dtype, 1e-4)
    if not err <= tol:
        raise VerificationError(f"{what} differs from the {len(models)} models run one by one: max error {err:.3g} x "
                                f"max|output|, above {tol:g} for {str(dtype).replace('torch.', '')}")
    return err
