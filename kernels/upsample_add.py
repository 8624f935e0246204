"""IIWA's upsample + residual: out = residual + bilinear(tokens), align_corners=True, channels last.

tokens [B, h, w, C], residual and out [B, H, W, C]. A program owns BLOCK_T
output pixels x BLOCK_C channels; loads and stores run along C (coalesced).
The taps are PyTorch's: scale = (in - 1) / (out - 1) (any value when
out == 1: its only index is 0), src = scale * dst, i0 = min(floor(src), in - 1),
i1 = i0 + (i0 < in - 1), l1 = clamp(src - i0, 0, 1), l0 = 1 - l1, computed in
fp32 (fp64 for fp64 data). Both taps are always applied, even at weight 0, so
NaN and inf spread as in eager PyTorch.

The backward (grad_tokens = U^T grad) is a gather, not a scatter: a program
owns one token x BLOCK_C channels and walks the output rows and columns whose
taps can touch it (about 2 (H-1)/(h-1) + 3 rows by the same in columns, from
integer bounds with one index of slack each side), rows one at a time and
columns in BLOCK_X tiles, adding eager's four tap terms (l_y l_x) * grad
where a tap touches the token and nothing elsewhere (a select, so a NaN
gradient of an untouched pixel never leaks in; a touching tap of weight 0
turns an inf into NaN, as eager's scatter does).
No atomics: a fixed order, deterministic. grad_residual is grad itself (no
kernel).

upsample_add_layer_norm: the same sum (the same tile code, _upsample_add_tile,
so `out` is upsample_add's bit for bit) and the LayerNorm over C of the stored
(rounded) row. A program owns BLOCK_T pixels x the whole row (BLOCK_C =
next_power_of_2(C), masked at the C edge; C <= LN_C_MAX), so the statistics
are in-register row sums: mean = x0 + sum (x - x0) / C about the row's first
value, var = sum (x - mean)^2 / C, rstd = rsqrt(var + eps). The backward kernel
has the same tiles: grad_sum = grad_out + rstd (g - mean(g) - xhat mean(g xhat));
with affine_grads a program walks a fixed run of pixel tiles (LN_AFFINE_PROGRAMS
programs at most: the partition depends on the shape only), sums grad_normed
xhat and grad_normed over them, and writes its column sums to a [programs, C]
partial row; a second kernel sums the rows in order. No atomics.

Launchers below the kernels (contract: docs/kernels.md "upsample_add" and
"upsample_add_layer_norm").
"""
import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _taps(dst, src_size, dst_size, one):
    """(i0, i1, l0, l1) of output index `dst` (a tensor) for an axis src_size -> dst_size."""
    scale = ((src_size - 1) * one) / tl.maximum((dst_size - 1) * one, one)
    src = scale * (dst * one)  # dst * one: an int tensor or (a loop index in the interpreter) a Python int
    i0 = tl.minimum(tl.floor(src).to(tl.int32), src_size - 1)
    l1 = tl.minimum(tl.maximum(src - i0.to(one.dtype), 0.0), 1.0)
    i1 = tl.where(i0 < src_size - 1, i0 + 1, i0)
    return i0, i1, one - l1, l1


