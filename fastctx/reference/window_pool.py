"""Reference of window_pool: IIWA's window tokens (average of each window) plus their positional encoding.

Written as the released ULLMC code computes it: `nn.AvgPool2d(kernel_size=window)`
over the padded map (padded tokens included), then `tokens + pos.to(tokens.dtype)`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._args import int_pair


def window_size(window) -> tuple[int, int]:
    """(Wh, Ww) from an int or a pair of ints >= 1."""
    return int_pair(window, "window", 1)


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
