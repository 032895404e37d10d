"""The backend choice (kernels/_backend.py): one place, CPU never touches the kernels, forcing works both ways."""

import os
import subprocess
import sys

import pytest
import torch

from fusecc.kernels import _backend, use_backend
from fusecc.kernels.linear import batched_linear

CPU_PATH = """
import sys, torch
from fusecc.kernels.conv1x1 import conv1x1
from fusecc.kernels.layer_norm import layer_norm
from fusecc.kernels.linear import batched_linear, wide_linear
from fusecc.kernels.optim import adam_step, sgd_step
from fusecc.kernels.routed_linear import routed_linear

w = torch.randn(2, 5, 4)
batched_linear(torch.randn(2, 3, 4), w, act="relu")
wide_linear(torch.randn(3, 4), w)
conv1x1(torch.randn(1, 8, 3, 3), w)
layer_norm(torch.randn(2, 3, 4), torch.randn(2, 4), torch.randn(2, 4))
routed_linear(torch.randn(5, 4), torch.tensor([1, -1, 0, 0, 1]), w)
p, g = [torch.randn(2, 4)], [torch.randn(2, 4)]
sgd_step(p, g, lr=0.1)
adam_step(p, g, [torch.zeros(2, 4)], [torch.zeros(2, 4)], lr=0.1, step=1)
assert "triton" not in sys.modules, "a functional op imported triton on CPU tensors"

import fusecc, fusecc.optim
models = [torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.ReLU(), torch.nn.LayerNorm(5)) for _ in range(2)]
fused = fusecc.fuse(models)
opt = fusecc.optim.AdamW(fused, lr=[0.1, 0.2])
fused(torch.randn(2, 3, 4)).sum().backward()
opt.step()
# torch itself may import triton now (FakeTensorMode imports torch._dynamo, which probes for it): not ours
ours = [m for m in sys.modules if m.startswith("fusecc.kernels") and m.endswith(".triton")]
assert not ours, f"kernel modules imported on the CPU path: {ours}"
"""


def test_cpu_path_never_imports_the_kernels():
    """Every op's functional, a fused forward/backward and a fused optimizer step on CPU tensors, in a fresh process
    without the interpreter: no kernel module (and, for the functionals alone, not even triton) is imported."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSECC_KERNELS")}
    r = subprocess.run([sys.executable, "-c", CPU_PATH], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_forced_triton_on_cpu_needs_the_interpreter(monkeypatch):
    _backend.triton_available()  # import triton under the interpreter first: triton reads the variable at import
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs the Triton interpreter"):
        batched_linear(torch.randn(2, 3, 4), torch.randn(2, 5, 4), backend="triton")


def test_backend_selection(monkeypatch):
    x, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4)
    assert not _backend.use_triton([x, w])  # auto: CPU tensors take the reference
    with use_backend("triton"):
        assert _backend.use_triton([x, w])
        assert not _backend.use_triton([x, w], backend="reference")  # the argument wins
    monkeypatch.setenv("FUSECC_KERNELS", "triton")
    assert _backend.use_triton([x, w])
    with use_backend("reference"):  # the context manager wins over the environment
        assert not _backend.use_triton([x, w])
    monkeypatch.setenv("FUSECC_KERNELS", "gpu")
    with pytest.raises(ValueError, match=r"\$FUSECC_KERNELS"):
        _backend.use_triton([x, w])
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        with use_backend("cuda"):
            pass


def test_auto_keeps_float64_on_the_reference():
    """A dtype the kernels do not take stays on aten under "auto" (here faked as CUDA by the check's inputs)."""

    class Fake:
        is_cuda = True

        def __init__(self, dtype):
            self.dtype = dtype

        def is_floating_point(self):
            return True

    if not _backend.triton_available():
        pytest.skip("triton does not import")
    assert _backend.use_triton([Fake(torch.float16)])
    assert not _backend.use_triton([Fake(torch.float64)])


def test_package_boundaries():
    """fusecc/ never imports triton (it calls fusecc.kernels' functional API); kernels/ never imports torch.fx."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    bad = []
    for pkg, pattern in (("fusecc", r"^\s*(import|from)\s+triton\b"), ("kernels", r"^\s*(import|from)\s+torch\.fx\b")):
        for f in sorted((root / pkg).rglob("*.py")):
            for i, line in enumerate(f.read_text().splitlines(), 1):
                if re.match(pattern, line):
                    bad.append(f"{f.relative_to(root)}:{i}: {line.strip()}")
    assert not bad, bad
