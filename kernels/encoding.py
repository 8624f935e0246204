"""EncNet's Encoding layer, fused: scaled-L2 assignment, softmax over K, residual aggregation.

Contract: docs/kernels.md "encoding"; launchers below the kernels.

All maths uses centred values x' = x - m, c' = c - m (m = mean_k c_k, from the
launcher): distances are translation invariant and, centred,
``||x'||^2 - 2 x'.c' + ||c'||^2`` does not cancel catastrophically when the
features have a large norm and sit near the codewords.

A program owns one image and its pixel tiles pid, pid + n_split, ... Per tile:

    pass 1 (D chunks):  cross = X' (-2 C')^T (tl.dot), xx = ||x'||^2     [BLOCK_N, K_PAD]
    registers:          A = softmax_k(s * max(xx + cross + ||c'||^2, 0))
    pass 2 (D chunks):  re-read the tile (just read, so L2-hot) and form its
                        products with A, as [BLOCK_D, .] tiles so that D, not
                        K, is the MMA M dimension (wgmma wants M >= 64)

Pixels whose expanded distances are mostly rounding error where it matters (codewords spread far apart,
_untrusted_rows) get A = 0 here and are flagged; encoding_{fwd,bwd}_direct_kernel redo them from the raw
values afterwards, into the same slots.

The [N, K] assignment only ever exists as this register tile. Cross-tile sums
go to the program's private fp32 slot: stored on its first tile, read-added-
stored on later ones (no atomics, no zero-fill); the launcher sums the slots in
a fixed order, so results are deterministic.

Dot operands are in the input dtype (16-bit inputs use their native MMA; the
launcher rounds c' to it) with fp32 accumulation (fp64 for fp64 under the
interpreter); for fp32 inputs DOT_PRECISION picks the tensor-core precision.
``xx`` is taken from the same rounded x' the dot sees, so a distance is that
of two (slightly rounded) points instead of a mix of roundings.
Offsets inside an image are int32 (the launcher checks N * D < 2^31); image
and slot bases are int64.
"""
import torch
import triton
import triton.language as tl

from . import _launch

_LOG2E = tl.constexpr(1.4426950408889634)
# csrc/common/encoding.h: kEncodingDirectRatio, kEncodingLogitMargin.
_DIRECT_RATIO = tl.constexpr(16.0)
_LOGIT_MARGIN = tl.constexpr(64.0)


@triton.jit
def _x_tile(x_img, offs_n, offs_d, mask, N, D, CHANNELS_FIRST: tl.constexpr, acc_dtype: tl.constexpr):
    """x as [BLOCK_N, BLOCK_D] in acc_dtype, 0 where masked. x_img points at the image's first element;
    channels_first reads [D, N] (pixels contiguous), else [N, D]."""
    if CHANNELS_FIRST:
        ptrs = x_img + offs_d[None, :] * N + offs_n[:, None]
    else:
        ptrs = x_img + offs_n[:, None] * D + offs_d[None, :]
    return tl.load(ptrs, mask=mask, other=0.0).to(acc_dtype)


@triton.jit
def _centred_tile(x_img, mean_ptr, offs_n, offs_d, mask_n, mask_d, N, D,
                  CHANNELS_FIRST: tl.constexpr, acc_dtype: tl.constexpr):
    """x' = x - m as [BLOCK_N, BLOCK_D] in acc_dtype, exactly 0 outside the image (masked loads give 0,
    and so does the where() after subtracting m), so padding adds nothing to any sum."""
    mask = mask_n[:, None] & mask_d[None, :]
    x = _x_tile(x_img, offs_n, offs_d, mask, N, D, CHANNELS_FIRST, acc_dtype)
    m = tl.load(mean_ptr + offs_d, mask=mask_d, other=0.0)
    return tl.where(mask, x - m[None, :], 0.0)


@triton.jit
def _centred_tile_t(x_img, mean_ptr, d0, offs_n, mask_n, N, D, BLOCK_D: tl.constexpr,
                    CHANNELS_FIRST: tl.constexpr, acc_dtype: tl.constexpr, dot_dtype: tl.constexpr):
    """(offs_d, mask_d, x'^T in dot_dtype as [BLOCK_D, BLOCK_N]) for the D chunk from d0: the second pass
    keeps D as the MMA M dimension."""
    offs_d = d0 + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    mask = mask_d[:, None] & mask_n[None, :]
    if CHANNELS_FIRST:
        ptrs = x_img + offs_d[:, None] * N + offs_n[None, :]
    else:
        ptrs = x_img + offs_n[None, :] * D + offs_d[:, None]
    x = tl.load(ptrs, mask=mask, other=0.0).to(acc_dtype)
    m = tl.load(mean_ptr + offs_d, mask=mask_d, other=0.0)
    return offs_d, mask_d, tl.where(mask, x - m[:, None], 0.0).to(dot_dtype)


@triton.jit
def _softmax_rows(logits, rows):
    """softmax over axis 1 of [BLOCK_N, K_PAD] logits (padded codewords at -inf); rows outside `rows` are 0.
    The row max is subtracted before exp2 so no logit overflows."""
    row_max = tl.max(logits, axis=1)
    p = tl.exp2((logits - row_max[:, None]) * _LOG2E)
    a = p / tl.sum(p, axis=1)[:, None]
    return tl.where(rows[:, None], a, 0.0)


