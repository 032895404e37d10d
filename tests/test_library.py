"""The library under the ``fusecc`` command, called directly (the command's own tests are tests/test_cli.py): loading
a fleet from code and checkpoints, the oracle and verification, the Triton repository entry, the comparison."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fusecc
from fusecc.benchmark import compare
from fusecc.checkpoints import CheckpointError, load_checkpoint, load_factory, load_fleet, load_into
from fusecc.model_repository import triton_config, write_triton_repo
from fusecc.verify import VerificationError, check_outputs, relative_error, run_each, verify
from tests import cli_models

MODELS = cli_models.__file__


def _save(obj, path):
    torch.save(obj, path)
    return str(path)


def test_load_checkpoint_kinds(tmp_path):
    sd = cli_models.small_mlp().state_dict()
    plain = load_checkpoint(_save(sd, tmp_path / "a.pt"))
    nested = load_checkpoint(_save({"state_dict": sd, "epoch": 3}, tmp_path / "b.pt"))
    ddp = load_checkpoint(_save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "c.pt"))
    from safetensors.torch import save_file

    save_file(sd, str(tmp_path / "d.safetensors"))
    st = load_checkpoint(str(tmp_path / "d.safetensors"))
    for got in (plain, nested, ddp, st):
        assert set(got) == set(sd) and all(torch.equal(got[k], sd[k]) for k in sd)


def test_load_checkpoint_refuses_what_is_not_a_state_dict(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match=r"holds more than tensors.*save model.state_dict\(\) instead"):
        load_checkpoint(_save(cli_models.small_mlp(), tmp_path / "module.pt"))
    with pytest.raises(CheckpointError, match="is not a state dict"):
        load_checkpoint(_save({"epoch": 3}, tmp_path / "meta.pt"))
    assert issubclass(CheckpointError, ValueError)


def test_load_factory_and_fleet(tmp_path):
    assert load_factory(f"{MODELS}:small_mlp") is not None
    with pytest.raises(CheckpointError, match="architecture no_such_mod:x: cannot import 'no_such_mod'"):
        load_factory("no_such_mod:x")
    with pytest.raises(CheckpointError, match="--arch m:f: cannot import"):
        load_factory("m:f", label="--arch m:f")
    paths = []
    for i in range(3):
        torch.manual_seed(i)
        paths.append(_save(cli_models.small_mlp().state_dict(), tmp_path / f"m{i}.pt"))
    seen = []
    models = load_fleet(f"{MODELS}:small_mlp", weights=paths, on_each=lambda items: seen.extend(items) or items)
    assert len(models) == 3 and seen == paths
    for p, m in zip(paths, models):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in torch.load(p).items())
    assert len(load_fleet(f"{MODELS}:small_mlp", num_models=2)) == 2


def test_load_into_names_the_mismatch(tmp_path):
    other = cli_models.small_cnn().state_dict()
    with pytest.raises(CheckpointError, match=r"weights file 'x.pt' does not fit the model: missing keys"):
        load_into(cli_models.small_mlp(), other, "x.pt")


def test_run_each_relative_error_and_verify():
    models = [nn.Linear(4, 3) for _ in range(3)]
    x = torch.randn(3, 2, 4)
    ref = run_each(models, (x,))
    assert ref.shape == (3, 2, 3) and torch.equal(ref[1], models[1](x[1]).detach())
    shared = run_each(models, (x[0],), shared=True)
    assert torch.equal(shared[2], models[2](x[0]).detach())
    fused = fusecc.fuse(models)
    assert verify(fused, models, (x,)) < 1e-6
    assert relative_error(ref, ref) == 0.0
    assert relative_error((ref, ref), ref) == float("inf")  # a leaf too many
    assert relative_error(ref[:, :1], ref) == float("inf")
    with pytest.raises(VerificationError, match=r"differs from the 3 models run one by one: max error"):
        check_outputs(ref + 0.1 * ref.abs().max(), models, (x,))
    assert issubclass(VerificationError, ValueError)


def test_triton_repository_entry(tmp_path):
    art = tmp_path / "fleet.pt"
    art.write_bytes(b"artifact")
    x, y = torch.randn(3, 2, 4), (torch.randn(3, 2, 5), torch.ones(3, dtype=torch.int64))
    entry = write_triton_repo(str(tmp_path / "repo"), "fleet", str(art), [x], y)
    assert (tmp_path / "repo" / "fleet" / "1" / "model.pt").read_bytes() == b"artifact"
    cfg = (tmp_path / "repo" / "fleet" / "config.pbtxt").read_text()
    assert entry.endswith("fleet") and cfg == triton_config("fleet", [x], list(y))
    assert 'name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3, 2, 4 ]' in cfg
    assert 'name: "OUTPUT__1" data_type: TYPE_INT64 dims: [ 3 ]' in cfg and "max_batch_size: 0" in cfg


def test_compare_checks_and_times_every_provider():
    models = [nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)) for _ in range(3)]
    x = torch.randn(3, 2, 4)
    rows = compare(models, fusecc.fuse(models), (x,), repeat=2, warmup=1)
    assert [r.provider for r in rows] == ["loop", "vmap", "fusecc"]
    assert all(r.median_ms > 0 and r.rel_error < 1e-5 for r in rows)
