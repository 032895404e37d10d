"""Fused multi-model optimizer steps in Triton: one launch updates every stacked parameter of a dtype group.

Multi-tensor apply. The launcher writes a device table with one row per parameter tensor: the addresses of the
param, its grad and its state tensors, and its numel per model. Each tensor of ``N * numel`` elements is cut into
blocks of ``BLOCK``; ``block_start[t]`` is the first program of tensor t. Program ``pid`` binary-searches
``block_start`` for its tensor, casts the addresses to pointers and updates one block. The model of an element is
``offset // numel``; it indexes the ``[R, N]`` table of per-model coefficients (``reference.SGD_ROWS`` /
``ADAM_ROWS``). A block inside one model (most blocks of a large tensor) loads its coefficients once, as scalars,
and runs unmasked, so that its loads and stores vectorize; the others (tails, blocks across models, small tensors)
gather the coefficients per lane under a mask.

The ops are ``torch.library.custom_op`` (not ``triton_op``): the kernels read addresses out of a table, which
fake and functional tensors (torch.compile, torch.export tracing a ``triton_op`` body) do not have, and which would
hide the mutated tensors from ``wrap_triton``'s mutation analysis anyway. An opaque custom op with
``mutates_args`` is what torch.compile can reason about.
"""

import collections
from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._aot import KernelSpec
from .._backend import SUPPORTED_DTYPES, interpreting, launch

BLOCK = 1024
NUM_WARPS = 8  # 4 elements per thread: one 16-byte access per fp32 tensor, 32-48 registers (full occupancy)
_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# launches per op, so tests can assert "one launch per dtype group"
launches: collections.Counter = collections.Counter()


@triton.jit
def _find_block(BLOCK_START, num_tensors, search_steps, BLOCK: tl.constexpr):
    """The tensor (table row) this program updates, and the offset of its block in that tensor."""
    pid = tl.program_id(0)
    lo = pid * 0
    hi = lo + num_tensors
    for _ in range(search_steps):  # invariant: block_start[lo] <= pid < block_start[hi]
        mid = (lo + hi) // 2
        go = tl.load(BLOCK_START + mid) <= pid
        lo = tl.where(go, mid, lo)
        hi = tl.where(go, hi, mid)
    start = (pid - tl.load(BLOCK_START + lo)).to(tl.int64) * BLOCK
    return lo, start


