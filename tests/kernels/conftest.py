import os

import pytest
import torch

# FUSECC_TEST_DEVICE=cuda (set by bench/gpu_check.py): every kernel test runs on the GPU, its kernels compiled for
# real instead of interpreted. torch's default device makes the tests' tensors and modules there; tests of the
# interpreter or the CPU path (marked ``interpreter``, or whole files below) do not apply.
DEVICE = os.environ.get("FUSECC_TEST_DEVICE", "cpu")
_CPU_ONLY_FILES = ("test_backend.py", "test_cpu_gemm.py", "test_aot.py")


def pytest_collection_modifyitems(config, items):
    if DEVICE == "cpu":
        return
    skip = pytest.mark.skip(reason=f"a test of the interpreter or the CPU path; FUSECC_TEST_DEVICE={DEVICE}")
    for item in items:
        if item.get_closest_marker("interpreter") or item.path.name in _CPU_ONLY_FILES:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _device():
    if DEVICE == "cpu":
        yield
        return
    # fp32 compared at fp32 tolerances: no TF32 in cuDNN's convs or cuBLAS's GEMMs (the kernels follow the same flag)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.set_default_device(DEVICE)
    try:
        yield
    finally:
        torch.set_default_device(None)
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel does not write fails the comparison."""
    monkeypatch.setenv("FUSECC_KERNELS_POISON", "1")
    yield
