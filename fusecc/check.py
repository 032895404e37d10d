"""Check that N models differ only in their weights; the error names the first difference."""

from __future__ import annotations

from typing import Any, List

import torch.nn as nn
from torch import Tensor

from .errors import FusionError


def _fmt(v: Any) -> str:
    if isinstance(v, Tensor):
        return f"tensor of shape {list(v.shape)}"
    return repr(v)


# what says where a model came from, not what it computes: a Hugging Face model's checkpoint path and the
# provenance fields of its config (label names too: fine-tunes of one architecture name their classes as they like)
PROVENANCE = {"name_or_path", "_name_or_path", "transformers_version", "_commit_hash", "_attn_implementation_autoset",
              "torch_dtype", "dtype", "id2label", "label2id", "finetuning_task", "_is_quantized"}


def config_of(mod: nn.Module) -> dict:
    """The non-tensor configuration of one module (its own attributes: stride, p, eps, ...). A module may name
    attributes fusecc carries per model itself in ``_fusecc_per_model_config`` (a LoRA layer's scaling,
    fusecc/lora.py)."""
    skip = getattr(mod, "_fusecc_per_model_config", ())
    return {
        k: v
        for k, v in vars(mod).items()
        if not k.startswith("_") and k != "training" and k not in PROVENANCE and k not in skip
        and not isinstance(v, (Tensor, nn.Module))
    }


def _same(a: Any, b: Any) -> bool:
    if type(a) is type(b) and callable(getattr(a, "to_dict", None)) and hasattr(a, "model_type"):  # an HF config
        da, db = a.to_dict(), b.to_dict()
        return all(da.get(k) == db.get(k) for k in set(da) | set(db) if k not in PROVENANCE)
    try:
        r = a == b
        if isinstance(r, bool):
            return r
    except Exception:
        pass
    return repr(a) == repr(b)


def check_models(models: Any, prepare: Any = None) -> Any:
    """Validate the models passed to ``fuse``; return them as a list (or, with ``prepare``, what
    ``prepare(list_of_models)`` returns: ``(models to compare and fuse, extra)``)."""
    if isinstance(models, nn.Module) and not isinstance(models, (nn.ModuleList, nn.Sequential)):
        raise TypeError(
            f"fusecc.fuse: expected a sequence of models, got one {type(models).__name__}; pass a list, "
            "e.g. fuse([model_a, model_b])"
        )
    if isinstance(models, nn.Sequential) and len({type(m) for m in models}) > 1:
        # an nn.Sequential of different layers is one model, not a list of models
        raise TypeError(
            f"fusecc.fuse: expected a sequence of models, got one nn.Sequential model ({len(models)} layers: "
            f"{', '.join(type(m).__name__ for m in list(models)[:3])}{', ...' if len(models) > 3 else ''}); pass a "
            "list of models, e.g. fuse([model_a, model_b])"
        )
    if isinstance(models, (nn.ModuleList, nn.Sequential)):
        models = list(models)
    try:
        models = list(models)
    except TypeError:
        raise TypeError(f"fusecc.fuse: expected a sequence of nn.Module, got {type(models).__name__}") from None
    if not models:
        raise FusionError("fusecc.fuse: got an empty list of models; pass at least one nn.Module")
    for i, m in enumerate(models):
        if not isinstance(m, nn.Module):
            raise TypeError(f"fusecc.fuse: model {i} is a {type(m).__name__}, expected a torch.nn.Module")
    if prepare is not None:
        models, extra = prepare(models)
        return _compare_models(models), extra
    return _compare_models(models)


