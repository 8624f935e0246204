"""ULLMC (ECCV 2022): Swin backbone, IIWA feature-fusion neck, cross-scale IIWA decoder, on fused window attention.

The release leaves the neck (`Cascade_TRP`) and the decoder (`GTR_DECODER3`)
as empty files; these are fastctx's design following the paper (docs/ullmc.md
has the diagram, the reasons and what differs from the release):

    Swin, strides (4, 2, 1, 1): x0 1/4 (C), x1 1/8 (2C), x2 1/8 (4C), x3 1/8 (8C)

    IIWANeck, top-down over adjacent pairs, one fastctx.nn.IIWA block per pair:
        n2 = IIWA(lateral(x2) + top(x3))
        n1 = IIWA(lateral(x1) + top(n2))
        n0 = IIWA(lateral(x0) + up2(top(n1)))            (nearest upsampling)

    IIWAHead: query q = Linear(x3) at 1/8, then `depth` CrossScaleIIWA layers:
        intra-window attention whose q comes from the query and whose k, v come
            from each neck level, aligned to the query's grid (n0 by 2x2
            space-to-depth); scale s owns its own `num_heads` heads, so all
            scales are attended in ONE window_attention call (heads grouped
            by scale, q/k/v packed into the op's [B, H, W, 3C] layout)
        inter-window attention over one token per window of the query (the
            IIWA form: pooled tokens + sine encoding, full attention, upsampled)
        MLP
    then fuse with n0 at 1/4 (3x3 ConvModule on cat[up(q), n0]) and classify.

    Auxiliary FCNHead on x3 (the release passes x3 to its head for `aux_classes`).

Every attention runs `fastctx.ops.window_attention` (`fused=True`) or its
eager reference maths (`fused=False`); nothing is partitioned, padded or
rolled in memory.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..nn import IIWA
from ..nn.conv_module import UNSET, ConvModule, resolve_layer_args
from ..nn.decode_head import DecodeHead
from ..nn.iiwa import Mlp, fusable_layer_norm
from ..nn.window_msa import DropPath, trunc_normal_
from ..reference.window_attention import _pair, sine_position_encoding, upsample_add
from ..reference.window_attention import window_attention as eager_window_attention
from .losses import ohem_pixel_weight, seg_cross_entropy
from .segmentor import EncoderDecoder

__all__ = ["CrossScaleIIWA", "IIWAHead", "IIWANeck", "ULLMC"]


def _per_level(value, levels: int, name: str) -> list:
    """`value` repeated per level, or a sequence with one entry per level."""
    if isinstance(value, Sequence) and not isinstance(value, str) and not (
            name.startswith("window") and len(value) == 2 and all(isinstance(v, int) for v in value)):
        value = list(value)
        if len(value) != levels:
            raise ValueError(f"{name} needs one entry per neck level ({levels}), got {value}")
        return value
    return [value] * levels


def _attention(qkv: torch.Tensor, heads: int, window, bias_table, fused: bool) -> torch.Tensor:
    """Window attention on packed qkv [B, H, W, 3C]; padded keys are excluded (pad_qkv=None)."""
    if fused:
        return ops.window_attention(qkv, heads, window, bias_table)
    return eager_window_attention(qkv, heads, window, bias_table)


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


class IIWANeck(nn.Module):
    """ULLMC's feature fusion: each pair of adjacent scales fused top-down by an IIWA block.

    Args:
        in_channels: channels of the backbone features (L + 1 of them).
        channels: output channels of the L fused levels (level i fuses x_i and level i + 1).
        num_heads, window_sizes, mlp_ratios: of each level's IIWA block (an entry per level or one for all;
            a pair of ints as window_sizes is one (Wh, Ww) window for all levels).
        drop_path_rate: stochastic depth of the IIWA MLP branches.
        proj_drop: dropout after IIWA's projections and in its MLP.
        fused: run IIWA on fastctx's window_attention op.
    forward(feats: NCHW features) -> tuple of L NCHW maps (channels-last memory), finest first.
    IIWA's attention dropout is 0: it would send training to the eager attention.
    """

    def __init__(self, in_channels: Sequence[int] = (96, 192, 384, 768), channels: Sequence[int] = (96, 192, 384),
                 num_heads=(4, 8, 16), window_sizes=((4, 4), (8, 8), (4, 4)), mlp_ratios=2.0,
                 drop_path_rate: float = 0.1, proj_drop: float = 0.1, fused: bool = True):
        super().__init__()
        in_channels, channels = list(in_channels), list(channels)
        levels = len(channels)
        if levels < 1 or len(in_channels) != levels + 1:
            raise ValueError(f"IIWANeck fuses adjacent pairs: in_channels needs one more entry than channels, got "
                             f"{in_channels} and {channels}")
        heads = _per_level(num_heads, levels, "num_heads")
        windows = _per_level(window_sizes, levels, "window_sizes")
        ratios = _per_level(mlp_ratios, levels, "mlp_ratios")
        self.in_channels, self.channels = in_channels, channels
        self.laterals = nn.ModuleList(nn.Linear(in_channels[i], channels[i]) for i in range(levels))
        # the coarser input of level i: the backbone's last map for the top level, level i + 1's output below
        self.tops = nn.ModuleList(
            nn.Linear(in_channels[i + 1] if i == levels - 1 else channels[i + 1], channels[i]) for i in range(levels))
        self.blocks = nn.ModuleList(
            IIWA(channels[i], windows[i], heads[i], attn_drop=0.0, proj_drop=proj_drop, mlp_ratio=ratios[i],
                 drop_path=drop_path_rate, fused=fused)
            for i in range(levels))
        for m in (*self.laterals, *self.tops):
            trunc_normal_(m.weight, std=0.02)
            nn.init.zeros_(m.bias)

    @property
    def fused(self) -> bool:
        return all(b.fused for b in self.blocks)

    @fused.setter
    def fused(self, value: bool) -> None:
        for b in self.blocks:
            b.fused = bool(value)

    def forward(self, feats: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        if len(feats) != len(self.in_channels) or any(
                f.dim() != 4 or f.shape[1] != c for f, c in zip(feats, self.in_channels)):
            raise ValueError(f"IIWANeck expects {len(self.in_channels)} NCHW features with channels "
                             f"{self.in_channels}, got {[tuple(f.shape) for f in feats]}")
        levels = len(self.channels)
        outs: list[torch.Tensor] = [None] * levels
        above = _nhwc(feats[-1])
        for i in reversed(range(levels)):
            lateral = self.laterals[i](_nhwc(feats[i]))
            top = self.tops[i](above)
            if top.shape[1:3] != lateral.shape[1:3]:
                top = _nhwc(F.interpolate(_nchw(top), size=lateral.shape[1:3], mode="nearest"))
            above = self.blocks[i](lateral + top)
            outs[i] = above
        return tuple(_nchw(o) for o in outs)


class CrossScaleIIWA(nn.Module):
    """An IIWA layer whose intra-window attention takes q from a query map and k, v from several memories.

    x [B, h, w, C] (the query), memories [B, h, w, c_s] (already on the query's grid) -> [B, h, w, C].

        local  = window attention, heads grouped by scale: q = q_proj(x) holds
                 num_heads heads per memory, k, v of scale s = kv_projs[s](m_s);
                 relative position bias per head; padded keys excluded
        x      = norm1(x + proj(local))
        global = full attention over the window tokens of x (window means + sine
                 encoding, qkv2, proj2), upsampled bilinearly (align_corners=True)
        x      = norm2(x + global)
        x      = norm3(x + drop_path(mlp(x)))
    """

    def __init__(self, dim: int, memory_dims: Sequence[int], num_heads: int, window_size, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, drop_path: float = 0.0, fused: bool = True):
        super().__init__()
        if dim < 4 or dim % 4 or dim % num_heads:
            raise ValueError(f"CrossScaleIIWA's dim ({dim}) must be a multiple of 4 (sine encoding) and of "
                             f"num_heads ({num_heads})")
        self.dim, self.num_heads, self.fused = dim, num_heads, fused
        self.window_size = _pair(window_size, "window_size", 1)
        self.num_scales = len(memory_dims)
        wh, ww = self.window_size
        heads = self.num_scales * num_heads
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), heads))
        self.q_proj = nn.Linear(dim, self.num_scales * dim, bias=qkv_bias)
        self.kv_projs = nn.ModuleList(nn.Linear(c, 2 * dim, bias=qkv_bias) for c in memory_dims)
        self.proj = nn.Linear(self.num_scales * dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.qkv2 = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj2 = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=proj_drop)
        self.norm3 = nn.LayerNorm(dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def _pack(self, x: torch.Tensor, memories: Sequence[torch.Tensor]) -> torch.Tensor:
        """[q | k | v] in the op's layout: part p, head g*num_heads + h of scale g, channel j."""
        q = self.q_proj(x)
        kv = [proj(m) for proj, m in zip(self.kv_projs, memories)]
        k = torch.cat([t[..., :self.dim] for t in kv], dim=-1)
        v = torch.cat([t[..., self.dim:] for t in kv], dim=-1)
        return torch.cat([q, k, v], dim=-1)

    def forward(self, x: torch.Tensor, memories: Sequence[torch.Tensor]) -> torch.Tensor:
        if len(memories) != self.num_scales or any(m.shape[:3] != x.shape[:3] for m in memories):
            raise ValueError(f"CrossScaleIIWA expects {self.num_scales} memories on the query's grid "
                             f"{tuple(x.shape[:3])}, got {[tuple(m.shape) for m in memories]}")
        heads = self.num_scales * self.num_heads
        local = _attention(self._pack(x, memories), heads, self.window_size, self.relative_position_bias_table,
                           self.fused)
        x = self.norm1(x + self.proj_drop(self.proj(local)))

        # one token per window (regions of about the window's size), as IIWA's inter-window attention
        grid = (math.ceil(x.shape[1] / self.window_size[0]), math.ceil(x.shape[2] / self.window_size[1]))
        tokens = _nhwc(F.adaptive_avg_pool2d(_nchw(x), grid))
        tokens = tokens + sine_position_encoding(*grid, self.dim, device=x.device).to(x.dtype)
        glob = _attention(self.qkv2(tokens), self.num_heads, grid, None, self.fused)
        glob = self.proj_drop(self.proj2(glob))
        norm = fusable_layer_norm(self.norm2, self.dim) if self.fused else None
        if norm is not None:  # the sum and norm2 of it in one pass
            x = ops.upsample_add_layer_norm(glob, x, *norm)[1]
        else:
            x = self.norm2((ops.upsample_add if self.fused else upsample_add)(glob, x))
        return self.norm3(x + self.drop_path(self.mlp(x)))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, scales={self.num_scales}, num_heads={self.num_heads} per scale, "
                f"window_size={self.window_size}, fused={self.fused}")


