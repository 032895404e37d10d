"""Ahead-of-time compilation of the kernels for real GPUs, on a machine without one.

Each op's ``triton.py`` lists ``aot_specs()``: the kernel, its signature (argument types) and the constexprs of
a representative configuration. ``compile_spec`` compiles one for a ``GPUTarget`` (sm_80, sm_90) with
``triton.compile`` and reads the cubin's resource usage (registers, spills, shared memory) with ``cuobjdump``,
which ships with triton. Nothing here needs a GPU or a CUDA driver.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Optional


@dataclasses.dataclass
class KernelSpec:
    """One kernel at one configuration, to compile ahead of time."""

    op: str  # the op's folder, e.g. "linear"
    name: str  # what the report calls it, e.g. "linear_fwd[relu,bias]"
    kernel: Any  # the @triton.jit function (or the Autotuner around it)
    # every parameter: "*fp16", "i32", "fp32" or "constexpr", with an optional specialisation hint as in
    # triton/tools/compile.py: ":16" (divisible by 16 / 16-byte aligned) or ":1" (equal to 1: becomes a constexpr).
    # At run time the JIT makes the same specialisations from the actual arguments (unit strides, aligned
    # pointers), so a hint-free signature would compile a slower kernel than the one a GPU runs.
    signature: Dict[str, str]
    constexprs: Dict[str, Any]  # values of the constexpr parameters
    num_warps: int = 4
    num_stages: int = 3
    shape: str = ""  # the representative problem the config was chosen for


@dataclasses.dataclass
class CompiledInfo:
    spec: KernelSpec
    arch: int
    registers: int
    spill_bytes: int  # local memory per thread (register spills and stack arrays)
    shared_bytes: int  # static + dynamic shared memory of the launch
    ptx_lines: int
    error: Optional[str] = None


def _jit_fn(kernel: Any) -> Any:
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"not a triton kernel: {kernel!r} (is TRITON_INTERPRET set? AOT needs it unset)")
        kernel = kernel.fn
    return kernel


def _cuobjdump() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes, kernel_name: str) -> Dict[str, int]:
    """REG / STACK / SHARED / LOCAL of a kernel in a cubin, as ``cuobjdump --dump-resource-usage`` prints them."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if "Function" in line and kernel_name in line and i + 1 < len(lines):
            return {k: int(v) for k, v in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", lines[i + 1])}
    raise RuntimeError(f"cuobjdump printed no resource usage for {kernel_name}:\n{out}")


def compile_spec(spec: KernelSpec, arch: int) -> CompiledInfo:
    """Compile ``spec`` for ``sm_<arch>`` and measure it (an exception becomes ``error``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        fn = _jit_fn(spec.kernel)
        signature, constexprs, attrs = {}, dict(spec.constexprs), {}
        for name, ty in spec.signature.items():
            ty, _, hint = ty.partition(":")
            if hint == "1":
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = ty
            if hint == "16":
                attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
            elif hint:
                raise ValueError(f"{spec.name}: hint {hint!r} of {name}: only 1 and 16 are valid")
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
        use = resource_usage(k.asm["cubin"], k.metadata.name)
        return CompiledInfo(spec, arch, use["REG"], use["LOCAL"] + use["STACK"], int(k.metadata.shared),
                            k.asm["ptx"].count("\n"))
    except Exception as e:  # reported, and the test fails on it
        return CompiledInfo(spec, arch, 0, 0, 0, 0, f"{type(e).__name__}: {e}")
