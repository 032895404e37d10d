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