class IIWAHead(DecodeHead):
    """ULLMC's segmentation decoder: a stride-8 query attends to all neck levels at once, then a 1/4 fusion.

    forward((backbone_feats, neck_feats)) -> logits [B, num_classes, h/4, w/4] (the finest neck level's size).

    Args:
        in_channels: channels of the backbone feature giving the query (in_index).
        memory_channels: channels of the neck levels (finest first).
        memory_strides: each neck level's stride relative to the query (ULLMC: (2, 1, 1)); a level of
            stride r is brought to the query's grid by r x r space-to-depth before its k/v projection.
        embed_dims: width of the decoder layers.
        channels: width of the 1/4 fusion conv, the classifier's input.
        num_classes, dropout_ratio, align_corners: as every head (DecodeHead).
        num_heads: heads per memory scale (the intra-window attention runs scales x num_heads heads).
        window_size: of the intra-window attention.
        depth: decoder layers. mlp_ratio, drop_path_rate (linear over the layers), proj_drop: of the layers.
        norm, norm_cfg, act, act_cfg: of the fusion ConvModule (BN + ReLU by default).
        in_index: backbone feature used as the query (default the last).
        fused: run the attentions on fastctx's window_attention op.
        ignore_index, loss_decode: as mmseg's heads (loss_decode: the CE weight).
    """

    def __init__(self, in_channels: int, memory_channels: Sequence[int], num_classes: int,
                 memory_strides: Sequence[int] = (2, 1, 1), embed_dims: int = 384, channels: int = 256,
                 num_heads: int = 8, window_size=(8, 8), depth: int = 1, mlp_ratio: float = 4.0,
                 drop_path_rate: float = 0.2, proj_drop: float = 0.0, dropout_ratio: float = 0.1,
                 align_corners: bool = False, norm=UNSET, in_index: int = -1, *, norm_cfg=UNSET, act=UNSET,
                 act_cfg=UNSET, fused: bool = True, ignore_index: int = 255, loss_decode=None):
        super().__init__(channels, num_classes, dropout_ratio, align_corners, ignore_index=ignore_index,
                         loss_decode=loss_decode)
        memory_channels, memory_strides = list(memory_channels), list(memory_strides)
        if not memory_channels or len(memory_strides) != len(memory_channels) or any(
                not isinstance(r, int) or r < 1 for r in memory_strides):
            raise ValueError(f"memory_strides needs one positive int per memory level ({len(memory_channels)}), "
                             f"got {memory_strides}")
        if depth < 1:
            raise ValueError(f"IIWAHead needs depth >= 1, got {depth}")
        norm, act = resolve_layer_args(norm, norm_cfg, act, act_cfg, None, "IIWAHead")
        self.in_channels, self.in_index = in_channels, in_index
        self.memory_channels, self.memory_strides = memory_channels, memory_strides
        self.embed_dims = embed_dims
        self.query_proj = nn.Linear(in_channels, embed_dims)
        merged = [c * r * r for c, r in zip(memory_channels, memory_strides)]
        rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # CPU: buildable on meta
        self.layers = nn.ModuleList(
            CrossScaleIIWA(embed_dims, merged, num_heads, window_size, mlp_ratio, proj_drop=proj_drop,
                           drop_path=rates[i], fused=fused)
            for i in range(depth))
        self.fuse = ConvModule(embed_dims + memory_channels[0], channels, 3, padding=1, norm=norm, act=act)
        trunc_normal_(self.query_proj.weight, std=0.02)
        nn.init.zeros_(self.query_proj.bias)

    @property
    def fused(self) -> bool:
        return all(layer.fused for layer in self.layers)

    @fused.setter
    def fused(self, value: bool) -> None:
        for layer in self.layers:
            layer.fused = bool(value)

    def _align(self, memory: torch.Tensor, stride: int, size: tuple[int, int]) -> torch.Tensor:
        """An NCHW neck level on the query's grid, channels last: bottom/right zero padding, space-to-depth."""
        if stride == 1 and tuple(memory.shape[2:]) == size:
            return _nhwc(memory)
        height, width = size[0] * stride, size[1] * stride
        if memory.shape[2] > height or memory.shape[3] > width:
            raise ValueError(f"a memory of stride {stride} relative to the query has {tuple(memory.shape[2:])} "
                             f"pixels, more than {stride} x the query's {size}")
        memory = F.pad(memory, (0, width - memory.shape[3], 0, height - memory.shape[2]))
        return _nhwc(F.pixel_unshuffle(memory, stride) if stride > 1 else memory)

    def forward(self, inputs) -> torch.Tensor:
        if not (isinstance(inputs, (tuple, list)) and len(inputs) == 2):
            raise TypeError("IIWAHead takes (backbone features, neck features)")
        feats, memories = inputs
        if len(memories) != len(self.memory_channels) or any(
                m.dim() != 4 or m.shape[1] != c for m, c in zip(memories, self.memory_channels)):
            raise ValueError(f"IIWAHead expects {len(self.memory_channels)} NCHW neck levels with channels "
                             f"{self.memory_channels}, got {[tuple(m.shape) for m in memories]}")
        query = feats[self.in_index]
        if query.dim() != 4 or query.shape[1] != self.in_channels:
            raise ValueError(f"IIWAHead expects the query feature [B, {self.in_channels}, h, w] (in_index "
                             f"{self.in_index}), got {tuple(query.shape)}")
        size = tuple(query.shape[2:])
        aligned = [self._align(m, r, size) for m, r in zip(memories, self.memory_strides)]
        x = self.query_proj(_nhwc(query))
        for layer in self.layers:
            x = layer(x, aligned)
        fine = memories[0]
        x = F.interpolate(_nchw(x), size=fine.shape[2:], mode="bilinear", align_corners=self.align_corners)
        return self.cls_seg(self.fuse(torch.cat([x, fine], dim=1)))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, memory_channels={self.memory_channels}, "
                f"memory_strides={self.memory_strides}, embed_dims={self.embed_dims}, channels={self.channels}, "
                f"num_classes={self.num_classes}")


