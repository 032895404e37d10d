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
