"""window_attention against its reference (mmseg's Swin W-MSA / SW-MSA, ULLMC's intra-window attention):
the op, its gradients (table and padding value included), opcheck, bad input. The reference itself is
checked against per-window loops in tests/test_window_reference.py; the fused backends join the
parametrisation as their kernels land."""
import pytest
import torch

import fastctx
from fastctx import ops
from fastctx.reference.window_attention import window_attention as reference
from tolerances import assert_close


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


@pytest.mark.parametrize("batch,height,width,channels,heads,window,shift,with_pad", CASES)
def test_op_matches_reference(batch, height, width, channels, heads, window, shift, with_pad):
    qkv, table, pad = window_inputs(batch, height, width, channels, heads, window)
    pad = pad if with_pad else None
    with fastctx.use_backend("reference"):
        out = torch.ops.fastctx.window_attention(qkv, heads, list(window), table, list(shift), 0.3, pad, "reference")
    assert_close(out, reference(qkv, heads, window, table, shift, 0.3, pad), torch.float64)


@pytest.mark.parametrize("shift,with_pad", [((0, 0), True), ((1, 1), True), ((0, 0), False)])
def test_gradcheck_float64(shift, with_pad):
    qkv, table, pad = window_inputs(1, 3, 3, 2, 1, (2, 2))
    tensors = [qkv.requires_grad_(), table.requires_grad_()] + ([pad.requires_grad_()] if with_pad else [])

    def fn(q, t, *p):
        return torch.ops.fastctx.window_attention(q, 1, [2, 2], t, list(shift), 0.7, p[0] if p else None,
                                                  "reference")
    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


@pytest.mark.parametrize("with_table,with_pad", [(True, True), (False, False)])
def test_opcheck(with_table, with_pad):
    qkv, table, pad = window_inputs(2, 3, 5, 4, 2, (2, 2), dtype=torch.float32)
    args = (qkv.requires_grad_(), 2, [2, 2], table.requires_grad_() if with_table else None, [1, 1], 0.5,
            pad.requires_grad_() if with_pad else None, "reference")
    torch.library.opcheck(torch.ops.fastctx.window_attention.default, args)


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
