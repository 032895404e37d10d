"""Training benchmark: ONE training step (forward + backward + optimizer step) of N same-architecture models, run
three ways, on CPU.

Each provider gets the same stacked inputs x of shape [N, B, ...] and class targets y of shape [N, B] (one batch
per model) and trains its own copy of the same N starting models with SGD, momentum 0.9 and a learning rate per
model (lr_i spread evenly from 0.01 to 0.05):

  loop    the N eager models one after the other, each with its own torch.optim.SGD(momentum=0.9, lr=lr_i):
          F.cross_entropy(m(x[i]), y[i]).backward(), opt.step(), opt.zero_grad()
  vmap    PyTorch's own ensembling: torch.func.stack_module_state (stacked leaf tensors that require grad) +
          torch.vmap over functional_call and F.cross_entropy; the N losses summed and backpropagated, then SGD with
          momentum written by hand on the stacked tensors with the vector of the N learning rates (torch.func has no
          optimizer with per-model settings, so a user writes the update)
  fusecc  fused = fusecc.fuse(models).train(); opt = fusecc.optim.SGD(fused, lr=[lr_0, ..., lr_N-1], momentum=0.9);
          fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward(), opt.step(), opt.zero_grad()

Models: an MLP 784-512-512-10 (input [B, 784]) and torchvision's resnet18, mobilenet_v2 and densenet121 with 10
classes (input [B, 3, res, res]); each of the N models has its own random weights. They are in train mode (BatchNorm
normalizes with the batch statistics and updates its running statistics) except their Dropout modules, which are
in eval mode so that all providers compute the same thing (random dropout masks could not be compared).

For every (model, N) row, each provider (the loop itself included) is first checked against a separate reference,
the N models run one by one with torch.optim.SGD, from the same starting weights: after one step, max rel err = max
over the parameters and buffers (BatchNorm running statistics too) of max |w - w_loop| / max |w_loop| per tensor,
which must be below 1e-4; a failing row is marked FAIL. In float32 this can fail by rounding alone: BatchNorm in
train mode normalizes 8 values per channel on the 1x1 feature maps of the last blocks (at the defaults, batch 8 and
res 32), which amplifies rounding in the gradients by orders of magnitude, a ReLU whose input rounds to the other
side of 0 passes or blocks a whole gradient, and some tensors are mathematically zero after the step (the bias of a
BatchNorm followed by a 1x1 conv and a train-mode BatchNorm has a zero gradient) so that their per-tensor error
compares rounding with rounding. So the same step is also run in float64 (unless --no-f64), vmap and fusecc against
the loop, where rounding is ~1e-16: "f64 rel err" is max |w - w_loop| over all tensors / max |w_loop| over all
tensors; a float32 mismatch whose float64 error is below 1e-9 is rounding, and the check column says
"ok in float64 (float32 rounding: ...)". The first float32 step is also the warm-up (fusecc compiles at its first
call; the optimizers create their momentum buffers); each provider then keeps training its own copy of the models,
on the same x and y, while it is timed. The providers are timed interleaved within each repetition (loop, vmap,
fusecc, loop, vmap, fusecc, ...) so that all three see the same machine noise; the table reports the median
wall-clock time per step and the speed-ups computed from the medians of the same run. Rows whose warm-up round is
slow get fewer repetitions (at least 3; at least 1 if --reps is lower) so one row takes about --row-budget seconds.
The CPU time other processes use while each row is timed is measured (from /proc/stat) and shown as "bg cores"; rows
above 0.25 are flagged, as their timings are unreliable. The exit status is 1 if any provider crashed or disagreed with
the loop beyond rounding (in float64) on any row, else 0.

Run (from the repository root):

  .venv/bin/python bench/bench_train.py             # all four models, N in 1,4,8,16: about 5 minutes on 2 cores
  .venv/bin/python bench/bench_train.py --markdown --csv bench/results/train.csv
  .venv/bin/python bench/bench_train.py --models mlp,resnet18 --num-models 2,8 --batch 16 --reps 9
  .venv/bin/python bench/bench_train.py --quick              # smoke run, well under a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

import fusecc

if __package__:  # run as python -m bench.<name>: _common.py is next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BUSY_CORES, CSV_FIELDS, MODELS, BackgroundLoad, arg_parser, csv_base, finish_args, fmt,
                     input_shape, machine_info, print_grid, print_machine, ratio, reps_for, time_interleaved,
                     warn_busy, write_csv_rows)

MAX_REL_ERR = 1e-4
F64_MAX_REL_ERR = 1e-9  # the float64 diagnosis: rounding there is ~1e-16 relative, so more means another function
NUM_CLASSES = 10
MOMENTUM = 0.9
LR_MIN, LR_MAX = 0.01, 0.05  # model i's learning rate, spread evenly over the N models


def learning_rates(n: int) -> List[float]:
    return [LR_MIN + (LR_MAX - LR_MIN) * i / max(n - 1, 1) for i in range(n)]


def train_mode(model: nn.Module) -> nn.Module:
    """Train mode, except the Dropout modules (eval: identity), so that every provider computes the same step."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.eval()
    return model


