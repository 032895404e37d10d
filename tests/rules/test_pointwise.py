"""Element-wise ops on fused values: arithmetic and comparisons (per-model x per-model, x Python scalar, x shared
tensor), broadcasting between different ranks, where / masked_fill / clamp, in-place ops, every activation module of
``torch.nn.modules.activation`` (but MultiheadAttention) and its functional form, dtype casts.

Each op runs on the output of a real per-model layer (``_layouts.py``: Linear -> stacked or folded last dim,
Conv2d -> folded channels, Conv2d + transpose -> stacked at a non-leading dim). Related ops are grouped into one
model returning a tuple.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.rules._layouts import MODES, PRE_N, PRE_N8, PRE_N_2, Mod, const_like, even_dim, make_input, run
from tests.utils import assert_models_independent, check_fused, make_models

# ------------------------------------------------------------------------------------------------ op table


def _inplace_methods(h):
    y = h * 1
    y.add_(h.flip(1))
    y.mul_(2)
    y.sub_(0.5)
    y.clamp_(-1.5, 1.5)
    y.masked_fill_(y > 1.2, 1.2)
    y.sigmoid_()
    z = h * 1  # in place with lower-rank / size-1 per-model operands
    z.add_(h.mean((0, 1)))
    z.mul_(h[..., :1] * 1)  # (a copy: h itself is modified in place below, and mul_'s backward needs it)
    w = h * 1  # augmented assignment
    w += 1
    w *= h.flip(-1)
    w -= h.mean(0)
    w /= 2
    h.mul_(2)  # in place on the layer's own output
    h.add_(1)
    return y, z, w, h


def _inplace_functional(h):
    return (F.relu(h * 1, inplace=True), torch.relu_(h * 1), F.leaky_relu(h * 1, 0.2, inplace=True),
            F.hardtanh(h * 1, inplace=True), F.elu(h * 1, inplace=True), F.threshold(h * 1, 0.1, 2.0, inplace=True))


class InplaceModules(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.first = nn.ReLU(inplace=True)  # conv/linear backward does not need its output: in place is fine
        self.more = nn.ModuleList([nn.LeakyReLU(0.1, inplace=True), nn.Hardtanh(-0.5, 0.5, inplace=True),
                                   nn.ELU(inplace=True), nn.SiLU(inplace=True), nn.Hardswish(inplace=True),
                                   nn.ReLU6(inplace=True), nn.Hardsigmoid(inplace=True), nn.Mish(inplace=True),
                                   nn.SELU(inplace=True), nn.CELU(inplace=True), nn.Threshold(0.1, 2.0, True)])

    def forward(self, h):
        outs = [m(h * 1.5) for m in self.more]  # each on its own copy (chained in-place activations are an
        outs.append(self.first(h))              # autograd error in eager PyTorch too)
        return tuple(outs)


class SharedConst(nn.Module):
    """Element-wise ops between the per-model activation and tensors that are the same in every model: plain tensor
    attributes (shared), and a registered buffer (stacked, equal in every model)."""

    def __init__(self, shape):
        super().__init__()
        c = shape[1]
        self.c_last = const_like((shape[-1],))
        self.c_full = const_like(shape, -0.5, 0.5)
        self.c_ch = const_like((c, 1, 1), 0.5, 2.0)  # varies along dim 1: the dim a conv folds the model dim into
        self.c_lead = const_like((shape[0], 1, 1, 1), 1.0, 2.0)  # varies along the batch dim
        self.mask_last = torch.arange(shape[-1]) % 3 == 0
        self.c64 = torch.zeros((), dtype=torch.float64)
        self.register_buffer("buf", const_like((c, 1, 1), -1.0, 1.0))

    def forward(self, h):
        return (h + self.c_last, h * self.c_full, h + self.c_ch, self.c_full - h, h * self.c_lead,
                torch.where(h > 0, h, self.c_full), torch.where(self.mask_last, h, 0.0),
                h.masked_fill(self.mask_last, -1.0), torch.maximum(h, self.c_full), h * self.buf + self.buf,
                torch.addcmul(self.c_ch, h, self.c_ch), h.type_as(self.c64))


class HigherRankShared(nn.Module):
    """A shared operand of higher rank than the per-model one: the result gets new leading per-model dims."""

    def __init__(self, shape):
        super().__init__()
        self.grid = const_like((3, 1, 1, 1, 1), 0.5, 1.5)
        self.grid6 = const_like((2, 1, 1, 1, 1, shape[-1]))
        self.grid_mask = self.grid > 1

    def forward(self, h):
        return h * self.grid, self.grid6 + h, torch.where(self.grid_mask, h, -h)


class Params(nn.Module):
    """Per-model parameters used directly in forward (not through a module with a rule)."""

    def __init__(self, shape):
        super().__init__()
        c, r = shape[1], shape[-1]
        self.scale = nn.Parameter(torch.randn(r))
        self.g = nn.Parameter(torch.randn(c, 1, 1))
        self.b = nn.Parameter(torch.randn(c, 1, 1))
        self.p4 = nn.Parameter(torch.randn(1, c, 1, r))
        self.alpha = nn.Parameter(torch.randn(()))
        self.full = nn.Parameter(torch.randn(shape[1:]))

    def forward(self, h):
        return (h * self.scale, h * self.g + self.b, h + self.p4, h * self.alpha, self.alpha * h.sum(),
                torch.addcmul(self.b, h, self.g), self.full - h, torch.where(h > 0, self.full, self.scale),
                h.clamp(min=self.b), torch.lerp(h, self.full, self.alpha.sigmoid()), self.scale * self.alpha + h)


class PReluFn(nn.Module):
    """F.prelu with a per-model weight parameter (C slopes, and one slope)."""

    def __init__(self, shape):
        super().__init__()
        self.w = nn.Parameter(torch.rand(shape[1]))
        self.w1 = nn.Parameter(torch.rand(1))

    def forward(self, h):
        return F.prelu(h, self.w), F.prelu(h, self.w1), torch.prelu(h, self.w)


OPS = {
    # --- arithmetic
    "arith_per_model": lambda h: (h + h.flip(-1), (h - h.flip(1)) * h / (h.abs() + 1),
                                  torch.add(h, h.flip(0), alpha=0.5), torch.sub(h, h * 2), torch.mul(h, h),
                                  torch.div(h, h.abs() + 1), (h.abs() + 0.5) ** h.flip(1)),
    "arith_scalar": lambda h: (h * 3 + 2, 3 * h - 2, h / 4, 1 - h, 2 / (h.abs() + 1), h ** 2, 2 ** h, -h, abs(h),
                               h.detach() // 0.3, h % 0.7, torch.add(h, 1.5, alpha=2), h.pow(3),
                               torch.true_divide(h, 3)),
    "comparisons": lambda h: (h > h.flip(-1), h >= 0, (h < 0.1) == (h.flip(1) > 0), h != h.flip(0), torch.eq(h, h),
                              torch.logical_and(h > 0, h.flip(1) < 0), ~(h > 0), (h > 0) & (h.flip(-1) > 0),
                              (h > 0) | (h < -1), (h > 0) ^ (h.flip(1) > 0), h.lt(0.2), torch.isfinite(h),
                              (h > 0) & (h[:, :1] > 0), (h > 0) | (h.mean(0) > 0), (h < 0) ^ (h.mean(0) < 0)),
    "unary_math": lambda h: (h.exp(), h.sigmoid(), h.tanh(), (h.abs() + 1).log(), (h.abs() + 0.1).sqrt(),
                             torch.rsqrt(h.abs() + 1), h.sin(), torch.erf(h), h.sign(), h.floor(), h.round(),
                             torch.atan2(h, h.flip(1).abs() + 1), torch.maximum(h, h.flip(1)),
                             torch.lerp(h, h.flip(1), 0.3),
                             torch.addcmul(h, h, h.flip(2), value=0.3), h.square(), (h.abs() + 1).reciprocal()),
    "where_masked_fill": lambda h: (torch.where(h > 0, h, h.flip(1)), torch.where(h > 0, h, 0.0), h.where(h > 0, -h),
                                    h.masked_fill(h < 0, 0.5), torch.masked_fill(h, h > 1, -1.0),
                                    torch.where(h > 0, 1.0, h)),
    "clamp": lambda h: (h.clamp(-0.5, 0.5), torch.clamp(h, min=0), h.clamp(min=h.flip(1)), h.clip(max=0.2),
                        h.clamp_min(0.1), torch.clamp(h, h.flip(1) - 1, h.flip(1) + 1), h.clamp_max(0.3)),
    # --- broadcasting between per-model tensors of different ranks / size-1 dims
    "broadcast_ranks": lambda h: (h + h.mean((0, 1)), h * h.mean((0, 1, 2)), h - h[..., :1],
                                  h - h.mean(-1, keepdim=True), h.mean((0, 1)) + h, h[:, :1] * h, h.mean(0) - h,
                                  torch.where(h > 0, h.mean(0), h), h / (h.abs().mean() + 1),
                                  h.amax(1, keepdim=True) - h),
    "broadcast_new_leading_dims": lambda h: (h.unsqueeze(0) * h.mean(0), h.mean((0, 1)) + h.unsqueeze(1)),
    "broadcast_higher_rank_shared": Mod(HigherRankShared),
    # --- shared tensors
    "shared_const_and_buffer": Mod(SharedConst),
    "shared_computed": lambda h: (h * torch.arange(h.shape[-1]), h + torch.ones(h.size(-1)),
                                  h + torch.arange(h.size(1)).view(-1, 1, 1), h * torch.linspace(0, 1, h.size(-1)),
                                  h + torch.zeros_like(h), h * torch.ones_like(h[0]), h * torch.full_like(h, 2.0)),
    "new_tensor_methods": lambda h: (h + h.new_ones(h.shape[-1]), h * h.new_zeros(()), h.new_full((3,), 2.0)),
    # --- per-model parameters used directly
    "params_in_forward": Mod(Params),
    # --- in-place
    "inplace_methods": _inplace_methods,
    "inplace_functional": _inplace_functional,
    "inplace_modules": Mod(InplaceModules),
    # --- dtype casts
    "casts": lambda h: (h.double(), h.to(torch.float64) * 2, h.float(), h.type_as(h.double()),
                        h.to(dtype=torch.float64), (h * 8).round().half().float(), (h * 10).long(),
                        (h > 0).to(torch.float32) * h,
                        h.to(h.dtype), h.to(torch.float64).sum(-1).float()),
    # --- prelu functional with per-model weights
    "F_prelu_param": Mod(PReluFn),
}

N8_OPS = ["arith_per_model", "arith_scalar", "broadcast_ranks", "shared_const_and_buffer", "shared_computed",
          "params_in_forward", "inplace_methods", "casts", "where_masked_fill"]


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N)
@pytest.mark.parametrize("op", list(OPS))
def test_pointwise_op(op, pre, n, shared):
    run(pre, OPS[op], n, shared)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N8)
@pytest.mark.parametrize("op", N8_OPS)
def test_pointwise_op_n8(op, pre, n, shared):
    run(pre, OPS[op], n, shared)


# ------------------------------------------------------------------------------------------------ activations


def _glu_last(h):
    return F.glu(torch.cat([h, h.flip(-1)], -1))


# class name -> (build(shape) -> module, functional form applied to another tensor, or None)
ACTIVATIONS = {
    "Threshold": (lambda s: nn.Threshold(0.1, 20.0), lambda h: F.threshold(h, 0.1, 20.0)),
    "ReLU": (lambda s: nn.ReLU(), F.relu),
    "RReLU": (lambda s: nn.RReLU(0.1, 0.3).eval(), lambda h: F.rrelu(h, 0.1, 0.3, training=False)),
    "Hardtanh": (lambda s: nn.Hardtanh(-0.5, 0.7), lambda h: F.hardtanh(h, -0.5, 0.7)),
    "ReLU6": (lambda s: nn.ReLU6(), F.relu6),
    "Sigmoid": (lambda s: nn.Sigmoid(), torch.sigmoid),
    "Hardsigmoid": (lambda s: nn.Hardsigmoid(), F.hardsigmoid),
    "Tanh": (lambda s: nn.Tanh(), torch.tanh),
    "SiLU": (lambda s: nn.SiLU(), F.silu),
    "Mish": (lambda s: nn.Mish(), F.mish),
    "Hardswish": (lambda s: nn.Hardswish(), F.hardswish),
    "ELU": (lambda s: nn.ELU(alpha=0.5), lambda h: F.elu(h, alpha=0.5)),
    "CELU": (lambda s: nn.CELU(alpha=1.5), lambda h: F.celu(h, alpha=1.5)),
    "SELU": (lambda s: nn.SELU(), F.selu),
    "GLU": (lambda s: nn.GLU(dim=even_dim(s)), _glu_last),
    "GELU": (lambda s: nn.GELU(), F.gelu),
    "GELU_tanh": (lambda s: nn.GELU(approximate="tanh"), lambda h: F.gelu(h, approximate="tanh")),
    "Hardshrink": (lambda s: nn.Hardshrink(0.3), lambda h: F.hardshrink(h, 0.3)),
    "LeakyReLU": (lambda s: nn.LeakyReLU(0.2), lambda h: F.leaky_relu(h, 0.2)),
    "LogSigmoid": (lambda s: nn.LogSigmoid(), F.logsigmoid),
    "Softplus": (lambda s: nn.Softplus(beta=2, threshold=3), lambda h: F.softplus(h, beta=2, threshold=3)),
    "Softshrink": (lambda s: nn.Softshrink(0.3), lambda h: F.softshrink(h, 0.3)),
    "PReLU_1": (lambda s: nn.PReLU(), None),
    "PReLU_C": (lambda s: nn.PReLU(s[1], init=0.1), None),
    "Softsign": (lambda s: nn.Softsign(), F.softsign),
    "Tanhshrink": (lambda s: nn.Tanhshrink(), F.tanhshrink),
    "Softmin": (lambda s: nn.Softmin(dim=1), lambda h: F.softmin(h, 1)),
    "Softmax": (lambda s: nn.Softmax(dim=-1), lambda h: F.softmax(h, -1)),
    "Softmax2d": (lambda s: nn.Softmax2d(), lambda h: F.softmax(h, -3)),
    "LogSoftmax": (lambda s: nn.LogSoftmax(dim=2), lambda h: F.log_softmax(h, 2)),
}


class Act(nn.Module):
    """The activation module on the activation, its functional form on another per-model tensor."""

    def __init__(self, shape, name):
        super().__init__()
        build, fn = ACTIVATIONS[name]
        self.act = build(shape)
        self.fn = fn

    def forward(self, h):
        if self.fn is None:
            return self.act(h)
        return self.act(h), self.fn(h * 1.5 - 0.2)


def test_activation_list_is_complete():
    """Every module class of torch.nn.modules.activation (but MultiheadAttention) is in ACTIVATIONS."""
    import torch.nn.modules.activation as A

    names = {n for n in A.__all__ if isinstance(getattr(A, n), type) and issubclass(getattr(A, n), nn.Module)}
    names.discard("MultiheadAttention")
    covered = {k.split("_")[0] for k in ACTIVATIONS}
    assert names <= covered, sorted(names - covered)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N_2)
@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation(name, pre, n, shared):
    fused = run(pre, Mod(lambda s: Act(s, name)), n, shared)
    if name.startswith("PReLU"):
        assert fused.fusion_report.count("prelu") == 1, fused


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N8)
@pytest.mark.parametrize("name", ["ReLU", "GELU_tanh", "PReLU_C", "GLU", "Softmax2d", "RReLU"])
def test_activation_n8(name, pre, n, shared):
    run(pre, Mod(lambda s: Act(s, name)), n, shared)


# ------------------------------------------------------------------------------------------------ real patterns


class Residual(nn.Module):
    """Per-model layer outputs combined element-wise with the input (shared in the shared mode)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(7, 7)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        l, c = self.lin(x), self.conv(x)
        return (l + x, x * l, torch.where(x > 0, l, x), c + x, x - c.sigmoid(), (l * 1).add_(x), torch.maximum(x, c),
                F.relu(c + x) * l)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_residual_with_input(n, shared):
    models = make_models(Residual, n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    assert not fused.fusion_report.fallbacks
    assert fused.fusion_report.count("linear") == 1 and fused.fusion_report.count("conv2d") == 1


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: per-channel gates from a pooled conv output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(4, 2), nn.Linear(2, 4)

    def forward(self, x):
        h = self.conv(x)
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(h.mean((2, 3))))))  # [B, 4]
        return h * s[:, :, None, None], h * s.view(s.size(0), -1, 1, 1)


