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

from .errors import FusionInputError, source_line
from .values import to_meta


class _ShapeProp(fx.Interpreter):
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

        with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True), _quiet_fake_tensor_log():
            # fresh tensors, not views of the stacked input: a model may detach_() or resize its input in place
            fake = [torch.empty(a.shape, dtype=a.dtype, device=a.device) if isinstance(a, torch.Tensor) else a
                    for a in example_args]
            _ShapeProp(gm).run(*fake)
        return
    except Exception:  # noqa: BLE001 - the real run below raises the error if it is a real one
        pass
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        # copies: an in-place op of the model must not write into the caller's input
        _ShapeProp(gm).run(*[a.clone() if isinstance(a, torch.Tensor) else a for a in example_args])
