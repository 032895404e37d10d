"""Helpers shared by the benchmarks in bench/: the models, the providers' names, timing, the background-load
measure, torch.compile set-up, machine info, table printing and the CSV. The hardware floor and the peak-memory
measure are in _floor.py. Imported as `_common` by the scripts, which are run from the repository root
(`.venv/bin/python bench/bench_<name>.py`: Python puts bench/ on the path)."""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime
import gc
import logging
import math
import os
import platform
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torchvision

import fusecc
from _floor import Floor, measure_rates

MAX_REL_ERR = 1e-4  # the correctness bound every provider must meet against the loop
MIN_AUTO_REPS = 3
BUSY_CORES = 0.25  # background load above which a row's timings are flagged as unreliable


# ---------------------------------------------------------------------------------------------------- models


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


SEQ_LEN, D_MODEL = 16, 256  # the transformer's input per sample: [SEQ_LEN, D_MODEL]


def transformer() -> nn.Module:
    """A small encoder: 4 post-norm layers, d=256, 4 heads, feed-forward 1024, no dropout; input [B, 16, 256]."""
    layer = nn.TransformerEncoderLayer(D_MODEL, 4, 1024, batch_first=True, dropout=0.0)
    return nn.TransformerEncoder(layer, 4)


MODELS: Dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "transformer": transformer,
}


def input_shape(model: str, res: int) -> Tuple[int, ...]:
    """Shape of one sample (without the batch dim) for the named model."""
    if model == "mlp":
        return (784,)
    if model == "transformer":
        return (SEQ_LEN, D_MODEL)
    return (3, res, res)


def inputs_desc(models: Sequence[str], res: int) -> str:
    """The per-sample inputs of the chosen models, for a benchmark's header."""
    parts = []
    if "mlp" in models:
        parts.append("mlp 784")
    if any(m not in ("mlp", "transformer") for m in models):
        parts.append(f"images 3x{res}x{res}")
    if "transformer" in models:
        parts.append(f"transformer {SEQ_LEN}x{D_MODEL}")
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------- providers

# the providers, in the order they are timed within each repetition and shown in the tables
PROVIDER_NAMES = ["loop", "vmap", "vmap+compile", "fusecc", "fusecc+compile"]
COMPILED = ("vmap+compile", "fusecc+compile")


def quiet_warnings() -> None:
    """Silence warnings the benchmark expects and records otherwise: fusecc running a layer as a per-model loop (no
    fusion rule), torch.vmap's per-sample fallback for an op without a batching rule (the transformer's fused
    inference kernel), and inductor's note that there is no CUDA."""
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*(fallback|per-model loop|fall back).*")
    warnings.filterwarnings("ignore", category=UserWarning, message=r".*not yet implemented the batching rule.*")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


@contextlib.contextmanager
def compile_cache(keep: bool) -> Iterator[Optional[str]]:
    """torch.compile's on-disk caches (inductor's FX graph and kernel caches) in a fresh temporary directory,
    removed at the end, so that the 'compile s' column is a cold compile, the same on every run; with keep=True,
    torch's default directory (a second run then compiles from the cache, much faster)."""
    if keep:
        yield None
        return
    path = tempfile.mkdtemp(prefix="fusecc-bench-inductor-")
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    try:
        yield path
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
        shutil.rmtree(path, ignore_errors=True)


def reset_compiler() -> None:
    """Forget what torch.compile compiled for the previous row: its caches are per code object, and a new N on the
    same code would otherwise be compiled again with dynamic shapes (automatic_dynamic_shapes)."""
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------------- results


@dataclass
class ResultBase:
    """One provider on one (model, N) row: the fields both benchmarks have."""

    model: str
    num_models: int
    provider: str
    median_ms: Optional[float] = None
    reps: int = 0
    speedup_vs_loop: Optional[float] = None
    max_rel_err: Optional[float] = None
    error: str = ""
    first_call_s: Optional[float] = None  # build + the first (checked) call: fusecc and torch.compile compile there
    compile_s: Optional[float] = None  # first_call_s - the median call: the compile's cost
    peak_bytes: Optional[int] = None  # see _floor.peak_bytes
    peak_error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.max_rel_err is not None and self.max_rel_err < MAX_REL_ERR


