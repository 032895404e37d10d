"""Helpers shared by the tests: the oracle (N models run one by one), tolerances, model factories."""

from __future__ import annotations

import copy
from typing import Callable, List, Sequence

import torch
import torch.nn as nn
from torch import Tensor

import fusecc
from fusecc import verify

# per-dtype (rtol, atol), from torch.testing's defaults, loosened for N-way fused reductions
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-7, 1e-7),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}


def assert_close(name: str, actual, expected, dtype: torch.dtype = torch.float32, rtol=None, atol=None) -> None:
    """Compare (nested) outputs; on failure say which element, where, and by how much."""
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), f"[{name}] structure differs"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_close(f"{name}[{i}]", a, e, dtype, rtol, atol)
        return
    if isinstance(expected, dict):
        assert isinstance(actual, dict) and set(actual) == set(expected), f"[{name}] keys differ"
        for k in expected:
            assert_close(f"{name}[{k!r}]", actual[k], expected[k], dtype, rtol, atol)
        return
    if not isinstance(expected, Tensor):
        assert actual == expected, f"[{name}] {actual!r} != {expected!r}"
        return
    r, a = TOL[dtype]
    rtol = r if rtol is None else rtol
    atol = a if atol is None else atol
    assert isinstance(actual, Tensor), f"[{name}] expected a tensor, got {type(actual).__name__}"
    assert actual.shape == expected.shape, f"[{name}] shape {list(actual.shape)} != expected {list(expected.shape)}"
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True,
                               msg=lambda m: f"[{name}] {m}")


def run_each(models: Sequence[nn.Module], xs, shared: bool = False):
    """The oracle (fusecc.verify.run_each), with autograd: model i on input i (or on the shared input), outputs
    stacked like the fused module's."""
    return verify.run_each(models, xs, shared, grad=True)


def make_models(factory: Callable[[], nn.Module], n: int) -> List[nn.Module]:
    """n models with different random weights (and different non-trivial BN statistics, if any)."""
    models = []
    for _ in range(n):
        m = factory()
        with torch.no_grad():
            for name, b in m.named_buffers():
                if name.endswith("running_mean"):
                    b.normal_(0, 0.2)
                elif name.endswith("running_var"):
                    b.uniform_(0.5, 1.5)
            for name, p in m.named_parameters():
                if name.endswith("bias") or p.dim() == 1:
                    p.normal_(0, 0.1) if "norm" not in name and "bn" not in name else p.uniform_(0.5, 1.5)
        models.append(m)
    return models


def check_fused(models: Sequence[nn.Module], xs: tuple, shared: bool = False, dtype=torch.float32, grad: bool = True,
                **fuse_kwargs):
    """Fuse, compare outputs with the oracle, then (if grad) compare every input and parameter gradient.

    Returns the fused module so the caller can assert what was fused.
    """
    snapshot = [copy.deepcopy(m.state_dict()) for m in models]
    for m in models:  # gradients of an earlier check must not add up with this one's
        m.zero_grad(set_to_none=True)
    fused = fusecc.fuse(models, shared_inputs=shared, **fuse_kwargs)
    xs_f = tuple(x.detach().clone().requires_grad_(grad and x.is_floating_point()) if isinstance(x, Tensor) else x
                 for x in xs)
    xs_r = tuple(x.detach().clone().requires_grad_(grad and x.is_floating_point()) if isinstance(x, Tensor) else x
                 for x in xs)
    out = fused(*xs_f)
    ref = run_each(models, xs_r, shared)
    assert_close("output", out, ref, dtype)
    if grad:
        leaves_o, leaves_r = _float_leaves(out), _float_leaves(ref)
        if leaves_o and any(t.requires_grad for t in leaves_r):
            gs = [torch.randn_like(t) for t in leaves_r]
            torch.autograd.backward([t for t in leaves_o], gs)
            torch.autograd.backward([t for t in leaves_r], gs)
            for i, (a, b) in enumerate(zip(xs_f, xs_r)):
                if isinstance(a, Tensor) and a.requires_grad:
                    assert_close(f"input[{i}].grad", a.grad, b.grad, dtype, rtol=1e-4, atol=1e-5)
            for name, p in fused.named_parameters():
                ref_g = []
                for m in models:
                    g = m.get_parameter(name).grad
                    ref_g.append(torch.zeros_like(p[0]) if g is None else g)
                got = p.grad if p.grad is not None else torch.zeros_like(p)
                assert_close(f"{name}.grad", got, torch.stack(ref_g), dtype, rtol=1e-4, atol=1e-5)
    for m, snap in zip(models, snapshot):  # the user's models are never mutated by fusing
        for k, v in m.state_dict().items():
            if "num_batches_tracked" in k or "running_" in k:
                continue  # the oracle itself ran the models in their own mode
            assert torch.equal(v, snap[k]), f"fusing mutated the user's model: {k}"
    return fused


def assert_models_independent(fused: nn.Module, inputs: tuple, perturb: Callable[[int], None], j: int = 1) -> None:
    """Model i's output depends on model i's weights and input only.

    Runs ``fused(*inputs)`` (under no_grad; every tensor input carries the model dim), then

    1. ``perturb(j)``, which changes model j's weights in place: every floating output of model j must move (not
       allclose), every output of every other model must stay bit-identical;
    2. model j's slice of every floating input set to NaN: every floating output of model j must be all NaN, every
       output of every other model must stay bit-identical.
    """
    with torch.no_grad():
        y0 = _tensor_leaves(fused(*inputs))
        assert y0 and 0 <= j < y0[0].shape[0], f"no output, or no model {j}"
        perturb(j)
        y1 = _tensor_leaves(fused(*inputs))
        poisoned = []
        for x in inputs:
            if isinstance(x, Tensor) and x.is_floating_point():
                x = x.clone()
                x[j] = float("nan")
            poisoned.append(x)
        assert any(a is not b for a, b in zip(poisoned, inputs)), "no floating input to make NaN"
        y2 = _tensor_leaves(fused(*poisoned))
    assert len(y1) == len(y0) == len(y2), "the outputs' structure changed"
    others = [i for i in range(y0[0].shape[0]) if i != j]
    names = ["output"] if len(y0) == 1 else [f"output[{k}]" for k in range(len(y0))]
    assert any(not torch.equal(b[j], a[j]) for a, b in zip(y0, y1)), \
        f"model {j}'s output did not move when its weights changed"
    for out, a, b in zip(names, y0, y1):
        if a.is_floating_point():
            assert not torch.allclose(b[j], a[j]), f"model {j}'s {out} did not move when its weights changed"
        for i in others:
            assert torch.equal(b[i], a[i]), f"model {i}'s {out} moved when model {j}'s weights changed"
    for out, b, c in zip(names, y1, y2):
        if c.is_floating_point():
            assert torch.isnan(c[j]).all(), f"model {j}'s {out} is not all NaN when its input became NaN"
        for i in others:
            assert torch.equal(c[i], b[i]), f"model {i}'s {out} moved when model {j}'s input became NaN"


def _tensor_leaves(x) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _tensor_leaves(e)]
    if isinstance(x, dict):
        return [t for e in x.values() for t in _tensor_leaves(e)]
    return []


def _float_leaves(x) -> List[Tensor]:
    if isinstance(x, Tensor):
        return [x] if x.is_floating_point() and x.requires_grad else []
    if isinstance(x, (tuple, list)):
        return [t for e in x for t in _float_leaves(e)]
    if isinstance(x, dict):
        return [t for e in x.values() for t in _float_leaves(e)]
    return []
