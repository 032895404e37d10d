"""Rules, one module per op family; every module in this package is imported here, which registers its rules (see
registry.py): adding an op family is adding a file, with no list to update."""

import importlib
import pkgutil

from .registry import Decline, register_rule, registered_ops

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["Decline", "register_rule", "registered_ops"]