class SpatialAttention(nn.Module):
    """CBAM-style spatial attention: a 1-channel map [B, 1, H, W] gates a C-channel conv output [B, C, H, W]."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.att = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        return h * torch.sigmoid(self.att(h))


class SpatialAttentionFromStats(nn.Module):
    """CBAM: the map is computed from channel mean/max ([B, 2, H, W]) and gates the C channels."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.att = nn.Conv2d(2, 1, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        stats = torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], dim=1)
        return h * torch.sigmoid(self.att(stats))


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("cls", [ChannelAttention, SpatialAttention, SpatialAttentionFromStats],
                         ids=lambda c: c.__name__)
def test_attention_gates(cls, n, shared):
    models = make_models(cls, n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    assert not fused.fusion_report.fallbacks


# ------------------------------------------------------------------------------------------------ independence


class PointwiseMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(7, 7)
        self.scale = nn.Parameter(torch.randn(4, 1, 1))
        self.act = nn.PReLU(4)

    def forward(self, x):
        c = self.act(self.conv(x)) * self.scale  # [B, 4, 5, 7]
        l = F.gelu(self.lin(x))  # [B, 3, 5, 7]
        y = torch.where(c[:, :3] > 0, l, c[:, 1:]).clamp(-2, 2) + x
        y.mul_(torch.sigmoid(c.mean(1, keepdim=True)))
        return y


@pytest.mark.parametrize("n", [3, 8])
def test_models_are_independent(n):
    """Changing model j's weights, or making its input NaN, leaves every other model's output bit-identical."""
    models = make_models(PointwiseMix, n)
    x = make_input(n, False)
    fused = check_fused(models, (x,))

    def perturb(j):
        fused.scale[j].mul_(-2.0)
        fused.act.weight[j].fill_(0.9)
        fused.lin.weight[j].normal_()

    assert_models_independent(fused, (x,), perturb, j=1)
