"""Shape ops on fused values: sizes, views, permutations, squeeze/expand, indexing, cat/stack, split, gather.

Each op runs on the output of a real per-model layer (see ``_layouts.py``: a Linear -> stacked or folded last dim,
a Conv2d -> folded channels, a Conv2d + transpose -> model dim stacked at a non-leading dim), for N in (1, 3)
(8 on a subset), per-model and shared inputs. Related ops are grouped into one model returning a tuple;
``check_fused`` names the mismatching element (``output[i]``) and a compile error names the source line.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from tests.rules._layouts import MODES, PRE_N, PRE_N8, Mod, const_like, make_input, run
from tests.utils import assert_models_independent, check_fused, make_models

# ------------------------------------------------------------------------------------------------ op table


def _split_sub(h):
    a, b = h.split([1, h.size(1) - 1], dim=1)
    return b - a


def _unbind_sum(h):
    parts = h.unbind(1)
    return parts[0] * 2 + parts[-1]


class Gather(nn.Module):
    """gather with a shared (constant) index along dims 1 and -1."""

    def __init__(self, shape):
        super().__init__()
        self.index1 = (torch.arange(torch.Size(shape).numel()) * 7 % shape[1]).view(shape)
        self.index_last = (torch.arange(torch.Size(shape).numel()) * 5 % shape[-1]).view(shape)[..., :3]

    def forward(self, h):
        return torch.gather(h, 1, self.index1), h.gather(-1, self.index_last)


class IndexWith(nn.Module):
    """h[...] with constant (shared) index tensors; ``how`` picks the indexing expressions."""

    def __init__(self, shape, how):
        super().__init__()
        self.how = how
        self.i0 = torch.tensor([1, 0, 1])  # into the batch dim (size 2)
        self.i0b = torch.tensor([1, 0])
        self.i1 = torch.tensor([2, 0])  # into dim 1 (size >= 3)
        self.i2 = torch.tensor([3, 0])  # into dim 2 (size >= 4)
        self.mask = torch.arange(shape[1]) % 2 == 0  # boolean mask over dim 1

    def forward(self, h):
        if self.how == "single":
            return h[self.i0], h[:, self.i1], h[:, self.mask], h[..., self.i1]
        if self.how == "multi":
            # adjacent index tensors stay in place; non-adjacent ones go first (torch's advanced-indexing rule)
            return h[:, self.i1, self.i2], h[self.i0b, self.i1], h[self.i0b, :, self.i2]
        if self.how == "index_select":
            return h.index_select(1, self.i1), torch.index_select(h, -2, self.i2), h.index_select(0, self.i0)
        raise AssertionError(self.how)


class CatShared(nn.Module):
    """cat / stack of a per-model activation with a constant (shared) tensor."""

    def __init__(self, shape):
        super().__init__()
        self.c_last = const_like(tuple(shape[:-1]) + (2,))
        self.c_full = const_like(tuple(shape))

    def forward(self, h):
        return (
            torch.cat([self.c_last, h, self.c_last], dim=-1),
            torch.cat([h, self.c_full], dim=1),
            torch.stack([self.c_full, h], dim=0),
            torch.stack([h, self.c_full], dim=2),
        )


class Flattens(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.f = nn.Flatten()
        self.g = nn.Flatten(0, -2)

    def forward(self, h):
        return self.f(h), self.g(h)


class Unflattens(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.f, self.u = nn.Flatten(), nn.Unflatten(1, shape[1:])
        self.f2, self.u2 = nn.Flatten(-2), nn.Unflatten(-1, (shape[2], shape[3]))

    def forward(self, h):
        return self.u(self.f(h)), self.u2(self.f2(h))


OPS = {
    # --- sizes
    "size_view": lambda h: (h.view(h.size(0), -1), h.reshape(h.shape[0], h.shape[1], -1),
                            h.view(h.size(0), h.size(1), -1)),
    "size_tuple_reshape": lambda h: (h.reshape(h.size()[:2] + (-1,)), h.flatten(1).view(h.shape),
                                     h.reshape(h.size(1), -1)),
    "size_arith": lambda h: (h * h.size(-1) + h.dim() - h.size(1)) + h / h.shape[1] * h.ndim + h.shape[-2]
    + h / h.numel(),
    # --- view / reshape / contiguous
    "view_reshape": lambda h: (h.view(-1, h.size(-1)), h.view(-1), h.reshape((2, -1)),
                               torch.reshape(h, (-1, h.shape[2], h.shape[3])), h.flatten(1).view_as(h) * h,
                               h.transpose(2, 3).reshape_as(h), h.transpose(1, 3).contiguous().view(h.size(0), -1)),
    # --- flatten / unflatten
    "flatten": lambda h: (torch.flatten(h, 1), h.flatten(), h.flatten(-2), h.flatten(0, 1), h.flatten(1, 2),
                          h.flatten(-3, -2)),
    "nn_Flatten": Mod(Flattens),
    "unflatten": lambda h: (h.flatten(1).unflatten(1, (h.shape[1], -1)),
                            torch.unflatten(h.flatten(2), 2, (h.size(2), h.size(3))),
                            h.unflatten(0, (2, 1)), h.unflatten(-1, (h.size(-1), 1))),
    "nn_Unflatten": Mod(Unflattens),
    # --- permutations
    "permute_transpose": lambda h: (h.permute(0, 2, 3, 1), h.permute(3, 1, 0, 2), torch.permute(h, (-1, -2, 0, 1)),
                                    h.transpose(1, 2), h.transpose(-1, 0), torch.transpose(h, 1, -1),
                                    h.swapaxes(0, 2)),
    "t_T_mT_movedim": lambda h: (h.flatten(1).t(), h.flatten(1).T, h.mT, h.movedim(1, -1),
                                 torch.movedim(h, (0, 1), (2, 3)), h.moveaxis(-1, 0)),
    # --- unsqueeze / squeeze
    "unsqueeze_squeeze": lambda h: (h.unsqueeze(0), h.unsqueeze(1), h.unsqueeze(-1), torch.unsqueeze(h, 2),
                                    h.unsqueeze(1).squeeze(1), h[:, :1].squeeze(1), h[..., -1:].squeeze(-1),
                                    h.squeeze(-1)),
    "squeeze_all": lambda h: h.unsqueeze(-1).unsqueeze(0).squeeze(),
    "squeeze_tuple": lambda h: h.unsqueeze(2).squeeze((0, 2)),  # dim 0 has size 2: only dim 2 goes
    # --- expand / repeat
    "expand_repeat": lambda h: (h[:, :, :1].expand(-1, -1, 3, -1), h.unsqueeze(1).expand(-1, 3, -1, -1, -1),
                                h[:, :1].expand_as(h), h[:1].expand(2, -1, -1, -1), h.repeat(1, 2, 1, 1),
                                h.repeat(2, 1, 1, 1, 3)),
    "expand_more_dims": lambda h: h.expand(3, -1, -1, -1, -1),
    "expand_runtime_size": lambda h: (h[:, :1].expand(h.shape), h[..., :1].expand(h.size())),
    "broadcast_to": lambda h: (torch.broadcast_to(h[:, :1], h.shape), h[..., :1].broadcast_to(h.size())),
    # --- getitem / slicing
    "getitem": lambda h: (h[:, 0], h[..., :3], h[:, None], h[:, -1], h[1], h[:, 1:3, ::2], h[..., None, 1],
                          h[:, -2:, :, 1:-1], h[:, [2, 0]]),
    "index_tensor": Mod(lambda s: IndexWith(s, "single")),
    "index_tensors_multi": Mod(lambda s: IndexWith(s, "multi")),
    # --- cat / stack (same layout) and with shared operands
    "cat_stack": lambda h: (torch.cat([h, h * 2], dim=0), torch.cat([h, h * 2], dim=1), torch.cat([h * 2, h], -1),
                            torch.cat((h, h.flip(2), h), 2), torch.stack([h, h.flip(1)], 0),
                            torch.stack([h, h * 3], dim=2), torch.stack([h, h.flip(-1)], -1)),
    "cat_stack_shared_operand": Mod(CatShared),
    # --- split / chunk / unbind
    "split_chunk_unbind": lambda h: (_split_sub(h), h.split(2, dim=1), h.chunk(2, dim=-1), torch.chunk(h, 2, 0)[1],
                                     h.tensor_split(3, dim=2), _unbind_sum(h), torch.unbind(h, -1)),
    # --- narrow / select / index_select / gather
    "narrow_select": lambda h: (h.narrow(2, 1, 2), torch.narrow(h, -1, 0, 3), h.select(1, 0), h.select(-1, -1),
                                torch.select(h, 0, 1)),
    "index_select": Mod(lambda s: IndexWith(s, "index_select")),
    "gather_shared_index": Mod(Gather),
    "gather_per_model_index": lambda h: (torch.gather(h, 1, h.argsort(1)),
                                         h.gather(-1, h.argsort(-1, descending=True)[..., :2])),
}

EXPECT = {"cat_stack": {"cat": 4}, "cat_stack_shared_operand": {"cat": 2}, "nn_Flatten": {"flatten": 2}}

N8_OPS = ["size_view", "size_tuple_reshape", "flatten", "permute_transpose", "squeeze_all", "expand_more_dims",
          "getitem", "index_tensors_multi", "cat_stack", "split_chunk_unbind", "gather_per_model_index",
          "nn_Unflatten"]


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N)
@pytest.mark.parametrize("op", list(OPS))
def test_shape_op(op, pre, n, shared):
    run(pre, OPS[op], n, shared, EXPECT.get(op))


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("pre,n", PRE_N8)
@pytest.mark.parametrize("op", N8_OPS)
def test_shape_op_n8(op, pre, n, shared):
    run(pre, OPS[op], n, shared, EXPECT.get(op))


# ------------------------------------------------------------------------------------------------ mixed layouts


class ConvAndLinear(nn.Module):
    """A conv output (folded channels), a linear output (stacked, or folded last dim for a shared input) and the
    input itself (shared in the shared mode) combined by cat / stack."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 4, 3, padding=1)  # [B, 4, 5, 7]
        self.lin = nn.Linear(7, 7)  # [B, 3, 5, 7]

    def forward(self, x):
        c, l = self.conv(x), self.lin(x)
        if self.how == "conv_and_linear":
            return (torch.cat([c, l], dim=1), torch.cat([l, c, l], dim=-3), torch.stack([c[:, :3], l], dim=0),
                    torch.stack([l, c[:, 1:]], dim=2), torch.stack([c[:, :3], l], dim=-1))
        if self.how == "with_input":
            return (torch.cat([c, x, l], dim=1), torch.cat([l, x], dim=-1), torch.cat([x, c[:, :3]], dim=0),
                    torch.stack([l, x], dim=1))
        raise AssertionError(self.how)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("how,cats", [("conv_and_linear", 2), ("with_input", 3)], ids=["conv_and_linear", "with_input"])
