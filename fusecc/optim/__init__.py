"""Optimizers for fused modules, with per-model hyper-parameters.

Every numeric hyper-parameter is a scalar (the same for every model) or a length-N sequence/tensor (one value per
model), and so are ``maximize`` and Adam's ``amsgrad`` (a bool, or N bools). A step over the stacked parameters ``[N, *shape]`` applies model i's settings to slice i, with the same
arithmetic as ``torch.optim``'s single-tensor implementations, so K fused steps equal K steps of N separate
``torch.optim`` optimizers. All updates are element-wise, so a NaN in one model's gradient never reaches
another model's parameters or state.

Every step is one pass over memory, behind the same classes on both devices. On CUDA, an SGD or Adam/AdamW step
updates all parameters of a param group and dtype in one fused Triton launch (``fusecc.kernels.optim``, fp32 math).
On the CPU, Adam/AdamW and SGD run torch's own fused CPU kernels (``torch._fused_adam(w)_``, ``torch._fused_sgd_``)
once per model over that model's slices of every parameter, and RMSprop fusecc's C kernel
(``fusecc.kernels.optim.cpu``). Parameters none of them can take (RMSprop on CUDA, non-contiguous ones, a C kernel
that cannot be built) go through aten ops one parameter at a time. ``fusecc.kernels.use_backend`` picks between
them (``"reference"``: aten everywhere).

Examples::

    fused = fusecc.fuse(models).train()
    opt = fusecc.optim.AdamW(fused, lr=[1e-4, 3e-4, 1e-3, 3e-3], weight_decay=0.01)
    sched = fusecc.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=[100] * 4)
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..kernels import _backend
from ..kernels import optim as _kernels  # fused Triton steps; imports no triton until a step picks it
from ..kernels.optim import cpu as _cpu_optim  # the CPU RMSprop step (C)
from . import lr_scheduler  # noqa: F401  (fusecc.optim.lr_scheduler)

Flag = Union[bool, Sequence[bool]]  # a boolean hyper-parameter: the same for every model, or one per model

PerModel = _kernels.PerModel  # a scalar, or one value per model

__all__ = ["FusedOptimizer", "SGD", "Adam", "AdamW", "RMSprop", "lr_scheduler"]


def _num_models_of(params: Any, num_models: Optional[int]) -> int:
    n = getattr(params, "num_models", None)
    if n is not None:
        if num_models is not None and num_models != n:
            raise ValueError(f"fusecc.optim: num_models={num_models} but the fused module holds {n} models")
        return n
    if num_models is None:
        raise ValueError("fusecc.optim: pass a FusedModule, or num_models= together with its stacked parameters")
    return num_models


def _axpy_(y: Tensor, x: Tensor, a: Union[float, Tensor]) -> Tensor:
    """``y += a * x`` in one pass, for a scalar or a per-model ``[N, 1, ...]`` factor."""
    return y.add_(x, alpha=a) if isinstance(a, float) else y.addcmul_(x, a)


def _axpy(y: Tensor, x: Tensor, a: Union[float, Tensor]) -> Tensor:
    """``y + a * x`` (a new tensor)."""
    return y.add(x, alpha=a) if isinstance(a, float) else torch.addcmul(y, x, a)


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: per-model hyper-parameters stored per param group as lists of N floats."""

    _per_model: Sequence[str] = ()  # numeric hyper-parameters that may differ per model
    _flags: Sequence[str] = ("maximize",)  # boolean ones that may differ per model (stored as lists of N bools)
    _nonneg: Sequence[str] = ("lr", "weight_decay", "eps")

    def __init__(self, params: Any, defaults: Dict[str, Any], num_models: Optional[int] = None):
        self.num_models = _num_models_of(params, num_models)
        self._param_names: Dict[int, str] = {}
        if hasattr(params, "named_parameters") and hasattr(params, "num_models"):
            if hasattr(params, "_unshare_trainable"):  # equal weights stored once: each model its own to train
                params._unshare_trainable(warn=False)
            named = [(k, p) for k, p in params.named_parameters() if p.requires_grad]
            self._param_names = {id(p): k for k, p in named}
            params = [p for _, p in named]
        else:
            from ..api import unshare_for_training

            params = [p for p in params] if not isinstance(params, Tensor) else [params]
            flat: List[Tensor] = []
            for j, g in enumerate(params):
                if isinstance(g, dict):
                    ps = g["params"]
                    ps = [ps] if isinstance(ps, Tensor) else list(ps)
                    params[j] = {**g, "params": ps}
                    flat += ps
                else:
                    flat.append(g)
            unshare_for_training(flat)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if "betas" in param_group:  # a group's own (beta1, beta2), each scalar or per model
            param_group = dict(param_group)
            param_group["beta1"], param_group["beta2"] = param_group.pop("betas")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        n = self.num_models
        for p in group["params"]:
            if p.dim() == 0 or p.shape[0] != n:
                raise ValueError(
                    f"fusecc.optim: every parameter must be stacked [N={n}, ...]; got one of shape {list(p.shape)}. "
                    "A FusedModule stores a weight equal in every model once (no model dim): pass the FusedModule "
                    "itself (fusecc.optim.AdamW(fused, ...)), which gives each model its own copy of the trainable "
                    "ones, or call fused.unshare() first"
                )
        for k in self._per_model:
            group[k] = self._expand(k, group[k])
        for k in self._flags:
            group[k] = self._expand_flag(k, group[k])

    def _expand_flag(self, name: str, value: Any) -> List[bool]:
        n = self.num_models
        if isinstance(value, Tensor):
            value = value.detach().flatten().tolist() if value.dim() > 0 else bool(value)
        if isinstance(value, (bool, int)):
            return [bool(value)] * n
        vals = list(value)
        if len(vals) != n or not all(isinstance(v, (bool, int)) for v in vals):
            raise ValueError(f"fusecc.optim: '{name}' must be a bool or num_models={n} bools (one per model), got "
                             f"{value!r}")
        return [bool(v) for v in vals]

    def _expand(self, name: str, value: Any) -> List[float]:
        n = self.num_models
        if isinstance(value, Tensor):
            value = value.detach().flatten().tolist() if value.dim() > 0 else float(value)
        if isinstance(value, (int, float)):
            vals = [float(value)] * n
        else:
            vals = [float(v) for v in value]
            if len(vals) != n:
                raise ValueError(
                    f"fusecc.optim: '{name}' has {len(vals)} values, expected 1 or num_models={n} (one per model)"
                )
        if name in self._nonneg:
            bad = [i for i, v in enumerate(vals) if v < 0 or math.isnan(v)]
            if bad:
                raise ValueError(f"fusecc.optim: '{name}' must be >= 0; model {bad[0]} has {vals[bad[0]]}")
        return vals

    def _hp(self, vals: Sequence[float], p: Tensor) -> Union[float, Tensor]:
        """Per-model values to broadcast against the stacked parameter p: a float when every model has the same
        value (then the update is torch's own op with a scalar), else a cached ``[N, 1, ..., 1]`` tensor."""
        v0 = vals[0]
        if all(v == v0 for v in vals):
            return v0
        key = (tuple(vals), p.dtype, p.device, p.dim())
        cache = self.__dict__.setdefault("_hp_cache", {})
        t = cache.get(key)
        if t is None:
            if len(cache) > 256:
                cache.clear()
            t = cache[key] = torch.tensor(vals, dtype=p.dtype, device=p.device).view([len(vals)] + [1] * (p.dim() - 1))
        return t

    @torch.no_grad()
    def step(self, closure=None):
        """One update of every parameter with a gradient, each model with its own hyper-parameters."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in self._kernel_step(g, [p for p in g["params"] if p.grad is not None]):
                self._update(g, p, self._signed(g, p), self.state[p])
        return loss

    def _signed(self, g: Dict[str, Any], p: Tensor) -> Tensor:
        """p's gradient, negated for the models that maximize."""
        mx = g["maximize"]
        if not any(mx):
            return p.grad
        if all(mx):
            return -p.grad
        return p.grad * self._hp([-1.0 if m else 1.0 for m in mx], p)

    def _update(self, g: Dict[str, Any], p: Tensor, grad: Tensor, st: Dict[str, Any]) -> None:
        raise NotImplementedError(f"{type(self).__name__} must define _update (the per-parameter step)")

    def _kernel_step(self, g: Dict[str, Any], params: List[Tensor]) -> List[Tensor]:
        """Update what a fused kernel can (one launch per bucket of ``_kernel_buckets``); return the rest, which
        ``step`` updates one parameter at a time with aten ops. The default fused kernel updates nothing."""
        return params

    def _kernel_buckets(self, params: List[Tensor], op: str, key: Callable[[Tensor], Any],
                        state_keys: Sequence[str] = ()) -> Tuple[Dict[Any, List[Tensor]], List[Tensor]]:
        """Split params into buckets for the fused ``fusecc.kernels.optim`` kernel (by device, dtype and
        ``key(p)``) and the rest: params the kernel cannot take (non-contiguous, a dtype it lacks, a gradient of
        another dtype, a state without the tensors ``state_keys`` of p's dtype and shape), and the buckets that
        the ``fusecc.kernels`` backend keeps on aten ("auto" on CPU tensors, "reference")."""
        buckets: Dict[Any, List[Tensor]] = {}
        rest: List[Tensor] = []
        for p in params:
            st = self.state[p]
            ok = (p.dtype in _backend.SUPPORTED_DTYPES and p.is_contiguous() and p.grad.dtype == p.dtype
                  and p.grad.layout == torch.strided and p.grad.shape == p.shape
                  and (not st or all(k in st and st[k].dtype == p.dtype and st[k].shape == p.shape
                                     and st[k].is_contiguous() for k in state_keys)))
            if ok:
                buckets.setdefault((p.device, p.dtype, key(p)), []).append(p)
            else:
                rest.append(p)
        for k in list(buckets):
            ps = buckets[k]
            if not _backend.use_triton(ps + [p.grad for p in ps], None, op):
                rest.extend(buckets.pop(k))
        return buckets, rest

    def reset_model(self, model: int, **hyperparameters: Any) -> None:
        """Start model ``model`` afresh: its hyper-parameters set to ``hyperparameters`` (those not given are kept),
        its optimizer state zeroed, so its next step is a first step, as a new ``torch.optim`` optimizer's would be.
        The other models are untouched. (Hyper-parameter search refills a finished trial's slot with it; the slot's
        weights are reset with ``FusedModule.load_model_state_dict``.)"""
        self.set_hyperparameters(model, **hyperparameters)
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if st:
                    self._reset_state(g, p, st, model)

    def set_hyperparameters(self, model: int, **hyperparameters: Any) -> None:
        """Set model ``model``'s hyper-parameters (in every param group), keeping its state: a schedule's change."""
        n = self.num_models
        if not 0 <= model < n:
            raise IndexError(f"fusecc.optim: model {model} out of range for num_models={n}")
        if "betas" in hyperparameters:
            hyperparameters = dict(hyperparameters)
            hyperparameters["beta1"], hyperparameters["beta2"] = hyperparameters.pop("betas")
        unknown = [k for k in hyperparameters if k not in self._per_model and k not in self._flags]
        if unknown:
            raise ValueError(f"fusecc.optim.{type(self).__name__}: '{unknown[0]}' is not a per-model hyper-parameter; "
                             f"per model are {', '.join(list(self._per_model) + list(self._flags))}")
        for g in self.param_groups:
            old = {k: g[k] for k in hyperparameters}
            for k, v in hyperparameters.items():
                vals = list(g[k])
                vals[model] = v
                g[k] = self._expand_flag(k, vals) if k in self._flags else self._expand(k, vals)
            try:
                self._check_group(g)
            except ValueError:
                g.update(old)
                raise

    def model_state(self, model: int) -> Dict[str, Any]:
        """Model ``model``'s own optimizer: its hyper-parameters per group and its slices of the state, copied
        (by parameter name). ``load_model_state`` puts it into any model of an optimizer of the same class."""
        names = self._param_names
        if not names:
            raise ValueError("fusecc.optim: model_state() needs an optimizer built from a FusedModule")
        groups = [{k: g[k][model] for k in list(self._per_model) + list(self._flags)} for g in self.param_groups]
        state: Dict[str, Dict[str, Any]] = {}
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if st:
                    state[names[id(p)]] = {k: (v[model].clone() if isinstance(v, Tensor) and v.dim() > 0 else
                                               v.clone() if isinstance(v, Tensor) else v) for k, v in st.items()}
        return {"groups": groups, "state": state}

    def load_model_state(self, model: int, model_state: Dict[str, Any]) -> None:
        """Make model ``model``'s optimizer the one ``model_state`` (from ``model_state``) describes: a fork."""
        groups = model_state["groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"fusecc.optim: a model state of {len(groups)} param groups for an optimizer of "
                             f"{len(self.param_groups)}")
        for hp in groups:  # (the same values in each group, as set per model)
            self.set_hyperparameters(model, **hp)
        by_name = {self._param_names[id(p)]: p for g in self.param_groups for p in g["params"]}
        n = self.num_models
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if st:
                    self._zero_slice(st, model)
        for name, src in model_state["state"].items():
            p = by_name.get(name)
            if p is None:
                raise ValueError(f"fusecc.optim: the model state has a parameter {name!r} this optimizer lacks")
            st = self.state[p]
            for k, v in src.items():
                if k == "step":
                    cur = st.get("step")
                    if cur is None:
                        cur = st["step"] = torch.zeros(n, dtype=torch.float32)
                    elif cur.dim() == 0:
                        cur = st["step"] = cur.expand(n).clone()
                    cur[model] = v
                elif isinstance(v, Tensor):
                    if k not in st:
                        st[k] = torch.zeros_like(p)
                    st[k][model].copy_(v)
                else:
                    st[k] = v

    def _check_group(self, g: Dict[str, Any]) -> None:
        """Validate a group's hyper-parameters after a change (subclasses)."""

    def _reset_state(self, g: Dict[str, Any], p: Tensor, st: Dict[str, Any], model: int) -> None:
        """Make p's state that of a model at its first step (subclasses add the buffers its settings need)."""
        self._zero_slice(st, model)

    def _zero_slice(self, st: Dict[str, Any], model: int) -> None:
        """Zero model ``model``'s slice of every per-model state tensor; a step count becomes per model."""
        n = self.num_models
        for k, v in list(st.items()):
            if not isinstance(v, Tensor):
                continue
            if k == "step":
                if v.dim() == 0:
                    v = st[k] = v.expand(n).clone()
                v[model] = 0
            elif v.dim() > 0 and v.shape[0] == n:
                v[model].zero_()

    def select(self, indices: Sequence[int], fused: Any) -> "FusedOptimizer":
        """The same optimizer narrowed to models ``indices`` of ``fused`` (made by ``FusedModule.select``), keeping
        their hyper-parameters and optimizer state."""
        idx = list(indices)
        names = self._param_names
        if not names:
            raise ValueError("fusecc.optim: select() needs an optimizer built from a FusedModule")
        new_params = dict(fused.named_parameters())
        groups = []
        for g in self.param_groups:
            ng = {k: ([v[i] for i in idx] if k in self._per_model or k in self._flags else v) for k, v in g.items()
                  if k != "params"}
            ng["params"] = [new_params[names[id(p)]] for p in g["params"]]
            groups.append(ng)
        new = type(self)(groups, num_models=len(idx))
        new._param_names = {id(new_params[names[id(p)]]): names[id(p)] for g in self.param_groups for p in g["params"]}
        sel = torch.tensor(idx)
        for g in self.param_groups:
            for p in g["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                q = new_params[names[id(p)]]
                new.state[q] = {k: (v.index_select(0, sel.to(v.device)).clone() if isinstance(v, Tensor) and v.dim() > 0
                                    and v.shape[0] == self.num_models else v) for k, v in st.items()}
        return new


class SGD(FusedOptimizer):
    """SGD with momentum, dampening, nesterov and weight decay, each per model (as ``torch.optim.SGD``)."""

    _per_model = ("lr", "momentum", "dampening", "weight_decay")
    _nonneg = ("lr", "momentum", "weight_decay")

    def __init__(self, params: Any, lr: PerModel = 1e-3, momentum: PerModel = 0.0, dampening: PerModel = 0.0,
                 weight_decay: PerModel = 0.0, nesterov: bool = False, maximize: Flag = False,
                 num_models: Optional[int] = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                        maximize=maximize)
        super().__init__(params, defaults, num_models)
        for g in self.param_groups:
            self._check_group(g)

    def _check_group(self, g: Dict[str, Any]) -> None:
        if g["nesterov"] and any(m <= 0 or d != 0 for m, d in zip(g["momentum"], g["dampening"])):
            raise ValueError("fusecc.optim.SGD: nesterov needs momentum > 0 and dampening = 0 for every model")

    def _reset_state(self, g: Dict[str, Any], p: Tensor, st: Dict[str, Any], model: int) -> None:
        # a zero buffer makes the next step buf = momentum * 0 + (1 - dampening) * d: torch's first step (buf = d)
        # only without dampening
        if g["dampening"][model] != 0 and "momentum_buffer" in st:
            raise ValueError("fusecc.optim.SGD.reset_model: a model restarted with dampening != 0 would not take "
                             "torch's first step (buf = grad, dampening ignored); use dampening=0 or a new optimizer")
        super()._reset_state(g, p, st, model)

    def _update(self, g: Dict[str, Any], p: Tensor, grad: Tensor, st: Dict[str, Any]) -> None:
        d = grad
        if any(g["weight_decay"]):
            d = _axpy(d, p, self._hp(g["weight_decay"], p))  # L2 penalty added to the gradient, as torch
        if any(g["momentum"]):
            mom = self._hp(g["momentum"], p)
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = st["momentum_buffer"] = d.clone()
            else:
                damp = [1 - x for x in g["dampening"]]
                _axpy_(buf.mul_(mom), d, self._hp(damp, p))
            upd = _axpy(d, buf, mom) if g["nesterov"] else buf
            if not all(g["momentum"]):  # models without momentum take the plain gradient
                upd = torch.where(mom != 0, upd, d)
            d = upd
        _axpy_(p, d, self._hp([-x for x in g["lr"]], p))

    def _cpu_fused_ok(self, p: Tensor) -> bool:
        gr, buf = p.grad, self.state[p].get("momentum_buffer")
        return (p.device.type == "cpu" and p.dtype in _CPU_FUSED_DTYPES and p.is_contiguous()
                and gr.layout == torch.strided and gr.dtype == p.dtype and gr.shape == p.shape and gr.is_contiguous()
                and (buf is None or (buf.dtype == p.dtype and buf.shape == p.shape and buf.is_contiguous())))

    def _cpu_fused_step(self, g: Dict[str, Any], params: List[Tensor]) -> None:
        """torch's own fused CPU SGD kernel, once per model over that model's slices of every parameter (one pass
        over memory, each model with its own lr, momentum, dampening and weight decay)."""
        has_momentum = any(g["momentum"])
        new = {id(p) for p in params if has_momentum and "momentum_buffer" not in self.state[p]}
        for first in ((True, False) if has_momentum else (False,)):
            ps = [p for p in params if (id(p) in new) == first]
            if not ps:
                continue
            if first:  # the kernel writes buf = d at the first step, as torch's grad.clone()
                for p in ps:
                    self.state[p]["momentum_buffer"] = torch.empty_like(p)
            for i in range(self.num_models):
                m = g["momentum"][i]
                bufs = [self.state[p]["momentum_buffer"][i] for p in ps] if m != 0 else []
                torch._fused_sgd_([p[i] for p in ps], [p.grad[i] for p in ps], bufs,
                                  weight_decay=g["weight_decay"][i], momentum=m, lr=g["lr"][i],
                                  dampening=g["dampening"][i], nesterov=g["nesterov"], maximize=g["maximize"][i],
                                  is_first_step=first)

    def _kernel_step(self, g: Dict[str, Any], params: List[Tensor]) -> List[Tensor]:
        if _backend.use_cpu_kernels(None, "sgd"):  # (not under "reference"; not "triton": its interpreter tests)
            cpu = [p for p in params if self._cpu_fused_ok(p)]
            if _per_model_elements(cpu) < _CPU_FUSED_MIN_ELEMENTS:  # small models: N kernel calls cost more
                cpu = []
            if cpu:
                self._cpu_fused_step(g, cpu)
                done = {id(p) for p in cpu}
                params = [p for p in params if id(p) not in done]
        if len(set(g["maximize"])) > 1:  # (the Triton kernel takes one maximize flag)
            return params
        has_momentum = any(g["momentum"])
        buckets, rest = self._kernel_buckets(
            params, "sgd_step", lambda p: has_momentum and "momentum_buffer" not in self.state[p],
            ("momentum_buffer",))
        for (_, _, first), ps in buckets.items():
            bufs = None
            if has_momentum:
                if first:  # the kernel writes buf = d, as torch's grad.clone()
                    for p in ps:
                        self.state[p]["momentum_buffer"] = _backend.new_empty_like(p)
                bufs = [self.state[p]["momentum_buffer"] for p in ps]
            _kernels.sgd_step(ps, [p.grad.contiguous() for p in ps], bufs, lr=g["lr"],
                              weight_decay=g["weight_decay"], momentum=g["momentum"], dampening=g["dampening"],
                              nesterov=g["nesterov"], maximize=g["maximize"][0], first_step=first, backend="triton")
        return rest


# torch's fused CPU kernels run once per model (N calls, each over that model's slices): below this many elements
# per model in a param group, the aten update (a few ops over all N models at once) is faster (an MLP of 26K weights
# per model at N=16: 0.5 ms a step against 0.8-1.1 ms)
_CPU_FUSED_MIN_ELEMENTS = 1 << 17


def _per_model_elements(params: List[Tensor]) -> int:
    return sum(p[0].numel() for p in params)


# dtypes of torch's fused CPU Adam kernel (torch._fused_adam_ / _fused_adamw_)
_CPU_FUSED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class Adam(FusedOptimizer):
    """Adam (L2 weight decay added to the gradient) with per-model lr, betas, eps and weight decay."""

    _per_model = ("lr", "beta1", "beta2", "eps", "weight_decay")
    _flags = ("maximize", "amsgrad")
    _decoupled = False

    def __init__(self, params: Any, lr: PerModel = 1e-3, betas: Any = (0.9, 0.999), eps: PerModel = 1e-8,
                 weight_decay: PerModel = 0.0, amsgrad: Flag = False, maximize: Flag = False,
                 num_models: Optional[int] = None):
        b1, b2 = betas
        defaults = dict(lr=lr, beta1=b1, beta2=b2, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize)
        super().__init__(params, defaults, num_models)
        for g in self.param_groups:
            self._check_group(g)

    def _check_group(self, g: Dict[str, Any]) -> None:
        for k in ("beta1", "beta2"):
            bad = [i for i, v in enumerate(g[k]) if not 0.0 <= v < 1.0]
            if bad:
                raise ValueError(f"fusecc.optim: '{k}' must be in [0, 1); model {bad[0]} has {g[k][bad[0]]}")

    def _reset_state(self, g: Dict[str, Any], p: Tensor, st: Dict[str, Any], model: int) -> None:
        if g["amsgrad"][model] and "max_exp_avg_sq" not in st:
            st["max_exp_avg_sq"] = torch.zeros_like(p)
        super()._reset_state(g, p, st, model)

    def _update(self, g: Dict[str, Any], p: Tensor, grad: Tensor, st: Dict[str, Any]) -> None:
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
            if any(g["amsgrad"]):
                st["max_exp_avg_sq"] = torch.zeros_like(p)
        st["step"] += 1
        n = self.num_models
        steps = st["step"].tolist() if st["step"].dim() else [float(st["step"])] * n  # per model after reset_model
        if any(g["weight_decay"]):
            if self._decoupled:
                p.mul_(self._hp([1 - lr * wd for lr, wd in zip(g["lr"], g["weight_decay"])], p))
            else:
                grad = _axpy(grad, p, self._hp(g["weight_decay"], p))
        st["exp_avg"].lerp_(grad, self._hp([1 - b for b in g["beta1"]], p))
        one_minus_b2 = self._hp([1 - b for b in g["beta2"]], p)
        if isinstance(one_minus_b2, float):
            st["exp_avg_sq"].mul_(g["beta2"][0]).addcmul_(grad, grad, value=one_minus_b2)
        else:
            st["exp_avg_sq"].mul_(self._hp(g["beta2"], p)).addcmul_(grad, grad * one_minus_b2)
        bc1 = [1 - b**step for b, step in zip(g["beta1"], steps)]
        bc2_sqrt = self._hp([math.sqrt(1 - b**step) for b, step in zip(g["beta2"], steps)], p)
        step_size = self._hp([lr / c for lr, c in zip(g["lr"], bc1)], p)
        sq = st["exp_avg_sq"]
        ams = g["amsgrad"]
        if any(ams):
            torch.maximum(st["max_exp_avg_sq"], sq, out=st["max_exp_avg_sq"])
            sq = st["max_exp_avg_sq"] if all(ams) else torch.where(
                self._hp([float(a) for a in ams], p) != 0, st["max_exp_avg_sq"], sq)
        denom = (sq.sqrt() / bc2_sqrt).add_(self._hp(g["eps"], p))
        if isinstance(step_size, float):
            p.addcdiv_(st["exp_avg"], denom, value=-step_size)
        else:
            p.addcdiv_(st["exp_avg"], denom.div_(step_size), value=-1.0)

    def _advance(self, params: List[Tensor], keys: Sequence[str]) -> List[Dict[str, Any]]:
        """The states of ``params`` (created zero at the first step), their step counts advanced by one."""
        sts = []
        for p in params:
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                for k in keys:
                    st[k] = torch.zeros_like(p)
            st["step"] += 1
            sts.append(st)
        return sts

    def _cpu_fused_ok(self, g: Dict[str, Any], p: Tensor, keys: Sequence[str]) -> bool:
        st = self.state[p]
        gr = p.grad
        return (p.device.type == "cpu" and p.dtype in _CPU_FUSED_DTYPES and p.is_contiguous()
                and gr.layout == torch.strided and gr.dtype == p.dtype and gr.shape == p.shape and gr.is_contiguous()
                and (not st or all(k in st and st[k].dtype == p.dtype and st[k].shape == p.shape
                                   and st[k].is_contiguous() for k in keys)))

    def _cpu_fused_step(self, g: Dict[str, Any], params: List[Tensor], keys: Sequence[str]) -> None:
        """torch's own fused CPU Adam/AdamW kernel, once per model over that model's slices of every parameter: one
        pass over memory for the whole group, each model with its own hyper-parameters (the kernel takes one set)."""
        sts = self._advance(params, keys)
        steps = [st["step"] for st in sts]  # the step of every model of a parameter, or one per model (read only)
        fn = torch._fused_adamw_ if self._decoupled else torch._fused_adam_
        for i in range(self.num_models):
            fn([p[i] for p in params], [p.grad[i] for p in params], [st["exp_avg"][i] for st in sts],
               [st["exp_avg_sq"][i] for st in sts],
               [st["max_exp_avg_sq"][i] for st in sts] if g["amsgrad"][i] else [],
               [s[i] if s.dim() else s for s in steps],
               lr=g["lr"][i], beta1=g["beta1"][i], beta2=g["beta2"][i], weight_decay=g["weight_decay"][i],
               eps=g["eps"][i], amsgrad=g["amsgrad"][i], maximize=g["maximize"][i])

    def _kernel_step(self, g: Dict[str, Any], params: List[Tensor]) -> List[Tensor]:
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if any(g["amsgrad"]) else ())
        # under "auto" (not "reference": aten ops only; not "triton": the kernel forced, e.g. in its interpreter tests)
        cpu = [p for p in params if self._cpu_fused_ok(g, p, keys)] if _backend.use_cpu_kernels(None, "adam") else []
        if _per_model_elements(cpu) < _CPU_FUSED_MIN_ELEMENTS:  # small models: N kernel calls cost more
            cpu = []
        if cpu:
            self._cpu_fused_step(g, cpu, keys)
            done = {id(p) for p in cpu}
            params = [p for p in params if id(p) not in done]
        if len(set(g["maximize"])) > 1 or len(set(g["amsgrad"])) > 1:  # (the Triton kernel takes one flag of each)
            return params
        def own_step(p: Tensor) -> bool:  # a step count per model (after reset_model): the Triton kernel takes one
            return bool(self.state[p]) and self.state[p]["step"].dim() > 0

        per_model_step = [p for p in params if own_step(p)]
        params = [p for p in params if not own_step(p)]
        buckets, rest = self._kernel_buckets(
            params, "adam_step", lambda p: float(self.state[p]["step"]) if self.state[p] else 0.0, keys)
        rest += per_model_step
        for (_, _, step), ps in buckets.items():
            sts = self._advance(ps, keys)
            _kernels.adam_step(ps, [p.grad.contiguous() for p in ps], [st["exp_avg"] for st in sts],
                               [st["exp_avg_sq"] for st in sts],
                               [st["max_exp_avg_sq"] for st in sts] if g["amsgrad"][0] else None,
                               lr=g["lr"], beta1=g["beta1"], beta2=g["beta2"], eps=g["eps"],
                               weight_decay=g["weight_decay"], decoupled=self._decoupled, step=step + 1,
                               maximize=g["maximize"][0], backend="triton")
        return rest


