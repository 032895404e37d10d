"""Pack-aware hyper-parameter search on Optuna: K trials trained at once as ONE fused model.

::

    import optuna, fusecc.hpo

    def space(trial):                      # one trial's hyper-parameters, sampled by the study's sampler
        return {"lr": trial.suggest_float("lr", 1e-3, 0.1, log=True),
                "momentum": trial.suggest_float("momentum", 0.0, 0.9),
                "weight_decay": trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)}

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),
                                pruner=optuna.pruners.HyperbandPruner(min_resource=1, max_resource=20))
    fusecc.hpo.optimize(study, model=lambda hp: MLP(), space=space, data=(x_train, y_train, x_valid, y_valid),
                        optimizer="sgd", epochs=20, batch_size=32, n_trials=40, K=8)
    study.best_trial

The user keeps Optuna: its study, samplers, pruners and storages (ask-and-tell underneath). Each asked trial takes a
slot of the pack: its hyper-parameters that the fused optimizer takes per model (lr, momentum, weight decay, betas,
eps, ...) go into that slot, its weights are initialised from its own seed. After every epoch each trial's validation
metric is reported (``trial.report``) and its pruner asked; a pruned or finished trial's slot is refilled with the next
trial (fresh weights, fresh optimizer state for that slot only: ``FusedOptimizer.reset_model``), so the pack stays
full. Once the study has no more trials to give, the pack shrinks to the slots still training (``select``).

The pack changes the speed, never the results: a trial's mini-batches, initial weights and updates depend on its own
number and hyper-parameters only, so its learning curve equals the same trial trained alone with torch.optim
(:func:`torch_objective`, the baseline: ``study.optimize(torch_objective(...), n_trials)``), within float rounding.
Trials report in trial-number order at each epoch, and a trial reaches each epoch no earlier than every trial before
it, so a pruner sees what it would see one trial at a time and takes the same decisions (with a sampler whose
suggestions do not depend on finished trials, e.g. RandomSampler or TPE's start-up trials: a pack asks K trials
before the first one finishes).

Hyper-parameters other than the optimizer's and ``seed`` are handed to ``model(hp)``; they may change the
architecture, so trials whose values differ go to different packs (one pack trains at a time; the others wait).
An optimizer value may be a list, one per epoch (a schedule); with ``seed_by_trial=False`` trials whose schedules
share a prefix start from a snapshot at its end (Hippo's stage sharing). Many workers meet in one study through
Optuna's storage; :func:`optimize_on_ray_tune` places them with Ray Tune. See docs/hpo.md.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import optim as _optim
from .api import fuse

__all__ = ["optimize", "torch_objective", "optimize_on_ray_tune", "PackReport", "choose_pack_size", "OPTIMIZERS"]

# name: (fusecc optimizer, torch optimizer, the hyper-parameters they take per trial)
OPTIMIZERS: Dict[str, Tuple[type, type, Tuple[str, ...]]] = {
    "sgd": (_optim.SGD, torch.optim.SGD, ("lr", "momentum", "weight_decay", "dampening")),
    "adam": (_optim.Adam, torch.optim.Adam, ("lr", "betas", "beta1", "beta2", "eps", "weight_decay")),
    "adamw": (_optim.AdamW, torch.optim.AdamW, ("lr", "betas", "beta1", "beta2", "eps", "weight_decay")),
    "rmsprop": (_optim.RMSprop, torch.optim.RMSprop, ("lr", "alpha", "eps", "weight_decay", "momentum")),
}

Data = Tuple[Tensor, Tensor, Tensor, Tensor]


def _optuna() -> Any:
    try:
        import optuna
    except ImportError as e:  # pragma: no cover (optuna is in the hpo extra)
        raise ImportError("fusecc.hpo needs Optuna: pip install 'fusecc[hpo]' (or optuna)") from e
    return optuna


# ------------------------------------------------------------------------------------------------ one trial's parts
def _split(hp: Dict[str, Any], optimizer: str) -> Tuple[Dict[str, Any], Dict[str, Any], int]:
    """(optimizer hyper-parameters, the rest for the model, seed) of one trial's hyper-parameters."""
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"fusecc.hpo: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    keys = OPTIMIZERS[optimizer][2]
    opt = {k: v for k, v in hp.items() if k in keys}
    if "beta1" in opt or "beta2" in opt:
        b1, b2 = opt.pop("beta1", 0.9), opt.pop("beta2", 0.999)
        opt["betas"] = (b1, b2)
    rest = {k: v for k, v in hp.items() if k not in keys and k != "seed"}
    return opt, rest, int(hp.get("seed", 0))


