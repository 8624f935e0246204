"""IIWA's window tokens: out[b, i, j, c] = mean of window (i, j) of x [B, Hp, Wp, C] + pos[i, j, c].

Everything is channels last, so a program owns BLOCK_T tokens (or map
pixels) x BLOCK_C channels and every load and store runs along C (coalesced).
Token and pixel indices are int32 (their divisions stay inline; int64 ones
are calls whose frames ptxas keeps in local memory), offsets int64.
The forward reads each window's Wh x Ww pixels once; the backward is a
gather: each map pixel reads its token's gradient (no atomics), and the
positional encoding's gradient is a per-program loop over the batch, in batch
order. Sums are in fp32 (fp64 for fp64 data).

Launchers below the kernels (contract: docs/kernels.md "window_pool").
"""
import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def window_pool_fwd_kernel(
    x_ptr, pos_ptr, out_ptr,
    T, HG, WG, WP, C, WH, WW,
    HAS_POS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid = (cdiv(T = B*HG*WG, BLOCK_T), cdiv(C, BLOCK_C)): x [B, HG*WH, WP, C] -> out [B, HG, WG, C]."""
    if x_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    # Token indices in int32 (limits: < 2^31 map pixels), so the divisions below are inline (int64 ones are
    # calls, whose frames ptxas saves to local memory); offsets in int64.
    tok = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (tok < T)[:, None] & (offs_c < C)[None, :]
    row = tok // WG  # b * HG + i
    # The window's top-left pixel; its rows are WP * C apart.
    corner = (row.to(tl.int64) * WH * WP + (tok % WG) * WW) * C
    row_stride = (tl.zeros([], dtype=tl.int64) + WP) * C  # int64 whether WP came as a value or a constant
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=acc_dtype)
    for dh in range(0, WH):  # row-major order, as avg_pool2d sums
        for dw in range(0, WW):
            offs = corner + dh * row_stride + dw * C
            acc += tl.load(x_ptr + offs[:, None] + offs_c[None, :], mask=mask, other=0.0).to(acc_dtype)
    # A division, as avg_pool2d's, but not the IEEE one: div.rn.f32 is a call whose frame ptxas keeps in local
    # memory; div.full.f32 is within 2 ulp, inline.
    count = (WH * WW) * tl.full([], 1.0, acc_dtype)
    acc = tl.fdiv(acc, count, ieee_rounding=False)
    if HAS_POS:
        pos_offs = (tok % (WG * HG)).to(tl.int64) * C
        acc += tl.load(pos_ptr + pos_offs[:, None] + offs_c[None, :], mask=mask, other=0.0).to(acc_dtype)
    tl.store(out_ptr + (tok.to(tl.int64) * C)[:, None] + offs_c[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def window_pool_bwd_kernel(
    grad_ptr, gx_ptr,
    P, HP, WP, WG, C, WH, WW,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid = (cdiv(P = B*HP*WP, BLOCK_T), cdiv(C, BLOCK_C)): gx[b, y, x] = grad[b, y // WH, x // WW] / (WH*WW)."""
    if grad_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    pix = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)  # int32 (< 2^31 pixels): inline divisions
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (pix < P)[:, None] & (offs_c < C)[None, :]
    row = pix // WP  # b * HP + y
    tok = ((row // HP) * (HP // WH) + (row % HP) // WH) * WG + (pix % WP) // WW
    g = tl.load(grad_ptr + (tok.to(tl.int64) * C)[:, None] + offs_c[None, :], mask=mask, other=0.0).to(acc_dtype)
    count = (WH * WW) * tl.full([], 1.0, acc_dtype)
    tl.store(gx_ptr + (pix.to(tl.int64) * C)[:, None] + offs_c[None, :],
             tl.fdiv(g, count, ieee_rounding=False).to(gx_ptr.dtype.element_ty), mask=mask)  # as the forward


@triton.jit
def window_pool_pos_bwd_kernel(
    grad_ptr, gpos_ptr,
    B, G, C,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """grid = (cdiv(G = HG*WG, BLOCK_T), cdiv(C, BLOCK_C)): gpos[g] = sum over b, in order, of grad[b, g]."""
    if grad_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    tok = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (tok < G)[:, None] & (offs_c < C)[None, :]
    offs = (tok * C)[:, None] + offs_c[None, :]
    image_stride = (tl.zeros([], dtype=tl.int64) + G) * C  # int64 whether G came as a value or a constant
    ptrs = grad_ptr + offs
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=acc_dtype)
    for _ in range(0, B):
        acc += tl.load(ptrs, mask=mask, other=0.0).to(acc_dtype)
        ptrs += image_stride
    tl.store(gpos_ptr + offs, acc.to(gpos_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- launchers

# Block sizes follow the shape (see _tile); the configs choose warps only.
_WARPS = {("32",): _launch.configs(({}, 4, 1), ({}, 8, 1)), ("16",): _launch.configs(({}, 4, 1), ({}, 8, 1))}
FWD = _launch.Kernel(window_pool_fwd_kernel,
                     configs={("32",): _launch.configs(({}, 4, 1), ({}, 2, 1)),
                              ("16",): _launch.configs(({}, 4, 1), ({}, 2, 1))},
                     interpret={}, tune_key=["T", "C", "WH", "WW"])
BWD = _launch.Kernel(window_pool_bwd_kernel, configs=_WARPS, interpret={}, tune_key=["P", "C"])
POS_BWD = _launch.Kernel(window_pool_pos_bwd_kernel, configs=_WARPS, interpret={}, tune_key=["G", "C"])


def _tile(channels: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_C): up to 128 channels per program (one 16-byte vector per thread at fp32), 1K
    elements per tile on a GPU but at most 16 tokens (with few channels, more tokens per thread give
    ptxas enough index divisions to outline them into a call, whose frame lives in local memory); small
    tiles under the interpreter so tests reach several programs and ragged channel blocks."""
    if not _launch.on_gpu_path():
        return 4, 8
    block_c = min(128, max(16, triton.next_power_of_2(channels)))
    return min(16, 1024 // block_c), block_c


def limits(facts) -> str | None:
    """Pixel and token indices are int32 (offsets int64): a map of fewer than 2^31 pixels (B*H*W)."""
    pixels = facts["B"] * facts["H"] * facts["W"]
    if pixels >= 2**31:
        return f"B*H*W = {pixels} map pixels >= 2^31 (int32 pixel indices); split the batch"
    return None


def window_pool_fwd(x, pos, window):
    """-> out [B, Hg, Wg, C]: the mean of each window of x [B, Hp, Wp, C] (+ pos [Hg, Wg, C] if given)."""
    batch, hp, wp, chans = x.shape
    wh, ww = window
    hg, wg = hp // wh, wp // ww
    out = torch.empty(batch, hg, wg, chans, dtype=x.dtype, device=x.device)
    tokens = batch * hg * wg
    block_t, block_c = _tile(chans)
    FWD(x.dtype, lambda m: (triton.cdiv(tokens, block_t), triton.cdiv(chans, block_c)),
        x, out if pos is None else pos, out, tokens, hg, wg, wp, chans, wh, ww,
        HAS_POS=pos is not None, BLOCK_T=block_t, BLOCK_C=block_c)
    return out


def window_pool_bwd(grad, window, pos_grad):
    """-> (grad_x [B, Hg*Wh, Wg*Ww, C], grad_pos [Hg, Wg, C] summed over the batch, or empty without pos_grad)."""
    batch, hg, wg, chans = grad.shape
    wh, ww = window
    hp, wp = hg * wh, wg * ww
    block_t, block_c = _tile(chans)
    grad_x = torch.empty(batch, hp, wp, chans, dtype=grad.dtype, device=grad.device)
    pixels = batch * hp * wp
    BWD(grad.dtype, lambda m: (triton.cdiv(pixels, block_t), triton.cdiv(chans, block_c)),
        grad, grad_x, pixels, hp, wp, wg, chans, wh, ww, BLOCK_T=block_t, BLOCK_C=block_c)
    if not pos_grad:
        return grad_x, grad.new_empty(0)
    grad_pos = torch.empty(hg, wg, chans, dtype=grad.dtype, device=grad.device)
    POS_BWD(grad.dtype, lambda m: (triton.cdiv(hg * wg, block_t), triton.cdiv(chans, block_c)),
            grad, grad_pos, batch, hg * wg, chans, BLOCK_T=block_t, BLOCK_C=block_c)
    return grad_x, grad_pos


def compile_cases():
    """(all configs?, thunk): ULLMC's IIWA stages (B = 2, padded maps 128x128 with 4x8 windows at C = 256 and
    64x64 with 8x8 at C = 512) with every config; a 7x7 window over C = 96 (a channel block with a masked
    edge) and C = 13 with the default."""
    m = _launch.meta
    cases = [(True, 128, 128, 256, (4, 8)), (True, 64, 64, 512, (8, 8)), (False, 56, 56, 96, (7, 7)),
             (False, 8, 16, 13, (4, 8))]
    for dtype in _launch.GPU_DTYPES:
        for all_configs, h, w, c, window in cases:
            def case(dtype=dtype, h=h, w=w, c=c, window=window):
                hg, wg = h // window[0], w // window[1]
                for pos in (m(hg, wg, c, dtype=dtype), None):
                    window_pool_fwd(m(2, h, w, c, dtype=dtype), pos, window)
                window_pool_bwd(m(2, hg, wg, c, dtype=dtype), window, True)
            yield all_configs, case
