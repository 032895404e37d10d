"""lora: the Triton kernel (run in the Triton interpreter on CPU) vs kernels/lora/reference.py and vs an independent
oracle that runs each row through its model's adapter; forward and the gradients of x, lora_a and lora_b; rank
padding vs the unpadded per-model maths; batched_lora_update vs a per-model loop of F.linear calls (peft's maths).
Outputs start NaN-poisoned (tests/kernels/conftest.py), so a row or element the kernel forgets fails."""

from typing import Dict, Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from fusecc.kernels import _backend
from fusecc.kernels.lora import batched_lora_update, lora_update, reference
from tests import utils

from ._util import ON_GPU, assert_close

# assert_close compares max |got - ref| / max |ref| with a per-dtype bound (tests/kernels/_util.py REL_TOL), not
# element by element: in fp16/bf16 the kernel rounds t = x @ A^T to the input dtype (as peft does) and the backward
# rounds dt = dy @ B, while the fp32 reference rounds neither; a gradient entry that is a sum of such rounded
# terms with cancellation can be off by several of its own ulps while being within ~1e-3 of the tensor's scale

# (R, K, M, N, r, model of each row): R, K, M ragged against the interpreter's tiles (16 rows, BLOCK_K 16,
# BLOCK_M 16, 2 programs along M); ranks below 16 and not powers of two (padded to RANK 16 or 32); rows unsorted;
# -1 rows; models without rows; a model with several row tiles; N=1 and odd N; R=0
CASES = [
    pytest.param(37, 45, 33, 5, 12, "mixed", id="R37-K45-M33-N5-r12-mixed"),
    pytest.param(40, 20, 50, 3, 5, "skewed", id="R40-K20-M50-N3-r5-skewed"),
    pytest.param(16, 16, 16, 1, 16, "all", id="R16-K16-M16-N1-r16"),
    pytest.param(9, 8, 5, 7, 20, "mixed", id="R9-K8-M5-N7-r20-mixed"),
    pytest.param(6, 12, 10, 2, 3, "unrouted", id="R6-K12-M10-N2-r3-unrouted"),
    pytest.param(0, 8, 8, 3, 4, "all", id="R0-K8-M8-N3-r4"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")] + (
    [pytest.param(torch.bfloat16, id="bf16")] if ON_GPU else [])

from tests.kernels.test_routed_linear import _make_idx  # noqa: E402  (the same routing cases)


def _adapters(n, r, k, m, dtype):
    """lora_a [N, r, K], lora_b [N, M, r] and scale [N] (fp32) giving outputs of order 1."""
    a = (torch.randn(n, r, k) / max(k, 1) ** 0.5).to(dtype)
    b = (torch.randn(n, m, r) / max(r, 1) ** 0.5).to(dtype)
    scale = torch.rand(n) * 1.5 + 0.25  # lora_alpha / r
    return a, b, scale


def _oracle(x, idx, a, b, scale):
    """Row by row: y[i] = scale[n] * (x[i] @ A[n].T) @ B[n].T, zero for idx -1."""
    rows = []
    for i in range(x.shape[0]):
        n = int(idx[i])
        rows.append(x.new_zeros(b.shape[1]) if n < 0 else (x[i] @ a[n].T) @ b[n].T * scale[n].to(x.dtype))
    return torch.stack(rows) if rows else x.new_zeros((0, b.shape[1]))


def _run(fn, x, a, b, dy, upcast: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """fn(x, a, b) and the grads of x, a, b, as {name: tensor} (computed in `upcast` if given)."""
    named = {"x": x, "lora_a": a, "lora_b": b}
    leaves = {k: (t.to(upcast) if upcast else t).detach().requires_grad_() for k, t in named.items()}
    y = fn(*leaves.values())
    grads = [None] * len(leaves)
    if y.requires_grad:  # the oracle's y, with no row routed, is a constant
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(upcast) if upcast else dy, allow_unused=True)
    # the oracle leaves an unused leaf without grad: its gradient is zero
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves.values(), grads)]
    out = {"y": y, **{f"d{k}": g for k, g in zip(leaves, grads)}}
    return {k: v.detach().to(x.dtype) for k, v in out.items()}


