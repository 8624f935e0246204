"""The ACM ops (pyramid_pool, gla_context, residual_relu) on every backend vs the reference.

Backends: cpu (C++ extension), triton (interpreter on CPU tensors here, real on
GPU), cuda (GPU only). Gradients: float64 gradcheck on small shapes, and
comparison with the reference's autograd at awkward and realistic shapes.
"""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from fastctx.ops.residual_relu import pack_mask, unpack_mask
from conftest import require_backend
from tolerances import assert_close

FUSED = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _check_fwd_bwd(backend, fn, ref_fn, inputs, dtype, seed=0):
    """fn(*inputs) under `backend` vs ref_fn(*inputs): output and every input gradient."""
    leaves_a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    leaves_b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with fastctx.use_backend(backend):
        out = fn(*leaves_a)
    expected = ref_fn(*leaves_b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, dtype, "forward")
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(dtype=expected.dtype, device=expected.device)
    with fastctx.use_backend(backend):
        out.backward(grad)
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        assert a.grad is not None, f"no gradient for input {i}"
        assert_close(a.grad, b.grad, dtype, f"gradient of input {i}")


# ----------------------------------------------------------------------------- pyramid_pool

POOL_CASES = [
    (2, 3, 33, 45, (1, 2, 3, 6)),  # overlapping bins on both axes
    (1, 2, 1, 1, (1, 2, 3, 6)),  # every bin is the single pixel
    (2, 4, 7, 5, (1, 3, 5)),
    (1, 3, 5, 4, (8,)),  # more bins than pixels
    (3, 1, 64, 64, (1, 2, 3, 6)),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,ch,h,w,scales", POOL_CASES)
def test_pyramid_pool(backend, batch, ch, h, w, scales):
    require_backend(backend, _device(backend))
    x = torch.randn(batch, ch, h, w, device=_device(backend))
    _check_fwd_bwd(backend, lambda t: ops.pyramid_pool(t, scales), lambda t: reference.pyramid_pool(t, scales),
                   [x], torch.float32)


# ----------------------------------------------------------------------------- gla_context

def gla_inputs(batch, channels, h, w, sizes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total, groups = sum(sizes), len(sizes)
    x = torch.relu(torch.randn(batch, groups * channels, h, w, generator=g, dtype=torch.float64))
    weight = torch.randn(total, channels, generator=g, dtype=torch.float64) / channels ** 0.5
    bias = torch.randn(batch, total, generator=g, dtype=torch.float64)
    pooled = torch.randn(batch, channels, total, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (x, weight, bias, pooled)]


GLA_CASES = [
    (2, 4, 7, 5, (1, 4, 9, 36)),
    (1, 3, 1, 1, (1, 9, 25)),
    (2, 16, 9, 11, (36,)),
    (3, 5, 33, 45, (1, 4)),
    (1, 70, 6, 7, (4, 9)),  # channels not a multiple of any block size
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,ch,h,w,sizes", GLA_CASES)
def test_gla_context(backend, batch, ch, h, w, sizes):
    require_backend(backend, _device(backend))
    inputs = gla_inputs(batch, ch, h, w, sizes, device=_device(backend))
    _check_fwd_bwd(backend, lambda *t: ops.gla_context(*t, sizes), lambda *t: reference.gla_context(*t, sizes),
                   inputs, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_gla_context_realistic(backend):
    """mmseg's default head: C=512, 64x64, scales (1, 2, 3, 6), batch 2."""
    require_backend(backend, _device(backend))
    sizes = (1, 4, 9, 36)
    inputs = gla_inputs(2, 512, 64, 64, sizes, device=_device(backend))
    _check_fwd_bwd(backend, lambda *t: ops.gla_context(*t, sizes), lambda *t: reference.gla_context(*t, sizes),
                   inputs, torch.float32)


# ----------------------------------------------------------------------------- residual_relu

def residual_inputs(batch, ch, h, w, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(batch, ch, h, w, generator=g, dtype=torch.float64)
    res = torch.randn(batch, ch, h, w, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(ch, generator=g, dtype=torch.float64) + 0.5).to(acc)
    shift = (torch.randn(ch, generator=g, dtype=torch.float64) * 0.1).to(acc)
    return [y.to(dtype=dtype, device=device), res.to(dtype=dtype, device=device),
            scale.to(device), shift.to(device)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(2, 3, 33, 45), (1, 1, 1, 1), (2, 64, 16, 16), (1, 5, 7, 3)])
def test_residual_relu(backend, shape):
    require_backend(backend, _device(backend))
    inputs = residual_inputs(*shape, device=_device(backend))
    _check_fwd_bwd(backend, ops.residual_relu, reference.residual_relu, inputs, torch.float32)


def test_pack_mask_layout():
    """Pixel n = h*W + w of a plane is bit n % 8 (LSB first) of byte n // 8; spare bits are 0."""
    active = torch.zeros(1, 2, 3, 4, dtype=torch.bool)  # 12 pixels: 2 bytes per plane
    active[0, 0, 0, 0] = True  # n = 0
    active[0, 0, 2, 1] = True  # n = 9
    active[0, 1, 1, 3] = True  # n = 7
    mask = pack_mask(active)
    assert mask.dtype == torch.uint8 and mask.tolist() == [[[1, 2], [128, 0]]]
    assert torch.equal(unpack_mask(mask, active.shape), active)
    for shape in [(2, 3, 33, 45), (1, 1, 1, 1), (3, 2, 4, 2)]:
        bits = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
        assert torch.equal(unpack_mask(pack_mask(bits), shape), bits)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(2, 3, 33, 45), (1, 1, 1, 1), (2, 64, 16, 16), (1, 5, 7, 3), (1, 2, 3, 43)])
def test_residual_relu_saves_out_positive_as_bits(backend, shape):
    """The forward's mask is exactly pack_mask(out > 0); inference writes none."""
    require_backend(backend, _device(backend))
    y, r, s, t = residual_inputs(*shape, device=_device(backend))
    out, mask = torch.ops.fastctx.residual_relu.default(y, r, s, t, True, backend)
    assert mask.shape == (shape[0], shape[1], (shape[2] * shape[3] + 7) // 8)
    assert torch.equal(mask.cpu(), pack_mask(out.cpu() > 0))
    out_only, no_mask = torch.ops.fastctx.residual_relu.default(y, r, s, t, False, backend)
    assert torch.equal(out_only, out) and no_mask.numel() == 0


def test_residual_relu_gradient_needs_the_mask():
    y, r, s, t = residual_inputs(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="save_mask=False"):
        torch.ops.fastctx.residual_relu.default(y.requires_grad_(), r, s, t, False, "auto")


# ----------------------------------------------------------------------------- float64 gradcheck

GRADCHECK = {
    "pyramid_pool": (lambda: [torch.randn(2, 2, 7, 5, dtype=torch.float64)],
                     lambda x: ops.pyramid_pool(x, (1, 2, 3))),
    "gla_context": (lambda: gla_inputs(2, 3, 4, 3, (1, 4, 9), dtype=torch.float64),
                    lambda *t: ops.gla_context(*t, (1, 4, 9))),
    # y away from the ReLU kinks so finite differences are valid
    "residual_relu": (lambda: residual_inputs(2, 3, 3, 4, dtype=torch.float64), ops.residual_relu),
}


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("op", sorted(GRADCHECK))
def test_gradcheck_float64(backend, op):
    require_backend(backend, "cpu", torch.float64)
    make, fn = GRADCHECK[op]
    inputs = [t.requires_grad_() for t in make()]
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- opcheck

def _opcheck_cases(backend, device):
    x = torch.randn(2, 3, 7, 5, device=device)
    yield torch.ops.fastctx.pyramid_pool.default, (x, [1, 2, 3], backend)
    sizes = [1, 4, 9]
    x, w, b, p = gla_inputs(2, 4, 5, 3, sizes, device=device)
    yield torch.ops.fastctx.gla_context.default, (x, w, b, p, sizes, backend)
    y, r, s, t = residual_inputs(2, 3, 4, 5, device=device)
    yield torch.ops.fastctx.residual_relu.default, (y, r, s, t, True, backend)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    require_backend(backend, _device(backend))
    for op, args in _opcheck_cases(backend, _device(backend)):
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(op, args)
    # Inference form: no mask, so no gradient may be asked of it.
    y, r, s, t = residual_inputs(2, 3, 4, 5, device=_device(backend))
    torch.library.opcheck(torch.ops.fastctx.residual_relu.default, (y, r, s, t, False, backend))


# ----------------------------------------------------------------------------- layouts, empty, bad input

@pytest.mark.parametrize("backend", FUSED)
def test_noncontiguous_and_channels_last(backend):
    require_backend(backend, _device(backend))
    device = _device(backend)
    sizes = (1, 4)
    x, w, b, p = gla_inputs(2, 6, 9, 7, sizes, device=device)
    with fastctx.use_backend(backend):
        for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            assert_close(ops.gla_context(variant, w, b, p, sizes), reference.gla_context(x, w, b, p, sizes),
                         torch.float32)
            assert_close(ops.pyramid_pool(variant, (1, 3)), reference.pyramid_pool(x, (1, 3)), torch.float32)
        wide = torch.randn(2, 20, 9, 7, device=device)[:, 4:16]  # channel slice: strided batch
        assert_close(ops.pyramid_pool(wide, (2,)), reference.pyramid_pool(wide, (2,)), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_empty_batch(backend):
    require_backend(backend, _device(backend))
    device = _device(backend)
    sizes = (1, 4)
    x, w, b, p = gla_inputs(0, 3, 5, 5, sizes, device=device)
    x.requires_grad_()
    with fastctx.use_backend(backend):
        z = ops.gla_context(x, w, b, p, sizes)
        assert z.shape == x.shape
        z.sum().backward()
        assert x.grad.shape == x.shape
        assert ops.pyramid_pool(torch.randn(0, 3, 5, 5, device=device), (1, 2)).shape == (0, 3, 5)


def test_bad_input_messages():
    sizes = (1, 4)
    x, w, b, p = gla_inputs(2, 3, 5, 5, sizes)
    with pytest.raises(ValueError, match=r"x must be of shape \[B, G\*C, H, W\]"):
        ops.gla_context(x[0], w, b, p, sizes)
    with pytest.raises(TypeError, match="floating-point"):
        ops.gla_context(x.long(), w, b, p, sizes)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.gla_context(x, w.double(), b, p, sizes)
    with pytest.raises(ValueError, match=r"weight must have shape \(5, 3\)"):
        ops.gla_context(x, w[:, :2], b, p, sizes)
    with pytest.raises(ValueError, match="not a multiple of the 2 groups"):
        ops.gla_context(x[:, :5], w, b, p, sizes)
    with pytest.raises(ValueError, match="one device"):
        ops.gla_context(x, w.to("meta"), b, p, sizes)
    with pytest.raises(ValueError, match="positive ints"):
        ops.pyramid_pool(x, (0, 2))
    with pytest.raises(ValueError, match="non-empty spatial"):
        ops.pyramid_pool(torch.randn(1, 2, 0, 3), (1,))
    y, r, s, t = residual_inputs(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"scale and shift must have shape \(3,\)"):
        ops.residual_relu(y, r, s[:2], t)
    with pytest.raises(ValueError, match="residual must have y's shape"):
        ops.residual_relu(y, r[:, :2], s, t)
