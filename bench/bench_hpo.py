"""Pack-aware hyper-parameter search against the same search one trial at a time (issue 19).

    python bench/bench_hpo.py --model mlp cnn --markdown --json docs/bench/hpo.json

For each model (an MLP and a small CNN on scikit-learn's digits), the same Optuna study (RandomSampler seed, Hyperband
pruner, trial budget, epochs) runs:

- ``torch``: one trial at a time with plain torch (``fusecc.hpo.torch_objective`` under ``study.optimize``; torch.optim
  SGD in the loop, what a careful user runs);
- ``packed``: ``fusecc.hpo.optimize`` with K trials per pack.

Interleaved (torch, packed, torch, packed ...; --reps rounds), in one process; the wall-clock of each is the median.
Reported: wall-clock and speed-up, the best trial and value of each (the same trial must win), how many trials took
the same pruning decision, and best-value-so-far against wall-clock for the plot (bench/plot_hpo.py).

``--space warmup`` searches a schedule instead (lr after a warm-up of 0 or 3 epochs at lr 0.01, every trial from the
same seed) and adds ``packed+sharing``: Hippo's stage sharing (a warm-up trained once, trials forked from it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mlp(hp: Dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))


def cnn(hp: Dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Unflatten(1, (1, 8, 8)), nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(32 * 16, 10))


MODELS = {"mlp": mlp, "cnn": cnn}


def space_sgd(t: Any) -> Dict[str, Any]:
    return {"lr": t.suggest_float("lr", 1e-3, 0.1, log=True),
            "weight_decay": t.suggest_float("weight_decay", 1e-6, 1e-2, log=True),
            "momentum": t.suggest_float("momentum", 0.0, 0.9)}


def space_warmup(t: Any) -> Dict[str, Any]:
    lr = t.suggest_float("lr", 3e-3, 0.1, log=True)
    warm = t.suggest_categorical("warmup", [0, 3])
    return {"lr": [0.01] * warm + [lr], "momentum": 0.9}


def digits() -> tuple:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    xs, ys = load_digits(return_X_y=True)
    x_tr, x_va, y_tr, y_va = train_test_split(xs, ys, test_size=0.25, random_state=0)
    return (torch.tensor(x_tr / 16.0, dtype=torch.float32), torch.tensor(y_tr),
            torch.tensor(x_va / 16.0, dtype=torch.float32), torch.tensor(y_va))


def run_one(system: str, model: str, a: argparse.Namespace, data: tuple) -> Dict[str, Any]:
    import optuna
    import fusecc.hpo as hpo
    study = optuna.create_study(study_name=f"bench-{model}", direction="maximize",
                                sampler=optuna.samplers.RandomSampler(seed=a.seed),
                                pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=a.epochs))
    space = space_warmup if a.space == "warmup" else space_sgd
    kw = dict(optimizer="sgd", epochs=a.epochs, batch_size=a.batch, metric="accuracy",
              seed_by_trial=a.space != "warmup")
    report = None
    t0 = time.perf_counter()
    start = time.time()
    if system == "torch":
        study.optimize(hpo.torch_objective(MODELS[model], space, data, **kw), n_trials=a.trials)
    else:
        K: Any = a.K if a.K == "auto" else int(a.K)
        report = hpo.optimize(study, MODELS[model], space, data, n_trials=a.trials, K=K,
                              share_stages=system == "packed+sharing", **kw)
    seconds = time.perf_counter() - t0
    curve = []  # (seconds, best value so far) at each completed trial
    best = -1.0
    for t in sorted((t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE),
                    key=lambda t: t.datetime_complete):
        best = max(best, t.value)
        curve.append(((t.datetime_complete.timestamp() - start), best))
    return {"system": system, "model": model, "seconds": seconds, "best_trial": study.best_trial.number,
            "best_value": study.best_value, "states": [t.state.name for t in study.trials],
            "values": [[t.intermediate_values[k] for k in sorted(t.intermediate_values)] for t in study.trials],
            "curve": curve, "report": None if report is None else {
                "K": report.K, "trial_epochs": report.trial_epochs, "shared_epochs": report.shared_epochs,
                "slot_epochs": report.slot_epochs, "pruned": report.pruned, "complete": report.complete,
                "compute_saved": report.compute_saved}}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", nargs="+", default=["mlp", "cnn"], choices=list(MODELS))
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--K", default="16", help="trials per pack, or 'auto'")
    ap.add_argument("--space", choices=["sgd", "warmup"], default="sgd")
    ap.add_argument("--reps", type=int, default=2, help="interleaved rounds (the median wall-clock is reported)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--json", metavar="FILE")
    a = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import optuna
    from bench._common import machine_info, print_grid, print_machine
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    torch.set_num_threads(a.threads)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)])  # torch.optim's first use imports torch._dynamo: untimed
    info = machine_info()
    print_machine(info)
    data = digits()
    systems = ["torch", "packed"] + (["packed+sharing"] if a.space == "warmup" else [])
    results: List[Dict[str, Any]] = []
    for model in a.model:
        runs: Dict[str, List[Dict[str, Any]]] = {s: [] for s in systems}
        for r in range(a.reps):
            for system in systems:
                out = run_one(system, model, a, data)
                runs[system].append(out)
                print(f"{model} round {r + 1} {system}: {out['seconds']:.1f} s, best trial {out['best_trial']} "
                      f"({out['best_value']:.4f})", file=sys.stderr, flush=True)
        base = runs["torch"][0]
        for system in systems:
            first = runs[system][0]
            same = sum(p == q for p, q in zip(first["states"], base["states"]))
            dev = max((abs(x - y) for v, w in zip(first["values"], base["values"]) for x, y in zip(v, w)),
                      default=0.0)
            results.append({**first, "seconds_all": [x["seconds"] for x in runs[system]],
                            "seconds_median": statistics.median(x["seconds"] for x in runs[system]),
                            "same_states": same, "max_curve_deviation": dev})
    head = ["model", "system", "wall-clock s (median)", "speed-up", "best trial", "best accuracy",
            "same pruning decisions", "max deviation of a curve from torch's", "trial-epochs trained / shared"]
    rows = []
    for r in results:
        base = next(x for x in results if x["model"] == r["model"] and x["system"] == "torch")
        rep = r["report"] or {}
        rows.append([r["model"], r["system"] + (f" (K={rep['K']})" if rep else ""), f"{r['seconds_median']:.1f}",
                     f"{base['seconds_median'] / r['seconds_median']:.2f}x", str(r["best_trial"]),
                     f"{r['best_value']:.4f}", f"{r['same_states']} of {len(r['states'])}",
                     f"{r['max_curve_deviation']:.4f}",
                     f"{rep['trial_epochs']} / {rep['shared_epochs']}" if rep else
                     f"{sum(len(v) for v in r['values'])} / 0"])
    print(f"\n{a.trials} trials, {a.epochs} epochs, batch {a.batch}, SGD, Hyperband(min 1, max {a.epochs}), "
          f"RandomSampler(seed={a.seed}), space {a.space}, validation accuracy; {a.reps} interleaved rounds\n")
    print_grid(head, rows, a.markdown)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "args": vars(a), "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
