"""Training N models as one: fused optimizers, schedules and clipping == N torch optimizers run separately."""

import copy
import io

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fusecc
from tests.utils import assert_close, make_models

N = 4


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        # no conv bias before BN: its gradient is rounding noise, which Adam would scale up to full steps
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


@pytest.fixture(autouse=True)
def cpu_kernels_for_small_models(monkeypatch):
    """These models are small, and fusecc.optim runs torch's fused CPU kernels (N calls a step) only from 128K
    elements per model on; the tests run them anyway so that "auto" tests the kernels (test_small_models_... tests
    the threshold)."""
    import fusecc.optim as fo

    monkeypatch.setattr(fo, "_CPU_FUSED_MIN_ELEMENTS", 0)


def data(steps, n=N, b=6):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(n, b, 2, 5, 5, generator=g), torch.randint(0, 3, (n, b), generator=g)) for _ in range(steps)]


def per_model(kwargs, i):
    """Model i's settings: list values are per model (milestones only when it is a list of lists)."""
    def pick(k, v):
        if k == "milestones":
            return v[i] if isinstance(v[0], list) else v
        return v[i] if isinstance(v, list) else v

    return {k: pick(k, v) for k, v in kwargs.items()}


def run_steps(fused, opt, models, ref_opts, batches, sched=None, ref_scheds=()):
    """The same steps fused (one optimizer, per-model settings) and per model (N torch optimizers)."""
    for x, y in batches:
        fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        for i, (m, o) in enumerate(zip(models, ref_opts)):
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()
            o.zero_grad()
            if ref_scheds:
                ref_scheds[i].step()


def train_both(opt_name, kwargs, steps=3, torch_kwargs=None):
    """K fused steps vs K steps of N torch optimizers with each model's settings; returns (fused, models)."""
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    opt = getattr(fusecc.optim, opt_name)(fused, **kwargs)
    tk = torch_kwargs or kwargs
    ref = [getattr(torch.optim, opt_name)(m.parameters(), **per_model(tk, i)) for i, m in enumerate(models)]
    run_steps(fused, opt, models, ref, data(steps))
    return fused, models, opt


def assert_same_weights(fused, models, rtol=1e-4, atol=1e-5):
    for name, p in fused.named_parameters():
        assert_close(name, p.detach(), torch.stack([m.get_parameter(name).detach() for m in models]), rtol=rtol,
                     atol=atol)
    for name, b in fused.named_buffers():
        if "running" in name:
            assert_close(name, b, torch.stack([m.get_buffer(name) for m in models]), rtol=rtol, atol=atol)


OPTIMIZERS = [
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2])),
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2], momentum=[0.0, 0.9, 0.5, 0.8], dampening=[0.0, 0.1, 0.0, 0.3],
                 weight_decay=[0.0, 1e-2, 1e-3, 0.1])),
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2], momentum=[0.9, 0.5, 0.7, 0.1], nesterov=True, weight_decay=1e-3)),
    ("Adam", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], eps=[1e-8, 1e-6, 1e-7, 1e-5], weight_decay=[0.0, 0.01, 0.1, 0.0])),
    ("Adam", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], amsgrad=True)),
    ("AdamW", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], weight_decay=[0.0, 0.01, 0.1, 0.5])),
    ("RMSprop", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], alpha=[0.99, 0.9, 0.8, 0.95], momentum=[0.0, 0.9, 0.5, 0.0],
                     weight_decay=[0.0, 0.01, 0.0, 0.1])),
    ("RMSprop", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], centered=True, eps=[1e-8, 1e-6, 1e-7, 1e-5])),
    ("RMSprop", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], centered=True, momentum=[0.9, 0.0, 0.5, 0.1], maximize=True,
                     weight_decay=[0.1, 0.0, 0.01, 0.0])),
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2], momentum=[0.9, 0.0, 0.5, 0.8], maximize=True, weight_decay=1e-2)),
    # every flag per model too
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2], momentum=0.9, maximize=[True, False, False, True])),
    ("Adam", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], amsgrad=[True, False, True, False], maximize=[False, True, True, False])),
    ("AdamW", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], amsgrad=[False, True, False, False], maximize=[True, False, False, False])),
    ("RMSprop", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], momentum=0.5, maximize=[False, True, False, True])),
]


