"""Triton backend: launchers of the kernels in ``fastctx.kernels`` (contract: docs/kernels.md).

Each ``<op>_fwd`` / ``<op>_bwd`` allocates its outputs and launches. Inputs are
contiguous and on one device (the public op guarantees it). Cross-program
reductions are two-stage: kernels write per-program fp32 partials, summed here
in a fixed order, so results do not depend on scheduling.

Configs. On a GPU each kernel is autotuned over ``_CONFIGS[<kernel>]`` (the
first entry is the default, used when ``FASTCTX_TRITON_AUTOTUNE=0`` pins it for
bitwise run-to-run reproducibility across processes). Under TRITON_INTERPRET=1
one small config runs: the interpreter would execute every autotune config.
``compile_specs()`` lists every (kernel, config, dtype) the launchers can run at
realistic shapes so tests can compile them for sm_80 / sm_90.

Dot precision. 16-bit data use their native MMA with fp32 accumulation
(the 0/1 pooling membership is exact, so pooling sums are exact-product fp32
sums). Plain tf32 would cost fp32 data ~1e-3 relative error, so fp32 uses
DOT_PRECISION "tf32x3" (~fp32 accuracy on tensor cores): Triton's 3-pass split
in gla_context, a cheaper 2-pass split of the data operand in pyramid_pool
(the membership needs none). fp64 (interpreter only) uses "ieee". FMA-based
"ieee" fp32 dots would spill at these tile sizes and run on CUDA cores.
"""
from __future__ import annotations

import functools

import torch
import triton

from fastctx.kernels import gla_context as _gla
from fastctx.kernels import pyramid_pool as _pool
from fastctx.kernels import residual_relu as _rr
from ._triton_common import AUTOTUNE as _AUTOTUNE
from ._triton_common import INTERPRET as _INTERPRET
from ._triton_common import TORCH_TO_TRITON as _TORCH_TO_TRITON
from ._triton_common import acc_dtype as _acc_dtype
from ._triton_common import dot_precision as _dot_precision
from ._triton_common import sm_count as _sm_count
from .residual_relu import mask_bytes, new_mask


# Bins (pyramid_pool) / affinity columns (gla_context) per register tile;
# more are processed in blocks. Tests lower it to reach the multi-block path.
S_BLOCK_MAX = 64
# fp32 GLA tiles hold tf32x3 hi/lo operand pairs and spill at 64 columns: fp32
# uses 32 (APCNet's 36-bin group then takes two blocks; the others still one).
_GLA_S_BLOCK_MAX_FP32 = 32