def _compare_models(models: List[nn.Module]) -> List[nn.Module]:
    ref = models[0]
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    ref_bufs = dict(ref.named_buffers(remove_duplicate=False))
    ref_mods = dict(ref.named_modules(remove_duplicate=False))
    ref_ties = _ties(ref)
    for name, m in ref_mods.items():
        if m._forward_hooks or m._forward_pre_hooks:
            raise FusionError(
                f"fusecc.fuse: model 0: module '{name or '<root>'}' has forward hooks, which the fused module would "
                "not run; remove them before fusing"
            )
    for i, m in enumerate(models[1:], 1):
        if type(m) is not type(ref):
            raise FusionError(
                f"fusecc.fuse: model {i} is a {type(m).__qualname__}, model 0 is a {type(ref).__qualname__}; "
                "all models must be of the same class"
            )
        _compare(i, "parameter", dict(m.named_parameters(remove_duplicate=False)), ref_params, check_grad=True)
        _compare(i, "buffer", dict(m.named_buffers(remove_duplicate=False)), ref_bufs, check_grad=False)
        mods = dict(m.named_modules(remove_duplicate=False))
        if list(mods) != list(ref_mods):
            extra = [k for k in mods if k not in ref_mods]
            missing = [k for k in ref_mods if k not in mods]
            raise FusionError(
                f"fusecc.fuse: model {i} has a different module tree than model 0 "
                f"(extra: {extra[:5]}, missing: {missing[:5]})"
            )
        for name, sub in mods.items():
            r = ref_mods[name]
            label = name or "<root>"
            if type(sub) is not type(r):
                raise FusionError(
                    f"fusecc.fuse: model {i}: module '{label}' is a {type(sub).__name__}, model 0 has a "
                    f"{type(r).__name__}"
                )
            if sub.training != r.training:
                raise FusionError(
                    f"fusecc.fuse: model {i}: module '{label}' is in {'train' if sub.training else 'eval'} mode, "
                    f"model 0's is in {'train' if r.training else 'eval'} mode; call .train() or .eval() on all "
                    "models first"
                )
            if sub._forward_hooks or sub._forward_pre_hooks:
                raise FusionError(
                    f"fusecc.fuse: model {i}: module '{label}' has forward hooks, which the fused module would not "
                    "run; remove them before fusing"
                )
            ca, cb = config_of(sub), config_of(r)
            for k in sorted(set(ca) | set(cb)):
                if k not in ca or k not in cb or not _same(ca[k], cb[k]):
                    raise FusionError(
                        f"fusecc.fuse: model {i}: module '{label}' has {k}={_fmt(ca.get(k, '<absent>'))}, model 0 has "
                        f"{k}={_fmt(cb.get(k, '<absent>'))}; fusecc fuses models that differ only in their weights"
                    )
            for k, v in vars(sub).items():
                rv = vars(r).get(k)
                if isinstance(v, Tensor) and not k.startswith("_") and (
                    not isinstance(rv, Tensor) or v.shape != rv.shape or v.dtype != rv.dtype
                ):
                    raise FusionError(
                        f"fusecc.fuse: model {i}: tensor attribute '{label}.{k}' is {_fmt(v)}, model 0 has {_fmt(rv)}"
                    )
        if _ties(m) != ref_ties:
            raise FusionError(
                f"fusecc.fuse: model {i} ties (shares) parameters differently from model 0: {_ties(m)} vs {ref_ties}"
            )
    return models


def _ties(m: nn.Module) -> List[List[str]]:
    groups: dict = {}
    for name, p in list(m.named_parameters(remove_duplicate=False)) + list(m.named_buffers(remove_duplicate=False)):
        groups.setdefault(id(p), []).append(name)
    return sorted(g for g in groups.values() if len(g) > 1)


def _compare(i: int, what: str, got: dict, ref: dict, check_grad: bool) -> None:
    for name in ref:
        if name not in got:
            raise FusionError(f"fusecc.fuse: model {i} lacks {what} '{name}' that model 0 has")
    for name in got:
        if name not in ref:
            raise FusionError(f"fusecc.fuse: model {i} has {what} '{name}' that model 0 lacks")
    for name, t in got.items():
        r = ref[name]
        if t.shape != r.shape:
            raise FusionError(
                f"fusecc.fuse: model {i}: {what} '{name}' has shape {list(t.shape)}, model 0 has {list(r.shape)}"
            )
        if t.dtype != r.dtype:
            raise FusionError(f"fusecc.fuse: model {i}: {what} '{name}' has dtype {t.dtype}, model 0 has {r.dtype}")
        if t.device != r.device:
            raise FusionError(
                f"fusecc.fuse: model {i}: {what} '{name}' is on {t.device}, model 0's is on {r.device}; "
                "move all models to one device first"
            )
        if check_grad and t.requires_grad != r.requires_grad:
            raise FusionError(
                f"fusecc.fuse: model {i}: {what} '{name}' has requires_grad={t.requires_grad}, model 0 has "
                f"{r.requires_grad}"
            )


