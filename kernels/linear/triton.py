"""Triton kernels for the per-model linear ``y[n] = act(x[n] @ W[n]^T + b[n])``, forward and backward.

One kernel family serves three fused ops, because every operand is addressed through (model, row, column) strides:

- batched linear: x ``[N, R, K]``, y ``[N, R, M]``;
- shared input (wide linear): x ``[R, K]`` read by all N models (model stride 0), y ``[R, N*M]`` model-major;
- per-model 1x1 convolution on channels-last data: x ``[B, N*C, H, W]`` in memory ``[B*H*W, N, C]`` is the
  batched GEMM with model stride C and row stride N*C; y is written channels-last the same way (kernels/conv1x1).

Kernels (grid axis 1 is the model, so ONE launch covers all N models):

- ``_linear_fwd_kernel``: tiles ``[BLOCK_R, BLOCK_M]`` of y, K loop, fp32 accumulator, bias + activation in the
  epilogue; also stores the pre-activation z when the backward needs it (gelu/silu; relu uses y itself).
- ``_linear_bwd_dx_kernel``: dx = dz @ W with ``dz = dy * act'(z)`` computed on the fly from dy and z tiles
  (never materialised); for the shared input it also sums over the N models.
- ``_linear_bwd_dw_kernel``: dW[n] = dz[n]^T @ x[n], and db[n] = sum over rows of dz[n] in the same pass.

The ops are registered as ``fusecc::linear_fwd``, ``fusecc::linear_bwd_dx``, ``fusecc::linear_bwd_dw`` with
``torch.library.triton_op``, so torch.compile and torch.export see them.
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

ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "silu": 3}

# ---------------------------------------------------------------------------------------------------------------
# autotune configurations
#
# Chosen for an H100 (990 TFLOP/s fp16 dense, 3.35 TB/s): 128x128 (or 128x256) fp16 tiles with BLOCK_K 64 reach the
# tensor-core roof for the large-batch training GEMMs (arithmetic intensity ~ 2*128*128*64 / ((128+128)*64*2) = 64
# FLOP/B per K step from shared memory, far above the 295 FLOP/B ridge once L2 reuse is counted); the small-batch
# serving GEMMs (8-32 rows per model) are bound by reading W once, so a 16/32-row tile with wide M and K tiles and
# more pipeline stages keeps enough bytes in flight. The interpreter gets one small config.

if _backend.interpreting():
    _FWD_CONFIGS = [triton.Config({"BLOCK_R": 16, "BLOCK_M": 16, "BLOCK_K": 16, "GROUP_R": 2}, num_warps=1)]
    _DX_CONFIGS = [triton.Config({"BLOCK_R": 16, "BLOCK_K": 16, "BLOCK_M": 16, "GROUP_R": 2}, num_warps=1)]
    _DW_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_R": 16, "GROUP_M": 2}, num_warps=1)]
else:
    _FWD_CONFIGS = [
        triton.Config({"BLOCK_R": 128, "BLOCK_M": 128, "BLOCK_K": 64, "GROUP_R": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 128, "BLOCK_M": 256, "BLOCK_K": 64, "GROUP_R": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_M": 128, "BLOCK_K": 64, "GROUP_R": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_R": 32, "BLOCK_M": 128, "BLOCK_K": 128, "GROUP_R": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_M": 128, "BLOCK_K": 128, "GROUP_R": 1}, num_warps=4, num_stages=5),
        triton.Config({"BLOCK_R": 16, "BLOCK_M": 64, "BLOCK_K": 256, "GROUP_R": 1}, num_warps=4, num_stages=4),
    ]
    # backward tiles: the act'(z) epilogue-in-prologue holds an fp32 [rows, BLOCK_M] tile next to the accumulator,
    # so BLOCK_M is 32 where the forward uses 64 (the report shows 0 spills for these on sm_80 and sm_90)
    _DX_CONFIGS = [
        triton.Config({"BLOCK_R": 128, "BLOCK_K": 128, "BLOCK_M": 32, "GROUP_R": 8}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_R": 64, "BLOCK_K": 64, "BLOCK_M": 64, "GROUP_R": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_R": 16, "BLOCK_K": 128, "BLOCK_M": 64, "GROUP_R": 1}, num_warps=4, num_stages=4),
    ]
    _DW_CONFIGS = [
        triton.Config({"BLOCK_M": 64, "BLOCK_K": 64, "BLOCK_R": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_M": 128, "BLOCK_K": 128, "BLOCK_R": 32, "GROUP_M": 8}, num_warps=8, num_stages=3),
    ]


@triton.jit
def _act_fwd(z, ACT: tl.constexpr):
    if ACT == 1:  # relu
        return tl.maximum(z, 0.0)
    elif ACT == 2:  # gelu (erf): z * Phi(z)
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 3:  # silu: z * sigmoid(z)
        return z * tl.sigmoid(z)
    else:
        return z


@triton.jit
def _act_grad(dy, z, ACT: tl.constexpr):
    """dy * act'(z), in fp32 (for relu, ``z`` may be the output y: y > 0 exactly where z > 0)."""
    if ACT == 1:
        return tl.where(z > 0.0, dy, 0.0)
    elif ACT == 2:  # Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        return dy * (cdf + z * pdf)
    elif ACT == 3:  # s * (1 + z * (1 - s))
        s = tl.sigmoid(z)
        return dy * (s * (1.0 + z * (1.0 - s)))
    else:
        return dy