@triton.jit
def _address(TABLE, col, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Column ``col`` of the table row as a pointer to DTYPE (16-byte aligned when the launcher checked so)."""
    p = tl.load(TABLE + col).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _sgd_block(ROW, HP, start, model0, r0, numel, rem, num_models, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
               HAS_MOMENTUM: tl.constexpr, NESTEROV: tl.constexpr, MAXIMIZE: tl.constexpr,
               FIRST_STEP: tl.constexpr, ALIGNED: tl.constexpr, UNIFORM: tl.constexpr):
    local = tl.arange(0, BLOCK)
    if UNIFORM:  # the block lies in one model: its coefficients are scalars, every lane is in bounds
        mask = None
        model = model0
    else:  # the model of each lane, (offset in the tensor) // numel, as the block starts at offset r0 of model0
        mask = local < rem
        model = model0 + (r0 + local) // numel.to(tl.int32)
    P = _address(ROW, 0, DTYPE, ALIGNED) + start
    G = _address(ROW, 1, DTYPE, ALIGNED) + start
    lr = tl.load(HP + model, mask=mask)
    wd = tl.load(HP + num_models + model, mask=mask)
    # fp32 math: lr * d is orders of magnitude below p, and fp16/bf16 would round every intermediate;
    # one rounding at the store, as torch's own kernels compute in fp32 "opmath"
    p = tl.load(P + local, mask=mask).to(tl.float32)
    g = tl.load(G + local, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    d = tl.where(wd != 0, g + wd * p, g)  # torch skips the L2 term when weight_decay == 0
    if HAS_MOMENTUM:
        B = _address(ROW, 2, DTYPE, ALIGNED) + start
        mom = tl.load(HP + 2 * num_models + model, mask=mask)
        if FIRST_STEP:
            buf = d  # torch's first step: buf = grad.clone()
        else:
            one_minus_dampening = tl.load(HP + 3 * num_models + model, mask=mask)
            buf = tl.load(B + local, mask=mask).to(tl.float32) * mom + one_minus_dampening * d
        tl.store(B + local, buf.to(DTYPE), mask=mask)
        if NESTEROV:
            upd = d + mom * buf
        else:
            upd = buf
        d = tl.where(mom != 0, upd, d)  # models without momentum take the plain gradient
    tl.store(P + local, (p + (-lr) * d).to(DTYPE), mask=mask)


@triton.jit
def _sgd_kernel(
    TABLE,  # *i64 [T, 4]: per tensor, the address of the param, of its grad, of its momentum buffer, numel per model
    BLOCK_START,  # *i64 [T + 1]: the first program of each tensor, then the number of programs
    HP,  # *fp32 [4, N]: per-model lr, weight_decay, momentum, 1 - dampening (reference.SGD_ROWS)
    num_tensors,  # T
    num_models,  # N
    search_steps,  # ceil(log2(T)): iterations of the binary search over BLOCK_START
    DTYPE: tl.constexpr,  # element type of params, grads and buffers
    BLOCK: tl.constexpr,
    HAS_MOMENTUM: tl.constexpr,
    NESTEROV: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    FIRST_STEP: tl.constexpr,  # write the momentum buffers (buf = d) instead of reading them
    ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes
):
    t, start = _find_block(BLOCK_START, num_tensors, search_steps, BLOCK)
    ROW = TABLE + t * 4
    numel = tl.load(ROW + 3)
    rem = numel * num_models - start
    model0 = start // numel
    r0 = (start - model0 * numel).to(tl.int32)
    if r0 + BLOCK <= numel:  # the block lies in one model (most blocks of a large tensor): scalar coefficients
        _sgd_block(ROW, HP, start, model0, r0, numel, rem, num_models, DTYPE, BLOCK, HAS_MOMENTUM, NESTEROV,
                   MAXIMIZE, FIRST_STEP, ALIGNED, True)
    else:
        _sgd_block(ROW, HP, start, model0, r0, numel, rem, num_models, DTYPE, BLOCK, HAS_MOMENTUM, NESTEROV,
                   MAXIMIZE, FIRST_STEP, ALIGNED, False)


@triton.jit
def _adam_block(ROW, HP, start, model0, r0, numel, rem, num_models, DTYPE: tl.constexpr, BLOCK: tl.constexpr,
                DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, ALIGNED: tl.constexpr,
                UNIFORM: tl.constexpr):
    local = tl.arange(0, BLOCK)
    if UNIFORM:  # the block lies in one model: its coefficients are scalars, every lane is in bounds
        mask = None
        model = model0
    else:  # the model of each lane, (offset in the tensor) // numel, as the block starts at offset r0 of model0
        mask = local < rem
        model = model0 + (r0 + local) // numel.to(tl.int32)
    P = _address(ROW, 0, DTYPE, ALIGNED) + start
    G = _address(ROW, 1, DTYPE, ALIGNED) + start
    M = _address(ROW, 2, DTYPE, ALIGNED) + start
    V = _address(ROW, 3, DTYPE, ALIGNED) + start
    # fp32 math: the moments and the update span many orders of magnitude, and fp16/bf16 would round every
    # intermediate; one rounding at each store, as torch's own kernels compute in fp32 "opmath"
    p = tl.load(P + local, mask=mask).to(tl.float32)
    g = tl.load(G + local, mask=mask).to(tl.float32)
    if MAXIMIZE:
        g = -g
    if DECOUPLED:
        p = p * tl.load(HP + num_models + model, mask=mask)  # 1 - lr * weight_decay
    else:
        wd = tl.load(HP + model, mask=mask)
        g = tl.where(wd != 0, g + wd * p, g)  # torch skips the L2 term when weight_decay == 0
    w = tl.load(HP + 2 * num_models + model, mask=mask)  # 1 - beta1
    beta2 = tl.load(HP + 3 * num_models + model, mask=mask)
    one_minus_beta2 = tl.load(HP + 4 * num_models + model, mask=mask)
    neg_step_size = tl.load(HP + 5 * num_models + model, mask=mask)
    one = None if UNIFORM else 1.0  # no 0 / 0 in the lanes past the end of a tail block (never stored)
    bias_correction2_sqrt = tl.load(HP + 6 * num_models + model, mask=mask, other=one)
    eps = tl.load(HP + 7 * num_models + model, mask=mask, other=one)
    m = tl.load(M + local, mask=mask).to(tl.float32)
    v = tl.load(V + local, mask=mask).to(tl.float32)
    m = tl.where(w < 0.5, m + w * (g - m), g - (g - m) * (1 - w))  # exp_avg.lerp_(grad, 1 - beta1), as aten
    v = v * beta2 + (one_minus_beta2 * g) * g
    tl.store(M + local, m.to(DTYPE), mask=mask)
    tl.store(V + local, v.to(DTYPE), mask=mask)
    if AMSGRAD:
        VMAX = _address(ROW, 4, DTYPE, ALIGNED) + start
        v = tl.maximum(tl.load(VMAX + local, mask=mask).to(tl.float32), v, propagate_nan=tl.PropagateNan.ALL)
        tl.store(VMAX + local, v.to(DTYPE), mask=mask)
    # IEEE sqrt and division (tl.sqrt and / are approximate on GPUs), as torch's
    denom = tl.div_rn(tl.sqrt_rn(v), bias_correction2_sqrt) + eps
    tl.store(P + local, (p + tl.div_rn(neg_step_size * m, denom)).to(DTYPE), mask=mask)


@triton.jit
def _adam_kernel(
    TABLE,  # *i64 [T, 6]: per tensor, the address of the param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, numel/model
    BLOCK_START,  # *i64 [T + 1]: the first program of each tensor, then the number of programs
    HP,  # *fp32 [8, N]: per-model coefficients (reference.ADAM_ROWS)
    num_tensors,  # T
    num_models,  # N
    search_steps,  # ceil(log2(T)): iterations of the binary search over BLOCK_START
    DTYPE: tl.constexpr,  # element type of params, grads and state
    BLOCK: tl.constexpr,
    DECOUPLED: tl.constexpr,  # AdamW: p *= 1 - lr * weight_decay, instead of grad += weight_decay * p
    AMSGRAD: tl.constexpr,
    MAXIMIZE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes
):
    t, start = _find_block(BLOCK_START, num_tensors, search_steps, BLOCK)
    ROW = TABLE + t * 6
    numel = tl.load(ROW + 5)
    rem = numel * num_models - start
    model0 = start // numel
    r0 = (start - model0 * numel).to(tl.int32)
    if r0 + BLOCK <= numel:  # the block lies in one model (most blocks of a large tensor): scalar coefficients
        _adam_block(ROW, HP, start, model0, r0, numel, rem, num_models, DTYPE, BLOCK, DECOUPLED, AMSGRAD, MAXIMIZE,
                    ALIGNED, True)
    else:
        _adam_block(ROW, HP, start, model0, r0, numel, rem, num_models, DTYPE, BLOCK, DECOUPLED, AMSGRAD, MAXIMIZE,
                    ALIGNED, False)


def _check_lists(op: str, names: Sequence[str], lists: Sequence[Sequence[Tensor]]) -> torch.dtype:
    """Every list as long as the first; every tensor contiguous and of its param's shape, dtype and device."""
    params = lists[0]
    if not params:
        raise ValueError(f"fusecc.kernels.{op}: 'params' is empty")
    n = params[0].shape[0] if params[0].dim() > 0 else 0
    dtype, device = params[0].dtype, params[0].device
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"fusecc.kernels.{op}: Triton kernels take {list(SUPPORTED_DTYPES)}, got {dtype}; "
                        "use backend='reference' for other dtypes")
    for name, ts in zip(names, lists):
        if len(ts) != len(params):
            raise ValueError(f"fusecc.kernels.{op}: '{name}' has {len(ts)} tensors, expected one per param "
                             f"({len(params)})")
        for i, (t, p) in enumerate(zip(ts, params)):
            if p.dim() == 0 or p.shape[0] != n:
                raise ValueError(f"fusecc.kernels.{op}: params[{i}] has shape {list(p.shape)}, expected [N={n}, ...]")
            if t.shape != p.shape or t.dtype != dtype or t.device != device:
                raise ValueError(f"fusecc.kernels.{op}: {name}[{i}] is {t.dtype} {list(t.shape)} on {t.device}, "
                                 f"expected {dtype} {list(p.shape)} on {device} like params[{i}]")
            if not t.is_contiguous():
                raise ValueError(f"fusecc.kernels.{op}: {name}[{i}] is not contiguous; the kernel addresses it as "
                                 "[N * numel] (call .contiguous(), or use backend='reference')")
    return dtype


