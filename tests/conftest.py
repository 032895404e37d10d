import os
import tempfile

# The Triton kernels run in the Triton interpreter on a CPU-only machine. triton reads this when a kernel is
# decorated, so it is set before anything imports triton (fusecc itself never does on CPU tensors). With
# FUSECC_TEST_DEVICE=cuda (the GPU check, bench/gpu_check.py) the kernel tests run compiled, on the GPU.
if os.environ.get("FUSECC_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")
# fuse(tune=True) caches its measurements on disk: never in the user's home from the tests
os.environ.setdefault("FUSECC_CACHE_DIR", tempfile.mkdtemp(prefix="fusecc-test-cache-"))

import sys
import warnings

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _fresh_dynamo():
    """Each test file starts with torch.compile's caches empty: dynamo counts recompilations per code object (the
    fused module's forward) per process, and files run in any order and any worker (pytest-xdist)."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    yield


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _no_fallback_warnings_unless_expected(request):
    """A test that expects a fallback says so with pytest.warns; elsewhere a fallback is a failure."""
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fusecc: module .* is not fused", category=UserWarning)
        yield