@dataclass
class Row:
    model: str
    num_models: int
    results: Dict[str, Any] = field(default_factory=dict)  # provider -> the script's Result
    background_cores: Optional[float] = None  # cores other processes used while this row was timed
    floor: Optional[Floor] = None

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.results.values())

    def over_floor(self, provider: str) -> Optional[float]:
        r = self.results.get(provider)
        if r is None or r.median_ms is None or self.floor is None:
            return None
        return r.median_ms / self.floor.ms


def compile_desc(a: argparse.Namespace) -> str:
    """Where the torch.compile providers run, for a benchmark's header."""
    if not any(p in COMPILED for p in a.providers):
        return "no torch.compile providers"
    models = [m for m in a.models if m in a.compile_models]
    ns = [n for n in a.num_models if n in a.compile_n]
    if not models or not ns:
        return "torch.compile providers on no row"
    return f"torch.compile providers at N {','.join(map(str, ns))} on {','.join(models)}"


def row_providers(a: argparse.Namespace, model: str, n: int) -> List[str]:
    """The providers that run on this row: the torch.compile ones only at --compile-n and on --compile-models."""
    return [p for p in a.providers if p not in COMPILED or (n in a.compile_n and model in a.compile_models)]


def finish_row(row: Row, times: Dict[str, List[float]], reps: int) -> None:
    """Medians and the speed-ups over the loop from the same run."""
    import statistics

    for name, ts in times.items():
        row.results[name].median_ms = statistics.median(ts) * 1e3
        row.results[name].reps = reps
        first = row.results[name].first_call_s
        if first is not None:
            row.results[name].compile_s = max(0.0, first - statistics.median(ts))
    loop_ms = row.results["loop"].median_ms
    for result in row.results.values():
        result.speedup_vs_loop = ratio(loop_ms, result.median_ms)


def measure_peaks(row: Row, working: Dict[str, Callable[..., Any]], args: Tuple[Any, ...]) -> None:
    """Each working provider's peak allocated bytes over one more call (after the timing, not timed)."""
    from _floor import peak_bytes

    for name, fn in working.items():
        try:
            row.results[name].peak_bytes = peak_bytes(fn, *args)
        except Exception as e:  # the profiler failing is no reason to drop the row
            row.results[name].peak_error = f"{type(e).__name__}: {e}"


_COSTS: Dict[Tuple[str, int, int], Any] = {}


def row_floor(model: str, n: int, batch: int, res: int, train: bool, rates: Any) -> Floor:
    """The hardware floor of N `model`s on this machine (one model's cost is measured once per run)."""
    from _floor import floor, model_cost

    key = (model, batch, res)
    if key not in _COSTS:
        torch.manual_seed(0)
        _COSTS[key] = model_cost(MODELS[model]().eval(), torch.randn(batch, *input_shape(model, res)))
    return floor(_COSTS[key], n, train, rates)


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


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (monotone over the run: not a per-provider figure)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def geomean(values: Sequence[float]) -> Optional[float]:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None


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


def source_state() -> str:
    """The repository's commit, '+dirty' and a short hash of `git diff HEAD` if the working tree has changes (the
    benchmark measures the code on disk, not the commit); 'unknown' outside a git checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        diff = subprocess.run(["git", "diff", "HEAD"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    import hashlib

    return commit + (f"+dirty.{hashlib.sha1(diff).hexdigest()[:8]}" if diff else "")


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
        "source": source_state(),
        "timestamp": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def print_machine(info: Dict[str, str]) -> None:
    """The 'machine:' and 'versions:' lines of a benchmark's header."""
    print(f"machine: {info['cpu']}, {info['cpu_count']} cores, {info['torch_threads']} torch threads; "
          f"{info['platform']}")
    print(f"versions: python {info['python']}, torch {info['torch']}, torchvision {info['torchvision']}, "
          f"fusecc {info['fusecc']} (source {info['source']})")


