"""Triton class_gather launchers (fastctx.kernels.class_gather) against float64 references.

Under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) the kernels run 16 x 16 tiles
(BLOCK_N = BLOCK_C = 16) and the forward cuts each image into two pixel chunks, so these small shapes
cover: N not a multiple of the tile, several tiles per program, several programs (pixel chunks merged by
the launcher, channel blocks), C not a multiple of the tile, K = 1, 19, 150 and 171 (class tiles of 16,
32 and 256 rows), batch 1 and 2. References: fastctx.reference.class_gather and its autograd, in float64
on the very inputs the kernels see.
"""
import math

import pytest
import torch

from fastctx import reference
from fastctx.ops._class_tiles import MAX_CLASSES
from op_testing import check_launcher, launcher_device, triton_launchers
from tolerances import assert_close

MODES = ("ocr", "paper")

# (B, C, K, H, W, scale)
SHAPES = [
    (2, 20, 19, 5, 9, 1.0),     # N = 45: three tiles, chunks of two and one; two channel blocks
    (1, 3, 1, 4, 4, 0.7),       # K = 1, one exact tile
    (2, 17, 150, 3, 7, 1.3),    # ADE20K's K
    (1, 33, 171, 7, 5, 1.0),    # COCO-Stuff's K, three channel blocks
    (2, 1, 5, 1, 3, -0.5),      # C = 1, a negative scale
    (1, 16, 2, 8, 9, 2.0),      # N = 72: chunks of three and two tiles
]


def _kernels():
    return triton_launchers("class_gather")


def _inputs(batch, chans, classes, h, w, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, chans, h, w, generator=g, dtype=torch.float64)
    probs = torch.randn(batch, classes, h, w, generator=g, dtype=torch.float64) * 2
    grad = torch.randn(batch, classes, chans, generator=g, dtype=torch.float64)
    return feats.to(dtype), probs.to(dtype), grad.to(dtype)


def _statistic(probs, mode, scale):
    logits = scale * probs.flatten(2)
    return torch.logsumexp(logits, dim=2) if mode == "ocr" else torch.softmax(logits, dim=1).sum(dim=2)


def _reference(feats, probs, grad, mode, scale):
    """(centres, stat, grad_feats, grad_probs) in float64 from the reference maths and its autograd."""
    f, p = (t.detach().double().requires_grad_() for t in (feats, probs))
    centres = reference.class_gather(f, p, mode, scale)
    grad_feats, grad_probs = torch.autograd.grad(centres, (f, p), grad.double())
    return centres.detach(), _statistic(p.detach(), mode, scale), grad_feats, grad_probs


def _run(feats, probs, grad, mode, scale):
    """(centres, stat, grad_feats, grad_probs) of the launchers, the backward fed the forward's outputs."""
    dev = launcher_device()
    if feats.dtype == torch.float64 and dev != "cpu":
        pytest.skip("float64 runs under the interpreter only")
    feats, probs, grad = feats.to(dev), probs.to(dev), grad.to(dev)
    centres, stat = _kernels().class_gather_fwd(feats, probs, mode, scale)
    grad_feats, grad_probs = _kernels().class_gather_bwd(grad, feats, probs, centres, stat, mode, scale)
    acc = torch.float64 if feats.dtype == torch.float64 else torch.float32
    batch, chans, classes = feats.shape[0], feats.shape[1], probs.shape[1]
    for name, t, shape, dtype in (("centres", centres, (batch, classes, chans), feats.dtype),
                                  ("stat", stat, (batch, classes), acc),
                                  ("grad_feats", grad_feats, feats.shape, feats.dtype),
                                  ("grad_probs", grad_probs, probs.shape, probs.dtype)):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous(), \
            f"{name}: {tuple(t.shape)} {t.dtype} contiguous={t.is_contiguous()}"
    return tuple(t.cpu() for t in (centres, stat, grad_feats, grad_probs))