@pytest.mark.parametrize("opt_name", ["SGD", "RMSprop", "Adam"])
def test_cpu_step_is_one_pass_kernel_per_model(opt_name, monkeypatch):
    """On the CPU the step runs one-pass kernels, not a chain of torch ops: torch's fused SGD / Adam kernel once per
    model over that model's slices, fusecc's C RMSprop kernel once per parameter."""
    calls = []
    if opt_name == "RMSprop":
        import fusecc.optim as fo

        real = fo._cpu_optim.rmsprop_step
        monkeypatch.setattr(fo._cpu_optim, "rmsprop_step", lambda *a, **k: (calls.append(1), real(*a, **k)))
        assert fo._cpu_optim.library() is not None
    else:
        name = "_fused_sgd_" if opt_name == "SGD" else "_fused_adam_"
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, **k: (calls.append(1), real(*a, **k)))
    fused = fusecc.fuse(make_models(Net, N))
    opt = getattr(fusecc.optim, opt_name)(fused, lr=[1e-3, 2e-3, 3e-3, 4e-3])
    x, y = data(1)[0]
    fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
    opt.step()
    nparams = sum(1 for p in fused.parameters() if p.requires_grad)
    assert len(calls) == (nparams if opt_name == "RMSprop" else N)


@pytest.mark.parametrize("opt_name,kwargs", OPTIMIZERS, ids=[f"{o}-{i}" for i, (o, _) in enumerate(OPTIMIZERS)])
def test_fused_optimizer_equals_torch_per_model(opt_name, kwargs):
    fused, models, _ = train_both(opt_name, kwargs)
    assert_same_weights(fused, models)


def test_adam_per_model_betas():
    b1, b2 = [0.9, 0.8, 0.5, 0.95], [0.999, 0.99, 0.9, 0.98]
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    opt = fusecc.optim.Adam(fused, lr=1e-2, betas=(b1, b2))
    ref = [torch.optim.Adam(m.parameters(), lr=1e-2, betas=(b1[i], b2[i])) for i, m in enumerate(models)]
    run_steps(fused, opt, models, ref, data(3))
    assert_same_weights(fused, models)


def test_param_groups_no_decay_biases():
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    decay = [p for n, p in fused.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in fused.named_parameters() if not n.endswith("weight")]
    wd = [0.0, 0.1, 0.2, 0.3]
    opt = fusecc.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                             lr=1e-2, num_models=N)
    ref = []
    for i, m in enumerate(models):
        d = [p for n, p in m.named_parameters() if n.endswith("weight")]
        nd = [p for n, p in m.named_parameters() if not n.endswith("weight")]
        ref.append(torch.optim.AdamW([{"params": d, "weight_decay": wd[i]}, {"params": nd, "weight_decay": 0.0}],
                                     lr=1e-2))
    run_steps(fused, opt, models, ref, data(3))
    assert_same_weights(fused, models)


def test_optimizer_state_dict_round_trip():
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    opt = fusecc.optim.Adam(fused, lr=[1e-3, 2e-3, 3e-3, 4e-3])
    batches = data(4)
    for x, y in batches[:2]:
        fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
        opt.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"model": fused.state_dict(), "opt": opt.state_dict()}, buf)
    twin = copy.deepcopy(fused)
    buf.seek(0)
    ck = torch.load(buf, weights_only=True)
    twin.load_state_dict(ck["model"])
    opt2 = fusecc.optim.Adam(twin, lr=0.5)
    opt2.load_state_dict(ck["opt"])
    assert opt2.param_groups[0]["lr"] == [1e-3, 2e-3, 3e-3, 4e-3]
    for x, y in batches[2:]:
        for f, o in ((fused, opt), (twin, opt2)):
            fusecc.per_model_loss(F.cross_entropy, f(x), y).sum().backward()
            o.step()
            o.zero_grad()
    for (n, p), q in zip(fused.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), n


