"""Layout planning regressions: how many copies the fused forward makes to move the model dim around.

The oracle is no worse than today's plan: resnet18 keeps its activations folded ``[B, N*C, H, W]`` from the input
fold to the pooled features (at most 4 layout copies: the input fold, and the channels-last <-> NCHW switches between
layers whose picked lowerings want different memory formats; the per-model GEMM convs of the small deep maps gather
their input taps (im2col) or subsample a strided input, at most 3 copies each, counted apart); the MLP keeps
``[N, B, K]`` end to end (no copy at all).
"""

import sys
from collections import Counter

import torch
import torch.nn as nn
import torchvision
from torch.utils._python_dispatch import TorchDispatchMode

import fusecc
from fusecc.kernels import _backend
from fusecc.kernels.linear import cpu

from .utils import make_models

COPIES = ("aten.clone.default", "aten.copy_.default", "aten._to_copy.default", "aten.contiguous.default")


class _CountOps(TorchDispatchMode):
    """Counts the aten ops of a call; ops run inside ``runtime.conv.conv_gemm`` are also counted as "in conv_gemm"."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.in_gemm: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        f = sys._getframe(1)
        while f is not None:
            if f.f_code.co_name == "conv_gemm":
                self.in_gemm[str(func)] += 1
                break
            f = f.f_back
        return func(*args, **(kwargs or {}))


def _count(fused, x):
    with torch.no_grad():
        fused(x)
        with _CountOps() as c:
            fused(x)
    return c


def test_resnet18_layout_copies():
    fused = fusecc.fuse(make_models(lambda: torchvision.models.resnet18(num_classes=10), 2)).eval()
    counts = _count(fused, torch.randn(2, 2, 3, 32, 32))
    ops = counts.ops
    layout = sum(ops[k] - counts.in_gemm[k] for k in COPIES)
    assert layout <= 4, {k: ops[k] - counts.in_gemm[k] for k in COPIES}
    gemm_convs = fused.fusion_report.count("conv2d", "per-model GEMM over the live taps")
    assert gemm_convs >= 8  # layer3 and layer4 at 32x32: maps of 4 pixels or less
    gathers = sum(counts.in_gemm[k] for k in COPIES + ("aten.im2col.default",))
    assert gathers <= 3 * gemm_convs, dict(counts.in_gemm)
    # the per-model-loop convs concatenate their N outputs: one cat each, and no other cat
    assert ops["aten.cat.default"] == fused.fusion_report.count("conv2d", "per-model loop (N convs)")
    assert fused.fusion_report.conversions == {"fold": 1, "movedim": 2, "unfold": 1}


def test_mlp_has_no_layout_copy():
    def mlp():
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                             nn.Linear(512, 10))

    models = make_models(mlp, 3)
    fused = fusecc.fuse(models).eval()
    launches = _backend.launch_counts["small_gemm"]
    ops = _count(fused, torch.randn(3, 8, 1, 28, 28)).ops
    launches = (_backend.launch_counts["small_gemm"] - launches) // 2  # _count calls twice
    assert sum(ops[k] for k in COPIES) == 0, dict(ops)
    assert not fused.fusion_report.conversions
    # one batched GEMM per layer, relu in its epilogue or in place on its output: at batch 8 on the CPU, fusecc's
    # small-batch kernel where it is built (for the layers with at least cpu.MIN_WEIGHTS weights), else baddbmm
    big = sum(3 * m.weight.numel() >= cpu.MIN_WEIGHTS for m in models[0] if isinstance(m, nn.Linear))
    assert big == 2
    assert launches == (big if cpu.library() is not None else 0)
    assert ops["aten.baddbmm.default"] + launches == 3, dict(ops)


def test_activation_memory_grows_like_n_models():
    """The fused forward holds about N times one model's activations at its peak, not more (estimated from the
    fused graph's shapes and last uses, as `fusecc inspect` reports it)."""
    from fusecc.memory import activation_peak

    def build(n):
        return fusecc.fuse(make_models(lambda: torchvision.models.resnet18(num_classes=10), n)).eval()

    x1, x4 = torch.randn(1, 4, 3, 32, 32), torch.randn(4, 4, 3, 32, 32)
    one, four = build(1), build(4)
    with torch.no_grad():
        one(x1), four(x4)
    p1, p4 = activation_peak(one, (x1,)), activation_peak(four, (x4,))
    assert p1 > 0
    assert p4 <= 4 * p1 * 1.1, (p1, p4)


class _DenseBlock(nn.Module):
    """DenseNet's pattern: every layer reads the concatenation of all earlier features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(8 + 4 * i), nn.ReLU(), nn.Conv2d(8 + 4 * i, 8, 1), nn.BatchNorm2d(8),
                          nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)) for i in range(3))

    def forward(self, x):
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(torch.cat(feats, 1)))
        return torch.cat(feats, 1).mean((2, 3))


def test_dense_concatenation_stays_channels_last():
    """The per-model cat of channels-last features is channels-last, so the convs reading it copy nothing: the only
    copies are the input fold and the stem's switch to channels-last."""
    from .utils import check_fused

    models = make_models(_DenseBlock, 2)
    for m in models:
        m.eval()
    x = torch.randn(2, 2, 3, 8, 8)
    fused = check_fused(models, (x,))
    ops = _count(fused, x).ops
    assert sum(ops[k] for k in COPIES) <= 2, {k: ops[k] for k in COPIES}
    assert ops["aten.cat.default"] == 4
