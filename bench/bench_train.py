"""Training benchmark: ONE training step (forward + backward + optimizer step) of N same-architecture models, run
five ways, on CPU.

Each provider gets the same stacked inputs x of shape [N, B, ...] and targets y (one batch per model: class indices
[N, B] for the classifiers, a random [N, B, 16, 256] regression target for the transformer) and trains its own copy
of the same N starting models with SGD, momentum 0.9 and a learning rate per model (lr_i spread evenly from 0.01 to
0.05). The loss is F.cross_entropy (classifiers) or F.mse_loss (transformer), per model:

  loop            the N eager models one after the other, each with its own torch.optim.SGD(momentum=0.9, lr=lr_i):
                  loss(m(x[i]), y[i]).backward(), opt.step(), opt.zero_grad()
  vmap            PyTorch's own ensembling: torch.func.stack_module_state (stacked leaf tensors that require grad) +
                  torch.vmap over functional_call and the loss; the N losses summed and backpropagated, then SGD with
                  momentum written by hand on the stacked tensors with the vector of the N learning rates
                  (torch.func has no optimizer with per-model settings, so a user writes the update)
  vmap+compile    the same, with the vmapped forward + loss under torch.compile (its backward is compiled with it,
                  by AOTAutograd); .backward() and the SGD update run eagerly
  fusecc          fused = fusecc.fuse(models).train(); opt = fusecc.optim.SGD(fused, lr=[lr_0, ..., lr_N-1],
                  momentum=0.9); fusecc.per_model_loss(loss, fused(x), y).sum().backward(), opt.step(),
                  opt.zero_grad()
  fusecc+compile  the same with torch.compile(fused) for the forward (fusecc compiles for x first, eagerly); the
                  loss, .backward() and fusecc.optim.SGD run eagerly

Models: an MLP 784-512-512-10 (input [B, 784]), torchvision's resnet18, mobilenet_v2 and densenet121 with 10
classes (input [B, 3, res, res]) and a small transformer encoder (nn.TransformerEncoder, 4 layers, d=256, 4 heads,
feed-forward 1024, dropout 0; input [B, 16, 256]); each of the N models has its own random weights. They are in
train mode (BatchNorm normalizes with the batch statistics and updates its running statistics) except their Dropout
modules, which are in eval mode so that all providers compute the same thing (random dropout masks could not be
compared).

For every (model, N) row, each provider (the loop itself included) is first checked against a separate reference,
the N models run one by one with torch.optim.SGD, from the same starting weights: after one step, max rel err = max
over the parameters and buffers (BatchNorm running statistics too) of max |w - w_loop| / max |w_loop| per tensor,
which must be below 1e-4; a failing row is marked FAIL. In float32 this can fail by rounding alone: BatchNorm in
train mode normalizes 8 values per channel on the 1x1 feature maps of the last blocks (at the defaults, batch 8 and
res 32), which amplifies rounding in the gradients by orders of magnitude, a ReLU whose input rounds to the other
side of 0 passes or blocks a whole gradient, and some tensors are mathematically zero after the step (the bias of a
BatchNorm followed by a 1x1 conv and a train-mode BatchNorm has a zero gradient) so that their per-tensor error
compares rounding with rounding. So the same step is also run in float64 (unless --no-f64) against the loop, where
rounding is ~1e-16: for vmap and fusecc always, for the torch.compile providers only when their float32 check fails
(it costs another compile). "f64 rel err" is max |w - w_loop| over all tensors / max |w_loop| over all tensors; a
float32 mismatch whose float64 error is below 1e-9 is rounding, and the check column says
"ok in float64 (float32 rounding: ...)". The first float32 step is also the warm-up (fusecc and torch.compile
compile at the first call, reported as "compile s" and not timed; the optimizers create their momentum buffers); a
provider that raises is recorded with its error (in the CSV and after the tables) and the others go on. Each
provider then keeps training its own copy of the models, on the same x and y, while it is timed. The providers are
timed interleaved within each repetition (loop, vmap, vmap+compile, fusecc, fusecc+compile, loop, ...) so that all
see the same machine noise; the table reports the median wall-clock time per step and the speed-ups computed from
the medians of the same run. Rows whose warm-up round is slow get fewer repetitions (at least 3; at least 1 if
--reps is lower) so one row takes about --row-budget seconds. The CPU time other processes use while each row is
timed is measured (from /proc/stat) and shown as "bg cores"; rows above 0.25 are flagged, as their timings are
unreliable. After the timing, each provider runs one more step under torch.profiler for its peak allocated memory,
and every row gets its hardware floor (bench/_floor.py). The exit status is 1 if any provider disagreed with the
loop beyond rounding (in float64), or any provider but a torch.compile one crashed, on any row, else 0.

Run (from the repository root):

  .venv/bin/python bench/bench_train.py             # five models, N in 1 4 16, 3 reps: ~20 min on 2 cores
  .venv/bin/python bench/bench_train.py --full --markdown --csv bench/results/train.csv  # N 1..32, hours
  .venv/bin/python bench/bench_train.py --models mlp,resnet18 --n 2 8 --batch 16 --reps 9 --no-compile
  .venv/bin/python bench/bench_train.py --quick              # smoke run, about two minutes

A cold torch.compile of a training step (forward and backward) takes 10 s (MLP) to 2.5 min (mobilenet_v2) per
provider and row on 2 cores, and again in float64 where the float32 check fails: most of the run's time. By default
the torch.compile providers run only at the largest N and not on densenet121 (--compile-n and --compile-models
choose, --full runs them everywhere).
"""

