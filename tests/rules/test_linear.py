"""Linear / F.linear: fused output and gradients equal the N models run one by one."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from fusecc import choose
from tests.utils import assert_models_independent, check_fused, make_models

NS = [1, 3, 8]


class Lin(nn.Module):
    def __init__(self, k, m, bias=True):
        super().__init__()
        self.fc = nn.Linear(k, m, bias=bias)

    def forward(self, x):
        return self.fc(x)


class Functional(nn.Module):
    """F.linear on the module's own parameters: the per-model weight reaches the rule as a stacked value."""

    def __init__(self, k, m):
        super().__init__()
        self.w = nn.Parameter(torch.randn(m, k) / k**0.5)
        self.b = nn.Parameter(torch.randn(m))

    def forward(self, x):
        return F.linear(x, self.w, self.b)


class MLP(nn.Module):
    def __init__(self, k=7, h=13, m=5):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(k, h), nn.Linear(h, h), nn.Linear(h, m)

    def forward(self, x):
        return self.l3(F.gelu(self.l2(torch.relu(self.l1(x)))))


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shape", [(5, 7), (2, 3, 7), (7,), (1, 7)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_linear(n, shape, bias, shared):
    models = make_models(lambda: Lin(7, 11, bias), n)
    x = torch.randn(*shape) if shared else torch.randn(n, *shape)
    fused = check_fused(models, (x,), shared=shared)
    how = choose.LINEAR_HOW["bmm"] if not shared else "wide GEMM (shared input, N weights concatenated)"
    assert fused.fusion_report.count("linear", how) == 1
    assert not fused.fusion_report.fallbacks


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_functional_linear(n, shared):
    models = make_models(lambda: Functional(6, 4), n)
    x = torch.randn(3, 6) if shared else torch.randn(n, 3, 6)
    fused = check_fused(models, (x,), shared=shared)
    assert fused.fusion_report.count("linear") == 1


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_mlp_chain(n, shared):
    models = make_models(MLP, n)
    x = torch.randn(4, 7) if shared else torch.randn(n, 4, 7)
    fused = check_fused(models, (x,), shared=shared)
    assert fused.fusion_report.count("linear") == 3


def test_shared_input_is_one_wide_gemm():
    """With a shared input the first layer is ONE GEMM on [B, K] x [K, N*M], not N copies of the input."""
    models = make_models(MLP, 4)
    fused = fusecc.fuse(models, shared_inputs=True)
    fused(torch.randn(2, 7))
    assert fused.fusion_report.count("linear", "wide GEMM (shared input, N weights concatenated)") == 1
    assert fused.fusion_report.count("linear", "batched GEMM (baddbmm / CPU small-batch kernel)") == 2
    assert "expand" not in fused.fusion_report.conversions  # the shared input was never copied N times


def test_model_independence():
    """Model i's output depends on model i's weights and input only."""
    models = make_models(MLP, 3)
    fused = fusecc.fuse(models)
    x = torch.randn(3, 4, 7)
    for j in (1, 2):  # model 1 and the last model: change its weights, then poison its input
        assert_models_independent(fused, (x,), lambda j: fused.l1.weight[j].add_(1.0), j=j)


class Bil(nn.Module):
    """nn.Bilinear, and F.bilinear on a weight the model holds (the worked example of docs/adding-an-op.md)."""

    def __init__(self, functional=False, bias=True):
        super().__init__()
        self.functional = functional
        self.bil = nn.Bilinear(5, 3, 4, bias=bias)

    def forward(self, x1, x2):
        if self.functional:
            return F.bilinear(x1, x2, self.bil.weight, self.bil.bias)
        return self.bil(x1, x2)


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("functional", [False, True], ids=["module", "functional"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_bilinear(n, functional, bias, shared):
    models = make_models(lambda: Bil(functional, bias), n)
    lead = (2, 6)
    x1 = torch.randn(*lead, 5) if shared else torch.randn(n, *lead, 5)
    x2 = torch.randn(*lead, 3) if shared else torch.randn(n, *lead, 3)
    fused = check_fused(models, (x1, x2), shared=shared, strict=True)  # strict: no loop over the models
    assert fused.fusion_report.count("bilinear", "one einsum with per-model weights") == 1
