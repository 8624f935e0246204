"""mmsegmentation plugin: fastctx's heads and Swin backbone in mmseg's model registry, and fused segmentors.

Importing this module (mmsegmentation 1.x with mmengine and mmcv installed)
registers, in an mmengine registry of scope ``fastctx``:

  fastctx.APCHead, fastctx.EncHead, fastctx.OCRHead   mmseg's heads on fastctx's fused kernels
  fastctx.ACFHead                                      ACFNet's head (logits and coarse logits, both supervised)
  fastctx.SwinTransformer                              mmseg's Swin backbone on the fused window attention
  fastctx.EncoderDecoder, fastctx.CascadeEncoderDecoder
                                                       mmseg's segmentors, fused by `fuse_segmentor` once built

so an mmseg config switches with

    custom_imports = dict(imports=['fastctx.mmseg'], allow_failed_imports=False)
    model = dict(decode_head=dict(type='fastctx.APCHead'))     # one head, or
    model = dict(type='fastctx.EncoderDecoder')                # the whole model

(docs/mmseg.md). Each head class derives from fastctx's module *and* from
mmseg's class of the same name (ACFHead: from BaseDecodeHead), in that order:
fastctx's constructor builds the layers (mmseg's parameter names, so mmseg
checkpoints load strictly) and its `forward` runs the fused kernels, while
`loss`, `predict`, `loss_by_feat`, `predict_by_feat`, `init_weights` and the
loss / sampler objects are mmseg's own, built from the head's config. mmseg's
constructor is never run (`_NoMMSegInit` ends fastctx's `super().__init__()`
chain at mmengine's BaseModule), so the layers exist once.

The constructors take mmseg's arguments with mmseg's defaults (notably
``norm_cfg=None``: convs with bias and no norm, as mmseg builds them), plus
``fused`` (False: mmseg's eager maths with the same weights).
"""
from __future__ import annotations

import copy

try:
    import mmseg
    from mmengine.logging import print_log
    from mmengine.model import BaseModule
    from mmengine.registry import MODELS as MMENGINE_MODELS
    from mmengine.registry import Registry
except ImportError as exc:
    raise ImportError(
        "fastctx.mmseg registers fastctx's modules into mmsegmentation's model registry: it needs "
        "mmsegmentation 1.x with mmengine and mmcv installed (pip install 'mmsegmentation>=1.0' mmengine mmcv); "
        f"importing them failed: {exc}. Without mmsegmentation use fastctx.nn, fastctx.models or fastctx.convert."
    ) from exc

if int(mmseg.__version__.split(".")[0]) < 1:
    raise ImportError(f"fastctx.mmseg needs mmsegmentation 1.x (mmengine's registries), found {mmseg.__version__}")

try:
    from mmseg.models.backbones.swin import SwinTransformer as _MMSegSwinTransformer
    from mmseg.models.decode_heads.apc_head import APCHead as _MMSegAPCHead
    from mmseg.models.decode_heads.decode_head import BaseDecodeHead
    from mmseg.models.decode_heads.enc_head import EncHead as _MMSegEncHead
    from mmseg.models.decode_heads.ocr_head import OCRHead as _MMSegOCRHead
    from mmseg.models.segmentors import CascadeEncoderDecoder as _MMSegCascadeEncoderDecoder
    from mmseg.models.segmentors import EncoderDecoder as _MMSegEncoderDecoder
    from mmseg.models.utils import resize
    from mmseg.registry import MODELS as MMSEG_MODELS
    from mmseg.registry import TASK_UTILS as MMSEG_TASK_UTILS
except ImportError as exc:
    raise ImportError(
        f"fastctx.mmseg: mmsegmentation {mmseg.__version__} is installed but its models do not import ({exc}). "
        "mmseg's models import mmcv's compiled ops: install the full mmcv matching your torch, not mmcv-lite."
    ) from exc

import torch.nn as nn

from . import nn as fnn
from .convert import ConversionReport, convert
from .models.swin import SwinTransformer as _SwinTransformer

__all__ = ["ACFHead", "APCHead", "CascadeEncoderDecoder", "EncHead", "EncoderDecoder", "MODELS", "OCRHead",
           "SwinTransformer", "fuse_segmentor"]

# The registry of scope "fastctx", a child of mmengine's root registry: `type='fastctx.X'` resolves from
# mmseg's registry and from the root alike, and `type='X'` keeps meaning mmseg's X.
MODELS = Registry("model", parent=MMENGINE_MODELS, scope="fastctx")

# mmseg's BaseDecodeHead defaults.
_CE_LOSS = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
_HEAD_INIT = dict(type="Normal", std=0.01, override=dict(name="conv_seg"))


