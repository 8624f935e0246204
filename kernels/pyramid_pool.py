"""Pyramid (multi-scale adaptive average) pooling as 0/1 membership matmuls.

Pixel n belongs to bin k when h0[k] <= n // W < h1[k] and w0[k] <= n % W < w1[k].
The membership tile M[n, k] is rebuilt on the fly from a tiny bin table
(``bins``: int32 [S_tot, 4] = h0, h1, w0, w1), so every scale comes out of one
read of x and the tensor cores do the summing:

    forward   pooled[c, k]  = sum_n x[c, n] M[n, k] * inv_area[k]
    backward  grad_x[c, n]  = sum_k M[n, k] (grad[c, k] * inv_area[k])

Non-finite values. A product with the 0/1 membership would turn one inf into
0 * inf = NaN in every bin that does not contain it. The dots therefore take
the data with non-finite entries zeroed, and the tiles that have any run a second,
exact dot of their codes (1 for +inf, 256 for -inf, 257 for NaN) with the same
membership: per bin, the two fields count the +inf/NaN and -inf/NaN members
(< 256 per tile), which give the NaN / +inf / -inf the eager sum would reach.
That second dot runs in a separate pass after the main loop, only in programs
that saw a non-finite value, so the common path pays one compare per element.

M is exact in every dtype, so with 16-bit data the products are exact and
the fp32 accumulation is as good as a plain fp32 sum. For fp32 data
(DOT_PRECISION "tf32x3") only the data operand needs splitting: v = hi + lo
with hi = v rounded to tf32, and two tf32 MMAs give ~2**-22 relative error,
cheaper than a general 3-pass tf32x3 product. Bins are processed in blocks
of S_BLOCK (one block for the default scales).

Launchers below the kernels (contract: docs/kernels.md "pyramid_pool").
"""
import functools

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _membership(offs_n, W, bins_ptr, offs_k, mask_k, dtype: tl.constexpr):
    """M[BLOCK_N, S_BLOCK] as 0/1 in ``dtype``; padded bins have an empty range."""
    h0 = tl.load(bins_ptr + offs_k * 4 + 0, mask=mask_k, other=0)
    h1 = tl.load(bins_ptr + offs_k * 4 + 1, mask=mask_k, other=0)
    w0 = tl.load(bins_ptr + offs_k * 4 + 2, mask=mask_k, other=0)
    w1 = tl.load(bins_ptr + offs_k * 4 + 3, mask=mask_k, other=0)
    h = offs_n // W
    w = offs_n - h * W
    inside = (h[:, None] >= h0[None, :]) & (h[:, None] < h1[None, :])
    inside = inside & (w[:, None] >= w0[None, :]) & (w[:, None] < w1[None, :])
    return inside.to(dtype)