# ---------------------------------------------------------------------------------------------------- providers


@dataclass
class Trainer:
    """One provider training its own copy of the N models."""

    step: Callable[[Tensor, Tensor], None]  # one training step on x [N, B, ...], y [N, B]
    state: Callable[[], Dict[str, Tensor]]  # the N models' parameters and buffers, stacked [N, ...], by state-dict key


def stacked_state(models: Sequence[nn.Module]) -> Dict[str, Tensor]:
    sds = [m.state_dict() for m in models]
    return {k: torch.stack([sd[k] for sd in sds]) for k in sds[0]}


def build_loop(models: List[nn.Module], lrs: List[float]) -> Trainer:
    """The N eager models one after the other, each with its own torch.optim.SGD."""
    opts = [torch.optim.SGD(m.parameters(), lr=lr, momentum=MOMENTUM) for m, lr in zip(models, lrs)]

    def step(x: Tensor, y: Tensor) -> None:
        for i, (m, opt) in enumerate(zip(models, opts)):
            F.cross_entropy(m(x[i]), y[i]).backward()
            opt.step()
            opt.zero_grad()

    return Trainer(step, lambda: stacked_state(models))


def build_vmap(models: List[nn.Module], lrs: List[float]) -> Trainer:
    """torch.func ensembling: stacked leaf tensors, vmap over functional_call + loss, SGD-momentum written by hand."""
    params, buffers = torch.func.stack_module_state(models)  # params: new leaves with requires_grad
    base = copy.deepcopy(models[0]).to("meta")

    def loss_one(p: Dict[str, Tensor], b: Dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return F.cross_entropy(torch.func.functional_call(base, (p, b), (xi,)), yi)

    losses = torch.vmap(loss_one)
    lr = torch.tensor(lrs, dtype=next(iter(params.values())).dtype)  # the parameters' dtype: a float32 vector
    # would round the learning rates of float64 models
    momentum_buffers: Dict[str, Tensor] = {}

    def step(x: Tensor, y: Tensor) -> None:
        losses(params, buffers, x, y).sum().backward()
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


def build_fusecc(models: List[nn.Module], lrs: List[float]) -> Trainer:
    fused = train_mode(fusecc.fuse(models))  # .train(), then the Dropout modules back to eval as in the models
    opt = fusecc.optim.SGD(fused, lr=lrs, momentum=MOMENTUM)

    def step(x: Tensor, y: Tensor) -> None:
        fusecc.per_model_loss(F.cross_entropy, fused(x), y).sum().backward()
        opt.step()
        opt.zero_grad()

    return Trainer(step, fused.state_dict)


# each builder takes N models (its own copies, which the loop trains in place) and the N learning rates
PROVIDERS: Dict[str, Callable[[List[nn.Module], List[float]], Trainer]] = {
    "loop": build_loop,
    "vmap": build_vmap,
    "fusecc": build_fusecc,
}


# ---------------------------------------------------------------------------------------------------- one row


@dataclass
class Result:
    """One provider on one (model, N) row."""

    model: str
    num_models: int
    provider: str
    median_ms: Optional[float] = None
    reps: int = 0
    speedup_vs_loop: Optional[float] = None
    max_rel_err: Optional[float] = None  # float32, after one step, the worst tensor: the check
    worst: str = ""  # the state-dict key of that tensor
    f64_rel_err: Optional[float] = None  # float64, after one step, against the scale of all tensors: the diagnosis
    f64_worst: str = ""
    f64_error: str = ""  # the provider crashed in float64
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.max_rel_err is not None and self.max_rel_err < MAX_REL_ERR

    @property
    def f64_ok(self) -> bool:
        return not self.f64_error and self.f64_rel_err is not None and self.f64_rel_err < F64_MAX_REL_ERR


@dataclass
class Row:
    model: str
    num_models: int
    results: Dict[str, Result] = field(default_factory=dict)
    background_cores: Optional[float] = None  # cores other processes used while this row was timed

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())


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


def one_step(build: Callable[[List[nn.Module], List[float]], Trainer], models: Sequence[nn.Module], x: Tensor,
             y: Tensor, lrs: List[float]) -> Trainer:
    trainer = build(copy.deepcopy(list(models)), lrs)  # its own copies: training changes the weights
    trainer.step(x, y)
    return trainer


