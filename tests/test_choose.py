"""Per-layer lowering choice (fusecc/choose.py): every candidate computes the same thing, the rule picks what the
measurements say, tune=True measures once and caches on disk, and print(fused) shows the pick per layer."""

import json

import pytest
import torch
import torch.nn as nn

import fusecc
from fusecc import choose, lowering

from .utils import assert_close, check_fused, make_models

# (x per-model shape [B, Cin, *sp], Cout, kernel, stride, padding, dilation, groups per model)
CONVS = [
    ((2, 4, 9, 9), 6, 3, 1, 1, 1, 1),
    ((2, 4, 9, 9), 6, 3, 2, 0, 2, 2),
    ((2, 6, 5, 5), 6, 3, 1, 1, 1, 6),  # depthwise
    ((2, 4, 5, 5), 8, 1, 2, 0, 1, 1),  # 1x1, stride 2
    ((2, 4, 7), 5, 3, 1, 1, 1, 1),  # conv1d
    ((1, 2, 4, 4, 4), 3, 3, 1, 1, 1, 1),  # conv3d
]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape,cout,k,s,p,d,g", CONVS, ids=[f"conv{len(c[0]) - 2}d-{i}" for i, c in enumerate(CONVS)])
def test_every_conv_lowering_computes_the_same(shape, cout, k, s, p, d, g, bias):
    n, nd = 3, len(shape) - 2
    b, cin = shape[0], shape[1]
    x = torch.randn((b, n * cin) + shape[2:], requires_grad=True)
    w = torch.randn((n, cout, cin // g) + (k,) * nd, requires_grad=True)
    bb = torch.randn(n, cout, requires_grad=True) if bias else None
    gy = None
    results = {}
    for impl in choose.conv_candidates(nd):
        for t in (x, w, bb):
            if t is not None:
                t.grad = None
        y = lowering.stacked_conv(x, w, bb, s, p, d, g * n, nd, impl)
        gy = torch.randn_like(y) if gy is None else gy
        y.backward(gy)
        results[impl] = (y.detach(), x.grad.clone(), w.grad.clone(), None if bb is None else bb.grad.clone())
    ref = results.pop("grouped")
    for impl, got in results.items():
        for name, a, e in zip(("y", "dx", "dw", "db"), got, ref):
            if e is not None:
                assert_close(f"{impl} {name}", a, e)


def test_loop_lowering_of_a_shared_input():
    """A shared input (groups = 1): every model convolves all of x."""
    x, w, b = torch.randn(2, 4, 6, 6), torch.randn(3, 5, 4, 3, 3), torch.randn(3, 5)
    assert_close("loop", lowering.stacked_conv(x, w, b, 1, 1, 1, 1, 2, "loop"),
                 lowering.stacked_conv(x, w, b, 1, 1, 1, 1, 2, "grouped"))


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,want", [
    ((8, 8 * 512, 1, 1), (8, 512, 512, 3, 3), 1, 1, "loop"),  # resnet18 layer4 at 32x32: grouped runs 4x slower
    ((8, 8 * 256, 2, 2), (8, 512, 256, 3, 3), 2, 1, "loop"),
    ((8, 8 * 256, 2, 2), (8, 256, 256, 3, 3), 1, 1, "loop"),
    ((8, 8 * 128, 4, 4), (8, 128, 128, 3, 3), 1, 1, "grouped"),
    ((8, 8 * 64, 8, 8), (8, 128, 64, 1, 1), 2, 0, "channels_last"),  # a 1x1 downsample
    ((8, 8 * 3, 32, 32), (8, 64, 3, 7, 7), 2, 3, "channels_last"),  # the stem
    ((8, 8 * 64, 8, 8), (8, 64, 64, 3, 3), 1, 1, "channels_last"),
])
def test_conv_rule(x_shape, w_shape, stride, padding, want):
    assert choose.conv_rule(torch.device("cpu"), x_shape, w_shape, stride, padding, 1, 2) == want
    assert choose.conv_rule(torch.device("cuda"), x_shape, w_shape, stride, padding, 1, 2) == "grouped"


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.deep = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.pw = nn.Conv2d(16, 16, 1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        x = torch.relu(self.pw(self.deep(x)))
        return self.fc(x.mean((2, 3)))


def test_tune_measures_once_then_reads_the_disk_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path))
    models = make_models(_Net, 3)
    x = torch.randn(3, 2, 3, 8, 8)
    fused = check_fused(models, (x,), tune=True)
    assert fused._fusecc_chooser.measured == 3 * 3 + 2  # three convs of three candidates, a linear of two
    cache = json.loads((tmp_path / "tune.json").read_text())
    convs = [v for k, v in cache.items() if json.loads(k)[0] == "conv"]
    assert len(cache) == 4 and all(set(v["ms"]) == {"grouped", "channels_last", "loop"} for v in convs)
    picks = {layer: how for layer, kind, how, why in fused.fusion_report.choices}
    assert set(picks) == {"stem", "deep", "pw", "fc"}
    assert all(why.startswith("tuned: ") for *_, why in fused.fusion_report.choices)
    for layer, kind, how, why in fused.fusion_report.choices:  # the fastest measured is the one picked
        fastest = why[len("tuned: "):].split(" ")[0]
        assert how == {**choose.CONV_HOW, **choose.LINEAR_HOW}[fastest], (layer, how, why)

    again = fusecc.fuse(make_models(_Net, 3), tune=True)  # same shapes: no timing at all
    again(x)
    assert again._fusecc_chooser.measured == 0
    assert [c[2] for c in again.fusion_report.choices] == [c[2] for c in fused.fusion_report.choices]


