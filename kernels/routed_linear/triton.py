"""Triton kernels for routed_linear: one GEMM per model, over the rows routed to it (Punica / S-LoRA style).

The launcher sorts the rows by model once (no host sync) and cuts each model's segment of the sorted order into
tiles of BLOCK_R rows. A program takes one tile and one BLOCK_M slice of the output: it gathers its rows of x
through the permutation, multiplies them by its model's weight slice and scatters the result back. Models without
rows have no tile, so they cost nothing; tiles of unrouted rows (idx == -1) only store zeros.

- ``_routed_gemm_kernel``: ``out[r] = inp[r] @ W[idx[r]]^T (+ b[idx[r]])``. The forward runs it on (x, W); dx runs
  it on (dy, W^T), by swapping W's strides.
- ``_routed_dw_kernel``: dW[n] = dy_n^T @ x_n over model n's segment of the sorted rows; one program per
  (model, M block, K block), so a model without rows only stores zeros.
- ``_routed_db_kernel``: db[n] = the sum of dy_n; one program per (model, M block). A separate kernel, because
  summing the dy tiles inside the dW loop keeps them in registers and halves that loop's pipelining.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from .. import _backend
from .._aot import KernelSpec


def _gemm_configs() -> List[triton.Config]:
    if _backend.interpreting():  # the interpreter runs every program in numpy: one small config
        return [triton.Config({"BLOCK_M": 32, "BLOCK_K": 16}, num_warps=4, num_stages=1)]
    # chosen for an H100 (fits A100's shared memory too, except the last at BLOCK_R=128, which the autotuner drops
    # there); BLOCK_R is not tuned: the launcher picks it from the rows per model, since the tile table depends on it
    return [
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=3),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    ]


def _dw_configs() -> List[triton.Config]:
    if _backend.interpreting():
        return [triton.Config({"BLOCK_R": 16, "BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1)]
    # one stage more than a plain GEMM: the row-index load of each step takes one (sm_80 keeps a single buffer per
    # operand at num_stages=4)
    return [
        triton.Config({"BLOCK_R": 32, "BLOCK_M": 128, "BLOCK_K": 128}, num_warps=8, num_stages=4),
        triton.Config({"BLOCK_R": 64, "BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_R": 32, "BLOCK_M": 128, "BLOCK_K": 64}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_R": 64, "BLOCK_M": 64, "BLOCK_K": 64}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_R": 32, "BLOCK_M": 64, "BLOCK_K": 128}, num_warps=4, num_stages=5),
    ]


@triton.autotune(configs=_gemm_configs(), key=["M", "K", "BLOCK_R", "HAS_BIAS"])
@triton.jit
def _routed_gemm_kernel(
    X,  # pointer to the input rows [R, K], in any order
    W,  # pointer to the weights [N, M, K] (read through strides: dx passes W^T as [N, K, M])
    B,  # pointer to the biases [N, M] (not read unless HAS_BIAS)
    Y,  # pointer to the output [R, M]
    PERM,  # pointer to the row permutation [R] (int64): position in the sorted-by-model order -> row of X and Y
    TILES,  # pointer to the tile table [3, T] (int32): model (-1: unrouted rows), first and end sorted position
    T,  # number of tiles (an upper bound: surplus tiles have first >= end and do nothing)
    M,  # output features
    K,  # input features (the reduction)
    stride_xr, stride_xk,
    stride_wn, stride_wm, stride_wk,
    stride_bn, stride_bm,
    stride_yr, stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee", for fp32 inputs
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong
):
    pid_t = tl.program_id(0)
    pid_m = tl.program_id(1)
    model = tl.load(TILES + pid_t)
    first = tl.load(TILES + T + pid_t)
    end = tl.load(TILES + 2 * T + pid_t)

    offs_p = first + tl.arange(0, BLOCK_R)
    mask_r = offs_p < end
    rows = tl.load(PERM + offs_p, mask=mask_r, other=0)  # int64: no overflow in rows * stride
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_k = tl.arange(0, BLOCK_K)
    # unrouted rows (model -1) and surplus tiles run no K step: the first store zeros, the second store nothing
    routed = (model >= 0) & (first < end)
    num_k = tl.where(routed, tl.cdiv(K, BLOCK_K), 0)
    w_model = tl.maximum(model, 0).to(tl.int64)  # int64: N * M * K may exceed 2**31

    x_ptrs = X + rows[:, None] * stride_xr + offs_k[None, :] * stride_xk
    w_ptrs = W + w_model * stride_wn + offs_k[:, None] * stride_wk + offs_m[None, :] * stride_wm
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # accumulate in fp32 whatever the input dtype
    for kk in range(0, num_k):
        k_left = K - kk * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_r[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_m[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(B + w_model * stride_bn + offs_m * stride_bm, mask=mask_m & routed, other=0.0)
        acc += bias.to(tl.float32)[None, :]

    y_ptrs = Y + rows[:, None] * stride_yr + offs_m[None, :] * stride_ym
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_r[:, None] & mask_m[None, :])


@triton.autotune(configs=_dw_configs(), key=["M", "K"])
@triton.jit
def _routed_dw_kernel(
    X,  # pointer to the input rows [R, K]
    DY,  # pointer to the output gradient [R, M]
    DW,  # pointer to the weight gradient [N, M, K]
    PERM,  # pointer to the row permutation [R] (int64): sorted-by-model position -> row of X and DY
    BOUNDS,  # pointer to the segment bounds [N + 2] (int32): model n owns positions [BOUNDS[n + 1], BOUNDS[n + 2])
    M,  # output features
    K,  # input features
    stride_xr, stride_xk,
    stride_dyr, stride_dym,
    stride_dwn, stride_dwm, stride_dwk,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "tf32" or "ieee", for fp32 inputs
    UPCAST: tl.constexpr,  # cast tiles to fp32 before tl.dot: the interpreter's bf16 dot is wrong
):
    model = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    first = tl.load(BOUNDS + model + 1)
    end = tl.load(BOUNDS + model + 2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)  # accumulate in fp32 whatever the input dtype
    for p in range(first, end, BLOCK_R):  # a model without rows runs no step and stores zeros
        mask_r = p + offs_r < end
        rows = tl.load(PERM + p + offs_r, mask=mask_r, other=0)
        dy_t = tl.load(DY + rows[None, :] * stride_dyr + offs_m[:, None] * stride_dym,
                       mask=mask_m[:, None] & mask_r[None, :], other=0.0)  # dy^T tile [BLOCK_M, BLOCK_R]
        x = tl.load(X + rows[:, None] * stride_xr + offs_k[None, :] * stride_xk,
                    mask=mask_r[:, None] & mask_k[None, :], other=0.0)
        if UPCAST:
            dy_t = dy_t.to(tl.float32)
            x = x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=DOT_PRECISION)

    dw_base = DW + model.to(tl.int64) * stride_dwn  # int64: N * M * K may exceed 2**31
    tl.store(dw_base + offs_m[:, None] * stride_dwm + offs_k[None, :] * stride_dwk, acc.to(DW.dtype.element_ty),
             mask=mask_m[:, None] & mask_k[None, :])


@triton.jit
def _routed_db_kernel(
    DY,  # pointer to the output gradient [R, M]
    DB,  # pointer to the bias gradient [N, M]
    PERM,  # pointer to the row permutation [R] (int64): sorted-by-model position -> row of DY
    BOUNDS,  # pointer to the segment bounds [N + 2] (int32): model n owns positions [BOUNDS[n + 1], BOUNDS[n + 2])
    M,  # output features
    stride_dyr, stride_dym,
    stride_dbn, stride_dbm,
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    model = tl.program_id(0)
    pid_m = tl.program_id(1)
    first = tl.load(BOUNDS + model + 1)
    end = tl.load(BOUNDS + model + 2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)  # sum in fp32 whatever the input dtype
    for p in range(first, end, BLOCK_R):  # a model without rows runs no step and stores zeros
        mask_r = p + offs_r < end
        rows = tl.load(PERM + p + offs_r, mask=mask_r, other=0)
        acc += tl.load(DY + rows[:, None] * stride_dyr + offs_m[None, :] * stride_dym,
                       mask=mask_r[:, None] & mask_m[None, :], other=0.0).to(tl.float32)
    tl.store(DB + model.to(tl.int64) * stride_dbn + offs_m * stride_dbm, tl.sum(acc, axis=0).to(DB.dtype.element_ty),
             mask=mask_m)


# ----------------------------------------------------------------------------------------------------------------
# host side


def _check_rows(op: str, rows: int) -> None:
    if rows >= 2**31:
        raise ValueError(f"fusecc.kernels.{op}: the Triton kernel takes fewer than 2**31 rows, got {rows}; "
                         "split the batch")


def _block_r(rows: int, models: int) -> int:
    """Rows per tile: the expected rows per model, rounded up to a power of two in [16, 128] (tl.dot needs 16)."""
    if _backend.interpreting():
        return 16
    return min(128, max(16, triton.next_power_of_2(triton.cdiv(rows, max(models, 1)))))


def _sort_rows(idx: Tensor, models: int) -> Tuple[Tensor, Tensor]:
    """perm [R] (int64): the rows sorted by model (stable; the -1 rows first), and bounds [N + 2] (int64):
    segment s of the sorted order is [bounds[s], bounds[s + 1]), s = 0 for the -1 rows, s = n + 1 for model n.
    Device-side only: no host sync."""
    sorted_idx, perm = torch.sort(idx, stable=True)
    values = torch.arange(-1, models + 1, device=idx.device, dtype=sorted_idx.dtype)
    return perm, torch.searchsorted(sorted_idx, values)


def _tile_table(bounds: Tensor, rows: int, models: int, block_r: int) -> Tensor:
    """[3, T] int32: for each tile, its model (-1 for unrouted rows), first and end position in the sorted order.

    The tile count is data-dependent; T is an upper bound known without a sync (sum of ceil(c_s / B) over the
    N + 1 segments <= ceil(R / B) + N, and each tile has a row, so <= R). Surplus tiles get first == end."""
    counts = bounds[1:] - bounds[:-1]  # [N + 1]
    tiles = (counts + block_r - 1) // block_r
    tile_end = torch.cumsum(tiles, 0)  # one past each segment's last tile
    t = torch.arange(min(rows, triton.cdiv(rows, block_r) + models), device=bounds.device, dtype=tile_end.dtype)
    seg = torch.searchsorted(tile_end, t, right=True).clamp_(max=models)  # surplus tiles: clamped, then emptied
    end = bounds[seg + 1]
    first = torch.minimum(bounds[seg] + (t - tile_end[seg] + tiles[seg]) * block_r, end)
    return torch.stack([seg - 1, first, end]).to(torch.int32)


def _dot_meta(dtype: torch.dtype) -> dict:
    return dict(DOT_PRECISION="tf32" if _backend.allow_tf32(dtype) else "ieee", UPCAST=_backend.upcast_dot(dtype))


def _routed_gemm(inp: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor], out: Tensor,
                 transpose: bool) -> None:
    """out[r] = inp[r] @ op(weight[idx[r]]) (+ bias), op = transpose (forward) or identity (dx)."""
    rows, m = out.shape
    k = inp.shape[1]
    models = weight.shape[0]
    if rows == 0 or m == 0:
        return
    block_r = _block_r(rows, models)
    perm, bounds = _sort_rows(idx, models)
    tiles = _tile_table(bounds, rows, models, block_r)
    n_tiles = tiles.shape[1]
    # forward: W[n] is [M, K] read as W^T; dx: W[n] is read as is, the output dim being weight dim 2
    stride_wm, stride_wk = (weight.stride(1), weight.stride(2)) if transpose else (weight.stride(2), weight.stride(1))
    b = weight if bias is None else bias  # a placeholder pointer when there is no bias (never read)
    _backend.launch(
        wrap_triton(_routed_gemm_kernel), lambda meta: (n_tiles, triton.cdiv(m, meta["BLOCK_M"])),
        inp, weight, b, out, perm, tiles, n_tiles, m, k,
        inp.stride(0), inp.stride(1),
        weight.stride(0), stride_wm, stride_wk,
        b.stride(0) if bias is not None else 0, b.stride(1) if bias is not None else 0,
        out.stride(0), out.stride(1),
        HAS_BIAS=bias is not None, BLOCK_R=block_r, **_dot_meta(inp.dtype),
    )


@torch.library.triton_op("fusecc::routed_linear_fwd", mutates_args=())
def routed_linear_fwd(x: Tensor, idx: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """y [R, M] from x [R, K], idx [R] in [-1, N), weight [N, M, K], bias [N, M] or None."""
    _check_rows("routed_linear", x.shape[0])
    y = _backend.new_empty((x.shape[0], weight.shape[1]), x)
    _routed_gemm(x, idx, weight, bias, y, transpose=True)
    return y


@torch.library.triton_op("fusecc::routed_linear_bwd_dx", mutates_args=())
def routed_linear_bwd_dx(dy: Tensor, idx: Tensor, weight: Tensor) -> Tensor:
    """dx [R, K] = dy[r] @ weight[idx[r]] (zero for unrouted rows) from dy [R, M]."""
    _check_rows("routed_linear", dy.shape[0])
    dx = _backend.new_empty((dy.shape[0], weight.shape[2]), dy)
    _routed_gemm(dy, idx, weight, None, dx, transpose=False)
    return dx


@torch.library.triton_op("fusecc::routed_linear_bwd_dw", mutates_args=())
def routed_linear_bwd_dw(dy: Tensor, x: Tensor, idx: Tensor, num_models: int) -> Tuple[Tensor, Tensor]:
    """dW [N, M, K] and db [N, M]: per model, the sums over its rows of dy[r]^T x[r] and dy[r] (zero without rows)."""
    _check_rows("routed_linear", x.shape[0])
    m, k = dy.shape[1], x.shape[1]
    dw = _backend.new_empty((num_models, m, k), x)
    db = _backend.new_empty((num_models, m), x)
    if num_models == 0 or m == 0:
        return dw, db
    perm, bounds = _sort_rows(idx, num_models)
    bounds = bounds.to(torch.int32)
    if k > 0:
        _backend.launch(
            wrap_triton(_routed_dw_kernel),
            lambda meta: (num_models, triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(k, meta["BLOCK_K"])),
            x, dy, dw, perm, bounds, m, k,
            x.stride(0), x.stride(1), dy.stride(0), dy.stride(1), dw.stride(0), dw.stride(1), dw.stride(2),
            **_dot_meta(x.dtype),
        )
    block_m = 32 if _backend.interpreting() else 128
    _backend.launch(
        wrap_triton(_routed_db_kernel), (num_models, triton.cdiv(m, block_m)),
        dy, db, perm, bounds, m, dy.stride(0), dy.stride(1), db.stride(0), db.stride(1),
        BLOCK_R=16 if _backend.interpreting() else 32, BLOCK_M=block_m, num_warps=4,
    )
    return dw, db


# ----------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation (python -m fusecc.kernels.report)


def _sig(names: List[str], ptrs: dict) -> dict:
    """The signature as a representative call specialises it: 16-byte aligned pointers, unit inner strides
    (``i32:1``), every other int divisible by 16 (``i32:16``); the rest are constexprs."""
    sig = {}
    for name in names:
        if name in ptrs:
            sig[name] = ptrs[name] + ":16"
        elif name.isupper() and name not in ("M", "K", "T"):
            sig[name] = "constexpr"
        else:
            sig[name] = "i32:1" if name in _UNIT else "i32:16"
    return sig


_UNIT = {"stride_xk", "stride_bm", "stride_ym", "stride_dym", "stride_dwk", "stride_dbm"}


def aot_specs() -> List[KernelSpec]:
    """One fp16 configuration per kernel, for R = 256 rows over N = 16 models (16 rows each: BLOCK_R 16 by the
    launcher's rule), K = M = 4096: a decode step of 16 fine-tuned models; and the forward at prefill size
    (256 rows per model: BLOCK_R 128)."""
    shape = "R=256 N=16 K=M=4096 fp16"
    gemm = _routed_gemm_kernel.fn.arg_names
    fwd_sig = _sig(gemm, dict(X="*fp16", W="*fp16", B="*fp16", Y="*fp16", PERM="*i64", TILES="*i32"))
    fwd_sig["stride_wk"] = "i32:1"  # forward: W [N, M, K] is contiguous along K
    dx_sig = _sig(gemm, dict(X="*fp16", W="*fp16", B="*fp16", Y="*fp16", PERM="*i64", TILES="*i32"))
    dx_sig["stride_wm"] = "i32:1"  # dx: the output dim is W's last (contiguous) dim
    dw_sig = _sig(_routed_dw_kernel.fn.arg_names, dict(X="*fp16", DY="*fp16", DW="*fp16", PERM="*i64", BOUNDS="*i32"))
    db_sig = _sig(_routed_db_kernel.arg_names, dict(DY="*fp16", DB="*fp16", PERM="*i64", BOUNDS="*i32"))
    dot = dict(DOT_PRECISION="ieee", UPCAST=False)
    return [
        KernelSpec("routed_linear", "routed_linear_fwd[bias,R16]", _routed_gemm_kernel, fwd_sig,
                   dict(HAS_BIAS=True, BLOCK_R=16, BLOCK_M=128, BLOCK_K=64, **dot), num_warps=4, num_stages=4,
                   shape=shape),
        KernelSpec("routed_linear", "routed_linear_fwd[bias,R128]", _routed_gemm_kernel, fwd_sig,
                   dict(HAS_BIAS=True, BLOCK_R=128, BLOCK_M=128, BLOCK_K=64, **dot), num_warps=8, num_stages=4,
                   shape="R=4096 N=16 K=M=4096 fp16 (prefill)"),
        KernelSpec("routed_linear", "routed_linear_bwd_dx", _routed_gemm_kernel, dx_sig,
                   dict(HAS_BIAS=False, BLOCK_R=16, BLOCK_M=128, BLOCK_K=64, **dot), num_warps=4, num_stages=4,
                   shape=shape),
        KernelSpec("routed_linear", "routed_linear_bwd_dw", _routed_dw_kernel, dw_sig,
                   dict(BLOCK_R=32, BLOCK_M=128, BLOCK_K=64, **dot), num_warps=4, num_stages=5, shape=shape),
        KernelSpec("routed_linear", "routed_linear_bwd_db", _routed_db_kernel, db_sig,
                   dict(BLOCK_R=32, BLOCK_M=128), num_warps=4, num_stages=3, shape=shape),
    ]