def _tables(columns: Sequence[Sequence[Optional[Tensor]]], n: int, device: torch.device):
    """The int64 tensor table and block starts (one host-to-device copy), the tensor count and the alignment."""
    if interpreting() and device.type != "cpu":
        raise RuntimeError("fusecc.kernels.optim: the Triton interpreter copies only a kernel's tensor arguments to "
                           f"the host, not the {device} tensors its address table points to; run it on CPU tensors, "
                           "or unset TRITON_INTERPRET")
    rows: List[int] = []
    starts = [0]
    aligned = True
    for ts in zip(*columns):
        p = ts[0]
        if p.numel() == 0:
            continue
        per_model = p.numel() // n
        if per_model >= 2**31 - BLOCK:
            raise ValueError(f"fusecc.kernels.optim: a parameter of shape {list(p.shape)} has {per_model} elements "
                             f"per model; the kernels take fewer than 2**31 - {BLOCK}")
        ptrs = [t.data_ptr() if t is not None else 0 for t in ts]
        aligned = aligned and all(a % 16 == 0 for a in ptrs)
        rows.extend(ptrs + [per_model])
        starts.append(starts[-1] + triton.cdiv(p.numel(), BLOCK))
    num_tensors = len(starts) - 1
    both = torch.tensor(rows + starts, dtype=torch.int64).to(device)
    return both[: len(rows)], both[len(rows):], num_tensors, starts[-1], aligned