from __future__ import annotations

import argparse
import copy
import gc
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fusecc

if __package__:  # run as python -m bench.<name>: _common.py is next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (COMPILED, CSV_FIELDS, D_MODEL, MAX_REL_ERR, MODELS, PROVIDER_NAMES, SEQ_LEN, BackgroundLoad,
                     ResultBase, Row, arg_parser, csv_base, finish_args, finish_row, finish_run, fmt, input_shape,
                     measure_peaks, print_errors, print_summary, print_tables, reps_for, reset_compiler, row_floor,
                     row_providers, run_grid, time_interleaved, write_csv_rows)
from _floor import MachineRates

F64_MAX_REL_ERR = 1e-9  # the float64 diagnosis: rounding there is ~1e-16 relative, so more means another function
# AdamW's first step moves a parameter by lr * g / (|g| + eps): a gradient that is mathematically zero (the bias of a
# BatchNorm followed by a conv and a train-mode BatchNorm) and is rounding noise of ~1e-14 in float64 moves it by
# lr * 1e-14 / 1e-8, ~1e-9 of the weights' scale (vmap and fusecc alike, on those tensors): the bound of --optim adamw
F64_MAX_REL_ERR_ADAMW = 1e-8
NUM_CLASSES = 10
MOMENTUM = 0.9
LR_MIN, LR_MAX = 0.01, 0.05  # model i's learning rate, spread evenly over the N models (SGD)
ADAMW_LR_MIN, ADAMW_LR_MAX, ADAMW_DECAY = 1e-3, 5e-3, 0.01  # --optim adamw
OPTIM = "sgd"  # the optimizer of every provider: "sgd" (momentum) or "adamw" (--optim)


def learning_rates(n: int) -> List[float]:
    lo, hi = (LR_MIN, LR_MAX) if OPTIM == "sgd" else (ADAMW_LR_MIN, ADAMW_LR_MAX)
    return [lo + (hi - lo) * i / max(n - 1, 1) for i in range(n)]