SCHEDULERS = [
    ("StepLR", dict(step_size=[2, 3, 1, 4], gamma=[0.5, 0.1, 0.9, 0.3])),
    ("MultiStepLR", dict(milestones=[[2, 4], [1], [3, 5], [6]], gamma=0.5)),
    ("MultiStepLR", dict(milestones=[2, 5], gamma=[0.5, 0.1, 0.2, 0.9])),
    ("ExponentialLR", dict(gamma=[0.9, 0.8, 0.99, 0.5])),
    ("CosineAnnealingLR", dict(T_max=[5, 10, 3, 7], eta_min=[0.0, 1e-4, 1e-3, 0.0])),
    ("LinearLR", dict(start_factor=[0.1, 0.5, 0.25, 1.0], total_iters=[3, 5, 2, 4])),
    ("OneCycleLR", dict(max_lr=[0.1, 0.2, 0.05, 0.3], total_steps=[10, 12, 11, 20])),
]


@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
@pytest.mark.parametrize("sched_name,kwargs", SCHEDULERS, ids=[f"{s}-{i}" for i, (s, _) in enumerate(SCHEDULERS)])
def test_schedulers_equal_torch_per_model(opt_name, sched_name, kwargs):
    lrs = [0.1, 0.01, 0.05, 0.2]
    okw = dict(lr=lrs, momentum=0.9) if opt_name == "SGD" else dict(lr=lrs)
    fused = fusecc.fuse(make_models(Net, N))
    opt = getattr(fusecc.optim, opt_name)(fused, **okw)
    sched = getattr(fusecc.optim.lr_scheduler, sched_name)(opt, **kwargs)
    refs = []
    for i in range(N):
        o = getattr(torch.optim, opt_name)([nn.Parameter(torch.zeros(1))], **per_model(okw, i))
        refs.append((o, getattr(torch.optim.lr_scheduler, sched_name)(o, **per_model(kwargs, i))))
    for step in range(9):
        assert opt.param_groups[0]["lr"] == pytest.approx([o.param_groups[0]["lr"] for o, _ in refs]), step
        if sched_name == "OneCycleLR":
            key, pick = ("momentum", lambda g: g["momentum"]) if opt_name == "SGD" else ("beta1", lambda g: g["betas"][0])
            assert opt.param_groups[0][key] == pytest.approx([pick(o.param_groups[0]) for o, _ in refs])
        opt.step()
        sched.step()
        for o, s in refs:
            o.step()
            s.step()


def test_lambda_lr_takes_model_index_and_step():
    fused = fusecc.fuse(make_models(Net, N))
    opt = fusecc.optim.SGD(fused, lr=1.0)
    sched = fusecc.optim.lr_scheduler.LambdaLR(opt, lambda i, step: 0.5 ** (step * (i + 1)))
    for step in range(4):
        assert opt.param_groups[0]["lr"] == pytest.approx([0.5 ** (step * (i + 1)) for i in range(N)])
        opt.step()
        sched.step()


def test_scheduled_training_equals_torch():
    """Optimizer + per-model cosine schedule over 4 steps: weights equal N torch runs."""
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    lrs, tmax = [0.1, 0.05, 0.2, 0.01], [2, 3, 4, 5]
    opt = fusecc.optim.SGD(fused, lr=lrs, momentum=0.9)
    sched = fusecc.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=tmax)
    ref = []
    for i, m in enumerate(models):
        o = torch.optim.SGD(m.parameters(), lr=lrs[i], momentum=0.9)
        ref.append((o, torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=tmax[i])))
    run_steps(fused, opt, models, [o for o, _ in ref], data(4), sched, [s for _, s in ref])
    assert_same_weights(fused, models)


