"""Triton window_attention launchers (fastctx.kernels.window_attention) against float64 references.

Under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) the kernels run query blocks of up to 64
tokens and key blocks of 16, and `bwd_key` spreads the windows over INTERP_PROGRAMS = 2 programs per key
block, so these small shapes cover: windows of one query block and several key blocks (4x8, 7x7: N = 49
padded to a 64-token tile) and of several of both (8x16), H and W not multiples of the window (padded
tokens as keys with pad_qkv, excluded without), shifts 0 and window / 2 (region mask, rolled padding),
heads 1 and 3, head_dim 16 and 32 (and channel tiles wider than d), with and without the table and
pad_qkv, batch 1 and 2, programs walking several windows (slots accumulated across windows) and the
slots summed by the launcher. Lower tile caps (monkeypatched) run 4x8 and 7x7 windows through several
query blocks, i.e. the table gradient read-added-stored per window. References: fastctx.reference's
window_attention and its autograd, in float64 on the very inputs the kernels see.
"""
import pytest
import torch

from fastctx.reference.window_attention import relative_position_index
from fastctx.reference.window_attention import window_attention as reference
from op_testing import check_launcher, launcher_device, triton_launchers
from test_nonfinite import assert_same_nonfinite

NAMES = ("out", "grad_qkv", "grad_table", "grad_pad")


def _kernels():
    return triton_launchers("window_attention")


def _inputs(batch, height, width, heads, head_dim, window, with_table, with_pad, dtype, seed=0):
    """(qkv, table or None, pad or None, grad) with entries ~ N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    channels = heads * head_dim
    qkv = make(batch, height, width, 3 * channels)
    table = make((2 * window[0] - 1) * (2 * window[1] - 1), heads) if with_table else None
    pad = make(3 * channels) if with_pad else None
    return qkv, table, pad, make(batch, height, width, channels)


def _reference(qkv, table, pad, grad, heads, window, shift, scale):
    """(out, grad_qkv, grad_table, grad_pad) in float64; None for absent inputs."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (qkv, table, pad)]
    out = reference(leaves[0], heads, window, leaves[1], shift, scale, leaves[2])
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad.double()))
    return (out.detach(), *(None if t is None else next(grads) for t in leaves))


def _run(qkv, table, pad, grad, heads, window, shift, scale):
    """The launchers' (out, grad_qkv, grad_table, grad_pad) on CPU; None for absent inputs (whose gradients
    must be empty)."""
    dev = lambda t: None if t is None else t.to(launcher_device())  # noqa: E731
    qkv, table, pad, grad = (dev(t) for t in (qkv, table, pad, grad))
    kernels = _kernels()
    out = kernels.window_attention_fwd(qkv, table, pad, heads, window, shift, scale)
    grads = kernels.window_attention_bwd(grad, qkv, table, pad, heads, window, shift, scale)
    assert out.shape == grad.shape and out.dtype == qkv.dtype and out.is_contiguous()
    assert len({id(g) for g in grads}) == 3, "the gradients must be distinct tensors (custom op outputs)"
    results = [out.cpu()]
    for name, g, t in zip(NAMES[1:], grads, (qkv, table, pad)):
        if t is None:
            assert g.numel() == 0 and g.dtype == qkv.dtype, f"{name}: {tuple(g.shape)} for an absent input"
            results.append(None)
        else:
            assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), f"{name}: {tuple(g.shape)}"
            results.append(g.cpu())
    return tuple(results)


