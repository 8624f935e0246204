"""Drop-in OCRNet modules (mmsegmentation 1.x `SpatialGatherModule`, `ObjectAttentionBlock`, `OCRHead`).

Parameter names, buffers and constructor arguments are mmseg's (conv_cfg,
norm_cfg, act_cfg and BaseDecodeHead's keywords, or fastctx's short `norm=` /
`act=`), so its state_dicts (and OCRNet checkpoints, see
fastctx.models.CascadeEncoderDecoder) load with strict=True. With the default
BatchNorm + ReLU:

  bottleneck.{conv,bn}.*                                   3x3, in_channels -> channels
  object_context_block.{query,key}_project.{0,1}.{conv,bn}.*  two 1x1 CBRs, channels -> ocr_channels
  object_context_block.value_project.{conv,bn}.*           1x1 CBR, channels -> ocr_channels
  object_context_block.out_project.{conv,bn}.*             1x1 CBR, ocr_channels -> channels
  object_context_block.bottleneck.{conv,bn}.*              1x1 CBR over cat[context, feats], 2*channels -> channels
  conv_seg.*

Maths (F = bottleneck(x) [B, C, N], P = the previous stage's logits [B, K, N]):
  gather      centre_k = sum_n softmax_n(scale * P_k)_n F_n                       [B, K, C]
  attention   a_nk = softmax_k(q_n . key_k / sqrt(ocr_channels)), q = query_project(F),
              key / value = key_project / value_project(centres)
              context_n = out_project(sum_k a_nk value_k)
  output      bottleneck(cat[context, F]) -> Dropout2d -> conv_seg

With `fused=False` every module runs mmseg's eager code line for line (the
[B, N, K] softmax maps and the permute copies included). With `fused=True`
(default):
  - the gather is `fastctx.ops.class_gather(F, P, "ocr", scale)`: one pass,
    no [B, K, N] softmax map, no [B, N, C] permute;
  - the attention is `fastctx.ops.class_attention(q, keys, values, None,
    ocr_channels**-0.5)`: per pixel softmax over K, no [B, N, K] map;
  - out_project's 1x1 conv is folded into the values: each pixel's attention
    sums to 1, so W (sum_k a_k v_k) + b = sum_k a_k (W v_k + b). That replaces
    an ocr_channels x channels x N GEMM by K x channels x N work and never
    materialises the ocr_channels-wide context.
The key / value projections run on the [B, C, K, 1] centres (K pixels), as
mmseg's, so their BatchNorm statistics are the same.

`scale` is mmseg's: any positive finite real (an int in mmseg's docstring,
but its code takes a float too). It is the gather's softmax temperature, and
ObjectAttentionBlock max-pools the query by it only when scale > 1. `scale > 1`
is accepted by the constructors (mmseg builds the same MaxPool2d(kernel_size=
scale) query downsample and the same parameters) but not by the forward:
mmseg's own ObjectAttentionBlock fails for it (it reshapes the downsampled
context to the full query size; a non-integral kernel even fails in
max_pool2d), so there is no reference behaviour to reproduce. The previous
stage's logits may have any number K >= 1 of channels, as in mmseg: only
conv_seg produces num_classes channels.
"""
from __future__ import annotations

import math
import numbers
import re
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..reference._args import is_int
from ._checks import check_input_dtype, check_positive_int
from .conv_module import UNSET, ConvModule, resolve_layer_args
from .decode_head import DecodeHead

__all__ = ["OCRHead", "ObjectAttentionBlock", "SpatialGatherModule", "convert_ocr"]


# ----------------------------------------------------------------------------- input checks

def check_map(t, channels: int | None, who: str, what: str, symbol: str = "C") -> None:
    """`t` is a floating-point [B, channels, H, W] tensor (any channel count, named `symbol`, when channels is None)."""
    want = f"[B, {channels if channels is not None else symbol}, H, W]"
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who} expects {what} as a tensor {want}, got {type(t).__name__}")
    if t.dim() != 4 or (channels is not None and t.shape[1] != channels):
        raise ValueError(f"{who} expects {what} of shape {want}, got {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{who} expects a floating-point {what}, got {t.dtype}")


