"""Reductions and ops along a dim on fused values: sum/mean/amax/.../all/any (int, tuple and negative dims, keepdim,
and no dim = one result per model), softmax family (functions, methods, modules), cumsum, sort/topk, flip.

Each op runs on the output of a real per-model layer (``_layouts.py``: Linear -> stacked or folded last dim,
Conv2d -> folded channels, Conv2d + transpose -> stacked at a non-leading dim), so the dim it reduces is sometimes
the one the model dim is folded into. Related ops are grouped into one model returning a tuple.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tests.rules._layouts import MODES, PRE_N, PRE_N8, Mod, even_dim, make_input, run
from tests.utils import assert_models_independent, check_fused, make_models


def _bounded(h):
    """Values in (0.9, 1.1): products of many of them stay well conditioned."""
    return 1 + 0.1 * torch.tanh(h)


OPS = {
    # --- sum / mean / nansum / nanmean: int, tuple, negative dims, keepdim
    "sum_mean_dims": lambda h: (h.sum(1), h.sum(-1), h.sum((1, 2)), h.sum((-1, 0)), torch.sum(h, dim=[0, -2]),
                                h.sum(1, keepdim=True), torch.sum(h, dim=(-3, -1), keepdim=True),
                                h.sum(dim=0, keepdim=True), h.mean(0), h.mean((-2, -1), keepdim=True),
                                torch.mean(h, dim=-3), h.mean(dim=(1, 3)), h.nansum(1), h.nanmean((0, -1))),
    # --- no dim: one result per model
    "sum_mean_all": lambda h: (h.sum(), torch.sum(h * 2), h.sum(dtype=torch.float64), h.mean(),
                               torch.mean(h ** 2), torch.sum(h, dim=None, keepdim=True),
                               h.mean(dim=None, keepdim=True), h.amax(dim=(), keepdim=True),
                               h.sum((0, 1, 2, 3), keepdim=True)),
    # --- amax / amin / max / min / median / argmax / argmin
    "amax_amin": lambda h: (h.amax(1), h.amax((0, 2), keepdim=True), h.amin(-1), torch.amin(h, (-1, -3)), h.amax(),
                            torch.amin(h)),
    "max_min_dim": lambda h: (h.max(1), h.min(-1, keepdim=True), torch.max(h, dim=0), torch.min(h, 2), h.max(1)[0],
                              h.max(-1, keepdim=True)[1], h.min(0)[0], torch.max(h, 2)[1]),
    "max_min_all_and_other": lambda h: (h.max(), h.min(), torch.max(h * 2), torch.max(h, h.flip(1)),
                                        h.min(h.flip(-1))),
    "median": lambda h: (h.median(1)[0], h.median(dim=-1)[1], h.median()),
    "argmax_argmin": lambda h: (h.argmax(1), h.argmax(-1, keepdim=True), torch.argmax(h, dim=0), h.argmin(2),
                                torch.argmin(h, -3, keepdim=True), h.argmax(), torch.argmin(h),
                                h.argmax(keepdim=True)),
    # --- prod / std / var / logsumexp
    "prod": lambda h: (_bounded(h).prod(1), _bounded(h).prod(-1, keepdim=True), torch.prod(_bounded(h), 0),
                       _bounded(h).prod(), torch.prod(_bounded(h * 2))),
    "std_var": lambda h: (h.std(1), h.std((-1, 0), keepdim=True), h.var(-1, unbiased=False),
                          torch.var(h, dim=(1, 2), correction=0), torch.std(h, dim=-2, correction=2), h.std(),
                          h.var(), torch.std(h, unbiased=False), torch.std_mean(h, dim=1),
                          torch.var_mean(h, dim=(-1, -2), keepdim=True)),
    "std_mean_var_mean_all": lambda h: (torch.std_mean(h), torch.var_mean(h, correction=0)),
    "aminmax_dim": lambda h: (torch.aminmax(h, dim=1), torch.aminmax(h, dim=-1, keepdim=True)),
    "aminmax_all": lambda h: (h.aminmax(), torch.aminmax(h * 2)),
    "logsumexp": lambda h: (h.logsumexp(1), torch.logsumexp(h, (-1, -2)), torch.logsumexp(h, 0, keepdim=True)),
    # --- all / any / count_nonzero / sum of bools
    "all_any": lambda h: ((h > 0).all(1), (h > 0).any(-1, keepdim=True), torch.all(h > -1, dim=0),
                          (h > 1).any(dim=(1, 2)), (h > -1.5).all(), (h > 1.5).any(), torch.any(h > 0),
                          (h > 0).all(), torch.count_nonzero(h > 0, dim=1), (h > 0.3).count_nonzero(),
                          (h > 0).sum(-1), (h < 0).sum()),
    "reduce_then_broadcast": lambda h: (h - h.mean(), h / (1 + h.std(1, keepdim=True)),
                                        h * h.amax((1, 2)).unsqueeze(1).unsqueeze(1), h.softmax(-1) * h.mean(),
                                        F.normalize(h, dim=1), F.normalize(h, p=1, dim=-1), F.normalize(h)),
    # --- softmax family (functions and methods)
    "softmax_functional": lambda h: (F.softmax(h, 1), F.softmax(h, dim=-1), torch.softmax(h, 0), h.softmax(2),
                                     h.softmax(dim=-3), F.log_softmax(h, -2), h.log_softmax(1),
                                     torch.log_softmax(h, dim=-1), F.softmin(h, 1), F.softmin(h, dim=-1),
                                     F.softmax(h, -1, dtype=torch.float64), h.log_softmax(1, dtype=torch.float64),
                                     F.glu(h.repeat(1, 1, 1, 2), -1)),
    # --- along a dim
    "cumulative": lambda h: (h.cumsum(1), h.cumsum(-1), torch.cumsum(h, dim=0), torch.cumsum(h, 2),
                             _bounded(h).cumprod(2), torch.logcumsumexp(h, -1), torch.cummax(h, 1)[0],
                             h.cummin(dim=-2)[1]),
    "sort_topk": lambda h: (h.sort(1), torch.sort(h, dim=-1, descending=True), h.sort(0)[0], h.argsort(-2),
                            h.topk(2, dim=1), torch.topk(h, 3), h.topk(2, dim=-2, largest=False)[0], h.topk(2)[1]),
    "kthvalue": lambda h: (h.kthvalue(2, dim=1)[0], torch.kthvalue(h, 1)[1]),
    # --- fields of the named tuples (values, indices) returned by max/min/median/sort/topk/...
    "named_tuple_fields": lambda h: (h.max(dim=1).values, h.min(-1).indices, h.median(-1).values,
                                     h.cummin(dim=-2).indices, h.sort(dim=1).values, torch.topk(h, 3).indices,
                                     h.kthvalue(2, 1).values),
    "flip_roll_diff": lambda h: (h.flip(1), torch.flip(h, (0, -1)), h.flip(-1), h.flip([1, 2]), h.roll(1, 1),
                                 torch.roll(h, (2, -1), (-1, 0)), h.diff(dim=-1), torch.diff(h, dim=1)),
}

N8_OPS = ["sum_mean_dims", "sum_mean_all", "max_min_dim", "argmax_argmin", "std_var", "all_any",
          "softmax_functional", "sort_topk"]


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N)
@pytest.mark.parametrize("op", list(OPS))
def test_reduce_op(op, pre, n, shared):
    run(pre, OPS[op], n, shared)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N8)
@pytest.mark.parametrize("op", N8_OPS)
def test_reduce_op_n8(op, pre, n, shared):
    run(pre, OPS[op], n, shared)


# ------------------------------------------------------------------------------------------------ softmax modules


# id -> (build(shape) -> module, the kind the report records it as)
MODULES = {
    "Softmax_1": (lambda s: nn.Softmax(dim=1), "softmax"),
    "Softmax_-1": (lambda s: nn.Softmax(-1), "softmax"),
    "LogSoftmax_2": (lambda s: nn.LogSoftmax(dim=2), "logsoftmax"),
    "LogSoftmax_-3": (lambda s: nn.LogSoftmax(dim=-3), "logsoftmax"),
    "Softmin_-1": (lambda s: nn.Softmin(dim=-1), "softmin"),
    "Softmin_0": (lambda s: nn.Softmin(0), "softmin"),
    "Softmax2d": (lambda s: nn.Softmax2d(), "softmax2d"),
    "GLU_even_dim": (lambda s: nn.GLU(dim=even_dim(s)), "glu"),
    "GLU_-1_default": (lambda s: nn.Sequential(Repeat2Last(), nn.GLU()), "glu"),
}


class Repeat2Last(nn.Module):
    def forward(self, h):
        return torch.cat([h, h.flip(-1) * 2], -1)  # even last dim for GLU's default dim=-1


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N)
@pytest.mark.parametrize("mod", list(MODULES))
def test_softmax_modules(mod, pre, n, shared):
    build, kind = MODULES[mod]
    fused = run(pre, Mod(build), n, shared)
    if kind == "softmax":  # the report kind named in the API docs
        assert fused.fusion_report.count("softmax") == 1, fused


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N8)
@pytest.mark.parametrize("mod", ["Softmax_1", "Softmax2d", "GLU_even_dim"])
def test_softmax_modules_n8(mod, pre, n, shared):
    run(pre, Mod(MODULES[mod][0]), n, shared)


@pytest.mark.filterwarnings("ignore:Implicit dimension choice")
@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N)
@pytest.mark.parametrize("how", ["nn_Softmax_no_dim", "F_softmax_no_dim", "F_log_softmax_no_dim"])
def test_softmax_implicit_dim(how, pre, n, shared):
    """dim=None: torch's legacy choice (dim 1 for a 4-D per-model tensor), not counting the model dim."""
    op = {
        "nn_Softmax_no_dim": Mod(lambda s: nn.Softmax()),
        "F_softmax_no_dim": _softmax_no_dim,
        "F_log_softmax_no_dim": _log_softmax_no_dim,
    }[how]
    run(pre, op, n, shared)


