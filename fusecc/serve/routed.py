"""Routed execution: the rows of a batch, sorted by model, run through ONE copy of the architecture whose layers
with per-model weights apply each model's weights to its own contiguous rows (the Punica / S-LoRA idea, for every
weight-bearing layer, not only the linears). No padding rows, no call per model: idle models cost nothing, and the
work is the real rows' plus one small GEMM per (layer, model with rows).

Layers routed here: ``nn.Linear`` (one ``F.linear`` per segment of rows), ``nn.LayerNorm`` (the normalisation once,
each row's own affine gathered), ``nn.Embedding`` (one lookup in the N tables viewed as one, row offsets per model).
Every other layer must hold no per-model tensor (it is shared by all models, or holds none); a model with such a
layer (convs, batch norms, ...) is not routable and :func:`routed_module` returns None. Rows are dim 0 of every
activation (batch-first models: transformers' encoders and decoders); an input that broadcasts over the rows (a
``[1, L]`` position table index) is expanded to them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Route", "routed_module", "flatten_outputs", "RoutedEntry", "routed_entry"]


class Route:
    """The current batch's routing: ``segments[k] = (model, start, end)`` over rows sorted by model, and
    ``index`` ([R], the model of each row). With ``gather`` (an exported artifact: no data-dependent control flow),
    rows come in any order and each weight-bearing layer gathers its rows' weights instead of looping over models."""

    def __init__(self) -> None:
        self.segments: List[Tuple[int, int, int]] = []
        self.index: Optional[Tensor] = None
        self.rows: Any = 0
        self.gather = False

    def use(self, index: Tensor) -> None:
        """Gather mode: ``index`` [R] is each row's model."""
        self.gather, self.index, self.rows = True, index, index.shape[0]

    def set(self, counts: List[int]) -> None:
        self.gather = False
        self.segments, start = [], 0
        for m, c in enumerate(counts):
            if c:
                self.segments.append((m, start, start + c))
                start += c
        self.rows = start
        self.index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))


def _rows_first(x: Tensor, route: Route) -> Tensor:
    if route.gather:  # (traced: no data-dependent branch; an input of one row broadcasts)
        return x.expand(route.rows, *x.shape[1:])
    if x.shape[0] == route.rows:
        return x
    if x.shape[0] == 1:
        return x.expand(route.rows, *x.shape[1:])
    raise RuntimeError(f"fusecc routed: an input of {x.shape[0]} rows in a batch of {route.rows}; rows must be dim 0")


def _per_row(t: Tensor, route: Route, x_dim: int) -> Tensor:
    """``t`` [N, C] gathered for each row and shaped to broadcast over ``[R, ..., C]``."""
    rows = t.index_select(0, route.index.to(t.device))
    return rows.reshape(rows.shape[0], *([1] * (x_dim - 2)), rows.shape[-1])


def flatten_outputs(out: Any) -> Dict[str, Tensor]:
    """A model's output as ``{name: tensor}``: a ModelOutput / dict by its keys, a tensor as "output", a tuple or
    list as "output_0", "output_1", ..."""
    if isinstance(out, Tensor):
        return {"output": out}
    if isinstance(out, dict) or hasattr(out, "keys"):
        return {k: v for k, v in out.items() if isinstance(v, Tensor)}
    if isinstance(out, (tuple, list)):
        return {f"output_{i}": v for i, v in enumerate(out) if isinstance(v, Tensor)}
    raise TypeError(f"fusecc serve: the model returned {type(out).__name__}; expected a tensor, a tuple/list or a "
                    "dict of tensors")