def check_feats_probs(feats: torch.Tensor, probs: torch.Tensor, who: str, channels: int | None = None,
                      num_classes: int | None = None) -> None:
    """Features [B, C, H, W] and class scores [B, K, H, W] of the same batch and size, on one device."""
    check_map(feats, channels, who, "features")
    check_map(probs, num_classes, who, "class scores", "K")
    if probs.shape[0] != feats.shape[0] or probs.shape[2:] != feats.shape[2:]:
        raise ValueError(f"{who}: class scores {tuple(probs.shape)} must have the batch size and spatial size of "
                         f"the features {tuple(feats.shape)}")
    if probs.device != feats.device:
        raise ValueError(f"{who}: features on {feats.device} but class scores on {probs.device}")
    if probs.shape[1] < 1 or feats.shape[1] < 1:
        raise ValueError(f"{who}: need at least one class and one channel, got class scores "
                         f"{tuple(probs.shape)} and features {tuple(feats.shape)}")


def check_scale_arg(scale, who: str) -> int | float:
    """mmseg's OCR `scale` (gather temperature; query max-pool kernel when > 1): a positive finite real number,
    returned as an int when it is one, else as a float."""
    expected = "a positive finite number (the gather's softmax temperature, e.g. 1 or 0.5; > 1 also max-pools " \
               "the attention's query, which mmseg's forward cannot run)"
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{who}: scale must be {expected}, got {scale!r} ({type(scale).__name__})")
    if not math.isfinite(scale) or not scale > 0:
        raise ValueError(f"{who}: scale must be {expected}, got {scale!r}")
    return int(scale) if is_int(scale) else float(scale)


# ----------------------------------------------------------------------------- modules

