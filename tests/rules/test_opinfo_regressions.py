"""Each wrong answer and crash the OpInfo sweep found (issue 12), as its own small test.

The sweep itself (test_opinfo.py) checks every registry op on PyTorch's samples; these tests name the classes of
bug it found, so a regression reads as what broke: a 0-dim per-model value reduced over the models, a positional
flag read as a dim, a computation on buffers alone frozen at trace time, ...
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from tests.utils import assert_close

N = 3


class Fn(nn.Module):
    """forward(x, y=None) = fn(x[, y], self.w?) with optional per-model weight ``w`` (a buffer of the model)."""

    def __init__(self, fn, w=None):
        super().__init__()
        self.fn = fn
        if w is not None:
            self.register_buffer("w", w)

    def forward(self, x, y=None):
        return self.fn(self, x) if y is None else self.fn(self, x, y)


def models_of(fn, w_shape=None, w_dtype=torch.float32):
    ms = []
    for _ in range(N):
        w = None if w_shape is None else (torch.randn(w_shape) if w_dtype.is_floating_point
                                          else torch.randint(0, 3, w_shape, dtype=w_dtype))
        ms.append(Fn(fn, w))
    return ms


def loop(models, *xs, shared=()):
    outs = [m(*[x.clone() if k in shared else x[i].clone() for k, x in enumerate(xs)]) for i, m in enumerate(models)]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return type(outs[0])(torch.stack([o[k] for o in outs]) for k in range(len(outs[0])))


def check(fn, *xs, w_shape=None, shared=(), **fuse_kw):
    models = models_of(fn, w_shape)
    fused = fusecc.fuse(models, shared_inputs=[f"{'xy'[k]}" for k in shared], **fuse_kw)
    got = fused(*xs)
    want = loop(models, *xs, shared=shared)
    assert_close("out", got, want)
    return got


# --------------------------------------------------------------------------------- 0-dim per-model values


@pytest.mark.parametrize("op", ["sum", "mean", "nansum", "nanmean", "amax", "amin", "std", "var", "prod", "logsumexp"])
def test_full_reduction_of_a_per_model_scalar_stays_per_model(op):
    """x.sum() is [N] fused; a second full reduction of it must reduce each model's scalar, not the N of them."""
    kw = {"dim": 0} if op == "logsumexp" else {}
    got = check(lambda m, x: getattr(x.sum(), op)(**kw), torch.randn(N, 4, 5))
    assert got.shape == (N,)


def test_full_reduction_of_a_weight_product():
    got = check(lambda m, x: (x @ m.w).sum().sum(), torch.randn(N, 2, 4), w_shape=(4, 3))
    assert got.shape == (N,)


def test_full_reduction_of_a_weight_alone():
    """A model that reduces its own weight: no input at all reaches the op."""
    models = models_of(lambda m, x: m.w.sum().mean() + x, (4, 3))
    fused = fusecc.fuse(models)
    x = torch.randn(N, 2)
    assert_close("out", fused(x), loop(models, x))


@pytest.mark.parametrize("name, fn", [
    ("softmax", lambda x: x.softmax(0)),
    ("log_softmax", lambda x: F.log_softmax(x, -1)),
    ("softmin", lambda x: F.softmin(x, 0)),
    ("cumsum", lambda x: x.cumsum(0)),
    ("cummax", lambda x: torch.cummax(x, -1).values),
    ("logcumsumexp", lambda x: x.logcumsumexp(0)),
    ("logsumexp", lambda x: x.logsumexp(0)),
    ("max_dim", lambda x: x.max(0).values + x.max(-1, keepdim=True).indices),
    ("aminmax", lambda x: torch.aminmax(x, dim=0).min),
    ("kthvalue", lambda x: x.kthvalue(1, 0).values),
    ("topk", lambda x: x.topk(1, -1).values),
    ("sort", lambda x: x.sort(0).values),
    ("prod", lambda x: x.prod(0)),
    ("transpose", lambda x: x.transpose(0, -1)),
    ("swapdims", lambda x: torch.swapdims(x, 0, 0)),
    ("gather", lambda x: x.gather(0, torch.zeros((), dtype=torch.long))),
    ("squeeze", lambda x: x.squeeze(0)),
    ("select_free", lambda x: torch.movedim(x, 0, 0)),
])
def test_dims_of_a_per_model_scalar(name, fn):
    """dim=0 / dim=-1 of a 0-dim tensor is a virtual size-1 dim in torch; on the fused [N] value it is not dim 0."""
    got = check(lambda m, x: fn(x.sum()), torch.randn(N, 4))
    assert got.shape == (N,)


