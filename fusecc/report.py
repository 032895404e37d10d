"""What a compile did: fused ops per kind and lowering, layout conversions, per-layer choices, fallbacks.

``print(fused)`` shows it; tests assert on it (``fused.fusion_report.count("conv2d", "grouped conv")``).
"""

from __future__ import annotations

from collections import Counter
from typing import List, Optional, Tuple


class Report:
    def __init__(self) -> None:
        self.ops: Counter = Counter()  # (kind, lowering) -> count
        self.conversions: Counter = Counter()  # layout conversion kind (movedim, fold, ...) -> count
        self.fallbacks: List[Tuple[str, str, str]] = []  # (qualname, type, reason)
        self.choices: List[Tuple[str, str, str, str]] = []  # (layer, kind, lowering picked, "rule" / timings)
        self.branch: Optional[str] = None  # the first layer whose weights differ between the models

    def record(self, kind: str, how: str) -> None:
        self.ops[(kind, how)] += 1

    def count(self, kind: str, how: Optional[str] = None) -> int:
        return sum(c for (k, h), c in self.ops.items() if k == kind and (how is None or h == how))

    def table(self) -> str:
        lines = []
        for (kind, how), c in sorted(self.ops.items()):
            lines.append(f"    {kind:<22} {c:>4}  {how}")
        if self.conversions:
            conv = ", ".join(f"{k} {c}" for k, c in sorted(self.conversions.items()))
            lines.append(f"    layout conversions: {conv}")
        if self.choices:
            lines.append("  per-layer lowering choices:")
            for layer, kind, how, why in self.choices:
                lines.append(f"    {layer:<28} {how}  ({why})")
        if self.fallbacks:
            lines.append("  fallbacks (run as a loop over the N models):")
            for q, t, why in self.fallbacks:
                lines.append(f"    {q} ({t}): {why}")
        else:
            lines.append("  fallbacks: none")
        return "\n".join(lines)
