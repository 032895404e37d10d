"""Per-layer lowering choice: which of several equivalent lowerings runs a fused op.

A fused conv can run as ONE grouped conv (NCHW), the same grouped conv on channels-last data, a loop of N
ordinary convs over the models' channel slices, or a per-model GEMM over the kernel taps that reach the input.
Which is fastest depends on the layer's shape and the backend (on 1x1 maps with 512 channels oneDNN's grouped
conv is 4x slower than the loop and the GEMM 19x faster; channels-last is 2.5x faster for 1x1 convs on large maps;
measured with ``bench/bench_conv_choice.py``). Two ways to choose:

- a built-in rule (``conv_rule``), from those measurements, used by default;
- ``fusecc.fuse(models, tune=True)``: time every candidate once on the layer's real shapes (random data, forward
  pass, median of a few runs) and keep the fastest. Choices are cached on disk (``$FUSECC_CACHE_DIR`` or
  ``~/.cache/fusecc/tune.json``) keyed by op, shapes, dtype, device, thread count, library versions and the
  candidates, so the next ``fuse`` of the same fleet does no timing.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.nn.modules.utils import _pair

from . import runtime
from .version import __version__

CONV_HOW = {
    "grouped": "grouped conv (groups = N*g)",
    "channels_last": "grouped conv, channels-last",
    "loop": "per-model loop (N convs)",
    "gemm": "per-model GEMM over the live taps",
}


# "bmm": on the CPU, fp32 inference with few rows per model runs fusecc's small-batch kernel (where
# kernels/linear/cpu.py's applies() says so)
LINEAR_HOW = {"bmm": "batched GEMM (baddbmm / CPU small-batch kernel)", "loop": "per-model loop (N GEMMs)"}


def conv_candidates(nd: int, x_shape: Optional[Sequence[int]] = None, w_shape: Optional[Sequence[int]] = None,
                    padding: Any = 0, groups: int = 0) -> List[str]:
    """The lowerings that can run this conv (``runtime.conv.stacked_conv``'s ``impl``); without the shapes, those
    that run any conv of ``nd`` dims."""
    if nd != 2:
        return ["grouped", "loop"]
    gemm = x_shape is not None and w_shape is not None and runtime.conv.gemm_conv_ok(x_shape, w_shape, padding,
                                                                                    groups, nd)
    return ["grouped", "channels_last", "loop"] + (["gemm"] if gemm else [])


def conv_rule(device: torch.device, x_shape: Sequence[int], w_shape: Sequence[int], stride: Any, padding: Any,
              dilation: Any, nd: int, groups: int = 0) -> str:
    """The built-in choice for a per-model conv (x ``[B, N*Cin, *sp]``, w ``[N, Cout, Cin/g, *k]``, ``groups``
    the fused conv's: ``N*g``).

    From measurements of oneDNN and MKL on this project's CPUs (2 threads, N=4 to 16, batch 8, resnet18,
    mobilenet_v2 and densenet121 at 32x32 and resnet18 at 64x64; per layer with ``bench/bench_conv_choice.py``, and
    over whole models, where the memory format one layer writes is the one the next reads):

    - dense convs (one group per model) where a single tap reads the input (1x1 convs; 3x3 convs on a 1x1 map) with
      <= 16 output pixels, and other dense convs with <= 4 output pixels and >= 128 output channels: the per-model
      GEMM (``"gemm"``; 2-19x faster: oneDNN re-lays out every model's weights on each call, which dominates on
      small maps; with fewer output channels the im2col gather costs more than it saves);
    - everything else: the grouped conv on channels-last data. Alone, an NCHW grouped conv is sometimes faster (up
      to 2.6x for a depthwise conv on a 16x16 map), but the GEMM convs, the 1x1 convs and the stem all want
      channels-last, and keeping one format through the graph (BatchNorm, activations, pooling, residual adds and
      DenseNet's concatenation keep it) saves the copies between them: over whole models channels-last everywhere
      is 1.0-1.3x faster than mixing (densenet121 2.06x -> 2.64x of the loop at N=16).

    On other devices, and for 1d/3d convs or string padding, the grouped conv (cuDNN's, or the 1x1 Triton kernel on
    CUDA); ``tune=True`` measures instead.
    """
    if device.type != "cpu" or nd != 2 or isinstance(padding, str):
        return "grouped"
    ks = tuple(w_shape[3:])
    st, pd, dl = _pair(stride), _pair(padding), _pair(dilation)  # nd == 2 here
    taps = [runtime.conv.live_taps(x_shape[2 + i], ks[i], st[i], pd[i], dl[i]) for i in range(nd)]
    pixels = taps[0][0] * taps[1][0]
    if runtime.conv.gemm_conv_ok(x_shape, w_shape, padding, groups or w_shape[0], nd):
        single_tap = all(t[3] for t in taps)
        if single_tap and pixels <= 16 or pixels <= 4 and w_shape[1] >= 128:
            return "gemm"
    return "channels_last"


# ---------------------------------------------------------------------------------------------------------------
# measuring, with an on-disk cache


def cache_path() -> str:
    root = os.environ.get("FUSECC_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "fusecc")
    return os.path.join(root, "tune.json")


def _versions() -> str:
    return f"fusecc {__version__}, torch {torch.__version__}, {torch.get_num_threads()} threads"


class TuneCache:
    """{key: {"pick": name, "ms": {name: ms}}} in one JSON file, written atomically after every new entry."""

    def __init__(self, path: Optional[str] = None):
        self.path = path or cache_path()
        self.entries: Dict[str, Dict[str, Any]] = {}
        try:
            with open(self.path) as f:
                data = json.load(f)
            if isinstance(data, dict):
                self.entries = data
        except (OSError, ValueError):  # absent or unreadable: start empty (it is only a cache)
            pass

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.entries.get(key)

    def put(self, key: str, value: Dict[str, Any]) -> None:
        self.entries[key] = value
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = f"{self.path}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:  # a read-only home: the choice still holds for this process
            pass


def time_candidates(fns: Dict[str, Callable[[], Any]], reps: int = 5, grad: bool = False) -> Dict[str, float]:
    """Median milliseconds of each candidate, runs interleaved (after one warm-up each) so noise hits all alike;
    grad mode off unless ``grad`` (a candidate that trains turns it on itself)."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    with torch.set_grad_enabled(grad):
        for fn in fns.values():
            fn()
        for _ in range(reps):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


class Chooser:
    """Picks a lowering per layer, by rule or (tune=True) by measurement; remembers what it measured."""

    def __init__(self, tune: bool = False, cache: Optional[TuneCache] = None):
        self.tune = tune
        self._cache = cache
        self.measured = 0  # candidates timed in this compile (0 when every choice came from the cache)

    @property
    def cache(self) -> TuneCache:
        if self._cache is None:
            self._cache = TuneCache()
        return self._cache

    def linear(self, x_shape: Sequence[int], w_shape: Sequence[int], has_bias: bool, training: bool,
               dtype: torch.dtype, device: torch.device) -> Tuple[str, str]:
        """(choice, why) for a per-model linear on x of fused shape ``[N, *, K]``; with ``training`` the timing
        includes the backward pass (where batched and looped GEMMs differ most)."""
        if not self.tune:
            return "bmm", "rule"
        key = json.dumps(["linear", list(x_shape), list(w_shape), has_bias, training, str(dtype), str(device),
                          _versions(), sorted(LINEAR_HOW)])

        def candidates() -> Dict[str, Callable[[], Any]]:
            x = torch.randn(tuple(x_shape), dtype=dtype, device=device)
            w = torch.randn(tuple(w_shape), dtype=dtype, device=device, requires_grad=training)
            b = torch.randn(tuple(w_shape[:2]), dtype=dtype, device=device, requires_grad=training) if has_bias \
                else None

            def run(impl: str) -> None:
                with torch.enable_grad():
                    y = runtime.linear.batched_linear(x, w, b, "none", impl)
                    if training:
                        y.backward(torch.ones_like(y))

            return {c: (lambda c=c: run(c)) for c in LINEAR_HOW}

        return self._measured(key, candidates)

    def conv(self, x_shape: Sequence[int], w_shape: Sequence[int], has_bias: bool, stride: Any, padding: Any,
             dilation: Any, groups: int, nd: int, dtype: torch.dtype, device: torch.device) -> Tuple[str, str]:
        """(choice, why) for a per-model conv on the folded input of fused shape ``x_shape``."""
        if not self.tune:
            return conv_rule(device, x_shape, w_shape, stride, padding, dilation, nd, groups), "rule"
        names = conv_candidates(nd, x_shape, w_shape, padding, groups)
        key = json.dumps(["conv", list(x_shape), list(w_shape), has_bias, stride, padding, dilation, groups, nd,
                          str(dtype), str(device), _versions(), names])

        def candidates() -> Dict[str, Callable[[], Any]]:
            x = torch.randn(tuple(x_shape), dtype=dtype, device=device)
            w = torch.randn(tuple(w_shape), dtype=dtype, device=device)
            b = torch.randn(tuple(w_shape[:2]), dtype=dtype, device=device) if has_bias else None
            return {c: (lambda c=c: runtime.conv.stacked_conv(x, w, b, stride, padding, dilation, groups, nd, impl=c))
                    for c in names}

        return self._measured(key, candidates)

    def _measured(self, key: str, candidates: Callable[[], Dict[str, Callable[[], Any]]]) -> Tuple[str, str]:
        """(fastest, "tuned: <times>") from the cache, or timed now (``candidates()`` builds the runs) and cached."""
        hit = self.cache.get(key)
        if hit is None:
            fns = candidates()
            ms = time_candidates(fns)
            self.measured += len(fns)
            hit = {"pick": min(ms, key=ms.get), "ms": {k: round(v, 4) for k, v in ms.items()}}
            self.cache.put(key, hit)
        ordered = sorted(hit["ms"].items(), key=lambda i: i[1])
        return hit["pick"], "tuned: " + ", ".join(f"{k} {v:.3g} ms" for k, v in ordered)
