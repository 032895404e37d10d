"""Per-layer lowering choice (fusecc/choose.py): every candidate computes the same thing, the rule picks what the
measurements say, tune=True measures once and caches on disk, and print(fused) shows the pick per layer."""

import json

import pytest
import torch
import torch.nn as nn

import fusecc
from fusecc import choose, runtime

from .utils import assert_close, check_fused, make_models

# (x per-model shape [B, Cin, *sp], Cout, kernel, stride, padding, dilation, groups per model)
CONVS = [
    ((2, 4, 9, 9), 6, 3, 1, 1, 1, 1),
    ((2, 4, 9, 9), 6, 3, 2, 0, 2, 2),
    ((2, 6, 5, 5), 6, 3, 1, 1, 1, 6),  # depthwise
    ((2, 4, 5, 5), 8, 1, 2, 0, 1, 1),  # 1x1, stride 2
    ((2, 4, 7), 5, 3, 1, 1, 1, 1),  # conv1d
    ((1, 2, 4, 4, 4), 3, 3, 1, 1, 1, 1),  # conv3d
    ((2, 8, 1, 1), 6, 3, 1, 1, 1, 1),  # a 3x3 conv on a 1x1 map: only its centre tap reads the input
    ((2, 4, 2, 2), 6, 3, 2, 1, 1, 1),  # stride 2 on 2x2: the 2x2 lower-right taps
    ((2, 4, 1, 5), 6, 3, 1, 3, 2, 1),  # dilated, wide padding: some taps only ever read padding
    ((2, 4, 6, 6), 6, 2, 3, (1, 0), 1, 1),  # asymmetric padding and a stride that skips pixels
    ((2, 4, 1, 1), 6, 1, 2, 1, 1, 1),  # every output reads padding only: the bias
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
    candidates = choose.conv_candidates(nd, x.shape, w.shape, p, g * n)
    assert ("gemm" in candidates) == (nd == 2 and g == 1)
    for impl in candidates:
        for t in (x, w, bb):
            if t is not None:
                t.grad = None
        y = runtime.conv.stacked_conv(x, w, bb, s, p, d, g * n, nd, impl)
        gy = torch.randn_like(y) if gy is None else gy
        y.backward(gy)
        results[impl] = (y.detach(), x.grad.clone(), w.grad.clone(), None if bb is None else bb.grad.clone())
    ref = results.pop("grouped")
    for impl, got in results.items():
        for name, a, e in zip(("y", "dx", "dw", "db"), got, ref):
            if e is not None:
                assert_close(f"{impl} {name}", a, e)


@pytest.mark.parametrize("hw,k,s,p", [((6, 6), 3, 1, 1), ((1, 1), 3, 1, 1), ((2, 2), 3, 2, 1), ((5, 5), 1, 2, 0)])
def test_loop_and_gemm_lowerings_of_a_shared_input(hw, k, s, p):
    """A shared input (groups = 1): every model convolves all of x."""
    x, w, b = torch.randn(2, 4, *hw), torch.randn(3, 5, 4, k, k), torch.randn(3, 5)
    ref = runtime.conv.stacked_conv(x, w, b, s, p, 1, 1, 2, "grouped")
    for impl in ("loop", "gemm"):
        assert_close(impl, runtime.conv.stacked_conv(x, w, b, s, p, 1, 1, 2, impl), ref)


@pytest.mark.parametrize("size,k,s,p,d,want", [
    (1, 3, 1, 1, 1, (1, 1, 1, True)),  # a 3x3 conv on a 1x1 map: the centre tap
    (2, 3, 2, 1, 1, (1, 1, 2, False)),  # taps 1 and 2 read the input
    (8, 1, 2, 0, 1, (4, 0, 0, True)),  # 1x1, stride 2
    (5, 3, 1, 1, 1, (5, 0, 2, False)),
    (1, 5, 1, 4, 2, (1, 2, 2, True)),  # dilated: tap 2 lands on the pixel
    (1, 1, 2, 1, 1, (2, 0, 0, False)),  # every output reads padding (the stride skips the pixel): only the bias
    (1, 3, 1, 2, 1, (3, 0, 2, False)),  # each output sees the pixel through another tap
])
def test_live_taps(size, k, s, p, d, want):
    assert runtime.conv.live_taps(size, k, s, p, d) == want


def test_gemm_lowering_keeps_the_live_taps_while_the_weight_is_unchanged():
    """In grad-off calls the centre taps of a 3x3 conv on a 1x1 map are copied out once and reused; an in-place
    update of the weight (an optimizer step) or a new .data is seen at the next call; with grad on, no copy is kept
    and the gradient reaches the weight."""
    x = torch.randn(2, 3 * 4, 1, 1)
    w = nn.Parameter(torch.randn(3, 5, 4, 3, 3))
    ref = lambda: runtime.conv.stacked_conv(x, w, None, 1, 1, 1, 3, 2, "grouped")  # noqa: E731
    gemm = lambda: runtime.conv.stacked_conv(x, w, None, 1, 1, 1, 3, 2, "gemm")  # noqa: E731
    with torch.no_grad():
        assert_close("first", gemm(), ref())
        kept = runtime.derived._DERIVED[w]
        assert len(kept) == 1
        assert_close("again", gemm(), ref())
        w.mul_(-2.0)
        assert_close("after an in-place update", gemm(), ref())
        w.data = torch.randn(3, 5, 4, 3, 3)
        assert_close("after a new .data", gemm(), ref())
    with torch.inference_mode():  # under inference mode, and for a weight made there (no version counter)
        assert_close("inference mode", gemm(), ref())
        w_inf = torch.randn(3, 5, 4, 3, 3)
        assert_close("inference-mode weight", runtime.conv.stacked_conv(x, w_inf, None, 1, 1, 1, 3, 2, "gemm"),
                     runtime.conv.stacked_conv(x, w_inf, None, 1, 1, 1, 3, 2, "grouped"))
    y = gemm()
    y.sum().backward()
    expect = torch.zeros_like(w)
    expect[:, :, :, 1, 1] = x.view(2, 3, 1, 4).sum(0)
    assert_close("dw", w.grad, expect)


@pytest.mark.parametrize("x_shape,w_shape,stride,padding,groups,want", [
    ((8, 8 * 512, 1, 1), (8, 512, 512, 3, 3), 1, 1, 8, "gemm"),  # resnet18 layer4 at 32x32: the centre tap, 19x
    ((8, 8 * 256, 2, 2), (8, 512, 256, 3, 3), 2, 1, 8, "gemm"),
    ((8, 8 * 256, 2, 2), (8, 256, 256, 3, 3), 1, 1, 8, "gemm"),
    ((8, 8 * 128, 4, 4), (8, 128, 128, 3, 3), 1, 1, 8, "channels_last"),
    ((8, 8 * 64, 16, 16), (8, 128, 64, 1, 1), 2, 0, 8, "channels_last"),  # a 1x1 downsample to 8x8
    ((8, 8 * 64, 8, 8), (8, 128, 64, 1, 1), 2, 0, 8, "gemm"),  # ... to 4x4
    ((8, 8 * 3, 32, 32), (8, 64, 3, 7, 7), 2, 3, 8, "channels_last"),  # the stem
    ((8, 8 * 64, 8, 8), (8, 64, 64, 3, 3), 1, 1, 8, "channels_last"),
    ((8, 8 * 960, 1, 1), (8, 960, 1, 3, 3), 1, 1, 8 * 960, "channels_last"),  # depthwise: as the 1x1 convs around
    ((8, 8 * 128, 2, 2), (8, 32, 128, 3, 3), 1, 1, 8, "channels_last"),  # densenet's 3x3 at 2x2: few outputs
    ((8, 8 * 64, 8, 8), (8, 64, 64, 3, 3), 1, "same", 8, "grouped"),  # string padding: as the model has it
])
def test_conv_rule(x_shape, w_shape, stride, padding, groups, want):
    assert choose.conv_rule(torch.device("cpu"), x_shape, w_shape, stride, padding, 1, 2, groups) == want
    assert choose.conv_rule(torch.device("cuda"), x_shape, w_shape, stride, padding, 1, 2, groups) == "grouped"


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
    assert fused._fusecc_chooser.measured == 3 * 4 + 2  # three convs of four candidates, a linear of two
    cache = json.loads((tmp_path / "tune.json").read_text())
    convs = [v for k, v in cache.items() if json.loads(k)[0] == "conv"]
    assert len(cache) == 4 and all(set(v["ms"]) == {"grouped", "channels_last", "loop", "gemm"} for v in convs)
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
        y = runtime.linear.batched_linear(x, w, b, "gelu", impl)
        y.backward(torch.ones_like(y))
        grads[impl] = (y.detach(), x.grad.clone(), w.grad.clone(), b.grad.clone())
    for name, a, e in zip(("y", "dx", "dw", "db"), grads["loop"], grads["bmm"]):
        assert_close(name, a, e)


def test_weight_gradient_has_the_weight_layout():
    """The reference batched linear writes dW contiguous like W (autograd's baddbmm gives a transposed one, whose
    accumulation into .grad is a slow strided copy)."""
    x, w = torch.randn(3, 4, 6), torch.randn(3, 5, 6, requires_grad=True)
    runtime.linear.batched_linear(x, w, None).sum().backward()
    assert w.grad.is_contiguous()


def test_print_lists_the_choice_per_layer():
    models = make_models(_Net, 2)
    fused = fusecc.fuse(models)
    fused(torch.randn(2, 2, 3, 8, 8))
    text = repr(fused)
    assert "per-layer lowering choices:" in text
    for layer in ("stem", "deep", "pw"):
        assert any(line.strip().startswith(layer) and "(rule)" in line for line in text.splitlines()), text
