"""fuse(): N same-architecture models -> one FusedModule that runs all N at once.

The module holds the N models' parameters and buffers stacked ``[N, ...]`` under their original qualnames, and one
compiled forward per input signature (fusecc/pipeline.py makes it at the first call). It is an ordinary
``nn.Module``: state_dict, ``.to()``, train/eval; and models go in and out of it (``model_state_dict(i)``,
``load_model_state_dict(i, sd)``, ``unfuse()``, ``select(indices)``).
"""

from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_unflatten

from fusecc.kernels._backend import use_triton

from . import lora
from .check import check_models
from .choose import Chooser
from .errors import FusionError, Unshare
from .fleet import Constant, Fleet, StackedTensor, placeholders, skeleton
from .pipeline import Compiled, compile_fleet
from .report import Report


class _AllNames(set):
    """shared_inputs=True: every argument, the keywords of a forward's ``**kwargs`` too."""

    def __contains__(self, name: object) -> bool:
        return True

    def __ge__(self, other: Any) -> bool:
        return True

    def __bool__(self) -> bool:
        return True

    def __deepcopy__(self, memo: dict) -> "_AllNames":
        return _AllNames()


class _Holder(nn.Module):
    """Stands at the qualname of one original submodule and holds its stacked parameters and buffers."""

    def __init__(self, typename: str):
        super().__init__()
        self._fusecc_type = typename

    def extra_repr(self) -> str:
        return f"fused {self._fusecc_type}"


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    (root.get_submodule(parent) if parent else root).add_module(name, module)


