"""`fastctx.convert`: swap the context modules of any model for fastctx's fused ones.

Walks an arbitrary `nn.Module` tree and replaces

* every Adaptive Context Module (APCNet's `ACM`) by `fastctx.nn.ACM`,
* every Encoding layer (EncNet's `Encoding`) by `fastctx.nn.Encoding`,

recognised by structure -- the class name plus the exact layout of
submodules, parameters and buffers mmsegmentation gives them -- without
importing mmsegmentation. The new modules take over the very parameter and
buffer tensors of the old ones (a strict `load_state_dict(..., assign=True)`),
so state_dict keys, values, devices, dtypes, `requires_grad` flags and an
optimizer's references to the parameters are unchanged. Their configuration
(pool scale, fusion, channels, norm type, number of codewords) is read off the
modules themselves.

The surrounding model is left as it is: an mmsegmentation `EncoderDecoder`
keeps its heads, losses, `predict`, data samples and so on. An mmseg-style
`APCHead` additionally has its multi-scale loop over the ACMs routed through
`fastctx.nn.apc_head.fused_acm_forward` (all pool scales in one set of fused
ops): its class becomes a subclass (`FusedAPCHead`) whose `forward` is mmseg's
with that loop replaced, so `isinstance` checks and every other method still
apply.

A module with a recognised class name but a different layout (other layers,
another activation, a norm other than BatchNorm, a conv bias next to a
norm...) is left alone and reported as skipped, with the reason. Convs with a
bias and no norm, as mmseg builds them with norm_cfg=None, are converted.
"""
from __future__ import annotations

import copy
import logging
import math
from typing import NamedTuple

import torch
import torch.nn as nn

from .nn import (ACM, IIWA, APCHead, EncHead, EncModule, Encoding, ObjectAttentionBlock, OCRHead, ShiftWindowMSA,
                 SpatialGatherModule, WindowMSA, convert_ocr, convert_window_msa)
from .nn.apc_head import fused_acm_forward

__all__ = ["ConversionReport", "FusedAPCHead", "Replaced", "Skipped", "convert", "fused_apc_class"]

logger = logging.getLogger(__name__)

# fastctx modules are left as they are (and not searched: nothing below them to convert).
_FASTCTX_MODULES = (ACM, APCHead, Encoding, EncModule, EncHead, SpatialGatherModule, ObjectAttentionBlock, OCRHead,
                    WindowMSA, ShiftWindowMSA, IIWA)
# The sub-layers of an ACM, all mmcv-style ConvModules (1x1 conv, BatchNorm, ReLU) except `gla`.
_ACM_CONV_MODULES = ("pooled_redu_conv", "input_redu_conv", "global_info", "residual_conv")


class Replaced(NamedTuple):
    """A module that `convert` replaced: qualified name, old class, new class."""

    name: str
    old_class: str
    new_class: str


class Skipped(NamedTuple):
    """A module whose class name matched but that `convert` left alone, and why."""

    name: str
    module_class: str
    reason: str


class ConversionReport(NamedTuple):
    """What `convert` did: `replaced` and `skipped` modules, in traversal order."""

    replaced: list[Replaced]
    skipped: list[Skipped]

    def __str__(self) -> str:
        lines = [f"fastctx.convert: {len(self.replaced)} module(s) replaced, {len(self.skipped)} skipped"]
        lines += [f"  replaced {r.name or '<root>'}: {r.old_class} -> {r.new_class}" for r in self.replaced]
        lines += [f"  skipped  {s.name or '<root>'} ({s.module_class}): {s.reason}" for s in self.skipped]
        return "\n".join(lines)


def _class_name(obj) -> str:
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


class _NotConvertible(Exception):
    """The module looks like a known one by name but its layout differs; the message says how."""


# ----------------------------------------------------------------------------- structure checks

def _child(module: nn.Module, name: str) -> nn.Module:
    child = getattr(module, name, None)
    if not isinstance(child, nn.Module):
        raise _NotConvertible(f"has no submodule {name!r}")
    return child


def _check_conv(conv, where: str, in_channels: int | None, out_channels: int | None, bias: bool) -> nn.Conv2d:
    # Exact type: subclasses (weight standardisation, spectral norm wrappers...) compute something else.
    if type(conv) is not nn.Conv2d:
        raise _NotConvertible(f"{where} is {_class_name(conv)}, expected torch.nn.Conv2d")
    if conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.padding != (0, 0) or conv.dilation != (1, 1):
        raise _NotConvertible(f"{where} must be a 1x1 conv with stride 1, no padding or dilation, got kernel "
                              f"{conv.kernel_size}, stride {conv.stride}, padding {conv.padding}, "
                              f"dilation {conv.dilation}")
    if conv.groups != 1:
        raise _NotConvertible(f"{where} has groups={conv.groups}, expected 1")
    if (conv.bias is not None) != bias:
        raise _NotConvertible(f"{where} {'has no' if bias else 'has a'} bias, expected {'one' if bias else 'none'}")
    for expected, actual, what in ((in_channels, conv.in_channels, "input"),
                                   (out_channels, conv.out_channels, "output")):
        if expected is not None and actual != expected:
            raise _NotConvertible(f"{where} has {actual} {what} channels, expected {expected}")
    return conv


