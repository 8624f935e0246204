"""Triton backend of the Encoding layer: launchers of ``fastctx.kernels.encoding``.

Contract: docs/kernels.md "encoding". ``encoding_fwd`` / ``encoding_bwd`` take
contiguous tensors on one device (the public op guarantees it); x is
[B, N, D], or [B, D, N] when ``channels_first`` (an NCHW map, read in place).

Work split. Each program owns one image and every n_split-th pixel tile of it,
and keeps its cross-tile sums in a private fp32 slot of [B, n_split, D, K]
that is summed here in a fixed order (deterministic, no atomics). n_split is
chosen to fill the GPU (a few waves), capped so the slots stay no larger than
x itself unless that would leave SMs idle, and never above the tile count of
the largest BLOCK_N an autotune config may pick, so every slot is written
whatever config runs.

Numerics. m = mean_k c_k and c' = c - m are formed here in fp32 (fp64 for
fp64), rounded once to the input dtype for the dot operands; ||c'||^2 is
taken from that rounded c' so distances are consistent with the dot.
fp32 dot precision: ``tf32x3`` by default, as for the ACM kernels: ~fp32
accuracy on tensor cores, so fp32 results match the fp32 reference to ~1e-6.
Plain tf32 rounds x', c', A to 10 mantissa bits; emulated at N = 4096,
D = 512, K = 32 with codewords among the features, that moves single
assignments A by up to ~2e-3 and E by ~5e-5 relative, i.e. fp32 inputs would
get tf32 answers. The price of tf32x3 (a hi and a lo copy of every operand) is
register pressure, hence the narrower fp32 tile configs below. ``ieee`` (FMA)
would make the op compute bound (~10 K flops per x element in the backward)
and spills at these tiles. ``FASTCTX_TRITON_FP32_DOT`` overrides the choice
(``tf32`` = fast). 16-bit inputs use their native MMA with fp32 accumulation;
A and the softmax-backward weights are rounded to the input dtype as dot
operands (as flash attention does). fp64 (interpreter only) uses ``ieee``.

Configs. On a GPU each kernel is autotuned over ``_CONFIGS`` (per kernel and
K_PAD; the first entry is the default, pinned by FASTCTX_TRITON_AUTOTUNE=0 for
bitwise reproducibility across processes). Under TRITON_INTERPRET=1 one small
config runs. ``compile_specs()`` lists every config for sm_80/sm_90 checks.
"""
from __future__ import annotations

import functools

import torch
import triton

from fastctx.kernels import encoding as _k
from ._triton_common import AUTOTUNE as _AUTOTUNE
from ._triton_common import INTERPRET as _INTERPRET
from ._triton_common import TORCH_TO_TRITON as _TORCH_TO_TRITON
from ._triton_common import acc_dtype as _acc_dtype
from ._triton_common import dot_precision as _dot_precision
from ._triton_common import sm_count as _sm_count


K_MAX = 64  # codewords held in one register tile

# (BLOCK_N, BLOCK_D, num_warps, num_stages) per (kernel, input bits, K_PAD);
# the first entry is the default. All are spill-free on sm_80 and
# sm_90 (tests/test_triton_encoding_compile.py). fp32 gets narrower D chunks
# and less pipelining: tf32x3 keeps a hi and a lo copy of every MMA operand,
# and on sm_80 Triton holds whole operands in registers.
_CONFIGS = {
    ("encoding_fwd", 16, 32): [(128, 64, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    ("encoding_fwd", 16, 64): [(128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2)],
    ("encoding_fwd", 32, 32): [(128, 16, 8, 2), (64, 32, 4, 1), (128, 16, 8, 1)],
    ("encoding_fwd", 32, 64): [(64, 16, 8, 2), (128, 16, 8, 1), (64, 16, 8, 1)],
    ("encoding_bwd", 16, 32): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2)],
    ("encoding_bwd", 16, 64): [(64, 32, 8, 2), (64, 64, 8, 1), (32, 64, 8, 2)],
    ("encoding_bwd", 32, 32): [(64, 16, 8, 2), (64, 16, 8, 1), (32, 32, 8, 2)],
    ("encoding_bwd", 32, 64): [(64, 16, 8, 1), (32, 16, 4, 1)],
}
# Small enough that the test shapes take several pixel tiles and D chunks.
_INTERP_CONFIG = dict(BLOCK_N=16, BLOCK_D=16)
_KERNELS = {"encoding_fwd": _k.encoding_fwd_kernel, "encoding_bwd": _k.encoding_bwd_kernel}

