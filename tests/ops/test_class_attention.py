"""class_attention on the reference and cpu backends against OCR's object attention / ACFNet's class attention:
op, gradients, opcheck, awkward and realistic shapes, NaN/inf, determinism, bad input. (The Triton launchers
are tested in test_class_attention_triton.py.)

The cpu shapes reach the kernel's paths: N not a multiple of the pixel tile (64K / (Cq + Cv) pixels in the
backward, 64K / max(Cq, Cv) in the forward, at most 512) with several tiles and several chunks per image
(the grad_values / grad_keys partials), one chunk per image (K = 150, 171: a chunk holds >= 16 Kp pixels,
Kp = K rounded up to 16), channel counts that are no multiple of a vector width, K = 1, 19, 150, 171,
batch 1, both forms.
"""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from op_testing import check_fwd_bwd, require
from test_nonfinite import VALUES, assert_same_nonfinite
from tolerances import assert_close

BACKENDS = ["reference", "cpu"]
FORMS = ["query", "logits"]


def attention_inputs(batch, cq, cv, classes, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(batch, cq, h, w), make(batch, classes, cq), make(batch, classes, cv), make(batch, classes, h, w)


def _args(form, q, k, v, logits):
    """The op's arguments (tensors first) and its scale for one form."""
    if form == "query":
        return [q, k, v], lambda q, k, v: (q, k, v, None), q.shape[1] ** -0.5
    return [v, logits], lambda v, logits: (None, None, v, logits), 1.3


def _independent(query, keys, values, logits, scale):
    """Pixel by pixel: a_k = softmax over k of the scaled score, out = sum_k a_k v_k."""
    source = query if query is not None else logits
    batch, _, h, w = source.shape
    out = torch.empty(batch, values.shape[2], h, w, dtype=values.dtype)
    for b in range(batch):
        for i in range(h):
            for j in range(w):
                s = keys[b] @ query[b, :, i, j] if query is not None else logits[b, :, i, j]
                a = torch.softmax(scale * s, dim=0)
                out[b, :, i, j] = a @ values[b]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch,cq,cv,classes,h,w", [(2, 4, 5, 3, 3, 4), (1, 3, 2, 1, 1, 1), (1, 8, 6, 19, 2, 3)])
def test_matches_the_maths(backend, form, batch, cq, cv, classes, h, w):
    require(backend)
    q, k, v, logits = attention_inputs(batch, cq, cv, classes, h, w)
    args = (q, k, v, None, cq ** -0.5) if form == "query" else (None, None, v, logits, 1.3)
    with fastctx.use_backend(backend):
        out = ops.class_attention(*args)
    assert_close(out, _independent(*args), torch.float64)


# (B, Cq, Cv, K, H, W) for the comparison with the reference, the output and every gradient.
SHAPES = [
    (2, 40, 24, 3, 33, 45),    # N = 1485: tiles of 512 (the last short), 3 chunks per image
    (1, 37, 29, 19, 33, 45),   # channels off every vector width, Cityscapes' K
    (2, 70, 9, 150, 17, 19),   # ADE20K's K, one chunk per image
    (1, 13, 70, 171, 9, 11),   # COCO-Stuff's K
    (2, 1, 1, 1, 5, 7),        # K = 1, Cq = Cv = 1
    (1, 130, 66, 19, 40, 41),  # tiles of 320 pixels (backward) and 496 (forward)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("batch,cq,cv,classes,h,w", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_reference(backend, form, batch, cq, cv, classes, h, w, dtype):
    require(backend, dtype)
    tensors, unpack, scale = _args(form, *attention_inputs(batch, cq, cv, classes, h, w, dtype=dtype))
    check_fwd_bwd(backend, lambda *t: ops.class_attention(*unpack(*t), scale),
                  lambda *t: reference.class_attention(*unpack(*t), scale), tensors, dtype,
                  msg=f"class_attention {form} K={classes} Cq={cq} Cv={cv} {h}x{w}")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("classes,h,w", [(19, 64, 128), (150, 64, 64)])
def test_realistic_shape_cpu(form, classes, h, w):
    """B = 2, Cq = Cv = 256 at the issue's benchmark maps, fp32, output and gradients."""
    require("cpu")
    tensors, unpack, scale = _args(form, *attention_inputs(2, 256, 256, classes, h, w, dtype=torch.float32))
    check_fwd_bwd("cpu", lambda *t: ops.class_attention(*unpack(*t), scale),
                  lambda *t: reference.class_attention(*unpack(*t), scale), tensors, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend):
    require(backend, torch.float64)
    q, k, v, logits = (t.requires_grad_() for t in attention_inputs(2, 3, 4, 3, 2, 3))
    with fastctx.use_backend(backend):
        fn = lambda a, b, c: ops.class_attention(a, b, c, None, 0.6)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v)) and torch.autograd.gradgradcheck(fn, (q, k, v))
        fn = lambda c, l: ops.class_attention(None, None, c, l, 1.2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (v, logits)) and torch.autograd.gradgradcheck(fn, (v, logits))


def _form_tensors(form):
    q, k, v, logits = (t.float().requires_grad_() for t in attention_inputs(2, 3, 4, 5, 3, 2))
    return (q, k, v, None) if form == "query" else (None, None, v, logits)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", FORMS)
def test_opcheck(backend, form):
    require(backend)
    torch.library.opcheck(torch.ops.fastctx.class_attention.default, (*_form_tensors(form), 0.5, backend))


