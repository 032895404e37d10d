"""torch.compile(fused) (inductor, on the CPU) gives the eager fused results, with and without tune."""

import pytest
import torch
import torch.nn as nn

import fusecc

from .utils import assert_close, make_models, run_each


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.deep = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        return self.fc(torch.relu(self.deep(x)).mean((2, 3)))


@pytest.mark.slow
@pytest.mark.parametrize("tune", [False, True], ids=["rule", "tune"])
def test_compiled_inference(tune):
    models = [m.eval() for m in make_models(_Net, 3)]
    fused = fusecc.fuse(models, tune=tune).eval()
    x = torch.randn(3, 2, 3, 8, 8)
    compiled = torch.compile(fused)
    with torch.no_grad():
        assert_close("compiled", compiled(x), run_each(models, (x,)))
        assert_close("compiled, second call", compiled(x), fused(x))


@pytest.mark.slow
def test_compiled_training_step():
    models = make_models(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 3)
    fused = fusecc.fuse(models).train()
    x = torch.randn(3, 5, 12)
    compiled = torch.compile(fused)
    y = compiled(x)
    y.square().sum().backward()
    ref = run_each(models, (x,))
    ref.square().sum().backward()
    assert_close("out", y, ref)
    for name, p in fused.named_parameters():
        assert_close(f"d{name}", p.grad, torch.stack([m.get_parameter(name).grad for m in models]))


@pytest.mark.slow
def test_compiled_inference_runs_the_cpu_kernel_in_one_graph(monkeypatch):
    """At batch 8 the linears run fusecc's CPU small-batch kernel; under torch.compile as the custom op
    torch.ops.fusecc.small_gemm, in one graph (fullgraph), with the eager results."""
    from fusecc.kernels import _backend
    from fusecc.kernels.linear import cpu

    if not cpu.available():
        pytest.skip(f"CPU kernel not built: {cpu.status()}")
    monkeypatch.setattr(cpu, "MIN_WEIGHTS", 0)  # small layers, which run bmm by default
    models = [m.eval() for m in make_models(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)), 3)]
    x = torch.randn(3, 8, 12)
    fused = fusecc.fuse(models, example_inputs=x)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        before = _backend.launch_counts["small_gemm"]
        y = compiled(x)
        assert _backend.launch_counts["small_gemm"] - before >= 2
        assert_close("compiled", y, run_each(models, (x,)))


@pytest.mark.slow
def test_two_compiled_fleets_with_different_batch_sizes():
    """The second fleet's batch size makes dynamo trace the batch dim as a symbol (automatic dynamic shapes: the
    same FusedModule.forward code seen with another size); fusecc's compile-cache key then held a symbolic
    `size == 1`, which dynamo could not compare with the cached keys (InternalTorchDynamoError)."""
    for batches in ((5,), (8, 11)):
        models = [m.eval() for m in make_models(lambda: nn.Sequential(nn.Linear(12, 16), nn.ReLU(),
                                                                       nn.Linear(16, 3)), 3)]
        compiled = torch.compile(fusecc.fuse(models, example_inputs=torch.randn(3, batches[0], 12)))
        with torch.no_grad():
            for b in batches:
                x = torch.randn(3, b, 12)
                assert_close(f"batch {b}", compiled(x), run_each(models, (x,)))


@pytest.mark.slow
def test_gemm_convs_compile_in_one_graph():
    """3x3 convs on a 1x1 map run as their centre tap (a re-laid-out weight, runtime.derived.derived_weight): one graph
    under torch.compile (a check in derived_weight broke the graph at every such conv, and inductor's time doubled)."""
    models = [m.eval() for m in make_models(lambda: nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                                                  nn.Conv2d(8, 16, 3, padding=1)), 2)]
    x = torch.randn(2, 4, 3, 1, 1)
    fused = fusecc.fuse(models, example_inputs=x)
    assert fused.fusion_report.count("conv2d", "per-model GEMM over the live taps") == 2
    compiled = torch.compile(fused, fullgraph=True)
    with torch.no_grad():
        assert_close("compiled", compiled(x), run_each(models, (x,)))
