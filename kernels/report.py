"""Compile every kernel ahead of time for sm_80 and sm_90 and print registers, spills and shared memory.

    python -m fusecc.kernels.report            # a table (make kernels-report)
    python -m fusecc.kernels.report --json     # one JSON object per line (the test suite reads this)

Runs on a CPU-only machine: ``triton.compile`` with a ``GPUTarget`` needs no GPU or driver. It must run with
``TRITON_INTERPRET`` unset (the interpreter replaces the kernels by Python functions that cannot be compiled).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import sys
from typing import List

from ._aot import CompiledInfo, KernelSpec, compile_spec
from ._backend import _kernel_name

# every op folder with a triton.py (which lists its aot_specs()): discovered, as setup.py discovers the packages
OPS = tuple(sorted(d for d in os.listdir(os.path.dirname(os.path.abspath(__file__)))
                   if os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(__file__)), d, "triton.py"))))

# per-SM shared memory a block may use (opt-in maximum), from the CUDA programming guide
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def all_specs() -> List[KernelSpec]:
    specs: List[KernelSpec] = []
    for op in OPS:
        specs.extend(importlib.import_module(f"fusecc.kernels.{op}.triton").aot_specs())
    return specs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fusecc.kernels.report", description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90], help="compute capabilities (default 80 90)")
    p.add_argument("--json", action="store_true", help="one JSON object per kernel and arch")
    p.add_argument("--only", default=None, help="compile only the kernels whose name contains this")
    a = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        p.error("unset TRITON_INTERPRET: kernels compiled for a GPU cannot come from the interpreter")
    infos: List[CompiledInfo] = []
    for spec in all_specs():
        if a.only and a.only not in spec.name:
            continue
        for arch in a.arch:
            info = compile_spec(spec, arch)
            infos.append(info)
            if a.json:
                row = {f.name: getattr(info, f.name) for f in dataclasses.fields(info) if f.name != "spec"}
                row.update(op=spec.op, name=spec.name, kernel=_kernel_name(spec.kernel), num_warps=spec.num_warps,
                           num_stages=spec.num_stages, shape=spec.shape, shared_limit=SHARED_LIMIT.get(arch),
                           config={k: v for k, v in spec.constexprs.items() if k.isupper()})
                print(json.dumps(row, default=str), flush=True)
    if not a.json:
        head = (f"{'kernel':<34} {'arch':>5} {'regs':>5} {'spill B':>8} {'smem KB':>8} {'warps':>5} {'stages':>6}"
                "  config")
        print(head)
        print("-" * len(head))
        for i in infos:
            cfg = " ".join(f"{k}={v}" for k, v in i.spec.constexprs.items() if k.startswith("BLOCK") or
                           k.startswith("GROUP"))
            if i.error:
                print(f"{i.spec.name:<34} sm_{i.arch:<2} FAILED: {i.error.splitlines()[0][:100]}")
                continue
            print(f"{i.spec.name:<34} sm_{i.arch:<2} {i.registers:>5} {i.spill_bytes:>8} "
                  f"{i.shared_bytes / 1024:>8.1f} {i.spec.num_warps:>5} {i.spec.num_stages:>6}  {cfg}")
    return 1 if any(i.error for i in infos) else 0


if __name__ == "__main__":
    sys.exit(main())
