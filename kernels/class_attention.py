"""Class attention (OCRNet's ObjectAttentionBlock, ACFNet's class-probability attention), fused: every
pixel mixes K per-class vectors with a softmax over the classes; NCHW in and out.

Contract: docs/kernels.md "class_attention"; launchers below the kernels. The maths
(fastctx/ops/class_attention.py), with s_kn = k_k . q_n (query form) or logits_kn (logits form):

    lse_n = log sum_k exp(scale s_kn);  a_kn = exp(scale s_kn - lse_n);  out_n = sum_k a_kn v_k
    backward, for grad G:  D_n = G_n . out_n;  dA_kn = v_k . G_n;  dS_kn = scale a_kn (dA_kn - D_n)
        dv_k = sum_n a_kn G_n;  dq_n = sum_k dS_kn k_k;  dk_k = sum_n dS_kn q_n;  dlogits = dS

Forward, grid (pixel tiles, B): scores S = Keys Q [K_PAD, BLOCK_N] (tl.dot over Cq chunks; or the logits
tile), softmax over the classes in registers, out = V^T A per Cv chunk (tl.dot), lse_n stored.

Backward, flash-attention style, in two kernels:

* pixel kernel, grid (pixel tiles, B), every class of the tile in registers: S again, A = exp(scale S - lse),
  D and dA = V G over Cv chunks (tl.dot), dS; stores grad_logits = dS, or grad_query = Keys^T dS per Cq
  chunk (tl.dot) and D (for the next kernel).
* class kernel, grid (class blocks x channel blocks x pixel chunks, B), for the cross-pixel sums: a
  program owns BLOCK_K classes, BLOCK_C channels and a contiguous pixel chunk, recomputes A (and, in the
  query form, S and dA over all channels in chunks of BLOCK_R, with D from the pixel kernel) per tile,
  and accumulates
  dv += A G^T and dk += dS Q^T in registers; it writes them to its chunk's slot once, at the end, and the
  launcher sums the slots in a fixed order (deterministic, no atomics). Programs of one pixel chunk are
  adjacent in the grid, so the tiles every class block reads are L2-hot.

In the query form the two kernels recompute S and dA once more than a single pass would (about 7 instead
of 5 K x C x N products, as flash attention's separate dq pass does): a single pass would have to hold
every class's dk and dv, or write per-tile partials, since dq sums over the classes and dk, dv over the
pixels.

No [N, K] tensor exists beyond one tile. Dot operands are in the data dtype (A and dS rounded to it, as
flash attention does) with fp32 accumulation (fp64 for fp64 under the interpreter); fp32 dots use
DOT_PRECISION. Offsets inside an image are int32 (`limits` declines an image of 2^31 elements or more);
image and slot bases are int64.
"""
import torch
import triton
import triton.language as tl

from . import _launch

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.constexpr_function
def _acc_dtype(dtype):
    """The accumulation dtype of data in dtype: fp64 for fp64 (the interpreter's), else fp32."""
    return tl.float64 if dtype == tl.float64 else tl.float32


