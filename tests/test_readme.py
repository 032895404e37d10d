"""The README's Hugging Face example runs as written, and what its comments claim holds."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.utils import assert_close

pytest.importorskip("transformers")
README = Path(__file__).resolve().parents[1] / "README.md"


def _block_after(heading: str) -> str:
    text = README.read_text()
    start = text.index(heading)
    m = re.search(r"```python\n(.*?)```", text[start:], re.S)
    assert m, f"no python block after {heading!r}"
    return m.group(1)


def test_readme_hf_example():
    ns: dict = {}
    torch.manual_seed(0)
    exec(compile(_block_after("### Hugging Face transformers fleets"), "README.md", "exec"), ns)  # noqa: S102
    models, ids, mask, out = ns["models"], ns["ids"], ns["mask"], ns["out"]
    assert type(out).__name__ == "SequenceClassifierOutput" and out.logits.shape == (4, 2, 2)
    with torch.no_grad():
        ref = torch.stack([m(input_ids=ids[i], attention_mask=mask[i]).logits for i, m in enumerate(models)])
    assert_close("README", out.logits.detach(), ref, atol=1e-5, rtol=1e-4)
    assert sum(len(v) for v in ns["fused"]._fusecc_compiled.values()) == 1  # "no new capture"


def test_readme_shared_weights_example():
    ns: dict = {}
    exec(compile(_block_after("### Shared weights"), "README.md", "exec"), ns)  # noqa: S102
    fused, models, y = ns["fused"], ns["models"], ns["y"]
    assert fused.shared_tensors and all(not k.startswith("fc.") for k in fused.shared_tensors)
    text = repr(fused)
    assert "120 of 122 tensors equal in every model, stored once (42.7 MiB); per model: fc.weight, fc.bias" in text
    assert "the fleet branches at 'fc'" in text
    assert fused.weight_bytes()["shared"] == 44744608 and fused.weight_bytes()["per_model"] == 164160
    assert y.shape == (8, 4, 10)
    assert fused.fusion_report.count("conv2d", "one conv over the N*B batch (weight shared by all models)") == 20


def test_readme_hpo_example():
    """The README's hyper-parameter search runs as written (on digits) and its best trial is a completed one."""
    optuna = pytest.importorskip("optuna")
    from sklearn.datasets import load_digits

    xs, ys = load_digits(return_X_y=True)
    x, y = torch.tensor(xs / 16.0, dtype=torch.float32), torch.tensor(ys)
    ns: dict = {"MLP": lambda: torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10)),
                "x_train": x[:1200], "y_train": y[:1200], "x_valid": x[1200:], "y_valid": y[1200:]}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    exec(compile(_block_after("### Hyper-parameter search on Optuna"), "README.md", "exec"), ns)  # noqa: S102
    study = ns["study"]
    assert len(study.trials) == 40 and study.best_trial.state == optuna.trial.TrialState.COMPLETE
    assert study.best_value > 0.9
