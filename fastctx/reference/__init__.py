"""Eager PyTorch implementations: the oracle every fused backend is tested against."""
from .acm import gla_context, pyramid_pool, residual_relu
from .encoding import encoding, encoding_two_gemm

__all__ = ["encoding", "encoding_two_gemm", "gla_context", "pyramid_pool", "residual_relu"]
