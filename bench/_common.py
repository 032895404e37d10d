"""Helpers shared by the benchmarks in bench/: the models, timing, the background-load measure, machine info and
table printing. Imported as `_common` by the scripts, which are run from the repository root
(`.venv/bin/python bench/bench_<name>.py`: Python puts bench/ on the path)."""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision

import fusecc

MIN_AUTO_REPS = 3
BUSY_CORES = 0.25  # background load above which a row's timings are flagged as unreliable


# ---------------------------------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
}


def input_shape(model: str, res: int) -> Tuple[int, ...]:
    """Shape of one sample (without the batch dim) for the named model."""
    return (784,) if model == "mlp" else (3, res, res)


# ---------------------------------------------------------------------------------------------------- timing


def time_call(fn: Callable[..., Any], *args: Any) -> float:
    """Wall-clock seconds of one call."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def time_interleaved(providers: Dict[str, Callable[..., Any]], args: Tuple[Any, ...],
                     reps: int) -> Dict[str, List[float]]:
    """`reps` rounds; each round calls every provider once on `args`, in order. Returns the seconds per call, per
    provider."""
    times: Dict[str, List[float]] = {name: [] for name in providers}
    for _ in range(reps):
        for name, fn in providers.items():
            times[name].append(time_call(fn, *args))
    return times


def system_cpu_s() -> Optional[float]:
    """CPU seconds all processes have used since boot (busy time in /proc/stat, steal included); None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class BackgroundLoad:
    """Cores used by OTHER processes (and the hypervisor) while the block runs: a busy machine makes timings noisy.

    `with BackgroundLoad() as bg: ...` then `bg.cores` (None where /proc/stat is missing). /proc/stat counts in
    clock ticks (10 ms), too coarse for a short block, so a block shorter than `min_window_s` is followed by a sleep
    that makes the window that long."""

    def __init__(self, min_window_s: float = 0.5):
        self.min_window_s = min_window_s
        self.cores: Optional[float] = None

    def __enter__(self) -> "BackgroundLoad":
        self._start = (time.perf_counter(), time.process_time(), system_cpu_s())
        return self

    def __exit__(self, *exc: object) -> None:
        wall0, own0, sys0 = self._start
        time.sleep(max(0.0, self.min_window_s - (time.perf_counter() - wall0)))
        sys1 = system_cpu_s()
        if sys0 is not None and sys1 is not None:
            own_s = time.process_time() - own0
            self.cores = max(0.0, (sys1 - sys0 - own_s) / (time.perf_counter() - wall0))


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a / b


def reps_for(round_s: float, max_reps: int, budget_s: float) -> int:
    """Repetitions that fit in `budget_s` given one round of all providers takes `round_s`, within the bounds."""
    fit = int(budget_s // round_s) if round_s > 0 else max_reps
    return min(max_reps, max(fit, MIN_AUTO_REPS))


# ---------------------------------------------------------------------------------------------------- reporting


def cpu_model() -> str:
    """The CPU's model name from lscpu, else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        out = ""
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name" and value.strip():
            return value.strip()
    return platform.processor() or platform.machine()


def machine_info() -> Dict[str, str]:
    return {
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": str(os.cpu_count()),
        "torch_threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fusecc": fusecc.__version__,
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def print_machine(info: Dict[str, str]) -> None:
    """The 'machine:' and 'versions:' lines of a benchmark's header."""
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads; "
          f"{info['platform']}")
    print(f"versions: python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
          f"fusecc {info['fusecc']}")


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_grid(header: List[str], body: List[List[str]], markdown: bool) -> None:
    """A table as GitHub markdown (the first two columns and the last left-aligned, the others right-aligned) or
    as right-aligned plain text."""
    if markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 2 or i == len(header) - 1 else "--:" for i in range(len(header))) + "|")
        for line in body:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, *body]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def warn_busy(labels: Sequence[str]) -> None:
    """The warning for rows timed while other processes used more than BUSY_CORES cores (none if `labels` is empty)."""
    if labels:
        print(f"WARNING: other processes used more than {BUSY_CORES:g} cores while timing {', '.join(labels)}; "
              "those timings are unreliable: rerun on a quiet machine")


# ---------------------------------------------------------------------------------------------------- CLI and CSV


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; a script adds its own, then calls finish_args."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help=f"comma list from {','.join(MODELS)} (default: all)")
    ap.add_argument("--num-models", help="comma list of N (default: 1,4,8,16)")
    ap.add_argument("--batch", type=int, default=8, help="batch per model (default: 8)")
    ap.add_argument("--res", type=int, default=32, help="image side for the CNNs (default: 32)")
    ap.add_argument("--reps", type=int, help="timed repetitions per row, at most (default: 5)")
    ap.add_argument("--row-budget", type=float, default=20.0,
                    help="seconds of timing per row before repetitions are cut down (default: 20)")
    ap.add_argument("--csv", metavar="PATH", help="write one line per (model, N, provider) with machine info")
    ap.add_argument("--markdown", action="store_true", help="print the table as GitHub markdown")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: mlp,resnet18, N in 1,2, 1 rep (explicit options still win)")
    return ap


def finish_args(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse, apply the --quick defaults, and reject unknown models and non-positive sizes."""
    a = ap.parse_args(argv)
    a.models = (a.models or ("mlp,resnet18" if a.quick else ",".join(MODELS))).split(",")
    a.num_models = [int(n) for n in (a.num_models or ("1,2" if a.quick else "1,4,8,16")).split(",")]
    if a.reps is None:
        a.reps = 1 if a.quick else 5
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    if a.reps < 1 or a.batch < 1 or a.res < 1 or min(a.num_models) < 1:
        ap.error("--reps, --batch, --res and --num-models must be positive")
    return a


CSV_FIELDS = ["model", "num_models", "batch", "res", "provider", "median_ms", "reps", "speedup_vs_loop",
              "max_rel_err", "ok", "error", "background_cores"]


def csv_base(r: Any, background_cores: Optional[float], batch: int, res: int) -> Dict[str, Any]:
    """The CSV columns every benchmark result has (r: a script's Result)."""
    return {
        "model": r.model, "num_models": r.num_models, "batch": batch, "res": res if r.model != "mlp" else "",
        "provider": r.provider, "median_ms": fmt(r.median_ms, ".3f"), "reps": r.reps,
        "speedup_vs_loop": fmt(r.speedup_vs_loop, ".3f"), "max_rel_err": fmt(r.max_rel_err, ".3e"), "ok": r.ok,
        "error": r.error, "background_cores": fmt(background_cores, ".2f"),
    }


def write_csv_rows(path: str, fields: List[str], lines: List[Dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(lines)
