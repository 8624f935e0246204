"""ACM residual epilogue: out = relu(relu(y * scale[c] + shift[c]) + residual).

Tensors are viewed as [R = B*C rows, N pixels]; a program owns BLOCK_R rows x
BLOCK_N pixels, so the per-channel scale/shift load once per row and tiny
feature maps still fill a block. Arithmetic is in the dtype of ``scale``
(fp32, or fp64 for fp64 data).

For the backward the forward saves out > 0 as a bit mask, [R, MB = ceil(N / 8)]
uint8, pixel n in bit n % 8 of byte n // 8: the backward reads 1 bit per pixel
instead of out. Pixel tiles start at multiples of BLOCK_N (>= 16), so each
byte belongs to one program.
"""
import triton
import triton.language as tl


@triton.jit
def residual_relu_fwd_kernel(
    y_ptr, r_ptr, scale_ptr, shift_ptr, out_ptr, mask_ptr,
    C, N, R, MB,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SAVE_MASK: tl.constexpr,
):
    """grid = (cdiv(R, BLOCK_R), cdiv(N, BLOCK_N)); mask_ptr is written only with SAVE_MASK."""
    acc_dtype: tl.constexpr = scale_ptr.dtype.element_ty
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    ch = rows % C
    scale = tl.load(scale_ptr + ch, mask=mask_r, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=mask_r, other=0.0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = mask_r[:, None] & (offs_n < N)[None, :]
    offs = (rows.to(tl.int64) * N)[:, None] + offs_n[None, :]

    y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    r = tl.load(r_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
    u = y * scale[:, None] + shift[:, None]
    v = tl.where(u > 0, u, 0.0) + r
    out = tl.where(v > 0, v, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if SAVE_MASK:
        # Pixels past N computed from zero-filled loads may be positive: keep them out.
        active = ((out > 0) & mask).to(tl.int32)
        bits = tl.reshape(active, [BLOCK_R, BLOCK_N // 8, 8]) << tl.arange(0, 8)[None, None, :]
        packed = tl.sum(bits, axis=2)  # disjoint bits: the sum is their OR
        offs_b = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
        mask_b = mask_r[:, None] & (offs_b < MB)[None, :]
        tl.store(mask_ptr + (rows.to(tl.int64) * MB)[:, None] + offs_b[None, :], packed.to(tl.uint8), mask=mask_b)


@triton.jit
def residual_relu_bwd_kernel(
    grad_ptr, y_ptr, mask_ptr, scale_ptr, shift_ptr,
    gy_ptr, gr_ptr, gscale_part_ptr, gshift_part_ptr,
    C, N, R, MB, n_per_split,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grid = (cdiv(R, BLOCK_R), n_split).

    Program (i, s) walks the pixel range of split s (a multiple of BLOCK_N
    long) for its rows and writes its per-row sums of gu * y and gu to
    [n_split, R] partial buffers, which the launcher reduces over splits and
    batch in a fixed order.
    """
    acc_dtype: tl.constexpr = scale_ptr.dtype.element_ty
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < R
    ch = rows % C
    scale = tl.load(scale_ptr + ch, mask=mask_r, other=0.0)
    shift = tl.load(shift_ptr + ch, mask=mask_r, other=0.0)
    row_off = rows.to(tl.int64) * N
    mask_row_off = rows.to(tl.int64) * MB

    n_lo = split * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    sum_gy = tl.zeros([BLOCK_R, BLOCK_N], dtype=acc_dtype)
    sum_g = tl.zeros([BLOCK_R, BLOCK_N], dtype=acc_dtype)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask = mask_r[:, None] & (offs_n < n_hi)[None, :]
        offs = row_off[:, None] + offs_n[None, :]
        grad = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        y = tl.load(y_ptr + offs, mask=mask, other=0.0).to(acc_dtype)
        offs_b = n0 // 8 + tl.arange(0, BLOCK_N // 8)
        packed = tl.load(mask_ptr + mask_row_off[:, None] + offs_b[None, :],
                         mask=mask_r[:, None] & (offs_b < MB)[None, :], other=0).to(tl.int32)
        bits = (packed[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1
        active = tl.reshape(bits, [BLOCK_R, BLOCK_N]) != 0
        g = tl.where(active, grad, 0.0)
        gu = tl.where(y * scale[:, None] + shift[:, None] > 0, g, 0.0)
        tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
        tl.store(gy_ptr + offs, (gu * scale[:, None]).to(gy_ptr.dtype.element_ty), mask=mask)
        sum_gy += gu * y
        sum_g += gu

    part = split.to(tl.int64) * R + rows
    tl.store(gscale_part_ptr + part, tl.sum(sum_gy, axis=1), mask=mask_r)
    tl.store(gshift_part_ptr + part, tl.sum(sum_g, axis=1), mask=mask_r)
