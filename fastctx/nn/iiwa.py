"""ULLMC's IIWA layer: intra- and inter-window attention (released `mmseg/models/utils/iiwa_layers.py`).

`IIWA` is the released self-attention layer (`SelfIIWA` in the released file,
`WindowAttention` where the release imports it) with its parameter and buffer
names, so its state_dicts load with strict=True: `relative_position_bias_table`,
`relative_position_index`, `qkv`, `qkv2`, `proj.{0,1}` (LayerNorm, Linear),
`proj2.{0,1}`, `norm1`, `norm2`, `mlp.fc1`, `mlp.fc2`. Its forward, on
x [B, H, W, C] (channels last), is the released one:

  pad to multiples of the window (zeros, bottom/right)
  intra-window attention (qkv, relative position bias) + residual
  x = x + proj_drop(proj(x))                         proj = LayerNorm + Linear
  inter-window: average-pool each window to a token, add the sine positional
      encoding, full attention over the tokens with qkv2 (no bias), upsample
      bilinearly (align_corners=True) to the padded size + residual
  x = x + proj_drop2(proj2(x))
  crop
  x = norm2(x + drop_path(mlp(norm1(x))))

With `fused=True` both attentions run `fastctx.ops.window_attention`: the
intra-window one over the padded map, the inter-window one with one window
covering the whole token grid. The map is padded before the qkv Linear, as
released, because the inter-window path averages the padded tokens' outputs
too: the op's outputs exist only for the tokens it is given. Window pooling
and the positional encoding run as `fastctx.ops.window_pool` (the encoding,
parameter-free, is cached per grid size and device, outside the state_dict),
the upsample + residual with proj2's LayerNorm of the sum as
`fastctx.ops.upsample_add_layer_norm` (one pass writes the sum and its
normalisation; proj2's Linear then reads the latter); `fused=False` runs
their eager forms (`fastctx.reference.window_attention`). Active attention dropout (training with
attn_drop > 0; the released default is 0.1) or a mask runs the eager maths
for the intra-window attention; the inter-window attention has no dropout.

Not here: the released cross-scale layer (`MS_CrossIIWA`, imported as
`WindowCrossAttention`) matches query windows to key windows with a Hungarian
assignment (scipy's linear_sum_assignment on the CPU, per image) before
attending; that data-dependent, host-side step is outside the fused path, and
the layer is left to eager code.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..reference.window_attention import (
    _pair, relative_position_index, sine_position_encoding, upsample_add, window_partition, window_pool,
    window_reverse,
)
from .window_msa import DropPath, trunc_normal_

__all__ = ["IIWA", "Mlp", "PositionEmbeddingSine"]


def fusable_layer_norm(norm: nn.Module, channels: int) -> tuple | None:
    """(weight, bias, eps) of `norm` when it is a LayerNorm over the last dimension of size `channels` (the
    norm `ops.upsample_add_layer_norm` fuses), else None (another norm class runs as a module)."""
    if type(norm) is nn.LayerNorm and tuple(norm.normalized_shape) == (channels,):
        return norm.weight, norm.bias, norm.eps
    return None


class PositionEmbeddingSine(nn.Module):
    """The released sine positional encoding of a feature map: x [B, C, H, W] -> [B, C, H, W] (float32).

    Only x's shape and device matter. C / 2 channels encode the row, C / 2 the
    column (see `fastctx.reference.window_attention.sine_position_encoding`);
    as released, the number of features comes from x, not `num_pos_feats`.
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"PositionEmbeddingSine expects x [B, C, H, W], got {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        return self.grid(height, width, channels, x.device).permute(2, 0, 1).unsqueeze(0).expand(batch, -1, -1, -1)

    def grid(self, height: int, width: int, channels: int, device=None) -> torch.Tensor:
        """The encoding of a [height, width] grid, channels last: [height, width, channels], float32."""
        return sine_position_encoding(height, width, channels, normalize=self.normalize, temperature=self.temperature,
                                      scale=self.scale if self.normalize else None, device=device)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}, scale={self.scale}"


