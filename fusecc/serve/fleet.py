"""A fleet being served: N models of one architecture addressed by name, run on batches of rows for any mix of them.

A batch is a list of requests, each for one model with ``b >= 1`` rows. :class:`ServedFleet` runs it in one of three
ways and picks, per batch, from timings it measured at start-up (the cost model of :class:`CostModel`):

- **fused**: the fused module on ``[N, B*, ...]``: each model's first ``B*`` rows, zero rows where a model has fewer
  (idle models cost their share of padding, not a call of their own);
- **per model**: each model's rows beyond ``B*`` run through that model alone (a module whose weights are views of
  the fused tensors: no copy), one call per model that has such rows;
- **routed**: every row, sorted by model, through ONE copy of the architecture whose Linear, LayerNorm and Embedding
  layers apply each model's weights to its own rows (``fusecc/serve/routed.py``; transformers models): no padding,
  no call per model, one small GEMM per layer and model with rows.

``B* = max rows of any model`` is all-fused (uniform traffic), ``B* = 0`` is one call per model (a few very popular
models); in between, a Zipf tail rides in one fused call while the popular models' extra rows run alone. Variable-
length inputs (token ids) are padded per call to the longest row in it, with the attention mask marking the padding.

Mode ``"per-model"`` (one eager model per slot, a call per model in each batch) is the baseline a server holding N
models would run; it serves the same protocol so the benchmark compares like with like.
"""

from __future__ import annotations

import copy
import inspect
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from ..api import FusedModule, fuse
from ..fleet import skeleton
from .routed import Route, flatten_outputs, routed_module

__all__ = ["TensorSpec", "Request", "ServedFleet", "Plan", "STRATEGIES", "inputs_from_example",
           "is_transformers"]

STRATEGIES = ("auto", "fused", "per-model", "routed")


@dataclass(frozen=True)
class TensorSpec:
    """One input of the served models, per row: ``shape`` excludes the batch dim; -1 marks a dim that varies between
    requests (a sequence length), padded per call with ``pad`` (and whole padding rows filled with ``fill``)."""

    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    optional: bool = False
    pad: float = 0
    fill: float = 0
    max_value: Optional[int] = None   # integer inputs (token ids): values must lie in [0, max_value)
    max_length: Optional[int] = None  # the variable dim's largest size (a position table)


@dataclass
class Request:
    """One request: ``rows`` rows for model ``model`` (an index); ``inputs`` maps input name -> ``[rows, ...]``."""

    model: int
    inputs: Dict[str, Tensor]
    rows: int
    outputs: Optional[Dict[str, Tensor]] = None


def _interp(table: Dict[int, float], b: int) -> float:
    """Time at ``b`` rows from a table measured at a few row counts (linear in between, extended past the ends)."""
    if b <= 0:
        return 0.0
    keys = sorted(table)
    if b in table:
        return table[b]
    lo = max([k for k in keys if k < b], default=None)
    hi = min([k for k in keys if k > b], default=None)
    if lo is None:  # below the first point: scale towards zero rows... but a call costs at least its overhead
        return table[hi]
    if hi is None:  # beyond the last: extend the last segment's slope
        k0, k1 = (keys[-2], keys[-1]) if len(keys) > 1 else (0, keys[-1])
        t0 = table[k0] if k0 else 0.0
        slope = (table[k1] - t0) / max(k1 - k0, 1)
        return table[k1] + slope * (b - k1)
    return table[lo] + (table[hi] - table[lo]) * (b - lo) / (hi - lo)


@dataclass
class Plan:
    """How one batch runs: ``fused_rows`` (B*) rows per model in the fused call (0: no fused call), the rest of each
    model's rows in a call of its own. ``cost`` is the predicted seconds."""

    fused_rows: int
    cost: float
    per_model_calls: int = 0
    routed: bool = False

    @property
    def strategy(self) -> str:
        if self.routed:
            return "routed"
        if self.fused_rows == 0:
            return "per-model"
        return "fused" if self.per_model_calls == 0 else "fused+per-model"


