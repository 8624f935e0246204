"""ResNetV1c backbone (mmsegmentation 1.x `ResNetV1c`) and loading of local pretrained checkpoints.

Module and parameter names follow mmseg so its checkpoints (and the
open-mmlab ImageNet `resnet{18,50,101}_v1c` weights) load with strict=True:
deep stem `stem.{0,1,3,4,6,7}`, then `layer{1..4}.{j}.{conv1,bn1,conv2,bn2,
conv3,bn3,downsample.0,downsample.1}`.
"""
from __future__ import annotations

import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..nn._checks import check_positive_int
from ..nn.conv_module import make_norm

__all__ = ["BasicBlock", "Bottleneck", "ResNetV1c", "LoadReport", "load_pretrained"]


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual (ResNet-18/34). Only the first conv is strided and dilated, as in mmseg."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: str | type[nn.Module] = "BN"):
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride, dilation)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = make_norm(norm, planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.Module:
        """The norm before the residual add (zero-initialised with zero_init_residual)."""
        return self.bn2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 (x4 channels) with a residual (ResNet-50/101).

    "pytorch" style: the stride sits on the 3x3 conv, which also carries the dilation.
    """

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, dilation: int = 1,
                 downsample: nn.Module | None = None, norm: str | type[nn.Module] = "BN"):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = make_norm(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = make_norm(norm, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    @property
    def last_norm(self) -> nn.Module:
        """The norm before the residual add (zero-initialised with zero_init_residual)."""
        return self.bn3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNetV1c(nn.Module):
    """ResNet with a deep stem (three 3x3 convs), dilated for dense prediction (mmseg `ResNetV1c`).

    Args:
        depth: 18, 34 (BasicBlock) or 50, 101 (Bottleneck).
        in_channels: image channels.
        stem_channels: output channels of the stem (its first two convs have half).
        base_channels: planes of layer1; layer i has base_channels * 2**(i-1).
        strides: stride of the first block of each of the 4 stages.
        dilations: dilation of each stage. With `contract_dilation`, the first
            block of a stage with dilation d > 1 uses d // 2 (mmseg's ResLayer).
        out_indices: which stages' outputs to return (0-based).
        contract_dilation: see `dilations`.
        norm: "BN", "SyncBN" or a norm-layer class.
        norm_eval: keep every norm layer in eval mode (frozen running statistics) during training.
        frozen_stages: stages whose parameters are frozen and norms kept in eval
            mode: -1 none, 0 the stem, k the stem and layer1..layer k.
        zero_init_residual: zero the weight of each block's last norm at init so
            blocks start as identities (mmseg's default for ResNet).
    The defaults (strides (1, 2, 1, 1), dilations (1, 1, 2, 4)) give the "-d8"
    backbone of mmseg's configs: output stride 8 for layer2..layer4.
    Forward returns a tuple with the features of `out_indices`.
    """

    arch_settings = {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
    }

    def __init__(self, depth: int, in_channels: int = 3, stem_channels: int = 64, base_channels: int = 64,
                 strides: Sequence[int] = (1, 2, 1, 1), dilations: Sequence[int] = (1, 1, 2, 4),
                 out_indices: Sequence[int] = (0, 1, 2, 3), contract_dilation: bool = True,
                 norm: str | type[nn.Module] = "BN",
                 norm_eval: bool = False, frozen_stages: int = -1, zero_init_residual: bool = True):
        super().__init__()
        if depth not in self.arch_settings:
            raise ValueError(f"ResNetV1c depth must be one of {sorted(self.arch_settings)}, got {depth!r}")
        strides, dilations, out_indices = tuple(strides), tuple(dilations), tuple(out_indices)
        if len(strides) != 4 or len(dilations) != 4:
            raise ValueError(f"strides and dilations need one entry per stage (4), got {strides} and {dilations}")
        if not out_indices or any(not 0 <= i < 4 for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..3, got {out_indices}")
        if not -1 <= frozen_stages <= 4:
            raise ValueError(f"frozen_stages must be in -1..4, got {frozen_stages}")
        for name, value in (("in_channels", in_channels), ("stem_channels", stem_channels),
                            ("base_channels", base_channels)):
            check_positive_int(value, name, "ResNetV1c")
        if stem_channels < 2:
            raise ValueError(f"ResNetV1c: stem_channels must be >= 2 (the deep stem's first convs have "
                             f"stem_channels // 2 channels), got {stem_channels}")
        for name, values in (("strides", strides), ("dilations", dilations)):
            for value in values:
                check_positive_int(value, f"every entry of {name}", "ResNetV1c")
        self.depth, self.in_channels = depth, in_channels
        self.stem_channels, self.base_channels = stem_channels, base_channels
        self.strides, self.dilations, self.out_indices = strides, dilations, out_indices
        self.contract_dilation, self.norm_eval, self.frozen_stages = contract_dilation, norm_eval, frozen_stages
        self.zero_init_residual = zero_init_residual
        block, stage_blocks = self.arch_settings[depth]

        half = stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, half, 3, stride=2, padding=1, bias=False), make_norm(norm, half),
            nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, padding=1, bias=False), make_norm(norm, half), nn.ReLU(inplace=True),
            nn.Conv2d(half, stem_channels, 3, padding=1, bias=False), make_norm(norm, stem_channels),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        inplanes = stem_channels
        self.out_channels: list[int] = []  # channels of every stage's output
        for i, num_blocks in enumerate(stage_blocks):
            planes = base_channels * 2 ** i
            layer = self._make_layer(block, inplanes, planes, num_blocks, strides[i], dilations[i], norm)
            self.add_module(f"layer{i + 1}", layer)
            inplanes = planes * block.expansion
            self.out_channels.append(inplanes)

        self.init_weights()
        self._freeze_stages()

    def _make_layer(self, block: type[BasicBlock | Bottleneck], inplanes: int, planes: int, num_blocks: int,
                    stride: int, dilation: int, norm: str | type[nn.Module]) -> nn.Sequential:
        downsample = None
        if stride != 1 or inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * block.expansion, 1, stride=stride, bias=False),
                make_norm(norm, planes * block.expansion),
            )
        # The first block halves a dilation > 1 so the stage's receptive field grows gradually (no gridding).
        first_dilation = dilation // 2 if dilation > 1 and self.contract_dilation else dilation
        blocks = [block(inplanes, planes, stride, first_dilation, downsample, norm)]
        blocks += [block(planes * block.expansion, planes, 1, dilation, None, norm) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmseg's init: kaiming-normal (fan_out, relu) convs, norms weight 1 / bias 0, optional zero residual.

        Convs are visited in module order, as mmengine does, so the same seed gives mmseg's exact weights.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, a=0, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if self.zero_init_residual:
            for m in self.modules():
                if isinstance(m, (BasicBlock, Bottleneck)) and getattr(m.last_norm, "weight", None) is not None:
                    nn.init.zeros_(m.last_norm.weight)
                    nn.init.zeros_(m.last_norm.bias)

    def _freeze_stages(self) -> None:
        frozen = ([self.stem] if self.frozen_stages >= 0 else []) + [
            getattr(self, f"layer{i}") for i in range(1, self.frozen_stages + 1)
        ]
        for m in frozen:
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> "ResNetV1c":
        """As nn.Module.train, but frozen stages (and all norms when norm_eval) stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"ResNetV1c expects images of shape [B, {self.in_channels}, H, W], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"ResNetV1c expects a floating-point input, got {x.dtype}")
        x = self.maxpool(self.stem(x))
        outs = []
        for i in range(4):
            x = getattr(self, f"layer{i + 1}")(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, strides={self.strides}, dilations={self.dilations}, "
                f"out_indices={self.out_indices}, contract_dilation={self.contract_dilation}")


# ---------------------------------------------------------------------------------------------------------------
# Pretrained checkpoints
# ---------------------------------------------------------------------------------------------------------------

_SEGMENTOR_PREFIXES = ("backbone.", "decode_head.", "auxiliary_head.")


@dataclass
class LoadReport:
    """What `load_pretrained` did. Keys are named as in `module.state_dict()` / the checkpoint."""

    loaded: list[str] = field(default_factory=list)
    """module keys set from the checkpoint."""
    missing_keys: list[str] = field(default_factory=list)
    """module keys the checkpoint has no value for (left as they were)."""
    unexpected_keys: list[str] = field(default_factory=list)
    """checkpoint keys with no place in the module."""
    skipped_keys: list[str] = field(default_factory=list)
    """checkpoint keys recognised and deliberately not loaded (ImageNet classifier, torchvision's 7x7 stem)."""

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors"]
        for name in ("missing_keys", "unexpected_keys", "skipped_keys"):
            keys = getattr(self, name)
            if keys:
                lines.append(f"{name} ({len(keys)}): {', '.join(keys)}")
        return "; ".join(lines)


def load_pretrained(module: nn.Module, path: str | os.PathLike, prefix: str | None = None, strict: bool = True,
                    weights_only: bool = True) -> LoadReport:
    """Load a LOCAL checkpoint file into a backbone or a segmentor (no download, ever).

    Accepted layouts (an optional {"state_dict": ...} wrapper and a DataParallel
    "module." prefix are removed first):
      - mmseg / mmcv ResNetV1c (`stem.*`, `layer*.*`; an ImageNet classifier
        `fc.*` is skipped), possibly prefixed "backbone.";
      - torchvision ResNet (`conv1`, `bn1`, `layer*`, `fc`): the layers load
        strictly; its 7x7 stem cannot map onto the deep stem, which stays at its
        initialisation, and a warning lists the unmapped keys;
      - a whole mmseg segmentor (`backbone.*`, `decode_head.*`,
        `auxiliary_head.*`): loaded whole into a segmentor, or its backbone part
        into a backbone.

    Args:
        module: a ResNetV1c, an EncoderDecoder (anything with `backbone` and
            `decode_head`), or any module whose keys match the checkpoint's.
        path: local checkpoint file (torch.save of a state_dict or of a dict holding one).
        prefix: take only the checkpoint keys starting with `prefix`, with the
            prefix removed (e.g. "backbone."). None: decided from the keys: a
            segmentor checkpoint loads whole into a segmentor, a backbone
            checkpoint into `module.backbone`, and into a backbone the
            "backbone." keys of a segmentor checkpoint.
        strict: raise on missing or unexpected keys (else warn). Shape
            mismatches always raise, naming the key and both shapes.
        weights_only: torch.load's safe mode; pass False only for a trusted file
            that also pickles other Python objects.
    Returns:
        a LoadReport (loaded, missing, unexpected and skipped keys).
    """
    source = str(path)
    state = _read_checkpoint(path, weights_only)
    target, target_name = module, ""
    if prefix is None:
        is_segmentor = isinstance(getattr(module, "backbone", None), nn.Module) and hasattr(module, "decode_head")
        has_segmentor_keys = any(k.startswith(_SEGMENTOR_PREFIXES) for k in state)
        if is_segmentor and not has_segmentor_keys:
            target, target_name = module.backbone, "backbone."  # an ImageNet backbone for a segmentor
        elif not is_segmentor and any(k.startswith("backbone.") for k in state):
            prefix = "backbone."
    if prefix:
        selected = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not selected:
            heads = sorted({k.split(".", 1)[0] + "." for k in state})
            raise ValueError(f"{source}: no checkpoint key starts with prefix {prefix!r}; "
                             f"its keys start with {', '.join(heads[:10])}")
        state = selected
    report = _load_state_dict(target, state, strict, source)
    if target_name:
        report.loaded = [target_name + k for k in report.loaded]
        report.missing_keys = [target_name + k for k in report.missing_keys]
    return report


def _read_checkpoint(path: str | os.PathLike, weights_only: bool) -> dict[str, torch.Tensor]:
    if isinstance(path, str) and "://" in path:
        raise ValueError(f"load_pretrained reads local files only, got the URL {path!r}: download the checkpoint "
                         "and pass its local path")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"checkpoint file not found: {file}")
    with open(file, "rb") as f:
        head = f.read(1)
    # torch.save writes a zip archive; checkpoints from torch < 1.6 are a pickle stream (PROTO opcode 0x80).
    if not zipfile.is_zipfile(file) and head != b"\x80":
        raise ValueError(f"{file} is not a readable PyTorch checkpoint (neither a torch.save archive nor a "
                         "legacy pickled one)")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        raise ValueError(f"{file}: the checkpoint pickles Python objects besides tensors, which weights_only "
                         f"loading refuses ({_unpickler_reason(exc)}); if you trust the file, pass "
                         "weights_only=False") from exc
    except (RuntimeError, EOFError, OSError) as exc:
        raise ValueError(f"{file} is not a readable PyTorch checkpoint: {exc}") from exc
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{file}: expected a state_dict (a non-empty dict of tensors, optionally under "
                         f"'state_dict'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{file}: expected a state_dict of tensors, but these entries are not tensors: "
                         f"{', '.join(map(str, bad[:10]))}")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from DataParallel / DistributedDataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _unpickler_reason(exc: Exception) -> str:
    """The line of torch.load's weights_only error that names the refused object."""
    for line in str(exc).splitlines():
        if "WeightsUnpickler error:" in line:
            return line.split("WeightsUnpickler error:", 1)[1].split(" Please use", 1)[0].strip()
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _load_state_dict(target: nn.Module, state: dict[str, torch.Tensor], strict: bool, source: str) -> LoadReport:
    own = target.state_dict()
    skipped: list[str] = []
    allowed_missing: set[str] = set()
    if isinstance(target, ResNetV1c):
        if "fc.weight" in state:  # ImageNet classifier of a classification checkpoint: no place in a backbone
            skipped += [k for k in state if k.startswith("fc.")]
        if "conv1.weight" in state and "stem.0.weight" not in state:
            # torchvision layout: conv1 7x7 + bn1 stem. The layers share our names; the stem cannot map.
            stem_keys = [k for k in state if k.startswith(("conv1.", "bn1."))]
            skipped += stem_keys
            allowed_missing = {k for k in own if k.startswith("stem.")}
            warnings.warn(
                f"{source} is a torchvision ResNet checkpoint: its 7x7 stem cannot map onto ResNetV1c's deep stem, "
                f"which stays at its initialisation (stem.*). Unmapped checkpoint keys: {', '.join(stem_keys)}",
                stacklevel=3,
            )
    skipped_set = set(skipped)
    state = {k: v for k, v in state.items() if k not in skipped_set}

    for key, value in state.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)} in the checkpoint but {tuple(own[key].shape)} in "
                f"the {type(target).__name__} (a checkpoint of another architecture, depth, channels or num_classes)"
            )
    # nn.BatchNorm fills num_batches_tracked itself when an old checkpoint lacks it.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    problems = [k for k in missing if k not in allowed_missing]
    if problems or unexpected:
        msg = (f"{source} does not match the {type(target).__name__}: "
               f"missing keys ({len(problems)}): {', '.join(problems) or '-'}; "
               f"unexpected keys ({len(unexpected)}): {', '.join(unexpected) or '-'}")
        if strict:
            raise ValueError(msg + " (pass strict=False to load the matching keys anyway)")
        warnings.warn(msg, stacklevel=3)
    target.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    return LoadReport(loaded=[k for k in state if k in own], missing_keys=missing, unexpected_keys=unexpected,
                      skipped_keys=skipped)
