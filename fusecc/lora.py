"""LoRA fleets made with peft: N adapters on one base model, fused as ONE base computation plus a per-model
low-rank update.

The base weights are frozen and equal in every model, so the fused module stores them once and runs each base
linear as one GEMM over all N*B rows (fusecc/api.py's sharing); the adapters' ``lora_A`` / ``lora_B`` are per-model
weights, so ``lora_B(lora_A(x)) * scaling`` becomes two batched GEMMs (shrink to rank r, expand back: the two steps
of Punica's SGMV) and a per-model scale. What peft keeps as Python configuration, and which may differ per model,
is made fusable here before the models are checked and stacked, on light copies of them (the user's models are never
touched, and their tensors are not copied):

- ``scaling`` (``lora_alpha / r``, a float per adapter) becomes a 0-dim buffer of each model, so the fused graph
  reads it per model instead of baking model 0's value into the code;
- adapters of different ranks are zero-padded to the largest: extra rows of A and columns of B that are zero add
  exactly zero (for finite inputs), so every model computes what it computes alone;
- ``r``, ``lora_alpha`` and the ``peft_config`` objects, which differ with them, are kept per model and given back by
  :meth:`~fusecc.api.FusedModule.unfuse`; ``model_state_dict(i)`` gives model i's adapters at its own rank.
"""

from __future__ import annotations

import copy
import operator
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from . import runtime
from .errors import FusionError
from .report import Report

SCALE_BUFFER = "_fusecc_lora_scale_{}"  # the 0-dim buffer of an adapter's scaling (non-persistent)


def _lora_linear_type() -> Any:
    # a model holding peft's LoRA layers was made by peft, so peft is imported already; importing it here for models
    # that have none would cost every fuse() seconds (peft imports transformers)
    if "peft" not in sys.modules:
        return None
    try:
        from peft.tuners.lora.layer import Linear
    except Exception:  # noqa: BLE001 - peft absent (or broken): there are no peft LoRA layers to fuse
        return None
    return Linear


@dataclass
class LoraFleet:
    """What the fused module keeps about the N models' adapters, to give each model back as it was."""

    # per LoRA layer path, per adapter: the N models' (rank, lora_alpha, scaling)
    adapters: Dict[str, Dict[str, List[Tuple[int, Any, float]]]] = field(default_factory=dict)
    # qualname of a padded weight -> (its rank dim, the adapter's layer path, adapter name)
    padded: Dict[str, Tuple[int, str, str]] = field(default_factory=dict)
    peft_configs: List[Dict[str, Any]] = field(default_factory=list)  # per model: module path -> its peft_config

    def rank(self, qualname: str, i: int) -> Tuple[int, int]:
        """(rank dim, model i's rank) of a padded adapter weight."""
        dim, path, ad = self.padded[qualname]
        return dim, self.adapters[path][ad][i][0]

    def select(self, idx: List[int]) -> "LoraFleet":
        return LoraFleet({p: {a: [v[i] for i in idx] for a, v in ads.items()} for p, ads in self.adapters.items()},
                         dict(self.padded), [self.peft_configs[i] for i in idx])


def find_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    linear = _lora_linear_type()
    if linear is None:
        return []
    return [(p, m) for p, m in model.named_modules() if isinstance(m, linear)]


