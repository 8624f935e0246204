"""ACM residual epilogue: out = relu(relu(y * scale[c] + shift[c]) + residual).

Tensors are viewed as [R = B*C rows, N pixels]; a program owns BLOCK_R rows x
BLOCK_N pixels, so the per-channel scale/shift load once per row and tiny
feature maps still fill a block. Arithmetic is in the dtype of ``scale``
(fp32, or fp64 for fp64 data).

For the backward the forward saves "active" = !(out <= 0) (out > 0, or NaN: torch's ReLU
backward passes the gradient at NaN) as a bit mask, [R, MB = ceil(N / 8)]
uint8, pixel n in bit n % 8 of byte n // 8: the backward reads 1 bit per pixel
instead of out. Pixel tiles start at multiples of BLOCK_N (>= 16), so each
byte belongs to one program.

Launchers below the kernels (contract: docs/kernels.md "residual_relu").
"""
import torch
import triton
import triton.language as tl

from fastctx.reference.residual_relu import mask_bytes, new_mask

from . import _launch


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
    # relu as where(v < 0, 0, v): NaN compares false and passes through, as torch.relu's does
    v = tl.where(u < 0, 0.0, u) + r
    out = tl.where(v < 0, 0.0, v)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if SAVE_MASK:
        # Pixels past N computed from zero-filled loads may be positive: keep them out.
        active = ((out <= 0) == 0) & mask  # !(out <= 0): NaN counts as active, as in torch's ReLU backward
        active = active.to(tl.int32)
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
        gu = tl.where(y * scale[:, None] + shift[:, None] <= 0, 0.0, g)
        tl.store(gr_ptr + offs, g.to(gr_ptr.dtype.element_ty), mask=mask)
        tl.store(gy_ptr + offs, (gu * scale[:, None]).to(gy_ptr.dtype.element_ty), mask=mask)
        sum_gy += gu * y
        sum_g += gu

    part = split.to(tl.int64) * R + rows
    tl.store(gscale_part_ptr + part, tl.sum(sum_gy, axis=1), mask=mask_r)
    tl.store(gshift_part_ptr + part, tl.sum(sum_g, axis=1), mask=mask_r)


# ----------------------------------------------------------------------------- launchers

# Block sizes follow the shape (see _rows_tile); the configs choose warps only.
FWD = _launch.Kernel(residual_relu_fwd_kernel,
                     configs={("16",): _launch.configs(({}, 4, 1), ({}, 8, 1)),
                              ("32",): _launch.configs(({}, 4, 1), ({}, 8, 1))},
                     interpret={}, tune_key=["R", "N"])
BWD = _launch.Kernel(residual_relu_bwd_kernel,
                     configs={("16",): _launch.configs(({}, 8, 1), ({}, 4, 1)),
                              ("32",): _launch.configs(({}, 8, 1), ({}, 4, 1))},
                     interpret={}, tune_key=["R", "N"])


def limits(facts) -> str | None:
    """Every shape runs: rows are grid axis 0, pixel splits (at most 65535 of >= 16 pixels) axis 1."""
    return None


def _rows_tile(n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the elementwise kernels: ~4K elements, as many pixels as fit."""
    gpu = _launch.on_gpu_path()
    tile = 4096 if gpu else 256
    block_n = min(max(16, triton.next_power_of_2(n)), 1024 if gpu else 64)
    return max(1, tile // block_n), block_n


def residual_relu_fwd(y, residual, scale, shift, save_mask):
    """-> (out, mask): out = relu(relu(y * scale[c] + shift[c]) + residual); mask = !(out <= 0) as
    [B, C, ceil(H*W / 8)] uint8 bits for the backward (empty without save_mask)."""
    batch, chans, height, width = y.shape
    n, rows = height * width, batch * chans
    block_r, block_n = _rows_tile(n)
    out = torch.empty_like(y)
    mask = new_mask(y, save_mask)
    mask_arg = mask if save_mask else out.view(torch.uint8)  # a valid uint8 pointer the kernel never touches
    FWD(y.dtype, lambda m: (triton.cdiv(rows, block_r), triton.cdiv(n, block_n)),
        y, residual, scale, shift, out, mask_arg, chans, n, rows, mask_bytes(height, width),
        BLOCK_R=block_r, BLOCK_N=block_n, SAVE_MASK=save_mask)
    return out, mask


def residual_relu_bwd(grad, y, mask, scale, shift):
    """-> (grad_y, grad_residual, grad_scale, grad_shift); per-channel sums reduced in fixed order."""
    batch, chans, height, width = y.shape
    n, rows = height * width, batch * chans
    block_r, block_n = _rows_tile(n)
    row_blocks = triton.cdiv(rows, block_r)
    n_split, n_per_split = _launch.split(n, triton.cdiv(_launch.target_programs(y.device), row_blocks), block_n)
    grad_y, grad_r = torch.empty_like(y), torch.empty_like(y)
    gscale_part = torch.empty(n_split, rows, dtype=scale.dtype, device=y.device)
    gshift_part = torch.empty(n_split, rows, dtype=scale.dtype, device=y.device)
    BWD(y.dtype, lambda m: (row_blocks, n_split),
        grad, y, mask, scale, shift, grad_y, grad_r, gscale_part, gshift_part,
        chans, n, rows, mask_bytes(height, width), n_per_split,
        BLOCK_R=block_r, BLOCK_N=block_n)
    grad_scale = gscale_part.view(n_split, batch, chans).sum(dim=(0, 1))
    grad_shift = gshift_part.view(n_split, batch, chans).sum(dim=(0, 1))
    return grad_y, grad_r, grad_scale, grad_shift


def compile_cases():
    """(all configs?, thunk): a realistic 512-channel 64x128 map with every config (training and
    inference forward); a 7x5 map (narrow pixel tiles) with the default."""
    for dtype in _launch.GPU_DTYPES:
        for all_configs, (h, w), saves in ((True, (64, 128), (True,)), (False, (64, 128), (False,)),
                                           (False, (7, 5), (True, False))):
            def case(dtype=dtype, h=h, w=w, saves=saves):
                m = _launch.meta
                y, acc = m(2, 512, h, w, dtype=dtype), m(512)
                for save in saves:
                    residual_relu_fwd(y, y, acc, acc, save)
                residual_relu_bwd(y, y, m(2, 512, mask_bytes(h, w), dtype=torch.uint8), acc, acc)
            yield all_configs, case
