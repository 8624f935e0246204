"""Eager PyTorch implementations: the oracle every fused backend is tested against, one file per op."""
from .class_attention import class_attention
from .class_gather import class_gather
from .encoding import encoding, encoding_two_gemm
from .gla_context import gla_context
from .pyramid_pool import pyramid_pool
from .residual_relu import residual_relu
from .upsample_add import upsample_add, upsample_add_layer_norm
from .window_attention import window_attention
from .window_pool import window_pool

__all__ = ["class_attention", "class_gather", "encoding", "encoding_two_gemm", "gla_context", "pyramid_pool", "residual_relu", "upsample_add",
           "upsample_add_layer_norm", "window_attention", "window_pool"]
