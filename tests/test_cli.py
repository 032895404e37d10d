"""The ``fusecc`` command end to end: every run is a subprocess (``python -m fusecc ...``), exactly as a user runs it.

Artifacts are loaded back in a separate Python process where fusecc cannot be imported, and compared with the same
N models built here from the same checkpoint files and run one by one. Bad input must end with exit status 1 (or 2
for a usage error) and one line on stderr naming the culprit, never a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, List, Sequence

import pytest
import torch
import torch.nn as nn

import fusecc
from tests import cli_models
from tests.utils import assert_close

MODELS = str(Path(cli_models.__file__).resolve())  # --arch path/to/cli_models.py:NAME
CNN, MLP, UNTRACEABLE = f"{MODELS}:small_cnn", f"{MODELS}:small_mlp", f"{MODELS}:untraceable"
CNN_SHAPE, MLP_SHAPE = (2, 3, 8, 8), (2, 6)  # per-model example inputs
# torch marks torch.jit deprecated; loading TorchScript is what these tests are for
pytestmark = pytest.mark.filterwarnings(r"ignore:`torch\.jit\.load` is deprecated:FutureWarning")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0  # root ignores permission bits


def shape_arg(shape: Sequence[int]) -> str:
    return ",".join(map(str, shape))


def run_cli(*args: str, cwd: Path, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``python -m fusecc ARGS`` in ``cwd`` (environment inherited, e.g. TRITON_INTERPRET from conftest)."""
    return subprocess.run([sys.executable, "-m", "fusecc", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, **kw)


def lines(text: str) -> List[str]:
    """Non-blank lines, splitting on carriage returns too (tqdm redraws its bar with \\r)."""
    return [ln for ln in re.split(r"[\r\n]+", text) if ln.strip()]


def error_line(proc: subprocess.CompletedProcess, status: int) -> str:
    """Assert the exit status and a traceback-free stderr; return its last line (the message)."""
    assert proc.returncode == status, (
        f"exit status {proc.returncode}, expected {status}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.stdout == "", proc.stdout
    assert lines(proc.stderr), "nothing on stderr"
    return lines(proc.stderr)[-1]


def cli_error(proc: subprocess.CompletedProcess) -> str:
    """Exit status 1 under --quiet: stderr is exactly one line, ``fusecc: error: ...``."""
    last = error_line(proc, 1)
    assert len(lines(proc.stderr)) == 1, f"more than one line on stderr:\n{proc.stderr}"
    assert last.startswith("fusecc: error: "), last
    return last


def no_temporaries(directory: Path) -> None:
    left = [p.name for p in directory.iterdir() if re.match(r"^\..*\.tmp", p.name)]
    assert not left, f"temporary files left behind: {left}"


# ----------------------------------------------------------------------------------------------------------------
# models and checkpoints, built here exactly as the CLI builds them from the same files


def trained_like(factory, seed: int) -> nn.Module:
    """A model with distinct weights and non-trivial BatchNorm statistics (so wrong buffers would show)."""
    torch.manual_seed(seed)
    model = factory()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
            m.num_batches_tracked.fill_(7)
    return model.eval()


def from_checkpoint(factory, path: Path) -> nn.Module:
    """The reference: the model the checkpoint file describes, loaded without fusecc's CLI."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        sd = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and not isinstance(sd["state_dict"], torch.Tensor):
        sd = sd["state_dict"]
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    model = factory()
    model.load_state_dict(sd)
    return model.eval()


def save_plain(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def one_by_one(models: Sequence[nn.Module], x: torch.Tensor, shared: bool = False) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([m(x if shared else x[i]) for i, m in enumerate(models)])


def close(got: torch.Tensor, want: torch.Tensor, name: str = "artifact") -> None:
    assert_close(name, got, want, rtol=1e-4, atol=1e-5)  # fp32, N-way fused reductions


# ----------------------------------------------------------------------------------------------------------------
# loading an artifact in a process where fusecc cannot be imported

LOADER = r'''
import importlib.abc
import sys


class NoFusecc(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "fusecc" or name.startswith("fusecc."):
            raise ImportError(f"{name} is blocked: a fusecc artifact must load without fusecc")
        return None


sys.meta_path.insert(0, NoFusecc())
try:
    import fusecc  # noqa: F401
except ImportError:
    pass
else:
    raise SystemExit("the fusecc blocker does not work")

import torch

fmt, artifact, inp, out = sys.argv[1:]
x = torch.load(inp)
if fmt == "torchscript":
    fn = torch.jit.load(artifact)
elif fmt == "pt2":
    fn = torch.export.load(artifact).module()
elif fmt == "aoti":
    fn = torch._inductor.aoti_load_package(artifact)
else:
    raise SystemExit(f"unknown format {fmt}")
with torch.no_grad():
    y = fn(*x) if isinstance(x, tuple) else fn(x)  # (a tuple: the positional tensors of a keyword model)
leaked = sorted(m for m in sys.modules if m == "fusecc" or m.startswith("fusecc."))
assert not leaked, f"fusecc was imported: {leaked}"
torch.save(y, out)
print("loaded and ran without fusecc")
'''


def run_without_fusecc(fmt: str, artifact: Path, x: Any, tmp_path: Path) -> Any:
    script, inp, out = tmp_path / "load_artifact.py", tmp_path / "input.pt", tmp_path / "output.pt"
    script.write_text(LOADER)
    torch.save(x, inp)
    proc = subprocess.run([sys.executable, str(script), fmt, str(artifact), str(inp), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"loading the {fmt} artifact failed:\n{proc.stdout}\n{proc.stderr}"
    assert "loaded and ran without fusecc" in proc.stdout
    return torch.load(out)


# ----------------------------------------------------------------------------------------------------------------
# export, each format, end to end


@pytest.mark.parametrize("fmt", ["torchscript", "pt2", pytest.param("aoti", marks=pytest.mark.slow)])
def test_export_each_format_loads_without_fusecc(fmt, tmp_path):
    ckpts = [save_plain(trained_like(cli_models.small_cnn, seed), tmp_path / f"m{seed}.pt") for seed in (1, 2)]
    out = tmp_path / f"fleet{'.pt' if fmt == 'torchscript' else '.pt2'}"
    proc = run_cli("export", "--arch", CNN, "--weights", *map(str, ckpts), "--example-input", shape_arg(CNN_SHAPE),
                   "--format", fmt, "-o", str(out), cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.startswith(f"wrote {out} ({fmt}, "), proc.stdout
    assert "verified against the 2 models" in proc.stdout
    assert "fusecc: capturing and fusing 2 models" in proc.stderr  # progress without --quiet
    assert out.is_file()
    no_temporaries(tmp_path)

    torch.manual_seed(1234)
    x = torch.randn(2, *CNN_SHAPE)  # the artifact is specialised to the example shape: exactly that shape
    got = run_without_fusecc(fmt, out, x, tmp_path)
    models = [from_checkpoint(cli_models.small_cnn, p) for p in ckpts]
    assert got.shape == (2, 2, 10)
    close(got, one_by_one(models, x), f"{fmt} artifact")


def test_checkpoint_kinds(tmp_path):
    """Plain state dict, {'state_dict': ..., 'epoch': 3}, DataParallel's 'module.' prefix, .safetensors, .pth."""
    from safetensors.torch import save_file

    models = [trained_like(cli_models.small_cnn, seed) for seed in range(5)]
    paths = [tmp_path / "plain.pt", tmp_path / "wrapped.pt", tmp_path / "dataparallel.pt",
             tmp_path / "weights.safetensors", tmp_path / "plain.pth"]
    torch.save(models[0].state_dict(), paths[0])
    torch.save({"state_dict": models[1].state_dict(), "epoch": 3}, paths[1])
    torch.save(nn.DataParallel(models[2]).state_dict(), paths[2])
    assert all(k.startswith("module.") for k in torch.load(paths[2]))
    save_file({k: v.contiguous() for k, v in models[3].state_dict().items()}, str(paths[3]))
    torch.save(models[4].state_dict(), paths[4])

    out = tmp_path / "fleet.pt"
    proc = run_cli("export", "-q", "--arch", CNN, "--weights", *map(str, paths), "--example-input",
                   shape_arg(CNN_SHAPE), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "5 models" in proc.stdout

    x = torch.randn(5, *CNN_SHAPE)
    with torch.no_grad():
        got = torch.jit.load(str(out))(x)
    want = one_by_one(models, x)
    for i, p in enumerate(paths):  # model i came from file i: a wrong slice names the checkpoint kind
        close(got[i], want[i], f"model {i} from {p.name}")


def test_num_models_module_form_arch(tmp_path):
    """--num-models N, no weights; --arch as module:callable importing from the current directory."""
    shutil.copy(MODELS, tmp_path / "cli_models.py")
    out = tmp_path / "fleet.pt"
    proc = run_cli("export", "-q", "--arch", "cli_models:small_mlp", "--arch-kwargs", '{"hidden": 5}',
                   "--num-models", "3", "--example-input", shape_arg(MLP_SHAPE), "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "3 models, input 3x2x6" in proc.stdout
    artifact = torch.jit.load(str(out))
    assert sum(p.numel() for p in artifact.parameters()) == 3 * sum(
        p.numel() for p in cli_models.small_mlp(hidden=5).parameters())
    x = torch.randn(*MLP_SHAPE).expand(3, *MLP_SHAPE).contiguous()  # the same input for every model
    with torch.no_grad():
        y = artifact(x)
    assert y.shape == (3, 2, 4) and torch.isfinite(y).all()
    assert not torch.allclose(y[0], y[1]) and not torch.allclose(y[1], y[2]), "the N models are not distinct"


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_shared_input(fmt, tmp_path):
    models = [trained_like(cli_models.small_mlp, seed) for seed in (1, 2, 3)]
    ckpts = [save_plain(m, tmp_path / f"m{i}.pt") for i, m in enumerate(models)]
    out = tmp_path / ("shared.pt" if fmt == "torchscript" else "shared.pt2")
    proc = run_cli("export", "-q", "--arch", MLP, "--weights", *map(str, ckpts), "--example-input",
                   shape_arg(MLP_SHAPE), "--shared-input", "--format", fmt, "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "input 2x6)" in proc.stdout  # no leading N
    x = torch.randn(*MLP_SHAPE)
    with torch.no_grad():
        got = torch.jit.load(str(out))(x) if fmt == "torchscript" else torch.export.load(str(out)).module()(x)
    assert got.shape == (3, 2, 4)
    close(got, one_by_one(models, x, shared=True), "shared-input artifact")


# ----------------------------------------------------------------------------------------------------------------
# --quiet


@pytest.mark.parametrize("fmt", ["torchscript", "pt2"])
def test_quiet(fmt, tmp_path):
    out = tmp_path / ("q.pt" if fmt == "torchscript" else "q.pt2")
    proc = run_cli("export", "--quiet", "--arch", CNN, "--num-models", "2", "--example-input", shape_arg(CNN_SHAPE),
                   "--format", fmt, "-o", str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert len(lines(proc.stdout)) == 1 and proc.stdout.startswith(f"wrote {out} ({fmt}, "), proc.stdout
    assert out.is_file()


# ----------------------------------------------------------------------------------------------------------------
# usage errors: exit 2, argparse's usage and one error line


@pytest.mark.parametrize("args, culprit", [
    (["--num-models", "2", "--example-input", "2,6"], "the following arguments are required: --arch"),
    (["--arch", "small_mlp", "--num-models", "2", "--example-input", "2,6"],
     "argument --arch: expected module:callable"),
    (["--arch", MLP, "--weights", "a.pt", "--num-models", "2", "--example-input", "2,6"],
     "not allowed with argument"),
    (["--arch", MLP, "--num-models", "2", "--example-input", "a,b"], "argument --example-input"),
    (["--arch", MLP, "--num-models", "2", "--example-input", "2,6", "--arch-kwargs", "{bad"],
     "argument --arch-kwargs: not valid JSON"),
    (["--arch", MLP, "--num-models", "2", "--example-input", "2,6", "--format", "pt2", "--triton-repo", "tr"],
     "--triton-repo needs --format torchscript"),
], ids=["no-arch", "arch-without-colon", "weights-and-num-models", "bad-example-input", "bad-arch-kwargs",
        "triton-repo-with-pt2"])
def test_usage_errors(args, culprit, tmp_path):
    proc = run_cli("export", *args, cwd=tmp_path)
    last = error_line(proc, 2)
    assert re.match(r"^fusecc( export)?: error: ", last), last
    assert culprit in last, last
    assert "usage: fusecc" in proc.stderr
    if "a,b" in args:
        assert "'a,b'" in last
    assert not list(tmp_path.iterdir()), "a usage error wrote something"


# ----------------------------------------------------------------------------------------------------------------
# bad input: exit 1, one line naming the culprit


@pytest.fixture
def cnn_ckpt(tmp_path) -> Path:
    return save_plain(trained_like(cli_models.small_cnn, 0), tmp_path / "good.pt")


def export_cnn(tmp_path: Path, *weights: str, out: str = "out.pt", arch: str = CNN) -> subprocess.CompletedProcess:
    return run_cli("export", "-q", "--arch", arch, "--weights", *weights, "--example-input", shape_arg(CNN_SHAPE),
                   "-o", out, cwd=tmp_path)


def test_missing_weights_file(tmp_path, cnn_ckpt):
    msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "nope.pt"))
    assert "weights file 'nope.pt' does not exist" in msg
    assert not (tmp_path / "out.pt").exists()


def test_weights_path_is_a_directory(tmp_path, cnn_ckpt):
    (tmp_path / "adir.pt").mkdir()
    msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "adir.pt"))
    assert "weights file 'adir.pt' is not a readable file" in msg


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file anyway (the directory case covers the message)")
def test_unreadable_weights_file(tmp_path, cnn_ckpt):
    locked = save_plain(trained_like(cli_models.small_cnn, 1), tmp_path / "locked.pt")
    locked.chmod(0)
    try:
        msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "locked.pt"))
    finally:
        locked.chmod(stat.S_IRUSR | stat.S_IWUSR)
    assert "weights file 'locked.pt' is not a readable file" in msg


