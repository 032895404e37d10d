"""A hyper-parameter search on scikit-learn's digits with Optuna, trials packed 16 at a time into one fused model.

40 trials of an MLP, each its own learning rate, weight decay and momentum (SGD), 20 epochs, pruned by Hyperband.
The same study (sampler seed, pruner, trial budget) runs twice: packed (``fusecc.hpo.optimize``) and one trial at a
time with plain torch (``fusecc.hpo.torch_objective`` under ``study.optimize``). Prints the best trial of each (the
same trial wins: the pack changes the speed, not the results) and the wall-clock speed-up. Nothing is downloaded.

Run: ``make demo-hpo`` or ``python examples/hpo_digits.py [--trials 40] [--epochs 20] [--K 16]``.
"""

from __future__ import annotations

import argparse
import time

import optuna
import torch
import torch.nn as nn
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import fusecc.hpo


def mlp(hp: dict) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def space(trial: optuna.Trial) -> dict:
    # (far larger rates make training chaotic: two runs whose float rounding differs in the last bit, the packed one
    # and the torch one, or torch on 1 and 2 threads, would end in different places)
    return {"lr": trial.suggest_float("lr", 1e-3, 0.1, log=True),
            "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "momentum": trial.suggest_float("momentum", 0.0, 0.9)}


def make_study(epochs: int) -> optuna.Study:
    # the same name both times: Hyperband assigns a trial's bracket from the study name and the trial number
    return optuna.create_study(study_name="digits-mlp", direction="maximize",
                               sampler=optuna.samplers.RandomSampler(seed=0),
                               pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=epochs))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--K", default="16", help="trials per pack, or 'auto'")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    xs, ys = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(xs, ys, test_size=0.25, random_state=0)
    data = (torch.tensor(x_tr / 16.0, dtype=torch.float32), torch.tensor(y_tr),
            torch.tensor(x_va / 16.0, dtype=torch.float32), torch.tensor(y_va))
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # (torch.optim's first use imports torch._dynamo: not timed)
    kw = dict(optimizer="sgd", epochs=a.epochs, batch_size=32, metric="accuracy")
    K = a.K if a.K == "auto" else int(a.K)

    packed = make_study(a.epochs)
    t0 = time.perf_counter()
    report = fusecc.hpo.optimize(packed, mlp, space, data, n_trials=a.trials, K=K, show_progress_bar=not a.quiet, **kw)
    t_packed = time.perf_counter() - t0

    alone = make_study(a.epochs)
    t0 = time.perf_counter()
    alone.optimize(fusecc.hpo.torch_objective(mlp, space, data, **kw), n_trials=a.trials,
                   show_progress_bar=not a.quiet)
    t_alone = time.perf_counter() - t0

    print(f"packed: {report}")
    for name, s, t in (("packed (fusecc.hpo)", packed, t_packed), ("one at a time (torch)", alone, t_alone)):
        b = s.best_trial
        params = ", ".join(f"{k}={v:.3g}" for k, v in b.params.items())
        pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in s.trials)
        print(f"{name:22s} {t:6.1f} s  best: trial {b.number} accuracy {b.value:.4f} ({params}); {pruned} of "
              f"{len(s.trials)} trials pruned")
    same_states = sum(p.state == q.state for p, q in zip(packed.trials, alone.trials))
    print(f"speed-up {t_alone / t_packed:.2f}x; the same best trial: {packed.best_trial.number == alone.best_trial.number}"
          f"; the same pruning decisions for {same_states} of {len(packed.trials)} trials")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