class _NoMMSegInit:
    """Stands between a fastctx module and an mmseg base class in a plugin class's MRO.

    fastctx's constructors end in `super().__init__()`; here that chain stops
    at mmengine's BaseModule (and nn.Module) instead of running mmseg's
    constructor, which would build a second set of layers.
    """

    def __init__(self):
        BaseModule.__init__(self, init_cfg=None)


def _build_losses(cfg):
    """A loss module from an mmseg loss config, or a ModuleList from a list of them (mmseg's loss_decode rule)."""
    if isinstance(cfg, dict):
        return MMSEG_MODELS.build(cfg)
    if isinstance(cfg, (list, tuple)):
        return nn.ModuleList(MMSEG_MODELS.build(c) for c in cfg)
    raise TypeError(f"loss_decode must be a dict or a sequence of dicts, got {type(cfg).__name__}")


def _attach_mmseg_parts(head: nn.Module, loss_decode, sampler, init_cfg, input_transform) -> None:
    """What mmseg's BaseDecodeHead.__init__ sets beyond the layers: losses, sampler, init_cfg, input transform."""
    head.input_transform = input_transform
    head.threshold = None  # fastctx's heads predict one logit per class (no binary out_channels=1 form)
    head.loss_decode = _build_losses(loss_decode)
    head.sampler = MMSEG_TASK_UTILS.build(sampler, default_args=dict(context=head)) if sampler is not None else None
    head.init_cfg = copy.deepcopy(init_cfg)


@MODELS.register_module()
class APCHead(fnn.APCHead, _NoMMSegInit, _MMSegAPCHead):
    """mmseg's APCHead on fastctx's fused ACM kernels (fastctx.nn.APCHead), with mmseg's loss and predict."""

    def __init__(self, pool_scales=(1, 2, 3, 6), fusion: bool = True, *, in_channels, channels, num_classes,
                 norm_cfg=None, input_transform=None, loss_decode=_CE_LOSS, sampler=None, init_cfg=_HEAD_INIT,
                 fused: bool = True, **kwargs):
        super().__init__(in_channels, channels, num_classes, pool_scales=pool_scales, fusion=fusion,
                         norm_cfg=norm_cfg, input_transform=input_transform, fused=fused, **kwargs)
        _attach_mmseg_parts(self, loss_decode, sampler, init_cfg, input_transform)


@MODELS.register_module()
class EncHead(fnn.EncHead, _NoMMSegInit, _MMSegEncHead):
    """mmseg's EncHead on fastctx's fused Encoding kernel (fastctx.nn.EncHead), with mmseg's losses (CE + SE)."""

    def __init__(self, num_codes: int = 32, use_se_loss: bool = True, add_lateral: bool = False, *, in_channels,
                 channels, num_classes, in_index, norm_cfg=None, loss_decode=_CE_LOSS,
                 loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.2), sampler=None,
                 init_cfg=_HEAD_INIT, fused: bool = True, **kwargs):
        super().__init__(in_channels, channels, num_classes, num_codes=num_codes, use_se_loss=use_se_loss,
                         add_lateral=add_lateral, in_index=in_index, norm_cfg=norm_cfg, fused=fused, **kwargs)
        # mmseg's EncHead selects its features as a list (input_transform='multiple_select').
        _attach_mmseg_parts(self, loss_decode, sampler, init_cfg, "multiple_select")
        if use_se_loss:
            self.loss_se_decode = MMSEG_MODELS.build(loss_se_decode)


@MODELS.register_module()
class OCRHead(fnn.OCRHead, _NoMMSegInit, _MMSegOCRHead):
    """mmseg's OCRHead (a cascade stage) on fastctx's fused class gather and class attention."""

    def __init__(self, ocr_channels: int, scale=1, *, in_channels, channels, num_classes, norm_cfg=None,
                 input_transform=None, loss_decode=_CE_LOSS, sampler=None, init_cfg=_HEAD_INIT, fused: bool = True,
                 **kwargs):
        super().__init__(ocr_channels, scale, in_channels=in_channels, channels=channels, num_classes=num_classes,
                         norm_cfg=norm_cfg, input_transform=input_transform, fused=fused, **kwargs)
        _attach_mmseg_parts(self, loss_decode, sampler, init_cfg, input_transform)


