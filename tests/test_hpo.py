"""Pack-aware hyper-parameter search (fusecc.hpo): trials trained K at a time in one fused model take the results
they take one at a time with torch (the oracle: ``torch_objective`` under ``study.optimize``): the same learning
curves, the same pruning decisions, the same best trial."""

import math
import multiprocessing as mp
import os
import sys
import warnings

import pytest
import torch
import torch.nn as nn

optuna = pytest.importorskip("optuna")
import fusecc.hpo as hpo  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def digits(n_train=320, n_valid=120):
    from sklearn.datasets import load_digits
    xs, ys = load_digits(return_X_y=True)
    x = torch.tensor(xs / 16.0, dtype=torch.float32)
    y = torch.tensor(ys)
    return x[:n_train], y[:n_train], x[n_train:n_train + n_valid], y[n_train:n_train + n_valid]


DATA = digits()


def mlp(hp):
    h = hp.get("hidden", 32)
    return nn.Sequential(nn.Linear(64, h), nn.ReLU(), nn.Linear(h, 10))


def sgd_space(t):
    return {"lr": t.suggest_float("lr", 1e-3, 0.1, log=True), "momentum": t.suggest_float("momentum", 0.0, 0.9),
            "weight_decay": t.suggest_float("weight_decay", 1e-6, 1e-2, log=True)}


def study(pruner, direction="minimize", storage=None, name="fusecc-test"):
    # one study name for both runs: HyperbandPruner puts a trial in a bracket by hashing the name and its number
    return optuna.create_study(study_name=name, direction=direction, storage=storage,
                               sampler=optuna.samplers.RandomSampler(seed=0), pruner=pruner)


def curves(s):
    return [(t.state, [t.intermediate_values[k] for k in sorted(t.intermediate_values)]) for t in s.trials]


def assert_same_search(packed, alone, tol=1e-4):
    a, b = curves(packed), curves(alone)
    assert len(a) == len(b)
    for i, ((sa, va), (sb, vb)) in enumerate(zip(a, b)):
        assert sa == sb, f"trial {i}: {sa.name} packed, {sb.name} alone"
        assert len(va) == len(vb), f"trial {i}: {len(va)} reports packed, {len(vb)} alone"
        for e, (p, q) in enumerate(zip(va, vb)):
            assert abs(p - q) <= tol * max(1.0, abs(q)), f"trial {i} epoch {e + 1}: {p} packed, {q} alone"
    assert packed.best_trial.number == alone.best_trial.number


@pytest.mark.parametrize("optimizer,space,pruner", [
    ("sgd", sgd_space, lambda: optuna.pruners.SuccessiveHalvingPruner(min_resource=1)),
    ("adamw", lambda t: {"lr": t.suggest_float("lr", 1e-4, 1e-2, log=True),
                         "beta1": t.suggest_float("beta1", 0.5, 0.95),
                         "weight_decay": t.suggest_float("weight_decay", 1e-4, 0.1, log=True)},
     lambda: optuna.pruners.HyperbandPruner(min_resource=1, max_resource=4)),
], ids=["sgd-successive-halving", "adamw-hyperband"])
def test_packed_search_takes_the_decisions_of_one_trial_at_a_time(optimizer, space, pruner):
    """K=3 slots for 9 trials (refills, then the pack shrinks): every trial's curve equals the same trial trained
    alone with torch.optim, the pruner prunes the same trials at the same epochs, the same trial wins."""
    kw = dict(optimizer=optimizer, epochs=4, batch_size=32, metric="loss")
    packed = study(pruner())
    rep = hpo.optimize(packed, mlp, space, DATA, n_trials=9, K=3, **kw)
    alone = study(pruner())
    alone.optimize(hpo.torch_objective(mlp, space, DATA, **kw), n_trials=9)
    assert_same_search(packed, alone)
    assert rep.trials == 9 and rep.complete + rep.pruned == 9 and rep.packs == 1 and rep.K == 3
    assert 0 < rep.pruned < 9, "the pruner must have pruned some trials for the test to mean anything"
    assert rep.trial_epochs == sum(len(t.intermediate_values) for t in packed.trials)
    assert not [t for t in packed.trials if t.state == optuna.trial.TrialState.RUNNING]


