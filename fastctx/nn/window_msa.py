"""Drop-in Swin window attention: `WindowMSA` and `ShiftWindowMSA` (mmsegmentation 1.x `backbones/swin.py`).

Parameters and buffers are named as mmseg's so its state_dicts load with
strict=True: `w_msa.relative_position_bias_table`, `w_msa.relative_position_index`,
`w_msa.qkv.{weight,bias}`, `w_msa.proj.{weight,bias}`.

With `fused=True`, `ShiftWindowMSA.forward` runs the qkv Linear on the
unpadded tokens and one call of `fastctx.ops.window_attention`, which does the
padding (padded tokens get the qkv bias as q/k/v, as mmseg's zero padding
before the Linear gives them), the cyclic shift, the region mask, the
relative position bias and the softmax by index arithmetic: no pad, roll,
partition, mask or window-reverse tensors. Then `proj` on the tokens.
With `fused=False` it runs mmseg's eager maths step by step.

The fused path is taken unless attention dropout is active (training with
attn_drop_rate > 0): the op has no dropout on the attention weights, so those
calls run the eager maths. Output dropout (`proj_drop`) and DropPath apply in
both paths; in training with proj_drop_rate > 0 the fused path draws its
dropout mask over the token layout rather than mmseg's window layout (the same
distribution, another random stream).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from ..reference.window_attention import (
    _pair, relative_position_index, shift_window_mask, window_partition, window_reverse,
)

__all__ = ["DropPath", "ShiftWindowMSA", "WindowMSA", "convert_window_msa", "trunc_normal_"]


@torch.no_grad()
def trunc_normal_(tensor: torch.Tensor, std: float = 1.0, mean: float = 0.0, a: float = -2.0,
                  b: float = 2.0) -> torch.Tensor:
    """Normal(mean, std) truncated to [a, b], drawn by the inverse CDF as mmengine and timm draw it.

    torch's own nn.init.trunc_normal_ now rejection-samples: the same
    distribution from other random draws, so a seed would not give mmseg's or
    ULLMC's initial weights.
    """
    def norm_cdf(x: float) -> float:
        return (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0

    lower, upper = norm_cdf((a - mean) / std), norm_cdf((b - mean) / std)
    tensor.uniform_(2 * lower - 1, 2 * upper - 1)
    tensor.erfinv_()
    tensor.mul_(std * math.sqrt(2.0)).add_(mean)
    return tensor.clamp_(min=a, max=b)


class DropPath(nn.Module):
    """Stochastic depth per sample, mmcv's `DropPath`: x / keep * floor(keep + U[0, 1)) in training.

    The same random draws as mmcv (and timm <= 0.4, which ULLMC's release
    imports), so a seeded training step gives mmseg's exact result.
    """

    def __init__(self, drop_prob: float = 0.1):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        random_tensor = keep_prob + torch.rand(shape, dtype=x.dtype, device=x.device)
        return x.div(keep_prob) * random_tensor.floor()

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


def _check_dims(embed_dims: int, num_heads: int) -> None:
    if embed_dims < 1 or num_heads < 1:
        raise ValueError(f"embed_dims and num_heads must be positive, got {embed_dims} and {num_heads}")
    if embed_dims % num_heads:
        raise ValueError(f"embed_dims ({embed_dims}) must be divisible by num_heads ({num_heads})")


class WindowMSA(nn.Module):
    """Window multi-head self-attention with relative position bias (mmseg `WindowMSA`).

    forward(x [B*nW, Wh*Ww, C], mask [nW, N, N] or None) -> [B*nW, Wh*Ww, C]:
    attention inside each given window, then `proj`. With `fused=True` and no
    mask it is one call of `fastctx.ops.window_attention` on the windows; an
    arbitrary additive mask (which the op does not take) or active attention
    dropout runs mmseg's eager maths. `ShiftWindowMSA` uses this module's
    parameters on the unpartitioned map instead.

    Args:
        embed_dims: channels C.
        num_heads: heads; C must be divisible by it.
        window_size: (Wh, Ww) or an int.
        qkv_bias: bias in the qkv Linear.
        qk_scale: logit scale, default head_dim ** -0.5 (also when 0, as mmseg's `or`).
        attn_drop_rate: dropout on the attention weights.
        proj_drop_rate: dropout after `proj`.
        init_cfg: accepted for mmseg compatibility; must be None.
        fused: run the fastctx op (True) or mmseg's eager maths (False).
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 init_cfg=None, fused: bool = True):
        super().__init__()
        _check_dims(embed_dims, num_heads)
        if init_cfg is not None:
            raise ValueError("WindowMSA takes no init_cfg (initialise or load weights explicitly)")
        self.embed_dims = embed_dims
        self.window_size = _pair(window_size, "window_size", 1)
        self.num_heads = num_heads
        head_embed_dims = embed_dims // num_heads
        self.scale = qk_scale or head_embed_dims ** -0.5
        self.fused = fused

        wh, ww = self.window_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wh - 1) * (2 * ww - 1), num_heads))
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

        self.qkv = nn.Linear(embed_dims, embed_dims * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop_rate)
        self.proj = nn.Linear(embed_dims, embed_dims)
        self.proj_drop = nn.Dropout(proj_drop_rate)
        self.softmax = nn.Softmax(dim=-1)

    def init_weights(self) -> None:
        """mmseg's `WindowMSA.init_weights`: truncated normal (std 0.02) bias table."""
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    @property
    def attn_dropout_active(self) -> bool:
        return self.training and self.attn_drop.p > 0

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        wh, ww = self.window_size
        if x.dim() != 3 or x.shape[1] != wh * ww or x.shape[2] != self.embed_dims:
            raise ValueError(f"WindowMSA expects windows [B*nW, {wh * ww}, {self.embed_dims}] "
                             f"(window {self.window_size}), got {tuple(x.shape)}")
        if not self.fused or mask is not None or self.attn_dropout_active:
            return self.eager_forward(x, mask)
        qkv = self.qkv(x).view(x.shape[0], wh, ww, 3 * self.embed_dims)
        out = ops.window_attention(qkv, self.num_heads, self.window_size, self.relative_position_bias_table,
                                   scale=self.scale)
        return self.proj_drop(self.proj(out.reshape(x.shape)))

    def eager_forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mmseg's WindowMSA.forward."""
        batch, tokens, channels = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, channels // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]

        q = q * self.scale
        attn = q @ k.transpose(-2, -1)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(tokens, tokens, -1)
        attn = attn + bias.permute(2, 0, 1).contiguous().unsqueeze(0)
        if mask is not None:
            num_windows = mask.shape[0]
            attn = attn.view(batch // num_windows, num_windows, self.num_heads, tokens, tokens) \
                + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)

        x = (attn @ v).transpose(1, 2).reshape(batch, tokens, channels)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"embed_dims={self.embed_dims}, num_heads={self.num_heads}, window_size={self.window_size}, "
                f"fused={self.fused}")


