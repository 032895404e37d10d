"""Weights every model shares are stored once and computed once (frozen trunks, heads left alone, LoRA bases).

The oracle is the N models run one by one; every test also checks what is shared, since sharing is the point."""

import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from fusecc.api import bitwise_equal
from tests.utils import assert_close

N = 4


class Net(nn.Module):
    """A small conv net: a trunk (conv, BN, conv) and a head."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(self.gn(self.conv2(x)), 2)
        return self.fc(self.pool(x).flatten(1))


def trunk_fleet(n=N, freeze=True, seed=0):
    """n models with the same trunk (a pretrained one with real BN statistics) and their own heads."""
    torch.manual_seed(seed)
    base = Net()
    with torch.no_grad():
        base.bn.running_mean.uniform_(-0.5, 0.5)
        base.bn.running_var.uniform_(0.5, 2.0)
        base.bn.weight.uniform_(0.5, 1.5)
    models = []
    for _ in range(n):
        m = copy.deepcopy(base)
        m.fc.reset_parameters()
        if freeze:
            for name, p in m.named_parameters():
                p.requires_grad_(name.startswith("fc."))
        models.append(m.eval())
    return models


def loop(models, x, shared=False):
    return torch.stack([m(x if shared else x[i]) for i, m in enumerate(models)])


@pytest.mark.parametrize("shared", [True, False])
def test_frozen_trunk_is_stored_once_and_computed_once(shared):
    models = trunk_fleet()
    fused = fusecc.fuse(models, shared_inputs=shared)
    assert set(fused.shared_tensors) == {k for k in models[0].state_dict() if not k.startswith("fc.")}
    x = torch.randn(2, 3, 8, 8) if shared else torch.randn(N, 2, 3, 8, 8)
    with torch.no_grad():
        assert_close("out", fused(x), loop(models, x, shared))
    rep = fused.fusion_report
    if shared:  # the trunk runs once: plain ops on the shared input, then one wide GEMM for the N heads
        assert rep.count("conv2d", "one conv (weight and input shared by all models)") == 2
        assert rep.count("linear", "wide GEMM (shared input, N weights concatenated)") == 1
    else:  # the trunk runs as ONE conv over the N*B batch, not N convs
        assert rep.count("conv2d", "one conv over the N*B batch (weight shared by all models)") == 2
        assert rep.count("batch_norm", "one batch_norm over the N*B batch (statistics and affine shared)") == 1
    assert rep.branch == "fc"
    text = repr(fused)
    assert "stored once" in text and "the fleet branches at 'fc'" in text
    # weights: the trunk once plus N heads, and the prototype holds no copy of its own
    wb = fused.weight_bytes()
    head = sum(t.numel() * t.element_size() for k, t in models[0].state_dict().items() if k.startswith("fc."))
    one = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
    assert wb["shared"] == one - head and wb["per_model"] == N * head
    storages = {t.untyped_storage().data_ptr() for t in list(fused.parameters()) + list(fused.buffers())}
    proto = fused._fusecc_proto
    assert all(t.untyped_storage().data_ptr() in storages for t in list(proto.parameters()) + list(proto.buffers()))


def test_sharing_is_bitwise_and_all_or_nothing():
    models = trunk_fleet(3)
    with torch.no_grad():
        models[2].conv2.weight[0, 0, 0, 0] += 1e-7 * models[2].conv2.weight[0, 0, 0, 0].sign()  # one ulp or so
        models[0].conv1.bias.zero_()
        models[1].conv1.bias.zero_()
        models[2].conv1.bias.zero_().neg_()  # -0.0: equal for torch.equal, not in its bits
        models[0].bn.weight[0] = models[1].bn.weight[0] = models[2].bn.weight[0] = float("nan")
    assert torch.equal(models[0].conv1.bias, models[2].conv1.bias)
    fused = fusecc.fuse(models)
    shared = set(fused.shared_tensors)
    assert "conv2.weight" not in shared and "conv1.bias" not in shared  # partial or sign-only equality: per model
    assert "bn.weight" in shared  # NaN with the same bits is the same value
    assert not bitwise_equal(torch.tensor([0.0]), torch.tensor([-0.0]))
    x = torch.randn(3, 2, 3, 8, 8)
    with torch.no_grad():
        out = fused(x)
    ref = loop(models, x)
    assert torch.equal(out.isnan(), ref.isnan())
    assert_close("out", out.nan_to_num(), ref.nan_to_num())


def test_share_false_stacks_everything():
    models = trunk_fleet(2)
    fused = fusecc.fuse(models, share=False)
    assert fused.shared_tensors == [] and fused.weight_bytes()["shared"] == 0
    assert all(t.shape[0] == 2 for t in fused.parameters())
    with pytest.raises(TypeError, match="share must be True or False"):
        fusecc.fuse(models, share="frozen")


def test_frozen_trunk_trains_heads_like_n_models():
    """Training a frozen-trunk fleet: the trunk stays shared, each head gets its own gradients and AdamW steps with
    its own learning rate, equal to N models trained with torch.optim.AdamW."""
    models = trunk_fleet()
    for m in models:  # BatchNorm frozen as a fine-tuner would (eval), GroupNorm too: only the heads train
        m.train()
        m.bn.eval()
    fused = fusecc.fuse(models)
    lrs = [1e-3, 3e-3, 1e-2, 3e-2]
    opt = fusecc.optim.AdamW(fused, lr=lrs, weight_decay=0.01)
    refs = [copy.deepcopy(m) for m in models]
    ref_opts = [torch.optim.AdamW([p for p in r.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
                for r, lr in zip(refs, lrs)]
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(N, 4, 3, 8, 8, generator=g)
        y = torch.randint(0, 5, (N, 4), generator=g)
        fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
        opt.step()
        opt.zero_grad()
        for i, (r, o) in enumerate(zip(refs, ref_opts)):
            F.cross_entropy(r(x[i]), y[i]).backward()
            o.step()
            o.zero_grad()
    assert "conv1.weight" in fused.shared_tensors and "bn.running_mean" in fused.shared_tensors
    for i, r in enumerate(refs):
        for k, v in r.state_dict().items():
            assert_close(f"model {i} {k}", fused.model_state_dict(i)[k], v, rtol=1e-4, atol=1e-5)


def test_trainable_equal_weights_become_per_model():
    """N copies of one checkpoint, all trainable (a hyper-parameter search from one start): equal at fuse time, so
    stored once, but trained they must be N independent models: the optimizer (or a forward with grad) gives each
    model its own copy, BatchNorm statistics in training too."""
    models = [m.train() for m in trunk_fleet(3, freeze=False)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    fused = fusecc.fuse(models)
    assert len(fused.shared_tensors) == len(models[0].state_dict())
    w = fused.conv1.weight
    opt = fusecc.optim.SGD(fused, lr=[0.1, 0.01, 0.0], momentum=0.9)
    assert fused.conv1.weight is w and w.shape == (3, 8, 3, 3, 3)  # the same Parameter, now per model
    assert fused.shared_tensors == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"]
    refs = [copy.deepcopy(m) for m in models]
    ref_opts = [torch.optim.SGD(r.parameters(), lr=lr, momentum=0.9) for r, lr in zip(refs, [0.1, 0.01, 0.0])]
    x = torch.randn(3, 4, 3, 8, 8)
    for _ in range(2):
        fused(x).square().mean(dim=(1, 2)).sum().backward()
        opt.step()
        opt.zero_grad()
        for i, (r, o) in enumerate(zip(refs, ref_opts)):
            r(x[i]).square().mean().backward()
            o.step()
            o.zero_grad()
    assert fused.shared_tensors == []  # BatchNorm in training updates each model's statistics
    for i, r in enumerate(refs):
        for k, v in r.state_dict().items():
            assert_close(f"model {i} {k}", fused.model_state_dict(i)[k], v, rtol=1e-4, atol=1e-5)


def test_forward_with_grad_unshares_trainable_weights_with_a_warning_in_eval():
    models = trunk_fleet(2, freeze=False)
    fused = fusecc.fuse(models)
    x = torch.randn(2, 1, 3, 8, 8)
    with torch.no_grad():
        fused(x)
    assert "conv1.weight" in fused.shared_tensors
    with pytest.warns(UserWarning, match="torch.no_grad"):
        out = fused(x)
    assert "conv1.weight" not in fused.shared_tensors
    out.sum().backward()
    assert fused.conv1.weight.grad.shape[0] == 2
    # each model's gradient is its own, as the models alone give them
    for i, m in enumerate(models):
        m.zero_grad()
        m(x[i]).sum().backward()
        assert_close(f"grad {i}", fused.conv1.weight.grad[i], m.conv1.weight.grad, rtol=1e-4, atol=1e-5)
    # a few equal weights (fresh BatchNorm / GroupNorm affine) are un-shared without a warning: nothing to worry about
    fresh = [Net().eval() for _ in range(2)]
    fused = fusecc.fuse(fresh)
    assert "bn.weight" in fused.shared_tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x)
    assert "bn.weight" not in fused.shared_tensors
    # frozen weights stay shared with grad enabled, and no warning
    models = trunk_fleet(2)
    fused = fusecc.fuse(models)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fused(x).sum().backward()
    assert "conv1.weight" in fused.shared_tensors


def test_optimizer_on_a_parameters_list_unshares_the_trainable_ones():
    fused = fusecc.fuse(trunk_fleet(2, freeze=False))
    w = fused.conv1.weight
    opt = fusecc.optim.Adam([{"params": [w]}, {"params": fused.fc.parameters(), "lr": 1e-2}], num_models=2)
    assert w.shape[0] == 2 and "conv1.weight" not in fused.shared_tensors and opt.param_groups[0]["params"][0] is w
    assert "conv2.weight" not in fused.shared_tensors  # every trainable one: the module is being trained
    with pytest.raises(ValueError, match="pass the FusedModule"):  # a shared tensor with no module behind it
        fusecc.optim.Adam([torch.nn.Parameter(torch.zeros(3))], num_models=2)


def test_load_model_state_dict_that_breaks_sharing_unshares():
    models = trunk_fleet()
    fused = fusecc.fuse(models)
    x = torch.randn(N, 2, 3, 8, 8)
    with torch.no_grad():
        fused(x)
    new = trunk_fleet(1, seed=5)[0]
    fused.load_model_state_dict(1, models[1].state_dict())  # the same values: nothing changes
    assert "conv1.weight" in fused.shared_tensors
    fused.load_model_state_dict(2, new.state_dict())
    assert "conv1.weight" not in fused.shared_tensors and "bn.running_var" not in fused.shared_tensors
    models[2] = new
    with torch.no_grad():
        assert_close("out", fused(x), loop(models, x))
    for i, m in enumerate(models):
        for k, v in m.state_dict().items():
            assert torch.equal(fused.model_state_dict(i)[k], v), (i, k)


def test_state_dict_has_a_leading_n_and_loads_across_sharing():
    models = trunk_fleet()
    fused = fusecc.fuse(models)
    sd = fused.state_dict()
    for k, v in models[0].state_dict().items():
        assert sd[k].shape == (N,) + v.shape, k
    buf = io.BytesIO()
    torch.save(sd, buf)
    one = sum(t.numel() * t.element_size() for t in models[0].state_dict().values())
    assert buf.tell() < 1.5 * one + 4 * 8 * 33 * 4 + 20000  # the trunk written once, not N times
    buf.seek(0)
    # into a fleet that stacks everything, and back into a sharing one from a stacked state dict
    other = fusecc.fuse(trunk_fleet(seed=3), share=False)
    other.load_state_dict(torch.load(buf, weights_only=True))
    x = torch.randn(N, 2, 3, 8, 8)
    with torch.no_grad():
        assert_close("stacked <- shared", other(x), loop(models, x))
    again = fusecc.fuse(trunk_fleet(seed=7))
    again.load_state_dict(other.state_dict())
    assert set(again.shared_tensors) == set(fused.shared_tensors)
    # a stacked state dict whose slices differ un-shares what differs
    mixed = fusecc.fuse(trunk_fleet(seed=7))
    sd = fused.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"].clone()
    sd["conv1.weight"][3] += 1.0
    mixed.load_state_dict(sd)
    assert "conv1.weight" not in mixed.shared_tensors
    with torch.no_grad():
        models[3].conv1.weight += 1.0
        assert_close("mixed", mixed(x), loop(models, x))


def test_unfuse_select_and_isolation():
    models = trunk_fleet()
    snapshot = [copy.deepcopy(m.state_dict()) for m in models]
    fused = fusecc.fuse(models)
    with torch.no_grad():
        fused.conv1.weight.mul_(1.0)  # the fused module holds its own copy: the user's models are never touched
        fused.conv1.weight.add_(0.5)
    for m, s in zip(models, snapshot):
        assert all(torch.equal(m.state_dict()[k], v) for k, v in s.items())
    with torch.no_grad():
        fused.conv1.weight.sub_(0.5)
    back = fused.unfuse()
    x = torch.randn(N, 2, 3, 8, 8)
    with torch.no_grad():
        assert_close("unfuse", loop(back, x), loop(models, x), rtol=0, atol=1e-6)
    assert back[0].conv1.weight.data_ptr() != back[1].conv1.weight.data_ptr()  # independent models
    sub = fused.select([3, 1])
    assert "conv1.weight" in sub.shared_tensors and sub.num_models == 2
    with torch.no_grad():
        assert_close("select", sub(x[[3, 1]]), loop([models[3], models[1]], x[[3, 1]]), rtol=0, atol=1e-6)
        # a NaN in one model's head changes nothing in the others
        fused.fc.weight[2] = float("nan")
        out = fused(x)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


class Counter(nn.Module):
    """A model that writes a buffer in place from its input: equal at fuse time, it must become per model."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.register_buffer("seen", torch.zeros(3))

    def forward(self, x):
        self.seen.add_(x.sum(0))
        return self.lin(x) + self.seen


