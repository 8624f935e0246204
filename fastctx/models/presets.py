"""Model presets following mmsegmentation 1.x configs and `build_model`.

`configs/_base_/models/{apcnet,encnet,fcn}_r50-d8.py`: a dilated ResNetV1c
(output stride 8), the named decode head on layer4 and an auxiliary FCNHead on
layer3 (in_index 2, one conv, no input concat, dropout 0.1, loss weight 0.4).
r101 only changes the depth; r18 (mmseg's `fcn_r18-d8` recipe, applied to all
three) shrinks the heads: decode in_channels 512 / channels 128 (EncNet:
in_channels [128, 256, 512]), auxiliary in_channels 256 / channels 64.

`ullmc_swin-{t,s,b}` are ULLMC (fastctx.models.ullmc, docs/ullmc.md): a Swin
backbone with strides (4, 2, 1, 1) as the released configs, the IIWA neck and
decoder, an auxiliary FCNHead on the last Swin stage, OHEM on the decode loss;
`ullmc_swin-tiny` is a CPU-sized one for the synthetic scenes.

`upernet_swin-t` is mmseg's UPerNet-Swin-T baseline
(`configs/swin/swin-tiny-patch4-window7-in1k-pre_upernet_8xb2-160k_ade20k-512x512.py`
over `configs/_base_/models/upernet_swin.py`): Swin-T with strides (4, 2, 2, 2),
UPerHead (fastctx.nn.uper_head) on the four stages, the auxiliary FCNHead on
stage 3 (384 channels in, 256 wide, loss weight 0.4).

`ocrnet_r*-d8` follow `configs/_base_/models/ocrnet_r50-d8.py` (a
CascadeEncoderDecoder: FCNHead then OCRHead); `acfnet_r*-d8` are ACFNet with an
ASPP base (fastctx.nn.acf_head), built like the others. Their r18 heads shrink
by the same factor of 4.
"""
from __future__ import annotations

import copy
import inspect
import os
from typing import Any

import torch.nn as nn

from ..nn import ACFHead, APCHead, ASPPHead, EncHead, FCNHead, OCRHead, UPerHead
from .cascade import CascadeEncoderDecoder, CoarseToFineEncoderDecoder
from .resnet import ResNetV1c, load_pretrained
from .segmentor import EncoderDecoder
from .swin import SwinTransformer
from .ullmc import ULLMC, IIWAHead, IIWANeck

__all__ = ["MODEL_NAMES", "PRESETS", "HEADS", "SEGMENTORS", "get_preset", "build_model"]

HEADS: dict[str, type[nn.Module]] = {"APCHead": APCHead, "EncHead": EncHead, "FCNHead": FCNHead}
HEADS.update(OCRHead=OCRHead, ACFHead=ACFHead, ASPPHead=ASPPHead, IIWAHead=IIWAHead, UPerHead=UPerHead)
# A preset's "backbone_type" (default "ResNetV1c") and "neck" type name their classes here.
BACKBONES: dict[str, type[nn.Module]] = {"ResNetV1c": ResNetV1c, "SwinTransformer": SwinTransformer}
NECKS: dict[str, type[nn.Module]] = {"IIWANeck": IIWANeck}

# A preset's "segmentor" entry (default "EncoderDecoder") names its class here.
SEGMENTORS: dict[str, type[nn.Module]] = {"EncoderDecoder": EncoderDecoder,
                                          "CascadeEncoderDecoder": CascadeEncoderDecoder,
                                          "CoarseToFineEncoderDecoder": CoarseToFineEncoderDecoder,
                                          "ULLMC": ULLMC}

_SEGMENTOR_OPTIONS = ("align_corners", "decode_loss_weight", "aux_loss_weight", "se_loss_weight", "ignore_index",
                      "coarse_loss_weight", "ohem")
_SECTIONS = ("backbone", "neck", "decode_head", "auxiliary_head")


def _backbone(depth: int) -> dict[str, Any]:
    return dict(depth=depth, strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), out_indices=(0, 1, 2, 3),
                contract_dilation=True, norm_eval=False)


