"""Per-model LayerNorm in Triton: N models' rows normalised in ONE launch, backward in one launch plus a sum.

Forward: a program normalises a ``[BLOCK_R, BLOCK_D]`` tile of one model's rows (grid ``(cdiv(R, BLOCK_R), N)``)
and keeps the per-row mean and 1/std (fp32 ``[N, R]``) for the backward. Backward, as in the Triton tutorial
05-layer-norm but per model and without locks: program ``(p, n)`` walks its slice of model n's rows, writes dx, and
accumulates its share of dweight/dbias in registers; it stores that share into an fp32 ``[N, P, D]`` buffer, which
one ``sum`` over P reduces to ``[N, D]``.

The host launchers are ``torch.library.triton_op`` custom ops, ``fusecc::layer_norm_fwd`` / ``fusecc::layer_norm_bwd``,
so torch.compile / torch.export see them as ops (and trace into the kernels).
"""

from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton
from torch.library import triton_op

from .. import _backend
from .._aot import KernelSpec

# A program holds one whole row in registers: at most 64 KB of it (the Triton tutorial's limit).
MAX_ROW_BYTES = 65536


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # pointer to the input [N, R, D] (any strides on N and R, last dim contiguous)
    Y,  # pointer to the output [N, R, D] (contiguous)
    W,  # pointer to the weights [N, D] (contiguous; not read without HAS_WEIGHT)
    B,  # pointer to the biases [N, D] (contiguous; not read without HAS_BIAS)
    Mean,  # pointer to the per-row means [N, R] (fp32, written for the backward)
    Rstd,  # pointer to the per-row 1/std [N, R] (fp32, written for the backward)
    stride_xn,  # elements between two models of X
    stride_xr,  # elements between two rows of X
    R,  # rows per model
    D,  # features per row (the normalised dim)
    eps,  # added to the variance, to avoid a division by zero
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per program
    BLOCK_D: tl.constexpr,  # next_power_of_2(D): a whole row per tile
):
    pid_r = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)  # int64 offsets: N * R * D may exceed 2**31
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_mask = rows < R
    col_mask = cols < D
    mask = row_mask[:, None] & col_mask[None, :]
    x_ptrs = X + n * stride_xn + rows.to(tl.int64)[:, None] * stride_xr + cols[None, :]
    # fp32 statistics: a sum of D fp16/bf16 values in their own dtype loses the mean and variance
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_WEIGHT:
        w = tl.load(W + n * D + cols, mask=col_mask, other=0.0).to(tl.float32)  # affine in fp32 too
        y = y * w[None, :]
    if HAS_BIAS:
        b = tl.load(B + n * D + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y + b[None, :]
    y_ptrs = Y + (n * R + rows.to(tl.int64))[:, None] * D + cols[None, :]
    tl.store(y_ptrs, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + n * R + rows, mean, mask=row_mask)
    tl.store(Rstd + n * R + rows, rstd, mask=row_mask)


@triton.jit
def _layer_norm_bwd_kernel(
    DY,  # pointer to the output gradient [N, R, D] (any strides on N and R, last dim contiguous)
    X,  # pointer to the input [N, R, D] (any strides on N and R, last dim contiguous)
    W,  # pointer to the weights [N, D] (contiguous; not read without HAS_WEIGHT)
    Mean,  # pointer to the per-row means [N, R] (fp32, from the forward)
    Rstd,  # pointer to the per-row 1/std [N, R] (fp32, from the forward)
    DX,  # pointer to the input gradient [N, R, D] (contiguous)
    DW,  # pointer to the partial weight gradients [N, P, D] (fp32, one row per program; not written without COMPUTE_DW)
    DB,  # pointer to the partial bias gradients [N, P, D] (fp32, one row per program; not written without COMPUTE_DB)
    stride_dyn,  # elements between two models of DY
    stride_dyr,  # elements between two rows of DY
    stride_xn,  # elements between two models of X
    stride_xr,  # elements between two rows of X
    R,  # rows per model
    D,  # features per row
    rows_per_prog,  # rows of one model each program walks (a multiple of BLOCK_R)
    HAS_WEIGHT: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_R: tl.constexpr,  # rows per step
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_mask = cols < D
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, R)
    if HAS_WEIGHT:
        # fp32 throughout: dx subtracts two row means of w*dy, which cancel badly in fp16/bf16
        w = tl.load(W + n * D + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_D], dtype=tl.float32)
    db = tl.zeros([BLOCK_D], dtype=tl.float32)
    for r0 in range(row_start, row_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        r64 = rows.to(tl.int64)[:, None]
        x = tl.load(X + n * stride_xn + r64 * stride_xr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + n * stride_dyn + r64 * stride_dyr + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + n * R + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + n * R + rows, mask=row_mask, other=0.0)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        if HAS_WEIGHT:
            wdy = dy * w[None, :]
        else:
            wdy = dy
        c1 = tl.sum(xhat * wdy, axis=1) / D
        c2 = tl.sum(wdy, axis=1) / D
        dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        tl.store(DX + (n * R + r64) * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw += tl.sum(dy * xhat, axis=0)
        if COMPUTE_DB:
            db += tl.sum(dy, axis=0)
    part = (n * tl.num_programs(0) + pid) * D + cols
    if COMPUTE_DW:
        tl.store(DW + part, dw, mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + part, db, mask=col_mask)


def _unit_last_stride(t: Tensor) -> Tensor:
    """The kernels take any strides on N and R but need the features contiguous (a copy only if they are not)."""
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _block_d(d: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    if d * elem > MAX_ROW_BYTES:
        raise ValueError(f"fusecc.kernels.layer_norm: the Triton kernel holds a whole row in registers and takes at "
                         f"most {MAX_ROW_BYTES // elem} features for {dtype}, got D={d}; use backend='reference' "
                         "for wider rows")
    return triton.next_power_of_2(max(d, 1))


def _tiles(d: int, dtype: torch.dtype, backward: bool) -> Tuple[int, int, int]:
    """(BLOCK_R, BLOCK_D, num_warps) for rows of d features."""
    block_d = _block_d(d, dtype)
    if _backend.interpreting():
        # small row tiles, so the tests' few rows still span several tiles and programs (ragged ones included)
        return 2, block_d, 1
    return _gpu_tiles(block_d, backward)


def _gpu_tiles(block_d: int, backward: bool) -> Tuple[int, int, int]:
    block_r = max(1, 1024 // block_d)  # one row per program from D > 512 on (the tutorial); several below
    # the tutorial's heuristic on the whole tile, up to 8 warps; the backward keeps x, dy, w, dw and db tiles
    # live and spills at D=4096 on sm_90 with 8 warps (none with 16; python -m fusecc.kernels.report)
    num_warps = min(max(block_r * block_d // 256, 1), 16 if backward else 8)
    return block_r, block_d, num_warps


def _bwd_programs(n: int, r: int, block_r: int, device: torch.device) -> Tuple[int, int]:
    """(P, rows_per_prog): P programs per model, each walking rows_per_prog rows (a multiple of block_r)."""
    blocks = triton.cdiv(r, block_r)
    if _backend.interpreting():
        target = 2  # enough to check the [N, P, D] partial sums, few enough for the interpreter
    else:
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        target = triton.cdiv(2 * sms, n)  # about two programs per SM over the N models
    p = max(1, min(blocks, target))
    rows_per_prog = max(1, triton.cdiv(blocks, p)) * block_r  # R == 0: one program per model writes zero sums
    return max(1, triton.cdiv(r, rows_per_prog)), rows_per_prog


@triton_op("fusecc::layer_norm_fwd", mutates_args=())
def layer_norm_fwd(
    x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float
) -> Tuple[Tensor, Tensor, Tensor]:
    """x ``[N, R, D]``, weight / bias ``[N, D]`` or None -> (y ``[N, R, D]``, mean ``[N, R]``, rstd ``[N, R]``);
    mean and rstd are fp32, y has x's dtype."""
    n, r, d = x.shape
    block_r, block_d, num_warps = _tiles(d, x.dtype, backward=False)
    x = _unit_last_stride(x)
    w = None if weight is None else weight.contiguous()
    b = None if bias is None else bias.contiguous()
    y = _backend.new_empty((n, r, d), x)
    mean = _backend.new_empty((n, r), x, torch.float32)
    rstd = _backend.new_empty((n, r), x, torch.float32)
    if y.numel() == 0:
        return y, mean, rstd
    grid = (triton.cdiv(r, block_r), n)
    _backend.launch(
        wrap_triton(_layer_norm_fwd_kernel), grid,
        x, y, x if w is None else w, x if b is None else b, mean, rstd,  # x stands in for an absent weight / bias
        x.stride(0), x.stride(1), r, d, eps,
        HAS_WEIGHT=w is not None, HAS_BIAS=b is not None, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps,
    )
    return y, mean, rstd


@triton_op("fusecc::layer_norm_bwd", mutates_args=())
def layer_norm_bwd(
    dy: Tensor, x: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor, compute_dw: bool, compute_db: bool
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``layer_norm_fwd``: (dx ``[N, R, D]``, dweight ``[N, D]``, dbias ``[N, D]``).

    dweight (sum over rows of dy * xhat) and dbias (sum over rows of dy) are computed only when asked for; the
    ones not asked for come back as empty ``[0]`` tensors.
    """
    n, r, d = x.shape
    block_r, block_d, num_warps = _tiles(d, x.dtype, backward=True)
    x = _unit_last_stride(x)
    dy = _unit_last_stride(dy)
    w = None if weight is None else weight.contiguous()
    dx = _backend.new_empty((n, r, d), x)
    p, rows_per_prog = _bwd_programs(n, r, block_r, x.device)
    dw_part = _backend.new_empty((n, p, d) if compute_dw else (0,), x, torch.float32)
    db_part = _backend.new_empty((n, p, d) if compute_db else (0,), x, torch.float32)
    if n * d > 0:
        _backend.launch(
            wrap_triton(_layer_norm_bwd_kernel), (p, n),
            dy, x, x if w is None else w, mean, rstd, dx,
            dx if not compute_dw else dw_part, dx if not compute_db else db_part,  # dx stands in for unused buffers
            dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), r, d, rows_per_prog,
            HAS_WEIGHT=w is not None, COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db, BLOCK_R=block_r,
            BLOCK_D=block_d, num_warps=num_warps,
        )
    dw = dw_part.sum(1).to(x.dtype) if compute_dw else x.new_empty((0,))
    db = db_part.sum(1).to(x.dtype) if compute_db else x.new_empty((0,))
    return dx, dw, db


def aot_specs() -> List[KernelSpec]:
    """Each kernel at three widths (fp16, with weight and bias): D=128 (8 rows per tile), 768 and 4096 (one row)."""
    specs: List[KernelSpec] = []
    for d in (128, 768, 4096):
        block_d = triton.next_power_of_2(d)
        shape = f"N=8 R=4096 D={d} fp16"
        fwd_sig = {"X": "*fp16", "Y": "*fp16", "W": "*fp16", "B": "*fp16", "Mean": "*fp32", "Rstd": "*fp32",
                   "stride_xn": "i32", "stride_xr": "i32", "R": "i32", "D": "i32", "eps": "fp32",
                   "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "BLOCK_R": "constexpr", "BLOCK_D": "constexpr"}
        block_r, _, num_warps = _gpu_tiles(block_d, backward=False)
        specs.append(KernelSpec(
            op="layer_norm", name=f"layer_norm_fwd[D={d}]", kernel=_layer_norm_fwd_kernel, signature=fwd_sig,
            constexprs={"HAS_WEIGHT": True, "HAS_BIAS": True, "BLOCK_R": block_r, "BLOCK_D": block_d},
            num_warps=num_warps, shape=shape,
        ))
        bwd_sig = {"DY": "*fp16", "X": "*fp16", "W": "*fp16", "Mean": "*fp32", "Rstd": "*fp32", "DX": "*fp16",
                   "DW": "*fp32", "DB": "*fp32", "stride_dyn": "i32", "stride_dyr": "i32", "stride_xn": "i32",
                   "stride_xr": "i32", "R": "i32", "D": "i32", "rows_per_prog": "i32", "HAS_WEIGHT": "constexpr",
                   "COMPUTE_DW": "constexpr", "COMPUTE_DB": "constexpr", "BLOCK_R": "constexpr",
                   "BLOCK_D": "constexpr"}
        block_r, _, num_warps = _gpu_tiles(block_d, backward=True)
        specs.append(KernelSpec(
            op="layer_norm", name=f"layer_norm_bwd[D={d}]", kernel=_layer_norm_bwd_kernel, signature=bwd_sig,
            constexprs={"HAS_WEIGHT": True, "COMPUTE_DW": True, "COMPUTE_DB": True, "BLOCK_R": block_r,
                        "BLOCK_D": block_d},
            num_warps=num_warps, shape=shape,
        ))
    return specs