class Mlp(nn.Module):
    """The released Mlp: fc1 -> act -> drop -> fc2 -> drop."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer: type[nn.Module] = nn.GELU, drop: float = 0.0):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = nn.Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class IIWA(nn.Module):
    """Intra- and inter-window attention block of ULLMC, on x [B, H, W, C] -> [B, H, W, C].

    Args (the released `SelfIIWA`'s, same defaults):
        dim: channels C (a multiple of 4, for the positional encoding, and of num_heads).
        window_size: (Wh, Ww) or an int.
        num_heads: heads of both attentions.
        qkv_bias: bias in qkv and qkv2.
        qk_scale: logit scale of both attentions, default head_dim ** -0.5.
        attn_drop: dropout on the intra-window attention weights.
        proj_drop: dropout after proj, proj2 and in the Mlp.
        mlp_ratio: Mlp hidden channels / C.
        act_layer, norm_layer: Mlp activation and the norm class of norm1/norm2.
        drop_path: stochastic depth on the Mlp branch.
        fused: run the fused op (True) or the released eager maths (False).
    forward(x, mask=None): mask, as released, is an additive [nW, N, N] mask on
    the intra-window logits (nW windows of the padded map per image).
    """

    def __init__(self, dim: int, window_size, num_heads: int, qkv_bias: bool = True, qk_scale: float | None = None,
                 attn_drop: float = 0.1, proj_drop: float = 0.1, mlp_ratio: float = 4.0,
                 act_layer: type[nn.Module] = nn.GELU, norm_layer: type[nn.Module] = nn.LayerNorm,
                 drop_path: float = 0.1, fused: bool = True):
        super().__init__()
        if dim < 4 or dim % 4:
            raise ValueError(f"IIWA's dim must be a positive multiple of 4 (its sine positional encoding pairs "
                             f"sin/cos over two axes), got {dim}")
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"IIWA's dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.dim = dim
        self.window_size = _pair(window_size, "window_size", 1)
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.fused = fused

        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.qkv2 = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.proj2 = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))
        self.proj_drop = nn.Dropout(proj_drop)
        self.proj_drop2 = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.softmax = nn.Softmax(dim=-1)

        self.norm1 = norm_layer(dim)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=proj_drop)
        self.pose_encoding = PositionEmbeddingSine(normalize=True)
        self._sine_grids: dict[tuple, torch.Tensor] = {}  # see _sine_grid (fused path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 4 or x.shape[3] != self.dim:
            raise ValueError(f"IIWA expects x [B, H, W, {self.dim}] (channels last), got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"IIWA expects a floating-point input, got {x.dtype}")
        batch, height, width, channels = x.shape
        wh, ww = self.window_size
        pad_r = (ww - width % ww) % ww
        pad_b = (wh - height % wh) % wh
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = x.shape[1], x.shape[2]

        # intra-window attention + residual, then proj as a second residual
        x = x + self._intra_window_attention(x, mask)
        x = x + self.proj_drop(self.proj(x))

        # inter-window attention over one token per window
        grid = (hp // wh, wp // ww)
        if self.fused:  # pooling + encoding in one op, attention, upsample + residual in one op
            tokens = ops.window_pool(x, self.window_size, self._sine_grid(*grid, channels, x.device))
            norm = fusable_layer_norm(self.proj2[0], channels) if len(self.proj2) == 2 else None
            if norm is not None:  # the sum and proj2's LayerNorm of it in one pass
                x, normed = ops.upsample_add_layer_norm(self._inter_window_attention(tokens), x, *norm)
                x = x + self.proj_drop2(self.proj2[1](normed))
            else:
                x = ops.upsample_add(self._inter_window_attention(tokens), x)
                x = x + self.proj_drop2(self.proj2(x))
        else:
            tokens = window_pool(x, self.window_size)  # [B, Hg, Wg, C]
            pos = self.pose_encoding.grid(*grid, channels, x.device)
            tokens = tokens + pos.to(tokens.dtype)  # released: float32 encoding, promoted to x's dtype
            x = upsample_add(self._inter_window_attention(tokens), x)
            x = x + self.proj_drop2(self.proj2(x))

        if pad_r > 0 or pad_b > 0:
            x = x[:, :height, :width, :].contiguous()
        x = x + self.drop_path(self.mlp(self.norm1(x)))
        return self.norm2(x)

    def _sine_grid(self, height: int, width: int, channels: int, device: torch.device) -> torch.Tensor:
        """The positional encoding of a token grid, [height, width, C] float32, cached per grid and device.

        It has no parameters, so it is computed once per grid size; the cache is a plain attribute, not a
        buffer (state_dicts stay the released ones). While torch.compile traces, it is computed in the graph
        instead (a constant the compiler folds; no Python state mutated under tracing).
        """
        if torch.compiler.is_compiling():
            return self.pose_encoding.grid(height, width, channels, device)
        key = (height, width, channels, str(device))
        grid = self._sine_grids.get(key)
        if grid is None:
            grid = self._sine_grids[key] = self.pose_encoding.grid(height, width, channels, device)
        return grid

    def _intra_window_attention(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Attention inside the windows of the padded map x [B, Hp, Wp, C] -> [B, Hp, Wp, C] (no projection)."""
        if self.fused and mask is None and not (self.training and self.attn_drop.p > 0):
            return ops.window_attention(self.qkv(x), self.num_heads, self.window_size,
                                        self.relative_position_bias_table, scale=self.scale)
        batch, hp, wp, channels = x.shape
        windows = window_partition(x, self.window_size)  # [B*nW, N, C]
        num, tokens, _ = windows.shape
        qkv = self.qkv(windows).reshape(num, tokens, 3, self.num_heads, channels // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = (q * self.scale) @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        attn = attn + bias.permute(2, 0, 1).unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(num // num_windows, num_windows, self.num_heads, tokens, tokens) \
                + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = self.attn_drop(self.softmax(attn))
        out = (attn @ v).transpose(1, 2).reshape(num, tokens, channels)
        return window_reverse(out, self.window_size, batch, hp, wp)

    def _inter_window_attention(self, tokens: torch.Tensor) -> torch.Tensor:
        """Full attention over the window tokens [B, Hg, Wg, C] with qkv2 -> [B, Hg, Wg, C] (no bias, no dropout)."""
        qkv = self.qkv2(tokens)
        grid = tuple(tokens.shape[1:3])
        if self.fused:  # one window covering the whole grid
            return ops.window_attention(qkv, self.num_heads, grid, None, scale=self.scale)
        batch, _, _, channels = tokens.shape
        num = grid[0] * grid[1]
        q, k, v = qkv.reshape(batch, num, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self.softmax((q * self.scale) @ k.transpose(-2, -1))
        return (attn @ v).transpose(1, 2).reshape(batch, grid[0], grid[1], channels)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, window_size={self.window_size}, num_heads={self.num_heads}, fused={self.fused}"
