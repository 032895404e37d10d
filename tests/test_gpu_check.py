"""The GPU check (bench/gpu_check.py) in its dry mode, as CI runs it: the script must never rot before a GPU turns up.

Without a CUDA device the set-up step (fusecc built from the checkout against this torch, then a two-model fuse)
runs for real, the kernel step is skipped with a line saying why, and with --smoke the model and benchmark steps run
at tiny sizes on the CPU, through the same code they run on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine runs the real check instead")


@pytest.mark.slow
def test_dry_run_with_smoke_steps_writes_the_report(tmp_path):
    out = tmp_path / "report"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FUSECC_TEST_DEVICE")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out", str(out), "--smoke"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    report = (out / "report.md").read_text()
    assert r.returncode == 0, report + "\n" + r.stdout[-3000:] + r.stderr[-3000:]
    assert "Mode: dry run (no CUDA device), smoke sizes" in report
    assert "| 1. Set-up: fusecc from the checkout against this machine's torch | ok |" in report
    assert "| 2. Kernels: every Triton kernel compiled on the GPU vs its aten reference | skipped |" in report
    assert "skipped: no CUDA device (dry run)" in report
    assert "- fuse on cpu max error" in report
    for step in (3, 4):
        assert f"| {step}. " in report and "(smoke: on the CPU, tiny sizes; not a GPU result) | ok |" in report
    # what comes back from the device machine: at most 8 plain files
    files = sorted(os.listdir(out))
    assert files == ["gpu_bench_kernels.csv", "gpu_bench_models.csv", "logs.txt", "model_tests.csv", "report.md"]
    models = (out / "model_tests.csv").read_text().splitlines()
    assert len(models) > 1 and all(",passed," in line for line in models[1:]), models
    bench = (out / "gpu_bench_models.csv").read_text()
    assert "fusecc" in bench and "loop" in bench


def test_dry_run_without_smoke_skips_every_device_step(tmp_path):
    out = tmp_path / "report"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_check.py"), "--out", str(out), "--dry"],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    report = (out / "report.md").read_text()
    assert r.returncode == 0, report
    assert report.count("| skipped |") == 3
    assert "| 1. Set-up" in report and "| ok |" in report


def test_gpu_bench_needs_a_gpu_or_smoke(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu_bench.py"), "--out", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "no CUDA device" in r.stderr
