"""Whole fused models on a CUDA device equal the N models run one by one: the GPU check's step 3
(bench/gpu_check.py). Skipped without a GPU, except that the check's dry mode runs them on the CPU
(``FUSECC_GPU_TESTS_ON_CPU=1``, the kernels' "auto" backend then being the reference) so that they never rot.

Each model runs with the kernels on (the backend "auto": Triton for every fused op that has a kernel) and with
``FUSECC_KERNELS=reference`` (aten only), in fp32 (forward and every gradient, TF32 off in cuBLAS and cuDNN so the
comparison is at fp32 precision) and in bf16 (forward, eval). Models: an MLP, resnet18, and a BERT-small-sized
``nn.TransformerEncoder`` classifier (until fusecc fuses Hugging Face's BERT itself: issue 15), at N=4.
"""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision

import fusecc
from fusecc.kernels import _backend, use_backend
from fusecc.verify import relative_error
from tests.utils import make_models

DEVICE = "cuda" if torch.cuda.is_available() else ("cpu" if os.environ.get("FUSECC_GPU_TESTS_ON_CPU") else None)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(DEVICE is None, reason="needs a CUDA device (bench/gpu_check.py)")]

N = 4 if DEVICE == "cuda" else 2  # (the CPU run only keeps the test from rotting: small)
SMALL = DEVICE != "cuda"
# max |fused - loop| / max |loop| per dtype: fp32 sums reordered (grouped vs separate GEMMs); bf16 rounds each op
REL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


class BertSmall(nn.Module):
    """BERT-small-sized encoder classifier: embedding + position table, 4 layers of d=256 / 4 heads / ff 1024."""

    def __init__(self, vocab: int = 1000, d: int = 256, layers: int = 4, seq: int = 64, classes: int = 3):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        return self.head(self.norm(self.enc(h))[:, 0])


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.LayerNorm(256), nn.GELU(),
                         nn.Linear(256, 10))


CASES: Dict[str, Tuple[Callable[[], nn.Module], Callable[[], torch.Tensor]]] = {
    "mlp": (mlp, lambda: torch.randn(N, 16, 64)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10),
                 lambda: torch.randn(N, 2, 3, 32, 32) if SMALL else torch.randn(N, 4, 3, 64, 64)),
    "bert_small": ((lambda: BertSmall(d=64, layers=2)) if SMALL else BertSmall,
                   lambda: torch.randint(0, 1000, (N, 2, 16) if SMALL else (N, 4, 64))),
}


@contextlib.contextmanager
def exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["kernels", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_fp32_forward_and_gradients(name, backend):
    factory, make_x = CASES[name]
    torch.manual_seed(0)
    # resnet18 in eval mode: train-mode BatchNorm over a few images of its 1x1/2x2 late maps amplifies rounding to
    # 1e-3 in the fused model and the N models alike (tests/test_models.py checks train mode in float64)
    train = name != "resnet18"
    models = [m.to(DEVICE).train(train) for m in make_models(factory, N)]
    x = make_x().to(DEVICE)
    fused = fusecc.fuse(models).train(train)
    before = _backend.launch_counts.copy()
    with exact_fp32(), use_backend(backend):
        y = fused(x)
        g = torch.randn_like(y)
        y.backward(g)
        ran = sum((_backend.launch_counts - before).values())
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
        ref.backward(g)
    if DEVICE == "cuda":  # (on the CPU, "auto" is the reference too)
        assert (ran > 0) == (backend == "auto"), f"{ran} kernel launches with backend {backend}"
    assert relative_error(y, ref) < REL[torch.float32], f"out: {relative_error(y, ref):.3g}"
    for pname, p in fused.named_parameters():
        want = torch.stack([m.get_parameter(pname).grad for m in models])
        err = relative_error(p.grad, want)
        assert err < REL[torch.float32] * 10, f"{pname}.grad: {err:.3g}"


@pytest.mark.parametrize("backend", ["auto", "reference"], ids=["kernels", "reference"])
@pytest.mark.parametrize("name", list(CASES))
def test_bf16_inference(name, backend):
    factory, make_x = CASES[name]
    torch.manual_seed(0)
    models = [m.to(DEVICE).to(torch.bfloat16).eval() for m in make_models(factory, N)]
    x = make_x().to(DEVICE)
    if x.is_floating_point():
        x = x.to(torch.bfloat16)
    fused = fusecc.fuse(models)
    with torch.no_grad(), use_backend(backend):
        y = fused(x)
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert y.dtype == torch.bfloat16
    assert relative_error(y, ref) < REL[torch.bfloat16], f"out: {relative_error(y, ref):.3g}"