@dataclass
class CostModel:
    """Seconds per call measured at start-up: the fused module at B rows per model, one model at B rows."""

    fused: Dict[int, float] = field(default_factory=dict)
    single: Dict[int, float] = field(default_factory=dict)
    routed: Dict[int, float] = field(default_factory=dict)  # R rows of one model through the routed module
    routed_per_model: float = 0.0  # what each further model with rows adds to a routed call

    def routed_cost(self, counts: Sequence[int]) -> Optional[float]:
        if not self.routed:
            return None
        return _interp(self.routed, sum(counts)) + self.routed_per_model * max(sum(1 for c in counts if c) - 1, 0)

    def plan(self, counts: Sequence[int]) -> Plan:
        """The cheapest B* among 0 and the models' row counts (all fused when nothing was measured)."""
        if not self.fused or not self.single:
            return Plan(max(counts), 0.0, 0)
        best: Optional[Plan] = None
        for b in sorted({0, *counts}):
            over = [c - b for c in counts if c > b]
            cost = _interp(self.fused, b) + sum(_interp(self.single, c) for c in over)
            if best is None or cost < best.cost - 1e-12:
                best = Plan(b, cost, len(over))
        assert best is not None
        routed = self.routed_cost(counts)
        if routed is not None and routed < best.cost:
            return Plan(0, routed, 0, routed=True)
        return best


def hf_input_specs(model: nn.Module) -> List[TensorSpec]:
    """The served inputs of a transformers model: token ids (+ optional attention mask and token types) for a text
    model, per row ``[-1]``; ``pixel_values`` for a vision model needs an explicit shape (see ``ServedFleet``)."""
    cfg = model.config
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model: (*args, **kwargs)
    params = inspect.signature(inner.forward).parameters
    vocab = int(getattr(cfg, "vocab_size", 0) or 0) or None
    most = getattr(cfg, "max_position_embeddings", None)
    pad_id = getattr(cfg, "pad_token_id", None) or 0
    specs = [TensorSpec("input_ids", torch.int64, (-1,), pad=pad_id, fill=pad_id, max_value=vocab,
                        max_length=int(most) if most else None)]
    if "attention_mask" in params:
        specs.append(TensorSpec("attention_mask", torch.int64, (-1,), optional=True, pad=0, fill=1, max_value=2))
    if "token_type_ids" in params and getattr(cfg, "type_vocab_size", 0):
        specs.append(TensorSpec("token_type_ids", torch.int64, (-1,), optional=True, pad=0, fill=0,
                                max_value=int(cfg.type_vocab_size)))
    return specs


def is_transformers(model: nn.Module) -> bool:
    """A Hugging Face transformers model (or a peft model around one): it has a config object."""
    return hasattr(getattr(model, "config", None), "to_dict")


def inputs_from_example(model: nn.Module, example_input: Sequence[Sequence[int]], dtype: torch.dtype = torch.float32
                        ) -> Tuple[Optional[List[TensorSpec]], int]:
    """The served inputs and calibration length from example batch shapes (the batch dim is dropped): a
    transformers model takes token ids (``None``: its own inputs) of the example's sequence length; any other model
    one input per shape, ``input`` or ``input_0``, ``input_1``, ..."""
    if is_transformers(model):
        shape = example_input[0] if example_input else (1, 32)
        return None, shape[-1] if len(shape) == 2 else 32
    many = len(example_input) > 1
    return [TensorSpec(f"input_{i}" if many else "input", dtype, tuple(s[1:])) for i, s in enumerate(example_input)], 32


