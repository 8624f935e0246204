"""window_pool on every backend against the reference (ULLMC's AvgPool2d over the padded map + the sine
encoding): output and gradients at awkward shapes, B = 0, bf16 on cpu, gradcheck, opcheck, launchers,
bad input. NaN/inf propagation: tests/test_nonfinite.py."""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from fastctx.reference.window_attention import sine_position_encoding
from op_testing import check_fwd_bwd, check_launcher, launcher_device, randn, require, triton_launchers
from tolerances import assert_close

# No CUDA kernels yet: the cuda backend joins when they land.
FUSED = ["cpu", "triton"]

# (B, Hp, Wp, C, window): C not a multiple of any vector width; a 1x1 and a one-row token grid; the
# windows IIWA uses (4x8, 7x7) and a 1x1 window (the identity plus pos).
SHAPES = [
    (2, 8, 16, 13, (4, 8)),   # 2x2 tokens
    (1, 14, 21, 5, (7, 7)),   # 2x3 tokens, B = 1
    (2, 4, 24, 3, (4, 8)),    # one token row (Hg = 1)
    (1, 8, 8, 6, (4, 8)),     # one token column (Wg = 1)
    (3, 2, 3, 4, (1, 1)),
]


def pool_inputs(batch, height, width, chans, window, dtype=torch.float32, device="cpu", seed=0):
    x, pos = randn((batch, height, width, chans), (height // window[0], width // window[1], chans),
                   dtype=dtype, seed=seed)
    return x.to(device), pos.to(device)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s[:4])) + f"-w{s[4][0]}x{s[4][1]}")
@pytest.mark.parametrize("with_pos", [True, False])
def test_matches_reference(backend, shape, with_pos):
    device = require(backend)
    *dims, window = shape
    x, pos = pool_inputs(*dims, window, device=device)
    if with_pos:
        check_fwd_bwd(backend, lambda a, p: ops.window_pool(a, window, p),
                      lambda a, p: reference.window_pool(a, window, p), [x, pos], torch.float32)
    else:
        check_fwd_bwd(backend, lambda a: ops.window_pool(a, window), lambda a: reference.window_pool(a, window),
                      [x], torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_float32_sine_encoding_on_float64_map(backend):
    """The released call: the float32 sine grid added to float64 tokens (cast to x's dtype), its gradient
    back in float32."""
    require(backend, torch.float64)
    x, _ = pool_inputs(2, 8, 16, 8, (4, 8), dtype=torch.float64)
    pos = sine_position_encoding(2, 2, 8)
    check_fwd_bwd(backend, lambda a, p: ops.window_pool(a, (4, 8), p),
                  lambda a, p: reference.window_pool(a, (4, 8), p), [x, pos], torch.float64)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_empty_batch(backend):
    require(backend)
    x = torch.zeros(0, 8, 16, 5, requires_grad=True)
    pos = torch.randn(2, 2, 5, requires_grad=True)
    with fastctx.use_backend(backend):
        out = ops.window_pool(x, (4, 8), pos)
        assert out.shape == (0, 2, 2, 5)
        out.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(pos.grad, torch.zeros_like(pos))


def test_cpu_bfloat16():
    """The cpu kernel's bfloat16 path: sums in fp32, one rounding, against the reference in fp32."""
    require("cpu")
    x, pos = pool_inputs(2, 14, 14, 13, (7, 7), dtype=torch.bfloat16)
    check_fwd_bwd("cpu", lambda a, p: ops.window_pool(a, 7, p),
                  lambda a, p: reference.window_pool(a.float(), 7, p.float()).bfloat16(), [x, pos], torch.bfloat16)


def test_cpu_bf16_autocast():
    """IIWA under CPU autocast: bf16 map, fp32 sine grid. Not an autocast op: the bf16 kernel runs (pos cast to
    bf16, as released), forward and backward; the fp32 maths on the same values is the oracle."""
    require("cpu")
    x, pos = pool_inputs(2, 8, 16, 12, (4, 8))
    x = x.bfloat16().requires_grad_()
    pos = pos.requires_grad_()
    with torch.autocast("cpu", torch.bfloat16), torch.profiler.profile() as prof:
        out = ops.window_pool(x, (4, 8), pos)
        out.backward(torch.ones_like(out))
    calls = {e.name for e in prof.events()}
    assert {"fastctx::window_pool_fwd", "fastctx::window_pool_bwd"} <= calls
    assert out.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16 and pos.grad.dtype == torch.float32
    ref_x, ref_pos = x.detach().float().requires_grad_(), pos.detach().requires_grad_()
    expected = reference.window_pool(ref_x, (4, 8), ref_pos.bfloat16())
    expected.backward(torch.ones_like(expected))
    assert_close(out, expected, torch.bfloat16, "output")
    assert_close(x.grad, ref_x.grad, torch.bfloat16, "grad of x")
    assert_close(pos.grad, ref_pos.grad, torch.bfloat16, "grad of pos")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_gradcheck_float64(backend):
    require(backend, torch.float64)
    x, pos = (t.requires_grad_() for t in pool_inputs(2, 4, 6, 2, (2, 3), dtype=torch.float64))
    fast = backend != "cpu"  # random projections of the Jacobians (the interpreter is slow); the full ones on cpu
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, p: ops.window_pool(a, (2, 3), p), (x, pos), fast_mode=fast)
        assert torch.autograd.gradgradcheck(lambda a, p: ops.window_pool(a, (2, 3), p), (x, pos), fast_mode=fast)