# Per kernel and dtype class ("16": fp16/bf16, "32": fp32): autotune configs
# [(block sizes, num_warps, num_stages)], the default first. None of them
# spills on sm_80 or sm_90 (tests/test_triton_compile.py). The GLA kernels
# chain dots, which puts every warp on the pixel axis: BLOCK_N = 16 * warps.
_CONFIGS = {
    "pyramid_pool_fwd": {
        "16": [(dict(BLOCK_C=64, BLOCK_N=64), 4, 3), (dict(BLOCK_C=128, BLOCK_N=64), 8, 3),
               (dict(BLOCK_C=64, BLOCK_N=128), 8, 3)],
        "32": [(dict(BLOCK_C=64, BLOCK_N=32), 4, 3), (dict(BLOCK_C=64, BLOCK_N=64), 4, 3),
               (dict(BLOCK_C=128, BLOCK_N=32), 8, 3)],
    },
    "pyramid_pool_bwd": {
        "16": [(dict(BLOCK_C=64, BLOCK_N=64), 4, 2), (dict(BLOCK_C=64, BLOCK_N=128), 8, 2),
               (dict(BLOCK_C=128, BLOCK_N=128), 8, 2)],
        "32": [(dict(BLOCK_C=64, BLOCK_N=128), 8, 2), (dict(BLOCK_C=32, BLOCK_N=64), 4, 2)],
    },
    "gla_context_fwd": {
        "16": [(dict(BLOCK_N=64, BLOCK_C=64), 4, 3), (dict(BLOCK_N=128, BLOCK_C=64), 8, 3),
               (dict(BLOCK_N=64, BLOCK_C=32), 4, 4)],
        "32": [(dict(BLOCK_N=64, BLOCK_C=32), 4, 2), (dict(BLOCK_N=64, BLOCK_C=16), 4, 3)],
    },
    "gla_context_bwd": {
        "16": [(dict(BLOCK_N=64, BLOCK_C=32), 4, 2), (dict(BLOCK_N=128, BLOCK_C=32), 8, 2)],
        "32": [(dict(BLOCK_N=64, BLOCK_C=16), 4, 1)],
    },
    # Block sizes of the elementwise kernels follow the shape (see _rows_tile).
    "residual_relu_fwd": {"16": [({}, 4, 1), ({}, 8, 1)], "32": [({}, 4, 1), ({}, 8, 1)]},
    "residual_relu_bwd": {"16": [({}, 8, 1), ({}, 4, 1)], "32": [({}, 8, 1), ({}, 4, 1)]},
}
# Under the interpreter: one small config (it would run every autotune config),
# small enough that the tests' shapes cover several tiles and channel chunks.
_INTERP_CONFIGS = {
    "pyramid_pool_fwd": dict(BLOCK_C=16, BLOCK_N=32),
    "pyramid_pool_bwd": dict(BLOCK_C=16, BLOCK_N=32),
    "gla_context_fwd": dict(BLOCK_N=64, BLOCK_C=16),
    "gla_context_bwd": dict(BLOCK_N=64, BLOCK_C=16),
    "residual_relu_fwd": {},
    "residual_relu_bwd": {},
}
_KERNELS = {
    "pyramid_pool_fwd": _pool.pyramid_pool_fwd_kernel,
    "pyramid_pool_bwd": _pool.pyramid_pool_bwd_kernel,
    "gla_context_fwd": _gla.gla_context_fwd_kernel,
    "gla_context_bwd": _gla.gla_context_bwd_kernel,
    "residual_relu_fwd": _rr.residual_relu_fwd_kernel,
    "residual_relu_bwd": _rr.residual_relu_bwd_kernel,
}
_TUNE_KEYS = {
    "pyramid_pool_fwd": ["C", "N", "S_tot"],
    "pyramid_pool_bwd": ["C", "N", "S_tot"],
    "gla_context_fwd": ["C", "N", "S_tot"],
    "gla_context_bwd": ["C", "N", "S_tot"],
    "residual_relu_fwd": ["R", "N"],
    "residual_relu_bwd": ["R", "N"],
}


def _dtype_class(dtype: torch.dtype) -> str:
    return "32" if dtype in (torch.float32, torch.float64) else "16"


def _block_max(name: str, dtype: torch.dtype, key: str) -> int:
    """Largest value of a block size over the configs that may run."""
    if _INTERPRET:
        return _INTERP_CONFIGS[name][key]
    return max(cfg[key] for cfg, _, _ in _CONFIGS[name][_dtype_class(dtype)])


def _block_default(name: str, dtype: torch.dtype, key: str) -> int:
    if _INTERPRET:
        return _INTERP_CONFIGS[name][key]
    return _CONFIGS[name][_dtype_class(dtype)][0][0][key]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, cls: str):
    configs = [triton.Config(dict(cfg), num_warps=w, num_stages=s) for cfg, w, s in _CONFIGS[name][cls]]
    return triton.autotune(configs=configs, key=_TUNE_KEYS[name])(_KERNELS[name])


def _launch(name: str, dtype: torch.dtype, grid, *args, **constexprs) -> None:
    """Run kernel `name` for data of `dtype`; `grid` is a function of the chosen block sizes."""
    cls = _dtype_class(dtype)
    if _INTERPRET:
        meta = {**_INTERP_CONFIGS[name], **constexprs}
        _KERNELS[name][grid(meta)](*args, **meta)
    elif _AUTOTUNE:
        _autotuned(name, cls)[grid](*args, **constexprs)
    else:
        cfg, warps, stages = _CONFIGS[name][cls][0]
        meta = {**cfg, **constexprs}
        _KERNELS[name][grid(meta)](*args, **meta, num_warps=warps, num_stages=stages)


def _target_programs(device: torch.device) -> int:
    """How many programs a launch should have to fill the machine (a few waves)."""
    if device.type == "cuda":
        return 4 * _sm_count(device)
    return 4  # interpreter: small, but enough to exercise the split/partial paths


def _s_block(n: int, cap: int = 64) -> int:
    """Bins per register tile: a power of two >= 16 (the smallest MMA K), capped."""
    return max(16, min(triton.next_power_of_2(n), S_BLOCK_MAX, cap))


