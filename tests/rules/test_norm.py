"""BatchNorm / LayerNorm / GroupNorm / InstanceNorm / RMSNorm never mix models."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from tests.utils import check_fused, make_models


class ConvNorm(nn.Module):
    def __init__(self, norm, nd=2):
        super().__init__()
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd](3, 6, 3, padding=1)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.conv(x))


class LinNorm(nn.Module):
    def __init__(self, norm, k=5, m=6):
        super().__init__()
        self.fc = nn.Linear(k, m)
        self.norm = norm

    def forward(self, x):
        return self.norm(self.fc(x))


NORMS_2D = [
    (lambda: nn.BatchNorm2d(6), "bn"),
    (lambda: nn.BatchNorm2d(6, affine=False), "bn-noaffine"),
    (lambda: nn.GroupNorm(3, 6), "gn3"),
    (lambda: nn.GroupNorm(1, 6, affine=False), "gn1-noaffine"),
    (lambda: nn.InstanceNorm2d(6, affine=True), "in-affine"),
    (lambda: nn.InstanceNorm2d(6, track_running_stats=True), "in-tracked"),
    (lambda: nn.LayerNorm([7, 5]), "ln-spatial"),
]


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("norm", [f for f, _ in NORMS_2D], ids=[i for _, i in NORMS_2D])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_norm_after_conv(n, norm, shared):
    models = make_models(lambda: ConvNorm(norm()).eval(), n)
    x = torch.randn(2, 3, 7, 5) if shared else torch.randn(n, 2, 3, 7, 5)
    fused = check_fused(models, (x,), shared=shared)
    assert not fused.fusion_report.fallbacks


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("nd", [1, 3])
def test_batchnorm_1d_3d(n, nd):
    bn = {1: nn.BatchNorm1d, 3: nn.BatchNorm3d}[nd]
    models = make_models(lambda: ConvNorm(bn(6), nd).eval(), n)
    shape = {1: (2, 3, 9), 3: (2, 3, 4, 3, 5)}[nd]
    fused = check_fused(models, (torch.randn(n, *shape),))
    assert fused.fusion_report.count("batch_norm") == 1


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("norm", [
    lambda: nn.BatchNorm1d(6), lambda: nn.LayerNorm(6), lambda: nn.LayerNorm(6, elementwise_affine=False),
    lambda: nn.LayerNorm(6, bias=False), lambda: nn.RMSNorm(6), lambda: nn.RMSNorm(6, eps=1e-3),
], ids=["bn1d", "ln", "ln-noaffine", "ln-nobias", "rms", "rms-eps"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_norm_after_linear(n, norm, shared):
    models = make_models(lambda: LinNorm(norm()).eval(), n)
    x = torch.randn(4, 5) if shared else torch.randn(n, 4, 5)
    check_fused(models, (x,), shared=shared)


class SeqLN(nn.Module):
    """LayerNorm on [B, T, D] directly on the (shared or per-model) input, then functional layer_norm."""

    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(8)
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x):
        return F.layer_norm(self.ln(x), (8,), self.w, None, 1e-6)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_layer_norm_on_input(n, shared):
    models = make_models(SeqLN, n)
    x = torch.randn(2, 5, 8) if shared else torch.randn(n, 2, 5, 8)
    fused = check_fused(models, (x,), shared=shared)
    assert fused.fusion_report.count("layer_norm") == 2


@pytest.mark.parametrize("n", [1, 3])
def test_batchnorm_train_mode_batch_stats_and_running_stats(n):
    """In train mode each model normalises with its own batch statistics and updates its own running stats."""
    models = make_models(lambda: ConvNorm(nn.BatchNorm2d(6)), n)
    for m in models:
        m.train()
    fused = fusecc.fuse(models)
    x = torch.randn(n, 4, 3, 7, 5)
    for step in range(3):
        y = fused(x + step)
        ref = torch.stack([m(xi + step) for m, xi in zip(models, x)])
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for i, m in enumerate(models):
        torch.testing.assert_close(fused.norm.running_mean[i], m.norm.running_mean)
        torch.testing.assert_close(fused.norm.running_var[i], m.norm.running_var)
        assert int(fused.norm.num_batches_tracked[i]) == int(m.norm.num_batches_tracked) == 3


def test_batchnorm_momentum_none_cumulative_average():
    models = make_models(lambda: ConvNorm(nn.BatchNorm2d(6, momentum=None)), 2)
    fused = fusecc.fuse(models)
    x = torch.randn(2, 4, 3, 7, 5)
    for step in range(3):
        fused(x * (step + 1))
        for m, xi in zip(models, x):
            m(xi * (step + 1))
    for i, m in enumerate(models):
        torch.testing.assert_close(fused.norm.running_var[i], m.norm.running_var)


def test_norm_statistics_never_mix_models():
    """Poisoning model 0's input must not reach model 1 through shared statistics (train-mode BN, GroupNorm)."""
    for norm in (lambda: nn.BatchNorm2d(6), lambda: nn.GroupNorm(2, 6), lambda: nn.InstanceNorm2d(6)):
        models = make_models(lambda: ConvNorm(norm()), 2)
        fused = fusecc.fuse(models)
        x = torch.randn(2, 4, 3, 7, 5)
        x[0] = float("nan")
        y = fused(x)
        assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()
