"""Bad input is rejected up front with a message that names the culprit."""

import pytest
import torch
import torch.nn as nn

import fusecc
from tests.utils import make_models


class Net(nn.Module):
    def __init__(self, width=4, p=0.1):
        super().__init__()
        self.fc = nn.Linear(3, width)
        self.drop = nn.Dropout(p)
        self.out = nn.Linear(width, 2)

    def forward(self, x):
        return self.out(self.drop(self.fc(x)))


class Other(Net):
    pass


def test_empty_list():
    with pytest.raises(fusecc.FusionError, match="empty list"):
        fusecc.fuse([])


def test_not_modules():
    with pytest.raises(TypeError, match="model 1 is a str"):
        fusecc.fuse([Net(), "net"])
    with pytest.raises(TypeError, match="sequence of models"):
        fusecc.fuse(Net())


def test_different_class():
    with pytest.raises(fusecc.FusionError, match="model 2 is a Other, model 0 is a Net"):
        fusecc.fuse([Net(), Net(), Other()])


def test_parameter_shape_names_model_and_qualname():
    with pytest.raises(fusecc.FusionError, match=r"model 3: parameter 'fc.weight' has shape \[5, 3\], model 0 has \[4, 3\]"):
        fusecc.fuse([Net(), Net(), Net(), Net(width=5)])


def test_parameter_dtype_device_requires_grad():
    m = Net().double()
    with pytest.raises(fusecc.FusionError, match="model 1: parameter 'fc.weight' has dtype torch.float64"):
        fusecc.fuse([Net(), m])
    m = Net().to("meta")
    with pytest.raises(fusecc.FusionError, match="model 1: parameter 'fc.weight' is on meta"):
        fusecc.fuse([Net(), m])
    m = Net()
    m.out.bias.requires_grad_(False)
    with pytest.raises(fusecc.FusionError, match="model 1: parameter 'out.bias' has requires_grad=False"):
        fusecc.fuse([Net(), m])


def test_missing_or_extra_parameter():
    m = Net()
    m.extra = nn.Parameter(torch.zeros(1))
    with pytest.raises(fusecc.FusionError, match="model 1 has parameter 'extra' that model 0 lacks"):
        fusecc.fuse([Net(), m])
    with pytest.raises(fusecc.FusionError, match="model 1 lacks parameter 'extra' that model 0 has"):
        fusecc.fuse([m, Net()])


def test_train_eval_mode_differs():
    with pytest.raises(fusecc.FusionError, match="model 1: module '<root>' is in eval mode"):
        fusecc.fuse([Net().train(), Net().eval()])
    a, b = Net(), Net()
    b.drop.eval()
    with pytest.raises(fusecc.FusionError, match="module 'drop' is in eval mode"):
        fusecc.fuse([a, b])


def test_configuration_differs():
    with pytest.raises(fusecc.FusionError, match="model 1: module 'drop' has p=0.5, model 0 has p=0.1"):
        fusecc.fuse([Net(), Net(p=0.5)])


def test_forward_hooks_rejected():
    m = Net()
    m.fc.register_forward_hook(lambda *a: None)
    with pytest.raises(fusecc.FusionError, match="module 'fc' has forward hooks"):
        fusecc.fuse([m, Net()])


def test_wrong_leading_dim():
    fused = fusecc.fuse(make_models(Net, 3))
    with pytest.raises(ValueError, match=r"argument 'x'.*leading model dim of size 3.*got shape \[2, 5, 3\]"):
        fused(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="shared_inputs=True"):
        fused(torch.randn(5, 3))


def test_wrong_number_of_arguments():
    fused = fusecc.fuse(make_models(Net, 2))
    with pytest.raises(ValueError, match=r"takes the arguments of Net.forward \['x'\]"):
        fused(torch.randn(2, 1, 3), torch.randn(2, 1, 3))
    with pytest.raises(ValueError, match="missing a required argument"):
        fused()


def test_input_on_another_device():
    fused = fusecc.fuse(make_models(Net, 2))
    with pytest.raises(ValueError, match="argument 'x' is on meta, the fused model is on cpu"):
        fused(torch.randn(2, 1, 3, device="meta"))


def test_bad_per_model_input_shape_names_node():
    fused = fusecc.fuse(make_models(Net, 2))
    with pytest.raises(ValueError, match="failed at node 'fc'"):
        fused(torch.randn(2, 1, 7))


def test_shared_inputs_unknown_name():
    with pytest.raises(ValueError, match=r"shared_inputs names \['y'\]"):
        fusecc.fuse(make_models(Net, 2), shared_inputs=["y"])


def test_bad_input_shape_is_a_fusion_input_error_with_no_log_noise(capfd):
    """A wrong per-model shape fails in shape propagation: one exception that is both a FusionError (the compile
    failed) and a ValueError (the call's arguments are at fault), and nothing logged on stderr before it."""
    fused = fusecc.fuse(make_models(Net, 2))
    with pytest.raises(fusecc.FusionError) as e:
        fused(torch.randn(2, 1, 7))
    assert isinstance(e.value, ValueError)
    assert "Traceback" not in capfd.readouterr().err


def test_one_sequential_model_is_not_a_list_of_models():
    with pytest.raises(TypeError, match=r"got one nn.Sequential model \(3 layers: Linear, ReLU, Linear\)"):
        fusecc.fuse(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    fused = fusecc.fuse(nn.Sequential(Net(), Net()))  # a Sequential of models is a sequence of models
    assert fused.num_models == 2