# Programs per launch under the interpreter: few, so that with B = 2 and the
# test shapes a program walks more than one tile (the slot accumulate path).
INTERP_PROGRAMS = 4


def _k_pad(num_codes: int) -> int:
    """Codewords per register tile: 32 or 64.

    Not 16 for K <= 16 although that is the smallest MMA size: the fp32
    backward spills at K_PAD = 16 (Triton picks worse layouts for the narrow
    tiles), and with two values every launchable kernel is in compile_specs().
    The padding costs MMA work only for K < 32, which EncNet does not use.
    """
    if num_codes > K_MAX:
        raise ValueError(
            f"triton encoding supports K <= {K_MAX} codewords (one register tile), got K = {num_codes}; "
            "use the cuda or reference backend for larger K"
        )
    return max(32, triton.next_power_of_2(num_codes))


def _configs(name: str, dtype: torch.dtype, k_pad: int):
    return _CONFIGS[(name, 32 if dtype == torch.float32 else 16, k_pad)]


@functools.lru_cache(maxsize=None)
def _autotuned(name: str, dtype: torch.dtype, k_pad: int):
    configs = [triton.Config(dict(BLOCK_N=bn, BLOCK_D=bd), num_warps=w, num_stages=s)
               for bn, bd, w, s in _configs(name, dtype, k_pad)]
    # The grid and slots do not depend on the config and every launch
    # overwrites all outputs, so benchmarking needs no state restore.
    return triton.autotune(configs=configs, key=["N", "D", "K", "CHANNELS_FIRST"])(_KERNELS[name])


def _launch(name: str, grid, dtype: torch.dtype, k_pad: int, *args, **constexprs) -> None:
    if _INTERPRET:
        _KERNELS[name][grid](*args, **_INTERP_CONFIG, K_PAD=k_pad, **constexprs)
    elif _AUTOTUNE:
        _autotuned(name, dtype, k_pad)[grid](*args, K_PAD=k_pad, **constexprs)
    else:
        bn, bd, warps, stages = _configs(name, dtype, k_pad)[0]
        _KERNELS[name][grid](*args, BLOCK_N=bn, BLOCK_D=bd, K_PAD=k_pad, **constexprs,
                             num_warps=warps, num_stages=stages)


def _max_block_n(name: str, dtype: torch.dtype, k_pad: int) -> int:
    if _INTERPRET:
        return _INTERP_CONFIG["BLOCK_N"]
    return max(cfg[0] for cfg in _configs(name, dtype, k_pad))


