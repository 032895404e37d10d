"""Fused multi-model optimizer steps: the Triton kernels (run in the Triton interpreter on CPU) vs
kernels/optim/reference.py vs the real oracle, N separate torch.optim optimizers, over K steps; plus the wiring
into fusecc.optim. Every hyper-parameter differs per model; several ragged parameter tensors go through one launch."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from fusecc.kernels import use_backend
from fusecc.kernels.optim import adam_step, reference, sgd_step
from tests.utils import assert_close

from ._util import DEVICE, ON_GPU, randn

K = 3  # steps per test
# per model, all in one launch. 41 x 53 = 2173 > 2 * 1024: every model has a block inside it (the kernel's
# scalar-coefficient path), blocks across two models and a tail; the small ones share blocks between models
SHAPES = [(7, 5), (13,), (1,), (41, 53)]
# (rtol, atol). Kernel vs reference: both fp32 math rounded once to the dtype (CPU torch's vectorised fp32 sqrt is
# not correctly rounded: an ulp apart). vs torch.optim: fp32 as tests/utils.TOL; on fp16 params torch rounds every
# op's result to fp16 (AdamW: p * (1 - lr * wd), then the update, then the moments) where the kernel rounds once,
# so after K=3 steps they land up to 3 fp16 ulps apart (an ulp is 2**-10 relative). Measured against an fp64
# torch.optim run, the kernel's fp16 error is of the same size as torch's own (the final rounding dominates both).
# bf16 (on a GPU only): the same reasoning with bf16's ulp (2**-7 relative)
TOL_REF = {torch.float32: (1e-5, 1e-6), torch.float16: (1e-3, 1e-3), torch.bfloat16: (8e-3, 8e-3)}
TOL_TORCH = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 4e-3), torch.bfloat16: (3e-2, 3e-2)}

NS = [pytest.param(1, id="N1"), pytest.param(3, id="N3")]
DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")] + (
    [pytest.param(torch.bfloat16, id="bf16")] if ON_GPU else [])


def pick(vals, n):
    return [vals[i % len(vals)] for i in range(n)]


SGD_CASES = {  # every hyper-parameter per model; model 1 of 3 has no momentum (torch makes no buffer for it)
    "momentum": dict(lr=[0.1, 0.05, 0.2], momentum=[0.9, 0.0, 0.5], dampening=[0.1, 0.0, 0.3],
                     weight_decay=[0.01, 0.1, 0.0]),
    "nesterov": dict(lr=[0.1, 0.05, 0.2], momentum=[0.9, 0.7, 0.5], dampening=0.0, weight_decay=[0.0, 0.1, 0.01],
                     nesterov=True),
    "plain-maximize": dict(lr=[0.1, 0.05, 0.2], weight_decay=[0.01, 0.0, 0.1], maximize=True),
}
ADAM_CASES = {
    "adam": dict(lr=[1e-2, 3e-2, 5e-3], betas=([0.9, 0.6, 0.8], [0.999, 0.9, 0.95]), eps=[1e-3, 1e-2, 1e-4],
                 weight_decay=[0.0, 0.1, 0.01]),
    "adamw": dict(lr=[1e-2, 3e-2, 5e-3], betas=([0.9, 0.6, 0.8], [0.999, 0.9, 0.95]), eps=[1e-3, 1e-2, 1e-4],
                  weight_decay=[0.1, 0.0, 0.5], decoupled=True),
    "amsgrad-maximize": dict(lr=[1e-2, 3e-2, 5e-3], betas=([0.5, 0.9, 0.8], [0.9, 0.99, 0.6]),
                             eps=[1e-3, 1e-2, 1e-4], weight_decay=[0.0, 0.1, 0.01], amsgrad=True, maximize=True),
}


def per_model(kw, n):
    """The case's hyper-parameters for n models (lists cycled to length n), and model i's scalar ones."""
    out = {}
    for k, v in kw.items():
        if k == "betas":
            out[k] = tuple(pick(b, n) for b in v)
        else:
            out[k] = pick(v, n) if isinstance(v, list) else v
    return out


def model_kw(kw, i):
    return {k: (tuple(b[i] for b in v) if k == "betas" else v[i] if isinstance(v, list) else v) for k, v in kw.items()}


def make(n, dtype, shapes=SHAPES):
    """Stacked params and K steps of gradients, |g| in [0.1, 1.1] so that fp16's g*g stays a normal number."""
    params = [torch.randn(n, *s).to(dtype) for s in shapes]
    grads = [[(torch.randn(n, *s).sign() * (0.1 + torch.rand(n, *s))).to(dtype) for s in shapes] for _ in range(K)]
    return params, grads


