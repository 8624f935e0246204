"""class_attention against its reference (OCR's object attention / ACFNet's class attention): op, gradients,
opcheck, bad input. The fused backends join the parametrisation as their kernels land."""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from tolerances import assert_close


def attention_inputs(batch, cq, cv, classes, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(batch, cq, h, w), make(batch, classes, cq), make(batch, classes, cv), make(batch, classes, h, w)


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


@pytest.mark.parametrize("form", ["query", "logits"])
@pytest.mark.parametrize("batch,cq,cv,classes,h,w", [(2, 4, 5, 3, 3, 4), (1, 3, 2, 1, 1, 1), (1, 8, 6, 19, 2, 3)])
def test_reference_matches_the_maths(form, batch, cq, cv, classes, h, w):
    q, k, v, logits = attention_inputs(batch, cq, cv, classes, h, w)
    args = (q, k, v, None, cq ** -0.5) if form == "query" else (None, None, v, logits, 1.3)
    assert_close(reference.class_attention(*args), _independent(*args), torch.float64)


def test_gradcheck_float64():
    q, k, v, logits = (t.requires_grad_() for t in attention_inputs(2, 3, 4, 3, 2, 3))
    with fastctx.use_backend("reference"):
        fn = lambda a, b, c: ops.class_attention(a, b, c, None, 0.6)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (q, k, v)) and torch.autograd.gradgradcheck(fn, (q, k, v))
        fn = lambda c, l: ops.class_attention(None, None, c, l, 1.2)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (v, logits)) and torch.autograd.gradgradcheck(fn, (v, logits))


def test_opcheck():
    q, k, v, logits = (t.float().requires_grad_() for t in attention_inputs(2, 3, 4, 5, 3, 2))
    torch.library.opcheck(torch.ops.fastctx.class_attention.default, (q, k, v, None, 0.5, "reference"))
    torch.library.opcheck(torch.ops.fastctx.class_attention.default, (None, None, v, logits, 0.5, "reference"))


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
