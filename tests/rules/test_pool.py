"""Pooling, upsampling, padding and pixel shuffle run on the folded conv layout [B, N*C, *sp]."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.rules._layouts import Fn
from tests.utils import check_fused, make_models


class ConvThen(nn.Module):
    def __init__(self, op, nd=2, cin=3, cout=4):
        super().__init__()
        self.conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd](cin, cout, 3, padding=1)
        self.op = op

    def forward(self, x):
        return self.op(self.conv(x))


SP = {1: (9,), 2: (7, 6), 3: (5, 4, 6)}
MODULES = [
    (1, lambda: nn.MaxPool1d(2), "maxpool1d"), (2, lambda: nn.MaxPool2d(3, 2, 1), "maxpool2d"),
    (3, lambda: nn.MaxPool3d(2, ceil_mode=True), "maxpool3d-ceil"), (1, lambda: nn.AvgPool1d(3, 2), "avgpool1d"),
    (2, lambda: nn.AvgPool2d(2, count_include_pad=False, padding=1), "avgpool2d"),
    (3, lambda: nn.AvgPool3d(2), "avgpool3d"), (1, lambda: nn.AdaptiveAvgPool1d(4), "aavg1d"),
    (2, lambda: nn.AdaptiveAvgPool2d((1, 1)), "aavg2d"), (2, lambda: nn.AdaptiveAvgPool2d((3, None)), "aavg2d-none"),
    (3, lambda: nn.AdaptiveAvgPool3d(2), "aavg3d"), (1, lambda: nn.AdaptiveMaxPool1d(3), "amax1d"),
    (2, lambda: nn.AdaptiveMaxPool2d(2), "amax2d"), (3, lambda: nn.AdaptiveMaxPool3d(1), "amax3d"),
    (2, lambda: nn.LPPool2d(2, 2), "lppool2d"), (2, lambda: nn.Upsample(scale_factor=2), "upsample-nearest"),
    (2, lambda: nn.Upsample(size=(5, 9), mode="bilinear", align_corners=False), "upsample-bilinear"),
    (2, lambda: nn.ZeroPad2d((1, 2, 0, 1)), "zeropad2d"), (2, lambda: nn.ReflectionPad2d(1), "reflectpad2d"),
    (1, lambda: nn.ReplicationPad1d(2), "replpad1d"), (2, lambda: nn.ConstantPad2d(1, 0.5), "constpad2d"),
    (2, lambda: nn.Identity(), "identity"),
]


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("nd,op", [(d, f) for d, f, _ in MODULES], ids=[i for _, _, i in MODULES])
def test_spatial_module(n, nd, op):
    models = make_models(lambda: ConvThen(op(), nd), n)
    fused = check_fused(models, (torch.randn(n, 2, 3, *SP[nd]),))
    assert not fused.fusion_report.fallbacks


@pytest.mark.parametrize("n", [1, 3])
def test_spatial_module_on_shared_input(n):
    """A parameter-free op on the shared input runs once; the conv after it is one wide conv."""

    class PoolFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.pool = nn.MaxPool2d(2)
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(self.pool(x))

    models = make_models(PoolFirst, n)
    fused = check_fused(models, (torch.randn(2, 3, 8, 8),), shared=True)
    assert fused.fusion_report.count("conv2d", "wide conv (shared input, N*Cout output channels)") == 1


FUNCS = [
    (lambda x: F.max_pool2d(x, 2), "max_pool2d"), (lambda x: F.avg_pool2d(x, 3, 1, 1), "avg_pool2d"),
    (lambda x: F.adaptive_avg_pool2d(x, (1, 1)), "adaptive_avg_pool2d"),
    (lambda x: F.adaptive_max_pool2d(x, 2), "adaptive_max_pool2d"),
    (lambda x: F.max_pool2d(x, 2, return_indices=True)[1].float(), "max_pool2d-indices"),
    (lambda x: F.interpolate(x, scale_factor=1.5, mode="bilinear"), "interpolate"),
    (lambda x: F.pad(x, (1, 1, 2, 0)), "pad-constant"), (lambda x: F.pad(x, (1, 1, 1, 1), mode="reflect"), "pad-refl"),
    (lambda x: F.pad(x, (1, 0), value=2.0), "pad-value"),
    (lambda x: F.pixel_shuffle(x, 2), "pixel_shuffle"), (lambda x: F.pixel_unshuffle(x[..., :6, :6], 2),
                                                        "pixel_unshuffle"),
]


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("fn", [f for f, _ in FUNCS], ids=[i for _, i in FUNCS])
def test_spatial_function(n, fn):
    models = make_models(lambda: ConvThen(Fn(fn), 2, 3, 8), n)
    check_fused(models, (torch.randn(n, 2, 3, 7, 6),))


def test_pool_does_not_mix_models():
    models = make_models(lambda: ConvThen(nn.AdaptiveAvgPool2d(1)), 3)
    x = torch.randn(3, 2, 3, 7, 6)
    x[1] = float("nan")
    import fusecc

    y = fusecc.fuse(models)(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[0]).all() and torch.isfinite(y[2]).all()
