"""Exceptions raised by fusecc."""

from __future__ import annotations


class FusionError(RuntimeError):
    """The N models cannot be fused as given: they differ, cannot be traced, or use an op with no rule.

    The message names the culprit (model index and qualname, graph node, source line) and says what to do.
    """
