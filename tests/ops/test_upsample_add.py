"""upsample_add on every backend against the reference (F.interpolate bilinear, align_corners=True, + residual,
channels last): output and gradients at awkward grids (h = 1, w = 1, H = 1, a single token, fewer outputs
than tokens), B = 0, bf16 on cpu, gradcheck, opcheck, launchers, bad input. NaN/inf propagation:
tests/test_nonfinite.py."""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from op_testing import check_fwd_bwd, check_launcher, launcher_device, randn, require, triton_launchers
from tolerances import assert_close

# No CUDA kernels yet: the cuda backend joins when they land.
FUSED = ["cpu", "triton"]

# (B, h, w, H, W, C)
SHAPES = [
    (1, 3, 4, 9, 13, 11),    # IIWA's 4x4 windows (scale exactly 4); C not a multiple of any vector width
    (1, 3, 3, 15, 15, 5),    # 7x7 windows (scale exactly 7), B = 1
    (1, 1, 5, 7, 9, 3),      # one token row (h = 1)
    (2, 4, 1, 1, 6, 5),      # one token column and one output row (H = 1)
    (1, 1, 1, 3, 2, 4),      # one token
    (1, 5, 3, 4, 7, 2),      # more token rows than output rows: taps skip some
]


def upsample_inputs(batch, h, w, big_h, big_w, chans, dtype=torch.float32, device="cpu", seed=0):
    tokens, residual = randn((batch, h, w, chans), (batch, big_h, big_w, chans), dtype=dtype, seed=seed)
    return tokens.to(device), residual.to(device)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_matches_reference(backend, shape):
    device = require(backend)
    check_fwd_bwd(backend, ops.upsample_add, reference.upsample_add, upsample_inputs(*shape, device=device),
                  torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_batch(backend):
    require(backend)
    tokens = torch.zeros(0, 2, 3, 5, requires_grad=True)
    residual = torch.zeros(0, 8, 12, 5, requires_grad=True)
    with fastctx.use_backend(backend):
        out = ops.upsample_add(tokens, residual)
        assert out.shape == (0, 8, 12, 5)
        out.sum().backward()
    assert tokens.grad.shape == tokens.shape and residual.grad.shape == residual.shape


@pytest.mark.parametrize("backend", FUSED)
def test_residual_gradient_is_the_incoming_gradient(backend):
    """grad_residual is grad itself: no copy, no kernel."""
    device = require(backend)
    tokens, residual = (t.requires_grad_() for t in upsample_inputs(1, 2, 3, 5, 7, 4, device=device))
    with fastctx.use_backend(backend):
        out = ops.upsample_add(tokens, residual)
    grad = torch.randn_like(out)
    grad_tokens, grad_residual = torch.autograd.grad(out, (tokens, residual), grad)
    assert grad_residual.data_ptr() == grad.data_ptr()


def test_mixed_dtypes_in_autocast():
    """IIWA under CPU autocast: bf16 attention tokens onto the fp32 residual stream -> fp32, as eager (which
    upsamples in bf16 first; the op upsamples the same values in fp32: the fp32 maths is the oracle)."""
    require("cpu")
    tokens, residual = upsample_inputs(2, 3, 4, 12, 16, 8)
    with torch.autocast("cpu", torch.bfloat16):
        out = ops.upsample_add(tokens.bfloat16(), residual)
        eager = reference.upsample_add(tokens.bfloat16(), residual)
    assert out.dtype == eager.dtype == torch.float32
    assert_close(out, reference.upsample_add(tokens.bfloat16().float(), residual), torch.float32)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.upsample_add(tokens.bfloat16(), residual)


def test_cpu_bfloat16():
    """The cpu kernel's bfloat16 path: fp32 arithmetic, one rounding, against the reference in fp32."""
    require("cpu")
    check_fwd_bwd("cpu", ops.upsample_add, lambda t, r: reference.upsample_add(t.float(), r.float()).bfloat16(),
                  upsample_inputs(2, 3, 4, 12, 16, 13, dtype=torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gradcheck_float64(backend):
    require(backend, torch.float64)
    inputs = tuple(t.requires_grad_() for t in upsample_inputs(1, 2, 3, 5, 7, 3, dtype=torch.float64))
    fast = backend != "cpu"  # random projections of the Jacobians (the interpreter is slow); the full ones on cpu
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(ops.upsample_add, inputs, fast_mode=fast)
        assert torch.autograd.gradgradcheck(ops.upsample_add, inputs, fast_mode=fast)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    device = require(backend)
    tokens, residual = (t.requires_grad_() for t in upsample_inputs(1, 2, 3, 5, 7, 3, device=device))
    torch.library.opcheck(torch.ops.fastctx.upsample_add.default, (tokens, residual, backend))
    grad = torch.randn(1, 5, 7, 3, device=device).requires_grad_()
    torch.library.opcheck(torch.ops.fastctx.upsample_add_backward.default, (grad, 2, 3, backend))


def test_cpu_is_thread_count_independent():
    require("cpu")
    tokens, residual = upsample_inputs(2, 16, 16, 64, 128, 37)
    grad = torch.randn(2, 64, 128, 37)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((torch.ops.fastctx.upsample_add_fwd(tokens, residual),
                            torch.ops.fastctx.upsample_add_bwd(grad, 16, 16)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ----------------------------------------------------------------------------- Triton launchers

@pytest.mark.parametrize("shape,dtype", [((1, 3, 4, 9, 13, 11), torch.float32), ((1, 3, 4, 9, 13, 11), torch.float64),
                                         ((1, 1, 3, 1, 10, 9), torch.float16), ((1, 4, 2, 3, 5, 3), torch.float32)],
                         ids=["4x-f32", "4x-f64", "h1-H1-f16", "down-f32"])
def test_triton_launchers(shape, dtype):
    kernels = triton_launchers("upsample_add")
    tokens, residual = upsample_inputs(*shape, dtype=dtype)
    grad, = randn(residual.shape, dtype=dtype, seed=3)
    leaves = [t.double().requires_grad_() for t in (tokens, residual)]
    ref = reference.upsample_add(*leaves)
    ref.backward(grad.double())

    dev = launcher_device()
    out = kernels.upsample_add_fwd(tokens.to(dev), residual.to(dev))
    assert out.dtype == dtype and out.is_contiguous()
    check_launcher(out, ref.detach(), f"fwd {dtype} {shape}")
    grad_tokens = kernels.upsample_add_bwd(grad.to(dev), *tokens.shape[1:3])
    assert grad_tokens.shape == tokens.shape and grad_tokens.dtype == dtype
    check_launcher(grad_tokens, leaves[0].grad, f"bwd {dtype} {shape}")


# ----------------------------------------------------------------------------- bad input

def test_bad_input_messages():
    tokens, residual = upsample_inputs(2, 2, 3, 5, 7, 4)
    with pytest.raises(ValueError, match=r"must have the same B and C, got \(2, 2, 3, 4\) and \(1, 5, 7, 4\)"):
        ops.upsample_add(tokens, residual[:1])
    with pytest.raises(ValueError, match=r"must have the same B and C"):
        ops.upsample_add(tokens, residual[..., :3])
    with pytest.raises(ValueError, match=r"tokens must be of shape \[B, h, w, C\].*\(4-D\)"):
        ops.upsample_add(tokens[0], residual)
    with pytest.raises(ValueError, match="height and width >= 1"):
        ops.upsample_add(tokens[:, :0], residual)
    with pytest.raises(TypeError, match="residual must be a floating-point tensor"):
        ops.upsample_add(tokens, residual.long())
    with pytest.raises(TypeError, match="share one dtype"):
        ops.upsample_add(tokens.double(), residual)
    with pytest.raises(ValueError, match="residual is on meta but tokens is on cpu"):
        ops.upsample_add(tokens, residual.to("meta"))