def _per_epoch(k: str, v: Any) -> bool:
    """A value per epoch (a schedule): a list, where ``betas`` is a pair or a list of pairs."""
    return isinstance(v, (list, tuple)) and not (k == "betas" and len(v) == 2 and not isinstance(v[0], (list, tuple)))


def _hp_at(opt_hp: Dict[str, Any], epoch: int) -> Dict[str, Any]:
    """A trial's optimizer hyper-parameters for one epoch: a list gives one value per epoch (its last one holds
    for the epochs after it); ``betas`` is a pair, or a list of pairs."""
    out = {}
    for k, v in opt_hp.items():
        if _per_epoch(k, v):
            if not v:
                raise ValueError(f"fusecc.hpo: hyper-parameter {k!r} is an empty list; give a value per epoch")
            v = v[min(epoch, len(v) - 1)]
        out[k] = tuple(v) if k == "betas" else v
    return out


def _prefix_key(opt_hp: Dict[str, Any], epochs: int) -> Tuple[Any, ...]:
    return tuple(repr(sorted(_hp_at(opt_hp, e).items())) for e in range(epochs))


def _batch_size(rest: Dict[str, Any], default: int, n: int) -> int:
    """A trial's batch size: its ``batch_size`` hyper-parameter (which puts it in a pack of that size), else the
    search's."""
    b = rest.get("batch_size", default)
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
        raise ValueError(f"fusecc.hpo: batch_size must be an int in 1..{n} (the training rows), got {b!r}")
    return b


def trial_seed(number: int, seed: int, hp_seed: int, by_trial: bool = True) -> int:
    """The seed of a trial's initial weights and data order: the search's seed, the trial's own ``seed``
    hyper-parameter and (``by_trial``) its number."""
    return (seed * 1_000_003 + (number * 7919 if by_trial else 0) + hp_seed) % (2**31 - 1)


def _order(n: int, seed: int, epoch: int) -> Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 131 + epoch))


def _make_model(model: Callable[[Dict[str, Any]], nn.Module], rest: Dict[str, Any], seed: int) -> nn.Module:
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        return model(rest)
    finally:
        torch.random.set_rng_state(state)


def _metric(metric: str, logits: Tensor, y: Tensor) -> float:
    if metric == "accuracy":
        return float((logits.argmax(-1) == y).float().mean())
    return float(F.cross_entropy(logits, y))


def _check(study: Any, metric: str, data: Data, batch_size: int, epochs: int) -> None:
    if metric not in ("accuracy", "loss"):
        raise ValueError(f"fusecc.hpo: metric must be 'accuracy' or 'loss' (validation), got {metric!r}")
    optuna = _optuna()
    want = optuna.study.StudyDirection.MAXIMIZE if metric == "accuracy" else optuna.study.StudyDirection.MINIMIZE
    if len(study.directions) != 1 or study.direction != want:
        raise ValueError(f"fusecc.hpo: metric {metric!r} needs a study with direction="
                         f"{'maximize' if metric == 'accuracy' else 'minimize'}; this one is {study.directions}")
    if len(data) != 4:
        raise ValueError("fusecc.hpo: data must be (x_train, y_train, x_valid, y_valid) tensors")
    n = len(data[0])
    if not 1 <= batch_size <= n:
        raise ValueError(f"fusecc.hpo: batch_size must be in 1..{n} (the training rows), got {batch_size}")
    if epochs < 1:
        raise ValueError(f"fusecc.hpo: epochs must be >= 1, got {epochs}")