def train_mode(model: nn.Module) -> nn.Module:
    """Train mode, except the Dropout modules (eval: identity), so that every provider computes the same step."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


def loss_fn(model: str) -> Callable[[Tensor, Tensor], Tensor]:
    """One model's loss: cross-entropy for the classifiers, mean squared error for the transformer's sequence."""
    return F.mse_loss if model == "transformer" else F.cross_entropy


def targets(model: str, n: int, batch: int) -> Tensor:
    if model == "transformer":
        return torch.randn(n, batch, SEQ_LEN, D_MODEL)
    return torch.randint(0, NUM_CLASSES, (n, batch))


# ---------------------------------------------------------------------------------------------------- providers


@dataclass
class Trainer:
    """One provider training its own copy of the N models."""

    step: Callable[[Tensor, Tensor], None]  # one training step on x [N, B, ...], y [N, B, ...]
    state: Callable[[], Dict[str, Tensor]]  # the N models' parameters and buffers, stacked [N, ...], by state-dict key


Loss = Callable[[Tensor, Tensor], Tensor]
Builder = Callable[[List[nn.Module], List[float], Loss, Tensor], Trainer]


def stacked_state(models: Sequence[nn.Module]) -> Dict[str, Tensor]:
    sds = [m.state_dict() for m in models]
    return {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}


def build_loop(models: List[nn.Module], lrs: List[float], loss: Loss, x: Tensor) -> Trainer:
    """The N eager models one after the other, each with its own torch.optim.SGD (AdamW: torch.optim.AdamW with
    fused=True, torch's one-pass CPU kernel, what a careful user runs)."""
    if OPTIM == "adamw":
        opts = [torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=ADAMW_DECAY, fused=True)
                for m, lr in zip(models, lrs)]
    else:
        opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=MOMENTUM) for m, lr in zip(models, lrs)]

    def step(x: Tensor, y: Tensor) -> None:
        for i, (m, opt) in enumerate(zip(models, opts)):
            loss(m(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()

    return Trainer(step, lambda: stacked_state(models))


def vmap_trainer(models: List[nn.Module], lrs: List[float], loss: Loss, compiled: bool) -> Trainer:
    """torch.func ensembling: stacked leaf tensors, vmap over functional_call + loss (under torch.compile if
    `compiled`), SGD-momentum written by hand on the stacked tensors."""
    params, buffers = torch.func.stack_module_state(models)  # params: new leaves with requires_grad
    base = copy.deepcopy(models[0]).to("meta")

    def loss_one(p: Dict[str, Tensor], b: Dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return loss(torch.func.functional_call(base, (p, b), (xi,)), yi)

    def total_loss(p: Dict[str, Tensor], b: Dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return torch.vmap(loss_one)(p, b, x, y).sum()

    forward = torch.compile(total_loss) if compiled else total_loss
    lr = torch.tensor(lrs, dtype=next(iter(params.values())).dtype)  # the parameters' dtype: a float32 vector
    # would round the learning rates of float64 models
    momentum_buffers: Dict[str, Tensor] = {}
    adam_state: Dict[str, Any] = {}

    def adamw_update() -> None:
        """torch.optim.AdamW's update written on the stacked tensors with the vector of the N learning rates (what a
        torch.func user writes: torch's optimizers take one lr per tensor)"""
        t = adam_state["step"] = adam_state.get("step", 0) + 1
        b1, b2, eps = 0.9, 0.999, 1e-8
        for k, p in params.items():
            if p.grad is None:
                continue
            m, v = adam_state.setdefault(k, (torch.zeros_like(p), torch.zeros_like(p)))
            lr_k = lr.view(-1, *[1] * (p.dim() - 1))
            p.mul_(1 - lr_k * ADAMW_DECAY)
            m.lerp_(p.grad, 1 - b1)
            v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**t)).add_(eps)
            p.addcdiv_(m, denom * (1 - b1**t) / lr_k, value=-1.0)
            p.grad = None

    def step(x: Tensor, y: Tensor) -> None:
        forward(params, buffers, x, y).backward()
        if OPTIM == "adamw":
            with torch.no_grad():
                adamw_update()
            return
        with torch.no_grad():  # torch.optim.SGD's update (dampening 0, no weight decay), model i with lr[i]
            for k, p in params.items():
                if p.grad is None:
                    continue
                buf = momentum_buffers.get(k)
                if buf is None:
                    buf = momentum_buffers[k] = p.grad.clone()  # the first step takes the gradient itself
                else:
                    buf.mul_(MOMENTUM).add_(p.grad)
                p.sub_(buf * lr.view(-1, *[1] * (p.dim() - 1)))
                p.grad = None

    return Trainer(step, lambda: {k: t.detach() for k, t in {**params, **buffers}.items()})


def build_vmap(models: List[nn.Module], lrs: List[float], loss: Loss, x: Tensor) -> Trainer:
    return vmap_trainer(models, lrs, loss, compiled=False)


def build_vmap_compile(models: List[nn.Module], lrs: List[float], loss: Loss, x: Tensor) -> Trainer:
    return vmap_trainer(models, lrs, loss, compiled=True)


def fusecc_trainer(models: List[nn.Module], lrs: List[float], loss: Loss, x: Tensor, compiled: bool) -> Trainer:
    fused = train_mode(fusecc.fuse(models))  # .train(), then the Dropout modules back to eval as in the models
    if OPTIM == "adamw":
        opt = fusecc.optim.AdamW(fused, lr=lrs, weight_decay=ADAMW_DECAY)
    else:
        opt = fusecc.optim.SGD(fused, lr=lrs, momentum=MOMENTUM)
    forward = torch.compile(fused.compile_for(x)) if compiled else fused  # fusecc's own compile first, eagerly

    def step(x: Tensor, y: Tensor) -> None:
        fusecc.per_model_loss(loss, forward(x), y).sum().backward()
        opt.step()
        opt.zero_grad()

    return Trainer(step, fused.state_dict)


def build_fusecc(models: List[nn.Module], lrs: List[float], loss: Loss, x: Tensor) -> Trainer:
    return fusecc_trainer(models, lrs, loss, x, compiled=False)


def build_fusecc_compile(models: List[nn.Module], lrs: List[float], loss: Loss, x: Tensor) -> Trainer:
    return fusecc_trainer(models, lrs, loss, x, compiled=True)


# each builder takes N models (its own copies, which the loop trains in place), the N learning rates, one model's
# loss and the stacked input (fusecc+compile compiles the fused module for it before torch.compile)
PROVIDERS: Dict[str, Builder] = {
    "loop": build_loop,
    "vmap": build_vmap,
    "vmap+compile": build_vmap_compile,
    "fusecc": build_fusecc,
    "fusecc+compile": build_fusecc_compile,
}
assert list(PROVIDERS) == PROVIDER_NAMES


# ---------------------------------------------------------------------------------------------------- one row


@dataclass
class Result(ResultBase):
    """One provider on one (model, N) row."""

    worst: str = ""  # the state-dict key of the tensor with the largest float32 error
    f64_rel_err: Optional[float] = None  # float64, after one step, against the scale of all tensors: the diagnosis
    f64_worst: str = ""
    f64_error: str = ""  # the provider crashed in float64

    @property
    def f64_ok(self) -> bool:
        bound = F64_MAX_REL_ERR_ADAMW if OPTIM == "adamw" else F64_MAX_REL_ERR
        return not self.f64_error and self.f64_rel_err is not None and self.f64_rel_err < bound


def check_keys(state: Dict[str, Tensor], ref: Dict[str, Tensor]) -> None:
    missing = [k for k in ref if k not in state]
    if missing:
        raise KeyError(f"no {missing[0]!r} in the provider's state ({len(missing)} of {len(ref)} keys missing)")


def max_abs_diff(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def per_tensor_err(state: Dict[str, Tensor], ref: Dict[str, Tensor]) -> Tuple[float, str]:
    """max over the tensors of max |w - ref| / max |ref| (max |w - ref| where ref is all zeros), and the worst key."""
    check_keys(state, ref)
    errs = {}
    for k, r in ref.items():
        scale = r.double().abs().max().item()
        errs[k] = max_abs_diff(state[k], r) / scale if scale > 0 else max_abs_diff(state[k], r)
    worst = max(errs, key=errs.__getitem__)
    return errs[worst], worst


def global_err(state: Dict[str, Tensor], ref: Dict[str, Tensor]) -> Tuple[float, str]:
    """max over the tensors of max |w - ref|, divided by the max |ref| over all of them, and the worst key."""
    check_keys(state, ref)
    errs = {k: max_abs_diff(state[k], r) for k, r in ref.items()}
    scale = max(r.double().abs().max().item() for r in ref.values())
    worst = max(errs, key=errs.__getitem__)
    return errs[worst] / scale if scale > 0 else errs[worst], worst


def one_step(build: Builder, models: Sequence[nn.Module], x: Tensor, y: Tensor, lrs: List[float],
             loss: Loss) -> Trainer:
    trainer = build(copy.deepcopy(list(models)), lrs, loss, x)  # its own copies: training changes the weights
    trainer.step(x, y)
    return trainer


def short(e: Exception) -> str:
    """An exception as one line (torch.compile's errors span pages)."""
    text = f"{type(e).__name__}: {e}".strip()
    return text.splitlines()[0][:500] if text else type(e).__name__


def check_f64(row: Row, names: Sequence[str], models: Sequence[nn.Module], x: Tensor, y: Tensor, lrs: List[float],
              loss: Loss) -> None:
    """The same step in float64, the providers `names` against the loop: do they compute the same function?
    (rounding aside, which float64 makes ~1e9 times smaller; the loop is the reference, so it is not checked
    against itself)"""
    if not names:
        return
    models64 = [copy.deepcopy(m).double() for m in models]
    x64 = x.double()
    y64 = y.double() if y.is_floating_point() else y
    try:
        ref = one_step(build_loop, models64, x64, y64, lrs, loss).state()
    except Exception as e:  # no reference, no diagnosis; the float32 check and timing still run
        print(f"  {row.model} N={row.num_models} loop: FAILED in float64: {short(e)}", flush=True)
        for name in names:
            row.results[name].f64_error = f"the float64 loop failed: {short(e)}"
        return
    for name in names:
        result = row.results[name]
        start = time.perf_counter()
        try:
            state = one_step(PROVIDERS[name], models64, x64, y64, lrs, loss).state()
            result.f64_rel_err, result.f64_worst = global_err(state, ref)
        except Exception as e:  # reported, and the float32 check and timing still run
            result.f64_error = short(e)
            print(f"  {row.model} N={row.num_models} {name}: FAILED in float64: {result.f64_error}", flush=True)
            continue
        print(f"  {row.model} N={row.num_models} {name}: in float64 {result.f64_rel_err:.1e} "
              f"({time.perf_counter() - start:.1f} s)", flush=True)
        gc.collect()
    del models64, ref
    gc.collect()


def bench_row(model: str, n: int, batch: int, res: int, max_reps: int, budget_s: float, f64: bool,
              providers: Sequence[str], rates: MachineRates) -> Row:
    """Checks and times one training step of the providers on N fresh `model`s with different random weights."""
    reset_compiler()
    torch.manual_seed(0)
    models = [train_mode(MODELS[model]()) for _ in range(n)]
    x = torch.randn(n, batch, *input_shape(model, res))
    y = targets(model, n, batch)
    lrs = learning_rates(n)
    loss = loss_fn(model)
    row = Row(model, n, {name: Result(model, n, name) for name in providers})
    row.floor = row_floor(model, n, batch, res, True, rates)
    ref = one_step(build_loop, models, x, y, lrs, loss).state()
    working: Dict[str, Callable[[Tensor, Tensor], None]] = {}
    for name in providers:
        result = row.results[name]
        try:
            start = time.perf_counter()
            trainer = one_step(PROVIDERS[name], models, x, y, lrs, loss)  # the step checked, also the warm-up
            result.first_call_s = time.perf_counter() - start  # (fusecc and torch.compile compile here)
            result.max_rel_err, result.worst = per_tensor_err(trainer.state(), ref)
        except Exception as e:  # a crashing provider is reported in its row; the others still run
            result.error = short(e)
            print(f"  {model} N={n} {name}: FAILED: {result.error}", flush=True)
            continue
        working[name] = trainer.step
        flag = "" if result.ok else f"  FAIL (>= {MAX_REL_ERR:g}, on {result.worst})"
        print(f"  {model} N={n} {name}: max rel err {result.max_rel_err:.1e}{flag}; "
              f"setup + first step {result.first_call_s:.2f} s", flush=True)
    if f64:  # the eager providers always; a compiled one only when its float32 check failed (another compile)
        check_f64(row, [name for name in providers if name != "loop" and not row.results[name].error
                        and (name not in COMPILED or not row.results[name].ok)], models, x, y, lrs, loss)
    del models, ref
    gc.collect()
    if working:
        warm = time_interleaved(working, (x, y), 1)
        reps = reps_for(sum(ts[0] for ts in warm.values()), max_reps, budget_s)
        with BackgroundLoad() as bg:
            times = time_interleaved(working, (x, y), reps)
        row.background_cores = bg.cores
        finish_row(row, times, reps)
        measure_peaks(row, working, (x, y))
    return row


# ---------------------------------------------------------------------------------------------------- reporting


def check_cell(row: Row) -> str:
    """'ok', or the providers that failed; a float32 failure whose float64 step agrees is marked as rounding, a
    torch.compile provider that crashed as such."""
    failed = [name for name, r in row.results.items() if not r.ok]
    if not failed:
        return "ok"
    crashed = [name for name in failed if row.results[name].error]
    wrong = [name for name in failed if name not in crashed]
    rounding = [name for name in wrong if row.results[name].f64_ok]
    really_wrong = [name for name in wrong if name not in rounding]
    parts = []
    if really_wrong or any(name not in COMPILED for name in crashed):
        parts.append("FAIL: " + ", ".join([f"{name} crashed" for name in crashed] + really_wrong))
    elif crashed:
        parts.append(", ".join(crashed) + " crashed")
    if rounding:
        parts.append("ok in float64 (float32 rounding: " + ", ".join(rounding) + ")")
    return "; ".join(parts) if parts else "ok"


def row_passes(row: Row) -> bool:
    """No crash but a torch.compile one, and every float32 mismatch is rounding (the float64 step agrees)."""
    return not check_cell(row).startswith("FAIL")


def check_cols(row: Row) -> List[str]:
    r = row.results
    errs = [x.max_rel_err for x in r.values() if x.max_rel_err is not None]
    f64_errs = [x.f64_rel_err for x in r.values() if x.f64_rel_err is not None]
    f64_crash = any(x.f64_error for x in r.values())
    return [fmt(max(errs) if errs else None, ".1e"),
            "crash" if f64_crash else fmt(max(f64_errs) if f64_errs else None, ".1e"), check_cell(row)]


def write_csv(path: str, rows: Sequence[Row], batch: int, res: int, info: Dict[str, str]) -> None:
    extra = ["worst_key", "f64_rel_err", "f64_worst_key", "f64_error", "loss", "lr_min", "lr_max", "momentum"]
    lines = []
    for row in rows:
        lrs = learning_rates(row.num_models)
        for r in row.results.values():
            lines.append({**csv_base(r, row, batch, res, "train"), "worst_key": r.worst,
                          "f64_rel_err": fmt(r.f64_rel_err, ".3e"), "f64_worst_key": r.f64_worst,
                          "f64_error": r.f64_error, "loss": loss_fn(row.model).__name__,
                          "lr_min": f"{min(lrs):g}", "lr_max": f"{max(lrs):g}", "momentum": f"{MOMENTUM:g}",
                          **info})
    write_csv_rows(path, CSV_FIELDS + extra + list(info), lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--no-f64", dest="f64", action="store_false",
                    help="skip the float64 diagnosis (one more step per provider per row, in float64)")
    ap.add_argument("--optim", choices=["sgd", "adamw"], default="sgd",
                    help="every provider's optimizer: SGD with momentum (default) or AdamW (loop: "
                         "torch.optim.AdamW(fused=True) per model; fusecc: fusecc.optim.AdamW; vmap: written by hand)")
    return finish_args(ap, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    global OPTIM
    a = parse_args(argv)
    OPTIM = a.optim
    opt_desc = (f"SGD (momentum {MOMENTUM:g}, lr per model {LR_MIN:g}..{LR_MAX:g})" if OPTIM == "sgd" else
                f"AdamW (lr per model {ADAMW_LR_MIN:g}..{ADAMW_LR_MAX:g}, weight decay {ADAMW_DECAY:g}; loop: "
                "torch.optim.AdamW(fused=True))")
    step = (f"one step = forward + loss (F.cross_entropy; transformer: F.mse_loss) + backward + {opt_desc}; "
            "train mode, Dropout in eval")
    rows, total_s, info = run_grid(
        "training", a, step,
        lambda model, n, rates: bench_row(model, n, a.batch, a.res, a.reps, a.row_budget, a.f64,
                                          row_providers(a, model, n), rates))
    print(f"\nmedian ms per training step of all N models (speed-up over the loop, from the medians of the same "
          f"run); max rel err = max over the parameters and buffers of max |w - w_loop| / max |w_loop| per tensor "
          f"after one float32 step, over the providers (must be < {MAX_REL_ERR:g}); f64 rel err = the same step in "
          f"float64, max |w - w_loop| over all tensors / max |w_loop| over all tensors (not checked; below "
          f"{F64_MAX_REL_ERR_ADAMW if OPTIM == 'adamw' else F64_MAX_REL_ERR:g} a float32 failure is rounding: "
          "'ok in float64'); floor = the hardware floor of "
          "the row and what bounds it; bg cores = CPU cores used by other processes while the row was timed\n")
    print_tables(rows, a.providers, a.markdown, check_cols, ["max rel err", "f64 rel err"])
    print_summary(rows, "training")
    print_errors(rows)
    for row in rows:
        for r in row.results.values():
            if not r.ok and not r.error:
                f64_note = (f"; in float64: crashed ({r.f64_error})" if r.f64_error else
                            "" if r.f64_rel_err is None else f"; in float64 {r.f64_rel_err:.2e} (on {r.f64_worst})")
                print(f"{'rounding' if r.f64_ok else 'FAIL'} {r.model} N={r.num_models} {r.provider}: "
                      f"max rel err {r.max_rel_err:.2e} (on {r.worst}){f64_note}")
            elif r.f64_error:
                print(f"float64 crash {r.model} N={r.num_models} {r.provider}: {r.f64_error}")
    return finish_run(rows, total_s, a.csv, lambda path: write_csv(path, rows, a.batch, a.res, info), row_passes)


if __name__ == "__main__":
    sys.exit(main())