@pytest.mark.parametrize("backend", FUSED)
def test_opcheck(backend):
    device = require(backend)
    x, pos = (t.requires_grad_() for t in pool_inputs(2, 4, 6, 3, (2, 3), device=device))
    torch.library.opcheck(torch.ops.fastctx.window_pool.default, (x, pos, [2, 3], backend))
    torch.library.opcheck(torch.ops.fastctx.window_pool.default, (x, None, [2, 3], backend))
    grad = torch.randn(2, 2, 2, 3, device=device).requires_grad_()
    for pos_grad in (True, False):
        torch.library.opcheck(torch.ops.fastctx.window_pool_backward.default, (grad, [2, 3], pos_grad, backend))


def test_cpu_is_thread_count_independent():
    require("cpu")
    x, pos = pool_inputs(3, 32, 64, 37, (4, 8))
    grad = torch.randn(3, 8, 8, 37)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append((torch.ops.fastctx.window_pool_fwd(x, pos, [4, 8]),
                            *torch.ops.fastctx.window_pool_bwd(grad, [4, 8], True)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ----------------------------------------------------------------------------- Triton launchers

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(2, 8, 16, 13, (4, 8)), (1, 7, 14, 9, (7, 7))])
def test_triton_launchers(shape, dtype):
    kernels = triton_launchers("window_pool")
    batch, height, width, chans, window = shape
    x, pos = pool_inputs(batch, height, width, chans, window, dtype=dtype)
    grad, = randn((batch, height // window[0], width // window[1], chans), dtype=dtype, seed=3)
    leaves = [t.double().requires_grad_() for t in (x, pos)]
    ref = reference.window_pool(leaves[0], window, leaves[1])
    ref.backward(grad.double())

    dev = launcher_device()
    out = kernels.window_pool_fwd(x.to(dev), pos.to(dev), window)
    assert out.dtype == dtype and out.is_contiguous()
    check_launcher(out, ref.detach(), f"fwd {dtype} {shape}")
    check_launcher(kernels.window_pool_fwd(x.to(dev), None, window), reference.window_pool(x.double(), window),
                   f"fwd without pos {dtype} {shape}")
    grad_x, grad_pos = kernels.window_pool_bwd(grad.to(dev), window, True)
    check_launcher(grad_x, leaves[0].grad, f"bwd grad_x {dtype} {shape}")
    check_launcher(grad_pos, leaves[1].grad, f"bwd grad_pos {dtype} {shape}")
    grad_x_only, no_pos = kernels.window_pool_bwd(grad.to(dev), window, False)
    assert torch.equal(grad_x_only, grad_x) and no_pos.numel() == 0


# ----------------------------------------------------------------------------- bad input

def test_bad_input_messages():
    x, pos = pool_inputs(1, 8, 16, 4, (4, 8))
    with pytest.raises(ValueError, match=r"\(8, 15\) must be positive multiples of the window \(4, 8\)"):
        ops.window_pool(x[:, :, :15], (4, 8))
    with pytest.raises(ValueError, match=r"pos must be \[Hg, Wg, C\] = \[2, 2, 4\]"):
        ops.window_pool(x, (4, 8), pos[:, :1])
    with pytest.raises(ValueError, match=r"pos must be of shape \[Hg, Wg, C\] = \[2, 2, 4\] \(3-D\)"):
        ops.window_pool(x, (4, 8), pos[None])
    with pytest.raises(ValueError, match=r"x must be of shape \[B, Hp, Wp, C\].*\(4-D\), got shape \(8, 16, 4\)"):
        ops.window_pool(x[0], (4, 8))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        ops.window_pool(x.long(), (4, 8))
    with pytest.raises(TypeError, match="window must be an int or a pair of ints"):
        ops.window_pool(x, (4, 8, 1))
    with pytest.raises(ValueError, match="window must be >= 1"):
        ops.window_pool(x, 0)
    with pytest.raises(ValueError, match="pos is on meta but x is on cpu"):
        ops.window_pool(x, (4, 8), pos.to("meta"))