class ULLMC(EncoderDecoder):
    """backbone -> neck -> decode head on (backbone features, neck features) (+ auxiliary head on the backbone's).

    Args: as EncoderDecoder, plus
        neck: e.g. IIWANeck, mapping the backbone features to the decoder's memories.
        ohem: None, or dict(thresh=0.7, min_kept=100000): the decode loss keeps only the pixels
            `ohem_pixel_weight` selects (mmseg's OHEMPixelSampler on the decode head, as the release).
    `fused` switches the backbone's, the neck's and the head's window attention together.
    """

    def __init__(self, backbone: nn.Module, neck: nn.Module, decode_head: nn.Module,
                 auxiliary_head: nn.Module | None = None, *, num_classes: int | None = None,
                 align_corners: bool = False, decode_loss_weight: float | None = None,
                 aux_loss_weight: float | None = None, ignore_index: int = 255, ohem: dict | None = None):
        super().__init__(backbone, decode_head, auxiliary_head, num_classes=num_classes, align_corners=align_corners,
                         decode_loss_weight=decode_loss_weight, aux_loss_weight=aux_loss_weight,
                         ignore_index=ignore_index)
        self.neck = neck
        if ohem is not None:
            unknown = set(ohem) - {"thresh", "min_kept"}
            thresh, min_kept = ohem.get("thresh"), ohem.get("min_kept", 100000)
            if unknown or thresh is None or not 0 < thresh <= 1 or not isinstance(min_kept, int) or min_kept < 0:
                raise ValueError(f"ohem must be dict(thresh in (0, 1], min_kept >= 0), got {ohem!r}")
            ohem = dict(thresh=float(thresh), min_kept=min_kept)
        self.ohem = ohem

    @property
    def fused(self) -> bool:
        return all(bool(getattr(m, "fused", True)) for m in (self.backbone, self.neck, self.decode_head))

    @fused.setter
    def fused(self, value: bool) -> None:
        for m in (self.backbone, self.neck, self.decode_head):
            if hasattr(m, "fused"):
                m.fused = bool(value)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        feats = self.extract_feat(img)
        logits = self.decode_head((feats, self.neck(feats)))
        return F.interpolate(logits, size=img.shape[2:], mode="bilinear", align_corners=self.align_corners)

    def _losses(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.extract_feat(img)
        logits = self.decode_head((feats, self.neck(feats)))
        logits = F.interpolate(logits, size=label.shape[1:], mode="bilinear", align_corners=self.align_corners)
        weight = None
        if self.ohem is not None:
            weight = ohem_pixel_weight(logits, label, self.ohem["thresh"], self.ohem["min_kept"], self.ignore_index)
        ce = dict(ignore_index=self.ignore_index, align_corners=self.align_corners)
        losses = {"decode.loss_ce": seg_cross_entropy(logits, label, self.decode_loss_weight, pixel_weight=weight,
                                                      **ce)}
        if self.auxiliary_head is not None:
            losses["aux.loss_ce"] = seg_cross_entropy(self.auxiliary_head(feats), label, self.aux_loss_weight, **ce)
        return losses

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ohem={self.ohem}"
