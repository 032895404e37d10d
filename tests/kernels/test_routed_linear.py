"""routed_linear: the Triton kernels (run in the Triton interpreter on CPU) vs kernels/routed_linear/reference.py and
vs an independent oracle that runs each row through its model; forward and every gradient (dx, dweight, dbias).
Outputs start NaN-poisoned (tests/kernels/conftest.py), so a row or element the kernels forget fails."""

from typing import Dict, Optional, Sequence

import pytest
import torch

from fusecc.kernels.routed_linear import RoutedLinear, reference, routed_linear
from tests.utils import assert_close

from ._util import ON_GPU

# (rtol, atol) per dtype: torch.testing's defaults, loosened for an fp16/bf16 result rounded once from an fp32
# accumulation vs the oracle rounded once (they may land one ulp apart), and for fp32 sums over ~40 products
TOL = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1e-2),
}

# (R, K, M, N, model of each row): R, K, M ragged against the interpreter's tiles (16 rows, 32 x 16 / 32 x 32);
# rows unsorted; -1 rows; models without rows; a model with several row tiles; N=1 and odd N; R=0
CASES = [
    pytest.param(37, 45, 33, 5, "mixed", id="R37-K45-M33-N5-mixed"),
    pytest.param(40, 20, 17, 3, "skewed", id="R40-K20-M17-N3-skewed"),
    pytest.param(16, 16, 16, 1, "all", id="R16-K16-M16-N1"),
    pytest.param(9, 8, 5, 7, "mixed", id="R9-K8-M5-N7-mixed"),
    pytest.param(6, 12, 10, 2, "unrouted", id="R6-K12-M10-N2-unrouted"),
    pytest.param(0, 8, 8, 3, "all", id="R0-K8-M8-N3"),
]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")] + (
    [pytest.param(torch.bfloat16, id="bf16")] if ON_GPU else [])


