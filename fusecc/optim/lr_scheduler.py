"""Per-model learning-rate schedules: torch's own schedulers, one per model, driving each model's learning rate.

Each model gets a small shadow ``torch.optim.SGD`` whose param groups carry that model's lr (and momentum / beta1
for OneCycleLR); torch's scheduler class steps the shadow, and the result is written into the fused optimizer's
per-model values. So the schedule of model i is exactly torch's schedule with model i's arguments. Every
scheduler argument is a scalar or a length-N sequence.

Examples::

    sched = fusecc.optim.lr_scheduler.StepLR(opt, step_size=[10, 20, 30, 40], gamma=0.5)
    sched = fusecc.optim.lr_scheduler.LambdaLR(opt, lambda i, step: 0.95 ** (step * (i + 1)))
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Sequence

import torch

__all__ = ["FusedLRScheduler", "StepLR", "MultiStepLR", "ExponentialLR", "CosineAnnealingLR", "LinearLR",
           "OneCycleLR", "LambdaLR"]


def _per_model(name: str, value: Any, n: int, seq_ok: bool = False) -> List[Any]:
    """Scalar -> [value] * n; a length-n sequence -> as is. seq_ok: a value that is itself a sequence (milestones)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, (list, tuple)) and not (seq_ok and (not value or not isinstance(value[0], (list, tuple)))):
        if len(value) != n:
            raise ValueError(f"fusecc.optim.lr_scheduler: '{name}' has {len(value)} values, expected num_models={n}")
        return list(value)
    return [value] * n


class FusedLRScheduler:
    """Runs ``torch_cls`` once per model on a shadow optimizer; ``step()`` updates the fused optimizer's lrs."""

    torch_cls: Any = None
    _seq_args: Sequence[str] = ()

    def __init__(self, optimizer: Any, **kwargs: Any):
        n = optimizer.num_models
        self.optimizer = optimizer
        self.num_models = n
        per = {k: _per_model(k, v, n, k in self._seq_args) for k, v in kwargs.items()}
        self._momentum_key = self._momentum_name(optimizer)
        self._shadows: List[torch.optim.Optimizer] = []
        self._scheds: List[Any] = []
        for i in range(n):
            groups = []
            for g in optimizer.param_groups:
                sg: Dict[str, Any] = {"params": [torch.zeros(1, requires_grad=True)], "lr": g["lr"][i]}
                if self._momentum_key:
                    sg["momentum"] = g[self._momentum_key][i]
                groups.append(sg)
            shadow = torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.0)
            if self._momentum_key == "beta1":  # OneCycleLR cycles betas for Adam-like optimizers
                for sg in shadow.param_groups:
                    sg["betas"] = (sg["momentum"], 0.999)
                    sg["momentum"] = 0.0  # the shadow SGD itself never moves anything
                    shadow.defaults["betas"] = sg["betas"]
            self._shadows.append(shadow)
            self._scheds.append(self._make(shadow, i, {k: v[i] for k, v in per.items()}))
        self._write()

    @staticmethod
    def _momentum_name(optimizer: Any) -> str:
        g = optimizer.param_groups[0]
        return "beta1" if "beta1" in g else ("momentum" if "momentum" in g else "")

    def _make(self, shadow: torch.optim.Optimizer, i: int, kwargs: Dict[str, Any]) -> Any:
        return self.torch_cls(shadow, **kwargs)

    def _write(self) -> None:
        for gi, g in enumerate(self.optimizer.param_groups):
            g["lr"] = [s.param_groups[gi]["lr"] for s in self._shadows]
            if self._momentum_key and isinstance(self, OneCycleLR) and self._cycles_momentum:
                if self._momentum_key == "beta1":
                    g["beta1"] = [s.param_groups[gi]["betas"][0] for s in self._shadows]
                else:
                    g["momentum"] = [s.param_groups[gi]["momentum"] for s in self._shadows]

    def step(self) -> None:
        for sh, s in zip(self._shadows, self._scheds):
            sh.step()  # the shadow has no gradients: this only tells torch's scheduler the optimizer has stepped
            s.step()
        self._write()

    def get_last_lr(self) -> List[List[float]]:
        """Per param group, the N learning rates of the last step."""
        return [list(g["lr"]) for g in self.optimizer.param_groups]

    def state_dict(self) -> Dict[str, Any]:
        return {"schedulers": [s.state_dict() for s in self._scheds],
                "shadows": [[dict((k, v) for k, v in g.items() if k != "params") for g in s.param_groups]
                            for s in self._shadows]}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        for s, sd in zip(self._scheds, state["schedulers"]):
            s.load_state_dict(sd)
        for sh, groups in zip(self._shadows, state["shadows"]):
            for g, saved in zip(sh.param_groups, groups):
                g.update(saved)
        self._write()


