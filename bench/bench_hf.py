"""Hugging Face fleets: N fine-tuned transformers of one architecture, run six ways on CPU.

Models (random weights, no download):
  bert   BERT-small classifier: BertForSequenceClassification, 4 layers, hidden 256, 4 heads, feed-forward 1024,
         vocabulary 30522, 2 labels
  gpt2   a GPT-2-small-like LM: GPT2LMHeadModel, 4 layers, hidden 256, 4 heads, vocabulary 8192 (GPT-2's 50257
         would make the logits alone 1.6 GB at N=32 x 8 x 32), use_cache=False

Each model gets its own batch of token ids with its own padding (attention masks differ per model).

Providers, inference (torch.no_grad) or one training step (forward with labels, backward, AdamW step):
  loop            the N eager models one after the other (training: N torch.optim.AdamW(fused=True))
  loop+compile    the same with every model under torch.compile (one compiled graph shared by the N instances)
  vmap            torch.func.stack_module_state + torch.vmap(functional_call): does not run transformers' mask code
                  (data-dependent control flow); recorded as such
  fusecc          fusecc.fuse(models) (training: fusecc.optim.AdamW, one optimizer for the fleet)
  fusecc+compile  torch.compile(fused)
  bound           ONE model on all N*B rows (the same FLOPs with one weight): what fusion can reach at best

Method, as bench/bench_inference.py: every provider is first checked against the loop (logits, and the loss in
training: max error / max |loop| below 1e-4; the first call is the warm-up and compile, not timed), then the
providers are timed interleaved in each repetition; the table shows medians and ratios of the same run. "floor" is
this machine's hardware floor for the row: max(FLOPs / fp32 GEMM rate, weight bytes / copy bandwidth), measured at
the start (bench/_floor.py).

Run (from the repository root):

  .venv/bin/python bench/bench_hf.py                       # the default grid below, ~25 min on 2 cores
  .venv/bin/python bench/bench_hf.py --models bert --n 8 --shapes 1x32 --no-compile   # one row, a minute
  .venv/bin/python bench/bench_hf.py --markdown --csv bench/results/hf.csv
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

import fusecc
from fusecc.verify import relative_error

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import BackgroundLoad, geomean, machine_info, print_machine  # noqa: E402
from _floor import measure_rates  # noqa: E402

MAX_REL_ERR = 1e-4
PROVIDERS = ["loop", "loop+compile", "vmap", "fusecc", "fusecc+compile", "bound"]


def make(name: str) -> nn.Module:
    import transformers as T

    if name == "bert":
        return T.BertForSequenceClassification(T.BertConfig(
            vocab_size=30522, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024,
            num_labels=2))
    if name == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=8192, n_embd=256, n_layer=4, n_head=4, n_positions=512,
                                              bos_token_id=0, eos_token_id=0))
    raise ValueError(f"unknown model {name!r}; expected bert or gpt2")


def batch(name: str, model: nn.Module, n: int, b: int, s: int, seed: int) -> Dict[str, torch.Tensor]:
    """Fused inputs [N, B, S]: random tokens, each model's rows padded its own way (and labels for training)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, b, s), generator=g)
    pads = torch.randint(0, max(1, s // 4), (n, b), generator=g)
    pads[:, 0] = 0  # (one full row per model)
    mask = (torch.arange(s) < (s - pads)[..., None]).long()
    labels = torch.randint(0, 2, (n, b), generator=g) if name == "bert" else ids.clone()
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def kwargs_of(name: str) -> Dict[str, Any]:
    return {"use_cache": False} if name == "gpt2" else {}


# ---------------------------------------------------------------------------------------------------- providers


def providers_for(name: str, models: List[nn.Module], inputs: Dict[str, torch.Tensor], train: bool,
                  compile_: bool) -> Dict[str, Callable[[], Any]]:
    """name -> a callable that runs the provider once (inference: returns logits [N, ...]; training: one step,
    returns (logits, loss [N]))."""
    n = len(models)
    extra = kwargs_of(name)
    keys = ["input_ids", "attention_mask"] + (["labels"] if train else [])
    per_model = [{k: inputs[k][i] for k in keys} for i in range(n)]
    out: Dict[str, Callable[[], Any]] = {}

    def loop_of(ms: List[nn.Module], calls: Optional[List[Callable[..., Any]]] = None) -> Callable[[], Any]:
        """The loop over modules ``ms`` (called through ``calls``: their torch.compile'd forms, if given)."""
        calls = calls or ms
        if not train:
            return lambda: torch.stack([c(**kw, **extra).logits for c, kw in zip(calls, per_model)])
        opts = [torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True) for m in ms]

        def step() -> Any:
            logits, losses = [], []
            for c, o, kw in zip(calls, opts, per_model):
                o.zero_grad()
                r = c(**kw, **extra)
                r.loss.backward()
                o.step()
                logits.append(r.logits.detach())
                losses.append(r.loss.detach())
            return torch.stack(logits), torch.stack(losses)

        return step

    def fused_of(f: Any, call: Callable[..., Any]) -> Callable[[], Any]:
        """The fused module ``f`` (called through ``call``: torch.compile(f), or f)."""
        if not train:
            return lambda: call(**fin, **extra).logits
        opt = fusecc.optim.AdamW(f.parameters(), lr=1e-4, num_models=n)

        def step() -> Any:
            opt.zero_grad()
            r = call(**fin, **extra)
            r.loss.sum().backward()
            opt.step()
            return r.logits.detach(), r.loss.detach()

        return step

    own = [copy.deepcopy(m) for m in models]  # training changes the weights: each provider has its own copies
    out["loop"] = loop_of(own)
    if compile_:
        comp_models = [copy.deepcopy(m) for m in models]
        out["loop+compile"] = loop_of(comp_models, [torch.compile(m) for m in comp_models])
    if not train:
        from torch.func import functional_call, stack_module_state

        params, buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        out["vmap"] = lambda: torch.vmap(
            lambda p, b, i, a: functional_call(base, (p, b), (), {"input_ids": i, "attention_mask": a, **extra}).logits
        )(params, buffers, inputs["input_ids"], inputs["attention_mask"])
    fin = {k: inputs[k] for k in keys}
    fused = fusecc.fuse([copy.deepcopy(m) for m in models]).train(train)
    out["fusecc"] = fused_of(fused, fused)
    if compile_:
        fused_c = fusecc.fuse([copy.deepcopy(m) for m in models]).train(train)
        fused_c.compile_for(**fin, **extra)  # fusecc's own compile first, eagerly
        out["fusecc+compile"] = fused_of(fused_c, torch.compile(fused_c))
    one = copy.deepcopy(models[0]).train(train)
    rows = {k: inputs[k].flatten(0, 1) for k in keys}
    if train:
        bopt = torch.optim.AdamW(one.parameters(), lr=1e-4, fused=True)

        def bstep() -> Any:
            bopt.zero_grad()
            r = one(**rows, **extra)
            r.loss.backward()
            bopt.step()
            return None

        out["bound"] = bstep
    else:
        out["bound"] = lambda: one(**rows, **extra).logits
    return out


# ---------------------------------------------------------------------------------------------------- one row


def flops_of(model: nn.Module, inputs: Dict[str, torch.Tensor], extra: Dict[str, Any]) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**{k: v[0] for k, v in inputs.items() if k != "labels"}, **extra)
    return float(counter.get_total_flops())


