"""Public functional ops, one module per op. Each picks a backend (fastctx.use_backend /
FASTCTX_BACKEND / automatic, per the op's capability declarations) and is differentiable
(twice) and torch.compile-able."""
from ._dispatch import OPS
from .class_attention import class_attention
from .class_gather import class_gather
from .encoding import encoding
from .gla_context import gla_context
from .pyramid_pool import pyramid_pool, split_scales
from .residual_relu import residual_relu
from .upsample_add import upsample_add, upsample_add_layer_norm
from .window_attention import window_attention
from .window_pool import window_pool

__all__ = ["OPS", "class_attention", "class_gather", "encoding", "gla_context", "pyramid_pool", "residual_relu", "split_scales",
           "upsample_add", "upsample_add_layer_norm", "window_attention", "window_pool"]