def test_full_module_pickle_refused(tmp_path, cnn_ckpt):
    torch.save(cli_models.small_cnn(), tmp_path / "whole_model.pt")
    msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "whole_model.pt"))
    assert "weights file 'whole_model.pt'" in msg
    assert "weights_only=True" in msg and "state_dict()" in msg


def test_full_module_pickle_message_is_plain_text(tmp_path, cnn_ckpt):
    torch.save(cli_models.small_cnn(), tmp_path / "whole_model.pt")
    msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "whole_model.pt"))
    assert "\x1b" not in msg
    assert "Sequential" in msg


def test_checkpoint_of_another_architecture(tmp_path, cnn_ckpt):
    save_plain(cli_models.small_mlp(), tmp_path / "mlp.pt")
    msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "mlp.pt"))
    assert f"weights file 'mlp.pt' does not fit --arch {CNN}" in msg
    assert "missing keys [1.weight, 1.bias" in msg and "unexpected keys [2.weight, 2.bias] (2)" in msg
    assert "first shape mismatch: 0.weight is [12, 6] in the checkpoint, [8, 3, 3, 3] in the model" in msg


def test_checkpoint_with_other_shapes(tmp_path, cnn_ckpt):
    save_plain(cli_models.small_cnn(num_classes=5), tmp_path / "five_classes.pt")
    msg = cli_error(export_cnn(tmp_path, str(cnn_ckpt), "five_classes.pt"))
    assert "weights file 'five_classes.pt' does not fit" in msg
    assert "missing" not in msg and "unexpected" not in msg
    assert "first shape mismatch: 6.weight is [5, 16] in the checkpoint, [10, 16] in the model" in msg


