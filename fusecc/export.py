"""FusedModule -> one deployable artifact: TorchScript, a torch.export ExportedProgram (.pt2), or an AOTInductor
package (.pt2).

The artifact holds the fused graph for one input signature (the example inputs' shapes and dtypes) with the
reference (aten) lowering of every fused op, so it loads and runs without fusecc: ``torch.jit.load``,
``torch.export.load(path).module()`` or ``torch._inductor.aoti_load_package``. It takes the fused inputs
(``[N, B, ...]`` per model, or ``[B, ...]`` when shared) and returns the fused outputs (a leading N on every tensor).

TorchScript is what serving stacks (TorchServe, NVIDIA Triton's libtorch backend, C++ libtorch) load today;
torch 2.x marks it deprecated in favour of torch.export, whose .pt2 is the path forward (and the input of
AOTInductor, which compiles the graph ahead of time to a shared library).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .api import FusedModule
from .kernels import use_backend

FORMATS = ("torchscript", "pt2", "aoti")
SUFFIX = {"torchscript": ".pt", "pt2": ".pt2", "aoti": ".pt2"}


class _Entry(nn.Module):
    """The compiled fused forward as a plain module: parameters under ``fused.<qualname>``, no Python caches."""

    def __init__(self, fused: FusedModule, fn: Callable):
        super().__init__()
        self.fused = fused
        self.__dict__["_fn"] = fn

    def forward(self, *tensors: torch.Tensor) -> Any:
        return self._fn(self.fused, *tensors)


@contextlib.contextmanager
def atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """A temporary file beside ``path``, renamed onto it only if the block succeeds (never a truncated artifact)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=directory)
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; the artifact gets the usual mode (a server may read it)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """TorchScript is asked for by users on purpose: drop torch's deprecation notices for it (the README says it
    is deprecated in favour of torch.export), and the tracer's notes about the lowerings' shape checks, which run
    once at trace time for an artifact specialised to the example shapes anyway."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+.* is deprecated", category=FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        yield


def export(fused: FusedModule, example_inputs: Sequence[Any], path: str, format: str = "torchscript") -> str:
    """Write ``fused`` as a standalone artifact at ``path`` (atomically) and return the path.

    Args:
        fused: a FusedModule, in the mode to export (``.eval()`` for serving).
        example_inputs: the fused module's positional inputs (tensors with the leading model dim, or shared).
            The artifact is specialised to their shapes and dtypes.
        path: the output file.
        format: ``"torchscript"`` (``torch.jit.trace``), ``"pt2"`` (``torch.export``) or ``"aoti"``
            (AOTInductor package).

    Examples::

        >>> fused = fusecc.fuse(models).eval()
        >>> fusecc.export(fused, (torch.randn(len(models), 4, 3, 64, 64),), "fleet.pt")
        >>> torch.jit.load("fleet.pt")(x)          # in any process, no fusecc needed
    """
    if format not in FORMATS:
        raise ValueError(f"fusecc.export: unknown format {format!r}; expected one of {list(FORMATS)}")
    if not isinstance(fused, FusedModule):
        raise TypeError(f"fusecc.export: expected a FusedModule (from fusecc.fuse), got {type(fused).__name__}")
    example_inputs = tuple(example_inputs)
    with use_backend("reference"):  # aten only: the artifact must not need fusecc's custom ops
        entry, tensors = fused._entry_for(example_inputs, {})
        module = _Entry(fused, entry.fn)  # (no .train(): the fused modules keep their own modes)
        with atomic_path(path, SUFFIX[format]) as tmp:
            if format == "torchscript":
                with torch.no_grad(), _quiet_jit():
                    # strict=False: outputs may be dicts and lists, as the model's own are
                    traced = torch.jit.trace(module, tuple(tensors), check_trace=False, strict=False)
                    torch.jit.save(traced, tmp)
            else:
                program = torch.export.export(module, tuple(tensors))
                if format == "pt2":
                    torch.export.save(program, tmp)
                else:
                    torch._inductor.aoti_compile_and_package(program, package_path=tmp)
    return path


def load(path: str, format: str) -> Callable:
    """Load an artifact written by :func:`export` as a callable (what a server would do)."""
    if format == "torchscript":
        with _quiet_jit():
            return torch.jit.load(path)
    if format == "pt2":
        with warnings.catch_warnings():  # torch 2.11's loader notes that its weights alias the file's read-only bytes
            warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
            return torch.export.load(path).module()
    if format == "aoti":
        return torch._inductor.aoti_load_package(path)
    raise ValueError(f"fusecc.export.load: unknown format {format!r}; expected one of {list(FORMATS)}")