class FusedModule(nn.Module):
    """N models of one architecture as ONE module.

    Every tensor argument of a call carries a leading model dim of size ``num_models`` (or none, for shared inputs);
    every tensor in the output gets a leading model dim. Parameters and buffers are stacked ``[N, *shape]`` and
    registered under the original qualnames, so ``state_dict()`` reads like the original's with a leading N.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        shared_inputs: Union[bool, Iterable[str]] = False,
        leaf_modules: Sequence[Any] = (),
        tune: bool = False,
        strict: bool = False,
        frontend: str = "auto",
        share: bool = True,
    ):
        super().__init__()
        from .frontends import FRONTENDS

        if frontend != "auto" and frontend not in FRONTENDS:
            raise ValueError(f"fusecc.fuse: frontend={frontend!r}; expected 'auto' or one of {sorted(FRONTENDS)}")
        models, self._fusecc_lora = check_models(models, lora.prepare)  # (peft LoRA fleets: fusecc/lora.py)
        ref = models[0]
        n = len(models)
        self.num_models = n
        # traced and shape-propagated, never run on data; its tensors become views of the fused module's at the end of
        # _build (the user's models are never touched)
        proto = skeleton(ref)
        self.__dict__["_fusecc_proto"] = proto
        self.__dict__["_fusecc_templates"] = {}
        self.__dict__["_fusecc_compiled"] = {}
        self.__dict__["_fusecc_last"] = None
        self.__dict__["_fusecc_chooser"] = Chooser(tune=tune)
        self._fusecc_traced_consts: List[str] = []
        self._fusecc_source = type(ref).__qualname__
        self._fusecc_leaf_modules = tuple(leaf_modules)
        self._fusecc_strict = bool(strict)
        # the frontend asked for; "auto" settles on the one that captured the first compile (fusecc/frontends/)
        self._fusecc_frontend = frontend
        if not isinstance(share, bool):
            raise TypeError(f"fusecc.fuse: share must be True or False, got {share!r}")
        self._fusecc_share = share
        sig = inspect.signature(proto.forward)
        if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()) and hasattr(proto, "get_base_model"):
            # a peft PeftModel passes forward(*args, **kwargs) on to the model it wraps: that model's arguments
            sig = inspect.signature(proto.get_base_model().forward)
        self.__dict__["_fusecc_sig"] = sig  # computed once: binding call arguments is on every forward's path
        self._fusecc_var_kw: Optional[str] = None  # forward's **kwargs: its keywords are fused as named arguments
        for p in sig.parameters.values():
            if p.kind == p.VAR_POSITIONAL:
                raise FusionError(
                    f"fusecc.fuse: {type(ref).__name__}.forward takes *{p.name}; only named arguments can be fused"
                )
            if p.kind == p.VAR_KEYWORD:
                self._fusecc_var_kw = p.name
        self._fusecc_arg_names = [k for k, p in sig.parameters.items() if p.kind != p.VAR_KEYWORD]
        if isinstance(shared_inputs, bool):
            self._fusecc_shared = _AllNames() if shared_inputs else set()
        else:
            shared = set(shared_inputs)
            unknown = shared - set(self._fusecc_arg_names) if self._fusecc_var_kw is None else set()
            if unknown:
                raise ValueError(
                    f"fusecc.fuse: shared_inputs names {sorted(unknown)}, which {type(ref).__name__}.forward does not "
                    f"take; its arguments are {self._fusecc_arg_names}"
                )
            self._fusecc_shared = shared
        self._build(models, proto)

    # ------------------------------------------------------------------ construction
    def _build(self, models: List[nn.Module], proto: nn.Module) -> None:
        self.training = proto.training
        self._fusecc_shared_names: set = set()  # canonical names of the tensors stored once (equal in all models)
        for path, mod in proto.named_modules():
            if not path:
                continue
            own = list(mod._parameters.values()) + list(mod._buffers.values())
            if not any(t is not None for t in own) and not mod._modules:
                holder = copy.deepcopy(mod)  # parameter-free leaf: keep it as it is (config, training flag)
            else:
                holder = _Holder(type(mod).__name__)
                holder.training = mod.training
            _set_path(self, path, holder)
        alias: Dict[str, str] = {}
        param_names = set()
        seen: Dict[int, str] = {}
        for name, p in proto.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                alias[name] = seen[id(p)]
                continue
            seen[id(p)] = name
            alias[name] = name
            param_names.add(name)
            t = self._stack_or_share(name, [m.get_parameter(name).detach() for m in models])
            self._register(name, nn.Parameter(t, requires_grad=p.requires_grad))
        for mod_path, mod in proto.named_modules(remove_duplicate=False):
            for bname, b in mod._buffers.items():
                if b is None:
                    continue
                name = f"{mod_path}.{bname}" if mod_path else bname
                if id(b) in seen:
                    alias[name] = seen[id(b)]
                    continue
                seen[id(b)] = name
                alias[name] = name
                t = self._stack_or_share(name, [m.get_buffer(name).detach() for m in models])
                self._register(name, t, persistent=bname not in mod._non_persistent_buffers_set)
        self._fusecc_alias = alias
        self._fusecc_param_names = param_names
        self._fusecc_state_keys = list(proto.state_dict().keys())
        # plain tensor attributes (neither parameter nor buffer): shared if equal in every model, else stacked
        self._fusecc_constants: Dict[str, Tuple[str, bool]] = {}
        for mod_path, mod in proto.named_modules():
            for k, v in vars(mod).items():
                if isinstance(v, Tensor) and not k.startswith("_"):
                    q = f"{mod_path}.{k}" if mod_path else k
                    vals = [getattr(m.get_submodule(mod_path), k) for m in models]
                    same = all(torch.equal(vals[0], x) for x in vals[1:])
                    bname = f"_fusecc_const{len(self._fusecc_constants)}"
                    self.register_buffer(bname, vals[0].clone() if same else torch.stack(vals), persistent=False)
                    self._fusecc_constants[q] = (bname, not same)
        self._register_load_state_dict_pre_hook(_FusedModule_load_hook, with_module=True)
        self._register_state_dict_hook(_FusedModule_state_dict_hook)
        self._link_prototype()

    @torch.no_grad()
    def _stack_or_share(self, name: str, values: List[Tensor]) -> Tensor:
        """The N models' values of one tensor as the fused module holds it: stored once (a copy, never the user's
        tensor) when every model's is bitwise equal and sharing is on, else stacked ``[N, ...]``."""
        if self._fusecc_share and all(bitwise_equal(values[0], v) for v in values[1:]):
            self._fusecc_shared_names.add(name)
            return values[0].clone()
        return torch.stack(values)

    def _link_prototype(self) -> None:
        """The prototype's parameters and buffers become views of the fused module's own (model 0's slice of a
        stacked tensor, or the shared one): it is traced and shape-propagated, never run on data, and must not hold
        a copy of a model (the weight storage of a fleet is one copy of what is shared plus N of the rest)."""
        proto = self._fusecc_proto

        def model0_view(canon: str) -> Tensor:  # (not _model_slice: the prototype keeps LoRA's padded ranks)
            t = self._canonical_tensor(canon).detach()
            return t if canon in self._fusecc_shared_names else t[0]

        self._install(proto, model0_view)
        for canon in self._fusecc_shared_names & self._fusecc_param_names:  # an optimizer may get them in a list
            _mark_shared(self.get_parameter(canon), self)
        if self._fusecc_lora is not None:  # peft reads each adapter's scaling from its dict: the linked buffer
            for path, ads in self._fusecc_lora.adapters.items():
                layer = proto.get_submodule(path)
                for ad in ads:
                    layer.scaling[ad] = layer._buffers[lora.SCALE_BUFFER.format(ad)]

    def _install(self, module: nn.Module, tensor_of: Any) -> None:
        """Set every parameter and buffer of ``module`` (a copy of the architecture) to ``tensor_of(canonical
        name)``, parameters as ``nn.Parameter`` with the module's requires_grad; tied names get the same tensor."""
        made: Dict[str, Tensor] = {}
        for name, canon in self._fusecc_alias.items():
            parent, _, leaf = name.rpartition(".")
            owner = module.get_submodule(parent) if parent else module
            if canon not in made:
                t = tensor_of(canon)
                if leaf in owner._parameters:
                    t = nn.Parameter(t, requires_grad=owner._parameters[leaf].requires_grad)
                made[canon] = t
            if leaf in owner._parameters:
                owner._parameters[leaf] = made[canon]
            else:
                owner._buffers[leaf] = made[canon]

    # ------------------------------------------------------------------ what the models share
    @property
    def shared_tensors(self) -> List[str]:
        """The parameters and buffers stored once, because they were bitwise equal in every model (a frozen trunk, a
        LoRA base); every other one is stacked ``[N, ...]``."""
        return sorted(self._fusecc_shared_names)

    def weight_bytes(self) -> Dict[str, int]:
        """Bytes of parameters and buffers: ``shared`` (stored once), ``per_model`` (the stacked ones, all N
        models), ``total``, and ``unfused``: what the N models take on their own."""
        shared = per_model = 0
        for canon in dict.fromkeys(self._fusecc_alias.values()):
            t = self._canonical_tensor(canon)
            if canon in self._fusecc_shared_names:
                shared += t.numel() * t.element_size()
            else:
                per_model += t.numel() * t.element_size()
        return {"shared": shared, "per_model": per_model, "total": shared + per_model,
                "unfused": shared * self.num_models + per_model}

    def unshare(self, names: Optional[Iterable[str]] = None) -> List[str]:
        """Give every model its own copy of the shared tensors ``names`` (all of them by default), as if they had
        differed at fuse time. The same ``nn.Parameter`` objects stay registered (an optimizer built on them keeps
        working), now ``[N, ...]``; compiled forwards are dropped and made again. Returns the names un-shared."""
        if names is None:
            todo = sorted(self._fusecc_shared_names)
        else:
            todo = []
            for k in ([names] if isinstance(names, str) else names):
                canon = self._fusecc_alias.get(k)
                if canon is None:
                    raise KeyError(f"fusecc: unshare: '{k}' is not a parameter or buffer of {self._fusecc_source}")
                if canon in self._fusecc_shared_names:
                    todo.append(canon)
        if not todo:
            return []
        n = self.num_models
        with torch.no_grad():
            for canon in todo:
                t = self._canonical_tensor(canon)
                stacked = t.detach().unsqueeze(0).expand((n,) + tuple(t.shape)).clone()
                if isinstance(t, nn.Parameter):
                    if t.grad is not None:
                        t.grad = t.grad.unsqueeze(0).expand((n,) + tuple(t.shape)).clone()
                    t.data = stacked  # the same Parameter object, now [N, ...]
                else:
                    parent, _, leaf = canon.rpartition(".")
                    (self.get_submodule(parent) if parent else self)._buffers[leaf] = stacked
                self._fusecc_shared_names.discard(canon)
        self._fusecc_compiled.clear()
        self.__dict__["_fusecc_last"] = None
        self._link_prototype()
        return todo

    def _unshare_trainable(self, warn: bool = True) -> None:
        """Shared parameters that require grad, in a forward with grad enabled, get a copy per model first: trained
        as one tensor they would receive the sum of the N models' gradients and the models would stop being N
        independent models."""
        names = [k for k in self._fusecc_shared_names
                 if k in self._fusecc_param_names and self.get_parameter(k).requires_grad]
        if not names:
            return
        extra = sum(self.get_parameter(k).numel() * self.get_parameter(k).element_size() for k in names)
        extra *= self.num_models - 1
        # (in eval mode this is usually an inference call without torch.no_grad(): say so when it costs memory that
        # matters, not for a few LayerNorm weights that happen to be equal)
        if warn and not self.training and extra >= 0.1 * self.weight_bytes()["total"]:
            warnings.warn(
                f"fusecc: {len(names)} parameter(s) equal in every model and stored once (e.g. '{sorted(names)[0]}') "
                f"require grad, and the fused module runs with grad enabled: each model gets its own copy now "
                f"(+{extra / 2**20:.1f} MiB). For inference run under torch.no_grad() or "
                "torch.inference_mode(); to keep them shared in training, freeze them (requires_grad_(False)).",
                UserWarning, stacklevel=3)
        self.unshare(names)

    def train(self, mode: bool = True) -> "FusedModule":
        """As ``nn.Module.train``; also drops the weights re-laid out for inference (``runtime.derived``), so no
        update that bypassed a parameter's version counter can leave a stale copy for the next eval."""
        from .runtime.derived import clear_derived

        clear_derived(list(self.parameters()) + list(self.buffers()))
        return super().train(mode)

    def _register(self, name: str, t: Tensor, persistent: bool = True) -> None:
        parent, _, leaf = name.rpartition(".")
        owner = self.get_submodule(parent) if parent else self
        if isinstance(t, nn.Parameter):
            owner.register_parameter(leaf, t)
        else:
            owner.register_buffer(leaf, t, persistent=persistent)

    # ------------------------------------------------------------------ calling
    def _bind(self, args: tuple, kwargs: dict) -> List[Tuple[str, Any]]:
        sig = self._fusecc_sig
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            raise ValueError(
                f"fusecc: the fused {self._fusecc_source} takes the arguments of {self._fusecc_source}.forward "
                f"{list(sig.parameters)} (each tensor with a leading model dim of size {self.num_models}): {e}"
            ) from None
        bound.apply_defaults()
        out = list(bound.arguments.items())
        if self._fusecc_var_kw is not None:  # **kwargs: each keyword is an argument of its own
            extra = dict(out).get(self._fusecc_var_kw) or {}
            out = [(k, v) for k, v in out if k != self._fusecc_var_kw] + sorted(extra.items())
        return out

    def _ref_tensor(self) -> Optional[Tensor]:
        for t in self.parameters():
            return t
        for t in self.buffers():
            return t
        return None

    def _signature(self, bound: List[Tuple[str, Any]]) -> Tuple[tuple, List[Tensor]]:
        n = self.num_models
        ref = self._ref_tensor()
        sig: list = []
        tensors: List[Tensor] = []
        for name, v in bound:
            if isinstance(v, Tensor):
                shared = name in self._fusecc_shared
                if not shared and (v.dim() == 0 or v.shape[0] != n):
                    raise ValueError(
                        f"fusecc: argument '{name}' of the fused {self._fusecc_source}: expected a leading model dim "
                        f"of size {n} (one slice per model), got shape {list(v.shape)}. Stack the per-model inputs "
                        "with torch.stack, or fuse with shared_inputs=True to give every model the same input."
                    )
                if ref is not None and v.device != ref.device:
                    raise ValueError(
                        f"fusecc: argument '{name}' is on {v.device}, the fused model is on {ref.device}; "
                        f"move the input (x.to('{ref.device}')) or the model (fused.to('{v.device}'))"
                    )
                shape = v.shape if shared else v.shape[1:]
                if torch.jit.is_tracing():  # sizes are traced tensors there, which would make every key new
                    shape = [int(s) for s in shape]
                # under torch.compile with dynamic shapes a size is a SymInt and `s == 1` a symbolic bool, which
                # dynamo cannot compare with the cached keys: the `if` makes it a guarded Python bool
                ones = tuple(True if s == 1 else False for s in shape)
                sig.append(("T", name, shared, len(shape), v.dtype, ones))
                tensors.append(v)
            elif v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
                sig.append(("C", name, v))
            else:
                raise ValueError(
                    f"fusecc: argument '{name}' is a {type(v).__name__}; the fused module takes tensors (with a "
                    "leading model dim) and Python constants (bool, int, float, str, None)"
                )
        mods = self.__dict__.get("_fusecc_modules")
        if mods is None:  # the module tree is fixed once built: walk it once, not on every call (55 -> 5 us)
            mods = self.__dict__["_fusecc_modules"] = list(self.modules())
        modes = tuple(m.training for m in mods)
        dev = (ref.dtype, ref.device) if ref is not None else None
        return (tuple(sig), modes, dev), tensors

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._fusecc_shared_names and torch.is_grad_enabled():
            self._unshare_trainable()
        entry, tensors = self._entry_for(args, kwargs)
        out = entry.fn(self, *tensors)
        if entry.out_spec is not None:  # (a dynamo capture returns a flat list: the model's structure, rebuilt)
            out = tree_unflatten(out, entry.out_spec)
        return out

    # ------------------------------------------------------------------ compiling
    # under torch.compile(fused), fusecc's own compile (trace, lower, tune) runs eagerly and dynamo traces its result.
    # torch._disable_dynamo imports torch._dynamo only when first called (torch.compiler.disable would import it, and
    # triton with it, at `import fusecc`); the compile's FakeTensorMode imports it then anyway.
    @torch._disable_dynamo
    def _compile(self, key: tuple, bound: List[Tuple[str, Any]]) -> Compiled:
        self._sync_prototype()
        for _ in range(len(self._fusecc_shared_names) + 1):
            try:
                compiled = compile_fleet(self._fleet(), bound, self._fusecc_shared, self._fusecc_frontend)
                break
            except Unshare as u:  # a shared tensor must be per-model here (BatchNorm statistics in training, ...)
                self.unshare(u.names)
        if self._fusecc_frontend == "auto" and compiled.frontend != "fx":
            self._fusecc_frontend = compiled.frontend  # torch.fx could not trace this model: do not try it again
        for name, t in compiled.constants.items():  # what the generated forward reads: the module holds it
            self.register_buffer(name, t, persistent=False)
            self._fusecc_traced_consts.append(name)
        for qual, template in compiled.templates.items():
            self._fusecc_templates.setdefault(qual, template)
        self._fusecc_compiled.setdefault(key, []).append(compiled)
        return compiled

    def _sync_prototype(self) -> None:
        """The prototype (traced and shape-propagated, never run on data) follows the module's device, dtype and
        train/eval modes."""
        proto = self._fusecc_proto
        self._link_prototype()  # (after .to(), .half() or a load the module's tensors are new ones)
        fused_mods = dict(self.named_modules())
        for path, m in proto.named_modules():
            fm = fused_mods.get(path) if path else self
            if fm is not None:
                m.training = fm.training

    def _fleet(self) -> Fleet:
        """What the compiler reads about this module (fusecc/fleet.py)."""
        tensors = {}
        for canon in dict.fromkeys(self._fusecc_alias.values()):
            t = self._canonical_tensor(canon)
            shared = canon in self._fusecc_shared_names
            tensors[canon] = StackedTensor(canon, tuple(t.shape if shared else t.shape[1:]), t.dtype,
                                           canon in self._fusecc_param_names, shared)
        constants = {}
        for q, (bname, stacked) in self._fusecc_constants.items():
            t = self.get_buffer(bname)
            constants[q] = Constant(bname, stacked, tuple(t.shape[1:] if stacked else t.shape), t.dtype)
        ref = self._ref_tensor()
        p = next(iter(self.parameters()), None)
        return Fleet(
            n=self.num_models, prototype=self._fusecc_proto, source=self._fusecc_source, tensors=tensors,
            aliases=dict(self._fusecc_alias), constants=constants,
            training={path: m.training for path, m in self.named_modules()},
            device=ref.device if ref is not None else torch.device("cpu"),
            kernels=p is not None and use_triton([p]),  # (CPU tensors too when forced: the interpreter)
            chooser=self._fusecc_chooser, leaf_modules=self._fusecc_leaf_modules, strict=self._fusecc_strict,
            reserved=frozenset(list(self._buffers) + list(self._parameters) + list(self._modules)),
        )

    def compile_for(self, *args: Any, **kwargs: Any) -> "FusedModule":
        """Compile for these example inputs now (instead of at the first call). Returns self."""
        self._entry_for(args, kwargs)
        return self

    def _entry_for(self, args: tuple, kwargs: dict) -> Tuple[Compiled, List[Tensor]]:
        """The compiled forward for these inputs (compiling it if new), and the tensors it takes."""
        bound = self._bind(args, kwargs)
        key, tensors = self._signature(bound)
        entry = None
        for cand in self._fusecc_compiled.get(key, ()):  # (several only where a capture holds for some sizes)
            if cand.guard is None or cand.guard(tensors):
                entry = cand
                break
        if entry is None:
            # fusecc's own compile (fx trace, shape propagation, tuning) must not be recorded by torch.jit.trace
            tracing = torch._C._get_tracing_state()
            if tracing is not None:
                torch._C._set_tracing_state(None)
            try:
                entry = self._compile(key, bound)
            finally:
                if tracing is not None:
                    torch._C._set_tracing_state(tracing)
        self.__dict__["_fusecc_last"] = entry
        return entry, tensors

    # ------------------------------------------------------------------ inspection
    @property
    def fusion_report(self) -> Optional[Report]:
        """What the most recent compile fused and how (None before the first call)."""
        last = self._fusecc_last
        return last.report if last is not None else None

    @property
    def captured_by(self) -> Optional[str]:
        """What captured the most recent compile's graph: "torch.fx" or "torch._dynamo" (None before the first)."""
        last = self._fusecc_last
        return None if last is None else {"fx": "torch.fx", "dynamo": "torch._dynamo"}.get(last.frontend, last.frontend)

    @property
    def code(self) -> str:
        """The generated Python source of the most recent compile."""
        last = self._fusecc_last
        return last.fn.__fusecc_src__ if last is not None else ""

    @property
    def fused_graph(self) -> Optional[fx.Graph]:
        last = self._fusecc_last
        return last.graph if last is not None else None

    def __repr__(self) -> str:
        shared = (
            "shared by all models" if self._fusecc_shared and self._fusecc_shared >= set(self._fusecc_arg_names)
            else f"[N={self.num_models}, ...] per model"
        )
        nparam = sum(p.numel() if k in self._fusecc_shared_names else p.numel() // self.num_models
                     for k, p in self.named_parameters())
        lines = [
            f"FusedModule({self._fusecc_source} x {self.num_models} models, inputs {shared}, "
            f"{nparam / 1e6:.2f}M parameters per model)"
        ]
        lines.append("  " + self._sharing_line())
        rep = self.fusion_report
        if rep is None:
            lines.append("  not compiled yet: compiles at the first call (or fused.compile_for(example_inputs))")
        else:
            count = sum(len(v) for v in self._fusecc_compiled.values())
            lines.append(f"  fused ops (compiled for {count} input signature(s), captured by {self.captured_by}; "
                         "the last):")
            lines.append(rep.table())
        return "\n".join(lines)

    def _sharing_line(self) -> str:
        """What the models share: bytes stored once and per model, the per-model tensors, where the fleet branches."""
        wb = self.weight_bytes()
        ns = len(self._fusecc_shared_names)
        canon = list(dict.fromkeys(self._fusecc_alias.values()))
        if not ns:
            why = "" if self._fusecc_share else " (fuse(..., share=False))"
            return f"weights: all {len(canon)} tensors per model{why}, {_mib(wb['per_model'])} for the N models"
        per = [k for k in canon if k not in self._fusecc_shared_names]
        names = ", ".join(per[:6]) + (f", ... ({len(per)} in all)" if len(per) > 6 else "")
        line = (f"weights: {ns} of {len(canon)} tensors equal in every model, stored once ({_mib(wb['shared'])}); "
                f"per model: {names or 'none'} ({_mib(wb['per_model'])} for the N models; unfused "
                f"{_mib(wb['unfused'])})")
        last = self._fusecc_last
        if last is not None and last.report.branch is not None:
            line += f"\n  the fleet branches at '{last.report.branch}' (the first layer whose weights differ)"
        return line

    # ------------------------------------------------------------------ models in and out
    def _check_index(self, i: int) -> int:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"fusecc: model index must be an int, got {type(i).__name__}")
        if not -self.num_models <= i < self.num_models:
            raise IndexError(f"fusecc: model index {i} out of range for {self.num_models} models")
        return i % self.num_models

    def _canonical_tensor(self, canon: str) -> Tensor:
        if canon in self._fusecc_param_names:
            return self.get_parameter(canon)
        return self.get_buffer(canon)

    def model_state_dict(self, i: int) -> Dict[str, Tensor]:
        """Model i's weights as a state dict loadable into the original architecture (views, like state_dict)."""
        i = self._check_index(i)
        return {k: self._model_slice(self._fusecc_alias[k], i) for k in self._fusecc_state_keys}

    def _model_slice(self, canon: str, i: int) -> Tensor:
        """Model i's value of a canonical tensor (a view): its slice, or the shared tensor itself."""
        t = self._canonical_tensor(canon).detach()
        t = t if canon in self._fusecc_shared_names else t[i]
        if self._fusecc_lora is not None:  # an adapter padded to the fleet's largest rank: model i's own rank
            t = lora.unpad(self._fusecc_lora, canon, i, t)
        return t

    def load_model_state_dict(self, i: int, state_dict: Mapping[str, Tensor]) -> None:
        """Load one model's weights (a state dict of the original architecture) into slot i."""
        i = self._check_index(i)
        missing = [k for k in self._fusecc_state_keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self._fusecc_alias]
        if missing or unexpected:
            raise KeyError(
                f"fusecc: load_model_state_dict({i}): the state dict does not fit {self._fusecc_source}: "
                f"missing keys {missing[:10]}, unexpected keys {unexpected[:10]}"
            )
        for k in self._fusecc_state_keys:
            want = tuple(self._model_slice(self._fusecc_alias[k], i).shape)
            if tuple(state_dict[k].shape) != want:
                raise ValueError(
                    f"fusecc: load_model_state_dict({i}): '{k}' has shape {list(state_dict[k].shape)}, the model "
                    f"expects {list(want)}"
                )
        # a shared tensor that model i now has differently: every model gets its own copy first (correct results)
        differ = [self._fusecc_alias[k] for k in self._fusecc_state_keys if self._fusecc_alias[k] in
                  self._fusecc_shared_names and not bitwise_equal(self._canonical_tensor(self._fusecc_alias[k]),
                                                                  state_dict[k])]
        if differ and self.num_models > 1:
            self.unshare(differ)
        with torch.no_grad():
            for k in self._fusecc_state_keys:
                self._model_slice(self._fusecc_alias[k], i).copy_(state_dict[k])

    def unfuse(self) -> List[nn.Module]:
        """The N models as separate modules of the original class, with the current weights and buffers."""
        out = []
        modes = {p: m.training for p, m in self.named_modules()}
        for i in range(self.num_models):
            m = skeleton(self._fusecc_proto)
            with torch.no_grad():  # (tied weights stay tied: one copy per canonical name)
                self._install(m, lambda canon, i=i: self._model_slice(canon, i).clone())
            for path, sub in m.named_modules():
                if path in modes:
                    sub.training = modes[path]
            m.training = self.training
            if self._fusecc_lora is not None:
                lora.restore(self._fusecc_lora, m, i)
            out.append(m)
        return out

    def select(self, indices: Sequence[int]) -> "FusedModule":
        """A smaller FusedModule holding models ``indices`` (in that order), e.g. the survivors of a search round.

        Parameters, buffers and train/eval modes are copied; narrow an optimizer with ``opt.select(indices, new)``.
        """
        idx = list(indices)
        if not idx:
            raise ValueError("fusecc: select(indices): indices is empty; keep at least one model")
        for i in idx:
            if not isinstance(i, int) or isinstance(i, bool):
                raise TypeError(f"fusecc: select(indices): indices must be ints, got {type(i).__name__}")
            if not 0 <= i < self.num_models:
                raise IndexError(f"fusecc: select(indices): index {i} out of range for {self.num_models} models")
        if len(set(idx)) != len(idx):
            dup = next(i for i in idx if idx.count(i) > 1)
            raise ValueError(f"fusecc: select(indices): index {dup} appears twice; each model can be selected once")
        stacked = set(self._fusecc_alias.values()) - self._fusecc_shared_names
        stacked |= {b for b, st in self._fusecc_constants.values() if st}
        memo: Dict[int, Any] = placeholders(self._fusecc_proto)  # (relinked below: no copy of the prototype's)
        with torch.no_grad():
            for name, p in self.named_parameters():
                sel = torch.tensor(idx, device=p.device) if name in stacked else None
                data = p.index_select(0, sel).clone() if sel is not None else p.detach().clone()
                memo[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            for name, b in self.named_buffers():
                if name in stacked:
                    memo[id(b)] = b.index_select(0, torch.tensor(idx, device=b.device)).clone()
        new = copy.deepcopy(self, memo)
        new.num_models = len(idx)
        if self._fusecc_lora is not None:
            new._fusecc_lora = self._fusecc_lora.select(idx)
        new._link_prototype()
        return new

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_fusecc_compiled"] = {}
        state["_fusecc_last"] = None
        state.pop("_fusecc_modules", None)
        return state


# id(parameter) -> (weak reference to it, weak reference to the FusedModule that stores it once for all models): an
# optimizer given ``fused.parameters()`` finds the module to give each model its own copy before training
_SHARED_OWNERS: Dict[int, Tuple[Any, Any]] = {}


def _mark_shared(p: Tensor, module: "FusedModule") -> None:
    key = id(p)
    entry = _SHARED_OWNERS.get(key)
    if entry is not None and entry[0]() is p and entry[1]() is module:
        return
    _SHARED_OWNERS[key] = (weakref.ref(p, lambda _, k=key: _SHARED_OWNERS.pop(k, None)), weakref.ref(module))


def unshare_for_training(params: Iterable[Tensor]) -> None:
    """Before an optimizer takes ``params``: trainable ones a FusedModule stores once for all models get a copy per
    model (the same Parameter objects, now ``[N, ...]``), as its forward with grad enabled would do."""
    for p in params:
        entry = _SHARED_OWNERS.get(id(p))
        if entry is not None and entry[0]() is p and p.requires_grad:
            module = entry[1]()
            if module is not None:
                module._unshare_trainable(warn=False)


def bitwise_equal(a: Tensor, b: Tensor) -> bool:
    """Whether two tensors hold the same bits (same shape, dtype and device): NaN equals a NaN of the same bits, and
    0.0 differs from -0.0, unlike ``torch.equal``. Sharing a weight on anything looser would change results."""
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        return False
    if a.data_ptr() == b.data_ptr() and a.stride() == b.stride():
        return True
    if a.is_floating_point() or a.is_complex():
        a, b = a.detach().contiguous().reshape(-1), b.detach().contiguous().reshape(-1)
        if a.is_complex():
            a, b = torch.view_as_real(a).reshape(-1), torch.view_as_real(b).reshape(-1)
        as_int = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[a.element_size()]
        return torch.equal(a.view(as_int), b.view(as_int))
    return torch.equal(a, b)


def _mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MiB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KiB"


def _FusedModule_state_dict_hook(module: "FusedModule", state_dict: dict, prefix: str, *args: Any) -> None:  # noqa: N802
    """state_dict() reads as the original's with a leading N for every tensor: one stored once is given as a view
    expanded to ``[N, ...]`` (no copy; torch.save writes its storage once)."""
    n = module.num_models
    for k, canon in module._fusecc_alias.items():
        if canon in module._fusecc_shared_names and prefix + k in state_dict:
            v = state_dict[prefix + k]
            state_dict[prefix + k] = v.detach().unsqueeze(0).expand((n,) + tuple(v.shape))


def _FusedModule_load_hook(module: "FusedModule", state_dict: dict, prefix: str, *args: Any) -> None:  # noqa: N802
    """load_state_dict across sharing: a stacked ``[N, ...]`` value for a tensor stored once is loaded once if its N
    slices are bitwise equal, else the tensor is un-shared first; a once-stored value for a stacked tensor is loaded
    into every model."""
    n = module.num_models
    for k, canon in module._fusecc_alias.items():
        v = state_dict.get(prefix + k)
        if not isinstance(v, Tensor):
            continue
        t = module._canonical_tensor(canon)
        if canon in module._fusecc_shared_names:
            if v.dim() == t.dim() + 1 and v.shape[0] == n and tuple(v.shape[1:]) == tuple(t.shape):
                if all(bitwise_equal(v[0], v[j]) for j in range(1, n)):
                    state_dict[prefix + k] = v[0]
                else:
                    module.unshare([canon])
        elif tuple(v.shape) == tuple(t.shape[1:]):
            state_dict[prefix + k] = v.unsqueeze(0).expand(t.shape)


def fuse(
    models: Sequence[nn.Module],
    *,
    shared_inputs: Union[bool, Iterable[str]] = False,
    example_inputs: Optional[Union[Tensor, tuple, dict]] = None,
    leaf_modules: Sequence[Any] = (),
    tune: bool = False,
    strict: bool = False,
    frontend: str = "auto",
    share: bool = True,
) -> FusedModule:
    """Fuse N models of one architecture that differ only in their weights into ONE module.

    Args:
        models: N ``nn.Module`` of the same class, with parameters of the same names, shapes, dtypes and devices,
            and the same train/eval mode. They are not modified.
        shared_inputs: ``True`` if every model sees the same input (no model dim on the inputs); or the names of
            the forward arguments that are shared.
        example_inputs: inputs to compile for now (as passed to the fused module: a tensor, a tuple of positional
            arguments, or a dict of keyword arguments). Without them, the module compiles at its first call.
        leaf_modules: module classes or qualnames that torch.fx should not trace into; those without a fusion rule
            run as a loop over the N models.
        tune: time the candidate lowerings of each layer that has several (conv: grouped NCHW, grouped
            channels-last, per-model loop) on its real shapes, once, and keep the fastest; the choices are cached on
            disk (``$FUSECC_CACHE_DIR`` or ``~/.cache/fusecc``), so fusing the same fleet again costs no timing.
            Without it a built-in rule picks. ``print(fused)`` lists the choice per layer.
        strict: a layer with no fusion rule (which would otherwise run as a loop over the N models, with a warning)
            is a :class:`FusionError` naming the layer and the reason, raised when the module compiles.
        frontend: how the models' code is captured as a graph (fusecc/frontends/): ``"fx"`` (torch.fx symbolic
            tracing: shape-generic, keeps ``leaf_modules``), ``"dynamo"`` (torch._dynamo, torch.compile's capture:
            Python control flow on sizes and configuration is resolved at capture and guarded; Hugging Face
            transformers models), or ``"auto"``: torch.fx, and dynamo when torch.fx cannot trace the model.
        share: a parameter or buffer bitwise equal in every model (a frozen trunk, a LoRA base, a head left as it
            was) is stored once and computed once: on a shared input once, on per-model inputs as one op over all N
            batches. A shared parameter that requires grad gets a copy per model the first time the fused module
            runs with grad enabled (trained as one tensor it would mix the models' gradients), so training is that
            of N independent models; freeze it (``requires_grad_(False)``) to keep it shared while training the
            rest. BatchNorm statistics in training mode and buffers a model writes become per-model the same way.
            ``share=False`` stacks every tensor.

    Returns:
        A :class:`FusedModule`. ``fused(x)`` with ``x`` of shape ``[N, B, ...]`` returns ``[N, B, ...]`` where
        ``y[i] == models[i](x[i])``.

    Examples::

        models = [torchvision.models.resnet18(num_classes=10).eval() for _ in range(8)]
        fused = fusecc.fuse(models)
        y = fused(torch.randn(8, 4, 3, 64, 64))   # [8, 4, 10]
    """
    fused = FusedModule(models, shared_inputs=shared_inputs, leaf_modules=leaf_modules, tune=tune, strict=strict,
                        frontend=frontend, share=share)
    if example_inputs is not None:
        if isinstance(example_inputs, dict):
            fused.compile_for(**example_inputs)
        elif isinstance(example_inputs, tuple):
            fused.compile_for(*example_inputs)
        else:
            fused.compile_for(example_inputs)
    return fused

