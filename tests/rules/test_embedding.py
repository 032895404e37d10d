"""Embedding: per-model tables, one lookup; padding_idx rows get no gradient in any model."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from tests.utils import check_fused, make_models


class Emb(nn.Module):
    def __init__(self, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(11, 5, padding_idx=padding_idx)
        self.fc = nn.Linear(5, 3)

    def forward(self, idx):
        return self.fc(self.emb(idx))


class FnEmb(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.randn(7, 4))

    def forward(self, idx):
        return F.embedding(idx, self.table).sum(-1)


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("padding_idx", [None, 0, -1], ids=["nopad", "pad0", "pad-1"])
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_embedding(n, padding_idx, shared):
    models = make_models(lambda: Emb(padding_idx), n)
    shape = (3, 6)
    idx = torch.randint(0, 11, shape if shared else (n,) + shape)
    idx.view(-1)[:4] = 0  # make sure padding rows are looked up
    idx.view(-1)[4:6] = 10
    fused = check_fused(models, (idx,), shared=shared)
    assert fused.fusion_report.count("embedding") == 1


@pytest.mark.parametrize("n", [1, 3])
def test_functional_embedding(n):
    models = make_models(FnEmb, n)
    check_fused(models, (torch.randint(0, 7, (n, 2, 5)),))


def test_embedding_padding_row_gets_no_gradient():
    models = make_models(lambda: Emb(padding_idx=2), 3)
    fused = fusecc.fuse(models)
    idx = torch.full((3, 2, 4), 2)
    idx[:, :, 0] = 5
    fused(idx).sum().backward()
    g = fused.emb.weight.grad
    assert torch.all(g[:, 2] == 0)
    assert torch.all(g[:, 5].abs().sum(-1) > 0)


@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_embedding_max_norm_renormalises_each_models_rows(shared):
    """max_norm renormalises the rows looked up, in place: in each model's own table, by its own indices."""
    def factory():
        m = nn.Embedding(9, 4, max_norm=1.0, norm_type=1.5)
        with torch.no_grad():
            m.weight.mul_(3)  # most rows above the norm
        return m

    models = make_models(factory, 3)
    idx = torch.randint(0, 9, (2, 5) if shared else (3, 2, 5))
    fused = fusecc.fuse(models, shared_inputs=shared)
    ref = [m.weight.detach().clone() for m in models]
    got = fused(idx)
    want = torch.stack([m(idx if shared else idx[i]) for i, m in enumerate(models)])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(fused.weight, torch.stack([m.weight for m in models]))  # the same rows renormed
    assert not torch.equal(fused.weight, torch.stack(ref))