def run_row(a: argparse.Namespace, name: str, n: int, b: int, s: int, train: bool, rates: Any) -> Dict[str, Any]:
    torch.manual_seed(0)
    models = [make(name).train(train) for _ in range(n)]
    if train:  # dropout would make the providers' results differ: the check compares exact steps
        for m in models:
            for mod in m.modules():
                if isinstance(mod, nn.Dropout):
                    mod.p = 0.0
            for k in ("hidden_dropout_prob", "attention_probs_dropout_prob", "resid_pdrop", "embd_pdrop",
                      "attn_pdrop"):
                if hasattr(m.config, k):
                    setattr(m.config, k, 0.0)
    inputs = batch(name, models[0], n, b, s, seed=n * 1000 + b * 10 + s)
    compile_ = a.compile and n in a.compile_n
    row: Dict[str, Any] = {"model": name, "mode": "train" if train else "infer", "n": n, "batch": b, "seq": s}
    provs = providers_for(name, models, inputs, train, compile_)
    ref = None
    working: Dict[str, Callable[[], Any]] = {}
    for p, fn in provs.items():
        t0 = time.perf_counter()
        try:
            with torch.set_grad_enabled(train):
                got = fn()
        except Exception as e:  # noqa: BLE001 - recorded, the others go on
            row[f"{p}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:120]
            continue
        row[f"{p}_first_s"] = time.perf_counter() - t0
        if p == "loop":
            ref = got
        elif p != "bound":
            err = relative_error(got, ref)
            row[f"{p}_err"] = err
            if not err <= MAX_REL_ERR:
                row[f"{p}_error"] = f"FAIL: differs from the loop by {err:.2e} x max|loop|"
                continue
        working[p] = fn
    # interleaved timing, repetitions within a budget
    one_round = sum(row.get(f"{p}_first_s", 0.0) for p in working if "compile" not in p) or 0.1
    reps = max(a.min_reps, min(a.reps, int(a.row_budget / max(one_round, 1e-3))))
    times: Dict[str, List[float]] = {p: [] for p in working}
    with BackgroundLoad() as bg, torch.set_grad_enabled(train):
        for p, fn in working.items():  # one untimed call after the check (a second compile, caches)
            fn()
        for _ in range(reps):
            for p, fn in working.items():
                t0 = time.perf_counter()
                fn()
                times[p].append(time.perf_counter() - t0)
    row["reps"] = reps
    row["bg_cores"] = bg.cores
    for p, ts in times.items():
        row[f"{p}_ms"] = statistics.median(ts) * 1e3
    row["floor_ms"] = floor_ms(name, models[0], inputs, n, train, rates.gemm_flops, rates.bandwidth)
    return row


def streamed_bytes(model: nn.Module) -> int:
    """Bytes of the weights a forward reads whole: every parameter but the embedding tables (a lookup reads only
    its rows), and the output embedding where it is tied to one (GPT-2's LM head reads the whole table)."""
    emb = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    params = [p for p in model.parameters() if id(p) not in emb]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and id(head.weight) in emb:
        params.append(head.weight)
    return sum(p.numel() * p.element_size() for p in params)


def floor_ms(name: str, model: nn.Module, inputs: Dict[str, torch.Tensor], n: int, train: bool, gemm_flops: float,
             bandwidth: float) -> float:
    """The row's hardware floor: max(FLOPs / GEMM rate, streamed weight bytes / bandwidth) for N models (training:
    3x the FLOPs; the weights read 3 times and the AdamW state 7 times the parameters)."""
    f1 = flops_of(model, inputs, kwargs_of(name)) * (3 if train else 1)
    wbytes = streamed_bytes(model) * (3 if train else 1)
    if train:
        wbytes += 7 * sum(p.numel() * p.element_size() for p in model.parameters())
    return max(n * f1 / gemm_flops, n * wbytes / bandwidth) * 1e3


# ---------------------------------------------------------------------------------------------------- tables


def cell(row: Dict[str, Any], p: str) -> str:
    if f"{p}_ms" in row:
        return f"{row[p + '_ms']:.1f}"
    if f"{p}_error" in row:
        return "FAIL" if row[f"{p}_error"].startswith("FAIL") else "error"
    return "-"


def ratio(row: Dict[str, Any], p: str, base: str = "loop") -> str:
    if f"{p}_ms" in row and f"{base}_ms" in row:
        return f"{row[base + '_ms'] / row[p + '_ms']:.2f}x"
    return "-"


def print_table(rows: List[Dict[str, Any]], markdown: bool) -> None:
    head = ["model", "mode", "N", "BxS"] + [f"{p} ms" for p in PROVIDERS] + [
        "fusecc vs loop", "fusecc vs best other", "fusecc / bound", "fusecc+compile / bound", "floor ms", "bg cores"]
    body = []
    for r in rows:
        # the best provider that is not fusecc: the loop, the compiled loop, vmap
        others = [r[f"{p}_ms"] for p in ("loop", "loop+compile", "vmap") if f"{p}_ms" in r]
        vs_best = (f"{min(others) / r['fusecc_ms']:.2f}x" if others and "fusecc_ms" in r else "-")
        over = (f"{r['fusecc_ms'] / r['bound_ms']:.2f}" if "fusecc_ms" in r and "bound_ms" in r else "-")
        over_c = (f"{r['fusecc+compile_ms'] / r['bound_ms']:.2f}" if "fusecc+compile_ms" in r and "bound_ms" in r
                  else "-")
        bg = r.get("bg_cores")
        body.append([r["model"], r["mode"], str(r["n"]), f"{r['batch']}x{r['seq']}"] + [cell(r, p) for p in PROVIDERS]
                    + [ratio(r, "fusecc"), vs_best, over, over_c, f"{r['floor_ms']:.1f}",
                       "n/a" if bg is None else f"{bg:.2f}"])
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "|".join("---" if i < 4 else "--:" for i in range(len(head))) + "|")
        for b in body:
            print("| " + " | ".join(b) + " |")
    else:
        widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(head)]
        print("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        for b in body:
            print("  ".join(c.rjust(w) for c, w in zip(b, widths)))
    errors = [(r, p) for r in rows for p in PROVIDERS if f"{p}_error" in r]
    if errors:
        print("\nproviders that did not run or failed the check:")
        seen = set()
        for r, p in errors:
            msg = r[f"{p}_error"]
            if (p, msg) in seen:
                continue
            seen.add((p, msg))
            print(f"  {p} ({r['model']} {r['mode']} N={r['n']} {r['batch']}x{r['seq']}, and rows like it): {msg}")
    at4 = [r for r in rows if r["n"] >= 4 and "fusecc_ms" in r and "loop_ms" in r]
    if at4:
        g = geomean([r["loop_ms"] / r["fusecc_ms"] for r in at4])
        print(f"\nfusecc vs loop at N >= 4: geomean {g:.2f}x over {len(at4)} rows; min "
              f"{min(r['loop_ms'] / r['fusecc_ms'] for r in at4):.2f}x")


def _row_from_csv(r: Dict[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in r.items():
        if v == "":
            continue
        if k.endswith(("_ms", "_err", "_first_s")) or k in ("floor_ms", "bg_cores"):
            out[k] = float(v)
        elif k in ("n", "batch", "seq", "reps"):
            out[k] = int(v)
        else:
            out[k] = v
    out.setdefault("bg_cores", None)
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bert,gpt2")
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    ap.add_argument("--shapes", nargs="*", default=["1x32", "1x128", "8x32"], help="inference BxS per model (none: no inference rows)")
    ap.add_argument("--train-shapes", nargs="+", default=["8x32"], help="training BxS per model")
    ap.add_argument("--train-n", type=int, nargs="+", default=[4, 16])
    ap.add_argument("--compile-n", type=int, nargs="+", default=[4, 16],
                    help="the N at which the torch.compile providers run (a cold compile per row: minutes)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--no-train", dest="train", action="store_false")
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--min-reps", type=int, default=3)
    ap.add_argument("--row-budget", type=float, default=20.0, help="seconds of timing per row (sets the reps)")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--csv", help="write every row's figures here")
    ap.add_argument("--table-from", metavar="CSV", nargs="+", help="print the table of earlier runs' CSVs, run nothing")
    ap.add_argument("--rates", metavar="GFLOPS,GBS", help="with --table-from: recompute the floors at these rates")
    a = ap.parse_args(argv)
    if a.table_from:
        rows = [_row_from_csv(r) for path in a.table_from for r in csv.DictReader(open(path))]
        if a.rates:  # the floors again, with the run's measured rates (GFLOP/s,GB/s from its header)
            gemm, bw = (float(v) for v in a.rates.split(","))
            for r in rows:
                m = make(r["model"])
                r["floor_ms"] = floor_ms(r["model"], m, batch(r["model"], m, 1, r["batch"], r["seq"], 0), r["n"],
                                         r["mode"] == "train", gemm * 1e9, bw * 1e9)
        print_table(rows, a.markdown)
        return 0
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)
    info = machine_info()
    print_machine(info)
    rates = measure_rates()
    print(f"rates: fp32 GEMM {rates.gemm_flops / 1e9:.1f} GFLOP/s, copy {rates.bandwidth / 1e9:.2f} GB/s")
    rows = []
    grid: List[Tuple[str, int, int, int, bool]] = []
    for name in a.models.split(","):
        for shape in a.shapes:
            b, s = (int(v) for v in shape.split("x"))
            grid += [(name, n, b, s, False) for n in a.n]
        if a.train:
            for shape in a.train_shapes:
                b, s = (int(v) for v in shape.split("x"))
                grid += [(name, n, b, s, True) for n in a.train_n]
    for name, n, b, s, train in grid:
        t0 = time.perf_counter()
        row = run_row(a, name, n, b, s, train, rates)
        rows.append(row)
        print(f"[{time.perf_counter() - t0:5.0f} s] {name} {'train' if train else 'infer'} N={n} {b}x{s}: "
              + ", ".join(f"{p} {cell(row, p)}" for p in PROVIDERS), flush=True)
    print()
    print_table(rows, a.markdown)
    if a.csv:
        fields = sorted({k for r in rows for k in r})
        with open(a.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
    failed = [r for r in rows for p in PROVIDERS if r.get(f"{p}_error", "").startswith("FAIL")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
