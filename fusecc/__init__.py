"""fusecc: fuse N same-architecture PyTorch models into one module that runs all N at once."""

from .api import FusedModule, fuse
from .errors import FusionError

__version__ = "0.1.0"
__all__ = ["FusedModule", "FusionError", "fuse", "__version__"]
