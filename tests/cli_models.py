"""Tiny model factories for tests/test_cli.py, loaded by the fusecc command as ``--arch path/to/cli_models.py:NAME``
(or ``cli_models:NAME`` from a directory holding a copy). Nothing here imports fusecc."""

import torch.nn as nn


def small_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )


def small_mlp(in_features: int = 6, hidden: int = 12, out_features: int = 4) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, out_features))


class Untraceable(nn.Module):
    """Data-dependent Python control flow: torch.fx cannot trace ``if x.sum() > 0``."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        if x.sum() > 0:
            return self.fc(x)
        return -self.fc(x)


def untraceable() -> nn.Module:
    return Untraceable()


NOT_CALLABLE = 3