def _search_steps(num_tensors: int) -> int:
    return max(num_tensors - 1, 0).bit_length()


def _check_hparams(op: str, hparams: Tensor, rows: int, n: int, device: torch.device) -> None:
    if hparams.shape != (rows, n) or hparams.dtype != torch.float32 or hparams.device != device:
        raise ValueError(f"fusecc.kernels.{op}: hparams is {hparams.dtype} {list(hparams.shape)} on "
                         f"{hparams.device}, expected float32 [{rows}, N={n}] on {device}")


@torch.library.custom_op(
    "fusecc::sgd_step", mutates_args=("params", "momentum_buffers"),
    schema="(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor hparams, bool nesterov, "
           "bool maximize, bool first_step) -> ()")
def sgd_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], hparams: Tensor,
             nesterov: bool, maximize: bool, first_step: bool) -> None:
    """SGD over all ``[N, *]`` params in one launch; ``momentum_buffers`` empty for no momentum; ``hparams`` is
    ``reference.sgd_hparams(...)``."""
    has_momentum = len(momentum_buffers) > 0
    lists = [params, grads] + ([momentum_buffers] if has_momentum else [])
    dtype = _check_lists("sgd_step", ["params", "grads", "momentum_buffers"], lists)
    n, device = params[0].shape[0], params[0].device
    _check_hparams("sgd_step", hparams, 4, n, device)
    cols = [params, grads, momentum_buffers if has_momentum else [None] * len(params)]
    table, block_start, num_tensors, grid, aligned = _tables(cols, n, device)
    if grid == 0:
        return
    launches["sgd_step"] += 1
    launch(_sgd_kernel, (grid,), table, block_start, hparams, num_tensors, n, _search_steps(num_tensors),
           DTYPE=_TL[dtype], BLOCK=BLOCK, HAS_MOMENTUM=has_momentum, NESTEROV=nesterov, MAXIMIZE=maximize,
           FIRST_STEP=first_step, ALIGNED=aligned and not interpreting(), num_warps=NUM_WARPS)


