"""fastctx.reference.window_attention against straightforward per-window loops written here.

The loops read each window's tokens by coordinates (no pad, roll, partition or
mask tensors): token (r, c) of the shifted frame is pixel ((r + sh) mod Hp,
(c + sw) mod Wp) of the padded map, a padded pixel's q/k/v is pad_qkv (or it
is no key at all), pairs from different shift regions get -100, the bias is
table[(dy + Wh - 1) * (2Ww - 1) + dx + Ww - 1].
"""
import math

import pytest
import torch

from fastctx.reference.window_attention import (
    relative_position_index, sine_position_encoding, upsample_add, window_attention, window_pool,
)
from tolerances import assert_close

F64 = torch.float64


def _region(r: int, length: int, window: int, shift: int) -> int:
    """Swin's shift region of coordinate r (shifted frame) along an axis of padded length `length`."""
    if shift == 0:
        return 0
    return 0 if r < length - window else (1 if r < length - shift else 2)


def loop_window_attention(qkv, heads, window, bias_table=None, shift=(0, 0), scale=None, pad_qkv=None):
    batch, height, width, channels3 = qkv.shape
    channels = channels3 // 3
    d = channels // heads
    wh, ww = window
    sh, sw = shift
    scale = d ** -0.5 if scale is None else scale
    hp, wp = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
    out = qkv.new_zeros(batch, height, width, channels)
    local = [(a, c) for a in range(wh) for c in range(ww)]
    rel = torch.tensor([[(ai - aj + wh - 1) * (2 * ww - 1) + (ci - cj + ww - 1) for aj, cj in local]
                        for ai, ci in local])
    fill = pad_qkv if pad_qkv is not None else qkv.new_zeros(channels3)
    for wi in range(hp // wh):
        for wj in range(wp // ww):
            shifted = [(wi * wh + a, wj * ww + c) for a, c in local]
            ys = torch.tensor([(r + sh) % hp for r, _ in shifted])
            xs = torch.tensor([(c + sw) % wp for _, c in shifted])
            real = (ys < height) & (xs < width)
            regions = torch.tensor([_region(r, hp, wh, sh) * 3 + _region(c, wp, ww, sw) for r, c in shifted])
            extra = torch.where(regions[:, None] == regions[None, :], 0.0, -100.0).to(qkv.dtype)
            if pad_qkv is None:
                extra = extra.masked_fill(~real[None, :], float("-inf"))
            for b in range(batch):
                tok = torch.where(real[:, None], qkv[b, ys.clamp(max=height - 1), xs.clamp(max=width - 1)], fill)
                q, k, v = (tok[:, i * channels:(i + 1) * channels].view(-1, heads, d).transpose(0, 1)
                           for i in range(3))
                logits = (q @ k.transpose(1, 2)) * scale + extra
                if bias_table is not None:
                    logits = logits + bias_table[rel].permute(2, 0, 1)
                o = (torch.softmax(logits, dim=-1) @ v).transpose(0, 1).reshape(-1, channels)
                out[b, ys[real], xs[real]] = o[real]
    return out


def _inputs(batch, height, width, heads, head_dim, window, with_table=True, with_pad=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    channels = heads * head_dim
    qkv = torch.randn(batch, height, width, 3 * channels, generator=g, dtype=F64)
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    table = torch.randn(entries, heads, generator=g, dtype=F64) if with_table else None
    pad = torch.randn(3 * channels, generator=g, dtype=F64) if with_pad else None
    return qkv, table, pad


# (window, shift, H, W, heads, head_dim, batch, pad_qkv given): every window, shift 0 and window/2, heads 1/3/8,
# head_dim 16/32/64, H and W multiples or not, maps smaller than a window, batch 1, 2 and empty.
CASES = [
    ((4, 8), (0, 0), 13, 21, 8, 16, 2, True),
    ((4, 8), (2, 4), 9, 19, 3, 32, 1, True),
    ((4, 8), (2, 4), 8, 16, 1, 16, 1, False),
    ((7, 7), (3, 3), 10, 13, 3, 32, 2, True),
    ((7, 7), (0, 0), 7, 7, 1, 16, 1, False),
    ((7, 7), (3, 3), 17, 11, 1, 64, 1, False),
    ((7, 7), (3, 3), 4, 5, 3, 16, 1, True),
    ((8, 16), (4, 8), 11, 35, 8, 16, 1, True),
    ((8, 16), (0, 0), 9, 17, 3, 16, 1, False),
    ((12, 12), (6, 6), 13, 25, 8, 64, 1, True),
    ((12, 12), (0, 0), 5, 7, 1, 32, 2, False),
    ((12, 12), (6, 6), 14, 13, 3, 16, 1, False),
    ((7, 7), (3, 3), 9, 10, 3, 16, 0, True),
    ((4, 8), (0, 0), 5, 9, 8, 16, 0, False),
]


@pytest.mark.parametrize("window,shift,height,width,heads,head_dim,batch,with_pad", CASES)
def test_matches_loops(window, shift, height, width, heads, head_dim, batch, with_pad):
    qkv, table, pad = _inputs(batch, height, width, heads, head_dim, window, with_pad=with_pad)
    out = window_attention(qkv, heads, window, table, shift, pad_qkv=pad)
    assert out.shape == (batch, height, width, heads * head_dim)
    assert out.is_contiguous()
    assert_close(out, loop_window_attention(qkv, heads, window, table, shift, pad_qkv=pad), F64, "output")


@pytest.mark.parametrize("with_pad", [True, False])
def test_no_table_and_custom_scale(with_pad):
    qkv, _, pad = _inputs(2, 6, 11, 2, 8, (4, 8), with_table=False, with_pad=with_pad)
    out = window_attention(qkv, 2, (4, 8), None, (2, 4), scale=0.3, pad_qkv=pad)
    assert_close(out, loop_window_attention(qkv, 2, (4, 8), None, (2, 4), scale=0.3, pad_qkv=pad), F64)


def test_shift_mask_is_minus_100_not_minus_inf():
    """mmseg's region mask is finite: a bias of +150 towards the key two columns right outweighs it.

    In the last window column of the shifted frame the query's +2 key often lies
    in the next region: with -100 that key still takes nearly all the weight,
    with -inf it would take none.
    """
    qkv, _, pad = _inputs(1, 12, 12, 1, 4, (4, 4))  # no padding: the affected queries are real tokens
    table = torch.zeros(7 * 7, 1, dtype=F64)
    table[(4 - 1) * 7 + (4 - 1 - 2), 0] = 150.0  # dy = 0, dx = +2
    out = window_attention(qkv, 1, (4, 4), table, (2, 2), pad_qkv=pad)
    assert_close(out, loop_window_attention(qkv, 1, (4, 4), table, (2, 2), pad_qkv=pad), F64)


def test_int_window_and_shift():
    qkv, table, pad = _inputs(1, 9, 10, 3, 16, (7, 7))
    assert torch.equal(window_attention(qkv, 3, 7, table, 3, pad_qkv=pad),
                       window_attention(qkv, 3, (7, 7), table, (3, 3), pad_qkv=pad))


def test_padded_tokens_take_part():
    """pad_qkv given: padded tokens are keys (the output depends on pad_qkv); None: they are not."""
    qkv, table, pad = _inputs(1, 5, 6, 2, 8, (4, 4))
    a = window_attention(qkv, 2, (4, 4), table, pad_qkv=pad)
    b = window_attention(qkv, 2, (4, 4), table, pad_qkv=pad + 1)
    assert (a - b).abs().max() > 1e-3
    excluded = window_attention(qkv, 2, (4, 4), table)
    # Excluding the padded keys equals attending over the real tokens only: crop the map to whole windows' worth.
    assert_close(excluded[:, :4, :4], window_attention(qkv[:, :4, :4].contiguous(), 2, (4, 4), table), F64)


@pytest.mark.parametrize("shift,with_pad,with_table", [((1, 1), True, True), ((1, 2), False, True),
                                                      ((0, 0), True, False)])
def test_gradcheck(shift, with_pad, with_table):
    qkv, table, pad = _inputs(1, 3, 5, 2, 2, (2, 3), with_table=with_table, with_pad=with_pad)
    inputs = [t.requires_grad_() for t in (qkv, table, pad) if t is not None]

    def fn(*args):
        it = iter(args)
        q = next(it)
        t = next(it) if with_table else None
        p = next(it) if with_pad else None
        return window_attention(q, 2, (2, 3), t, shift, pad_qkv=p)

    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("window,shift,height,width,heads,head_dim,with_pad", [
    ((4, 8), (2, 4), 13, 21, 8, 16, True),
    ((7, 7), (3, 3), 10, 13, 3, 32, False),
    ((12, 12), (6, 6), 13, 14, 1, 64, True),
])
def test_gradients_match_loops(window, shift, height, width, heads, head_dim, with_pad):
    qkv, table, pad = _inputs(1, height, width, heads, head_dim, window, with_pad=with_pad)
    grad_out = torch.randn(1, height, width, heads * head_dim, generator=torch.Generator().manual_seed(5), dtype=F64)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (qkv, table, pad) if t is not None]
        out = fn(leaves[0], heads, window, leaves[1], shift, pad_qkv=leaves[2] if with_pad else None)
        return torch.autograd.grad(out, leaves, grad_out)

    for name, got, want in zip(("qkv", "bias_table", "pad_qkv"), grads(window_attention),
                               grads(loop_window_attention)):
        assert_close(got, want, F64, f"grad of {name}")


def test_relative_position_index_matches_meshgrid_formula():
    for wh, ww in ((4, 8), (7, 7), (8, 16), (1, 3)):
        ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
        ys, xs = ys.flatten(), xs.flatten()
        expected = (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)
        assert torch.equal(relative_position_index((wh, ww)), expected)


@pytest.mark.parametrize("call,match", [
    (lambda q, t, p: window_attention(q[..., :-1], 2, (2, 3), t, pad_qkv=p), "multiple of 3"),
    (lambda q, t, p: window_attention(q, 3, (2, 3)), "divisible by heads"),
    (lambda q, t, p: window_attention(q, 2, (2, 3), t, (2, 0)), "shift"),
    (lambda q, t, p: window_attention(q, 2, (2, 3), t[:-1]), "bias_table"),
    (lambda q, t, p: window_attention(q, 2, (2, 3), t, pad_qkv=p[:-1]), "pad_qkv"),
    (lambda q, t, p: window_attention(q[0], 2, (2, 3)), "4-D"),
    (lambda q, t, p: window_attention(q, 2, (0, 3)), "window"),
    (lambda q, t, p: window_attention(q, 0, (2, 3)), "heads"),
])
def test_bad_input_raises_clear_error(call, match):
    qkv, table, pad = _inputs(1, 3, 5, 2, 2, (2, 3))
    with pytest.raises(ValueError, match=match):
        call(qkv, table, pad)


def test_integer_input_raises():
    with pytest.raises(TypeError, match="floating-point"):
        window_attention(torch.zeros(1, 2, 2, 12, dtype=torch.int64), 2, (2, 2))


# ----------------------------------------------------------------------------- inter-window oracles

def test_window_pool_is_the_window_mean():
    x = torch.randn(2, 8, 24, 6, dtype=F64)
    pooled = window_pool(x, (4, 8))
    assert pooled.shape == (2, 2, 3, 6)
    for i in range(2):
        for j in range(3):
            assert_close(pooled[:, i, j], x[:, 4 * i:4 * i + 4, 8 * j:8 * j + 8].mean(dim=(1, 2)), F64)
    with pytest.raises(ValueError, match="multiples of the window"):
        window_pool(x[:, :7], (4, 8))


@pytest.mark.parametrize("height,width,channels,normalize", [(3, 5, 16, True), (1, 4, 8, True), (4, 2, 12, False)])
def test_sine_position_encoding_formula(height, width, channels, normalize):
    pos = sine_position_encoding(height, width, channels, normalize=normalize)
    assert pos.dtype == torch.float32 and pos.shape == (height, width, channels)
    feats = channels // 2
    expected = torch.empty(height, width, channels, dtype=F64)
    for i in range(height):
        for j in range(width):
            y, x = i + 1.0, j + 1.0
            if normalize:
                y, x = y / (height + 1e-5) * 2 * math.pi, x / (width + 1e-5) * 2 * math.pi
            for f in range(feats):
                trig = math.sin if f % 2 == 0 else math.cos
                denom = 10000.0 ** (2 * (f // 2) / feats)
                expected[i, j, f] = trig(y / denom)
                expected[i, j, feats + f] = trig(x / denom)
    assert_close(pos, expected.float(), torch.float32)
    with pytest.raises(ValueError, match="divisible by 4"):
        sine_position_encoding(height, width, 6)


def _bilinear_matrix(out_size: int, in_size: int) -> torch.Tensor:
    """[out, in] weights of 1-D linear interpolation with align_corners=True."""
    m = torch.zeros(out_size, in_size, dtype=F64)
    for o in range(out_size):
        src = o * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        frac = src - i0
        m[o, i0] += 1 - frac
        m[o, i1] += frac
    return m


@pytest.mark.parametrize("grid,size", [((3, 4), (12, 32)), ((1, 2), (7, 16)), ((2, 2), (2, 2))])
def test_upsample_add_is_bilinear_align_corners(grid, size):
    tokens = torch.randn(2, *grid, 5, dtype=F64)
    residual = torch.randn(2, *size, 5, dtype=F64)
    rows, cols = _bilinear_matrix(size[0], grid[0]), _bilinear_matrix(size[1], grid[1])
    expected = residual + torch.einsum("yi,xj,bijc->byxc", rows, cols, tokens)
    assert_close(upsample_add(tokens, residual), expected, F64)