@triton.jit
def _assignment(cross, xx, cc, s, mask_n, mask_k, D):
    """A = softmax_k(s_k * clamp(||x'_i - c'_k||^2, 0)) from the expanded distances, and which rows cannot
    trust them (spread codewords, see _untrusted_rows). Returns (A, dist, untrusted): A is 0 on rows
    outside the image and on untrusted rows, which the direct kernels redo from the raw values.

    cross = -2 x'_i . c'_k (the dot against -2 c', exact scaling of c'). Padded codewords get -inf logits.
    """
    dist = xx[:, None] + cross + cc[None, :]
    dist = tl.where(dist < 0, 0.0, dist)  # not tl.maximum: a NaN distance must stay NaN, as in the eager maths
    # Exactly one infinite norm: the eager sum of (x - c)^2 is +inf where the expansion gives inf - inf.
    inf = float("inf")
    dist = tl.where(((xx[:, None] == inf) & (cc[None, :] < inf)) | ((cc[None, :] == inf) & (xx[:, None] < inf)),
                    inf, dist)
    logits = tl.where(mask_k[None, :], dist * s[None, :], float("-inf"))
    untrusted = _untrusted_rows(logits, xx, cc, dist, s, D) & mask_n
    a = _softmax_rows(logits, mask_n & ~untrusted)
    return a, dist, untrusted


@triton.constexpr_function
def _eps(dtype):
    """Unit roundoff of the accumulation dtype."""
    return 2.220446049250313e-16 if dtype == tl.float64 else 1.1920929e-7


@triton.jit
def _untrusted_rows(logits, xx, cc, dist, s, D):
    """Pixels whose expanded distances are mostly rounding error where it matters: some entry's norms
    ||x'||^2 + ||c'_k||^2 exceed DIRECT_RATIO times its distance (the expansion's error ~eps * norms
    against the eager sum's ~eps * dist: codewords far apart, the pixel near one) and its logit is within
    LOGIT_MARGIN of the row max, widened by twice a bound of the row's logit errors
    |s_k| (||x'||^2 + ||c'_k||^2) D eps. The CPU kernel's rule per entry (csrc/common/encoding.h,
    encoding_expansion_imprecise / encoding_logit_floor), applied here per pixel, with the error bound
    max|s| ||x'||^2 + max_k |s_k| ||c'_k||^2 (>= the CPU's, from [K] vectors: no extra [BLOCK_N, K] tile
    in a kernel at its register limit). Finite norms only: non-finite rows keep the expanded form's
    reference semantics. Clustered codewords never qualify (norms ~ dist there)."""
    abs_s = tl.abs(s)  # 0 on padded codewords, as cc
    err = xx * tl.max(abs_s, axis=0) + tl.max(abs_s * cc, axis=0)
    floor = tl.max(logits, axis=1) - _LOGIT_MARGIN - (2.0 * _eps(dist.dtype)) * D * err
    norms = xx[:, None] + cc[None, :]
    imprecise = (norms < float("inf")) & (norms > dist * _DIRECT_RATIO) & (logits >= floor[:, None])
    return tl.max(imprecise.to(tl.int32), axis=1) > 0


@triton.jit
def _softmax_grad(a, d_a, offs_k):
    """dL = A (dA - sum_j A_j dA_j) per row. dA is shifted by its value at the row's winning codeword
    first (same dL, as sum_j A_j = 1): a near one-hot row then subtracts no two nearly equal terms. A
    non-finite shift would turn the row's infinite terms into inf - inf: 0 instead. Rows with A = 0 give 0."""
    win = tl.argmax(tl.where(a == a, a, -1.0), axis=1)  # a NaN row (NaN inputs) has no winner: take 0
    shift = tl.sum(tl.where(offs_k[None, :] == win[:, None], d_a, 0.0), axis=1)
    shift = tl.where(shift - shift == 0, shift, 0.0)
    d_a = d_a - shift[:, None]
    return a * (d_a - tl.sum(a * d_a, axis=1)[:, None])


@triton.constexpr_function
def _acc_dtype(dtype):
    """The accumulation dtype of data in dtype: fp64 for fp64 (the interpreter's), else fp32."""
    return tl.float64 if dtype == tl.float64 else tl.float32


@triton.jit
def _program(x_ptr, N, D, n_split):
    """The kernels' program, grid (n_split, B): (pid, b int64, x_img, slot index)."""
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    return pid, b, x_ptr + b * N * D, b * n_split + pid


@triton.jit
def _scales(scale_ptr, K, K_PAD: tl.constexpr, acc_dtype: tl.constexpr):
    """(offs_k, mask_k, s acc), [K_PAD] each; padded codewords load 0."""
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    return offs_k, mask_k, tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0).to(acc_dtype)


@triton.jit
def _codewords(cc_ptr, scale_ptr, K, K_PAD: tl.constexpr, acc_dtype: tl.constexpr):
    """(offs_k, mask_k, s acc, ||c'||^2 acc), [K_PAD] each; padded codewords load 0."""
    offs_k, mask_k, s = _scales(scale_ptr, K, K_PAD, acc_dtype)
    return offs_k, mask_k, s, tl.load(cc_ptr + offs_k, mask=mask_k, other=0.0)