# ------------------------------------------------------------------------------------------------ the baseline
def torch_objective(model: Callable[[Dict[str, Any]], nn.Module], space: Callable[[Any], Dict[str, Any]], data: Data,
                    *, optimizer: str = "sgd", epochs: int = 10, batch_size: int = 32, metric: str = "accuracy",
                    seed: int = 0, seed_by_trial: bool = True) -> Callable[[Any], float]:
    """The same search one trial at a time with plain torch: an Optuna objective for ``study.optimize``. Each trial
    trains exactly as it does in a pack of :func:`optimize` (same seed, batches, schedule, reports, pruning)."""
    x, y, xv, yv = data

    def objective(trial: Any) -> float:
        hp = space(trial)
        opt_hp, rest, hp_seed = _split(hp, optimizer)
        bs = _batch_size(rest, batch_size, len(x))
        steps = len(x) // bs  # the last partial batch is dropped, as in a pack (every slot steps together)
        s = trial_seed(trial.number, seed, hp_seed, seed_by_trial)
        m = _make_model(model, rest, s).train()
        opt = OPTIMIZERS[optimizer][1](m.parameters(), **_hp_at(opt_hp, 0))
        value = math.nan
        for epoch in range(epochs):
            for g in opt.param_groups:  # this epoch's values of a schedule
                g.update(_hp_at(opt_hp, epoch))
            order = _order(len(x), s, epoch)
            for j in range(steps):
                idx = order[j * bs:(j + 1) * bs]
                loss = F.cross_entropy(m(x[idx]), y[idx])
                loss.backward()
                opt.step()
                opt.zero_grad()
            m.eval()
            with torch.no_grad():
                value = _metric(metric, m(xv), yv)
            m.train()
            trial.report(value, epoch + 1)
            if epoch + 1 < epochs and trial.should_prune():
                raise _optuna().TrialPruned()
        return value

    return objective


# ------------------------------------------------------------------------------------------------ packs
@dataclass
class PackReport:
    """What :func:`optimize` did: trials told, epochs trained and shared, packs, wall-clock, K."""

    trials: int = 0
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    packs: int = 0
    trial_epochs: int = 0  # epochs of trials trained in a slot
    shared_epochs: int = 0  # epochs of trials reported but not trained: forked from a shared stage (stage sharing)
    slot_epochs: int = 0  # epochs of slots computed (idle slots too)
    seconds: float = 0.0
    K: int = 0
    pack_sizes: Dict[int, float] = field(default_factory=dict)  # K -> measured trial-steps/s (K="auto")

    @property
    def fill(self) -> float:
        """Share of the computed slot-epochs that trained a trial."""
        return self.trial_epochs / self.slot_epochs if self.slot_epochs else 0.0

    @property
    def compute_saved(self) -> float:
        """Share of the trials' epochs that stage sharing did not compute."""
        total = self.trial_epochs + self.shared_epochs
        return self.shared_epochs / total if total else 0.0

    def __str__(self) -> str:
        return (f"{self.trials} trials ({self.complete} complete, {self.pruned} pruned, {self.failed} failed) in "
                f"{self.packs} pack(s) of K={self.K}, {self.seconds:.1f} s; {self.trial_epochs} trial-epochs trained "
                f"({self.fill:.0%} of the slot-epochs computed), {self.shared_epochs} shared "
                f"({self.compute_saved:.0%} of the trials' epochs not computed)")


@dataclass
class _Item:
    trial: Any
    opt_hp: Dict[str, Any]
    rest: Dict[str, Any]
    seed: int
    key: Any  # the pack key (the hyper-parameters that go to the model)

    @property
    def scheduled(self) -> bool:
        """Some optimizer value changes over the epochs (a list)."""
        return any(_per_epoch(k, v) for k, v in self.opt_hp.items())


@dataclass
class _Slot:
    item: _Item
    epoch: int = 0  # epochs trained (or forked)
    values: List[float] = field(default_factory=list)  # the metric after each of them
    reported: int = 0  # epochs reported to the study
    forked: int = 0  # epochs taken from a shared stage (not trained in this slot)
    order: Optional[Tensor] = None

    @property
    def trial(self) -> Any:
        return self.item.trial


