"""Swin Transformer backbone (mmsegmentation 1.x `SwinTransformer`) on fastctx's window attention.

Module and parameter names follow mmseg, so its checkpoints load with
strict=True: `patch_embed.{projection,norm}`, `absolute_pos_embed`,
`stages.{i}.blocks.{j}.{norm1, attn.w_msa.{qkv, proj, relative_position_bias_table,
relative_position_index}, norm2, ffn.layers.{0.0, 1}}`, `stages.{i}.downsample.{norm,
reduction}` (PatchMerging) and `norm{i}` for each output. Official (Microsoft)
Swin checkpoints load after `swin_converter`, as mmseg's
`tools/model_converters/swin2mmseg.py` converts them.

Each block's attention is `fastctx.nn.ShiftWindowMSA`: with `fused=True` one
call of `fastctx.ops.window_attention` per block (padding, cyclic shift and
mask by index arithmetic), with `fused=False` mmseg's eager maths.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint as cp

from ..nn.window_msa import DropPath, ShiftWindowMSA, trunc_normal_
from ..reference.window_attention import _pair

__all__ = ["FFN", "PatchEmbed", "PatchMerging", "SwinBlock", "SwinBlockSequence", "SwinTransformer",
           "swin_converter"]


def _norm(norm_cfg, channels: int) -> nn.LayerNorm:
    """mmcv's build_norm_layer for the only norm Swin uses: dict(type='LN'[, eps][, requires_grad])."""
    if not isinstance(norm_cfg, Mapping) or norm_cfg.get("type") != "LN" \
            or set(norm_cfg) - {"type", "eps", "requires_grad"}:
        raise ValueError(f"norm_cfg must be dict(type='LN'[, eps=..., requires_grad=...]), got {norm_cfg!r}")
    norm = nn.LayerNorm(channels, eps=norm_cfg.get("eps", 1e-5))
    for p in norm.parameters():
        p.requires_grad_(bool(norm_cfg.get("requires_grad", True)))
    return norm


def _act(act_cfg) -> nn.Module:
    if not isinstance(act_cfg, Mapping) or act_cfg.get("type") != "GELU" or set(act_cfg) - {"type"}:
        raise ValueError(f"act_cfg must be dict(type='GELU') (Swin's activation), got {act_cfg!r}")
    return nn.GELU()


def _corner_pad_shape(size, kernel, stride, dilation) -> tuple[int, int]:
    """mmseg's AdaptivePadding: padding (bottom, right) so the kernel covers every input position."""
    pads = []
    for n, k, s, d in zip(size, kernel, stride, dilation):
        out = math.ceil(n / s)
        pads.append(max((out - 1) * s + (k - 1) * d + 1 - n, 0))
    return pads[0], pads[1]


class PatchEmbed(nn.Module):
    """Image to tokens: a Conv2d with kernel = stride = patch size, bottom/right padded ('corner'), then LN.

    forward(x [B, C_in, H, W]) -> (tokens [B, h*w, C], (h, w)); mmseg's `PatchEmbed`
    with conv_type Conv2d and 'corner' (or integer) padding.
    """

    def __init__(self, in_channels: int = 3, embed_dims: int = 768, kernel_size=16, stride=None,
                 padding="corner", dilation=1, bias: bool = True, norm_cfg=None):
        super().__init__()
        self.embed_dims = embed_dims
        kernel_size = _pair(kernel_size, "kernel_size", 1)
        stride = kernel_size if stride is None else _pair(stride, "stride", 1)
        dilation = _pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding != "corner":
                raise ValueError(f"padding must be 'corner' or an int, got {padding!r}")
            self.adaptive_padding = (kernel_size, stride, dilation)
            padding = 0
        else:
            self.adaptive_padding = None
        self.projection = nn.Conv2d(in_channels, embed_dims, kernel_size, stride=stride,
                                    padding=_pair(padding, "padding", 0), dilation=dilation, bias=bias)
        self.norm = _norm(norm_cfg, embed_dims) if norm_cfg is not None else None

    def forward(self, x: torch.Tensor):
        if self.adaptive_padding is not None:
            pad_h, pad_w = _corner_pad_shape(x.shape[-2:], *self.adaptive_padding)
            if pad_h > 0 or pad_w > 0:
                x = F.pad(x, [0, pad_w, 0, pad_h])
        x = self.projection(x)
        out_size = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return x, out_size


