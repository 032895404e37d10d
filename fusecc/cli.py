"""The ``fusecc`` command: turn N checkpoints of one architecture into one fused artifact, inspect, bench.

    fusecc export --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}' \\
           --weights ft/*.pt --example-input 4,3,224,224 --format torchscript -o fleet.pt
    fusecc inspect --arch torchvision.models:resnet18 --num-models 8 --example-input 4,3,64,64
    fusecc bench --arch torchvision.models:resnet18 --num-models 8 --example-input 4,3,64,64

Exit status: 0 success, 1 a bad input or a failed export (one line on stderr naming the culprit), 2 a usage error.
This module only parses arguments, loads models and calls :func:`fusecc.fuse` and :func:`fusecc.export.export`.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import json
import os
import pickle
import re
import shutil
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .version import __version__
from .api import FusedModule, fuse
from .errors import FusionError
from .export import FORMATS, SUFFIX, atomic_path, export, load
from .memory import activation_peak

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
# verification bound: max |artifact - models| / max |models|
VERIFY_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class CLIError(Exception):
    """A bad input or a failed step: printed as one line, exit status 1."""


# ----------------------------------------------------------------------------------------------------------------
# argument types (a ValueError/ArgumentTypeError here is a usage error: exit 2)


def _shape(text: str) -> Tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        dims = ()
    if not dims or any(d < 0 for d in dims):
        raise argparse.ArgumentTypeError(f"expected a per-model input shape like 4,3,224,224, got {text!r}")
    return dims


def _json_object(text: str) -> Dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at column {e.colno}): {text!r}")
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object like '{{\"num_classes\": 10}}', got {text!r}")
    return value


def _arch(text: str) -> str:
    mod, sep, attr = text.rpartition(":")
    if not sep or not mod or not attr:
        raise argparse.ArgumentTypeError(
            f"expected module:callable (e.g. torchvision.models:resnet18 or my_models.py:build), got {text!r}")
    return text


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# ----------------------------------------------------------------------------------------------------------------
# loading


class Progress:
    """Progress lines and bars on stderr, silenced by --quiet."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self._bars: list = []
        if quiet:  # torch's own notes (e.g. AOTInductor's "No CUDA runtime is found") too
            import logging

            logging.getLogger("torch").setLevel(logging.ERROR)

    def close(self) -> None:
        """Clear unfinished bars (so an error line starts on a line of its own)."""
        for b in self._bars:
            b.close()
        self._bars.clear()

    def say(self, msg: str) -> None:
        if not self.quiet:
            print(f"fusecc: {msg}", file=sys.stderr, flush=True)

    def bar(self, items: Sequence[Any], desc: str):
        from tqdm import tqdm

        bar = tqdm(items, desc=f"fusecc: {desc}", disable=self.quiet, file=sys.stderr, leave=False)
        self._bars.append(bar)
        return bar