def fmt(value: Optional[float], spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def print_grid(header: List[str], body: List[List[str]], markdown: bool, left: int = 2,
               last_left: bool = True) -> None:
    """A table as GitHub markdown (the first `left` columns, and the last if last_left, left-aligned, the others
    right-aligned) or as right-aligned plain text."""
    if markdown:
        def align(i: int) -> str:
            return "---" if i < left or (last_left and i == len(header) - 1) else "--:"

        print("| " + " | ".join(header) + " |")
        print("|" + "|".join(align(i) for i in range(len(header))) + "|")
        for line in body:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    for line in [header, *body]:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths)))


def median_ms(row: Row, name: str) -> Optional[float]:
    r = row.results.get(name)
    return None if r is None else r.median_ms


def peak_cell(r: Any) -> str:
    if r is None or r.peak_bytes is None:
        return "n/a"
    mb = r.peak_bytes / 1e6
    return f"{mb:.2f}" if mb < 10 else f"{mb:.1f}"


def compile_cell(r: Any) -> str:
    if r is None:
        return "n/a"
    return "error" if r.error and r.compile_s is None else fmt(r.compile_s, ".1f")


def provider_cell(row: Row, name: str) -> str:
    """'ms (speed-up over the loop)', 'error' if the provider crashed, 'n/a' if it did not run."""
    r = row.results.get(name)
    if r is None:
        return "n/a"
    if r.error:
        return "error"
    if r.median_ms is None:
        return "n/a"
    return f"{r.median_ms:.1f}" + ("" if name == "loop" else f" ({fmt(r.speedup_vs_loop, '.2f', 'x')})")


def timing_table(rows: Sequence[Row], providers: Sequence[str],
                 check_cols: Callable[[Row], List[str]], check_header: List[str]) -> Tuple[List[str], List[List[str]]]:
    """The main table: per provider 'median ms (speed-up over the loop)', fusecc vs vmap, the floor, the script's
    check columns (check_cols: the cells under check_header, then the check cell), reps, bg cores and the check."""
    header = ["model", "N", *(f"{p} ms" for p in providers)]
    pairs = [(a, b) for a, b in (("fusecc", "vmap"), ("fusecc+compile", "vmap+compile")) if a in providers
             and b in providers]
    header += [f"{a} vs {b}" for a, b in pairs]
    header += ["floor ms", "bound", *check_header, "reps", "bg cores", "check"]
    body = []
    for row in rows:
        r = row.results
        line = [row.model, str(row.num_models), *(provider_cell(row, p) for p in providers)]
        line += [fmt(ratio(median_ms(row, b), median_ms(row, a)), ".2f", "x") for a, b in pairs]
        line += [fmt(row.floor.ms if row.floor else None, ".2f"), row.floor.bound if row.floor else "n/a"]
        *checks, check = check_cols(row)
        line += checks
        line += [str(max(x.reps for x in r.values())), fmt(row.background_cores, ".2f"), check]
        body.append(line)
    return header, body


