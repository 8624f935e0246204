"""Class gather (OCRNet's SpatialGatherModule, ACFNet's class centres), fused: per-class pixel softmax
weights and their products with the features, one pass over feats and probs.

Contract: docs/kernels.md "class_gather"; launchers below the kernels. The maths (fastctx/ops/class_gather.py):

    "ocr":   w_kn = exp(scale probs_kn - lse_k), lse_k = log sum_n exp(scale probs_kn);  centre_k = sum_n w_kn F_n
    "paper": p_n = softmax_k(scale probs_n);  mass_k = sum_n p_kn;  centre_k = sum_n p_kn F_n / mass_k

Forward, grid (C blocks x pixel chunks, B). A program owns one image, one block of BLOCK_C channels and
one contiguous chunk of pixels, and keeps every class of its pixel tile in registers:

    logits  scale * probs            [K_PAD, BLOCK_N]   (padded classes -inf)
    weights "ocr": exp(logits - running class max), rescaling the accumulators when the max grows
            (online softmax over the pixels);  "paper": the per-pixel softmax over the classes
    acc    += weights @ F^T          [K_PAD, BLOCK_C]   (tl.dot; F^T read from NCHW by index)

and writes (acc, sum of weights[, running max]) to its chunk's partial slot once, at the end. The launcher
merges the chunks in a fixed order (deterministic, no atomics): for "ocr" the usual rescaling by
exp(max_chunk - max), lse = max + log(sum); for "paper" sum(acc) / sum(mass). Programs of one pixel chunk
are adjacent in the grid, so the probs tile that every channel block re-reads is L2-hot.

Backward, grid (pixel tiles, B); no cross-pixel reduction, one local pass per tile. With G' = G (ocr) or
G / mass (paper) and gc_k = G'_k . centre_k from the launcher, the weights are recomputed from probs (and
lse) and

    pass 1 (C chunks):  dp = G' F            [K_PAD, BLOCK_N]  (tl.dot)
    registers:          "ocr":   grad_probs = scale w (dp - gc)
                        "paper": dp -= gc;  grad_probs = scale p (dp - sum_k p dp)
    pass 2 (C chunks):  grad_feats = G'^T w  [BLOCK_C, BLOCK_N] (tl.dot), stored into NCHW

Dot operands are in the data dtype (weights rounded to it, as flash attention does) with fp32
accumulation (fp64 for fp64 under the interpreter); fp32 dots use DOT_PRECISION. Offsets inside an image
are int32 (`limits` declines an image of 2^31 elements or more); image and slot bases are int64.
"""
import torch
import triton
import triton.language as tl

from . import _launch

_LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _scaled_logits(probs_img, offs_k, mask_k, offs_n, mask_n, N, scale, acc_dtype: tl.constexpr):
    """scale * probs as [K_PAD, BLOCK_N] in acc_dtype: -inf on padded classes, 0 on padded pixels.

    The -inf is set after scaling (a negative or zero scale must not turn padding into +inf or NaN).
    Padded pixels stay finite, so their softmax over the classes is too; callers mask them where they
    would enter a sum over pixels.
    """
    mask = mask_k[:, None] & mask_n[None, :]
    p = tl.load(probs_img + offs_k[:, None] * N + offs_n[None, :], mask=mask, other=0.0).to(acc_dtype)
    return tl.where(mask_k[:, None], scale * p, float("-inf"))


@triton.jit
def _class_softmax(logits, mask_n):
    """Per-pixel softmax over the classes (axis 0), 0 on padded pixels.

    A NaN or +inf logit makes its pixel's column NaN, as torch.softmax does.
    """
    col_max = tl.max(logits, axis=0)
    e = tl.exp2((logits - col_max[None, :]) * _LOG2E)
    p = e / tl.sum(e, axis=0)[None, :]
    return tl.where(mask_n[None, :], p, 0.0)


