"""Every conv lowering fusecc has, timed on the conv layers of real models: the measurements behind
``fusecc.choose.conv_rule``.

For each distinct conv of the chosen models (its fused input shape at N models, batch B, images res x res), the
candidates of ``fusecc.choose.conv_candidates`` run the same conv (checked against the grouped conv first), timed
interleaved, median of --reps, under torch.no_grad() (inference) or with the backward pass (--train). The table
shows each candidate's time, the fastest, the rule's pick and how much slower the rule's pick is than the fastest.

  .venv/bin/python bench/bench_conv_choice.py                       # resnet18, mobilenet_v2, densenet121, N=16
  .venv/bin/python bench/bench_conv_choice.py --models resnet18 --n 8 --res 64 --train
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Tuple

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import MODELS, input_shape  # noqa: E402

from fusecc import choose, runtime  # noqa: E402


def conv_layers(model: nn.Module, x: torch.Tensor) -> List[Tuple[str, nn.Conv2d, Tuple[int, ...]]]:
    """(name, conv, per-model input shape) of every Conv2d, from one forward with hooks."""
    found: List[Tuple[str, nn.Conv2d, Tuple[int, ...]]] = []
    hooks = [m.register_forward_pre_hook(lambda m, a, name=name: found.append((name, m, tuple(a[0].shape))))
             for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="resnet18,mobilenet_v2,densenet121")
    ap.add_argument("--n", type=int, default=16, help="number of models (default 16)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--res", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--train", action="store_true", help="time forward + backward (weights and input need grad)")
    a = ap.parse_args()
    n = a.n
    print(f"N={n}, batch {a.batch}, images {a.res}x{a.res}, {torch.get_num_threads()} threads, "
          f"{'forward + backward' if a.train else 'forward, no grad'}; ms per call of all N models")
    seen = set()
    worst = []
    for model_name in a.models.split(","):
        model = MODELS[model_name]().eval()
        for name, conv, shape in conv_layers(model, torch.randn(a.batch, *input_shape(model_name, a.res))):
            x_shape = (shape[0], shape[1] * n) + shape[2:]
            w_shape = (n,) + tuple(conv.weight.shape)
            groups = conv.groups * n
            key = (x_shape, w_shape, conv.stride, conv.padding, conv.dilation, groups)
            if key in seen:
                continue
            seen.add(key)
            x = torch.randn(x_shape, requires_grad=a.train)
            w = torch.randn(w_shape, requires_grad=a.train)
            b = None
            names = choose.conv_candidates(2, x_shape, w_shape, conv.padding, groups)

            def run(impl: str, x=x, w=w, conv=conv, groups=groups) -> None:
                y = runtime.conv.stacked_conv(x, w, b, conv.stride, conv.padding, conv.dilation, groups, 2, impl)
                if a.train:
                    y.backward(torch.ones_like(y))

            with torch.no_grad():
                ref = runtime.conv.stacked_conv(x, w, b, conv.stride, conv.padding, conv.dilation, groups, 2, "grouped")
                for impl in names:
                    y = runtime.conv.stacked_conv(x, w, b, conv.stride, conv.padding, conv.dilation, groups, 2, impl)
                    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-3)
            ms = choose.time_candidates({c: (lambda c=c: run(c)) for c in names}, a.reps, grad=a.train)
            rule = choose.conv_rule(torch.device("cpu"), x_shape, w_shape, conv.stride, conv.padding, conv.dilation,
                                    2, groups)
            best = min(ms, key=ms.get)
            worst.append((ms[rule] / ms[best], f"{model_name} {name}"))
            k = "x".join(map(str, conv.kernel_size))
            print(f"{model_name:13s} {name:34s} {shape[1]:4d}->{conv.out_channels:4d} k{k} s{conv.stride[0]} "
                  f"g{conv.groups:<4d} {shape[2]:3d}x{shape[3]:<3d} "
                  + "  ".join(f"{c} {v:7.3f}" for c, v in ms.items())
                  + f"  | fastest {best}, rule {rule} ({ms[rule] / ms[best]:.2f}x)", flush=True)
    worst.sort(reverse=True)
    print("rule's pick vs the fastest, worst five: " + ", ".join(f"{r:.2f}x {w}" for r, w in worst[:5]))


if __name__ == "__main__":
    main()
