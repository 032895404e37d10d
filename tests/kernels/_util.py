"""Shared helpers for the kernel tests: one tolerance table, named comparisons, gradient collection."""

from __future__ import annotations

import os
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

# where the kernels run: "cpu" (the Triton interpreter) or, for the GPU check, "cuda" (compiled for real)
DEVICE = os.environ.get("FUSECC_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
# bf16 is tested in every dtype grid on a GPU; in the interpreter (whose bf16 dot is wrong: kernels upcast there) a
# few bf16 tests suffice
GPU_DTYPES = [torch.bfloat16] if ON_GPU else []

# max |got - ref| / max |ref|, per dtype of the kernel's inputs; the reference runs in fp32 on the same inputs
REL_TOL = {torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}


def assert_close(name: str, got: Optional[Tensor], ref: Optional[Tensor], dtype: torch.dtype) -> None:
    """Compare a kernel result with the reference; NaN anywhere (an unwritten, poisoned element) fails."""
    if ref is None:
        assert got is None, f"[{name}] expected no tensor, got one of shape {tuple(got.shape)}"
        return
    assert got is not None, f"[{name}] missing"
    assert tuple(got.shape) == tuple(ref.shape), f"[{name}] shape {tuple(got.shape)} != {tuple(ref.shape)}"
    got32, ref32 = got.detach().float(), ref.detach().float()
    nan = torch.isnan(got32) & ~torch.isnan(ref32)
    assert not nan.any(), f"[{name}] {int(nan.sum())} NaN element(s), first at {nan.nonzero()[0].tolist()}"
    if ref32.numel() == 0:
        return
    scale = ref32.abs().max().clamp_min(1e-6)
    diff = (got32 - ref32).abs()
    err = float(diff.max() / scale)
    where = tuple(int(i) for i in torch.unravel_index(diff.argmax(), diff.shape))
    assert err <= REL_TOL[dtype], (f"[{name}] max error {err:.3g} x max|ref| at {where} (got {got32[where]:.6g}, "
                                   f"ref {ref32[where]:.6g}), tolerance {REL_TOL[dtype]} for {dtype}")


def randn(*shape: int, generator: torch.Generator) -> Tensor:
    """torch.randn from a CPU generator (the same numbers on every device), on the tests' device."""
    return torch.randn(*shape, generator=generator, device="cpu").to(DEVICE)


def leaves(*tensors: Optional[Tensor], dtype: torch.dtype) -> Sequence[Optional[Tensor]]:
    """Fresh leaf copies requiring grad, in ``dtype`` (None stays None)."""
    return [None if t is None else t.detach().to(dtype).requires_grad_() for t in tensors]


def run(fn, inputs: Dict[str, Optional[Tensor]], round_to: torch.dtype, seed: int = 1):
    """fn(**inputs) and the gradient of every input that requires grad, for a fixed random output gradient (its
    values rounded to ``round_to``, the kernel's dtype, so a fp32 reference run sees the same gradient)."""
    out = fn(**inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), device="cpu")
    g = g.to(round_to).to(device=out.device, dtype=out.dtype)
    out.backward(g)
    grads = {k: (None if v is None or not v.requires_grad else v.grad) for k, v in inputs.items()}
    return out, grads