def _check(x, idx, a, b, scale):
    """Triton vs the reference (in fp32 for fp16/bf16) and vs the row-by-row oracle (in fp64): output and grads;
    exact zeros for the rows of no model and for the adapters of models without rows."""
    dy = torch.randn(x.shape[0], b.shape[1]).to(x.dtype)
    tri = _run(lambda x_, a_, b_: lora_update(x_, idx, a_, b_, scale, backend="triton"), x, a, b, dy)
    up = None if x.dtype == torch.float32 else torch.float32
    ref = _run(lambda x_, a_, b_: reference.lora_update(x_, idx, a_, b_, scale), x, a, b, dy, upcast=up)
    ora = _run(lambda x_, a_, b_: _oracle(x_, idx, a_, b_, scale), x, a, b, dy, upcast=torch.float64)
    for name in ref:
        assert_close(f"{name} vs reference", tri[name], ref[name], x.dtype)
        assert_close(f"{name} vs oracle", tri[name], ora[name], x.dtype)
    unrouted = idx == -1
    empty = torch.bincount(idx[~unrouted], minlength=a.shape[0]) == 0
    assert torch.equal(tri["y"][unrouted], torch.zeros_like(tri["y"][unrouted])), "unrouted rows must be zero"
    assert torch.equal(tri["dx"][unrouted], torch.zeros_like(tri["dx"][unrouted])), "unrouted rows get no grad"
    for name in ("dlora_a", "dlora_b"):
        assert torch.equal(tri[name][empty], torch.zeros_like(tri[name][empty])), f"empty models: {name} = 0"
    return tri


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r, k, m, n, rank, kind", CASES)
def test_matches_reference_and_oracle(r, k, m, n, rank, kind, dtype):
    x = torch.randn(r, k).to(dtype)
    a, b, scale = _adapters(n, rank, k, m, dtype)
    _check(x, _make_idx(r, n, kind), a, b, scale)


def test_int32_idx_and_fp64_scale():
    """An int32 idx; a float64 scale (cast to fp32 for the kernel)."""
    x = torch.randn(21, 24)
    a, b, scale = _adapters(4, 6, 24, 18, torch.float32)
    _check(x, _make_idx(21, 4, "mixed").int(), a, b, scale.double())


def _peft_rows(x, idx, a_list, b_list, scale):
    """peft's maths on unpadded adapters of different ranks: per model, F.linear(F.linear(x_n, A_n), B_n) * s_n."""
    y = x.new_zeros(x.shape[0], b_list[0].shape[0])
    for n, (a_n, b_n) in enumerate(zip(a_list, b_list)):
        rows = (idx == n).nonzero()[:, 0]
        y = y.index_copy(0, rows, F.linear(F.linear(x[rows], a_n), b_n) * float(scale[n]))
    return y