@MODELS.register_module()
class ACFHead(fnn.ACFHead, _NoMMSegInit, BaseDecodeHead):
    """ACFNet's head (fastctx.nn.ACFHead) as an mmseg decode head, for mmseg's EncoderDecoder.

    `forward` returns (logits, coarse logits). `loss_by_feat` supervises both:
    `loss_decode` on the logits (key `loss_ce`) and `loss_coarse_decode` on
    the coarse logits (default CrossEntropyLoss with weight 0.4, key
    `loss_coarse`: the weight of a deep-supervision head, as fastctx's ACFNet
    presets), each with its own pixel sampler draw when a sampler is set.
    `predict` returns the final logits. fastctx's defaults apply where mmseg has
    no ACFHead to follow (BatchNorm; the ACF module needs a norm).
    """

    def __init__(self, acf_channels: int = 512, dilations=(1, 12, 24, 36), mode: str = "paper", *, in_channels,
                 channels, num_classes, input_transform=None, loss_decode=_CE_LOSS,
                 loss_coarse_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4,
                                         loss_name="loss_coarse"),
                 sampler=None,
                 init_cfg=dict(type="Normal", std=0.01, override=[dict(name="conv_seg"), dict(name="conv_seg_coarse")]),
                 fused: bool = True, **kwargs):
        super().__init__(acf_channels, dilations, mode, in_channels=in_channels, channels=channels,
                         num_classes=num_classes, input_transform=input_transform, fused=fused, **kwargs)
        _attach_mmseg_parts(self, loss_decode, sampler, init_cfg, input_transform)
        self.loss_coarse_decode = _build_losses(loss_coarse_decode)

    def _supervise(self, losses: dict, logits, seg_label, loss_modules) -> None:
        """mmseg's BaseDecodeHead.loss_by_feat for one set of logits: resize, sample, add each loss under its name."""
        logits = resize(logits, size=seg_label.shape[2:], mode="bilinear", align_corners=self.align_corners)
        weight = self.sampler.sample(logits, seg_label) if self.sampler is not None else None
        label = seg_label.squeeze(1)
        for loss in loss_modules if isinstance(loss_modules, nn.ModuleList) else [loss_modules]:
            value = loss(logits, label, weight=weight, ignore_index=self.ignore_index)
            losses[loss.loss_name] = losses[loss.loss_name] + value if loss.loss_name in losses else value

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        logits, coarse = seg_logits
        losses = super().loss_by_feat(logits, batch_data_samples)
        self._supervise(losses, coarse, self._stack_batch_gt(batch_data_samples), self.loss_coarse_decode)
        return losses

    def predict(self, inputs, batch_img_metas, test_cfg):
        return self.predict_by_feat(self.forward(inputs)[0], batch_img_metas)


@MODELS.register_module()
class SwinTransformer(_SwinTransformer, _NoMMSegInit, _MMSegSwinTransformer):
    """mmseg's SwinTransformer on fastctx's fused window attention (fastctx.models.SwinTransformer).

    Takes mmseg's arguments, including `pretrained` / `init_cfg=dict(type='Pretrained', checkpoint=...)`:
    `init_weights` loads such a checkpoint exactly as mmseg does (the `backbone.` prefix stripped, position
    bias tables resized, non-strict).
    """

    def __init__(self, *args, pretrained=None, init_cfg=None, fused: bool = True, **kwargs):
        if init_cfg and pretrained:
            raise ValueError("SwinTransformer: give init_cfg or pretrained, not both")
        if pretrained is not None and not isinstance(pretrained, str):
            raise TypeError(f"SwinTransformer: pretrained must be a checkpoint path (str) or None, got "
                            f"{type(pretrained).__name__}")
        super().__init__(*args, fused=fused, **kwargs)
        self.init_cfg = dict(type="Pretrained", checkpoint=pretrained) if pretrained else copy.deepcopy(init_cfg)

    def init_weights(self) -> None:
        if self.init_cfg is None:  # fastctx's is mmseg's initialisation, without mmseg's log line
            _SwinTransformer.init_weights(self)
        else:
            _MMSegSwinTransformer.init_weights(self)


# ----------------------------------------------------------------------------- whole-model conversion

def fuse_segmentor(model: nn.Module) -> ConversionReport:
    """Run every fused kernel fastctx has for the mmseg modules in `model`, in place, keeping every tensor.

    This is `fastctx.convert`: APCNet's ACMs (and APCHead's scale loop as one
    fused call), EncNet's Encoding layers, each mmseg OCRHead's gather and
    attention modules (the head itself, with its loss and predict, stays
    mmseg's) and each Swin block's ShiftWindowMSA. Parameters and buffers are
    the same tensors under the same keys, so mmseg checkpoints still load
    strictly. Returns what was replaced and skipped.
    """
    _, report = convert(model, inplace=True, return_report=True)
    return report


class _Fused:
    """Segmentor mixin: once mmseg's constructor has built the model, fuse it and log what changed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fastctx_report = fuse_segmentor(self)
        print_log(str(self.fastctx_report), logger="current")


@MODELS.register_module()
class EncoderDecoder(_Fused, _MMSegEncoderDecoder):
    """mmseg's EncoderDecoder, built from the same config and then fused by `fuse_segmentor`."""


@MODELS.register_module()
class CascadeEncoderDecoder(_Fused, _MMSegCascadeEncoderDecoder):
    """mmseg's CascadeEncoderDecoder (OCRNet), built from the same config and then fused by `fuse_segmentor`."""