@pytest.mark.parametrize("norm_type", [2.0, 1.0, float("inf")])
def test_clip_grad_norm_per_model(norm_type):
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    x, y = data(1)[0]
    fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
    max_norm = [0.1, 1.0, 0.01, 100.0]
    norms = fusecc.utils.clip_grad_norm_(fused, max_norm, norm_type)
    for i, m in enumerate(models):
        F.cross_entropy(m(x[i]), y[i]).backward()
        ref = torch.nn.utils.clip_grad_norm_(m.parameters(), max_norm[i], norm_type)
        assert_close(f"norm[{i}]", norms[i], ref, rtol=1e-5, atol=1e-6)
    for name, p in fused.named_parameters():
        assert_close(f"{name}.grad", p.grad, torch.stack([m.get_parameter(name).grad for m in models]), rtol=1e-4,
                     atol=1e-6)


def test_clip_grad_value_per_model():
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    x, y = data(1)[0]
    fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
    cv = [1e-3, 1e-2, 1.0, 1e-4]
    fusecc.utils.clip_grad_value_(fused, cv)
    for i, m in enumerate(models):
        F.cross_entropy(m(x[i]), y[i]).backward()
        torch.nn.utils.clip_grad_value_(m.parameters(), cv[i])
    for name, p in fused.named_parameters():
        assert_close(f"{name}.grad", p.grad, torch.stack([m.get_parameter(name).grad for m in models]), rtol=1e-4,
                     atol=1e-6)


def test_per_model_loss_values_and_shared_targets():
    out = torch.randn(3, 5, 4)
    y = torch.randint(0, 4, (3, 5))
    loss = fusecc.per_model_loss(F.cross_entropy, out, y, label_smoothing=0.1)
    assert loss.shape == (3,)
    for i in range(3):
        assert_close(f"loss[{i}]", loss[i], F.cross_entropy(out[i], y[i], label_smoothing=0.1))
    shared = fusecc.per_model_loss(nn.MSELoss(), out, out[0], shared_targets=True)
    assert shared[0] == 0 and shared[1] > 0
    with pytest.raises(ValueError, match=r"targets have shape \[5\], expected a leading model dim of size 3"):
        fusecc.per_model_loss(F.cross_entropy, out, y[0])


def test_select_narrows_module_and_optimizer():
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    lrs = [1e-3, 2e-3, 3e-3, 4e-3]
    opt = fusecc.optim.Adam(fused, lr=lrs, weight_decay=[0.0, 0.1, 0.2, 0.3])
    ref = [torch.optim.Adam(m.parameters(), lr=lrs[i], weight_decay=[0.0, 0.1, 0.2, 0.3][i])
           for i, m in enumerate(models)]
    batches = data(4)
    keep = [3, 1]
    for step, (x, y) in enumerate(batches):
        if step == 2:
            fused = fused.select(keep)
            opt = opt.select(keep, fused)
            models, ref = [models[i] for i in keep], [ref[i] for i in keep]
            assert fused.num_models == 2 and opt.param_groups[0]["lr"] == [4e-3, 2e-3]
        if step >= 2:
            x, y = x[keep], y[keep]
        fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
        opt.step()
        opt.zero_grad()
        for i, (m, o) in enumerate(zip(models, ref)):
            F.cross_entropy(m(x[i]), y[i]).backward()
            o.step()
            o.zero_grad()
    assert_same_weights(fused, models)
    back = fused.unfuse()
    assert len(back) == 2 and torch.equal(back[0].fc.weight, fused.fc.weight[0])


@pytest.mark.parametrize("opt_name", ["SGD", "Adam", "RMSprop"])
def test_nan_loss_in_one_model_leaves_others_untouched(opt_name):
    """A step where model 2's loss is NaN gives models 0, 1, 3 exactly the parameters and optimizer state of the
    same step without the NaN."""
    fused = fusecc.fuse(make_models(Net, N)).train()
    opt = getattr(fusecc.optim, opt_name)(fused, lr=1e-2, momentum=0.9) if opt_name != "Adam" else \
        fusecc.optim.Adam(fused, lr=1e-2)
    x, y = data(1)[0]
    fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
    opt.step()
    opt.zero_grad()
    twin = copy.deepcopy(fused)
    opt2 = type(opt)(twin, lr=1e-2)
    buf = io.BytesIO()  # through bytes: load_state_dict would alias the very same state tensors
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    x2 = x.clone()
    x2[2] = float("nan")
    for f, o, xx in ((fused, opt, x), (twin, opt2, x2)):
        fusecc.per_model_loss(F.cross_entropy, f(xx), y).sum().backward()
        o.step()
    others = [0, 1, 3]
    for (k, a), b in zip(fused.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a[others], b[others]), k
    assert torch.isnan(twin.fc.weight[2]).all()
    for sa, sb in zip(opt.state.values(), opt2.state.values()):
        for k, t in sa.items():
            if t.dim() > 0:
                assert torch.equal(t[others], sb[k][others]), k
                assert torch.isnan(sb[k][2]).any(), k


