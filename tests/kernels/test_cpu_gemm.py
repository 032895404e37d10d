"""The CPU small-batch GEMM (kernels/linear/cpu_gemm.c, loaded by kernels/linear/cpu.py) against aten.

The kernel is compiled from source into the tests' temporary cache. Ragged shapes (rows, K, outputs not
multiples of the 4 x 3 micro-tile, the 8-wide vectors or the 18-row task), strided inputs and outputs, every
activation, with and without bias; outputs start as NaN (tests/kernels/conftest.py), so an unwritten element fails.
Then where it may and may not run: grad, tracing, dtypes, the row range, the backend switch, and a build that fails.
"""

import warnings

import pytest
import torch
import torch.nn as nn

import fusecc
from fusecc.kernels import _backend, _cpu_build, use_backend
from fusecc.kernels.linear import ACTIVATIONS, batched_linear, cpu, reference, wide_linear

from ._util import assert_close

pytestmark = pytest.mark.skipif(cpu.library() is None, reason=f"CPU kernel not built: {cpu.status()}")


@pytest.fixture(autouse=True)
def _small_layers_too(monkeypatch):
    """The dispatch tests use small layers, which bmm runs below cpu.MIN_WEIGHTS (test_min_weights checks that)."""
    monkeypatch.setattr(cpu, "MIN_WEIGHTS", 0)


def _ref(x, w, b, act):
    return reference.activation(torch.bmm(x, w.transpose(1, 2)) + (0 if b is None else b.unsqueeze(1)), act)


# (N, R, K, O)
SHAPES = [(3, 2, 1, 1), (1, 5, 7, 2), (2, 8, 8, 3), (3, 7, 9, 19), (2, 32, 40, 37), (4, 4, 784, 36), (1, 3, 17, 40)]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-R{}-K{}-O{}".format(*s))
def test_small_gemm_matches_bmm(shape, act, bias):
    n, r, k, o = shape
    x, w = torch.randn(n, r, k), torch.randn(n, o, k) / k ** 0.5
    b = torch.randn(n, o) if bias else None
    assert_close(f"{shape} {act}", cpu.small_gemm(x, w, b, act), _ref(x, w, b, act), torch.float32)


def test_strided_input_and_output():
    """The conv lowering's case: x rows interleaved across models (a transposed view), output written into the
    columns of a wider buffer; nothing outside the output's elements is touched."""
    n, r, k, o = 3, 6, 20, 11
    xl = torch.randn(r, n, k)
    x = xl.transpose(0, 1)  # [N, R, K] with strides (K, N*K, 1)
    w, b = torch.randn(n, o, k), torch.randn(n, o)
    buf = torch.full((r, n, o + 5), float("nan"))
    out = buf[:, :, 2:2 + o].transpose(0, 1)
    cpu.small_gemm(x, w, b, "relu", out=out)
    assert_close("strided", out, _ref(x.contiguous(), w, b, "relu"), torch.float32)
    assert torch.isnan(buf[:, :, :2]).all() and torch.isnan(buf[:, :, 2 + o:]).all()
    with pytest.raises(ValueError, match=r"out must be \[3, 6, 11\]"):
        cpu.small_gemm(x, w, b, out=torch.empty(3, 6, 12))


def test_one_thread_and_inference_mode():
    x, w, b = torch.randn(5, 8, 64), torch.randn(5, 30, 64), torch.randn(5, 30)
    ref = _ref(x, w, b, "relu")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert_close("1 thread", cpu.small_gemm(x, w, b, "relu"), ref, torch.float32)
    finally:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        xi, wi, bi = x.clone(), w.clone(), b.clone()
        assert_close("inference mode", cpu.small_gemm(xi, wi, bi, "relu"), ref, torch.float32)


def _runs_kernel(fn):
    before = _backend.launch_counts["small_gemm"]
    out = fn()
    return out, _backend.launch_counts["small_gemm"] - before