@triton.jit
def class_gather_fwd_kernel(
    feats_ptr, probs_ptr, acc_part_ptr, sum_part_ptr, max_part_ptr,
    C, K, N, scale, per_split, n_split,
    OCR: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(C, BLOCK_C) * n_split, B); program (cb, s) of image b, channel block fastest.

    feats T [B, C, N], probs T [B, K, N]. Chunk s is pixels [s * per_split, (s + 1) * per_split).
    Writes acc_part acc [B, n_split, K, C] (the chunk's weighted feature sums), and from channel block 0
    sum_part acc [B, n_split, K] (sum of weights) and, for "ocr", max_part (the class max the chunk's
    weights are relative to; -inf for a class with no finite logit in the chunk).
    """
    if feats_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dot_dtype: tl.constexpr = feats_ptr.dtype.element_ty
    pid = tl.program_id(0)
    n_cb = tl.cdiv(C, BLOCK_C)
    cb = pid % n_cb
    chunk = pid // n_cb
    b = tl.program_id(1).to(tl.int64)
    feats_img = feats_ptr + b * C * N
    probs_img = probs_ptr + b * K * N

    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    acc = tl.zeros([K_PAD, BLOCK_C], dtype=acc_dtype)
    run_sum = tl.zeros([K_PAD], dtype=acc_dtype)
    run_max = tl.full([K_PAD], float("-inf"), dtype=acc_dtype)

    n_begin = chunk * per_split
    n_end = tl.minimum(n_begin + per_split, N)
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        logits = _scaled_logits(probs_img, offs_k, mask_k, offs_n, mask_n, N, scale, acc_dtype)
        if OCR:
            logits = tl.where(mask_n[None, :], logits, float("-inf"))  # padded pixels weigh 0
            new_max = tl.maximum(run_max, tl.max(logits, axis=1))
            # Relative to 0 while a class has seen only -inf (padding, or -inf logits): its weights are
            # exp(-inf) = 0, not exp(-inf + inf) = NaN, so later finite logits are not poisoned.
            ref = tl.where(new_max == float("-inf"), 0.0, new_max)
            alpha = tl.exp2((run_max - ref) * _LOG2E)
            w = tl.exp2((logits - ref[:, None]) * _LOG2E)
            run_sum = run_sum * alpha + tl.sum(w, axis=1)
            acc = acc * alpha[:, None]
            run_max = new_max
        else:
            w = _class_softmax(logits, mask_n)
            run_sum += tl.sum(w, axis=1)
        f_t = tl.load(feats_img + offs_c[None, :] * N + offs_n[:, None],
                      mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        acc = tl.dot(w.to(dot_dtype), f_t, acc, input_precision=DOT_PRECISION)

    slot = b * n_split + chunk
    tl.store(acc_part_ptr + slot * K * C + offs_k[:, None] * C + offs_c[None, :], acc,
             mask=mask_k[:, None] & mask_c[None, :])
    first_block = mask_k & (cb == 0)
    tl.store(sum_part_ptr + slot * K + offs_k, run_sum, mask=first_block)
    if OCR:
        tl.store(max_part_ptr + slot * K + offs_k, run_max, mask=first_block)


@triton.jit
def class_gather_bwd_kernel(
    grad_ptr, feats_ptr, probs_ptr, lse_ptr, gc_ptr, grad_feats_ptr, grad_probs_ptr,
    C, K, N, scale,
    OCR: tl.constexpr, K_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), B).

    grad: G' in the data dtype [B, K, C] (G for "ocr", G / mass for "paper"); gc acc [B, K] = G'_k . centre_k;
    lse acc [B, K] ("ocr" only). Writes grad_feats T [B, C, N] and grad_probs T [B, K, N].
    """
    if feats_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dot_dtype: tl.constexpr = grad_ptr.dtype.element_ty
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    feats_img = feats_ptr + b * C * N
    probs_img = probs_ptr + b * K * N
    grad_img = grad_ptr + b * K * C

    offs_k = tl.arange(0, K_PAD)
    mask_k = offs_k < K
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    logits = _scaled_logits(probs_img, offs_k, mask_k, offs_n, mask_n, N, scale, acc_dtype)
    if OCR:
        lse = tl.load(lse_ptr + b * K + offs_k, mask=mask_k, other=0.0)
        w = tl.exp2((logits - lse[:, None]) * _LOG2E)  # 0 on padded classes; padded pixels are not stored
    else:
        w = _class_softmax(logits, mask_n)

    # dp_kn = G'_k . F_n over C chunks.
    dp = tl.zeros([K_PAD, BLOCK_N], dtype=acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        g = tl.load(grad_img + offs_k[:, None] * C + offs_c[None, :],
                    mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        f = tl.load(feats_img + offs_c[:, None] * N + offs_n[None, :],
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        dp = tl.dot(g, f, dp, input_precision=DOT_PRECISION)
    gc = tl.load(gc_ptr + b * K + offs_k, mask=mask_k, other=0.0)
    dp = dp - gc[:, None]
    if OCR:
        d_logits = w * dp
    else:
        d_logits = w * (dp - tl.sum(w * dp, axis=0)[None, :])
    tl.store(grad_probs_ptr + b * K * N + offs_k[:, None] * N + offs_n[None, :],
             (scale * d_logits).to(grad_probs_ptr.dtype.element_ty), mask=mask_k[:, None] & mask_n[None, :])

    w_op = w.to(dot_dtype)
    gf_img = grad_feats_ptr + b * C * N
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        g_t = tl.load(grad_img + offs_k[None, :] * C + offs_c[:, None],
                      mask=mask_k[None, :] & mask_c[:, None], other=0.0)
        gf = tl.dot(g_t, w_op, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
        tl.store(gf_img + offs_c[:, None] * N + offs_n[None, :], gf.to(grad_feats_ptr.dtype.element_ty),
                 mask=mask_c[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers
#
# Classes. Every class of a pixel tile is one register tile of K_PAD = next power of two >= max(16, K) rows
# (16 is the smallest MMA size), so K <= K_MAX = 256 (ADE20K's 150 and COCO-Stuff's 171 take 256); `limits`
# declines more.
#
# Work split of the forward. The partial slots [B, n_split, K, C] are written once per program (no
# read-modify-write). n_split is chosen to fill the GPU with the fewest channel blocks any config may use,
# capped so the fp32 slots stay no larger than feats unless that would leave SMs idle; each chunk is a
# multiple of the largest BLOCK_N of the configs, so every program owns at least one tile whatever config
# the autotuner picks.

K_MAX = 256


def _cfg(*rows):
    return _launch.configs(*((dict(BLOCK_N=bn, BLOCK_C=bc), w, st) for bn, bc, w, st in rows))


# (BLOCK_N, BLOCK_C, warps, stages) per (data bits, K_PAD), the default first; all spill-free on sm_80 and
# sm_90 (tests/test_triton_compile.py). Wider class tiles take narrower pixel / channel tiles; fp32 keeps a hi
# and a lo copy of every tf32x3 operand, hence its narrower tiles.
FWD = _launch.Kernel(
    class_gather_fwd_kernel,
    configs={
        ("16", 16): _cfg((64, 128, 4, 2), (128, 128, 8, 3), (128, 64, 4, 3)),
        ("16", 32): _cfg((64, 128, 4, 3), (128, 64, 4, 3)),
        ("16", 64): _cfg((64, 64, 4, 3), (64, 128, 8, 3)),
        ("16", 128): _cfg((64, 64, 8, 2), (32, 128, 8, 2)),
        ("16", 256): _cfg((32, 64, 8, 2), (64, 32, 8, 2)),
        ("32", 16): _cfg((64, 128, 8, 2), (128, 64, 8, 2)),
        ("32", 32): _cfg((64, 128, 8, 2), (32, 128, 4, 2), (128, 64, 8, 2)),
        ("32", 64): _cfg((32, 128, 8, 2), (32, 64, 8, 2), (64, 32, 4, 2)),
        ("32", 128): _cfg((32, 64, 8, 1), (32, 32, 8, 2), (64, 32, 8, 2)),
        ("32", 256): _cfg((32, 32, 8, 2), (16, 64, 8, 2)),
    },
    interpret=dict(BLOCK_N=16, BLOCK_C=16), tune_key=["C", "K", "N"], family_keys=("K_PAD",),
)
BWD = _launch.Kernel(
    class_gather_bwd_kernel,
    configs={
        ("16", 16): _cfg((64, 64, 4, 2), (128, 32, 4, 2)),
        ("16", 32): _cfg((64, 64, 4, 2), (128, 32, 4, 2)),
        ("16", 64): _cfg((64, 32, 4, 2), (32, 64, 4, 2)),
        ("16", 128): _cfg((32, 32, 4, 2), (64, 32, 8, 2)),
        ("16", 256): _cfg((32, 32, 8, 2), (16, 64, 8, 2)),
        ("32", 16): _cfg((64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2)),
        ("32", 32): _cfg((64, 32, 4, 2), (128, 32, 8, 2), (64, 32, 8, 2)),
        ("32", 64): _cfg((64, 32, 8, 2), (32, 32, 4, 2), (64, 16, 4, 2)),
        ("32", 128): _cfg((32, 32, 8, 2), (64, 16, 8, 1), (32, 16, 8, 1)),
        ("32", 256): _cfg((32, 16, 8, 2), (32, 16, 8, 1)),
    },
    interpret=dict(BLOCK_N=16, BLOCK_C=16), tune_key=["C", "K", "N"], family_keys=("K_PAD",),
)

# Pixel chunks per image under the interpreter: two, so the tests' maps give programs of several tiles
# and a merge of several chunks.
INTERP_SPLIT = 2


def limits(facts) -> str | None:
    """Calls these launchers cannot run: more classes than one register tile, an image above int32
    offsets, a batch above grid axis 1."""
    if facts["K"] > K_MAX:
        return f"K = {facts['K']} classes > {K_MAX} (the Triton kernels hold a pixel tile's classes in registers)"
    elems = max(facts["C"], facts["K"]) * facts["N"]
    if elems >= 2**31:
        return f"one image has {elems} >= 2^31 elements in a tensor (int32 tile offsets)"
    return _launch.grid_reason((1, facts["B"]), ("", "batch"))


def _k_pad(num_classes: int) -> int:
    if num_classes > K_MAX:
        raise ValueError(f"the Triton class_gather kernels hold K <= {K_MAX} classes, got K = {num_classes}")
    return max(16, triton.next_power_of_2(num_classes))


def _check_mode(mode: str) -> bool:
    """True for "ocr", False for "paper"."""
    if mode not in ("ocr", "paper"):
        raise ValueError(f"mode must be 'ocr' or 'paper', got {mode!r}")
    return mode == "ocr"


def _pixel_chunks(feats: torch.Tensor, batch: int, chans: int, n: int, k: int, k_pad: int) -> tuple[int, int]:
    """(n_split, pixels per chunk) of the forward."""
    block_n = FWD.block_max(feats.dtype, "BLOCK_N", K_PAD=k_pad)
    if _launch.on_gpu_path():
        n_cb = triton.cdiv(chans, FWD.block_max(feats.dtype, "BLOCK_C", K_PAD=k_pad))
        programs = _launch.target_programs(feats.device)
        want, floor = triton.cdiv(programs, n_cb * batch), triton.cdiv(programs // 4, n_cb * batch)
        parts = min(want, max(floor, (n * feats.element_size()) // (k * 4)))
    else:
        parts = INTERP_SPLIT
    return _launch.split(n, parts, block_n)


def class_gather_fwd(feats: torch.Tensor, probs: torch.Tensor, mode: str, scale: float):
    """-> (centres T [B, K, C], stat acc [B, K]): lse_k ("ocr") or mass_k ("paper")."""
    ocr = _check_mode(mode)
    batch, chans, height, width = feats.shape
    k, n = probs.shape[1], height * width
    k_pad = _k_pad(k)
    acc = _launch.acc_dtype(feats.dtype)
    n_split, per_split = _pixel_chunks(feats, batch, chans, n, k, k_pad)
    acc_part = torch.empty(batch, n_split, k, chans, dtype=acc, device=feats.device)
    sum_part = torch.empty(batch, n_split, k, dtype=acc, device=feats.device)
    max_part = torch.empty(batch, n_split, k, dtype=acc, device=feats.device) if ocr else None
    FWD(feats.dtype, lambda m: (triton.cdiv(chans, m["BLOCK_C"]) * n_split, batch),
        feats, probs, acc_part, sum_part, max_part, chans, k, n, float(scale), per_split, n_split,
        OCR=ocr, K_PAD=k_pad, DOT_PRECISION=_launch.dot_precision(feats.dtype))
    # Fixed-order merge of the chunks.
    if ocr:
        top = max_part.amax(dim=1, keepdim=True)
        # exp(max_chunk - max): NaN when the class max is +-inf, as softmax over those logits is.
        rescale = torch.exp(max_part - top)
        total = (sum_part * rescale).sum(dim=1)
        centres = (acc_part * rescale.unsqueeze(3)).sum(dim=1) / total.unsqueeze(2)
        stat = top.squeeze(1) + torch.log(total)
    else:
        stat = sum_part.sum(dim=1)
        centres = acc_part.sum(dim=1) / stat.unsqueeze(2)
    return centres.to(feats.dtype), stat


def class_gather_bwd(grad: torch.Tensor, feats: torch.Tensor, probs: torch.Tensor, centres: torch.Tensor,
                     stat: torch.Tensor, mode: str, scale: float):
    """-> (grad_feats T [B, C, H, W], grad_probs T [B, K, H, W]); the weights recomputed per pixel tile."""
    ocr = _check_mode(mode)
    batch, chans, height, width = feats.shape
    k, n = probs.shape[1], height * width
    k_pad = _k_pad(k)
    acc = _launch.acc_dtype(feats.dtype)
    # G' = G (ocr) or G / mass (paper), rounded once to the data dtype for the MMAs; gc from that same G'.
    g_op = grad if ocr else (grad.to(acc) / stat.unsqueeze(2)).to(feats.dtype)
    gc = torch.einsum("bkc,bkc->bk", g_op.to(acc), centres.to(acc)).contiguous()
    grad_feats = torch.empty_like(feats)
    grad_probs = torch.empty_like(probs)
    BWD(feats.dtype, lambda m: (triton.cdiv(n, m["BLOCK_N"]), batch),
        g_op.contiguous(), feats, probs, stat if ocr else None, gc, grad_feats, grad_probs,
        chans, k, n, float(scale),
        OCR=ocr, K_PAD=k_pad, DOT_PRECISION=_launch.dot_precision(feats.dtype))
    return grad_feats, grad_probs


def compile_cases():
    """(all configs?, thunk): B = 2, C = 512 on a 64x128 map with K = 19 and a 64x64 map with K = 150, both
    modes, every config; the other class tiles (K = 1, 40, 100, 171) with the default config."""
    m = _launch.meta
    for dtype in _launch.GPU_DTYPES:
        acc = _launch.acc_dtype(dtype)
        for all_configs, k, (h, w) in ((True, 19, (64, 128)), (True, 150, (64, 64)), (False, 1, (64, 128)),
                                       (False, 40, (64, 64)), (False, 100, (64, 64)), (False, 171, (64, 64))):
            for mode in ("ocr", "paper"):
                def case(dtype=dtype, acc=acc, k=k, h=h, w=w, mode=mode):
                    feats, probs = m(2, 512, h, w, dtype=dtype), m(2, k, h, w, dtype=dtype)
                    class_gather_fwd(feats, probs, mode, 1.0)
                    class_gather_bwd(m(2, k, 512, dtype=dtype), feats, probs, m(2, k, 512, dtype=dtype),
                                     m(2, k, dtype=acc), mode, 1.0)
                yield all_configs, case
