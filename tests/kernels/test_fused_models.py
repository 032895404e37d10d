"""Whole fused models with every fused op on its Triton kernel (in the interpreter) vs the aten reference path and
vs the N original models: forward, input gradient and every parameter gradient."""

import pytest
import torch
import torch.nn as nn
import torchvision

import fusecc
import fusecc.rewrite
from fusecc.kernels import _backend, use_backend

from ..utils import make_models, run_each
from ._util import assert_close, randn


def _fwd_bwd(fused, x, backend):
    fused.zero_grad(set_to_none=True)
    xx = x.detach().clone().requires_grad_()
    with use_backend(backend):
        y = fused(xx)
        g = randn(*y.shape, generator=torch.Generator().manual_seed(3))
        y.backward(g)
    grads = {k: p.grad.clone() for k, p in fused.named_parameters()}
    return y.detach(), xx.grad, grads, g


def _check(models, x, launches, train=True):
    fused = fusecc.fuse(models).train(train)
    before = _backend.launch_counts.copy()
    y_t, dx_t, grads_t, g = _fwd_bwd(fused, x, "triton")
    ran = _backend.launch_counts - before
    for kernel, at_least in launches.items():
        assert ran[kernel] >= at_least, f"{kernel} ran {ran[kernel]} times, expected >= {at_least}: {dict(ran)}"
    y_r, dx_r, grads_r, _ = _fwd_bwd(fused, x, "reference")
    assert_close("out vs reference", y_t, y_r, torch.float32)
    assert_close("dx vs reference", dx_t, dx_r, torch.float32)
    for k in grads_r:
        assert_close(f"d{k} vs reference", grads_t[k], grads_r[k], torch.float32)
    # the oracle: the N original models, one by one
    xs = x.detach().clone().requires_grad_()
    ref = run_each(models, (xs,))
    ref.backward(g)
    assert_close("out vs models", y_t, ref, torch.float32)
    assert_close("dx vs models", dx_t, xs.grad, torch.float32)
    for i, m in enumerate(models):
        for k, p in m.named_parameters():
            assert_close(f"model {i} d{k}", grads_t[k][i], p.grad, torch.float32)


def test_mlp_all_kernels():
    """Linear + ReLU/GELU/SiLU epilogues + LayerNorm: every op of the MLP runs a kernel, forward and backward."""
    def mlp():
        return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 24), nn.LayerNorm(24), nn.GELU(),
                             nn.Linear(24, 16), nn.SiLU(), nn.Linear(16, 5))

    models = make_models(mlp, 3)
    _check(models, torch.randn(3, 9, 20), {"_linear_fwd_kernel": 4, "_linear_bwd_dx_kernel": 3,
                                            "_linear_bwd_dw_kernel": 4, "_layer_norm_fwd_kernel": 1,
                                            "_layer_norm_bwd_kernel": 1})
    fused = fusecc.fuse(models)
    fused(torch.randn(3, 2, 20))
    assert fused.fusion_report.count("epilogue") == 2  # relu and silu fold into their linear (gelu follows LN)


@pytest.mark.slow
def test_resnet18_kernels(monkeypatch):
    """resnet18's 1x1 downsample convs (stride 2: a channels-last per-model GEMM) and its fc run the kernels.

    The convs are lowered as on CUDA (``conv_rule`` on a CUDA device: the grouped conv, whose 1x1 case is the
    kernel): the CPU rule would run layer3 and layer4 as per-model GEMMs through the linear kernel too, correct but
    minutes in the Triton interpreter.

    BatchNorm in eval mode: with batch statistics over 2 images of 1x1 maps (layer4 at 32x32), BN amplifies
    rounding-level differences to ~1e-3 in fp32, for the fused model and the N models alike (tests/test_models.py
    checks train mode in float64, which the kernels do not take). Gradients still flow through every layer.
    """
    rule = fusecc.choose.conv_rule
    monkeypatch.setattr(fusecc.choose, "conv_rule", lambda device, *a: rule(torch.device("cuda"), *a))
    for m in (models := make_models(lambda: torchvision.models.resnet18(num_classes=7), 2)):
        m.eval()
    x = torch.randn(2, 2, 3, 32, 32)
    _check(models, x, {"_linear_fwd_kernel": 4, "_linear_bwd_dx_kernel": 4, "_linear_bwd_dw_kernel": 4},
           train=False)


@pytest.mark.interpreter
def test_report_names_the_kernels_on_cuda(monkeypatch):
    """On CUDA parameters the report says which fused ops run a Triton kernel (simulated here: no GPU)."""
    monkeypatch.setattr(fusecc.rewrite.Rewriter, "triton", property(lambda self: True))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.pw, self.dw = nn.Conv2d(4, 6, 1), nn.Conv2d(6, 6, 3, padding=1, groups=6)
            self.ln, self.fc = nn.LayerNorm(6 * 5 * 5), nn.Linear(6 * 5 * 5, 3)

        def forward(self, x):
            return self.fc(self.ln(self.dw(self.pw(x)).flatten(1)).relu())

    models = make_models(Net, 3)
    fused = fusecc.fuse(models)
    x = torch.randn(3, 2, 4, 5, 5)
    with use_backend("triton"):  # and the kernels compute it: the layer norm reads a [B, N, D] (model dim 1) view
        assert_close("out", fused(x), run_each(models, (x,)), torch.float32)
    rep = fused.fusion_report
    assert rep.count("conv2d", "1x1 conv as a per-model GEMM, channels-last (Triton kernel)") == 1
    # the 3x3 depthwise conv stays aten (lowered by the CPU rule: the parameters are on the CPU here)
    assert rep.count("conv2d", "grouped conv, channels-last") == 1
    assert rep.count("layer_norm", "per-model layer_norm in one pass (Triton kernel)") == 1
    assert rep.count("linear", "batched GEMM (Triton kernel)") == 1
    assert rep.count("epilogue") == 0  # the relu follows the layer norm, not the linear
