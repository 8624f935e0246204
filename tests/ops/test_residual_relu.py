"""residual_relu on every backend against the reference: op, its bit mask, launchers, gradients, opcheck."""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from fastctx.reference.residual_relu import pack_mask, unpack_mask
from op_testing import (FUSED, check_fwd_bwd, check_launcher, launcher_device, randn, require, residual_inputs,
                        triton_launchers)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", [(2, 3, 33, 45), (1, 1, 1, 1), (2, 64, 16, 16), (1, 5, 7, 3)])
def test_matches_reference(backend, shape):
    device = require(backend)
    check_fwd_bwd(backend, ops.residual_relu, reference.residual_relu, residual_inputs(*shape, device=device),
                  torch.float32)


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
def test_saves_out_positive_as_bits(backend, shape):
    """The forward's mask is exactly pack_mask(out > 0); inference writes none."""
    device = require(backend)
    y, r, s, t = residual_inputs(*shape, device=device)
    out, mask = torch.ops.fastctx.residual_relu.default(y, r, s, t, True, backend)
    assert mask.shape == (shape[0], shape[1], (shape[2] * shape[3] + 7) // 8)
    assert torch.equal(mask.cpu(), pack_mask(out.cpu() > 0))
    out_only, no_mask = torch.ops.fastctx.residual_relu.default(y, r, s, t, False, backend)
    assert torch.equal(out_only, out) and no_mask.numel() == 0


def test_gradient_needs_the_mask():
    y, r, s, t = residual_inputs(1, 2, 3, 3)
    with pytest.raises(RuntimeError, match="save_mask=False"):
        torch.ops.fastctx.residual_relu.default(y.requires_grad_(), r, s, t, False, "auto")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gradcheck_float64(backend):
    require(backend, torch.float64)
    # y away from the ReLU kinks so finite differences are valid
    inputs = [t.requires_grad_() for t in residual_inputs(2, 3, 3, 4, dtype=torch.float64)]
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(ops.residual_relu, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)
        assert torch.autograd.gradgradcheck(ops.residual_relu, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    device = require(backend)
    y, r, s, t = (v.requires_grad_() for v in residual_inputs(2, 3, 4, 5, device=device))
    torch.library.opcheck(torch.ops.fastctx.residual_relu.default, (y, r, s, t, True, backend))
    # Inference form: no mask, so no gradient may be asked of it.
    y, r, s, t = residual_inputs(2, 3, 4, 5, device=device)
    torch.library.opcheck(torch.ops.fastctx.residual_relu.default, (y, r, s, t, False, backend))
    out, mask = torch.ops.fastctx.residual_relu.default(y, r, s, t, True, backend)
    grad = torch.randn_like(y).requires_grad_()
    torch.library.opcheck(torch.ops.fastctx.residual_relu_backward.default,
                          (grad, y.requires_grad_(), mask, s.requires_grad_(), t.requires_grad_(), backend))


# ----------------------------------------------------------------------------- Triton launchers

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 33, 45), (1, 3, 1, 1), (2, 4, 7, 5)])
def test_triton_launchers(shape, dtype):
    kernels = triton_launchers("residual_relu")
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y, residual = randn(shape, shape, dtype=dtype)
    scale, shift = randn((shape[1],), (shape[1],), dtype=acc, seed=2)
    leaves = [t.double().requires_grad_() for t in (y, residual, scale, shift)]
    ref = reference.residual_relu(*leaves)
    grad, = randn(shape, dtype=dtype, seed=3)
    ref.backward(grad.double())

    dev = launcher_device()
    args = [t.to(dev) for t in (y, residual, scale, shift)]
    out, mask = kernels.residual_relu_fwd(*args, True)
    assert out.dtype == dtype
    check_launcher(out, ref.detach(), f"fwd {dtype} {shape}")
    # The saved bits are exactly out > 0 (the last byte's spare bits zero).
    assert torch.equal(mask.cpu(), pack_mask(out.cpu() > 0)), f"mask {dtype} {shape}"
    out_only, no_mask = kernels.residual_relu_fwd(*args, False)
    assert torch.equal(out_only, out) and no_mask.numel() == 0
    grads = kernels.residual_relu_bwd(grad.to(dev), args[0], mask, args[2], args[3])
    for name, got, leaf, want_dtype in zip(("grad_y", "grad_residual", "grad_scale", "grad_shift"),
                                           grads, leaves, (dtype, dtype, acc, acc)):
        assert got.shape == leaf.shape and got.dtype == want_dtype, name
        check_launcher(got, leaf.grad, f"bwd {name} {dtype} {shape}")


# ----------------------------------------------------------------------------- bad input

def test_bad_input_messages():
    y, r, s, t = residual_inputs(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"scale and shift must have shape \(3,\)"):
        ops.residual_relu(y, r, s[:2], t)
    with pytest.raises(ValueError, match="residual must have y's shape"):
        ops.residual_relu(y, r[:, :2], s, t)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.residual_relu(y, r.double(), s, t)
