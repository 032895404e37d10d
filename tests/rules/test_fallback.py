"""Modules with no rule run as a loop over the N models inside the fused graph, with a warning naming them."""

import pytest
import torch
import torch.nn as nn

import fusecc
from tests.utils import check_fused, make_models


class RNNNet(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.rnn = cell(6, 7, batch_first=True)
        self.head = nn.Linear(7, 3)

    def forward(self, x):
        out, _ = self.rnn(self.fc(x))
        return self.head(out[:, -1])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM], ids=["gru", "lstm"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_rnn_runs_as_loop(n, cell, shared):
    models = make_models(lambda: RNNNet(cell), n)
    x = torch.randn(2, 4, 5) if shared else torch.randn(n, 2, 4, 5)
    with pytest.warns(UserWarning, match=rf"module 'rnn' \({cell.__name__}\) is not fused"):
        fused = check_fused(models, (x,), shared=shared)
    rep = fused.fusion_report
    assert [q for q, _, _ in rep.fallbacks] == ["rnn"]
    assert rep.count("linear") == 2  # the layers around it are still fused
    assert "rnn" in str(fused) and "loop over the N models" in str(fused)


class Gate(nn.Module):
    """A user module with data-dependent control flow: untraceable unless it is a leaf."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4) * 2)

    def forward(self, x):
        if x.mean() > 0:
            return x * self.scale
        return x - self.scale


class GateNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.gate = Gate()

    def forward(self, x):
        return self.gate(self.fc(x))


def test_untraceable_model_error_names_line_and_hint():
    with pytest.raises(fusecc.FusionError) as e:
        fusecc.fuse(make_models(GateNet, 2))(torch.randn(2, 3, 3))
    msg = str(e.value)
    assert "cannot trace GateNet" in msg and "test_fallback.py" in msg and "if x.mean() > 0" in msg
    assert "leaf_modules" in msg


@pytest.mark.parametrize("leaf", [Gate, "gate"], ids=["by-type", "by-name"])
def test_leaf_module_with_control_flow_runs_per_model(leaf):
    models = make_models(GateNet, 3)
    with torch.no_grad():  # make the branch differ between models
        models[1].fc.bias.fill_(-10)
        models[0].fc.bias.fill_(10)
    with pytest.warns(UserWarning, match="module 'gate' \\(Gate\\) is not fused"):
        check_fused(models, (torch.randn(3, 2, 3),), leaf_modules=[leaf])


class FFT(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return torch.fft.rfft(self.fc(x)).abs()


def test_function_without_rule_runs_under_vmap_with_warning():
    models = make_models(FFT, 3)
    with pytest.warns(UserWarning, match=r"node 'fft_rfft'.*has no rule.*runs under torch.vmap"):
        fused = check_fused(models, (torch.randn(3, 2, 4),))
    assert fused.fusion_report.fallbacks == [("fft_rfft", "fft_rfft", "torch.vmap")]


def test_function_vmap_cannot_run_error_names_node_op_and_line():
    class NZ(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.nonzero(self.fc(x) > 0).float().sum()

    with pytest.raises(fusecc.FusionError) as e:
        fusecc.fuse(make_models(NZ, 2))(torch.randn(2, 3, 4))
    msg = str(e.value)
    assert "node 'nonzero'" in msg and "torch.vmap cannot run it" in msg
    assert "torch.nonzero(self.fc(x) > 0)" in msg  # the source line
    assert "leaf_modules" in msg and "Registered: modules" in msg and "Linear" in msg


def test_function_on_shared_values_needs_no_rule():
    class Pos(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            pos = torch.fft.fft(torch.arange(x.size(1), dtype=x.dtype)).abs()
            return self.fc(x) + pos.unsqueeze(-1)

    check_fused(make_models(Pos, 3), (torch.randn(3, 2, 4, 4),))


def test_strict_makes_a_fallback_loop_an_error():
    models = make_models(lambda: RNNNet(nn.GRU), 2)
    fused = fusecc.fuse(models, strict=True)
    with pytest.raises(fusecc.FusionError, match=r"node 'rnn'.*module 'rnn' \(GRU\) is not fused.*strict=True"):
        fused(torch.randn(2, 2, 4, 5))


def test_strict_makes_a_vmap_fallback_an_error():
    fused = fusecc.fuse(make_models(FFT, 3), strict=True)
    with pytest.raises(fusecc.FusionError, match=r"node 'fft_rfft'.*strict=True"):
        fused(torch.randn(3, 2, 4))
