"""GLA context of APCNet's ACM: per pixel tile, sigmoid affinity and its context.

For group g (channels [g*C, (g+1)*C) of x and z, rows [o_g, o_g + S_g) of
weight / bias / pooled; ``groups`` is an int32 table [G, 2] of (o_g, S_g)):

    L = X^T W_g^T + bias_g       [BLOCK_N, S]  (channel chunks of BLOCK_C)
    A = sigmoid(L)               zeroed on padded bins k >= S_g
    Z^T = A P_g^T                [BLOCK_N, BLOCK_C], stored into NCHW (n contiguous)

The affinity only ever exists as a register tile. Bins are handled in blocks
of S_BLOCK (one block whenever S_g <= S_BLOCK, the usual case); with
MULTI_KB, later blocks read-modify-write the output written by earlier ones
from the same program (the launcher passes an fp32 buffer for 16-bit data).

Dot operands are in the input dtype with fp32 accumulation (fp64 under the
interpreter); for fp32 inputs DOT_PRECISION picks the tensor-core precision.

Channel offsets are int64 (B*G*C*N can pass 2**31). A tile's dots chain
(logits -> A -> A P^T), so Triton lays all warps along the pixel axis: BLOCK_N
should be 16 * num_warps.

Launchers below the kernels (contract: docs/kernels.md "gla_context").
"""
import functools

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _affinity_tile(x_ptr, w_ptr, bias_ptr, chan0, offs_n, mask_n, rows, mask_k, bias_row, C, N,
                   BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, S_BLOCK: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, acc_dtype: tl.constexpr):
    """A = sigmoid(X_tile^T W_rows^T + bias) [BLOCK_N, S_BLOCK] in acc_dtype, 0 outside the masks
    (sigmoid(0) = 0.5 on padded bins would otherwise add 0.5 * padding of P)."""
    logits = tl.zeros([BLOCK_N, S_BLOCK], dtype=acc_dtype)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        x = tl.load(x_ptr + ((chan0 + offs_c) * N)[None, :] + offs_n[:, None],
                    mask=mask_n[:, None] & mask_c[None, :], other=0.0)
        w_t = tl.load(w_ptr + rows[None, :] * C + offs_c[:, None],
                      mask=mask_c[:, None] & mask_k[None, :], other=0.0)
        logits = tl.dot(x, w_t, logits, input_precision=DOT_PRECISION)
    bias = tl.load(bias_ptr + bias_row + rows, mask=mask_k, other=0.0).to(acc_dtype)
    return tl.where(mask_n[:, None] & mask_k[None, :], tl.sigmoid(logits + bias[None, :]), 0.0)


