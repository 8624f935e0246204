"""Drop-in modules with mmsegmentation 1.x parameter names."""
from .apc_head import ACM, APCHead
from .conv_module import ConvModule

__all__ = ["ACM", "APCHead", "ConvModule"]
