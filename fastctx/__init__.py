"""fastctx: fused kernels for the context heads of segmentation networks."""
__version__ = "0.1.0"

from ._backend import BACKENDS, BackendFallbackWarning, BackendUnavailableError, available_backends, use_backend
from . import ops, nn
from .convert import convert  # the function; the module stays importable as `from fastctx.convert import ...`

__all__ = ["BACKENDS", "BackendFallbackWarning", "BackendUnavailableError", "available_backends", "convert", "use_backend", "ops", "nn",
           "__version__"]