def prepare(models: List[nn.Module]) -> Tuple[List[nn.Module], LoraFleet | None]:
    """Light copies of peft LoRA models, fusable as models that differ only in their weights (see the module
    docstring); the models themselves when they hold no peft LoRA layer."""
    layers0 = find_layers(models[0])
    if not layers0:
        return models, None
    paths = [p for p, _ in layers0]
    fleet = LoraFleet()
    shadows = []
    for i, m in enumerate(models):
        mine = dict(find_layers(m))
        if list(mine) != paths:
            raise FusionError(f"fusecc.fuse: model {i} has LoRA layers at {sorted(mine)[:4]}..., model 0 at "
                              f"{paths[:4]}...; a LoRA fleet needs adapters on the same modules in every model")
        for path, layer in mine.items():
            _check_vanilla(i, path, layer)
        # modules are copied, tensors are not: the fused module stacks or clones them itself
        memo = {id(t): t for t in list(m.parameters()) + list(m.buffers())}
        shadows.append(copy.deepcopy(m, memo))
        fleet.peft_configs.append({p: copy.deepcopy(mod.peft_config) for p, mod in m.named_modules()
                                   if isinstance(getattr(mod, "peft_config", None), dict)})
    for path, layer0 in layers0:
        fleet.adapters[path] = {}
        for ad in layer0.lora_A:
            per = []
            for i, m in enumerate(models):
                layer = m.get_submodule(path)
                if ad not in layer.lora_A:
                    raise FusionError(f"fusecc.fuse: model {i}: LoRA layer '{path}' lacks adapter '{ad}' that model 0 "
                                      "has")
                per.append((layer.lora_A[ad].weight.shape[0], layer.lora_alpha.get(ad), float(layer.scaling[ad])))
            fleet.adapters[path][ad] = per
            rmax = max(r for r, _, _ in per)
            fleet.padded[f"{path}.lora_A.{ad}.weight"] = (0, path, ad)
            fleet.padded[f"{path}.lora_B.{ad}.weight"] = (1, path, ad)
            for i, s in enumerate(shadows):
                _pad_adapter(s.get_submodule(path), ad, rmax, per[i][2])
    for s in shadows:
        for mod in s.modules():
            if isinstance(getattr(mod, "peft_config", None), dict):  # r / lora_alpha differ with the adapters
                mod._fusecc_per_model_config = ("peft_config",)
    return shadows, fleet


def _check_vanilla(i: int, path: str, layer: nn.Module) -> None:
    for ad in layer.lora_A:
        what = None
        if getattr(layer, "use_dora", {}).get(ad):
            what = "DoRA (use_dora=True)"
        elif ad in getattr(layer, "lora_variant", {}):
            what = f"a LoRA variant ({type(layer.lora_variant[ad]).__name__})"
        elif layer.lora_B[ad].bias is not None:
            what = "a bias on lora_B (lora_bias=True)"
        elif getattr(layer, "merged_adapters", None):
            what = "merged adapters (merge_and_unload() or unmerge_adapter() first)"
        if what:
            raise FusionError(f"fusecc.fuse: model {i}: LoRA layer '{path}' adapter '{ad}' uses {what}; fusecc fuses "
                              "plain LoRA adapters (x @ A^T @ B^T * scaling). Merge this adapter into the base weights "
                              "first, or fuse the models without it")


@torch.no_grad()
def _pad_adapter(layer: nn.Module, ad: str, rmax: int, scaling: float) -> None:
    """In a shadow copy: adapter ``ad`` at rank ``rmax`` (zero rows of A, zero columns of B) and its scaling as a
    0-dim buffer the forward reads (peft multiplies by ``layer.scaling[ad]``)."""
    a, b = layer.lora_A[ad], layer.lora_B[ad]
    r = a.weight.shape[0]
    if r != rmax:
        na = nn.Linear(a.in_features, rmax, bias=False, device=a.weight.device, dtype=a.weight.dtype)
        na.weight.zero_()[:r].copy_(a.weight)
        na.weight.requires_grad_(a.weight.requires_grad)
        nb = nn.Linear(rmax, b.out_features, bias=False, device=b.weight.device, dtype=b.weight.dtype)
        nb.weight.zero_()[:, :r].copy_(b.weight)
        nb.weight.requires_grad_(b.weight.requires_grad)
        na.train(a.training)
        nb.train(b.training)
        layer.lora_A[ad], layer.lora_B[ad] = na, nb
    # (in the adapter's dtype: peft's x * float rounds the same way for fp32; bf16 within its tolerance)
    scale = torch.tensor(scaling, dtype=a.weight.dtype, device=a.weight.device)
    layer.register_buffer(SCALE_BUFFER.format(ad), scale, persistent=False)
    layer.scaling = dict(layer.scaling)
    layer.scaling[ad] = getattr(layer, SCALE_BUFFER.format(ad))
    layer.r = dict(layer.r)
    layer.r[ad] = rmax
    layer._fusecc_per_model_config = ("scaling", "r", "lora_alpha")