@pytest.mark.parametrize("form", FORMS)
def test_opcheck_backward_cpu(form):
    require("cpu")
    tensors = _form_tensors(form)
    detached = [None if t is None else t.detach() for t in tensors]
    out, lse = torch.ops.fastctx.class_attention(*detached, 0.5, "cpu")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    torch.library.opcheck(torch.ops.fastctx.class_attention_backward.default,
                          (grad, *tensors, out, lse, 0.5, "cpu"))


@pytest.mark.parametrize("form", FORMS)
def test_empty_batch_cpu(form):
    backend = "cpu"
    require(backend)
    tensors, unpack, scale = _args(form, *attention_inputs(0, 3, 4, 5, 3, 2))
    leaves = [t.requires_grad_() for t in tensors]
    with fastctx.use_backend(backend):
        out = ops.class_attention(*unpack(*leaves), scale)
        out.sum().backward()
    assert out.shape == (0, 4, 3, 2)
    assert all(t.grad.shape == t.shape for t in leaves)


# One non-finite value per input (and in the upstream gradient), then whole rows: NaN and +-inf must
# land where the reference's maths puts them, forward and every gradient. Cq = 3, Cv = 4, K = 5, 5 x 7.
NONFINITE_PLACES = {
    "query": {"element": (1, 2, 1, 3), "pixel": (1, slice(None), 1, 3)},
    "keys": {"element": (1, 2, 1), "class": (1, 2, slice(None))},
    "values": {"element": (1, 2, 1), "class": (1, 2, slice(None))},
    "logits": {"element": (1, 2, 1, 3), "pixel": (1, slice(None), 1, 3), "class": (1, 2)},
    "grad": {"element": (1, 2, 1, 3), "pixel": (1, slice(None), 1, 3)},
}
NONFINITE_CASES = [(form, arg, where) for form, args in (("query", ("query", "keys", "values", "grad")),
                                                         ("logits", ("values", "logits", "grad")))
                   for arg in args for where in NONFINITE_PLACES[arg]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("form,arg,where", NONFINITE_CASES, ids=["-".join(c) for c in NONFINITE_CASES])
def test_nonfinite_like_the_reference_cpu(form, arg, where, value, dtype):
    require("cpu", dtype)
    q, k, v, logits = attention_inputs(2, 3, 4, 5, 5, 7, dtype=dtype)
    named = {"query": q, "keys": k, "values": v, "logits": logits}
    index = NONFINITE_PLACES[arg][where]
    if arg != "grad":
        named[arg][index] = VALUES[value]
    tensors, unpack, scale = _args(form, q, k, v, logits)
    fused_in = [t.clone().requires_grad_() for t in tensors]
    ref_in = [t.clone().requires_grad_() for t in tensors]
    with fastctx.use_backend("cpu"):
        out = ops.class_attention(*unpack(*fused_in), scale)
    expected = reference.class_attention(*unpack(*ref_in), scale)
    label = f"class_attention {form} with {value} in {arg} ({where})"
    assert_same_nonfinite(out, expected, f"{label}: output")
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if arg == "grad":
        grad[index] = VALUES[value]
    out.backward(grad)
    expected.backward(grad)
    for i, (a, e) in enumerate(zip(fused_in, ref_in)):
        assert_same_nonfinite(a.grad, e.grad, f"{label}: gradient of input {i}")


def _fwd_bwd_bits(form, threads):
    tensors, unpack, scale = _args(form, *attention_inputs(2, 40, 24, 19, 33, 45, dtype=torch.float32))
    leaves = [t.requires_grad_() for t in tensors]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastctx.use_backend("cpu"):
            out = ops.class_attention(*unpack(*leaves), scale)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    finally:
        torch.set_num_threads(previous)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("form", FORMS)
def test_cpu_is_bitwise_deterministic_across_runs_and_thread_counts(form):
    """Several tiles and chunks per image: the chunking and the merge order depend on the shapes only."""
    require("cpu")
    first = _fwd_bwd_bits(form, 2)
    for threads in (2, 1, 3):
        for i, (a, b) in enumerate(zip(first, _fwd_bwd_bits(form, threads), strict=True)):
            assert torch.equal(a, b), f"class_attention {form}: result {i} differs with {threads} thread(s)"


def test_bad_input():
    q, k, v, logits = attention_inputs(2, 3, 4, 5, 3, 2)
    with pytest.raises(ValueError, match="exactly one of query"):
        ops.class_attention(q, k, v, logits)
    with pytest.raises(ValueError, match="exactly one of query"):
        ops.class_attention(None, k, v, None)
    with pytest.raises(ValueError, match="keys .* are required"):
        ops.class_attention(q, None, v)
    with pytest.raises(ValueError, match=r"keys must have shape \[B, K, Cq\] = \(2, 5, 3\)"):
        ops.class_attention(q, k[:, :, :2], v)
    with pytest.raises(ValueError, match=r"logits must have shape \[B, K, H, W\] with \(B, K\) = \(2, 5\)"):
        ops.class_attention(None, None, v, logits[:, :3])
    with pytest.raises(TypeError, match="share one dtype"):
        ops.class_attention(q.float(), k, v)


def test_triton_declines_more_classes_than_its_register_tile():
    """The Triton kernels' limits are the op's: forced, K = 257 is refused before launch with the reason."""
    require("triton", torch.float32)
    q, k, v, _ = attention_inputs(1, 4, 3, 257, 2, 3, torch.float32)
    with fastctx.use_backend("triton"), pytest.raises(fastctx.BackendUnavailableError, match="K = 257 classes > 256"):
        ops.class_attention(q, k, v, None, 0.5)