def _compare(got, want, what):
    for name, g, w in zip(("centres", "stat", "grad_feats", "grad_probs"), got, want):
        check_launcher(g, w, f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_C{}_K{}_{}x{}_s{}".format(*s))
def test_matches_reference(shape, mode, dtype):
    *dims, scale = shape
    feats, probs, grad = _inputs(*dims, dtype, seed=sum(dims))
    _compare(_run(feats, probs, grad, mode, scale), _reference(feats, probs, grad, mode, scale), f"{mode} {dtype}")


@pytest.mark.parametrize("mode", MODES)
def test_single_pixel(mode):
    """N = 1: every class's centre is that pixel's features, grad_feats = sum_k G_k, and grad_probs = 0
    (a reference would compare rounding noise there, hence closed forms)."""
    feats, probs, grad = _inputs(2, 20, 5, 1, 1, torch.float64, seed=3)
    centres, stat, grad_feats, grad_probs = _run(feats, probs, grad, mode, -0.5)
    assert_close(centres, feats.flatten(1).unsqueeze(1).expand_as(centres), msg="centres")
    assert_close(stat, _statistic(probs, mode, -0.5), msg="stat")
    assert_close(grad_feats, grad.sum(dim=1).view_as(feats), msg="grad_feats")
    assert grad_probs.abs().max() <= 1e-14 * grad.abs().max() * feats.abs().max()


@pytest.mark.parametrize("mode", MODES)
def test_fp16(mode):
    """16-bit path: weights rounded to fp16 for the MMAs, fp32 accumulation and statistic.

    (bf16 cannot run here: the interpreter's tl.dot multiplies bf16 bit patterns as integers.)
    """
    feats, probs, grad = _inputs(2, 20, 19, 5, 9, torch.float16, seed=4)
    _compare(_run(feats, probs, grad, mode, 1.0), _reference(feats, probs, grad, mode, 1.0), f"{mode} fp16")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("split", [1, 8])
def test_pixel_chunks(monkeypatch, mode, split):
    """One chunk per image (every tile in one program) and one chunk per tile (the merge of many)."""
    monkeypatch.setattr(_kernels(), "INTERP_SPLIT", split)
    feats, probs, grad = _inputs(2, 20, 19, 8, 9, torch.float64, seed=split)
    _compare(_run(feats, probs, grad, mode, 1.0), _reference(feats, probs, grad, mode, 1.0), f"{mode} split {split}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_ocr_logits_that_overflow_exp(dtype):
    """scale * probs up to ~300: exp overflows without the running max, and the max grows from chunk to
    chunk (the online rescaling)."""
    feats, probs, grad = _inputs(2, 20, 19, 8, 9, dtype, seed=6)
    probs = probs + torch.linspace(0, 6, 72, dtype=dtype).reshape(8, 9)  # larger logits in later tiles
    _compare(_run(feats, probs, grad, "ocr", 30.0), _reference(feats, probs, grad, "ocr", 30.0), "ocr large")


def test_ocr_class_minus_inf_in_a_whole_chunk():
    """A class whose logits are -inf on every pixel of the first chunk still gets the later pixels'
    weights (the running max starts from -inf without turning the chunk's weights into NaN)."""
    feats, probs, grad = _inputs(2, 20, 19, 8, 9, torch.float64, seed=8)
    probs.view(2, 19, 72)[:, 3, :40] = float("-inf")
    _compare(_run(feats, probs, grad, "ocr", 1.0), _reference(feats, probs, grad, "ocr", 1.0), "ocr -inf")


def test_grad_check_float64():
    """The launchers' backward is the gradient of their forward, independently of the reference."""
    kernels = _kernels()
    if launcher_device() != "cpu":
        pytest.skip("float64 runs under the interpreter only")

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, feats, probs, mode):
            centres, stat = kernels.class_gather_fwd(feats, probs, mode, 0.8)
            ctx.save_for_backward(feats, probs, centres, stat)
            ctx.mode = mode
            return centres

        @staticmethod
        def backward(ctx, grad):
            return (*kernels.class_gather_bwd(grad.contiguous(), *ctx.saved_tensors, ctx.mode, 0.8), None)

    for mode in MODES:
        feats, probs, _ = _inputs(2, 3, 3, 4, 5, torch.float64, seed=2)  # N = 20: two tiles, two chunks
        inputs = (feats.to(launcher_device()).requires_grad_(), probs.to(launcher_device()).requires_grad_())
        # fast mode (random projections of the Jacobian): the full Jacobian takes minutes in the interpreter
        assert torch.autograd.gradcheck(lambda f, p: Gather.apply(f, p, mode), inputs, fast_mode=True)


@pytest.mark.parametrize("mode", MODES)
def test_deterministic(mode):
    feats, probs, grad = _inputs(2, 20, 19, 5, 9, torch.float32, seed=9)
    first, second = _run(feats, probs, grad, mode, 1.0), _run(feats, probs, grad, mode, 1.0)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def _assert_same_nonfinite(got, want, what):
    """NaN exactly where the reference has NaN, the same infinities, the finite values close."""
    assert torch.equal(got.isnan(), want.isnan()), \
        f"{what}: NaN at {got.isnan().nonzero().tolist()[:8]}, reference at {want.isnan().nonzero().tolist()[:8]}"
    assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf()), \
        f"{what}: infinities differ from the reference's"
    finite = want.isfinite()
    if finite.any():
        assert_close(got[finite], want[finite], msg=what)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy, under the interpreter
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("where", ["feats", "probs", "grad"])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_element(mode, where, value):
    """One non-finite element in one input gives the reference's NaN pattern (and infinities).

    One exception, by the contract's formula: an infinite G_kc in "ocr" mode. grad_probs_kn =
    scale w_kn G_k . (F_n - centre_k) is +-inf or NaN (inf - inf) along class k; eager autograd sums
    +-inf terms over the pixels instead and gets NaN on the whole class row. Both are non-finite there.
    """
    feats, probs, grad = _inputs(2, 20, 19, 5, 9, torch.float64, seed=10)
    target = {"feats": feats, "probs": probs, "grad": grad}[where]
    target.view(-1)[target.numel() // 3] = value
    got = _run(feats, probs, grad, mode, 1.0)
    want = _reference(feats, probs, grad, mode, 1.0)
    for name, g, w in zip(("centres", "grad_feats", "grad_probs"), (got[0], *got[2:]), (want[0], *want[2:])):
        what = f"{mode}, {value} in {where}: {name}"
        if (mode, where, name) == ("ocr", "grad", "grad_probs") and math.isinf(value):
            assert torch.equal(g.isfinite(), w.isfinite()), f"{what}: non-finite elements differ"
            assert_close(g[w.isfinite()], w[w.isfinite()], msg=what)
        else:
            _assert_same_nonfinite(g, w, what)


def test_rejects_too_many_classes():
    feats, probs, grad = (t.to(launcher_device()) for t in _inputs(1, 4, 257, 2, 3, torch.float32))
    with pytest.raises(ValueError, match="K <= 256 classes, got K = 257"):
        _kernels().class_gather_fwd(feats, probs, "ocr", 1.0)
    with pytest.raises(ValueError, match="K <= 256 classes, got K = 257"):
        _kernels().class_gather_bwd(grad, feats, probs, grad, grad[:, :, 0], "paper", 1.0)
    with pytest.raises(ValueError, match="mode must be 'ocr' or 'paper', got 'mean'"):
        _kernels().class_gather_fwd(feats[:, :, :, :1], probs[:, :4], "mean", 1.0)


def test_limits():
    limits = _kernels().limits
    assert _kernels().K_MAX == MAX_CLASSES  # the op declares the kernels' limit
    assert limits(dict(B=2, C=512, K=150, N=64 * 64)) is None
    assert limits(dict(B=2, C=512, K=256, N=64 * 128)) is None
    assert "K = 257 classes > 256" in limits(dict(B=2, C=512, K=257, N=64))
    assert "batch = 70000 exceeds" in limits(dict(B=70000, C=512, K=19, N=64))
    assert ">= 2^31 elements" in limits(dict(B=1, C=2048, K=19, N=2**20))