def test_arch_module_missing(tmp_path):
    msg = cli_error(run_cli("export", "-q", "--arch", "no_such_module_xyz:build", "--num-models", "2",
                            "--example-input", "2,6", cwd=tmp_path))
    assert "--arch no_such_module_xyz:build: cannot import 'no_such_module_xyz'" in msg
    assert "ModuleNotFoundError" in msg


def test_arch_file_missing(tmp_path):
    msg = cli_error(run_cli("export", "-q", "--arch", "no_such_file.py:build", "--num-models", "2",
                            "--example-input", "2,6", cwd=tmp_path))
    assert "no such file 'no_such_file.py'" in msg


@pytest.mark.parametrize("attr, says", [("no_such_factory", "has no attribute 'no_such_factory'"),
                                        ("NOT_CALLABLE", "'NOT_CALLABLE' is a int, not a callable")])
def test_arch_attribute_bad(attr, says, tmp_path):
    msg = cli_error(run_cli("export", "-q", "--arch", f"{MODELS}:{attr}", "--num-models", "2",
                            "--example-input", "2,6", cwd=tmp_path))
    assert f"--arch {MODELS}:{attr}" in msg and says in msg


def test_untraceable_model(tmp_path):
    msg = cli_error(run_cli("export", "-q", "--arch", UNTRACEABLE, "--num-models", "2", "--example-input", "2,6",
                            "-o", "out.pt", cwd=tmp_path))
    assert f"cannot fuse --arch {UNTRACEABLE}" in msg
    assert "Untraceable" in msg and "if x.sum() > 0" in msg
    assert not (tmp_path / "out.pt").exists()