def check_f64(row: Row, models: Sequence[nn.Module], x: Tensor, y: Tensor, lrs: List[float]) -> None:
    """The same step in float64, vmap and fusecc against the loop: do they compute the same function? (rounding
    aside, which float64 makes ~1e9 times smaller; the loop is the reference, so it is not checked against itself)"""
    models64 = [copy.deepcopy(m).double() for m in models]
    x64 = x.double()
    try:
        ref = one_step(build_loop, models64, x64, y, lrs).state()
    except Exception as e:  # no reference, no diagnosis; the float32 check and timing still run
        print(f"  {row.model} N={row.num_models} loop: FAILED in float64: {type(e).__name__}: {e}", flush=True)
        for name, result in row.results.items():
            if name != "loop":
                result.f64_error = f"the float64 loop failed: {type(e).__name__}: {e}"
        return
    for name, build in PROVIDERS.items():
        if name == "loop":
            continue
        result = row.results[name]
        try:
            result.f64_rel_err, result.f64_worst = global_err(one_step(build, models64, x64, y, lrs).state(), ref)
        except Exception as e:  # reported, and the float32 check and timing still run
            result.f64_error = f"{type(e).__name__}: {e}"
            print(f"  {row.model} N={row.num_models} {name}: FAILED in float64: {result.f64_error}", flush=True)
            continue
        gc.collect()
    del models64, ref
    gc.collect()


def bench_row(model: str, n: int, batch: int, res: int, max_reps: int, budget_s: float, f64: bool) -> Row:
    """Checks and times one training step of the providers on N fresh `model`s with different random weights."""
    torch.manual_seed(0)
    models = [train_mode(MODELS[model]()) for _ in range(n)]
    x = torch.randn(n, batch, *input_shape(model, res))
    y = torch.randint(0, NUM_CLASSES, (n, batch))
    lrs = learning_rates(n)
    row = Row(model, n, {name: Result(model, n, name) for name in PROVIDERS})
    if f64:
        check_f64(row, models, x, y, lrs)
    ref = one_step(build_loop, models, x, y, lrs).state()
    working: Dict[str, Callable[[Tensor, Tensor], None]] = {}
    for name, build in PROVIDERS.items():
        result = row.results[name]
        try:
            start = time.perf_counter()
            trainer = one_step(build, models, x, y, lrs)  # the step checked, also the warm-up (fusecc compiles)
            setup_s = time.perf_counter() - start
            result.max_rel_err, result.worst = per_tensor_err(trainer.state(), ref)
        except Exception as e:  # a crashing provider is reported in its row; the others still run
            result.error = f"{type(e).__name__}: {e}"
            print(f"  {model} N={n} {name}: FAILED: {result.error}", flush=True)
            continue
        working[name] = trainer.step
        flag = "" if result.ok else f"  FAIL (>= {MAX_REL_ERR:g}, on {result.worst})"
        f64_note = "" if result.f64_rel_err is None else f"; in float64 {result.f64_rel_err:.1e}"
        print(f"  {model} N={n} {name}: max rel err {result.max_rel_err:.1e}{flag}{f64_note}; "
              f"setup + first step {setup_s:.2f} s", flush=True)
    del models, ref
    gc.collect()
    if working:
        warm = time_interleaved(working, (x, y), 1)
        reps = reps_for(sum(ts[0] for ts in warm.values()), max_reps, budget_s)
        with BackgroundLoad() as bg:
            times = time_interleaved(working, (x, y), reps)
        row.background_cores = bg.cores
        for name, ts in times.items():
            row.results[name].median_ms = statistics.median(ts) * 1e3
            row.results[name].reps = reps
    loop_ms = row.results["loop"].median_ms
    for result in row.results.values():
        result.speedup_vs_loop = ratio(loop_ms, result.median_ms)
    return row


# ---------------------------------------------------------------------------------------------------- reporting


def check_cell(row: Row) -> str:
    """'ok', or the providers that failed; a float32 failure whose float64 step agrees is marked as rounding."""
    failed = [name for name, r in row.results.items() if not r.ok]
    if not failed:
        return "ok"
    crashed = [name for name in failed if row.results[name].error]
    wrong = [name for name in failed if name not in crashed]
    if not crashed and all(row.results[name].f64_ok for name in wrong):
        return "ok in float64 (float32 rounding: " + ", ".join(wrong) + ")"
    parts = [f"{name} crashed" for name in crashed]
    if wrong:
        parts.append(", ".join(wrong))
    return "FAIL: " + ", ".join(parts)


def row_passes(row: Row) -> bool:
    """No crash, and every float32 mismatch is rounding (the float64 step agrees)."""
    return not check_cell(row).startswith("FAIL")


