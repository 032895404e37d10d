"""The GPU benchmark of the GPU check (bench/gpu_check.py, step 4): NetFuse-style fleets, and each Triton kernel
against its aten reference at a representative shape, with the rate it achieves against the H200's roofline.

    python3 bench/gpu_bench.py --out DIR [--budget-s 200]      # on a CUDA machine
    python3 bench/gpu_bench.py --out DIR --smoke                 # tiny shapes on any device (CI: it must not rot)

Fleets (random weights, inference under no_grad): resnet50, resnext50_32x4d and a BERT-base-sized encoder
(``nn.TransformerEncoder`` 12 x 768, 12 heads, seq 128, with a 30522-token embedding) at N in {1, 8, 32} models and
batch 1 and 8 per model, in bf16 and fp32 (torch's defaults: TF32 in cuDNN's convs, not in cuBLAS's GEMMs).
Providers, each checked against the loop before it is timed:

- ``loop``: the N models one after the other (what a user runs today);
- ``vmap``: torch.func.stack_module_state + torch.vmap over functional_call (PyTorch's own ensembling);
- ``fusecc``: the fused module with the Triton kernels (backend "auto");
- ``fusecc-ref``: the fused module on aten only (``FUSECC_KERNELS=reference``);
- ``fusecc+compile``: torch.compile of the fused module (only on the rows listed in ``COMPILE_ROWS``: a compile
  takes a minute);
- ``one-model``: ONE model on all N*B rows, the bound fusion aims at (it reads one set of weights, not N).

Rows run most informative first (bf16, N=32, batch 8) and stop at the time budget: what did not run is listed as
such. Times are medians of CUDA-event timed calls after warm-up. Results: DIR/gpu_bench_models.csv,
DIR/gpu_bench_kernels.csv and DIR/gpu_bench.md.
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from fusecc.verify import relative_error

# H200 (SXM): dense bf16 tensor-core peak 989 TFLOP/s, fp32 (CUDA cores) 67 TFLOP/s, HBM3e 4.8 TB/s; measured here
# (.library/device/KINDS.md): an 8192^3 bf16 matmul at 770-800 TFLOP/s, a device copy at 4.3 TB/s
PEAK = {"bf16_tflops": 989.0, "fp32_tflops": 67.0, "tf32_tflops": 494.0, "hbm_tbs": 4.8}
MEASURED = {"bf16_tflops": 790.0, "hbm_tbs": 4.3}

NS = (32, 8, 1)
BATCHES = (8, 1)
DTYPES = (torch.bfloat16, torch.float32)
MODELS = ("resnet50", "resnext50_32x4d", "bert_base")
COMPILE_ROWS = {("resnet50", 8, 8, torch.bfloat16), ("bert_base", 8, 8, torch.bfloat16)}
PROVIDERS = ("loop", "vmap", "fusecc", "fusecc-ref", "fusecc+compile", "one-model")
TOL = {torch.bfloat16: 5e-2, torch.float32: 1e-2}  # max |provider - loop| / max |loop| (TF32 convs in both)


# ------------------------------------------------------------------------------------------------------ models


class Encoder(nn.Module):
    """A BERT-sized encoder: token embedding + learned positions, nn.TransformerEncoder, first-token head."""

    def __init__(self, vocab: int, d: int, layers: int, heads: int, seq: int, classes: int = 2):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.02)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, classes)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(self.tok(ids) + self.pos[: ids.shape[1]])[:, 0])


@dataclass
class ModelSpec:
    build: Callable[[], nn.Module]
    input: Callable[[int, int, torch.device], torch.Tensor]  # (N, B, device) -> [N, B, ...]
    floating_input: bool = True


def model_specs(smoke: bool) -> Dict[str, ModelSpec]:
    import torchvision

    res, seq = (32, 16) if smoke else (224, 128)
    img = lambda n, b, dev: torch.randn(n, b, 3, res, res, device=dev)  # noqa: E731
    tokens = lambda vocab: (lambda n, b, dev: torch.randint(0, vocab, (n, b, seq), device=dev))  # noqa: E731
    if smoke:
        return {
            "resnet18": ModelSpec(lambda: torchvision.models.resnet18(num_classes=10), img),
            "bert_tiny": ModelSpec(lambda: Encoder(100, 32, 2, 2, seq), tokens(100), floating_input=False),
        }
    return {
        "resnet50": ModelSpec(lambda: torchvision.models.resnet50(), img),
        "resnext50_32x4d": ModelSpec(lambda: torchvision.models.resnext50_32x4d(), img),
        "bert_base": ModelSpec(lambda: Encoder(30522, 768, 12, 12, seq), tokens(30522), floating_input=False),
    }


def fleet(base: nn.Module, n: int, seed: int = 0) -> List[nn.Module]:
    """n copies of base with different weights (base plus 1% noise each), made on the device: building n models on
    the host would take longer than the whole benchmark."""
    g = torch.Generator(device=next(base.parameters()).device).manual_seed(seed)
    out = []
    with torch.no_grad():
        for _ in range(n):
            m = copy.deepcopy(base)
            for p in m.parameters():
                scale = 0.01 * (float(p.float().abs().mean()) + 1e-3)
                p.add_(torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype) * scale)
            out.append(m)
    return out


# ------------------------------------------------------------------------------------------------------ timing


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def time_ms(fn: Callable[[], Any], dev: torch.device, min_reps: int = 5, min_s: float = 0.2, max_reps: int = 50,
            warmup: int = 2) -> Tuple[float, int]:
    """Median ms of fn() over at least min_reps calls and min_s seconds (after warm-up), and the call count."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_s):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times), len(times)