class _Asker:
    """Asks trials from the study (at most ``n_trials``), parks those of another pack."""

    def __init__(self, study: Any, space: Callable[[Any], Dict[str, Any]], optimizer: str, n_trials: Optional[int],
                 timeout: Optional[float], seed: int, seed_by_trial: bool) -> None:
        self.study, self.space, self.optimizer, self.seed = study, space, optimizer, seed
        self.seed_by_trial = seed_by_trial
        self.left = n_trials if n_trials is not None else math.inf
        self.deadline = time.monotonic() + timeout if timeout else math.inf
        self.parked: Dict[Any, List[_Item]] = {}
        self.warned = False
        self.asked: List[Any] = []
        self.boundaries: set = set()  # epochs where some trial's hyper-parameters change (stage boundaries)

    def next(self, key: Any) -> Optional[_Item]:
        """The next trial of pack ``key`` (None: any pack), or None when the budget is spent."""
        for k in ([key] if key is not None else list(self.parked)):
            if self.parked.get(k):
                return self.parked[k].pop(0)
        while self.left > 0 and time.monotonic() < self.deadline:
            self.left -= 1
            trial = self.study.ask()
            self.asked.append(trial)
            try:
                hp = self.space(trial)
                if not isinstance(hp, dict):
                    raise TypeError(f"fusecc.hpo: space(trial) must return a dict of hyper-parameters, got "
                                    f"{type(hp).__name__}")
                opt_hp, rest, hp_seed = _split(hp, self.optimizer)
                _hp_at(opt_hp, 0)  # (validates the lists)
            except Exception:
                self.study.tell(trial, state=_optuna().trial.TrialState.FAIL)
                raise
            for k, v in opt_hp.items():
                if _per_epoch(k, v):
                    self.boundaries.update(e for e in range(1, len(v)) if v[e] != v[e - 1])
            item = _Item(trial, opt_hp, rest, trial_seed(trial.number, self.seed, hp_seed, self.seed_by_trial),
                         _pack_key(rest))
            if key is None or item.key == key:
                return item
            if not self.warned:
                self.warned = True
                import warnings
                names = sorted(n for n, _ in item.key)
                warnings.warn(f"fusecc.hpo: trial {trial.number} waits for another pack: its hyper-parameters "
                              f"{names} are not the {self.optimizer} optimizer's, so they go to model(hp) and may "
                              "change the architecture (or the batch size); trials that differ in them never share "
                              "a pack. Suggest them "
                              "from a few values (suggest_categorical), or drop them if the model ignores them",
                              stacklevel=4)
            self.parked.setdefault(item.key, []).append(item)
        return None


def _pack_key(rest: Dict[str, Any]) -> Any:
    return tuple(sorted((k, repr(v)) for k, v in rest.items()))


