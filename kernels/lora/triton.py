"""Triton kernel for lora: the low-rank update of many adapters in one launch (Punica's SGMV, S-LoRA's MBGMV).

``y[i] = scale[n] * ((x[i] @ A[n]^T) @ B[n]^T)`` with ``n = idx[i]``. One kernel, ``_lora_kernel``, fuses the
shrink (``x @ A^T``, to the rank r) and the expand (``@ B^T``, to M): the ``[rows, r]`` intermediate never leaves
registers. A program takes one tile of BLOCK_R rows of ONE model and a set of BLOCK_M slices of the output:

1. shrink: ``t = x_tile @ A_n^T``, ``[BLOCK_R, RANK]``, accumulated in fp32 over K in BLOCK_K steps. RANK is r
   padded to a power of two >= 16 (tl.dot's minimum); the padding is masked (zeros), so it changes nothing;
2. ``t`` is rounded to the input dtype, as peft's ``lora_A(x)`` output is (and it feeds fp16/bf16 tensor cores);
3. expand: for each of its M blocks, ``t @ B_n^T[:, m-block]`` in fp32, times ``scale[n]``, stored in x's dtype.

Its M blocks are ``pid_m, pid_m + G, ...`` (G programs along M): the launcher picks G so that the grid fills the GPU
(decode: few row tiles, so G large) without recomputing the shrink more than needed (prefill: G small). Each
program recomputes its tile's shrink, which costs BLOCK_R * K * r, about K / BLOCK_M times its expand per M block.

Two ways to find the rows (the constexpr UNIFORM):

- routed (``lora_update``): the rows are sorted by model once on the device and cut into tiles of BLOCK_R rows of
  one model (the same sort and tile table as routed_linear's, no host sync); a program gathers its rows through
  the permutation and scatters its outputs back. Models without rows have no tile (they cost nothing); tiles of
  unrouted rows (idx == -1) only store zeros.
- uniform (``batched_lora_update``): model n owns x[n] ``[T, K]``; tile p is model p // ceil(T / BLOCK_R). No sort,
  no tables, and x and y are read through their strides (no copies).

The backward is not a Triton kernel of its own: ``lora_bwd`` chains routed_linear's Triton ops (routed GEMMs and
per-model segment reductions) and ``batched_lora_bwd`` calls ``torch.bmm``.
"""

from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .. import _backend
from .._aot import KernelSpec

# the rows sorted by model and the tile table are routed_linear's (no host sync); importing its triton module also
# registers the torch.ops.fusecc.routed_linear_* ops that lora_bwd chains
from ..routed_linear.triton import _check_rows, _dot_meta, _sort_rows, _tile_table

MAX_RANK = 256  # the largest adapter rank the kernel takes (t is [BLOCK_R, RANK] fp32 in registers)


def _configs() -> List[triton.Config]:
    if _backend.interpreting():  # the interpreter runs every program in numpy: one small config
        return [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    # not benchmarked on a GPU yet. _prune keeps, for each launch, those that compile without spills
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2),
    ]


def _prune(configs: List[triton.Config], named_args: dict, **kwargs) -> List[triton.Config]:
    """Drop the configs too big for the launch's BLOCK_R, RANK and dtype.

    fp16/bf16: at most 96 fp32 accumulator values per thread (t [BLOCK_R, RANK] and the expand's
    [BLOCK_R, BLOCK_M]) and a B tile [RANK, BLOCK_M] of at most 16384 elements (32 KB per pipeline stage).
    fp32 (whose "ieee" tl.dot runs on FMAs, its operands in registers): at most 48 accumulator values per thread and
    BLOCK_K <= 32. Checked with the AOT compiler on sm_80 and sm_90 at every (BLOCK_R, RANK) the launcher picks
    (_block_r), fp32 with both "ieee" and "tf32": every pair keeps a config, and the kept ones compile without
    spills and within sm_80's shared memory; some dropped ones spill or exceed it."""
    block_r, rank = kwargs["BLOCK_R"], kwargs["RANK"]
    x = named_args.get("X")
    fp32 = getattr(x, "dtype", None) == torch.float32

    def acc_per_thread(c: triton.Config) -> float:
        return block_r * (c.kwargs["BLOCK_M"] + rank) / (32 * c.num_warps)

    kept = [c for c in configs
            if acc_per_thread(c) <= (48 if fp32 else 96) and rank * c.kwargs["BLOCK_M"] <= 16384
            and (not fp32 or c.kwargs["BLOCK_K"] <= 32)]
    return kept or [min(configs, key=acc_per_thread)]