def _make_idx(r: int, n: int, kind: str) -> torch.Tensor:
    """Model of each row, shuffled. mixed: ~1/6 rows -1, models 1 and 3 (when present) get no rows;
    skewed: model 0 gets all rows but 5 (3 row tiles), model 1 none, the rest go to the last model;
    all: rows spread over every model; unrouted: every row -1."""
    if kind == "unrouted":
        return torch.full((r,), -1, dtype=torch.long)
    if kind == "skewed":
        idx = torch.cat([torch.zeros(r - 5, dtype=torch.long), torch.full((5,), n - 1, dtype=torch.long)])
    elif kind == "all":
        idx = torch.arange(r) % n
    else:
        used = [m for m in range(n) if m not in (1, 3)] or [0]
        idx = torch.tensor(used)[torch.randint(len(used), (r,))]
        idx[torch.randperm(r)[: max(1, r // 6)]] = -1
    return idx[torch.randperm(r)]


def _inputs(r, k, m, n, dtype, bias=True):
    x = torch.randn(r, k).to(dtype)
    w = (torch.randn(n, m, k) / max(k, 1) ** 0.5).to(dtype)  # outputs of order 1
    b = torch.randn(n, m).to(dtype) if bias else None
    return x, w, b


def _oracle(x, idx, w, b):
    """Row by row, in float64: y[r] = x[r] @ W[idx[r]].T + b[idx[r]], zero for idx -1."""
    rows = []
    for r in range(x.shape[0]):
        n = int(idx[r])
        if n < 0:
            rows.append(x.new_zeros(w.shape[1]))
        else:
            rows.append(x[r] @ w[n].T + (b[n] if b is not None else 0))
    return torch.stack(rows) if rows else x.new_zeros((0, w.shape[1]))


def _run(fn, x, idx, w, b, dy, upcast: Optional[torch.dtype] = None) -> Dict[str, torch.Tensor]:
    """fn(x, idx, w, b) and the grads of every float input, as {name: tensor} (computed in `upcast` if given)."""
    named = {"x": x, "weight": w, "bias": b}
    leaves = {k: (t.to(upcast) if upcast else t).detach().requires_grad_() for k, t in named.items() if t is not None}
    y = fn(leaves["x"], idx, leaves["weight"], leaves.get("bias"))
    grads = [None] * len(leaves)
    if y.requires_grad:  # the oracle's y, with no row routed, is a constant
        grads = torch.autograd.grad(y, list(leaves.values()), dy.to(upcast) if upcast else dy, allow_unused=True)
    # the oracle leaves an unused leaf without grad: its gradient is zero
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves.values(), grads)]
    out = {"y": y, **{f"d{k}": g for k, g in zip(leaves, grads)}}
    return {k: v.detach().to(x.dtype) for k, v in out.items()}


def _check(x, idx, w, b, dy=None):
    """Triton vs the reference (in fp32 for fp16/bf16) and vs the row-by-row oracle (in fp64): output and grads;
    exact zeros for the rows of no model and for the models without rows."""
    dy = torch.randn(x.shape[0], w.shape[1]).to(x.dtype) if dy is None else dy
    tri = _run(lambda *a: routed_linear(*a, backend="triton"), x, idx, w, b, dy)
    up = None if x.dtype == torch.float32 else torch.float32
    ref = _run(reference.routed_linear, x, idx, w, b, dy, upcast=up)
    ora = _run(_oracle, x, idx, w, b, dy, upcast=torch.float64)
    assert set(tri) == set(ref) == set(ora)
    rtol, atol = TOL[x.dtype]
    for name in ref:
        assert_close(f"{name} vs reference", tri[name], ref[name], x.dtype, rtol=rtol, atol=atol)
        assert_close(f"{name} vs oracle", tri[name], ora[name], x.dtype, rtol=rtol, atol=atol)
    unrouted = idx == -1
    empty = torch.bincount(idx[~unrouted], minlength=w.shape[0]) == 0
    assert torch.equal(tri["y"][unrouted], torch.zeros_like(tri["y"][unrouted])), "unrouted rows must be zero"
    assert torch.equal(tri["dx"][unrouted], torch.zeros_like(tri["dx"][unrouted])), "unrouted rows get no grad"
    assert torch.equal(tri["dweight"][empty], torch.zeros_like(tri["dweight"][empty])), "empty models: dW = 0"
    if b is not None:
        assert torch.equal(tri["dbias"][empty], torch.zeros_like(tri["dbias"][empty])), "empty models: db = 0"
    return tri


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("r, k, m, n, kind", CASES)
def test_matches_reference_and_oracle(r, k, m, n, kind, dtype):
    x, w, b = _inputs(r, k, m, n, dtype)
    _check(x, _make_idx(r, n, kind), w, b)


def test_no_bias_bf16_int32_idx():
    """No bias; bf16 (the interpreter upcasts its dot operands); an int32 idx."""
    x, w, _ = _inputs(21, 24, 18, 4, torch.bfloat16, bias=False)
    _check(x, _make_idx(21, 4, "mixed").int(), w, None)


def test_expanded_grad_and_strided_inputs():
    """``y.sum().backward()`` hands the backward an expanded dy (strides 0); x and weight are transposed views."""
    n, r, k, m = 3, 19, 24, 20
    x = torch.randn(k, r).T.requires_grad_()
    w = (torch.randn(n, k, m) / k**0.5).transpose(1, 2).requires_grad_()
    b = torch.randn(n, m, requires_grad=True)
    idx = _make_idx(r, n, "mixed")
    routed_linear(x, idx, w, b, backend="triton").sum().backward()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    reference.routed_linear(xr, idx, wr, br).sum().backward()
    for name, a, e in (("dx", x.grad, xr.grad), ("dweight", w.grad, wr.grad), ("dbias", b.grad, br.grad)):
        assert_close(name, a, e, torch.float32, *TOL[torch.float32])


def test_needs_input_grad():
    """Only the weight requires grad: dweight is right, and no dx / dbias is computed."""
    x, w, b = _inputs(13, 10, 6, 3, torch.float32)
    idx = _make_idx(13, 3, "mixed")
    w.requires_grad_()
    (dw,) = torch.autograd.grad((routed_linear(x, idx, w, b, backend="triton") ** 2).sum(), [w])
    wr = w.detach().clone().requires_grad_()
    (dwr,) = torch.autograd.grad((reference.routed_linear(x, idx, wr, b) ** 2).sum(), [wr])
    assert_close("dweight", dw, dwr, torch.float32, *TOL[torch.float32])


@pytest.mark.parametrize("block_r", [16, 32, 128])
def test_tile_table(block_r):
    """The tile table covers every routed row exactly once, gives the -1 rows zero tiles, gives models without
    rows no tile at all (they cost nothing), and fits in the sync-free upper bound."""
    from fusecc.kernels.routed_linear.triton import _sort_rows, _tile_table

    for r, n in ((1, 1), (37, 5), (300, 7), (200, 300), (64, 1)):
        idx = torch.randint(-1, max(1, n // 2), (r,))  # the upper half of the models gets no rows
        perm, bounds = _sort_rows(idx, n)
        tiles = _tile_table(bounds, r, n, block_r).long()
        assert tiles.shape[1] <= min(r, -(-r // block_r) + n)
        model, first, end = tiles  # a tile holds sorted positions [first, min(first + block_r, end))
        live = first < end
        end = torch.minimum(end, first + block_r)
        covered = torch.cat([perm[f:e] for f, e in zip(first[live].tolist(), end[live].tolist())])
        assert sorted(covered.tolist()) == list(range(r)), "every row in exactly one tile"
        for mdl, f, e in zip(model[live].tolist(), first[live].tolist(), end[live].tolist()):
            assert bool((idx[perm[f:e]] == mdl).all()), "a tile holds rows of its model only"
        used = set(model[live].tolist()) - {-1}
        assert used == set(idx[idx >= 0].tolist()), "models without rows get no tile"


def test_module():
    m = RoutedLinear(3, 16, 8)
    x, idx = torch.randn(10, 16), _make_idx(10, 3, "mixed")
    assert_close("y", m(x, idx), _oracle(x.double(), idx, m.weight.double(), m.bias.double()).float())
    assert "num_models=3, in_features=16, out_features=8, bias=True" in repr(m)
    assert RoutedLinear(2, 4, 4, bias=False).bias is None


def test_errors():
    x, w, b = _inputs(4, 8, 6, 3, torch.float32)
    with pytest.raises(ValueError, match=r"idx\[2\] = 3 is out of range.*\[-1, 3\)"):
        routed_linear(x, torch.tensor([0, 1, 3, 2]), w, b)
    with pytest.raises(ValueError, match=r"idx\[0\] = -2 is out of range"):
        routed_linear(x, torch.tensor([-2, 1, 0, 2]), w, b, backend="triton")
    with pytest.raises(TypeError, match="integer model indices, got torch.float32"):
        routed_linear(x, torch.zeros(4), w, b)
    with pytest.raises(ValueError, match=r"idx of shape \[R\] = \[4\]"):
        routed_linear(x, torch.zeros(5, dtype=torch.long), w, b)
    with pytest.raises(ValueError, match=r"x \[R, K\] = \[4, 8\] has K = 8 but weight"):
        routed_linear(x, torch.zeros(4, dtype=torch.long), w[:, :, :5], b)
    with pytest.raises(ValueError, match=r"bias of shape \[N, M\] = \[3, 6\]"):
        routed_linear(x, torch.zeros(4, dtype=torch.long), w, b[:2])
    with pytest.raises(ValueError, match=r"x of shape \[R, K\]"):
        routed_linear(x[None], torch.zeros(4, dtype=torch.long), w, b)
    with pytest.raises(TypeError, match="one dtype"):
        routed_linear(x, torch.zeros(4, dtype=torch.long), w.half(), b, backend="triton")


@pytest.fixture
def ops():
    """torch.ops.fusecc with the routed_linear ops registered (importing the launchers registers them)."""
    import fusecc.kernels.routed_linear.triton  # noqa: F401

    return torch.ops.fusecc


# opcheck's sub-tests minus test_aot_dispatch_dynamic, which cannot run in the interpreter: wrap_triton returns an
# interpreted kernel unwrapped (torch/_library/triton.py), so AOTAutograd cannot put it in its graph, and
# _backend.launch skips launches on the fake tensors it traces with; the traced graph then returns the unwritten
# (NaN-poisoned) outputs and the comparison with eager fails. It needs a GPU (the real, traceable JITFunction).
OPCHECK_UTILS: Sequence[str] = ("test_schema", "test_autograd_registration", "test_faketensor") + (
    ("test_aot_dispatch_dynamic",) if ON_GPU else ())


def test_opcheck(ops):
    """Schema (run for real: no input mutated or aliased), the fake kernel (its outputs' shapes, dtypes and strides
    match a real run) and the autograd registration, for the forward (with and without bias) and both backwards."""
    x, w, b = _inputs(11, 12, 9, 3, torch.float32)
    idx, dy = _make_idx(11, 3, "mixed"), torch.randn(11, 9)
    torch.library.opcheck(ops.routed_linear_fwd, (x, idx, w, b), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.routed_linear_fwd, (x, idx, w, None), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.routed_linear_bwd_dx, (dy, idx, w), test_utils=OPCHECK_UTILS)
    torch.library.opcheck(ops.routed_linear_bwd_dw, (dy, x, idx, 3), test_utils=OPCHECK_UTILS)
