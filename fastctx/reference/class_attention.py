"""Reference of class_attention: every pixel mixes per-class vectors with a softmax over the classes.

    query given (OCRNet's ObjectAttentionBlock, mmseg SelfAttentionBlock with matmul_norm):
        a_nk = softmax_k(scale * q_n . k_k)
    logits given (ACFNet's paper form, attention = the class probabilities):
        a_nk = softmax_k(scale * logits_kn)
    out_n = sum_k a_nk v_k

query [B, Cq, H, W] or None, keys [B, K, Cq] (unused with logits), values [B, K, Cv],
logits [B, K, H, W] or None -> out [B, Cv, H, W]. Written as mmseg computes it (permute,
matmul, softmax, matmul, permute back).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def class_attention(query, keys, values, logits, scale: float) -> torch.Tensor:
    if (query is None) == (logits is None):
        raise ValueError("class_attention takes exactly one of query and logits")
    batch_size = values.size(0)
    if query is not None:
        height, width = query.shape[2:]
        query = query.reshape(batch_size, query.size(1), -1).permute(0, 2, 1)  # [B, N, Cq]
        sim_map = torch.matmul(query, keys.permute(0, 2, 1))  # [B, N, K]
    else:
        height, width = logits.shape[2:]
        sim_map = logits.reshape(batch_size, logits.size(1), -1).permute(0, 2, 1)  # [B, N, K]
    sim_map = F.softmax(scale * sim_map, dim=-1)
    context = torch.matmul(sim_map, values)  # [B, N, Cv]
    return context.permute(0, 2, 1).reshape(batch_size, values.size(2), height, width)