# ------------------------------------------------------------------------------------------------------ fleets


@dataclass
class Row:
    model: str
    n: int
    batch: int
    dtype: str
    provider: str
    ms: Optional[float] = None
    reps: int = 0
    rel_err: Optional[float] = None
    status: str = "ok"  # ok | error: ... | not run: ...
    weights_gb: float = 0.0
    extra: Dict[str, Any] = field(default_factory=dict)


def providers_for(models: List[nn.Module], x: torch.Tensor, with_compile: bool) -> Dict[str, Callable[[], Any]]:
    import fusecc
    from fusecc.kernels import use_backend

    n = len(models)
    fused = fusecc.fuse(models)

    def loop():
        return torch.stack([m(x[i]) for i, m in enumerate(models)])

    def run_vmap():
        base = copy.deepcopy(models[0]).to("meta")
        params, buffers = torch.func.stack_module_state(models)

        def one(p, b, xi):
            return torch.func.functional_call(base, (p, b), (xi,))

        return lambda: torch.vmap(one)(params, buffers, x)

    def fused_ref():
        with use_backend("reference"):
            return fused(x)

    one_model = models[0]
    rows = x.reshape((n * x.shape[1],) + tuple(x.shape[2:]))
    out: Dict[str, Callable[[], Any]] = {"loop": loop}
    try:
        out["vmap"] = run_vmap()
    except Exception as e:  # noqa: BLE001 - reported as the row's status
        out["vmap"] = _raiser(e)
    out["fusecc"] = lambda: fused(x)
    out["fusecc-ref"] = fused_ref
    if with_compile:
        compiled = torch.compile(fused)
        out["fusecc+compile"] = lambda: compiled(x)
    out["one-model"] = lambda: one_model(rows)
    return out


def _raiser(e: Exception) -> Callable[[], Any]:
    def f():
        raise e

    return f