@triton.jit
def _pass1(x_img, mean_ptr, w_ptr, offs_w, mask_w, offs_n, mask_n, N, D,
           CHANNELS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, W_PAD: tl.constexpr,
           DOT_PRECISION: tl.constexpr, acc_dtype: tl.constexpr, dot_dtype: tl.constexpr):
    """Pass 1 over the D chunks of a pixel tile: (X' W^T acc [BLOCK_N, W_PAD], ||x'||^2 acc [BLOCK_N]) for
    the rows offs_w of W [., D] at w_ptr (dot dtype); ||x'||^2 from the rounded x' the dot sees."""
    prod = tl.zeros([BLOCK_N, W_PAD], dtype=acc_dtype)
    xx = tl.zeros([BLOCK_N], dtype=acc_dtype)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        mask_d = offs_d < D
        xc = _centred_tile(x_img, mean_ptr, offs_n, offs_d, mask_n, mask_d, N, D,
                           CHANNELS_FIRST, acc_dtype).to(dot_dtype)
        xr = xc.to(acc_dtype)
        xx += tl.sum(xr * xr, axis=1)
        w_t = tl.load(w_ptr + offs_w[None, :] * D + offs_d[:, None],
                      mask=mask_w[None, :] & mask_d[:, None], other=0.0)
        prod = tl.dot(xc, w_t, prod, input_precision=DOT_PRECISION)
    return prod, xx


@triton.jit
def _add_to_slot(slot_ptr, part, offs_d, mask_d, offs_k, mask_k, K, later_tile):
    """Stores part [BLOCK_D, K_PAD] into the slot [D, K] at slot_ptr, plus what it holds on later tiles."""
    ptrs = slot_ptr + offs_d[:, None] * K + offs_k[None, :]
    pmask = mask_d[:, None] & mask_k[None, :]
    part += tl.load(ptrs, mask=pmask & later_tile, other=0.0)
    tl.store(ptrs, part, mask=pmask)


