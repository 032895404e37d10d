"""Rules, one file per op family; importing this package registers them all (see registry.py)."""

from . import attention, conv, dropout, embedding, linear, norm, pointwise, pool, reduce, shape  # noqa: F401
from .registry import Decline, register_rule, registered_ops

__all__ = ["Decline", "register_rule", "registered_ops"]