@pytest.mark.parametrize("dtype", DTYPES)
def test_padded_ranks_equal_unpadded_maths(dtype):
    """Adapters of ranks 3, 8 and 5, zero-padded to r = 8 (zero rows of A, zero columns of B): the kernel on the
    padded stack equals peft's maths per unpadded adapter, forward and gradients, and the padding's gradients are
    exactly zero (so training keeps it zero)."""
    ranks, k, m, rows = [3, 8, 5], 40, 36, 30
    x = torch.randn(rows, k).to(dtype)
    idx = _make_idx(rows, len(ranks), "all")
    idx[:3] = -1
    a_list = [(torch.randn(q, k) / k**0.5).to(dtype) for q in ranks]
    b_list = [(torch.randn(m, q) / q**0.5).to(dtype) for q in ranks]
    scale = torch.tensor([16 / q for q in ranks])  # lora_alpha = 16
    a_pad = torch.zeros(len(ranks), max(ranks), k, dtype=dtype)
    b_pad = torch.zeros(len(ranks), m, max(ranks), dtype=dtype)
    for n, q in enumerate(ranks):
        a_pad[n, :q], b_pad[n, :, :q] = a_list[n], b_list[n]
    dy = torch.randn(rows, m).to(dtype)

    leaves = [t.detach().requires_grad_() for t in (x, a_pad, b_pad)]
    y = lora_update(leaves[0], idx, leaves[1], leaves[2], scale, backend="triton")
    dx, da, db = torch.autograd.grad(y, leaves, dy)
    # the oracle: fp32, unpadded, per model
    up = [t.detach().float().requires_grad_() for t in [x] + a_list + b_list]
    y_ref = _peft_rows(up[0], idx, up[1:4], up[4:], scale)
    g_ref = torch.autograd.grad(y_ref, up, dy.float())
    assert_close("y", y, y_ref.to(dtype), dtype)
    assert_close("dx", dx, g_ref[0].to(dtype), dtype)
    for n, q in enumerate(ranks):
        assert_close(f"dlora_a[{n}]", da[n, :q], g_ref[1 + n].to(dtype), dtype)
        assert_close(f"dlora_b[{n}]", db[n, :, :q], g_ref[4 + n].to(dtype), dtype)
        assert not da[n, q:].any() and not db[n, :, q:].any(), f"model {n}: the padding's gradients must be zero"


def _peft_loop(x, a, b, scale):
    """batched_lora_update by peft's maths: for each model, F.linear(F.linear(x[n], A[n]), B[n]) * scaling."""
    return torch.stack([F.linear(F.linear(x[n], a[n]), b[n]) * float(scale[n]) for n in range(x.shape[0])])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n, t, k, m, rank", [
    pytest.param(3, 19, 24, 20, 5, id="N3-T19-K24-M20-r5"),  # 2 row tiles per model, the second ragged
    pytest.param(2, 16, 16, 33, 12, id="N2-T16-K16-M33-r12"),
    pytest.param(1, 3, 40, 8, 16, id="N1-T3-K40-M8-r16"),
])
def test_batched_matches_peft_loop(n, t, k, m, rank, dtype):
    """batched_lora_update on Triton and on the reference (bmm) vs a per-model loop of F.linear calls (in fp32
    for fp16/bf16): output and the gradients of x, lora_a, lora_b."""
    x = torch.randn(n, t, k).to(dtype)
    a, b, scale = _adapters(n, rank, k, m, dtype)
    dy = torch.randn(n, t, m).to(dtype)
    up = None if dtype == torch.float32 else torch.float32
    loop = _run(lambda *p: _peft_loop(*p, scale), x, a, b, dy, upcast=up)
    tri = _run(lambda *p: batched_lora_update(*p, scale, backend="triton"), x, a, b, dy)
    ref = _run(lambda *p: batched_lora_update(*p, scale, backend="reference"), x, a, b, dy)
    for name in loop:
        assert_close(f"triton {name} vs the loop", tri[name], loop[name], dtype)
        assert_close(f"reference {name} vs the loop", ref[name], loop[name], dtype)


def test_batched_equals_routed():
    """batched_lora_update (the uniform path) == lora_update with idx = arange(N).repeat_interleave(T)."""
    n, t, k, m = 3, 10, 20, 17
    x = torch.randn(n, t, k)
    a, b, scale = _adapters(n, 7, k, m, torch.float32)
    y = batched_lora_update(x, a, b, scale, backend="triton")
    y_routed = lora_update(x.reshape(n * t, k), torch.arange(n).repeat_interleave(t), a, b, scale, backend="triton")
    assert_close("y", y.reshape(n * t, m), y_routed, torch.float32)


def test_one_launch():
    """Each forward is ONE kernel launch for all the models."""
    x, xb = torch.randn(30, 16), torch.randn(4, 10, 16)
    a, b, scale = _adapters(4, 8, 16, 12, torch.float32)
    for call in (lambda: lora_update(x, _make_idx(30, 4, "mixed"), a, b, scale, backend="triton"),
                 lambda: batched_lora_update(xb, a, b, scale, backend="triton")):
        before = dict(_backend.launch_counts)
        call()
        launched = {k: v - before.get(k, 0) for k, v in _backend.launch_counts.items() if v != before.get(k, 0)}
        assert launched == {"_lora_kernel": 1}, launched