@triton.jit
def encoding_fwd_kernel(
    x_ptr, cw_ptr, cc_ptr, mean_ptr, scale_ptr, e_part_ptr, a_part_ptr, flags_ptr,
    N, D, K, n_split,
    CHANNELS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (n_split, B).

    x: T [B, N, D] or [B, D, N] (CHANNELS_FIRST); cw: -2 c' in the dot dtype [K, D];
    cc: ||c'||^2 acc [K]; mean: m acc [D]; scale: T [K].
    Writes e_part acc [B, n_split, D, K] = sum over the program's pixels of x'_i A_ik
    and a_part acc [B, n_split, K] = sum of A_ik; the launcher forms
    E = sum e_part - (sum a_part) c'. Untrusted pixels (_untrusted_rows) are left out of both and marked
    in flags int8 [B, N] for encoding_fwd_direct_kernel.
    """
    acc_dtype: tl.constexpr = _acc_dtype(x_ptr.dtype.element_ty)
    dot_dtype: tl.constexpr = cw_ptr.dtype.element_ty
    pid, b, x_img, slot = _program(x_ptr, N, D, n_split)
    e_slot = e_part_ptr + slot * K * D
    flags_img = flags_ptr + b * N
    offs_k, mask_k, s, cc = _codewords(cc_ptr, scale_ptr, K, K_PAD, acc_dtype)
    colsum = tl.zeros([K_PAD], dtype=acc_dtype)

    for tile in range(pid, tl.cdiv(N, BLOCK_N), n_split):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N

        cross, xx = _pass1(x_img, mean_ptr, cw_ptr, offs_k, mask_k, offs_n, mask_n, N, D,
                           CHANNELS_FIRST, BLOCK_N, BLOCK_D, K_PAD, DOT_PRECISION, acc_dtype, dot_dtype)
        a, _, untrusted = _assignment(cross, xx, cc, s, mask_n, mask_k, D)
        tl.store(flags_img + offs_n, untrusted.to(tl.int8), mask=mask_n)
        colsum += tl.sum(a, axis=0)
        a_op = a.to(dot_dtype)

        # The slot written for the previous tile is read back below, possibly
        # by other threads of the block.
        tl.debug_barrier()
        later_tile = tile > pid
        for d0 in range(0, D, BLOCK_D):
            # X'^T A as [BLOCK_D, K_PAD]: D, not K, is the MMA M dimension (wgmma needs M >= 64).
            offs_d, mask_d, xt = _centred_tile_t(x_img, mean_ptr, d0, offs_n, mask_n, N, D, BLOCK_D,
                                                 CHANNELS_FIRST, acc_dtype, dot_dtype)
            part = tl.dot(xt, a_op, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            _add_to_slot(e_slot, part, offs_d, mask_d, offs_k, mask_k, K, later_tile)

    tl.store(a_part_ptr + slot * K + offs_k, colsum, mask=mask_k)


@triton.jit
def encoding_bwd_kernel(
    g_ptr, x_ptr, cc_ptr, mean_ptr, scale_ptr, cde_ptr,
    gx_ptr, gc_part_ptr, vec_part_ptr, flags_ptr,
    N, D, K, n_split,
    CHANNELS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    K_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (n_split, B); A is recomputed per tile from x, as in the forward.

    g: dot dtype [B, 2K, D], rows interleaved: g[b, 2k] = -2 c'_k, g[b, 2k+1] = dE_bk.
    One operand serves both passes, so each pass is one MMA over 2*K_PAD columns:

        pass 1:  X' G^T  ->  (cross = -2 x'.c'_k, x'.dE_k)          [BLOCK_N, 2 K_PAD]
        pass 2:  grad_x^T = G^T [W | A]^T + x'^T 2 rowsum(W)        (stored in x's layout)
                 gc_part += X'^T W                                   acc [B, n_split, D, K]

    with cde = c'_k . dE_bk (acc [B, K]), dA = x'.dE - cde, dL = A (dA - rowsum(A dA)),
    W = dL * s; grad_x = A dE + 2 rowsum(W) x' - 2 W C'. vec_part acc
    [B, n_split, 3, K] = (colsum A, colsum W, colsum dL*dist); the launcher
    finishes grad_c = -(sum A) dE - 2 sum gc_part + 2 (sum W) c', grad_s = sum dL*dist.
    Untrusted pixels get A = 0 here (grad_x 0, nothing in any sum) and are marked in flags int8 [B, N];
    encoding_bwd_direct_kernel completes them.
    """
    acc_dtype: tl.constexpr = _acc_dtype(x_ptr.dtype.element_ty)
    dot_dtype: tl.constexpr = g_ptr.dtype.element_ty
    pid, b, x_img, slot = _program(x_ptr, N, D, n_split)
    gx_img = gx_ptr + b * N * D
    g_img = g_ptr + b * 2 * K * D
    gc_slot = gc_part_ptr + slot * K * D
    flags_img = flags_ptr + b * N
    offs_k, mask_k, s, cc = _codewords(cc_ptr, scale_ptr, K, K_PAD, acc_dtype)
    offs_g = tl.arange(0, 2 * K_PAD)
    mask_g = offs_g < 2 * K
    cde = tl.load(cde_ptr + b * K + offs_k, mask=mask_k, other=0.0)
    sum_a = tl.zeros([K_PAD], dtype=acc_dtype)
    sum_w = tl.zeros([K_PAD], dtype=acc_dtype)
    sum_s = tl.zeros([K_PAD], dtype=acc_dtype)

    for tile in range(pid, tl.cdiv(N, BLOCK_N), n_split):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N

        both, xx = _pass1(x_img, mean_ptr, g_img, offs_g, mask_g, offs_n, mask_n, N, D,
                          CHANNELS_FIRST, BLOCK_N, BLOCK_D, 2 * K_PAD, DOT_PRECISION, acc_dtype, dot_dtype)
        cross, xde = tl.split(tl.reshape(both, [BLOCK_N, K_PAD, 2]))
        a, dist, untrusted = _assignment(cross, xx, cc, s, mask_n, mask_k, D)
        tl.store(flags_img + offs_n, untrusted.to(tl.int8), mask=mask_n)
        # dA_ik = dE_k . (x'_i - c'_k); padded and untrusted rows and padded codewords have A = 0, so
        # dL = 0 there.
        d_l = _softmax_grad(a, xde - cde[None, :], offs_k)
        w = d_l * s[None, :]
        w_row2 = 2.0 * tl.sum(w, axis=1)
        sum_a += tl.sum(a, axis=0)
        sum_w += tl.sum(w, axis=0)
        sum_s += tl.sum(d_l * dist, axis=0)
        w_op = w.to(dot_dtype)
        wa_t = tl.trans(tl.reshape(tl.join(w, a), [BLOCK_N, 2 * K_PAD]).to(dot_dtype))

        tl.debug_barrier()  # the slot written for the previous tile is read back below
        later_tile = tile > pid
        for d0 in range(0, D, BLOCK_D):
            # Transposed tiles: D is the MMA M dimension (wgmma needs M >= 64).
            offs_d, mask_d, xt = _centred_tile_t(x_img, mean_ptr, d0, offs_n, mask_n, N, D, BLOCK_D,
                                                 CHANNELS_FIRST, acc_dtype, dot_dtype)
            g_t = tl.load(g_img + offs_g[None, :] * D + offs_d[:, None],
                          mask=mask_g[None, :] & mask_d[:, None], other=0.0)
            gx = tl.dot(g_t, wa_t, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            gx += xt.to(acc_dtype) * w_row2[None, :]
            mask = mask_d[:, None] & mask_n[None, :]
            if CHANNELS_FIRST:
                gx_ptrs = gx_img + offs_d[:, None] * N + offs_n[None, :]
            else:
                gx_ptrs = gx_img + offs_n[None, :] * D + offs_d[:, None]
            tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)

            part = tl.dot(xt, w_op, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            _add_to_slot(gc_slot, part, offs_d, mask_d, offs_k, mask_k, K, later_tile)

    vec = vec_part_ptr + slot * 3 * K + offs_k
    tl.store(vec, sum_a, mask=mask_k)
    tl.store(vec + K, sum_w, mask=mask_k)
    tl.store(vec + 2 * K, sum_s, mask=mask_k)


# ----------------------------------------------------------------------------- untrusted pixels
#
# Pixels the tile kernels marked untrusted (spread codewords) are redone here from the raw x and c, as the
# eager formula does: dist_ik = sum_d (x_id - c_kd)^2 and the residuals x_i - c_k, for every codeword of
# such a pixel. They are rare (clustered codewords never have any), so these kernels favour simplicity:
# one codeword at a time, residual tiles in registers, no MMA. A program walks every n_split-th pixel tile
# of its image, skips tiles without a marked pixel, and adds into the same private slot the tile kernel
# wrote (launched after it, so no barrier is needed across the two).


@triton.jit
def _residual_tile(x_img, c_row, offs_n, mask_n, offs_d, mask_d, N, D, CHANNELS_FIRST: tl.constexpr,
                   acc_dtype: tl.constexpr):
    """x_i - c_k as [BLOCK_N, BLOCK_D], 0 where masked; c_row is codeword k's raw row (acc dtype)."""
    mask = mask_n[:, None] & mask_d[None, :]
    x = _x_tile(x_img, offs_n, offs_d, mask, N, D, CHANNELS_FIRST, acc_dtype)
    c = tl.load(c_row + offs_d, mask=mask_d, other=0.0)
    return tl.where(mask, x - c[None, :], 0.0)


@triton.jit
def _direct_assignment(x_img, c_ptr, de_ptr, offs_n, rows, offs_k, mask_k, s, N, D, K,
                       CHANNELS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                       K_PAD: tl.constexpr, WITH_DE: tl.constexpr, acc_dtype: tl.constexpr):
    """(A = softmax_k(s_k dist_ik), dist_ik = ||x_i - c_k||^2, and with WITH_DE r_ik = (x_i - c_k) . dE_k) as
    [BLOCK_N, K_PAD] from the raw values, on `rows` (0 elsewhere)."""
    dist = tl.zeros([BLOCK_N, K_PAD], dtype=acc_dtype)
    xde = tl.zeros([BLOCK_N, K_PAD], dtype=acc_dtype)
    for k in range(K):
        dist_k = tl.zeros([BLOCK_N], dtype=acc_dtype)
        xde_k = tl.zeros([BLOCK_N], dtype=acc_dtype)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            mask_d = offs_d < D
            r = _residual_tile(x_img, c_ptr + k * D, offs_n, rows, offs_d, mask_d, N, D, CHANNELS_FIRST,
                               acc_dtype)
            dist_k += tl.sum(r * r, axis=1)
            if WITH_DE:
                g = tl.load(de_ptr + k * D + offs_d, mask=mask_d, other=0.0)
                xde_k += tl.sum(r * g[None, :], axis=1)
        dist = tl.where(offs_k[None, :] == k, dist_k[:, None], dist)
        if WITH_DE:
            xde = tl.where(offs_k[None, :] == k, xde_k[:, None], xde)
    a = _softmax_rows(tl.where(mask_k[None, :], dist * s[None, :], float("-inf")), rows)
    return a, dist, xde


@triton.jit
def _column(t, offs_k, k):
    """Column k of a [BLOCK_N, K_PAD] register tile, as [BLOCK_N]."""
    return tl.sum(tl.where(offs_k[None, :] == k, t, 0.0), axis=1)


@triton.jit
def _add_to_slot_column(slot_ptr, k, K, part, offs_d, mask_d):
    """slot[d, k] += part[d] for the slot [D, K] at slot_ptr."""
    ptrs = slot_ptr + offs_d * K + k
    tl.store(ptrs, tl.load(ptrs, mask=mask_d, other=0.0) + part, mask=mask_d)


@triton.jit
def _untrusted_tile(flags_img, tile, N, BLOCK_N: tl.constexpr):
    """(offs_n, rows, any): a pixel tile, its untrusted pixels and whether it has one."""
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.load(flags_img + offs_n, mask=offs_n < N, other=0) != 0
    return offs_n, rows, tl.max(rows.to(tl.int32), axis=0) > 0


@triton.jit
def encoding_fwd_direct_kernel(
    x_ptr, c_ptr, scale_ptr, flags_ptr, e_part_ptr,
    N, D, K, n_split,
    CHANNELS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
):
    """grid = (n_split, B), after encoding_fwd_kernel. c: raw codewords acc [K, D].

    Adds sum_i A_ik (x_i - c_k) over the program's untrusted pixels to its e_part slot; those pixels are
    in no a_part, so the launcher's E = sum e_part - (sum a_part) c' counts each residual once.
    """
    acc_dtype: tl.constexpr = _acc_dtype(x_ptr.dtype.element_ty)
    pid, b, x_img, slot = _program(x_ptr, N, D, n_split)
    e_slot = e_part_ptr + slot * K * D
    flags_img = flags_ptr + b * N
    offs_k, mask_k, s = _scales(scale_ptr, K, K_PAD, acc_dtype)
    for tile in range(pid, tl.cdiv(N, BLOCK_N), n_split):
        offs_n, rows, any_rows = _untrusted_tile(flags_img, tile, N, BLOCK_N)
        if any_rows:
            a, _, _ = _direct_assignment(x_img, c_ptr, c_ptr, offs_n, rows, offs_k, mask_k, s, N, D, K,
                                         CHANNELS_FIRST, BLOCK_N, BLOCK_D, K_PAD, False, acc_dtype)
            tl.debug_barrier()  # slot entries written for an earlier tile are read back below
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                mask_d = offs_d < D
                for k in range(K):
                    r = _residual_tile(x_img, c_ptr + k * D, offs_n, rows, offs_d, mask_d, N, D,
                                       CHANNELS_FIRST, acc_dtype)
                    part = tl.sum(_column(a, offs_k, k)[:, None] * r, axis=0)
                    _add_to_slot_column(e_slot, k, K, part, offs_d, mask_d)


@triton.jit
def encoding_bwd_direct_kernel(
    x_ptr, c_ptr, scale_ptr, de_ptr, flags_ptr, gx_ptr, gc_part_ptr, vec_part_ptr,
    N, D, K, n_split,
    CHANNELS_FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, K_PAD: tl.constexpr,
    GRAD_X: tl.constexpr,
):
    """grid = (n_split, B), after encoding_bwd_kernel. c: raw codewords acc [K, D]; de: dE acc [B, K, D].

    For the program's untrusted pixels, with r_ik = x_i - c_k, dA_ik = dE_k . r_ik and W = dL * s:
    GRAD_X stores grad_x_i = sum_k A_ik dE_k + 2 W_ik r_ik; otherwise it adds sum_i W_ik r_ik to the
    gc_part slot and colsum A, colsum dL*dist to the vec_part slot. They are in no colsum W, so the
    launcher's grad_c = -(sum A) dE - 2 sum gc_part + 2 (sum W) c' gets -A dE - 2 W r for each of them.
    Two launches that each recompute A and dL: one kernel doing both kept a cold value on the stack
    (ptxas, every config tried), and this path is rare.
    """
    acc_dtype: tl.constexpr = _acc_dtype(x_ptr.dtype.element_ty)
    pid, b, x_img, slot = _program(x_ptr, N, D, n_split)
    de_img = de_ptr + b * K * D
    flags_img = flags_ptr + b * N
    offs_k, mask_k, s = _scales(scale_ptr, K, K_PAD, acc_dtype)
    for tile in range(pid, tl.cdiv(N, BLOCK_N), n_split):
        offs_n, rows, any_rows = _untrusted_tile(flags_img, tile, N, BLOCK_N)
        if any_rows:
            a, dist, xde = _direct_assignment(x_img, c_ptr, de_img, offs_n, rows, offs_k, mask_k, s, N, D, K,
                                              CHANNELS_FIRST, BLOCK_N, BLOCK_D, K_PAD, True, acc_dtype)
            d_l = _softmax_grad(a, xde, offs_k)
            w = d_l * s[None, :]
            if GRAD_X:
                gx_img = gx_ptr + b * N * D
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    mask_d = offs_d < D
                    gx = tl.zeros([BLOCK_N, BLOCK_D], dtype=acc_dtype)
                    for k in range(K):
                        r = _residual_tile(x_img, c_ptr + k * D, offs_n, rows, offs_d, mask_d, N, D,
                                           CHANNELS_FIRST, acc_dtype)
                        g = tl.load(de_img + k * D + offs_d, mask=mask_d, other=0.0)
                        gx += _column(a, offs_k, k)[:, None] * g[None, :] + 2.0 * _column(w, offs_k, k)[:, None] * r
                    mask = rows[:, None] & mask_d[None, :]
                    if CHANNELS_FIRST:
                        gx_ptrs = gx_img + offs_d[None, :] * N + offs_n[:, None]
                    else:
                        gx_ptrs = gx_img + offs_n[:, None] * D + offs_d[None, :]
                    tl.store(gx_ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)
            else:
                gc_slot = gc_part_ptr + slot * K * D
                vec = vec_part_ptr + slot * 3 * K + offs_k
                tl.debug_barrier()  # slot entries written for an earlier tile are read back below
                tl.store(vec, tl.load(vec, mask=mask_k) + tl.sum(a, axis=0), mask=mask_k)
                tl.store(vec + 2 * K, tl.load(vec + 2 * K, mask=mask_k) + tl.sum(d_l * dist, axis=0), mask=mask_k)
                for d0 in range(0, D, BLOCK_D):
                    offs_d = d0 + tl.arange(0, BLOCK_D)
                    mask_d = offs_d < D
                    for k in range(K):
                        r = _residual_tile(x_img, c_ptr + k * D, offs_n, rows, offs_d, mask_d, N, D,
                                           CHANNELS_FIRST, acc_dtype)
                        part = tl.sum(_column(w, offs_k, k)[:, None] * r, axis=0)
                        _add_to_slot_column(gc_slot, k, K, part, offs_d, mask_d)


# ----------------------------------------------------------------------------- launchers
#
# Work split. Each program owns one image and every n_split-th pixel tile of it, and keeps its cross-tile
# sums in a private fp32 slot of [B, n_split, D, K] that is summed here in a fixed order (deterministic,
# no atomics). n_split is chosen to fill the GPU (a few waves), capped so the slots stay no larger than x
# itself unless that would leave SMs idle, and never above the tile count of the largest BLOCK_N a config
# may pick, so every slot is written whatever config runs.
#
# Numerics. m = mean_k c_k and c' = c - m are formed here in fp32 (fp64 for fp64), rounded once to the
# input dtype for the dot operands; ||c'||^2 is taken from that rounded c' so distances are consistent
# with the dot. fp32 dot precision: tf32x3 (~fp32 accuracy on tensor cores). Plain tf32 rounds x', c', A
# to 10 mantissa bits; emulated at N = 4096, D = 512, K = 32 with codewords among the features, that moves
# single assignments A by up to ~2e-3 and E by ~5e-5 relative. The price of tf32x3 (a hi and a lo copy of
# every operand) is register pressure, hence the narrower fp32 tile configs. 16-bit inputs use their
# native MMA with fp32 accumulation; A and the softmax-backward weights are rounded to the input dtype as
# dot operands (as flash attention does).

K_MAX = 64  # codewords held in one register tile

# (BLOCK_N, BLOCK_D) per (input bits, K_PAD), the default first; all spill-free on sm_80 and sm_90. fp32
# gets narrower D chunks and less pipelining: tf32x3 keeps a hi and a lo copy of every MMA operand, and on
# sm_80 Triton holds whole operands in registers.
def _cfg(*rows):
    return _launch.configs(*((dict(BLOCK_N=bn, BLOCK_D=bd), w, st) for bn, bd, w, st in rows))


FWD = _launch.Kernel(
    encoding_fwd_kernel,
    configs={
        ("16", 32): _cfg((128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)),
        ("16", 64): _cfg((128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2)),
        ("32", 32): _cfg((128, 16, 8, 2), (64, 32, 4, 1), (128, 16, 8, 1)),
        ("32", 64): _cfg((64, 16, 8, 2), (128, 16, 8, 1), (64, 16, 8, 1)),
    },
    interpret=dict(BLOCK_N=16, BLOCK_D=16), tune_key=["N", "D", "K", "CHANNELS_FIRST"], family_keys=("K_PAD",),
)
BWD = _launch.Kernel(
    encoding_bwd_kernel,
    configs={
        ("16", 32): _cfg((64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)),
        ("16", 64): _cfg((64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2)),
        ("32", 32): _cfg((64, 16, 8, 2), (64, 16, 8, 1), (32, 32, 8, 2)),
        ("32", 64): _cfg((64, 16, 8, 1), (32, 16, 4, 1)),
    },
    interpret=dict(BLOCK_N=16, BLOCK_D=16), tune_key=["N", "D", "K", "CHANNELS_FIRST"], family_keys=("K_PAD",),
)

# The untrusted-pixel kernels: one config per family. They add into the slots, so they must not be autotuned
# (Triton runs a single config without benchmarking it). Chosen spill-free on sm_80 and sm_90: ptxas keeps a
# cold value on the stack for some (block, warps) choices, e.g. 4 warps for the K_PAD = 64 grad_x kernel.
FWD_DIRECT = _launch.Kernel(
    encoding_fwd_direct_kernel,
    configs={(bits, k_pad): _cfg((32, 16, 4, 1)) for bits in ("16", "32") for k_pad in (32, 64)},
    interpret=dict(BLOCK_N=16, BLOCK_D=16), tune_key=["N", "D", "K", "CHANNELS_FIRST"], family_keys=("K_PAD",),
)
BWD_DIRECT = _launch.Kernel(
    encoding_bwd_direct_kernel,
    configs={(bits, k_pad, grad_x): _cfg((32, 16, 8, 1) if (k_pad == 64 and grad_x) else (32, 16, 4, 1))
             for bits in ("16", "32") for k_pad in (32, 64) for grad_x in (True, False)},
    interpret=dict(BLOCK_N=16, BLOCK_D=16), tune_key=["N", "D", "K", "CHANNELS_FIRST"],
    family_keys=("K_PAD", "GRAD_X"),
)

# Programs per launch under the interpreter: few, so that with B = 2 and the test shapes a program walks
# more than one tile (the slot accumulate path).
INTERP_PROGRAMS = 4


def limits(facts) -> str | None:
    """Calls these launchers cannot run: K above one register tile, a batch above grid axis 1,
    an image above int32 tile offsets."""
    if facts["K"] > K_MAX:
        return f"K = {facts['K']} codewords > {K_MAX} (the codewords are one register tile)"
    if facts["N"] * facts["D"] >= 2**31:
        return f"one image has N * D = {facts['N'] * facts['D']} >= 2^31 elements (int32 tile offsets)"
    return _launch.grid_reason((1, facts["B"]), ("", "batch"))


def _k_pad(num_codes: int) -> int:
    """Codewords per register tile: 32 or 64.

    Not 16 for K <= 16 although that is the smallest MMA size: the fp32 backward spills at K_PAD = 16
    (Triton picks worse layouts for the narrow tiles), and with two values every launchable kernel is
    compiled by the tests. The padding costs MMA work only for K < 32, which EncNet does not use.
    """
    if num_codes > K_MAX:
        raise ValueError(f"the Triton encoding kernels hold K <= {K_MAX} codewords, got K = {num_codes}")
    return max(32, triton.next_power_of_2(num_codes))


def _n_split(kernel: _launch.Kernel, x: torch.Tensor, batch: int, n: int, d: int, k: int, k_pad: int) -> int:
    """Programs per image: fill the GPU, keep the slots <= x in size, >= 1 tile each."""
    if _launch.on_gpu_path():
        programs = _launch.target_programs(x.device)
        want, floor = triton.cdiv(programs, batch), triton.cdiv(programs // 4, batch)
    else:
        want = floor = triton.cdiv(INTERP_PROGRAMS, batch)
    mem_cap = max(floor, (n * d * x.element_size()) // (k * d * 4))
    return max(1, min(want, mem_cap, triton.cdiv(n, kernel.block_max(x.dtype, "BLOCK_N", K_PAD=k_pad))))


def _shapes(x: torch.Tensor, codewords: torch.Tensor, channels_first: bool):
    num_codes, chans = codewords.shape
    batch, n = x.shape[0], (x.shape[2] if channels_first else x.shape[1])
    return batch, n, chans, num_codes, _k_pad(num_codes)


def _centre(codewords: torch.Tensor):
    """(c acc [K, D], m acc [D], c' in the input dtype [K, D], c' acc [K, D], ||c'||^2 acc [K])."""
    acc = _launch.acc_dtype(codewords.dtype)
    c = codewords.to(acc)
    # A channel whose mean is not finite is not centred: an infinite codeword entry must stay infinite in c'
    # while x' stays finite, as in the eager x - c.
    mean = c.mean(dim=0)
    mean = torch.where(mean.isfinite(), mean, 0)
    cw = (c - mean).to(codewords.dtype)
    cw_acc = cw.to(acc)
    return c.contiguous(), mean.contiguous(), cw, cw_acc, cw_acc.pow(2).sum(dim=1).contiguous()


def encoding_fwd(x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor,
                 channels_first: bool) -> torch.Tensor:
    """E [B, K, D] = sum_i A_ik (x_i - c_k), A = softmax_k(s_k ||x_i - c_k||^2); x is [B, N, D], or
    [B, D, N] when channels_first (an NCHW map, read in place)."""
    batch, n, d, k, k_pad = _shapes(x, codewords, channels_first)
    if batch == 0 or n == 0:
        return x.new_zeros(batch, k, d)  # empty sums (the kernel would leave its slots unwritten)
    acc = _launch.acc_dtype(x.dtype)
    c_raw, mean, cw, cw_acc, cc = _centre(codewords)
    n_split = _n_split(FWD, x, batch, n, d, k, k_pad)
    e_part = torch.empty(batch, n_split, d, k, dtype=acc, device=x.device)
    a_part = torch.empty(batch, n_split, k, dtype=acc, device=x.device)
    untrusted = torch.empty(batch, n, dtype=torch.int8, device=x.device)
    FWD(x.dtype, lambda m: (n_split, batch),
        x, (-2.0 * cw).contiguous(), cc, mean, scale, e_part, a_part, untrusted, n, d, k, n_split,
        K_PAD=k_pad, CHANNELS_FIRST=bool(channels_first), DOT_PRECISION=_launch.dot_precision(x.dtype))
    FWD_DIRECT(x.dtype, lambda m: (n_split, batch),
               x, c_raw, scale, untrusted, e_part, n, d, k, n_split,
               K_PAD=k_pad, CHANNELS_FIRST=bool(channels_first))
    e = e_part.sum(dim=1).transpose(1, 2) - a_part.sum(dim=1).unsqueeze(2) * cw_acc
    return e.to(x.dtype).contiguous()  # the slots are [D, K]: the difference comes out transposed


def encoding_bwd(grad: torch.Tensor, x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor,
                 channels_first: bool):
    """-> (grad_x like x, grad_codewords [K, D], grad_scale [K]); A recomputed per tile."""
    batch, n, d, k, k_pad = _shapes(x, codewords, channels_first)
    if batch == 0 or n == 0:
        return torch.zeros_like(x), torch.zeros_like(codewords), torch.zeros_like(scale)
    acc = _launch.acc_dtype(x.dtype)
    c_raw, mean, cw, cw_acc, cc = _centre(codewords)
    grad_acc = grad.to(acc)
    cde = torch.einsum("kd,bkd->bk", cw_acc, grad_acc).contiguous()  # c'_k . dE_bk
    # Rows interleaved (-2 c'_k, dE_bk): one MMA operand for both passes (see the kernel).
    g = torch.stack([(-2.0 * cw).expand(batch, k, d), grad.to(x.dtype)], dim=2).reshape(batch, 2 * k, d)
    n_split = _n_split(BWD, x, batch, n, d, k, k_pad)
    gx = torch.empty_like(x)
    gc_part = torch.empty(batch, n_split, d, k, dtype=acc, device=x.device)
    vec_part = torch.empty(batch, n_split, 3, k, dtype=acc, device=x.device)
    untrusted = torch.empty(batch, n, dtype=torch.int8, device=x.device)
    BWD(x.dtype, lambda m: (n_split, batch),
        g, x, cc, mean, scale, cde, gx, gc_part, vec_part, untrusted, n, d, k, n_split,
        K_PAD=k_pad, CHANNELS_FIRST=bool(channels_first), DOT_PRECISION=_launch.dot_precision(x.dtype))
    de = grad_acc.contiguous()
    for grad_x in (True, False):
        BWD_DIRECT(x.dtype, lambda m: (n_split, batch),
                   x, c_raw, scale, de, untrusted, gx, gc_part, vec_part, n, d, k, n_split,
                   K_PAD=k_pad, CHANNELS_FIRST=bool(channels_first), GRAD_X=grad_x)
    sum_a, sum_w, sum_s = vec_part.sum(dim=1).unbind(dim=1)  # [B, K] each
    grad_c = (-torch.einsum("bk,bkd->kd", sum_a, grad_acc)
              - 2.0 * gc_part.sum(dim=(0, 1)).t()
              + 2.0 * sum_w.sum(dim=0).unsqueeze(1) * cw_acc)
    grad_s = sum_s.sum(dim=0)
    return gx, grad_c.to(codewords.dtype).contiguous(), grad_s.to(scale.dtype)


def compile_cases():
    """(all configs?, thunk): EncNet's codebooks, (K, D) = (32, 512) and (64, 2048), on a 64x128 map in
    both layouts, every config."""
    for dtype in _launch.GPU_DTYPES:
        for k, d in ((32, 512), (64, 2048)):
            for channels_first in (True, False):
                def case(dtype=dtype, k=k, d=d, cf=channels_first):
                    m, n = _launch.meta, 64 * 128
                    x = m(2, d, n, dtype=dtype) if cf else m(2, n, d, dtype=dtype)
                    codewords, scale = m(k, d, dtype=dtype), m(k, dtype=dtype)
                    encoding_fwd(x, codewords, scale, cf)
                    encoding_bwd(m(2, k, d, dtype=dtype), x, codewords, scale, cf)
                yield True, case
