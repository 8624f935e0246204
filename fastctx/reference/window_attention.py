"""Reference maths of window attention: Swin's (shifted) W-MSA and ULLMC's IIWA (docs/design.md, 2.5).

`window_attention` is the oracle of the fused `fastctx.ops.window_attention`.
It is written step by step the way mmsegmentation's `ShiftWindowMSA` /
`WindowMSA` and the released ULLMC `iiwa_layers.py` compute it -- pad to
multiples of the window, cyclic shift, partition into windows, region mask,
softmax(q k^T * scale + relative position bias) v, reverse, shift back, crop --
so the fused kernels are checked against the computation users run today.

The eager forms of IIWA's inter-window path: `sine_position_encoding` (the
parameter-free positional encoding of the window tokens) here; `window_pool`
(average of each window -> one token per window, + that encoding) and
`upsample_add` (bilinear upsample, align_corners=True, of the tokens + residual)
are the oracles of the fused ops of those names, in their own files
(`fastctx/reference/window_pool.py`, `fastctx/reference/upsample_add.py`), and
re-exported here.

The full attention over the window tokens is `window_attention` with one
window covering the whole token grid and no bias table.

Helpers shared with the eager paths of the modules (`fastctx.nn.window_msa`,
`fastctx.nn.iiwa`): `relative_position_index`, `window_partition`,
`window_reverse`, `shift_window_mask`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._args import int_pair as _pair  # the modules' and ops' (a, b)-or-int argument check
from ._args import is_int
# IIWA's pooling and upsampling are fused ops with their own oracles; re-exported here, where the eager
# IIWA path and the benchmarks have always imported them from.
from .upsample_add import upsample_add
from .window_pool import window_pool

__all__ = [
    "relative_position_index", "shift_window_mask", "sine_position_encoding", "upsample_add", "window_attention",
    "window_partition", "window_pool", "window_reverse",
]


def relative_position_index(window) -> torch.Tensor:
    """[N, N] int64 index into the [(2Wh-1)(2Ww-1), heads] bias table, N = Wh*Ww.

    index[a, b] = (ya - yb + Wh - 1) * (2Ww - 1) + (xa - xb + Ww - 1) for tokens a, b
    of a window in row-major order; built in mmseg's `double_step_seq` form
    (the released ULLMC code builds the same values from a meshgrid).
    """
    wh, ww = _pair(window, "window", 1)
    step = 2 * ww - 1
    coords = (torch.arange(0, step * wh, step)[:, None] + torch.arange(ww)[None, :]).reshape(1, -1)
    return (coords + coords.T).flip(1).contiguous()


def window_partition(x: torch.Tensor, window) -> torch.Tensor:
    """[B, Hp, Wp, C] -> [B * nW, Wh * Ww, C], windows in row-major order (Hp, Wp multiples of the window)."""
    batch, height, width, channels = x.shape
    wh, ww = window
    x = x.view(batch, height // wh, wh, width // ww, ww, channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch * (height // wh) * (width // ww), wh * ww, channels)


def window_reverse(windows: torch.Tensor, window, batch: int, height: int, width: int) -> torch.Tensor:
    """Inverse of `window_partition`: [B * nW, Wh * Ww, C] -> [B, Hp, Wp, C]."""
    wh, ww = window
    x = windows.view(batch, height // wh, width // ww, wh, ww, windows.shape[-1])
    return x.permute(0, 1, 3, 2, 4, 5).reshape(batch, height, width, windows.shape[-1])


def shift_window_mask(height: int, width: int, window, shift, dtype=torch.float32, device=None) -> torch.Tensor:
    """Swin's attention mask of the cyclically shifted padded map: [nW, N, N], 0 or -100.

    After the roll by (-sh, -sw), the last window row/column holds tokens from
    both ends of the map. The padded map is cut into regions by mmseg's slices
    (0:-Wh, -Wh:-sh, -sh:) per shifted dimension; pairs of tokens from
    different regions get -100 added to their logit (not -inf, as mmseg).
    """
    wh, ww = window
    sh, sw = shift
    img_mask = torch.zeros((1, height, width, 1), dtype=dtype, device=device)
    h_slices = (slice(0, -wh), slice(-wh, -sh), slice(-sh, None)) if sh > 0 else (slice(None),)
    w_slices = (slice(0, -ww), slice(-ww, -sw), slice(-sw, None)) if sw > 0 else (slice(None),)
    cnt = 0
    for h in h_slices:
        for w in w_slices:
            img_mask[:, h, w, :] = cnt
            cnt += 1
    mask_windows = window_partition(img_mask, window).squeeze(-1)  # [nW, N]
    attn_mask = mask_windows.unsqueeze(1) - mask_windows.unsqueeze(2)
    return attn_mask.masked_fill(attn_mask != 0, -100.0).masked_fill(attn_mask == 0, 0.0)


def _check_window_args(qkv, heads, window, bias_table, shift, pad_qkv):
    if not isinstance(qkv, torch.Tensor):
        raise TypeError(f"qkv must be a torch.Tensor [B, H, W, 3C], got {type(qkv).__name__}")
    if qkv.dim() != 4:
        raise ValueError(f"qkv must be [B, H, W, 3C] (4-D, channels last), got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise TypeError(f"qkv must be a floating-point tensor, got {qkv.dtype}")
    if not is_int(heads) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}")
    batch, height, width, channels3 = qkv.shape
    if height < 1 or width < 1:
        raise ValueError(f"qkv must have H, W >= 1, got shape {tuple(qkv.shape)}")
    if channels3 == 0 or channels3 % 3:
        raise ValueError(f"qkv's last dimension must be 3C (q, k, v), a positive multiple of 3, got {channels3}")
    channels = channels3 // 3
    if channels % heads:
        raise ValueError(f"channels C = {channels} (qkv has 3C = {channels3}) must be divisible by heads = {heads}")
    wh, ww = _pair(window, "window", 1)
    sh, sw = _pair(shift, "shift", 0)
    if sh >= wh or sw >= ww:
        raise ValueError(f"shift {(sh, sw)} must be smaller than the window {(wh, ww)} in each dimension")
    if bias_table is not None:
        entries = (2 * wh - 1) * (2 * ww - 1)
        if not isinstance(bias_table, torch.Tensor) or tuple(bias_table.shape) != (entries, heads):
            shape = tuple(bias_table.shape) if isinstance(bias_table, torch.Tensor) else type(bias_table).__name__
            raise ValueError(f"bias_table must be [(2Wh-1)(2Ww-1), heads] = [{entries}, {heads}] for window "
                             f"{(wh, ww)}, got {shape}")
        if bias_table.device != qkv.device:
            raise ValueError(f"bias_table is on {bias_table.device} but qkv is on {qkv.device}")
    if pad_qkv is not None:
        if not isinstance(pad_qkv, torch.Tensor) or tuple(pad_qkv.shape) != (channels3,):
            shape = tuple(pad_qkv.shape) if isinstance(pad_qkv, torch.Tensor) else type(pad_qkv).__name__
            raise ValueError(f"pad_qkv must be [3C] = [{channels3}] (the qkv Linear's bias), got {shape}")
        if pad_qkv.device != qkv.device:
            raise ValueError(f"pad_qkv is on {pad_qkv.device} but qkv is on {qkv.device}")
    return (wh, ww), (sh, sw)


def window_attention(qkv: torch.Tensor, heads: int, window, bias_table: torch.Tensor | None = None, shift=(0, 0),
                     scale: float | None = None, pad_qkv: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention inside (shifted) windows of a token map: [B, H, W, 3C] -> [B, H, W, C].

    Args:
        qkv: the qkv Linear's output on the (unpadded) tokens, channels last;
            channel part*C + head*d + j holds q/k/v (part 0/1/2) of head `head`.
        heads: number of heads; d = C / heads.
        window: (Wh, Ww) or an int.
        bias_table: [(2Wh-1)(2Ww-1), heads] relative position bias, or None.
        shift: (sh, sw) cyclic shift of Swin's shifted windows (0 <= s < window).
        scale: logit scale, default d ** -0.5.
        pad_qkv: [3C] q/k/v of the tokens padding the map to multiples of the
            window (the qkv Linear's bias, i.e. its output for a zero token):
            they take part in attention as keys, as in mmseg's Swin and the
            released ULLMC code. None: padded tokens are excluded as keys.
    Returns:
        [B, H, W, C]: attention output of every real token, before any output projection.

    bias_table and pad_qkv are cast to qkv's dtype. Differentiable w.r.t. qkv,
    bias_table and pad_qkv.
    """
    (wh, ww), (sh, sw) = _check_window_args(qkv, heads, window, bias_table, shift, pad_qkv)
    batch, height, width, channels3 = qkv.shape
    channels = channels3 // 3
    head_dim = channels // heads
    scale = head_dim ** -0.5 if scale is None else scale
    tokens = wh * ww

    # pad the map at bottom/right to multiples of the window
    pad_b = (wh - height % wh) % wh
    pad_r = (ww - width % ww) % ww
    hp, wp = height + pad_b, width + pad_r
    if pad_qkv is not None:
        fill = pad_qkv.to(qkv.dtype)
        qkv = torch.cat([qkv, fill.expand(batch, height, pad_r, channels3)], dim=2)
        qkv = torch.cat([qkv, fill.expand(batch, pad_b, wp, channels3)], dim=1)
        key_mask = None
    else:
        qkv = F.pad(qkv, (0, 0, 0, pad_r, 0, pad_b))
        key_mask = torch.zeros((1, hp, wp, 1), dtype=qkv.dtype, device=qkv.device)
        key_mask[:, height:] = float("-inf")
        key_mask[:, :, width:] = float("-inf")

    # cyclic shift and the mask of the regions it brings together
    if sh > 0 or sw > 0:
        qkv = torch.roll(qkv, shifts=(-sh, -sw), dims=(1, 2))
        attn_mask = shift_window_mask(hp, wp, (wh, ww), (sh, sw), dtype=qkv.dtype, device=qkv.device)
        if key_mask is not None:
            key_mask = torch.roll(key_mask, shifts=(-sh, -sw), dims=(1, 2))
    else:
        attn_mask = None
    if key_mask is not None:  # padded keys excluded: -inf on their columns, per window
        key_mask = window_partition(key_mask, (wh, ww)).view(-1, 1, tokens)
        attn_mask = key_mask if attn_mask is None else attn_mask + key_mask

    # partition: [B * nW, N, 3C] -> q, k, v [B * nW, heads, N, d]
    windows = window_partition(qkv, (wh, ww))
    qkv_w = windows.reshape(windows.shape[0], tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv_w[0], qkv_w[1], qkv_w[2]

    q = q * scale
    attn = q @ k.transpose(-2, -1)
    if bias_table is not None:
        index = relative_position_index((wh, ww)).to(bias_table.device)
        bias = bias_table.to(qkv.dtype)[index.view(-1)].view(tokens, tokens, heads).permute(2, 0, 1)
        attn = attn + bias.unsqueeze(0)
    if attn_mask is not None:
        num_windows = attn_mask.shape[0]
        attn = attn.view(batch, num_windows, heads, tokens, tokens) + attn_mask.unsqueeze(1).unsqueeze(0)
        attn = attn.view(-1, heads, tokens, tokens)
    attn = attn.softmax(dim=-1)
    out = (attn @ v).transpose(1, 2).reshape(-1, tokens, channels)

    # merge windows, shift back, crop the padding
    out = window_reverse(out, (wh, ww), batch, hp, wp)
    if sh > 0 or sw > 0:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :height, :width, :].contiguous()




