"""Inference benchmark: N same-architecture models run three ways, on CPU, under torch.no_grad().

Providers, each given the same stacked input x of shape [N, B, ...] (one batch per model):

  loop    [m(x[i]) for i, m in enumerate(models)]: the N eager models one after the other
  vmap    PyTorch's own ensembling: torch.func.stack_module_state + torch.vmap over torch.func.functional_call
  fusecc  fusecc.fuse(models)(x): the N models fused into one module

Models: an MLP 784-512-512-10 (input [B, 784]) and torchvision's resnet18, mobilenet_v2 and densenet121 with 10
classes (input [B, 3, res, res]); each of the N models has its own random weights and is in eval mode.

For every (model, N) row, each provider is first checked against the loop (max abs difference divided by the loop
output's max abs, which must be below 1e-4; a failing row is marked FAIL), then warmed up (fusecc compiles at its
first call, which is not timed). The providers are then timed interleaved within each repetition (loop, vmap,
fusecc, loop, vmap, fusecc, ...) so that all three see the same machine noise; the table reports the median
wall-clock time per call and the speed-ups computed from the medians of the same run. Rows whose warm-up round is
slow get fewer repetitions (at least 3; at least 1 if --reps is lower) so one row takes about --row-budget seconds.
The CPU time other processes use while each row is timed is measured (from /proc/stat) and shown as "bg cores";
rows above 0.25 are flagged, as their timings are unreliable. The exit status is 1 if any provider crashed or
failed the check on any row, else 0.

Run (from the repository root):

  .venv/bin/python bench/bench_inference.py             # all four models, N in 1,4,8,16: a few minutes on 2 cores
  .venv/bin/python bench/bench_inference.py --markdown --csv bench/results/inference.csv
  .venv/bin/python bench/bench_inference.py --models mlp,resnet18 --num-models 2,8 --batch 16 --reps 9
  .venv/bin/python bench/bench_inference.py --quick              # smoke run, well under a minute
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
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

import fusecc

if __package__:  # run as python -m bench.<name>: _common.py is next to this file
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (BUSY_CORES, CSV_FIELDS, MODELS, BackgroundLoad, arg_parser, csv_base, finish_args, fmt,
                     input_shape, machine_info, print_grid, print_machine, ratio, reps_for, time_interleaved,
                     warn_busy, write_csv_rows)

MAX_REL_ERR = 1e-4

Provider = Callable[[Tensor], Union[Tensor, List[Tensor]]]


# ---------------------------------------------------------------------------------------------------- models


# ---------------------------------------------------------------------------------------------------- providers


def build_loop(models: List[nn.Module]) -> Provider:
    """The N eager models one after the other; returns a list of N outputs."""

    def loop(x: Tensor) -> List[Tensor]:
        return [m(x[i]) for i, m in enumerate(models)]

    return loop


def build_vmap(models: List[nn.Module]) -> Provider:
    """PyTorch's ensembling recipe: stacked parameters, a weightless 'meta' copy of the model, torch.vmap."""
    params, buffers = torch.func.stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")

    def run_one(p: Dict[str, Tensor], b: Dict[str, Tensor], xi: Tensor) -> Tensor:
        return torch.func.functional_call(base, (p, b), (xi,))

    ensemble = torch.vmap(run_one)
    return lambda x: ensemble(params, buffers, x)


def build_fusecc(models: List[nn.Module]) -> Provider:
    return fusecc.fuse(models)


# each builder takes the N models and returns a callable on the stacked input [N, B, ...]
PROVIDERS: Dict[str, Callable[[List[nn.Module]], Provider]] = {
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
    max_rel_err: Optional[float] = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.max_rel_err is not None and self.max_rel_err < MAX_REL_ERR


@dataclass
class Row:
    model: str
    num_models: int
    results: Dict[str, Result] = field(default_factory=dict)
    background_cores: Optional[float] = None  # cores other processes used while this row was timed

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())


def stacked(y: Union[Tensor, List[Tensor]]) -> Tensor:
    return torch.stack(y) if isinstance(y, list) else y


def rel_err(y: Tensor, ref: Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max()).item()


