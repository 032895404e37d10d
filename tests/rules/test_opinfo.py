"""Every op the rule registry claims, on PyTorch's own OpInfo samples: fused == the N models run one by one.

The sweep (tests/rules/opinfo_sweep.py) runs up to 3 float32 samples per OpInfo (integer and bool index / mask
tensors included) in every registered form (function, method, in-place method, alias, operator) and four roles of
the tensors (per-model input, per-model buffer, shared input, shared first operand). Each op-sample must match the
loop; the only other outcome allowed is a refusal at compile time (a FusionError naming the op and saying why)
listed in ``EXCEPTIONS`` with its reason. ``python -m tests.rules.opinfo_sweep`` prints the whole table.
"""

from __future__ import annotations

import pytest

from tests.rules import opinfo_sweep as sweep

# (registry entry, OpInfo name, variant) -> why it is refused. Refused means: fuse/compile raises a FusionError that
# names the op and the reason, never a wrong result.
_SPLIT_POINTS = ("the split points are a per-model tensor: the number and sizes of the pieces would differ between "
                 "the models, which no single fused tensor can hold; pass Python ints or a shared tensor")
_SHARED_STATS = ("batch_norm in training mode with running statistics shared by all models: the N models would "
                 "update one tensor in turn, each after the previous; give each model its own buffers")
EXCEPTIONS = {
    **{(e, "tensor_split", v): _SPLIT_POINTS
       for e in ("torch.tensor_split", "Tensor.tensor_split") for v in ("input", "param", "shared0")},
    ("F.batch_norm", "nn.functional.batch_norm", "shared"): _SHARED_STATS,
}
# further samples (the slow test): limits only they reach
_BOOL_MASK = ("indexing with a per-model boolean mask: how many elements it selects depends on each model's data, so "
              "the models' results would differ in shape")
EXCEPTIONS_ALL_SAMPLES = {
    **EXCEPTIONS,
    **{("operator.getitem", "__getitem__", v): _BOOL_MASK for v in ("input", "param", "shared0")},
    **{("F.batch_norm", "nn.functional.batch_norm", v): "a 1-D input has no channel dim (torch accepts one only "
                                                         "when it is empty)" for v in ("input", "param", "shared0")},
}

ENTRIES = sorted(sweep.coverage())


def _ids(entry: str) -> str:
    return entry.replace("Tensor.", "T.")


def _check(outcomes, exceptions) -> None:
    bad = [o for o in outcomes
           if o.kind in (sweep.WRONG, sweep.ERROR) or o.kind == sweep.REFUSED and o.key not in exceptions]
    assert not bad, "\n".join(f"{o.kind}: {o.opinfo} ({o.form}, {o.variant}, sample {o.sample}): {o.detail}"
                              for o in bad)


SWEPT = [e for e in ENTRIES if e not in sweep.NOT_SWEPT]


@pytest.mark.parametrize("entry", SWEPT, ids=_ids)
def test_op_matches_the_models_on_opinfo_samples(entry):
    outcomes = sweep.sweep_entry(entry)
    _check(outcomes, EXCEPTIONS)
    assert any(o.kind == sweep.MATCH for o in outcomes), \
        f"{entry}: no sample ran to a comparison: " + "; ".join(f"{o.kind} {o.detail}" for o in outcomes[:5])


@pytest.mark.slow
@pytest.mark.parametrize("entry", SWEPT, ids=_ids)
def test_op_matches_the_models_on_every_further_sample(entry):
    """The samples after the first 3, with the tensors as per-model inputs and as shared inputs (the other two
    variants place tensors as the first two do; `python -m tests.rules.opinfo_sweep --all-samples` runs all four).
    About 2 minutes on 2 cores."""
    _check(sweep.sweep_entry(entry, variants=("input", "shared"), max_samples=None, first=sweep.MAX_SAMPLES),
           EXCEPTIONS_ALL_SAMPLES)


def test_every_registry_op_is_exercised():
    """An op added to the registry must be reached by an OpInfo (directly, through sweep.EXTRA) or a hand-written
    sample (sweep._hand); or be listed in sweep.NOT_SWEPT with the reason."""
    missing = [e for e in ENTRIES if not sweep.coverage()[e] and e not in sweep.NOT_SWEPT]
    assert not missing, f"registry ops no sweep sample reaches: {missing}; map them to an OpInfo in " \
                        "tests/rules/opinfo_sweep.py (EXTRA) or write samples for them (_hand)"


def test_the_lists_name_real_registry_ops():
    """EXTRA, the hand samples, NOT_SWEPT and EXCEPTIONS must not outlive the ops they name."""
    names = set(sweep.coverage())
    stale = [e for e in list(sweep.EXTRA) + list(sweep._hand()) + list(sweep.NOT_SWEPT) if e not in names]
    stale += [k for k in EXCEPTIONS_ALL_SAMPLES if k[0] not in names]
    assert not stale, f"not registry ops (any more): {stale}"


@pytest.mark.parametrize("key", sorted(EXCEPTIONS), ids=lambda k: f"{k[0]}-{k[2]}")
def test_exceptions_are_still_refused(key):
    """A listed exception that now matches must leave the list (the list states today's limits, no more)."""
    entry, opinfo, variant = key
    outs = [o for o in sweep.sweep_entry(entry, variants=(variant,)) if o.opinfo == opinfo]
    assert any(o.kind == sweep.REFUSED for o in outs), f"{key} is no longer refused: remove it from EXCEPTIONS"