def _split(n: int, parts: int, align: int) -> tuple[int, int]:
    """Cut range(n) into at most `parts` chunks whose length is a multiple of `align`."""
    parts = max(1, min(parts, triton.cdiv(n, align)))
    per = triton.cdiv(triton.cdiv(n, parts), align) * align
    return triton.cdiv(n, per), per


# ------------------------------------------------------------------ pyramid_pool

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


def _check_grid_dim(value: int, what: str) -> None:
    if value > 65535:
        raise ValueError(f"{what} = {value} exceeds the CUDA grid limit 65535 of the Triton kernels; "
                         "split the call")


def pyramid_pool_fwd(x: torch.Tensor, scales) -> torch.Tensor:
    """x [B, C, H, W] -> [B, C, S_tot]: every scale's adaptive average pool from one read of x."""
    batch, chans, height, width = x.shape
    _check_grid_dim(batch, "batch")
    n = height * width
    acc = _acc_dtype(x.dtype)
    bins, inv_area = _bin_table(tuple(int(s) for s in scales), height, width, x.device, acc)
    s_tot = bins.shape[0]
    s_block = _s_block(s_tot)
    n_kb = triton.cdiv(s_tot, s_block)
    # Few (channel block, bin block, image) programs for small batches: split
    # the pixels too, into ranges that are whole tiles for every config.
    programs = triton.cdiv(chans, _block_max("pyramid_pool_fwd", x.dtype, "BLOCK_C")) * n_kb * batch
    align = _block_max("pyramid_pool_fwd", x.dtype, "BLOCK_N") * (1 if _INTERPRET else 8)
    n_split, n_per_split = _split(n, triton.cdiv(_target_programs(x.device), programs), align)

    out = x.new_empty(batch, chans, s_tot)
    dest = out if n_split == 1 else torch.empty(n_split, batch, chans, s_tot, dtype=acc, device=x.device)
    _launch(
        "pyramid_pool_fwd", x.dtype,
        lambda m: (triton.cdiv(chans, m["BLOCK_C"]) * n_kb, n_split, batch),
        x, bins, inv_area, dest, chans, n, width, s_tot, n_kb, n_per_split, batch * chans * s_tot,
        S_BLOCK=s_block, DOT_PRECISION=_dot_precision(x.dtype),
    )
    if n_split > 1:
        out.copy_(dest.sum(dim=0))
    return out


def pyramid_pool_bwd(grad: torch.Tensor, scales, height: int, width: int) -> torch.Tensor:
    """grad [B, C, S_tot] -> grad_x [B, C, H, W]: each pixel gets sum over its bins of grad / area."""
    batch, chans, s_tot = grad.shape
    _check_grid_dim(batch, "batch")
    n = height * width
    acc = _acc_dtype(grad.dtype)
    bins, inv_area = _bin_table(tuple(int(s) for s in scales), height, width, grad.device, acc)
    if bins.shape[0] != s_tot:
        raise ValueError(f"grad has {s_tot} bins but scales {list(scales)} have {bins.shape[0]}")
    s_block = _s_block(s_tot)
    n_kb = triton.cdiv(s_tot, s_block)
    # Several channel blocks per program reuse its membership tile, as long
    # as there are enough programs to fill the machine.
    n_tiles = triton.cdiv(n, _block_default("pyramid_pool_bwd", grad.dtype, "BLOCK_N"))
    c_parts = triton.cdiv(_target_programs(grad.device), n_tiles * batch)
    c_split, c_per_prog = _split(chans, c_parts, _block_max("pyramid_pool_bwd", grad.dtype, "BLOCK_C"))

    # Later bin blocks accumulate into grad_x: keep that sum in fp32 for 16-bit grads.
    gx_dtype = acc if n_kb > 1 else grad.dtype
    gx = torch.empty(batch, chans, height, width, dtype=gx_dtype, device=grad.device)
    _launch(
        "pyramid_pool_bwd", grad.dtype,
        lambda m: (triton.cdiv(n, m["BLOCK_N"]), c_split, batch),
        grad, bins, inv_area, gx, chans, n, width, s_tot, c_per_prog,
        S_BLOCK=s_block, DOT_PRECISION=_dot_precision(grad.dtype), ACCUMULATE=n_kb > 1,
    )
    return gx.to(grad.dtype)


# ------------------------------------------------------------------ gla_context

