"""upsample_add on every backend against the reference (F.interpolate bilinear, align_corners=True, + residual,
channels last): output and gradients at awkward grids (h = 1, w = 1, H = 1, a single token, fewer outputs
than tokens), B = 0, bf16 on cpu, gradcheck, opcheck, launchers, bad input. NaN/inf propagation:
tests/test_nonfinite.py. upsample_add_layer_norm (the sum + the LayerNorm over C that reads it) the same
way, plus its statistics, rows far from zero, no affine parameters and the autocast fallback."""
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


# ----------------------------------------------------------------------------- upsample_add_layer_norm

def layer_norm_inputs(batch, h, w, big_h, big_w, chans, dtype=torch.float32, device="cpu", seed=0, offset=0.0):
    tokens, residual = upsample_inputs(batch, h, w, big_h, big_w, chans, dtype, device, seed)
    weight, bias = randn((chans,), (chans,), dtype=dtype, seed=seed + 1)
    return tokens, residual + offset, weight.to(device) + 1, bias.to(device)


def both(fn):
    """The op's two outputs as one tensor, so check_fwd_bwd compares both and backpropagates into both."""
    return lambda *args: torch.cat(fn(*args), dim=-1)


def exact(fn):
    """fn in float64, cast back: the oracle of the norm's backward, whose sums cancel (few channels), so
    eager in float32 is no closer to the truth than the kernels."""
    return lambda *args: fn(*(None if t is None else t.double() for t in args)).to(args[0].dtype)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_layer_norm_matches_reference(backend, shape):
    # C + 6: a norm over 2 or 3 channels is degenerate (over 2, normed is +-1 whatever the input and its
    # input gradient is rounding noise times rstd); the grids are SHAPES'
    device = require(backend)
    check_fwd_bwd(backend, both(ops.upsample_add_layer_norm), exact(both(reference.upsample_add_layer_norm)),
                  layer_norm_inputs(*shape[:5], shape[5] + 6, device=device), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("affine", ["weight", "bias", "none"])
def test_layer_norm_without_affine_parameters(backend, affine):
    """weight or bias None (nn.LayerNorm(bias=False), elementwise_affine=False): 1 and 0, no gradient."""
    device = require(backend)
    tokens, residual, weight, bias = layer_norm_inputs(2, 3, 4, 9, 13, 24, device=device)
    weight, bias = (t if affine == name else None for name, t in (("weight", weight), ("bias", bias)))
    affine64 = [None if t is None else t.double() for t in (weight, bias)]
    check_fwd_bwd(backend, lambda t, r: both(ops.upsample_add_layer_norm)(t, r, weight, bias, 1e-6),
                  exact(lambda t, r: both(reference.upsample_add_layer_norm)(t, r, *affine64, 1e-6)),
                  (tokens, residual), torch.float32, msg=affine)


@pytest.mark.parametrize("backend", FUSED)
def test_layer_norm_rows_far_from_zero(backend):
    """Rows of mean ~300 and spread ~1. Summed as they are in fp32, the mean is off by ~1e-4 (each add rounds
    at ~28800) and E[x^2] - mean^2 loses 2 of the 7 digits: both fail here. The kernels sum x - x0, x0 the
    row's first value, then the squares about the mean."""
    device = require(backend)
    inputs = layer_norm_inputs(1, 4, 4, 16, 16, 96, device=device, offset=300.0)
    # normed alone: next to the sum (~300) the tolerance, relative to the largest value, would hide it
    check_fwd_bwd(backend, lambda *a: ops.upsample_add_layer_norm(*a)[1],
                  exact(lambda *a: reference.upsample_add_layer_norm(*a)[1]), inputs,
                  torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_layer_norm_statistics_and_sum(backend):
    """The sum is upsample_add's bit for bit; mean and rstd are the stored sum's (native_layer_norm's)."""
    device = require(backend)
    tokens, residual, weight, bias = layer_norm_inputs(2, 3, 5, 11, 17, 40, device=device)
    with fastctx.use_backend(backend):
        out, normed, mean, rstd = torch.ops.fastctx.upsample_add_layer_norm(tokens, residual, weight, bias, 1e-5,
                                                                              backend)
        plain = ops.upsample_add(tokens, residual)
    assert torch.equal(out, plain)
    expected, exp_mean, exp_rstd = torch.native_layer_norm(out.double(), [40], weight.double(), bias.double(), 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == rstd.shape == (2, 11, 17)
    assert_close(mean, exp_mean.squeeze(-1).float(), torch.float32, "mean")
    assert_close(rstd, exp_rstd.squeeze(-1).float(), torch.float32, "rstd")
    assert_close(normed, expected.float(), torch.float32, "normed")


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_layer_norm_empty_batch(backend):
    require(backend)
    tokens, residual = torch.zeros(0, 2, 3, 5, requires_grad=True), torch.zeros(0, 8, 12, 5, requires_grad=True)
    weight, bias = torch.ones(5, requires_grad=True), torch.zeros(5, requires_grad=True)
    with fastctx.use_backend(backend):
        out, normed = ops.upsample_add_layer_norm(tokens, residual, weight, bias)
        assert out.shape == normed.shape == (0, 8, 12, 5)
        (out.sum() + normed.sum()).backward()
    assert tokens.grad.shape == tokens.shape and residual.grad.shape == residual.shape
    assert torch.equal(weight.grad, torch.zeros(5)) and torch.equal(bias.grad, torch.zeros(5))


def test_layer_norm_cpu_bfloat16():
    require("cpu")
    inputs = layer_norm_inputs(2, 3, 4, 12, 16, 13, dtype=torch.bfloat16)
    check_fwd_bwd("cpu", both(ops.upsample_add_layer_norm),
                  lambda *a: both(reference.upsample_add_layer_norm)(*(t.float() for t in a)).bfloat16(),
                  inputs, torch.bfloat16)


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_layer_norm_gradcheck_float64(backend):
    require(backend, torch.float64)
    inputs = tuple(t.requires_grad_() for t in layer_norm_inputs(1, 2, 3, 5, 7, 6, dtype=torch.float64))
    fast = backend != "cpu"
    fn = both(ops.upsample_add_layer_norm)
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(fn, inputs, fast_mode=fast)
        assert torch.autograd.gradgradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize("backend", FUSED)
def test_layer_norm_opcheck(backend):
    device = require(backend)
    tokens, residual, weight, bias = (t.requires_grad_() for t in layer_norm_inputs(1, 2, 3, 5, 7, 6, device=device))
    torch.library.opcheck(torch.ops.fastctx.upsample_add_layer_norm.default,
                          (tokens, residual, weight, bias, 1e-5, backend))
    torch.library.opcheck(torch.ops.fastctx.upsample_add_layer_norm.default,
                          (tokens, residual, None, None, 1e-5, backend))
    out, _, mean, rstd = torch.ops.fastctx.upsample_add_layer_norm(tokens, residual, weight, bias, 1e-5, backend)
    grads = [t.requires_grad_() for t in randn(out.shape, out.shape, dtype=torch.float32, seed=5)]
    for affine_grads in (True, False):
        torch.library.opcheck(torch.ops.fastctx.upsample_add_layer_norm_backward.default,
                              (*(g.to(device) for g in grads), out.detach().requires_grad_(), mean, rstd, weight,
                               bias, 1e-5, affine_grads, backend))


def test_layer_norm_cpu_is_thread_count_independent():
    require("cpu")
    tokens, residual, weight, _ = layer_norm_inputs(2, 16, 16, 64, 128, 37)
    grad_out, grad_normed = torch.randn(2, 2, 64, 128, 37).unbind(0)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out, normed, mean, rstd = torch.ops.fastctx.upsample_add_layer_norm_fwd(tokens, residual, weight, None,
                                                                                     1e-5)
            results.append((out, normed, mean, rstd, *torch.ops.fastctx.upsample_add_layer_norm_bwd(
                grad_out, grad_normed, out, mean, rstd, weight, True)))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_layer_norm_in_autocast_is_eager():
    """Inside autocast the op runs eager's upsample_add then layer_norm, with autocast's dtype rules for
    layer_norm on the device (on CPU: bf16 data and fp32 parameters give bf16)."""
    require("cpu")
    tokens, residual, weight, bias = layer_norm_inputs(2, 3, 4, 12, 16, 8)
    with torch.autocast("cpu", torch.bfloat16):
        out, normed = ops.upsample_add_layer_norm(tokens.bfloat16(), residual.bfloat16(), weight, bias)
        eager_out, eager_normed = reference.upsample_add_layer_norm(tokens.bfloat16(), residual.bfloat16(), weight,
                                                                    bias)
    assert out.dtype == eager_out.dtype == torch.bfloat16 and normed.dtype == eager_normed.dtype
    assert_close(out, eager_out, torch.bfloat16)  # upsample_add rounds once, eager twice
    assert_close(normed, eager_normed, torch.bfloat16)


def test_layer_norm_matches_layer_norm_module_in_float64():
    """Against nn.LayerNorm itself (the IIWA / ULLMC modules' norm), eps included."""
    require("cpu")
    tokens, residual, _, _ = layer_norm_inputs(1, 2, 3, 7, 9, 16, dtype=torch.float64)
    norm = torch.nn.LayerNorm(16, eps=1e-6, dtype=torch.float64)
    torch.nn.init.normal_(norm.weight)
    torch.nn.init.normal_(norm.bias)
    with fastctx.use_backend("cpu"):
        out, normed = ops.upsample_add_layer_norm(tokens, residual, norm.weight, norm.bias, norm.eps)
    assert_close(normed, norm(reference.upsample_add(tokens, residual)), torch.float64)


def test_layer_norm_bad_input_messages():
    tokens, residual, weight, bias = layer_norm_inputs(2, 2, 3, 5, 7, 4)
    with pytest.raises(ValueError, match=r"weight must be of shape \[C\] = \[4\], got \(3,\)"):
        ops.upsample_add_layer_norm(tokens, residual, weight[:3], bias)
    with pytest.raises(ValueError, match=r"bias must be of shape \[C\] = \[4\] \(1-D\)"):
        ops.upsample_add_layer_norm(tokens, residual, weight, bias[None])
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        ops.upsample_add_layer_norm(tokens, residual, weight.long(), bias)
    with pytest.raises(ValueError, match="which must be >= 1"):
        ops.upsample_add_layer_norm(tokens[..., :0], residual[..., :0])
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        ops.upsample_add_layer_norm(tokens, residual, weight, bias, eps=-1.0)
    with pytest.raises(ValueError, match="must have the same B and C"):
        ops.upsample_add_layer_norm(tokens, residual[:1], weight, bias)
    with pytest.raises(ValueError, match="weight is on meta but residual is on cpu"):
        ops.upsample_add_layer_norm(tokens, residual, weight.to("meta"), bias)


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


@pytest.mark.parametrize("shape,dtype,affine,affine_grads", [
    ((1, 3, 4, 9, 13, 11), torch.float32, "wb", True),     # 4x upsampling, C = 11: ragged pixel and row tiles
    ((2, 3, 4, 5, 7, 13), torch.float64, "wb", True),      # C = 13, B = 2
    ((1, 1, 3, 1, 10, 24), torch.float16, "wb", True),     # h = H = 1, C = 24: not a power of two
    ((1, 4, 2, 3, 5, 13), torch.float32, "none", False),   # fewer outputs than tokens, no weight nor bias
    ((2, 2, 3, 6, 7, 5), torch.float32, "w", True),        # weight without bias
    ((1, 2, 2, 1, 7, 13), torch.float16, "none", True),    # H = 1, no weight, grad_weight / grad_bias anyway
    ((1, 3, 3, 7, 6, 1), torch.float64, "wb", False),      # C = 1: var 0, normed = bias
    ((1, 2, 3, 5, 5, 13), torch.float32, "wb", True),      # 7 pixel tiles: the last program's run is shorter
], ids=["4x-f32", "B2-f64", "h1-H1-f16", "down-f32-noaffine", "w-only-f32", "H1-f16-noweight", "C1-f64",
        "short-run-f32"])
def test_triton_layer_norm_launchers(shape, dtype, affine, affine_grads):
    """upsample_add_layer_norm_fwd / _bwd against float64 maths (F.interpolate + F.layer_norm of the sum
    rounded to the data dtype, autograd for the backward at the kernel's out)."""
    import torch.nn.functional as F

    kernels = triton_launchers("upsample_add")
    batch, h, w, big_h, big_w, chans = shape
    eps = 1e-5
    tokens, residual, grad_out, grad_normed = randn((batch, h, w, chans), (batch, big_h, big_w, chans),
                                                    (batch, big_h, big_w, chans), (batch, big_h, big_w, chans),
                                                    dtype=dtype, seed=5)
    weight, bias = randn((chans,), (chans,), dtype=dtype, seed=6)
    weight = weight if affine in ("w", "wb") else None
    bias = bias if affine == "wb" else None
    acc = torch.float64 if dtype == torch.float64 else torch.float32

    # forward: the sum in float64, rounded to the data dtype, then its LayerNorm in float64
    up = F.interpolate(tokens.double().permute(0, 3, 1, 2), size=(big_h, big_w), mode="bilinear",
                       align_corners=True).permute(0, 2, 3, 1)
    out_ref = residual.double() + up
    stored = out_ref.to(dtype).double()
    mean_ref = stored.mean(-1)
    rstd_ref = (stored.var(-1, unbiased=False) + eps).rsqrt()
    normed_ref = F.layer_norm(stored, (chans,), None if weight is None else weight.double(),
                              None if bias is None else bias.double(), eps)

    dev = launcher_device()
    on = (lambda t: None if t is None else t.to(dev))
    out, normed, mean, rstd = kernels.upsample_add_layer_norm_fwd(tokens.to(dev), residual.to(dev), on(weight),
                                                                  on(bias), eps)
    assert out.dtype == normed.dtype == dtype and out.shape == normed.shape == residual.shape
    assert mean.dtype == rstd.dtype == acc and mean.shape == rstd.shape == (batch, big_h, big_w)
    assert out.is_contiguous() and normed.is_contiguous()
    what = f"{dtype} {shape} {affine}"
    check_launcher(out, out_ref, f"ln fwd out {what}")
    check_launcher(normed, normed_ref, f"ln fwd normed {what}")
    check_launcher(mean, mean_ref, f"ln fwd mean {what}")
    check_launcher(rstd, rstd_ref, f"ln fwd rstd {what}")

    # backward at the kernel's out: grad_sum = grad_out + the LayerNorm's input gradient; affine sums
    x = out.cpu().double().requires_grad_()
    w_leaf = None if weight is None else weight.double().requires_grad_()
    b_leaf = None if bias is None else bias.double().requires_grad_()
    ones = torch.ones(chans, dtype=torch.float64, requires_grad=True)  # grad_weight when there is no weight
    zeros = torch.zeros(chans, dtype=torch.float64, requires_grad=True)
    y = F.layer_norm(x, (chans,), ones if w_leaf is None else w_leaf, zeros if b_leaf is None else b_leaf, eps)
    y.backward(grad_normed.double())
    grad_sum_ref = grad_out.double() + x.grad
    grad_weight_ref = (ones if w_leaf is None else w_leaf).grad
    grad_bias_ref = (zeros if b_leaf is None else b_leaf).grad

    grad_sum, grad_weight, grad_bias = kernels.upsample_add_layer_norm_bwd(
        grad_out.to(dev), grad_normed.to(dev), out, mean, rstd, on(weight), affine_grads)
    assert grad_sum.dtype == dtype and grad_sum.shape == residual.shape and grad_sum.is_contiguous()
    check_launcher(grad_sum, grad_sum_ref, f"ln bwd grad_sum {what}")
    if affine_grads:
        assert grad_weight.shape == grad_bias.shape == (chans,) and grad_weight.dtype == grad_bias.dtype == dtype
        check_launcher(grad_weight, grad_weight_ref, f"ln bwd grad_weight {what}")
        check_launcher(grad_bias, grad_bias_ref, f"ln bwd grad_bias {what}")
        again = kernels.upsample_add_layer_norm_bwd(grad_out.to(dev), grad_normed.to(dev), out, mean, rstd,
                                                    on(weight), affine_grads)
        assert all(torch.equal(a, b) for a, b in zip(again, (grad_sum, grad_weight, grad_bias)))  # fixed order
    else:
        assert grad_weight.shape == grad_bias.shape == (0,)
        assert grad_weight.dtype == grad_bias.dtype == dtype and grad_weight.device == grad_sum.device


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
