"""fusecc.hpo on Ray Tune: pack workers placed by Ray Tune on a local Ray instance, meeting in one Optuna study."""

import pytest

optuna = pytest.importorskip("optuna")
ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")

import fusecc.hpo as hpo  # noqa: E402
from tests.test_hpo import DATA, mlp, sgd_space  # noqa: E402

pytestmark = pytest.mark.slow


def test_ray_tune_runs_pack_workers_on_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    optuna.create_study(study_name="ray", storage=storage, direction="minimize")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        reports = hpo.optimize_on_ray_tune(
            "ray", storage, mlp, sgd_space, DATA, workers=2, n_trials_per_worker=3, cpus_per_worker=1,
            sampler=optuna.samplers.RandomSampler(), pruner=optuna.pruners.SuccessiveHalvingPruner(min_resource=1),
            storage_path=str(tmp_path / "ray_results"), K=2, epochs=2, batch_size=64, metric="loss")
    finally:
        ray.shutdown()
    assert len(reports) == 2 and all(r["trials"] == 3 and r["K"] == 2 for r in reports)
    study = optuna.load_study(study_name="ray", storage=storage)
    assert sorted(t.number for t in study.trials) == list(range(6))
    assert all(t.state in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED) for t in study.trials)
    # each trial trained as it would alone (its number fixes its seed)
    obj = hpo.torch_objective(mlp, sgd_space, DATA, epochs=1, batch_size=64, metric="loss")
    for t in study.trials:
        assert abs(obj(optuna.trial.FixedTrial(t.params, number=t.number)) - t.intermediate_values[1]) < 1e-4


def test_ray_tune_needs_an_existing_study(tmp_path):
    with pytest.raises(KeyError):
        hpo.optimize_on_ray_tune("missing", f"sqlite:///{tmp_path / 'x.db'}", mlp, sgd_space, DATA)
