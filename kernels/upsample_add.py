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

Launchers below the kernels (contract: docs/kernels.md "upsample_add").
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
    # Pixel indices in int32 (limits: < 2^31 pixels), so the divisions are inline (int64 ones are calls,
    # whose frames ptxas keeps in local memory); offsets in int64.
    pix = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (pix < P)[:, None] & (offs_c < C)[None, :]
    row = pix // W  # b * H + y
    y0, y1, a0, a1 = _taps(row % H, h, H, one)
    x0, x1, b0, b1 = _taps(pix % W, w, W, one)
    img = (row // H) * h
    r0 = (img + y0).to(tl.int64) * w * C
    r1 = (img + y1).to(tl.int64) * w * C
    c = offs_c[None, :]
    c0, c1 = x0.to(tl.int64) * C, x1.to(tl.int64) * C
    t00 = tl.load(tok_ptr + (r0 + c0)[:, None] + c, mask=mask, other=0.0).to(acc_dtype)
    t01 = tl.load(tok_ptr + (r0 + c1)[:, None] + c, mask=mask, other=0.0).to(acc_dtype)
    t10 = tl.load(tok_ptr + (r1 + c0)[:, None] + c, mask=mask, other=0.0).to(acc_dtype)
    t11 = tl.load(tok_ptr + (r1 + c1)[:, None] + c, mask=mask, other=0.0).to(acc_dtype)
    b0, b1 = b0[:, None], b1[:, None]
    up = a0[:, None] * (b0 * t00 + b1 * t01) + a1[:, None] * (b0 * t10 + b1 * t11)  # as PyTorch's kernel
    offs = (pix.to(tl.int64) * C)[:, None] + c
    res = tl.load(res_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    tl.store(out_ptr + offs, (res + up).to(out_ptr.dtype.element_ty), mask=mask)


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


def _block_c(channels: int) -> int:
    """Channels per program: up to 128 (one 16-byte vector per thread of a warp at fp32); 8 under the
    interpreter, so tests reach ragged channel blocks."""
    if not _launch.on_gpu_path():
        return 8
    return min(128, max(16, triton.next_power_of_2(channels)))


def limits(facts) -> str | None:
    """Pixel and token indices are int32 (offsets int64): fewer than 2^31 output pixels (B*H*W); the
    backward's grid has one program per token on axis 0 (B*h*w)."""
    pixels = facts["B"] * facts["H"] * facts["W"]
    if pixels >= 2**31:
        return f"B*H*W = {pixels} output pixels >= 2^31 (int32 pixel indices); split the batch"
    return _launch.grid_reason((facts["B"] * facts["h"] * facts["w"],), ("B*h*w tokens",))


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


def compile_cases():
    """(all configs?, thunk): ULLMC's IIWA stages (B = 2; 32x16 tokens -> 128x128 at C = 256, 8x8 -> 64x64 at
    C = 512) with every config; 8x8 -> 56x56 at C = 96 and a one-row grid (1x7 -> 7x49, C = 13) with the
    default."""
    m = _launch.meta
    cases = [(True, (32, 16), (128, 128), 256), (True, (8, 8), (64, 64), 512), (False, (8, 8), (56, 56), 96),
             (False, (1, 7), (7, 49), 13)]
    for dtype in _launch.GPU_DTYPES:
        for all_configs, (h, w), (big_h, big_w), c in cases:
            def case(dtype=dtype, h=h, w=w, big_h=big_h, big_w=big_w, c=c):
                upsample_add_fwd(m(2, h, w, c, dtype=dtype), m(2, big_h, big_w, c, dtype=dtype))
                upsample_add_bwd(m(2, big_h, big_w, c, dtype=dtype), h, w)
            yield all_configs, case