def optimize(study: Any, model: Callable[[Dict[str, Any]], nn.Module], space: Callable[[Any], Dict[str, Any]],
             data: Data, *, n_trials: Optional[int] = None, timeout: Optional[float] = None,
             K: Union[int, str] = 8, optimizer: str = "sgd", epochs: int = 10, batch_size: int = 32,
             metric: str = "accuracy", seed: int = 0, seed_by_trial: bool = True, share_stages: bool = True,
             max_snapshots: int = 64, show_progress_bar: bool = False,
             max_memory_bytes: Optional[int] = None) -> PackReport:
    """Run ``n_trials`` trials of ``study`` (or until ``timeout`` seconds), K at a time in one fused model.

    Args:
        study: an Optuna study (any sampler, pruner, storage); its direction must fit ``metric``.
        model: ``model(hp) -> nn.Module``, a fresh model for a trial, ``hp`` the trial's hyper-parameters that are
            not the optimizer's (called under the trial's seed: its initial weights depend on the trial alone).
        space: ``space(trial) -> dict``: the trial's hyper-parameters (``trial.suggest_*``). Keys the optimizer takes
            per model (see ``OPTIMIZERS``) go to it, a value or a list of one value per epoch (a schedule: the last
            value holds after it); ``seed`` changes the trial's seed; the rest go to ``model``.
        data: ``(x_train, y_train, x_valid, y_valid)``: a classification task (cross-entropy loss).
        K: trials per pack, or ``"auto"`` (:func:`choose_pack_size`).
        optimizer: ``"sgd"``, ``"adam"``, ``"adamw"`` or ``"rmsprop"`` (fusecc.optim's, per trial).
        epochs: the epochs of a trial that is not pruned; a report (``trial.report(value, epoch)``) after each.
        batch_size: rows per step (the last partial batch of an epoch is dropped); a ``batch_size`` hyper-parameter
            from ``space`` overrides it per trial (trials of different batch sizes train in different packs).
        metric: ``"accuracy"`` (maximize) or ``"loss"`` (minimize), on the validation set.
        seed: the search's seed.
        seed_by_trial: each trial's weights and batches from its own seed (its number); False: every trial starts
            from the same weights and sees the same batches (what stage sharing needs).
        share_stages: (with seed_by_trial=False) a trial whose schedule begins as an earlier trial's did starts from
            that trial's weights and optimizer state at the end of the common prefix (Hippo's stage sharing) instead
            of training the prefix again; its reports for those epochs are the earlier trial's.
        max_snapshots: stage boundaries kept for sharing (each a model's weights and optimizer state).
        show_progress_bar: a tqdm bar of trials told.
        max_memory_bytes: the memory K="auto" may use (default: half of what the machine has free).
    """
    optuna = _optuna()
    _check(study, metric, data, batch_size, epochs)
    if K != "auto" and not (isinstance(K, int) and not isinstance(K, bool) and K >= 1):
        raise ValueError(f"fusecc.hpo: K must be a positive int or 'auto', got {K!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"fusecc.hpo: optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    _warn_auto_resources(study.pruner, epochs)
    x = data[0]
    report = PackReport()
    t_start = time.perf_counter()
    asker = _Asker(study, space, optimizer, n_trials, timeout, seed, seed_by_trial)
    sharing = _Stages(max_snapshots) if share_stages and not seed_by_trial else None
    bar = None
    if show_progress_bar:
        from tqdm import tqdm
        bar = tqdm(total=n_trials, desc="trials (packed)", unit="trial")
    try:
        while True:
            first = asker.next(None)
            if first is None:
                break
            if K == "auto":
                k, table = choose_pack_size(lambda f=first: _make_model(model, f.rest, f.seed), x,
                                            _batch_size(first.rest, batch_size, len(x)), optimizer,
                                            max_memory_bytes=max_memory_bytes)
                report.pack_sizes = table
            else:
                k = int(K)
            report.K = max(report.K, k)
            items = [first]
            while len(items) < k:
                it = asker.next(first.key)
                if it is None:
                    break
                items.append(it)
            report.packs += 1
            bs = _batch_size(first.rest, batch_size, len(x))  # (a batch_size hyper-parameter: one per pack)
            _Pack(study, model, asker, sharing, data, optimizer, epochs, bs, metric, report, bar).run(items)
    finally:
        if bar is not None:
            bar.close()
        for t in asker.asked:  # trials asked but not told (an error, or parked for a pack that never ran): FAIL
            study.tell(t, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    report.seconds = time.perf_counter() - t_start
    return report


class _Stages:
    """Snapshots of trials at stage boundaries: (seed, pack key, schedule prefix) -> (weights, optimizer, values)."""

    def __init__(self, max_snapshots: int) -> None:
        import collections
        self.max = max_snapshots
        self.snaps: "collections.OrderedDict[Any, Tuple[Dict[str, Tensor], Dict[str, Any], List[float]]]" = \
            collections.OrderedDict()

    @staticmethod
    def key(item: _Item, epochs: int) -> Any:
        return (item.seed, item.key, _prefix_key(item.opt_hp, epochs))

    def put(self, key: Any, snap: Tuple[Dict[str, Tensor], Dict[str, Any], List[float]]) -> None:
        if self.max <= 0:
            return
        self.snaps[key] = snap
        self.snaps.move_to_end(key)
        while len(self.snaps) > self.max:
            self.snaps.popitem(last=False)

    def get(self, key: Any) -> Optional[Tuple[Dict[str, Tensor], Dict[str, Any], List[float]]]:
        snap = self.snaps.get(key)
        if snap is not None:
            self.snaps.move_to_end(key)
        return snap


class _Pack:
    """One fused model of K slots, trained epoch by epoch, its slots refilled as trials end.

    Reports keep the order of one trial at a time: trial t reports epoch e only once every live trial numbered
    below t has reported epoch e (a trial forked from a shared stage has its first values at once, and waits)."""

    def __init__(self, study: Any, model: Callable[[Dict[str, Any]], nn.Module], asker: _Asker,
                 sharing: Optional[_Stages], data: Data, optimizer: str, epochs: int, batch_size: int,
                 metric: str, report: PackReport, bar: Any) -> None:
        self.study, self.model, self.asker, self.sharing = study, model, asker, sharing
        self.data, self.optimizer, self.epochs, self.batch_size = data, optimizer, epochs, batch_size
        self.steps = len(data[0]) // batch_size  # the last partial batch is dropped (every slot steps together)
        self.metric, self.report, self.bar = metric, report, bar
        self.optuna = _optuna()
        self.exhausted = False
        self.slots: List[Optional[_Slot]] = []

    def run(self, items: List[_Item]) -> None:
        self.key = items[0].key
        models = [_make_model(self.model, it.rest, it.seed) for it in items]
        self.fused = fuse(models, share=False).train()
        self.slots = [None] * len(items)
        self.opt = _make_optimizer(self.optimizer, self.fused, [_hp_at(it.opt_hp, 0) for it in items])
        try:
            for i, it in enumerate(items):  # (a trial may start from a stage shared with an earlier pack's)
                self._start(i, it, fresh=False)
            self._report_pass()
            while any(s is not None for s in self.slots):
                self._epoch()
        except BaseException:
            for s in self.slots:
                if s is not None:
                    self.study.tell(s.trial, state=self.optuna.trial.TrialState.FAIL, skip_if_finished=True)
            raise

    # -------------------------------------------------------------------------------------------- one epoch
    def _epoch(self) -> None:
        x, y, xv, yv = self.data
        slots, bs, k = self.slots, self.batch_size, len(self.slots)
        training = [s if s is not None and s.epoch < self.epochs else None for s in slots]
        for i, s in enumerate(training):
            if s is not None:
                s.order = _order(len(x), s.item.seed, s.epoch)
                if s.item.scheduled:  # (a slot's first values are set when it is filled)
                    self.opt.set_hyperparameters(i, **_per_model_hp(self.optimizer, _hp_at(s.item.opt_hp, s.epoch)))
        live = next((s for s in training if s is not None), None)
        if live is not None:  # idle slots (if any) train on its batches
            for j in range(self.steps):
                idx = torch.stack([(s or live).order[j * bs:(j + 1) * bs] for s in training])  # type: ignore
                out = self.fused(x[idx])  # [K, B, classes]
                # (fusecc.per_model_loss, vectorised: one cross-entropy over all K slots instead of K calls a step)
                loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y[idx].reshape(-1), reduction="none")
                loss.view(k, -1).mean(1).sum().backward()  # each slot exactly its own mean loss's gradient
                self.opt.step()
                self.opt.zero_grad()
            self.report.slot_epochs += k
            self.fused.eval()
            with torch.no_grad():
                logits = self.fused(xv.unsqueeze(0).expand(k, *xv.shape))
            self.fused.train()
            for i, s in enumerate(training):
                if s is None:
                    continue
                s.epoch += 1
                self.report.trial_epochs += 1
                s.values.append(_metric(self.metric, logits[i], yv))
                if self.sharing is not None and s.epoch in self.asker.boundaries:
                    self.sharing.put(_Stages.key(s.item, s.epoch), self._snapshot(i, s))
        self._report_pass()
        if self.exhausted and any(s is None for s in self.slots) and any(s is not None for s in self.slots):
            keep = [i for i, s in enumerate(self.slots) if s is not None]  # no more trials: only the live slots
            self.fused = self.fused.select(keep).train()
            self.opt = self.opt.select(keep, self.fused)
            self.slots = [self.slots[i] for i in keep]

    def _report_pass(self) -> None:
        """Report every value that may be reported now, in trial-number order; refill the slots of ended trials."""
        progress = True
        while progress:
            progress = False
            for _, i in sorted((s.trial.number, i) for i, s in enumerate(self.slots) if s is not None):
                s = self.slots[i]
                if s is None:
                    continue
                while s.reported < len(s.values):
                    e = s.reported + 1
                    if any(u is not None and u.trial.number < s.trial.number and u.reported < e for u in self.slots):
                        break  # an earlier trial has not reported epoch e yet
                    s.reported = e
                    progress = True
                    if e <= s.forked:  # an epoch the trial did not train: it started from a shared stage
                        self.report.shared_epochs += 1
                    if self._after_epoch(s, s.values[e - 1], e):
                        self._refill(i)
                        break

    def _after_epoch(self, s: _Slot, value: float, epoch: int) -> bool:
        """Report epoch ``epoch``'s value; True when the trial ended (told to the study)."""
        states = self.optuna.trial.TrialState
        if not math.isfinite(value):
            return self._tell(s, states.FAIL)
        s.trial.report(value, epoch)
        if epoch >= self.epochs:
            return self._tell(s, states.COMPLETE, value)
        if s.trial.should_prune():
            return self._tell(s, states.PRUNED)
        return False

    def _tell(self, s: _Slot, state: Any, value: Optional[float] = None) -> bool:
        states = self.optuna.trial.TrialState
        if state == states.COMPLETE:
            self.study.tell(s.trial, value)
        else:
            self.study.tell(s.trial, state=state)
        self.report.trials += 1
        self.report.complete += state == states.COMPLETE
        self.report.pruned += state == states.PRUNED
        self.report.failed += state == states.FAIL
        if self.bar is not None:
            self.bar.update(1)
        return True

    # -------------------------------------------------------------------------------------------- slots
    def _snapshot(self, i: int, s: _Slot) -> Tuple[Dict[str, Tensor], Dict[str, Any], List[float]]:
        return ({k: v.clone() for k, v in self.fused.model_state_dict(i).items()}, self.opt.model_state(i),
                list(s.values))

    def _refill(self, i: int) -> None:
        """Slot i's trial ended: the next trial of this pack takes it (fresh, or forked from a shared stage)."""
        self.slots[i] = None
        if self.exhausted:
            return
        item = self.asker.next(self.key)
        if item is None:
            self.exhausted = True
            return
        self._start(i, item, fresh=True)

    def _start(self, i: int, item: _Item, fresh: bool) -> None:
        """Put ``item`` into slot i: forked from the longest stage it shares with an earlier trial (weights,
        optimizer state and the values of those epochs), else with fresh weights and optimizer state (``fresh``:
        the slot held another trial)."""
        snap, e = None, 0
        if self.sharing is not None:
            for e in sorted((b for b in self.asker.boundaries if b < self.epochs), reverse=True):
                snap = self.sharing.get(_Stages.key(item, e))
                if snap is not None:
                    break
        slot = self.slots[i] = _Slot(item)
        if snap is not None:
            weights, opt_state, values = snap
            self.fused.load_model_state_dict(i, weights)
            self.opt.load_model_state(i, opt_state)
            slot.forked = slot.epoch = e
            slot.values = list(values[:e])
        elif fresh:
            self.fused.load_model_state_dict(i, _make_model(self.model, item.rest, item.seed).state_dict())
            self.opt.reset_model(i, **_per_model_hp(self.optimizer, _hp_at(item.opt_hp, 0)))


def _warn_auto_resources(pruner: Any, epochs: int) -> None:
    """Pruners that size their rungs from the first COMPLETED trial ("auto") decide from what has finished, which a
    pack changes (K trials run before one finishes): their decisions would differ from one trial at a time."""
    import warnings
    optuna = _optuna()
    auto = None
    if isinstance(pruner, optuna.pruners.SuccessiveHalvingPruner) and getattr(pruner, "_min_resource", 1) is None:
        auto = "SuccessiveHalvingPruner(min_resource='auto'): give min_resource=1"
    elif isinstance(pruner, optuna.pruners.HyperbandPruner) and getattr(pruner, "_max_resource", 1) == "auto":
        auto = f"HyperbandPruner(max_resource='auto'): give max_resource={epochs} (the epochs)"
    if auto:
        warnings.warn(f"fusecc.hpo: {auto}. With 'auto' the pruner sizes its rungs from the first trial to complete, "
                      "and in a pack K trials start before one completes: its decisions would not be those of the "
                      "same search one trial at a time", stacklevel=3)


@functools.lru_cache(maxsize=None)
def _torch_defaults(optimizer: str) -> Dict[str, Any]:
    """The torch optimizer's defaults of the hyper-parameters a trial may set."""
    import inspect
    params = inspect.signature(OPTIMIZERS[optimizer][1].__init__).parameters
    return {k: v.default for k, v in params.items() if k in OPTIMIZERS[optimizer][2]}


def _per_model_hp(optimizer: str, hp: Dict[str, Any]) -> Dict[str, Any]:
    """A torch optimizer's keyword arguments as fusecc.optim's per-model hyper-parameters (defaults filled in)."""
    return {**_torch_defaults(optimizer), **hp}


def _make_optimizer(optimizer: str, fused: Any, hps: Sequence[Dict[str, Any]]) -> Any:
    cls = OPTIMIZERS[optimizer][0]
    per = [_per_model_hp(optimizer, hp) for hp in hps]
    kwargs: Dict[str, Any] = {}
    for k in per[0]:
        if k == "betas":
            kwargs["betas"] = ([p["betas"][0] for p in per], [p["betas"][1] for p in per])
        else:
            kwargs[k] = [p[k] for p in per]
    return cls(fused, **kwargs)


# ------------------------------------------------------------------------------------------------ K = "auto"
def choose_pack_size(make: Callable[[], nn.Module], x: Tensor, batch_size: int, optimizer: str = "sgd",
                     candidates: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), steps: int = 5,
                     max_memory_bytes: Optional[int] = None, gain: float = 1.1) -> Tuple[int, Dict[int, float]]:
    """The pack size: the memory estimate bounds it, a short measurement of train steps at growing K picks it.

    For each K in ``candidates`` that fits ``max_memory_bytes`` (weights, gradients and optimizer state of K models,
    plus an allowance for activations of 8x a batch's input bytes per model; default half of the free memory), times
    ``steps`` train steps of K fused models and computes trial-steps per second (K / step time). K doubles while that
    grows by >= ``gain`` (10%), and once more after a K where it did not (a few steps' timing is noisy); the K with the
    most trial-steps/s is chosen. Returns (K, {K: trial-steps/s}).
    """
    if max_memory_bytes is None:
        try:
            import psutil
            max_memory_bytes = psutil.virtual_memory().available // 2
        except ImportError:  # pragma: no cover
            max_memory_bytes = 4 << 30
    m0 = make()
    per_model = sum(p.numel() * p.element_size() for p in m0.parameters())
    state_mult = {"sgd": 3, "rmsprop": 4, "adam": 4, "adamw": 4}[optimizer]  # weights, grads, 1-2 state tensors
    xb = x[:batch_size]
    act = xb.numel() * xb.element_size() * 8  # a rough per-model activation allowance
    table: Dict[int, float] = {}
    best_k, best, flat = 1, 0.0, 0
    for k in candidates:
        if k * (per_model * state_mult + act) > max_memory_bytes:
            break
        models = [m0] + [make() for _ in range(k - 1)]
        fused = fuse(models, share=False).train()
        opt = OPTIMIZERS[optimizer][0](fused, lr=1e-3)
        inp = xb.unsqueeze(0).expand(k, *xb.shape).contiguous()

        def step() -> None:
            fused(inp).float().square().mean().backward()
            opt.step()
            opt.zero_grad()

        step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rate = k * steps / (time.perf_counter() - t0)
        table[k] = rate
        if rate >= best * gain:
            best_k, best, flat = k, rate, 0
        else:  # one more K after a step that did not grow by `gain` (the timing of a few steps is noisy)
            if rate > best:
                best_k, best = k, rate
            flat += 1
            if flat > 1:
                break
    return best_k, table


