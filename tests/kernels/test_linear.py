"""The per-model linear and 1x1-conv Triton kernels (run in the Triton interpreter) against their references.

Forward and every gradient; fp32, fp16 and bf16 (upcast in the interpreter); ragged shapes; N=1 and odd N; every
epilogue activation; outputs start as NaN (tests/kernels/conftest.py), so an unwritten element fails.
"""


import pytest
import torch

from fusecc.kernels import _backend
from fusecc.kernels.conv1x1 import conv1x1
from fusecc.kernels.linear import ACTIVATIONS, batched_linear, reference, wide_linear

from ._util import GPU_DTYPES, ON_GPU, assert_close, leaves, run

# (N, R, K, M): none a multiple of the interpreter's 16-wide tiles except where noted
SHAPES = [(3, 19, 21, 35), (1, 5, 16, 17), (5, 33, 7, 18)]
DTYPES = [torch.float32, torch.float16] + GPU_DTYPES


def _compare(fn_kernel, fn_ref, inputs, dtype, tag):
    kin = dict(zip(inputs, leaves(*inputs.values(), dtype=dtype)))
    rin = dict(zip(inputs, leaves(*[None if v is None else v.to(dtype) for v in inputs.values()],
                                  dtype=torch.float32)))
    out, grads = run(fn_kernel, kin, dtype)
    ref, rgrads = run(fn_ref, rin, dtype)
    assert out.dtype == dtype
    assert_close(f"{tag} out", out, ref, dtype)
    for k in inputs:
        assert_close(f"{tag} d{k}", grads[k], rgrads[k], dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "N{}-R{}-K{}-M{}".format(*s))
