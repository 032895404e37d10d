"""FusedModule behaves like an nn.Module: structure of outputs, state_dict, devices/dtypes, modes, models in/out."""

import copy
import io

import pytest
import torch
import torch.nn as nn

import fusecc
from tests.utils import assert_close, check_fused, make_models, run_each


class MultiIO(nn.Module):
    """Two inputs (one optional), a flag, and a nested output structure with a non-tensor leaf."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)

    def forward(self, x, y=None, double=False):
        h = self.a(x)
        if y is not None:
            h = h + self.b(y)
        if double:
            h = h * 2
        return {"h": h, "pair": (h.sum(-1), [h.amax(-1)]), "n": 3}


@pytest.mark.parametrize("n", [1, 3])
def test_nested_outputs_and_optional_inputs(n):
    models = make_models(MultiIO, n)
    x, y = torch.randn(n, 2, 4), torch.randn(n, 2, 4)
    check_fused(models, (x,))
    check_fused(models, (x, y))
    check_fused(models, (x, y, True))


def test_constant_arguments_recompile_once_per_value():
    models = make_models(MultiIO, 2)
    fused = fusecc.fuse(models)
    x = torch.randn(2, 5, 4)
    for flag in (False, True, False, True):
        assert_close("h", fused(x, None, flag)["h"], run_each(models, (x, None, flag))["h"])
    assert len(fused._fusecc_compiled) == 2


def test_batch_size_change_reuses_the_compile():
    models = make_models(MultiIO, 2)
    fused = fusecc.fuse(models)
    for b in (2, 5, 3):
        x = torch.randn(2, b, 4)
        assert_close("h", fused(x)["h"], run_each(models, (x,))["h"])
    assert len(fused._fusecc_compiled) == 1


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.*deprecated:FutureWarning")
@pytest.mark.parametrize("called_first", [False, True], ids=["fresh", "compiled"])
def test_torch_jit_trace_of_the_fused_module(called_first):
    """torch.jit.trace(fused, x) directly (fusecc.export is the documented way): it crashed torch's tracer
    (segfault) when the traced input sizes went into the compile key and fusecc compiled under the tracer."""
    models = [nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval() for _ in range(2)]
    fused = fusecc.fuse(models)
    x = torch.randn(2, 4, 6)
    if called_first:
        fused(x)
    with torch.no_grad():
        traced = torch.jit.trace(fused, (x,), check_trace=False)
    assert len(fused._fusecc_compiled) == 1
    x2 = torch.randn(2, 4, 6)
    assert_close("traced", traced(x2), run_each(models, (x2,)))


def test_mixed_shared_and_per_model_inputs():
    models = make_models(MultiIO, 3)
    fused = fusecc.fuse(models, shared_inputs=["y"])
    x, y = torch.randn(3, 2, 4), torch.randn(2, 4)
    ref = torch.stack([m(xi, y)["h"] for m, xi in zip(models, x)])
    assert_close("h", fused(x, y)["h"], ref)


def test_shared_output_gets_model_dim():
    class Echo(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x), x * 2

    models = make_models(Echo, 3)
    out = fusecc.fuse(models, shared_inputs=True)(torch.ones(4, 2))
    assert out[1].shape == (3, 4, 2) and torch.all(out[1] == 2)


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 4 * 4, 5))

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))))


def test_state_dict_names_and_shapes():
    models = make_models(Small, 3)
    fused = fusecc.fuse(models)
    sd = fused.state_dict()
    ref = models[0].state_dict()
    assert list(sd) == list(ref)
    for k, v in ref.items():
        assert sd[k].shape == (3,) + v.shape, k
        assert torch.equal(sd[k][2], models[2].state_dict()[k])


def test_save_load_weights_only_roundtrip():
    models = make_models(Small, 3)
    fused = fusecc.fuse(models).eval()
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    other = fusecc.fuse(make_models(Small, 3)).eval()
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(3, 2, 3, 6, 6)
    assert torch.equal(other(x), fused(x))


def test_model_state_dict_loads_into_original_architecture():
    models = [m.eval() for m in make_models(Small, 3)]
    fused = fusecc.fuse(models)
    x = torch.randn(2, 3, 6, 6)
    for i in range(3):
        m = Small().eval()
        m.load_state_dict(fused.model_state_dict(i))
        assert torch.equal(m(x), models[i](x))
    with pytest.raises(IndexError, match="model index 3 out of range for 3 models"):
        fused.model_state_dict(3)


def test_load_model_state_dict_and_unfuse():
    models = [m.eval() for m in make_models(Small, 3)]
    fused = fusecc.fuse(models)
    new = Small().eval()
    fused.load_model_state_dict(1, new.state_dict())
    back = fused.unfuse()
    assert [type(m) for m in back] == [Small] * 3
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(back[1](x), new(x))
    assert torch.equal(back[2](x), models[2](x))
    assert not back[0].training
    with pytest.raises(KeyError, match="missing keys"):
        fused.load_model_state_dict(0, {"conv.weight": new.conv.weight})
    bad = dict(new.state_dict())
    bad["conv.weight"] = torch.zeros(4, 3, 5, 5)
    with pytest.raises(ValueError, match=r"'conv.weight' has shape \[4, 3, 5, 5\], the model expects \[4, 3, 3, 3\]"):
        fused.load_model_state_dict(0, bad)


def test_dtype_conversions_and_eval_train_switch():
    models = [m.eval() for m in make_models(Small, 2)]
    fused = fusecc.fuse(models)
    x = torch.randn(2, 2, 3, 6, 6)
    fused.double()
    ref = torch.stack([copy.deepcopy(m).double()(xi.double()) for m, xi in zip(models, x)])
    assert_close("double", fused(x.double()), ref, torch.float64)
    fused.float().train()
    y_train = fused(x)
    ref_train = torch.stack([copy.deepcopy(m).train()(xi) for m, xi in zip(models, x)])
    assert_close("train", y_train, ref_train, rtol=1e-4, atol=1e-5)
    fused.eval()
    assert not fused.bn.training


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 4)
            self.out = nn.Linear(4, 7, bias=False)
            self.out.weight = self.emb.weight

        def forward(self, idx):
            return self.out(self.emb(idx))

    models = make_models(Tied, 3)
    fused = check_fused(models, (torch.randint(0, 7, (3, 2, 5)),))
    assert len(list(fused.parameters())) == 1
    back = fused.unfuse()
    assert back[0].out.weight is back[0].emb.weight
    assert set(fused.model_state_dict(0)) == set(models[0].state_dict())


def test_plain_tensor_attributes_shared_and_per_model():
    class Scaled(nn.Module):
        def __init__(self, s):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.scale = torch.full((3,), float(s))  # a plain attribute, neither parameter nor buffer
            self.offset = torch.ones(3)

        def forward(self, x):
            return self.fc(x) * self.scale + self.offset

    models = [Scaled(i + 1) for i in range(3)]
    fused = check_fused(models, (torch.randn(3, 2, 3),))
    assert fused._fusecc_constants["scale"][1] is True  # differs between models: stacked
    assert fused._fusecc_constants["offset"][1] is False  # the same in every model: shared


def test_repr_reports_what_was_fused():
    fused = fusecc.fuse(make_models(Small, 2))
    assert "not compiled yet" in repr(fused)
    fused(torch.randn(2, 1, 3, 6, 6))
    text = repr(fused)
    assert "Small x 2 models" in text
    assert "grouped conv, channels-last" in text and "batched GEMM" in text and "fallbacks: none" in text


def test_example_inputs_compile_at_fuse_time_and_deepcopy():
    models = make_models(Small, 2)
    fused = fusecc.fuse(models, example_inputs=torch.randn(2, 1, 3, 6, 6))
    assert fused.fusion_report is not None and fused.fusion_report.count("conv2d") == 1
    clone = copy.deepcopy(fused)
    x = torch.randn(2, 3, 3, 6, 6)
    assert torch.equal(clone(x), fused(x))
    with torch.no_grad():
        clone.conv.weight.zero_()
    assert not torch.equal(clone(x), fused(x))  # the copy owns its weights


def test_half_precision():
    models = [m.eval() for m in make_models(Small, 2)]
    fused = fusecc.fuse(models).half()
    x = torch.randn(2, 2, 3, 6, 6)
    ref = torch.stack([copy.deepcopy(m).half()(xi.half()) for m, xi in zip(models, x)])
    assert_close("half", fused(x.half()), ref, torch.float16, rtol=1e-2, atol=1e-2)
