"""Per-model LayerNorm: the Triton kernels (run in the Triton interpreter on CPU) vs kernels/layer_norm/reference.py,
forward and every gradient (dx, dweight, dbias). Outputs start NaN-poisoned (tests/kernels/conftest.py)."""


import pytest
import torch

from fusecc.kernels.layer_norm import LayerNorm, layer_norm, reference
from tests.utils import assert_close

from ._util import ON_GPU

# (rtol, atol) per dtype: torch.testing's defaults, loosened for an fp16/bf16 result rounded once from fp32 (the
# kernel) vs the fp32 reference rounded once (they may land one ulp apart) and for dweight summed over the rows
TOL = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

SHAPES = [  # (N, R, D): N=1 and odd N; R and D ragged against the tiles (2 rows, next_power_of_2(D) features)
    pytest.param(1, 7, 45, id="N1-R7-D45"),
    pytest.param(3, 7, 45, id="N3-R7-D45"),
    pytest.param(5, 3, 1, id="N5-R3-D1"),
    pytest.param(2, 1, 64, id="N2-R1-D64"),
]
AFFINE = [
    pytest.param(True, True, id="wb"),
    pytest.param(True, False, id="w"),
    pytest.param(False, True, id="b"),
    pytest.param(False, False, id="none"),
]
DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
] + ([pytest.param(torch.bfloat16, id="bf16")] if ON_GPU else [])


def _params(n, d, dtype, has_weight, has_bias):
    # weight around 1 and bias around 0 (as trained), but per-model distinct, so a mixed-up model shows
    w = (1 + 0.5 * torch.randn(n, d)).to(dtype) if has_weight else None
    b = (0.5 * torch.randn(n, d)).to(dtype) if has_bias else None
    return w, b


def _forward_backward(fn, x, w, b, dy, upcast=False):
    """fn(x, w, b) and its grads for the present inputs, as {name: tensor} (computed in fp32 when upcast)."""
    named = {"x": x, "weight": w, "bias": b}
    leaves = {k: (t.float() if upcast else t).detach().requires_grad_() for k, t in named.items() if t is not None}
    y = fn(leaves["x"], leaves.get("weight"), leaves.get("bias"))
    grads = torch.autograd.grad(y, list(leaves.values()), dy.float() if upcast else dy)
    out = {"y": y, **{f"d{k}": g for k, g in zip(leaves, grads)}}
    return {k: v.detach().to(x.dtype) for k, v in out.items()}