def test_stage_sharing_trains_a_shared_prefix_once():
    """Hippo's stage sharing: trials with the same warm-up (2 epochs at lr 0.01, then their own lr) and the same seed
    start from the state of an earlier trial at the end of the warm-up. Same curves and decisions as one at a time
    without sharing; the shared epochs are not computed."""
    def space(t):
        lr = t.suggest_categorical("lr", [0.003, 0.01, 0.03, 0.1])
        warm = t.suggest_categorical("warmup", [0, 2])
        return {"lr": [0.01] * warm + [lr], "momentum": 0.9}

    kw = dict(optimizer="sgd", epochs=4, batch_size=32, metric="loss", seed_by_trial=False)
    packed = study(optuna.pruners.NopPruner())
    rep = hpo.optimize(packed, mlp, space, DATA, n_trials=10, K=2, **kw)
    alone = study(optuna.pruners.NopPruner())
    alone.optimize(hpo.torch_objective(mlp, space, DATA, **kw), n_trials=10)
    assert_same_search(packed, alone)
    warm = [t for t in packed.trials if t.params["warmup"] == 2]
    assert len(warm) >= 3
    assert rep.shared_epochs >= 2 * (len(warm) - 2), rep  # all but the first (or two, racing in one pack) fork
    assert rep.trial_epochs + rep.shared_epochs == 10 * 4
    assert rep.compute_saved > 0
    # without sharing: every epoch computed, the same answers
    plain = study(optuna.pruners.NopPruner())
    rep2 = hpo.optimize(plain, mlp, space, DATA, n_trials=10, K=2, share_stages=False, **kw)
    assert rep2.shared_epochs == 0 and rep2.trial_epochs == 40
    assert_same_search(plain, alone)


@pytest.mark.parametrize("key,values,batch", [("hidden", [16, 32], 64), ("batch_size", [32, 80], 32)])
def test_architecture_and_batch_size_hyper_parameters_go_to_separate_packs(key, values, batch):
    """A hyper-parameter the optimizer does not take goes to model(hp) (a batch_size one sets the trial's batch
    size): trials that differ in it train in different packs (a warning says so); each trains exactly as alone."""
    def space(t):
        return {key: t.suggest_categorical(key, values), "lr": t.suggest_float("lr", 0.01, 0.1)}

    kw = dict(optimizer="sgd", epochs=2, batch_size=batch, metric="loss")
    packed = study(optuna.pruners.NopPruner())
    with pytest.warns(UserWarning, match=f"waits for another pack: its hyper-parameters \\['{key}'\\]"):
        rep = hpo.optimize(packed, mlp, space, DATA, n_trials=6, K=3, **kw)
    alone = study(optuna.pruners.NopPruner())
    alone.optimize(hpo.torch_objective(mlp, space, DATA, **kw), n_trials=6)
    assert_same_search(packed, alone)
    assert rep.packs == 2


def test_auto_pack_size():
    """K="auto": the memory bound caps K, the measured trial-steps/s picks it (the best measured K)."""
    x = DATA[0]
    k, table = hpo.choose_pack_size(lambda: mlp({}), x, 32, "sgd", candidates=(1, 2, 4, 8), steps=2)
    assert k in table and table[k] == max(table.values())
    assert list(table) == sorted(table) and list(table)[0] == 1
    k1, table1 = hpo.choose_pack_size(lambda: mlp({}), x, 32, "sgd", candidates=(1, 2, 4), max_memory_bytes=1)
    assert (k1, table1) == (1, {})  # nothing fits: one trial at a time
    s = study(optuna.pruners.NopPruner())
    rep = hpo.optimize(s, mlp, sgd_space, DATA, n_trials=3, K="auto", epochs=1, batch_size=64, metric="loss")
    assert rep.K in rep.pack_sizes and rep.trials == 3


