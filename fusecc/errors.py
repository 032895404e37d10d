"""Exceptions raised by fusecc, and how an error names the user's source line."""

from __future__ import annotations

import re
from typing import Optional

import torch.fx as fx

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class FusionError(RuntimeError):
    """The N models cannot be fused as given: they differ, cannot be traced, or use an op with no rule.

    The message names the culprit (model index and qualname, graph node, source line) and says what to do.
    """


class FusionInputError(FusionError, ValueError):
    """The model cannot run on the inputs it was called with (wrong shapes, say), found while compiling for them:
    a FusionError (compiling failed) and a ValueError (the call's arguments are at fault) at once."""


class Unshare(Exception):
    """Raised by a rule when a tensor the models share (stored once) must become per-model for this compile to be
    right: BatchNorm running statistics updated in training, a buffer a model writes in place. The fused module
    gives each model its own copy of ``names`` and compiles again; never seen by the user."""

    def __init__(self, names, why: str):
        super().__init__(f"{sorted(names)}: {why}")
        self.names = set(names)
        self.why = why


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


def strip_ansi(text: str) -> str:
    """text without terminal colour codes (torch colours some of its messages)."""
    return _ANSI.sub("", text)


def first_line(e: BaseException) -> str:
    """The first non-empty line of an exception's message, for one-line error reports."""
    lines = [ln for ln in strip_ansi(str(e)).splitlines() if ln.strip()]
    return lines[0].strip() if lines else ""
