"""Exceptions raised by fusecc, and how an error names the user's source line."""

from __future__ import annotations

from typing import Optional

import torch.fx as fx


class FusionError(RuntimeError):
    """The N models cannot be fused as given: they differ, cannot be traced, or use an op with no rule.

    The message names the culprit (model index and qualname, graph node, source line) and says what to do.
    """


class FusionInputError(FusionError, ValueError):
    """The model cannot run on the inputs it was called with (wrong shapes, say), found while compiling for them:
    a FusionError (compiling failed) and a ValueError (the call's arguments are at fault) at once."""


def source_line(node: fx.Node) -> Optional[str]:
    """'File "...", line N, in fn : code' of the user code that created ``node``, if the trace recorded it."""
    st = getattr(node, "stack_trace", None) or node.meta.get("stack_trace")
    if not st:
        return None
    lines = st.splitlines()
    best = None
    for i, ln in enumerate(lines):
        ln = ln.strip()
        if ln.startswith("File ") and "/torch/" not in ln and "/fusecc/" not in ln:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            best = f"{ln} : {code}"
    return best
