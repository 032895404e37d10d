"""The ``fusecc`` command: turn N checkpoints of one architecture into one fused artifact, inspect, bench.

    fusecc export --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}' \\
           --weights ft/*.pt --example-input 4,3,224,224 --format torchscript -o fleet.pt
    fusecc inspect --arch torchvision.models:resnet18 --num-models 8 --example-input 4,3,64,64
    fusecc bench --arch torchvision.models:resnet18 --num-models 8 --example-input 4,3,64,64
    fusecc export --hf ft/bert-*/ --example-input 4,128 --format pt2 -o bert-fleet.pt2   # save_pretrained dirs
    fusecc serve --hf ft/bert-*/ --port 8000          # Open Inference Protocol (KServe v2), one name per model
    fusecc swap --url http://127.0.0.1:8000 --model bert-a --weights new.safetensors   # hot swap

Exit status: 0 success, 1 a bad input or a failed export (one line on stderr naming the culprit), 2 a usage error.
This module only parses arguments and reports: loading the models (fusecc/checkpoints.py), fusing, exporting
(fusecc/export.py), verifying (fusecc/verify.py), the Triton repository entry (fusecc/model_repository.py) and the
timing (fusecc/benchmark.py) are library functions.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from .api import FusedModule, fuse
from .benchmark import compare
from .checkpoints import CheckpointError, hf_example_inputs, load_fleet, load_hf_fleet
from .errors import FusionError, first_line
from .export import FORMATS, SUFFIX, artifact_inputs, atomic_path, dynamic_dims, export, load
from .memory import activation_peak
from .model_repository import write_triton_repo
from .verify import VerificationError, check_outputs
from .version import __version__

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


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


def build_models(args: argparse.Namespace, progress: Progress) -> List[nn.Module]:
    torch.manual_seed(args.seed)
    what = f"loading {len(args.weights or args.hf)} checkpoints" if args.weights or args.hf else \
        f"initialising {args.num_models} models"
    try:
        if args.hf:
            models = load_hf_fleet(args.hf, on_each=lambda items: progress.bar(items, what))
            if getattr(models[0].config, "use_cache", False):  # a causal LM: the artifact computes logits, no cache
                progress.say("use_cache = False on the models: the fused artifact returns logits, not a KV cache")
                for m in models:
                    m.config.use_cache = False
        else:
            models = load_fleet(args.arch, args.arch_kwargs, args.weights or (), args.num_models or 0,
                                on_each=lambda items: progress.bar(items, what), label=f"--arch {args.arch}")
    except CheckpointError as e:
        raise CLIError(str(e)) from e
    try:
        device = torch.device(args.device)
        return [m.to(device=device, dtype=DTYPES[args.dtype]).eval() for m in models]
    except (RuntimeError, AssertionError) as e:
        raise CLIError(f"--device {args.device}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def example_inputs(args: argparse.Namespace, models: List[nn.Module], shape_index: int = 0) -> Any:
    """Random fused inputs: ``[N, *shape]`` per model, or ``[*shape]`` with --shared-input. A Hugging Face fleet
    takes keywords: token ids of shape --example-input (batch,sequence) and per-model attention masks, or pixel
    values. ``shape_index`` 1: a second shape (one more row, one token fewer) to check a dynamic artifact."""
    n = len(models)
    if args.hf:
        if len(args.example_input) != 1:
            raise CLIError("--hf takes one --example-input: the token ids' batch,sequence (or the pixel values' shape)")
        shape = list(args.example_input[0])
        if shape_index:
            shape[0] += 1
            if len(shape) == 2 and shape[1] > 2:
                shape[1] -= 1
        try:
            inputs = hf_example_inputs(models[0], n, shape, args.shared_input, args.seed + shape_index)
        except CheckpointError as e:
            raise CLIError(str(e)) from e
        return {k: v.to(args.device) if not v.is_floating_point() else v.to(args.device, DTYPES[args.dtype])
                for k, v in inputs.items()}
    gen = torch.Generator().manual_seed(args.seed)
    out = []
    for shape in args.example_input:
        full = tuple(shape) if args.shared_input else (n,) + tuple(shape)
        out.append(torch.randn(full, generator=gen).to(device=args.device, dtype=DTYPES[args.dtype]))
    return tuple(out)


def _source(args: argparse.Namespace) -> str:
    return f"--hf {args.hf[0]}" + (" ..." if len(args.hf) > 1 else "") if args.hf else f"--arch {args.arch}"


def _shapes(inputs: Any) -> str:
    tensors = [t for t in (inputs.values() if isinstance(inputs, dict) else inputs) if isinstance(t, Tensor)]
    return " ".join("x".join(map(str, t.shape)) for t in tensors)


def fuse_models(models: List[nn.Module], args: argparse.Namespace, inputs: Any, progress: Progress) -> FusedModule:
    progress.say(f"capturing and fusing {len(models)} models")
    try:
        fused = fuse(models, shared_inputs=args.shared_input, tune=args.tune).eval()
        if isinstance(inputs, dict):
            fused.compile_for(**inputs)
        else:
            fused.compile_for(*inputs)
    except FusionError as e:
        raise CLIError(f"cannot fuse {_source(args)}: " + " ".join(str(e).split("\n")[:2])) from e
    except (ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"cannot run {_source(args)} on --example-input "
                       f"{' '.join(','.join(map(str, s)) for s in args.example_input)}: "
                       f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return fused


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
    if args.routed:
        return _export_routed(args, progress, out)
    models = build_models(args, progress)
    inputs = example_inputs(args, models)
    fused = fuse_models(models, args, inputs, progress)
    dynamic = bool(args.hf)
    progress.say(f"exporting {args.format} to {out}" + (" (AOTInductor compiles C++: a minute or more)"
                                                       if args.format == "aoti" else "")
                 + (" with a dynamic batch size and sequence length" if dynamic else ""))
    tensors = artifact_inputs(fused, inputs)
    # written to a temporary file, verified there, renamed onto `out` only when it passed: a failed export or a
    # failed check leaves whatever was at `out` before
    with atomic_path(out, SUFFIX[args.format]) as tmp:
        try:
            export(fused, inputs, tmp, args.format, dynamic=dynamic)
        except Exception as e:
            raise CLIError(f"export as {args.format} failed: {type(e).__name__}: {first_line(e)}") from e
        progress.say("verifying: loading the artifact back and comparing with the models run one by one")
        try:
            artifact = load(tmp, args.format)
            with torch.no_grad():
                got = artifact(*tensors)
        except Exception as e:
            raise CLIError(f"the exported {args.format} artifact does not load and run (not written): "
                           f"{type(e).__name__}: {first_line(e)}") from e
        checks = [(inputs, got)]
        if dynamic:  # a second batch size and sequence length: the artifact must not be specialised to the first
            other = example_inputs(args, models, shape_index=1)
            try:
                with torch.no_grad():
                    checks.append((other, artifact(*artifact_inputs(fused, other))))
            except Exception as e:
                raise CLIError(f"the exported {args.format} artifact does not run at a second size "
                               f"({_shapes(other)}; not written): {type(e).__name__}: {first_line(e)}") from e
        try:
            err = max(check_outputs(g, models, i, args.shared_input, what=f"the exported {args.format} artifact "
                                    f"at {_shapes(i)}") for i, g in checks)
        except VerificationError as e:
            raise CLIError(f"verification failed (not written): {e}") from e
        size = os.path.getsize(tmp)
    print(f"wrote {out} ({args.format}, {_mib(size)}, {len(models)} models, input {_shapes(inputs)}"
          + (", batch and sequence dynamic" if dynamic else "") + f"); verified against the {len(models)} models "
          f"run one by one{' at ' + ' and '.join(_shapes(i) for i, _ in checks) if dynamic else ''}: "
          f"max error {err:.2e} x max|output|")
    if args.triton_repo:
        entry = write_triton_repo(args.triton_repo, args.name or os.path.splitext(os.path.basename(out))[0], out,
                                  tensors, got, dynamic_dims(fused, tensors) if dynamic else None,
                                  checks[1][1] if dynamic else None)
        print(f"wrote Triton model repository entry {entry} (config.pbtxt, 1/model.pt)")
    return 0


def _routed_inputs(args: argparse.Namespace, models: List[nn.Module], second: bool) -> Tuple[List[str], list, Tensor]:
    """Rows of any models for a routed artifact: the inputs ``[R, ...]`` (a transformers model: token ids of
    --example-input's batch,sequence, with an attention mask padding some rows) and each row's model id."""
    from .serve.fleet import is_transformers

    n = len(models)
    shape = list(args.example_input[0])
    if second:
        shape[0] += 1
        if len(shape) == 2 and shape[1] > 2:
            shape[1] -= 1
    gen = torch.Generator().manual_seed(args.seed + int(second))
    model_id = torch.arange(shape[0]) % n
    model_id = model_id[torch.randperm(shape[0], generator=gen)]
    if is_transformers(models[0]):
        if len(shape) != 2:
            raise CLIError("--routed with a transformers model takes one --example-input: batch,sequence")
        try:
            ins = hf_example_inputs(models[0], n, shape, True, args.seed + int(second))
        except CheckpointError as e:
            raise CLIError(str(e)) from e
        names = [k for k in ("input_ids", "attention_mask") if k in ins]
        return names, [ins[k].to(args.device) for k in names], model_id.to(args.device)
    tensors = [torch.randn([shape[0], *s[1:]], generator=gen).to(args.device, DTYPES[args.dtype])
               for s in args.example_input]
    return [f"input_{i}" for i in range(len(tensors))], tensors, model_id.to(args.device)


def _export_routed(args: argparse.Namespace, progress: Progress, out: str) -> int:
    """``fusecc export --routed``: one artifact taking rows of any models plus a model id per row."""
    from .serve.fleet import is_transformers
    from .serve.routed import flatten_outputs, routed_entry

    if args.format not in ("pt2", "torchscript"):
        raise _UsageError("--routed exports --format pt2 or torchscript")
    if args.shared_input:
        raise _UsageError("--routed takes rows with a model id each; --shared-input does not apply")
    models = build_models(args, progress)
    names, tensors, model_id = _routed_inputs(args, models, False)
    hf = is_transformers(models[0])
    progress.say(f"capturing and fusing {len(models)} models")
    try:
        fused = fuse(models).eval()
        entry = routed_entry(fused, names, hf)
    except (FusionError, ValueError) as e:
        raise CLIError(f"cannot export {_source(args)} routed: {first_line(e)}") from e
    var = [[0] + ([1] if hf else []) for _ in tensors] + [[0]]
    progress.say(f"exporting a routed {args.format} artifact to {out} (rows and model ids dynamic)")

    def oracle(ts: list, ids: Tensor) -> Dict[str, Tensor]:
        rows = []
        with torch.no_grad():
            for r, k in enumerate(ids.tolist()):
                one = [t[r:r + 1] for t in ts]
                rows.append(flatten_outputs(models[k](**dict(zip(names, one))) if hf else models[k](*one)))
        return {k: torch.cat([o[k] for o in rows]) for k in rows[0]}

    with atomic_path(out, SUFFIX[args.format]) as tmp:
        args_in = (*tensors, model_id)
        try:
            with torch.no_grad():
                if args.format == "pt2":
                    dims = [{d: torch.export.Dim.AUTO for d in v} for v in var]
                    ep = torch.export.export(entry, args_in, dynamic_shapes=(tuple(dims),), strict=False)
                    torch.export.save(ep, tmp)
                else:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        torch.jit.save(torch.jit.trace(entry, args_in, strict=False, check_trace=False), tmp)
        except Exception as e:
            raise CLIError(f"routed export as {args.format} failed: {type(e).__name__}: {first_line(e)}") from e
        progress.say("verifying: each row against its model run alone, at two sizes")
        artifact = load(tmp, args.format)
        checks = []
        for second in (False, True):
            _, ts, ids = _routed_inputs(args, models, second) if second else (names, tensors, model_id)
            with torch.no_grad():
                got = artifact(*ts, ids)
            ref = oracle(ts, ids)
            err = max(float((got[k] - ref[k]).abs().max()) / max(float(ref[k].abs().max()), 1e-12) for k in ref)
            if err > 1e-4:
                raise CLIError(f"verification failed (not written): the routed artifact differs from the models by "
                               f"{err:.2e} x max|output| at {_shapes(ts)}")
            checks.append((ts, ids, got, err))
        size = os.path.getsize(tmp)
    print(f"wrote {out} (routed {args.format}, {_mib(size)}, {len(models)} models; inputs "
          f"{', '.join(names)} [rows, ...] and model_id [rows]); verified row by row against the models at "
          f"{' and '.join(_shapes(c[0]) for c in checks)}: max error {max(c[3] for c in checks):.2e} x max|output|")
    if args.triton_repo:
        from .model_repository import triton_routed_config, write_triton_config
        got0, got1 = checks[0][2], checks[1][2]
        outs0 = list(got0.values())
        var_out = [[d for d in range(a.dim()) if a.shape[d] != b.shape[d]] for a, b in zip(outs0, got1.values())]
        name = args.name or os.path.splitext(os.path.basename(out))[0]
        cfg = triton_routed_config(name, [*tensors, model_id.reshape(-1, 1)], outs0, var, var_out, args.max_batch)
        entry_dir = write_triton_config(args.triton_repo, name, out, cfg)
        print(f"wrote Triton model repository entry {entry_dir} (config.pbtxt with dynamic batching, 1/model.pt)")
    return 0


def _mib(b: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= scale:
            return f"{b / scale:,.1f} {unit}"
    return f"{int(b)} B"


def cmd_inspect(args: argparse.Namespace, progress: Progress) -> int:
    models = build_models(args, progress)
    inputs = example_inputs(args, models)
    fused = fuse_models(models, args, inputs, progress)
    rep = fused.fusion_report
    n = len(models)
    per_model = sum(p.numel() for p in models[0].parameters())
    weights = sum(t.numel() * t.element_size() for t in list(fused.parameters()) + list(fused.buffers()))
    tensors = artifact_inputs(fused, inputs)
    inp = sum(t.numel() * t.element_size() for t in tensors)
    try:
        act = activation_peak(fused, inputs)
    except Exception:  # an estimate only: never fail inspect on it
        act = -1
    what = f"{type(models[0]).__name__} ({args.hf[0]} ...)" if args.hf else args.arch
    print(f"{what} x {n} models, {'shared input' if args.shared_input else 'one input per model'} "
          f"{_shapes(inputs)}, {args.dtype} on {args.device}; captured by {fused.captured_by}")
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
    wb = fused.weight_bytes()
    shared_params = sum(fused.get_parameter(k).numel() for k in fused.shared_tensors if k in dict(fused.named_parameters()))
    print(f"parameters: {per_model:,} per model, {per_model * n:,} for {n} models"
          + (f"; {shared_params:,} of them equal in every model, stored once" if shared_params else ""))
    print(f"weights and buffers: {_mib(wb['shared'])} shared by all models (stored once, "
          f"{len(fused.shared_tensors)} tensors), {_mib(wb['per_model'])} in per-model tensors ({n} models); "
          f"{_mib(wb['unfused'])} as {n} separate models")
    print(f"memory for {n} models: weights and buffers {_mib(weights)}, example input {_mib(inp)}, "
          + (f"activations at peak (inference, estimated) {_mib(act)}" if act >= 0 else "activations: not estimated"))
    return 0


def cmd_bench(args: argparse.Namespace, progress: Progress) -> int:
    models = build_models(args, progress)
    inputs = example_inputs(args, models)
    fused = fuse_models(models, args, inputs, progress)
    rows = compare(models, fused, inputs, args.shared_input, args.repeat, args.warmup,
                   rounds=lambda r: progress.bar(r, "timing"))
    loop_ms = next(r.median_ms for r in rows if r.provider == "loop")
    print(f"{_source(args)[2:]} x {len(models)} models, input {_shapes(inputs)}, "
          f"{args.dtype} on {args.device}, {torch.get_num_threads()} threads, median of {args.repeat}")
    print(f"{'provider':<8} {'ms':>10} {'vs loop':>8} {'max error':>10}")
    for r in rows:
        if r.note:
            print(f"{r.provider:<8} {r.note}")
            continue
        print(f"{r.provider:<8} {r.median_ms:>10.2f} {loop_ms / r.median_ms:>7.2f}x {r.rel_error:>10.1e}")
    return 0


def _names(args: argparse.Namespace, n: int) -> List[str]:
    if args.names:
        if len(args.names) != n:
            raise _UsageError(f"--names gives {len(args.names)} names for {n} models; give one per model")
        return list(args.names)
    paths = args.weights or args.hf
    if paths:  # the checkpoints' file or directory names, when they are unique
        stems = [os.path.splitext(os.path.basename(os.path.normpath(p)))[0] for p in paths]
        if len(set(stems)) == len(stems):
            return stems
    return [f"model-{i}" for i in range(n)]


def cmd_serve(args: argparse.Namespace, progress: Progress) -> int:
    from .serve.fleet import ServedFleet, inputs_from_example, is_transformers  # (the HTTP layer: below)

    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        from .serve.server import FleetServer
    except ImportError as e:
        raise CLIError(f"fusecc serve needs its extra packages: pip install 'fusecc[serve]' ({e})") from e
    models = build_models(args, progress)
    names = _names(args, len(models))
    if not is_transformers(models[0]) and not args.example_input:
        raise _UsageError("--example-input is required with --arch: the input shape of one batch, e.g. "
                          "1,3,32,32 (the batch dim is dynamic)")
    specs, length = inputs_from_example(models[0], args.example_input or (), DTYPES[args.dtype])
    progress.say(f"fusing {len(models)} models and measuring the batch costs" if args.mode == "fused"
                 else f"loading {len(models)} models")
    try:
        fleet = ServedFleet(models, names, inputs=specs, mode=args.mode, strategy=args.strategy,
                            max_batch=args.max_batch, example_length=length)
    except (FusionError, ValueError, TypeError, RuntimeError) as e:
        raise CLIError(f"cannot serve {_source(args)}: {type(e).__name__}: {first_line(e)}") from e
    del models
    try:
        server = FleetServer(fleet, args.host, args.port, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
                             max_body_bytes=int(args.max_body_mb * 2**20), log_level="warning")
    except OSError as e:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {e}") from e
    logging.getLogger("fusecc.serve").info(
        "fusecc serve %s: %s; listening on %s (max batch %d rows, max delay %g ms, queue %d rows, %d torch threads)",
        __version__, fleet.describe(), server.url, args.max_batch, args.max_delay_ms, args.max_queue,
        torch.get_num_threads())
    server.serve_forever()
    return 0


def cmd_swap(args: argparse.Namespace, progress: Progress) -> int:
    """New weights for one served model (the repository load API with the file's bytes)."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    try:
        with open(args.weights, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CLIError(f"--weights {args.weights}: {e.strerror or e}") from e
    body = json.dumps({"parameters": {f"file:{os.path.basename(args.weights)}": base64.b64encode(data).decode()}})
    url = f"{args.url.rstrip('/')}/v2/repository/models/{urllib.parse.quote(args.model, safe='')}/load"
    req = urllib.request.Request(url, data=body.encode(), method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=args.timeout) as r:
            doc = json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        try:
            msg = json.loads(e.read()).get("error", "")
        except ValueError:
            msg = ""
        raise CLIError(f"the server refused the new weights for {args.model!r} (HTTP {e.code}): {msg}") from e
    except (urllib.error.URLError, OSError) as e:
        raise CLIError(f"cannot reach {args.url}: {getattr(e, 'reason', e)}") from e
    print(f"{args.model}: new weights from {args.weights} (swap {doc.get('swaps', '?')})")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# parser


class _UsageError(Exception):
    """A usage error found after parsing (exit 2, argparse style)."""


def _common(p: argparse.ArgumentParser, need_input: bool = True) -> None:
    p.add_argument("--arch", type=_arch, metavar="MODULE:CALLABLE",
                   help="a callable returning the nn.Module, e.g. torchvision.models:resnet18 or models.py:build "
                        "(with --weights or --num-models)")
    p.add_argument("--arch-kwargs", type=_json_object, default=None, metavar="JSON",
                   help="keyword arguments for the callable, as a JSON object")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--weights", nargs="+", metavar="FILE",
                     help="one checkpoint per model, in order (.pt/.pth via torch.load(weights_only=True), "
                          ".safetensors)")
    src.add_argument("--num-models", type=_positive, metavar="N", help="N randomly initialised models, no weights")
    src.add_argument("--hf", nargs="+", metavar="DIR",
                     help="one Hugging Face checkpoint per model (directories written by save_pretrained: config.json "
                          "+ model.safetensors; their configs must agree); no --arch")
    p.add_argument("--example-input", type=_shape, action="append", required=need_input, metavar="SHAPE",
                   help="per-model input shape, e.g. 4,3,224,224 (repeat for a model with several inputs); with --hf "
                        "the token ids' batch,sequence, e.g. 4,128")
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
    sub = parser.add_subparsers(dest="command", required=True, metavar="{export,inspect,bench,serve,swap}")
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
    e.add_argument("--routed", action="store_true",
                   help="one artifact for rows of any models: inputs [rows, ...] plus model_id [rows], rows and "
                        "sequence length dynamic (transformers fleets: Linear/LayerNorm/Embedding weights); with "
                        "--triton-repo a config with max_batch_size and dynamic batching")
    e.add_argument("--max-batch", type=_positive, default=64,
                   help="max_batch_size of the routed artifact's Triton config (default 64)")
    i = sub.add_parser("inspect", help="what fuses and how, fallbacks, parameters and memory for N models")
    _common(i)
    b = sub.add_parser("bench", help="time the fused module against a loop over the models and torch.func vmap")
    _common(b)
    b.add_argument("--repeat", type=_positive, default=10)
    b.add_argument("--warmup", type=int, default=2)
    s = sub.add_parser("serve", help="serve the fleet over HTTP (Open Inference Protocol / KServe v2)",
                       description="Serve the N models over HTTP with the Open Inference Protocol (KServe v2): each "
                                   "model under its own name, requests for any of them batched into one fused call. "
                                   "SIGTERM or Ctrl-C answers the requests in flight, then exits.")
    _common(s, need_input=False)
    s.add_argument("--names", nargs="+", metavar="NAME",
                   help="one name per model (default: the checkpoint file or directory names, else model-0 ...)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--max-batch", type=_positive, default=32, help="the most rows in one batch (default 32)")
    s.add_argument("--max-delay-ms", type=float, default=5.0,
                   help="how long the first request of a batch waits for others (default 5)")
    s.add_argument("--max-queue", type=_positive, default=1024,
                   help="rows waiting at most; beyond, requests get 503 with Retry-After (default 1024)")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="largest request body in MiB (413 beyond)")
    s.add_argument("--mode", choices=["fused", "per-model"], default="fused",
                   help="fused (fusecc) or per-model (N eager models, a call per model per batch: a baseline)")
    s.add_argument("--strategy", choices=["auto", "fused", "per-model", "routed"], default="auto",
                   help="how a fused fleet runs a batch: auto (from costs measured at start-up), fused (always one "
                        "fused call), per-model, or routed (rows sorted by model through one routed copy: "
                        "transformers)")
    s.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
    w = sub.add_parser("swap", help="give one model of a running server new weights (hot swap)",
                       description="Send new weights for one model to a running fusecc serve (the Open Inference "
                                   "Protocol's repository load API). Requests keep being served; each sees either "
                                   "the old or the new weights.")
    w.add_argument("--url", default="http://127.0.0.1:8000")
    w.add_argument("--model", required=True, help="the served model's name")
    w.add_argument("--weights", required=True, metavar="FILE", help="a state dict file (.pt/.pth/.safetensors)")
    w.add_argument("--timeout", type=float, default=120.0)
    w.add_argument("-q", "--quiet", action="store_true")
    return parser


COMMANDS = {"export": cmd_export, "inspect": cmd_inspect, "bench": cmd_bench, "serve": cmd_serve, "swap": cmd_swap}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.command == "swap":
        try:
            return cmd_swap(args, Progress(args.quiet))
        except CLIError as e:
            print(f"fusecc: error: {e}", file=sys.stderr)
            return 1
    if args.hf and args.arch:
        parser.error("--hf reads the architecture from the checkpoints' config.json: give --arch or --hf, not both")
    if not args.hf and not args.arch:
        parser.error("the following arguments are required: --arch (or --hf DIR ...)")
    if args.hf and args.arch_kwargs:
        parser.error("--arch-kwargs goes with --arch; --hf reads the configuration from config.json")
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
