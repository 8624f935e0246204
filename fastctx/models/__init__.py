"""Backbones and segmentors: ResNetV1c, EncoderDecoder, the APCNet / EncNet / FCN presets and `build_model`."""
from .losses import ohem_pixel_weight, se_loss, seg_cross_entropy
from .presets import MODEL_NAMES, PRESETS, build_model, get_preset
from .resnet import BasicBlock, Bottleneck, LoadReport, ResNetV1c, load_pretrained
from .segmentor import EncoderDecoder

__all__ = [
    "BasicBlock", "Bottleneck", "EncoderDecoder", "LoadReport", "MODEL_NAMES", "PRESETS", "ResNetV1c",
    "build_model", "get_preset", "load_pretrained", "ohem_pixel_weight", "se_loss", "seg_cross_entropy",
]
from .swin import PatchEmbed, PatchMerging, SwinTransformer, swin_converter

__all__ += ["PatchEmbed", "PatchMerging", "SwinTransformer", "swin_converter"]
from .cascade import CascadeEncoderDecoder, CoarseToFineEncoderDecoder

__all__ += ["CascadeEncoderDecoder", "CoarseToFineEncoderDecoder"]
from .ullmc import ULLMC, CrossScaleIIWA, IIWAHead, IIWANeck

__all__ += ["CrossScaleIIWA", "IIWAHead", "IIWANeck", "ULLMC"]