@triton.jit
def _tile_ids(pid, num_a, num_b, GROUP: tl.constexpr):
    """Grouped ordering of a 2-D tile grid (GROUP rows of tiles at a time) so neighbouring programs share operand
    tiles in L2 (triton tutorial 03)."""
    width = GROUP * num_b
    group = pid // width
    first = group * GROUP
    size = tl.minimum(num_a - first, GROUP)
    return first + (pid % width) % size, (pid % width) // size


@triton.autotune(configs=_FWD_CONFIGS, key=["R", "M", "K", "ACT"])
@triton.jit
def _linear_fwd_kernel(
    X,  # input, [N, R, K] through strides (stride_xn = 0: one input shared by all models)
    W,  # weights [N, M, K]
    BIAS,  # bias [N, M] (not read unless HAS_BIAS)
    Y,  # output act(z), [N, R, M] through strides
    Z,  # pre-activation z, same strides as Y (written only when STORE_Z)
    R, M, K,
    stride_xn, stride_xr, stride_xk,
    stride_wn, stride_wm, stride_wk,
    stride_bn, stride_bm,
    stride_yn, stride_yr, stride_ym,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, STORE_Z: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_R: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pid_r, pid_m = _tile_ids(pid, tl.cdiv(R, BLOCK_R), tl.cdiv(M, BLOCK_M), GROUP_R)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + n * stride_xn + offs_r[:, None] * stride_xr + offs_k[None, :] * stride_xk
    w_ptrs = W + n * stride_wn + offs_k[:, None] * stride_wk + offs_m[None, :] * stride_wm  # a [K, M] tile of W^T
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k0 * BLOCK_K
        a = tl.load(x_ptrs, mask=(offs_r[:, None] < R) & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & (offs_m[None, :] < M), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong (numpy has no bf16 matmul): upcast to fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        bias = tl.load(BIAS + n * stride_bn + offs_m * stride_bm, mask=offs_m < M, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out_mask = (offs_r[:, None] < R) & (offs_m[None, :] < M)
    out_off = n * stride_yn + offs_r[:, None] * stride_yr + offs_m[None, :] * stride_ym
    if STORE_Z:
        tl.store(Z + out_off, acc.to(Z.dtype.element_ty), mask=out_mask)
    y = _act_fwd(acc, ACT)
    tl.store(Y + out_off, y.to(Y.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_DX_CONFIGS, key=["R", "M", "K", "ACT"])
@triton.jit
def _linear_bwd_dx_kernel(
    DY,  # gradient of the output, [N, R, M] through strides
    Z,  # pre-activation (or y for relu), same strides as DY's z_ strides (not read when ACT == 0)
    W,  # weights [N, M, K]
    DX,  # input gradient, [N, R, K] through strides ([R, K] for the shared input)
    N, R, M, K,
    stride_dyn, stride_dyr, stride_dym,
    stride_zn, stride_zr, stride_zm,
    stride_wn, stride_wm, stride_wk,
    stride_dxn, stride_dxr, stride_dxk,
    ACT: tl.constexpr, SHARED: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_M: tl.constexpr, GROUP_R: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_r, pid_k = _tile_ids(pid, tl.cdiv(R, BLOCK_R), tl.cdiv(K, BLOCK_K), GROUP_R)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_m = tl.arange(0, BLOCK_M)
    if SHARED:  # dx of the shared input sums every model's contribution
        n_lo = 0
        n_hi = N
    else:
        n_lo = pid_n
        n_hi = pid_n + 1
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for n in range(n_lo, n_hi):
        n64 = tl.cast(n, tl.int64)
        for m0 in range(0, tl.cdiv(M, BLOCK_M)):
            om = m0 * BLOCK_M + offs_m
            mask_rm = (offs_r[:, None] < R) & (om[None, :] < M)
            dy = tl.load(DY + n64 * stride_dyn + offs_r[:, None] * stride_dyr + om[None, :] * stride_dym,
                         mask=mask_rm, other=0.0)
            if ACT != 0:
                z = tl.load(Z + n64 * stride_zn + offs_r[:, None] * stride_zr + om[None, :] * stride_zm,
                            mask=mask_rm, other=0.0)
                dy = _act_grad(dy.to(tl.float32), z.to(tl.float32), ACT).to(DY.dtype.element_ty)
            w = tl.load(W + n64 * stride_wn + om[:, None] * stride_wm + offs_k[None, :] * stride_wk,
                        mask=(om[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            if UPCAST:  # the interpreter's bf16 dot is wrong: upcast to fp32 there
                dy = dy.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
    tl.store(DX + pid_n.to(tl.int64) * stride_dxn + offs_r[:, None] * stride_dxr + offs_k[None, :] * stride_dxk,
             acc.to(DX.dtype.element_ty), mask=(offs_r[:, None] < R) & (offs_k[None, :] < K))


@triton.autotune(configs=_DW_CONFIGS, key=["R", "M", "K", "ACT"])
@triton.jit
def _linear_bwd_dw_kernel(
    DY,  # gradient of the output, [N, R, M] through strides
    Z,  # pre-activation (or y for relu), [N, R, M] through strides (not read when ACT == 0)
    X,  # input, [N, R, K] through strides (stride_xn = 0 for the shared input)
    DW,  # weight gradient [N, M, K], contiguous
    DB,  # bias gradient [N, M], contiguous (written only when HAS_BIAS)
    R, M, K,
    stride_dyn, stride_dyr, stride_dym,
    stride_zn, stride_zr, stride_zm,
    stride_xn, stride_xr, stride_xk,
    ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid = tl.program_id(0)
    n = tl.program_id(1).to(tl.int64)
    pid_m, pid_k = _tile_ids(pid, tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for r0 in range(0, tl.cdiv(R, BLOCK_R)):
        orr = r0 * BLOCK_R + offs_r
        mask_mr = (offs_m[:, None] < M) & (orr[None, :] < R)
        dyt = tl.load(DY + n * stride_dyn + offs_m[:, None] * stride_dym + orr[None, :] * stride_dyr,
                      mask=mask_mr, other=0.0)  # a [M, R] tile of dy^T
        if ACT != 0:
            zt = tl.load(Z + n * stride_zn + offs_m[:, None] * stride_zm + orr[None, :] * stride_zr,
                         mask=mask_mr, other=0.0)
            dzt = _act_grad(dyt.to(tl.float32), zt.to(tl.float32), ACT)
        else:
            dzt = dyt.to(tl.float32)
        if HAS_BIAS:
            db += tl.sum(dzt, axis=1)
        x = tl.load(X + n * stride_xn + orr[:, None] * stride_xr + offs_k[None, :] * stride_xk,
                    mask=(orr[:, None] < R) & (offs_k[None, :] < K), other=0.0)
        if UPCAST:  # the interpreter's bf16 dot is wrong: upcast to fp32 there
            a = dzt
            x = x.to(tl.float32)
        else:
            a = dzt.to(X.dtype.element_ty)
        acc = tl.dot(a, x, acc, input_precision=PRECISION)
    tl.store(DW + n * M * K + offs_m[:, None] * K + offs_k[None, :], acc.to(DW.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))
    if HAS_BIAS:
        tl.store(DB + n * M + offs_m, db.to(DB.dtype.element_ty), mask=(offs_m < M) & (pid_k == 0))


# ---------------------------------------------------------------------------------------------------------------
# launchers, registered as custom ops


def _precision(dtype: torch.dtype) -> str:
    return "tf32" if _backend.allow_tf32(dtype) else "ieee"


def _empty_z(x: Tensor) -> Tensor:
    return x.new_empty((0,))


@torch.library.triton_op("fusecc::linear_fwd", mutates_args=())
def linear_fwd(
    x: Tensor, weight: Tensor, bias: Optional[Tensor], act: int, shared: bool, interleaved: bool, store_z: bool
) -> Tuple[Tensor, Tensor]:
    """x ``[N, R, K]`` (``[R, K]`` if shared), weight ``[N, M, K]`` -> (y, z) with y ``[N, R, M]``.

    ``interleaved``: y is allocated ``[R, N, M]`` and returned as its ``[N, R, M]`` view (the model-major folded
    layout ``[R, N*M]``, and channels-last for a 1x1 conv). z (the pre-activation) is an empty tensor unless
    ``store_z``; it has y's layout.
    """
    n, m, k = weight.shape
    r = x.shape[-2]
    if interleaved:
        y = _backend.new_empty((r, n, m), x).permute(1, 0, 2)
    else:
        y = _backend.new_empty((n, r, m), x)
    z = _backend.new_empty_like(y) if store_z else _empty_z(x)
    if shared:
        sxn, sxr, sxk = 0, x.stride(0), x.stride(1)
    else:
        sxn, sxr, sxk = x.stride()
    zz = z if store_z else y
    bb = bias if bias is not None else weight
    sbn, sbm = (bias.stride() if bias is not None else (0, 0))

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_R"]) * triton.cdiv(m, meta["BLOCK_M"]), n)

    if r > 0 and m > 0:
        _backend.launch(
            wrap_triton(_linear_fwd_kernel), grid, x, weight, bb, y, zz, r, m, k, sxn, sxr, sxk, *weight.stride(),
            sbn, sbm, *y.stride(), ACT=act, HAS_BIAS=bias is not None, STORE_Z=store_z,
            UPCAST=_backend.upcast_dot(x.dtype), PRECISION=_precision(x.dtype),
        )
    return y, z


@torch.library.triton_op("fusecc::linear_bwd_dx", mutates_args=())
def linear_bwd_dx(dy: Tensor, z: Tensor, weight: Tensor, x: Tensor, act: int, shared: bool) -> Tensor:
    """dx ``= (dy * act'(z)) @ W`` with dx laid out like x (summed over the models for a shared x)."""
    n, m, k = weight.shape
    r = dy.shape[1]
    dx = _backend.new_empty_like(x)
    if x.numel() == 0:
        return dx
    if shared:
        sdxn, sdxr, sdxk = 0, dx.stride(0), dx.stride(1)
    else:
        sdxn, sdxr, sdxk = dx.stride()
    zz = z if act != 0 else dy

    def grid(meta):
        return (triton.cdiv(r, meta["BLOCK_R"]) * triton.cdiv(k, meta["BLOCK_K"]), 1 if shared else n)

    _backend.launch(
        wrap_triton(_linear_bwd_dx_kernel), grid, dy, zz, weight, dx, n, r, m, k, *dy.stride(), *zz.stride(),
        *weight.stride(), sdxn, sdxr, sdxk, ACT=act, SHARED=shared, UPCAST=_backend.upcast_dot(dy.dtype),
        PRECISION=_precision(dy.dtype),
    )
    return dx


@torch.library.triton_op("fusecc::linear_bwd_dw", mutates_args=())
def linear_bwd_dw(dy: Tensor, z: Tensor, x: Tensor, weight: Tensor, act: int, shared: bool,
                  has_bias: bool) -> Tuple[Tensor, Tensor]:
    """(dW ``[N, M, K]``, db ``[N, M]`` or an empty tensor): ``dW[n] = dz[n]^T @ x[n]``, ``db[n] = sum_r dz[n]``."""
    n, m, k = weight.shape
    r = dy.shape[1]
    dw = _backend.new_empty((n, m, k), weight)
    db = _backend.new_empty((n, m), weight) if has_bias else weight.new_empty((0,))
    if shared:
        sxn, sxr, sxk = 0, x.stride(0), x.stride(1)
    else:
        sxn, sxr, sxk = x.stride()
    zz = z if act != 0 else dy

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]), n)

    if m > 0 and k > 0:
        _backend.launch(
            wrap_triton(_linear_bwd_dw_kernel), grid, dy, zz, x, dw, db if has_bias else dw, r, m, k, *dy.stride(),
            *zz.stride(), sxn, sxr, sxk, ACT=act, HAS_BIAS=has_bias, UPCAST=_backend.upcast_dot(dy.dtype),
            PRECISION=_precision(dy.dtype),
        )
    elif has_bias:  # K == 0: z = bias, so db is the plain row sum
        db = dy.sum(1)
    return dw, db


# ---------------------------------------------------------------------------------------------------------------
# ahead-of-time compilation (kernels/report.py)


def _sig(ptrs: List[str], ptr: str, ints: List[str], consts: List[str]) -> dict:
    """Signature with the run-time specialisations of the representative call: aligned pointers, unit strides
    (the names ending in ``k``/``m`` innermost) equal to 1, every other int divisible by 16."""
    sig = {p: f"{ptr}:16" for p in ptrs}
    for name in ints:
        sig[name] = "i32:1" if name in _UNIT else "i32:16"
    sig.update({c: "constexpr" for c in consts})
    return sig


_UNIT = {"stride_xk", "stride_wk", "stride_bm", "stride_ym", "stride_dym", "stride_zm", "stride_dxk"}


def aot_specs() -> List[KernelSpec]:
    """Representative configurations: fp16, per-model GEMMs of a 16-model fleet of 4096x4096 layers, 256 rows each
    (training / prefill) and 16 rows (serving), gelu epilogue."""
    specs = []
    consts_fwd = ["ACT", "HAS_BIAS", "STORE_Z", "UPCAST", "PRECISION", "BLOCK_R", "BLOCK_M", "BLOCK_K", "GROUP_R"]
    fwd_ints = ["R", "M", "K", "stride_xn", "stride_xr", "stride_xk", "stride_wn", "stride_wm", "stride_wk",
                "stride_bn", "stride_bm", "stride_yn", "stride_yr", "stride_ym"]
    for cfg, shape in ((0, "N=16 R=256 K=M=4096 fp16"), (4, "N=16 R=16 K=M=4096 fp16 (serving)")):
        c = _FWD_CONFIGS[min(cfg, len(_FWD_CONFIGS) - 1)]
        specs.append(KernelSpec(
            "linear", f"linear_fwd[gelu,bias,R{c.kwargs['BLOCK_R']}]", _linear_fwd_kernel,
            _sig(["X", "W", "BIAS", "Y", "Z"], "*fp16", fwd_ints, consts_fwd),
            dict(ACT=2, HAS_BIAS=True, STORE_Z=True, UPCAST=False, PRECISION="ieee", **c.kwargs),
            c.num_warps, c.num_stages, shape))
    c = _DX_CONFIGS[0]
    specs.append(KernelSpec(
        "linear", "linear_bwd_dx[gelu]", _linear_bwd_dx_kernel,
        _sig(["DY", "Z", "W", "DX"], "*fp16",
             ["N", "R", "M", "K", "stride_dyn", "stride_dyr", "stride_dym", "stride_zn", "stride_zr", "stride_zm",
              "stride_wn", "stride_wm", "stride_wk", "stride_dxn", "stride_dxr", "stride_dxk"],
             ["ACT", "SHARED", "UPCAST", "PRECISION", "BLOCK_R", "BLOCK_K", "BLOCK_M", "GROUP_R"]),
        dict(ACT=2, SHARED=False, UPCAST=False, PRECISION="ieee", **c.kwargs), c.num_warps, c.num_stages,
        "N=16 R=256 K=M=4096 fp16"))
    c = _DW_CONFIGS[0]
    specs.append(KernelSpec(
        "linear", "linear_bwd_dw[gelu,bias]", _linear_bwd_dw_kernel,
        _sig(["DY", "Z", "X", "DW", "DB"], "*fp16",
             ["R", "M", "K", "stride_dyn", "stride_dyr", "stride_dym", "stride_zn", "stride_zr", "stride_zm",
              "stride_xn", "stride_xr", "stride_xk"],
             ["ACT", "HAS_BIAS", "UPCAST", "PRECISION", "BLOCK_M", "BLOCK_K", "BLOCK_R", "GROUP_M"]),
        dict(ACT=2, HAS_BIAS=True, UPCAST=False, PRECISION="ieee", **c.kwargs), c.num_warps, c.num_stages,
        "N=16 R=256 K=M=4096 fp16"))
    return specs