@triton.jit
def _scores(q_img, keys_img, logits_img, offs_k, mask_k, offs_n, mask_n, CQ, N, scale,
            QUERY: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
            DOT_PRECISION: tl.constexpr, acc_dtype: tl.constexpr):
    """scale * s for classes offs_k and pixels offs_n, [ROWS, BLOCK_N] in acc_dtype; -inf on padded classes.

    Padded pixels get finite scores (their q or logits load as 0); callers mask them where they matter.
    """
    if QUERY:
        s = tl.zeros([ROWS, BLOCK_N], dtype=acc_dtype)
        for c0 in range(0, CQ, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CQ
            keys = tl.load(keys_img + offs_k[:, None] * CQ + offs_c[None, :],
                           mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            q = tl.load(q_img + offs_c[:, None] * N + offs_n[None, :],
                        mask=mask_c[:, None] & mask_n[None, :], other=0.0)
            s = tl.dot(keys, q, s, input_precision=DOT_PRECISION)
    else:
        s = tl.load(logits_img + offs_k[:, None] * N + offs_n[None, :],
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(acc_dtype)
    # -inf after scaling: a negative or zero scale must not turn padding into +inf or NaN.
    return tl.where(mask_k[:, None], scale * s, float("-inf"))


@triton.jit
def _pixel_tile_scores(q_ptr, keys_ptr, logits_ptr, CQ, K, N, scale,
                       QUERY: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
                       DOT_PRECISION: tl.constexpr, acc_dtype: tl.constexpr):
    """The prologue of the forward and the pixel kernel, grid (pixel tiles, B): this program's pixel tile, every
    class. Returns (b int64, offs_k, mask_k [K_PAD], offs_n, mask_n [BLOCK_N], scale * S [K_PAD, BLOCK_N])."""
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    if QUERY:
        s = _scores(q_ptr + b * CQ * N, keys_ptr + b * K * CQ, logits_ptr, offs_k, mask_k, offs_n, mask_n,
                    CQ, N, scale, QUERY, K_PAD, BLOCK_N, BLOCK_C, DOT_PRECISION, acc_dtype)
    else:
        s = _scores(q_ptr, keys_ptr, logits_ptr + b * K * N, offs_k, mask_k, offs_n, mask_n,
                    CQ, N, scale, QUERY, K_PAD, BLOCK_N, BLOCK_C, DOT_PRECISION, acc_dtype)
    return b, offs_k, mask_k, offs_n, mask_n, s


@triton.jit
def class_attention_fwd_kernel(
    q_ptr, keys_ptr, values_ptr, logits_ptr, out_ptr, lse_ptr,
    CQ, CV, K, N, scale,
    QUERY: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), B).

    q T [B, CQ, N] and keys T [B, K, CQ] (QUERY), or logits T [B, K, N]; values T [B, K, CV].
    Writes out T [B, CV, N] and lse acc [B, N].
    """
    acc_dtype: tl.constexpr = _acc_dtype(values_ptr.dtype.element_ty)
    dot_dtype: tl.constexpr = values_ptr.dtype.element_ty
    b, offs_k, mask_k, offs_n, mask_n, s = _pixel_tile_scores(
        q_ptr, keys_ptr, logits_ptr, CQ, K, N, scale, QUERY, K_PAD, BLOCK_N, BLOCK_C, DOT_PRECISION, acc_dtype)

    # Softmax over the classes; a NaN or +inf score makes its pixel NaN, as torch.softmax does.
    s_max = tl.max(s, axis=0)
    e = tl.exp2((s - s_max[None, :]) * _LOG2E)
    total = tl.sum(e, axis=0)
    a = (e / total[None, :]).to(dot_dtype)
    tl.store(lse_ptr + b * N + offs_n, s_max + tl.log(total), mask=mask_n)

    values_img = values_ptr + b * K * CV
    out_img = out_ptr + b * CV * N
    for c0 in range(0, CV, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CV
        v_t = tl.load(values_img + offs_k[None, :] * CV + offs_c[:, None],
                      mask=mask_k[None, :] & mask_c[:, None], other=0.0)
        out = tl.dot(v_t, a, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        tl.store(out_img + offs_c[:, None] * N + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=mask_c[:, None] & mask_n[None, :])


@triton.jit
def class_attention_bwd_pixel_kernel(
    grad_ptr, q_ptr, keys_ptr, values_ptr, logits_ptr, out_ptr, lse_ptr,
    grad_q_ptr, grad_logits_ptr, delta_ptr,
    CQ, CV, K, N, scale,
    QUERY: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), B).

    grad, out T [B, CV, N]; lse acc [B, N]. Writes grad_logits T [B, K, N], or grad_q T [B, CQ, N] and
    delta acc [B, N] (D_n = G_n . out_n).
    """
    acc_dtype: tl.constexpr = _acc_dtype(values_ptr.dtype.element_ty)
    dot_dtype: tl.constexpr = values_ptr.dtype.element_ty
    b, offs_k, mask_k, offs_n, mask_n, s = _pixel_tile_scores(
        q_ptr, keys_ptr, logits_ptr, CQ, K, N, scale, QUERY, K_PAD, BLOCK_N, BLOCK_C, DOT_PRECISION, acc_dtype)
    lse = tl.load(lse_ptr + b * N + offs_n, mask=mask_n, other=0.0)
    a = tl.exp2((s - lse[None, :]) * _LOG2E)  # 0 on padded classes

    values_img = values_ptr + b * K * CV
    grad_img = grad_ptr + b * CV * N
    out_img = out_ptr + b * CV * N
    d_a = tl.zeros([K_PAD, BLOCK_N], dtype=acc_dtype)
    delta = tl.zeros([BLOCK_N], dtype=acc_dtype)
    for c0 in range(0, CV, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CV
        mask = mask_c[:, None] & mask_n[None, :]
        g = tl.load(grad_img + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        out = tl.load(out_img + offs_c[:, None] * N + offs_n[None, :], mask=mask, other=0.0)
        delta += tl.sum(g.to(acc_dtype) * out.to(acc_dtype), axis=0)
        v = tl.load(values_img + offs_k[:, None] * CV + offs_c[None, :],
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        d_a = tl.dot(v, g, d_a, input_precision=DOT_PRECISION)
    d_s = scale * a * (d_a - delta[None, :])

    if QUERY:
        tl.store(delta_ptr + b * N + offs_n, delta, mask=mask_n)
        d_s_op = d_s.to(dot_dtype)
        keys_img = keys_ptr + b * K * CQ
        grad_q_img = grad_q_ptr + b * CQ * N
        for c0 in range(0, CQ, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CQ
            k_t = tl.load(keys_img + offs_k[None, :] * CQ + offs_c[:, None],
                          mask=mask_k[None, :] & mask_c[:, None], other=0.0)
            gq = tl.dot(k_t, d_s_op, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            tl.store(grad_q_img + offs_c[:, None] * N + offs_n[None, :], gq.to(grad_q_ptr.dtype.element_ty),
                     mask=mask_c[:, None] & mask_n[None, :])
    else:
        tl.store(grad_logits_ptr + b * K * N + offs_k[:, None] * N + offs_n[None, :],
                 d_s.to(grad_logits_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])


@triton.jit
def class_attention_bwd_class_kernel(
    grad_ptr, q_ptr, keys_ptr, values_ptr, logits_ptr, lse_ptr, delta_ptr, dk_part_ptr, dv_part_ptr,
    CQ, CV, K, N, C_OUT, scale, per_split, n_split,
    QUERY: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_R: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(K, BLOCK_K) * cdiv(C_OUT, BLOCK_C) * n_split, B); class block fastest, then channel block.

    C_OUT = max(CQ, CV) (QUERY) or CV. Chunk s is pixels [s * per_split, (s + 1) * per_split). Writes the
    chunk's dv_part acc [B, n_split, K, CV] and, for QUERY, dk_part acc [B, n_split, K, CQ].
    """
    acc_dtype: tl.constexpr = _acc_dtype(values_ptr.dtype.element_ty)
    dot_dtype: tl.constexpr = values_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n_kb = tl.cdiv(K, BLOCK_K)
    n_cb = tl.cdiv(C_OUT, BLOCK_C)
    kb = pid % n_kb
    cb = (pid // n_kb) % n_cb
    chunk = pid // (n_kb * n_cb)
    b = tl.program_id(1).to(tl.int64)
    offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_co = cb * BLOCK_C + tl.arange(0, BLOCK_C)  # the program's output channels
    grad_img = grad_ptr + b * CV * N
    values_img = values_ptr + b * K * CV
    q_img = q_ptr + b * CQ * N if QUERY else q_ptr
    keys_img = keys_ptr + b * K * CQ if QUERY else keys_ptr
    logits_img = logits_ptr if QUERY else logits_ptr + b * K * N

    acc_dv = tl.zeros([BLOCK_K, BLOCK_C], dtype=acc_dtype)
    acc_dk = tl.zeros([BLOCK_K, BLOCK_C], dtype=acc_dtype)
    n_begin = chunk * per_split
    n_end = tl.minimum(n_begin + per_split, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        s = _scores(q_img, keys_img, logits_img, offs_k, mask_k, offs_n, mask_n, CQ, N, scale,
                    QUERY, BLOCK_K, BLOCK_N, BLOCK_R, DOT_PRECISION, acc_dtype)
        lse = tl.load(lse_ptr + b * N + offs_n, mask=mask_n, other=0.0)
        # Padded pixels must not enter the sums over pixels (their scores are finite, not -inf).
        a = tl.where(mask_n[None, :], tl.exp2((s - lse[None, :]) * _LOG2E), 0.0)
        g_t = tl.load(grad_img + offs_co[None, :] * N + offs_n[:, None],
                      mask=mask_n[:, None] & (offs_co < CV)[None, :], other=0.0)
        acc_dv = tl.dot(a.to(dot_dtype), g_t, acc_dv, input_precision=DOT_PRECISION)
        if QUERY:
            d_a = tl.zeros([BLOCK_K, BLOCK_N], dtype=acc_dtype)
            for c0 in range(0, CV, BLOCK_R):
                offs_c = c0 + tl.arange(0, BLOCK_R)
                mask_c = offs_c < CV
                v = tl.load(values_img + offs_k[:, None] * CV + offs_c[None, :],
                            mask=mask_k[:, None] & mask_c[None, :], other=0.0)
                g = tl.load(grad_img + offs_c[:, None] * N + offs_n[None, :],
                            mask=mask_c[:, None] & mask_n[None, :], other=0.0)
                d_a = tl.dot(v, g, d_a, input_precision=DOT_PRECISION)
            delta = tl.load(delta_ptr + b * N + offs_n, mask=mask_n, other=0.0)
            d_s = scale * a * (d_a - delta[None, :])
            q_t = tl.load(q_img + offs_co[None, :] * N + offs_n[:, None],
                          mask=mask_n[:, None] & (offs_co < CQ)[None, :], other=0.0)
            acc_dk = tl.dot(d_s.to(dot_dtype), q_t, acc_dk, input_precision=DOT_PRECISION)

    slot = b * n_split + chunk
    dv_ptrs = dv_part_ptr + slot * K * CV + offs_k[:, None] * CV + offs_co[None, :]
    tl.store(dv_ptrs, acc_dv, mask=mask_k[:, None] & (offs_co < CV)[None, :])
    if QUERY:
        dk_ptrs = dk_part_ptr + slot * K * CQ + offs_k[:, None] * CQ + offs_co[None, :]
        tl.store(dk_ptrs, acc_dk, mask=mask_k[:, None] & (offs_co < CQ)[None, :])


# ----------------------------------------------------------------------------- launchers
#
# Classes. The forward and the pixel kernel hold every class of a pixel tile as one register tile of
# K_PAD = next power of two >= max(16, K) rows (16 is the smallest MMA size), so K <= K_MAX = 256 (ADE20K's
# 150 and COCO-Stuff's 171 take 256); `limits` declines more. The class kernel takes classes in blocks of
# BLOCK_K and any K.
#
# Work split of the class kernel. Its slots [B, n_split, K, C] are written once per program. n_split is
# chosen to fill the GPU with the fewest class and channel blocks any config may use, capped so the fp32
# slots stay no larger than the query / grad maps unless that would leave SMs idle; each chunk is a
# multiple of the largest BLOCK_N of the configs, so every program owns at least one tile whatever config
# the autotuner picks. In the query form a program recomputes S and dA over all channels for its block of
# output channels: the configs take BLOCK_C = 256 where registers allow, so that at OCR's 256 channels
# that work is done once.

K_MAX = 256


def _cfg(*rows):
    return _launch.configs(*((dict(BLOCK_N=bn, BLOCK_C=bc), w, st) for bn, bc, w, st in rows))


# (BLOCK_N, BLOCK_C, warps, stages) per (data bits, K_PAD), the default first; all spill-free on sm_80 and
# sm_90 (tests/test_triton_compile.py). Wider class tiles take narrower pixel / channel tiles; fp32 keeps a hi
# and a lo copy of every tf32x3 operand, hence its narrower tiles.
FWD = _launch.Kernel(
    class_attention_fwd_kernel,
    configs={
        ("16", 16): _cfg((64, 64, 4, 2), (128, 64, 8, 2)),
        ("16", 32): _cfg((64, 64, 4, 2), (128, 64, 8, 2)),
        ("16", 64): _cfg((64, 64, 4, 2), (64, 32, 4, 2)),
        ("16", 128): _cfg((32, 64, 4, 2), (64, 32, 8, 2)),
        ("16", 256): _cfg((32, 32, 8, 2), (16, 64, 8, 2)),
        ("32", 16): _cfg((64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)),
        ("32", 32): _cfg((64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)),
        ("32", 64): _cfg((64, 32, 8, 2), (32, 64, 4, 2), (64, 16, 4, 2)),
        ("32", 128): _cfg((32, 32, 8, 2), (64, 16, 8, 1), (32, 16, 8, 1)),
        ("32", 256): _cfg((32, 16, 8, 2), (32, 16, 8, 1)),
    },
    interpret=dict(BLOCK_N=16, BLOCK_C=16), tune_key=["CQ", "CV", "K", "N"], family_keys=("K_PAD",),
)
BWD_PIXEL = _launch.Kernel(
    class_attention_bwd_pixel_kernel,
    configs={
        ("16", 16): _cfg((64, 64, 4, 2), (128, 32, 8, 2)),
        ("16", 32): _cfg((64, 64, 4, 2), (128, 32, 8, 2)),
        ("16", 64): _cfg((64, 32, 4, 2), (32, 64, 4, 2)),
        ("16", 128): _cfg((32, 32, 4, 2), (64, 32, 8, 2)),
        ("16", 256): _cfg((32, 32, 8, 2), (16, 64, 8, 2)),
        ("32", 16): _cfg((64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 2)),
        ("32", 32): _cfg((64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)),
        ("32", 64): _cfg((64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)),
        ("32", 128): _cfg((32, 32, 8, 2), (64, 16, 8, 1), (32, 16, 8, 1)),
        ("32", 256): _cfg((32, 16, 8, 2), (32, 16, 8, 1)),
    },
    interpret=dict(BLOCK_N=16, BLOCK_C=16), tune_key=["CQ", "CV", "K", "N"], family_keys=("K_PAD",),
)


def _class_cfg(*rows):
    return _launch.configs(*((dict(BLOCK_K=bk, BLOCK_N=bn, BLOCK_C=bc, BLOCK_R=br), w, st)
                             for bk, bn, bc, br, w, st in rows))


# (BLOCK_K, BLOCK_N, BLOCK_C, BLOCK_R, warps, stages) per (data bits, query form). BLOCK_R is the channel
# chunk of the S and dA products (unused by the logits form), decoupled from the output block BLOCK_C so
# that BLOCK_C = 256 fits without spilling.
BWD_CLASS = _launch.Kernel(
    class_attention_bwd_class_kernel,
    configs={
        ("16", True): _class_cfg((32, 64, 256, 32, 8, 2), (16, 64, 256, 32, 8, 2), (32, 64, 128, 32, 8, 2)),
        ("16", False): _class_cfg((32, 64, 128, 16, 4, 3), (64, 64, 64, 16, 4, 3)),
        ("32", True): _class_cfg((16, 32, 256, 32, 8, 1), (16, 64, 128, 32, 8, 1)),
        ("32", False): _class_cfg((32, 64, 64, 16, 8, 2), (16, 64, 128, 16, 8, 2), (64, 32, 64, 16, 8, 2)),
    },
    interpret=dict(BLOCK_K=16, BLOCK_N=16, BLOCK_C=16, BLOCK_R=16), tune_key=["CQ", "CV", "K", "N"],
    family_keys=("QUERY",),
)

# Pixel chunks per image of the class kernel under the interpreter: two, so the tests' maps give programs
# of several tiles and a sum of several slots.
INTERP_SPLIT = 2


def limits(facts) -> str | None:
    """Calls these launchers cannot run: more classes than one register tile, an image above int32
    offsets, a batch above grid axis 1."""
    if facts["K"] > K_MAX:
        return f"K = {facts['K']} classes > {K_MAX} (the Triton kernels hold a pixel tile's classes in registers)"
    elems = max(facts["Cq"], facts["Cv"], facts["K"]) * facts["N"]
    if elems >= 2**31:
        return f"one image has {elems} >= 2^31 elements in a tensor (int32 tile offsets)"
    return _launch.grid_reason((1, facts["B"]), ("", "batch"))


def _k_pad(num_classes: int) -> int:
    if num_classes > K_MAX:
        raise ValueError(f"the Triton class_attention kernels hold K <= {K_MAX} classes, got K = {num_classes}")
    return max(16, triton.next_power_of_2(num_classes))


def _shapes(query, values, logits):
    """(batch, n, K, Cq, Cv) with Cq = 0 in the logits form."""
    if (query is None) == (logits is None):
        raise ValueError("class_attention takes exactly one of query and logits")
    source = query if query is not None else logits
    batch, _, height, width = source.shape
    return batch, height * width, values.shape[1], 0 if query is None else query.shape[1], values.shape[2]


def class_attention_fwd(query, keys, values, logits, scale: float):
    """-> (out T [B, Cv, H, W], lse acc [B, N])."""
    batch, n, k, cq, cv = _shapes(query, values, logits)
    k_pad = _k_pad(k)
    height, width = (query if query is not None else logits).shape[2:]
    out = values.new_empty(batch, cv, height, width)
    lse = torch.empty(batch, n, dtype=_launch.acc_dtype(values.dtype), device=values.device)
    FWD(values.dtype, lambda m: (triton.cdiv(n, m["BLOCK_N"]), batch),
        query, keys, values, logits, out, lse, cq, cv, k, n, float(scale),
        QUERY=query is not None, K_PAD=k_pad, DOT_PRECISION=_launch.dot_precision(values.dtype))
    return out, lse


def _pixel_chunks(values: torch.Tensor, batch: int, n: int, k: int, c_out: int, is_query: bool) -> tuple[int, int]:
    """(n_split, pixels per chunk) of the class kernel."""
    dtype = values.dtype
    block_n = BWD_CLASS.block_max(dtype, "BLOCK_N", QUERY=is_query)
    if _launch.on_gpu_path():
        blocks = min(triton.cdiv(k, c.blocks["BLOCK_K"]) * triton.cdiv(c_out, c.blocks["BLOCK_C"])
                     for c in BWD_CLASS.configs(dtype, QUERY=is_query))
        programs = _launch.target_programs(values.device)
        want, floor = triton.cdiv(programs, blocks * batch), triton.cdiv(programs // 4, blocks * batch)
        parts = min(want, max(floor, (n * values.element_size()) // (k * 4)))
    else:
        parts = INTERP_SPLIT
    return _launch.split(n, parts, block_n)


def class_attention_bwd(grad, query, keys, values, logits, out, lse, scale: float):
    """-> (grad_query, grad_keys, grad_values, grad_logits); an absent input's gradient is an empty T[0]."""
    batch, n, k, cq, cv = _shapes(query, values, logits)
    k_pad = _k_pad(k)
    is_query = query is not None
    acc = _launch.acc_dtype(values.dtype)
    precision = _launch.dot_precision(values.dtype)
    grad_q = torch.empty_like(query) if is_query else None
    grad_logits = None if is_query else torch.empty_like(logits)
    delta = torch.empty(batch, n, dtype=acc, device=values.device) if is_query else None
    BWD_PIXEL(values.dtype, lambda m: (triton.cdiv(n, m["BLOCK_N"]), batch),
              grad, query, keys, values, logits, out, lse, grad_q, grad_logits, delta, cq, cv, k, n, float(scale),
              QUERY=is_query, K_PAD=k_pad, DOT_PRECISION=precision)

    c_out = max(cq, cv)
    n_split, per_split = _pixel_chunks(values, batch, n, k, c_out, is_query)
    dv_part = torch.empty(batch, n_split, k, cv, dtype=acc, device=values.device)
    dk_part = torch.empty(batch, n_split, k, cq, dtype=acc, device=values.device) if is_query else None
    BWD_CLASS(values.dtype,
              lambda m: (triton.cdiv(k, m["BLOCK_K"]) * triton.cdiv(c_out, m["BLOCK_C"]) * n_split, batch),
              grad, query, keys, values, logits, lse, delta, dk_part, dv_part,
              cq, cv, k, n, c_out, float(scale), per_split, n_split,
              QUERY=is_query, DOT_PRECISION=precision)
    # Fixed-order sums of the chunks' slots.
    grad_values = dv_part.sum(dim=1).to(values.dtype)
    if is_query:
        return grad_q, dk_part.sum(dim=1).to(values.dtype), grad_values, values.new_empty(0)
    # Two distinct empty tensors: a custom op's outputs must not alias each other.
    return values.new_empty(0), values.new_empty(0), grad_values, grad_logits


def compile_cases():
    """(all configs?, thunk): B = 2, Cq = Cv = 256 on a 64x128 map with K = 19 and a 64x64 map with K = 150,
    both forms, every config; the other class tiles (K = 1, 40, 100, 171) and ACFNet's logits form on
    512-channel centres with the default config."""
    m = _launch.meta
    for dtype in _launch.GPU_DTYPES:
        acc = _launch.acc_dtype(dtype)
        for all_configs, k, (h, w), cq, cv in ((True, 19, (64, 128), 256, 256), (True, 150, (64, 64), 256, 256),
                                               (False, 1, (64, 128), 256, 256), (False, 40, (64, 64), 256, 256),
                                               (False, 100, (64, 64), 256, 256), (False, 171, (64, 64), 256, 256),
                                               (False, 19, (64, 128), 0, 512)):
            for is_query in (True, False) if cq else (False,):
                def case(dtype=dtype, acc=acc, k=k, h=h, w=w, cq=cq, cv=cv, is_query=is_query):
                    query = m(2, cq, h, w, dtype=dtype) if is_query else None
                    keys = m(2, k, cq, dtype=dtype) if is_query else None
                    logits = None if is_query else m(2, k, h, w, dtype=dtype)
                    values = m(2, k, cv, dtype=dtype)
                    class_attention_fwd(query, keys, values, logits, 256 ** -0.5)
                    class_attention_bwd(m(2, cv, h, w, dtype=dtype), query, keys, values, logits,
                                        m(2, cv, h, w, dtype=dtype), m(2, h * w, dtype=acc), 256 ** -0.5)
                yield all_configs, case
