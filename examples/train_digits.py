"""Train 8 small MLPs with 8 learning rates as ONE fused model, and the same 8 one by one, on scikit-learn's digits.

A hyper-parameter search in miniature: every model sees the same batches (``shared_inputs=True``), each has its own
learning rate and cosine schedule. Prints each model's test accuracy, fused and one by one (they match: the same
arithmetic), and the wall-clock ratio. The data set ships with scikit-learn, nothing is downloaded.

Run: ``make demo-train`` or ``python examples/train_digits.py [--epochs 8] [--num-models 8]``.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import fusecc


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, epoch: int):
    g = torch.Generator().manual_seed(epoch)
    perm = torch.randperm(len(x), generator=g)
    for i in range(0, len(x), size):
        idx = perm[i:i + size]
        yield x[idx], y[idx]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--num-models", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    xs, ys = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(xs, ys, test_size=0.25, random_state=0)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-6
    x_tr, x_te = (torch.tensor((v - mean) / std, dtype=torch.float32) for v in (x_tr, x_te))
    y_tr, y_te = torch.tensor(y_tr), torch.tensor(y_te)
    n = a.num_models
    # 0.001 ... 0.09 for 8 models: from too small to large. (Far larger rates make training chaotic: there the fused
    # and the one-by-one runs, whose float rounding differs in the last bit, would end in different places.)
    lrs = [0.001 * 1.9**i for i in range(n)]
    steps = a.epochs * ((len(x_tr) + a.batch - 1) // a.batch)
    models = [mlp() for _ in range(n)]
    originals = [copy.deepcopy(m) for m in models]

    # --- fused: all N models in one module, one optimizer with N learning rates
    fused = fusecc.fuse(models, shared_inputs=True).train()
    opt = fusecc.optim.SGD(fused, lr=lrs, momentum=0.9)
    sched = fusecc.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    t0 = time.perf_counter()
    for epoch in tqdm(range(a.epochs), desc="fused (8 models at once)", disable=a.quiet):
        for xb, yb in batches(x_tr, y_tr, a.batch, epoch):
            loss = fusecc.per_model_loss(F.cross_entropy, fused(xb), yb, shared_targets=True)
            loss.sum().backward()  # sum, not mean: each model gets exactly its own gradient
            opt.step()
            opt.zero_grad()
            sched.step()
    t_fused = time.perf_counter() - t0
    with torch.no_grad():
        acc_fused = (fused.eval()(x_te).argmax(-1) == y_te).float().mean(-1)

    # --- one by one: N models, N optimizers, N schedules (what fusecc replaces)
    t0 = time.perf_counter()
    acc_loop = []
    for i, m in enumerate(tqdm(originals, desc="one by one", disable=a.quiet)):
        o = torch.optim.SGD(m.parameters(), lr=lrs[i], momentum=0.9)
        s = torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=steps)
        for epoch in range(a.epochs):
            for xb, yb in batches(x_tr, y_tr, a.batch, epoch):
                F.cross_entropy(m(xb), yb).backward()
                o.step()
                o.zero_grad()
                s.step()
        with torch.no_grad():
            acc_loop.append((m.eval()(x_te).argmax(-1) == y_te).float().mean().item())
    t_loop = time.perf_counter() - t0

    print(f"\n{n} MLPs 64-128-128-10 on digits ({len(x_tr)} train / {len(x_te)} test), {a.epochs} epochs, "
          f"batch {a.batch}, SGD momentum 0.9, cosine schedule")
    print(f"{'model':>5} {'lr':>8} {'acc fused':>10} {'acc one-by-one':>15}")
    for i in range(n):
        print(f"{i:>5} {lrs[i]:>8.3f} {acc_fused[i].item():>10.3f} {acc_loop[i]:>15.3f}")
    best = int(acc_fused.argmax())
    print(f"best lr {lrs[best]:.3f} (accuracy {acc_fused[best].item():.3f})")
    print(f"time: fused {t_fused:.2f} s, one by one {t_loop:.2f} s, speed-up {t_loop / t_fused:.2f}x")
    agree = max(abs(acc_fused[i].item() - acc_loop[i]) for i in range(n))
    print("check:", "OK" if agree <= 0.01 else f"MISMATCH (accuracies differ by {agree:.3f})")
    return 0 if agree <= 0.01 else 1


if __name__ == "__main__":
    raise SystemExit(main())