def _build_drop(dropout_layer) -> nn.Module:
    if dropout_layer is None:
        return nn.Identity()
    if not isinstance(dropout_layer, dict) or dropout_layer.get("type") != "DropPath" \
            or set(dropout_layer) - {"type", "drop_prob"}:
        raise ValueError(f"dropout_layer must be dict(type='DropPath', drop_prob=p) or None, got {dropout_layer!r}")
    return DropPath(dropout_layer.get("drop_prob", 0.1))


class ShiftWindowMSA(nn.Module):
    """(Shifted) window multi-head self-attention on a token map (mmseg `ShiftWindowMSA`).

    forward(query [B, H*W, C], hw_shape (H, W)) -> [B, H*W, C]. H, W need not
    be multiples of the window. shift_size > 0 shifts the windows by that many
    tokens towards the bottom right (Swin's odd blocks).

    Args: as mmseg (embed_dims, num_heads, window_size, shift_size, qkv_bias,
    qk_scale, attn_drop_rate, proj_drop_rate, dropout_layer, init_cfg), plus
    `fused`. window_size and shift_size may also be (h, w) pairs (mmseg: ints).
    """

    def __init__(self, embed_dims: int, num_heads: int, window_size, shift_size=0, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
                 dropout_layer=dict(type="DropPath", drop_prob=0.0), init_cfg=None, fused: bool = True):
        super().__init__()
        if init_cfg is not None:
            raise ValueError("ShiftWindowMSA takes no init_cfg (initialise or load weights explicitly)")
        self.window_size = window_size
        self.shift_size = shift_size
        self._window = _pair(window_size, "window_size", 1)
        self._shift = _pair(shift_size, "shift_size", 0)
        if any(s >= w for s, w in zip(self._shift, self._window)):
            raise ValueError(f"shift_size {shift_size} must be smaller than window_size {window_size}")
        self.w_msa = WindowMSA(embed_dims, num_heads, self._window, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop_rate=attn_drop_rate, proj_drop_rate=proj_drop_rate, fused=fused)
        self.drop = _build_drop(dropout_layer)

    @property
    def fused(self) -> bool:
        return self.w_msa.fused

    @fused.setter
    def fused(self, value: bool) -> None:
        self.w_msa.fused = bool(value)

    def forward(self, query: torch.Tensor, hw_shape) -> torch.Tensor:
        height, width = hw_shape
        channels = self.w_msa.embed_dims
        if query.dim() != 3 or query.shape[1] != height * width or query.shape[2] != channels:
            raise ValueError(f"ShiftWindowMSA expects query [B, H*W, {channels}] with hw_shape (H, W) = "
                             f"{tuple(hw_shape)}, got {tuple(query.shape)}")
        if not self.fused or self.w_msa.attn_dropout_active:
            return self.eager_forward(query, hw_shape)
        w_msa = self.w_msa
        batch = query.shape[0]
        qkv = w_msa.qkv(query).view(batch, height, width, 3 * channels)
        # A padded (zero) token's q/k/v is what the Linear gives zero: its bias.
        bias = w_msa.qkv.bias if w_msa.qkv.bias is not None else qkv.new_zeros(3 * channels)
        out = ops.window_attention(qkv, w_msa.num_heads, self._window, w_msa.relative_position_bias_table,
                                   shift=self._shift, scale=w_msa.scale, pad_qkv=bias)
        out = w_msa.proj_drop(w_msa.proj(out.reshape(batch, height * width, channels)))
        return self.drop(out)

    def eager_forward(self, query: torch.Tensor, hw_shape) -> torch.Tensor:
        """mmseg's ShiftWindowMSA.forward: pad, roll, partition, masked window attention, reverse, roll, crop."""
        batch, _, channels = query.shape
        height, width = hw_shape
        (wh, ww), (sh, sw) = self._window, self._shift
        query = query.view(batch, height, width, channels)

        pad_r = (ww - width % ww) % ww
        pad_b = (wh - height % wh) % wh
        query = F.pad(query, (0, 0, 0, pad_r, 0, pad_b))
        hp, wp = query.shape[1], query.shape[2]

        if sh > 0 or sw > 0:
            shifted_query = torch.roll(query, shifts=(-sh, -sw), dims=(1, 2))
            # mmseg builds the mask in float32; in the query's dtype the 0 / -100 values are the same
            # and fp16/bf16 logits are not promoted to float32.
            attn_mask = shift_window_mask(hp, wp, self._window, self._shift, dtype=query.dtype, device=query.device)
        else:
            shifted_query = query
            attn_mask = None

        query_windows = window_partition(shifted_query, self._window)
        attn_windows = self.w_msa.eager_forward(query_windows, mask=attn_mask)
        shifted_x = window_reverse(attn_windows, self._window, batch, hp, wp)
        x = torch.roll(shifted_x, shifts=(sh, sw), dims=(1, 2)) if sh > 0 or sw > 0 else shifted_x
        if pad_r > 0 or pad_b > 0:
            x = x[:, :height, :width, :].contiguous()
        x = x.view(batch, height * width, channels)
        return self.drop(x)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}"


