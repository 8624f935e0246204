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
"""
import triton
import triton.language as tl


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