class SpatialGatherModule(nn.Module):
    """OCR's class centres: per class, a softmax over the pixels of scale * probs weights the features.

    forward(feats [B, C, H, W], probs [B, K, H, W]) -> [B, C, K, 1] (mmseg's layout).
    """

    def __init__(self, scale, fused: bool = True):
        super().__init__()
        self.scale = check_scale_arg(scale, type(self).__name__)
        self.fused = fused

    def forward(self, feats: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        check_feats_probs(feats, probs, type(self).__name__)
        if self.fused:
            centres = ops.class_gather(feats, probs, "ocr", float(self.scale))  # [B, K, C]
            return centres.transpose(1, 2).unsqueeze(3)  # K x C values: the layout change is free
        # mmseg's eager maths
        batch_size, num_classes, height, width = probs.size()
        channels = feats.size(1)
        probs = probs.view(batch_size, num_classes, -1)
        feats = feats.view(batch_size, channels, -1)
        feats = feats.permute(0, 2, 1)
        probs = F.softmax(self.scale * probs, dim=2)
        ocr_context = torch.matmul(probs, feats)
        return ocr_context.permute(0, 2, 1).contiguous().unsqueeze(3)

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def _project(in_channels: int, channels: int, num_convs: int, layers: dict, inplace: bool = True) -> nn.Module:
    """mmseg's SelfAttentionBlock.build_project with ConvModules: one ConvModule, or a Sequential of num_convs."""
    convs = [ConvModule(in_channels, channels, 1, inplace=inplace, **layers)]
    convs += [ConvModule(channels, channels, 1, **layers) for _ in range(num_convs - 1)]
    return nn.Sequential(*convs) if len(convs) > 1 else convs[0]


def _norm_act(module: ConvModule, x: torch.Tensor) -> torch.Tensor:
    """What a ConvModule applies after its conv."""
    if module.with_norm:
        x = module.bn(x)
    return module.activate(x) if module.with_activation else x


class ObjectAttentionBlock(nn.Module):
    """OCR's object attention (mmseg's SelfAttentionBlock as OCR builds it) + the 1x1 fusion bottleneck.

    Args (mmseg's order):
        in_channels: channels of the pixel features and of the class centres (OCRHead's `channels`).
        channels: key / query / value channels (OCRHead's `ocr_channels`).
        scale: a positive real; > 1 builds mmseg's MaxPool2d query downsample, whose
            forward mmseg cannot run (see the module docstring), so use scale <= 1.
        conv_cfg, norm_cfg, act_cfg: mmseg's layer configs; `norm=` / `act=` are
            their short forms (fastctx.nn.ConvModule). Default BatchNorm + ReLU;
            norm_cfg=None builds convs with bias and no norm, as mmseg does.
        fused: run class_attention with out_project's conv folded into the values (True) or mmseg's eager code.
    forward(query_feats [B, in_channels, H, W], key_feats [B, in_channels, K, 1]) -> [B, in_channels, H, W].
    """

    def __init__(self, in_channels: int, channels: int, scale=1, conv_cfg: dict | None = None, norm_cfg=UNSET,
                 act_cfg=UNSET, *, norm=UNSET, act=UNSET, fused: bool = True):
        super().__init__()
        who = type(self).__name__
        self.in_channels = check_positive_int(in_channels, "in_channels", who)
        self.channels = check_positive_int(channels, "channels", who)
        self.scale = check_scale_arg(scale, who)
        self.fused = fused
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        layers = dict(norm=norm, act=act)
        self.key_in_channels = self.query_in_channels = self.out_channels = in_channels
        self.share_key_query, self.matmul_norm = False, True
        self.key_project = _project(in_channels, channels, 2, layers)
        self.query_project = _project(in_channels, channels, 2, layers)
        self.value_project = _project(in_channels, channels, 1, layers)
        # Out of place: without a norm, the fused path applies out_project's activation straight to
        # class_attention's output, which that op saves for its backward.
        self.out_project = _project(channels, in_channels, 1, layers, inplace=False)
        # mmseg's rule and module, kernel_size as given (it pools only for scale > 1)
        self.query_downsample = nn.MaxPool2d(kernel_size=self.scale) if self.scale > 1 else None
        self.key_downsample = None
        self.bottleneck = ConvModule(in_channels * 2, in_channels, 1, **layers)

    def check_scale(self) -> None:
        if self.query_downsample is not None:
            raise NotImplementedError(
                f"{type(self).__name__} with scale={self.scale}: mmseg's forward fails for scale > 1 (the "
                "downsampled context is reshaped to the full query size; a non-integral scale is not even a valid "
                "MaxPool2d kernel), so fastctx has no reference maths for it; use a scale <= 1 (e.g. 1 or 0.5)")

    def _check(self, query_feats, key_feats) -> None:
        who = type(self).__name__
        self.check_scale()
        check_map(query_feats, self.in_channels, who, "query features")
        check_map(key_feats, self.in_channels, who, "class centres")
        check_input_dtype(query_feats, self, who)
        if key_feats.shape[0] != query_feats.shape[0]:
            raise ValueError(f"{who}: class centres {tuple(key_feats.shape)} and query features "
                             f"{tuple(query_feats.shape)} have different batch sizes")

    def forward(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        self._check(query_feats, key_feats)
        if not self.fused:
            context = self._eager_context(query_feats, key_feats)
            return self.bottleneck(torch.cat([context, query_feats], dim=1))
        query = self.query_project(query_feats)                          # [B, Cq, H, W]
        keys = self.key_project(key_feats).flatten(2).transpose(1, 2)    # [B, K, Cq]
        values = self.value_project(key_feats).flatten(2).transpose(1, 2)  # [B, K, Cq]
        # out_project's conv commutes with the attention's convex combination (weights summing to 1):
        # conv(sum_k a_k v_k) = sum_k a_k conv(v_k), its bias included.
        out_conv = self.out_project.conv
        values = F.linear(values, out_conv.weight.flatten(1), out_conv.bias)  # [B, K, C]
        context = ops.class_attention(query, keys.contiguous(), values.contiguous(), None, self.channels ** -0.5)
        context = _norm_act(self.out_project, context)
        # One conv over the concat: on CPU it measured faster than two convs on the weight's halves.
        return self.bottleneck(torch.cat([context, query_feats], dim=1))

    def _eager_context(self, query_feats: torch.Tensor, key_feats: torch.Tensor) -> torch.Tensor:
        """mmseg's SelfAttentionBlock.forward (no downsampling)."""
        batch_size = query_feats.size(0)
        query = self.query_project(query_feats)
        query = query.reshape(*query.shape[:2], -1)
        query = query.permute(0, 2, 1).contiguous()
        key = self.key_project(key_feats)
        value = self.value_project(key_feats)
        key = key.reshape(*key.shape[:2], -1)
        value = value.reshape(*value.shape[:2], -1)
        value = value.permute(0, 2, 1).contiguous()
        sim_map = torch.matmul(query, key)
        sim_map = (self.channels ** -.5) * sim_map
        sim_map = F.softmax(sim_map, dim=-1)
        context = torch.matmul(sim_map, value)
        context = context.permute(0, 2, 1).contiguous()
        context = context.reshape(batch_size, -1, *query_feats.shape[2:])
        return self.out_project(context)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, channels={self.channels}, scale={self.scale}, fused={self.fused}"


class OCRHead(DecodeHead):
    """OCRNet's decode head (mmseg `OCRHead`), the second stage of a CascadeEncoderDecoder.

    Args (mmseg's names):
        ocr_channels: key / query / value channels of the object attention (256).
        scale: softmax temperature of the gather (any positive real, e.g. 1 or 0.5)
            and query downsampling of the attention when > 1, which mmseg's
            forward cannot run (see the module docstring).
        in_channels: backbone channels used (2048); a list with input_transform="resize_concat".
        channels: channels inside the head (512).
        num_classes: output classes.
        dropout_ratio: Dropout2d before conv_seg (0: none).
        conv_cfg, norm_cfg, act_cfg: mmseg's layer configs; `norm=` / `act=` are
            their short forms (fastctx.nn.ConvModule). Default BatchNorm + ReLU
            (mmseg's own default is norm_cfg=None: convs with bias, no norm).
        in_index: which backbone feature(s) to use.
        input_transform: None (one feature) or "resize_concat" (features resized
            bilinearly to the first one's size and concatenated, as HRNet's configs).
        align_corners: of those resizes and of the segmentor's logit resizes.
        out_channels, threshold, loss_decode, ignore_index, sampler, init_cfg:
            mmseg's BaseDecodeHead arguments, accepted for what fastctx builds
            (see fastctx.nn.decode_head).
        fused: run the gather and attention with fastctx's ops (True) or mmseg's eager maths.
    forward(inputs, prev_output) -> logits [B, num_classes, H, W]: `inputs` is the
    list of backbone features (or one tensor), `prev_output` the previous stage's
    logits [B, K, H, W] at the feature's size, K >= 1 of any value (the gather
    softmaxes over its channels; only conv_seg uses num_classes), as in mmseg.
    """

    def __init__(self, ocr_channels: int, scale=1, *, in_channels=2048, channels: int = 512, num_classes: int = 19,
                 dropout_ratio: float = 0.1, conv_cfg: dict | None = None, norm_cfg=UNSET, act_cfg=UNSET,
                 norm=UNSET, act=UNSET, in_index=-1, input_transform: str | None = None,
                 align_corners: bool = False, out_channels: int | None = None, threshold=None, loss_decode=None,
                 ignore_index: int = 255, sampler=None, init_cfg=None, fused: bool = True):
        super().__init__(channels, num_classes, dropout_ratio, align_corners, out_channels=out_channels,
                         threshold=threshold, loss_decode=loss_decode, ignore_index=ignore_index, sampler=sampler,
                         init_cfg=init_cfg)
        who = type(self).__name__
        self.in_channels = init_inputs(in_channels, in_index, input_transform, who)
        self.in_index, self.input_transform = in_index, input_transform
        self.ocr_channels = check_positive_int(ocr_channels, "ocr_channels", who)
        self.scale = check_scale_arg(scale, who)
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg, who)
        self.conv_cfg, self.norm_cfg, self.act_cfg = conv_cfg, norm, act
        self.object_context_block = ObjectAttentionBlock(channels, ocr_channels, self.scale, conv_cfg, norm, act,
                                                         fused=fused)
        self.spatial_gather_module = SpatialGatherModule(self.scale, fused=fused)
        self.bottleneck = ConvModule(self.in_channels, channels, 3, padding=1, norm=norm, act=act)

    @property
    def fused(self) -> bool:
        return self.object_context_block.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.object_context_block.fused = self.spatial_gather_module.fused = bool(value)

    def _transform_inputs(self, inputs) -> torch.Tensor:
        return transform_inputs(self, inputs)

    def forward(self, inputs, prev_output: torch.Tensor) -> torch.Tensor:
        x = self._transform_inputs(inputs)
        # any number of classes in prev_output, as mmseg (the gather softmaxes over its channels)
        check_feats_probs(x, prev_output, type(self).__name__, self.in_channels)
        check_input_dtype(x, self, type(self).__name__)
        self.object_context_block.check_scale()
        feats = self.bottleneck(x)
        context = self.spatial_gather_module(feats, prev_output)
        object_context = self.object_context_block(feats, context)
        return self.cls_seg(object_context)

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, channels={self.channels}, ocr_channels={self.ocr_channels}, "
                f"num_classes={self.num_classes}, in_index={self.in_index}, input_transform={self.input_transform}")