# ----------------------------------------------------------------------------- conversion from mmseg

def _mmseg_window_msa_config(w_msa: nn.Module, where: str) -> dict:
    """WindowMSA arguments that reproduce an mmseg-style WindowMSA `w_msa`, checking its layout."""
    children = dict(w_msa.named_children())
    if set(children) != {"qkv", "attn_drop", "proj", "proj_drop", "softmax"}:
        raise ValueError(f"{where} has submodules {sorted(children)}, expected mmseg WindowMSA's "
                         "qkv, attn_drop, proj, proj_drop, softmax")
    qkv, proj = children["qkv"], children["proj"]
    if type(qkv) is not nn.Linear or type(proj) is not nn.Linear or proj.bias is None:
        raise ValueError(f"{where}.qkv and .proj must be torch.nn.Linear (proj with a bias)")
    for name in ("attn_drop", "proj_drop"):
        if type(children[name]) is not nn.Dropout:
            raise ValueError(f"{where}.{name} is {type(children[name]).__name__}, expected torch.nn.Dropout")
    softmax = children["softmax"]
    if type(softmax) is not nn.Softmax or softmax.dim not in (-1, 3):
        raise ValueError(f"{where}.softmax must be torch.nn.Softmax over the last dimension")
    embed_dims, num_heads = proj.in_features, w_msa.num_heads
    window = _pair(w_msa.window_size, f"{where}.window_size", 1)
    if (qkv.in_features, qkv.out_features, proj.out_features) != (embed_dims, 3 * embed_dims, embed_dims):
        raise ValueError(f"{where}.qkv is Linear({qkv.in_features}, {qkv.out_features}) and proj "
                         f"Linear({proj.in_features}, {proj.out_features}), expected Linear(C, 3C) and Linear(C, C)")
    table = w_msa.relative_position_bias_table
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    if tuple(table.shape) != (entries, num_heads):
        raise ValueError(f"{where}.relative_position_bias_table is {tuple(table.shape)}, expected "
                         f"[{entries}, {num_heads}] for window {window} and {num_heads} heads")
    index = getattr(w_msa, "relative_position_index", None)
    expected = relative_position_index(window)
    if not isinstance(index, torch.Tensor) or (not index.is_meta and not torch.equal(index.cpu(), expected)):
        raise ValueError(f"{where}.relative_position_index is not Swin's relative position index for window "
                         f"{window}: the fused op computes that index itself")
    return dict(embed_dims=embed_dims, num_heads=num_heads, window_size=window, qkv_bias=qkv.bias is not None,
                qk_scale=w_msa.scale, attn_drop_rate=children["attn_drop"].p,
                proj_drop_rate=children["proj_drop"].p)


