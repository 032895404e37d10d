"""The functions the fused graph calls at run time, one module per op family (beside fusecc/rules/).

A rule (fusecc/rules/<family>.py) decides *what* a node of the model becomes and where the model dimension sits;
the function it emits, from fusecc/runtime/<family>.py, decides *how* that is computed (a batched GEMM, a grouped
conv, a per-model GEMM over a conv's live taps, ...). They use aten ops and fusecc's kernels
(``fusecc.kernels.<op>``, whose functional layer is the one place that picks aten, the CPU kernel or Triton), so a
fused module runs on any device and exports to TorchScript and torch.export.

Shapes use N for the number of models. A "stacked" parameter is ``[N, *per_model_shape]``; a "folded" activation
merges the model dim into a per-model dim, model-major (``[B, N*C, H, W]``).
"""

from . import attention, conv, derived, embedding, linear, loop, norm, shape  # noqa: F401,E402 (runtime.conv.*, ...)
