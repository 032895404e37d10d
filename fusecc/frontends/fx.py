"""The torch.fx frontend: one model traced symbolically into a graph (fusecc's first frontend).

Symbolic tracing runs ``forward`` on proxies: Python control flow must not depend on tensor values, and every
parameter, buffer and tensor attribute becomes a graph value (so that each model's own weights flow through the
fused graph). Modules listed in ``leaf_modules`` stay opaque calls; ``nn.TransformerEncoder(Layer)`` is traced
through its own slow path, which torch.fx can read.
"""

from __future__ import annotations

import functools
import traceback
from typing import Any, List, Sequence, Tuple, Type

import torch
import torch.fx as fx
import torch.nn as nn

from ..errors import FusionError


def _encoder_layer_forward(self: nn.TransformerEncoderLayer, src: torch.Tensor, src_mask: Any = None,
                           src_key_padding_mask: Any = None, is_causal: bool = False) -> torch.Tensor:
    """``nn.TransformerEncoderLayer.forward``'s own slow path, which torch.fx can trace.

    The layer's fast path (an inference-only fused kernel of the same maths) and its checks on tensor properties
    cannot be traced; the masks go to ``self_attn`` as given, which canonicalises them exactly as the layer would.
    """
    x = src
    if self.norm_first:
        x = x + self._sa_block(self.norm1(x), src_mask, src_key_padding_mask, is_causal=is_causal)
        x = x + self._ff_block(self.norm2(x))
    else:
        x = self.norm1(x + self._sa_block(x, src_mask, src_key_padding_mask, is_causal=is_causal))
        x = self.norm2(x + self._ff_block(x))
    return x


def _encoder_forward(self: nn.TransformerEncoder, src: torch.Tensor, mask: Any = None,
                     src_key_padding_mask: Any = None, is_causal: Any = None) -> torch.Tensor:
    """``nn.TransformerEncoder.forward`` without its nested-tensor fast path. ``is_causal`` is only a hint next to the
    mask (the mask is applied either way), so an undetected causal mask changes nothing but speed."""
    output = src
    for mod in self.layers:
        output = mod(output, src_mask=mask, is_causal=bool(is_causal), src_key_padding_mask=src_key_padding_mask)
    if self.norm is not None:
        output = self.norm(output)
    return output


# torch.nn modules whose forward cannot be traced as written (fast paths branching on tensor properties), traced
# through these equivalent forwards instead, so their submodules (attention, linears, norms) fuse by their rules
TRACEABLE_FORWARDS = {nn.TransformerEncoderLayer: _encoder_layer_forward, nn.TransformerEncoder: _encoder_forward}


class FuseTracer(fx.Tracer):
    """symbolic_trace's tracer, recording source lines, with extra leaf modules (run by a rule or the loop)."""

    def __init__(self, leaf_types: Tuple[Type[nn.Module], ...] = (), leaf_names: Sequence[str] = (),
                 stack_traces: bool = False):
        super().__init__()
        self.record_stack_traces = stack_traces  # costly (ms per node): only when an error needs the source line
        # buffers are graph values like parameters: without this, an op on buffers alone (``self.b.sum()``, a table
        # built from ``self.pos`` in forward) would run once at trace time on the prototype's (model 0's) buffers and
        # be baked into the graph as a constant, which every fused model would then read
        self.proxy_buffer_attributes = True
        self.leaf_types = leaf_types
        self.leaf_names = set(leaf_names)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types)):
            return True
        if type(m) in TRACEABLE_FORWARDS:
            return False
        return super().is_leaf_module(m, module_qualified_name)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        fwd = TRACEABLE_FORWARDS.get(type(m))
        if fwd is not None and not self.is_leaf_module(m, self.path_of_module(m)):
            forward = functools.partial(fwd, m)
        return super().call_module(m, forward, args, kwargs)


def _user_frame(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for f in reversed(frames):
        if "/torch/" not in f.filename and "/fusecc/" not in f.filename:
            return f"{f.filename}:{f.lineno}: {(f.line or '').strip()}"
    return "<unknown>"


def capture(
    model: nn.Module, arguments: Sequence[Tuple[str, Any]], leaf_modules: Sequence[Any], stack_traces: bool = False
) -> fx.GraphModule:
    concrete_args = {name: v for name, v in arguments if not isinstance(v, torch.Tensor)}
    types = tuple(t for t in leaf_modules if isinstance(t, type))
    names = [t for t in leaf_modules if isinstance(t, str)]
    tracer = FuseTracer(types, names, stack_traces)
    cls = type(model)
    fwd = TRACEABLE_FORWARDS.get(cls)
    attrs = _attributes_as_buffers(model)
    try:
        if fwd is not None and not tracer.is_leaf_module(model, ""):
            # the root itself: trace the equivalent forward (the tracer reads type(root).forward), on our own copy
            model.__class__ = type(cls.__name__, (cls,), {"forward": fwd, "__module__": cls.__module__})
        graph = tracer.trace(model, concrete_args=concrete_args or None)
        gm = fx.GraphModule(tracer.root, graph, cls.__name__)
    except Exception as e:
        raise FusionError(
            f"fusecc.fuse: torch.fx cannot trace {type(model).__name__}: {type(e).__name__}: {e}\n"
            f"  at {_user_frame(e)}\n"
            "  hint: data-dependent control flow cannot be traced symbolically. Make the submodule that contains it a "
            "leaf (fuse(..., leaf_modules=[TheModuleClass or 'its.qualname']): it then runs as a loop over the N "
            "models), or turn the Python values it branches on into constant (non-tensor) forward arguments."
        ) from e
    finally:
        model.__class__ = cls
        _restore_attributes(attrs)
    return gm


def _attributes_as_buffers(model: nn.Module) -> List[Tuple[nn.Module, str, torch.Tensor]]:
    """Turn the public plain tensor attributes of ``model``'s modules (neither parameters nor buffers: FusedModule
    keeps them as shared or stacked constants) into buffers for the trace, so that ops on them become graph nodes
    like ops on buffers, instead of running once at trace time on the prototype's (model 0's) values."""
    done = []
    for _, mod in model.named_modules():
        for k, v in list(vars(mod).items()):
            if isinstance(v, torch.Tensor) and not isinstance(v, nn.Parameter) and not k.startswith("_"):
                del mod.__dict__[k]
                mod.register_buffer(k, v, persistent=False)
                done.append((mod, k, v))
    return done


def _restore_attributes(done: List[Tuple[nn.Module, str, torch.Tensor]]) -> None:
    for mod, k, v in done:
        del mod._buffers[k]
        mod._non_persistent_buffers_set.discard(k)
        mod.__dict__[k] = v
