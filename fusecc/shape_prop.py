"""Shape propagation: every node of the captured graph learns its per-model value (a meta tensor: shape and dtype).

It runs the graph once on one model's example inputs under FakeTensorMode (no compute); an op fake tensors cannot
run falls back to one real run on a copy of the inputs. A model that cannot run on those inputs (a wrong shape)
raises :class:`~fusecc.errors.FusionInputError`, naming the node and the user's source line.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.fx as fx
from torch.func import functional_call

from .errors import FusionInputError, source_line
from .values import to_meta


class _ShapeProp(fx.Interpreter):
    """Runs the graph on stand-ins of the model's tensors: the prototype's parameters and buffers are views of the
    fused module's own, which a BatchNorm in training mode or a buffer update would otherwise write into."""

    def __init__(self, gm: fx.GraphModule, fake_mode: Any = None):
        super().__init__(gm)
        self.fake_mode = fake_mode
        self.stand_ins: dict = {}  # id(real tensor) -> its fake (or cloned) stand-in, one per tensor (aliasing kept)

    def stand_in(self, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        s = self.stand_ins.get(id(t))
        if s is None:
            s = self.fake_mode.from_tensor(t) if self.fake_mode is not None else t.detach().clone()
            if isinstance(t, torch.nn.Parameter):
                s = torch.nn.Parameter(s, requires_grad=t.requires_grad)
            self.stand_ins[id(t)] = (s, t)  # (the real tensor is kept alive so that its id stays its own)
            return s
        return s[0]

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        return self.stand_in(super().get_attr(target, args, kwargs))

    def call_module(self, target: Any, args: Any, kwargs: Any) -> Any:
        mod = self.fetch_attr(target)
        tensors = {k: self.stand_in(t) for k, t in list(mod.named_parameters()) + list(mod.named_buffers())}
        if not tensors:
            return mod(*args, **kwargs)
        return functional_call(mod, tensors, args, kwargs, strict=False, tie_weights=False)

    def run_node(self, n: fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as e:
            line = source_line(n)
            raise FusionInputError(
                f"fusecc: running the model on one model's slice of the input failed at node '{n.name}' "
                f"({n.op} {n.target}): {type(e).__name__}: {e}" + (f"\n  at {line}" if line else "")
                + "\n  check the input shapes: every tensor argument needs a leading model dim of size N "
                "(or pass shared_inputs=True)"
            ) from e
        n.meta["fusecc_pm"] = to_meta(result)
        return result


class _quiet_fake_tensor_log:  # noqa: N801 - a context manager
    """FakeTensorMode logs a traceback when an op fails on fake tensors (a wrong input shape, say) before raising;
    fusecc then raises its own error naming the node, or retries on real tensors: the log is noise on stderr."""

    def __enter__(self) -> None:
        self.logger = logging.getLogger("torch._subclasses.fake_tensor")
        self.level = self.logger.level
        self.logger.setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        self.logger.setLevel(self.level)


def shape_prop(gm: fx.GraphModule, example_args: Sequence[Any]) -> None:
    """Run the graph on one model's example inputs; store every node's per-model value (as meta tensors).

    It runs under FakeTensorMode (shapes and dtypes only, no compute: seconds saved on conv nets); an op that fake
    tensors cannot run falls back to one real run of the model copy.
    """
    try:
        # (imported here: it imports torch._dynamo, seconds that `import fusecc` need not pay)
        from torch._subclasses.fake_tensor import FakeTensorMode

        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True) as mode, _quiet_fake_tensor_log():
            # fresh tensors, not views of the stacked input: a model may detach_() or resize its input in place
            fake = [torch.empty(a.shape, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor) else a
                    for a in example_args]
            _ShapeProp(gm, mode).run(*fake)
        return
    except Exception:  # noqa: BLE001 - the real run below raises the error if it is a real one
        pass
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        # copies: an in-place op of the model must not write into the caller's input
        _ShapeProp(gm).run(*[a.clone() if isinstance(a, torch.Tensor) else a for a in example_args])
