"""The one place that picks Triton or the pure-PyTorch reference for a kernel call, and launches kernels.

Backends:

- ``"auto"`` (default): Triton when every tensor argument is on a CUDA device and triton imports; the reference
  (aten ops only) otherwise. CPU tensors therefore never touch triton, and a CPU-only torch build without
  triton works.
- ``"reference"``: the reference everywhere, CUDA included: the A/B switch for comparing against Triton.
- ``"triton"``: Triton everywhere. On CPU tensors this needs the Triton interpreter (``TRITON_INTERPRET=1`` set
  before triton is imported); that is how the test suite runs every kernel without a GPU.

The backend is set by the environment variable ``FUSECC_KERNELS`` (read at each call), by
``with fusecc.kernels.use_backend("reference"):``, or per call (``backend=`` on every functional op). The
argument wins over the context manager, which wins over the environment.

This module must not import triton at import time: only a call that picks Triton imports it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections import Counter
from typing import Any, Callable, Iterator, Optional, Sequence

import torch

BACKENDS = ("auto", "triton", "reference")

_local = threading.local()


def interpreting() -> bool:
    """True when triton kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _check(name: str, where: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"fusecc.kernels: unknown backend {name!r} from {where}; expected one of {list(BACKENDS)}")
    return name


def default_backend() -> str:
    """The backend in force: the innermost ``use_backend`` block, else ``$FUSECC_KERNELS``, else ``"auto"``."""
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    return _check(os.environ.get("FUSECC_KERNELS", "auto") or "auto", "$FUSECC_KERNELS")


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the kernel calls inside the block on ``name`` ("auto", "triton" or "reference")."""
    _check(name, "use_backend()")
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(backend: Optional[str], op: str = "") -> str:
    """The backend a call runs on: ``backend`` (checked) or, when None, ``default_backend()``."""
    return default_backend() if backend is None else _check(backend, f"backend= of {op or 'a kernel call'}")


def use_triton(tensors: Sequence[Optional[torch.Tensor]], backend: Optional[str] = None, op: str = "") -> bool:
    """Whether a call with these tensor arguments runs its Triton kernel (True) or its reference (False)."""
    name = resolve(backend, op)
    if name == "reference":
        return False
    ts = [t for t in tensors if t is not None]
    on_cuda = len(ts) > 0 and all(t.is_cuda for t in ts)  # (not bool(ts): dynamo before torch 2.13 cannot trace it)
    if name == "auto":  # float64 and other dtypes the kernels do not take stay on the reference
        return on_cuda and all(t.dtype in SUPPORTED_DTYPES for t in ts if t.is_floating_point()) and triton_available()
    # forced triton
    if not triton_available():
        raise RuntimeError(f"fusecc.kernels: {op}: backend 'triton' was asked for but triton does not import")
    if not on_cuda and not interpreting():
        devices = sorted({str(t.device) for t in ts})
        raise RuntimeError(
            f"fusecc.kernels: {op}: backend 'triton' on {devices} tensors needs the Triton interpreter; set "
            "TRITON_INTERPRET=1 before triton is imported, or use backend 'auto'/'reference'"
        )
    return True


def use_cpu_kernels(backend: Optional[str] = None, op: str = "") -> bool:
    """Whether a CPU call may run fusecc's C kernels (kernels/linear/cpu.py): under "auto" only; "reference" means
    aten ops only."""
    return resolve(backend, op) == "auto"


def check_model_index(op: str, idx: torch.Tensor, rows: int, n: int, models: str) -> None:
    """The routed ops' ``idx``: an integer tensor ``[rows]`` of model indices in ``[-1, n)`` (-1: a row of no
    model). ``models`` names the N models in the message ("weight with N = 3 models"). The range check reads idx on
    the host, so it is skipped while compiling or capturing a CUDA graph."""
    p = f"fusecc.kernels.{op}"
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise TypeError(f"{p}: idx must hold integer model indices, got {idx.dtype}; use idx.long()")
    if tuple(idx.shape) != (rows,):
        raise ValueError(f"{p}: expected idx of shape [R] = [{rows}] (one model index per row of x), "
                         f"got {list(idx.shape)}")
    capturing = idx.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing and not torch.compiler.is_compiling() and idx.numel():
        bad = (idx < -1) | (idx >= n)
        if bool(bad.any()):
            pos = int(bad.nonzero()[0, 0])
            raise ValueError(f"{p}: idx[{pos}] = {int(idx[pos])} is out of range: model indices must be in "
                             f"[-1, {n}) for {models} (-1: the row belongs to no model)")


def _is_fake(t: Any) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return isinstance(t, torch.Tensor) and is_fake(t)


launch_counts: Counter = Counter()  # kernel name -> launches, for tests that must see a kernel run


def _kernel_name(kernel: Any) -> str:
    while hasattr(kernel, "fn") or hasattr(kernel, "kernel"):
        kernel = getattr(kernel, "fn", None) or getattr(kernel, "kernel")
    return getattr(kernel, "__name__", repr(kernel))


def launch(kernel: Any, grid: Callable[[dict], tuple] | tuple, *args: Any, **kwargs: Any) -> None:
    """Launch a triton kernel from inside a ``torch.library.triton_op`` body.

    Call it as ``launch(wrap_triton(_my_kernel), grid, ...)``: written out like that in the op body, torch finds the
    kernel in the op's source (its AOTAutograd cache key hashes the kernel), and torch.compile / torch.export see the
    launch. On fake tensors under the interpreter (shape propagation, ``opcheck``'s fake-tensor test) no kernel can
    run, so nothing is launched: the op body has already allocated its outputs, which is all a fake run needs.
    """
    if interpreting() and any(_is_fake(a) for a in list(args) + list(kwargs.values())):
        return
    from torch._higher_order_ops.triton_kernel_wrap import TraceableTritonKernelWrapper
    from torch.library import wrap_triton
    from triton.runtime.jit import JITFunction
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, (JITFunction, Autotuner)) or (interpreting() and not isinstance(
            kernel, TraceableTritonKernelWrapper)):
        kernel = wrap_triton(kernel)
    launch_counts[_kernel_name(kernel)] += 1
    kernel[grid](*args, **kwargs)


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether a kernel must upcast its dot operands to fp32: the interpreter's bf16 dot is wrong (it computes in
    bf16 via numpy), so under ``TRITON_INTERPRET=1`` bf16 tiles are cast to fp32 before ``tl.dot``."""
    return interpreting() and dtype == torch.bfloat16


def allow_tf32(dtype: torch.dtype) -> bool:
    """fp32 dots follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default: exact fp32, as cuBLAS does)."""
    return dtype == torch.float32 and bool(torch.backends.cuda.matmul.allow_tf32) and not interpreting()


SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_dtypes(op: str, **tensors: Optional[torch.Tensor]) -> torch.dtype:
    """All given tensors share one float dtype that the kernels support; return it (clear error otherwise)."""
    present = {k: t for k, t in tensors.items() if t is not None}
    dtypes = {t.dtype for t in present.values()}
    if len(dtypes) != 1:
        got = ", ".join(f"{k}={t.dtype}" for k, t in present.items())
        raise TypeError(f"fusecc.kernels.{op}: expected one dtype for all tensors, got {got}; cast them to one dtype")
    (dt,) = dtypes
    if dt not in SUPPORTED_DTYPES:
        raise TypeError(f"fusecc.kernels.{op}: Triton kernels take {list(SUPPORTED_DTYPES)}, got {dt}; "
                        "use backend='reference' for other dtypes")
    return dt


def poisoning() -> bool:
    """Test aid (``FUSECC_KERNELS_POISON=1``): outputs of Triton launchers start as NaN instead of uninitialised
    memory, so an element a kernel forgets to write fails the comparison with the reference."""
    return os.environ.get("FUSECC_KERNELS_POISON", "0") not in ("", "0")


def new_empty(shape: Sequence[int], like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An output buffer for a kernel (NaN-filled when poisoning, for float dtypes)."""
    out = torch.empty(tuple(shape), dtype=like.dtype if dtype is None else dtype, device=like.device)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def new_empty_like(t: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(t)`` (strides kept for dense tensors), NaN-filled when poisoning."""
    out = torch.empty_like(t)
    if poisoning() and out.is_floating_point():
        out.fill_(float("nan"))
    return out