def test_batched_linear(shape, act, dtype):
    n, r, k, m = shape
    inputs = {"x": torch.randn(n, r, k), "weight": torch.randn(n, m, k) / k ** 0.5, "bias": torch.randn(n, m)}
    _compare(lambda **a: batched_linear(**a, act=act, backend="triton"),
             lambda **a: batched_linear(**a, act=act, backend="reference"), inputs, dtype, f"batched {act}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["none", "gelu"])
@pytest.mark.parametrize("shape", SHAPES[:2], ids=lambda s: "N{}-R{}-K{}-M{}".format(*s))
def test_wide_linear_shared_input(shape, act, dtype):
    """x [R, K] read once for all N models; its gradient sums the N models' contributions."""
    n, r, k, m = shape
    inputs = {"x": torch.randn(2, r, k), "weight": torch.randn(n, m, k) / k ** 0.5, "bias": torch.randn(n, m)}
    _compare(lambda **a: wide_linear(**a, act=act, backend="triton"),
             lambda **a: wide_linear(**a, act=act, backend="reference"), inputs, dtype, f"wide {act}")


def test_no_bias_and_extra_leading_dims():
    inputs = {"x": torch.randn(3, 2, 5, 20), "weight": torch.randn(3, 9, 20), "bias": None}
    _compare(lambda **a: batched_linear(**a, act="silu", backend="triton"),
             lambda **a: batched_linear(**a, act="silu", backend="reference"), inputs, torch.float32, "no bias")


def test_strided_input_and_output_gradient():
    """A transposed (non-contiguous) x and an expanded (stride 0) output gradient."""
    x = torch.randn(3, 20, 17).transpose(1, 2).requires_grad_()  # [3, 17, 20], strides (340, 1, 17)
    w = torch.randn(3, 6, 20, requires_grad=True)
    y = batched_linear(x, w, None, "relu", backend="triton")
    y.sum().backward()
    gx, gw = x.grad, w.grad
    x.grad = w.grad = None
    batched_linear(x, w, None, "relu", backend="reference").sum().backward()
    assert_close("out", y, batched_linear(x, w, None, "relu", backend="reference"), torch.float32)
    assert_close("dx", gx, x.grad, torch.float32)
    assert_close("dw", gw, w.grad, torch.float32)


@pytest.mark.interpreter
def test_bf16_upcast_in_interpreter():
    """bf16 runs with its dot operands upcast to fp32 (the interpreter's bf16 dot is wrong)."""
    assert _backend.upcast_dot(torch.bfloat16)
    inputs = {"x": torch.randn(2, 18, 24), "weight": torch.randn(2, 20, 24) / 5, "bias": torch.randn(2, 20)}
    _compare(lambda **a: batched_linear(**a, act="gelu", backend="triton"),
             lambda **a: batched_linear(**a, act="gelu", backend="reference"), inputs, torch.bfloat16, "bf16")


def test_zero_rows():
    x = torch.randn(2, 0, 8, requires_grad=True)
    w = torch.randn(2, 4, 8, requires_grad=True)
    b = torch.randn(2, 4, requires_grad=True)
    y = batched_linear(x, w, b, "relu", backend="triton")
    assert y.shape == (2, 0, 4)
    y.sum().backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shared", [False, True], ids=["per-model", "shared"])
@pytest.mark.parametrize("n", [1, 3])
def test_conv1x1_channels_last(n, shared, dtype):
    c, m, b, h, w = 5, 7, 2, 3, 4
    inputs = {"x": torch.randn(b, c if shared else n * c, h, w), "weight": torch.randn(n, m, c) / 2,
              "bias": torch.randn(n, m)}
    kin = dict(zip(inputs, leaves(*inputs.values(), dtype=dtype)))
    out = conv1x1(**kin, act="relu", shared_input=shared, backend="triton")
    assert out.is_contiguous(memory_format=torch.channels_last), "the kernel writes channels-last"
    _compare(lambda **a: conv1x1(**a, act="relu", shared_input=shared, backend="triton"),
             lambda **a: conv1x1(**a, act="relu", shared_input=shared, backend="reference"), inputs, dtype,
             f"conv1x1 n={n}")


def test_conv1x1_reference_is_the_grouped_conv():
    """The reference is the oracle for the kernel, so check it against N separate convs."""
    x, w, b = torch.randn(2, 3 * 4, 5, 5), torch.randn(3, 6, 4), torch.randn(3, 6)
    y = conv1x1(x, w, b, backend="reference")
    each = [torch.nn.functional.conv2d(x[:, 4 * i:4 * i + 4], w[i, :, :, None, None], b[i]) for i in range(3)]
    assert_close("grouped", y, torch.cat(each, 1), torch.float32)


def test_reference_matches_per_model_linear():
    x, w, b = torch.randn(3, 4, 6), torch.randn(3, 5, 6), torch.randn(3, 5)
    for act in ACTIVATIONS:
        each = torch.stack([reference.activation(torch.nn.functional.linear(x[i], w[i], b[i]), act) for i in range(3)])
        assert_close(act, batched_linear(x, w, b, act, backend="reference"), each, torch.float32)


def test_bad_arguments():
    x, w = torch.randn(3, 4, 6), torch.randn(3, 5, 6)
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        batched_linear(x, w, None, "tanh")
    with pytest.raises(ValueError, match=r"x must be \[N, \*, K\] with N=3, K=6, got shape \(2, 4, 6\)"):
        batched_linear(x[:2], w)
    with pytest.raises(ValueError, match=r"bias must be \[N, M\]"):
        batched_linear(x, w, torch.randn(5))
    with pytest.raises(TypeError, match="one dtype"):
        batched_linear(x, w.half(), backend="triton")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        batched_linear(x, w, backend="cuda")


def test_opcheck_linear_ops():
    """Schema, fake (meta) implementation and aot dispatch of the custom ops, on interpreter CPU tensors."""
    import fusecc.kernels.linear.triton  # noqa: F401  (registers the ops)

    # test_aot_dispatch_dynamic is left out: under the interpreter wrap_triton hands back the interpreted kernel
    # unwrapped, so AOTAutograd's trace (on fake tensors, where no kernel can run) records no launch, and its
    # replay returns unwritten outputs. On a GPU the launch is a traced higher-order op and that check applies.
    checks = ("test_schema", "test_autograd_registration", "test_faketensor") + (
        ("test_aot_dispatch_dynamic",) if ON_GPU else ())  # (not in the interpreter: see below)
    x, w, b = torch.randn(2, 17, 20), torch.randn(2, 9, 20), torch.randn(2, 9)
    ops = torch.ops.fusecc
    torch.library.opcheck(ops.linear_fwd.default, (x, w, b, 2, False, False, True), test_utils=checks)
    torch.library.opcheck(ops.linear_fwd.default, (x[0], w, None, 1, True, True, False), test_utils=checks)
    dy, z = torch.randn(2, 17, 9), torch.randn(2, 17, 9)
    torch.library.opcheck(ops.linear_bwd_dx.default, (dy, z, w, x, 3, False), test_utils=checks)
    torch.library.opcheck(ops.linear_bwd_dw.default, (dy, z, x, w, 2, False, True), test_utils=checks)