class PatchMerging(nn.Module):
    """Merge each kernel_size patch of tokens into one token: unfold, LN, Linear (mmseg's `PatchMerging`).

    forward(x [B, H*W, C_in], (H, W)) -> (x [B, h*w, C_out], (h, w)). Channel
    order of a merged token is mmseg's nn.Unfold order (c, kh, kw), which
    `swin_converter` maps the official checkpoints' order onto.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size=2, stride=None, padding="corner",
                 dilation=1, bias: bool = False, norm_cfg=dict(type="LN")):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        kernel_size = _pair(kernel_size, "kernel_size", 1)
        stride = _pair(stride, "stride", 1) if stride else kernel_size
        dilation = _pair(dilation, "dilation", 1)
        if isinstance(padding, str):
            if padding != "corner":
                raise ValueError(f"padding must be 'corner' or an int, got {padding!r}")
            self.adaptive_padding = (kernel_size, stride, dilation)
            padding = (0, 0)
        else:
            self.adaptive_padding = None
            padding = _pair(padding, "padding", 0)
        self.kernel_size, self.stride, self.padding, self.dilation = kernel_size, stride, padding, dilation
        sample_dim = kernel_size[0] * kernel_size[1] * in_channels
        self.norm = _norm(norm_cfg, sample_dim) if norm_cfg is not None else None
        self.reduction = nn.Linear(sample_dim, out_channels, bias=bias)

    def forward(self, x: torch.Tensor, input_size):
        batch, length, channels = x.shape
        height, width = input_size
        if length != height * width or channels != self.in_channels:
            raise ValueError(f"PatchMerging expects x [B, H*W, {self.in_channels}] with (H, W) = "
                             f"{tuple(input_size)}, got {tuple(x.shape)}")
        x = x.view(batch, height, width, channels).permute(0, 3, 1, 2)
        if self.adaptive_padding is not None:
            pad_h, pad_w = _corner_pad_shape((height, width), *self.adaptive_padding)
            if pad_h > 0 or pad_w > 0:
                x = F.pad(x, [0, pad_w, 0, pad_h])
            height, width = x.shape[-2:]
        x = F.unfold(x, self.kernel_size, dilation=self.dilation, padding=self.padding, stride=self.stride)
        out_size = tuple(
            (n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, p, d, k, s in zip((height, width), self.padding, self.dilation, self.kernel_size, self.stride)
        )
        x = x.transpose(1, 2)
        if self.norm is not None:
            x = self.norm(x)
        return self.reduction(x), out_size


class FFN(nn.Module):
    """mmcv's FFN with two fcs and identity: identity + dropout_layer(layers(x)), same module names."""

    def __init__(self, embed_dims: int, feedforward_channels: int, ffn_drop: float = 0.0, drop_path: float = 0.0,
                 act_cfg=dict(type="GELU")):
        super().__init__()
        self.embed_dims = embed_dims
        self.feedforward_channels = feedforward_channels
        self.layers = nn.Sequential(
            nn.Sequential(nn.Linear(embed_dims, feedforward_channels), _act(act_cfg), nn.Dropout(ffn_drop)),
            nn.Linear(feedforward_channels, embed_dims),
            nn.Dropout(ffn_drop),
        )
        self.dropout_layer = DropPath(drop_path)

    def forward(self, x: torch.Tensor, identity: torch.Tensor | None = None) -> torch.Tensor:
        return (x if identity is None else identity) + self.dropout_layer(self.layers(x))