def test_bad_hyper_parameters():
    fused = fusecc.fuse(make_models(Net, N))
    with pytest.raises(ValueError, match="'lr' has 3 values, expected 1 or num_models=4"):
        fusecc.optim.SGD(fused, lr=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="'lr' must be >= 0; model 1 has -0.1"):
        fusecc.optim.Adam(fused, lr=[0.1, -0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match="'beta2' must be in"):
        fusecc.optim.Adam(fused, betas=(0.9, [0.9, 0.99, 1.0, 0.9]))
    with pytest.raises(ValueError, match="'T_max' has 2 values, expected num_models=4"):
        fusecc.optim.lr_scheduler.CosineAnnealingLR(fusecc.optim.SGD(fused, lr=0.1), T_max=[1, 2])
    with pytest.raises(IndexError, match="index 4 out of range for 4 models"):
        fused.select([0, 4])
    with pytest.raises(ValueError, match="index 1 appears twice"):
        fused.select([1, 1])
    with pytest.raises(ValueError, match="indices is empty"):
        fused.select([])


def test_autocast_bf16_matches_per_model_autocast():
    models = [m.eval() for m in make_models(Net, N)]
    fused = fusecc.fuse(models)
    x = torch.randn(N, 6, 2, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = fused(x)
        ref = torch.stack([m(xi) for m, xi in zip(models, x)])
    assert y.dtype == ref.dtype == torch.bfloat16
    assert_close("autocast", y.float(), ref.float(), torch.bfloat16, rtol=2e-2, atol=2e-2)


def test_autocast_bf16_training_step_matches_per_model():
    """Forward + backward under bf16 autocast: outputs and gradients equal per-model autocast within bf16 tolerance."""
    models = make_models(Net, N)
    fused = fusecc.fuse(models).train()
    x, y = data(1)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused(x)
        loss = fusecc.per_model_loss(F.cross_entropy, out, y)
    loss.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = [F.cross_entropy(m(x[i]), y[i]) for i, m in enumerate(models)]
    torch.stack(ref).sum().backward()
    assert_close("loss", loss.float(), torch.stack(ref).float(), torch.bfloat16, rtol=2e-2, atol=2e-2)
    for name, p in fused.named_parameters():
        want = torch.stack([m.get_parameter(name).grad for m in models])
        scale = want.abs().max().item()
        assert_close(f"{name}.grad", p.grad, want, torch.bfloat16, rtol=5e-2, atol=5e-2 * scale)


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("opt_name,kwargs", [
    ("Adam", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], amsgrad=[True, False, True, False], maximize=[False, True, True, False])),
    ("RMSprop", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], centered=True, maximize=[False, True, False, True])),
])
def test_per_model_flags_on_the_aten_path_and_the_kernels(opt_name, kwargs, backend):
    """amsgrad and maximize per model: the aten update ("reference") and the one-pass CPU kernels ("auto") both equal
    N torch optimizers with each model's flags."""
    from fusecc.kernels import use_backend

    with use_backend(backend):
        fused, models, _ = train_both(opt_name, kwargs)
    assert_same_weights(fused, models)
    with pytest.raises(ValueError, match="'maximize' must be a bool or num_models=4 bools"):
        getattr(fusecc.optim, opt_name)(fused, maximize=[True, False])