def _norm_type(bn: nn.Module, where: str) -> str:
    """"BN" or "SyncBN" for a BatchNorm2d / SyncBatchNorm that fastctx's fused path can fold."""
    if isinstance(bn, nn.SyncBatchNorm):
        kind = "SyncBN"
    elif isinstance(bn, nn.BatchNorm2d):
        kind = "BN"
    else:
        raise _NotConvertible(f"{where} is {_class_name(bn)}, expected BatchNorm2d or SyncBatchNorm")
    if not bn.affine or not bn.track_running_stats:
        raise _NotConvertible(f"{where} must have affine=True and track_running_stats=True")
    return kind


def _check_conv_module(module: nn.Module, where: str, in_channels: int | None,
                       out_channels: int | None) -> str | None:
    """An mmcv ConvModule: conv -> BatchNorm -> ReLU (no conv bias), or conv (with bias) -> ReLU as mmseg
    builds it with norm_cfg=None. Returns its norm type, None for no norm."""
    children = set(dict(module.named_children()))
    if children not in ({"conv", "bn", "activate"}, {"conv", "activate"}):
        raise _NotConvertible(f"{where} has submodules {sorted(children)}, expected conv, bn, activate (a "
                              "ConvModule with BatchNorm and an activation) or conv, activate (norm_cfg=None)")
    if tuple(getattr(module, "order", ("conv", "norm", "act"))) != ("conv", "norm", "act"):
        raise _NotConvertible(f"{where} applies its layers in order {module.order}, expected conv, norm, act")
    if getattr(module, "with_explicit_padding", False) or getattr(module, "with_spectral_norm", False):
        raise _NotConvertible(f"{where} uses explicit padding or spectral norm")
    with_norm = "bn" in children
    # mmcv's bias="auto": a conv bias exactly when no norm follows (what fastctx's ConvModule builds)
    _check_conv(module.conv, f"{where}.conv", in_channels, out_channels, bias=not with_norm)
    norm = _norm_type(module.bn, f"{where}.bn") if with_norm else None
    if type(module.activate) is not nn.ReLU:
        raise _NotConvertible(f"{where}.activate is {_class_name(module.activate)}, expected torch.nn.ReLU")
    return norm


# ----------------------------------------------------------------------------- ACM / Encoding builders

def _acm_for(module: nn.Module, fused: bool) -> nn.Module:
    """A fastctx ACM computing what `module` computes (meta tensors, to be loaded by `_take_over`)."""
    input_redu = _child(module, "input_redu_conv")
    in_channels = getattr(getattr(input_redu, "conv", None), "in_channels", None)
    channels = getattr(getattr(input_redu, "conv", None), "out_channels", None)
    if in_channels is None or channels is None:
        raise _NotConvertible("input_redu_conv has no Conv2d `conv`")
    norms = {
        "pooled_redu_conv": _check_conv_module(_child(module, "pooled_redu_conv"), "pooled_redu_conv",
                                               in_channels, channels),
        "input_redu_conv": _check_conv_module(input_redu, "input_redu_conv", in_channels, channels),
    }
    for name in ("global_info", "residual_conv"):
        norms[name] = _check_conv_module(_child(module, name), name, channels, channels)
    fusion = hasattr(module, "fusion_conv")
    if fusion:
        norms["fusion_conv"] = _check_conv_module(_child(module, "fusion_conv"), "fusion_conv", channels, channels)
    gla = _check_conv(_child(module, "gla"), "gla", channels, None, bias=True)
    scale = math.isqrt(gla.out_channels)
    if scale * scale != gla.out_channels:
        raise _NotConvertible(f"gla has {gla.out_channels} output channels, not the square of a pool scale")
    declared = getattr(module, "pool_scale", scale)
    if declared != scale:
        raise _NotConvertible(f"pool_scale is {declared} but gla has {gla.out_channels} = {scale}^2 outputs")
    if getattr(module, "fusion", fusion) != fusion:
        raise _NotConvertible(f"fusion is {module.fusion} but fusion_conv is {'present' if fusion else 'absent'}")
    kinds = set(norms.values())
    if len(kinds) != 1:
        raise _NotConvertible(f"mixes norm types {dict(sorted(norms.items()))}; fastctx's ACM has one")
    with torch.device("meta"):  # no allocation, no random init: every tensor comes from `module`
        return ACM(scale, fusion, in_channels, channels, norm=kinds.pop(), fused=fused)