def test_error_line_without_quiet(tmp_path):
    """Without --quiet the progress comes first, but the error is still the last line and no traceback."""
    proc = run_cli("export", "--arch", UNTRACEABLE, "--num-models", "2", "--example-input", "2,6", cwd=tmp_path)
    last = error_line(proc, 1)
    assert last.startswith("fusecc: error: cannot fuse --arch"), last


def test_output_directory_missing(tmp_path):
    out = tmp_path / "no_such_dir" / "fleet.pt"
    msg = cli_error(run_cli("export", "-q", "--arch", MLP, "--num-models", "2", "--example-input", "2,6",
                            "-o", str(out), cwd=tmp_path))
    assert f"-o/--output '{out}': directory '{out.parent}' does not exist" in msg


def test_output_is_a_directory(tmp_path):
    msg = cli_error(run_cli("export", "-q", "--arch", MLP, "--num-models", "2", "--example-input", "2,6",
                            "-o", str(tmp_path), cwd=tmp_path))
    assert f"'{tmp_path}' is a directory" in msg


def test_output_directory_read_only(tmp_path):
    ro = tmp_path / "readonly"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("this user (root?) can write into a chmod 555 directory")
        msg = cli_error(run_cli("export", "-q", "--arch", MLP, "--num-models", "2", "--example-input", "2,6",
                                "-o", str(ro / "fleet.pt"), cwd=tmp_path))
        assert f"directory '{ro}' is not writable" in msg
        assert not list(ro.iterdir())
    finally:
        ro.chmod(0o755)


