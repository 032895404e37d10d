"""Real models no one here wrote (torchvision) and an MLP: fused == the N models run one by one."""

import pytest
import torch
import torch.nn as nn
import torchvision

import fusecc
from fusecc.verify import relative_error
from tests.utils import make_models


def mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


MODELS = {
    "mlp": (mlp, (1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 32, 32)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (3, 32, 32)),
    "densenet121": (lambda: torchvision.models.densenet121(num_classes=10), (3, 32, 32)),
}


@pytest.mark.parametrize("name", [
    "mlp", "resnet18", "mobilenet_v2", pytest.param("densenet121", marks=pytest.mark.slow)])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_inference_matches_models(name, shared):
    factory, shape = MODELS[name]
    n = 4
    models = [m.eval() for m in make_models(factory, n)]
    x = torch.randn(2, *shape) if shared else torch.randn(n, 2, *shape)
    fused = fusecc.fuse(models, shared_inputs=shared)
    with torch.no_grad():
        y = fused(x)
        ref = torch.stack([m(x if shared else x[i]) for i, m in enumerate(models)])
    assert y.shape == (n, 2, 10)
    assert relative_error(y, ref) < 1e-5
    rep = fused.fusion_report
    assert not rep.fallbacks
    if name != "mlp":
        conv = rep.count("conv2d")
        assert conv == sum(isinstance(m, nn.Conv2d) for m in models[0].modules())
        assert rep.count("batch_norm") == sum(isinstance(m, nn.BatchNorm2d) for m in models[0].modules())


@pytest.mark.parametrize("name,mode,dtype", [
    ("mlp", "train", torch.float32),
    ("resnet18", "eval", torch.float32),
    pytest.param("mobilenet_v2", "eval", torch.float32, marks=pytest.mark.slow),
    # 121 layers of fp32 backward accumulate ~1e-3 relative differences in the first conv's gradient (summation
    # order of grouped vs separate convs); float64 shows the fused gradients are exact
    pytest.param("densenet121", "eval", torch.float64, marks=pytest.mark.slow),
    pytest.param("mobilenet_v2", "train", torch.float64, marks=pytest.mark.slow),
    # train-mode BN over a batch of 4 at 1x1 (layer4 of a 32x32 input) is ill-conditioned in fp32 (errors of
    # 1e-2 in both the fused and the per-model runs alike); float64 shows the fused gradients are exact
    ("resnet18", "train", torch.float64),
], ids=["mlp-train", "resnet18-eval", "mobilenet_v2-eval", "densenet121-eval-f64", "mobilenet_v2-train-f64",
        "resnet18-train-f64"])
def test_gradients_match_models(name, mode, dtype):
    """Forward + backward: every stacked parameter's gradient slice i is model i's own gradient."""
    factory, shape = MODELS[name]
    n = 3
    models = [m.to(dtype).train(mode == "train") for m in make_models(factory, n)]
    for m in models:  # dropout draws differ between fused and oracle runs: switch it off
        for sub in m.modules():
            if isinstance(sub, nn.Dropout):
                sub.eval()
    fused = fusecc.fuse(models)
    x = torch.randn(n, 4, *shape, dtype=dtype)
    y = fused(x)
    ref = torch.stack([m(xi) for m, xi in zip(models, x)])
    assert relative_error(y, ref) < 1e-5
    g = torch.randn_like(ref)
    y.backward(g)
    ref.backward(g)
    # relative to the gradients' scale (sums of many terms). float64: 1e-11, where fp32 rounding would show as 1e-5
    # (mobilenet_v2 in train mode: 1.2e-12 on one element of features.17 on some machines, at 1e-12 a flaky bound)
    eps = 1e-5 if dtype == torch.float32 else 1e-11
    wants = {pname: torch.stack([m.get_parameter(pname).grad for m in models]) for pname, _ in fused.named_parameters()}
    # a conv bias before a train-mode BatchNorm has a gradient of exactly 0 in theory: what both runs compute is the
    # rounding noise of summing the output gradient, so its scale is the model's largest gradient, not its own
    scale = max(w.abs().max().item() for w in wants.values())
    for pname, p in fused.named_parameters():
        want = wants[pname]
        atol = eps * max(want.abs().max().item(), 1e-3 * scale)
        torch.testing.assert_close(p.grad, want, rtol=10 * eps, atol=atol, msg=lambda m: f"{pname}.grad: {m}")
    for bname, b in fused.named_buffers():
        if "running" in bname:
            want = torch.stack([m.get_buffer(bname) for m in models])
            torch.testing.assert_close(b, want, msg=lambda m: f"{bname}: {m}")


def test_resnet18_issue_example():
    """The example from the README: 8 fine-tuned copies, per-model and shared inputs, 64x64."""
    models = [torchvision.models.resnet18(num_classes=10).eval() for _ in range(8)]
    fused = fusecc.fuse(models)
    x = torch.randn(8, 2, 3, 64, 64)
    with torch.no_grad():
        y = fused(x)
        for i in (0, 7):
            assert relative_error(y[i], models[i](x[i])) < 1e-5
        fused_s = fusecc.fuse(models, shared_inputs=True)
        xs = torch.randn(2, 3, 64, 64)
        ys = fused_s(xs)
    assert ys.shape == (8, 2, 10)
    assert relative_error(ys[3], models[3](xs)) < 1e-5
    assert fused_s.fusion_report.count("conv2d", "wide conv (shared input, N*Cout output channels)") == 1
