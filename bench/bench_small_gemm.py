"""fusecc's CPU small-batch GEMM kernel (kernels/linear/cpu_gemm.c) against torch's baddbmm, per model and shape:
the measurements behind ``fusecc.kernels.linear.cpu.MAX_ROWS``.

For each layer shape (K inputs, O outputs) and rows per model R, both compute ``x[n] @ W[n]^T + b[n]`` for N
models (checked equal first), timed interleaved, median of --reps, under torch.no_grad(). Before each timed call
a 64 MB buffer is written, so the weights come from DRAM as in a real forward (where the other layers' weights and
activations pass through the cache between two calls of a layer). GB/s is the weights read per second.

  .venv/bin/python bench/bench_small_gemm.py
  .venv/bin/python bench/bench_small_gemm.py --n 8 --rows 1 8 64
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fusecc.kernels.linear import cpu  # noqa: E402

# (what, K, O): the MLP's layers, resnet18's layer4 convs on a 1x1 map (centre tap, 2x2 live taps, downsample),
# the transformer's projections
SHAPES = [("mlp fc1", 784, 512), ("mlp fc2", 512, 512), ("mlp fc3", 512, 10), ("resnet18 l4 3x3", 512, 512),
          ("resnet18 l4 s2", 1024, 512), ("resnet18 l4 down", 256, 512), ("transformer ff1", 256, 1024)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=16, help="number of models (default 16)")
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64, 128])
    ap.add_argument("--reps", type=int, default=21)
    a = ap.parse_args()
    print(f"N={a.n}, {torch.get_num_threads()} threads; kernel {cpu.status()}")
    if cpu.library() is None:
        sys.exit(1)
    print("| layer | K | O | rows | baddbmm ms | kernel ms | kernel GB/s | speedup |")
    print("|---|--:|--:|--:|--:|--:|--:|--:|")
    torch.manual_seed(0)
    flush = torch.empty(16 * 2 ** 20)  # 64 MB, twice the last-level cache of this project's machines
    with torch.no_grad():
        for what, k, o in SHAPES:
            w = torch.randn(a.n, o, k) / k ** 0.5
            b = torch.randn(a.n, o)
            for r in a.rows:
                x = torch.randn(a.n, r, k)
                fns = {"baddbmm": lambda: torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2)),
                       "kernel": lambda: cpu.small_gemm(x, w, b)}
                torch.testing.assert_close(fns["kernel"](), fns["baddbmm"](), rtol=1e-4, atol=1e-4)
                times = {name: [] for name in fns}
                for rep in range(a.reps):
                    for name, fn in fns.items():
                        flush.fill_(rep)  # evict the weights from the caches
                        start = time.perf_counter()
                        fn()
                        times[name].append(time.perf_counter() - start)
                ts = {name: statistics.median(v) * 1e3 for name, v in times.items()}
                gbs = w.numel() * 4 / ts["kernel"] / 1e6
                print(f"| {what} | {k} | {o} | {r} | {ts['baddbmm']:.3f} | {ts['kernel']:.3f} | {gbs:.1f} | "
                      f"{ts['baddbmm'] / ts['kernel']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