def init_inputs(in_channels, in_index, input_transform, who: str) -> int:
    """mmseg's BaseDecodeHead._init_inputs for the transforms giving one tensor: the channels the head sees."""
    if input_transform is None:
        if not isinstance(in_channels, int) or not isinstance(in_index, int):
            raise TypeError(f"{who} without input_transform uses one feature: in_channels and in_index must be "
                            f"ints, got {in_channels!r} and {in_index!r}")
        return in_channels
    if input_transform != "resize_concat":
        raise ValueError(f"{who} input_transform must be None or 'resize_concat' (the head takes one tensor), "
                         f"got {input_transform!r}")
    if not isinstance(in_channels, Sequence) or not isinstance(in_index, Sequence) or \
            len(in_channels) != len(in_index):
        raise ValueError(f"{who} with input_transform='resize_concat' needs lists in_channels and in_index of one "
                         f"length, got {in_channels!r} and {in_index!r}")
    return int(sum(in_channels))


def transform_inputs(head: nn.Module, inputs) -> torch.Tensor:
    """mmseg's BaseDecodeHead._transform_inputs for input_transform None / "resize_concat"."""
    who = type(head).__name__
    if isinstance(inputs, torch.Tensor) and head.input_transform is None:
        return inputs
    if not isinstance(inputs, (list, tuple)):
        raise TypeError(f"{who} expects the list of backbone features (or one tensor), got {type(inputs).__name__}")
    indices = [head.in_index] if head.input_transform is None else list(head.in_index)
    try:
        feats = [inputs[i] for i in indices]
    except IndexError:
        raise ValueError(f"{who} in_index {head.in_index} is out of range for {len(inputs)} backbone features") \
            from None
    if head.input_transform is None:
        return feats[0]
    for f in feats:
        check_map(f, None, who, "backbone features")
    size = feats[0].shape[2:]
    return torch.cat([F.interpolate(f, size=size, mode="bilinear", align_corners=head.align_corners)
                      if f.shape[2:] != size else f for f in feats], dim=1)


