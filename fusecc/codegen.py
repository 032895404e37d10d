"""The last stage: the fused graph becomes a Python function ``forward(self, *inputs)``.

Dead-code elimination first (only of nodes known to be pure: a fused graph may mutate buffers in place), then
torch.fx's own code generation, compiled with a source that tracebacks and ``fused.code`` can show.
"""

from __future__ import annotations

import linecache
import operator
from typing import Callable

import torch
import torch.fx as fx

from . import runtime

_PURE_METHODS = {"unflatten", "flatten", "size", "reshape", "view", "permute", "transpose", "unsqueeze", "squeeze",
                 "expand", "repeat", "dim", "numel", "contiguous"}
_PURE_FUNCTIONS = {operator.getitem, operator.add, operator.floordiv, torch.movedim, getattr, runtime.shape.model_size,
                   runtime.shape.expand_model, runtime.shape.pack, dict}


def eliminate_dead_code(graph: fx.Graph) -> int:
    """Drop unused nodes that are known to be pure (views, sizes, attribute reads); never an op that may mutate."""
    removed = 0
    for node in reversed(list(graph.nodes)):
        if node.users or node.op in ("placeholder", "output"):
            continue
        pure = node.op == "get_attr" or (
            node.op == "call_method" and node.target in _PURE_METHODS
        ) or (node.op == "call_function" and node.target in _PURE_FUNCTIONS)
        if pure:
            graph.erase_node(node)
            removed += 1
    return removed


def codegen(graph: fx.Graph, name: str) -> Callable:
    """Compile a fused graph to a Python function ``forward(self, *inputs)`` that reads ``self``'s attributes."""
    code = graph.python_code(root_module="self")
    src = code.src
    key = f"<fusecc-{name}-{id(graph):x}>"
    linecache.cache[key] = (len(src), None, src.splitlines(True), key)
    glob = dict(code.globals)
    exec(compile(src, key, "exec"), glob)
    fn = glob["forward"]
    fn.__fusecc_src__ = src
    return fn