def run_fleets(dev: torch.device, smoke: bool, deadline: float) -> List[Row]:
    specs = model_specs(smoke)
    ns, batches = ((2,), (1,)) if smoke else (NS, BATCHES)
    dtypes = (torch.float32,) if smoke and dev.type == "cpu" else DTYPES
    rows: List[Row] = []
    plan = [(dt, n, b, name) for dt in dtypes for n in ns for b in batches for name in specs]
    for dt, n, b, name in plan:
        dts = str(dt).replace("torch.", "")
        if time.time() > deadline:
            rows += [Row(name, n, b, dts, p, status="not run: time budget") for p in PROVIDERS]
            continue
        spec = specs[name]
        try:
            torch.manual_seed(0)
            base = spec.build().to(dev).eval()
            if dt != torch.float32:
                base = base.to(dt)
            models = fleet(base, n)
            x = spec.input(n, b, dev)
            if spec.floating_input:
                x = x.to(dt)
            wgb = sum(p.numel() * p.element_size() for p in base.parameters()) * n / 1e9
            with_compile = (not smoke) and (name, n, b, dt) in COMPILE_ROWS
            with torch.no_grad():
                provs = providers_for(models, x, with_compile)
                ref = provs["loop"]()
                for p in PROVIDERS:
                    row = Row(name, n, b, dts, p, weights_gb=wgb)
                    rows.append(row)
                    if p not in provs:  # fusecc+compile outside COMPILE_ROWS
                        row.status = "not run: torch.compile only on the rows in COMPILE_ROWS"
                        continue
                    if time.time() > deadline:
                        row.status = "not run: time budget"
                        continue
                    try:
                        t0 = time.time()
                        y = provs[p]()
                        row.extra["first_call_s"] = round(time.time() - t0, 2)
                        if p != "one-model":
                            row.rel_err = relative_error(y.reshape(ref.shape), ref)
                            if row.rel_err > TOL[dt]:
                                row.status = f"error: differs from the loop by {row.rel_err:.3g} (> {TOL[dt]})"
                                continue
                        row.ms, row.reps = time_ms(provs[p], dev, min_reps=3 if smoke else 5,
                                                   min_s=0.02 if smoke else 0.2)
                    except Exception as e:  # noqa: BLE001
                        row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            del models, base, provs, x
        except Exception as e:  # noqa: BLE001
            rows.append(Row(name, n, b, dts, "*", status=f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"))
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------------------------------ kernels


@dataclass
class KernelRow:
    kernel: str
    shape: str
    dtype: str
    backend: str
    ms: Optional[float] = None
    rate: Optional[float] = None
    unit: str = ""
    of_peak: Optional[float] = None
    status: str = "ok"


def kernel_cases(dev: torch.device, smoke: bool) -> List[Tuple[str, str, str, Callable[[str], Any], float, str]]:
    """(kernel, shape, dtype, call(backend), work, unit): work in FLOP ("TFLOP/s") or bytes ("TB/s")."""
    from fusecc.kernels.conv1x1 import conv1x1
    from fusecc.kernels.layer_norm import layer_norm
    from fusecc.kernels.linear import batched_linear, wide_linear
    from fusecc.kernels.optim import adam_step
    from fusecc.kernels.routed_linear import routed_linear

    s = 8 if smoke else 1
    bf = torch.bfloat16
    cases = []
    n, r, k, m = 32, 1024 // s, 768 // s, 3072 // s  # a BERT-base FFN up-projection of 32 models, 1024 tokens each
    x, w, b = (torch.randn(n, r, k, device=dev, dtype=bf), torch.randn(n, m, k, device=dev, dtype=bf) * 0.03,
               torch.randn(n, m, device=dev, dtype=bf))
    cases.append(("batched_linear", f"N{n} R{r} K{k} M{m} gelu", "bf16",
                  lambda be: batched_linear(x, w, b, "gelu", backend=be), 2.0 * n * r * k * m, "TFLOP/s"))
    xs = torch.randn(4096 // s, k, device=dev, dtype=bf)
    w2 = torch.randn(n, 768 // s, k, device=dev, dtype=bf) * 0.03
    cases.append(("wide_linear", f"R{xs.shape[0]} K{k} N{n} M{w2.shape[1]}", "bf16",
                  lambda be: wide_linear(xs, w2, None, backend=be), 2.0 * xs.shape[0] * k * n * w2.shape[1],
                  "TFLOP/s"))
    rr, kk, mm = 8192 // s, 1024 // s, 1024 // s
    xr = torch.randn(rr, kk, device=dev, dtype=bf)
    idx = torch.randint(0, n, (rr,), device=dev)
    wr = torch.randn(n, mm, kk, device=dev, dtype=bf) * 0.03
    cases.append(("routed_linear", f"R{rr} K{kk} M{mm} N{n} (rows routed at random)", "bf16",
                  lambda be: routed_linear(xr, idx, wr, None, backend=be), 2.0 * rr * kk * mm, "TFLOP/s"))
    c = 256 // s
    xc = torch.randn(8, n * c, 28, 28, device=dev, dtype=bf).contiguous(memory_format=torch.channels_last)
    wc = torch.randn(n, c, c, device=dev, dtype=bf) * 0.06
    cases.append(("conv1x1", f"B8 N{n} C{c}->{c} 28x28", "bf16", lambda be: conv1x1(xc, wc, None, backend=be),
                  2.0 * 8 * n * c * c * 28 * 28, "TFLOP/s"))
    d = 768
    xl = torch.randn(n, 1024 // s, d, device=dev, dtype=bf)
    wl, bl = torch.randn(n, d, device=dev, dtype=bf), torch.randn(n, d, device=dev, dtype=bf)
    cases.append(("layer_norm", f"N{n} R{xl.shape[1]} D{d}", "bf16", lambda be: layer_norm(xl, wl, bl, backend=be),
                  2.0 * xl.numel() * 2 + 2 * wl.numel() * 2, "TB/s"))
    numel = (25_000_000 // (s * s)) * 8  # 8 models of resnet50's 25M parameters
    ps = [torch.randn(8, numel // 8, device=dev)]
    gs = [torch.randn_like(ps[0])]
    m1, m2 = [torch.zeros_like(ps[0])], [torch.zeros_like(ps[0])]
    cases.append(("adam_step", f"8 models x {numel // 8 / 1e6:.1f}M fp32", "fp32",
                  lambda be: adam_step(ps, gs, m1, m2, lr=[1e-3] * 8, step=1, decoupled=True, weight_decay=0.01,
                                       backend=be), 7.0 * 4 * numel, "TB/s"))
    return cases


def run_kernels(dev: torch.device, smoke: bool, deadline: float) -> List[KernelRow]:
    rows: List[KernelRow] = []
    try:
        cases = kernel_cases(dev, smoke)
    except Exception as e:  # noqa: BLE001
        return [KernelRow("*", "", "", "", status=f"error: {type(e).__name__}: {e}")]
    backends = ("auto", "reference") if dev.type == "cuda" else ("reference",)
    for name, shape, dts, call, work, unit in cases:
        for be in backends:
            row = KernelRow(name, shape, dts, "triton" if be == "auto" else "aten reference", unit=unit)
            rows.append(row)
            if time.time() > deadline:
                row.status = "not run: time budget"
                continue
            try:
                with torch.no_grad():
                    row.ms, _ = time_ms(lambda: call(be), dev, min_reps=3 if smoke else 10,
                                        min_s=0.01 if smoke else 0.1)
                row.rate = work / (row.ms * 1e-3) / 1e12
                peak = PEAK["hbm_tbs"] if unit == "TB/s" else PEAK[f"{dts}_tflops"]
                row.of_peak = row.rate / peak
            except Exception as e:  # noqa: BLE001
                row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return rows


# ------------------------------------------------------------------------------------------------------ report


def fmt(v: Optional[float], spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(rows: Sequence[Row], krows: Sequence[KernelRow], info: Dict[str, str]) -> str:
    out = ["## Fleets (inference, median ms per call; speed-up = loop / provider)", ""]
    out.append(f"Device: {info['device']}; torch {info['torch']}; triton {info['triton']}.")
    out.append("")
    keys = sorted({(r.model, r.n, r.batch, r.dtype) for r in rows if r.provider != "*"},
                  key=lambda k: (k[3], -k[1], -k[2], k[0]))
    head = ["model", "N", "B", "dtype", "weights GB"] + [p for p in PROVIDERS] + ["fusecc vs loop",
                                                                                  "fusecc vs one-model"]
    out.append("| " + " | ".join(head) + " |")
    out.append("|" + "---|" * len(head))
    for key in keys:
        by = {r.provider: r for r in rows if (r.model, r.n, r.batch, r.dtype) == key}
        cells = [key[0], str(key[1]), str(key[2]), key[3], fmt(next(iter(by.values())).weights_gb, ".2f")]
        for p in PROVIDERS:
            r = by.get(p)
            cells.append("-" if r is None else (fmt(r.ms, ".3g") if r.status == "ok" else
                                                ("n/r" if r.status.startswith("not run") else "ERR")))
        loop, fu, one = (by.get(p) for p in ("loop", "fusecc", "one-model"))
        sp = loop.ms / fu.ms if loop and fu and loop.ms and fu.ms else None
        bound = fu.ms / one.ms if fu and one and fu.ms and one.ms else None
        cells += [fmt(sp, ".2f") + ("x" if sp else ""), fmt(bound, ".2f") + ("x" if bound else "")]
        out.append("| " + " | ".join(cells) + " |")
    errs = [r for r in rows if r.status.startswith("error")]
    if errs:
        out += ["", "Errors:", ""]
        out += [f"- {r.model} N={r.n} B={r.batch} {r.dtype} {r.provider}: {r.status}" for r in errs]
    skipped = sum(1 for r in rows if r.status.startswith("not run: time"))
    if skipped:
        out += ["", f"{skipped} measurements not run: the time budget ran out (n/r)."]
    out += ["", "## Kernels against their aten reference (median ms; rate and fraction of the H200's peak: "
            f"{PEAK['bf16_tflops']:.0f} bf16 TFLOP/s, {PEAK['hbm_tbs']} TB/s)", ""]
    out.append("| kernel | shape | dtype | backend | ms | rate | of peak | status |")
    out.append("|---|---|---|---|---|---|---|---|")
    for r in krows:
        out.append(f"| {r.kernel} | {r.shape} | {r.dtype} | {r.backend} | {fmt(r.ms, '.4g')} | "
                   f"{fmt(r.rate, '.3g')} {r.unit} | {fmt(r.of_peak and 100 * r.of_peak, '.1f')}% | {r.status} |")
    return "\n".join(out) + "\n"


def write_csv(path: str, rows: Sequence[Any]) -> None:
    if not rows:
        return
    fields = [f for f in rows[0].__dataclass_fields__ if f != "extra"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({f: getattr(r, f) for f in fields})


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for gpu_bench.md and the CSVs")
    ap.add_argument("--budget-s", type=float, default=200.0, help="stop starting measurements after this long")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (any device): exercises the code, measures "
                                                        "nothing worth reporting")
    ap.add_argument("--only", choices=("fleets", "kernels"), default=None)
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu" and not a.smoke:
        print("gpu_bench: no CUDA device; run with --smoke for a CPU smoke run", file=sys.stderr)
        return 2
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "absent"
    info = {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (smoke)",
            "torch": torch.__version__, "triton": tv}
    start = time.time()
    deadline = start + a.budget_s
    rows: List[Row] = []
    krows: List[KernelRow] = []
    try:
        if a.only in (None, "kernels"):  # the kernels first: seconds, and the fleets may use up the budget
            krows = run_kernels(dev, a.smoke, start + a.budget_s * 0.25 if a.only is None else deadline)
        if a.only in (None, "fleets"):
            rows = run_fleets(dev, a.smoke, deadline)
    except Exception:  # noqa: BLE001 - write what was measured
        traceback.print_exc()
    write_csv(os.path.join(a.out, "gpu_bench_models.csv"), rows)
    write_csv(os.path.join(a.out, "gpu_bench_kernels.csv"), krows)
    md = markdown(rows, krows, info)
    with open(os.path.join(a.out, "gpu_bench.md"), "w") as fh:
        fh.write(md)
    print(md)
    print(f"gpu_bench: {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
