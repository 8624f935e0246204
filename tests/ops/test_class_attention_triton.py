"""Triton class_attention launchers (fastctx.kernels.class_attention) against float64 references.

Under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1) the kernels run 16 x 16 tiles
(BLOCK_N = BLOCK_C = BLOCK_K = 16) and the backward's class kernel cuts each image into two pixel chunks,
so these small shapes cover: N not a multiple of the tile, several tiles per program, several programs
(pixel chunks summed by the launcher, class and channel blocks), channel counts not a multiple of the tile
and Cq != Cv, K = 1, 19, 150 and 171 (class tiles of 16, 32 and 256 rows), batch 1 and 2, both forms
(query + keys, and logits). References: fastctx.reference.class_attention and its autograd, in float64
on the very inputs the kernels see.
"""
import math

import pytest
import torch

from fastctx import reference
from fastctx.ops._class_tiles import MAX_CLASSES
from op_testing import check_launcher, launcher_device, triton_launchers
from tolerances import assert_close

FORMS = ("query", "logits")
NAMES = ("grad_query", "grad_keys", "grad_values", "grad_logits")

# (B, Cq, Cv, K, H, W)
SHAPES = [
    (2, 20, 18, 19, 5, 9),    # N = 45: three tiles, chunks of two and one
    (1, 3, 5, 2, 4, 4),       # one exact tile
    (2, 17, 33, 150, 3, 7),   # ADE20K's K, three channel blocks of values
    (1, 16, 20, 171, 7, 5),   # COCO-Stuff's K: eleven class blocks
    (2, 1, 1, 5, 1, 3),       # one channel
    (1, 40, 8, 3, 8, 9),      # Cq > Cv: channel blocks with keys but no values; N = 72
]


def _kernels():
    return triton_launchers("class_attention")


def _inputs(form, batch, cq, cv, classes, h, w, dtype, seed=0):
    """(query, keys, values, logits, grad) with None for the other form's inputs, and its scale."""
    g = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    values, grad = make(batch, classes, cv), make(batch, cv, h, w)
    if form == "query":
        return (make(batch, cq, h, w), make(batch, classes, cq), values, None, grad), cq ** -0.5 * 2
    return (None, None, values, make(batch, classes, h, w) * 2, grad), 0.9


def _lse(query, keys, logits, scale):
    scores = torch.einsum("bcn,bkc->bnk", query.flatten(2), keys) if query is not None else \
        logits.flatten(2).transpose(1, 2)
    return torch.logsumexp(scale * scores, dim=2)


def _reference(query, keys, values, logits, grad, scale):
    """(out, lse, grad_query, grad_keys, grad_values, grad_logits) in float64; None for absent inputs."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in (query, keys, values, logits)]
    out = reference.class_attention(*leaves, scale)
    present = [t for t in leaves if t is not None]
    grads = iter(torch.autograd.grad(out, present, grad.double()))
    return (out.detach(), _lse(*(None if t is None else t.detach() for t in (leaves[0], leaves[1], leaves[3])), scale),
            *(None if t is None else next(grads) for t in leaves))


def _run(query, keys, values, logits, grad, scale):
    """The launchers' (out, lse, grad_query, grad_keys, grad_values, grad_logits), the backward fed the
    forward's outputs; None for absent inputs (whose gradients must be empty)."""
    if values.dtype == torch.float64 and launcher_device() != "cpu":
        pytest.skip("float64 runs under the interpreter only")
    dev = lambda t: None if t is None else t.to(launcher_device())  # noqa: E731
    query, keys, values, logits, grad = (dev(t) for t in (query, keys, values, logits, grad))
    out, lse = _kernels().class_attention_fwd(query, keys, values, logits, scale)
    grads = _kernels().class_attention_bwd(grad, query, keys, values, logits, out, lse, scale)
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    source = query if query is not None else logits
    batch, _, h, w = source.shape
    assert out.shape == (batch, values.shape[2], h, w) and out.dtype == values.dtype and out.is_contiguous()
    assert lse.shape == (batch, h * w) and lse.dtype == acc
    assert len({id(g) for g in grads}) == 4, "the gradients must be distinct tensors (custom op outputs)"
    results = []
    for name, g, t in zip(NAMES, grads, (query, keys, values, logits)):
        if t is None:
            assert g.numel() == 0 and g.dtype == values.dtype, f"{name}: {tuple(g.shape)} for an absent input"
            results.append(None)
        else:
            assert g.shape == t.shape and g.dtype == t.dtype and g.is_contiguous(), f"{name}: {tuple(g.shape)}"
            results.append(g.cpu())
    return (out.cpu(), lse.cpu(), *results)


