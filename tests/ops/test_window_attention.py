"""window_attention against its reference (mmseg's Swin W-MSA / SW-MSA, ULLMC's intra-window attention):
the op, its gradients (table and padding value included), opcheck, bad input. The reference itself is
checked against per-window loops in tests/test_window_reference.py; the fused backends join the
parametrisation as their kernels land (the Triton launchers are tested in test_window_attention_triton.py)."""
import re

import numpy as np
import pytest
import torch

import fastctx
from fastctx import ops
from fastctx.reference.window_attention import window_attention as reference
from op_testing import check_fwd_bwd, require
from tolerances import assert_close

BACKENDS = ["reference", "cpu", "triton"]


def window_inputs(batch, height, width, channels, heads, window, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    return make(batch, height, width, 3 * channels), make(entries, heads), make(3 * channels)


# (B, H, W, C, heads, window, shift, with pad_qkv)
CASES = [
    (2, 5, 7, 8, 2, (2, 4), (0, 0), True),   # H, W not multiples of the window
    (1, 5, 7, 8, 2, (2, 4), (1, 2), True),   # shifted windows: the region mask
    (1, 6, 6, 6, 3, (3, 3), (1, 1), False),  # padded keys excluded (none here: 6 = 2 * 3)
    (2, 4, 5, 4, 1, (3, 3), (0, 0), False),  # padded keys excluded
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,height,width,channels,heads,window,shift,with_pad", CASES)
def test_op_matches_reference(backend, batch, height, width, channels, heads, window, shift, with_pad):
    require(backend, torch.float64)
    qkv, table, pad = window_inputs(batch, height, width, channels, heads, window)
    pad = pad if with_pad else None
    with fastctx.use_backend(backend):
        out = torch.ops.fastctx.window_attention(qkv, heads, list(window), table, list(shift), 0.3, pad, backend)
    assert_close(out, reference(qkv, heads, window, table, shift, 0.3, pad), torch.float64)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("batch,height,width,channels,heads,window,shift,with_pad", CASES)
def test_op_gradients_match_reference(backend, batch, height, width, channels, heads, window, shift, with_pad):
    """The fused op's output and gradients (qkv, table, padding value) through autograd vs the reference's, in
    float32 (float64: test_op_matches_reference and the gradchecks)."""
    dtype = torch.float32
    require(backend, dtype)
    qkv, table, pad = window_inputs(batch, height, width, channels, heads, window, dtype=dtype)
    tensors = [qkv, table] + ([pad] if with_pad else [])
    check_fwd_bwd(backend, lambda q, t, *p: ops.window_attention(q, heads, window, t, shift, 0.3, *p),
                  lambda q, t, *p: reference(q, heads, window, t, shift, 0.3, *p), tensors, dtype)


@pytest.mark.parametrize("shift,with_pad", [((0, 0), True), ((1, 1), True), ((0, 0), False)])
def test_gradcheck_float64(shift, with_pad):
    qkv, table, pad = window_inputs(1, 3, 3, 2, 1, (2, 2))
    tensors = [qkv.requires_grad_(), table.requires_grad_()] + ([pad.requires_grad_()] if with_pad else [])

    def fn(q, t, *p):
        return torch.ops.fastctx.window_attention(q, 1, [2, 2], t, list(shift), 0.7, p[0] if p else None,
                                                  "reference")
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_gradcheck_float64(backend):
    """The fused backward through the op (fast mode: random projections of the Jacobian; the second order
    is the reference's, checked above)."""
    require(backend, torch.float64)
    qkv, table, pad = window_inputs(1, 3, 3, 2, 1, (2, 2))
    tensors = [qkv.requires_grad_(), table.requires_grad_(), pad.requires_grad_()]

    def fn(q, t, p):
        with fastctx.use_backend(backend):
            return torch.ops.fastctx.window_attention(q, 1, [2, 2], t, [1, 1], 0.7, p, backend)
    assert torch.autograd.gradcheck(fn, tensors, fast_mode=True)


@pytest.mark.parametrize("with_table,with_pad", [(True, True), (False, False)])
def test_opcheck(with_table, with_pad):
    qkv, table, pad = window_inputs(2, 3, 5, 4, 2, (2, 2), dtype=torch.float32)
    args = (qkv.requires_grad_(), 2, [2, 2], table.requires_grad_() if with_table else None, [1, 1], 0.5,
            pad.requires_grad_() if with_pad else None, "reference")
    torch.library.opcheck(torch.ops.fastctx.window_attention.default, args)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_opcheck(backend):
    require(backend)
    qkv, table, pad = window_inputs(1, 3, 3, 4, 2, (2, 2), dtype=torch.float32)
    args = (qkv.requires_grad_(), 2, [2, 2], table.requires_grad_(), [1, 1], 0.5, pad.requires_grad_(), backend)
    grad = torch.randn(1, 3, 3, 4, generator=torch.Generator().manual_seed(1))
    with fastctx.use_backend(backend):
        torch.library.opcheck(torch.ops.fastctx.window_attention.default, args)
        torch.library.opcheck(torch.ops.fastctx.window_attention_backward.default,
                              (grad, qkv.detach(), table.detach(), pad.detach(), 2, [2, 2], [1, 1], 0.5, backend))


def test_forced_triton_names_the_limit():
    """A head wider than the Triton kernels' register tiles: the forced backend refuses with the reason."""
    require("triton")
    qkv, _, _ = window_inputs(1, 2, 2, 65, 1, (2, 2), dtype=torch.float32)
    with fastctx.use_backend("triton"):
        with pytest.raises(fastctx.BackendUnavailableError,
                           match="cannot run window_attention: head_dim d = 65 > 64"):
            ops.window_attention(qkv, 1, (2, 2))


def test_cuda_limits_are_declared():
    """The CUDA kernels keep a window's keys, values and a query block's scores in shared memory: a call
    whose block needs more than the device allows is declined before launch (automatic choice moves on)."""
    from fastctx.ops.window_attention import _cuda_smem_bytes

    limits = ops.OPS["window_attention"].support["cuda"].limits
    swin = dict(B=2, H=56, W=56, C=96, heads=3, d=32, Wh=7, Ww=7, N=49)
    # the size window_attention_plan gives (the emulation driver prints smem=fwd/bwd bytes for this window)
    assert _cuda_smem_bytes(7, 7, 32) == 49696
    assert limits({**swin, "sm": 75}) is None
    assert "needs 76448 bytes of shared memory per block in the CUDA backward; sm_75 allows 65536" in \
        limits({**swin, "d": 64, "C": 192, "sm": 75})
    large = dict(swin, C=192, d=64, Wh=12, Ww=12, N=144)  # 131088 bytes
    assert limits({**large, "sm": 80}) is None and limits({**large, "sm": 90}) is None
    assert "sm_86 allows" in limits({**large, "sm": 86})
    assert "N, d <= 1024" in limits(dict(swin, C=1025 * 3, heads=3, d=1025, sm=90))
    assert "grid axis 0" in limits(dict(swin, B=2**24, sm=90))


def test_public_function_defaults_and_empty_batch():
    qkv, table, pad = window_inputs(1, 4, 4, 6, 3, (2, 2))
    out = ops.window_attention(qkv, 3, 2, table, 1, pad_qkv=pad)  # ints for window and shift, default scale
    assert_close(out, reference(qkv, 3, (2, 2), table, (1, 1), 2 ** -0.5, pad), torch.float64)
    empty = qkv[:0].clone().requires_grad_()
    out = ops.window_attention(empty, 3, (2, 2), table)
    assert out.shape == (0, 4, 4, 6)
    out.sum().backward()
    assert empty.grad.shape == empty.shape


def test_bad_input():
    qkv, table, pad = window_inputs(1, 4, 4, 6, 3, (2, 2))
    with pytest.raises(ValueError, match="must be divisible by heads = 4"):
        ops.window_attention(qkv, 4, (2, 2))
    with pytest.raises(ValueError, match="shift .* must be smaller than the window"):
        ops.window_attention(qkv, 3, (2, 2), shift=(2, 0))
    with pytest.raises(ValueError, match=r"bias_table must be \[\(2Wh-1\)\(2Ww-1\), heads\] = \[9, 3\]"):
        ops.window_attention(qkv, 3, (2, 2), table[:, :2])
    with pytest.raises(ValueError, match=r"pad_qkv must be \[3C\] = \[18\]"):
        ops.window_attention(qkv, 3, (2, 2), pad_qkv=pad[:6])
    with pytest.raises(ValueError, match=r"qkv must be \[B, H, W, 3C\]"):
        ops.window_attention(qkv[0], 3, (2, 2))
    # window and shift: an int or a pair of ints; a bool, a float or a triple is refused by name
    for window in (True, 2.0, (2, 2, 1), (2, True), "22"):
        with pytest.raises(TypeError, match=f"window must be an int or a pair of ints, got {re.escape(repr(window))}"):
            ops.window_attention(qkv, 3, window)
    with pytest.raises(TypeError, match="shift must be an int or a pair of ints, got 1.0"):
        ops.window_attention(qkv, 3, (2, 2), shift=1.0)
    with pytest.raises(ValueError, match="heads must be a positive int, got True"):
        ops.window_attention(qkv, True, (2, 2))
    # NumPy integers are integers
    out = ops.window_attention(qkv, np.int64(3), (np.int32(2), 2), shift=np.int64(1))
    assert_close(out, reference(qkv, 3, (2, 2), None, (1, 1), 2 ** -0.5, None), torch.float64)


# ----------------------------------------------------------------------------- cpu kernel (csrc/cpu/window_attention.cpp)

# (B, H, W, C, heads, window, shift, with pad_qkv): a covering set of windows 4x8, 7x7, 8x16 and 12x12,
# heads 1, 3, 8 and head_dim 16, 32, 64, shift 0 and window/2, maps not multiples of the window; then
# windows of more than 256 tokens (several key and query blocks), one of them past the bias strips' size
# (kMaxStripElements: the bias looked up per logit), and IIWA's one window covering the grid (no table).
CPU_CASES = [
    (1, 9, 13, 128, 8, (4, 8), (0, 0), True),      # d 16, ULLMC's window
    (2, 10, 10, 48, 3, (7, 7), (3, 3), True),      # d 16, Swin's shifted window
    (1, 11, 19, 32, 1, (8, 16), (4, 8), False),    # d 32, padded keys excluded
    (1, 13, 14, 192, 3, (12, 12), (6, 6), True),   # d 64
    (1, 5, 9, 512, 8, (4, 8), (2, 4), False),      # d 64, heads 8
    (2, 8, 16, 96, 3, (8, 16), (0, 0), True),      # whole windows
    (1, 20, 19, 16, 2, (17, 19), (8, 9), True),    # 323 tokens: 2 key blocks, 3 query blocks
    (1, 34, 33, 16, 4, (33, 33), (5, 0), False),   # 1089 tokens, 4 x 33 x 65 x 33 strip values > 2^18:
                                                   # bias looked up per logit
    (2, 32, 32, 32, 2, (4, 4), (2, 2), True),      # 128 windows (the cases above: at most 8)
    (1, 16, 17, 8, 2, (2, 2), (1, 1), False),      # 72 shifted 2x2 windows
    # key tails past whole 16-key vectors taken as dot products (kMaxDotKeys; 7x7 above: 48 + 1)
    (1, 7, 13, 36, 3, (3, 6), (1, 3), True),       # 18 keys = 16 + 2, d 12: part of a vector
    (2, 5, 6, 20, 2, (1, 2), (0, 1), False),       # 2 keys, all dot products
]


@pytest.mark.parametrize("batch,height,width,channels,heads,window,shift,with_pad", CPU_CASES)
def test_cpu_matches_reference(batch, height, width, channels, heads, window, shift, with_pad):
    """Output and every gradient (qkv, table, pad_qkv) in float32 and float64."""
    for dtype in (torch.float32, torch.float64):
        require("cpu", dtype)
        qkv, table, pad = window_inputs(batch, height, width, channels, heads, window, dtype=dtype)
        tensors = [qkv, table] + ([pad] if with_pad else [])
        check_fwd_bwd("cpu", lambda q, t, *p: ops.window_attention(q, heads, window, t, shift, None, *p),
                      lambda q, t, *p: reference(q, heads, window, t, shift, None, *p), tensors, dtype,
                      msg=f"{dtype}")


# Outputs (out, grad_qkv) of at least 4 MiB (kStreamBytes in csrc/cpu/output.h) are written
# with non-temporal stores where a head's row slice is 16-byte aligned, and plainly where not (d = 33).
@pytest.mark.parametrize("channels,heads,dtype", [(192, 6, torch.float32), (198, 6, torch.float32),
                                                  (96, 3, torch.float64)])
def test_cpu_large_outputs_streamed_past_the_caches(channels, heads, dtype):
    require("cpu", dtype)
    qkv, table, pad = window_inputs(1, 61, 123, channels, heads, (4, 8), dtype=dtype)
    assert qkv.nbytes // 3 >= 4 << 20  # out, and grad_qkv three times that
    check_fwd_bwd("cpu", lambda q, t, p: ops.window_attention(q, heads, (4, 8), t, (2, 4), None, p),
                  lambda q, t, p: reference(q, heads, (4, 8), t, (2, 4), None, p), [qkv, table, pad], dtype)


@pytest.mark.parametrize("size,channels,heads", [(16, 64, 8), (24, 32, 2)])
def test_cpu_one_window_covering_the_grid(size, channels, heads):
    """IIWA's inter-window attention: no table, no padding, N = 256 (one block) and 576 (blocked)."""
    require("cpu")
    qkv, _, _ = window_inputs(2, size, size, channels, heads, (size, size), dtype=torch.float32)
    check_fwd_bwd("cpu", lambda q: ops.window_attention(q, heads, size), lambda q: reference(q, heads, size),
                  [qkv], torch.float32)


@pytest.mark.parametrize("window", [(7, 7), (3, 6)])
def test_cpu_dot_product_keys_hold_the_row_maximum(window):
    """The keys past a block's whole vectors (49 = 48 + 1, 18 = 16 + 2: dot products, softmax down the
    columns) carry logits of about 120, so exp overflows float32 unless the row maximum includes them."""
    require("cpu")
    heads, channels = 1, 16
    qkv, table, pad = window_inputs(2, *window, channels, heads, window, dtype=torch.float32)
    qkv[..., :channels] = 1.0  # every q
    qkv[:, -1, -1, channels:2 * channels] = 30.0  # k of each window's last token: logit 16 * 30 / 4
    check_fwd_bwd("cpu", lambda q, t, p: ops.window_attention(q, heads, window, t, 0, None, p),
                  lambda q, t, p: reference(q, heads, window, t, 0, None, p), [qkv, table, pad], torch.float32)


def test_cpu_empty_batch():
    require("cpu")
    qkv, table, pad = window_inputs(0, 5, 6, 8, 2, (2, 4), dtype=torch.float32)
    tensors = [t.requires_grad_() for t in (qkv, table, pad)]
    with fastctx.use_backend("cpu"):
        out = ops.window_attention(tensors[0], 2, (2, 4), tensors[1], (1, 2), pad_qkv=tensors[2])
        assert out.shape == (0, 5, 6, 8)
        out.sum().backward()
    assert tensors[0].grad.shape == qkv.shape
    assert not tensors[1].grad.any() and not tensors[2].grad.any()


def _cpu_fwd_bwd(threads, qkv, table, pad, window, shift, heads):
    leaves = [t.detach().clone().requires_grad_() for t in (qkv, table, pad)]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastctx.use_backend("cpu"):
            out = ops.window_attention(leaves[0], heads, window, leaves[1], shift, pad_qkv=leaves[2])
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
            (out * weights).sum().backward()
    finally:
        torch.set_num_threads(previous)
    return [out.detach()] + [t.grad for t in leaves]


def test_cpu_bitwise_deterministic_across_thread_counts():
    """The table and pad_qkv gradients are sums over 256 (window, head) units cut into 64 chunks."""
    require("cpu")
    qkv, table, pad = window_inputs(2, 31, 61, 64, 2, (4, 8), dtype=torch.float32)
    first = _cpu_fwd_bwd(2, qkv, table, pad, (4, 8), (2, 4), 2)
    for threads in (1, 3, 2):
        for i, (a, b) in enumerate(zip(first, _cpu_fwd_bwd(threads, qkv, table, pad, (4, 8), (2, 4), 2))):
            assert torch.equal(a, b), f"result {i} differs with {threads} thread(s)"


@pytest.mark.parametrize("part", [0, 1, 2])
@pytest.mark.parametrize("shift,with_pad", [((0, 0), True), ((1, 2), False)])
def test_cpu_nan_pattern_matches_reference(part, shift, with_pad):
    """A NaN in one token's q, k or v: NaN wherever the reference has NaN (output and every gradient),
    and the same finite values elsewhere."""
    require("cpu")
    qkv, table, pad = window_inputs(1, 5, 7, 8, 2, (2, 4), dtype=torch.float32)
    qkv[0, 2, 5, part * 8 + 5] = float("nan")  # head 1
    tensors = [qkv, table] + ([pad] if with_pad else [])
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in tensors]
        with fastctx.use_backend(backend):
            out = ops.window_attention(leaves[0], 2, (2, 4), leaves[1], shift, None, *leaves[2:])
            out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    for i, (actual, expected) in enumerate(zip(*results)):
        assert expected.isnan().any(), f"result {i}: the case should produce NaN"
        assert torch.equal(actual.isnan(), expected.isnan()), f"result {i}: NaN pattern differs"
        finite = ~expected.isnan()
        assert_close(actual[finite], expected[finite], torch.float32, f"result {i}")


def test_cpu_masked_pair_keeps_its_subnormal_weight():
    """A Swin region-masked pair has logit - 100: in fp32 its softmax weight is a subnormal (~1e-44), not 0,
    so an infinite v in another region of the window gives +-inf to the masked queries, as in eager
    (0 * inf would be NaN). Output and every gradient: the same NaN and inf pattern and finite values."""
    require("cpu")
    qkv, table, pad = window_inputs(1, 6, 8, 8, 2, (2, 4), dtype=torch.float32)
    qkv, table = qkv * 0.1, table * 0.1  # logits near 0: the masked ones near -100
    # shift (1, 2): shifted token (4, 4) of the last window is token (5, 6); (5, 6) there is token (0, 0),
    # in another region of the same window.
    qkv[0, 5, 6, 2 * 8 + 1] = float("inf")  # v, head 0
    results = []
    for backend in ("cpu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (qkv, table)]
        with fastctx.use_backend(backend):
            out = ops.window_attention(leaves[0], 2, (2, 4), leaves[1], (1, 2), None)
            out.backward(torch.ones_like(out))
        results.append([out.detach()] + [t.grad for t in leaves])
    assert results[1][0][0, 0, 0, 1].isinf(), "the masked query should see the infinite v"
    for i, (actual, expected) in enumerate(zip(*results)):
        assert torch.equal(actual.isnan(), expected.isnan()), f"result {i}: NaN pattern differs"
        assert torch.equal(actual.isinf(), expected.isinf()), f"result {i}: inf pattern differs"
        finite = expected.isfinite()
        assert torch.equal(actual[~finite].nan_to_num(), expected[~finite].nan_to_num()), f"result {i}: inf signs"
        assert_close(actual[finite], expected[finite], torch.float32, f"result {i}")


@pytest.mark.parametrize("value,flushed", [(2.0 ** 30, True), (2.0 ** 41, False)])
def test_cpu_flushes_masked_weights_only_where_it_cannot_matter(value, flushed):
    """Masked pairs' fp32 weights (~1e-44) are flushed to 0 (FTZ/DAZ: subnormal arithmetic takes microcode
    assists) only in windows whose inputs are within 2^40. With every v 0 but one in another region of the
    window, the masked query's output is that weight times v: eager's ~1e-35 for v = 2^30, which the flushed
    kernel makes exactly 0; for v = 2^41 the window keeps subnormals and the kernel matches eager."""
    require("cpu")
    qkv, table, _ = window_inputs(1, 6, 8, 8, 2, (2, 4), dtype=torch.float32)
    qkv, table = qkv * 0.1, table * 0.1
    qkv[..., 16:] = 0  # every v
    qkv[0, 5, 6, 2 * 8 + 1] = value  # v of head 0 at token (5, 6): another region than (0, 0) once shifted
    outs = []
    for backend in ("cpu", "reference"):
        with fastctx.use_backend(backend):
            outs.append(ops.window_attention(qkv, 2, (2, 4), table, (1, 2), None))
    actual, expected = (out[0, 0, 0, 1].item() for out in outs)
    assert 0 < expected < 1e-30, expected
    if flushed:
        assert actual == 0.0
    else:
        assert actual == pytest.approx(expected, rel=1e-5)
    assert_close(outs[0], outs[1], torch.float32, "output")


def test_cpu_kernels_restore_the_threads_subnormal_mode():
    """The flush is set per thread inside the kernels and undone on return, both ways."""
    require("cpu")
    qkv, table, pad = window_inputs(1, 6, 8, 8, 2, (2, 4), dtype=torch.float32)
    tiny = torch.tensor([1e-39])  # subnormal in fp32
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernels run on the calling thread
    try:
        for flush in (False, True):
            torch.set_flush_denormal(flush)
            leaf = qkv.clone().requires_grad_()
            with fastctx.use_backend("cpu"):
                out = ops.window_attention(leaf, 2, (2, 4), table, (1, 2), None, pad)
                out.backward(torch.ones_like(out))
            assert ((tiny * 1.0).item() == 0.0) == flush, f"set_flush_denormal({flush}) not kept"
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(previous)


def test_cpu_gradcheck_float64():
    """The cpu backward through the op, in full (the second order is the reference's, checked above)."""
    require("cpu", torch.float64)
    qkv, table, pad = window_inputs(1, 3, 5, 2, 1, (2, 4))
    for shift, with_pad in (((1, 2), True), ((0, 0), False)):
        tensors = [qkv.clone().requires_grad_(), table.clone().requires_grad_()]
        tensors += [pad.clone().requires_grad_()] if with_pad else []

        def fn(q, t, *p):
            with fastctx.use_backend("cpu"):
                return torch.ops.fastctx.window_attention(q, 1, [2, 4], t, list(shift), 0.7, p[0] if p else None,
                                                          "cpu")
        assert torch.autograd.gradcheck(fn, tensors)


@pytest.mark.parametrize("with_table,with_pad", [(True, True), (False, False)])
def test_cpu_backward_opcheck(with_table, with_pad):
    """The backward op with the cpu kernels (the op itself: test_fused_opcheck)."""
    require("cpu")
    qkv, table, pad = window_inputs(2, 3, 5, 4, 2, (2, 2), dtype=torch.float32)
    grad = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(1))
    with fastctx.use_backend("cpu"):
        torch.library.opcheck(torch.ops.fastctx.window_attention_backward.default,
                              (grad, qkv, table if with_table else None, pad if with_pad else None, 2, [2, 2],
                               [1, 1], 0.5, "cpu"))
