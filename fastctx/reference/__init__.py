"""Eager PyTorch implementations: the oracle every fused backend is tested against."""
from .acm import gla_context, pyramid_pool, residual_relu

__all__ = ["gla_context", "pyramid_pool", "residual_relu"]
