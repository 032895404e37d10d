"""`make demo`: fuse 8 ResNet-18s with different random weights, check them against the 8 models run one by one,
and time the fused module against that loop. Run: python -m fusecc.demo [--num-models N] [--batch B] [--res R]."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fusecc


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-models", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args(argv)
    import torchvision

    torch.manual_seed(0)
    n = a.num_models
    models = [torchvision.models.resnet18(num_classes=10).eval() for _ in range(n)]
    x = torch.randn(n, a.batch, 3, a.res, a.res)
    t0 = time.perf_counter()
    fused = fusecc.fuse(models)
    with torch.no_grad():
        y = fused(x)
        compile_s = time.perf_counter() - t0
        ref = torch.stack([m(xi) for m, xi in zip(models, x)])
    err = (y - ref).abs().max().item()
    rel = err / ref.abs().max().item()
    print(fused)
    print(f"\n{n} x resnet18, batch {a.batch} per model, {a.res}x{a.res}: output {list(y.shape)}")
    print(f"max abs error vs the {n} models run one by one: {err:.3g} (relative {rel:.3g}); "
          f"first call {compile_s:.2f}s")

    def loop():
        return [m(xi) for m, xi in zip(models, x)]

    times = {"loop": [], "fused": []}
    with torch.no_grad():
        loop(), fused(x)  # warm-up
        for _ in range(a.reps):  # interleaved, so both see the same machine noise
            t = time.perf_counter()
            loop()
            times["loop"].append(time.perf_counter() - t)
            t = time.perf_counter()
            fused(x)
            times["fused"].append(time.perf_counter() - t)
    lm, fm = statistics.median(times["loop"]), statistics.median(times["fused"])
    print(f"inference, median of {a.reps}: loop {lm * 1e3:.1f} ms, fused {fm * 1e3:.1f} ms, "
          f"speed-up {lm / fm:.2f}x over the loop ({torch.get_num_threads()} threads)")
    ok = rel < 1e-4
    print("check:", "OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