def test_strided_inputs_and_expanded_grad():
    """``y.sum().backward()`` hands the backward an expanded dy (strides 0); x and the adapters are transposed
    views, routed and batched."""
    n, r, k, m, rank = 3, 19, 24, 20, 6
    idx = _make_idx(r, n, "mixed")
    scale = torch.rand(n) + 0.5
    x = torch.randn(k, r).T.requires_grad_()
    a = (torch.randn(n, k, rank) / k**0.5).transpose(1, 2).requires_grad_()
    b = (torch.randn(n, rank, m) / rank**0.5).transpose(1, 2).requires_grad_()
    xb = torch.randn(n, k, 7).transpose(1, 2).requires_grad_()  # [N, T, K] with K strided
    for fn, ref_fn, inp in ((lambda *p: lora_update(p[0], idx, *p[1:], scale, backend="triton"),
                             lambda *p: reference.lora_update(p[0], idx, *p[1:], scale), x),
                            (lambda *p: batched_lora_update(*p, scale, backend="triton"),
                             lambda *p: reference.batched_lora_update(*p, scale), xb)):
        got = torch.autograd.grad(fn(inp, a, b).sum(), [inp, a, b])
        leaves = [t.detach().clone().requires_grad_() for t in (inp, a, b)]
        want = torch.autograd.grad(ref_fn(*leaves).sum(), leaves)
        for name, g, w in zip(("dx", "dlora_a", "dlora_b"), got, want):
            assert_close(name, g, w, torch.float32)


def test_needs_input_grad_and_no_scale_grad():
    """Only lora_b requires grad: its gradient is right and nothing else is computed; scale gets no gradient on
    either backend."""
    x = torch.randn(13, 10)
    a, b, scale = _adapters(3, 4, 10, 6, torch.float32)
    idx = _make_idx(13, 3, "mixed")
    b.requires_grad_()
    scale.requires_grad_()
    (db,) = torch.autograd.grad((lora_update(x, idx, a, b, scale, backend="triton") ** 2).sum(), [b])
    br = b.detach().clone().requires_grad_()
    y_ref = reference.lora_update(x, idx, a, br, scale)
    (dbr,) = torch.autograd.grad((y_ref ** 2).sum(), [br])
    assert_close("dlora_b", db, dbr, torch.float32)
    for backend in ("triton", "reference"):
        with pytest.raises(RuntimeError, match="not have been used in the graph"):
            torch.autograd.grad(lora_update(x, idx, a, b, scale, backend=backend).sum(), [scale])


def test_cpu_auto_is_the_reference():
    """On CPU tensors the default backend runs the reference (no kernel launch), which matches the oracle."""
    x = torch.randn(11, 12).double()
    a, b, scale = _adapters(3, 5, 12, 7, torch.float64)
    idx = _make_idx(11, 3, "mixed")
    before = sum(_backend.launch_counts.values())
    y = lora_update(x, idx, a, b, scale, backend="auto")
    assert sum(_backend.launch_counts.values()) == before
    utils.assert_close("y", y, _oracle(x, idx, a, b, scale), torch.float64)


def test_rank_limit():
    x = torch.randn(4, 8)
    a, b, scale = _adapters(2, 257, 8, 6, torch.float32)
    with pytest.raises(ValueError, match=r"ranks up to 256, got r = 257; use backend='reference'"):
        lora_update(x, torch.zeros(4, dtype=torch.long), a, b, scale, backend="triton")
    lora_update(x, torch.zeros(4, dtype=torch.long), a, b, scale, backend="reference")  # the reference takes it