def run_sgd(params, grads, kw, backend):
    """K fused steps; returns (params, momentum buffers or None)."""
    ps = [p.clone() for p in params]
    has_momentum = any(m != 0 for m in kw.get("momentum", [0.0]))
    bufs = [torch.full_like(p, float("nan")) for p in ps] if has_momentum else None  # first step must write them
    hp = {k: v for k, v in kw.items() if k in ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize")}
    for k, gs in enumerate(grads):
        sgd_step(ps, gs, bufs, first_step=k == 0, backend=backend, **hp)
    return ps, bufs


def run_adam(params, grads, kw, backend, state=None, steps=None):
    """K fused steps (from ``state`` = (exp_avgs, exp_avg_sqs, max_exp_avg_sqs) and per-model ``steps`` if
    given); returns (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None)."""
    ps = [p.clone() for p in params]
    if state is None:
        state = ([torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                 [torch.zeros_like(p) for p in ps])
    m, v, vmax = ([t.clone() for t in ts] for ts in state)
    vmax = vmax if kw.get("amsgrad") else None
    b1, b2 = kw["betas"]
    for k, gs in enumerate(grads):
        step = k + 1 if steps is None else steps + k + 1
        adam_step(ps, gs, m, v, vmax, lr=kw["lr"], beta1=b1, beta2=b2, eps=kw["eps"], weight_decay=kw["weight_decay"],
                  decoupled=kw.get("decoupled", False), maximize=kw.get("maximize", False), step=step, backend=backend)
    return ps, m, v, vmax


def torch_oracle(cls, params, grads, kw, init=None):
    """Model i alone through torch.optim.<cls> (single-tensor path) for K steps; returns per-model params and
    states. ``init(i, params_i) -> state dict per param`` preloads optimizer state."""
    n = params[0].shape[0]
    out = []
    for i in range(n):
        ps = [p[i].clone().requires_grad_() for p in params]
        opt = cls(ps, foreach=False, **model_kw(kw, i))
        if init is not None:
            for p, st in zip(ps, init(i)):
                opt.state[p] = st
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g[i].clone()
            opt.step()
        out.append(([p.detach() for p in ps], [opt.state[p] for p in ps]))
    return out


def assert_models(name, fused, per_model_vals, dtype, tol, models=None):
    """fused [N, ...] tensors vs a list (per model) of lists (per tensor), model by model."""
    rtol, atol = tol[dtype]
    for i, vals in enumerate(per_model_vals):
        if models is not None and i not in models:
            continue
        for j, (f, want) in enumerate(zip(fused, vals)):
            assert_close(f"{name}[{j}] model {i}", f[i], want, dtype, rtol=rtol, atol=atol)


def assert_lists(name, a, b, dtype, tol):
    rtol, atol = tol[dtype]
    for j, (x, y) in enumerate(zip(a, b)):
        assert_close(f"{name}[{j}]", x, y, dtype, rtol=rtol, atol=atol)


@pytest.fixture
def launches():
    """The launch counter of the Triton ops (importing the launchers registers them)."""
    from fusecc.kernels.optim import triton as tri

    tri.launches.clear()
    return tri.launches


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", list(SGD_CASES))
def test_sgd(case, n, dtype, launches):
    kw = per_model(SGD_CASES[case], n)
    params, grads = make(n, dtype)
    tri = run_sgd(params, grads, kw, "triton")
    assert launches["sgd_step"] == K  # all tensors of a step in one launch
    ref = run_sgd(params, grads, kw, "reference")
    assert_lists("param triton vs reference", tri[0], ref[0], dtype, TOL_REF)
    if tri[1] is not None:
        assert_lists("momentum_buffer triton vs reference", tri[1], ref[1], dtype, TOL_REF)
    oracle = torch_oracle(torch.optim.SGD, params, grads, kw)
    assert_models("param vs torch.optim.SGD", tri[0], [o[0] for o in oracle], dtype, TOL_TORCH)
    if tri[1] is not None:
        with_buf = [i for i in range(n) if kw["momentum"][i] != 0]
        bufs = [[st["momentum_buffer"] for st in o[1]] if i in with_buf else None for i, o in enumerate(oracle)]
        assert_models("momentum_buffer vs torch.optim.SGD", tri[1], bufs, dtype, TOL_TORCH, with_buf)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("case", list(ADAM_CASES))
def test_adam(case, n, dtype, launches):
    kw = per_model(ADAM_CASES[case], n)
    params, grads = make(n, dtype)
    tri = run_adam(params, grads, kw, "triton")
    assert launches["adam_step"] == K
    ref = run_adam(params, grads, kw, "reference")
    names = ("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    for name, a, b in zip(names, tri, ref):
        if a is not None:
            assert_lists(f"{name} triton vs reference", a, b, dtype, TOL_REF)
    cls = torch.optim.AdamW if kw.get("decoupled") else torch.optim.Adam
    oracle = torch_oracle(cls, params, grads, {k: v for k, v in kw.items() if k != "decoupled"})
    assert_models("param vs torch.optim", tri[0], [o[0] for o in oracle], dtype, TOL_TORCH)
    for name, fused in zip(names[1:], tri[1:]):
        if fused is not None:
            want = [[st[name] for st in o[1]] for o in oracle]
            assert_models(f"{name} vs torch.optim", fused, want, dtype, TOL_TORCH)


def test_adam_per_model_step_counts_and_state():
    """Models at different step counts (an [N] step tensor) with non-zero moments: each equals a torch.optim.Adam
    resumed from the same state at its own step."""
    n, dtype = 3, torch.float32
    kw = per_model(ADAM_CASES["amsgrad-maximize"], n)
    params, grads = make(n, dtype)
    state = [[torch.randn_like(p) for p in params], [torch.rand_like(p) for p in params],
             [1 + torch.rand_like(p) for p in params]]
    steps = torch.tensor([0.0, 4.0, 1.0])
    tri = run_adam(params, grads, kw, "triton", state, steps)
    ref = run_adam(params, grads, kw, "reference", state, steps)
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), tri, ref):
        assert_lists(f"{name} triton vs reference", a, b, dtype, TOL_REF)

    def init(i):
        return [{"step": steps[i].clone(), "exp_avg": m[i].clone(), "exp_avg_sq": v[i].clone(),
                 "max_exp_avg_sq": vm[i].clone()} for m, v, vm in zip(*state)]

    oracle = torch_oracle(torch.optim.Adam, params, grads, kw, init)
    assert_models("param vs torch.optim.Adam", tri[0], [o[0] for o in oracle], dtype, TOL_TORCH)
    assert_models("max_exp_avg_sq vs torch.optim.Adam", tri[3], [[st["max_exp_avg_sq"] for st in o[1]]
                                                               for o in oracle], dtype, TOL_TORCH)


@pytest.mark.parametrize("opt", ["sgd", "adam"])
def test_nan_grad_in_one_model_leaves_others_bit_identical(opt):
    n, bad = 3, 1
    kw = per_model(SGD_CASES["nesterov"] if opt == "sgd" else ADAM_CASES["amsgrad-maximize"], n)
    params, grads = make(n, torch.float32)
    nan_grads = [[g.clone() for g in gs] for gs in grads]
    nan_grads[1][3][bad, 5, 7] = float("nan")  # step 2, one element of the multi-block tensor
    nan_grads[1][2][bad] = float("nan")
    run = run_sgd if opt == "sgd" else run_adam
    clean, dirty = run(params, grads, kw, "triton"), run(params, nan_grads, kw, "triton")
    others = [i for i in range(n) if i != bad]
    for ts_clean, ts_dirty in zip(clean, dirty):
        for a, b in zip(ts_clean, ts_dirty):
            assert torch.equal(a[others], b[others])
    assert torch.isnan(dirty[0][2][bad]).all() and torch.isnan(dirty[0][3][bad, 5, 7])


def test_bf16_state_stays_bf16():
    params, grads = make(3, torch.bfloat16, [(4, 5)])
    kw = per_model(ADAM_CASES["adamw"], 3)
    tri = run_adam(params, grads, kw, "triton")
    ref = run_adam(params, grads, kw, "reference")
    assert tri[1][0].dtype == torch.bfloat16
    for name, a, b in zip(("param", "exp_avg", "exp_avg_sq"), tri, ref):
        assert_close(name, a[0], b[0], torch.bfloat16)


def test_errors():
    p, g = torch.randn(3, 4), torch.randn(3, 4)
    with pytest.raises(ValueError, match="'lr' has 2 values, expected 1 or N=3"):
        sgd_step([p], [g], lr=[0.1, 0.2])
    with pytest.raises(ValueError, match="momentum != 0 needs momentum_buffers"):
        sgd_step([p], [g], lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=r"grads\[0\] is torch.float32 \[3, 5\].*expected torch.float32 \[3, 4\]"):
        sgd_step([p], [torch.randn(3, 5)], lr=0.1, backend="triton")
    with pytest.raises(ValueError, match=r"exp_avgs\[0\] is not contiguous"):
        m = torch.zeros(4, 3).t()
        adam_step([p], [g], [m], [torch.zeros(3, 4)], lr=0.1, step=1, backend="triton")
    with pytest.raises(TypeError, match="Triton kernels take"):
        sgd_step([p.double()], [g.double()], lr=0.1, backend="triton")


def test_opcheck(launches):
    """Schema (the declared Tensor[] mutations are the only ones), the fake kernel, and AOTAutograd (torch.compile)
    tracing the opaque custom op with its mutations, for both ops."""
    ops = torch.ops.fusecc
    ps, gs = [torch.randn(3, 7, 5), torch.randn(3, 13)], [torch.randn(3, 7, 5), torch.randn(3, 13)]
    zs = [[torch.rand_like(p) for p in ps] for _ in range(3)]
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    hp = reference.sgd_hparams(3, ps[0].device, lr=[0.1, 0.2, 0.3], momentum=0.9)
    torch.library.opcheck(ops.sgd_step, (ps, gs, zs[0], hp, True, False, False), test_utils=utils)
    hp = reference.adam_hparams(3, ps[0].device, lr=0.1, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1,
                                step=2, decoupled=True)
    torch.library.opcheck(ops.adam_step, (ps, gs, zs[0], zs[1], zs[2], hp, True, False), test_utils=utils)


# --- wiring: fusecc.optim routes its steps through the kernel when the kernels' backend picks Triton ---------------

def _mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


@pytest.mark.parametrize("opt_name,kwargs", [
    ("SGD", dict(lr=[0.1, 0.05, 0.2], momentum=[0.9, 0.0, 0.5], dampening=[0.1, 0.0, 0.2],
                 weight_decay=[0.0, 0.01, 0.1])),
    ("AdamW", dict(lr=[1e-2, 3e-3, 3e-2], betas=([0.9, 0.8, 0.5], 0.99), weight_decay=[0.0, 0.1, 0.5],
                   amsgrad=True)),
], ids=["SGD", "AdamW"])
def test_fusecc_optim_step_through_kernel(opt_name, kwargs, launches):
    """fusecc.optim with the Triton backend forced (interpreter) equals its aten path on CPU, in one launch per
    step for the group's 4 parameters."""
    fused = fusecc.fuse([_mlp() for _ in range(3)]).train()
    twin = copy.deepcopy(fused)
    opt, opt_aten = (getattr(fusecc.optim, opt_name)(f, **kwargs) for f in (fused, twin))
    g = torch.Generator().manual_seed(1)
    for step in range(K):
        x = randn(3, 4, 5, generator=g)
        y = torch.randint(0, 3, (3, 4), generator=g, device="cpu").to(DEVICE)
        for f, o, backend in ((fused, opt, "triton"), (twin, opt_aten, "reference")):
            fusecc.per_model_loss(F.cross_entropy, f(x), y).sum().backward()
            with use_backend(backend):
                o.step()
            o.zero_grad()
        assert sum(launches.values()) == step + 1
    for (name, p), q in zip(fused.named_parameters(), twin.parameters()):
        assert_close(name, p, q)
    for (p, st), st_aten in zip(opt.state.items(), opt_aten.state.values()):
        assert set(st) == set(st_aten)
        for k, t in st.items():
            assert_close(k, t, st_aten[k])