@torch.library.custom_op(
    "fusecc::adam_step", mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"),
    schema="(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
           "Tensor(d!)[] max_exp_avg_sqs, Tensor hparams, bool decoupled, bool maximize) -> ()")
def adam_step(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
              max_exp_avg_sqs: List[Tensor], hparams: Tensor, decoupled: bool, maximize: bool) -> None:
    """Adam/AdamW over all ``[N, *]`` params in one launch; ``max_exp_avg_sqs`` non-empty for amsgrad;
    ``hparams`` is ``reference.adam_hparams(...)``."""
    amsgrad = len(max_exp_avg_sqs) > 0
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    dtype = _check_lists("adam_step", ["params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"], lists)
    n, device = params[0].shape[0], params[0].device
    _check_hparams("adam_step", hparams, 8, n, device)
    cols = [params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params)]
    table, block_start, num_tensors, grid, aligned = _tables(cols, n, device)
    if grid == 0:
        return
    launches["adam_step"] += 1
    launch(_adam_kernel, (grid,), table, block_start, hparams, num_tensors, n, _search_steps(num_tensors),
           DTYPE=_TL[dtype], BLOCK=BLOCK, DECOUPLED=decoupled, AMSGRAD=amsgrad, MAXIMIZE=maximize,
           ALIGNED=aligned and not interpreting(), num_warps=NUM_WARPS)


def aot_specs() -> List[KernelSpec]:
    """One representative config per kernel: fp32 SGD with nesterov momentum, bf16 AdamW with amsgrad."""
    common = {"TABLE": "*i64", "BLOCK_START": "*i64", "HP": "*fp32", "num_tensors": "i32", "num_models": "i32",
              "search_steps": "i32"}
    sgd = dict(common, DTYPE="constexpr", BLOCK="constexpr", HAS_MOMENTUM="constexpr", NESTEROV="constexpr",
               MAXIMIZE="constexpr", FIRST_STEP="constexpr", ALIGNED="constexpr")
    adam = dict(common, DTYPE="constexpr", BLOCK="constexpr", DECOUPLED="constexpr", AMSGRAD="constexpr",
                MAXIMIZE="constexpr", ALIGNED="constexpr")
    shape = "N=8, 12 tensors, 25M params per model"
    return [
        KernelSpec("optim", "sgd_step[fp32,nesterov]", _sgd_kernel, sgd,
                   dict(DTYPE=tl.float32, BLOCK=BLOCK, HAS_MOMENTUM=True, NESTEROV=True, MAXIMIZE=False,
                        FIRST_STEP=False, ALIGNED=True), num_warps=NUM_WARPS, shape=shape),
        KernelSpec("optim", "adam_step[fp32,adamw]", _adam_kernel, adam,
                   dict(DTYPE=tl.float32, BLOCK=BLOCK, DECOUPLED=True, AMSGRAD=False, MAXIMIZE=False, ALIGNED=True),
                   num_warps=NUM_WARPS, shape=shape),
        KernelSpec("optim", "adam_step[bf16,amsgrad]", _adam_kernel, adam,
                   dict(DTYPE=tl.bfloat16, BLOCK=BLOCK, DECOUPLED=False, AMSGRAD=True, MAXIMIZE=False, ALIGNED=True),
                   num_warps=NUM_WARPS, shape=shape),
    ]
