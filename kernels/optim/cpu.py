"""The CPU RMSprop step in one pass over memory (cpu_rmsprop.c), for ``fusecc.optim.RMSprop``.

torch has fused CPU kernels for Adam(W) and SGD (``fusecc.optim`` runs them once per model over its slices) but
none for RMSprop, whose foreach path makes five or six passes over parameters and states. The C kernel makes one,
with every hyper-parameter per model. Built at first use like the small-batch GEMM (kernels/_cpu_build.py); where
it cannot be (no compiler, not x86-64 with AVX2), ``rmsprop_step`` returns False and the caller runs torch ops.
"""

from __future__ import annotations

import ctypes
import os
import threading
from typing import Optional, Sequence

import torch
from torch import Tensor

from .. import _cpu_build

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_rmsprop.c")
_lock = threading.Lock()
_state: dict = {}


def library() -> Optional[ctypes.CDLL]:
    if "lib" not in _state:
        with _lock:
            if "lib" not in _state:
                # -fno-math-errno: sqrtf vectorizes (it sets no errno; torch's sqrt does not either)
                lib, why = _cpu_build.build(SOURCE, "cpu_rmsprop", _cpu_build.FLAGS + ("-fno-math-errno",))
                if lib is not None:
                    p, i64, i, dbl = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.POINTER(ctypes.c_double)
                    ints = ctypes.POINTER(ctypes.c_int)
                    lib.fusecc_rmsprop_f32.argtypes = [p, p, p, p, p, i64, i64, dbl, dbl, dbl, dbl, dbl, i, ints, i]
                    lib.fusecc_rmsprop_f32.restype = None
                _state["lib"], _state["why"] = lib, why
    return _state["lib"]


def usable(*tensors: Optional[Tensor]) -> bool:
    """Whether the kernel can update these tensors: CPU float32, contiguous, [N, ...] of one shape."""
    ref = tensors[0]
    return all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
                             and t.shape == ref.shape and t.layout == torch.strided) for t in tensors) \
        and ref.dim() >= 1 and library() is not None


def _doubles(vals: Sequence[float]) -> ctypes.Array:
    return (ctypes.c_double * len(vals))(*vals)


def rmsprop_step(p: Tensor, grad: Tensor, square_avg: Tensor, momentum_buffer: Optional[Tensor],
                 grad_avg: Optional[Tensor], lr: Sequence[float], alpha: Sequence[float], eps: Sequence[float],
                 weight_decay: Sequence[float], momentum: Sequence[float], centered: bool,
                 maximize: Sequence[bool]) -> None:
    """One RMSprop step of a stacked parameter ``p [N, ...]`` in place (its states too), model n with ``lr[n]``,
    ``maximize[n]``..."""
    n = p.shape[0]
    length = p.numel() // n if n else 0

    def ptr(t: Optional[Tensor]) -> Optional[int]:
        return None if t is None else t.data_ptr()

    library().fusecc_rmsprop_f32(ptr(p), ptr(grad), ptr(square_avg), ptr(momentum_buffer), ptr(grad_avg), n, length,
                                 _doubles(lr), _doubles(alpha), _doubles(eps), _doubles(weight_decay),
                                 _doubles(momentum), int(centered), (ctypes.c_int * n)(*[int(m) for m in maximize]),
                                 torch.get_num_threads())
