"""Building fusecc's small C kernels (kernels/*/cpu*.c) with the system C compiler, once, into the fusecc cache.

The source is compiled at first use with ``$CC`` (else ``cc``/``gcc``) into ``$FUSECC_CACHE_DIR`` (or
``~/.cache/fusecc``), keyed by the source, the compiler and its flags, and loaded with ctypes. ``build`` returns
the library, or None and why not: turned off by ``FUSECC_CPU_KERNELS=0``, a CPU it is not written for (not x86-64,
no AVX2/FMA), no compiler, a failed build. Callers fall back to torch ops then (same results, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Optional, Sequence, Tuple

import torch

FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-std=c99", "-shared", "-fPIC")


def cache_dir() -> str:
    root = os.environ.get("FUSECC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusecc")
    return os.path.join(root, "cpu-kernels")


def compiler() -> Optional[str]:
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("cc") or shutil.which("gcc"))


def build(source: str, stem: str, flags: Sequence[str] = FLAGS) -> Tuple[Optional[ctypes.CDLL], str]:
    """(the loaded library, "") or (None, why not)."""
    if os.environ.get("FUSECC_CPU_KERNELS", "1") in ("0", "off", "false", ""):
        return None, "turned off by FUSECC_CPU_KERNELS=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"needs an x86-64 CPU, this is {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None, f"needs AVX2 and FMA; torch reports CPU capability {torch.backends.cpu.get_cpu_capability()}"
    cc = compiler()
    if cc is None:
        return None, "no C compiler found (set $CC, or install gcc)"
    with open(source, "rb") as f:
        src = f.read()
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"{cc} --version failed: {e}"
    key = hashlib.sha256(src + "\0".join((cc, version) + tuple(flags)).encode()).hexdigest()[:16]
    path = os.path.join(cache_dir(), f"{stem}-{key}.so")
    if not os.path.exists(path):
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
            os.close(fd)
            proc = subprocess.run([cc, *flags, source, "-o", tmp], capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                os.unlink(tmp)
                return None, f"{cc} failed to compile {source}: {proc.stderr.strip()[-500:]}"
            os.replace(tmp, path)  # atomic: processes building at once each rename a complete library
        except (OSError, subprocess.SubprocessError) as e:
            return None, f"could not build {path}: {e}"
    try:
        return ctypes.CDLL(path), ""
    except OSError as e:
        return None, f"could not load {path}: {e}"
