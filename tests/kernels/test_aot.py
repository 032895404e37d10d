"""Every Triton kernel compiles ahead of time for sm_80 (A100) and sm_90 (H100) on this CPU-only machine."""

import importlib
import json
import os
import subprocess
import sys

import pytest

from fusecc.kernels import report


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "fusecc.kernels.report", "--json"], capture_output=True, text=True,
                       env=env, timeout=1200)
    out = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert out, f"the report printed nothing (exit {r.returncode}):\n{r.stderr[-3000:]}"
    return out


def _kernels_defined(op):
    """Names of the @triton.jit kernels an op's triton.py defines (``_..._kernel``)."""
    mod = importlib.import_module(f"fusecc.kernels.{op}.triton")
    return {name for name, obj in vars(mod).items() if name.startswith("_") and name.endswith("_kernel")
            and hasattr(obj, "fn")}


@pytest.mark.slow
def test_every_kernel_compiles_for_sm80_and_sm90(rows):
    failed = [(r["name"], r["arch"], r["error"]) for r in rows if r["error"]]
    assert not failed, failed
    for op in report.OPS:
        compiled = {(r["kernel"], r["arch"]) for r in rows if r["op"] == op}
        for kernel in _kernels_defined(op):
            for arch in (80, 90):
                assert (kernel, arch) in compiled, f"{op}: {kernel} was not compiled for sm_{arch}"


@pytest.mark.slow
def test_compiled_resources_fit(rows):
    """Registers within the 255 a thread may hold, shared memory within the SM's opt-in limit, and no spills (a
    config that spills is slower than a smaller tile: choose another)."""
    for r in rows:
        where = f"{r['name']} on sm_{r['arch']} ({r['config']})"
        assert 0 < r["registers"] <= 255, where
        assert r["shared_bytes"] <= r["shared_limit"], f"{where}: {r['shared_bytes']} B of shared memory"
        assert r["spill_bytes"] == 0, f"{where}: spills {r['spill_bytes']} B per thread"
        assert r["ptx_lines"] > 0, where
