"""Per-model linear ``y[n] = act(x[n] @ W[n]^T + b[n])`` with the bias and the activation fused in the epilogue.

``batched_linear`` takes one input per model (``[N, *, K]``); ``wide_linear`` one input shared by all models
(``[*, K]``, read once) and returns the N outputs side by side (``[*, N*M]``, model-major). On CUDA tensors they
run the Triton kernels (kernels/linear/triton.py); on the CPU, for fp32 inference with 2-32 rows per model and
at least 1 MB of weights, the C kernel of ``cpu.py`` (a GEMM that streams the weights once; 1.0-2.4x faster than
MKL's bmm there); anywhere else the aten reference (``reference.py``). The backend "reference" runs the aten
reference everywhere.
"""

from __future__ import annotations

import math

from typing import Optional

from torch import Tensor

from .. import _backend
from . import cpu, reference
from .reference import ACTIVATIONS

__all__ = ["batched_linear", "wide_linear", "ACTIVATIONS"]


def _check(op: str, x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, per_model: bool) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"fusecc.kernels.{op}: unknown activation {act!r}; expected one of {list(ACTIVATIONS)}")
    if weight.dim() != 3:
        raise ValueError(f"fusecc.kernels.{op}: weight must be [N, M, K], got shape {tuple(weight.shape)}")
    n, m, k = weight.shape
    want = "[N, *, K]" if per_model else "[*, K]"
    if x.dim() < (2 if per_model else 1) or x.shape[-1] != k or (per_model and x.shape[0] != n):
        raise ValueError(f"fusecc.kernels.{op}: x must be {want} with N={n}, K={k}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (n, m):
        raise ValueError(f"fusecc.kernels.{op}: bias must be [N, M] = [{n}, {m}], got shape {tuple(bias.shape)}")


def _apply(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str, shared: bool, interleaved: bool) -> Tensor:
    from .function import LinearFunction
    from .triton import ACT_CODES

    return LinearFunction.apply(x, weight, bias, ACT_CODES[act], shared, interleaved)


def batched_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none", *,
                   backend: Optional[str] = None) -> Tensor:
    """Per-model linear on per-model inputs.

    Args:
        x: ``[N, *, K]``, model n's rows in ``x[n]``.
        weight: ``[N, M, K]``.
        bias: ``[N, M]`` or None.
        act: epilogue activation, one of ``"none"``, ``"relu"``, ``"gelu"`` (erf), ``"silu"``.
        backend: ``"auto"`` (Triton on CUDA), ``"triton"`` or ``"reference"``; None: ``fusecc.kernels``' default.

    Returns:
        ``[N, *, M]``.

    Examples::

        >>> x, w, b = torch.randn(4, 8, 32), torch.randn(4, 16, 32), torch.randn(4, 16)
        >>> batched_linear(x, w, b, "relu").shape
        torch.Size([4, 8, 16])
    """
    _check("batched_linear", x, weight, bias, act, True)
    n, m, k = weight.shape
    flat = x.dim() == 3  # the usual [N, B, K]: no reshapes (each costs microseconds on a small layer)
    x3 = x if flat else x.reshape(n, -1 if k else math.prod(x.shape[1:-1]), k)  # (-1 is ambiguous when K = 0)
    backend = _backend.resolve(backend, "batched_linear")  # once: it reads the environment
    if not _backend.use_triton([x, weight, bias], backend, "batched_linear"):
        if cpu.applies(x3, weight, bias, backend):
            y = cpu.small_gemm(x3, weight, bias, act)
        else:
            y = reference.batched_linear(x3, weight, bias, act)
    else:
        _backend.check_dtypes("batched_linear", x=x, weight=weight, bias=bias)
        y = _apply(x3, weight, bias, act, False, False)
    return y if flat else y.reshape((n,) + tuple(x.shape[1:-1]) + (m,))


def batched_linear_out(x: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor, *,
                       backend: Optional[str] = None) -> Tensor:
    """:func:`batched_linear` written into ``out``, for calls nothing differentiates (no autograd through ``out``).

    ``out`` ``[N, R, M]`` may have any strides with a contiguous last dim: a caller writes the GEMM straight into its
    final layout (a transposed view of a channels-last conv output, say) instead of copying it there afterwards.
    x is ``[N, R, K]``, weight ``[N, M, K]``, bias ``[N, M]`` or None. The backend picks, as for every kernel call:
    Triton (then one copy into ``out``), fusecc's CPU small-batch kernel where it applies, else ``bmm``/``baddbmm``
    with ``out=``.
    """
    _check("batched_linear_out", x, weight, bias, "none", True)
    backend = _backend.resolve(backend, "batched_linear_out")
    if _backend.use_triton([x, weight, bias], backend, "batched_linear_out"):
        return out.copy_(_apply(x, weight, bias, "none", False, False))
    if cpu.applies(x, weight, bias, backend):
        return cpu.small_gemm(x, weight, bias, out=out)
    return reference.batched_linear_out(x, weight, bias, out)


def wide_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, act: str = "none", *,
                backend: Optional[str] = None) -> Tensor:
    """Per-model linear on ONE input shared by all models, read once.

    Args:
        x: ``[*, K]``, the same for every model.
        weight: ``[N, M, K]``; bias ``[N, M]`` or None; act and backend as in :func:`batched_linear`.

    Returns:
        ``[*, N*M]``: model n's output in columns ``n*M:(n+1)*M``.

    Examples::

        >>> x, w = torch.randn(8, 32), torch.randn(4, 16, 32)
        >>> wide_linear(x, w, None, "gelu").shape
        torch.Size([8, 64])
    """
    _check("wide_linear", x, weight, bias, act, False)
    n, m, k = weight.shape
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1 if k else math.prod(lead), k)
    backend = _backend.resolve(backend, "wide_linear")
    if not _backend.use_triton([x, weight, bias], backend, "wide_linear"):
        if cpu.applies(x2[None], weight, bias, backend):
            # one "model" with the N weights side by side: [R, N*M], model-major, as the reference's
            y = cpu.small_gemm(x2[None], weight.reshape(1, n * m, k), None if bias is None else bias.reshape(1, -1),
                               act)[0]
        else:
            y = reference.wide_linear(x2, weight, bias, act)
    else:
        _backend.check_dtypes("wide_linear", x=x, weight=weight, bias=bias)
        y = _apply(x2, weight, bias, act, True, True).permute(1, 0, 2).reshape(x2.shape[0], n * m)
    return y.reshape(lead + (n * m,))