def _take_over(new: nn.Module, old: nn.Module) -> nn.Module:
    """Give `new` (built on the meta device) the very parameter/buffer tensors and train flags of `old`."""
    state = old.state_dict(keep_vars=True)
    requires_grad = {k: t.requires_grad for k, t in state.items()}
    try:
        new.load_state_dict(state, strict=True, assign=True)
    finally:  # assign=True copies the new module's requires_grad onto the shared tensors: restore the old flags
        for k, t in state.items():
            t.requires_grad_(requires_grad[k])
    old_modules = dict(old.named_modules())
    for name, sub in new.named_modules():
        sub.training = old_modules.get(name, old).training
    return new


def convert_window_msa(module: nn.Module, fused: bool = True) -> nn.Module:
    """fastctx's WindowMSA / ShiftWindowMSA computing what an mmseg one computes, sharing its tensors.

    `module` is an mmseg-style `ShiftWindowMSA` (a `w_msa` WindowMSA and a
    `drop` DropPath or Identity) or `WindowMSA`, recognised by layout. The new
    module holds the very same Parameter and buffer objects (state_dict keys,
    values, requires_grad and optimizer references unchanged) and the same
    train/eval flags. Raises ValueError, saying why, for any other layout.
    """
    if hasattr(module, "w_msa"):
        w_msa = module.w_msa
        children = set(dict(module.named_children()))
        if children != {"w_msa", "drop"}:
            raise ValueError(f"ShiftWindowMSA has submodules {sorted(children)}, expected w_msa and drop")
        config = _mmseg_window_msa_config(w_msa, "w_msa")
        drop = module.drop
        if type(drop).__name__ == "DropPath" and hasattr(drop, "drop_prob"):
            dropout_layer = dict(type="DropPath", drop_prob=float(drop.drop_prob))
        elif type(drop) is nn.Identity:
            dropout_layer = None
        else:
            raise ValueError(f"ShiftWindowMSA.drop is {type(drop).__name__}, expected DropPath or Identity")
        if _pair(module.window_size, "window_size", 1) != config["window_size"]:
            raise ValueError(f"ShiftWindowMSA.window_size {module.window_size} differs from its w_msa's "
                             f"{config['window_size']}")
        config["window_size"] = module.window_size
        with torch.device("meta"):  # no allocation, no random init: every tensor comes from `module`
            new = ShiftWindowMSA(shift_size=module.shift_size, dropout_layer=dropout_layer, fused=fused, **config)
    else:
        config = _mmseg_window_msa_config(module, type(module).__name__)
        with torch.device("meta"):
            new = WindowMSA(fused=fused, **config)
    return _take_over(new, module)
