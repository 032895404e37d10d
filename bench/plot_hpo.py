"""Best value found against wall-clock, packed and one trial at a time, from bench_hpo.py's JSON files.

    python bench/plot_hpo.py docs/bench/hpo_sgd.json docs/bench/hpo_warmup.json --out docs/bench-hpo.png
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="+")
    ap.add_argument("--out", default="docs/bench-hpo.png")
    a = ap.parse_args(argv)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for path in a.json:
        with open(path) as f:
            doc = json.load(f)
        for model in dict.fromkeys(r["model"] for r in doc["results"]):
            panels.append((doc, model))
    cols = min(2, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.8 * rows), squeeze=False)
    styles = {"torch": ("tab:gray", "one trial at a time (torch)"), "packed": ("tab:blue", "packed (fusecc.hpo)"),
              "packed+sharing": ("tab:green", "packed + stage sharing")}
    for ax, (doc, model) in zip(axes.flatten(), panels):
        args = doc["args"]
        for r in doc["results"]:
            if r["model"] != model:
                continue
            color, label = styles[r["system"]]
            xs = [0.0] + [t for t, _ in r["curve"]] + [r["seconds"]]
            ys = [None] + [v for _, v in r["curve"]] + [r["curve"][-1][1] if r["curve"] else None]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color=color,
                    label=f"{label}: {r['seconds']:.1f} s")
            ax.plot([r["seconds"]], [r["best_value"]], "o", color=color)
        ax.set_title(f"{model}, {args['trials']} trials x {args['epochs']} epochs, space {args['space']}", fontsize=9)
        ax.set_xlabel("wall-clock (s)")
        ax.set_ylabel("best validation accuracy so far")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle("Optuna search on digits (Hyperband), packed vs one trial at a time; "
                 f"{panels[0][0]['machine'].get('cpu', '')}", fontsize=9)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