# ----------------------------------------------------------------------------------------------------------------
# atomic writes: a failed export leaves the previous file as it was, and no temporaries


def _old(tmp_path: Path) -> Path:
    out = tmp_path / "fleet.pt"
    out.write_text("OLD")
    return out


def test_failed_fuse_keeps_previous_file(tmp_path):
    out = _old(tmp_path)
    cli_error(run_cli("export", "-q", "--arch", UNTRACEABLE, "--num-models", "2", "--example-input", "2,6",
                      "-o", str(out), cwd=tmp_path))
    assert out.read_text() == "OLD"
    no_temporaries(tmp_path)


def test_bad_checkpoint_keeps_previous_file(tmp_path, cnn_ckpt):
    out = _old(tmp_path)
    save_plain(cli_models.small_mlp(), tmp_path / "mlp.pt")
    cli_error(export_cnn(tmp_path, str(cnn_ckpt), "mlp.pt", out=str(out)))
    assert out.read_text() == "OLD"
    no_temporaries(tmp_path)


def _export_fc_model(tmp_path, name: str, forward_body: str) -> str:
    """Export (over an old fleet.pt) a Linear(6, 4) model whose forward is ``forward_body``; its error line."""
    (tmp_path / f"{name}.py").write_text(
        "import torch, torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(6, 4)\n"
        "    def forward(self, x):\n"
        f"        {forward_body}\n"
        "def build():\n"
        "    return M()\n")
    out = _old(tmp_path)
    return cli_error(run_cli("export", "-q", "--arch", f"{name}.py:build", "--num-models", "2", "--example-input",
                             "2,6", "-o", str(out), cwd=tmp_path))


