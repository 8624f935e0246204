"""Reference of window_pool: IIWA's window tokens (average of each window) plus their positional encoding.

Written as the released ULLMC code computes it: `nn.AvgPool2d(kernel_size=window)`
over the padded map (padded tokens included), then `tokens + pos.to(tokens.dtype)`.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F


def window_size(window) -> tuple[int, int]:
    """(Wh, Ww) from an int or a pair of ints >= 1."""
    pair = (window, window) if isinstance(window, numbers.Integral) else tuple(window)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) for v in pair):
        raise TypeError(f"window must be an int or a pair of ints, got {window!r}")
    if any(v < 1 for v in pair):
        raise ValueError(f"window must be >= 1, got {window!r}")
    return int(pair[0]), int(pair[1])


def window_pool(x: torch.Tensor, window, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of each window (+ pos): [B, Hp, Wp, C] -> [B, Hp/Wh, Wp/Ww, C] (Hp, Wp multiples of the window).

    ULLMC's `nn.AvgPool2d(kernel_size=window)` over the padded map, padded tokens
    included; pos [Hg, Wg, C] (the sine encoding of the token grid) is cast to
    x's dtype and added to every image, as released.
    """
    wh, ww = window_size(window)
    if x.dim() != 4 or x.shape[1] % wh or x.shape[2] % ww:
        raise ValueError(f"window_pool expects [B, Hp, Wp, C] with Hp, Wp multiples of the window {(wh, ww)}, "
                         f"got shape {tuple(x.shape)}")
    pooled = F.avg_pool2d(x.permute(0, 3, 1, 2).contiguous(), kernel_size=(wh, ww))
    tokens = pooled.permute(0, 2, 3, 1)
    return tokens if pos is None else tokens + pos.to(tokens.dtype)