def test_batched_linear_dispatch():
    x, w, b = torch.randn(4, 8, 32), torch.randn(4, 16, 32), torch.randn(4, 16)
    ref = _ref(x, w, b, "silu")
    with torch.no_grad():
        y, ran = _runs_kernel(lambda: batched_linear(x, w, b, "silu"))
        assert ran == 1
        assert_close("auto", y, ref, torch.float32)
        # a shared input: one kernel call with the N weights side by side
        y, ran = _runs_kernel(lambda: wide_linear(x[0], w, b, "relu"))
        assert ran == 1
        assert_close("wide", y, torch.relu(x[0] @ w.reshape(64, 32).T + b.reshape(64)), torch.float32)
        for why, fn in [
            ("backend reference", lambda: batched_linear(x, w, b, backend="reference")),
            ("one row", lambda: batched_linear(x[:, :1], w, b)),
            (f"{cpu.MAX_ROWS + 1} rows", lambda: batched_linear(torch.randn(4, cpu.MAX_ROWS + 1, 32), w, b)),
            ("float64", lambda: batched_linear(x.double(), w.double(), b.double())),
        ]:
            _, ran = _runs_kernel(fn)
            assert ran == 0, why
        with use_backend("reference"):
            _, ran = _runs_kernel(lambda: batched_linear(x, w, b))
        assert ran == 0, "use_backend('reference')"