@triton.autotune(configs=_configs(), key=["M", "K", "RANK", "BLOCK_R", "UNIFORM"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _lora_kernel(
    X,  # pointer to the input rows: [R, K] in any order (routed) or [N, SEG, K] (uniform)
    A,  # pointer to the down projections (peft's lora_A.weight per model) [N, r, K]
    B,  # pointer to the up projections (peft's lora_B.weight per model) [N, M, r]
    SCALE,  # pointer to the per-model scaling [N] (fp32)
    Y,  # pointer to the output, [R, M] (routed) or [N, SEG, M] (uniform)
    PERM,  # pointer to the row permutation [R] (int64): sorted-by-model position -> row of X and Y (routed only)
    TILES,  # pointer to the tile table [3, T] (int32): model (-1: unrouted rows), first and end sorted position
    T,  # number of tiles in TILES (an upper bound: surplus tiles have first >= end and do nothing); routed only
    SEG,  # rows per model (uniform only)
    M,  # output features
    K,  # input features (the shrink's reduction)
    LORA_R,  # the adapters' rank r (the expand's reduction); RANK is it padded to a power of two
    stride_xn, stride_xr, stride_xk,
    stride_an, stride_ar, stride_ak,
    stride_bn, stride_bm, stride_br,
    stride_s,
    stride_yn, stride_yr, stride_ym,
    UNIFORM: tl.constexpr,  # rows of model n are x[n] (batched) instead of routed by PERM / TILES
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RANK: tl.constexpr,  # LORA_R padded to a power of two >= 16 (tl.dot's minimum); the padding is masked
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee", for fp32 inputs
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong
):
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    if UNIFORM:
        tiles_per_model = tl.cdiv(SEG, BLOCK_R)
        model = pid_t // tiles_per_model
        first = (pid_t - model * tiles_per_model) * BLOCK_R
        end = SEG
        offs_p = first + tl.arange(0, BLOCK_R)
        mask_r = offs_p < end
        rows = offs_p.to(tl.int64)  # int64: no overflow in rows * stride
    else:
        model = tl.load(TILES + pid_t)
        first = tl.load(TILES + T + pid_t)
        end = tl.load(TILES + 2 * T + pid_t)
        offs_p = first + tl.arange(0, BLOCK_R)
        mask_r = offs_p < end
        rows = tl.load(PERM + offs_p, mask=mask_r, other=0)  # int64: no overflow in rows * stride
    # unrouted rows (model -1) and surplus tiles run no K step and read no B: the first store zeros, the second
    # store nothing
    routed = (model >= 0) & (first < end)
    model64 = tl.maximum(model, 0).to(tl.int64)  # int64: N * M * r may exceed 2**31
    offs_k = tl.arange(0, BLOCK_K)
    offs_q = tl.arange(0, RANK)
    mask_q = offs_q < LORA_R

    # shrink: t = x_tile @ A_n^T, [BLOCK_R, RANK]
    x_ptrs = X + model64 * stride_xn + rows[:, None] * stride_xr + offs_k[None, :] * stride_xk
    a_ptrs = A + model64 * stride_an + offs_k[:, None] * stride_ak + offs_q[None, :] * stride_ar  # A_n^T tile
    num_k = tl.where(routed, tl.cdiv(K, BLOCK_K), 0)
    t = tl.zeros((BLOCK_R, RANK), dtype=tl.float32)  # accumulate in fp32 whatever the input dtype
    for kk in range(0, num_k):
        k_left = K - kk * BLOCK_K
        xt = tl.load(x_ptrs, mask=mask_r[:, None] & (offs_k[None, :] < k_left), other=0.0)
        at = tl.load(a_ptrs, mask=(offs_k[:, None] < k_left) & mask_q[None, :], other=0.0)
        if UPCAST:
            xt = xt.to(tl.float32)
            at = at.to(tl.float32)
        t = tl.dot(xt, at, t, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        a_ptrs += BLOCK_K * stride_ak
    # rounded to the input dtype, as peft's lora_A output is; fp16/bf16 operands also keep the expand on tensor cores
    t_in = t.to(B.dtype.element_ty)
    if UPCAST:
        t_in = t_in.to(tl.float32)
    # the scale is applied in fp32, to the fp32 accumulator, then rounded once (peft: u * scaling, u rounded first)
    s = tl.where(routed, tl.load(SCALE + model64 * stride_s), 0.0)

    # expand: y[:, m-block] = scale * t @ B_n^T[:, m-block], for the M blocks pid_m, pid_m + G, ...
    b_base = B + model64 * stride_bn + offs_q[:, None] * stride_br  # B_n^T tile [RANK, BLOCK_M]
    y_base = Y + model64 * stride_yn + rows[:, None] * stride_yr
    for mb in range(pid_m, tl.cdiv(M, BLOCK_M), tl.num_programs(1)):
        offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        bt = tl.load(b_base + offs_m[None, :] * stride_bm, mask=routed & mask_q[:, None] & mask_m[None, :], other=0.0)
        if UPCAST:
            bt = bt.to(tl.float32)
        acc = tl.dot(t_in, bt, input_precision=DOT_PRECISION)  # fp32 [BLOCK_R, BLOCK_M]
        tl.store(y_base + offs_m[None, :] * stride_ym, (acc * s).to(Y.dtype.element_ty),
                 mask=mask_r[:, None] & mask_m[None, :])


# ----------------------------------------------------------------------------------------------------------------
# host side


def _rank(r: int) -> int:
    """RANK: r padded to a power of two >= 16 (tl.dot's minimum); the kernel takes r <= MAX_RANK."""
    if r > MAX_RANK:
        raise ValueError(f"fusecc.kernels.lora: the Triton kernel takes adapter ranks up to {MAX_RANK}, got r = {r}; "
                         "use backend='reference'")
    return max(16, triton.next_power_of_2(r))


def _block_r(rows_per_model: int, rank: int, dtype: torch.dtype) -> int:
    """Rows per tile: the expected rows per model, rounded up to a power of two in [16, 128] (tl.dot needs 16),
    at most 8192 / RANK (t is [BLOCK_R, RANK] fp32 in registers, next to the [BLOCK_R, BLOCK_M] accumulator), and
    2048 / RANK in fp32 (whose dot operands take registers too)."""
    if _backend.interpreting():
        return 16
    cap = (2048 if dtype == torch.float32 else 8192) // rank
    return max(16, min(128, cap, triton.next_power_of_2(max(rows_per_model, 1))))


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def _m_split(device: torch.device, row_tiles: int) -> int:
    """G, the programs along M (at most the M blocks): enough for ~2 programs per SM over the row tiles.
    Each one recomputes its tile's shrink, so no more. The interpreter takes 2, which exercises both a program
    with several M blocks and several programs per row tile."""
    if _backend.interpreting() or device.type != "cuda":
        return 2
    return max(1, triton.cdiv(2 * _sm_count(device), max(row_tiles, 1)))


def _launch(x: Tensor, a: Tensor, b: Tensor, scale: Tensor, y: Tensor, *, perm: Optional[Tensor],
            tiles: Optional[Tensor], n_tiles: int, seg: int, block_r: int, rank: int, row_tiles: int) -> None:
    """One launch of _lora_kernel. Uniform (perm None): x [N, T, K], y [N, T, M], model n's rows in x[n]. Routed:
    x [R, K], y [R, M], read as [1, R, *] with a model stride of 0 (the model comes from the tile table)."""
    m, k = y.shape[-1], x.shape[-1]
    split = _m_split(x.device, row_tiles)
    uniform = perm is None
    xs = x.stride() if uniform else (0,) + x.stride()
    ys = y.stride() if uniform else (0,) + y.stride()
    perm = y if perm is None else perm  # placeholders on the uniform path (never read)
    tiles = y if tiles is None else tiles
    _backend.launch(
        wrap_triton(_lora_kernel), lambda meta: (n_tiles, min(triton.cdiv(m, meta["BLOCK_M"]), split)),
        x, a, b, scale, y, perm, tiles, n_tiles, seg, m, k, a.shape[1],
        xs[0], xs[1], xs[2],
        a.stride(0), a.stride(1), a.stride(2),
        b.stride(0), b.stride(1), b.stride(2),
        scale.stride(0),
        ys[0], ys[1], ys[2],
        UNIFORM=uniform, BLOCK_R=block_r, RANK=rank, **_dot_meta(x.dtype),
    )


def _check_scale(scale: Tensor) -> None:
    if scale.dtype != torch.float32:
        raise TypeError(f"fusecc.kernels.lora: the Triton kernel takes scale in torch.float32, got {scale.dtype}")


@torch.library.triton_op("fusecc::lora_fwd", mutates_args=())
def lora_fwd(x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
    """y [R, M] from x [R, K], idx [R] in [-1, N), lora_a [N, r, K], lora_b [N, M, r], scale [N] (fp32)."""
    _check_rows("lora", x.shape[0])
    _check_scale(scale)
    rows, models, m = x.shape[0], lora_a.shape[0], lora_b.shape[1]
    rank = _rank(lora_a.shape[1])
    y = _backend.new_empty((rows, m), x)
    if rows == 0 or m == 0:
        return y
    block_r = _block_r(triton.cdiv(rows, models), rank, x.dtype)
    perm, bounds = _sort_rows(idx, models)
    tiles = _tile_table(bounds, rows, models, block_r)
    _launch(x, lora_a, lora_b, scale, y, perm=perm, tiles=tiles, n_tiles=tiles.shape[1], seg=0, block_r=block_r,
            rank=rank, row_tiles=triton.cdiv(rows, block_r))
    return y


@torch.library.triton_op("fusecc::lora_batched_fwd", mutates_args=())
def lora_batched_fwd(x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor) -> Tensor:
    """y [N, T, M] from x [N, T, K], lora_a [N, r, K], lora_b [N, M, r], scale [N] (fp32)."""
    _check_scale(scale)
    models, seg, m = x.shape[0], x.shape[1], lora_b.shape[1]
    _check_rows("lora", models * seg)
    rank = _rank(lora_a.shape[1])
    y = _backend.new_empty((models, seg, m), x)
    if models * seg == 0 or m == 0:
        return y
    block_r = _block_r(seg, rank, x.dtype)
    n_tiles = models * triton.cdiv(seg, block_r)
    _launch(x, lora_a, lora_b, scale, y, perm=None, tiles=None, n_tiles=n_tiles, seg=seg, block_r=block_r,
            rank=rank, row_tiles=n_tiles)
    return y


# ----------------------------------------------------------------------------------------------------------------
# backward (torch ops: routed_linear's Triton ops for the routed rows, torch.bmm for the batched ones)


def _times(t: Tensor, s: Tensor) -> Tensor:
    """t * s (s fp32, broadcast), computed in fp32 and rounded once to t's dtype."""
    return (t * s).to(t.dtype)


def lora_bwd(dy: Tensor, x: Tensor, idx: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor,
             need_dx: bool, need_da: bool, need_db: bool) -> Tuple[Optional[Tensor], ...]:
    """dx [R, K], d lora_a [N, r, K], d lora_b [N, M, r] (None where not needed), per row i of model n = idx[i]:
    ``dt = scale[n] * dy[i] @ B_n``, ``dx[i] = dt @ A_n``, ``dA_n = sum_i dt^T x[i]``,
    ``dB_n = scale[n] * sum_i dy[i]^T t[i]`` with ``t[i] = x[i] @ A_n^T`` recomputed. Routed GEMMs and per-model
    segment sums on routed_linear's Triton ops; unrouted rows and models without rows get exact zeros."""
    ops = torch.ops.fusecc
    models = lora_a.shape[0]
    dx = da = db = None
    if need_dx or need_da:
        row_scale = scale[idx.clamp(min=0)][:, None]  # unrouted rows: dy @ B is already 0 (routed_linear_bwd_dx)
        dt = _times(ops.routed_linear_bwd_dx(dy, idx, lora_b), row_scale)  # [R, r]
        if need_dx:
            dx = ops.routed_linear_bwd_dx(dt, idx, lora_a)  # [R, K]
        if need_da:
            da = ops.routed_linear_bwd_dw(dt, x, idx, models)[0]  # [N, r, K]
    if need_db:
        t = ops.routed_linear_fwd(x, idx, lora_a, None)  # [R, r]
        db = _times(ops.routed_linear_bwd_dw(dy, t, idx, models)[0], scale[:, None, None])  # [N, M, r]
    return dx, da, db


def batched_lora_bwd(dy: Tensor, x: Tensor, lora_a: Tensor, lora_b: Tensor, scale: Tensor,
                     need_dx: bool, need_da: bool, need_db: bool) -> Tuple[Optional[Tensor], ...]:
    """dx [N, T, K], d lora_a [N, r, K], d lora_b [N, M, r] (None where not needed), per model with torch.bmm:
    ``dt = scale * dy @ B``, ``dx = dt @ A``, ``dA = dt^T @ x``, ``dB = scale * dy^T @ (x @ A^T)``."""
    s = scale[:, None, None]
    dx = da = db = None
    if need_dx or need_da:
        dt = _times(torch.bmm(dy, lora_b), s)  # [N, T, r]
        if need_dx:
            dx = torch.bmm(dt, lora_a)
        if need_da:
            da = torch.bmm(dt.transpose(1, 2), x)
    if need_db:
        t = torch.bmm(x, lora_a.transpose(1, 2))  # [N, T, r]
        db = _times(torch.bmm(dy.transpose(1, 2), t), s)
    return dx, da, db


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation (python -m fusecc.kernels.report)


_UNIT = {"stride_xk", "stride_ak", "stride_br", "stride_s", "stride_ym"}


def _sig(uniform: bool) -> dict:
    """The signature as a representative fp16 call specialises it: 16-byte aligned pointers, unit inner strides
    (``i32:1``), the other ints divisible by 16 (``i32:16``: routed calls pass stride_xn = stride_yn = SEG = 0);
    uniform calls pass T = N * tiles per model (any value) and y as the (unread) PERM and TILES."""
    tables = dict(PERM="*fp16", TILES="*fp16") if uniform else dict(PERM="*i64", TILES="*i32")
    ptrs = dict(X="*fp16", A="*fp16", B="*fp16", SCALE="*fp32", Y="*fp16", **tables)
    sig = {}
    for name in _lora_kernel.fn.arg_names:
        if name in ptrs:
            sig[name] = ptrs[name] + ":16"
        elif name.isupper() and name not in ("T", "SEG", "M", "K", "LORA_R"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32:1" if name in _UNIT else "i32:16"
    if uniform:
        sig["T"] = "i32"
    return sig


def aot_specs() -> List[KernelSpec]:
    """fp16 configurations: a decode step of 16 adapters (R = 256 rows, 16 per adapter: BLOCK_R 16 by the
    launcher's rule) at rank 16, routed and batched; prefill (256 rows per adapter: BLOCK_R 128) at rank 16; ranks
    64, 128 and the largest, 256, at their largest BLOCK_R (8192 / RANK); K = M = 4096 (a Llama-7B projection). Each
    with a config _prune keeps there."""
    dot = dict(DOT_PRECISION="ieee", UPCAST=False)

    def spec(name, uniform, block_r, rank, block_m, block_k, warps, stages, shape):
        return KernelSpec("lora", name, _lora_kernel, _sig(uniform),
                          dict(UNIFORM=uniform, BLOCK_R=block_r, BLOCK_M=block_m, BLOCK_K=block_k, RANK=rank, **dot),
                          num_warps=warps, num_stages=stages, shape=shape)

    return [
        spec("lora_fwd[r16,R16]", False, 16, 16, 128, 64, 4, 4, "R=256 N=16 r=16 K=M=4096 fp16 (decode)"),
        spec("lora_batched_fwd[r16,R16]", True, 16, 16, 128, 64, 4, 4, "N=16 T=16 r=16 K=M=4096 fp16 (decode)"),
        spec("lora_fwd[r16,R128]", False, 128, 16, 128, 64, 8, 4, "R=4096 N=16 r=16 K=M=4096 fp16 (prefill)"),
        spec("lora_fwd[r64,R128]", False, 128, 64, 128, 64, 8, 4, "R=4096 N=16 r=64 K=M=4096 fp16 (prefill)"),
        spec("lora_fwd[r128,R64]", False, 64, 128, 128, 64, 8, 4, "R=1024 N=16 r=128 K=M=4096 fp16"),
        spec("lora_fwd[r256,R32]", False, 32, 256, 64, 32, 4, 3, "R=512 N=16 r=256 K=M=4096 fp16"),
    ]