def test_cat_stack_mixed_layouts(how, cats, n, shared):
    models = make_models(lambda: ConvAndLinear(how), n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    rep = fused.fusion_report
    assert not rep.fallbacks
    assert rep.count("conv2d") == 1 and rep.count("linear") == 1
    assert rep.count("cat") == cats


class SizeChain(nn.Module):
    """Sizes unpacked from a folded conv output drive a view before a linear (a CNN's classifier head)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 7, 3)

    def forward(self, x):
        h = self.conv(x)
        b, c, hh, ww = h.shape
        h = h.view(b, c * hh * ww)
        return self.fc(h).view(h.size(0), 1, -1).expand(-1, c, -1) * x.dim()


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3, 8])
def test_size_unpacking_drives_view(n, shared):
    models = make_models(SizeChain, n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    assert not fused.fusion_report.fallbacks
    assert fused.fusion_report.count("linear") == 1 and fused.fusion_report.count("conv2d") == 1


class IndexFromForward(nn.Module):
    """Index tensors made in forward: from Python constants, from a traced size, or per model (argmax)."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.lin = nn.Linear(7, 6)

    def forward(self, x):
        h = self.lin(x)  # [B, 3, 5, 6]
        if self.how == "torch_tensor_const":
            return h[:, torch.tensor([2, 0, 1])]
        if self.how == "arange_const":
            return h.index_select(-1, torch.arange(3))
        if self.how == "arange_of_size":  # torch.arange of a traced size: a graph node, shared by all models
            return h.index_select(-1, torch.arange(h.size(-1) - 1, -1, -1)), h[torch.arange(h.size(0)), 1]
        if self.how == "per_model_argmax":  # CLIP-style pooling: row i takes the position its own logits pick
            idx = h[:, 0, 0].argmax(-1)  # [B], per model
            return h[:, 1][torch.arange(h.size(0)), :, idx]
        if self.how == "per_model_index_select":
            return h.index_select(-1, h[0, 0, 0].argsort()[:3])
        raise AssertionError(self.how)


@pytest.mark.parametrize("shared", MODES)
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("how", ["torch_tensor_const", "arange_const", "arange_of_size", "per_model_argmax",
                                 "per_model_index_select"])
def test_index_tensor_made_in_forward(how, n, shared):
    models = make_models(lambda: IndexFromForward(how), n)
    fused = check_fused(models, (make_input(n, shared),), shared=shared)
    assert not fused.fusion_report.fallbacks


# ------------------------------------------------------------------------------------------------ independence


class ShapeMix(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.lin = nn.Linear(7, 7)

    def forward(self, x):
        c = self.conv(x)  # [B, 4, 5, 7]
        h = torch.cat([c.permute(0, 2, 1, 3), self.lin(x).transpose(1, 2)], dim=2)  # [B, 5, 7, 7]
        h = h.flatten(1)[:, :240].unsqueeze(1)
        a, b = h.chunk(2, dim=-1)
        return torch.stack([a, b], 0).squeeze(2).view(2, x.size(0), -1)[:, :, 1:-1]


@pytest.mark.parametrize("n", [3, 8])
def test_models_are_independent(n):
    """Changing model j's weights, or making its input NaN, leaves every other model's output bit-identical."""
    models = make_models(ShapeMix, n)
    x = make_input(n, False)
    fused = check_fused(models, (x,))

    def perturb(j):  # new weights for model j only
        fused.conv.weight[j].normal_()
        fused.lin.bias[j].add_(10.0)

    assert_models_independent(fused, (x,), perturb, j=n // 2)