@triton.jit
def _tf32_hi(v):
    """v rounded to the nearest tf32 (low 13 mantissa bits cleared); v - hi is exact."""
    return ((v.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _nonfinite_code(v):
    """0 for finite v, 1 for +inf, 256 for -inf, 257 for NaN (exact in fp16 and tf32)."""
    inf = float("inf")
    return tl.where(v != v, 257.0, tl.where(v == inf, 1.0, tl.where(v == -inf, 256.0, 0.0)))


@triton.jit
def _forced_sum(counts):
    """What the members' non-finite values make of a sum, from their code sums: NaN, +inf, -inf, or 0 (none)."""
    n_neg = tl.floor(counts / 256.0)
    n_pos = counts - 256.0 * n_neg
    inf = float("inf")
    return tl.where((n_pos > 0) & (n_neg > 0), float("nan"), tl.where(n_pos > 0, inf, tl.where(n_neg > 0, -inf, 0.0)))


@triton.jit
def _code_dot(a, b, acc_dtype: tl.constexpr):
    """An exact dot of small integer codes and 0/1 memberships: fp16 operands (exact for both; half the
    registers of fp32 ones), fp32 accumulation; fp64 under the interpreter."""
    if acc_dtype == tl.float64:
        return tl.dot(a.to(tl.float64), b.to(tl.float64), input_precision="ieee", out_dtype=acc_dtype)
    else:
        return tl.dot(a.to(tl.float16), b.to(tl.float16), out_dtype=acc_dtype)


@triton.jit
def _dot_data_member(v, m, acc, DOT_PRECISION: tl.constexpr):
    """acc + v @ m for data v and exact 0/1 m."""
    if DOT_PRECISION == "tf32x3":
        v_hi = _tf32_hi(v)
        acc = tl.dot(v - v_hi, m, acc, input_precision="tf32")
        acc = tl.dot(v_hi, m, acc, input_precision="tf32")
    else:
        acc = tl.dot(v, m, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _dot_member_data(m, v, acc, DOT_PRECISION: tl.constexpr):
    """acc + m @ v for exact 0/1 m and data v."""
    if DOT_PRECISION == "tf32x3":
        v_hi = _tf32_hi(v)
        acc = tl.dot(m, v - v_hi, acc, input_precision="tf32")
        acc = tl.dot(m, v_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(m, v, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def pyramid_pool_fwd_kernel(
    x_ptr, bins_ptr, inv_area_ptr, out_ptr,
    C, N, W, S_tot, n_kb, n_per_split, split_stride,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(C, BLOCK_C) * n_kb, n_split, B).

    Each program owns BLOCK_C channels x S_BLOCK bins of one image and streams
    the pixels [split * n_per_split, (split + 1) * n_per_split). With n_split > 1,
    ``out`` is an fp32 partial buffer [n_split, B, C, S_tot] (split_stride =
    B*C*S_tot) that the launcher sums in a fixed order; else the output itself.
    """
    if x_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    pid = tl.program_id(0)
    cb = pid // n_kb
    kb = pid % n_kb
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    offs_k = kb * S_BLOCK + tl.arange(0, S_BLOCK)
    mask_k = offs_k < S_tot
    # int64 row bases: B*C*N can pass 2**31; offsets inside a row stay int32.
    x_rows = x_ptr + (b * C + offs_c) * N

    n_lo = split * n_per_split
    n_hi = tl.minimum(N, n_lo + n_per_split)
    acc = tl.zeros([BLOCK_C, S_BLOCK], dtype=acc_dtype)
    bad = 0.0  # largest non-finite code seen
    for n0 in range(n_lo, n_hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_hi
        x = tl.load(x_rows[:, None] + offs_n[None, :],
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        code = _nonfinite_code(x)
        bad = tl.maximum(bad, tl.max(code))
        m = _membership(offs_n, W, bins_ptr, offs_k, mask_k, x.dtype)
        acc = _dot_data_member(tl.where(code == 0, x, 0.0), m, acc, DOT_PRECISION)
    if bad > 0:
        # Rare: inf / NaN among these pixels. A second pass adds what they make of each bin, outside the
        # main loop so that its registers never add to the main loop's.
        for n0 in range(n_lo, n_hi, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            x = tl.load(x_rows[:, None] + offs_n[None, :],
                        mask=mask_c[:, None] & (offs_n < n_hi)[None, :], other=0.0)
            m = _membership(offs_n, W, bins_ptr, offs_k, mask_k, x.dtype)
            acc += _forced_sum(_code_dot(_nonfinite_code(x).to(x.dtype), m, acc_dtype))

    inv_area = tl.load(inv_area_ptr + offs_k, mask=mask_k, other=0.0)
    res = acc * inv_area[None, :]
    out_rows = out_ptr + split.to(tl.int64) * split_stride + (b * C + offs_c) * S_tot
    tl.store(out_rows[:, None] + offs_k[None, :], res.to(out_ptr.dtype.element_ty),
             mask=mask_c[:, None] & mask_k[None, :])


@triton.jit
def pyramid_pool_bwd_kernel(
    grad_ptr, bins_ptr, inv_area_ptr, gx_ptr,
    C, N, W, S_tot, c_per_prog,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACCUMULATE: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), cdiv(C, c_per_prog), B).

    Each program owns one pixel tile and c_per_prog channels, so the membership
    tile is built once per bin block and reused across channel chunks. It is
    the A operand (grad_x^T = M G^T), split over warps rather than replicated.
    ACCUMULATE (several bin blocks): later blocks read-modify-write grad_x
    written by earlier ones in the same program (an fp32 buffer for 16-bit data).
    grad here has its non-finite entries zeroed (the launcher does it on the
    small [B, C, S_tot] grad); pyramid_pool_bwd_nonfinite_kernel adds theirs.
    """
    if grad_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dtype: tl.constexpr = grad_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    c_lo = tl.program_id(1) * c_per_prog
    c_hi = tl.minimum(C, c_lo + c_per_prog)
    b = tl.program_id(2).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for k0 in range(0, S_tot, S_BLOCK):
        offs_k = k0 + tl.arange(0, S_BLOCK)
        mask_k = offs_k < S_tot
        m = _membership(offs_n, W, bins_ptr, offs_k, mask_k, dtype)
        inv_area = tl.load(inv_area_ptr + offs_k, mask=mask_k, other=0.0)
        if ACCUMULATE:
            # grad_x written by the previous bin block must be visible to all threads.
            tl.debug_barrier()
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_hi
            g_t = tl.load(grad_ptr + ((b * C + offs_c) * S_tot)[None, :] + offs_k[:, None],
                          mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            g_t = (g_t.to(acc_dtype) * inv_area[:, None]).to(dtype)
            gx = _dot_member_data(m, g_t, tl.zeros([BLOCK_N, BLOCK_C], dtype=acc_dtype), DOT_PRECISION)
            mask = mask_n[:, None] & mask_c[None, :]
            ptrs = gx_ptr + ((b * C + offs_c) * N)[None, :] + offs_n[:, None]
            if ACCUMULATE:
                gx += tl.load(ptrs, mask=mask & (k0 > 0), other=0.0).to(acc_dtype)
            tl.store(ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def pyramid_pool_bwd_nonfinite_kernel(
    grad_ptr, nonfinite_ptr, bins_ptr, inv_area_ptr, gx_ptr,
    C, N, W, S_tot, c_per_prog,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, S_BLOCK: tl.constexpr,
):
    """grid and tiles as pyramid_pool_bwd_kernel, which ran first on the finite part of grad.

    Rare: grad has inf / NaN entries (nonfinite[0] != 0; else every program returns at once). Adds what
    they make of each pixel (NaN, +inf or -inf, from the code dot) to the grad_x just stored. A kernel of
    its own, so that the main backward's registers are untouched.
    """
    if tl.load(nonfinite_ptr) == 0:
        return
    if grad_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dtype: tl.constexpr = grad_ptr.dtype.element_ty
    c_lo = tl.program_id(1) * c_per_prog
    c_hi = tl.minimum(C, c_lo + c_per_prog)
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    for k0 in range(0, S_tot, S_BLOCK):
        offs_k = k0 + tl.arange(0, S_BLOCK)
        mask_k = offs_k < S_tot
        m = _membership(offs_n, W, bins_ptr, offs_k, mask_k, dtype)
        inv_area = tl.load(inv_area_ptr + offs_k, mask=mask_k, other=0.0)
        for c0 in range(c_lo, c_hi, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < c_hi
            g_t = tl.load(grad_ptr + ((b * C + offs_c) * S_tot)[None, :] + offs_k[:, None],
                          mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            code = _nonfinite_code((g_t.to(acc_dtype) * inv_area[:, None]).to(dtype))
            mask = mask_n[:, None] & mask_c[None, :]
            ptrs = gx_ptr + ((b * C + offs_c) * N)[None, :] + offs_n[:, None]
            gx = tl.load(ptrs, mask=mask, other=0.0).to(acc_dtype) + _forced_sum(_code_dot(m, code, acc_dtype))
            tl.store(ptrs, gx.to(gx_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Bins per register tile; more are processed in blocks. Tests lower it to reach the multi-block path.
S_BLOCK_MAX = 64

# fp16/bf16 ("16") and fp32 ("32") configs, the default first; none spills on sm_80 or sm_90
# (tests/test_triton_compile.py).
FWD = _launch.Kernel(
    pyramid_pool_fwd_kernel,
    configs={
        ("16",): _launch.configs((dict(BLOCK_C=64, BLOCK_N=64), 4, 3), (dict(BLOCK_C=128, BLOCK_N=64), 8, 3),
                                 (dict(BLOCK_C=64, BLOCK_N=128), 8, 3)),
        ("32",): _launch.configs((dict(BLOCK_C=64, BLOCK_N=32), 4, 3), (dict(BLOCK_C=64, BLOCK_N=64), 4, 3),
                                 (dict(BLOCK_C=128, BLOCK_N=32), 8, 3)),
    },
    interpret=dict(BLOCK_C=16, BLOCK_N=32), tune_key=["C", "N", "S_tot"],
)
BWD = _launch.Kernel(
    pyramid_pool_bwd_kernel,
    configs={
        ("16",): _launch.configs((dict(BLOCK_C=64, BLOCK_N=64), 4, 2), (dict(BLOCK_C=64, BLOCK_N=128), 8, 2),
                                 (dict(BLOCK_C=128, BLOCK_N=128), 8, 2)),
        ("32",): _launch.configs((dict(BLOCK_C=64, BLOCK_N=128), 8, 2), (dict(BLOCK_C=32, BLOCK_N=64), 4, 2)),
    },
    interpret=dict(BLOCK_C=16, BLOCK_N=32), tune_key=["C", "N", "S_tot"],
)
# Runs after BWD; its programs return at once unless grad had inf / NaN. One config: nothing to tune.
BWD_NONFINITE = _launch.Kernel(
    pyramid_pool_bwd_nonfinite_kernel,
    configs={cls: _launch.configs((dict(BLOCK_C=64, BLOCK_N=64), 4, 1)) for cls in (("16",), ("32",))},
    interpret=dict(BLOCK_C=16, BLOCK_N=32), tune_key=["C", "N", "S_tot"],
)


def limits(facts) -> str | None:
    """Calls these launchers cannot run: the batch is a grid axis of both kernels."""
    return _launch.grid_reason((1, 1, facts["B"]), ("", "", "batch"))


@functools.lru_cache(maxsize=64)
def _bin_table(scales: tuple[int, ...], height: int, width: int, device: torch.device, acc: torch.dtype):
    """int32 [S_tot, 4] bin edges (h0, h1, w0, w1), PyTorch's adaptive pooling bins, and 1/area."""
    edges, inv_area = [], []
    for s in scales:
        for r in range(s):
            h0, h1 = r * height // s, ((r + 1) * height + s - 1) // s
            for q in range(s):
                w0, w1 = q * width // s, ((q + 1) * width + s - 1) // s
                edges.append((h0, h1, w0, w1))
                inv_area.append(1.0 / ((h1 - h0) * (w1 - w0)))
    return (torch.tensor(edges, dtype=torch.int32).to(device),
            torch.tensor(inv_area, dtype=acc).to(device))


def _s_block(s_tot: int) -> int:
    """Bins per register tile: a power of two >= 16 (the smallest MMA K), capped."""
    return max(16, min(triton.next_power_of_2(s_tot), S_BLOCK_MAX))


def pyramid_pool_fwd(x: torch.Tensor, scales) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, S_tot]: every scale's adaptive average pool from one read of x."""
    batch, chans, height, width = x.shape
    n = height * width
    acc = _launch.acc_dtype(x.dtype)
    bins, inv_area = _bin_table(tuple(int(s) for s in scales), height, width, x.device, acc)
    s_tot = bins.shape[0]
    s_block = _s_block(s_tot)
    n_kb = triton.cdiv(s_tot, s_block)
    # Few (channel block, bin block, image) programs for small batches: split
    # the pixels too, into ranges that are whole tiles for every config.
    programs = triton.cdiv(chans, FWD.block_max(x.dtype, "BLOCK_C")) * n_kb * batch
    align = FWD.block_max(x.dtype, "BLOCK_N") * (8 if _launch.on_gpu_path() else 1)
    n_split, n_per_split = _launch.split(n, triton.cdiv(_launch.target_programs(x.device), programs), align)

    out = x.new_empty(batch, chans, s_tot)
    dest = out if n_split == 1 else torch.empty(n_split, batch, chans, s_tot, dtype=acc, device=x.device)
    FWD(x.dtype, lambda m: (triton.cdiv(chans, m["BLOCK_C"]) * n_kb, n_split, batch),
        x, bins, inv_area, dest, chans, n, width, s_tot, n_kb, n_per_split, batch * chans * s_tot,
        S_BLOCK=s_block, DOT_PRECISION=_launch.dot_precision(x.dtype))
    if n_split > 1:
        out.copy_(dest.sum(dim=0))
    return out


def pyramid_pool_bwd(grad: torch.Tensor, scales, height: int, width: int) -> torch.Tensor:
    """grad [B, C, S_tot] -> grad_x [B, C, H, W]: each pixel gets sum over its bins of grad / area."""
    batch, chans, s_tot = grad.shape
    n = height * width
    acc = _launch.acc_dtype(grad.dtype)
    bins, inv_area = _bin_table(tuple(int(s) for s in scales), height, width, grad.device, acc)
    if bins.shape[0] != s_tot:
        raise ValueError(f"grad has {s_tot} bins but scales {list(scales)} have {bins.shape[0]}")
    s_block = _s_block(s_tot)
    n_kb = triton.cdiv(s_tot, s_block)
    # Several channel blocks per program reuse its membership tile, as long
    # as there are enough programs to fill the machine.
    n_tiles = triton.cdiv(n, BWD.block_default(grad.dtype, "BLOCK_N"))
    c_parts = triton.cdiv(_launch.target_programs(grad.device), n_tiles * batch)
    c_split, c_per_prog = _launch.split(chans, c_parts, BWD.block_max(grad.dtype, "BLOCK_C"))

    # Later bin blocks accumulate into grad_x: keep that sum in fp32 for 16-bit grads.
    gx = torch.empty(batch, chans, height, width, dtype=acc if n_kb > 1 else grad.dtype, device=grad.device)
    # grad is small ([B, C, S_tot]): its non-finite entries are found and zeroed here, for the kernel's
    # second pass (see the kernel).
    finite = grad.isfinite()
    finite_grad = torch.where(finite, grad, 0).contiguous()
    nonfinite = (~finite).any().to(torch.int32).reshape(1)
    grid = lambda m: (triton.cdiv(n, m["BLOCK_N"]), c_split, batch)  # noqa: E731
    BWD(grad.dtype, grid, finite_grad, bins, inv_area, gx, chans, n, width, s_tot, c_per_prog,
        S_BLOCK=s_block, DOT_PRECISION=_launch.dot_precision(grad.dtype), ACCUMULATE=n_kb > 1)
    BWD_NONFINITE(grad.dtype, grid, grad, nonfinite, bins, inv_area, gx, chans, n, width, s_tot, c_per_prog,
                  S_BLOCK=s_block)
    return gx.to(grad.dtype)


def compile_cases():
    """(all configs?, thunk) per realistic call: APCNet's scales on a 2048-channel map with every
    config; fewer bins (smaller tiles) and more bins than one tile (the block loop) with the default."""
    for dtype in _launch.GPU_DTYPES:
        for all_configs, scales in ((True, (1, 2, 3, 6)), (False, (1, 2, 3)), (False, (2, 3, 4)),
                                    (False, (1, 2, 3, 6, 8))):
            s_tot = sum(s * s for s in scales)

            def case(dtype=dtype, scales=scales, s_tot=s_tot):
                pyramid_pool_fwd(_launch.meta(2, 2048, 64, 128, dtype=dtype), scales)
                pyramid_pool_bwd(_launch.meta(2, 2048, s_tot, dtype=dtype), scales, 64, 128)
            yield all_configs, case