def _encoding_for(module: nn.Module, fused: bool) -> nn.Module:
    if list(module.children()):
        raise _NotConvertible(f"has submodules {[n for n, _ in module.named_children()]}, expected none")
    params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
    if set(params) != {"codewords", "scale"} or buffers:
        raise _NotConvertible(f"has parameters {sorted(params)} and buffers {sorted(buffers)}, "
                              "expected exactly the parameters codewords [K, D] and scale [K]")
    codewords, scale = params["codewords"], params["scale"]
    if codewords.dim() != 2 or scale.shape != (codewords.shape[0],):
        raise _NotConvertible(f"codewords {tuple(codewords.shape)} and scale {tuple(scale.shape)} are not "
                              "[K, D] and [K]")
    num_codes, channels = codewords.shape
    for attr, value in (("channels", channels), ("num_codes", num_codes)):
        if getattr(module, attr, value) != value:
            raise _NotConvertible(f"{attr} is {getattr(module, attr)} but codewords are [K, D] = "
                                  f"{tuple(codewords.shape)}")
    with torch.device("meta"):
        return Encoding(channels, num_codes, fused=fused)


def _refusing_with(convert_one):
    """A module converter whose ValueError (the module differs from fastctx's) becomes a skip with its reason."""
    def build(module: nn.Module, fused: bool) -> nn.Module:
        try:
            return convert_one(module, fused=fused)
        except ValueError as exc:
            raise _NotConvertible(str(exc)) from None
    return build


# By class name (mmseg need not be importable). mmseg's OCRHead itself is not replaced: converting its two
# children runs every fused op and keeps mmseg's loss and predict on the head.
_BUILDERS = {"ACM": _acm_for, "Encoding": _encoding_for,
             "SpatialGatherModule": _refusing_with(convert_ocr), "ObjectAttentionBlock": _refusing_with(convert_ocr),
             "ShiftWindowMSA": _refusing_with(convert_window_msa), "WindowMSA": _refusing_with(convert_window_msa)}


def _take_over(new: nn.Module, old: nn.Module) -> None:
    """Give `new` the parameters, buffers, BatchNorm settings and train/eval flags of `old`."""
    state = old.state_dict(keep_vars=True)
    # assign=True copies the new module's requires_grad onto the (shared) tensors: keep the old flags
    requires_grad = {k: t.requires_grad for k, t in state.items()}
    try:
        new.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:  # missing / unexpected keys or shape mismatches
        raise _NotConvertible(f"state_dict does not match fastctx's layout: {exc}") from None
    finally:
        for k, t in state.items():
            t.requires_grad_(requires_grad[k])
    old_modules = dict(old.named_modules())
    for name, sub in new.named_modules():
        counterpart = old_modules.get(name, old)
        sub.training = counterpart.training
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.eps, sub.momentum = counterpart.eps, counterpart.momentum
            if isinstance(sub, nn.SyncBatchNorm):
                sub.process_group = getattr(counterpart, "process_group", None)
    left = [n for n, t in (*new.named_parameters(), *new.named_buffers()) if t.is_meta]
    if left:  # every tensor of a fastctx module is in its state_dict; this would be a fastctx bug
        raise RuntimeError(f"fastctx.convert left meta tensors {left} in {_class_name(new)}")


# ----------------------------------------------------------------------------- APCHead routing

def _fused_apc_forward(self, inputs):
    """mmseg's APCHead.forward with the per-scale ACM loop replaced by one fused call for all scales."""
    x = self._transform_inputs(inputs)
    acms = list(self.acm_modules)
    if all(isinstance(a, ACM) and a.fused for a in acms):
        acm_outs = fused_acm_forward(acms, x)  # [B, G*C, H, W]: the ACM outputs, concatenated in order
    else:  # an ACM switched to eager maths after conversion: mmseg's loop
        acm_outs = torch.cat([acm(x) for acm in acms], dim=1)
    output = self.bottleneck(torch.cat([x, acm_outs], dim=1))
    return self.cls_seg(output)


_FUSED_CLASSES: dict[type, type] = {}


def _rebuild_fused_apc_head(base: type) -> nn.Module:
    """Unpickling/deepcopy helper: an empty instance of the fused subclass of `base`."""
    cls = fused_apc_class(base)
    return cls.__new__(cls)


def _reduce_fused_apc_head(self, protocol):
    # Pickle by the base class (importable, e.g. mmseg's APCHead), not by the generated subclass.
    return _rebuild_fused_apc_head, (self._fastctx_base,), self.__dict__.copy()


class FusedAPCHead:
    """Marker base of the generated `FusedAPCHead` classes (`isinstance(head, FusedAPCHead)`)."""

    _fastctx_base: type


