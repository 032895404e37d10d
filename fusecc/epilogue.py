"""Epilogue fusion on the fused graph: an activation that only consumes a per-model linear runs inside it.

``y = batched_linear(x, w, b); z = relu(y)`` becomes ``z = batched_linear(x, w, b, "relu")`` when y has no other
user. On CUDA the Triton linear kernel then applies the activation in its epilogue (and its derivative inside the
backward GEMMs), so the activation costs no extra pass over memory; elsewhere the reference computes
``relu(baddbmm(...))`` exactly as before. Activations folded: ReLU, exact GELU, SiLU (module, function or method).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from . import runtime
from .report import Report

_LINEARS = (runtime.linear.batched_linear, runtime.linear.wide_linear)
_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.silu: "silu", F.gelu: "gelu"}
_METHODS = {"relu": "relu", "relu_": "relu"}


def _activation(node: fx.Node, root: nn.Module, src: fx.Node) -> Optional[str]:
    """The activation ``node`` applies to ``src`` alone, or None."""
    if not node.args or node.args[0] is not src or len(node.args) > 1:
        return None
    kwargs = dict(node.kwargs)
    kwargs.pop("inplace", None)
    if node.op == "call_module":
        m = root.get_submodule(node.target)
        if type(m) is nn.ReLU or type(m) is nn.SiLU:
            return "relu" if type(m) is nn.ReLU else "silu"
        if type(m) is nn.GELU and m.approximate == "none":
            return "gelu"
        return None
    if node.op == "call_function" and node.target in _FUNCTIONS:
        if node.target is F.gelu and kwargs.pop("approximate", "none") != "none":
            return None
        return None if kwargs else _FUNCTIONS[node.target]
    if node.op == "call_method" and node.target in _METHODS and not kwargs:
        return _METHODS[node.target]
    return None


def fuse_activations(graph: fx.Graph, root: nn.Module, report: Optional[Report] = None) -> int:
    """Fold single-use activations into the per-model linears that feed them; returns how many were folded."""
    folded = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _LINEARS or len(node.users) != 1:
            continue
        if len(node.args) != 3 or set(node.kwargs) - {"impl"}:  # already has an activation
            continue
        user = next(iter(node.users))
        act = _activation(user, root, node)
        if act is None:
            continue
        node.args = node.args + (act,)
        user.replace_all_uses_with(node)
        graph.erase_node(user)
        folded += 1
        if report is not None:
            report.record("epilogue", f"{act} folded into the per-model linear")
    return folded