def test_dims_of_a_per_model_scalar_with_a_per_model_index():
    got = check(lambda m, x, i: x.sum().gather(0, i), torch.randn(N, 4), torch.zeros(N, dtype=torch.long))
    assert got.shape == (N,)


# --------------------------------------------------------------------------------- arguments read by name


POSITIONAL_FLAGS = {
    "var_F": lambda x: torch.var(x, False), "var_T": lambda x: torch.var(x, True),
    "method_var_F": lambda x: x.var(False), "std_F": lambda x: torch.std(x, False),
    "method_std_T": lambda x: x.std(True),
    "var_mean_F": lambda x: torch.var_mean(x, False), "std_mean_T": lambda x: torch.std_mean(x, True),
    "var_dim_F": lambda x: torch.var(x, -1, False), "std_dims_T_keep": lambda x: torch.std(x, [0, -1], True, True),
}


@pytest.mark.parametrize("name, shape", [(k, s) for k in POSITIONAL_FLAGS for s in ((5,), (2, 4))
                                         if not (k == "std_dims_T_keep" and len(s) == 1)])  # dims [0, -1]: 2-d
def test_positional_unbiased_is_not_a_dim(name, shape):
    """torch.var(x, False) is the biased variance of all of x, not a reduction over dim 0."""
    fn = POSITIONAL_FLAGS[name]
    check(lambda m, x: fn(x), torch.randn((N,) + shape))


def test_var_positional_flag_values():
    x = torch.randn(N, 5)
    got = check(lambda m, x: torch.var(x, False), x)
    assert_close("biased", got, x.var(dim=1, unbiased=False))


def test_mode_defaults_to_the_last_dim_and_keeps_its_named_result():
    models = models_of(lambda m, x: torch.mode(x))
    fused = fusecc.fuse(models)
    x = torch.randint(0, 3, (N, 2, 6)).float()
    got = fused(x)
    assert isinstance(got, torch.return_types.mode), type(got)
    want = loop(models, x)
    assert_close("values", got.values, want[0])
    assert_close("indices", got.indices, want[1])


def test_named_results_keep_their_fields():
    models = models_of(lambda m, x: x.sort(-1, descending=True))
    got = fusecc.fuse(models)(torch.randn(N, 3, 4))
    assert isinstance(got, torch.return_types.sort)
    assert got.values.shape == got.indices.shape == (N, 3, 4)


# --------------------------------------------------------------------------------- ops that mixed models


@pytest.mark.parametrize("method", [False, True])
def test_renorm_normalises_each_models_slices(method):
    fn = (lambda m, x: x.renorm(2, 0, 1.0)) if method else (lambda m, x: torch.renorm(x, 2, 0, 1.0))
    check(fn, torch.randn(N, 4, 5) * 3)
    check(lambda m, x: torch.renorm(x, 1, -1, 0.5), torch.randn(N, 2, 3, 4))


def test_renorm_in_place():
    check(lambda m, x: x.clone().renorm_(2, 1, 1.0), torch.randn(N, 4, 5) * 3)


def test_tensor_split_with_a_shared_tensor_count():
    k = torch.tensor(2)
    got = check(lambda m, x, k: torch.tensor_split(x, k), torch.randn(N, 5, 2), k, shared=(1,))
    assert [t.shape for t in got] == [(N, 3, 2), (N, 2, 2)]


