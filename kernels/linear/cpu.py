"""The CPU kernel for per-model linears with few rows per model (fp32 inference): cpu_gemm.c.

An MLP fleet at batch 8, or a conv on a 1x1 map, is a batched GEMM with a handful of rows per model: reading the
N weight matrices is the whole cost. torch's ``bmm`` (MKL) packs every weight on each call and reads the weights at
9-11 GB/s on this project's 2-core machine; cpu_gemm.c streams each weight once, at 22-32 GB/s from DRAM
(bench/bench_small_gemm.py has the figures).

The C source is compiled at first use with the system C compiler (``$CC``, else ``cc``/``gcc``) into the fusecc
cache (``$FUSECC_CACHE_DIR`` or ``~/.cache/fusecc``), keyed by the source, the compiler and its flags; it is
loaded with ctypes. Where it cannot be built (no compiler, a failed build) one warning says why and fusecc runs
torch's ``bmm`` instead: same results, slower; on CPUs it is not written for (not x86-64, no AVX2/FMA) ``bmm``
runs without a warning. ``FUSECC_CPU_KERNELS=0`` turns it off,
``status()`` says whether it is in use.

It is used for CPU fp32 tensors with grad mode off or no operand needing a gradient (it has no backward),
``MIN_ROWS`` to ``MAX_ROWS`` rows per model (above that MKL's packing pays for itself) and at least
``MIN_WEIGHTS`` weight elements; never under torch.jit.trace/script (a TorchScript artifact holds aten ops only,
and ``fusecc.export`` runs the aten reference). Under torch.compile it runs as the custom op
``torch.ops.fusecc.small_gemm``.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _backend, _cpu_build
from .reference import activation_

# rows per model where the kernel beats MKL's bmm (bench/bench_small_gemm.py, cold caches). First measured at N=16:
# 1.6-2.4x at 2-8 rows, 1.0-1.5x at 16-32. Measured again on 2026-11-30 (N=8 and 16, the same 2-core Xeon type,
# seven layer shapes): 0.96-1.08x at 8 rows, 0.75-1.08x at 16, 0.52-0.89x at 32 (and BERT-small x 8 at 32 tokens
# per model ran 25% faster on bmm): the kernel is kept where it does not lose
MIN_ROWS, MAX_ROWS = 2, 8
# below this many weight elements (all models) the layer sits in cache and the call overhead decides: bmm's is
# smaller (8 x Linear(64, 64): 14 vs 22 us; 8 x Linear(256, 128): the kernel 1.06x faster)
MIN_WEIGHTS = 256 * 1024
ACT_CODES = {"none": 0, "relu": 1}  # in the kernel's epilogue; gelu and silu run in place on its output
FLAGS = _cpu_build.FLAGS
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_gemm.c")

_lock = threading.Lock()
_state: dict = {}  # "lib": the loaded CDLL or None, "why": the reason it is not in use


def _build() -> Tuple[Optional[ctypes.CDLL], str]:
    """(the loaded library, "") or (None, why not)."""
    lib, why = _cpu_build.build(SOURCE, "cpu_gemm", FLAGS)
    if lib is None:
        return None, why
    fn = lib.fusecc_small_gemm
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, ptr, i64, i64, i64, i64, i64, i64,
                   ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return lib, ""


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernel library, built on first use; None (after one warning) where it cannot be."""
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                lib, why = _build()
                _state["why"] = why
                _state["lib"] = lib
                # no warning where the kernel cannot apply (turned off, another CPU): nothing for the user to fix
                if lib is None and not why.startswith(("turned off", "needs ")):
                    warnings.warn(f"fusecc: the CPU small-batch GEMM kernel is not in use ({why}); per-model "
                                  "linears with few rows run on torch's bmm instead (same results, slower). "
                                  "FUSECC_CPU_KERNELS=0 silences this.", RuntimeWarning, stacklevel=3)
    return _state["lib"]


def status() -> str:
    """"in use: <path>" or "not in use: <why>"."""
    lib = library()
    return f"in use: {lib._name}" if lib is not None else f"not in use: {_state['why']}"


def _reset() -> None:
    """Forget the loaded library (tests: rebuild under another environment)."""
    with _lock:
        _state.clear()


def available() -> bool:
    """Whether the kernel is built and loaded (building it on first use)."""
    return library() is not None


