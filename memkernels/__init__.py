"""memkernels: fused optimizer kernels with the memory correction of Cattaneo & Shigida (NeurIPS 2025)."""
from . import _ops  # registers torch.ops.memkernels.*
from . import backends
from .backends import reference as _reference_backend  # noqa: F401  (the reference kernels)
from .optim import *  # noqa: F403  (the optimizers: optim.__all__)
from .optim import __all__ as _optimizers
from . import theory  # mk.theory (docs/DESIGN.md); matplotlib is imported only when plotting

__version__ = "0.1.0"
__all__ = [*_optimizers, "backends", "theory", "__version__"]
