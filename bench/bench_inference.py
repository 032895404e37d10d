"""Inference benchmark: N same-architecture models run five ways, on CPU, under torch.no_grad().

Providers, each given the same stacked input x of shape [N, B, ...] (one batch per model):

  loop            [m(x[i]) for i, m in enumerate(models)]: the N eager models one after the other
  vmap            PyTorch's own ensembling: torch.func.stack_module_state + torch.vmap over torch.func.functional_call
  vmap+compile    the same vmapped function under torch.compile (inductor: C++ code generated for this CPU)
  fusecc          fusecc.fuse(models)(x): the N models fused into one module
  fusecc+compile  torch.compile(fused), with fusecc's own compile for x done first (eagerly)

Models: an MLP 784-512-512-10 (input [B, 784]), torchvision's resnet18, mobilenet_v2 and densenet121 with 10
classes (input [B, 3, res, res]) and a small transformer encoder (nn.TransformerEncoder, 4 layers, d=256, 4 heads,
feed-forward 1024, no dropout; input [B, 16, 256]); each of the N models has its own random weights and is in eval
mode. Under no_grad, the loop's transformer layers take PyTorch's fused inference kernel; vmap has no batching rule
for it and runs it sample by sample (PyTorch's warning about it is silenced, as is fusecc's for a layer it runs as a
per-model loop).

For every (model, N) row, each provider is first built and checked against the loop (max abs difference divided by
the loop output's max abs, which must be below 1e-4; a failing row is marked FAIL). That first call is also the
warm-up: fusecc compiles at its first call and torch.compile compiles there (dynamo + inductor, 10-60 s for a CNN):
it is not timed, and reported as "compile s". A provider that raises is recorded with its error (in the CSV and
after the tables) and the others go on. The providers are then timed interleaved within each repetition (loop,
vmap, vmap+compile, fusecc, fusecc+compile, loop, ...) so that all see the same machine noise; the table reports the
median wall-clock time per call and the speed-ups over the loop computed from the medians of the same run. Rows
whose warm-up round is slow get fewer repetitions (at least 3; at least 1 if --reps is lower) so one row takes
about --row-budget seconds. The CPU time other processes use while each row is timed is measured (from /proc/stat)
and shown as "bg cores"; rows above 0.25 are flagged, as their timings are unreliable. After the timing, each
provider runs once more under torch.profiler for its peak allocated memory, and every row gets its hardware floor
(bench/_floor.py: max(FLOPs / this machine's fp32 GEMM rate, bytes / its copy bandwidth), both rates measured at the
start of the run). The exit status is 1 if any provider failed the check, or any provider but a torch.compile one
crashed, on any row, else 0.

Run (from the repository root):

  .venv/bin/python bench/bench_inference.py             # five models, N in 1 4 16, 3 reps: ~4 min on 2 cores
  .venv/bin/python bench/bench_inference.py --full --markdown --csv bench/results/inference.csv  # N 1..32, hours
  .venv/bin/python bench/bench_inference.py --models mlp,resnet18 --n 2 8 --batch 16 --reps 9 --no-compile
  .venv/bin/python bench/bench_inference.py --quick              # smoke run, about a minute

A cold torch.compile takes 10 s (MLP) to 2.5 min (densenet121) per provider and row on 2 cores, most of the run's
time: by default the torch.compile providers run only at the largest N and not on densenet121 (--compile-n and
--compile-models choose, --full runs them everywhere).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

import fusecc
from fusecc.verify import relative_error

if __package__:  # run as python -m bench.<name>: _common.py is next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (COMPILED, CSV_FIELDS, MAX_REL_ERR, MODELS, PROVIDER_NAMES, BackgroundLoad, ResultBase, Row,
                     arg_parser, csv_base, finish_args, finish_row, finish_run, fmt, input_shape, measure_peaks,
                     print_errors, print_summary, print_tables, reps_for, reset_compiler, row_floor, row_providers,
                     run_grid, time_interleaved, write_csv_rows)
from _floor import MachineRates

Provider = Callable[[Tensor], Union[Tensor, List[Tensor]]]


# ---------------------------------------------------------------------------------------------------- providers


def build_loop(models: List[nn.Module], x: Tensor) -> Provider:
    """The N eager models one after the other; returns a list of N outputs."""

    def loop(x: Tensor) -> List[Tensor]:
        return [m(x[i]) for i, m in enumerate(models)]

    return loop


def vmapped(models: List[nn.Module]) -> Callable[[Dict[str, Tensor], Dict[str, Tensor], Tensor], Tensor]:
    """PyTorch's ensembling recipe: a weightless 'meta' copy of the model called through torch.vmap with the
    stacked parameters and buffers as arguments."""
    base = copy.deepcopy(models[0]).to("meta")

    def run_one(p: Dict[str, Tensor], b: Dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(base, (p, b), (xi,))

    def ensemble(p: Dict[str, Tensor], b: Dict[str, Tensor], x: Tensor) -> Tensor:
        return torch.vmap(run_one)(p, b, x)

    return ensemble


def build_vmap(models: List[nn.Module], x: Tensor) -> Provider:
    params, buffers = torch.func.stack_module_state(models)
    ensemble = vmapped(models)
    return lambda x: ensemble(params, buffers, x)


def build_vmap_compile(models: List[nn.Module], x: Tensor) -> Provider:
    """The vmapped function under torch.compile; the stacked weights are its arguments (graph inputs)."""
    params, buffers = torch.func.stack_module_state(models)
    ensemble = torch.compile(vmapped(models))
    return lambda x: ensemble(params, buffers, x)


def build_fusecc(models: List[nn.Module], x: Tensor) -> Provider:
    return fusecc.fuse(models)


def build_fusecc_compile(models: List[nn.Module], x: Tensor) -> Provider:
    """torch.compile of the fused module; fusecc compiles for x first, so dynamo traces the generated forward."""
    return torch.compile(fusecc.fuse(models, example_inputs=x))


# each builder takes the N models and the stacked input, and returns a callable on the stacked input [N, B, ...]
PROVIDERS: Dict[str, Callable[[List[nn.Module], Tensor], Provider]] = {
    "loop": build_loop,
    "vmap": build_vmap,
    "vmap+compile": build_vmap_compile,
    "fusecc": build_fusecc,
    "fusecc+compile": build_fusecc_compile,
}
assert list(PROVIDERS) == PROVIDER_NAMES


# ---------------------------------------------------------------------------------------------------- one row


class Result(ResultBase):
    """One provider on one (model, N) row."""


def stacked(y: Union[Tensor, List[Tensor]]) -> Tensor:
    return torch.stack(y) if isinstance(y, list) else y


@torch.no_grad()
def bench_row(model: str, n: int, batch: int, res: int, max_reps: int, budget_s: float, providers: Sequence[str],
              rates: MachineRates) -> Row:
    """Checks and times the providers on N fresh `model`s with different random weights."""
    reset_compiler()
    torch.manual_seed(0)
    models = [MODELS[model]().eval() for _ in range(n)]
    x = torch.randn(n, batch, *input_shape(model, res))
    row = Row(model, n, {name: Result(model, n, name) for name in providers})
    row.floor = row_floor(model, n, batch, res, False, rates)
    ref = stacked(build_loop(models, x)(x))
    working: Dict[str, Provider] = {}
    y = None
    for name in providers:
        result = row.results[name]
        try:
            start = time.perf_counter()
            fn = PROVIDERS[name](models, x)
            y = stacked(fn(x))  # also the warm-up call (fusecc and torch.compile compile here)
            result.first_call_s = time.perf_counter() - start
            result.max_rel_err = relative_error(y, ref)
        except Exception as e:  # a crashing provider is reported in its row; the others still run
            result.error = f"{type(e).__name__}: {e}".strip().splitlines()[0][:500]
            print(f"  {model} N={n} {name}: FAILED: {result.error}", flush=True)
            continue
        working[name] = fn
        flag = "" if result.ok else f"  FAIL (>= {MAX_REL_ERR:g})"
        print(f"  {model} N={n} {name}: max rel err {result.max_rel_err:.1e}{flag}; "
              f"setup + first call {result.first_call_s:.2f} s", flush=True)
    del y
    gc.collect()
    warm = time_interleaved(working, (x,), 1)
    reps = reps_for(sum(ts[0] for ts in warm.values()), max_reps, budget_s)
    with BackgroundLoad() as bg:
        times = time_interleaved(working, (x,), reps)
    row.background_cores = bg.cores
    finish_row(row, times, reps)
    measure_peaks(row, working, (x,))
    return row


# ---------------------------------------------------------------------------------------------------- reporting


def check_cols(row: Row) -> List[str]:
    errs = [x.max_rel_err for x in row.results.values() if x.max_rel_err is not None]
    wrong = [name for name, x in row.results.items() if not x.ok and not x.error]
    crashed = [name for name, x in row.results.items() if x.error]
    if wrong or any(name not in COMPILED for name in crashed):
        check = "FAIL: " + ", ".join([f"{name} crashed" for name in crashed] + wrong)
    else:
        check = ", ".join(crashed) + " crashed" if crashed else "ok"
    return [fmt(max(errs) if errs else None, ".1e"), check]


def row_passes(row: Row) -> bool:
    """Every provider agrees with the loop; a torch.compile provider may have crashed instead (recorded, and not
    a failure of the benchmark: that is torch.compile's limit, not a wrong result)."""
    return all(r.ok or (r.error and r.provider in COMPILED) for r in row.results.values())


def write_csv(path: str, rows: Sequence[Row], batch: int, res: int, info: Dict[str, str]) -> None:
    lines = [{**csv_base(r, row, batch, res, "inference"), **info} for row in rows for r in row.results.values()]
    write_csv_rows(path, CSV_FIELDS + list(info), lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    return finish_args(arg_parser(__doc__), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    rows, total_s, info = run_grid(
        "inference", a, "under torch.no_grad()",
        lambda model, n, rates: bench_row(model, n, a.batch, a.res, a.reps, a.row_budget, row_providers(a, model, n),
                                          rates))
    print(f"\nmedian ms per call of all N models (speed-up over the loop, from the medians of the same run); "
          f"max rel err = max |y - loop| / max |loop| over the providers (must be < {MAX_REL_ERR:g}); floor = "
          "the hardware floor of the row and what bounds it; bg cores = CPU cores used by other processes while "
          "the row was timed\n")
    print_tables(rows, a.providers, a.markdown, check_cols, ["max rel err"])
    print_summary(rows, "inference")
    print_errors(rows)
    for row in rows:
        for r in row.results.values():
            if not r.ok and not r.error:
                print(f"FAIL {r.model} N={r.num_models} {r.provider}: max rel err {r.max_rel_err:.2e}")
    return finish_run(rows, total_s, a.csv, lambda path: write_csv(path, rows, a.batch, a.res, info), row_passes)


if __name__ == "__main__":
    sys.exit(main())