def table_rows(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]]]:
    header = ["model", "N", "loop ms", "vmap ms", "fusecc ms", "vmap vs loop", "fusecc vs loop", "fusecc vs vmap",
              "max rel err", "f64 rel err", "reps", "bg cores", "check"]
    body = []
    for row in rows:
        r = row.results
        errs = [x.max_rel_err for x in r.values() if x.max_rel_err is not None]
        f64_errs = [x.f64_rel_err for x in r.values() if x.f64_rel_err is not None]
        f64_crash = any(x.f64_error for x in r.values())
        body.append([
            row.model,
            str(row.num_models),
            *(fmt(r[p].median_ms, ".1f") for p in PROVIDERS),
            fmt(r["vmap"].speedup_vs_loop, ".2f", "x"),
            fmt(r["fusecc"].speedup_vs_loop, ".2f", "x"),
            fmt(ratio(r["vmap"].median_ms, r["fusecc"].median_ms), ".2f", "x"),
            fmt(max(errs) if errs else None, ".1e"),
            "crash" if f64_crash else fmt(max(f64_errs) if f64_errs else None, ".1e"),
            str(max(x.reps for x in r.values())),
            fmt(row.background_cores, ".2f"),
            check_cell(row),
        ])
    return header, body


def write_csv(path: str, rows: Sequence[Row], batch: int, res: int, info: Dict[str, str]) -> None:
    extra = ["worst_key", "f64_rel_err", "f64_worst_key", "f64_error", "lr_min", "lr_max", "momentum"]
    lines = []
    for row in rows:
        lrs = learning_rates(row.num_models)
        for r in row.results.values():
            lines.append({**csv_base(r, row.background_cores, batch, res), "worst_key": r.worst,
                          "f64_rel_err": fmt(r.f64_rel_err, ".3e"), "f64_worst_key": r.f64_worst,
                          "f64_error": r.f64_error, "lr_min": f"{min(lrs):g}", "lr_max": f"{max(lrs):g}",
                          "momentum": f"{MOMENTUM:g}", **info})
    write_csv_rows(path, CSV_FIELDS + extra + list(info), lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    ap = arg_parser(__doc__)
    ap.add_argument("--no-f64", dest="f64", action="store_false",
                    help="skip the float64 diagnosis (one more step per provider per row, in float64)")
    return finish_args(ap, argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    info = machine_info()
    print(f"# fusecc training benchmark ({info['timestamp']})")
    print_machine(info)
    print(f"setup: models {','.join(a.models)}; N {','.join(map(str, a.num_models))}; batch {a.batch} per model; "
          f"images 3x{a.res}x{a.res}; up to {a.reps} reps; one step = forward + F.cross_entropy + backward + SGD "
          f"(momentum {MOMENTUM:g}, lr per model {LR_MIN:g}..{LR_MAX:g}); train mode, Dropout in eval\n", flush=True)
    start = time.perf_counter()
    rows = []
    for model in a.models:
        for n in a.num_models:
            rows.append(bench_row(model, n, a.batch, a.res, a.reps, a.row_budget, a.f64))
            gc.collect()  # the row's models, inputs and providers are gone; free what cycles still hold
    total_s = time.perf_counter() - start
    print(f"\nmedian ms per training step of all N models; speed-ups from the medians; max rel err = max over "
          f"the parameters and buffers of max |w - w_loop| / max |w_loop| per tensor after one float32 step, over "
          f"the providers (must be < {MAX_REL_ERR:g}); f64 rel err = the same step in float64, max |w - w_loop| "
          f"over all tensors / max |w_loop| over all tensors, over vmap and fusecc (not checked; below "
          f"{F64_MAX_REL_ERR:g} a float32 failure is rounding: 'float64 agrees'); bg cores = CPU cores used by "
          "other processes while the row was timed\n")
    print_grid(*table_rows(rows), a.markdown)
    for row in rows:
        for r in row.results.values():
            if not r.ok:
                f64_note = (f"; in float64: crashed ({r.f64_error})" if r.f64_error else
                            "" if r.f64_rel_err is None else f"; in float64 {r.f64_rel_err:.2e} (on {r.f64_worst})")
                print(f"FAIL {r.model} N={r.num_models} {r.provider}: "
                      f"{r.error or f'max rel err {r.max_rel_err:.2e} (on {r.worst}){f64_note}'}")
            elif r.f64_error:
                print(f"float64 crash {r.model} N={r.num_models} {r.provider}: {r.f64_error}")
    warn_busy([f"{row.model} N={row.num_models}" for row in rows if (row.background_cores or 0.0) > BUSY_CORES])
    print(f"\ntotal time {total_s:.0f} s")
    if a.csv:
        write_csv(a.csv, rows, a.batch, a.res, info)
        print(f"wrote {a.csv}")
    return 0 if all(row_passes(row) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
