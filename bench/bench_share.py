"""Fleets that share most of their weights: a frozen trunk with per-model heads, and LoRA adapters on one base.

Part "trunk": N resnet18 (10 classes) that differ only in ``fc`` (a frozen backbone, each model its own head),
batch B of 64x64 images, inference (torch.no_grad):
  loop            the N models one after the other
  fusecc-stacked  fusecc.fuse(models, share=False): every weight stacked per model (fusecc before sharing)
  fusecc          fusecc.fuse(models): the trunk stored once and computed once
  one model       the bound: ONE resnet18 on the same batch (shared input) or on the N*B concatenated batch
                  (per-model inputs)
and the weight storage of the fused module against one trunk plus N heads.

Part "lora": the BERT-small classifier of bench/bench_hf.py with N LoRA adapters (peft, rank 8, alpha 16, on the
query/value projections), B sequences of 32 tokens per adapter, inference:
  base            the bare base model on all N*B rows (the bound: the same base FLOPs, no adapters)
  loop            the N peft models one after the other
  peft-mixed      ONE peft model holding the N adapters, the batch of N*B rows with ``adapter_names=`` per row
                  (peft's own mixed-adapter batching)
  fusecc          fusecc.fuse(the N peft models)

Method: every provider is checked against the loop first (max error / max |loop| below 1e-4), then all are timed
interleaved (each repetition runs every provider once, in a shuffled order), medians of the repetitions.

  .venv/bin/python bench/bench_share.py                     # both parts, ~5 min on 2 cores
  .venv/bin/python bench/bench_share.py --part lora --n 4 16 --batch 1 8
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import warnings
from typing import Any, Dict, List

import torch
import torchvision

import fusecc

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import interleaved_medians, machine_info, print_machine  # noqa: E402

MAX_REL_ERR = 1e-4


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check(outs: Dict[str, torch.Tensor], ref: torch.Tensor) -> Dict[str, float]:
    errs = {k: rel_err(v, ref) for k, v in outs.items()}
    bad = {k: e for k, e in errs.items() if e > MAX_REL_ERR}
    if bad:
        raise SystemExit(f"providers disagree with the loop: {bad}")
    return errs


# ------------------------------------------------------------------------------------------------- trunk
def trunk_rows(a: argparse.Namespace) -> List[Dict[str, Any]]:
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval()
    rows = []
    for n in a.n:
        models = []
        for _ in range(n):
            m = copy.deepcopy(base)
            m.fc.reset_parameters()
            models.append(m)
        one = models[0]
        for shared in (True, False):
            b = a.trunk_batch
            x = torch.randn(b, 3, 64, 64) if shared else torch.randn(n, b, 3, 64, 64)
            stacked = fusecc.fuse(models, shared_inputs=shared, share=False)
            fused = fusecc.fuse(models, shared_inputs=shared)
            flat = x if shared else x.flatten(0, 1)
            prov = {
                "loop": lambda: torch.stack([m(x if shared else x[i]) for i, m in enumerate(models)]),
                "fusecc-stacked": lambda: stacked(x),
                "fusecc": lambda: fused(x),
                "one model": lambda: one(flat),
            }
            with torch.no_grad():
                ref = prov["loop"]()
                check({k: prov[k]() for k in ("fusecc-stacked", "fusecc")}, ref)
                ms = interleaved_medians(prov, a.reps, a.budget)
            wb = fused.weight_bytes()
            trunk = sum(t.numel() * t.element_size() for k, t in one.state_dict().items() if not k.startswith("fc."))
            head = sum(t.numel() * t.element_size() for k, t in one.state_dict().items() if k.startswith("fc."))
            rows.append({"n": n, "input": "shared" if shared else "per model", "b": b, "ms": ms,
                         "storage": wb["total"] / (trunk + n * head), "stored_mib": wb["total"] / 2**20,
                         "unfused_mib": wb["unfused"] / 2**20})
            print_trunk_row(rows[-1])
    return rows


def print_trunk_row(r: Dict[str, Any]) -> None:
    ms = r["ms"]
    bound = "one model, same batch" if r["input"] == "shared" else f"one model on {r['n']}x{r['b']} rows"
    print(f"  N={r['n']:<3} {r['input']:<9} B={r['b']}: loop {ms['loop']:8.1f} ms | fusecc-stacked "
          f"{ms['fusecc-stacked']:8.1f} | fusecc {ms['fusecc']:8.1f} | {bound} {ms['one model']:8.1f}  ->  fusecc / "
          f"bound {ms['fusecc'] / ms['one model']:.2f}x, vs loop {ms['loop'] / ms['fusecc']:.2f}x, vs stacked "
          f"{ms['fusecc-stacked'] / ms['fusecc']:.2f}x; weights {r['stored_mib']:.1f} MiB "
          f"({r['storage']:.3f}x one trunk + N heads; {r['unfused_mib']:.0f} MiB unfused)", flush=True)


# ------------------------------------------------------------------------------------------------- lora
def lora_rows(a: argparse.Namespace) -> List[Dict[str, Any]]:
    import peft
    import transformers as T

    torch.manual_seed(0)
    base = T.BertForSequenceClassification(T.BertConfig(
        vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
        num_labels=2)).eval()
    rows = []
    seq = a.seq
    for n in a.n:
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.0)
        models = []
        for i in range(n):
            m = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for k, p in m.named_parameters():
                    if "lora_B" in k:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            models.append(m)
        mixed = peft.get_peft_model(copy.deepcopy(base), cfg, adapter_name="a0").eval()
        for i in range(1, n):
            mixed.add_adapter(f"a{i}", cfg)
        with torch.no_grad():  # each adapter's weights from model i
            for i, m in enumerate(models):
                for k, p in m.named_parameters():
                    if "lora_" in k:
                        mixed.get_parameter(k.replace(".default.", f".a{i}.")).copy_(p)
        fused = fusecc.fuse(models)
        for b in a.batch:
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, 30522, (n, b, seq), generator=g)
            mask = torch.ones(n, b, seq, dtype=torch.long)
            flat_ids, flat_mask = ids.flatten(0, 1), mask.flatten(0, 1)
            names = [f"a{i}" for i in range(n) for _ in range(b)]
            prov = {
                "loop": lambda: torch.stack([m(input_ids=ids[i], attention_mask=mask[i]).logits
                                             for i, m in enumerate(models)]),
                "peft-mixed": lambda: mixed(input_ids=flat_ids, attention_mask=flat_mask,
                                            adapter_names=names).logits.unflatten(0, (n, b)),
                "fusecc": lambda: fused(input_ids=ids, attention_mask=mask).logits,
                "base": lambda: base(input_ids=flat_ids, attention_mask=flat_mask).logits,
            }
            with torch.no_grad():
                ref = prov["loop"]()
                check({k: prov[k]() for k in ("peft-mixed", "fusecc")}, ref)
                ms = interleaved_medians(prov, a.reps, a.budget)
            wb = fused.weight_bytes()
            rows.append({"n": n, "b": b, "ms": ms, "stored_mib": wb["total"] / 2**20,
                         "unfused_mib": wb["unfused"] / 2**20})
            print_lora_row(rows[-1])
    return rows


def print_lora_row(r: Dict[str, Any]) -> None:
    ms = r["ms"]
    print(f"  N={r['n']:<3} B={r['b']}: base {ms['base']:8.1f} ms | loop {ms['loop']:8.1f} | peft-mixed "
          f"{ms['peft-mixed']:8.1f} | fusecc {ms['fusecc']:8.1f}  ->  fusecc throughput {ms['base'] / ms['fusecc']:.2f}x "
          f"the bare base, {ms['loop'] / ms['fusecc']:.2f}x the loop, {ms['peft-mixed'] / ms['fusecc']:.2f}x peft-mixed; "
          f"weights {r['stored_mib']:.1f} MiB ({r['unfused_mib']:.0f} MiB unfused)", flush=True)


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=["trunk", "lora", "all"], default="all")
    p.add_argument("--n", type=int, nargs="+", default=None, help="fleet sizes (default: trunk 8; lora 4 16)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="lora: sequences per adapter")
    p.add_argument("--seq", type=int, default=32, help="lora: tokens per sequence")
    p.add_argument("--trunk-batch", type=int, default=4, help="trunk: images per model")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--budget", type=float, default=60.0, help="seconds of timing per row (after 3 repetitions)")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    print_machine(machine_info())
    n_arg = a.n
    if a.part in ("trunk", "all"):
        a.n = n_arg or [8]
        print("frozen trunk: resnet18 x N differing in fc, 64x64, inference")
        trunk_rows(a)
    if a.part in ("lora", "all"):
        a.n = n_arg or [4, 16]
        print(f"LoRA fleet: BERT-small + N adapters (r=8 on query/value), {a.seq} tokens, inference")
        lora_rows(a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