def test_tensor_split_with_per_model_points_is_refused():
    models = models_of(lambda m, x, k: torch.tensor_split(x, k))
    with pytest.raises(fusecc.FusionError, match="tensor_split.*split points are a per-model tensor"):
        fusecc.fuse(models)(torch.randn(N, 5, 2), torch.full((N,), 2))


# --------------------------------------------------------------------------------- crashes where the loop works


@pytest.mark.parametrize("method", ["float", "to", "contiguous"])
def test_channels_last_memory_format(method):
    kw = {"memory_format": torch.channels_last}
    fn = {"float": lambda x: x.float(**kw), "to": lambda x: x.to(torch.float32, **kw),
          "contiguous": lambda x: x.contiguous(**kw)}[method]
    got = check(lambda m, x: F.relu(fn(x)) * 2, torch.randn(N, 2, 3, 4, 5))
    assert got.shape == (N, 2, 3, 4, 5)


def test_channels_last_makes_the_folded_tensor_channels_last():
    models = models_of(lambda m, x: x.to(memory_format=torch.channels_last))
    fused = fusecc.fuse(models)
    fused(torch.randn(N, 2, 3, 4, 5))
    assert "channels_last" in fused.code and "flatten" in fused.code


def test_masked_fill_with_a_per_model_scalar_tensor():
    x, mask = torch.randn(N, 3, 4), torch.rand(N, 3, 4) > 0.5
    check(lambda m, x, mk: x.masked_fill(mk, m.w), x, mask, w_shape=())
    check(lambda m, x, mk: x.clone().masked_fill_(mk, m.w) + 1, x, mask, w_shape=())
    check(lambda m, x, mk: torch.masked_fill(x, mk, m.w), x, mask[0], w_shape=(), shared=(1,))


def test_masked_fill_of_a_shared_tensor_under_per_model_masks():
    x, mask = torch.randn(3, 4), torch.rand(N, 3, 4) > 0.5
    check(lambda m, x, mk: x.masked_fill(mk, -1.0), x, mask, shared=(0,))


def test_narrow_with_tensor_starts():
    x = torch.randn(N, 6, 4)
    check(lambda m, x, s: x.narrow(0, s, 3), x, torch.tensor([0, 2, -3]))  # per-model starts
    check(lambda m, x, s: torch.narrow(x, 1, s, 2), x, torch.tensor(1), shared=(1,))
    check(lambda m, x, s: x.narrow(0, s, 2), x[0], torch.tensor([1, 0, 4]), shared=(0,))


def test_index_select_with_per_model_indices():
    x = torch.randn(N, 5, 3)
    idx = torch.stack([torch.randperm(5)[:4] for _ in range(N)])
    check(lambda m, x, i: x.index_select(0, i), x, idx)
    check(lambda m, x, i: torch.index_select(x, 1, i), x, idx % 3)


def test_squeeze_dim_of_a_scalar():
    check(lambda m, x: x.sum().squeeze(0) + x.sum().squeeze(-1), torch.randn(N, 4))


def test_prelu_on_1d_input_with_per_model_weight():
    check(lambda m, x: F.prelu(x, m.w), torch.randn(N, 20), w_shape=())
    check(lambda m, x: x.prelu(m.w), torch.randn(N, 7), w_shape=(1,))


def test_linear_on_an_empty_batch():
    models = [nn.Linear(4, 3) for _ in range(N)]
    fused = fusecc.fuse(models)
    x = torch.randn(N, 0, 4)
    got = fused(x)
    assert got.shape == (N, 0, 3)


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_with_a_shared_weight(nd):
    w = torch.randn(4, 2, *([3] * nd))
    x = torch.randn(N, 2, 2, *([6] * nd))
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd]
    check(lambda m, x, w: fn(x, w, padding=1), x, w, shared=(1,))
    check(lambda m, x, w: fn(x, w, m.w), x, w, shared=(1,), w_shape=(4,))  # + a per-model bias


@pytest.mark.parametrize("nd", [1, 2])
def test_conv_transpose_with_a_shared_weight(nd):
    w = torch.randn(2, 4, *([3] * nd))
    x = torch.randn(N, 2, 2, *([5] * nd))
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d}[nd]
    check(lambda m, x, w: fn(x, w, stride=2), x, w, shared=(1,))