class AdamW(Adam):
    """AdamW (decoupled weight decay, default 1e-2) with per-model hyper-parameters."""

    _decoupled = True

    def __init__(self, params: Any, lr: PerModel = 1e-3, betas: Any = (0.9, 0.999), eps: PerModel = 1e-8,
                 weight_decay: PerModel = 1e-2, amsgrad: Flag = False, maximize: Flag = False,
                 num_models: Optional[int] = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize, num_models)


class RMSprop(FusedOptimizer):
    """RMSprop with per-model lr, alpha, eps, weight decay and momentum (as ``torch.optim.RMSprop``)."""

    _per_model = ("lr", "alpha", "eps", "weight_decay", "momentum")
    _nonneg = ("lr", "alpha", "eps", "weight_decay", "momentum")

    def __init__(self, params: Any, lr: PerModel = 1e-2, alpha: PerModel = 0.99, eps: PerModel = 1e-8,
                 weight_decay: PerModel = 0.0, momentum: PerModel = 0.0, centered: bool = False,
                 maximize: Flag = False, num_models: Optional[int] = None):
        defaults = dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum, centered=centered,
                        maximize=maximize)
        super().__init__(params, defaults, num_models)

    def _reset_state(self, g: Dict[str, Any], p: Tensor, st: Dict[str, Any], model: int) -> None:
        if g["momentum"][model] and "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p)
        super()._reset_state(g, p, st, model)

    def _init_state(self, g: Dict[str, Any], p: Tensor, st: Dict[str, Any]) -> None:
        st["step"] = torch.zeros((), dtype=torch.float32)
        st["square_avg"] = torch.zeros_like(p)
        if any(g["momentum"]):
            st["momentum_buffer"] = torch.zeros_like(p)
        if g["centered"]:
            st["grad_avg"] = torch.zeros_like(p)

    def _kernel_step(self, g: Dict[str, Any], params: List[Tensor]) -> List[Tensor]:
        """On the CPU (float32, under the "auto" backend) the C kernel of fusecc.kernels.optim.cpu: one pass over
        p, grad and the states per parameter, every hyper-parameter per model."""
        if not params or not _backend.use_cpu_kernels(None, "rmsprop"):
            return params
        rest = []
        for p in params:
            st = self.state[p]
            if not st:
                self._init_state(g, p, st)
            if not _cpu_optim.usable(p, p.grad, st["square_avg"], st.get("momentum_buffer"), st.get("grad_avg")):
                rest.append(p)
                continue
            st["step"] += 1
            _cpu_optim.rmsprop_step(p.detach(), p.grad, st["square_avg"], st.get("momentum_buffer"),
                                    st.get("grad_avg"), g["lr"], g["alpha"], g["eps"], g["weight_decay"],
                                    g["momentum"], g["centered"], g["maximize"])
        return rest

    def _update(self, g: Dict[str, Any], p: Tensor, grad: Tensor, st: Dict[str, Any]) -> None:
        if not st:
            self._init_state(g, p, st)
        st["step"] += 1
        if any(g["weight_decay"]):
            grad = _axpy(grad, p, self._hp(g["weight_decay"], p))
        one_minus_alpha = self._hp([1 - x for x in g["alpha"]], p)
        if isinstance(one_minus_alpha, float):
            st["square_avg"].mul_(g["alpha"][0]).addcmul_(grad, grad, value=one_minus_alpha)
        else:
            st["square_avg"].mul_(self._hp(g["alpha"], p)).addcmul_(grad, grad * one_minus_alpha)
        if g["centered"]:
            st["grad_avg"].lerp_(grad, one_minus_alpha)
            avg = st["square_avg"].addcmul(st["grad_avg"], st["grad_avg"], value=-1).sqrt_()
        else:
            avg = st["square_avg"].sqrt()
        avg = avg.add_(self._hp(g["eps"], p))
        neg_lr = self._hp([-x for x in g["lr"]], p)
        if "momentum_buffer" in st:
            buf = st["momentum_buffer"]
            buf.mul_(self._hp(g["momentum"], p)).addcdiv_(grad, avg)
            _axpy_(p, buf, neg_lr)
        elif isinstance(neg_lr, float):
            p.addcdiv_(grad, avg, value=neg_lr)
        else:
            p.addcdiv_(grad, avg.div_(-neg_lr), value=-1.0)