def _compare(got, want, what):
    for name, g, w in zip(NAMES, got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            check_launcher(g, w, f"{what} {name}")


def _id(shape):
    batch, height, width, heads, head_dim, window, shift, with_table, with_pad = shape
    return (f"B{batch}_{height}x{width}_h{heads}_d{head_dim}_w{window[0]}x{window[1]}_s{shift[0]}x{shift[1]}"
            + ("_table" if with_table else "") + ("_pad" if with_pad else ""))


def _check(batch, height, width, heads, head_dim, window, shift, with_table, with_pad, dtype, seed=0, scale=None):
    *tensors, grad = _inputs(batch, height, width, heads, head_dim, window, with_table, with_pad, dtype, seed)
    scale = head_dim ** -0.5 if scale is None else scale
    args = (heads, window, shift, scale)
    _compare(_run(*tensors, grad, *args), _reference(*tensors, grad, *args),
             f"{dtype} {window} shift {shift} table {with_table} pad {with_pad}")


# (B, H, W, heads, head_dim, window, shift, table, pad)
SHAPES = [
    (2, 3, 7, 3, 16, (4, 8), (0, 0), True, True),     # ULLMC's window, padded rows and columns; batch 2, 3 heads
    (1, 6, 9, 1, 32, (4, 8), (2, 4), True, False),    # shift = window / 2; padded keys excluded
    (1, 9, 10, 1, 16, (7, 7), (3, 3), True, True),    # Swin's 7x7 (N = 49 in a 64 tile), shifted, padded
    (1, 7, 7, 3, 16, (7, 7), (0, 0), False, False),   # one whole window, no table, no padding
    (1, 8, 12, 1, 16, (8, 16), (4, 8), True, True),   # N = 128: two query blocks, eight key blocks
    (1, 5, 13, 1, 32, (8, 16), (0, 0), False, True),  # 8x16 over a 5x13 map: 3 padded rows and columns
]
# fp64 for every shape; fp32 (the GPU's data type) for one of each window
CASES = [pytest.param(*shape, torch.float64, id=_id(shape) + "-fp64") for shape in SHAPES] + \
    [pytest.param(*SHAPES[i], torch.float32, id=_id(SHAPES[i]) + "-fp32") for i in (0, 2, 4)]


@pytest.mark.parametrize("batch,height,width,heads,head_dim,window,shift,with_table,with_pad,dtype", CASES)
def test_matches_reference(batch, height, width, heads, head_dim, window, shift, with_table, with_pad, dtype):
    _check(batch, height, width, heads, head_dim, window, shift, with_table, with_pad, dtype,
           seed=batch + height + width + heads + head_dim)


@pytest.mark.parametrize("height,width,window,shift", [(3, 7, (4, 8), (2, 4)), (6, 7, (7, 7), (3, 3))])
def test_several_query_blocks(monkeypatch, height, width, window, shift):
    """16-token tiles: a 4x8 and a 7x7 window take several query blocks, so bwd_query loops over several key
    blocks and bwd_key read-adds-stores the table gradient in its slot for every window."""
    monkeypatch.setattr(_kernels(), "INTERP_BLOCK_MAX", (16, 16))
    _check(1, height, width, 1, 16, window, shift, True, True, torch.float64, seed=5)


@pytest.mark.parametrize("programs", [1, 16])
def test_window_split(monkeypatch, programs):
    """bwd_key with one program per key block walking every window, and with more programs than windows
    allow (clamped: every slot must be written)."""
    monkeypatch.setattr(_kernels(), "INTERP_PROGRAMS", programs)
    _check(2, 5, 7, 1, 16, (4, 8), (2, 4), True, True, torch.float64, seed=programs)


def test_whole_grid_window():
    """IIWA's inter-window attention: one window over the whole token grid, no table, no padding."""
    _check(2, 5, 6, 1, 16, (5, 6), (0, 0), False, False, torch.float64, seed=7)


def test_fp16():
    """16-bit path: P and dS rounded to fp16 for the MMAs, fp32 accumulation and slots.

    (bf16 cannot run here: the interpreter's tl.dot multiplies bf16 bit patterns as integers.)
    """
    _check(1, 5, 7, 2, 16, (4, 8), (2, 4), True, True, torch.float16, seed=4)


def test_logits_that_overflow_exp():
    """Logits up to ~1e3: exp overflows (even in fp64) unless the row max is subtracted."""
    _check(1, 6, 9, 1, 16, (4, 8), (2, 4), True, True, torch.float64, seed=8, scale=100.0)


@pytest.mark.parametrize("window", [(4, 8), (7, 7), (3, 1), (1, 1)])
def test_table_gradient_sums_relative_offsets(window):
    """The launcher's [N, N] -> table reduction is the scatter-add over the relative position index."""
    heads, tokens = 3, window[0] * window[1]
    pair_sums = torch.randn(heads, tokens, tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    index = relative_position_index(window).view(-1)
    entries = (2 * window[0] - 1) * (2 * window[1] - 1)
    expected = torch.zeros(entries, heads, dtype=torch.float64).index_add_(0, index, pair_sums.flatten(1).t())
    torch.testing.assert_close(_kernels()._table_gradient(pair_sums, window), expected, rtol=1e-12, atol=1e-12)


def test_gradcheck_float64(monkeypatch):
    """The launchers' backward is the gradient of their forward, independently of the reference: one query
    block, and (16-token tiles) two query and two key blocks."""
    kernels = _kernels()

    class WindowAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, qkv, table, pad):
            ctx.save_for_backward(qkv, table, pad)
            return kernels.window_attention_fwd(qkv, table, pad, 1, (4, 8), (2, 4), 0.6)

        @staticmethod
        def backward(ctx, grad):
            return kernels.window_attention_bwd(grad.contiguous(), *ctx.saved_tensors, 1, (4, 8), (2, 4), 0.6)

    qkv, table, pad, _ = _inputs(1, 3, 7, 1, 2, (4, 8), True, True, torch.float64, seed=2)
    leaves = tuple(t.to(launcher_device()).requires_grad_() for t in (qkv, table, pad))
    # fast mode (random projections of the Jacobian): the full Jacobian takes minutes in the interpreter
    assert torch.autograd.gradcheck(WindowAttention.apply, leaves, fast_mode=True)
    monkeypatch.setattr(kernels, "INTERP_BLOCK_MAX", (16, 16))
    assert torch.autograd.gradcheck(WindowAttention.apply, leaves, fast_mode=True)


def test_deterministic():
    *tensors, grad = _inputs(1, 5, 7, 1, 16, (4, 8), True, True, torch.float32, seed=9)
    first, second = (_run(*tensors, grad, 1, (4, 8), (2, 4), 0.25) for _ in range(2))
    for name, a, b in zip(NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.filterwarnings("ignore:All-NaN slice encountered:RuntimeWarning")
@pytest.mark.parametrize("part", ["q", "k", "v"])
def test_nan_element(part):
    """One NaN in qkv gives the reference's NaN pattern in the output and every gradient, including the
    padding value's q part: padded queries get dQ = scale P (dO V^T - dO . O) K with dO = 0, which is NaN
    in the NaN's window, as in eager autograd."""
    *tensors, grad = _inputs(1, 5, 7, 2, 16, (4, 8), True, True, torch.float64, seed=10)
    channels = 2 * 16
    tensors[0][0, 2, 3, "qkv".index(part) * channels + 20] = float("nan")
    args = (2, (4, 8), (2, 4), 0.25)
    for name, g, w in zip(NAMES, _run(*tensors, grad, *args), _reference(*tensors, grad, *args)):
        assert_same_nonfinite(g, w, f"NaN in {part}: {name}")


def test_empty_batch():
    *tensors, grad = _inputs(0, 5, 11, 2, 16, (4, 8), True, True, torch.float32)
    kernels = _kernels()
    out = kernels.window_attention_fwd(*tensors, 2, (4, 8), (0, 0), 0.25)
    assert out.shape == (0, 5, 11, 32)
    grad_qkv, grad_table, grad_pad = kernels.window_attention_bwd(grad, *tensors, 2, (4, 8), (0, 0), 0.25)
    assert grad_qkv.shape == (0, 5, 11, 96)
    assert torch.equal(grad_table, torch.zeros_like(tensors[1])) and torch.equal(grad_pad, torch.zeros_like(tensors[2]))


def test_rejects_wide_heads():
    qkv, _, _, grad = _inputs(1, 4, 4, 1, 65, (2, 2), False, False, torch.float32)
    with pytest.raises(ValueError, match="head_dim <= 64, got C / heads = 65 / 1 = 65"):
        _kernels().window_attention_fwd(qkv, None, None, 1, (2, 2), (0, 0), 0.1)
    with pytest.raises(ValueError, match="head_dim <= 64"):
        _kernels().window_attention_bwd(grad, qkv, None, None, 1, (2, 2), (0, 0), 0.1)


def test_limits():
    limits = _kernels().limits
    facts = dict(B=2, H=64, W=128, C=256, heads=8, d=32, Wh=4, Ww=8, N=32)
    assert limits(facts) is None
    assert limits(dict(facts, H=96, W=96, C=256, heads=4, d=64, Wh=12, Ww=12, N=144)) is None
    assert "head_dim d = 128 > 64" in limits(dict(facts, C=1024, d=128))
    assert ">= 2^31 elements" in limits(dict(facts, H=2**14, W=2**14, C=2048, heads=64))
    assert "heads = 70000 exceeds" in limits(dict(facts, C=70000, heads=70000, d=1))