def test_batch_norm_with_shared_statistics_in_eval():
    rm, rv = torch.randn(3), torch.rand(3) + 0.5
    x = torch.randn(N, 4, 3, 5)
    models = models_of(lambda m, x, s: F.batch_norm(x, s[0], s[1], training=False))
    fused = fusecc.fuse(models, shared_inputs=["y"])
    stats = torch.stack([rm, rv])
    assert_close("out", fused(x, stats), loop(models, x, stats, shared=(1,)))


def test_batch_norm_training_with_shared_running_statistics_is_refused():
    rm, rv = torch.zeros(3), torch.ones(3)
    models = models_of(lambda m, x, s: F.batch_norm(x, s[0], s[1], training=True))
    fused = fusecc.fuse(models, shared_inputs=["y"])
    with pytest.raises(fusecc.FusionError, match="batch_norm in training mode with running statistics shared"):
        fused(torch.randn(N, 4, 3), torch.stack([rm, rv]))


def test_addbmm_and_inner():
    a, b = torch.randn(N, 5, 2, 3), torch.randn(N, 5, 3, 4)
    check(lambda m, x, y: torch.addbmm(m.w, x, y, beta=0.5), a, b, w_shape=(2, 4))
    check(lambda m, x, y: torch.addbmm(m.w, x, y), a[0], b[0], w_shape=(2, 4), shared=(0, 1))
    check(lambda m, x, y: torch.inner(x, y), torch.randn(N, 2, 3), torch.randn(N, 4, 5, 3))
    check(lambda m, x: torch.inner(x, m.w), torch.randn(N, 2, 3), w_shape=(4, 3))


def test_embedding_with_a_shared_table():
    table, idx = torch.randn(10, 4), torch.randint(0, 10, (N, 2, 3))
    check(lambda m, t, i: F.embedding(i, t), table, idx, shared=(0,))


def test_in_place_comparison_on_a_shared_tensor_keeps_its_dtype():
    got = check(lambda m, x, y: x.clone().lt_(y), torch.randn(3, 4), torch.randn(N, 3, 4), shared=(0,))
    assert got.dtype == torch.float32


def test_copy_into_a_shared_tensor():
    check(lambda m, x, y: x.clone().copy_(y) * 2, torch.randn(3, 4), torch.randn(N, 4), shared=(0,))


def test_in_place_detach_of_the_input():
    check(lambda m, x: x.detach_() * 2, torch.randn(N, 3))


# --------------------------------------------------------------------------------- values computed from buffers alone


def test_computation_on_buffers_alone_is_not_frozen_at_trace_time():
    """torch.fx runs an op whose arguments are all buffers once, at trace time, unless buffers are proxied: the
    result (model 0's) would then be a constant every fused model reads."""

    class PosTable(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("pos", torch.randn(6, 4))

        def forward(self, x):
            table = torch.softmax(self.pos, -1) * 2  # computed from the buffer alone
            return x + table[: x.shape[0]]

    models = [PosTable() for _ in range(N)]
    x = torch.randn(N, 5, 4)
    fused = fusecc.fuse(models)
    assert_close("out", fused(x), torch.stack([m(x[i]) for i, m in enumerate(models)]))


def test_computation_on_a_plain_tensor_attribute_alone():
    """The same for a tensor attribute that is neither a parameter nor a buffer (kept stacked when the models'
    differ)."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.rand(4) + 0.5  # a plain attribute

        def forward(self, x):
            return x * self.scale.log().exp2()

    models = [Scaled() for _ in range(N)]
    x = torch.randn(N, 2, 4)
    fused = fusecc.fuse(models)
    assert_close("out", fused(x), torch.stack([m(x[i]) for i, m in enumerate(models)]))
    assert all(not isinstance(m.scale, nn.Parameter) and "scale" not in m._buffers for m in models)
    assert "scale" not in fused.unfuse()[0]._buffers