def test_errors():
    x = torch.randn(4, 8)
    a, b, scale = _adapters(3, 5, 8, 6, torch.float32)
    i0 = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"idx\[2\] = 3 is out of range.*\[-1, 3\)"):
        lora_update(x, torch.tensor([0, 1, 3, 2]), a, b, scale)
    with pytest.raises(ValueError, match=r"idx\[0\] = -2 is out of range"):
        lora_update(x, torch.tensor([-2, 1, 0, 2]), a, b, scale, backend="triton")
    with pytest.raises(TypeError, match="integer model indices, got torch.float32"):
        lora_update(x, torch.zeros(4), a, b, scale)
    with pytest.raises(ValueError, match=r"idx of shape \[R\] = \[4\]"):
        lora_update(x, torch.zeros(5, dtype=torch.long), a, b, scale)
    with pytest.raises(ValueError, match=r"x \[R, K\] = \[4, 8\] has K = 8 but lora_a \[N, r, K\] = \[3, 5, 7\]"):
        lora_update(x, i0, a[:, :, :7], b, scale)
    with pytest.raises(ValueError, match=r"lora_b of shape \[N, M, r\] with N = 3, r = 5 .* got \[3, 6, 4\]"):
        lora_update(x, i0, a, b[:, :, :4], scale)
    with pytest.raises(ValueError, match=r"lora_b of shape \[N, M, r\] with N = 3.* got \[2, 6, 5\]"):
        lora_update(x, i0, a, b[:2], scale)
    with pytest.raises(ValueError, match=r"scale of shape \[N\] = \[3\].*got \[2\]"):
        lora_update(x, i0, a, b, scale[:2])
    with pytest.raises(TypeError, match="scale must be a float tensor"):
        lora_update(x, i0, a, b, torch.ones(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x of shape \[R, K\]"):
        lora_update(x[None], i0, a, b, scale)
    with pytest.raises(ValueError, match=r"lora_a of shape \[N, r, K\], got \[5, 8\]"):
        lora_update(x, i0, a[0], b, scale)
    with pytest.raises(ValueError, match="lora_a holds no model"):
        lora_update(x, i0, a[:0], b[:0], scale[:0])
    with pytest.raises(ValueError, match=r"every tensor on one device, got .*scale on meta"):
        lora_update(x, i0, a, b, scale.to("meta"))
    with pytest.raises(TypeError, match="one dtype"):
        lora_update(x, i0, a.half(), b, scale, backend="triton")
    # batched
    with pytest.raises(ValueError, match=r"x of shape \[N, T, K\], got \[4, 8\]"):
        batched_lora_update(x, a, b, scale)
    with pytest.raises(ValueError, match=r"x \[N, T, K\] = \[2, 4, 8\] has N = 2 but lora_a"):
        batched_lora_update(x.expand(2, 4, 8), a, b, scale)
    with pytest.raises(ValueError, match=r"x \[N, T, K\] = \[3, 4, 8\] has K = 8 but lora_a"):
        batched_lora_update(x.expand(3, 4, 8), a[:, :, :6], b, scale)


@pytest.fixture
def ops():
    """torch.ops.fusecc with the lora ops registered (importing the launchers registers them)."""
    import fusecc.kernels.lora.triton  # noqa: F401

    return torch.ops.fusecc


# opcheck's sub-tests minus test_aot_dispatch_dynamic, which cannot run in the interpreter (see
# tests/kernels/test_routed_linear.py); it needs a GPU
OPCHECK_UTILS: Sequence[str] = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if ON_GPU else ())


def test_opcheck(ops):
    """Schema (run for real: no input mutated or aliased), the fake kernel (its outputs' shapes, dtypes and strides
    match a real run) and the autograd registration, for both forwards."""
    x = torch.randn(11, 12)
    a, b, scale = _adapters(3, 5, 12, 9, torch.float32)
    torch.library.opcheck(ops.lora_fwd, (x, _make_idx(11, 3, "mixed"), a, b, scale), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.lora_batched_fwd, (torch.randn(3, 7, 12), a, b, scale), test_utils=OPCHECK_UTILS)