def sine_position_encoding(height: int, width: int, channels: int, *, normalize: bool = True,
                           temperature: float = 10000.0, scale: float | None = None, device=None) -> torch.Tensor:
    """The released `PositionEmbeddingSine` of a [height, width] grid: [height, width, channels], float32.

    With F = channels / 2 features per axis, position y (1-based row, divided by
    (height + 1e-5) and multiplied by `scale` = 2 pi when `normalize`) gives
    y / temperature ** (2 * (f // 2) / F) for f < F, sine on even f and cosine
    on odd f; channels [0, F) encode the row, [F, 2F) the column. Computed in
    float32 whatever the features' dtype, as released. channels must be a
    multiple of 4 (the released code fails otherwise).
    """
    if channels < 4 or channels % 4:
        raise ValueError(f"the sine position encoding needs channels divisible by 4 (two axes, sin/cos pairs), "
                         f"got {channels}")
    if scale is not None and not normalize:
        raise ValueError("normalize should be True if scale is passed")
    scale = 2 * math.pi if scale is None else scale
    num_pos_feats = channels // 2
    ones = torch.ones((1, height, width), dtype=torch.float32, device=device)
    y_embed = ones.cumsum(1)
    x_embed = ones.cumsum(2)
    if normalize:
        eps = 1e-5
        y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
        x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * (dim_t // 2) / num_pos_feats)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    return torch.cat((pos_y, pos_x), dim=3)[0]

