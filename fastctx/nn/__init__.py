"""Drop-in modules with mmsegmentation 1.x parameter names."""
from .apc_head import ACM, APCHead
from .conv_module import ConvModule
from .enc_head import EncHead, EncModule, Encoding, se_loss, se_targets
from .fcn_head import FCNHead

__all__ = ["ACM", "APCHead", "ConvModule", "EncHead", "EncModule", "Encoding", "FCNHead", "se_loss", "se_targets"]
from .iiwa import IIWA, PositionEmbeddingSine
from .window_msa import DropPath, ShiftWindowMSA, WindowMSA, convert_window_msa

__all__ += ["DropPath", "IIWA", "PositionEmbeddingSine", "ShiftWindowMSA", "WindowMSA", "convert_window_msa"]
from .acf_head import ACFHead, ACFModule
from .aspp_head import ASPPHead
from .ocr_head import ObjectAttentionBlock, OCRHead, SpatialGatherModule, convert_ocr

__all__ += ["ACFHead", "ACFModule", "ASPPHead", "OCRHead", "ObjectAttentionBlock", "SpatialGatherModule", "convert_ocr"]
from .uper_head import PPM, UPerHead

__all__ += ["PPM", "UPerHead"]
