"""torch.compile(fused) (inductor, on the CPU) gives the eager fused results, with and without tune."""

import pytest
import torch
import torch.nn as nn

import fusecc

from .utils import assert_close, make_models, run_each


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.deep = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.relu(self.deep(x)).mean((2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("tune", [False, True], ids=["rule", "tune"])
def test_compiled_inference(tune):
    models = [m.eval() for m in make_models(_Net, 3)]
    fused = fusecc.fuse(models, tune=tune).eval()
    x = torch.randn(3, 2, 3, 8, 8)
    compiled = torch.compile(fused)
    with torch.no_grad():
        assert_close("compiled", compiled(x), run_each(models, (x,)))
        assert_close("compiled, second call", compiled(x), fused(x))


@pytest.mark.slow
def test_compiled_training_step():
    models = make_models(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 3)
    fused = fusecc.fuse(models).train()
    x = torch.randn(3, 5, 12)
    compiled = torch.compile(fused)
    y = compiled(x)
    y.square().sum().backward()
    ref = run_each(models, (x,))
    ref.square().sum().backward()
    assert_close("out", y, ref)
    for name, p in fused.named_parameters():
        assert_close(f"d{name}", p.grad, torch.stack([m.get_parameter(name).grad for m in models]))