def unpad(fleet: LoraFleet, qualname: str, i: int, t: Tensor) -> Tensor:
    """Model i's own slice of a padded adapter weight (a view)."""
    if qualname not in fleet.padded:
        return t
    dim, r = fleet.rank(qualname, i)
    return t.narrow(dim, 0, r)


def restore(fleet: LoraFleet, model: nn.Module, i: int) -> None:
    """An unfused model's LoRA layers back at model i's rank, alpha and float scaling, its peft configs its own."""
    for path, ads in fleet.adapters.items():
        layer = model.get_submodule(path)
        for ad, per in ads.items():
            r, alpha, scaling = per[i]
            a, b = layer.lora_A[ad], layer.lora_B[ad]
            if a.weight.shape[0] != r:
                na = nn.Linear(a.in_features, r, bias=False, device=a.weight.device, dtype=a.weight.dtype)
                nb = nn.Linear(r, b.out_features, bias=False, device=b.weight.device, dtype=b.weight.dtype)
                with torch.no_grad():
                    na.weight.copy_(a.weight[:r])
                    nb.weight.copy_(b.weight[:, :r])
                na.weight.requires_grad_(a.weight.requires_grad)
                nb.weight.requires_grad_(b.weight.requires_grad)
                na.train(a.training)
                nb.train(b.training)
                layer.lora_A[ad], layer.lora_B[ad] = na, nb
            layer.scaling[ad] = scaling
            layer.r[ad] = r
            layer.lora_alpha[ad] = alpha
            layer._buffers.pop(SCALE_BUFFER.format(ad), None)
        layer.__dict__.pop("_fusecc_per_model_config", None)
    for path, cfg in fleet.peft_configs[i].items():
        mod = model.get_submodule(path)
        mod.peft_config = copy.deepcopy(cfg)
        mod.__dict__.pop("_fusecc_per_model_config", None)


def fuse_low_rank_updates(graph: fx.Graph, report: Optional[Report] = None) -> int:
    """On the Triton path: ``batched_linear(batched_linear(x, A), B) * scale`` (peft's ``lora_B(lora_A(x)) *
    scaling`` with per-model adapters, as the rules fuse it: a shrink and an expand GEMM) becomes ONE
    ``low_rank_update`` launch for all models. Returns how many were fused."""
    done = 0
    lin = runtime.linear.batched_linear
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (operator.mul, torch.mul) or len(node.args) != 2:
            continue
        for u, s in (node.args, node.args[::-1]):
            if not _plain_linear(u, lin) or not _plain_linear(u.args[0], lin):
                continue
            scale = _scale_source(s)
            if scale is None:
                continue
            t = u.args[0]
            with graph.inserting_before(node):
                new = graph.call_function(runtime.linear.low_rank_update, (t.args[0], t.args[1], u.args[1], scale))
            new.meta.update(node.meta)
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            graph.erase_node(u)
            graph.erase_node(t)
            if s is not scale and isinstance(s, fx.Node) and not s.users:
                graph.erase_node(s)
            done += 1
            if report is not None:
                report.record("lora", "per-model low-rank update, one launch (Triton kernel)")
                key = ("linear", "batched GEMM (Triton kernel)")  # the shrink and expand the rules counted
                report.ops[key] -= 2
                if report.ops[key] <= 0:
                    del report.ops[key]
            break
    return done


def _plain_linear(n: Any, lin: Any) -> bool:
    """A per-model linear without bias, activation or lowering choice, used once."""
    return (isinstance(n, fx.Node) and n.op == "call_function" and n.target is lin and len(n.args) == 3
            and n.args[2] is None and not n.kwargs and len(n.users) == 1)


def _scale_source(s: Any) -> Optional[fx.Node]:
    """The ``[N]`` per-model scaling a broadcast view ``scale[:, None, ...]`` reads, or a shared 0-dim get_attr."""
    if not isinstance(s, fx.Node):
        return None
    if s.op == "get_attr":
        return s
    if (s.op == "call_function" and s.target is operator.getitem and isinstance(s.args[0], fx.Node)
            and s.args[0].op == "get_attr" and isinstance(s.args[1], tuple) and s.args[1]
            and s.args[1][0] == slice(None) and all(i is None for i in s.args[1][1:])):
        return s.args[0]
    return None