RESETS = [  # (optimizer, its per-model settings, model 1's new settings at the restart)
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2], momentum=[0.0, 0.9, 0.5, 0.8], weight_decay=[0.0, 1e-2, 1e-3, 0.1]),
     dict(lr=0.03, momentum=0.7, weight_decay=1e-3)),
    ("SGD", dict(lr=[0.1, 0.05, 0.02, 0.2]), dict(lr=0.07, momentum=0.9)),  # momentum where no model had any
    ("Adam", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], weight_decay=[0.0, 0.01, 0.1, 0.0]),
     dict(lr=2e-3, betas=(0.8, 0.99), amsgrad=True)),
    ("AdamW", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], weight_decay=[0.0, 0.01, 0.1, 0.5]), dict(lr=5e-3, weight_decay=0.2)),
    ("RMSprop", dict(lr=[1e-3, 3e-3, 1e-2, 3e-4], centered=True), dict(lr=2e-3, momentum=0.5, alpha=0.9)),
]


def two_steps_both_ways(opt_name, kwargs):
    """N models fused with one fusecc optimizer and as N torch models with N torch optimizers, 2 steps each; returns
    (fused, opt, torch models, torch optimizers, the 5 batches)."""
    models = make_models(Net, N)
    refs = [copy.deepcopy(m) for m in models]
    fused = fusecc.fuse(models).train()
    opt = getattr(fusecc.optim, opt_name)(fused, **kwargs)
    ref_opts = [getattr(torch.optim, opt_name)(m.parameters(), **per_model(kwargs, i)) for i, m in enumerate(refs)]
    batches = data(5)
    run_steps(fused, opt, refs, ref_opts, batches[:2])
    return fused, opt, refs, ref_opts, batches


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("opt_name,kwargs,new", RESETS, ids=[f"{o}-{i}" for i, (o, _, _) in enumerate(RESETS)])
def test_reset_model_restarts_one_model_as_a_new_torch_optimizer(opt_name, kwargs, new, backend):
    """reset_model(1, ...) mid-training (new weights loaded into slot 1): model 1 then trains as a NEW torch model
    with a NEW torch optimizer of the new settings (its first step is a first step: Adam's bias correction, SGD's
    momentum buffer); models 0, 2, 3 go on as their own torch optimizers. Step counts become per model."""
    from fusecc.kernels import use_backend

    with use_backend(backend):
        fused, opt, refs, ref_opts, batches = two_steps_both_ways(opt_name, kwargs)
        torch.manual_seed(7)
        fresh = make_models(Net, 1)[0]
        fused.load_model_state_dict(1, fresh.state_dict())
        opt.reset_model(1, **new)
        refs[1] = fresh
        ref_opts[1] = getattr(torch.optim, opt_name)(fresh.parameters(), **{**per_model(kwargs, 1), **new})
        run_steps(fused, opt, refs, ref_opts, batches[2:])
    assert_same_weights(fused, refs)


def test_reset_model_errors():
    fused = fusecc.fuse(make_models(Net, N)).train()
    opt = fusecc.optim.SGD(fused, lr=0.1, momentum=0.9, dampening=[0.0, 0.1, 0.0, 0.0])
    fusecc.per_model_loss(F.cross_entropy, fused(data(1)[0][0]), data(1)[0][1]).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="'betas' is not a per-model hyper-parameter|'beta1' is not"):
        opt.reset_model(0, betas=(0.9, 0.99))
    with pytest.raises(IndexError, match="model 4 out of range"):
        opt.reset_model(4, lr=0.1)
    with pytest.raises(ValueError, match="dampening != 0"):
        opt.reset_model(1, lr=0.1)
    with pytest.raises(ValueError, match="'lr' must be >= 0"):
        opt.reset_model(0, lr=-1.0)


