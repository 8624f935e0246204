"""mmcv's ConvModule (conv -> norm -> activation) with its parameter names `.conv` / `.bn` / `.activate`.

Layers are described either in fastctx's short form (`norm="BN"`, `act=True`)
or in mmcv's config form (`conv_cfg`, `norm_cfg`, `act_cfg` dicts), so the
modules built here take an mmsegmentation config as it is:

    ConvModule(64, 32, 3, padding=1)                                   # conv -> BN -> ReLU
    ConvModule(64, 32, 3, padding=1, norm_cfg=dict(type="SyncBN", requires_grad=True),
               act_cfg=dict(type="ReLU"))
    ConvModule(64, 32, 1, norm_cfg=None)                               # conv with bias -> ReLU

One difference from mmcv: with neither `norm` nor `norm_cfg` given the norm is
BatchNorm (mmcv's default is no norm). Pass `norm_cfg=None` (or `norm=None`)
for mmcv's default.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from ._batchnorm import SyncBatchNorm
from ._checks import check_positive_int

__all__ = ["ConvModule", "UNSET", "activation_is_relu", "build_activation", "build_norm", "make_norm",
           "resolve_layer_args"]


class _Unset:
    """Marks a layer argument the caller did not give (None is a meaningful value: no layer)."""

    def __repr__(self) -> str:
        return "<unset>"


UNSET: Any = _Unset()

# mmcv's norm types fastctx builds, by dimensionality of the layer ("BN" follows the module: 2-d in a conv).
_BATCHNORMS = {"bn": None, "batchnorm": None, "bn1d": 1, "bn2d": 2, "bn3d": 3}
_TORCH_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
_NORM_KEYS = {"type", "requires_grad", "eps", "momentum", "affine", "track_running_stats"}

# mmcv's activation registry, by the torch module computing the same function.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "prelu": nn.PReLU, "rrelu": nn.RReLU, "relu6": nn.ReLU6,
    "elu": nn.ELU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh, "gelu": nn.GELU, "silu": nn.SiLU, "swish": nn.SiLU,
    "hswish": nn.Hardswish, "hsigmoid": nn.Hardsigmoid,
}

NormSpec = Any  # "BN" | "SyncBN" | dict(type=..., ...) | a norm-layer class | None


def resolve_layer_args(norm=UNSET, norm_cfg=UNSET, act=UNSET, act_cfg=UNSET, conv_cfg=None,
                       who: str = "ConvModule") -> tuple[NormSpec, Any]:
    """(norm, act) from fastctx's short form and mmcv's cfg form, which must agree when both are given.

    Defaults: BatchNorm and ReLU. `conv_cfg` must describe a plain conv (None,
    dict(type="Conv") or dict(type="Conv2d")).
    """
    _check_conv_cfg(conv_cfg, who)
    if norm is not UNSET and norm_cfg is not UNSET and _norm_key(norm) != _norm_key(norm_cfg):
        raise ValueError(f"{who}: norm={norm!r} and norm_cfg={norm_cfg!r} disagree; give one of them")
    if act is not UNSET and act_cfg is not UNSET and _act_cfg(act, who) != _act_cfg(act_cfg, who):
        raise ValueError(f"{who}: act={act!r} and act_cfg={act_cfg!r} disagree; give one of them")
    norm = norm if norm is not UNSET else norm_cfg if norm_cfg is not UNSET else "BN"
    act = act if act is not UNSET else act_cfg if act_cfg is not UNSET else True
    return norm, act


def _norm_key(norm):
    """A norm spec in one canonical form, so "SyncBN" and dict(type="SyncBN") compare equal."""
    if isinstance(norm, Mapping):
        options = {k: v for k, v in norm.items() if k != "type" and (k, v) != ("requires_grad", True)}
        return _norm_key(norm.get("type"))[0], tuple(sorted(options.items(), key=repr))
    if isinstance(norm, str):
        name = norm.lower()
        return ("bn" if name == "batchnorm" else name), ()
    return norm, ()


def _check_conv_cfg(conv_cfg, who: str) -> None:
    if conv_cfg is None:
        return
    kind = conv_cfg.get("type") if isinstance(conv_cfg, Mapping) else None
    if kind not in ("Conv", "Conv2d") or set(conv_cfg) != {"type"}:
        raise ValueError(f"{who}: conv_cfg must be None, dict(type='Conv') or dict(type='Conv2d') (fastctx builds "
                         f"plain nn.Conv2d layers), got {conv_cfg!r}")


def _norm_error(norm) -> ValueError:
    return ValueError(f"norm must be 'BN', 'SyncBN', a norm_cfg dict such as dict(type='SyncBN', "
                      f"requires_grad=True), a norm-layer class, or None (no norm), got {norm!r}")


def build_norm(norm: NormSpec, channels: int, dims: int = 2) -> nn.Module | None:
    """The norm layer `norm` describes over `channels` channels of a `dims`-d layer, or None for no norm.

    `norm`: "BN" / "SyncBN" (mmseg's norm_cfg types; "BN1d"/"BN2d"/"BN3d" too),
    a dict as mmcv's norm_cfg (`type`, and optionally `requires_grad`, `eps`,
    `momentum`, `affine`, `track_running_stats`), a norm-layer class called with
    `channels`, or None. "SyncBN" is fastctx's SyncBatchNorm: torch's
    nn.SyncBatchNorm (which it subclasses) that also synchronises CPU tensors
    under a gloo process group. A BatchNorm2d class in a 1-d layer becomes
    BatchNorm1d, as mmseg's EncModule does with its norm_cfg.
    """
    if norm is None:
        return None
    options: dict[str, Any] = {}
    requires_grad = True
    if isinstance(norm, Mapping):
        unknown = set(norm) - _NORM_KEYS
        if "type" not in norm or unknown:
            raise _norm_error(norm)
        options = {k: v for k, v in norm.items() if k not in ("type", "requires_grad")}
        requires_grad = bool(norm.get("requires_grad", True))
        norm = norm["type"]
    if isinstance(norm, str):
        name = norm.lower()
        if name == "syncbn":
            layer = SyncBatchNorm(channels, **options)
        elif name in _BATCHNORMS:
            layer = _TORCH_BN[_BATCHNORMS[name] or dims](channels, **options)
        else:
            raise _norm_error(norm)
    elif isinstance(norm, type) and issubclass(norm, nn.Module):
        if dims == 1 and norm is nn.BatchNorm2d:
            norm = nn.BatchNorm1d
        layer = norm(channels, **options)
    elif callable(norm) and not options:
        layer = norm(channels)
    else:
        raise _norm_error(norm)
    if not requires_grad:
        for param in layer.parameters():
            param.requires_grad_(False)
    return layer


def make_norm(norm: NormSpec, channels: int) -> nn.Module:
    """A 2-d norm layer (see build_norm) where one is required, e.g. in the backbone."""
    layer = build_norm(norm, channels)
    if layer is None:
        raise ValueError("this layer needs a norm: got norm=None")
    return layer


def _act_cfg(act, who: str) -> dict | None:
    """An activation spec as an mmcv act_cfg dict (None: no activation)."""
    if act is None or act is False:
        return None
    if act is True:
        return {"type": "ReLU"}
    if isinstance(act, str):
        return {"type": act}
    if isinstance(act, Mapping) and isinstance(act.get("type"), str):
        return dict(act)
    if isinstance(act, type) and issubclass(act, nn.Module):
        return {"type": act}
    raise ValueError(f"{who}: act must be True/False, an act_cfg dict such as dict(type='ReLU'), an activation "
                     f"name or class, or None, got {act!r}")


def build_activation(act, inplace: bool = True, who: str = "ConvModule") -> nn.Module | None:
    """The activation `act` describes (True: ReLU; False/None: none; an mmcv act_cfg dict; a name; a class).

    As in mmcv, activations that can work in place do so unless `inplace=False`
    or the cfg says otherwise.
    """
    cfg = _act_cfg(act, who)
    if cfg is None:
        return None
    options = {k: v for k, v in cfg.items() if k != "type"}
    kind = cfg["type"]
    if isinstance(kind, str):
        if kind.lower() not in _ACTIVATIONS:
            raise ValueError(f"{who}: unknown activation type {kind!r}; fastctx builds "
                             f"{', '.join(sorted(_ACTIVATIONS))} (mmcv's names)")
        kind = _ACTIVATIONS[kind.lower()]
    if "inplace" in inspect.signature(kind.__init__).parameters:
        options.setdefault("inplace", inplace)
    return kind(**options)


class ConvModule(nn.Module):
    """Conv2d + optional norm + optional activation, as mmcv's ConvModule (conv -> norm -> act order).

    Arguments in mmcv's order: `in_channels, out_channels, kernel_size, stride,
    padding, dilation, groups, bias, conv_cfg, norm_cfg, act_cfg, inplace`;
    fastctx's short `norm=` / `act=` keywords describe the same layers. The
    conv has a bias only when no norm follows (`bias="auto"`, mmcv's rule).
    The norm is registered as `bn` (mmcv's name for batch norms) and the
    activation as `activate`; `norm` is the norm layer or None. Initialised as
    mmcv does: kaiming-normal (fan_out) conv weights, conv bias 0, norm weight
    1 and bias 0.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias="auto", conv_cfg: dict | None = None, norm_cfg=UNSET, act_cfg=UNSET,
                 inplace: bool = True, *, norm=UNSET, act=UNSET):
        super().__init__()
        check_positive_int(in_channels, "in_channels", "ConvModule")
        check_positive_int(out_channels, "out_channels", "ConvModule")
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, conv_cfg)
        norm_layer = build_norm(norm, out_channels)
        if bias == "auto":
            bias = norm_layer is None
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                              dilation=dilation, groups=groups, bias=bool(bias))
        # mmcv exposes the conv's geometry on the module itself
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = self.conv.kernel_size, self.conv.stride, self.conv.dilation
        self.padding, self.groups = padding, groups
        self.with_norm, self.with_bias = norm_layer is not None, bool(bias)
        self.norm_name = "bn" if norm_layer is not None else None
        if norm_layer is not None:
            self.bn = norm_layer
        activation = build_activation(act, inplace)
        self.with_activation = activation is not None
        if activation is not None:
            self.activate = activation
        self._init_weights()

    @property
    def norm(self) -> nn.Module | None:
        return self.bn if self.with_norm else None

    def _init_weights(self) -> None:
        activation = getattr(self, "activate", None)
        if isinstance(activation, nn.LeakyReLU):  # mmcv's kaiming init for a leaky ReLU
            nn.init.kaiming_normal_(self.conv.weight, a=activation.negative_slope, mode="fan_out",
                                    nonlinearity="leaky_relu")
        else:
            nn.init.kaiming_normal_(self.conv.weight, a=0, mode="fan_out", nonlinearity="relu")
        if self.conv.bias is not None:
            nn.init.constant_(self.conv.bias, 0)
        if self.with_norm and getattr(self.bn, "weight", None) is not None:
            nn.init.constant_(self.bn.weight, 1)
            nn.init.constant_(self.bn.bias, 0)

    def forward(self, x):
        x = self.conv(x)
        if self.with_norm:
            x = self.bn(x)
        return self.activate(x) if self.with_activation else x


def activation_is_relu(module: ConvModule | nn.Module) -> bool:
    """Whether a ConvModule ends in a plain ReLU (what fused epilogues compute)."""
    return type(getattr(module, "activate", None)) is nn.ReLU