@triton.jit
def gla_context_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, p_ptr, z_ptr, groups_ptr,
    C, N, GC, S_tot,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MULTI_KB: tl.constexpr,
):
    """grid = (cdiv(N, BLOCK_N), G, B)."""
    if x_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    pid_n = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    o_g = tl.load(groups_ptr + 2 * g)
    s_g = tl.load(groups_ptr + 2 * g + 1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    chan0 = b * GC + g * C  # first channel of this group in x / z
    p_img = p_ptr + b * C * S_tot

    for k0 in range(0, s_g, S_BLOCK):
        offs_k = k0 + tl.arange(0, S_BLOCK)
        mask_k = offs_k < s_g
        rows = o_g + offs_k

        a = _affinity_tile(x_ptr, w_ptr, bias_ptr, chan0, offs_n, mask_n, rows, mask_k, b * S_tot, C, N,
                           BLOCK_N, BLOCK_C, S_BLOCK, DOT_PRECISION, acc_dtype).to(dtype)

        if MULTI_KB:
            # z written by the previous bin block must be visible to all threads.
            tl.debug_barrier()
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < C
            p_t = tl.load(p_img + offs_c[None, :] * S_tot + rows[:, None],
                          mask=mask_k[:, None] & mask_c[None, :], other=0.0)
            z = tl.dot(a, p_t, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
            mask = mask_n[:, None] & mask_c[None, :]
            ptrs = z_ptr + ((chan0 + offs_c) * N)[None, :] + offs_n[:, None]
            if MULTI_KB:
                z += tl.load(ptrs, mask=mask & (k0 > 0), other=0.0).to(acc_dtype)
            tl.store(ptrs, z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def gla_context_bwd_kernel(
    grad_ptr, x_ptr, w_ptr, bias_ptr, p_ptr, groups_ptr,
    gx_ptr, dw_part_ptr, dp_part_ptr, db_part_ptr,
    C, N, GC, S_tot, n_split,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, S_BLOCK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, MULTI_KB: tl.constexpr,
):
    """grid = (n_split, G, B); program s walks pixel tiles s, s + n_split, ...

    Per tile and bin block, three passes over the group's channels:
      1. x:        L = X^T W^T (+ bias), A = sigmoid(L)
      2. dZ:       dA = dZ^T P;  grad_pooled^T += A^T dZ^T
      3. x and W:  dL = dA A (1 - A);  grad_x = dL W;  grad_weight += dL^T X^T
    so x is read twice and dZ once. grad_weight / grad_pooled / grad_bias go to
    this program's own fp32 slot ([B, n_split, S_tot, C] / [B, n_split, S_tot]):
    stored on its first tile, accumulated on later ones: no atomics, no
    zero-fill; the launcher sums the slots in a fixed order.
    """
    if x_ptr.dtype.element_ty == tl.float64:
        acc_dtype: tl.constexpr = tl.float64
    else:
        acc_dtype: tl.constexpr = tl.float32
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    g = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    o_g = tl.load(groups_ptr + 2 * g)
    s_g = tl.load(groups_ptr + 2 * g + 1)

    chan0 = b * GC + g * C
    p_img = p_ptr + b * C * S_tot
    slot = b * n_split + pid
    dw_slot = dw_part_ptr + slot * S_tot * C
    dp_slot = dp_part_ptr + slot * S_tot * C
    db_slot = db_part_ptr + slot * S_tot

    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(pid, n_tiles, n_split):
        offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        later_tile = tile > pid
        for k0 in range(0, s_g, S_BLOCK):
            offs_k = k0 + tl.arange(0, S_BLOCK)
            mask_k = offs_k < s_g
            rows = o_g + offs_k

            valid = mask_n[:, None] & mask_k[None, :]
            a = _affinity_tile(x_ptr, w_ptr, bias_ptr, chan0, offs_n, mask_n, rows, mask_k, b * S_tot, C, N,
                               BLOCK_N, BLOCK_C, S_BLOCK, DOT_PRECISION, acc_dtype)
            a_t = tl.trans(a.to(dtype))

            # Slots of the previous tile (and grad_x of the previous bin block)
            # are read back below: make their stores visible to all threads.
            tl.debug_barrier()
            d_a = tl.zeros([BLOCK_N, S_BLOCK], dtype=acc_dtype)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                dz = tl.load(grad_ptr + ((chan0 + offs_c) * N)[None, :] + offs_n[:, None],
                             mask=mask_n[:, None] & mask_c[None, :], other=0.0)
                p = tl.load(p_img + offs_c[:, None] * S_tot + rows[None, :],
                            mask=mask_c[:, None] & mask_k[None, :], other=0.0)
                d_a = tl.dot(dz, p, d_a, input_precision=DOT_PRECISION)
                slot_off = rows[:, None] * C + offs_c[None, :]
                slot_mask = mask_k[:, None] & mask_c[None, :]
                d_p = tl.dot(a_t, dz, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
                d_p += tl.load(dp_slot + slot_off, mask=slot_mask & later_tile, other=0.0)
                tl.store(dp_slot + slot_off, d_p, mask=slot_mask)

            d_l = tl.where(valid, d_a * a * (1.0 - a), 0.0)
            d_b = tl.sum(d_l, axis=0)
            d_b += tl.load(db_slot + rows, mask=mask_k & later_tile, other=0.0)
            tl.store(db_slot + rows, d_b, mask=mask_k)
            d_l = d_l.to(dtype)
            d_l_t = tl.trans(d_l)
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                mask_c = offs_c < C
                mask = mask_n[:, None] & mask_c[None, :]
                chan_off = ((chan0 + offs_c) * N)[None, :] + offs_n[:, None]
                slot_off = rows[:, None] * C + offs_c[None, :]
                slot_mask = mask_k[:, None] & mask_c[None, :]
                w = tl.load(w_ptr + slot_off, mask=slot_mask, other=0.0)
                gx = tl.dot(d_l, w, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
                if MULTI_KB:
                    gx += tl.load(gx_ptr + chan_off, mask=mask & (k0 > 0), other=0.0).to(acc_dtype)
                tl.store(gx_ptr + chan_off, gx.to(gx_ptr.dtype.element_ty), mask=mask)
                x = tl.load(x_ptr + chan_off, mask=mask, other=0.0)
                d_w = tl.dot(d_l_t, x, input_precision=DOT_PRECISION, out_dtype=acc_dtype)
                d_w += tl.load(dw_slot + slot_off, mask=slot_mask & later_tile, other=0.0)
                tl.store(dw_slot + slot_off, d_w, mask=slot_mask)


# ----------------------------------------------------------------------------- launchers

# Affinity columns per register tile; more are processed in blocks. Tests lower it to reach the
# multi-block path. fp32 tiles hold tf32x3 hi/lo operand pairs and spill at 64 columns: fp32 uses
# 32 (APCNet's 36-bin group then takes two blocks; the others still one).
S_BLOCK_MAX = 64
S_BLOCK_MAX_FP32 = 32

# The kernels chain dots, which puts every warp on the pixel axis: BLOCK_N = 16 * num_warps.
FWD = _launch.Kernel(
    gla_context_fwd_kernel,
    configs={
        ("16",): _launch.configs((dict(BLOCK_N=64, BLOCK_C=64), 4, 3), (dict(BLOCK_N=128, BLOCK_C=64), 8, 3),
                                 (dict(BLOCK_N=64, BLOCK_C=32), 4, 4)),
        ("32",): _launch.configs((dict(BLOCK_N=64, BLOCK_C=32), 4, 2), (dict(BLOCK_N=64, BLOCK_C=16), 4, 3)),
    },
    interpret=dict(BLOCK_N=64, BLOCK_C=16), tune_key=["C", "N", "S_tot"],
)
BWD = _launch.Kernel(
    gla_context_bwd_kernel,
    configs={
        ("16",): _launch.configs((dict(BLOCK_N=64, BLOCK_C=32), 4, 2), (dict(BLOCK_N=128, BLOCK_C=32), 8, 2)),
        ("32",): _launch.configs((dict(BLOCK_N=64, BLOCK_C=16), 4, 1)),
    },
    interpret=dict(BLOCK_N=64, BLOCK_C=16), tune_key=["C", "N", "S_tot"],
)


def limits(facts) -> str | None:
    """Calls these launchers cannot run: groups and batch are grid axes 1 and 2."""
    return _launch.grid_reason((1, facts["G"], facts["B"]), ("", "number of groups", "batch"))


@functools.lru_cache(maxsize=64)
def _group_table(group_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [G, 2]: (first row, size) of every group."""
    offsets = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    return torch.tensor(list(zip(offsets, group_sizes)), dtype=torch.int32).to(device)


def _shapes(x: torch.Tensor, group_sizes):
    group_sizes = tuple(int(s) for s in group_sizes)
    batch, chans_all, height, width = x.shape
    n_groups = len(group_sizes)
    if chans_all % n_groups:
        raise ValueError(f"x has {chans_all} channels, not a multiple of {n_groups} groups")
    cap = S_BLOCK_MAX_FP32 if x.dtype == torch.float32 else S_BLOCK_MAX
    s_block = max(16, min(triton.next_power_of_2(max(group_sizes)), S_BLOCK_MAX, cap))
    multi_kb = max(group_sizes) > s_block
    return (group_sizes, batch, chans_all, chans_all // n_groups, height * width, n_groups,
            sum(group_sizes), s_block, multi_kb)


def gla_context_fwd(x, weight, bias, pooled, group_sizes) -> torch.Tensor:
    """z[b, g*C + c, n] = sum_{k in g} sigmoid(W_k . x[b, gC:(g+1)C, n] + bias[b, k]) pooled[b, c, k]."""
    group_sizes, batch, chans_all, chans, n, n_groups, s_tot, s_block, multi_kb = _shapes(x, group_sizes)
    groups = _group_table(group_sizes, x.device)
    # Several bin blocks accumulate into z: keep that sum in fp32 for 16-bit data.
    z = torch.empty(x.shape, dtype=_launch.acc_dtype(x.dtype) if multi_kb else x.dtype, device=x.device)
    FWD(x.dtype, lambda m: (triton.cdiv(n, m["BLOCK_N"]), n_groups, batch),
        x, weight, bias, pooled, z, groups, chans, n, chans_all, s_tot,
        S_BLOCK=s_block, DOT_PRECISION=_launch.dot_precision(x.dtype), MULTI_KB=multi_kb)
    return z.to(x.dtype)


def gla_context_bwd(grad, x, weight, bias, pooled, group_sizes):
    """-> (grad_x, grad_weight, grad_bias, grad_pooled), A recomputed from x per tile."""
    group_sizes, batch, chans_all, chans, n, n_groups, s_tot, s_block, multi_kb = _shapes(x, group_sizes)
    groups = _group_table(group_sizes, x.device)
    acc = _launch.acc_dtype(x.dtype)
    # Programs per (group, image): enough to fill the machine, and at least
    # one tile each whatever BLOCK_N the autotuner picks, so every partial
    # slot gets written and none needs zero-filling.
    n_split = max(1, min(triton.cdiv(_launch.target_programs(x.device), n_groups * batch),
                         triton.cdiv(n, BWD.block_max(x.dtype, "BLOCK_N"))))
    gx = torch.empty(x.shape, dtype=acc if multi_kb else x.dtype, device=x.device)
    dw_part = torch.empty(batch, n_split, s_tot, chans, dtype=acc, device=x.device)
    dp_part = torch.empty(batch, n_split, s_tot, chans, dtype=acc, device=x.device)
    db_part = torch.empty(batch, n_split, s_tot, dtype=acc, device=x.device)
    BWD(x.dtype, lambda m: (n_split, n_groups, batch),
        grad, x, weight, bias, pooled, groups, gx, dw_part, dp_part, db_part,
        chans, n, chans_all, s_tot, n_split,
        S_BLOCK=s_block, DOT_PRECISION=_launch.dot_precision(x.dtype), MULTI_KB=multi_kb)
    # Fixed-order reductions of the per-program slots.
    grad_weight = dw_part.sum(dim=(0, 1)).to(x.dtype)
    grad_bias = db_part.sum(dim=1).to(x.dtype)
    grad_pooled = dp_part.sum(dim=1).transpose(1, 2).to(x.dtype).contiguous()
    return gx.to(x.dtype), grad_weight, grad_bias, grad_pooled


def compile_cases():
    """(all configs?, thunk) per realistic call: APCNet's four scales (C = 512) with every config;
    a single 36-bin group, smaller groups (narrower tiles) and a 100-bin group (every dtype: several bin
    blocks) with the default."""
    for dtype in _launch.GPU_DTYPES:
        for all_configs, sizes in ((True, (1, 4, 9, 36)), (False, (36,)), (False, (1, 4, 9, 25)), (False, (1, 4)),
                                   (False, (1, 4, 9, 36, 100))):
            def case(dtype=dtype, sizes=sizes):
                g, s_tot, m = len(sizes), sum(sizes), _launch.meta
                x = m(2, g * 512, 64, 128, dtype=dtype)
                args = (x, m(s_tot, 512, dtype=dtype), m(2, s_tot, dtype=dtype), m(2, 512, s_tot, dtype=dtype))
                gla_context_fwd(*args, sizes)
                gla_context_bwd(m(2, g * 512, 64, 128, dtype=dtype), *args, sizes)
            yield all_configs, case
