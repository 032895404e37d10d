"""Models from code and checkpoints: an architecture named ``module:callable`` (or ``path/to/file.py:callable``) and
one state-dict file per model. Used by the ``fusecc`` command, and by anything that builds a fleet from files.

Checkpoints are read with ``torch.load(weights_only=True)``, never a full unpickle: a plain state dict, one nested
under a usual key (``state_dict``, ``model``, ...), or one saved from DataParallel (``module.`` keys); and
``.safetensors`` files. Every failure is a :class:`CheckpointError` whose one-line message names the file or the
architecture and says what is wrong.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .check import PROVENANCE
from .errors import first_line, strip_ansi


class CheckpointError(ValueError):
    """An architecture or a checkpoint that cannot be loaded (the message names it and says why)."""


def load_factory(spec: str, label: Optional[str] = None) -> Callable[..., nn.Module]:
    """``module:callable`` or ``path/to/file.py:callable`` -> the callable (dotted attributes allowed). Errors name the
    architecture as ``label`` (default ``architecture <spec>``; the CLI says ``--arch <spec>``)."""
    label = label or f"architecture {spec}"
    mod_name, _, attr = spec.rpartition(":")
    try:
        if mod_name.endswith(".py") or os.sep in mod_name:
            if not os.path.isfile(mod_name):
                raise CheckpointError(f"{label}: no such file {mod_name!r}")
            name = "_fusecc_arch_" + os.path.splitext(os.path.basename(mod_name))[0]
            loader_spec = importlib.util.spec_from_file_location(name, mod_name)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            loader_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:  # as `python -m` does: the current directory's modules import
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod_name)
    except CheckpointError:
        raise
    except Exception as e:  # ImportError, or anything the user's module raises while importing
        raise CheckpointError(f"{label}: cannot import {mod_name!r}: {type(e).__name__}: {first_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise CheckpointError(f"{label}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CheckpointError(f"{label}: {attr!r} is a {type(obj).__name__}, not a callable returning an nn.Module")
    return obj


def build_model(factory: Callable[..., nn.Module], label: str, kwargs: Dict[str, Any]) -> nn.Module:
    """``factory(**kwargs)``, checked to be an nn.Module."""
    try:
        model = factory(**kwargs)
    except Exception as e:
        raise CheckpointError(f"{label}: calling it with {kwargs} failed: {type(e).__name__}: {first_line(e)}") from e
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{label} returned a {type(model).__name__}, not an nn.Module")
    return model


_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")


def load_checkpoint(path: str) -> Dict[str, Tensor]:
    """A state dict from a .safetensors or .pt/.pth file (``torch.load(weights_only=True)``: never a full unpickle)."""
    if not os.path.exists(path):
        raise CheckpointError(f"weights file {path!r} does not exist")
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise CheckpointError(f"weights file {path!r} is not a readable file")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path)
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = strip_ansi(str(e))
        why = next((ln.strip() for ln in text.splitlines() if "WeightsUnpickler error" in ln), first_line(e))
        raise CheckpointError(f"weights file {path!r} holds more than tensors, and torch.load(weights_only=True) "
                              f"refuses to unpickle it ({why}); save model.state_dict() instead") from e
    except Exception as e:
        raise CheckpointError(f"weights file {path!r} is not a PyTorch or safetensors checkpoint (loading it failed "
                              f"with {type(e).__name__}: {first_line(e)})") from e
    if isinstance(obj, dict) and not all(isinstance(v, Tensor) for v in obj.values()):
        for key in _NESTED_KEYS:  # {"state_dict": {...}, "epoch": 3, ...}
            if isinstance(obj.get(key), dict) and all(isinstance(v, Tensor) for v in obj[key].values()):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"weights file {path!r} is not a state dict (a dict of tensors, possibly under one of "
                              f"{list(_NESTED_KEYS)}); got a {type(obj).__name__}")
    if all(k.startswith("module.") for k in obj):  # saved from DataParallel / DistributedDataParallel
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _short(keys: List[str], most: int = 4) -> str:
    shown = ", ".join(keys[:most])
    return f"[{shown}{', ...' if len(keys) > most else ''}] ({len(keys)})"


def load_into(model: nn.Module, sd: Dict[str, Tensor], path: str, label: str = "the model") -> None:
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
        raise CheckpointError(f"weights file {path!r} does not fit {label}: " + "; ".join(parts))
    model.load_state_dict(sd)


def load_fleet(arch: str, arch_kwargs: Optional[Dict[str, Any]] = None, weights: Sequence[str] = (),
               num_models: int = 0, on_each: Optional[Callable[[Sequence[Any]], Sequence[Any]]] = None,
               label: Optional[str] = None) -> List[nn.Module]:
    """The N models: ``arch`` built once per checkpoint in ``weights`` and loaded strictly, or ``num_models`` random
    initialisations when no weights are given. ``on_each`` wraps the iteration (a progress bar, say)."""
    label = label or f"architecture {arch}"
    factory = load_factory(arch, label)
    kwargs = arch_kwargs or {}
    wrap = on_each or (lambda items: items)
    models: List[nn.Module] = []
    if weights:
        for path in wrap(list(weights)):
            sd = load_checkpoint(path)
            model = build_model(factory, label, kwargs)
            load_into(model, sd, path, label)
            models.append(model)
    else:
        for _ in wrap(range(num_models)):
            models.append(build_model(factory, label, kwargs))
    return models


# ---------------------------------------------------------------------------------------------- Hugging Face



def hf_configs_agree(configs: Sequence[Any], dirs: Sequence[str]) -> None:
    """Raise a CheckpointError naming the first field in which a config differs from the first one (the models of a
    fleet must be one architecture: the same class and every architectural field equal; label names may differ)."""
    ref = configs[0].to_dict()
    for cfg, d in zip(configs[1:], dirs[1:]):
        other = cfg.to_dict()
        for key in sorted(set(ref) | set(other)):
            if key in PROVENANCE:
                continue
            if ref.get(key) != other.get(key):
                raise CheckpointError(
                    f"{d!r} is not the architecture of {dirs[0]!r}: config field {key!r} is {other.get(key)!r} there "
                    f"and {ref.get(key)!r} in {dirs[0]!r}; a fleet is N models of one architecture that differ only "
                    "in their weights")


def load_hf_fleet(dirs: Sequence[str], on_each: Optional[Callable[[Sequence[Any]], Sequence[Any]]] = None
                  ) -> List[nn.Module]:
    """The N models of a fleet of Hugging Face checkpoints (directories written by ``save_pretrained``: config.json
    and model.safetensors), read locally (never a download), after checking that their configs agree."""
    try:
        import transformers
    except ImportError as e:
        raise CheckpointError("--hf needs the transformers package (pip install transformers)") from e
    configs = []
    for d in dirs:
        if not os.path.isdir(d):
            raise CheckpointError(f"Hugging Face checkpoint {d!r} is not a directory (expected one written by "
                                  "save_pretrained: config.json + model.safetensors)")
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise CheckpointError(f"Hugging Face checkpoint {d!r} has no config.json")
        try:
            configs.append(transformers.AutoConfig.from_pretrained(d, local_files_only=True))
        except Exception as e:
            raise CheckpointError(f"Hugging Face checkpoint {d!r}: config.json does not load: {type(e).__name__}: "
                                  f"{first_line(e)}") from e
    hf_configs_agree(configs, dirs)
    archs = getattr(configs[0], "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise CheckpointError(f"Hugging Face checkpoint {dirs[0]!r}: config.json names no model class transformers "
                              f"{transformers.__version__} has (architectures: {archs})")
    wrap = on_each or (lambda items: items)
    models = []
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # (one bar per checkpoint's tensors: the caller has its own)
    try:
        for d in wrap(list(dirs)):
            try:
                models.append(cls.from_pretrained(d, local_files_only=True))
            except Exception as e:
                raise CheckpointError(f"Hugging Face checkpoint {d!r} does not load as {cls.__name__}: "
                                      f"{type(e).__name__}: {first_line(e)}") from e
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return models


def hf_example_inputs(model: nn.Module, n: int, shape: Sequence[int], shared: bool, seed: int = 0
                      ) -> Dict[str, Tensor]:
    """Example keyword inputs for a transformers model: ``input_ids`` of per-model shape ``shape`` (batch, sequence)
    with random tokens and an ``attention_mask`` that pads each model's rows differently, or ``pixel_values`` of
    ``shape`` for a vision model. A leading N unless ``shared``."""
    gen = torch.Generator().manual_seed(seed)
    lead = () if shared else (n,)
    name = getattr(model, "main_input_name", "input_ids")
    if name != "input_ids":
        return {name: torch.randn(lead + tuple(shape), generator=gen)}
    if len(shape) != 2:
        raise CheckpointError(f"--example-input for a text model is its token ids' shape: batch,sequence (e.g. 4,128); "
                              f"got {','.join(map(str, shape))}")
    vocab = int(getattr(model.config, "vocab_size", 2) or 2)
    ids = torch.randint(0, vocab, lead + tuple(shape), generator=gen)
    mask = torch.ones_like(ids)
    b, s = shape
    if s > 1:  # padding at the end of some rows, different per model
        pads = torch.randint(0, max(1, s // 2), lead + (b,), generator=gen)
        mask = (torch.arange(s) < (s - pads)[..., None]).long()
    return {"input_ids": ids, "attention_mask": mask}
