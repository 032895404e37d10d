"""fusecc: fuse N same-architecture PyTorch models into one module that runs all N at once."""

from . import optim, utils
from .api import FusedModule, fuse
from .errors import FusionError
from .export import export
from .utils import per_model_loss

from .version import __version__
__all__ = ["FusedModule", "FusionError", "export", "fuse", "optim", "per_model_loss", "utils", "__version__"]