class StepLR(FusedLRScheduler):
    torch_cls = torch.optim.lr_scheduler.StepLR

    def __init__(self, optimizer: Any, step_size: Any, gamma: Any = 0.1):
        super().__init__(optimizer, step_size=step_size, gamma=gamma)


class MultiStepLR(FusedLRScheduler):
    torch_cls = torch.optim.lr_scheduler.MultiStepLR
    _seq_args = ("milestones",)

    def __init__(self, optimizer: Any, milestones: Any, gamma: Any = 0.1):
        super().__init__(optimizer, milestones=milestones, gamma=gamma)


class ExponentialLR(FusedLRScheduler):
    torch_cls = torch.optim.lr_scheduler.ExponentialLR

    def __init__(self, optimizer: Any, gamma: Any):
        super().__init__(optimizer, gamma=gamma)


class CosineAnnealingLR(FusedLRScheduler):
    torch_cls = torch.optim.lr_scheduler.CosineAnnealingLR

    def __init__(self, optimizer: Any, T_max: Any, eta_min: Any = 0.0):
        super().__init__(optimizer, T_max=T_max, eta_min=eta_min)


class LinearLR(FusedLRScheduler):
    torch_cls = torch.optim.lr_scheduler.LinearLR

    def __init__(self, optimizer: Any, start_factor: Any = 1.0 / 3, end_factor: Any = 1.0, total_iters: Any = 5):
        super().__init__(optimizer, start_factor=start_factor, end_factor=end_factor, total_iters=total_iters)


class OneCycleLR(FusedLRScheduler):
    """OneCycleLR per model; with cycle_momentum it also cycles each model's momentum (SGD) or beta1 (Adam)."""

    torch_cls = torch.optim.lr_scheduler.OneCycleLR

    def __init__(self, optimizer: Any, max_lr: Any, total_steps: Any = None, epochs: Any = None,
                 steps_per_epoch: Any = None, pct_start: Any = 0.3, anneal_strategy: str = "cos",
                 cycle_momentum: bool = True, base_momentum: Any = 0.85, max_momentum: Any = 0.95,
                 div_factor: Any = 25.0, final_div_factor: Any = 1e4, three_phase: bool = False):
        self._cycles_momentum = cycle_momentum
        super().__init__(optimizer, max_lr=max_lr, total_steps=total_steps, epochs=epochs,
                         steps_per_epoch=steps_per_epoch, pct_start=pct_start, anneal_strategy=anneal_strategy,
                         cycle_momentum=cycle_momentum, base_momentum=base_momentum, max_momentum=max_momentum,
                         div_factor=div_factor, final_div_factor=final_div_factor, three_phase=three_phase)


class LambdaLR(FusedLRScheduler):
    """``lr_i = base_lr_i * lr_lambda(i, step)``: one function of (model index, step) for all models."""

    torch_cls = torch.optim.lr_scheduler.LambdaLR

    def __init__(self, optimizer: Any, lr_lambda: Callable[[int, int], float]):
        if not callable(lr_lambda):
            raise TypeError("fusecc.optim.lr_scheduler.LambdaLR: lr_lambda must be a function of (model index, step)")
        self._fn = lr_lambda
        super().__init__(optimizer)

    def _make(self, shadow: torch.optim.Optimizer, i: int, kwargs: Dict[str, Any]) -> Any:
        fn = self._fn
        return torch.optim.lr_scheduler.LambdaLR(shadow, lambda step: fn(i, step))