def test_buffer_written_in_place_becomes_per_model():
    torch.manual_seed(0)
    base = Counter().eval()
    models = [copy.deepcopy(base) for _ in range(3)]
    fused = fusecc.fuse(models)
    assert "seen" in fused.shared_tensors and "lin.weight" in fused.shared_tensors
    x = torch.randn(3, 2, 3)
    with torch.no_grad():
        out = fused(x)
    assert "seen" not in fused.shared_tensors and "lin.weight" in fused.shared_tensors
    with torch.no_grad():
        assert_close("out", out, loop(models, x))
    for i, m in enumerate(models):
        assert torch.equal(fused.model_state_dict(i)["seen"], m.seen)


class Attn(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(self.mha(x, x, x, need_weights=False)[0])


def test_module_without_a_shared_rule_runs_once_on_shared_inputs():
    torch.manual_seed(0)
    base = Attn().eval()
    models = [copy.deepcopy(base) for _ in range(3)]
    for m in models:
        m.head.reset_parameters()
    fused = fusecc.fuse(models, shared_inputs=True)
    x = torch.randn(2, 5, 8)
    with torch.no_grad():
        assert_close("out", fused(x), loop(models, x, shared=True))
    assert fused.fusion_report.count("shared module") == 1
    assert fused.fusion_report.count("linear", "wide GEMM (shared input, N weights concatenated)") == 1


def test_torchscript_export_of_a_shared_fleet(tmp_path):
    models = trunk_fleet()
    fused = fusecc.fuse(models)
    x = torch.randn(N, 2, 3, 8, 8)
    path = str(tmp_path / "fleet.pt")
    fusecc.export(fused, (x,), path, format="torchscript")
    loaded = torch.jit.load(path)
    with torch.no_grad():
        assert_close("torchscript", loaded(x), loop(models, x))


class Stats(nn.Module):
    """Outputs computed from shared buffers alone (a tuple), next to per-model ones."""

    def __init__(self):
        super().__init__()
        self.register_buffer("ref", torch.arange(6.0))
        self.lin = nn.Linear(6, 2)

    def forward(self, x):
        return torch.std_mean(self.ref), self.lin(x)


def test_outputs_computed_from_shared_weights_alone_get_the_model_dim():
    torch.manual_seed(0)
    models = [Stats() for _ in range(3)]
    fused = fusecc.fuse(models)
    assert "ref" in fused.shared_tensors and "lin.weight" not in fused.shared_tensors
    x = torch.randn(3, 2, 6)
    with torch.no_grad():
        (std, mean), y = fused(x)
    assert std.shape == (3,) and mean.shape == (3,)
    for i, m in enumerate(models):
        (s, mu), yy = m(x[i])
        assert torch.equal(std[i], s) and torch.equal(mean[i], mu)
        assert_close("y", y[i], yy)
