"""A model repository entry for NVIDIA Triton Inference Server (its libtorch backend): the fused fleet as one model.

    repo/<name>/config.pbtxt     fixed input and output shapes (the fleet's [N, B, ...]), no server batching
    repo/<name>/1/model.pt       the TorchScript artifact from ``fusecc export --format torchscript``

A routed artifact (``fusecc export --routed``) gets ``max_batch_size`` and ``dynamic_batching`` instead: Triton's
batcher then puts rows of any models, each with its ``model_id``, in one call.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Optional, Sequence

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten

from .export import atomic_path

_TYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16",
          torch.float64: "TYPE_FP64", torch.int64: "TYPE_INT64", torch.int32: "TYPE_INT32", torch.bool: "TYPE_BOOL"}


def triton_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor],
                  dynamic: Optional[Sequence[Sequence[int]]] = None,
                  dynamic_out: Optional[Sequence[Sequence[int]]] = None) -> str:
    """config.pbtxt for the libtorch backend: INPUT__i / OUTPUT__i with their dtypes and dims; the dims listed in
    ``dynamic`` (per input) and ``dynamic_out`` (per output) are -1."""

    def block(kind: str, tensors: Sequence[Tensor], var: Sequence[Sequence[int]]) -> str:
        rows = []
        for i, t in enumerate(tensors):
            dims = [-1 if d in var[i] else s for d, s in enumerate(t.shape)]
            rows.append(f'  {{ name: "{kind.upper()}__{i}" data_type: {_TYPES[t.dtype]} '
                        f'dims: [ {", ".join(str(d) for d in dims)} ] }}')
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"

    var_in = [list(v) for v in dynamic] if dynamic else [[] for _ in inputs]
    var_out = [list(v) for v in dynamic_out] if dynamic_out else [[] for _ in outputs]
    return (f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: 0\n'
            + block("input", inputs, var_in) + block("output", outputs, var_out))


def triton_routed_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor],
                         dynamic: Sequence[Sequence[int]], dynamic_out: Sequence[Sequence[int]],
                         max_batch_size: int, max_delay_us: int = 5000) -> str:
    """config.pbtxt for a routed artifact (``fusecc export --routed``): Triton's dynamic batcher collects rows of any
    models (each request carries its ``model_id``), dims listed without the batch dim."""

    def block(kind: str, tensors: Sequence[Tensor], var: Sequence[Sequence[int]]) -> str:
        rows = []
        for i, t in enumerate(tensors):
            dims = [-1 if d in var[i] else s for d, s in enumerate(t.shape)][1:] or [1]
            rows.append(f'  {{ name: "{kind.upper()}__{i}" data_type: {_TYPES[t.dtype]} '
                        f'dims: [ {", ".join(str(d) for d in dims)} ] }}')
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"

    return (f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: {max_batch_size}\n'
            + block("input", inputs, dynamic) + block("output", outputs, dynamic_out)
            + f"dynamic_batching {{ max_queue_delay_microseconds: {max_delay_us} }}\n")


def write_triton_config(repo: str, name: str, artifact: str, config: str) -> str:
    """Write ``repo/name/{config.pbtxt, 1/model.pt}`` (each file atomically); returns the entry's folder."""
    version = os.path.join(repo, name, "1")
    os.makedirs(version, exist_ok=True)
    with atomic_path(os.path.join(version, "model.pt")) as tmp:
        shutil.copyfile(artifact, tmp)
    with atomic_path(os.path.join(repo, name, "config.pbtxt")) as tmp:
        with open(tmp, "w") as f:
            f.write(config)
    return os.path.join(repo, name)


def varying_dims(outs: Sequence[Tensor], other: Any) -> Optional[list]:
    """Per output, the dims whose size differs in ``other`` (the same outputs at another input size)."""
    if other is None:
        return None
    others = [t for t in tree_flatten(other)[0] if isinstance(t, Tensor)]
    return [[d for d in range(a.dim()) if a.shape[d] != b.shape[d]] for a, b in zip(outs, others)]


def write_triton_repo(repo: str, name: str, artifact: str, inputs: Sequence[Tensor], outputs: Any,
                      dynamic: Optional[Sequence[Sequence[int]]] = None, other_outputs: Any = None) -> str:
    """Write ``repo/name/{config.pbtxt, 1/model.pt}`` (each file atomically) for a TorchScript ``artifact`` whose
    example inputs and outputs (any structure of tensors) are given; returns the entry's folder. A dynamic artifact
    gives the dims of its inputs that vary (``dynamic``) and its outputs at a second size (``other_outputs``): the
    output dims that differ between the two are the variable ones."""
    outs = [t for t in tree_flatten(outputs)[0] if isinstance(t, Tensor)]
    return write_triton_config(repo, name, artifact,
                               triton_config(name, inputs, outs, dynamic, varying_dims(outs, other_outputs)))
