"""Latency against throughput for bench_serve.py's runs: p99 (and p50, dashed) against answered requests/s, one panel
per fleet and popularity, one colour per system.

    python bench/plot_serve.py docs/bench/serve_n16.json --n 16 --out docs/bench-serve.png
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional, Sequence

COLOURS = {"process-per-model": "tab:gray", "per-model": "tab:blue", "fusecc": "tab:red"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+", help="bench_serve.py --json files (later files add curves, suffixed)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--out", default="bench-serve.png")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results: List[dict] = []
    for k, path in enumerate(a.json):
        with open(path) as f:
            for r in json.load(f)["results"]:
                if not r.get("skipped") and r["n"] == a.n:
                    r = dict(r, label=r["system"] + ("" if k == 0 else " (run 2)"))
                    results.append(r)
    panels = sorted({(r["fleet"], r["popularity"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (fleet, pop) in zip(axes[0], panels):
        for r in results:
            if (r["fleet"], r["popularity"]) != (fleet, pop):
                continue
            pts = sorted(r["points"], key=lambda p: p["offered"])
            x = [p["throughput"] for p in pts]
            colour = COLOURS.get(r["system"], "black")
            style = ":" if "run 2" in r["label"] else "-"
            ax.plot(x, [p["p99"] for p in pts], style, marker="o", ms=3, color=colour, label=r["label"] + " p99")
            ax.plot(x, [p["p50"] for p in pts], "--", color=colour, alpha=0.5, lw=1)
        ax.set_yscale("log")
        ax.set_title(f"{fleet}, N={a.n}, {pop}")
        ax.set_xlabel("answered requests/s (one row each)")
        ax.set_ylabel("latency ms (p99 solid, p50 dashed)")
        ax.axhline(250, color="black", lw=0.5)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