# ------------------------------------------------------------------------------------------------ many machines
def optimize_on_ray_tune(study_name: str, storage: Any, model: Callable[[Dict[str, Any]], nn.Module],
                         space: Callable[[Any], Dict[str, Any]], data: Data, *, workers: int = 2,
                         n_trials_per_worker: int = 10, cpus_per_worker: float = 1.0, sampler: Any = None,
                         pruner: Any = None, storage_path: Optional[str] = None,
                         **optimize_kwargs: Any) -> List[Dict[str, Any]]:
    """Ray Tune as the executor: ``workers`` pack workers, each a Tune trial that loads the study from ``storage``
    and runs :func:`optimize` for ``n_trials_per_worker`` of its trials (K at a time). Ray places them on the
    cluster's CPUs (``cpus_per_worker`` each) and restarts none twice; Optuna's storage (an RDB URL every node reaches,
    or a ``JournalStorage`` on a shared file system) is where the workers meet, as ``study.optimize`` workers do.

    The study must exist (``optuna.create_study(study_name=..., storage=...)``); ``sampler`` and ``pruner`` are
    given to each worker's ``load_study`` (they must pickle). Returns each worker's report (a dict of
    :class:`PackReport`'s fields). Ray must be initialised (``ray.init()``) or reachable."""
    import dataclasses

    from ray import tune

    optuna = _optuna()
    optuna.load_study(study_name=study_name, storage=storage)  # (a clear error here if it does not exist)

    def pack_worker(config: Dict[str, Any]) -> None:
        import optuna as o
        o.logging.set_verbosity(o.logging.WARNING)
        torch.set_num_threads(max(1, int(cpus_per_worker)))
        study = o.load_study(study_name=study_name, storage=storage, sampler=sampler, pruner=pruner)
        rep = optimize(study, model, space, data, n_trials=config["n_trials"], **optimize_kwargs)
        tune.report({k: v for k, v in dataclasses.asdict(rep).items() if k != "pack_sizes"})

    tuner = tune.Tuner(
        tune.with_resources(pack_worker, {"cpu": cpus_per_worker}),
        param_space={"worker": tune.grid_search(list(range(workers))), "n_trials": n_trials_per_worker},
        run_config=tune.RunConfig(name=f"fusecc-hpo-{study_name}", storage_path=storage_path, verbose=0))
    results = tuner.fit()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"fusecc.hpo: {len(errors)} of {workers} Ray Tune pack workers failed: {errors[0]}")
    fields = [f.name for f in dataclasses.fields(PackReport) if f.name != "pack_sizes"]
    return [{k: r.metrics[k] for k in fields} for r in results]
