"""A model repository entry for NVIDIA Triton Inference Server (its libtorch backend): the fused fleet as one model.

    repo/<name>/config.pbtxt     fixed input and output shapes (the fleet's [N, B, ...]), no server batching
    repo/<name>/1/model.pt       the TorchScript artifact from ``fusecc export --format torchscript``
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .export import atomic_path

_TYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16",
          torch.float64: "TYPE_FP64", torch.int64: "TYPE_INT64", torch.int32: "TYPE_INT32", torch.bool: "TYPE_BOOL"}


def triton_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> str:
    """config.pbtxt for the libtorch backend: INPUT__i / OUTPUT__i with their dtypes and fixed dims."""

    def block(kind: str, tensors: Sequence[Tensor]) -> str:
        rows = [f'  {{ name: "{kind.upper()}__{i}" data_type: {_TYPES[t.dtype]} '
                f'dims: [ {", ".join(str(d) for d in t.shape)} ] }}' for i, t in enumerate(tensors)]
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"

    return (f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: 0\n'
            + block("input", inputs) + block("output", outputs))


def write_triton_repo(repo: str, name: str, artifact: str, inputs: Sequence[Tensor], outputs: Any) -> str:
    """Write ``repo/name/{config.pbtxt, 1/model.pt}`` (each file atomically) for a TorchScript ``artifact`` whose
    example inputs and outputs (any structure of tensors) are given; returns the entry's folder."""
    outs = [t for t in tree_flatten(outputs)[0] if isinstance(t, Tensor)]
    version = os.path.join(repo, name, "1")
    os.makedirs(version, exist_ok=True)
    with atomic_path(os.path.join(version, "model.pt")) as tmp:
        shutil.copyfile(artifact, tmp)
    with atomic_path(os.path.join(repo, name, "config.pbtxt")) as tmp:
        with open(tmp, "w") as f:
            f.write(triton_config(name, inputs, outs))
    return os.path.join(repo, name)