def test_failed_serialisation_keeps_previous_file(tmp_path):
    """The model fuses, but torch.jit.trace refuses its output (a tuple holding an int) inside the write."""
    msg = _export_fc_model(tmp_path, "int_out", "return self.fc(x), 3")
    assert "export as torchscript failed" in msg
    out = tmp_path / "fleet.pt"
    assert out.read_text() == "OLD"
    no_temporaries(tmp_path)


def test_failed_verification_keeps_previous_file(tmp_path):
    # a different output every run: verification must fail
    msg = _export_fc_model(tmp_path, "noisy", "y = self.fc(x)\n        return y + torch.rand_like(y)")
    out = tmp_path / "fleet.pt"
    assert "verification failed" in msg
    no_temporaries(tmp_path)
    assert out.exists() and out.read_text() == "OLD"


def test_artifact_permissions_follow_umask(tmp_path):
    repo = tmp_path / "repo"
    proc = run_cli("export", "-q", "--arch", MLP, "--num-models", "2", "--example-input", "2,6", "-o", "fleet.pt",
                   "--triton-repo", str(repo), cwd=tmp_path, preexec_fn=lambda: os.umask(0o022))
    assert proc.returncode == 0, proc.stderr
    for f in (tmp_path / "fleet.pt", repo / "fleet" / "1" / "model.pt", repo / "fleet" / "config.pbtxt"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f"{f}: mode {oct(stat.S_IMODE(f.stat().st_mode))}"


# ----------------------------------------------------------------------------------------------------------------
# inspect and bench


def test_inspect(tmp_path):
    n = 3
    proc = run_cli("inspect", "--arch", CNN, "--num-models", str(n), "--example-input", shape_arg(CNN_SHAPE),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"{CNN} x {n} models, one input per model {n}x2x3x8x8, float32 on cpu" in out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.strip()}
    assert re.search(r"^conv2d\s+2\s+grouped conv", rows["conv2d"]), rows["conv2d"]
    assert re.search(r"^linear\s+1\s+batched GEMM", rows["linear"]), rows["linear"]
    assert "batch_norm" in rows
    assert "fallbacks: none" in out
    per_model = sum(p.numel() for p in cli_models.small_cnn().parameters())
    assert f"parameters: {per_model:,} per model, {per_model * n:,} for {n} models" in out
    # BatchNorm's fresh affine and statistics are equal in the 3 models: stored once, and said so in bytes
    fused = fusecc.fuse([cli_models.small_cnn() for _ in range(n)])
    wb = fused.weight_bytes()
    assert wb["shared"] > 0 and len(fused.shared_tensors) > 0
    assert re.search(rf"^weights and buffers: [\d.,]+ (B|KiB|MiB) shared by all models \(stored once, "
                     rf"{len(fused.shared_tensors)} tensors\), [\d.,]+ (B|KiB|MiB) in per-model tensors \({n} "
                     r"models\); [\d.,]+ (B|KiB|MiB) as 3 separate models$", out, re.M), out
    mem = [ln for ln in out.splitlines() if ln.startswith(f"memory for {n} models:")]
    assert len(mem) == 1, out
    assert re.search(r"weights and buffers [\d.,]+ (B|KiB|MiB), example input [\d.,]+ (B|KiB|MiB), "
                     r"activations at peak \(inference, estimated\) [\d.,]+ (B|KiB|MiB)", mem[0]), mem[0]


def test_inspect_shared_input_mlp(tmp_path):
    proc = run_cli("inspect", "-q", "--arch", MLP, "--num-models", "2", "--example-input", "2,6", "--shared-input",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert "shared input 2x6" in proc.stdout
    assert "conv2d" not in proc.stdout and "batched GEMM" in proc.stdout and "fallbacks: none" in proc.stdout
    per_model = sum(p.numel() for p in cli_models.small_mlp().parameters())
    assert f"parameters: {per_model:,} per model, {2 * per_model:,} for 2 models" in proc.stdout


def test_bench(tmp_path):
    proc = run_cli("bench", "-q", "--arch", CNN, "--num-models", "2", "--example-input", shape_arg(CNN_SHAPE),
                   "--repeat", "2", "--warmup", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "median of 2" in proc.stdout
    for provider in ("loop", "vmap", "fusecc"):
        m = re.search(rf"^{provider}\s+([\d.]+)\s+([\d.]+)x\s+([\d.e+-]+)$", proc.stdout, re.M)
        assert m, f"no row for {provider}:\n{proc.stdout}"
        assert float(m.group(1)) > 0 and float(m.group(2)) > 0
        assert float(m.group(3)) < 1e-4, f"{provider} disagrees with the loop: {m.group(0)}"


# ----------------------------------------------------------------------------------------------------------------
# NVIDIA Triton Inference Server model repository


def parse_pbtxt(text: str) -> dict:
    """Just enough of config.pbtxt: name, platform, max_batch_size, and per input/output the name, type, dims."""

    def tensors(kind: str):
        block = re.search(rf"^{kind} \[(.*?)^\]", text, re.S | re.M)
        assert block, f"no {kind} block in\n{text}"
        return [(m.group(1), m.group(2), [int(d) for d in m.group(3).replace(",", " ").split()])
                for m in re.finditer(r'name: "(\w+)"\s+data_type: (\w+)\s+dims: \[([^\]]*)\]', block.group(1))]

    return {"name": re.search(r'^name: "([^"]+)"', text, re.M).group(1),
            "platform": re.search(r'^platform: "([^"]+)"', text, re.M).group(1),
            "max_batch_size": int(re.search(r"^max_batch_size: (\d+)", text, re.M).group(1)),
            "input": tensors("input"), "output": tensors("output")}


@pytest.mark.parametrize("name, shared", [(None, False), ("resnet_fleet", True)])
def test_triton_repo(name, shared, tmp_path):
    repo = tmp_path / "model_repository"
    args = ["export", "-q", "--arch", CNN, "--num-models", "2", "--example-input", shape_arg(CNN_SHAPE),
            "--format", "torchscript", "-o", "my_fleet.pt", "--triton-repo", str(repo)]
    if name:
        args += ["--name", name]
    if shared:
        args += ["--shared-input"]
    proc = run_cli(*args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = name or "my_fleet"  # defaults to the output file's stem
    entry = repo / expected
    assert sorted(p.relative_to(repo).as_posix() for p in repo.rglob("*")) == [
        expected, f"{expected}/1", f"{expected}/1/model.pt", f"{expected}/config.pbtxt"]
    assert (entry / "1" / "model.pt").read_bytes() == (tmp_path / "my_fleet.pt").read_bytes()
    assert f"wrote Triton model repository entry {entry}" in proc.stdout

    cfg = parse_pbtxt((entry / "config.pbtxt").read_text())
    assert cfg["name"] == expected
    assert cfg["platform"] == "pytorch_libtorch" and cfg["max_batch_size"] == 0
    x = torch.randn(*(CNN_SHAPE if shared else (2, *CNN_SHAPE)))
    with torch.no_grad():
        y = torch.jit.load(str(entry / "1" / "model.pt"))(x)
    assert cfg["input"] == [("INPUT__0", "TYPE_FP32", list(x.shape))]
    assert cfg["output"] == [("OUTPUT__0", "TYPE_FP32", list(y.shape))]
    assert list(y.shape) == [2, 2, 10]


# ----------------------------------------------------------------------------------------------------------------
# --version, --help


def test_version(tmp_path):
    proc = run_cli("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"fusecc {fusecc.__version__}"


def test_help_console_script(tmp_path):
    exe = Path(sys.executable).parent / "fusecc"
    if not exe.exists():
        pytest.skip(f"no console script at {exe} (package not installed with its entry points)")
    proc = subprocess.run([str(exe), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: fusecc")
    for command in ("export", "inspect", "bench"):
        assert command in proc.stdout
    proc = subprocess.run([str(exe), "export", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--triton-repo" in proc.stdout and "--format" in proc.stdout