def _n_split(name: str, x: torch.Tensor, batch: int, n: int, d: int, k: int, k_pad: int) -> int:
    """Programs per image: fill the GPU, keep the slots <= x in size, >= 1 tile each."""
    if x.device.type == "cuda":
        sms = _sm_count(x.device)
        want, floor = triton.cdiv(4 * sms, batch), triton.cdiv(sms, batch)
    else:
        want = floor = triton.cdiv(INTERP_PROGRAMS, batch)
    mem_cap = max(floor, (n * d * x.element_size()) // (k * d * 4))
    return max(1, min(want, mem_cap, triton.cdiv(n, _max_block_n(name, x.dtype, k_pad))))


def _shapes(x: torch.Tensor, codewords: torch.Tensor, channels_first: bool):
    if x.dim() == 4 and channels_first:
        x = x.flatten(2)
    if x.dim() != 3:
        raise ValueError(f"x must be [B, N, D] or [B, D, N], got shape {tuple(x.shape)}")
    num_codes, chans = codewords.shape
    batch, n = x.shape[0], (x.shape[2] if channels_first else x.shape[1])
    x_chans = x.shape[1] if channels_first else x.shape[2]
    if x_chans != chans:
        raise ValueError(f"x has {x_chans} channels but codewords are {tuple(codewords.shape)}")
    if n * chans >= 2**31:
        raise ValueError(f"one image of x has N * D = {n * chans} >= 2^31 elements (int32 tile offsets)")
    return x, batch, n, chans, num_codes, _k_pad(num_codes)


def _centre(codewords: torch.Tensor):
    """(m acc [D], c' in the input dtype [K, D], c' acc [K, D], ||c'||^2 acc [K])."""
    acc = _acc_dtype(codewords.dtype)
    c = codewords.to(acc)
    mean = c.mean(dim=0)
    cw = (c - mean).to(codewords.dtype)
    cw_acc = cw.to(acc)
    return mean.contiguous(), cw, cw_acc, cw_acc.pow(2).sum(dim=1).contiguous()


def encoding_fwd(x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor,
                 channels_first: bool) -> torch.Tensor:
    """E [B, K, D] = sum_i A_ik (x_i - c_k), A = softmax_k(s_k ||x_i - c_k||^2)."""
    x, batch, n, d, k, k_pad = _shapes(x, codewords, channels_first)
    if batch == 0 or n == 0:
        return x.new_zeros(batch, k, d)  # empty sums (the kernel would leave its slots unwritten)
    acc = _acc_dtype(x.dtype)
    mean, cw, cw_acc, cc = _centre(codewords)
    n_split = _n_split("encoding_fwd", x, batch, n, d, k, k_pad)
    e_part = torch.empty(batch, n_split, d, k, dtype=acc, device=x.device)
    a_part = torch.empty(batch, n_split, k, dtype=acc, device=x.device)
    _launch(
        "encoding_fwd", (n_split, batch), x.dtype, k_pad,
        x, (-2.0 * cw).contiguous(), cc, mean, scale, e_part, a_part, n, d, k, n_split,
        CHANNELS_FIRST=bool(channels_first), DOT_PRECISION=_dot_precision(x.dtype),
    )
    e = e_part.sum(dim=1).transpose(1, 2) - a_part.sum(dim=1).unsqueeze(2) * cw_acc
    return e.to(x.dtype).contiguous()  # the slots are [D, K]: the difference comes out transposed


def encoding_bwd(grad: torch.Tensor, x: torch.Tensor, codewords: torch.Tensor, scale: torch.Tensor,
                 channels_first: bool):
    """-> (grad_x like x, grad_codewords [K, D], grad_scale [K]); A recomputed per tile."""
    x_in = x
    x, batch, n, d, k, k_pad = _shapes(x, codewords, channels_first)
    if batch == 0 or n == 0:
        return torch.zeros_like(x_in), torch.zeros_like(codewords), torch.zeros_like(scale)
    acc = _acc_dtype(x.dtype)
    mean, cw, cw_acc, cc = _centre(codewords)
    grad_acc = grad.to(acc)
    cde = torch.einsum("kd,bkd->bk", cw_acc, grad_acc).contiguous()  # c'_k . dE_bk
    # Rows interleaved (-2 c'_k, dE_bk): one MMA operand for both passes (see the kernel).
    g = torch.stack([(-2.0 * cw).expand(batch, k, d), grad.to(x.dtype)], dim=2).reshape(batch, 2 * k, d)
    n_split = _n_split("encoding_bwd", x, batch, n, d, k, k_pad)
    gx = torch.empty_like(x)
    gc_part = torch.empty(batch, n_split, d, k, dtype=acc, device=x.device)
    vec_part = torch.empty(batch, n_split, 3, k, dtype=acc, device=x.device)
    _launch(
        "encoding_bwd", (n_split, batch), x.dtype, k_pad,
        g, x, cc, mean, scale, cde, gx, gc_part, vec_part, n, d, k, n_split,
        CHANNELS_FIRST=bool(channels_first), DOT_PRECISION=_dot_precision(x.dtype),
    )
    sum_a, sum_w, sum_s = vec_part.sum(dim=1).unbind(dim=1)  # [B, K] each
    grad_c = (-torch.einsum("bk,bkd->kd", sum_a, grad_acc)
              - 2.0 * gc_part.sum(dim=(0, 1)).t()
              + 2.0 * sum_w.sum(dim=0).unsqueeze(1) * cw_acc)
    grad_s = sum_s.sum(dim=0)
    return (gx.view(x_in.shape), grad_c.to(codewords.dtype).contiguous(), grad_s.to(scale.dtype))


# ------------------------------------------------------------------ compile specs

# "T" data pointer, "A" fp32 pointer; other strings are scalar types.
_ARG_TYPES = {
    "encoding_fwd": dict(x_ptr="T", cw_ptr="T", cc_ptr="A", mean_ptr="A", scale_ptr="T",
                         e_part_ptr="A", a_part_ptr="A", N="i32", D="i32", K="i32", n_split="i32"),
    "encoding_bwd": dict(g_ptr="T", x_ptr="T", cc_ptr="A", mean_ptr="A", scale_ptr="T",
                         cde_ptr="A", gx_ptr="T", gc_part_ptr="A", vec_part_ptr="A",
                         N="i32", D="i32", K="i32", n_split="i32"),
}
# Multiples of 16 at realistic shapes (N = 64*64.., D = 512/2048, K = 32/64),
# which the JIT specialises on, as it does for 16-byte aligned pointers.
_DIVISIBLE = {"N", "D", "K"}
# Every K_PAD _k_pad() can return ((K, D) = (32, 512) and (64, 2048) are the realistic codebooks).
_SPEC_K_PADS = (32, 64)


def compile_specs() -> list[dict]:
    """Every (kernel, config, dtype, layout, K_PAD) the launchers can run on a GPU.

    Each spec: name, fn (the JITFunction), signature, constexprs, attrs
    (tt.divisibility hints as the JIT derives them), num_warps, num_stages; feed
    to ``triton.compile(ASTSource(fn, signature, constexprs, attrs), target=...,
    options=dict(num_warps=..., num_stages=...))``.
    """
    specs = []
    for name, arg_types in _ARG_TYPES.items():
        fn = _KERNELS[name]
        for dtype, tname in _TORCH_TO_TRITON.items():
            signature = {arg: {"T": "*" + tname, "A": "*fp32"}.get(kind, kind) for arg, kind in arg_types.items()}
            attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]]
                     for arg, kind in arg_types.items() if kind in "TA" or arg in _DIVISIBLE}
            for k_pad in _SPEC_K_PADS:
                for bn, bd, warps, stages in _configs(name, dtype, k_pad):
                    for cf in (True, False):
                        constexprs = dict(CHANNELS_FIRST=cf, BLOCK_N=bn, BLOCK_D=bd, K_PAD=k_pad,
                                          DOT_PRECISION=_dot_precision(dtype))
                        sig = dict(signature, **{c: "constexpr" for c in constexprs})
                        layout = "cf" if cf else "cl"
                        specs.append(dict(
                            name=f"{name}[{tname},{layout},K_PAD={k_pad},BLOCK_N={bn},BLOCK_D={bd},"
                                 f"w{warps},s{stages}]",
                            fn=fn, signature=sig, constexprs=constexprs, attrs=attrs,
                            num_warps=warps, num_stages=stages,
                        ))
    return specs