@functools.lru_cache(maxsize=64)
def _group_table(group_sizes: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [G, 2]: (first row, size) of every group."""
    offsets = [sum(group_sizes[:g]) for g in range(len(group_sizes))]
    return torch.tensor(list(zip(offsets, group_sizes)), dtype=torch.int32).to(device)


def _gla_shapes(x: torch.Tensor, group_sizes):
    group_sizes = tuple(int(s) for s in group_sizes)
    batch, chans_all, height, width = x.shape
    _check_grid_dim(batch, "batch")
    n_groups = len(group_sizes)
    _check_grid_dim(n_groups, "number of groups")
    if chans_all % n_groups:
        raise ValueError(f"x has {chans_all} channels, not a multiple of {n_groups} groups")
    cap = _GLA_S_BLOCK_MAX_FP32 if x.dtype == torch.float32 else 64
    s_block = _s_block(max(group_sizes), cap)
    multi_kb = max(group_sizes) > s_block
    return (group_sizes, batch, chans_all, chans_all // n_groups, height * width, n_groups,
            sum(group_sizes), s_block, multi_kb)


def gla_context_fwd(x, weight, bias, pooled, group_sizes) -> torch.Tensor:
    """z[b, g*C + c, n] = sum_{k in g} sigmoid(W_k . x[b, gC:(g+1)C, n] + bias[b, k]) pooled[b, c, k]."""
    group_sizes, batch, chans_all, chans, n, n_groups, s_tot, s_block, multi_kb = _gla_shapes(x, group_sizes)
    groups = _group_table(group_sizes, x.device)
    # Several bin blocks accumulate into z: keep that sum in fp32 for 16-bit data.
    z = torch.empty(x.shape, dtype=_acc_dtype(x.dtype) if multi_kb else x.dtype, device=x.device)
    _launch(
        "gla_context_fwd", x.dtype,
        lambda m: (triton.cdiv(n, m["BLOCK_N"]), n_groups, batch),
        x, weight, bias, pooled, z, groups, chans, n, chans_all, s_tot,
        S_BLOCK=s_block, DOT_PRECISION=_dot_precision(x.dtype), MULTI_KB=multi_kb,
    )
    return z.to(x.dtype)


def gla_context_bwd(grad, x, weight, bias, pooled, group_sizes):
    """-> (grad_x, grad_weight, grad_bias, grad_pooled), A recomputed from x per tile."""
    group_sizes, batch, chans_all, chans, n, n_groups, s_tot, s_block, multi_kb = _gla_shapes(x, group_sizes)
    groups = _group_table(group_sizes, x.device)
    acc = _acc_dtype(x.dtype)
    # Programs per (group, image): enough to fill the machine, and at least
    # one tile each whatever BLOCK_N the autotuner picks, so every partial
    # slot gets written and none needs zero-filling.
    n_split = max(1, min(triton.cdiv(_target_programs(x.device), n_groups * batch),
                         triton.cdiv(n, _block_max("gla_context_bwd", x.dtype, "BLOCK_N"))))
    gx = torch.empty(x.shape, dtype=acc if multi_kb else x.dtype, device=x.device)
    dw_part = torch.empty(batch, n_split, s_tot, chans, dtype=acc, device=x.device)
    dp_part = torch.empty(batch, n_split, s_tot, chans, dtype=acc, device=x.device)
    db_part = torch.empty(batch, n_split, s_tot, dtype=acc, device=x.device)
    _launch(
        "gla_context_bwd", x.dtype,
        lambda m: (n_split, n_groups, batch),
        grad, x, weight, bias, pooled, groups, gx, dw_part, dp_part, db_part,
        chans, n, chans_all, s_tot, n_split,
        S_BLOCK=s_block, DOT_PRECISION=_dot_precision(x.dtype), MULTI_KB=multi_kb,
    )
    # Fixed-order reductions of the per-program slots.
    grad_weight = dw_part.sum(dim=(0, 1)).to(x.dtype)
    grad_bias = db_part.sum(dim=1).to(x.dtype)
    grad_pooled = dp_part.sum(dim=1).transpose(1, 2).to(x.dtype).contiguous()
    return gx.to(x.dtype), grad_weight, grad_bias, grad_pooled


# ------------------------------------------------------------------ residual_relu

def _rows_tile(n: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) of the elementwise kernels: ~4K elements, as many pixels as fit."""
    tile = 256 if _INTERPRET else 4096
    block_n = min(max(16, triton.next_power_of_2(n)), 1024 if not _INTERPRET else 64)
    return max(1, tile // block_n), block_n


def residual_relu_fwd(y, residual, scale, shift, save_mask):
    """-> (out, mask): out = relu(relu(y * scale[c] + shift[c]) + residual); mask = out > 0 as
    [B, C, ceil(H*W / 8)] uint8 bits for the backward (empty without save_mask)."""
    batch, chans, height, width = y.shape
    n, rows = height * width, batch * chans
    block_r, block_n = _rows_tile(n)
    out = torch.empty_like(y)
    mask = new_mask(y, save_mask)
    mask_arg = mask if save_mask else out.view(torch.uint8)  # a valid uint8 pointer the kernel never touches
    _launch(
        "residual_relu_fwd", y.dtype,
        lambda m: (triton.cdiv(rows, block_r), triton.cdiv(n, block_n)),
        y, residual, scale, shift, out, mask_arg, chans, n, rows, mask_bytes(height, width),
        BLOCK_R=block_r, BLOCK_N=block_n, SAVE_MASK=save_mask,
    )
    return out, mask


def residual_relu_bwd(grad, y, mask, scale, shift):
    """-> (grad_y, grad_residual, grad_scale, grad_shift); per-channel sums reduced in fixed order."""
    batch, chans, height, width = y.shape
    n, rows = height * width, batch * chans
    block_r, block_n = _rows_tile(n)
    row_blocks = triton.cdiv(rows, block_r)
    n_split, n_per_split = _split(n, triton.cdiv(_target_programs(y.device), row_blocks), block_n)
    grad_y, grad_r = torch.empty_like(y), torch.empty_like(y)
    gscale_part = torch.empty(n_split, rows, dtype=scale.dtype, device=y.device)
    gshift_part = torch.empty(n_split, rows, dtype=scale.dtype, device=y.device)
    _launch(
        "residual_relu_bwd", y.dtype,
        lambda m: (row_blocks, n_split),
        grad, y, mask, scale, shift, grad_y, grad_r, gscale_part, gshift_part,
        chans, n, rows, mask_bytes(height, width), n_per_split,
        BLOCK_R=block_r, BLOCK_N=block_n,
    )
    grad_scale = gscale_part.view(n_split, batch, chans).sum(dim=(0, 1))
    grad_shift = gshift_part.view(n_split, batch, chans).sum(dim=(0, 1))
    return grad_y, grad_r, grad_scale, grad_shift


# ------------------------------------------------------------------ compile specs


# Argument types of each kernel: "T" = data pointer, "A" = acc pointer (fp32 on
# GPU), "I" = int32 table pointer, "M" = uint8 mask pointer; plain strings are
# scalar types.
_ARG_TYPES = {
    "pyramid_pool_fwd": dict(x_ptr="T", bins_ptr="I", inv_area_ptr="A", out_ptr="T", C="i32", N="i32",
                             W="i32", S_tot="i32", n_kb="i32", n_per_split="i32", split_stride="i32"),
    "pyramid_pool_bwd": dict(grad_ptr="T", bins_ptr="I", inv_area_ptr="A", gx_ptr="T", C="i32", N="i32",
                             W="i32", S_tot="i32", c_per_prog="i32"),
    "gla_context_fwd": dict(x_ptr="T", w_ptr="T", bias_ptr="T", p_ptr="T", z_ptr="T", groups_ptr="I",
                            C="i32", N="i32", GC="i32", S_tot="i32"),
    "gla_context_bwd": dict(grad_ptr="T", x_ptr="T", w_ptr="T", bias_ptr="T", p_ptr="T", groups_ptr="I",
                            gx_ptr="T", dw_part_ptr="A", dp_part_ptr="A", db_part_ptr="A",
                            C="i32", N="i32", GC="i32", S_tot="i32", n_split="i32"),
    "residual_relu_fwd": dict(y_ptr="T", r_ptr="T", scale_ptr="A", shift_ptr="A", out_ptr="T", mask_ptr="M",
                              C="i32", N="i32", R="i32", MB="i32"),
    "residual_relu_bwd": dict(grad_ptr="T", y_ptr="T", mask_ptr="M", scale_ptr="A", shift_ptr="A",
                              gy_ptr="T", gr_ptr="T", gscale_part_ptr="A", gshift_part_ptr="A",
                              C="i32", N="i32", R="i32", MB="i32", n_per_split="i32"),
}
# Scalars that are multiples of 16 at realistic shapes (C = 512, N = 64*64 ..),
# which the JIT would specialise on, as it does for 16-byte aligned pointers.
_DIVISIBLE = {"C", "N", "W", "GC", "R", "MB", "n_per_split", "c_per_prog"}


def _spec_variants(name: str, dtype: torch.dtype, default_config: bool) -> list[dict]:
    """Shape-dependent constexprs of one kernel config.

    The realistic case (scales (1, 2, 3, 6): S_tot = 50, group sizes up to 36)
    runs with every config; smaller bin tiles (fewer or smaller scales) and the
    multi-block fallback (more bins than one tile) are listed with the default
    config only.
    """
    if name.startswith("residual_relu"):  # _rows_tile(N) for N >= 1024, and for a 7x5 map
        blocks = [dict(BLOCK_R=4, BLOCK_N=1024)] + ([dict(BLOCK_R=64, BLOCK_N=64)] if default_config else [])
        if name == "residual_relu_fwd":  # training saves the mask; inference does not
            saves = (True, False) if default_config else (True,)
            blocks = [{**b, "SAVE_MASK": save} for b in blocks for save in saves]
        return blocks
    prec = dict(DOT_PRECISION=_dot_precision(dtype))
    if name == "pyramid_pool_fwd":
        blocks = [dict(S_BLOCK=64)] + ([dict(S_BLOCK=32), dict(S_BLOCK=16)] if default_config else [])
    elif name == "pyramid_pool_bwd":
        blocks = [dict(S_BLOCK=64, ACCUMULATE=False)]
        if default_config:
            blocks += [dict(S_BLOCK=64, ACCUMULATE=True), dict(S_BLOCK=32, ACCUMULATE=False),
                       dict(S_BLOCK=16, ACCUMULATE=False)]
    else:  # gla_context_*: fp32 splits 36 bins into two blocks of 32
        top = _GLA_S_BLOCK_MAX_FP32 if dtype == torch.float32 else 64
        blocks = [dict(S_BLOCK=top, MULTI_KB=top < 36)]
        if default_config:
            blocks += [dict(S_BLOCK=top, MULTI_KB=top >= 36)]
            blocks += [dict(S_BLOCK=s, MULTI_KB=False) for s in (32, 16) if s < top]
    return [{**b, **prec} for b in blocks]


def compile_specs() -> list[dict]:
    """Every (kernel, config, dtype) the launchers run on a GPU, at realistic shapes.

    Each spec: name, fn (the JITFunction), signature, constexprs, num_warps,
    num_stages, plus attrs: the tt.divisibility hints the JIT derives for
    16-byte aligned pointers and for the sizes that are multiples of 16 at
    realistic shapes. Compile one with
    ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
    options=dict(num_warps=..., num_stages=...))``.
    """
    specs = []
    for name, arg_types in _ARG_TYPES.items():
        fn = _KERNELS[name]
        attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]]
                 for arg, kind in arg_types.items() if kind in ("T", "A", "I", "M") or arg in _DIVISIBLE}
        for dtype, tname in _TORCH_TO_TRITON.items():
            base_sig = {arg: {"T": "*" + tname, "A": "*fp32", "I": "*i32", "M": "*u8"}.get(kind, kind)
                        for arg, kind in arg_types.items()}
            for i, (cfg, warps, stages) in enumerate(_CONFIGS[name][_dtype_class(dtype)]):
                for variant in _spec_variants(name, dtype, i == 0):
                    constexprs = {**cfg, **variant}
                    signature = {**base_sig, **{arg: "constexpr" for arg in constexprs}}
                    tag = ",".join(f"{k}={int(v) if isinstance(v, bool) else v}"
                                   for k, v in constexprs.items() if k != "DOT_PRECISION")
                    specs.append(dict(
                        name=f"{name}[{tname},{tag},w{warps},s{stages}]", fn=fn, signature=signature,
                        constexprs=constexprs, attrs=attrs, num_warps=warps, num_stages=stages,
                    ))
    return specs


# The Encoding layer's launchers live beside their kernels' compile specs; the
# public ops find every Triton launcher here.
from .triton_encoding import encoding_bwd, encoding_fwd  # noqa: E402,F401
