"""Shared harness of test_shape / test_reduce / test_pointwise: an op applied to the output of a real per-model layer,
so that the op's input has a real fused layout.

Pre-layers (input ``x`` per model ``[2, 3, 5, 7]``):

- ``linear``: ``nn.Linear(7, 6)`` on the last dim -> per model ``[2, 3, 5, 6]``; stacked ``[N, 2, 3, 5, 6]`` for
  per-model inputs, folded last dim ``[2, 3, 5, N*6]`` for a shared input;
- ``conv``: ``nn.Conv2d(3, 4, 3, padding=1)`` -> per model ``[2, 4, 5, 7]``, folded channels ``[2, N*4, 5, 7]``;
- ``conv_t``: the conv then ``transpose(1, 2)`` -> per model ``[2, 5, 4, 7]``, the model dim stacked at a
  non-leading tensor dim.

All per-model dims are distinct, so mapping a dim to the wrong tensor dim changes the shape or the values.

``Fn`` (a module applying one function or module) and ``even_dim`` are shared with the other rule tests too.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.utils import check_fused, make_models

B = 2
IN_SHAPE = (B, 3, 5, 7)  # per-model input

MODES = [pytest.param(False, id="per-model"), pytest.param(True, id="shared")]


class Fn(nn.Module):
    """Applies one function or module: a module-level function (the same object in every model, so the models'
    configs match), or a module built per model (registered as the submodule ``fn``)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


class Transpose12(nn.Module):
    def forward(self, h):
        return h.transpose(1, 2).contiguous()


PRE = {
    "linear": (lambda: nn.Linear(7, 6), (B, 3, 5, 6), "linear"),
    "conv": (lambda: nn.Conv2d(3, 4, 3, padding=1), (B, 4, 5, 7), "conv2d"),
    "conv_t": (lambda: nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), Transpose12()), (B, 5, 4, 7), "conv2d"),
}

# (pre, n) combinations of the main grids: N in (1, 3) on the stacked and the folded layouts, N = 3 on the
# non-leading stacked one (N = 1 changes nothing there that the other two do not cover); N = 8 on a subset
PRE_N = [pytest.param(p, n, id=f"{p}-N{n}") for p, n in (("linear", 1), ("linear", 3), ("conv", 1), ("conv", 3),
                                                          ("conv_t", 3))]
PRE_N_2 = [pytest.param(p, n, id=f"{p}-N{n}") for p in ("linear", "conv") for n in (1, 3)]  # element-wise ops
PRE_N8 = [pytest.param(p, 8, id=f"{p}-N8") for p in ("linear", "conv")]


class Mod:
    """An op that needs a module built for the per-model shape after the pre-layer: build(shape) -> nn.Module."""

    def __init__(self, build):
        self.build = build


class Net(nn.Module):
    def __init__(self, pre: str, op):
        super().__init__()
        factory, shape, _ = PRE[pre]
        self.pre = factory()
        self.op = op.build(shape) if isinstance(op, Mod) else Fn(op)

    def forward(self, x):
        return self.op(self.pre(x))


def even_dim(shape):
    """The first non-batch dim of even size (e.g. for GLU)."""
    return next(d for d in range(1, len(shape)) if shape[d] % 2 == 0)


def const_like(shape, lo=-1.0, hi=1.0):
    """A deterministic tensor (equal in every model, so the fused module sees it as shared)."""
    numel = 1
    for s in shape:
        numel *= s
    return torch.linspace(lo, hi, numel).view(tuple(shape))


def make_input(n: int, shared: bool) -> torch.Tensor:
    return torch.randn(*IN_SHAPE) if shared else torch.randn(n, *IN_SHAPE)


def run(pre: str, op, n: int, shared: bool, expect=None):
    """Fuse n models ``pre -> op``, check outputs and gradients against the models run one by one, check that the
    pre-layer fused and nothing fell back to a loop, and that each ``expect`` kind was recorded as many times."""
    models = make_models(lambda: Net(pre, op), n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    rep = fused.fusion_report
    assert not rep.fallbacks, rep.fallbacks
    assert rep.count("fallback") == 0
    assert rep.count(PRE[pre][2]) == 1, fused
    for kind, c in (expect or {}).items():
        assert rep.count(kind) == c, f"expected {c} x {kind}:\n{fused}"
    return fused
