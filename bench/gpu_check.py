"""The GPU check: one command that proves the Triton kernels and the speed-ups on a CUDA machine, in minutes.

    python3 bench/gpu_check.py --out OUTDIR          # or: make gpu-check GPU_OUT=OUTDIR
    python3 bench/gpu_check.py --out OUTDIR --smoke  # no GPU: steps 3 and 4 at tiny sizes on the CPU (CI runs this)

It needs only the machine's own Python with torch (and triton, torchvision, pytest) and this checkout: nothing is
fetched. Steps, each in its own process, each bounded in time; a step that fails or runs out of time is reported
and the next one still runs. The whole check stays under 8 minutes (``--budget-s``).

1. set-up: fusecc built from the checkout against the machine's torch, without dependency resolution
   (``pip install --no-deps --no-build-isolation --target``; if that fails, a path import of the sources), then a
   two-model fuse on the CPU (and the GPU) as a smoke test of the torch version.
2. kernels: ``tests/kernels`` with ``FUSECC_TEST_DEVICE=cuda``: every Triton kernel compiled for real against its
   aten reference, forward and backward, fp32/fp16/bf16, ragged shapes (the interpreter tests, on the device).
3. models: ``tests/gpu``: whole fused models on CUDA equal the N models, kernels on and ``FUSECC_KERNELS=reference``.
4. benchmark: ``bench/gpu_bench.py``: NetFuse-style fleets and the kernels' rates against the roofline.

Without a CUDA device (a "dry" run) steps 2-4 are skipped with a line saying so, and the report is still written.
Output (at most 8 files, as the device tool brings back): report.md, kernel_tests.csv, model_tests.csv,
gpu_bench_models.csv, gpu_bench_kernels.csv, logs.txt. docs/gpu.md explains every number.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_BUDGET_S = 450.0  # under the 8 minutes the check may take, with room for the report
# per step: (the most it may take, the least a later step must keep for itself)
STEP_BUDGET_S = {"setup": (120.0, 30.0), "kernels": (170.0, 60.0), "models": (110.0, 40.0), "bench": (200.0, 60.0)}


@dataclass
class Step:
    name: str
    title: str
    status: str = "not run"  # ok | failed | timed out | skipped
    seconds: float = 0.0
    summary: List[str] = field(default_factory=list)
    log_tail: str = ""


class Check:
    def __init__(self, out: str, budget_s: float, smoke: bool, force_dry: bool):
        self.out = out
        self.start = time.time()
        self.budget_s = budget_s
        self.smoke = smoke
        self.work = tempfile.mkdtemp(prefix="fusecc-gpu-check-")
        self.site = os.path.join(self.work, "site")
        self.logs: List[str] = []
        self.steps: List[Step] = []
        self.python = sys.executable
        self.cuda = False if force_dry else self._has_cuda()
        self.info: Dict[str, str] = {}

    # ------------------------------------------------------------------------------------------ helpers
    def _has_cuda(self) -> bool:
        r = subprocess.run([self.python, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True, timeout=120)
        return r.stdout.strip().endswith("True")

    def remaining(self) -> float:
        return self.budget_s - (time.time() - self.start)

    def budget(self, name: str, later: Sequence[str]) -> float:
        """This step's time: its cap, less what the steps after it must keep."""
        cap = STEP_BUDGET_S[name][0]
        keep = sum(STEP_BUDGET_S[s][1] for s in later)
        return max(10.0, min(cap, self.remaining() - keep))

    def env(self, **extra: str) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env["PYTHONPATH"] = os.pathsep.join([self.site] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env["PYTHONUNBUFFERED"] = "1"
        env["FUSECC_CACHE_DIR"] = os.path.join(self.work, "cache")
        env.update(extra)
        return env

    def run(self, step: Step, cmd: List[str], timeout: float, env: Optional[Dict[str, str]] = None,
            cwd: str = ROOT) -> Optional[int]:
        """Run cmd in its own process group; its output goes to the log. Returns the exit code (None on timeout)."""
        self.logs.append(f"\n===== {step.name}: {' '.join(cmd)} (limit {timeout:.0f} s)\n")
        t = time.time()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
            rc: Optional[int] = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # pytest-xdist workers and compile workers too
            out, _ = proc.communicate()
            rc = None
        self.logs.append(out or "")
        self.logs.append(f"===== {step.name}: exit {rc} after {time.time() - t:.0f} s\n")
        step.log_tail = "\n".join((out or "").strip().splitlines()[-25:])
        return rc

    # ------------------------------------------------------------------------------------------ steps
    def setup(self) -> Step:
        step = Step("setup", "Set-up: fusecc from the checkout against this machine's torch")
        t = time.time()
        limit = self.budget("setup", ["kernels", "models", "bench"])
        os.makedirs(self.site, exist_ok=True)
        rc = self.run(step, [self.python, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "--quiet", "--target", self.site, ROOT], timeout=limit * 0.6,
                      env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
        method = "pip install --no-deps --no-build-isolation --target"
        if rc != 0:
            step.summary.append(f"pip install failed (exit {rc}): a path import of the sources instead")
            shutil.rmtree(self.site, ignore_errors=True)
            shutil.copytree(os.path.join(ROOT, "fusecc"), os.path.join(self.site, "fusecc"))
            shutil.copytree(os.path.join(ROOT, "kernels"), os.path.join(self.site, "fusecc", "kernels"))
            method = "path import (the sources copied as one package)"
        probe = (
            "import sys, torch, torch.nn as nn, fusecc, fusecc.kernels.linear as kl\n"
            "print('fusecc', fusecc.__file__)\n"
            "print('python', sys.version.split()[0], 'torch', torch.__version__)\n"
            "try:\n    import triton; print('triton', triton.__version__)\nexcept ImportError: print('triton absent')\n"
            "devs = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])\n"
            "for dev in devs:\n"
            "    ms = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dev) for _ in range(2)]\n"
            "    x = torch.randn(2, 3, 8, device=dev)\n"
            "    y = fusecc.fuse(ms)(x)\n"
            "    ref = torch.stack([m(x[i]) for i, m in enumerate(ms)])\n"
            "    print('fuse on', dev, 'max error', float((y - ref).abs().max()))\n"
            "    assert torch.allclose(y, ref, atol=1e-5), 'fused != models'\n"
            "if torch.cuda.is_available():\n"
            "    print('gpu', torch.cuda.get_device_name(0), 'capability', torch.cuda.get_device_capability(0))\n"
        )
        rc = self.run(step, [self.python, "-c", probe], timeout=max(10.0, limit - (time.time() - t)),
                      cwd=self.work)
        step.summary.append(f"install: {method}")
        for line in step.log_tail.splitlines():
            if line.split(" ", 1)[0] in ("fusecc", "python", "triton", "fuse", "gpu"):
                step.summary.append(line)
                k, _, v = line.partition(" ")
                self.info.setdefault(k, v)
        step.status = "ok" if rc == 0 else ("timed out" if rc is None else "failed")
        step.seconds = time.time() - t
        return step

    def pytest_step(self, name: str, title: str, paths: List[str], later: List[str], extra_env: Dict[str, str],
                    csv_name: str) -> Step:
        step = Step(name, title)
        t = time.time()
        junit = os.path.join(self.work, f"{name}.xml")
        # -P and --import-mode=append: the checkout's own fusecc/ folder (which lacks fusecc.kernels: kernels/ becomes
        # that only when installed) must not shadow the one built in the set-up step; tests/ is still importable
        cmd = [self.python, "-P", "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", "--import-mode=append",
               "-rfE", f"--junitxml={junit}", "-o", "addopts="]
        if _has_module(self.python, "pytest_timeout"):
            cmd += ["--timeout", "120"]  # per test: a hung kernel fails its test, not the step
        if self.cuda and _has_module(self.python, "xdist"):
            cmd += ["-n", "4"]  # compiles are CPU-bound: 4 workers share the 16 cores and the one GPU
        rc = self.run(step, cmd, timeout=self.budget(name, later), env=self.env(**extra_env))
        rows = _junit_rows(junit)
        counts: Dict[str, int] = {}
        for r in rows:
            counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
        _write_csv(os.path.join(self.out, csv_name), rows, ["test", "outcome", "seconds", "message"])
        step.summary.append(", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "no test result")
        for r in rows:
            if r["outcome"] in ("failed", "error"):
                step.summary.append(f"FAILED {r['test']}: {r['message'][:200]}")
        slowest = sorted(rows, key=lambda r: -float(r["seconds"] or 0))[:3]
        if slowest:
            step.summary.append("slowest: " + ", ".join(f"{r['test']} {float(r['seconds']):.1f} s" for r in slowest))
        step.status = "timed out" if rc is None else ("ok" if rc == 0 else "failed")
        step.seconds = time.time() - t
        return step

    def bench(self) -> Step:
        step = Step("bench", "Benchmark: fleets (loop, vmap, fusecc, ...) and kernels vs aten")
        t = time.time()
        limit = self.budget("bench", [])
        bench_out = os.path.join(self.work, "bench")
        cmd = [self.python, os.path.join(ROOT, "bench", "gpu_bench.py"), "--out", bench_out,
               "--budget-s", str(max(5.0, limit - 45.0))]  # (45 s for imports and the last measurement)
        if self.smoke:
            cmd.append("--smoke")
        rc = self.run(step, cmd, timeout=limit)
        for f in ("gpu_bench_models.csv", "gpu_bench_kernels.csv"):
            if os.path.exists(os.path.join(bench_out, f)):
                shutil.copy(os.path.join(bench_out, f), os.path.join(self.out, f))
        md = os.path.join(bench_out, "gpu_bench.md")
        if os.path.exists(md):
            with open(md) as fh:
                step.summary.append(fh.read())
        step.status = "timed out" if rc is None else ("ok" if rc == 0 else "failed")
        step.seconds = time.time() - t
        return step

    def skipped(self, name: str, title: str, why: str) -> Step:
        return Step(name, title, status="skipped", summary=[why])

    # ------------------------------------------------------------------------------------------ the whole
    def main(self) -> int:
        os.makedirs(self.out, exist_ok=True)
        dry = not self.cuda
        why = "skipped: no CUDA device (dry run)"
        self.steps.append(self.setup())
        setup_ok = self.steps[0].status == "ok"
        if not setup_ok:
            why = "skipped: the set-up failed"
        titles = {"kernels": "Kernels: every Triton kernel compiled on the GPU vs its aten reference",
                  "models": "Models: whole fused models on CUDA vs the N models"}
        if self.cuda and setup_ok:
            self.steps.append(self.pytest_step("kernels", titles["kernels"], ["tests/kernels"],
                                               ["models", "bench"], {"FUSECC_TEST_DEVICE": "cuda"},
                                               "kernel_tests.csv"))
        else:
            self.steps.append(self.skipped("kernels", titles["kernels"], why))
        if setup_ok and (self.cuda or self.smoke):
            # (FUSECC_TEST_DEVICE=cuda also keeps tests/conftest.py from switching triton to its interpreter)
            extra = {"FUSECC_TEST_DEVICE": "cuda"} if self.cuda else {"FUSECC_GPU_TESTS_ON_CPU": "1"}
            title = titles["models"] + ("" if self.cuda else " (smoke: on the CPU, tiny sizes; not a GPU result)")
            self.steps.append(self.pytest_step("models", title, ["tests/gpu"], ["bench"], extra, "model_tests.csv"))
        else:
            self.steps.append(self.skipped("models", titles["models"], why))
        btitle = "Benchmark: fleets (loop, vmap, fusecc, ...) and kernels vs aten"
        if setup_ok and (self.cuda or self.smoke):
            self.steps.append(self.bench())
            if not self.cuda:
                self.steps[-1].title += " (smoke: on the CPU, tiny sizes; not a GPU result)"
        else:
            self.steps.append(self.skipped("bench", btitle, why))
        self.write_report(dry)
        return 0 if all(s.status in ("ok", "skipped") for s in self.steps) else 1

    def write_report(self, dry: bool) -> None:
        total = time.time() - self.start
        lines = [f"# fusecc GPU check, {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}", ""]
        lines.append(f"- Mode: {'dry run (no CUDA device)' if dry else 'GPU'}{', smoke sizes' if self.smoke else ''}"
                     f"; {total:.0f} s in all (budget {self.budget_s:.0f} s)")
        lines.append(f"- Machine: {platform.node() or '?'}, {platform.machine()}, {os.cpu_count()} CPUs; "
                     f"{_gpu_line()}")
        lines.append(f"- Python {self.info.get('python', platform.python_version())}; "
                     f"{', '.join(f'{k} {v}' for k, v in self.info.items() if k in ('triton', 'gpu'))}")
        lines.append(f"- Source: {_source_state()}")
        lines += ["", "| step | status | seconds |", "|---|---|---|"]
        for i, s in enumerate(self.steps, 1):
            lines.append(f"| {i}. {s.title} | {s.status} | {s.seconds:.0f} |")
        for i, s in enumerate(self.steps, 1):
            lines += ["", f"## {i}. {s.title}", "", f"Status: **{s.status}** ({s.seconds:.0f} s)", ""]
            for line in s.summary:
                lines.append(line if line.startswith(("#", "|")) or "\n" in line else f"- {line}")
            if s.status in ("failed", "timed out") and s.log_tail:
                lines += ["", "Last lines of its output:", "", "```", s.log_tail, "```"]
        with open(os.path.join(self.out, "report.md"), "w") as fh:
            fh.write("\n".join(lines) + "\n")
        with open(os.path.join(self.out, "logs.txt"), "w") as fh:
            fh.write("".join(self.logs))
        print("\n".join(lines))


def _has_module(python: str, name: str) -> bool:
    r = subprocess.run([python, "-c", f"import importlib.util as u; print(u.find_spec({name!r}) is not None)"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip() == "True"


def _junit_rows(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "").strip().splitlines()[0] if (
                    el.get("message") or el.text) else ""
                break
        rows.append({"test": f"{case.get('classname', '')}::{case.get('name', '')}", "outcome": outcome,
                     "seconds": case.get("time", "0"), "message": message})
    return rows


def _write_csv(path: str, rows: List[Dict[str, str]], fields: List[str]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def _gpu_line() -> str:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=30)
        return r.stdout.strip().replace("\n", "; ") or "no GPU"
    except (OSError, subprocess.TimeoutExpired):
        return "no nvidia-smi"


def _source_state() -> str:
    try:
        r = subprocess.run(["git", "-C", ROOT, "log", "-1", "--format=%h %s"], capture_output=True, text=True,
                           timeout=10)
        if r.returncode == 0:
            dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain"], capture_output=True, text=True,
                                   timeout=10).stdout.strip()
            return r.stdout.strip()[:100] + (" (+ uncommitted changes)" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        pass
    return "a copy of the working tree (no git history here)"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for report.md, the CSVs and logs.txt")
    ap.add_argument("--budget-s", type=float, default=TOTAL_BUDGET_S, help="the whole check's time")
    ap.add_argument("--smoke", action="store_true",
                    help="without a GPU, run steps 3 and 4 on the CPU at tiny sizes (to exercise the script)")
    ap.add_argument("--dry", action="store_true", help="behave as on a machine without CUDA")
    a = ap.parse_args(argv)
    return Check(os.path.abspath(a.out), a.budget_s, a.smoke, a.dry).main()


if __name__ == "__main__":
    sys.exit(main())
