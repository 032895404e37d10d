"""Pure-PyTorch per-model 1x1 convolution: one grouped conv (aten), the CPU path, export path and test oracle."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch.nn.functional as F
from torch import Tensor

from ..linear.reference import activation_


def conv1x1(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none", shared_input: bool = False,
            stride: Union[int, Tuple[int, int]] = 1) -> Tensor:
    """x ``[B, N*C, H, W]`` (``[B, C, H, W]`` if shared_input), weight ``[N, M, C]`` -> ``[B, N*M, H, W]``."""
    n, m, c = weight.shape
    w = weight.reshape(n * m, c, 1, 1)
    return activation_(F.conv2d(x, w, None if bias is None else bias.reshape(-1), stride=stride,
                               groups=1 if shared_input else n), act)