class SwinBlock(nn.Module):
    """norm1 -> (shifted) window attention -> residual -> norm2 -> FFN with residual (mmseg `SwinBlock`)."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, window_size=7,
                 shift: bool = False, qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, act_cfg=dict(type="GELU"),
                 norm_cfg=dict(type="LN"), with_cp: bool = False, fused: bool = True):
        super().__init__()
        self.with_cp = with_cp
        self.norm1 = _norm(norm_cfg, embed_dims)
        if not shift:
            shift_size = 0
        elif isinstance(window_size, int):
            shift_size = window_size // 2
        else:
            shift_size = tuple(w // 2 for w in _pair(window_size, "window_size", 1))
        self.attn = ShiftWindowMSA(
            embed_dims, num_heads, window_size, shift_size=shift_size, qkv_bias=qkv_bias, qk_scale=qk_scale,
            attn_drop_rate=attn_drop_rate, proj_drop_rate=drop_rate,
            dropout_layer=dict(type="DropPath", drop_prob=drop_path_rate), fused=fused,
        )
        self.norm2 = _norm(norm_cfg, embed_dims)
        self.ffn = FFN(embed_dims, feedforward_channels, ffn_drop=drop_rate, drop_path=drop_path_rate,
                       act_cfg=act_cfg)

    def forward(self, x: torch.Tensor, hw_shape) -> torch.Tensor:
        def inner_forward(x):
            identity = x
            x = self.attn(self.norm1(x), hw_shape) + identity
            return self.ffn(self.norm2(x), identity=x)

        if self.with_cp and x.requires_grad:
            return cp.checkpoint(inner_forward, x, use_reentrant=False)
        return inner_forward(x)


class SwinBlockSequence(nn.Module):
    """One stage: `depth` blocks alternating regular and shifted windows, then an optional PatchMerging."""

    def __init__(self, embed_dims: int, num_heads: int, feedforward_channels: int, depth: int, window_size=7,
                 qkv_bias: bool = True, qk_scale: float | None = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate=0.0, downsample: nn.Module | None = None,
                 act_cfg=dict(type="GELU"), norm_cfg=dict(type="LN"), with_cp: bool = False, fused: bool = True):
        super().__init__()
        rates = list(drop_path_rate) if isinstance(drop_path_rate, Sequence) else [drop_path_rate] * depth
        if len(rates) != depth:
            raise ValueError(f"drop_path_rate has {len(rates)} entries for {depth} blocks")
        self.blocks = nn.ModuleList([
            SwinBlock(embed_dims, num_heads, feedforward_channels, window_size=window_size, shift=i % 2 == 1,
                      qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                      drop_path_rate=rates[i], act_cfg=act_cfg, norm_cfg=norm_cfg, with_cp=with_cp, fused=fused)
            for i in range(depth)
        ])
        self.downsample = downsample

    def forward(self, x: torch.Tensor, hw_shape):
        for block in self.blocks:
            x = block(x, hw_shape)
        if self.downsample is not None:
            x_down, down_hw_shape = self.downsample(x, hw_shape)
            return x_down, down_hw_shape, x, hw_shape
        return x, hw_shape, x, hw_shape


class SwinTransformer(nn.Module):
    """Swin Transformer backbone with mmseg 1.x arguments and names; forward returns NCHW features.

    Args (mmseg's): pretrain_img_size, in_channels, embed_dims, patch_size,
    window_size, mlp_ratio, depths, num_heads, strides (patch embedding and
    each PatchMerging; ULLMC uses (4, 2, 1, 1)), out_indices, qkv_bias,
    qk_scale, patch_norm, drop_rate, attn_drop_rate, drop_path_rate (linearly
    increasing over all blocks), use_abs_pos_embed, act_cfg (GELU), norm_cfg
    (LN), with_cp (activation checkpointing per block), frozen_stages; plus
    `fused` (fastctx's window attention op, or mmseg's eager maths).

    Initialised as mmseg's `init_weights` without a checkpoint: truncated
    normal (std 0.02) Linear weights with zero biases, LayerNorm 1 / 0, the
    absolute position embedding truncated normal, relative position bias
    tables zero (mmseg's backbone init does not reach WindowMSA.init_weights);
    modules are created in mmseg's order, so a seed gives mmseg's weights.
    Load pretrained weights with `load_state_dict` (or
    `fastctx.models.load_pretrained`); official checkpoints via `swin_converter`.
    """

    def __init__(self, pretrain_img_size=224, in_channels: int = 3, embed_dims: int = 96, patch_size: int = 4,
                 window_size: int = 7, mlp_ratio: float = 4, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), strides: Sequence[int] = (4, 2, 2, 2),
                 out_indices: Sequence[int] = (0, 1, 2, 3), qkv_bias: bool = True, qk_scale: float | None = None,
                 patch_norm: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, use_abs_pos_embed: bool = False, act_cfg=dict(type="GELU"),
                 norm_cfg=dict(type="LN"), with_cp: bool = False, frozen_stages: int = -1, fused: bool = True):
        super().__init__()
        depths, num_heads, strides, out_indices = tuple(depths), tuple(num_heads), tuple(strides), tuple(out_indices)
        num_layers = len(depths)
        if num_layers == 0 or len(num_heads) != num_layers or len(strides) != num_layers:
            raise ValueError(f"depths, num_heads and strides need one entry per stage, got {depths}, {num_heads} "
                             f"and {strides}")
        if strides[0] != patch_size:
            raise ValueError(f"strides[0] ({strides[0]}) must equal patch_size ({patch_size}): the patch embedding "
                             "does not overlap")
        if not out_indices or any(not 0 <= i < num_layers for i in out_indices):
            raise ValueError(f"out_indices must be stage indices in 0..{num_layers - 1}, got {out_indices}")
        if not -1 <= frozen_stages <= num_layers:
            raise ValueError(f"frozen_stages must be in -1..{num_layers}, got {frozen_stages}")
        for i, heads in enumerate(num_heads):
            if (embed_dims * 2 ** i) % heads:
                raise ValueError(f"stage {i} has {embed_dims * 2 ** i} channels, not divisible by its "
                                 f"{heads} heads")
        pretrain_img_size = _pair(pretrain_img_size, "pretrain_img_size", 1)
        self.in_channels = in_channels
        self.out_indices = out_indices
        self.use_abs_pos_embed = use_abs_pos_embed
        self.frozen_stages = frozen_stages

        self.patch_embed = PatchEmbed(in_channels, embed_dims, kernel_size=patch_size, stride=strides[0],
                                      padding="corner", norm_cfg=norm_cfg if patch_norm else None)
        if use_abs_pos_embed:
            num_patches = (pretrain_img_size[0] // patch_size) * (pretrain_img_size[1] // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros((1, num_patches, embed_dims)))
        self.drop_after_pos = nn.Dropout(p=drop_rate)

        total_depth = sum(depths)
        # mmseg's float32 linspace values; on the CPU explicitly, so a model built under a meta device
        # context (the benchmark's architecture check) can read them.
        dpr = torch.linspace(0, drop_path_rate, total_depth, device="cpu").tolist()
        self.stages = nn.ModuleList()
        channels = embed_dims
        for i in range(num_layers):
            # Created before the stage's blocks, as in mmseg (the order of default-init random draws).
            downsample = PatchMerging(channels, 2 * channels, stride=strides[i + 1],
                                      norm_cfg=norm_cfg if patch_norm else None) if i < num_layers - 1 else None
            self.stages.append(SwinBlockSequence(
                channels, num_heads[i], int(mlp_ratio * channels), depths[i], window_size=window_size,
                qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                drop_path_rate=dpr[sum(depths[:i]):sum(depths[:i + 1])], downsample=downsample, act_cfg=act_cfg,
                norm_cfg=norm_cfg, with_cp=with_cp, fused=fused,
            ))
            if downsample is not None:
                channels = downsample.out_channels
        self.num_features = [int(embed_dims * 2 ** i) for i in range(num_layers)]
        self.out_channels = [self.num_features[i] for i in out_indices]
        for i in out_indices:
            self.add_module(f"norm{i}", _norm(norm_cfg, self.num_features[i]))

        self.init_weights()
        self._freeze_stages()

    @property
    def fused(self) -> bool:
        return all(m.fused for m in self.modules() if isinstance(m, ShiftWindowMSA))

    @fused.setter
    def fused(self, value: bool) -> None:
        for m in self.modules():
            if isinstance(m, ShiftWindowMSA):
                m.fused = value

    @torch.no_grad()
    def init_weights(self) -> None:
        """mmseg's SwinTransformer.init_weights without a checkpoint (see the class docstring)."""
        if self.use_abs_pos_embed:
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _freeze_stages(self) -> None:
        if self.frozen_stages >= 0:
            self.patch_embed.eval()
            for p in self.patch_embed.parameters():
                p.requires_grad_(False)
            if self.use_abs_pos_embed:
                self.absolute_pos_embed.requires_grad_(False)
            self.drop_after_pos.eval()
        for i in range(1, self.frozen_stages + 1):
            frozen = [self.stages[i - 1]]
            if i - 1 in self.out_indices:
                frozen.append(getattr(self, f"norm{i - 1}"))
            for m in frozen:
                m.eval()
                for p in m.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> "SwinTransformer":
        """As nn.Module.train, but frozen stages stay in eval mode."""
        super().train(mode)
        self._freeze_stages()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"SwinTransformer expects images of shape [B, {self.in_channels}, H, W], got {shape}")
        if not x.is_floating_point():
            raise TypeError(f"SwinTransformer expects a floating-point input, got {x.dtype}")
        x, hw_shape = self.patch_embed(x)
        if self.use_abs_pos_embed:
            if x.shape[1] != self.absolute_pos_embed.shape[1]:
                raise ValueError(f"use_abs_pos_embed needs the pretraining token count "
                                 f"{self.absolute_pos_embed.shape[1]}, got {hw_shape[0]}x{hw_shape[1]} tokens")
            x = x + self.absolute_pos_embed
        x = self.drop_after_pos(x)

        outs = []
        for i, stage in enumerate(self.stages):
            x, hw_shape, out, out_hw_shape = stage(x, hw_shape)
            if i in self.out_indices:
                out = getattr(self, f"norm{i}")(out)
                outs.append(out.view(-1, *out_hw_shape, self.num_features[i]).permute(0, 3, 1, 2).contiguous())
        return tuple(outs)


def swin_converter(official_state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """An official (Microsoft) Swin state_dict in mmseg's layout, as mmseg's `swin2mmseg.py` converts it.

    `layers` -> `stages`, `attn.` -> `attn.w_msa.`, `mlp.fc1` / `mlp.fc2` ->
    `ffn.layers.0.0` / `ffn.layers.1`, `patch_embed.proj` -> `patch_embed.projection`;
    PatchMerging's norm and reduction are permuted from the official
    [x(0,0), x(1,0), x(0,1), x(1,1)] concatenation to nn.Unfold's (c, kh, kw)
    order. The classifier (`head.*`) is dropped as swin2mmseg does, and so are
    the keys mmseg's (non-strict) loader ignores, so the result loads strictly
    except for the output norms `norm{i}`, which official checkpoints lack:
    the shifted blocks' `attn_mask` buffers (rebuilt from the input size) and
    the classifier's final `norm.*`. Accepts a {"model": ...} or
    {"state_dict": ...} wrapper.
    """
    for wrapper in ("state_dict", "model"):
        if isinstance(official_state_dict.get(wrapper), Mapping):
            official_state_dict = official_state_dict[wrapper]
            break

    def unfold_reduction_order(w: torch.Tensor) -> torch.Tensor:
        out_channels, in_channels = w.shape
        w = w.reshape(out_channels, 4, in_channels // 4)
        return w[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(out_channels, in_channels)

    def unfold_norm_order(w: torch.Tensor) -> torch.Tensor:
        in_channels = w.shape[0]
        w = w.reshape(4, in_channels // 4)
        return w[[0, 2, 1, 3], :].transpose(0, 1).reshape(in_channels)

    converted: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in official_state_dict.items():
        if key.startswith("head") or key.startswith("norm.") or key.endswith(".attn_mask"):
            continue
        new_key, new_value = key, value
        if key.startswith("layers"):
            if "attn." in key:
                new_key = key.replace("attn.", "attn.w_msa.")
            elif "mlp." in key:
                if "mlp.fc1." in key:
                    new_key = key.replace("mlp.fc1.", "ffn.layers.0.0.")
                elif "mlp.fc2." in key:
                    new_key = key.replace("mlp.fc2.", "ffn.layers.1.")
                else:
                    new_key = key.replace("mlp.", "ffn.")
            elif "downsample" in key:
                if "reduction." in key:
                    new_value = unfold_reduction_order(value)
                elif "norm." in key:
                    new_value = unfold_norm_order(value)
            new_key = new_key.replace("layers", "stages", 1)
        elif key.startswith("patch_embed") and "proj" in key:
            new_key = key.replace("proj", "projection")
        converted[new_key] = new_value
    return converted
