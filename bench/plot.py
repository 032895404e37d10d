"""Plot the speed-up over the loop against N from the benchmarks' CSVs: one panel per model, one colour per
provider, inference solid and the training step dashed (a row whose provider crashed or has no time is left out).

Run (from the repository root), after bench_inference.py / bench_train.py wrote their CSVs:

  .venv/bin/python bench/plot.py                      # bench/results/{inference,train}.csv -> speedup.png
  .venv/bin/python bench/plot.py a.csv b.csv --out /tmp/speedup.png
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CSVS = [os.path.join(HERE, "results", "inference.csv"), os.path.join(HERE, "results", "train.csv")]
DEFAULT_OUT = os.path.join(HERE, "results", "speedup.png")
MODEL_ORDER = ["mlp", "resnet18", "mobilenet_v2", "densenet121", "transformer"]
PROVIDER_ORDER = ["vmap", "vmap+compile", "fusecc", "fusecc+compile"]
COLOURS = {"vmap": "tab:blue", "vmap+compile": "tab:cyan", "fusecc": "tab:red", "fusecc+compile": "tab:orange"}
STYLES = {"inference": "-", "train": "--"}
MARKERS = {"inference": "o", "train": "s"}
Y_TICKS = [0.125, 0.25, 0.375, 0.5, 0.75, 1, 1.25, 1.5, 2, 3, 4, 6, 8, 12, 16]


def read_rows(paths: Sequence[str]) -> List[Dict[str, str]]:
    rows: List[Dict[str, str]] = []
    for path in paths:
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                row.setdefault("mode", "train" if "train" in os.path.basename(path) else "inference")
                rows.append(row)
    return rows


def as_float(text: Optional[str]) -> Optional[float]:
    try:
        return float(text) if text not in (None, "", "n/a") else None
    except ValueError:
        return None


def series(rows: Sequence[Dict[str, str]]) -> Dict[Tuple[str, str, str], List[Tuple[int, float]]]:
    """(model, mode, provider) -> sorted [(N, speed-up over the loop)]."""
    out: Dict[Tuple[str, str, str], List[Tuple[int, float]]] = defaultdict(list)
    for row in rows:
        speedup = as_float(row.get("speedup_vs_loop"))
        if row["provider"] == "loop" or speedup is None or row.get("error"):
            continue
        out[(row["model"], row["mode"], row["provider"])].append((int(row["num_models"]), speedup))
    return {k: sorted(v) for k, v in out.items()}


def subtitle(rows: Sequence[Dict[str, str]]) -> str:
    first = rows[0]
    parts = [first.get("cpu", ""), f"{first.get('cpu_count', '?')} cores", f"torch {first.get('torch', '?')}",
             f"batch {first.get('batch', '?')} per model"]
    stamps = sorted({r.get("timestamp", "")[:10] for r in rows if r.get("timestamp")})
    if stamps:
        parts.append(" / ".join(stamps))
    return ", ".join(p for p in parts if p)


def plot(rows: Sequence[Dict[str, str]], out: str) -> None:
    data = series(rows)
    present = {m for m, _, _ in data}
    models = [m for m in MODEL_ORDER if m in present] + sorted(present - set(MODEL_ORDER))
    cols = min(3, max(1, len(models)))
    nrows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4.0 * nrows), squeeze=False)
    all_ns = sorted({n for points in data.values() for n, _ in points})
    for ax, model in zip(axes.flat, models):
        for mode in ("inference", "train"):
            for provider in PROVIDER_ORDER:
                points = data.get((model, mode, provider))
                if not points:
                    continue
                ns, speedups = zip(*points)
                ax.plot(ns, speedups, STYLES[mode], marker=MARKERS[mode], color=COLOURS[provider], markersize=4,
                        label=f"{provider}, {'training step' if mode == 'train' else 'inference'}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_title(model)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xticks(all_ns)
        ax.set_xticklabels([str(n) for n in all_ns])
        lo, hi = ax.get_ylim()
        ax.set_yticks([t for t in Y_TICKS if lo <= t <= hi])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _pos: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_ylim(lo, hi)
        ax.set_xlabel("N (models)")
        ax.set_ylabel("speed-up over the loop")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    legend_ax = list(axes.flat)[-1] if len(models) < axes.size else None
    if legend_ax is not None:
        legend_ax.legend(handles, labels, loc="center", fontsize=9, title="provider (loop = 1x)")
    else:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8)
    fig.suptitle(f"fusecc benchmark: speed-up over a loop of N eager models\n{subtitle(rows)}", fontsize=11)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csvs", nargs="*", help="the benchmark CSVs (default: bench/results/inference.csv and "
                                            "bench/results/train.csv, those that exist)")
    ap.add_argument("--out", default=DEFAULT_OUT, help="the PNG to write (default: bench/results/speedup.png)")
    a = ap.parse_args(argv)
    paths = a.csvs or [p for p in DEFAULT_CSVS if os.path.exists(p)]
    if not paths:
        ap.error("no CSV given and none of the default ones exists: run the benchmarks first")
    rows = read_rows(paths)
    if not rows:
        ap.error(f"no rows in {', '.join(paths)}")
    plot(rows, a.out)
    print(f"wrote {a.out} (from {', '.join(paths)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