class ServedFleet:
    """N models of one architecture served by name.

    Args:
        models: the N models (left untouched: the fleet runs on its own copies of their weights).
        names: one unique name per model (default ``model-0`` ... ``model-{N-1}``).
        inputs: the inputs per row, as :class:`TensorSpec` (default: token ids for a transformers text model; a
            plain model needs them, e.g. ``[TensorSpec("input", torch.float32, (3, 32, 32))]``).
        mode: ``"fused"`` (fusecc) or ``"per-model"`` (the N eager models, a call per model per batch: the
            baseline).
        strategy: ``"auto"`` (per batch, from the measured costs), ``"fused"`` (always the fused call, padding every
            model to the busiest one), ``"per-model"`` or ``"routed"`` (every row through one routed copy of the
            architecture, where its layers allow: see ``fusecc.serve.routed``).
        max_batch: the most rows in one batch (the calibration runs up to it).
        example_length: the sequence length used to compile and calibrate a text model.
        calibrate: measure the cost model now (else "auto" falls back to always fused).
    """

    def __init__(self, models: Sequence[nn.Module], names: Optional[Sequence[str]] = None, *,
                 inputs: Optional[Sequence[TensorSpec]] = None, mode: str = "fused", strategy: str = "auto",
                 max_batch: int = 32, example_length: int = 32, calibrate: bool = True) -> None:
        models = list(models)
        if not models:
            raise ValueError("fusecc serve: no models to serve; give at least one")
        if mode not in ("fused", "per-model"):
            raise ValueError(f"fusecc serve: mode must be 'fused' or 'per-model', got {mode!r}")
        if strategy not in STRATEGIES:
            raise ValueError(f"fusecc serve: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
        names = list(names) if names is not None else [f"model-{i}" for i in range(len(models))]
        if len(names) != len(models):
            raise ValueError(f"fusecc serve: {len(names)} names for {len(models)} models; give one name per model")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"fusecc serve: the name {dup!r} is given twice; each model needs its own name")
        bad = [n for n in names if not n or "/" in n or n.strip() != n]
        if bad:
            raise ValueError(f"fusecc serve: model name {bad[0]!r} is not usable in a URL; use letters, digits, "
                             "'-', '_' or '.'")
        self.names = names
        self.index = {n: i for i, n in enumerate(names)}
        self.mode, self.strategy, self.max_batch = mode, strategy, int(max_batch)
        self.hf = is_transformers(models[0])
        if inputs is None:
            if not self.hf or getattr(models[0], "main_input_name", "input_ids") != "input_ids":
                raise ValueError("fusecc serve: give the inputs per row (inputs=[TensorSpec('input', torch.float32, "
                                 "(3, 32, 32))], or --example-input on the command line) for a model that is not a "
                                 "transformers text model")
            inputs = hf_input_specs(models[0])
        self.inputs = list(inputs)
        self.example_length = example_length
        self.version = [0] * len(models)  # bumped by each swap
        self._lock = threading.Lock()  # calls and swaps never overlap (the batcher runs both on its one thread)
        if self.hf and getattr(models[0].config, "use_cache", False):
            models = [copy.deepcopy(m) for m in models]
            for m in models:
                m.config.use_cache = False
        self._route = Route()
        self.routed: Optional[nn.Module] = None
        if mode == "fused":
            self.fused: Optional[FusedModule] = fuse(models).eval()
            self.models = self._views()
            self.routed = routed_module(self.fused, self._route)
        else:
            self.fused = None
            self.models = [copy.deepcopy(m).eval() for m in models]
        if strategy == "routed" and self.routed is None:
            raise ValueError("fusecc serve: strategy 'routed' needs a model whose layers with per-model weights are "
                             "all Linear, LayerNorm or Embedding (see fusecc.serve.routed); use 'auto'")
        self.cost = CostModel()
        self.outputs: Dict[str, Tuple[torch.dtype, Tuple[int, ...]]] = {}
        self._warm_up()
        if calibrate and mode == "fused" and strategy == "auto":
            self.calibrate()

    @property
    def num_models(self) -> int:
        return len(self.names)

    def _views(self) -> List[nn.Module]:
        """One module per model whose weights are views of the fused tensors (shared ones are the shared tensor)."""
        fused = self.fused
        assert fused is not None
        if fused._fusecc_lora is not None:  # adapters are padded to the largest rank: no per-model views
            return []
        out = []
        for i in range(fused.num_models):
            m = skeleton(fused._fusecc_proto)
            fused._install(m, lambda canon, i=i: fused._model_slice(canon, i))
            out.append(m.eval())
        return out

    # ------------------------------------------------------------------------------------------ inputs
    def example_request(self, model: int = 0, rows: int = 1, length: Optional[int] = None,
                        seed: int = 0) -> Request:
        """A request of random valid inputs (for warm-up, calibration and tests)."""
        gen = torch.Generator().manual_seed(seed)
        length = length or self.example_length
        tensors = {}
        for s in self.inputs:
            if s.optional:
                continue
            shape = (rows,) + tuple(length if d == -1 else d for d in s.shape)
            if s.dtype.is_floating_point:
                tensors[s.name] = torch.randn(shape, generator=gen).to(s.dtype)
            else:
                hi = s.max_value or 2
                tensors[s.name] = torch.randint(0, hi, shape, generator=gen).to(s.dtype)
        return Request(model, tensors, rows)

    def _stack(self, parts: List[List[Tuple[Dict[str, Tensor], int]]], per_row: int) -> Dict[str, Tensor]:
        """Inputs for a call: ``parts[k]`` is model k's list of (inputs, rows); each model gets ``per_row`` rows
        (padding rows filled per spec) and variable dims are padded to the longest. Returns ``[K, per_row, ...]``."""
        out: Dict[str, Tensor] = {}
        var_len = 0
        for segs in parts:
            for t, _ in segs:
                for s in self.inputs:
                    if s.name in t:
                        for d, size in zip(s.shape, t[s.name].shape[1:]):
                            if d == -1:
                                var_len = max(var_len, size)
        var_len = max(var_len, 1)
        for s in self.inputs:
            present = any(s.name in t for segs in parts for t, _ in segs)
            if s.optional and not present and s.name != "attention_mask":
                continue
            shape = tuple(var_len if d == -1 else d for d in s.shape)
            buf = torch.full((len(parts), per_row) + shape, s.fill, dtype=s.dtype)
            for k, segs in enumerate(parts):
                row = 0
                for t, rows in segs:
                    dst = buf[k, row:row + rows]
                    if s.name in t:
                        src = t[s.name]
                        if any(d == -1 for d in s.shape):
                            dst.fill_(s.pad)
                            dst[(slice(None),) + tuple(slice(0, n) for n in src.shape[1:])] = src
                        else:
                            dst.copy_(src)
                    elif s.name == "attention_mask":  # no mask sent: every token of the row is real
                        ids = t[self.inputs[0].name]
                        dst.zero_()
                        dst[:, :ids.shape[1]] = 1
                    row += rows
            out[s.name] = buf
        return out

    def _call(self, module: nn.Module, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
        with torch.inference_mode():
            if self.hf:
                out = module(**tensors)
            else:
                out = module(*[tensors[s.name] for s in self.inputs if s.name in tensors])
        return flatten_outputs(out)

    # ------------------------------------------------------------------------------------------ running
    def run(self, batch: Sequence[Request]) -> Plan:
        """Run a batch (any mix of models); each request's ``outputs`` is set to ``{name: [rows, ...]}``."""
        with self._lock:
            return self._run(batch)

    def _run(self, batch: Sequence[Request], strategy: Optional[str] = None) -> Plan:
        """``strategy`` overrides ``self.strategy`` for this batch (warm-up and calibration time each way)."""
        strategy = strategy or self.strategy
        n = self.num_models
        per_model: List[List[Request]] = [[] for _ in range(n)]
        for r in batch:
            per_model[r.model].append(r)
        counts = [sum(r.rows for r in rs) for rs in per_model]
        if strategy == "routed" and self.routed is not None:
            plan = Plan(0, 0.0, 0, routed=True)
        elif self.mode == "per-model" or (strategy == "per-model" and self.models):
            plan = Plan(0, 0.0, sum(1 for c in counts if c))
        elif strategy == "fused" or not self.models:  # (no per-model views, LoRA: always the fused call)
            plan = Plan(max(counts), 0.0, 0)
        else:
            plan = self.cost.plan(counts)
        if plan.routed:
            self._run_routed(per_model, counts)
            return plan
        b_star = plan.fused_rows
        results: List[List[Dict[str, Tensor]]] = [[] for _ in range(n)]  # per model: output chunks in row order
        if b_star:
            parts: List[List[Tuple[Dict[str, Tensor], int]]] = []
            for rs in per_model:
                segs, left = [], b_star
                for r in rs:
                    if left <= 0:
                        break
                    take = min(r.rows, left)
                    segs.append(({k: v[:take] for k, v in r.inputs.items()}, take))
                    left -= take
                parts.append(segs)
            assert self.fused is not None
            outs = self._call(self.fused, self._stack(parts, b_star))
            for k in range(n):
                got = min(counts[k], b_star)
                if got:
                    results[k].append({name: o[k, :got] for name, o in outs.items()})
        for k, rs in enumerate(per_model):
            if counts[k] <= b_star:
                continue
            segs, skip = [], b_star
            for r in rs:
                if skip >= r.rows:
                    skip -= r.rows
                    continue
                segs.append(({kk: v[skip:] for kk, v in r.inputs.items()}, r.rows - skip))
                skip = 0
            tensors = {name: t[0] for name, t in self._stack([segs], counts[k] - b_star).items()}
            results[k].append(self._call(self.models[k], tensors))
        for k, rs in enumerate(per_model):
            if not rs:
                continue
            joined = {name: torch.cat([c[name] for c in results[k]]) if len(results[k]) > 1 else results[k][0][name]
                      for name in results[k][0]}
            row = 0
            for r in rs:
                r.outputs = {name: self._trim(name, o[row:row + r.rows], r) for name, o in joined.items()}
                row += r.rows
        return plan

    def _run_routed(self, per_model: List[List[Request]], counts: List[int]) -> None:
        """All rows, sorted by model, in one call of the routed module."""
        segs = [(r.inputs, r.rows) for rs in per_model for r in rs]
        tensors = {name: t[0] for name, t in self._stack([segs], sum(counts)).items()}
        self._route.set(counts)
        assert self.routed is not None
        outs = self._call(self.routed, tensors)
        row = 0
        for rs in per_model:
            for r in rs:
                r.outputs = {name: self._trim(name, o[row:row + r.rows], r) for name, o in outs.items()}
                row += r.rows

    def _trim(self, name: str, out: Tensor, req: Request) -> Tensor:
        """A copy of one request's output rows, a padded sequence dim (token-level logits) cut back to its length."""
        spec = self.outputs.get(name)
        if spec is not None and spec[1] and spec[1][0] == -1:
            var = next(s for s in self.inputs if -1 in s.shape)
            out = out[:, :req.inputs[var.name].shape[1 + var.shape.index(-1)]]
        return out.clone()

    # ------------------------------------------------------------------------------------------ set-up
    def _warm_up(self) -> None:
        """Compile for the example shape and record the outputs (names, dtypes, shapes per row; a dim that follows
        the sequence length, seen by running a second length, is -1)."""
        var = any(-1 in s.shape for s in self.inputs)
        lengths = [self.example_length, max(self.example_length - 1, 1)] if var else [self.example_length]
        seen = []
        first = "fused" if self.mode == "fused" else "per-model"
        for length in lengths:
            reqs = [self.example_request(k, 1, length, seed=k) for k in range(self.num_models)]
            self._run(reqs, first)
            if self.mode == "fused" and self.models:  # the per-model views too
                self._run(reqs[:1], "per-model")
            if self.routed is not None:  # and the routed module
                self._run(reqs, "routed")
            assert reqs[0].outputs is not None
            seen.append({k: (v.dtype, tuple(v.shape[1:])) for k, v in reqs[0].outputs.items()})
        for name, (dtype, shape) in seen[0].items():
            other = seen[-1][name][1]
            self.outputs[name] = (dtype, tuple(-1 if a != b else a for a, b in zip(shape, other)))

    def calibrate(self, repeat: int = 3) -> CostModel:
        """Time the fused call at B rows per model and one model at B rows, B = 1, 2, 4, ... max_batch."""
        grid = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, self.max_batch} & set(range(1, self.max_batch + 1)))
        fused: Dict[int, float] = {}
        single: Dict[int, float] = {}
        routed: Dict[int, float] = {}
        spread: Dict[int, float] = {}

        def best(fn: Callable[[], Any]) -> float:
            fn()
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                fn()
                ts.append(time.perf_counter() - t0)
            return min(ts)

        assert self.fused is not None
        for b in grid:
            reqs = [self.example_request(k, b, seed=b) for k in range(self.num_models)]
            fused[b] = best(lambda: self._run(reqs, "fused"))
            if self.models:
                single[b] = best(lambda: self._run(reqs[:1], "per-model"))
            if self.routed is not None:
                routed[b] = best(lambda: self._run(reqs[:1], "routed"))
                k = min(b, self.num_models)
                if k > 1:  # b rows over k models, one row per model and the rest on model 0
                    mixed = [self.example_request(m, 1 + (b - k if m == 0 else 0), seed=b) for m in range(k)]
                    spread[b] = (best(lambda: self._run(mixed, "routed")) - routed[b]) / (k - 1)
            if fused[b] > 2.0:  # a slow model: the rest is extrapolated
                break
        per_model = [v for k, v in sorted(spread.items()) if k <= self.num_models]
        self.cost = CostModel(fused, single, routed, max(per_model[-1], 0.0) if per_model else 0.0)
        return self.cost

    # ------------------------------------------------------------------------------------------ hot swap
    def load_model_state_dict(self, model: int, state_dict: Mapping[str, Tensor]) -> None:
        """New weights for one model (a state dict of the original architecture); atomic with respect to ``run``."""
        with self._lock:
            if self.fused is not None:
                shared_before = set(self.fused.shared_tensors)
                self.fused.load_model_state_dict(model, state_dict)
                if set(self.fused.shared_tensors) != shared_before:  # un-shared: the views point at old tensors
                    self.models = self._views()
                    self.routed = routed_module(self.fused, self._route)
            else:
                target = self.models[model]
                missing = [k for k in target.state_dict() if k not in state_dict]
                unexpected = [k for k in state_dict if k not in target.state_dict()]
                if missing or unexpected:
                    raise KeyError(f"the state dict does not fit the model: missing keys {missing[:10]}, "
                                   f"unexpected keys {unexpected[:10]}")
                target.load_state_dict(state_dict)
            self.version[model] += 1

    def weight_bytes(self) -> int:
        if self.fused is not None:
            return int(self.fused.weight_bytes()["total"])
        return sum(t.numel() * t.element_size() for m in self.models for t in
                   list(m.parameters()) + list(m.buffers()))

    def describe(self) -> str:
        how = ("fused (fusecc), per batch the fused call and/or per-model calls"
               + (" or one routed call" if self.routed is not None else "") + " from measured costs"
               if self.mode == "fused" else "per-model (N eager models, one call per model in each batch)")
        ins = ", ".join(f"{s.name} {str(s.dtype).replace('torch.', '')} {list(s.shape)}" for s in self.inputs)
        return (f"{self.num_models} models ({', '.join(self.names[:4])}{', ...' if self.num_models > 4 else ''}), "
                f"{how}; inputs per row: {ins}; weights {self.weight_bytes() / 2**20:.1f} MiB")
