"""Public functional ops. Each picks a backend (fastctx.use_backend /
FASTCTX_BACKEND / automatic) and is differentiable and torch.compile-able."""
from .encoding import encoding
from .gla_context import gla_context
from .pyramid_pool import pyramid_pool, split_scales
from .residual_relu import residual_relu

__all__ = ["encoding", "gla_context", "pyramid_pool", "residual_relu", "split_scales"]
