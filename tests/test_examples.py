"""The training example runs end to end and the fused and one-by-one accuracies agree."""

import importlib.util
import pathlib

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def test_train_digits_small(capsys):
    spec = importlib.util.spec_from_file_location("train_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--epochs", "2", "--num-models", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "acc fused" in out and "check: OK" in out and "speed-up" in out


def test_hpo_digits_small(capsys):
    """`make demo-hpo`'s search, small: packed and one at a time pick the same best trial, prune the same trials."""
    import pytest

    pytest.importorskip("optuna")
    path = EXAMPLE.parent / "hpo_digits.py"
    spec = importlib.util.spec_from_file_location("hpo_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--trials", "6", "--epochs", "3", "--K", "3", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "the same best trial: True" in out and "the same pruning decisions for 6 of 6 trials" in out