@torch.no_grad()
def bench_row(model: str, n: int, batch: int, res: int, max_reps: int, budget_s: float) -> Row:
    """Checks and times the providers on N fresh `model`s with different random weights."""
    torch.manual_seed(0)
    models = [MODELS[model]().eval() for _ in range(n)]
    x = torch.randn(n, batch, *input_shape(model, res))
    row = Row(model, n, {name: Result(model, n, name) for name in PROVIDERS})
    ref = stacked(build_loop(models)(x))
    working: Dict[str, Provider] = {}
    for name, build in PROVIDERS.items():
        result = row.results[name]
        try:
            start = time.perf_counter()
            fn = build(models)
            result.max_rel_err = rel_err(stacked(fn(x)), ref)  # also the warm-up call (fusecc compiles here)
            setup_s = time.perf_counter() - start
        except Exception as e:  # a crashing provider is reported in its row; the others still run
            result.error = f"{type(e).__name__}: {e}"
            print(f"  {model} N={n} {name}: FAILED: {result.error}", flush=True)
            continue
        working[name] = fn
        flag = "" if result.ok else f"  FAIL (>= {MAX_REL_ERR:g})"
        print(f"  {model} N={n} {name}: max rel err {result.max_rel_err:.1e}{flag}; "
              f"setup + first call {setup_s:.2f} s", flush=True)
    warm = time_interleaved(working, (x,), 1)
    reps = reps_for(sum(ts[0] for ts in warm.values()), max_reps, budget_s)
    with BackgroundLoad() as bg:
        times = time_interleaved(working, (x,), reps)
    row.background_cores = bg.cores
    for name, ts in times.items():
        row.results[name].median_ms = statistics.median(ts) * 1e3
        row.results[name].reps = reps
    loop_ms = row.results["loop"].median_ms
    for result in row.results.values():
        result.speedup_vs_loop = ratio(loop_ms, result.median_ms)
    return row


# ---------------------------------------------------------------------------------------------------- reporting


def table_rows(rows: Sequence[Row]) -> Tuple[List[str], List[List[str]]]:
    header = ["model", "N", "loop ms", "vmap ms", "fusecc ms", "vmap vs loop", "fusecc vs loop", "fusecc vs vmap",
              "max rel err", "reps", "bg cores", "check"]
    body = []
    for row in rows:
        r = row.results
        errs = [x.max_rel_err for x in r.values() if x.max_rel_err is not None]
        failed = [name for name, x in r.items() if not x.ok]
        body.append([
            row.model,
            str(row.num_models),
            *(fmt(r[p].median_ms, ".1f") for p in PROVIDERS),
            fmt(r["vmap"].speedup_vs_loop, ".2f", "x"),
            fmt(r["fusecc"].speedup_vs_loop, ".2f", "x"),
            fmt(ratio(r["vmap"].median_ms, r["fusecc"].median_ms), ".2f", "x"),
            fmt(max(errs) if errs else None, ".1e"),
            str(r["loop"].reps),
            fmt(row.background_cores, ".2f"),
            "ok" if not failed else "FAIL: " + ", ".join(failed),
        ])
    return header, body


def print_table(rows: Sequence[Row], markdown: bool) -> None:
    print_grid(*table_rows(rows), markdown)


def write_csv(path: str, rows: Sequence[Row], batch: int, res: int, info: Dict[str, str]) -> None:
    lines = [{**csv_base(r, row.background_cores, batch, res), **info} for row in rows for r in row.results.values()]
    write_csv_rows(path, CSV_FIELDS + list(info), lines)


# ---------------------------------------------------------------------------------------------------- main


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    return finish_args(arg_parser(__doc__), argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = parse_args(argv)
    info = machine_info()
    print(f"# fusecc inference benchmark ({info['timestamp']})")
    print_machine(info)
    print(f"setup: models {','.join(a.models)}; N {','.join(map(str, a.num_models))}; batch {a.batch} per model; "
          f"images 3x{a.res}x{a.res}; up to {a.reps} reps; under torch.no_grad()\n", flush=True)
    start = time.perf_counter()
    rows = []
    for model in a.models:
        for n in a.num_models:
            rows.append(bench_row(model, n, a.batch, a.res, a.reps, a.row_budget))
            gc.collect()  # the row's models, inputs and providers are gone; free what cycles still hold
    total_s = time.perf_counter() - start
    print(f"\nmedian ms per call of all N models; speed-ups from the medians; max rel err = max |y - loop| / "
          f"max |loop| over vmap and fusecc (must be < {MAX_REL_ERR:g}); bg cores = CPU cores used by other "
          "processes while the row was timed\n")
    print_table(rows, a.markdown)
    for row in rows:
        for r in row.results.values():
            if not r.ok:
                print(f"FAIL {r.model} N={r.num_models} {r.provider}: {r.error or f'max rel err {r.max_rel_err:.2e}'}")
    busy = [f"{row.model} N={row.num_models}" for row in rows if (row.background_cores or 0.0) > BUSY_CORES]
    warn_busy(busy)
    print(f"\ntotal time {total_s:.0f} s")
    if a.csv:
        write_csv(a.csv, rows, a.batch, a.res, info)
        print(f"wrote {a.csv}")
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