# torch.compile runs available() once while tracing and keeps its result (torch.compiler.assume_constant_result,
# whose decorator would import torch._dynamo at `import fusecc`: it only sets this attribute)
available._dynamo_marked_constant = True  # type: ignore[attr-defined]


def applies(x: Tensor, weight: Tensor, bias: Optional[Tensor], backend: Optional[str] = None) -> bool:
    """Whether ``small_gemm`` may run this per-model linear (x ``[N, R, K]``, weight ``[N, O, K]``).

    Only under the backend "auto" (``backend``, else ``fusecc.kernels``' default; "reference" means aten ops only).
    Never under torch.jit.trace/script (a TorchScript artifact must hold aten ops only); under torch.compile the
    kernel runs as the custom op ``torch.ops.fusecc.small_gemm``."""
    if not _backend.use_cpu_kernels(backend, "small_gemm"):
        return False
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    if x.dim() != 3 or weight.dim() != 3 or not MIN_ROWS <= x.shape[1] <= MAX_ROWS or weight.numel() < MIN_WEIGHTS:
        return False
    ts = (x, weight) if bias is None else (x, weight, bias)
    # (float32 rules out quantized tensors; the strided layout sparse and mkldnn ones)
    if any(t.dtype != torch.float32 or t.device.type != "cpu" or t.layout != torch.strided
           or type(t) not in (Tensor, torch.nn.Parameter) for t in ts):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in ts):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    return available()


def _rows(t: Tensor) -> Tensor:
    """t with a contiguous last dim (a view when it already is)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def small_gemm(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: str = "none",
               out: Optional[Tensor] = None) -> Tensor:
    """``act(x[n] @ weight[n]^T + bias[n])`` for every n; x ``[N, R, K]``, weight ``[N, O, K]``, bias ``[N, O]``.

    ``out`` ``[N, R, O]`` (any strides with a contiguous last dim) receives the result; one is allocated when None.
    The caller checks ``applies`` first.
    """
    code = ACT_CODES.get(act, 0)  # gelu/silu: after the kernel, in place
    if torch.compiler.is_compiling():
        if out is not None:
            raise ValueError("fusecc.kernels.linear.cpu.small_gemm: out= is for eager calls, not under torch.compile")
        y = torch.ops.fusecc.small_gemm(x, weight, bias, code)
    elif out is None:
        y = _run(x, weight, bias, code)
    else:
        n, r, o = x.shape[0], x.shape[1], weight.shape[1]
        if out.shape != (n, r, o) or out.stride(-1) != 1 or out.dtype != x.dtype:
            raise ValueError(f"fusecc.kernels.linear.cpu: out must be [{n}, {r}, {o}] float32 with a contiguous "
                             f"last dim, got {tuple(out.shape)} {out.dtype} strides {out.stride()}")
        y = _launch(x, weight, bias, code, out)
    return y if act in ACT_CODES else activation_(y, act)


def _run(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int) -> Tensor:
    """The kernel into a new ``[N, R, O]`` tensor (eager calls run this directly: the op's dispatch costs more)."""
    return _launch(x, weight, bias, act, _backend.new_empty((x.shape[0], x.shape[1], weight.shape[1]), x))


def _launch(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, out: Tensor) -> Tensor:
    """Runs the kernel into ``out`` and returns it."""
    n, r, k = x.shape
    o = weight.shape[1]
    x, weight = _rows(x), _rows(weight)
    if out.numel():
        _backend.launch_counts["small_gemm"] += 1
        bias = None if bias is None else bias.contiguous()
        bp, sbn = (bias.data_ptr(), bias.stride(0)) if bias is not None else (None, 0)
        library().fusecc_small_gemm(x.data_ptr(), x.stride(0), x.stride(1), weight.data_ptr(), weight.stride(0),
                                    weight.stride(1), bp, sbn, 1, out.data_ptr(), out.stride(0), out.stride(1),
                                    n, r, k, o, act, torch.get_num_threads())
    return out


@torch.library.custom_op("fusecc::small_gemm", mutates_args=(), device_types="cpu")
def _small_gemm_op(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int) -> Tensor:
    """The kernel as an op torch.compile can put in its graph (inductor calls it as an external kernel)."""
    return _run(x, weight, bias, act)


@_small_gemm_op.register_fake
def _(x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int) -> Tensor:
    return x.new_empty((x.shape[0], x.shape[1], weight.shape[1]))
