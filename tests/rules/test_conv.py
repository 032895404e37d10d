"""Conv1d/2d/3d and ConvTranspose1d/2d: grouped conv over N*C channels (or one wide conv for a shared input)."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from fusecc import choose
from tests.rules._layouts import Fn
from tests.utils import assert_models_independent, check_fused, make_models

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
SPATIAL = {1: (11,), 2: (7, 5), 3: (5, 4, 3)}

CASES = [  # (kwargs, id)
    (dict(), "plain"),
    (dict(stride=2, padding=1), "s2p1"),
    (dict(dilation=2, padding=2), "dil2"),
    (dict(groups=2), "g2"),
    (dict(groups=6), "depthwise"),
    (dict(padding="same"), "same"),
    (dict(padding=1, padding_mode="reflect"), "reflect"),
    (dict(padding=1, padding_mode="replicate"), "replicate"),
    (dict(padding=1, padding_mode="circular"), "circular"),
    (dict(bias=False), "nobias"),
]


@pytest.mark.parametrize("n,nd", [(1, 1), (3, 1), (8, 1), (1, 2), (3, 2), (8, 2), (1, 3), (3, 3)],
                         ids=lambda v: str(v))
@pytest.mark.parametrize("kw", [c for c, _ in CASES], ids=[i for _, i in CASES])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_conv(n, nd, kw, shared):
    models = make_models(lambda: Fn(CONV[nd](6, 6, 3, **kw)), n)
    shape = (2, 6) + SPATIAL[nd]
    x = torch.randn(*shape) if shared else torch.randn(n, *shape)
    fused = check_fused(models, (x,), shared=shared)
    rep = fused.fusion_report
    if shared and kw.get("groups", 1) == 1:
        assert rep.count(f"conv{nd}d", "wide conv (shared input, N*Cout output channels)") == 1
    elif nd == 2:  # a 2d conv of per-model inputs: lowered as fusecc/choose.py's CPU rule picks
        assert rep.count("conv2d") == 1
        assert rep.count("conv2d", choose.CONV_HOW[_rule_pick(n, shape, models[0].fn)]) == 1
    else:
        assert rep.count(f"conv{nd}d", "grouped conv (groups = N*g)") == 1
    assert not rep.fallbacks


def _rule_pick(n, shape, conv):
    return choose.conv_rule(torch.device("cpu"), (shape[0], n * shape[1]) + tuple(shape[2:]),
                            (n,) + tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation, 2,
                            conv.groups * n)


@pytest.mark.parametrize("n", [1, 3])
def test_unbatched_conv(n):
    models = make_models(lambda: Fn(nn.Conv2d(3, 4, 3, padding=1)), n)
    check_fused(models, (torch.randn(n, 3, 6, 5),))


class ConvChain(nn.Module):
    """conv -> bias-free conv -> functional conv with the module's own parameters, with odd channel counts."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 5, 3, stride=2)
        self.c2 = nn.Conv2d(5, 7, 1, bias=False)
        self.w = nn.Parameter(torch.randn(4, 7, 3, 3) * 0.1)
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x):
        y = self.c2(torch.relu(self.c1(x)))
        return F.conv2d(y, self.w, self.b, padding=1)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_conv_chain_stays_folded(n, shared):
    models = make_models(ConvChain, n)
    x = torch.randn(2, 3, 9, 9) if shared else torch.randn(n, 2, 3, 9, 9)
    fused = check_fused(models, (x,), shared=shared)
    assert fused.fusion_report.count("conv2d") == 3
    conv = fused.fusion_report.conversions
    # only the input (per-model) and the output change layout: the chain itself needs no copies
    assert conv.get("fold", 0) == (0 if shared else 1)
    assert conv.get("repeat", 0) == 0


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("nd,kw", [
    (1, dict()), (2, dict()), (2, dict(stride=2, padding=1, output_padding=1)), (2, dict(groups=3)),
    (1, dict(dilation=2, bias=False)),
], ids=["1d", "2d", "2d-s2-op1", "2d-g3", "1d-dil2-nobias"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_conv_transpose(n, nd, kw, shared):
    cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d}[nd]
    models = make_models(lambda: Fn(cls(6, 3, 3, **kw)), n)
    shape = (2, 6) + SPATIAL[nd]
    x = torch.randn(*shape) if shared else torch.randn(n, *shape)
    fused = check_fused(models, (x,), shared=shared)
    assert fused.fusion_report.count(f"conv_transpose{nd}d") == 1


def test_conv_model_independence():
    models = make_models(ConvChain, 3)
    fused = fusecc.fuse(models)
    x = torch.randn(3, 2, 3, 9, 9)
    for j in (2, 0):  # the last and the first model: change its weights, then poison its input
        assert_models_independent(fused, (x,), lambda j: fused.c1.weight[j].mul_(-1), j=j)