class _RoutedLinear(nn.Module):
    def __init__(self, weight: Tensor, bias: Optional[Tensor], route: Route) -> None:
        super().__init__()
        self.weight, self.bias, self.route = weight, bias, route  # [N, M, K] / [N, M], or shared [M, K] / [M]
        self.in_features, self.out_features = weight.shape[-1], weight.shape[-2]

    def forward(self, x: Tensor) -> Tensor:
        x = _rows_first(x, self.route)
        w, b = self.weight, self.bias  # either may be shared by every model (no model dim)
        if w.dim() == 2:  # one GEMM for all rows, each row's own bias added
            return F.linear(x, w) + _per_row(b, self.route, x.dim())
        if self.route.gather:  # each row's weight gathered: one bmm over the rows (its tokens share the weight)
            x3 = x.reshape(x.shape[0], -1, x.shape[-1])
            wr = w.index_select(0, self.route.index.to(w.device))  # [R, M, K]
            y = torch.bmm(x3, wr.transpose(1, 2)).reshape(*x.shape[:-1], w.shape[1])
            if b is None:
                return y
            return y + (b if b.dim() == 1 else _per_row(b, self.route, x.dim()))
        outs = [F.linear(x[s:e], w[m], None if b is None else (b if b.dim() == 1 else b[m]))
                for m, s, e in self.route.segments]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class _RoutedLayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm, weight: Optional[Tensor], bias: Optional[Tensor], route: Route) -> None:
        super().__init__()
        self.normalized_shape, self.eps = tuple(ln.normalized_shape), ln.eps
        self.weight, self.bias, self.route = weight, bias, route  # [N, *shape] or a shared [*shape] / None

    def _per_row(self, t: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
        if t is None or t.dim() == len(self.normalized_shape):  # absent or shared by every model
            return t
        rows = t.index_select(0, self.route.index.to(t.device))  # [R, *shape]
        return rows.reshape(rows.shape[0], *([1] * (x.dim() - 1 - len(self.normalized_shape))),
                            *self.normalized_shape)

    def forward(self, x: Tensor) -> Tensor:
        x = _rows_first(x, self.route)
        y = F.layer_norm(x, self.normalized_shape, None, None, self.eps)
        w, b = self._per_row(self.weight, x), self._per_row(self.bias, x)
        if w is not None:
            y = y * w
        if b is not None:
            y = y + b
        return y


class _RoutedEmbedding(nn.Module):
    def __init__(self, emb: nn.Embedding, weight: Tensor, route: Route) -> None:
        super().__init__()
        self.weight, self.route = weight, route  # [N, V, D]
        self.num_embeddings, self.embedding_dim = weight.shape[1], weight.shape[2]
        self.padding_idx = emb.padding_idx  # (max_norm embeddings are not routed: routed_module declines them)

    def forward(self, ids: Tensor) -> Tensor:
        ids = _rows_first(ids, self.route)
        n, v, d = self.weight.shape
        offset = self.route.index.to(ids.device).view(-1, *([1] * (ids.dim() - 1))) * v
        return F.embedding(ids + offset, self.weight.reshape(n * v, d))


def routed_module(fused: Any, route: Route) -> Optional[nn.Module]:
    """One copy of the fleet's architecture that runs rows sorted by model (see the module's docstring), its
    per-model weights views of ``fused``'s tensors; None when a layer with per-model tensors has no routed form."""
    from ..fleet import skeleton

    if fused._fusecc_lora is not None:
        return None
    shared = set(fused._fusecc_shared_names)
    alias: Dict[str, str] = fused._fusecc_alias
    m = skeleton(fused._fusecc_proto)
    fused._install(m, lambda canon: fused._canonical_tensor(canon).detach())  # stacked [N, ...] or shared
    per_model = {name for name, canon in alias.items() if canon not in shared}
    replaced: Dict[str, nn.Module] = {}
    for path, mod in list(m.named_modules()):
        own = {f"{path}.{k}" if path else k for k in list(mod._parameters) + list(mod._buffers)}
        mine = own & per_model
        if not mine:
            continue
        if type(mod) is nn.Linear:
            new: nn.Module = _RoutedLinear(mod.weight, mod.bias, route)
        elif type(mod) is nn.LayerNorm:
            new = _RoutedLayerNorm(mod, mod.weight, mod.bias, route)
        elif type(mod) is nn.Embedding and mod.max_norm is None:
            new = _RoutedEmbedding(mod, mod.weight, route)
        else:
            return None
        replaced[path] = new
    for path, new in replaced.items():
        parent, _, leaf = path.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, leaf, new)
    return m.eval()


class RoutedEntry(nn.Module):
    """The exportable routed fleet: ``forward(*inputs, model_id)`` with every input ``[R, ...]`` (rows of any models,
    in any order) and ``model_id`` ``[R]`` (or ``[R, 1]``, as NVIDIA Triton's batcher sends a per-row scalar); returns
    the model's outputs for each row, ``{name: [R, ...]}``. Each weight-bearing layer gathers its rows' weights (one
    ``bmm`` per linear), so the graph has no data-dependent control flow: torch.export and TorchScript keep the rows
    and sequence length dynamic."""

    def __init__(self, module: nn.Module, route: Route, names: List[str], keywords: bool) -> None:
        super().__init__()
        self.module, self.route, self.names, self.keywords = module, route, list(names), keywords

    def forward(self, *args: Tensor) -> Dict[str, Tensor]:
        model_id = args[-1]
        self.route.use(model_id.reshape(-1))
        xs = args[:-1]
        return flatten_outputs(self.module(**dict(zip(self.names, xs))) if self.keywords else self.module(*xs))


def routed_entry(fused: Any, names: List[str], keywords: bool) -> RoutedEntry:
    """The routed fleet of ``fused`` as an exportable module (see :class:`RoutedEntry`); ValueError when a layer with
    per-model weights has no routed form."""
    route = Route()
    module = routed_module(fused, route)
    if module is None:
        raise ValueError("the fleet is not routable: a layer with per-model weights is not Linear, LayerNorm or "
                         "Embedding (convs and batch norms have no routed form yet); export without --routed")
    for p in module.parameters():
        p.requires_grad_(False)
    return RoutedEntry(module, route, names, keywords).eval()