def _check(x, w, b, dy=None, eps=1e-5):
    """Triton vs the reference (in fp32 for fp16/bf16 inputs, then cast): output and every gradient."""
    dy = torch.randn(x.shape, dtype=x.dtype) if dy is None else dy
    tri = _forward_backward(lambda *a: layer_norm(*a, eps=eps, backend="triton"), x, w, b, dy)
    ref = _forward_backward(lambda *a: reference.layer_norm(*a, eps), x, w, b, dy, upcast=x.dtype != torch.float32)
    assert set(tri) == set(ref)
    rtol, atol = TOL[x.dtype]
    for name in ref:
        assert_close(name, tri[name], ref[name], x.dtype, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("has_weight, has_bias", AFFINE)
@pytest.mark.parametrize("n, r, d", SHAPES)
def test_matches_reference(n, r, d, has_weight, has_bias, dtype):
    x = (2 * torch.randn(n, r, d) + 0.5).to(dtype)
    _check(x, *_params(n, d, dtype, has_weight, has_bias))


def test_bf16():
    x = torch.randn(3, 5, 40).to(torch.bfloat16)
    _check(x, *_params(3, 40, torch.bfloat16, True, True))


@pytest.mark.parametrize("layout", ["transposed", "strided-rows", "strided-features"])
def test_non_contiguous_x(layout):
    n, r, d = 3, 5, 24
    if layout == "transposed":  # [R, N, D] storage viewed as [N, R, D]: strides (D, N*D, 1)
        x = torch.randn(r, n, d).transpose(0, 1)
    elif layout == "strided-rows":  # every other row of a taller tensor
        x = torch.randn(n, 2 * r, d)[:, ::2]
    else:  # every other feature: the launcher copies, the kernel needs the last dim contiguous
        x = torch.randn(n, r, 2 * d)[..., ::2]
    assert not x.is_contiguous()
    dy = torch.randn(r, n, d).transpose(0, 1)  # a non-contiguous output gradient too
    _check(x, *_params(n, d, torch.float32, True, True), dy=dy)


def test_expanded_grad():
    """``y.sum().backward()`` hands the backward an expanded dy (all strides 0)."""
    x = torch.randn(3, 7, 45, requires_grad=True)
    w, b = (t.requires_grad_() for t in _params(3, 45, torch.float32, True, True))
    layer_norm(x, w, b, backend="triton").sum().backward()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    reference.layer_norm(xr, wr, br).sum().backward()
    for name, a, e in (("dx", x.grad, xr.grad), ("dweight", w.grad, wr.grad), ("dbias", b.grad, br.grad)):
        assert_close(name, a, e, torch.float32, *TOL[torch.float32])


@pytest.mark.parametrize("shape", [(3, 2, 3, 20), (3, 20), (2, 0, 8)], ids=["N3-2x3-D20", "N3-D20", "N2-R0-D8"])
def test_leading_dims(shape):
    """x ``[N, *, D]``: any number of middle dims (none, several, or empty)."""
    n, d = shape[0], shape[-1]
    _check(torch.randn(shape), *_params(n, d, torch.float32, True, True), eps=1e-3)


def test_needs_input_grad():
    """Only the weight requires grad: dweight is right, and no dx / dbias is returned."""
    x, (w, b) = torch.randn(3, 7, 45), _params(3, 45, torch.float32, True, True)
    w.requires_grad_()
    (dw,) = torch.autograd.grad((layer_norm(x, w, b, backend="triton") ** 2).sum(), [w])
    wr = w.detach().clone().requires_grad_()
    (dwr,) = torch.autograd.grad((reference.layer_norm(x, wr, b) ** 2).sum(), [wr])
    assert_close("dweight", dw, dwr, torch.float32, *TOL[torch.float32])


def test_module():
    m = LayerNorm(3, 16, eps=1e-6, backend="triton")
    with torch.no_grad():
        m.weight.copy_(torch.randn(3, 16))
        m.bias.copy_(torch.randn(3, 16))
    x = torch.randn(3, 4, 16)
    assert_close("y", m(x), reference.layer_norm(x, m.weight, m.bias, 1e-6))
    assert "n_models=3, dim=16" in repr(m)
    assert LayerNorm(2, 8, elementwise_affine=False).weight is None


def test_errors():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"weight of shape \[N, D\] = \[2, 8\]"):
        layer_norm(x, torch.ones(3, 8))
    with pytest.raises(ValueError, match=r"\[N, \*, D\]"):
        layer_norm(torch.randn(8))
    with pytest.raises(TypeError, match="one dtype"):
        layer_norm(x, torch.ones(2, 8, dtype=torch.float16), backend="triton")
    with pytest.raises(ValueError, match="fusecc.kernels.layer_norm.*at most 16384.*backend='reference'"):
        layer_norm(torch.randn(1, 1, 16385), backend="triton")


@pytest.fixture
def ops():
    """torch.ops.fusecc with the layer_norm ops registered (importing the launchers registers them)."""
    import fusecc.kernels.layer_norm.triton  # noqa: F401

    return torch.ops.fusecc


# opcheck's sub-tests minus test_aot_dispatch_dynamic, which cannot run in the interpreter: wrap_triton returns an
# interpreted kernel unwrapped (torch/_library/triton.py), so AOTAutograd cannot put it in its graph, and
# _backend.launch skips launches on the fake tensors it traces with; the traced graph then returns the unwritten
# (NaN-poisoned) outputs and the comparison with eager fails. It needs a GPU (the real, traceable JITFunction).
OPCHECK_UTILS = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if ON_GPU else ())


def test_opcheck_fwd(ops):
    """Schema (run for real in the interpreter: no input mutated or aliased), the fake kernel (its outputs' shapes,
    dtypes and strides match a real run), and the autograd registration; with and without weight / bias, on a
    strided x and on inputs that require grad."""
    x = torch.randn(3, 5, 24)
    w, b = _params(3, 24, torch.float32, True, True)
    torch.library.opcheck(ops.layer_norm_fwd, (x, w, b, 1e-5), test_utils=OPCHECK_UTILS)
    xt = torch.randn(5, 3, 24).transpose(0, 1)
    torch.library.opcheck(ops.layer_norm_fwd, (xt, None, None, 1e-5), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.layer_norm_fwd, (x.requires_grad_(), w.requires_grad_(), b, 1e-5),
                          test_utils=OPCHECK_UTILS)


def test_opcheck_bwd(ops):
    x, dy = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    w, _ = _params(3, 24, torch.float32, True, False)
    _, mean, rstd = ops.layer_norm_fwd(x, w, None, 1e-5)
    torch.library.opcheck(ops.layer_norm_bwd, (dy, x, w, mean, rstd, True, True), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.layer_norm_bwd, (dy, x, None, mean, rstd, False, True), test_utils=OPCHECK_UTILS)