def test_cached_pick_is_used(tmp_path, monkeypatch):
    """A choice written in the cache is obeyed (so a second fuse really costs no timing): force 'loop' there."""
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path))
    models = make_models(_Net, 2)
    x = torch.randn(2, 2, 3, 8, 8)
    fusecc.fuse(models, tune=True)(x)
    path = tmp_path / "tune.json"
    cache = json.loads(path.read_text())
    for v in cache.values():
        v["pick"] = "loop"
    path.write_text(json.dumps(cache))
    fused = check_fused(models, (x,), tune=True)
    assert fused.fusion_report.count("conv2d", choose.CONV_HOW["loop"]) == 3
    assert fused.fusion_report.count("linear", choose.LINEAR_HOW["loop"]) == 1
    assert fused._fusecc_chooser.measured == 0


def test_loop_linear_lowering_matches_bmm():
    x = torch.randn(3, 4, 6, requires_grad=True)
    w, b = torch.randn(3, 5, 6, requires_grad=True), torch.randn(3, 5, requires_grad=True)
    grads = {}
    for impl in ("bmm", "loop"):
        for t in (x, w, b):
            t.grad = None
        y = lowering.batched_linear(x, w, b, "gelu", impl)
        y.backward(torch.ones_like(y))
        grads[impl] = (y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone())
    for name, a, e in zip(("y", "dx", "dw", "db"), grads["loop"], grads["bmm"]):
        assert_close(name, a, e)


def test_weight_gradient_has_the_weight_layout():
    """The reference batched linear writes dW contiguous like W (autograd's baddbmm gives a transposed one, whose
    accumulation into .grad is a slow strided copy)."""
    x, w = torch.randn(3, 4, 6), torch.randn(3, 5, 6, requires_grad=True)
    lowering.batched_linear(x, w, None).sum().backward()
    assert w.grad.is_contiguous()


def test_print_lists_the_choice_per_layer():
    models = make_models(_Net, 2)
    fused = fusecc.fuse(models)
    fused(torch.randn(2, 2, 3, 8, 8))
    text = repr(fused)
    assert "per-layer lowering choices:" in text
    for layer in ("stem", "deep", "pw"):
        assert any(line.strip().startswith(layer) and "(rule)" in line for line in text.splitlines()), text
