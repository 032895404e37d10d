"""What the serving target allows on this machine: the compute of one batch, outside the server, against its bounds.

    python bench/bench_serve_bound.py --fleet resnet18 bert --n 16 --markdown

bench_serve.py measures whole servers under load; this script asks what fusion can gain there at all. In one process
(no HTTP, no load generator), for batches of k one-row requests drawn the way bench_serve.py draws them (N models,
uniform or Zipf(1.1) popularity; BERT rows of 8-64 tokens), it times, interleaved (median of --reps):

- ``per-model``: one eager call per model that has rows (the compute of bench_serve's systems (a) and (b));
- ``fusecc``: ``ServedFleet.run`` of the fused fleet (strategy "auto", the server's);
- ``one model``: ONE model run on all k rows (the guide's physical bound: no fleet runs k rows faster than one model
  of the architecture does);
- ``weight read``: the bytes of the weights of the models that have rows, at the machine's measured read bandwidth
  (a fleet whose models differ must read each active model's weights once per batch).

The bound of a batch is the larger of the last two. ``per-model / bound`` is the most any way of running the fleet can
gain over per-model calls on that batch; where it is below 2, a server cannot sustain 2x the per-model server's
throughput at the same p99 (the requests are the same; a server only adds its HTTP costs on top).
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_bandwidth(mib: int = 512, reps: int = 5) -> float:
    """Bytes/s of one pass reading a tensor much larger than the caches (torch.sum over fp32)."""
    x = torch.ones(mib << 18)
    x.sum()
    best = min(_timed(lambda: x.sum()) for _ in range(reps))
    return x.numel() * 4 / best


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fleet", nargs="+", default=["resnet18", "bert"], choices=["resnet18", "bert"])
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    ap.add_argument("--popularity", nargs="+", default=["uniform", "zipf"], choices=["uniform", "zipf"])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    sys.path.insert(0, ROOT)
    from bench._common import machine_info, print_grid, print_machine
    from bench.bench_serve import FLEETS, popularity
    from fusecc.serve import ServedFleet, TensorSpec
    from fusecc.serve.fleet import Request

    print_machine(machine_info())
    bw = read_bandwidth()
    print(f"read bandwidth: {bw / 1e9:.1f} GB/s (torch.sum over 512 MiB)\n")
    head = ["fleet", "N", "popularity", "rows k", "models with rows", "per-model ms", "fusecc ms", "one model ms",
            "weight read ms", "per-model / fusecc", "per-model / bound", "fusecc / bound"]
    out: List[List[str]] = []
    for fleet in a.fleet:
        factory, example = FLEETS[fleet]
        torch.manual_seed(0)
        models = []
        for _ in range(a.n):
            m = factory().eval()
            with torch.no_grad():
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * 0.01)
            models.append(m)
        inputs = None if fleet == "bert" else [TensorSpec("input", torch.float32, (3, 32, 32))]
        fused = ServedFleet(models, inputs=inputs, mode="fused", max_batch=max(a.rows))
        per_model = ServedFleet(models, inputs=inputs, mode="per-model", max_batch=max(a.rows))
        # bytes a batch must read per active model: the dense weights (an embedding table is read by rows only)
        dense = sum(p.numel() * p.element_size() for mod in models[0].modules() if not isinstance(mod, nn.Embedding)
                    for p in mod.parameters(recurse=False))
        for pop in a.popularity:
            weights = popularity(pop, a.n)
            for k in a.rows:
                rng = np.random.default_rng(k)
                pyrng = random.Random(k)

                def batch() -> List[Any]:
                    reqs = []
                    for m in rng.choice(a.n, size=k, p=weights):
                        if fleet == "bert":
                            t = {"input_ids": torch.randint(1000, 30000, (1, pyrng.randint(8, 64)))}
                        else:
                            t = {"input": torch.randn(1, 3, 32, 32)}
                        reqs.append(Request(int(m), t, 1))
                    return reqs

                times: Dict[str, List[float]] = {"per-model": [], "fusecc": [], "one": []}
                active: List[int] = []
                for _ in range(a.reps):  # interleaved: the same batch through each way, in turn
                    reqs = batch()
                    active.append(len({r.model for r in reqs}))
                    times["per-model"].append(_timed(lambda: per_model.run(reqs)))
                    times["fusecc"].append(_timed(lambda: fused.run(reqs)))
                    stacked = {n: t[0] for n, t in per_model._stack([[(r.inputs, 1) for r in reqs]], k).items()}
                    times["one"].append(_timed(lambda: per_model._call(per_model.models[0], stacked)))
                med = {n: statistics.median(v) * 1000 for n, v in times.items()}
                read = statistics.median(active) * dense / bw * 1000
                bound = max(med["one"], read)
                out.append([fleet, str(a.n), pop, str(k), f"{statistics.median(active):g}", f"{med['per-model']:.1f}",
                            f"{med['fusecc']:.1f}", f"{med['one']:.1f}", f"{read:.1f}",
                            f"{med['per-model'] / med['fusecc']:.2f}x", f"{med['per-model'] / bound:.2f}x",
                            f"{med['fusecc'] / bound:.2f}x"])
                print("  ".join(out[-1]), file=sys.stderr, flush=True)
    print_grid(head, out, a.markdown, left=3, last_left=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