def _decode_head(kind: str, small: bool) -> dict[str, Any]:
    channels = 128 if small else 512
    last = 512 if small else 2048
    if kind == "apcnet":
        return dict(type="APCHead", in_channels=last, in_index=3, channels=channels, pool_scales=(1, 2, 3, 6),
                    dropout_ratio=0.1)
    if kind == "encnet":
        return dict(type="EncHead", in_channels=[last // 4, last // 2, last], in_index=(1, 2, 3), channels=channels,
                    num_codes=32, use_se_loss=True, add_lateral=False, dropout_ratio=0.1)
    return dict(type="FCNHead", in_channels=last, in_index=3, channels=channels, num_convs=2, concat_input=True,
                dropout_ratio=0.1)


def _auxiliary_head(small: bool) -> dict[str, Any]:
    return dict(type="FCNHead", in_channels=256 if small else 1024, in_index=2, channels=64 if small else 256,
                num_convs=1, concat_input=False, dropout_ratio=0.1)


PRESETS: dict[str, dict[str, Any]] = {
    f"{kind}_r{depth}-d8": dict(
        backbone=_backbone(depth),
        decode_head=_decode_head(kind, small=depth == 18),
        auxiliary_head=_auxiliary_head(small=depth == 18),
        align_corners=False, decode_loss_weight=1.0, aux_loss_weight=0.4, se_loss_weight=0.2, ignore_index=255,
    )
    for kind in ("apcnet", "encnet", "fcn")
    for depth in (18, 50, 101)
}


def _ocrnet(depth: int) -> dict[str, Any]:
    """mmseg's configs/_base_/models/ocrnet_r50-d8.py: CascadeEncoderDecoder, FCNHead (layer3, loss 0.4) then
    OCRHead (layer4, loss 1.0), no auxiliary head. r18 shrinks the heads by mmseg's fcn_r18-d8 factor of 4."""
    small = depth == 18
    fcn = dict(_auxiliary_head(small))
    ocr = dict(type="OCRHead", in_channels=512 if small else 2048, in_index=3, channels=128 if small else 512,
               ocr_channels=64 if small else 256, dropout_ratio=0.1)
    return dict(segmentor="CascadeEncoderDecoder", backbone=_backbone(depth), decode_head=[fcn, ocr],
                auxiliary_head=None, align_corners=False, decode_loss_weight=(0.4, 1.0), aux_loss_weight=0.4,
                ignore_index=255)


def _acfnet(depth: int) -> dict[str, Any]:
    """ACFNet (fastctx.nn.acf_head): ACFHead on layer4 with mmseg's D8 ASPP dilations, the auxiliary FCNHead on
    layer3; losses final 1.0, coarse 0.4, auxiliary 0.4 (the choice is documented in fastctx.nn.acf_head)."""
    small = depth == 18
    channels = 128 if small else 512
    head = dict(type="ACFHead", in_channels=512 if small else 2048, in_index=3, channels=channels,
                acf_channels=channels, dilations=(1, 12, 24, 36), mode="paper", dropout_ratio=0.1)
    return dict(segmentor="CoarseToFineEncoderDecoder", backbone=_backbone(depth), decode_head=head,
                auxiliary_head=_auxiliary_head(small), align_corners=False, decode_loss_weight=1.0,
                coarse_loss_weight=0.4, aux_loss_weight=0.4, ignore_index=255)


PRESETS.update({f"{kind}_r{depth}-d8": build(depth) for kind, build in (("ocrnet", _ocrnet), ("acfnet", _acfnet))
                for depth in (18, 50, 101)})


# Swin variants (mmseg's swin configs; B with the 384-pixel pretraining's 12x12 windows, as ULLMC's Swin-B configs).
_SWIN = {"t": dict(embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7,
                   pretrain_img_size=224, drop_path_rate=0.3),
         "s": dict(embed_dims=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7,
                   pretrain_img_size=224, drop_path_rate=0.3),
         "b": dict(embed_dims=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12,
                   pretrain_img_size=384, drop_path_rate=0.3),
         "tiny": dict(embed_dims=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4,
                      pretrain_img_size=64, drop_path_rate=0.1)}


def _ullmc(variant: str) -> dict[str, Any]:
    """ULLMC on Swin-`variant`: the released configs' neck (channels of the first three stages, 4/8/16 heads,
    4x4 / 8x8 / 4x4 windows, MLP ratio 2) and decoder (384 wide, 8 heads per scale, 8x8 windows, 256-channel
    classifier input); auxiliary FCNHead on stage 3; OHEM(0.7, 100000) on the decode loss. The tiny variant
    shrinks every width for 64x64 CPU training."""
    tiny = variant == "tiny"
    swin = _SWIN[variant]
    dims = [swin["embed_dims"] * 2 ** i for i in range(4)]
    backbone = dict(swin, patch_size=4, mlp_ratio=4, strides=(4, 2, 1, 1), out_indices=(0, 1, 2, 3),
                    qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, use_abs_pos_embed=False)
    neck = dict(type="IIWANeck", in_channels=dims, channels=dims[:3], num_heads=(2, 2, 4) if tiny else (4, 8, 16),
                window_sizes=((4, 4), (4, 4), (4, 4)) if tiny else ((4, 4), (8, 8), (4, 4)), mlp_ratios=2.0,
                drop_path_rate=0.1, proj_drop=0.1)
    head = dict(type="IIWAHead", in_channels=dims[3], memory_channels=dims[:3], memory_strides=(2, 1, 1),
                embed_dims=64 if tiny else 384, channels=32 if tiny else 256, num_heads=2 if tiny else 8,
                window_size=(4, 4) if tiny else (8, 8), depth=1, mlp_ratio=4.0, drop_path_rate=0.2,
                dropout_ratio=0.1)
    aux = dict(type="FCNHead", in_channels=dims[3], in_index=3, channels=32 if tiny else 256, num_convs=1,
               concat_input=False, dropout_ratio=0.1)
    return dict(segmentor="ULLMC", backbone_type="SwinTransformer", backbone=backbone, neck=neck, decode_head=head,
                auxiliary_head=aux, align_corners=False, decode_loss_weight=1.0, aux_loss_weight=0.4,
                ohem=dict(thresh=0.7, min_kept=100000), ignore_index=255)


PRESETS.update({f"ullmc_swin-{variant}": _ullmc(variant) for variant in _SWIN})


def _upernet_swin(variant: str) -> dict[str, Any]:
    """mmseg's UPerNet on Swin-`variant` (configs/_base_/models/upernet_swin.py and the swin-tiny ADE20K config):
    strides (4, 2, 2, 2), UPerHead on the four stages (pool scales 1, 2, 3, 6; 512 wide), auxiliary FCNHead on
    stage 3 (256 wide, one conv, no input concat); losses decode 1.0, auxiliary 0.4."""
    swin = _SWIN[variant]
    dims = [swin["embed_dims"] * 2 ** i for i in range(4)]
    backbone = dict(swin, patch_size=4, mlp_ratio=4, strides=(4, 2, 2, 2), out_indices=(0, 1, 2, 3),
                    qkv_bias=True, drop_rate=0.0, attn_drop_rate=0.0, use_abs_pos_embed=False, patch_norm=True)
    head = dict(type="UPerHead", in_channels=dims, in_index=(0, 1, 2, 3), pool_scales=(1, 2, 3, 6), channels=512,
                dropout_ratio=0.1)
    aux = dict(type="FCNHead", in_channels=dims[2], in_index=2, channels=256, num_convs=1, concat_input=False,
               dropout_ratio=0.1)
    return dict(segmentor="EncoderDecoder", backbone_type="SwinTransformer", backbone=backbone, decode_head=head,
                auxiliary_head=aux, align_corners=False, decode_loss_weight=1.0, aux_loss_weight=0.4,
                ignore_index=255)


PRESETS["upernet_swin-t"] = _upernet_swin("t")
MODEL_NAMES: tuple[str, ...] = tuple(PRESETS)


def get_preset(name: str) -> dict[str, Any]:
    """A copy of the preset `name` (sections "backbone", "decode_head", "auxiliary_head" + segmentor options)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    return copy.deepcopy(PRESETS[name])


def _build(cls: type[nn.Module], section: str, options: dict[str, Any]) -> nn.Module:
    valid = [p for p in inspect.signature(cls.__init__).parameters if p != "self"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown {section} option(s) {unknown} for {cls.__name__}; valid: {', '.join(valid)}")
    return cls(**options)


def _build_head(section: str, options: dict[str, Any], num_classes: int, norm, align_corners: bool,
                fused: bool) -> nn.Module:
    options = dict(options)
    kind = options.pop("type", None)
    if kind not in HEADS:
        raise ValueError(f"{section} type must be one of {', '.join(HEADS)}, got {kind!r}")
    options.update(num_classes=num_classes, norm=norm, align_corners=align_corners)
    if section.startswith("decode_head") and "fused" in inspect.signature(HEADS[kind].__init__).parameters:
        options["fused"] = fused
    return _build(HEADS[kind], section, options)


def build_model(name: str, num_classes: int, fused: bool = True, norm: str | type[nn.Module] = "BN",
                pretrained: str | os.PathLike | None = None, **overrides: Any) -> EncoderDecoder:
    """Build the segmentor `name` (one of MODEL_NAMES), e.g. "apcnet_r50-d8".

    Args:
        name: preset name.
        num_classes: classes predicted by the decode and auxiliary heads.
        fused: run the decode head's fastctx kernels (APCHead, EncHead, OCRHead, ACFHead); FCNHead has none.
        norm: "BN" or "SyncBN" (mmseg's configs use SyncBN for multi-GPU training), for backbone and heads.
        pretrained: LOCAL checkpoint loaded with `load_pretrained` (an ImageNet
            backbone or a whole segmentor); no download.
        **overrides: `backbone=`, `decode_head=`, `auxiliary_head=` dicts
            merged into those sections (`auxiliary_head=None` drops the auxiliary
            head; for the cascade presets decode_head= is a list of one dict or
            None per stage), or segmentor options: align_corners (applied to the
            heads too), decode_loss_weight (one per stage for cascades),
            aux_loss_weight, se_loss_weight (EncNet), coarse_loss_weight (ACFNet),
            ignore_index.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    cfg = get_preset(name)
    unknown = sorted(set(overrides) - set(_SECTIONS) - set(_SEGMENTOR_OPTIONS))
    if unknown:
        raise TypeError(f"build_model got unknown override(s) {unknown}; "
                        f"valid: {', '.join(_SECTIONS + _SEGMENTOR_OPTIONS)}")
    for key, value in overrides.items():
        if key == "decode_head" and isinstance(cfg[key], list) and isinstance(value, (list, tuple)):
            # cascade presets: one dict (or None: unchanged) per stage
            if len(value) != len(cfg[key]) or any(v is not None and not isinstance(v, dict) for v in value):
                raise TypeError(f"override decode_head= of {name} must list one dict (or None) per stage "
                                f"({len(cfg[key])}), got {value!r}")
            cfg[key] = [{**stage, **(v or {})} for stage, v in zip(cfg[key], value)]
        elif key in _SECTIONS and value is not None:
            if not isinstance(value, dict):
                raise TypeError(f"override {key}= must be a dict of {key} options (or None), "
                                f"got {type(value).__name__}")
            if key == "backbone" and "type" in value:
                raise ValueError(f"the backbone of {name} is always {cfg.get('backbone_type', 'ResNetV1c')}; "
                                 "override its arguments only (e.g. backbone=dict(depth=...))")
            if key == "neck" and cfg.get("neck") is None:
                raise ValueError(f"{name} has no neck to override")
            if isinstance(cfg[key], list):
                raise TypeError(f"{name} has {len(cfg[key])} decode stages: override decode_head= with a list of "
                                "one dict (or None) per stage")
            cfg[key] = {**cfg[key], **value}
        else:
            if key == "decode_head":
                raise ValueError("decode_head cannot be None: every segmentor needs a decode head")
            cfg[key] = value
    align_corners = cfg["align_corners"]

    backbone_cls = BACKBONES[cfg.get("backbone_type", "ResNetV1c")]
    # Swin's norms are LayerNorms (norm_cfg); its window attention is what `fused` switches there
    extra = {"norm": norm} if backbone_cls is ResNetV1c else {"fused": fused}
    backbone = _build(backbone_cls, "backbone", {**cfg["backbone"], **extra})
    heads: dict[str, nn.Module | None] = {}
    for section in ("decode_head", "auxiliary_head"):
        options = cfg[section]
        if options is None:
            heads[section] = None
            continue
        if isinstance(options, list):  # cascade stages
            heads[section] = [_build_head(f"{section}.{i}", stage, num_classes, norm, align_corners, fused)
                              for i, stage in enumerate(options)]
        else:
            heads[section] = _build_head(section, options, num_classes, norm, align_corners, fused)

    segmentor = SEGMENTORS[cfg.get("segmentor", "EncoderDecoder")]
    options = {k: cfg[k] for k in _SEGMENTOR_OPTIONS if k in cfg}
    if cfg.get("neck") is not None:
        neck_options = dict(cfg["neck"])
        neck_type = neck_options.pop("type")
        options["neck"] = _build(NECKS[neck_type], "neck", {**neck_options, "fused": fused})
    model = _build(segmentor, "segmentor", dict(backbone=backbone, decode_head=heads["decode_head"],
                                                auxiliary_head=heads["auxiliary_head"], num_classes=num_classes,
                                                **options))
    if pretrained is not None:
        load_pretrained(model, pretrained)
    return model