@pytest.mark.parametrize("opt_name,kwargs", [RESETS[0][:2], RESETS[2][:2], RESETS[4][:2]], ids=["SGD", "Adam", "RMSprop"])
def test_fork_one_model_into_another(opt_name, kwargs):
    """model_state(0) -> load_model_state(2) with model 0's weights: model 2 continues as a copy of torch model 0
    and its torch optimizer (state_dict copied); the others go on untouched (stage sharing forks trials so)."""
    fused, opt, refs, ref_opts, batches = two_steps_both_ways(opt_name, kwargs)
    fused.load_model_state_dict(2, fused.model_state_dict(0))
    opt.load_model_state(2, opt.model_state(0))
    refs[2] = copy.deepcopy(refs[0])
    ref_opts[2] = getattr(torch.optim, opt_name)(refs[2].parameters(), **per_model(kwargs, 0))
    ref_opts[2].load_state_dict(copy.deepcopy(ref_opts[0].state_dict()))  # (torch would share the step tensor)
    run_steps(fused, opt, refs, ref_opts, batches[2:])
    assert_same_weights(fused, refs)
    assert opt.param_groups[0]["lr"][2] == opt.param_groups[0]["lr"][0]


@pytest.mark.parametrize("make_opt", ["fusecc.optim.SGD", "fusecc.optim.Adam", "torch.optim.SGD(fused=True)",
                                      "p.data"])
def test_eval_after_training_sees_the_updated_weights(make_opt):
    """Regression: inference keeps re-laid-out conv weights (runtime.derived) while a weight's version counter is
    unchanged, and torch's fused optimizer kernels (which fusecc.optim runs on the CPU) update weights WITHOUT bumping
    it: eval, train a step, eval again gave the OLD weights' answers. Every optimizer step now bumps the versions of
    weights with derived copies; switching train/eval drops them (for writes through p.data)."""
    from fusecc.runtime import derived

    torch.manual_seed(0)
    models = [nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                            nn.Flatten(), nn.Linear(32 * 64, 10)) for _ in range(3)]
    fused = fusecc.fuse(models, share=False)
    x, xv = torch.randn(3, 8, 1, 8, 8), torch.randn(20, 1, 8, 8)

    def check():
        with torch.no_grad():
            out = fused.eval()(xv.expand(3, *xv.shape))
            for i, m in enumerate(fused.unfuse()):
                assert_close(f"model {i}", out[i], m.eval()(xv), rtol=1e-4, atol=1e-5)

    check()
    assert len(derived._DERIVED), "the test needs the conv path that keeps derived weights"
    if make_opt == "p.data":
        for p in fused.parameters():
            p.data.add_(0.05)
        fused.train()
    else:
        fused.train()
        opt = (fusecc.optim.SGD(fused, lr=0.5) if make_opt == "fusecc.optim.SGD" else
               fusecc.optim.Adam(fused, lr=0.05) if make_opt == "fusecc.optim.Adam" else
               torch.optim.SGD(fused.parameters(), lr=0.5, fused=True))
        fused(x).square().mean().backward()
        opt.step()
    check()


@pytest.mark.parametrize("opt_name", ["SGD", "Adam"])
def test_small_models_take_the_aten_update(opt_name, monkeypatch):
    """Below _CPU_FUSED_MIN_ELEMENTS per model, N calls of torch's fused kernel cost more than a few ops over all N
    models: the step takes the aten update (no kernel call), with the same results."""
    import fusecc.optim as fo

    monkeypatch.setattr(fo, "_CPU_FUSED_MIN_ELEMENTS", 1 << 17)
    calls = []
    name = "_fused_sgd_" if opt_name == "SGD" else "_fused_adam_"
    real = getattr(torch, name)
    monkeypatch.setattr(torch, name, lambda *a, **k: (calls.append(1), real(*a, **k)))
    fused, models, _ = train_both(opt_name, dict(lr=[1e-3, 2e-3, 3e-3, 4e-3], weight_decay=[0.0, 0.1, 0.0, 0.01]))
    assert calls == []
    assert_same_weights(fused, models)
    big = [nn.Linear(512, 512) for _ in range(2)]  # 262K elements per model: the kernel, once per model
    f2 = fusecc.fuse(big)
    opt = getattr(fusecc.optim, opt_name)(f2, lr=1e-3)
    f2(torch.randn(2, 3, 512)).sum().backward()
    opt.step()
    assert len(calls) == 2
