"""Dropout: identity in eval; in train an independent mask per model, at rate p, reproducible under a seed."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from tests.utils import check_fused, make_models


class Drop(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.fc = nn.Linear(6, 64)
        self.drop = drop

    def forward(self, x):
        return self.drop(self.fc(x))


class ConvDrop(nn.Module):
    def __init__(self, drop):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 1)
        self.drop = drop

    def forward(self, x):
        return self.drop(self.conv(x))


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("drop", [lambda: nn.Dropout(0.3), lambda: nn.AlphaDropout(0.2), lambda: nn.Dropout1d(0.5)],
                         ids=["dropout", "alpha", "dropout1d"])
def test_dropout_eval_is_identity(n, drop):
    models = make_models(lambda: Drop(drop()).eval(), n)
    fused = check_fused(models, (torch.randn(n, 4, 6),))
    assert fused.fusion_report.count("dropout", "identity (eval)") == 1


@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
def test_dropout_train_independent_masks(shared):
    n, p = 4, 0.3
    models = make_models(lambda: Drop(nn.Dropout(p)), n)
    fused = fusecc.fuse(models, shared_inputs=shared)
    x = torch.randn(256, 6) if shared else torch.randn(n, 256, 6)
    with torch.no_grad():
        y = fused(x)
        clean = fused.eval()(x)
    fused.train()
    masks = y == 0
    rates = masks.float().mean(dim=(1, 2))
    assert torch.all((rates - p).abs() < 0.03), rates
    for i in range(n):
        for j in range(i + 1, n):
            assert not torch.equal(masks[i], masks[j]), f"models {i} and {j} drew the same mask"
    kept = ~masks
    torch.testing.assert_close(y[kept], clean[kept] / (1 - p))  # kept elements are scaled by 1/(1-p)


def test_dropout_deterministic_under_seed():
    models = make_models(lambda: Drop(nn.Dropout(0.5)), 3)
    fused = fusecc.fuse(models)
    x = torch.randn(3, 8, 6)
    torch.manual_seed(123)
    a = fused(x)
    torch.manual_seed(123)
    b = fused(x)
    assert torch.equal(a, b)


def test_feature_dropout_drops_whole_channels_per_model():
    n, p = 3, 0.5
    models = make_models(lambda: ConvDrop(nn.Dropout2d(p)), n)
    fused = fusecc.fuse(models)
    y = fused(torch.randn(n, 8, 3, 5, 5)).detach()
    zero = (y == 0).flatten(3)  # [N, B, C, H*W]
    whole = zero.all(-1) | (~zero).all(-1)
    assert whole.all(), "Dropout2d must drop whole channels"
    ch = zero.all(-1).float()  # [N, B, C]
    assert 0.3 < ch.mean() < 0.7
    assert not torch.equal(ch[0], ch[1])


def test_functional_dropout_training_flag():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 32)

        def forward(self, x):
            return F.dropout(self.fc(x), 0.5, self.training)

    models = make_models(M, 2)
    fused = fusecc.fuse(models)
    x = torch.randn(2, 16, 4)
    assert (fused(x) == 0).any()
    fused.eval()
    ref = torch.stack([m.eval()(xi) for m, xi in zip(models, x)])
    torch.testing.assert_close(fused(x), ref)  # eval() recompiles: dropout becomes the identity