def _compare(got, want, what):
    for name, g, w in zip(("out", "lse", *NAMES), got, want):
        assert (g is None) == (w is None), name
        if w is not None:
            check_launcher(g, w, f"{what} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_Cq{}_Cv{}_K{}_{}x{}".format(*s))
def test_matches_reference(shape, form, dtype):
    tensors, scale = _inputs(form, *shape, dtype, seed=sum(shape))
    _compare(_run(*tensors, scale), _reference(*tensors, scale), f"{form} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("form", FORMS)
def test_single_class(form, dtype):
    """K = 1: a = 1, so out_n = v, lse = scale s, grad_values = sum_n G_n, and the score gradients vanish
    (a reference would compare rounding noise there, hence closed forms)."""
    tensors, scale = _inputs(form, 2, 20, 18, 1, 5, 9, dtype, seed=3)
    query, keys, values, logits, grad = tensors
    got = _run(*tensors, scale)
    assert_close(got[0], values.reshape(2, 18, 1, 1).expand(-1, -1, 5, 9), msg="out")
    assert_close(got[1], _lse(query, keys, logits, scale).to(got[1].dtype), msg="lse")
    assert_close(got[4], grad.flatten(2).sum(dim=2).unsqueeze(1), msg="grad_values")
    eps = torch.finfo(dtype).eps
    bound = 8 * eps * grad.abs().max() * values.abs().max() * (1 if logits is not None else keys.abs().max())
    for name, g in zip(NAMES, got[2:]):
        if g is not None and name != "grad_values":
            assert g.abs().max() <= bound, f"{name}: {g.abs().max():.3g} > {bound:.3g}"


@pytest.mark.parametrize("form", FORMS)
def test_fp16(form):
    """16-bit path: attention weights and dS rounded to fp16 for the MMAs, fp32 accumulation and lse.

    (bf16 cannot run here: the interpreter's tl.dot multiplies bf16 bit patterns as integers.)
    """
    tensors, scale = _inputs(form, 2, 20, 18, 19, 5, 9, torch.float16, seed=4)
    _compare(_run(*tensors, scale), _reference(*tensors, scale), f"{form} fp16")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("split", [1, 8])
def test_pixel_chunks(monkeypatch, form, split):
    """The class kernel with one chunk per image (every tile in one program) and one chunk per tile."""
    monkeypatch.setattr(_kernels(), "INTERP_SPLIT", split)
    tensors, scale = _inputs(form, 2, 20, 18, 19, 8, 9, torch.float64, seed=split)
    _compare(_run(*tensors, scale), _reference(*tensors, scale), f"{form} split {split}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("form", FORMS)
def test_scores_that_overflow_exp(form, dtype):
    """scale * scores in the hundreds: exp overflows unless the per-pixel max is subtracted."""
    tensors, _ = _inputs(form, 2, 20, 18, 19, 5, 9, dtype, seed=6)
    _compare(_run(*tensors, 40.0), _reference(*tensors, 40.0), f"{form} large")


def test_grad_check_float64():
    """The launchers' backward is the gradient of their forward, independently of the reference."""
    kernels = _kernels()
    if launcher_device() != "cpu":
        pytest.skip("float64 runs under the interpreter only")

    class Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, keys, values, logits):
            out, lse = kernels.class_attention_fwd(query, keys, values, logits, 0.8)
            ctx.save_for_backward(query, keys, values, logits, out, lse)
            return out

        @staticmethod
        def backward(ctx, grad):
            grads = kernels.class_attention_bwd(grad.contiguous(), *ctx.saved_tensors, 0.8)
            return tuple(g if t is not None else None for g, t in zip(grads, ctx.saved_tensors[:4]))

    for form in FORMS:
        # N = 20: two tiles, two pixel chunks
        tensors, _ = _inputs(form, 2, 3, 4, 3, 4, 5, torch.float64, seed=2)
        leaves = tuple(None if t is None else t.to(launcher_device()).requires_grad_() for t in tensors[:4])
        present = [i for i, t in enumerate(leaves) if t is not None]

        def fn(*ts, leaves=leaves, present=present):
            args = list(leaves)
            for i, t in zip(present, ts):
                args[i] = t
            return Attention.apply(*args)

        # fast mode (random projections of the Jacobian): the full Jacobian takes minutes in the interpreter
        assert torch.autograd.gradcheck(fn, tuple(leaves[i] for i in present), fast_mode=True), form


@pytest.mark.parametrize("form", FORMS)
def test_deterministic(form):
    tensors, scale = _inputs(form, 2, 20, 18, 19, 5, 9, torch.float32, seed=9)
    first, second = _run(*tensors, scale), _run(*tensors, scale)
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)


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
@pytest.mark.parametrize("where", ["query", "keys", "values", "logits", "grad"])
def test_nonfinite_element(where, value):
    """One non-finite element in one input gives the reference's NaN pattern (and infinities).

    One exception, by the contract's formula: an infinite G_cn. dS_kn = scale a_kn (G_n . v_k - D_n) with
    D_n = G_n . out_n is +-inf or NaN (inf - inf) along pixel n; eager autograd forms D_n as
    sum_k a_kn (G_n . v_k), a sum of +-inf terms, and gets NaN on the whole pixel. Both are non-finite
    there, and so are the score gradients built from dS.
    """
    form = "logits" if where == "logits" else "query" if where in ("query", "keys") else None
    for form in (form,) if form else FORMS:
        tensors, scale = _inputs(form, 2, 20, 18, 19, 5, 9, torch.float64, seed=10)
        target = tensors[("query", "keys", "values", "logits", "grad").index(where)]
        target.view(-1)[target.numel() // 3] = value
        got, want = _run(*tensors, scale), _reference(*tensors, scale)
        for name, g, w in zip(("out", *NAMES), (got[0], *got[2:]), (want[0], *want[2:])):
            what = f"{form}: {value} in {where}: {name}"
            if w is None:
                continue
            if where == "grad" and math.isinf(value) and name != "grad_values":
                assert torch.equal(g.isfinite(), w.isfinite()), f"{what}: non-finite elements differ"
                assert_close(g[w.isfinite()], w[w.isfinite()], msg=what)
            else:
                _assert_same_nonfinite(g, w, what)


def test_rejects_too_many_classes():
    (query, keys, values, _, grad), scale = _inputs("query", 1, 4, 4, 257, 2, 3, torch.float32)
    dev = launcher_device()
    query, keys, values, grad = (t.to(dev) for t in (query, keys, values, grad))
    with pytest.raises(ValueError, match="K <= 256 classes, got K = 257"):
        _kernels().class_attention_fwd(query, keys, values, None, scale)
    lse = torch.zeros(1, 6, device=dev)
    with pytest.raises(ValueError, match="K <= 256 classes, got K = 257"):
        _kernels().class_attention_bwd(grad, query, keys, values, None, grad, lse, scale)
    with pytest.raises(ValueError, match="exactly one of query and logits"):
        _kernels().class_attention_fwd(None, None, values, None, scale)


def test_limits():
    limits = _kernels().limits
    assert _kernels().K_MAX == MAX_CLASSES  # the op declares the kernels' limit
    assert limits(dict(B=2, K=150, Cv=256, N=64 * 64, Cq=256)) is None
    assert limits(dict(B=2, K=256, Cv=512, N=64 * 128, Cq=0)) is None
    assert "K = 257 classes > 256" in limits(dict(B=2, K=257, Cv=256, N=64, Cq=256))
    assert "batch = 70000 exceeds" in limits(dict(B=70000, K=19, Cv=256, N=64, Cq=256))
    assert ">= 2^31 elements" in limits(dict(B=1, K=19, Cv=256, N=2**23, Cq=0))  # exactly 2^31
