"""``fusecc export / inspect / bench --hf``: a fleet of Hugging Face checkpoints (save_pretrained directories), as a
user runs it (subprocesses), the artifact loaded back where fusecc cannot be imported, at two batch sizes and
sequence lengths, and compared with the N models loaded by transformers and run one by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_cli import close, error_line, run_cli, run_without_fusecc

T = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")

CFG = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
           max_position_embeddings=64, num_labels=3)


def save_fleet(tmp_path: Path, n: int = 3, **cfg) -> list:
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        m = T.BertForSequenceClassification(T.BertConfig(**{**CFG, **cfg}))
        m.config.id2label = {0: f"a{i}", 1: f"b{i}", 2: f"c{i}"}  # label names are the fine-tune's own: allowed
        m.config.label2id = {v: k for k, v in m.config.id2label.items()}
        d = tmp_path / f"bert{i}"
        m.save_pretrained(d)
        dirs.append(d)
    return dirs


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_export_hf_fleet_dynamic(fmt, tmp_path):
    dirs = save_fleet(tmp_path)
    out = tmp_path / f"fleet{'.pt' if fmt == 'torchscript' else '.pt2'}"
    extra = ["--triton-repo", str(tmp_path / "repo")] if fmt == "torchscript" else []
    proc = run_cli("export", "--hf", *map(str, dirs), "--example-input", "2,12", "--format", fmt, "-o", str(out),
                   *extra, cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "batch and sequence dynamic" in proc.stdout and "verified against the 3 models" in proc.stdout
    models = [T.BertForSequenceClassification.from_pretrained(d).eval() for d in dirs]
    for b, s in ((2, 12), (4, 7)):  # the example's size and another one: the artifact is not specialised
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, 100, (3, b, s), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 0, s // 2:] = 0
        got = run_without_fusecc(fmt, out, (ids, mask), tmp_path)
        assert isinstance(got, dict) and list(got) == ["logits"], type(got)
        with torch.no_grad():
            ref = torch.stack([m(input_ids=ids[i], attention_mask=mask[i]).logits for i, m in enumerate(models)])
        close(got["logits"], ref, f"{fmt} at {b}x{s}")
    if fmt == "torchscript":
        cfg = (tmp_path / "repo" / "fleet" / "config.pbtxt").read_text()
        assert "dims: [ 3, -1, -1 ]" in cfg and "dims: [ 3, -1, 3 ]" in cfg, cfg


def test_hf_configs_must_agree(tmp_path):
    dirs = save_fleet(tmp_path, n=2)
    torch.manual_seed(0)
    T.BertForSequenceClassification(T.BertConfig(**{**CFG, "num_hidden_layers": 3})).save_pretrained(tmp_path / "deep")
    proc = run_cli("export", "-q", "--hf", str(dirs[0]), str(tmp_path / "deep"), "--example-input", "2,8",
                   "-o", str(tmp_path / "x.pt"), cwd=tmp_path)
    msg = error_line(proc, 1)
    assert "'num_hidden_layers' is 3" in msg and str(tmp_path / "deep") in msg, msg
    assert not (tmp_path / "x.pt").exists()
    proc = run_cli("export", "-q", "--hf", str(tmp_path / "nowhere"), "--example-input", "2,8", cwd=tmp_path)
    assert "is not a directory" in error_line(proc, 1)
    proc = run_cli("export", "-q", "--hf", str(dirs[0]), "--arch", "m.py:f", "--example-input", "2,8", cwd=tmp_path)
    assert "not both" in error_line(proc, 2)


def test_inspect_and_bench_hf(tmp_path):
    dirs = save_fleet(tmp_path, n=2)
    proc = run_cli("inspect", "-q", "--hf", *map(str, dirs), "--example-input", "2,8", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "BertForSequenceClassification" in proc.stdout and "captured by torch._dynamo" in proc.stdout
    assert "fallbacks: none" in proc.stdout
    proc = run_cli("bench", "-q", "--hf", *map(str, dirs), "--example-input", "2,8", "--repeat", "2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {ln.split()[0]: ln for ln in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"loop", "fusecc", "vmap"}, proc.stdout
    assert "does not run" in rows["vmap"]  # torch.vmap cannot run transformers' mask code: said, not hidden


def test_export_hf_causal_lm(tmp_path):
    """A GPT-2 fleet: exported with use_cache off (the artifact returns the logits), dynamic, checked (TorchScript:
    the quicker export; .pt2 is covered for BERT above)."""
    dirs = []
    for i in range(2):
        torch.manual_seed(200 + i)
        m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                           bos_token_id=0, eos_token_id=0))
        m.save_pretrained(tmp_path / f"gpt{i}")
        dirs.append(tmp_path / f"gpt{i}")
    out = tmp_path / "lm.pt"
    proc = run_cli("export", "--hf", *map(str, dirs), "--example-input", "2,10", "--format", "torchscript", "-o", str(out),
                   cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "use_cache = False" in proc.stderr and "verified against the 2 models" in proc.stdout
    models = [T.GPT2LMHeadModel.from_pretrained(d).eval() for d in dirs]
    ids = torch.randint(0, 100, (2, 3, 7))
    mask = torch.ones_like(ids)
    got = run_without_fusecc("torchscript", out, (ids, mask), tmp_path)
    with torch.no_grad():
        ref = torch.stack([m(input_ids=ids[i], attention_mask=mask[i], use_cache=False).logits
                           for i, m in enumerate(models)])
    close(got["logits"], ref, "gpt2 artifact")