@triton.jit
def _upsample_add_tile(tok_ptr, res_ptr, pix, offs_c, mask, h, w, H, W, C, one):
    """(residual + bilinear upsample of tokens, element offsets) at pixels `pix` (int32, [BLOCK_T]) x channels
    `offs_c` ([BLOCK_C]), unrounded, in one.dtype (the accumulation type). `mask` covers the tile."""
    # Pixel indices in int32 (limits: < 2^31 pixels), so the divisions are inline (int64 ones are calls,
    # whose frames ptxas keeps in local memory); offsets in int64.
    row = pix // W  # b * H + y
    y0, y1, a0, a1 = _taps(row % H, h, H, one)
    x0, x1, b0, b1 = _taps(pix % W, w, W, one)
    img = (row // H) * h
    r0 = (img + y0).to(tl.int64) * w * C
    r1 = (img + y1).to(tl.int64) * w * C
    c = offs_c[None, :]
    c0, c1 = x0.to(tl.int64) * C, x1.to(tl.int64) * C
    t00 = tl.load(tok_ptr + (r0 + c0)[:, None] + c, mask=mask, other=0.0).to(one.dtype)
    t01 = tl.load(tok_ptr + (r0 + c1)[:, None] + c, mask=mask, other=0.0).to(one.dtype)
    t10 = tl.load(tok_ptr + (r1 + c0)[:, None] + c, mask=mask, other=0.0).to(one.dtype)
    t11 = tl.load(tok_ptr + (r1 + c1)[:, None] + c, mask=mask, other=0.0).to(one.dtype)
    b0, b1 = b0[:, None], b1[:, None]
    up = a0[:, None] * (b0 * t00 + b1 * t01) + a1[:, None] * (b0 * t10 + b1 * t11)  # as PyTorch's kernel
    offs = (pix.to(tl.int64) * C)[:, None] + c
    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(one.dtype)
    return res + up, offs


@triton.jit
def upsample_add_fwd_kernel(
    tok_ptr, res_ptr, out_ptr,
    P, h, w, H, W, C,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid = (cdiv(P = B*H*W, BLOCK_T), cdiv(C, BLOCK_C))."""
    if res_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    one = tl.full([], 1.0, acc_dtype)
    pix = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (pix < P)[:, None] & (offs_c < C)[None, :]
    out, offs = _upsample_add_tile(tok_ptr, res_ptr, pix, offs_c, mask, h, w, H, W, C, one)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _touching(i, src_size, dst_size):
    """[lo, hi]: output indices that may have a tap on input index i, from src ~ i (dst - 1) / (src - 1) over
    (i - 1, i + 1), with one index of slack each side (src_size == 1: every index; dst_size == 1: index 0)."""
    den = tl.maximum(src_size - 1, 1)
    lo = tl.maximum(((i - 1) * (dst_size - 1)) // den - 1, 0)  # C division of a negative: clamped to 0 anyway
    hi = tl.minimum(((i + 1) * (dst_size - 1) + src_size - 2) // den + 1, dst_size - 1)
    return lo, hi


@triton.jit
def upsample_add_bwd_kernel(
    grad_ptr, gt_ptr,
    h, w, H, W, C,
    BLOCK_X: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid = (B*h*w, cdiv(C, BLOCK_C)): grad_tokens[b, i, j] = sum over (y, x) of tap weights * grad[b, y, x].

    Rows one by one (a scalar weight each), columns BLOCK_X at a time ([BLOCK_X, BLOCK_C] tiles, reduced
    over x at the end: a fixed order).
    """
    if grad_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    one = tl.full([], 1.0, acc_dtype)
    t = tl.program_id(0)  # int32: inline divisions
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    i = (t // w) % h
    j = t % w
    row_stride = (tl.zeros([], dtype=tl.int64) + W) * C  # int64 whether W came as a value or a constant
    img = grad_ptr + (t // (h * w)) * H * row_stride
    y_lo, y_hi = _touching(i, h, H)
    x_lo, x_hi = _touching(j, w, W)
    acc = tl.zeros([BLOCK_X, BLOCK_C], dtype=acc_dtype)
    for y in range(y_lo, y_hi + 1):
        y0, y1, a0, a1 = _taps(y, h, H, one)
        if (y0 == i) | (y1 == i):  # rows in the slack that touch nothing are skipped, not weighted by 0
            row = img + y * row_stride
            for x_start in range(x_lo, x_hi + 1, BLOCK_X):
                x = x_start + tl.arange(0, BLOCK_X)
                x0, x1, b0, b1 = _taps(x, w, W, one)
                in_range = x <= x_hi
                touch = ((x0 == j) | (x1 == j)) & in_range
                mask = touch[:, None] & mask_c[None, :]
                g = tl.load(row + (x.to(tl.int64) * C)[:, None] + offs_c[None, :], mask=mask,
                            other=0.0).to(acc_dtype)
                # Eager's four scatter terms, each under a select (not a product with a 0 weight: a NaN at an
                # untouched pixel must not leak in; a touching tap of weight 0 passes an inf on as NaN, as eager)
                for_x0 = ((x0 == j) & in_range)[:, None]
                for_x1 = ((x1 == j) & in_range)[:, None]
                if y0 == i:
                    acc += tl.where(for_x0, (a0 * b0)[:, None] * g, 0.0) + tl.where(for_x1, (a0 * b1)[:, None] * g, 0.0)
                if y1 == i:
                    acc += tl.where(for_x0, (a1 * b0)[:, None] * g, 0.0) + tl.where(for_x1, (a1 * b1)[:, None] * g, 0.0)
    tl.store(gt_ptr + t.to(tl.int64) * C + offs_c, tl.sum(acc, axis=0).to(gt_ptr.dtype.element_ty), mask=mask_c)


@triton.jit
def upsample_add_layer_norm_fwd_kernel(
    tok_ptr, res_ptr, w_ptr, b_ptr, out_ptr, normed_ptr, mean_ptr, rstd_ptr,
    P, h, w, H, W, C, eps,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """grid = (cdiv(P = B*H*W, BLOCK_T),): a program owns BLOCK_T pixels x the whole row (BLOCK_C >= C).

    out as upsample_add_fwd_kernel (the same tile code), rounded to T; the statistics of the rounded row in
    registers (two passes over it: the mean about its first value, then the squares about the mean);
    normed = (out - mean) rstd w + b.
    """
    acc_dtype: tl.constexpr = mean_ptr.dtype.element_ty  # fp32, fp64 for fp64 data
    one = tl.full([], 1.0, acc_dtype)
    pix = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.arange(0, BLOCK_C)
    mask_t, mask_c = pix < P, offs_c < C
    mask = mask_t[:, None] & mask_c[None, :]
    total, offs = _upsample_add_tile(tok_ptr, res_ptr, pix, offs_c, mask, h, w, H, W, C, one)
    out = total.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, out, mask=mask)
    x = out.to(acc_dtype)  # the stored row, as eager's LayerNorm reads it back
    # mean = x0 + sum (x - x0) / C about the row's first value x0: a plain fp32 sum of values far from zero
    # rounds at every add. Divisions by C and the rsqrt as PyTorch's CUDA LayerNorm: approximate (div.full,
    # rsqrt.approx: <= 2 ulp), inline; the IEEE division is a call whose frame ptxas keeps in local memory.
    x0 = tl.sum(tl.where(offs_c[None, :] == 0, x, 0.0), axis=1)
    mean = x0 + tl.fdiv(tl.sum(tl.where(mask_c[None, :], x - x0[:, None], 0.0), axis=1), C * one,
                        ieee_rounding=False)
    d = tl.where(mask_c[None, :], x - mean[:, None], 0.0)
    var = tl.fdiv(tl.sum(d * d, axis=1), C * one, ieee_rounding=False)
    rstd = tl.rsqrt(var + eps)
    y = d * rstd[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)[None, :]
    tl.store(normed_ptr + offs, y.to(normed_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + pix, mean, mask=mask_t)
    tl.store(rstd_ptr + pix, rstd, mask=mask_t)


@triton.jit
def _add3(a0, a1, a2, b0, b1, b2):
    return a0 + b0, a1 + b1, a2 + b2


@triton.jit
def upsample_add_layer_norm_bwd_kernel(
    gout_ptr, gnorm_ptr, out_ptr, mean_ptr, rstd_ptr, w_ptr, gsum_ptr, gw_part_ptr, gb_part_ptr,
    P, C, n_tiles, tiles_per_program,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, HAS_WEIGHT: tl.constexpr, AFFINE: tl.constexpr,
):
    """grid = (cdiv(n_tiles = cdiv(P, BLOCK_T), tiles_per_program),): program p owns the pixel tiles
    [p * tiles_per_program, (p + 1) * tiles_per_program) of BLOCK_T pixels x the whole row, in order.

    grad_sum = grad_out + rstd (g - mean_c(g) - xhat mean_c(g xhat)), g = grad_normed w. With AFFINE,
    [BLOCK_T, BLOCK_C] sums of grad_normed xhat and grad_normed run over the program's tiles, and their
    column sums go to row p of the [programs, C] partials (gw_part, gb_part), which
    upsample_add_layer_norm_affine_kernel reduces in order.
    """
    acc_dtype: tl.constexpr = mean_ptr.dtype.element_ty
    one = tl.full([], 1.0, acc_dtype)
    inv_c = tl.fdiv(one, C * one, ieee_rounding=False)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    if HAS_WEIGHT:
        wt = tl.load(w_ptr + offs_c, mask=mask_c, other=0.0).to(acc_dtype)
    sum_w = tl.zeros([BLOCK_T, BLOCK_C], dtype=acc_dtype)
    sum_b = tl.zeros([BLOCK_T, BLOCK_C], dtype=acc_dtype)
    first = tl.program_id(0) * tiles_per_program
    # The last program's run stops at the last tile: pixel indices stay below cdiv(P, BLOCK_T) * BLOCK_T
    for k in range(0, tl.minimum(tiles_per_program, n_tiles - first)):
        pix = (first + k) * BLOCK_T + tl.arange(0, BLOCK_T)  # int32: tiles past the last are not walked
        mask_t = pix < P
        mask = mask_t[:, None] & mask_c[None, :]
        offs = (pix.to(tl.int64) * C)[:, None] + offs_c[None, :]
        mean = tl.load(mean_ptr + pix, mask=mask_t, other=0.0)
        rstd = tl.load(rstd_ptr + pix, mask=mask_t, other=0.0)
        x = tl.load(out_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
        gn = tl.load(gnorm_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        if HAS_WEIGHT:
            g = gn * wt[None, :]
        else:
            g = gn
        # One reduction of three row sums: g, g xhat, and g x for eager's algebra below
        sum_g, sum_gx, sum_gx_raw = tl.reduce((g, g * xhat, g * x), 1, _add3)
        if AFFINE:
            sum_w += gn * xhat  # 0 outside the tile's pixels and channels (masked loads, xhat selected)
            sum_b += gn
        go = tl.load(gout_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        mean_g, mean_gx = sum_g * inv_c, sum_gx * inv_c
        # Rows whose sums are not finite (an inf or NaN in the weight or grad_normed) take eager's algebra,
        # rstd g + b x + shift with the row sums of g x and g, so NaN and inf land where eager puts them; it
        # cancels for rows far from zero, so finite rows take the centred form.
        finite = (tl.abs(sum_g) < float("inf")) & (tl.abs(sum_gx) < float("inf"))  # False for NaN too
        b = (sum_g * mean - sum_gx_raw) * rstd * rstd * rstd * inv_c
        shift = -b * mean - sum_g * rstd * inv_c
        gs = go + tl.where(finite[:, None], rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None]),
                           rstd[:, None] * g + b[:, None] * x + shift[:, None])
        tl.store(gsum_ptr + offs, gs.to(gsum_ptr.dtype.element_ty), mask=mask)
    if AFFINE:
        part = tl.program_id(0).to(tl.int64) * C + offs_c
        tl.store(gw_part_ptr + part, tl.sum(sum_w, axis=0), mask=mask_c)
        tl.store(gb_part_ptr + part, tl.sum(sum_b, axis=0), mask=mask_c)


@triton.jit
def upsample_add_layer_norm_affine_kernel(
    gw_part_ptr, gb_part_ptr, gw_ptr, gb_ptr, n_parts, C,
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid = (cdiv(C, BLOCK_C),): grad_weight / grad_bias[c] = sum over the partial rows, in order
    (BLOCK_P rows at a time into a [BLOCK_P, BLOCK_C] sum, reduced over rows at the end)."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc_w = tl.zeros([BLOCK_P, BLOCK_C], dtype=gw_part_ptr.dtype.element_ty)
    acc_b = tl.zeros([BLOCK_P, BLOCK_C], dtype=gw_part_ptr.dtype.element_ty)
    for p0 in range(0, n_parts, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < n_parts)[:, None] & mask_c[None, :]
        offs = (rows.to(tl.int64) * C)[:, None] + offs_c[None, :]
        acc_w += tl.load(gw_part_ptr + offs, mask=mask, other=0.0)
        acc_b += tl.load(gb_part_ptr + offs, mask=mask, other=0.0)
    tl.store(gw_ptr + offs_c, tl.sum(acc_w, axis=0).to(gw_ptr.dtype.element_ty), mask=mask_c)
    tl.store(gb_ptr + offs_c, tl.sum(acc_b, axis=0).to(gb_ptr.dtype.element_ty), mask=mask_c)


# ----------------------------------------------------------------------------- launchers

# Block sizes follow the shape (see _tile); the configs choose warps only.
FWD = _launch.Kernel(upsample_add_fwd_kernel,
                     configs={("32",): _launch.configs(({}, 4, 1), ({}, 8, 1)),
                              ("16",): _launch.configs(({}, 4, 1), ({}, 8, 1))},
                     interpret={}, tune_key=["P", "C", "h", "w"])
BWD = _launch.Kernel(upsample_add_bwd_kernel,
                     configs={("32",): _launch.configs(({}, 4, 1), ({}, 8, 1)),
                              ("16",): _launch.configs(({}, 4, 1), ({}, 8, 1))},
                     interpret={}, tune_key=["H", "W", "C", "h", "w"])

# upsample_add_layer_norm: a program holds BLOCK_T pixels x BLOCK_C = next_power_of_2(C) channels, a tile of
# max(LN_TILE, BLOCK_C) elements (see _ln_tile); LN_C_MAX is the widest row a program holds. Configs per
# (dtype class, BLOCK_C), warps only: the default has tile / 256 warps (8 elements a thread in every live tile:
# 8 warps up to BLOCK_C = 2048, 16 at 4096, 32 at 8192), the other half as many (not at 8192: 16 warps spill
# the fp32 backward on sm_90). All spill-free on sm_80 and sm_90 (the compile cases reach C = LN_C_MAX).
LN_TILE, LN_C_MAX = 2048, 8192


def _ln_configs() -> dict:
    families = {}
    for bits in ("32", "16"):
        for block_c in (2**k for k in range(4, LN_C_MAX.bit_length())):  # 16 .. LN_C_MAX
            warps = max(LN_TILE, block_c) // 256
            rows = [({}, warps, 1), ({}, warps // 2, 1)] if warps < 32 else [({}, warps, 1)]
            families[(bits, block_c)] = _launch.configs(*rows)
    return families


LN_FWD = _launch.Kernel(upsample_add_layer_norm_fwd_kernel, configs=_ln_configs(), interpret={},
                        tune_key=["P", "C", "h", "w"], family_keys=("BLOCK_C",))
LN_BWD = _launch.Kernel(upsample_add_layer_norm_bwd_kernel, configs=_ln_configs(), interpret={},
                        tune_key=["P", "C", "tiles_per_program", "HAS_WEIGHT", "AFFINE"], family_keys=("BLOCK_C",))
# The in-order reduction of the affine partials: one config (its row-sum tree is part of the fixed order).
LN_AFFINE = _launch.Kernel(upsample_add_layer_norm_affine_kernel,
                           configs={(bits,): _launch.configs((dict(BLOCK_P=64, BLOCK_C=32), 4, 1))
                                    for bits in ("32", "16")},
                           interpret=dict(BLOCK_P=2, BLOCK_C=8), tune_key=["n_parts", "C"])
# Programs of the backward with affine_grads, each walking an equal run of pixel tiles (its partial row):
# a constant, not the device's SM count, so the partition (and the summation order) depends on the shape
# only. 512 fills an H100 (132 SMs) about twice over; the interpreter's 3 makes tests walk several tiles per
# program, with a ragged last one.
LN_AFFINE_PROGRAMS = 512


def _block_c(channels: int) -> int:
    """Channels per program: up to 128 (one 16-byte vector per thread of a warp at fp32); 8 under the
    interpreter, so tests reach ragged channel blocks."""
    if not _launch.on_gpu_path():
        return 8
    return min(128, max(16, triton.next_power_of_2(channels)))


def limits(facts) -> str | None:
    """Pixel and token indices are int32 (offsets int64), and a forward program's indices run a whole tile
    (at most LN_TILE / 16 pixels) past the last pixel, so B*H*W <= 2^31 - LN_TILE; the backward's grid has
    one program per token on axis 0 (B*h*w)."""
    pixels = facts["B"] * facts["H"] * facts["W"]
    if pixels > 2**31 - LN_TILE:
        return f"B*H*W = {pixels} output pixels > 2^31 - {LN_TILE} (int32 pixel indices); split the batch"
    return _launch.grid_reason((facts["B"] * facts["h"] * facts["w"],), ("B*h*w tokens",))


def layer_norm_limits(facts) -> str | None:
    """upsample_add_layer_norm: upsample_add's limits (its backward runs upsample_add_bwd), and a pixel's
    whole row of C <= LN_C_MAX channels held in registers."""
    if facts["C"] > LN_C_MAX:
        return (f"C = {facts['C']} channels > {LN_C_MAX}: the Triton upsample_add_layer_norm kernels hold a "
                f"pixel's whole row in registers")
    return limits(facts)


def upsample_add_fwd(tokens, residual):
    """-> residual + bilinear upsample (align_corners=True) of tokens [B, h, w, C] to residual's [B, H, W, C]."""
    batch, height, width, chans = residual.shape
    h, w = tokens.shape[1:3]
    out = torch.empty_like(residual)
    pixels = batch * height * width
    block_c = _block_c(chans)
    block_t = 2048 // block_c if _launch.on_gpu_path() else 4
    FWD(residual.dtype, lambda m: (triton.cdiv(pixels, block_t), triton.cdiv(chans, block_c)),
        tokens, residual, out, pixels, h, w, height, width, chans, BLOCK_T=block_t, BLOCK_C=block_c)
    return out


def _block_x(src: int, dst: int) -> int:
    """Columns per backward tile: the widest column range a token's taps can span (see _touching), at most
    16 on a GPU (32 spilled 16-bit data at 4 warps on sm_90) and 8 under the interpreter (tests with wide
    spans still loop over several tiles)."""
    span = dst if src == 1 else min(dst, 2 * ((dst - 1) // (src - 1) + 1) + 3)
    return min(triton.next_power_of_2(span), 16 if _launch.on_gpu_path() else 8)


def upsample_add_bwd(grad, height, width):
    """-> grad_tokens [B, height, width, C]: the transpose of the upsampling applied to grad [B, H, W, C]."""
    batch, big_h, big_w, chans = grad.shape
    grad_tokens = torch.empty(batch, height, width, chans, dtype=grad.dtype, device=grad.device)
    block_c = _block_c(chans)
    block_x = _block_x(width, big_w)
    BWD(grad.dtype, lambda m: (batch * height * width, triton.cdiv(chans, block_c)),
        grad, grad_tokens, height, width, big_h, big_w, chans, BLOCK_X=block_x, BLOCK_C=block_c)
    return grad_tokens


def _ln_tile(channels: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C) of the upsample_add_layer_norm kernels: the whole row (next power of 2 >= C, at
    least 16 on a GPU) and as many pixels as make LN_TILE elements; 4 pixels under the interpreter (tests
    reach ragged pixel tiles). The shape alone decides them (not the config): the backward's partition of
    the pixels, and so its summation order, is the same for every config."""
    if channels > LN_C_MAX:
        raise ValueError(f"the Triton upsample_add_layer_norm kernels hold C <= {LN_C_MAX} channels, "
                         f"got C = {channels}")
    if not _launch.on_gpu_path():
        return 4, triton.next_power_of_2(channels)
    block_c = max(16, triton.next_power_of_2(channels))
    return max(1, LN_TILE // block_c), block_c


def upsample_add_layer_norm_fwd(tokens, residual, weight, bias, eps):
    """-> (out, normed, mean, rstd): out = upsample_add_fwd(tokens, residual); normed = LayerNorm over C of
    the stored out (weight / bias None: 1 / 0); mean, rstd [B, H, W] in the accumulation dtype."""
    batch, height, width, chans = residual.shape
    h, w = tokens.shape[1:3]
    pixels = batch * height * width
    out, normed = torch.empty_like(residual), torch.empty_like(residual)
    acc = _launch.acc_dtype(residual.dtype)
    mean = torch.empty(batch, height, width, dtype=acc, device=residual.device)
    rstd = torch.empty_like(mean)
    block_t, block_c = _ln_tile(chans)
    LN_FWD(residual.dtype, lambda m: (triton.cdiv(pixels, block_t),),
           tokens, residual, residual if weight is None else weight, residual if bias is None else bias,
           out, normed, mean, rstd, pixels, h, w, height, width, chans, float(eps),
           BLOCK_T=block_t, BLOCK_C=block_c, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None)
    return out, normed, mean, rstd


def upsample_add_layer_norm_bwd(grad_out, grad_normed, out, mean, rstd, weight, affine_grads):
    """-> (grad_sum, grad_weight, grad_bias): grad_sum = grad_out + the LayerNorm's input gradient; with
    affine_grads the sums over pixels of grad_normed * xhat and grad_normed (per-program partials reduced
    in order by a second kernel), in weight's dtype; else empty [0] tensors."""
    batch, height, width, chans = out.shape
    pixels = batch * height * width
    block_t, block_c = _ln_tile(chans)
    tiles = triton.cdiv(pixels, block_t)
    grad_sum = torch.empty_like(out)
    if affine_grads:
        programs = min(tiles, LN_AFFINE_PROGRAMS if _launch.on_gpu_path() else 3)
        per_program = triton.cdiv(tiles, programs)
        programs = triton.cdiv(tiles, per_program)
        gw_part = torch.empty(programs, chans, dtype=mean.dtype, device=out.device)
        gb_part = torch.empty_like(gw_part)
    else:
        programs, per_program, gw_part, gb_part = tiles, 1, mean, mean  # the partials are never touched
    LN_BWD(out.dtype, lambda m: (programs,),
           grad_out, grad_normed, out, mean, rstd, out if weight is None else weight, grad_sum, gw_part, gb_part,
           pixels, chans, tiles, per_program,
           BLOCK_T=block_t, BLOCK_C=block_c, HAS_WEIGHT=weight is not None, AFFINE=bool(affine_grads))
    if not affine_grads:
        return grad_sum, out.new_empty(0), out.new_empty(0)
    dtype = out.dtype if weight is None else weight.dtype
    grad_weight = torch.empty(chans, dtype=dtype, device=out.device)
    grad_bias = torch.empty_like(grad_weight)
    LN_AFFINE(out.dtype, lambda m: (triton.cdiv(chans, m["BLOCK_C"]),),
              gw_part, gb_part, grad_weight, grad_bias, programs, chans)
    return grad_sum, grad_weight, grad_bias


def compile_cases():
    """(all configs?, thunk): ULLMC's IIWA stages (B = 2; 32x16 tokens -> 128x128 at C = 256, 8x8 -> 64x64 at
    C = 512) with every config; 8x8 -> 56x56 at C = 96 and a one-row grid (1x7 -> 7x49, C = 13) with the
    default. upsample_add_layer_norm: the ULLMC stages, Swin-like rows (16x16 -> 128x128 at C = 96, 4x4 ->
    32x32 at C = 768) and the widest rows (C = 4096 and LN_C_MAX) with every config, weight and bias and both
    affine_grads; C = 13, and no weight nor bias, with the default."""
    m = _launch.meta
    cases = [(True, (32, 16), (128, 128), 256), (True, (8, 8), (64, 64), 512), (False, (8, 8), (56, 56), 96),
             (False, (1, 7), (7, 49), 13)]
    ln_cases = [(True, (32, 16), (128, 128), 256), (True, (8, 8), (64, 64), 512), (True, (16, 16), (128, 128), 96),
                (True, (4, 4), (32, 32), 768), (True, (2, 2), (32, 32), 4096), (True, (2, 2), (32, 32), LN_C_MAX),
                (False, (1, 7), (7, 49), 13)]
    for dtype in _launch.GPU_DTYPES:
        for all_configs, (h, w), (big_h, big_w), c in cases:
            def case(dtype=dtype, h=h, w=w, big_h=big_h, big_w=big_w, c=c):
                upsample_add_fwd(m(2, h, w, c, dtype=dtype), m(2, big_h, big_w, c, dtype=dtype))
                upsample_add_bwd(m(2, big_h, big_w, c, dtype=dtype), h, w)
            yield all_configs, case
        for all_configs, (h, w), (big_h, big_w), c in ln_cases:
            def ln_case(dtype=dtype, h=h, w=w, big_h=big_h, big_w=big_w, c=c, affine=True):
                data, stat, row = m(2, big_h, big_w, c, dtype=dtype), m(2, big_h, big_w), m(c, dtype=dtype)
                weight, bias = (row, row) if affine else (None, None)
                upsample_add_layer_norm_fwd(m(2, h, w, c, dtype=dtype), data, weight, bias, 1e-5)
                for affine_grads in (True, False) if affine else (False,):
                    upsample_add_layer_norm_bwd(data, data, data, stat, stat, weight, affine_grads)
            yield all_configs, ln_case
        yield False, lambda dtype=dtype: ln_case(dtype, 8, 8, 64, 64, 512, affine=False)
