"""The hardware floor of a benchmark row and the peak memory of one call, shared by the scripts in bench/.

Floor: the time below which no provider can run one row on this machine, from two rates measured once per run and
a cost estimate of the row:

  rates   GEMM: fp32 FLOP/s of one large matmul (2048x2048 @ 2048x2048, median of several, all torch threads);
          bandwidth: bytes/s of a large copy into a preallocated buffer (256 MB, dst.copy_(src)), counting the
          bytes read AND the bytes written, as the cost model below does
  costs   FLOPs of ONE model's forward, counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions
          and attention: element-wise work is not counted), times N; a training step is taken as 3 forwards
          (forward, and a backward that costs about two). Bytes: N x (the weights: parameters and buffers, read
          once + the activations: input + output bytes of every leaf module's forward, measured with forward
          hooks on one model, i.e. each activation written once and read once); a training step: 3 x that (the
          backward reads the weights and the saved activations and writes as many gradients) + the optimizer
          reading param, grad, momentum and writing param, momentum (5 x the parameter bytes)
  floor   max(FLOPs / GEMM rate, bytes / bandwidth); the larger term names the row's bound ("compute" or
          "memory"). A provider's time / floor says how much is left to win, at best: the floor assumes every
          FLOP runs at large-GEMM speed and every byte moves once at copy speed.

Peak memory of one call (peak_bytes): the process's peak RSS is monotone over the whole run and shared by every
provider, and torch has no allocator statistics on CPU (torch.cuda.max_memory_allocated has no CPU counterpart),
so the call runs once under torch.profiler with profile_memory=True: the CPU allocator then reports every
allocation and free (size and time) to the profiler, including those made inside ops, inside the autograd
backward and inside code compiled by inductor. Their running sum over time, from 0 at the start of the call, peaks
at the bytes the call needed on top of what was already allocated (outputs, activations, saved tensors, gradients,
temporaries; not the weights, optimizer state or inputs that exist before the call). Allocations made on OpenMP
worker threads are not seen (ops allocate their outputs on the calling thread, so this misses little); memory that
libraries take outside torch's allocator (oneDNN scratchpads, the allocator's own caching: none on CPU) neither.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

GEMM_SIZE = 2048
COPY_BYTES = 256 * 2**20
TRAIN_FLOPS_FACTOR = 3  # forward + backward (~2 forwards)
TRAIN_BYTES_FACTOR = 3
OPTIMIZER_PARAM_PASSES = 5  # SGD with momentum: read param, grad, momentum; write param, momentum


@dataclass
class MachineRates:
    gemm_flops: float  # FLOP/s, fp32
    bandwidth: float  # bytes/s, read + written

    def info(self) -> dict:
        return {"gemm_gflops": f"{self.gemm_flops / 1e9:.1f}", "bandwidth_gbs": f"{self.bandwidth / 1e9:.2f}"}


def _median_s(fn: Callable[[], Any], reps: int) -> float:
    fn()  # warm-up (first-touch page faults, thread pool start)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_rates(reps: int = 7) -> MachineRates:
    """This machine's fp32 GEMM rate and memory bandwidth, with torch's current thread count."""
    a = torch.randn(GEMM_SIZE, GEMM_SIZE)
    b = torch.randn(GEMM_SIZE, GEMM_SIZE)
    out = torch.empty(GEMM_SIZE, GEMM_SIZE)
    gemm_s = _median_s(lambda: torch.mm(a, b, out=out), reps)
    src = torch.ones(COPY_BYTES // 4)
    dst = torch.empty_like(src)
    copy_s = _median_s(lambda: dst.copy_(src), reps)
    return MachineRates(gemm_flops=2 * GEMM_SIZE**3 / gemm_s, bandwidth=2 * COPY_BYTES / copy_s)


@dataclass
class ModelCost:
    """One model's forward on one batch."""

    flops: float
    param_bytes: int
    weight_bytes: int  # parameters + buffers
    activation_bytes: int  # input + output bytes of every leaf module's forward

    def row(self, n: int, train: bool) -> Tuple[float, float]:
        """(FLOPs, bytes) of N models: one forward, or one training step."""
        if not train:
            return n * self.flops, n * (self.weight_bytes + self.activation_bytes)
        return (n * TRAIN_FLOPS_FACTOR * self.flops,
                n * (TRAIN_BYTES_FACTOR * (self.weight_bytes + self.activation_bytes)
                     + OPTIMIZER_PARAM_PASSES * self.param_bytes))


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def model_cost(model: nn.Module, x: Tensor) -> ModelCost:
    """FLOPs and bytes of `model`'s forward on `x` (one model, one batch). Runs with grad enabled and parameters
    that require grad, so that modules with an inference fast path (nn.TransformerEncoderLayer) take their regular
    path, whose matmuls the flop counter sees; the counted forward is the same computation."""
    from torch.utils.flop_counter import FlopCounterMode

    act = [0]

    def hook(_m: nn.Module, inputs: Any, output: Any) -> None:
        act[0] += _tensor_bytes(inputs) + _tensor_bytes(output)

    # leaf modules, and modules with their own parameters (nn.MultiheadAttention uses in_proj_weight itself);
    # Dropout is the identity here (eval, or p=0) and moves nothing
    watched = [m for m in model.modules()
               if (not m._modules or m._parameters) and not isinstance(m, nn.modules.dropout._DropoutNd)]
    handles = [m.register_forward_hook(hook) for m in watched]
    counter = FlopCounterMode(display=False)
    try:
        with torch.enable_grad(), counter:
            model(x)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    return ModelCost(flops=float(counter.get_total_flops()), param_bytes=params, weight_bytes=params + buffers,
                     activation_bytes=act[0])


@dataclass
class Floor:
    flops: float
    bytes: float
    compute_s: float
    memory_s: float

    @property
    def seconds(self) -> float:
        return max(self.compute_s, self.memory_s)

    @property
    def ms(self) -> float:
        return self.seconds * 1e3

    @property
    def bound(self) -> str:
        return "compute" if self.compute_s >= self.memory_s else "memory"


def floor(cost: ModelCost, n: int, train: bool, rates: MachineRates) -> Floor:
    flops, nbytes = cost.row(n, train)
    return Floor(flops, nbytes, flops / rates.gemm_flops, nbytes / rates.bandwidth)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2 (the profiler's C++ side logs its start and stop, and a GPU probe, there)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_bytes(fn: Callable[..., Any], *args: Any) -> Optional[int]:
    """Peak bytes allocated by one call of fn(*args) above what was allocated before it (see the module doc);
    None if the profiler reported no allocation events."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn(*args)
    events = []
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation:
            events.append((e.start_time_ns, e.extra_fields.alloc_size, e.extra_fields.ptr))
        stack.extend(e.children)
    if not events:
        return None
    events.sort()
    live = {}  # ptr -> bytes of the blocks allocated during the call
    current = peak = 0
    for _t, size, ptr in events:
        if size > 0:
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif ptr in live:  # a free counts only for a block allocated during the call (the allocator's own table
            current -= live.pop(ptr)  # can hold stale sizes from earlier profiled calls)
    return peak