# ----------------------------------------------------------------------------- conversion of mmseg modules

def _structure_mismatch(new: nn.Module, old: nn.Module) -> str | None:
    """Why `old` computes something else than `new` with the same state_dict, or None if it does not.

    Every submodule of `new` must exist in `old` with the same children (the
    root may have more, e.g. mmseg's loss_decode), convs with the same geometry
    and bias, BatchNorms of a kind fastctx builds, and other leaves (activations,
    pooling, dropout) of the same type and settings.
    """
    old_modules = dict(old.named_modules())
    for name, sub in new.named_modules():
        where = name or "<root>"
        theirs = old_modules.get(name)
        if theirs is None:
            return f"has no submodule {where}"
        ours_children, their_children = set(dict(sub.named_children())), set(dict(theirs.named_children()))
        if name and ours_children != their_children:
            return f"{where} has submodules {sorted(their_children)}, expected {sorted(ours_children)}"
        if isinstance(sub, nn.Conv2d):
            if type(theirs) is not nn.Conv2d:  # subclasses (weight standardisation...) compute something else
                return f"{where} is {type(theirs).__qualname__}, expected torch.nn.Conv2d"
            for attr in ("kernel_size", "stride", "padding", "dilation", "groups", "padding_mode"):
                if getattr(theirs, attr) != getattr(sub, attr):
                    return f"{where} has {attr}={getattr(theirs, attr)}, expected {getattr(sub, attr)}"
            if (theirs.bias is None) != (sub.bias is None):
                return f"{where} {'has a' if theirs.bias is not None else 'has no'} bias"
        elif isinstance(sub, nn.modules.batchnorm._BatchNorm):
            if type(theirs) not in (nn.BatchNorm2d, nn.SyncBatchNorm) and not isinstance(theirs, type(sub)):
                return f"{where} is {type(theirs).__qualname__}, expected BatchNorm2d or SyncBatchNorm"
            if theirs.affine != sub.affine or theirs.track_running_stats != sub.track_running_stats:
                return f"{where} has affine={theirs.affine}, track_running_stats={theirs.track_running_stats}"
        elif isinstance(sub, ConvModule):
            if tuple(getattr(theirs, "order", ("conv", "norm", "act"))) != ("conv", "norm", "act"):
                return f"{where} applies its layers in order {theirs.order}, expected conv, norm, act"
            if getattr(theirs, "with_explicit_padding", False) or getattr(theirs, "with_spectral_norm", False):
                return f"{where} uses explicit padding or spectral norm"
        elif isinstance(sub, SpatialGatherModule):
            if type(theirs).__name__ != "SpatialGatherModule" or theirs.scale != sub.scale:
                return f"{where} is {type(theirs).__name__} (scale {getattr(theirs, 'scale', None)}), expected " \
                       f"SpatialGatherModule(scale={sub.scale})"
        elif not ours_children and (type(theirs) is not type(sub) or _leaf_repr(theirs) != _leaf_repr(sub)):
            return f"{where} is {theirs!r}, expected {sub!r}"  # torch.nn leaves: activations, pooling, dropout
    return None


