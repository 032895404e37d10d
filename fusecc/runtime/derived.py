"""Weights re-laid out for a lowering (a conv's live taps, channels-last) and kept while the parameter is unchanged."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakIdKeyDictionary


_DERIVED = WeakIdKeyDictionary()  # parameter -> {key: (stamp, derived tensor)}


def tracing() -> bool:
    """Inside torch.jit.trace/script or torch.compile: no tensor may be kept across calls."""
    return torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()


def clear_derived(tensors: Any) -> None:
    """Forget the derived weights of ``tensors`` (a module switching between train and eval drops them: an update
    that bypassed the version counter, e.g. through ``p.data``, cannot leave a stale one behind)."""
    for t in tensors:
        _DERIVED.pop(t, None)


def _bump_after_step(optimizer: Any, args: Any, kwargs: Any) -> None:
    """After any torch optimizer's step: bump the version of its parameters that have derived weights. torch's fused
    kernels (``torch._fused_sgd_`` / ``_fused_adam(w)_``, which ``fusecc.optim`` and ``torch.optim(fused=True)`` run)
    and kernels that write through a pointer (fusecc's C and Triton steps) update a parameter without bumping its
    version counter: the derived copy would stay, stale (a silent wrong answer in the next eval)."""
    if not len(_DERIVED):
        return
    for g in optimizer.param_groups:
        for p in g["params"]:
            if p in _DERIVED:
                torch.autograd.graph.increment_version(p)


register_optimizer_step_post_hook(_bump_after_step)


def derived_weight(w: Tensor, key: tuple, fn: Any) -> Tensor:
    """``fn(w)``, a re-laid-out copy of a parameter (its live taps, say), kept while ``w`` is unchanged.

    Kept only where nothing can differentiate through it (grad mode off) and ``w`` is a real tensor (not fake, not
    traced): an in-place update (an optimizer step, ``load_state_dict``) bumps ``w._version`` and the next call
    makes it anew; the entry goes when ``w`` does. With grad on, ``fn(w)`` runs every call, inside autograd.
    """
    # tracing() first: torch.compile breaks the graph at w.is_inference() (an inference tensor has no version
    # counter to watch)
    if tracing() or torch.is_grad_enabled() or type(w) not in (Tensor, torch.nn.Parameter) or w.is_inference():
        return fn(w)
    stamp = (w._version, w.data_ptr(), tuple(w.shape), w.stride(), w.dtype, w.device)
    entries = _DERIVED.get(w)
    if entries is None:
        entries = _DERIVED[w] = {}
    hit = entries.get(key)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    out = fn(w.detach())
    entries[key] = (stamp, out)
    return out
