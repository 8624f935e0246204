"""gla_context on every backend against the reference: op, launchers, gradients, opcheck, bad input."""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from op_testing import (FUSED, check_fwd_bwd, check_launcher, gla_inputs, launcher_device, randn, require,
                        triton_launchers)
from tolerances import assert_close


CASES = [
    (2, 4, 7, 5, (1, 4, 9, 36)),
    (1, 3, 1, 1, (1, 9, 25)),
    (2, 16, 9, 11, (36,)),
    (3, 5, 33, 45, (1, 4)),
    (1, 70, 6, 7, (4, 9)),  # channels not a multiple of any block size
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,ch,h,w,sizes", CASES)
def test_matches_reference(backend, batch, ch, h, w, sizes):
    device = require(backend)
    inputs = gla_inputs(batch, ch, h, w, sizes, device=device)
    check_fwd_bwd(backend, lambda *t: ops.gla_context(*t, sizes), lambda *t: reference.gla_context(*t, sizes),
                  inputs, torch.float32)


@pytest.mark.parametrize("backend", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_realistic(backend):
    """mmseg's default head: C=512, 64x64, scales (1, 2, 3, 6), batch 2."""
    device = require(backend)
    sizes = (1, 4, 9, 36)
    inputs = gla_inputs(2, 512, 64, 64, sizes, device=device)
    check_fwd_bwd(backend, lambda *t: ops.gla_context(*t, sizes), lambda *t: reference.gla_context(*t, sizes),
                  inputs, torch.float32)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gradcheck_float64(backend):
    require(backend, torch.float64)
    inputs = [t.requires_grad_() for t in gla_inputs(2, 3, 4, 3, (1, 4, 9), dtype=torch.float64)]
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(lambda *t: ops.gla_context(*t, (1, 4, 9)), inputs, eps=1e-6, atol=1e-7,
                                         rtol=1e-5, fast_mode=backend == "triton")
    small = [t.requires_grad_() for t in gla_inputs(1, 2, 2, 3, (1, 4), dtype=torch.float64)]
    with fastctx.use_backend(backend):
        # second order: the reference maths on every backend. Under the interpreter (which pays per call) both
        # checks take random projections of the Jacobians (fast mode); the full ones run on cpu.
        assert torch.autograd.gradgradcheck(lambda *t: ops.gla_context(*t, (1, 4)), small, eps=1e-6, atol=1e-7,
                                            rtol=1e-5, fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    device = require(backend)
    sizes = [1, 4, 9]
    x, w, b, p = (t.requires_grad_() for t in gla_inputs(2, 4, 5, 3, sizes, device=device))
    torch.library.opcheck(torch.ops.fastctx.gla_context.default, (x, w, b, p, sizes, backend))
    grad = torch.randn_like(x).requires_grad_()
    torch.library.opcheck(torch.ops.fastctx.gla_context_backward.default, (grad, x, w, b, p, sizes, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_layouts_and_empty(backend):
    device = require(backend)
    sizes = (1, 4)
    x, w, b, p = gla_inputs(2, 6, 9, 7, sizes, device=device)
    with fastctx.use_backend(backend):
        for variant in (x.to(memory_format=torch.channels_last), x.transpose(2, 3).contiguous().transpose(2, 3)):
            assert_close(ops.gla_context(variant, w, b, p, sizes), reference.gla_context(x, w, b, p, sizes),
                         torch.float32)
    x, w, b, p = gla_inputs(0, 3, 5, 5, sizes, device=device)
    x.requires_grad_()
    with fastctx.use_backend(backend):
        z = ops.gla_context(x, w, b, p, sizes)
        assert z.shape == x.shape
        z.sum().backward()
    assert x.grad.shape == x.shape


# ----------------------------------------------------------------------------- Triton launchers

def _launcher_case(kernels, batch, chans, height, width, group_sizes, dtype):
    s_tot, groups = sum(group_sizes), len(group_sizes)
    x, weight, bias, pooled = randn((batch, groups * chans, height, width), (s_tot, chans),
                                    (batch, s_tot), (batch, chans, s_tot), dtype=dtype)
    weight = weight / chans ** 0.5  # logits of order 1: sigmoid neither flat nor saturated
    leaves = [t.double().requires_grad_() for t in (x, weight, bias, pooled)]
    ref = reference.gla_context(*leaves, group_sizes)
    grad, = randn(tuple(ref.shape), dtype=dtype, seed=1)
    ref.backward(grad.double())
    tag = f"{dtype} B{batch} C{chans} {height}x{width} {group_sizes}"
    dev = launcher_device()
    args = [t.to(dev) for t in (x, weight, bias, pooled)]
    z = kernels.gla_context_fwd(*args, group_sizes)
    assert z.shape == x.shape and z.dtype == dtype
    check_launcher(z, ref.detach(), f"fwd {tag}")
    grads = kernels.gla_context_bwd(grad.to(dev), *args, group_sizes)
    assert len(grads) == 4
    for name, got, leaf in zip(("grad_x", "grad_weight", "grad_bias", "grad_pooled"), grads, leaves):
        assert got.shape == leaf.shape and got.dtype == dtype, name
        check_launcher(got, leaf.grad, f"bwd {name} {tag}")


F32, F64 = torch.float32, torch.float64
LAUNCHER_CASES = [
    # (B, C, H, W, group_sizes, dtype); the two 33x45 cases run in one dtype to keep the file fast
    (1, 4, 33, 45, (1, 4, 9, 36), F32),  # APCNet's groups; fp32 splits 36 bins into two blocks
    (2, 20, 7, 5, (1, 9, 25), F32),      # two channel chunks, two images
    (2, 20, 7, 5, (1, 9, 25), F64),
    (1, 3, 1, 1, (1, 4, 9, 36), F32),    # 1x1 map
    (1, 3, 1, 1, (1, 4, 9, 36), F64),
    (2, 18, 7, 5, (49,), F32),           # single group, several slots (one per program)
    (2, 18, 7, 5, (49,), F64),
    (1, 3, 33, 45, (9,), F64),           # single group: programs walk several pixel tiles each
]


@pytest.mark.parametrize("batch,chans,height,width,group_sizes,dtype", LAUNCHER_CASES)
def test_triton_launchers(batch, chans, height, width, group_sizes, dtype):
    _launcher_case(triton_launchers("gla_context"), batch, chans, height, width, group_sizes, dtype)


def test_triton_launchers_multi_block(monkeypatch):
    """Every group in blocks of 16 bins: z and grad_x accumulate across blocks."""
    kernels = triton_launchers("gla_context")
    monkeypatch.setattr(kernels, "S_BLOCK_MAX", 16)
    _launcher_case(kernels, 2, 5, 7, 5, (1, 9, 25), torch.float64)


@pytest.mark.parametrize("s_block_max", [64, 16])
def test_triton_launchers_fp16(monkeypatch, s_block_max):
    """16-bit operands with fp32 accumulation; with 16-bin blocks, fp32 accumulation buffers."""
    kernels = triton_launchers("gla_context")
    monkeypatch.setattr(kernels, "S_BLOCK_MAX", s_block_max)
    _launcher_case(kernels, 1, 8, 7, 5, (1, 4, 9, 36), torch.float16)


def test_triton_backward_is_deterministic():
    kernels = triton_launchers("gla_context")
    dev = launcher_device()
    args = [t.to(dev) for t in randn((2, 6, 7, 5), (13, 3), (2, 13), (2, 3, 13), dtype=torch.float32)]
    grad, = randn((2, 6, 7, 5), dtype=torch.float32, seed=1)
    first = kernels.gla_context_bwd(grad.to(dev), *args, (4, 9))
    second = kernels.gla_context_bwd(grad.to(dev), *args, (4, 9))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad input and limits

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
    with pytest.raises(TypeError, match=r"group_sizes\[1\] must be an integer >= 1, got 4.0"):
        ops.gla_context(x, w, b, p, (1, 4.0))
    with pytest.raises(ValueError, match=r"group_sizes\[0\] must be an integer >= 1, got 0"):
        ops.gla_context(x, w, b, p, (0, 5))


def test_cuda_limits_are_declared():
    """The CUDA kernels' table sizes decline a call before launch (automatic choice moves on)."""
    op = ops.OPS["gla_context"]
    limits = op.support["cuda"].limits
    # the cuda backend's facts carry the device's compute capability ("sm", e.g. 80)
    assert limits(dict(B=2, G=4, S_max=36, C=2048, N=4096, sm=75)) is None
    assert limits(dict(B=2, G=4, S_max=192, C=2048, N=4096, sm=80)) is None
    assert "17 groups > 16" in limits(dict(B=2, G=17, S_max=36, C=2048, N=4096, sm=90))
    assert "bins > 192" in limits(dict(B=2, G=1, S_max=193, C=512, N=4096, sm=90))
    assert "64 KiB of shared memory per block of sm_75" in limits(dict(B=2, G=1, S_max=37, C=512, N=4096, sm=75))