def _leaf_repr(module: nn.Module) -> str:
    """A leaf module's repr without `inplace=True`: working in place does not change what it computes."""
    return re.sub(r",?\s*inplace=True", "", repr(module))


def _layer_args(module: nn.Module) -> dict:
    """fastctx's norm= / act= for the ConvModules of an mmseg module (all must agree)."""
    specs = set()
    for m in module.modules():
        if type(m).__name__ != "ConvModule":
            continue
        bn = getattr(m, m.norm_name) if getattr(m, "with_norm", False) else None
        if bn is not None and not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"uses {type(bn).__name__} layers; fastctx builds BatchNorm / SyncBatchNorm")
        norm = None if bn is None else "SyncBN" if isinstance(bn, nn.SyncBatchNorm) else "BN"
        activation = getattr(m, "activate", None) if getattr(m, "with_activation", False) else None
        specs.add((norm, None if activation is None else type(activation)))
    if len(specs) != 1:
        raise ValueError(f"its ConvModules mix norm / activation types {sorted(map(str, specs))}; fastctx builds one "
                         "kind for the whole module")
    norm, act = specs.pop()
    return dict(norm=norm, act=act)


def convert_ocr(module: nn.Module, fused: bool = True) -> nn.Module:
    """The fastctx module computing what an mmseg `SpatialGatherModule`, `ObjectAttentionBlock` or
    `OCRHead` computes, holding the very same parameter and buffer tensors.

    The configuration (channels, scale, norm, in_index, input transform,
    dropout, align_corners) is read off the module; the structure (conv
    kernels, biases, norm and activation types) is checked against fastctx's.
    Raises fastctx.convert's "not convertible" exception (what `convert()`
    reports as skipped) with the reason when the module differs.

    Inside an mmseg segmentor, converting the OCRHead's two children keeps
    mmseg's head (its loss and predict) and already runs every fused op; a
    whole converted OCRHead is fastctx's head (forward only, no mmseg loss).
    """
    from ..convert import _NotConvertible, _take_over  # convert imports fastctx.nn: import when called

    kind = type(module).__name__
    try:
        if kind == "SpatialGatherModule":
            if list(module.children()) or list(module.parameters()) or list(module.buffers()):
                raise ValueError("has submodules, parameters or buffers; mmseg's has none")
            return SpatialGatherModule(module.scale, fused=fused)
        if kind == "ObjectAttentionBlock":
            in_channels = module.bottleneck.conv.out_channels
            channels = module.value_project.conv.out_channels
            downsample = module.query_downsample
            scale = 1 if downsample is None else downsample.kernel_size
            with torch.device("meta"):
                new = ObjectAttentionBlock(in_channels, channels, scale, **_layer_args(module), fused=fused)
        elif kind == "OCRHead":
            if module.input_transform is not None:
                raise ValueError(f"uses input_transform={module.input_transform!r}, whose per-feature channels mmseg "
                                 "does not keep; convert its SpatialGatherModule and ObjectAttentionBlock instead")
            if module.conv_seg.out_channels != module.num_classes:
                raise ValueError(f"predicts {module.conv_seg.out_channels} channels for {module.num_classes} classes "
                                 "(mmseg's binary out_channels=1 mode); fastctx's head has one logit per class")
            if module.object_context_block.query_downsample is not None:
                raise ValueError("has scale > 1, which mmseg's forward cannot run")
            dropout = module.dropout.p if getattr(module, "dropout", None) is not None else 0.0
            with torch.device("meta"):
                new = OCRHead(module.ocr_channels, module.scale, in_channels=module.in_channels,
                              channels=module.channels, num_classes=module.num_classes, dropout_ratio=dropout,
                              in_index=module.in_index, align_corners=module.align_corners,
                              **_layer_args(module), fused=fused)
        else:
            raise ValueError(f"is a {kind}, not an mmseg SpatialGatherModule, ObjectAttentionBlock or OCRHead")
        reason = _structure_mismatch(new, module)
        if reason is not None:
            raise ValueError(reason)
    except (AttributeError, TypeError, ValueError) as exc:
        raise _NotConvertible(str(exc)) from None
    _take_over(new, module)
    return new

