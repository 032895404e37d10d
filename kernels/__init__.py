"""Triton kernels for fusecc's fused ops, installed as ``fusecc.kernels``.

One folder per op, each with four thin layers: ``triton.py`` (the @triton.jit kernels and their launchers,
registered as ``torch.ops.fusecc.*`` custom ops), ``function.py`` (the torch.autograd.Function), ``reference.py``
(pure PyTorch: the CPU path, the export path and the test oracle) and ``__init__.py`` (the functional API, which
picks the backend once per call):

- ``fusecc.kernels.linear``: ``batched_linear`` / ``wide_linear``, ``act(x @ W^T + b)`` per model, bias and
  activation in the epilogue;
- ``fusecc.kernels.conv1x1``: per-model pointwise convolution as a GEMM on channels-last data;
- ``fusecc.kernels.layer_norm``: per-model LayerNorm;
- ``fusecc.kernels.routed_linear``: each row routed to its model's weights (serving);
- ``fusecc.kernels.lora``: every model's LoRA update ``scale * (x @ A^T) @ B^T`` in one launch (shrink and expand
  fused, like Punica's SGMV), on routed rows or ``[N, T, K]``;
- ``fusecc.kernels.optim``: the SGD-momentum / Adam(W) step over all stacked parameters, per-model settings.

Backends: Triton on CUDA tensors, the reference anywhere else; ``FUSECC_KERNELS=reference`` or
``with fusecc.kernels.use_backend("reference"):`` forces the reference on CUDA too (A/B comparison), and
``"triton"`` forces the kernels, which on CPU tensors needs ``TRITON_INTERPRET=1`` (how the tests run them).

Importing this package does not import triton: only a call that runs a kernel does. It must not import torch.fx.
"""

from ._backend import BACKENDS, default_backend, use_backend

__all__ = ["BACKENDS", "default_backend", "use_backend"]
