"""pyramid_pool on every backend against the reference: op, launchers, gradients, opcheck, bad input."""
import time

import pytest
import torch

import fastctx
from fastctx import ops, reference
from op_testing import FUSED, check_fwd_bwd, check_launcher, launcher_device, randn, require, triton_launchers
from tolerances import assert_close

# (B, C, H, W, scales)
CASES = [
    (2, 3, 33, 45, (1, 2, 3, 6)),  # overlapping bins on both axes, ragged pixel tiles
    (1, 2, 1, 1, (1, 2, 3, 6)),  # every bin is the single pixel
    (2, 4, 7, 5, (1, 3, 5)),
    (1, 3, 5, 4, (8,)),  # more bins than pixels
    (3, 1, 64, 64, (1, 2, 3, 6)),
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,ch,h,w,scales", CASES)
def test_matches_reference(backend, batch, ch, h, w, scales):
    device = require(backend)
    x = torch.randn(batch, ch, h, w, device=device)
    check_fwd_bwd(backend, lambda t: ops.pyramid_pool(t, scales), lambda t: reference.pyramid_pool(t, scales),
                  [x], torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gradcheck_float64(backend):
    require(backend, torch.float64)
    x = torch.randn(2, 2, 7, 5, dtype=torch.float64, requires_grad=True)
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(lambda t: ops.pyramid_pool(t, (1, 2, 3)), [x], eps=1e-6, atol=1e-7,
                                         rtol=1e-5)
        # second order: the reference maths on every backend; under the interpreter one random projection
        # (fast mode) of the backward's Jacobian, not all of it (the interpreter pays per call)
        assert torch.autograd.gradgradcheck(lambda t: ops.pyramid_pool(t, (1, 2)), [x], eps=1e-6, atol=1e-7,
                                            rtol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    device = require(backend)
    x = torch.randn(2, 3, 7, 5, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastctx.pyramid_pool.default, (x, [1, 2, 3], backend))
    grad = torch.randn(2, 3, 14, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastctx.pyramid_pool_backward.default, (grad, [1, 2, 3], 7, 5, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_layouts_and_empty(backend):
    device = require(backend)
    x = torch.randn(2, 6, 9, 7, device=device)
    with fastctx.use_backend(backend):
        for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            assert_close(ops.pyramid_pool(variant, (1, 3)), reference.pyramid_pool(x, (1, 3)), torch.float32)
        wide = torch.randn(2, 20, 9, 7, device=device)[:, 4:16]  # channel slice: strided batch
        assert_close(ops.pyramid_pool(wide, (2,)), reference.pyramid_pool(wide, (2,)), torch.float32)
        empty = torch.randn(0, 3, 5, 5, device=device, requires_grad=True)
        out = ops.pyramid_pool(empty, (1, 2))
        assert out.shape == (0, 3, 5)
        out.sum().backward()
        assert empty.grad.shape == empty.shape


# ----------------------------------------------------------------------------- Triton launchers

LAUNCHER_CASES = [
    (2, 3, 33, 45, (1, 2, 3, 6)),   # overlapping bins, ragged pixel tiles, split pixel ranges
    (1, 20, 7, 5, (1, 3, 5)),       # several channel blocks, scale 5 >= W
    (1, 2, 1, 1, (1, 3, 5)),        # 1x1 map: every bin is the single pixel
    (2, 3, 7, 5, (1, 2, 9)),        # scale 9 > H, W; 86 bins: two bin blocks
]


def _launcher_case(kernels, batch, chans, height, width, scales, dtype):
    x, = randn((batch, chans, height, width), dtype=dtype)
    xr = x.double().requires_grad_()
    ref = reference.pyramid_pool(xr, scales)
    grad, = randn(tuple(ref.shape), dtype=dtype, seed=1)
    ref.backward(grad.double())
    dev = launcher_device()
    check_launcher(kernels.pyramid_pool_fwd(x.to(dev), scales), ref.detach(), f"fwd {dtype} {x.shape} {scales}")
    gx = kernels.pyramid_pool_bwd(grad.to(dev), scales, height, width)
    assert gx.shape == x.shape and gx.dtype == dtype
    check_launcher(gx, xr.grad, f"bwd {dtype} {x.shape} {scales}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,chans,height,width,scales", LAUNCHER_CASES)
def test_triton_launchers(batch, chans, height, width, scales, dtype):
    _launcher_case(triton_launchers("pyramid_pool"), batch, chans, height, width, scales, dtype)


def test_triton_launchers_fp16_multi_block(monkeypatch):
    """16-bit data, bins in blocks of 16: grad_x accumulates in an fp32 buffer."""
    kernels = triton_launchers("pyramid_pool")
    monkeypatch.setattr(kernels, "S_BLOCK_MAX", 16)
    _launcher_case(kernels, 1, 4, 9, 11, (1, 2, 3, 6), torch.float16)


# ----------------------------------------------------------------------------- bad input

def test_bad_scales_are_refused_at_once():
    x = torch.randn(2, 3, 7, 9)
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"scales\[0\] = 1099511627776 is too large for a 7x9 map.*use at most 64"):
        ops.pyramid_pool(x, (2**40,))
    with pytest.raises(ValueError, match=r"scales\[0\] = 2147483648"):
        ops.pyramid_pool(x, (2**31,))
    assert time.perf_counter() - start < 1.0
    with pytest.raises(TypeError, match=r"scales\[0\] must be an integer >= 1, got 1.5 \(float\)"):
        ops.pyramid_pool(x, (1.5,))
    with pytest.raises(TypeError, match="scales must be a non-empty list or tuple of integers >= 1, got None"):
        ops.pyramid_pool(x, None)
    with pytest.raises(TypeError, match="got 2 \\(int\\)"):
        ops.pyramid_pool(x, 2)
    with pytest.raises(ValueError, match=r"scales\[0\] must be an integer >= 1, got 0"):
        ops.pyramid_pool(x, (0, 2))
    with pytest.raises(ValueError, match="an empty one"):
        ops.pyramid_pool(x, ())
    with pytest.raises(TypeError, match="got True"):
        ops.pyramid_pool(x, (True,))
    # up to max(4x the larger side, 64) is allowed (bins repeat pixels)
    assert ops.pyramid_pool(x, (64,)).shape == (2, 3, 64 * 64)
    with pytest.raises(ValueError, match="use at most 128"):
        ops.pyramid_pool(torch.randn(1, 1, 32, 5), (129,))


def test_bad_tensors():
    with pytest.raises(ValueError, match="non-empty spatial"):
        ops.pyramid_pool(torch.randn(1, 2, 0, 3), (1,))
    with pytest.raises(ValueError, match=r"x must be of shape \[B, C, H, W\]"):
        ops.pyramid_pool(torch.randn(2, 3, 4), (1,))
    with pytest.raises(TypeError, match="floating-point"):
        ops.pyramid_pool(torch.ones(1, 2, 3, 3, dtype=torch.long), (1,))


def test_forced_backend_refuses_what_it_cannot_compute():
    x = torch.randn(1, 2, 4, 4)
    with fastctx.use_backend("cuda"):
        with pytest.raises(fastctx.BackendUnavailableError, match="runs CUDA tensors, got a cpu tensor"):
            ops.pyramid_pool(x, (1, 2))
    with fastctx.use_backend("cpu"):
        with pytest.raises(fastctx.BackendUnavailableError, match="supports float32, float64 on cpu, got float16"):
            ops.pyramid_pool(x.half(), (1, 2))
    require("triton")
    with fastctx.use_backend("triton"):  # the interpreter computes in numpy: no faithful bf16
        with pytest.raises(fastctx.BackendUnavailableError, match="supports float32, float64 on cpu, got bfloat16"):
            ops.pyramid_pool(x.bfloat16(), (1, 2))
