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
from typing import Any, Callable, Dict, Iterator, Mapping, Sequence, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_unflatten

from .api import FusedModule
from .kernels import use_backend

FORMATS = ("torchscript", "pt2", "aoti")
SUFFIX = {"torchscript": ".pt", "pt2": ".pt2", "aoti": ".pt2"}


class _Entry(nn.Module):
    """The compiled fused forward as a plain module: parameters under ``fused.<qualname>``, no Python caches."""

    def __init__(self, fused: FusedModule, fn: Callable, out_spec: Any = None):
        super().__init__()
        self.fused = fused
        self.__dict__["_fn"] = fn
        self.__dict__["_out_spec"] = out_spec

    def forward(self, *tensors: torch.Tensor) -> Any:
        out = self._fn(self.fused, *tensors)
        if self._out_spec is not None:  # the model's structure (a ModelOutput becomes a plain dict: loadable anywhere)
            out = tree_unflatten(out, self._out_spec)
            if isinstance(out, Mapping):
                out = dict(out)
        return out


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


def export(fused: FusedModule, example_inputs: Union[Sequence[Any], Dict[str, Any]], path: str,
           format: str = "torchscript", dynamic: bool = False) -> str:
    """Write ``fused`` as a standalone artifact at ``path`` (atomically) and return the path.

    Args:
        fused: a FusedModule, in the mode to export (``.eval()`` for serving).
        example_inputs: the fused module's positional inputs (tensors with the leading model dim, or shared), or a
            dict of its keyword inputs (a transformers fleet: ``input_ids``, ``attention_mask``). The artifact takes
            the tensors among them positionally, in the order of the model's forward, and is specialised to their
            dtypes and (unless ``dynamic``) shapes.
        path: the output file.
        format: ``"torchscript"`` (``torch.jit.trace``), ``"pt2"`` (``torch.export``) or ``"aoti"``
            (AOTInductor package).
        dynamic: keep the batch size (and the sequence length: every dim of integer inputs such as token ids and
            masks) variable in the artifact, as far as the compiled forward allows (torch.export's dynamic shapes;
            a TorchScript trace reads sizes at run time).

    Examples::

        >>> fused = fusecc.fuse(models).eval()
        >>> fusecc.export(fused, (torch.randn(len(models), 4, 3, 64, 64),), "fleet.pt")
        >>> torch.jit.load("fleet.pt")(x)          # in any process, no fusecc needed
    """
    if format not in FORMATS:
        raise ValueError(f"fusecc.export: unknown format {format!r}; expected one of {list(FORMATS)}")
    if not isinstance(fused, FusedModule):
        raise TypeError(f"fusecc.export: expected a FusedModule (from fusecc.fuse), got {type(fused).__name__}")
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    with use_backend("reference"):  # aten only: the artifact must not need fusecc's custom ops
        entry, tensors = fused._entry_for(args, kwargs)
        module = _Entry(fused, entry.fn, entry.out_spec)  # (no .train(): the fused modules keep their own modes)
        with atomic_path(path, SUFFIX[format]) as tmp:
            if format == "torchscript":
                with torch.no_grad(), _quiet_jit():
                    # strict=False: outputs may be dicts and lists, as the model's own are
                    traced = torch.jit.trace(module, tuple(tensors), check_trace=False, strict=False)
                    torch.jit.save(traced, tmp)
            else:
                shapes = (tuple(_dynamic_dims(t, fused) for t in tensors),) if dynamic else None
                program = torch.export.export(module, tuple(tensors), dynamic_shapes=shapes)
                if format == "pt2":
                    torch.export.save(program, tmp)
                else:
                    torch._inductor.aoti_compile_and_package(program, package_path=tmp)
    return path


def artifact_inputs(fused: FusedModule, example_inputs: Union[Sequence[Any], Dict[str, Any]]) -> tuple:
    """The positional tensors an exported artifact takes for these fused inputs (keywords: in forward's order)."""
    args, kwargs = ((), dict(example_inputs)) if isinstance(example_inputs, Mapping) else (tuple(example_inputs), {})
    return tuple(fused._signature(fused._bind(args, kwargs))[1])


def dynamic_dims(fused: FusedModule, tensors: Sequence[torch.Tensor]) -> list:
    """Per artifact input, the dims ``export(dynamic=True)`` leaves variable."""
    return [sorted(_dynamic_dims(t, fused)) for t in tensors]


def _dynamic_dims(t: torch.Tensor, fused: FusedModule) -> Dict[int, Any]:
    """torch.export's dynamic dims of one fused input ``[N, B, ...]``: the batch, and every dim of an integer one."""
    from torch.export import Dim

    lead = 1 if t.dim() and t.shape[0] == fused.num_models else 0
    dims = range(lead, t.dim()) if not t.is_floating_point() else range(lead, min(t.dim(), lead + 1))
    return {d: Dim.AUTO for d in dims if t.shape[d] > 1}


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