def load_factory(spec: str) -> Callable[..., nn.Module]:
    """``module:callable`` or ``path/to/file.py:callable`` -> the callable (dotted attributes allowed)."""
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            if not os.path.isfile(mod_name):
                raise CLIError(f"--arch {spec}: no such file {mod_name!r}")
            name = "_fusecc_arch_" + os.path.splitext(os.path.basename(mod_name))[0]
            loader_spec = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` does: the current directory's modules import
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except CLIError:
        raise
    except Exception as e:  # ImportError, or anything the user's module raises while importing
        raise CLIError(f"--arch {spec}: cannot import {mod_name!r}: {type(e).__name__}: {_first_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"--arch {spec}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CLIError(f"--arch {spec}: {attr!r} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def build_model(factory: Callable[..., nn.Module], spec: str, kwargs: Dict[str, Any]) -> nn.Module:
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise CLIError(f"--arch {spec}: calling it with {kwargs} failed: {type(e).__name__}: {_first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CLIError(f"--arch {spec} returned a {type(model).__name__}, not an nn.Module")
    return model


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _first_line(e: BaseException) -> str:
    lines = [ln for ln in _ANSI.sub("", str(e)).splitlines() if ln.strip()]
    return lines[0].strip() if lines else ""


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def load_checkpoint(path: str) -> Dict[str, Tensor]:
    """A state dict from a .safetensors or .pt/.pth file (``torch.load(weights_only=True)``: never a full unpickle)."""
    if not os.path.exists(path):
        raise CLIError(f"weights file {path!r} does not exist")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise CLIError(f"weights file {path!r} is not a readable file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = _ANSI.sub("", str(e))
        why = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), _first_line(e))
        raise CLIError(f"weights file {path!r} holds more than tensors, and torch.load(weights_only=True) refuses "
                       f"to unpickle it ({why}); save model.state_dict() instead") from e
    except Exception as e:
        raise CLIError(f"weights file {path!r} is not a PyTorch or safetensors checkpoint (loading it failed with "
                       f"{type(e).__name__}: {_first_line(e)})") from e
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:  # {"state_dict": {...}, "epoch": 3, ...}
            if isinstance(obj.get(key), dict) and all(isinstance(v, Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CLIError(f"weights file {path!r} is not a state dict (a dict of tensors, possibly under one of "
                       f"{list(_NESTED_KEYS)}); got a {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _short(keys: List[str], most: int = 4) -> str:
    shown = ", ".join(keys[:most])
    return f"[{shown}{', ...' if len(keys) > most else ''}] ({len(keys)})"


def load_into(model: nn.Module, sd: Dict[str, Tensor], path: str, spec: str) -> None:
    """Load a checkpoint strictly, or say in one line how it does not fit the architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatch = next(((k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own
                     if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)), None)
    if missing or unexpected or mismatch:
        parts = []
        if missing:
            parts.append(f"missing keys {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_short(unexpected)}")
        if mismatch:
            k, got, want = mismatch
            parts.append(f"first shape mismatch: {k} is {list(got)} in the checkpoint, {list(want)} in the model")
        raise CLIError(f"weights file {path!r} does not fit --arch {spec}: " + "; ".join(parts))
    model.load_state_dict(sd)


def build_models(args: argparse.Namespace, progress: Progress) -> List[nn.Module]:
    factory = load_factory(args.arch)
    kwargs = args.arch_kwargs or {}
    torch.manual_seed(args.seed)
    models: List[nn.Module] = []
    if args.weights:
        for path in progress.bar(args.weights, f"loading {len(args.weights)} checkpoints"):
            sd = load_checkpoint(path)
            model = build_model(factory, args.arch, kwargs)
            load_into(model, sd, path, args.arch)
            models.append(model)
    else:
        for _ in progress.bar(range(args.num_models), f"initialising {args.num_models} models"):
            models.append(build_model(factory, args.arch, kwargs))
    try:
        device = torch.device(args.device)
        return [m.to(device=device, dtype=DTYPES[args.dtype]).eval() for m in models]
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"--device {args.device}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def example_inputs(args: argparse.Namespace, n: int) -> Tuple[Tensor, ...]:
    """Random fused inputs: ``[N, *shape]`` per model, or ``[*shape]`` with --shared-input."""
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for shape in args.example_input:
        full = tuple(shape) if args.shared_input else (n,) + tuple(shape)
        out.append(torch.randn(full, generator=gen).to(device=args.device, dtype=DTYPES[args.dtype]))
    return tuple(out)


def fuse_models(models: List[nn.Module], args: argparse.Namespace, inputs: Tuple[Tensor, ...],
                progress: Progress) -> FusedModule:
    progress.say(f"tracing and fusing {len(models)} models")
    try:
        fused = fuse(models, shared_inputs=args.shared_input, tune=args.tune).eval()
        fused.compile_for(*inputs)
    except FusionError as e:
        raise CLIError(f"cannot fuse --arch {args.arch}: " + " ".join(str(e).split("\n")[:2])) from e
    except (ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"cannot run --arch {args.arch} on --example-input "
                       f"{' '.join(','.join(map(str, s)) for s in args.example_input)}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return fused


def run_each(models: List[nn.Module], inputs: Tuple[Tensor, ...], shared: bool) -> Any:
    """The oracle: each original model on its own input, outputs stacked on a leading model dim."""
    from torch.utils._pytree import tree_flatten, tree_unflatten

    with torch.no_grad():
        outs = [m(*(inputs if shared else tuple(x[i] for x in inputs))) for i, m in enumerate(models)]
    leaves = [tree_flatten(o)[0] for o in outs]
    spec = tree_flatten(outs[0])[1]
    return tree_unflatten([torch.stack([lv[j] for lv in leaves]) if isinstance(leaves[0][j], Tensor)
                           else leaves[0][j] for j in range(len(leaves[0]))], spec)


def relative_error(got: Any, ref: Any) -> float:
    """max |got - ref| / max |ref| over every tensor leaf (inf if the structures differ)."""
    from torch.utils._pytree import tree_flatten

    g, r = tree_flatten(got)[0], tree_flatten(ref)[0]
    if len(g) != len(r):
        return float("inf")
    worst = 0.0
    for a, b in zip(g, r):
        if not isinstance(b, Tensor):
            continue
        if not isinstance(a, Tensor) or tuple(a.shape) != tuple(b.shape):
            return float("inf")
        a64, b64 = a.detach().double().cpu(), b.detach().double().cpu()
        if b64.numel():
            worst = max(worst, float((a64 - b64).abs().max() / b64.abs().max().clamp_min(1e-12)))
    return worst


# ----------------------------------------------------------------------------------------------------------------
# commands


def _check_writable(path: str, what: str) -> None:
    d = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(d):
        raise CLIError(f"{what} {path!r}: directory {d!r} does not exist")
    if not os.access(d, os.W_OK):
        raise CLIError(f"{what} {path!r}: directory {d!r} is not writable")
    if os.path.isdir(path):
        raise CLIError(f"{what} {path!r} is a directory; give a file name")


def cmd_export(args: argparse.Namespace, progress: Progress) -> int:
    if args.triton_repo and args.format != "torchscript":
        raise _UsageError("--triton-repo needs --format torchscript (NVIDIA Triton's pytorch_libtorch backend)")
    if args.name and not args.triton_repo:
        raise _UsageError("--name names the model in a --triton-repo; give --triton-repo DIR too")
    out = args.output or f"fleet{SUFFIX[args.format]}"
    _check_writable(out, "-o/--output")
    if args.triton_repo:
        try:
            os.makedirs(args.triton_repo, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--triton-repo {args.triton_repo!r}: cannot create it: {e.strerror}") from e
        _check_writable(os.path.join(args.triton_repo, "model.pt"), "--triton-repo")
    models = build_models(args, progress)
    inputs = example_inputs(args, len(models))
    fused = fuse_models(models, args, inputs, progress)
    progress.say(f"exporting {args.format} to {out}" + (" (AOTInductor compiles C++: a minute or more)"
                                                       if args.format == "aoti" else ""))
    # written to a temporary file, verified there, renamed onto `out` only when it passed: a failed export or a
    # failed check leaves whatever was at `out` before
    with atomic_path(out, SUFFIX[args.format]) as tmp:
        try:
            export(fused, inputs, tmp, args.format)
        except Exception as e:
            raise CLIError(f"export as {args.format} failed: {type(e).__name__}: {_first_line(e)}") from e
        progress.say("verifying: loading the artifact back and comparing with the models run one by one")
        try:
            with torch.no_grad():
                got = load(tmp, args.format)(*inputs)
        except Exception as e:
            raise CLIError(f"the exported {args.format} artifact does not load and run (not written): "
                           f"{type(e).__name__}: {_first_line(e)}") from e
        err = relative_error(got, run_each(models, inputs, args.shared_input))
        tol = VERIFY_TOL[DTYPES[args.dtype]]
        if not err <= tol:
            raise CLIError(f"verification failed (not written): max error {err:.3g} x max|output| against the "
                           f"{len(models)} models, above {tol:g} for {args.dtype}")
        size = os.path.getsize(tmp)
    print(f"wrote {out} ({args.format}, {_mib(size)}, {len(models)} models, input "
          f"{' '.join('x'.join(map(str, t.shape)) for t in inputs)}); verified against the {len(models)} models run "
          f"one by one: max error {err:.2e} x max|output|")
    if args.triton_repo:
        write_triton_repo(args.triton_repo, args.name or os.path.splitext(os.path.basename(out))[0], out, inputs,
                          got)
    return 0


_TRITON_TYPES = {torch.float32: "TYPE_FP32", torch.float16: "TYPE_FP16", torch.bfloat16: "TYPE_BF16",
                 torch.float64: "TYPE_FP64", torch.int64: "TYPE_INT64", torch.int32: "TYPE_INT32",
                 torch.bool: "TYPE_BOOL"}


def triton_config(name: str, inputs: Sequence[Tensor], outputs: Sequence[Tensor]) -> str:
    """config.pbtxt for NVIDIA Triton Inference Server's libtorch backend (fixed shapes, no server batching)."""

    def block(kind: str, tensors: Sequence[Tensor]) -> str:
        rows = [f'  {{ name: "{kind.upper()}__{i}" data_type: {_TRITON_TYPES[t.dtype]} '
                f'dims: [ {", ".join(str(d) for d in t.shape)} ] }}' for i, t in enumerate(tensors)]
        return f"{kind} [\n" + ",\n".join(rows) + "\n]\n"

    return (f'name: "{name}"\nplatform: "pytorch_libtorch"\nmax_batch_size: 0\n'
            + block("input", inputs) + block("output", outputs))


def write_triton_repo(repo: str, name: str, artifact: str, inputs: Sequence[Tensor], outputs: Any) -> None:
    from torch.utils._pytree import tree_flatten

    outs = [t for t in tree_flatten(outputs)[0] if isinstance(t, Tensor)]
    version = os.path.join(repo, name, "1")
    os.makedirs(version, exist_ok=True)
    with atomic_path(os.path.join(version, "model.pt")) as tmp:
        shutil.copyfile(artifact, tmp)
    with atomic_path(os.path.join(repo, name, "config.pbtxt")) as tmp:
        with open(tmp, "w") as f:
            f.write(triton_config(name, inputs, outs))
    print(f"wrote Triton model repository entry {os.path.join(repo, name)} (config.pbtxt, 1/model.pt)")


def _mib(b: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{int(b)} B"


def cmd_inspect(args: argparse.Namespace, progress: Progress) -> int:
    models = build_models(args, progress)
    inputs = example_inputs(args, len(models))
    fused = fuse_models(models, args, inputs, progress)
    rep = fused.fusion_report
    n = len(models)
    per_model = sum(p.numel() for p in models[0].parameters())
    weights = sum(t.numel() * t.element_size() for t in list(fused.parameters()) + list(fused.buffers()))
    inp = sum(t.numel() * t.element_size() for t in inputs)
    try:
        act = activation_peak(fused, inputs)
    except Exception:  # an estimate only: never fail inspect on it
        act = -1
    shape = " ".join("x".join(map(str, t.shape)) for t in inputs)
    print(f"{args.arch} x {n} models, {'shared input' if args.shared_input else 'one input per model'} {shape}, "
          f"{args.dtype} on {args.device}")
    print()
    print(f"{'layer kind':<24} {'fused':>5}  how")
    print(f"{'-' * 24} {'-' * 5}  {'-' * 50}")
    for (kind, how), count in sorted(rep.ops.items()):
        print(f"{kind:<24} {count:>5}  {how}")
    for qual, typ, why in rep.fallbacks:
        print(f"{qual + ' (' + typ + ')':<24} {'loop':>5}  fallback loop over the {n} models: {why}")
    if rep.conversions:
        print("layout conversions per forward: "
              + ", ".join(f"{k} {c}" for k, c in sorted(rep.conversions.items())))
    print(f"fallbacks: {len(rep.fallbacks) or 'none'}")
    print()
    print(f"parameters: {per_model:,} per model, {per_model * n:,} for {n} models")
    print(f"memory for {n} models: weights and buffers {_mib(weights)}, example input {_mib(inp)}, "
          + (f"activations at peak (inference, estimated) {_mib(act)}" if act >= 0 else "activations: not estimated"))
    return 0


def _time(fn: Callable[[], Any]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cmd_bench(args: argparse.Namespace, progress: Progress) -> int:
    from torch.func import functional_call, stack_module_state

    models = build_models(args, progress)
    inputs = example_inputs(args, len(models))
    fused = fuse_models(models, args, inputs, progress)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    dims = tuple(None if args.shared_input else 0 for _ in inputs)

    def vmapped(*xs):
        return torch.vmap(lambda p, b, *x: functional_call(base, (p, b), x), in_dims=(0, 0) + dims)(params, buffers,
                                                                                                      *xs)

    providers = {"loop": lambda: run_each(models, inputs, args.shared_input), "vmap": lambda: vmapped(*inputs),
                 "fusecc": lambda: fused(*inputs)}
    ref = providers["loop"]()
    errors = {}
    with torch.no_grad():
        for name, fn in providers.items():
            errors[name] = relative_error(fn(), ref)
        times: Dict[str, List[float]] = {k: [] for k in providers}
        for _ in progress.bar(range(args.warmup + args.repeat), "timing"):
            for name, fn in providers.items():  # interleaved: a slow spell of the machine hits every provider
                times[name].append(_time(fn))
    med = {k: statistics.median(v[args.warmup:]) * 1e3 for k, v in times.items()}
    print(f"{args.arch} x {len(models)} models, input {' '.join('x'.join(map(str, t.shape)) for t in inputs)}, "
          f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'provider':<8} {'ms':>10} {'vs loop':>8} {'max error':>10}")
    for k in providers:
        print(f"{k:<8} {med[k]:>10.2f} {med['loop'] / med[k]:>7.2f}x {errors[k]:>10.1e}")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# parser


class _UsageError(Exception):
    """A usage error found after parsing (exit 2, argparse style)."""


def _common(p: argparse.ArgumentParser, need_input: bool = True) -> None:
    p.add_argument("--arch", required=True, type=_arch, metavar="MODULE:CALLABLE",
                   help="a callable returning the nn.Module, e.g. torchvision.models:resnet18 or models.py:build")
    p.add_argument("--arch-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="keyword arguments for the callable, as a JSON object")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", nargs="+", metavar="FILE",
                     help="one checkpoint per model, in order (.pt/.pth via torch.load(weights_only=True), "
                          ".safetensors)")
    src.add_argument("--num-models", type=_positive, metavar="N", help="N randomly initialised models, no weights")
    p.add_argument("--example-input", type=_shape, action="append", required=need_input, metavar="SHAPE",
                   help="per-model input shape, e.g. 4,3,224,224 (repeat for a model with several inputs)")
    p.add_argument("--shared-input", action="store_true",
                   help="every model reads the same input (no leading model dim on the inputs)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation and example inputs")
    p.add_argument("--tune", action="store_true",
                   help="time each layer's candidate lowerings once and keep the fastest (cached on disk)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusecc", description="Fuse N models of one architecture into one module, and export it.")
    parser.add_argument("--version", action="version", version=f"fusecc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,inspect,bench}")
    e = sub.add_parser("export", help="write one fused artifact (TorchScript, torch.export .pt2, AOTInductor)",
                       description="Fuse the N models and write one artifact that runs them all, then load it back "
                                   "and check it against the N models run one by one.")
    _common(e)
    e.add_argument("--format", choices=FORMATS, default="torchscript",
                   help="torchscript (torch.jit; deprecated by torch but what servers load), pt2 (torch.export), "
                        "aoti (AOTInductor package)")
    e.add_argument("-o", "--output", metavar="FILE", help="output file (default fleet.pt / fleet.pt2)")
    e.add_argument("--triton-repo", metavar="DIR",
                   help="also write DIR/<name>/1/model.pt and DIR/<name>/config.pbtxt for NVIDIA Triton Inference "
                        "Server (torchscript only)")
    e.add_argument("--name", help="model name in the Triton repository (default: the output file's stem)")
    i = sub.add_parser("inspect", help="what fuses and how, fallbacks, parameters and memory for N models")
    _common(i)
    b = sub.add_parser("bench", help="time the fused module against a loop over the models and torch.func vmap")
    _common(b)
    b.add_argument("--repeat", type=_positive, default=10)
    b.add_argument("--warmup", type=int, default=2)
    return parser


COMMANDS = {"export": cmd_export, "inspect": cmd_inspect, "bench": cmd_bench}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    progress = Progress(args.quiet)
    try:
        return COMMANDS[args.command](args, progress)
    except _UsageError as e:
        parser.error(str(e))
    except CLIError as e:
        progress.close()
        print(f"fusecc: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fusecc: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