def floor_table(rows: Sequence[Row], providers: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """The floor and each provider's time as a multiple of it."""
    header = ["model", "N", "GFLOP", "MB moved", "compute ms", "memory ms", "floor ms", "bound",
              *(f"{p} / floor" for p in providers)]
    body = []
    for row in rows:
        f = row.floor
        if f is None:
            continue
        body.append([row.model, str(row.num_models), f"{f.flops / 1e9:.2f}", f"{f.bytes / 1e6:.1f}",
                     f"{f.compute_s * 1e3:.2f}", f"{f.memory_s * 1e3:.2f}", f"{f.ms:.2f}", f.bound,
                     *(fmt(row.over_floor(p), ".1f", "x") for p in providers)])
    return header, body


def memory_table(rows: Sequence[Row], providers: Sequence[str]) -> Tuple[List[str], List[List[str]]]:
    """Peak allocated MB of one call per provider, and the compile time of the compiling providers."""
    compiling = [p for p in providers if p in COMPILED or p == "fusecc"]
    header = ["model", "N", *(f"{p} peak MB" for p in providers), *(f"{p} compile s" for p in compiling)]
    body = []
    for row in rows:
        r = row.results
        body.append([row.model, str(row.num_models), *(peak_cell(r.get(p)) for p in providers),
                     *(compile_cell(r.get(p)) for p in compiling)])
    return header, body


def print_tables(rows: Sequence[Row], providers: Sequence[str], markdown: bool,
                 check_cols: Callable[[Row], List[str]], check_header: List[str]) -> None:
    print_grid(*timing_table(rows, providers, check_cols, check_header), markdown)
    print("\nthe hardware floor (see bench/_floor.py) and each provider's median time as a multiple of it\n")
    print_grid(*floor_table(rows, providers), markdown, left=2, last_left=False)
    print("\npeak MB = peak bytes allocated during one call above what was allocated before it (torch.profiler "
          "memory events: outputs, activations, gradients, temporaries; not the weights, optimizer state or "
          "inputs); compile s = build + the first call - the median call: fusecc's trace and lowering, "
          "torch.compile's dynamo + inductor (a cold compile unless --keep-compile-cache); not in the timings\n")
    print_grid(*memory_table(rows, providers), markdown, left=2, last_left=False)


def print_errors(rows: Sequence[Row]) -> None:
    for row in rows:
        for r in row.results.values():
            if r.error:
                print(f"ERROR {r.model} N={r.num_models} {r.provider}: {r.error}")
            if r.peak_error:
                print(f"peak memory not measured, {r.model} N={r.num_models} {r.provider}: {r.peak_error}")


def print_summary(rows: Sequence[Row], mode: str) -> None:
    """Geometric-mean speed-ups over the loop (per N over all models, and over the largest Ns), and the rows where
    fusecc is slower than the loop or than a vmap provider."""
    providers = [p for p in PROVIDER_NAMES if p != "loop"]
    ns = sorted({row.num_models for row in rows})
    print(f"\n{mode}: geometric mean of the speed-up over the loop, over the models")
    for p in providers:
        cells = []
        for n in ns:
            vals = [row.results[p].speedup_vs_loop for row in rows if row.num_models == n and p in row.results
                    and row.results[p].speedup_vs_loop]
            cells.append(f"N={n}: {fmt(geomean(vals), '.2f', 'x')} ({len(vals)})")
        print(f"  {p:15s} " + ", ".join(cells))
    slow = []
    for row in rows:
        r = row.results
        f = r.get("fusecc")
        if f is None or f.median_ms is None:
            continue
        worse = [other for other in ("loop", "vmap", "vmap+compile") if other in r and r[other].median_ms
                 and r[other].median_ms < f.median_ms]
        if worse:
            slow.append(f"{row.model} N={row.num_models} (" + ", ".join(
                f"{r[o].median_ms / f.median_ms:.2f}x vs {o}" for o in worse) + ")")
    print(f"{mode}: fusecc slower than " + ("loop/vmap/vmap+compile on: " + "; ".join(slow) if slow else
                                            "none of loop, vmap, vmap+compile on any row"))


def warn_busy(labels: Sequence[str]) -> None:
    """The warning for rows timed while other processes used more than BUSY_CORES cores (none if `labels` is empty)."""
    if labels:
        print(f"WARNING: other processes used more than {BUSY_CORES:g} cores while timing {', '.join(labels)}; "
              "those timings are unreliable: rerun on a quiet machine")


# ---------------------------------------------------------------------------------------------------- CLI and CSV


DEFAULT_N = [1, 4, 16]
SLOW_COMPILE_MODELS = ("densenet121",)  # cold torch.compile: 1.5-2.5 min per provider for inference on 2 cores
FULL_N = [1, 2, 4, 8, 16, 32]
DEFAULT_REPS = 3
FULL_REPS = 5


def arg_parser(doc: str) -> argparse.ArgumentParser:
    """The options both benchmarks take; a script adds its own, then calls finish_args."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help=f"comma list from {','.join(MODELS)} (default: all)")
    ap.add_argument("--n", type=int, nargs="+", metavar="N",
                    help=f"the numbers of models (default: {' '.join(map(str, DEFAULT_N))}; "
                         f"--full: {' '.join(map(str, FULL_N))})")
    ap.add_argument("--num-models", help="the same as a comma list (--num-models 1,4,8)")
    ap.add_argument("--full", action="store_true",
                    help=f"the whole grid: N in {' '.join(map(str, FULL_N))} and up to {FULL_REPS} reps "
                         "(explicit options still win)")
    ap.add_argument("--providers", help=f"comma list from {','.join(PROVIDER_NAMES)} (default: all; the loop "
                                        "always runs, as the reference)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    ap.add_argument("--compile-n", type=int, nargs="+", metavar="N",
                    help="the Ns at which the torch.compile providers run (default: the largest N of the run; "
                         "--full: every N): a cold inductor compile takes 10 s to 5 min per provider and row here")
    ap.add_argument("--compile-models",
                    help=f"comma list of the models the torch.compile providers run on (default: all but "
                         f"{','.join(SLOW_COMPILE_MODELS)}, whose compiles take minutes each; --full: all)")
    ap.add_argument("--keep-compile-cache", action="store_true",
                    help="use torch.compile's default on-disk cache instead of a fresh one per run (compile s "
                         "is then a warm compile after the first run)")
    ap.add_argument("--batch", type=int, default=8, help="batch per model (default: 8)")
    ap.add_argument("--res", type=int, default=32, help="image side for the CNNs (default: 32)")
    ap.add_argument("--reps", type=int,
                    help=f"timed repetitions per row, at most (default: {DEFAULT_REPS}; --full: {FULL_REPS})")
    ap.add_argument("--row-budget", type=float, default=20.0,
                    help="seconds of timing per row before repetitions are cut down (default: 20)")
    ap.add_argument("--csv", metavar="PATH", help="write one line per (model, N, provider) with machine info")
    ap.add_argument("--markdown", action="store_true", help="print the tables as GitHub markdown")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: mlp,resnet18, N in 1,2, 1 rep (explicit options still win)")
    return ap


def finish_args(ap: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse, apply the --quick / --full defaults, and reject unknown models and providers and non-positive
    sizes."""
    a = ap.parse_args(argv)
    a.models = (a.models or ("mlp,resnet18" if a.quick else ",".join(MODELS))).split(",")
    if a.n is not None and a.num_models is not None:
        ap.error("give the Ns with --n or with --num-models, not both")
    if a.n is not None:
        a.num_models = a.n
    elif a.num_models is not None:
        a.num_models = [int(n) for n in a.num_models.split(",")]
    else:
        a.num_models = [1, 2] if a.quick else FULL_N if a.full else DEFAULT_N
    if a.reps is None:
        a.reps = 1 if a.quick else FULL_REPS if a.full else DEFAULT_REPS
    unknown = [m for m in a.models if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    chosen = a.providers.split(",") if a.providers else list(PROVIDER_NAMES)
    unknown = [p for p in chosen if p not in PROVIDER_NAMES]
    if unknown:
        ap.error(f"unknown provider(s) {unknown}; choose from {PROVIDER_NAMES}")
    a.providers = [p for p in PROVIDER_NAMES if p == "loop" or (p in chosen and not (a.no_compile and p in COMPILED))]
    if a.compile_n is None:
        a.compile_n = list(a.num_models) if a.full else [max(a.num_models)]
    if a.compile_models is None:
        a.compile_models = list(MODELS) if a.full else [m for m in MODELS if m not in SLOW_COMPILE_MODELS]
    else:
        a.compile_models = a.compile_models.split(",")
    if a.reps < 1 or a.batch < 1 or a.res < 1 or min(a.num_models) < 1:
        ap.error("--reps, --batch, --res and --n must be positive")
    return a


CSV_FIELDS = ["mode", "model", "num_models", "batch", "res", "provider", "median_ms", "reps", "speedup_vs_loop",
              "floor_ms", "time_over_floor", "bound", "compute_floor_ms", "memory_floor_ms", "gflop", "mb_moved",
              "peak_mb", "compile_s", "first_call_s", "max_rel_err", "ok", "error", "background_cores"]


def csv_base(r: Any, row: Row, batch: int, res: int, mode: str) -> Dict[str, Any]:
    """The CSV columns every benchmark result has (r: a script's Result, in `row`)."""
    f = row.floor
    return {
        "mode": mode, "model": r.model, "num_models": r.num_models, "batch": batch,
        "res": res if r.model not in ("mlp", "transformer") else "", "provider": r.provider,
        "median_ms": fmt(r.median_ms, ".3f"), "reps": r.reps, "speedup_vs_loop": fmt(r.speedup_vs_loop, ".3f"),
        "floor_ms": fmt(f.ms if f else None, ".4f"), "time_over_floor": fmt(row.over_floor(r.provider), ".2f"),
        "bound": f.bound if f else "", "compute_floor_ms": fmt(f.compute_s * 1e3 if f else None, ".4f"),
        "memory_floor_ms": fmt(f.memory_s * 1e3 if f else None, ".4f"),
        "gflop": fmt(f.flops / 1e9 if f else None, ".4f"), "mb_moved": fmt(f.bytes / 1e6 if f else None, ".2f"),
        "peak_mb": fmt(None if r.peak_bytes is None else r.peak_bytes / 1e6, ".2f"),
        "compile_s": fmt(r.compile_s, ".2f"), "first_call_s": fmt(r.first_call_s, ".2f"),
        "max_rel_err": fmt(r.max_rel_err, ".3e"), "ok": r.ok,
        "error": r.error, "background_cores": fmt(row.background_cores, ".2f"),
    }


def write_csv_rows(path: str, fields: List[str], lines: List[Dict[str, Any]]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(lines)


def finish_run(rows: Sequence[Any], total_s: float, csv_path: Optional[str], write_csv: Callable[[str], None],
               passes: Callable[[Any], bool]) -> int:
    """The end of a benchmark run: flag busy rows, print the run time, write the CSV; the exit status."""
    warn_busy([f"{row.model} N={row.num_models}" for row in rows if (row.background_cores or 0.0) > BUSY_CORES])
    print(f"\ntotal time {total_s:.0f} s; peak RSS of this process {peak_rss_mb():.0f} MB (all rows and "
          "providers, and the 2 x 256 MB of the bandwidth measure)")
    if csv_path:
        write_csv(csv_path)
        print(f"wrote {csv_path}")
    return 0 if all(passes(row) for row in rows) else 1


def run_grid(kind: str, a: Any, step: str, bench_row: Callable[[str, int, Any], Any]) -> Tuple[list, float, dict]:
    """Print the header, measure the machine's floor rates, then ``bench_row(model, n, rates)`` for every model and N
    (one compile cache for the run); returns (rows, seconds, machine info)."""
    quiet_warnings()
    info = machine_info()
    print(f"# fusecc {kind} benchmark ({info['timestamp']})")
    print_machine(info)
    print(f"setup: models {','.join(a.models)}; N {','.join(map(str, a.num_models))}; batch {a.batch} per model; "
          f"{inputs_desc(a.models, a.res)}; providers {', '.join(a.providers)} ({compile_desc(a)}); "
          f"up to {a.reps} reps; {step}", flush=True)
    start = time.perf_counter()
    rates = measure_rates()
    info.update(rates.info())
    print(f"floor rates: fp32 GEMM {rates.gemm_flops / 1e9:.1f} GFLOP/s (2048^3 matmul), copy bandwidth "
          f"{rates.bandwidth / 1e9:.2f} GB/s read + written (256 MB copy)\n", flush=True)
    rows = []
    with compile_cache(a.keep_compile_cache):
        for model in a.models:
            for n in a.num_models:
                rows.append(bench_row(model, n, rates))
                gc.collect()  # the row's models, inputs and providers are gone; free what cycles still hold
    return rows, time.perf_counter() - start, info


def interleaved_medians(providers: Dict[str, Callable[[], Any]], reps: int, budget_s: Optional[float] = None
                        ) -> Dict[str, float]:
    """Median ms per provider: one warm-up call each, then repetitions that run every provider once in a shuffled
    order (all see the same machine noise); at least 3 repetitions, then up to ``reps`` or the time budget."""
    import random
    import statistics

    times: Dict[str, List[float]] = {k: [] for k in providers}
    for f in providers.values():
        f()
    order = list(providers)
    start = time.perf_counter()
    for r in range(reps):
        random.shuffle(order)
        for k in order:
            t = time.perf_counter()
            providers[k]()
            times[k].append((time.perf_counter() - t) * 1e3)
        if budget_s is not None and r >= 2 and time.perf_counter() - start > budget_s:
            break
    return {k: statistics.median(v) for k, v in times.items()}
