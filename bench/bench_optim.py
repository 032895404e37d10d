"""The optimizer step of a fleet on CPU: fusecc.optim against torch.optim on the same stacked tensors, against a loop of
N torch optimizers (what a careful user runs), and against the memory floor.

The parameters are those of N resnet18 (10 classes) stacked ``[N, ...]`` (issue 17's setting: N=16, 179M values),
with random gradients. Per optimizer, the step with one learning rate for all models and with a per-model lr:

  fusecc          fusecc.optim.<Opt>(params, lr=[...], num_models=N).step()
  torch fused     torch.optim.<Opt>(stacked params, fused=True).step() (the same tensors, one lr: no per-model setting
                  exists there); RMSprop has no fused CPU kernel in torch: foreach=True
  loop            N torch.optim.<Opt>(model i's slices, fused=True (RMSprop: foreach=True), lr=lr_i).step()
  floor           the bytes one step must move at this machine's copy bandwidth: k x the parameter bytes, Adam k=7
                  (read p, g, m, v; write p, m, v), SGD-momentum 5, RMSprop 5, clip 3 (read g twice, write g once),
                  timed as an in-place update of k/2 x the parameter bytes (reads and writes each byte once, like an
                  optimizer's in-place update: a copy to another buffer would also read its destination first)

Also per-model gradient clipping (fusecc.utils.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ on the same
tensors, one norm for all, foreach) and zero_grad. Interleaved timing, medians.

  .venv/bin/python bench/bench_optim.py                # N=16, ~3 min on 2 cores
  .venv/bin/python bench/bench_optim.py --n 4 --opt adamw
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, List

import torch
import torchvision

import fusecc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved_medians, machine_info, print_machine  # noqa: E402

FLOOR_K = {"adam": 7, "adamw": 7, "sgd": 5, "rmsprop": 5, "clip": 3}


def stacked_params(n: int) -> List[torch.nn.Parameter]:
    torch.manual_seed(0)
    shapes = [p.shape for p in torchvision.models.resnet18(num_classes=10).parameters()]
    ps = []
    for s in shapes:
        p = torch.nn.Parameter(torch.randn((n,) + tuple(s)) * 0.05)
        p.grad = torch.randn_like(p) * 1e-3
        ps.append(p)
    return ps


def make_opt(kind: str, params, lr, **kw):
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, **kw)
    if kind == "adamw":
        return torch.optim.AdamW(params, lr=lr, **kw)
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, **kw)
    return torch.optim.RMSprop(params, lr=lr, **kw)


def make_fusecc(kind: str, params, lr, n):
    cls = {"adam": fusecc.optim.Adam, "adamw": fusecc.optim.AdamW, "sgd": fusecc.optim.SGD,
           "rmsprop": fusecc.optim.RMSprop}[kind]
    kw = {"momentum": 0.9} if kind == "sgd" else {}
    return cls(params, lr=lr, num_models=n, **kw)


def floor_copy(nbytes: int) -> Callable[[], None]:
    """An in-place pass that moves ``nbytes`` (reads half, writes half back)."""
    buf = torch.zeros(nbytes // 8)
    return lambda: buf.add_(1.0)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--opt", nargs="+", default=["adam", "adamw", "rmsprop", "sgd"])
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args(argv)
    print_machine(machine_info())
    n = a.n
    ps = stacked_params(n)
    nbytes = sum(q.numel() * 4 for q in ps)
    print(f"resnet18 x {n} stacked: {sum(q.numel() for q in ps) / 1e6:.0f}M parameters, {nbytes / 2**20:.0f} MiB; "
          f"median ms of {a.reps} interleaved repetitions")
    lrs = [1e-3 * (1 + i / n) for i in range(n)]
    for kind in a.opt:
        slices = [[q[i] for q in ps] for i in range(n)]  # views: the loop updates the same memory
        fused_kw = {"foreach": True} if kind == "rmsprop" else {"fused": True}
        prov = {
            "fusecc (one lr)": make_fusecc(kind, ps, 1e-3, n).step,
            "fusecc (per-model lr)": make_fusecc(kind, ps, lrs, n).step,
            f"torch {'foreach' if kind == 'rmsprop' else 'fused'} (same tensors)": make_opt(kind, ps, 1e-3,
                                                                                          **fused_kw).step,
        }
        opts = []
        for i in range(n):
            sl = [torch.nn.Parameter(s) for s in slices[i]]
            for s, q in zip(sl, ps):
                s.grad = q.grad[len(opts)]
            opts.append(make_opt(kind, sl, lrs[i], **fused_kw))
        prov["loop of N torch"] = lambda opts=opts: [o.step() for o in opts]
        prov["floor"] = floor_copy(nbytes * FLOOR_K[kind])
        ms = interleaved_medians(prov, a.reps)
        base = ms[next(k for k in ms if k.startswith("torch"))]
        print(f"{kind}: " + " | ".join(f"{k} {v:.1f}" for k, v in ms.items())
              + f"  ->  fusecc per-model lr / torch {ms['fusecc (per-model lr)'] / base:.2f}x, / loop "
              f"{ms['fusecc (per-model lr)'] / ms['loop of N torch']:.2f}x, / floor "
              f"{ms['fusecc (per-model lr)'] / ms['floor']:.2f}x", flush=True)
    clip = {
        "fusecc.utils.clip_grad_norm_ (per model)": lambda: fusecc.utils.clip_grad_norm_(ps, 1e9),
        "torch clip_grad_norm_ (one norm, foreach)": lambda: torch.nn.utils.clip_grad_norm_(ps, 1e9, foreach=True),
        "floor": floor_copy(nbytes * FLOOR_K["clip"]),
    }
    ms = interleaved_medians(clip, a.reps)
    print("clip: " + " | ".join(f"{k} {v:.1f}" for k, v in ms.items()), flush=True)
    grads = [q.grad for q in ps]
    zopt = make_fusecc("adamw", ps, 1e-3, n)

    def zero() -> None:  # the gradients put back (references, no copy), then the fleet's zero_grad
        for q, gr in zip(ps, grads):
            q.grad = gr
        zopt.zero_grad()

    ms = interleaved_medians({"fusecc opt.zero_grad() (set_to_none, grads re-attached first)": zero}, a.reps)
    print("zero_grad: " + " | ".join(f"{k} {v:.2f}" for k, v in ms.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