def fused_apc_class(base: type) -> type:
    """The subclass of an mmseg-style APCHead class whose forward runs all ACM scales in one fused call."""
    if base not in _FUSED_CLASSES:
        _FUSED_CLASSES[base] = type("FusedAPCHead", (base, FusedAPCHead), {
            "forward": _fused_apc_forward, "_fastctx_base": base, "__reduce_ex__": _reduce_fused_apc_head,
            "__module__": __name__, "__qualname__": "FusedAPCHead",
            "__doc__": f"{_class_name(base)} with its ACM loop routed through fastctx.nn.apc_head.fused_acm_forward.",
        })
    return _FUSED_CLASSES[base]


def _check_apc_head(module: nn.Module) -> None:
    """An mmseg-style APCHead whose forward can be routed through fused_acm_forward."""
    forward = type(module).forward
    if getattr(forward, "__qualname__", "") != "APCHead.forward":
        raise _NotConvertible("overrides APCHead.forward: its ACM loop cannot be routed")
    for attr in ("_transform_inputs", "cls_seg"):
        if not callable(getattr(module, attr, None)):
            raise _NotConvertible(f"has no {attr}() (not an mmseg decode head)")
    _child(module, "bottleneck")
    acms = getattr(module, "acm_modules", None)
    if not isinstance(acms, nn.ModuleList) or len(acms) == 0:
        raise _NotConvertible("has no ModuleList acm_modules")
    unconverted = [str(i) for i, a in enumerate(acms) if not isinstance(a, ACM)]
    if unconverted:
        raise _NotConvertible(f"acm_modules {', '.join(unconverted)} were not converted (see their entries)")
    if len({(a.in_channels, a.channels, a.fusion) for a in acms}) != 1:
        raise _NotConvertible("its ACMs differ in channels or fusion; fused_acm_forward needs them equal")


# ----------------------------------------------------------------------------- the walk

def convert(model: nn.Module, inplace: bool = True, fused: bool = True, *, fuse_scales: bool = True,
            verbose: bool = False, return_report: bool = False) -> nn.Module | tuple[nn.Module, ConversionReport]:
    """Replace the modules of `model` that fastctx has fused kernels for by fastctx's, keeping every weight:
    APCNet's ACM (and APCHead's loop over the pool scales), EncNet's Encoding, OCRNet's SpatialGatherModule
    and ObjectAttentionBlock, Swin's WindowMSA / ShiftWindowMSA.

    Args:
        model: any nn.Module tree (an mmsegmentation segmentor or head, a
            fastctx model, your own network...).
        inplace: modify `model` itself (True) or convert a deep copy and leave
            `model` untouched (False).
        fused: the new modules run fastctx's fused ops (True) or the eager
            mmseg maths (False, same weights; useful to compare).
        fuse_scales: also route mmseg-style APCHeads' loop over their ACMs
            through one fused call for all pool scales (needs fused=True).
        verbose: print the report (it is always logged on the
            "fastctx.convert" logger).
        return_report: return (model, ConversionReport) instead of the model.

    Returns:
        The converted model (a new object only if `inplace=False` or the root
        module itself was replaced), or (model, report) with `return_report`.
        `report.replaced` lists (qualified name, old class, new class);
        `report.skipped` lists (qualified name, class, reason).

    Convert before building the optimizer or wrapping the model (DDP,
    torch.compile): the parameters are the same tensors, but the modules
    holding them are new.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport([], [])

    def visit(module: nn.Module, name: str) -> nn.Module:
        if isinstance(module, _FASTCTX_MODULES):
            return module
        builder = _BUILDERS.get(type(module).__name__)
        if builder is not None:
            try:
                new = builder(module, fused)
                _take_over(new, module)
            except _NotConvertible as exc:
                report.skipped.append(Skipped(name, _class_name(module), str(exc)))
            else:
                report.replaced.append(Replaced(name, _class_name(module), _class_name(new)))
                return new
        for child_name, child in list(module.named_children()):
            new_child = visit(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                module._modules[child_name] = new_child  # keeps the child's position (ModuleList order)
        if type(module).__name__ == "APCHead" and fused and fuse_scales:
            try:
                _check_apc_head(module)
            except _NotConvertible as exc:
                report.skipped.append(Skipped(name, _class_name(module), f"ACM loop not fused: {exc}"))
            else:
                old_class = _class_name(module)
                module.__class__ = fused_apc_class(type(module))
                report.replaced.append(Replaced(name, old_class, _class_name(module)))
        return module

    model = visit(model, "")
    for entry in report.replaced:
        logger.info("replaced %s: %s -> %s", entry.name or "<root>", entry.old_class, entry.new_class)
    for entry in report.skipped:
        logger.warning("skipped %s (%s): %s", entry.name or "<root>", entry.module_class, entry.reason)
    if verbose:
        print(report)
    return (model, report) if return_report else model
