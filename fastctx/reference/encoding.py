"""Reference maths of EncNet's Encoding layer (mmsegmentation's `Encoding`).

`encoding` is mmseg's broadcast form, line for line: it builds [B, N, K, D]
tensors (the cost fastctx removes). `encoding_two_gemm` is the best eager
rewrite (docs/design.md 2.2), used as a benchmark peer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _as_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, D, H, W] -> [B, N, D] as mmseg does; [B, N, D] passes through."""
    if x.dim() == 4:
        return x.view(x.size(0), x.size(1), -1).transpose(1, 2).contiguous()
    return x


def scaled_l2(x, codewords, scale):
    num_codes, channels = codewords.size()
    batch_size = x.size(0)
    reshaped_scale = scale.view((1, 1, num_codes))
    expanded_x = x.unsqueeze(2).expand((batch_size, x.size(1), num_codes, channels))
    reshaped_codewords = codewords.view((1, 1, num_codes, channels))
    return reshaped_scale * (expanded_x - reshaped_codewords).pow(2).sum(dim=3)


def aggregate(assignment_weights, x, codewords):
    num_codes, channels = codewords.size()
    reshaped_codewords = codewords.view((1, 1, num_codes, channels))
    batch_size = x.size(0)
    expanded_x = x.unsqueeze(2).expand((batch_size, x.size(1), num_codes, channels))
    return (assignment_weights.unsqueeze(3) * (expanded_x - reshaped_codewords)).sum(dim=1)


def encoding(x, codewords, scale) -> torch.Tensor:
    """E [B, K, D] of x [B, D, H, W] (or [B, N, D]), mmseg's broadcast maths."""
    x = _as_pixels(x)
    assignment_weights = F.softmax(scaled_l2(x, codewords, scale), dim=2)
    return aggregate(assignment_weights, x, codewords)


def encoding_two_gemm(x, codewords, scale) -> torch.Tensor:
    """The same maths with two GEMMs and no [B, N, K, D] tensor (the best eager rewrite)."""
    x = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x  # a view: matmul reads it strided
    x_sq = x.pow(2).sum(-1, keepdim=True)  # [B, N, 1]
    c_sq = codewords.pow(2).sum(-1)  # [K]
    dist = (x_sq - 2 * torch.matmul(x, codewords.t()) + c_sq).clamp_min(0)
    assignment = F.softmax(dist * scale, dim=2)  # [B, N, K]
    return torch.matmul(assignment.transpose(1, 2), x) - assignment.sum(1).unsqueeze(2) * codewords