def test_bad_input_says_what_to_do():
    s = study(optuna.pruners.NopPruner(), direction="minimize")
    with pytest.raises(ValueError, match="metric 'accuracy' needs a study with direction=maximize"):
        hpo.optimize(s, mlp, sgd_space, DATA, n_trials=1, metric="accuracy")
    with pytest.raises(ValueError, match="K must be a positive int or 'auto'"):
        hpo.optimize(s, mlp, sgd_space, DATA, n_trials=1, K=0, metric="loss")
    with pytest.raises(ValueError, match="optimizer must be one of sgd, adam, adamw, rmsprop"):
        hpo.optimize(s, mlp, sgd_space, DATA, n_trials=1, optimizer="lion", metric="loss")
    with pytest.raises(ValueError, match="batch_size must be in 1..320"):
        hpo.optimize(s, mlp, sgd_space, DATA, n_trials=1, batch_size=1000, metric="loss")
    with pytest.raises(ValueError, match="batch_size must be an int in 1..320"):
        hpo.optimize(s, mlp, lambda t: {"batch_size": 0}, DATA, n_trials=1, metric="loss")
    with pytest.raises(TypeError, match="space\\(trial\\) must return a dict"):
        hpo.optimize(s, mlp, lambda t: [t.suggest_float("x", 0.1, 0.2)], DATA, n_trials=1, metric="loss")
    with pytest.warns(UserWarning, match="give min_resource=1"):
        hpo.optimize(study(optuna.pruners.SuccessiveHalvingPruner(), name="w"), mlp, sgd_space, DATA, n_trials=1,
                     epochs=1, metric="loss")
    # nothing left RUNNING: a trial that raised is told FAIL
    assert all(t.state != optuna.trial.TrialState.RUNNING for t in s.trials)


def test_a_failing_model_fails_its_trials_and_raises():
    def bad(hp):
        raise RuntimeError("no such model")

    s = study(optuna.pruners.NopPruner())
    with pytest.raises(RuntimeError, match="no such model"):
        hpo.optimize(s, bad, sgd_space, DATA, n_trials=4, K=2, metric="loss")
    assert all(t.state == optuna.trial.TrialState.FAIL for t in s.trials)


def test_a_diverging_trial_fails_alone():
    """A trial whose loss turns NaN is told FAIL; the others in its pack finish as alone."""
    def space(t):
        return {"lr": t.suggest_categorical("lr", [0.01, 1e30])}

    kw = dict(optimizer="sgd", epochs=2, batch_size=64, metric="loss")
    packed = study(optuna.pruners.NopPruner())
    hpo.optimize(packed, mlp, space, DATA, n_trials=4, K=4, **kw)
    states = {t.params["lr"]: set() for t in packed.trials}
    for t in packed.trials:
        states[t.params["lr"]].add(t.state)
    assert states[0.01] == {optuna.trial.TrialState.COMPLETE}
    assert states[1e30] == {optuna.trial.TrialState.FAIL}
    for t in packed.trials:
        if t.state == optuna.trial.TrialState.COMPLETE:
            assert math.isfinite(t.value)


def _worker(storage, n):  # (a process of its own: module-level for spawn)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import optuna as o
    o.logging.set_verbosity(o.logging.WARNING)
    s = o.load_study(study_name="fusecc-test", storage=storage, sampler=o.samplers.RandomSampler(),
                     pruner=o.pruners.SuccessiveHalvingPruner(min_resource=1))
    hpo.optimize(s, mlp, sgd_space, DATA, n_trials=n, K=2, epochs=2, batch_size=64, metric="loss")


def test_two_workers_share_one_study_through_its_storage(tmp_path):
    """Several processes run packs of one study through Optuna's storage (SQLite here): every trial is told once,
    and each is the trial alone would be (same number, same seed, same curve)."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study(optuna.pruners.SuccessiveHalvingPruner(min_resource=1), storage=storage)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(storage, 3)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
        assert p.exitcode == 0
    s = optuna.load_study(study_name="fusecc-test", storage=storage)
    assert len(s.trials) == 6
    assert sorted(t.number for t in s.trials) == list(range(6))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in s.trials)
    # each trial's first epoch equals that trial trained alone (its number and params fix its run)
    obj = hpo.torch_objective(mlp, sgd_space, DATA, epochs=1, batch_size=64, metric="loss")
    for t in s.trials:
        fixed = optuna.trial.FixedTrial(t.params, number=t.number)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert abs(obj(fixed) - t.intermediate_values[1]) < 1e-4