def test_min_weights(monkeypatch):
    """Layers whose weights sit in cache run bmm (its call overhead is smaller); from MIN_WEIGHTS on, the kernel."""
    monkeypatch.undo()
    assert cpu.MIN_WEIGHTS > 0
    k = 64
    small = torch.randn(2, cpu.MIN_WEIGHTS // (2 * k) - 1, k)
    big = torch.randn(2, cpu.MIN_WEIGHTS // (2 * k), k)
    x = torch.randn(2, 8, k)
    with torch.no_grad():
        assert _runs_kernel(lambda: batched_linear(x, small))[1] == 0
        y, ran = _runs_kernel(lambda: batched_linear(x, big))
    assert ran == 1
    assert_close("at MIN_WEIGHTS", y, _ref(x, big, None, "none"), torch.float32)


def test_not_under_grad():
    """Training keeps aten's autograd path; the gradients are right."""
    x, w, b = torch.randn(4, 8, 32), torch.randn(4, 16, 32, requires_grad=True), torch.randn(4, 16)
    y, ran = _runs_kernel(lambda: batched_linear(x, w, b, "relu"))
    assert ran == 0 and y.requires_grad
    y.sum().backward()
    w2 = w.detach().requires_grad_()
    _ref(x, w2, b, "relu").sum().backward()
    assert_close("dW", w.grad, w2.grad, torch.float32)
    # grad mode on but nothing needs a gradient: the kernel may run
    _, ran = _runs_kernel(lambda: batched_linear(x, w.detach(), b))
    assert ran == 1


def _mlps(n):
    return [nn.Sequential(nn.Linear(24, 40), nn.ReLU(), nn.Linear(40, 40), nn.GELU(), nn.Linear(40, 5)).eval()
            for _ in range(n)]


def test_fused_mlp_runs_kernel_and_matches_models():
    models = _mlps(3)
    fused = fusecc.fuse(models)
    x = torch.randn(3, 8, 24)
    with torch.no_grad():
        y, ran = _runs_kernel(lambda: fused(x))
        ref = torch.stack([m(x[i]) for i, m in enumerate(models)])
    assert ran == 3
    assert_close("fused mlp", y, ref, torch.float32)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore:.*torch.jit.*deprecated:FutureWarning")
def test_not_while_tracing():
    """TorchScript (and torch.export, inductor) must see aten ops, never an opaque ctypes call."""
    models = _mlps(2)
    fused = fusecc.fuse(models)
    x = torch.randn(2, 8, 24)
    with torch.no_grad():
        traced, ran = _runs_kernel(lambda: torch.jit.trace(fused, (x,), check_trace=False))
        assert ran == 0
        x2 = torch.randn(2, 8, 24)
        assert_close("traced", traced(x2), fused(x2), torch.float32)


def test_conv_on_small_maps_runs_kernel():
    """resnet18's deep layers: a 3x3 conv on a 2x2 map (2 x 2 live taps) and a 1x1 conv, through the GEMM
    lowering into channels-last output."""
    from fusecc import runtime

    n, b = 3, 2  # 2 x 2 x 2 = 8 output rows per model (<= MAX_ROWS)
    x = torch.randn(b, n * 16, 2, 2)
    w, bias = torch.randn(n, 24, 16, 3, 3), torch.randn(n, 24)
    ref = torch.nn.functional.conv2d(x, w.reshape(n * 24, 16, 3, 3), bias.reshape(-1), 1, 1, 1, n)
    with torch.no_grad():
        for stride, pad in [(1, 1), (2, 1)]:
            ref = torch.nn.functional.conv2d(x, w.reshape(n * 24, 16, 3, 3), bias.reshape(-1), stride, pad, 1, n)
            y, ran = _runs_kernel(lambda: runtime.conv.conv_gemm(x, w, bias, stride, pad, 1, n))
            assert ran == 1, (stride, pad)
            assert_close(f"conv s{stride}", y, ref, torch.float32)
        w1 = torch.randn(n, 24, 16, 1, 1)
        y, ran = _runs_kernel(lambda: runtime.conv.conv_gemm(x, w1, None, 1, 0, 1, n))
        assert ran == 1
        assert_close("conv 1x1", y, torch.nn.functional.conv2d(x, w1.reshape(n * 24, 16, 1, 1), None, 1, 0, 1, n),
                     torch.float32)


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path))
    cpu._reset()
    try:
        x, w = torch.randn(2, 8, 16), torch.randn(2, 4, 16)
        with pytest.warns(RuntimeWarning, match="small-batch GEMM kernel is not in use .*no C compiler"):
            with torch.no_grad():
                y = batched_linear(x, w)
        assert_close("fallback", y, _ref(x, w, None, "none"), torch.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                batched_linear(x, w)  # no second warning
        assert cpu.status().startswith("not in use: no C compiler")
    finally:
        cpu._reset()


def test_other_cpus_fall_back_silently(monkeypatch):
    """Not x86-64: nothing the user can fix, so bmm runs without a warning."""
    monkeypatch.setattr(_cpu_build.platform, "machine", lambda: "arm64")
    cpu._reset()
    try:
        x, w = torch.randn(2, 8, 16), torch.randn(2, 4, 16)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with torch.no_grad():
                y, ran = _runs_kernel(lambda: batched_linear(x, w))
        assert ran == 0
        assert_close("arm64", y, _ref(x, w, None, "none"), torch.float32)
        assert cpu.status() == "not in use: needs an x86-64 CPU, this is arm64"
    finally:
        cpu._reset()


def test_builds_from_source_and_can_be_turned_off(monkeypatch, tmp_path):
    monkeypatch.setenv("FUSECC_CACHE_DIR", str(tmp_path))
    cpu._reset()
    try:
        assert cpu.library() is not None
        built = list((tmp_path / "cpu-kernels").glob("cpu_gemm-*.so"))
        assert len(built) == 1 and cpu.status() == f"in use: {built[0]}"
        monkeypatch.setenv("FUSECC_CPU_KERNELS", "0")
        cpu._reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert cpu.library() is None
        assert cpu.status() == "not in use: turned off by FUSECC_CPU_KERNELS=0"
        with torch.no_grad():
            _, ran = _runs_kernel(lambda: batched_linear(torch.randn(2, 8, 16), torch.randn(2, 4, 16)))
        assert ran == 0
    finally:
        cpu._reset()