def _softmax_no_dim(h):
    return F.softmax(h)


def _log_softmax_no_dim(h):
    return F.log_softmax(h[0])  # 3-D per model: legacy dim 0


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("how", ["F.softmax", "torch.softmax", "Tensor.softmax"])
def test_functional_softmax_is_reported(how, n, shared):
    """The report counts a functional softmax under "softmax", as it does nn.Softmax (the report's documented
    meaning: how many nodes of a kind were fused by a rule)."""
    op = {"F.softmax": _f_softmax, "torch.softmax": _torch_softmax, "Tensor.softmax": _method_softmax}[how]
    fused = run("linear", op, n, shared)
    assert fused.fusion_report.count("softmax") == 1, fused


def _f_softmax(h):
    return F.softmax(h, -1)


def _torch_softmax(h):
    return torch.softmax(h, -1)


def _method_softmax(h):
    return h.softmax(-1)


# ------------------------------------------------------------------------------------------------ real patterns


class Head(nn.Module):
    """A classifier head: global average pool of a conv output, linear, log_softmax, top-2 classes and a
    per-sample entropy; plus an attention-pooling softmax over the spatial positions."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)
        self.score = nn.Conv2d(4, 1, 1)

    def forward(self, x):
        h = self.conv(x).relu()  # [B, 4, 5, 7]
        pooled = h.mean((-2, -1))  # [B, 4]
        logp = self.fc(pooled).log_softmax(-1)
        top = logp.topk(2, dim=-1)
        ent = -(logp.exp() * logp).sum(-1, keepdim=True)
        w = self.score(h).flatten(2).softmax(-1)  # [B, 1, 35]
        att = (h.flatten(2) * w).sum(-1)  # [B, 4]
        return logp, top[0], top[1], ent, att, logp.argmax(-1)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_classifier_head(n, shared):
    models = make_models(Head, n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    rep = fused.fusion_report
    assert not rep.fallbacks
    assert rep.count("conv2d") == 2 and rep.count("linear") == 1


# ------------------------------------------------------------------------------------------------ independence


class ReduceMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(7, 6)

    def forward(self, x):
        c = self.conv(x)  # [B, 4, 5, 7]
        l = self.lin(x)  # [B, 3, 5, 6]
        a = c.softmax(1).sum((2, 3)) + c.amax((1, 2)).mean(-1, keepdim=True)  # [B, 4]
        b = l.logsumexp(-1).std((1, 2)) + l.cumsum(2).sort(-1)[0].mean((1, 2, 3))  # [B]
        return a * b.unsqueeze(-1) + l.mean() + c.var()


@pytest.mark.parametrize("n", [3, 8])
def test_models_are_independent(n):
    """Changing model j's weights, or making its input NaN, leaves every other model's output bit-identical
    (a reduction over the wrong dim would mix models)."""
    models = make_models(ReduceMix, n)
    x = make_input(n, False)
    fused = check_fused(models, (x,))

    def perturb(j):
        fused.conv.weight[j].mul_(3.0)
        fused.lin.weight[j].normal_()

    assert_models_independent(fused, (x,), perturb, j=n - 1)
