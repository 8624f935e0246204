"""Window attention (Swin's W-MSA / SW-MSA, ULLMC's intra-window attention), fused: each window's q, k, v
are read straight from the token layout [B, H, W, 3C] and its output is written back to [B, H, W, C].

Contract: docs/kernels.md "window_attention"; launchers below the kernels.

Geometry, all index arithmetic (`_tokens`): token t = i*Ww + j of window (wr, wc) sits at rolled position
(wr*Wh + i, wc*Ww + j), which is position ((r + sh) mod Hp, (c + sw) mod Wp) of the map padded to whole
windows. A position outside H x W is a padded token: its q/k/v is pad_qkv, or without pad_qkv it is no
key (-inf logits); its output is not written. With a shift, a pair of tokens from different regions of
the rolled map gets -100 (mmseg's mask value). The bias is gathered from the table by the relative index.
No pad, roll, partition, mask or window_reverse tensor exists.

Tiles. A window's N tokens are cut into query blocks of BLOCK_M and key blocks of BLOCK_N tokens (powers
of two >= 16, the smallest MMA; see the launchers for the sizes). Per (query block, key block) tile the
logits S = Q K^T come from tensor cores (tl.dot), scaled, + bias + mask, in fp32 (fp64 for fp64 under the
interpreter) and base 2 (exp2).

* Forward, grid (query blocks x windows x B, heads): online softmax over the key blocks, O = P V (tl.dot).
* Backward, nothing saved: every window's attention is recomputed, flash-attention style, in two kernels.
  - `bwd_query`, grid as the forward: a stats pass (the forward's online softmax, giving the rows'
    log-sum-exp and delta = rowsum(dO O) = rowsum(P dP)), then a gradient pass over the key blocks:
    dS = P (dO V^T - delta), dQ = scale dS K. Stores dQ and the stats.
  - `bwd_key`, grid (window groups x key blocks, heads): holds a key block, loops over the query blocks:
    dV = P^T dO, dK = scale dS^T Q.
  A `bwd_key` program owns key block kb of head h in windows s, s + n_split, ... of all images, so the
  cross-window sums stay in the program: d(table) as the [N, N] sum of dS (in registers across windows
  when a window is one query block, else read-added-stored in the program's own slot) and d(pad_qkv) as
  the padded keys' dK, dV rows. The launcher sums the slots in a fixed order (deterministic, no atomics)
  and turns the [N, N] sum into table entries by summing its relative-offset diagonals.

Dot operands are in the data dtype (P and dS rounded to it, as flash attention does) with fp32
accumulation (fp64 under the interpreter); fp32 dots use DOT_PRECISION (tf32x3). Offsets inside an image
are int32 (`limits` declines an image of qkv with 2^31 elements or more); image and slot bases are int64.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _launch

_LOG2E = tl.constexpr(1.4426950408889634)
_REGION_MASK = tl.constexpr(-100.0)  # mmseg's shift mask value, added to the logit (not -inf)


@triton.jit
def _tokens(blk, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK: tl.constexpr, HAS_SHIFT: tl.constexpr):
    """Tokens blk*BLOCK + [0, BLOCK) of window (wr, wc) of the rolled map.

    Returns (in_window, token, rel, region): whether t < N; its index pr*W + pc in the image if it is a token
    of the H x W map, else -1 (padding, or beyond N; callers test `token >= 0`); i*(2Ww-1) + j, its part of
    the relative index (token 0's beyond N, so that every table index is in range); a label equal for two
    tokens of the window iff they lie in the same shift region (0 without a shift).
    """
    t = blk * BLOCK + tl.arange(0, BLOCK)
    in_window = t < N
    t = tl.where(in_window, t, 0)
    i = t // WW
    j = t - i * WW
    pr = wr * WH + sh + i
    pr = tl.where(pr >= HP, pr - HP, pr)
    pc = wc * WW + sw + j
    pc = tl.where(pc >= WP, pc - WP, pc)
    if HAS_SHIFT:
        # Rolled row r is in region 0 (r < HP - WH), 1 (r < HP - sh) or 2: only the last window row holds
        # two regions, rows i < WH - sh and the rows the roll brought from the top (columns alike).
        last_row = wr == HP // WH - 1
        last_col = wc == WP // WW - 1
        region = tl.where(last_row & (i >= WH - sh), 2, 0) + tl.where(last_col & (j >= WW - sw), 1, 0)
    else:
        region = tl.zeros_like(t)
    token = tl.where(in_window & (pr < H) & (pc < W), pr * W + pc, -1)
    return in_window, token, i * (2 * WW - 1) + j, region


@triton.jit
def _load_rows(img, pad_ptr, token, in_window, col, offs_d, mask_d, C3, HAS_PAD: tl.constexpr):
    """[BLOCK, D_PAD] channels col + offs_d of the tokens: qkv for real tokens, pad_qkv for padded tokens
    of the window (HAS_PAD), 0 elsewhere."""
    ptrs = img + (token * C3 + col)[:, None] + offs_d[None, :]
    x = tl.load(ptrs, mask=(token >= 0)[:, None] & mask_d[None, :], other=0.0)
    if HAS_PAD:
        fill = tl.load(pad_ptr + col + offs_d, mask=mask_d, other=0.0)
        x = tl.where((in_window & (token < 0))[:, None], fill[None, :], x)
    return x


@triton.jit
def _logits(a, b, scale, table_ptr, h, HEADS, WH, WW, t_rel, t_region, u_rel, u_key, u_region,
            KEYS_FIRST: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_SHIFT: tl.constexpr,
            DOT_PRECISION: tl.constexpr, acc_dtype: tl.constexpr):
    """logit(t, u) * log2(e) in acc_dtype, -inf where u is no key: [queries, keys] from a = Q, b = K, or
    [keys, queries] (KEYS_FIRST) from a = K, b = Q.

    logit = scale q.k + table[index, h] + region mask, index = (it - iu + Wh - 1)(2Ww - 1) + (jt - ju + Ww - 1)
    = centre + rel_t - rel_u (always in range: `_tokens` gives tokens beyond N token 0's rel).
    """
    s = tl.dot(a, tl.trans(b), input_precision=DOT_PRECISION, out_dtype=acc_dtype) * scale
    if KEYS_FIRST:
        t_rel, u_rel = t_rel[None, :], u_rel[:, None]
        t_region, u_region = t_region[None, :], u_region[:, None]
        u_key = u_key[:, None]
    else:
        t_rel, u_rel = t_rel[:, None], u_rel[None, :]
        t_region, u_region = t_region[:, None], u_region[None, :]
        u_key = u_key[None, :]
    if HAS_TABLE:
        centre = (WH - 1) * (2 * WW - 1) + WW - 1
        s += tl.load(table_ptr + h + (centre + t_rel - u_rel) * HEADS).to(acc_dtype)
    if HAS_SHIFT:
        s += tl.where(t_region == u_region, 0.0, _REGION_MASK)
    return tl.where(u_key, s * _LOG2E, float("-inf"))


@triton.jit
def _softmax_pass(img, pad_ptr, table_ptr, q, t_rel, t_region, h, wr, wc, scale,
                  H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, offs_d, mask_d,
                  HAS_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
                  DOT_PRECISION: tl.constexpr, acc_dtype: tl.constexpr):
    """Online softmax of a query block over the window's key blocks: (m, l, acc), the base-2 row max, the
    row sum of exp2(s - m) and sum_u exp2(s_u - m) v_u; O = acc / l."""
    dot_dtype: tl.constexpr = q.dtype
    m = tl.full([BLOCK_M], float("-inf"), dtype=acc_dtype)
    l = tl.zeros([BLOCK_M], dtype=acc_dtype)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=acc_dtype)
    for kb in range(0, tl.cdiv(N, BLOCK_N)):
        u_in, u_tok, u_rel, u_region = _tokens(kb, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK_N, HAS_SHIFT)
        k = _load_rows(img, pad_ptr, u_tok, u_in, C + h * D, offs_d, mask_d, 3 * C, HAS_PAD)
        v = _load_rows(img, pad_ptr, u_tok, u_in, 2 * C + h * D, offs_d, mask_d, 3 * C, HAS_PAD)
        s = _logits(q, k, scale, table_ptr, h, HEADS, WH, WW, t_rel, t_region, u_rel,
                    u_in if HAS_PAD else u_tok >= 0, u_region, False, HAS_TABLE, HAS_SHIFT, DOT_PRECISION, acc_dtype)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        # A block whose keys are all padded leaves m = -inf: subtract 0 there, not -inf (inf - inf = NaN).
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(dot_dtype), v, input_precision=DOT_PRECISION,
                                            out_dtype=acc_dtype)
        m = m_new
    return m, l, acc


@triton.jit
def _program_block(pid, q_blocks, n_windows, n_wc):
    """(block, window, image, window row, window column) of program pid of a (blocks x windows x B) grid."""
    blk = pid % q_blocks
    w = (pid // q_blocks) % n_windows
    b = (pid // (q_blocks * n_windows)).to(tl.int64)
    wr = w // n_wc
    return blk, w, b, wr, w - wr * n_wc


@triton.jit
def window_attention_fwd_kernel(
    qkv_ptr, table_ptr, pad_ptr, out_ptr,
    H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, n_wc, n_windows, q_blocks, scale,
    HAS_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (q_blocks * n_windows * B, HEADS); query block fastest, then window.

    qkv T [B, H, W, 3C], table T [(2WH-1)(2WW-1), HEADS], pad T [3C]; writes out T [B, H, W, C] at the
    real tokens of the program's query block and head.
    """
    if qkv_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    qb, w, b, wr, wc = _program_block(tl.program_id(0), q_blocks, n_windows, n_wc)
    h = tl.program_id(1)
    img = qkv_ptr + b * H * W * 3 * C
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D

    t_in, t_tok, t_rel, t_region = _tokens(qb, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK_M, HAS_SHIFT)
    q = _load_rows(img, pad_ptr, t_tok, t_in, h * D, offs_d, mask_d, 3 * C, HAS_PAD)
    m, l, acc = _softmax_pass(img, pad_ptr, table_ptr, q, t_rel, t_region, h, wr, wc, scale,
                              H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, offs_d, mask_d,
                              HAS_TABLE, HAS_PAD, HAS_SHIFT, BLOCK_M, BLOCK_N, D_PAD, DOT_PRECISION, acc_dtype)
    out_ptrs = out_ptr + b * H * W * C + (t_tok * C + h * D)[:, None] + offs_d[None, :]
    tl.store(out_ptrs, (acc / l[:, None]).to(out_ptr.dtype.element_ty), mask=(t_tok >= 0)[:, None] & mask_d[None, :])


@triton.jit
def window_attention_bwd_query_kernel(
    grad_ptr, qkv_ptr, table_ptr, pad_ptr, grad_qkv_ptr, stats_ptr, pad_part_ptr,
    H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, n_wc, n_windows, q_blocks, scale,
    HAS_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (q_blocks * n_windows * B, HEADS), as the forward.

    grad T [B, H, W, C]. Writes dQ into grad_qkv T [B, H, W, 3C] (channels [0, C)) at the block's real
    tokens, stats acc [B * n_windows, HEADS, 2, N] (the rows' base-2 log-sum-exp and delta = dO . O) and,
    with HAS_PAD, pad_part acc [q_blocks * n_windows * B, HEADS, D]: the padded queries' dQ rows summed.
    Their dO is 0, so that is 0 unless a NaN or inf turns 0 * x into NaN, as in eager autograd.
    """
    if qkv_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dot_dtype: tl.constexpr = qkv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    qb, w, b, wr, wc = _program_block(pid, q_blocks, n_windows, n_wc)
    h = tl.program_id(1)
    img = qkv_ptr + b * H * W * 3 * C
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D

    t_in, t_tok, t_rel, t_region = _tokens(qb, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK_M, HAS_SHIFT)
    row_mask = (t_tok >= 0)[:, None] & mask_d[None, :]
    q = _load_rows(img, pad_ptr, t_tok, t_in, h * D, offs_d, mask_d, 3 * C, HAS_PAD)
    # dO is 0 on padded and out-of-window queries: they get no gradient and give none.
    d_o = tl.load(grad_ptr + b * H * W * C + (t_tok * C + h * D)[:, None] + offs_d[None, :], mask=row_mask,
                  other=0.0)

    # Stats pass: the forward's softmax, then delta = rowsum(dO O) (= rowsum(P dP)).
    m, l, acc = _softmax_pass(img, pad_ptr, table_ptr, q, t_rel, t_region, h, wr, wc, scale,
                              H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, offs_d, mask_d,
                              HAS_TABLE, HAS_PAD, HAS_SHIFT, BLOCK_M, BLOCK_N, D_PAD, DOT_PRECISION, acc_dtype)
    lse = m + tl.log2(l)
    delta = tl.sum(d_o.to(acc_dtype) * (acc / l[:, None]), axis=1)

    # Gradient pass: dQ = scale sum over the key blocks of dS K, dS = P (dO V^T - delta).
    d_q = tl.zeros([BLOCK_M, D_PAD], dtype=acc_dtype)
    for kb in range(0, tl.cdiv(N, BLOCK_N)):
        u_in, u_tok, u_rel, u_region = _tokens(kb, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK_N, HAS_SHIFT)
        k = _load_rows(img, pad_ptr, u_tok, u_in, C + h * D, offs_d, mask_d, 3 * C, HAS_PAD)
        v = _load_rows(img, pad_ptr, u_tok, u_in, 2 * C + h * D, offs_d, mask_d, 3 * C, HAS_PAD)
        s = _logits(q, k, scale, table_ptr, h, HEADS, WH, WW, t_rel, t_region, u_rel,
                    u_in if HAS_PAD else u_tok >= 0, u_region, False, HAS_TABLE, HAS_SHIFT, DOT_PRECISION, acc_dtype)
        p = tl.exp2(s - lse[:, None])
        d_p = tl.dot(d_o, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        d_s = p * (d_p - delta[:, None])
        d_q = tl.dot(d_s.to(dot_dtype), k, d_q, input_precision=DOT_PRECISION)

    tl.store(grad_qkv_ptr + b * H * W * 3 * C + (t_tok * (3 * C) + h * D)[:, None] + offs_d[None, :],
             (d_q * scale).to(grad_qkv_ptr.dtype.element_ty), mask=row_mask)
    stats = stats_ptr + ((b * n_windows + w) * HEADS + h) * 2 * N
    offs_t = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    tl.store(stats + offs_t, lse, mask=t_in)
    tl.store(stats + N + offs_t, delta, mask=t_in)
    if HAS_PAD:
        pad_dq = tl.sum(tl.where((t_in & (t_tok < 0))[:, None], d_q * scale, 0.0), axis=0)
        tl.store(pad_part_ptr + (pid.to(tl.int64) * HEADS + h) * D + offs_d, pad_dq, mask=mask_d)


@triton.jit
def window_attention_bwd_key_kernel(
    grad_ptr, qkv_ptr, table_ptr, pad_ptr, stats_ptr, grad_qkv_ptr, table_part_ptr, pad_part_ptr,
    H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, n_wc, n_windows, total_windows, k_blocks, n_split, scale,
    HAS_TABLE: tl.constexpr, HAS_PAD: tl.constexpr, HAS_SHIFT: tl.constexpr, ONE_QUERY_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (n_split * k_blocks, HEADS); key block fastest. Program (s, kb, h) owns key block kb of head
    h in windows s, s + n_split, ... < total_windows (image-major: window g is window g % n_windows of image
    g // n_windows), and loops over their query blocks; tiles are [keys, queries].

    Reads the rows' stats from `bwd_query`; writes dK, dV into grad_qkv T [B, H, W, 3C] at the real tokens.
    Partial slots, acc: table_part [n_split, HEADS, N, N] (HAS_TABLE: dS summed over the program's
    windows, in the columns of its key block; in registers across windows when the window is one query
    block, else read-added-stored per window) and pad_part [n_split * k_blocks, HEADS, 2, D] (HAS_PAD: the
    padded keys' dK and dV rows summed).
    """
    if qkv_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dot_dtype: tl.constexpr = qkv_ptr.dtype.element_ty
    pid = tl.program_id(0)
    h = tl.program_id(1)
    kb = pid % k_blocks
    split = pid // k_blocks
    offs_d = tl.arange(0, D_PAD)
    mask_d = offs_d < D
    offs_m = tl.arange(0, BLOCK_M)
    offs_u = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    if HAS_TABLE:
        table_slot = table_part_ptr + (split.to(tl.int64) * HEADS + h) * N * N + offs_u[:, None]

    g_acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=acc_dtype)  # dS^T summed over windows (one query block)
    pad_dk = tl.zeros([D_PAD], dtype=acc_dtype)
    pad_dv = tl.zeros([D_PAD], dtype=acc_dtype)
    for g in range(split, total_windows, n_split):
        w = g % n_windows
        b = (g // n_windows).to(tl.int64)
        wr = w // n_wc
        wc = w - wr * n_wc
        img = qkv_ptr + b * H * W * 3 * C
        grad_img = grad_ptr + b * H * W * C
        stats = stats_ptr + ((b * n_windows + w) * HEADS + h) * 2 * N
        u_in, u_tok, u_rel, u_region = _tokens(kb, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK_N, HAS_SHIFT)
        k = _load_rows(img, pad_ptr, u_tok, u_in, C + h * D, offs_d, mask_d, 3 * C, HAS_PAD)
        v = _load_rows(img, pad_ptr, u_tok, u_in, 2 * C + h * D, offs_d, mask_d, 3 * C, HAS_PAD)
        d_k = tl.zeros([BLOCK_N, D_PAD], dtype=acc_dtype)
        d_v = tl.zeros([BLOCK_N, D_PAD], dtype=acc_dtype)
        if HAS_TABLE and not ONE_QUERY_BLOCK:
            tl.debug_barrier()  # slot tiles stored for the previous window may be read back by other threads
        for qb in range(0, tl.cdiv(N, BLOCK_M)):
            t_in, t_tok, t_rel, t_region = _tokens(qb, wr, wc, H, W, HP, WP, WH, WW, N, sh, sw, BLOCK_M, HAS_SHIFT)
            q = _load_rows(img, pad_ptr, t_tok, t_in, h * D, offs_d, mask_d, 3 * C, HAS_PAD)
            d_o = tl.load(grad_img + (t_tok * C + h * D)[:, None] + offs_d[None, :],
                          mask=(t_tok >= 0)[:, None] & mask_d[None, :], other=0.0)
            offs_t = qb * BLOCK_M + offs_m
            lse = tl.load(stats + offs_t, mask=t_in, other=float("inf"))  # P = 0 beyond the window's N tokens
            delta = tl.load(stats + N + offs_t, mask=t_in, other=0.0)
            s_t = _logits(k, q, scale, table_ptr, h, HEADS, WH, WW, t_rel, t_region, u_rel,
                          u_in if HAS_PAD else u_tok >= 0, u_region, True, HAS_TABLE, HAS_SHIFT, DOT_PRECISION,
                          acc_dtype)
            p_t = tl.exp2(s_t - lse[None, :])
            d_v = tl.dot(p_t.to(dot_dtype), d_o, d_v, input_precision=DOT_PRECISION)
            d_p_t = tl.dot(v, tl.trans(d_o), input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            d_s_t = p_t * (d_p_t - delta[None, :])
            d_k = tl.dot(d_s_t.to(dot_dtype), q, d_k, input_precision=DOT_PRECISION)
            if HAS_TABLE:
                if ONE_QUERY_BLOCK:
                    g_acc += d_s_t
                else:
                    ptrs = table_slot + offs_t[None, :] * N
                    tile_mask = u_in[:, None] & t_in[None, :]
                    d_s_t += tl.load(ptrs, mask=tile_mask & (g > split), other=0.0)
                    tl.store(ptrs, d_s_t, mask=tile_mask)
        gq_rows = grad_qkv_ptr + b * H * W * 3 * C + (u_tok * (3 * C))[:, None] + offs_d[None, :]
        row_mask = (u_tok >= 0)[:, None] & mask_d[None, :]
        tl.store(gq_rows + C + h * D, (d_k * scale).to(grad_qkv_ptr.dtype.element_ty), mask=row_mask)
        tl.store(gq_rows + 2 * C + h * D, d_v.to(grad_qkv_ptr.dtype.element_ty), mask=row_mask)
        if HAS_PAD:
            padded = (u_in & (u_tok < 0))[:, None]
            pad_dk += tl.sum(tl.where(padded, d_k * scale, 0.0), axis=0)
            pad_dv += tl.sum(tl.where(padded, d_v, 0.0), axis=0)

    if HAS_TABLE:
        if ONE_QUERY_BLOCK:
            tl.store(table_slot + offs_m[None, :] * N, g_acc, mask=(offs_u < N)[:, None] & (offs_m < N)[None, :])
    if HAS_PAD:
        pad_slot = pad_part_ptr + (pid.to(tl.int64) * HEADS + h) * 2 * D
        tl.store(pad_slot + offs_d, pad_dk, mask=mask_d)
        tl.store(pad_slot + D + offs_d, pad_dv, mask=mask_d)


# ----------------------------------------------------------------------------- launchers
#
# Tiles. BLOCK_M queries x BLOCK_N keys, each min(next power of two >= max(N, 16), cap) (16 is the smallest
# MMA), and D_PAD = next power of two >= max(d, 32) channels (narrower channel tiles spill in bwd_key:
# Triton then spreads its [keys, d] MMAs over warps along the keys, 16 rows, and gives every warp all of
# Q and dO). Each kernel holds one block in registers and loops over the other (fwd, bwd_query: BLOCK_M
# queries, looping over key blocks; bwd_key: BLOCK_N keys, looping over query blocks), and the looped
# block, a B operand of every MMA it enters, is the narrow one: Triton lays out chained dots with all warps
# along one dimension, so each warp holds the whole B operand of its rows (fp32's tf32x3 keeps three
# copies of it: value, hi, lo). Caps: BLOCK_N 16; BLOCK_M 64, 32 for fp32 with d > 32. d <= D_MAX = 64
# (`limits` declines more: fp32 spills at d = 128 whatever the tiles). Swin's 7x7 and ULLMC's 4x8 windows
# are one query block, so bwd_key keeps the table gradient in registers across windows. The configs only
# choose warps and pipelining, per (data bits, BLOCK_M, D_PAD).
#
# Work split of `bwd_key`. Without a table or pad_qkv there is no cross-window sum and every window gets
# its own program. Otherwise n_split programs per (key block, head) each loop over every n_split-th window:
# enough to fill the GPU (a few waves), capped (table) so the fp32 [N, N] slots stay no larger than qkv
# unless that would leave SMs idle. A program always owns at least one window, so every slot is written.

D_MAX = 64
KEY_BLOCK = 16  # the BLOCK_N cap
# The interpreter's tile caps (BLOCK_M, BLOCK_N) and programs per (key block, head): the tests lower the
# caps to run small windows through several query blocks, and a few programs loop over several windows.
INTERP_BLOCK_MAX = (64, 16)
INTERP_PROGRAMS = 2


def _block_m_max(bits: str, d_pad: int) -> int:
    return 32 if bits == "32" and d_pad > 32 else 64


def _configs(rows) -> dict:
    """Config families (data bits, BLOCK_M, D_PAD) -> their configs: rows(bits, BLOCK_M, D_PAD) gives the
    (num_warps, num_stages) pairs, the default first. The tiles are not tuned: they follow from the window."""
    return {(bits, bm, d_pad): _launch.configs(*(({}, warps, stages) for warps, stages in rows(bits, bm, d_pad)))
            for bits in ("16", "32") for d_pad in (32, 64) for bm in (16, 32, 64) if bm <= _block_m_max(bits, d_pad)}


# No spill on sm_80 or sm_90 (tests/test_triton_compile.py), but on sm_90 the fp16 bwd_query with table,
# padding value and shift reports an 8-byte stack frame (an unused 1-byte local left by the LLVM NVPTX
# backend; no spill store or load), which the compile test counts. One pipeline stage: the loops are a few
# blocks long, and a second stage of prefetched blocks spills at the 64-query tiles. Configs left out
# spill: 4 warps in the fp32 backward kernels (ptxas settles on 128 registers on sm_90; 255 + 24-32 B at
# d = 64 on sm_80) and in bwd_key at 64-query tiles; 8 warps in bwd_query at 16-bit 64-query tiles (64
# registers + 4 B for IIWA's one-window grid). fp32 bwd_key takes 32-query tiles when a window has several
# (the launcher): its table slot's read-add-store path spills at 64 on sm_90.
FWD = _launch.Kernel(window_attention_fwd_kernel, configs=_configs(lambda bits, bm, d_pad: [(4, 1), (8, 1)]),
                     interpret={}, tune_key=["N", "D", "n_windows"], family_keys=("BLOCK_M", "D_PAD"))
BWD_QUERY = _launch.Kernel(
    window_attention_bwd_query_kernel,
    configs=_configs(lambda bits, bm, d_pad: [(8, 1)] if bits == "32"
                     else [(4, 1)] if bm == 64 and d_pad == 32 else [(4, 1), (8, 1)]),
    interpret={}, tune_key=["N", "D", "n_windows"], family_keys=("BLOCK_M", "D_PAD"))
BWD_KEY = _launch.Kernel(
    window_attention_bwd_key_kernel,
    configs=_configs(lambda bits, bm, d_pad: [(8, 1)] if bits == "32" or bm == 64 else [(8, 1), (4, 1)]),
    interpret={}, tune_key=["N", "D", "total_windows"], family_keys=("BLOCK_M", "D_PAD"))


class _Geometry(NamedTuple):
    batch: int
    height: int
    width: int
    channels: int
    heads: int
    head_dim: int
    window: tuple[int, int]
    shift: tuple[int, int]
    padded: tuple[int, int]  # Hp, Wp
    tokens: int  # N
    block_m: int
    block_n: int
    d_pad: int

    @property
    def n_windows(self) -> int:
        return (self.padded[0] // self.window[0]) * (self.padded[1] // self.window[1])

    @property
    def q_blocks(self) -> int:
        return triton.cdiv(self.tokens, self.block_m)

    @property
    def k_blocks(self) -> int:
        return triton.cdiv(self.tokens, self.block_n)

    def args(self) -> tuple:
        """The kernels' geometry arguments H, W, HP, WP, WH, WW, N, sh, sw, C, D, HEADS, n_wc, n_windows."""
        return (self.height, self.width, *self.padded, *self.window, self.tokens, *self.shift,
                self.channels, self.head_dim, self.heads, self.padded[1] // self.window[1], self.n_windows)


def _tile(tokens: int, cap: int) -> int:
    return min(max(16, triton.next_power_of_2(tokens)), cap)


def _geometry(qkv: torch.Tensor, heads: int, window, shift) -> _Geometry:
    batch, height, width, channels3 = qkv.shape
    channels = channels3 // 3
    head_dim = channels // heads
    if head_dim > D_MAX:
        raise ValueError(f"the Triton window_attention kernels hold head_dim <= {D_MAX}, got C / heads = "
                         f"{channels} / {heads} = {head_dim}")
    wh, ww = (int(s) for s in window)
    padded = (triton.cdiv(height, wh) * wh, triton.cdiv(width, ww) * ww)
    tokens = wh * ww
    d_pad = max(32, triton.next_power_of_2(head_dim))
    cap_m, cap_n = ((_block_m_max(_launch.dtype_class(qkv.dtype), d_pad), KEY_BLOCK) if _launch.on_gpu_path()
                    else INTERP_BLOCK_MAX)
    return _Geometry(batch, height, width, channels, heads, head_dim, (wh, ww), tuple(int(s) for s in shift),
                     padded, tokens, _tile(tokens, cap_m), _tile(tokens, cap_n), d_pad)


def _flags(geo: _Geometry, bias_table, pad_qkv, dtype: torch.dtype) -> dict:
    return dict(HAS_TABLE=bias_table is not None, HAS_PAD=pad_qkv is not None, HAS_SHIFT=geo.shift != (0, 0),
                BLOCK_M=geo.block_m, BLOCK_N=geo.block_n, D_PAD=geo.d_pad,
                DOT_PRECISION=_launch.dot_precision(dtype))


def limits(facts) -> str | None:
    """Calls these launchers cannot run: a head_dim above one register tile, an image of qkv with 2^31
    elements or more (int32 offsets inside an image), grids above CUDA's limits."""
    if facts["d"] > D_MAX:
        return f"head_dim d = {facts['d']} > {D_MAX} (the Triton kernels' register tiles)"
    if facts["H"] * facts["W"] * 3 * facts["C"] >= 2**31:
        return (f"one image of qkv has H * W * 3C = {facts['H'] * facts['W'] * 3 * facts['C']} >= 2^31 elements "
                f"(int32 offsets inside an image)")
    windows = triton.cdiv(facts["H"], facts["Wh"]) * triton.cdiv(facts["W"], facts["Ww"])
    # The largest grid axis 0 of any dtype: 16-token blocks (the smallest tile) of every window.
    blocks = triton.cdiv(facts["N"], 16)
    return _launch.grid_reason((blocks * windows * facts["B"], facts["heads"]),
                               ("blocks x windows x batch", "heads"))


def window_attention_fwd(qkv: torch.Tensor, bias_table: torch.Tensor | None, pad_qkv: torch.Tensor | None,
                         heads: int, window, shift, scale: float) -> torch.Tensor:
    """out [B, H, W, C]: attention inside the (shifted) windows of qkv [B, H, W, 3C], per head."""
    geo = _geometry(qkv, heads, window, shift)
    out = qkv.new_empty(geo.batch, geo.height, geo.width, geo.channels)
    if geo.batch == 0:
        return out
    FWD(qkv.dtype, lambda m: (geo.q_blocks * geo.n_windows * geo.batch, geo.heads),
        qkv, bias_table, pad_qkv, out, *geo.args(), geo.q_blocks, float(scale),
        **_flags(geo, bias_table, pad_qkv, qkv.dtype))
    return out


def _n_split(geo: _Geometry, qkv: torch.Tensor, has_table: bool, has_pad: bool) -> int:
    """Window groups of `bwd_key` (programs per key block and head)."""
    total = geo.batch * geo.n_windows
    if not _launch.on_gpu_path():
        return min(total, INTERP_PROGRAMS)
    if not (has_table or has_pad):
        return total
    per_group = geo.k_blocks * geo.heads
    programs = _launch.target_programs(qkv.device)
    want = triton.cdiv(programs, per_group)
    if has_table:
        floor = triton.cdiv(programs // 4, per_group)
        slot_bytes = geo.heads * geo.tokens * geo.tokens * 4
        want = min(want, max(floor, qkv.numel() * qkv.element_size() // slot_bytes))
    return max(1, min(want, total))


def _relative_sums(x: torch.Tensor) -> torch.Tensor:
    """[..., n, n] -> [..., 2n - 1]: entry t - u + n - 1 is the sum of x[..., t, u] (the diagonals' sums)."""
    n = x.shape[-1]
    # Row t of the flipped matrix holds x[t, u] at column n - 1 - u; read back row-major with 2n - 1
    # columns instead of 2n, row t moves right by t, to column t - u + n - 1 (the padding absorbs the wrap).
    flat = F.pad(x.flip(-1), (0, n)).flatten(-2)[..., : n * (2 * n - 1)]
    return flat.unflatten(-1, (n, 2 * n - 1)).sum(dim=-2)


def _table_gradient(pair_sums: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """[heads, N, N] sums of dS over windows -> [(2Wh-1)(2Ww-1), heads]: entry
    (it - iu + Wh - 1)(2Ww - 1) + (jt - ju + Ww - 1) sums the pairs with that offset."""
    heads = pair_sums.shape[0]
    wh, ww = window
    g = pair_sums.view(heads, wh, ww, wh, ww).permute(0, 2, 4, 1, 3)  # [h, jt, ju, it, iu]
    g = _relative_sums(g).permute(0, 3, 1, 2)  # [h, 2Wh-1, jt, ju]
    return _relative_sums(g).reshape(heads, -1).t()


def window_attention_bwd(grad: torch.Tensor, qkv: torch.Tensor, bias_table: torch.Tensor | None,
                         pad_qkv: torch.Tensor | None, heads: int, window, shift, scale: float):
    """-> (grad_qkv [B, H, W, 3C], grad_table like bias_table or T[0], grad_pad [3C] or T[0])."""
    geo = _geometry(qkv, heads, window, shift)
    has_table, has_pad = bias_table is not None, pad_qkv is not None
    if geo.batch == 0:
        return (torch.zeros_like(qkv), torch.zeros_like(bias_table) if has_table else qkv.new_empty(0),
                torch.zeros_like(pad_qkv) if has_pad else qkv.new_empty(0))
    acc = _launch.acc_dtype(qkv.dtype)
    flags = _flags(geo, bias_table, pad_qkv, qkv.dtype)
    grad_qkv = torch.empty_like(qkv)
    stats = torch.empty(geo.batch * geo.n_windows, geo.heads, 2, geo.tokens, dtype=acc, device=qkv.device)
    query_programs = geo.q_blocks * geo.n_windows * geo.batch
    pad_q_part = torch.empty(query_programs, geo.heads, geo.head_dim, dtype=acc, device=qkv.device) \
        if has_pad else None
    BWD_QUERY(qkv.dtype, lambda m: (query_programs, geo.heads),
              grad, qkv, bias_table, pad_qkv, grad_qkv, stats, pad_q_part, *geo.args(), geo.q_blocks, float(scale),
              **flags)

    n_split = _n_split(geo, qkv, has_table, has_pad)
    table_part = torch.empty(n_split, geo.heads, geo.tokens, geo.tokens, dtype=acc, device=qkv.device) \
        if has_table else None
    pad_part = torch.empty(n_split * geo.k_blocks, geo.heads, 2, geo.head_dim, dtype=acc, device=qkv.device) \
        if has_pad else None
    # bwd_key's query blocks need not be bwd_query's (the statistics are per token): on a GPU, fp32 windows
    # of several query blocks take 32-query ones (the table slot's read-add-store path spills at 64).
    key_flags = dict(flags)
    if _launch.on_gpu_path() and geo.q_blocks > 1 and _launch.dtype_class(qkv.dtype) == "32":
        key_flags["BLOCK_M"] = min(geo.block_m, 32)
    BWD_KEY(qkv.dtype, lambda m: (n_split * geo.k_blocks, geo.heads),
            grad, qkv, bias_table, pad_qkv, stats, grad_qkv, table_part, pad_part,
            *geo.args(), geo.batch * geo.n_windows, geo.k_blocks, n_split, float(scale),
            ONE_QUERY_BLOCK=geo.q_blocks == 1, **key_flags)

    # Fixed-order sums of the slots. Two distinct empty tensors: a custom op's outputs must not alias.
    grad_table = _table_gradient(table_part.sum(dim=0), geo.window).to(bias_table.dtype).contiguous() \
        if has_table else qkv.new_empty(0)
    if has_pad:
        k_v = pad_part.sum(dim=0).transpose(0, 1).flatten()  # [2, heads, d] -> k then v, heads then d
        grad_pad = torch.cat([pad_q_part.sum(dim=0).flatten(), k_v]).to(pad_qkv.dtype)
    else:
        grad_pad = qkv.new_empty(0)
    return grad_qkv, grad_table, grad_pad


def compile_cases():
    """(all configs?, thunk), B = 2. Every config: ULLMC (64x128 tokens, 4x8 windows, C = 256, 8 heads, on its
    pre-padded map, no padding value); Swin-T stage 1 (56x56, 7x7, C = 96, 3 heads, shift 3, padding value)
    and stage 4 (7x7 tokens, C = 768, 24 heads); 12x12 windows (60x60 tokens: padded; C = 128, 4 heads,
    shift 6); IIWA's grid attention (one 16x16 window, C = 256, 8 heads, no table); head_dim 64 (C = 256,
    4 heads) in 7x7 and 12x12 windows. Default config: the other flag combinations where they change the
    code, 8x16 and 2x2 windows, head_dim 16."""
    m = _launch.meta
    # (all configs, H, W, C, heads, window, shift, table, pad)
    cases = [
        (True, 64, 128, 256, 8, (4, 8), (0, 0), True, False),
        (True, 56, 56, 96, 3, (7, 7), (3, 3), True, True),
        (True, 7, 7, 768, 24, (7, 7), (0, 0), True, True),
        (True, 60, 60, 128, 4, (12, 12), (6, 6), True, True),
        (True, 16, 16, 256, 8, (16, 16), (0, 0), False, False),
        (True, 56, 56, 256, 4, (7, 7), (3, 3), True, True),
        (True, 60, 60, 256, 4, (12, 12), (6, 6), True, True),
        (False, 56, 56, 96, 3, (7, 7), (0, 0), False, False),
        (False, 56, 56, 96, 3, (7, 7), (0, 0), True, False),
        (False, 56, 56, 96, 3, (7, 7), (0, 0), False, True),
        (False, 64, 128, 256, 8, (4, 8), (2, 4), True, True),
        (False, 64, 128, 256, 8, (8, 16), (4, 8), True, True),
        (False, 64, 128, 256, 8, (8, 16), (0, 0), False, False),
        (False, 60, 60, 128, 4, (12, 12), (0, 0), True, False),
        (False, 16, 16, 256, 8, (16, 16), (0, 0), False, True),
        (False, 64, 128, 128, 8, (4, 8), (0, 0), True, False),
        (False, 32, 32, 32, 1, (2, 2), (1, 1), True, True),
    ]
    for dtype in _launch.GPU_DTYPES:
        for all_configs, h, w, c, heads, window, shift, with_table, with_pad in cases:
            def case(dtype=dtype, h=h, w=w, c=c, heads=heads, window=window, shift=shift,
                     with_table=with_table, with_pad=with_pad):
                qkv = m(2, h, w, 3 * c, dtype=dtype)
                table = m((2 * window[0] - 1) * (2 * window[1] - 1), heads, dtype=dtype) if with_table else None
                pad = m(3 * c, dtype=dtype) if with_pad else None
                scale = (c // heads) ** -0.5
                window_attention_fwd(qkv, table, pad, heads, window, shift, scale)
                window_attention_bwd(m(2, h, w, c, dtype=dtype), qkv, table, pad, heads, window, shift, scale)
            yield all_configs, case
