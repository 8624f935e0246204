"""encoding on every backend against mmseg's maths: op, launchers, gradients, opcheck, bad input, limits.

The Triton launchers run under the interpreter with 16 x 16 tiles and few
programs, so the small launcher shapes still cover several pixel tiles per
program (the slot accumulate path), partial tiles and D chunks (masks), K not a
power of two and K < 16 (padded codewords), N = 1 and D = 1.
"""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from op_testing import FUSED, check_fwd_bwd, device_of, enc_inputs, launcher_device, require, triton_launchers
from tolerances import assert_close


def _kernels():
    return triton_launchers("encoding")


def _launch_interpret() -> bool:
    from fastctx.kernels import _launch

    return _launch.INTERPRET


ENC_CASES = [
    (2, 16, 5, 7, 8),
    (1, 3, 1, 1, 5),
    (3, 1, 4, 4, 1),
    (2, 40, 9, 5, 32),
    (1, 70, 3, 11, 64),  # K at its register-tile limit, D off every block size
    (2, 2048, 2, 3, 32),  # the widest features the layer supports
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,ch,h,w,codes", ENC_CASES)
def test_encoding(backend, batch, ch, h, w, codes):
    require(backend)
    inputs = enc_inputs(batch, ch, h, w, codes, device=device_of(backend))
    check_fwd_bwd(backend, ops.encoding, reference.encoding, inputs, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_pixels_layout(backend):
    """[B, N, D] input (no NCHW map) and a channels_last map."""
    require(backend)
    x, c, s = enc_inputs(2, 12, 6, 5, 8, device=device_of(backend))
    pixels = x.flatten(2).transpose(1, 2).contiguous()
    check_fwd_bwd(backend, ops.encoding, reference.encoding, [pixels, c, s], torch.float32)
    cl = x.to(memory_format=torch.channels_last)
    with fastctx.use_backend(backend):
        assert_close(ops.encoding(cl, c, s), reference.encoding(x, c, s), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_large_norm_near_codewords(backend):
    """||x|| ~ 1e3 with codewords within O(1): ||x||^2 - 2x.c + ||c||^2 cancels catastrophically in fp32."""
    require(backend)
    x, c, s = enc_inputs(2, 32, 6, 6, 8, dtype=torch.float64, offset=300.0)
    expected = reference.encoding(x, c, s)  # float64 oracle on the same values
    with fastctx.use_backend(backend):
        got = ops.encoding(x.float().to(device_of(backend)), c.float().to(device_of(backend)),
                           s.float().to(device_of(backend)))
    # fp32 inputs of magnitude 300 carry ~3e-5 absolute rounding: compare at that resolution
    assert torch.allclose(got.double().cpu(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_encoding_realistic_cpu():
    """D=512, K=32 at a 32x64 map vs a float64 oracle (the two-GEMM form; mmseg's would need GiBs).

    E, grad_x and grad_codewords are held to the fp32 tolerance. grad_scale =
    sum_i dL_ik ||x_i - c_k||^2 is ill-conditioned in fp32 for any
    implementation when the assignment is peaked (dL = A (dA - sum_j A_j dA_j)
    cancels where A is near one-hot), so it must be as accurate as PyTorch's
    own fp32 autograd of the same maths -- a wrong formula or sign would be
    off by 100%, not by fp32 rounding.
    """
    require("cpu")
    x, c, s = enc_inputs(2, 512, 32, 64, 32)
    leaves = [t.clone().requires_grad_() for t in (x, c, s)]
    with fastctx.use_backend("cpu"):
        out = ops.encoding(*leaves)
    ref_leaves = [t.double().requires_grad_() for t in (x, c, s)]
    expected = reference.encoding_two_gemm(*ref_leaves)
    eager32 = [t.clone().requires_grad_() for t in (x, c, s)]
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad.float())
    expected.backward(grad)
    reference.encoding_two_gemm(*eager32).backward(grad.float())
    assert_close(out, expected.float(), torch.float32, "forward")
    for name, a, b in zip(("x", "codewords"), leaves, ref_leaves):
        assert_close(a.grad, b.grad.float(), torch.float32, f"grad of {name}")
    ours = (leaves[2].grad.double() - ref_leaves[2].grad).abs().max()
    eager = (eager32[2].grad.double() - ref_leaves[2].grad).abs().max()
    assert ours <= eager, f"grad of scale: max error {ours:.3g}, PyTorch fp32 two-GEMM {eager:.3g}"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("channels_first", [True, False])
def test_encoding_gradcheck_float64(backend, channels_first):
    """Includes the codeword gradient (one widely used CPU implementation returns it negated)."""
    require(backend, torch.float64)
    x, c, s = enc_inputs(2, 3, 3, 2, 4, dtype=torch.float64)
    if not channels_first:
        x = x.flatten(2).transpose(1, 2).contiguous()
    inputs = [t.requires_grad_() for t in (x, c, s)]
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(ops.encoding, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_opcheck(backend):
    require(backend)
    x, c, s = enc_inputs(2, 6, 3, 4, 5, device=device_of(backend))
    for channels_first, xx in ((True, x.flatten(2)), (False, x.flatten(2).transpose(1, 2).contiguous())):
        torch.library.opcheck(torch.ops.fastctx.encoding.default,
                              (xx.requires_grad_(), c.requires_grad_(), s.requires_grad_(), channels_first, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_empty(backend):
    require(backend)
    x, c, s = enc_inputs(0, 6, 3, 4, 5, device=device_of(backend))
    x.requires_grad_()
    c.requires_grad_()
    with fastctx.use_backend(backend):
        e = ops.encoding(x, c, s)
        assert e.shape == (0, 5, 6)
        e.sum().backward()
    assert x.grad.shape == x.shape and torch.all(c.grad == 0)


def test_encoding_bad_input():
    x, c, s = enc_inputs(2, 6, 3, 4, 5)
    with pytest.raises(ValueError, match=r"has D = 6 channels but codewords are \[K, D\] = \(5, 7\)"):
        ops.encoding(x, torch.randn(5, 7), s)
    with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
        ops.encoding(x, c, s[:3])
    with pytest.raises(ValueError, match=r"\[B, D, H, W\] or \[B, N, D\]"):
        ops.encoding(x[0, 0], c, s)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.encoding(x, c.double(), s)
    with pytest.raises(ValueError, match="one device"):
        ops.encoding(x, c.to("meta"), s)


def test_encoding_deterministic():
    require("cpu")
    x, c, s = enc_inputs(2, 64, 16, 16, 32)
    with fastctx.use_backend("cpu"):
        a, b = ops.encoding(x, c, s), ops.encoding(x, c, s)
    assert torch.equal(a, b)



@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_double_backward_float64(backend):
    """Gradient penalties: the backward op is differentiable (second order from the reference maths)."""
    require(backend, torch.float64)
    x, c, s = enc_inputs(1, 3, 2, 2, 3, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (x, c, s)]
    with fastctx.use_backend(backend):
        assert torch.autograd.gradgradcheck(ops.encoding, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)



@pytest.mark.parametrize("backend", FUSED)
def test_backward_near_one_hot_assignments(backend):
    """Peaked assignments: dL = A (dA - sum_j A_j dA_j) cancels where A is near one-hot unless dA is shifted
    by the winner's value; fp32 grad_scale and grad_codewords then stay within 1e-5 of float64."""
    device = require(backend)
    g = torch.Generator().manual_seed(5)
    k, d = 8, 16
    codewords = torch.randn(k, d, generator=g, dtype=torch.float64) * 0.5
    owner = torch.randint(0, k, (2, 60), generator=g)
    x = codewords[owner] + 0.05 * torch.randn(2, 60, d, generator=g, dtype=torch.float64)  # [B, N, D] pixels
    # 1 - max_k A ~ 1e-8 (median): peaked, yet far from fp32 underflow, so grad_scale is not noise. Without
    # the shift the fp32 error is ~4e-5 here (eager fp32 autograd: the same).
    scale = -(torch.rand(k, generator=g, dtype=torch.float64) + 1.0) * 3
    grad = torch.randn(2, k, d, generator=g, dtype=torch.float64)
    x, codewords, scale, grad = (t.float().double() for t in (x, codewords, scale, grad))  # fp32 values, exactly
    want = [t.clone().requires_grad_() for t in (x, codewords, scale)]
    reference.encoding(*want).backward(grad)
    got = [t.float().to(device).requires_grad_() for t in (x, codewords, scale)]
    with fastctx.use_backend(backend):
        ops.encoding(*got).backward(grad.float().to(device))
    for name, a, b in (("codewords", got[1], want[1]), ("scale", got[2], want[2])):
        err = ((a.grad.double().cpu() - b.grad).abs().max() / b.grad.abs().max()).item()
        assert err <= 1e-5, f"grad of {name}: relative error {err:.2e} > 1e-5"


def _spread_inputs(spread, seed=0):
    """fp32 values (held as float64) of features near codewords spread far apart: K = 8 codewords at
    `spread` * randn, of which (0, 1), (2, 3), (4, 5) are pairs 0.5 * randn apart (a pixel near a pair has
    two entries that matter), features 0.5 * randn from one codeword, scales that keep the near logits O(1)."""
    g = torch.Generator().manual_seed(seed)
    k, d, noise = 8, 40, 0.5
    codewords = torch.randn(k, d, generator=g, dtype=torch.float64) * spread
    codewords[1:6:2] = codewords[0:6:2] + noise * torch.randn(3, d, generator=g, dtype=torch.float64)
    owner = torch.randint(0, k, (2, 45), generator=g)
    x = codewords[owner] + noise * torch.randn(2, 45, d, generator=g, dtype=torch.float64)  # [B, N, D]
    scale = -(torch.rand(k, generator=g, dtype=torch.float64) + 0.1) * 0.1
    grad = torch.randn(2, k, d, generator=g, dtype=torch.float64)
    return [t.float().double() for t in (x, codewords, scale, grad)]


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
@pytest.mark.parametrize("spread", [1, 30, 100, 1000])
@pytest.mark.parametrize("backend", FUSED)
def test_spread_codewords(backend, spread, channels_first):
    """Codewords far from their mean: centring does not help the near entries, whose expanded distance
    ||x'||^2 - 2 x'.c' + ||c'||^2 and residual x' - c' are mostly rounding error (the expanded form gives
    fp32 E off by 2e-4 relative at spread 30, 0.2 at 1000). The CPU kernel redoes those entries, the Triton
    kernels those pixels, from the raw values; E and every gradient must meet the fp32 tolerance against
    float64 on the same fp32 values (eager fp32's own error: ~1e-7). Without a GPU the CUDA kernels' fix is
    checked by the emulation driver (tests/cuda_emu/encoding.cpp, "spread" cases)."""
    device = require(backend)
    x, codewords, scale, grad = _spread_inputs(spread)
    if channels_first:
        x = x.transpose(1, 2).reshape(2, 40, 5, 9).contiguous()
    want = [t.clone().requires_grad_() for t in (x, codewords, scale)]
    expected = reference.encoding(*want)
    expected.backward(grad)
    got = [t.float().to(device).requires_grad_() for t in (x, codewords, scale)]
    with fastctx.use_backend(backend):
        out = ops.encoding(*got)
    out.backward(grad.float().to(device))
    assert_close(out.cpu(), expected.float(), torch.float32, f"E, spread {spread}")
    for name, a, b in zip(("x", "codewords", "scale"), got, want):
        assert_close(a.grad.cpu(), b.grad.float(), torch.float32, f"grad of {name}, spread {spread}")


def test_triton_flags_only_pixels_the_expansion_cannot_resolve(monkeypatch):
    """The Triton tile kernels hand a pixel to the direct kernels only when its expansion fails: none with
    clustered codewords at ||x|| ~ 1e3 (the common case must keep the fast path), some at spread 100;
    forward and backward alike, every flag byte written as 0 or 1."""
    kernels = _kernels()
    seen = {}
    for name in ("FWD_DIRECT", "BWD_DIRECT"):
        real = getattr(kernels, name)

        def spy(dtype, grid, x, c, scale, *rest, _real=real, _name=name, **constexprs):
            flags = rest[0] if _name == "FWD_DIRECT" else rest[1]
            seen[_name] = flags.clone()
            return _real(dtype, grid, x, c, scale, *rest, **constexprs)

        monkeypatch.setattr(kernels, name, spy)
    dev = launcher_device()
    clustered = enc_inputs(2, 16, 5, 7, 8, offset=1e3 / 4)  # ||x|| ~ 1e3, codewords within O(1)
    spread = _spread_inputs(100)[:3]
    for inputs, want_any in ((clustered, False), (spread, True)):
        x, c, s = (t.float().to(dev) for t in inputs)
        cf = x.dim() == 4
        x = x.flatten(2) if cf else x
        kernels.encoding_fwd(x, c, s, cf)
        kernels.encoding_bwd(torch.randn(x.shape[0], c.shape[0], c.shape[1], device=dev), x, c, s, cf)
        for name, flags in seen.items():
            assert set(flags.unique().tolist()) <= {0, 1}, f"{name}: flag bytes not all written"
            assert bool(flags.any()) == want_any, f"{name}: {int(flags.sum())} of {flags.numel()} pixels flagged"


# ----------------------------------------------------------------------------- backend selection

def test_k128_on_a_cuda_tensor_runs_on_a_backend_that_supports_it(monkeypatch):
    """Triton and CUDA hold K <= 64 codewords: automatic selection skips both (one warning per reason)
    and runs the reference; K = 64 still takes Triton."""
    op = ops.OPS["encoding"]
    # as on an sm_90 machine with every backend built (selection is metadata only, so testable here)
    monkeypatch.setattr(op, "built", lambda backend, device: None)
    monkeypatch.setattr("fastctx.ops._dispatch.cuda_capability", lambda device: 90)
    cuda = torch.device("cuda")
    facts = dict(B=2, N=4096, K=128, D=512)
    with pytest.warns(fastctx.BackendFallbackWarning) as record:
        assert op.choose(cuda, torch.float32, facts) == "reference"
    messages = [str(w.message) for w in record]
    assert any("'triton'" in m and "K = 128 codewords > 64" in m for m in messages), messages
    assert any("'cuda'" in m and "K = 128 codewords > 64" in m for m in messages), messages
    with warnings_as_errors():  # the same reasons again: no second warning
        assert op.choose(cuda, torch.float32, facts) == "reference"
    assert op.choose(cuda, torch.float32, dict(facts, K=64)) == "triton"
    # Triton's batch limit alone sends the call to the CUDA kernels
    with pytest.warns(fastctx.BackendFallbackWarning, match="batch = 70000 exceeds"):
        assert op.choose(cuda, torch.float16, dict(facts, K=32, B=70000)) == "reference"
    assert op.choose(cuda, torch.float16, dict(facts, K=32, N=2**22, D=2048)) == "cuda"
    # an sm_75 GPU: the CUDA backward does not fit in its shared memory
    monkeypatch.setattr("fastctx.ops._dispatch.cuda_capability", lambda device: 75)
    with pytest.warns(fastctx.BackendFallbackWarning, match="sm_75 allows 64 KiB"):
        assert op.choose(cuda, torch.float16, dict(facts, K=32, N=2**22, D=2048)) == "reference"


def test_forced_backend_names_the_limit():
    require("triton")
    x, c, s = enc_inputs(1, 4, 3, 3, 65)
    with fastctx.use_backend("triton"):
        with pytest.raises(fastctx.BackendUnavailableError, match="cannot run encoding: K = 65 codewords > 64"):
            ops.encoding(x, c, s)


@pytest.mark.gpu
def test_k128_on_gpu():
    x, c, s = enc_inputs(2, 16, 5, 7, 128, device="cuda")
    with pytest.warns(fastctx.BackendFallbackWarning):
        check_fwd_bwd("auto", ops.encoding, reference.encoding, [x, c, s], torch.float32)


def test_cpu_backend_takes_any_k():
    require("cpu")
    check_fwd_bwd("cpu", ops.encoding, reference.encoding, enc_inputs(1, 8, 4, 5, 130), torch.float32)


class warnings_as_errors:
    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)

# ----------------------------------------------------------------------------- Triton launchers

# Errors are measured relative to the largest magnitude of the reference
# tensor (the kernels sum in another order, so elementwise relative error
# is meaningless where a result is ~0).
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
MAX_ERRORS: dict[str, float] = {}


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.abs().max().item()
    return (got.double() - want.double()).abs().max().item() / max(scale, 1e-30)


def _check(name: str, got: torch.Tensor, want: torch.Tensor, tol: float) -> None:
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{name}: dtype {got.dtype} != {want.dtype}"
    err = _rel_err(got, want)
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), err)
    assert err <= tol, f"{name}: max error {err:.3e} (relative to max |ref|) > {tol:.1e}"


def _inputs(batch, n, d, k, dtype, seed=0, x_offset=0.0, c_offset=0.0, c_std=0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, n, d, generator=g, dtype=torch.float64) + x_offset
    c = torch.randn(k, d, generator=g, dtype=torch.float64) * c_std + c_offset
    s = -torch.rand(k, generator=g, dtype=torch.float64)  # mmseg's init range [-1, 0)
    grad = torch.randn(batch, k, d, generator=g, dtype=torch.float64)
    return [t.to(dtype) for t in (x, c, s, grad)]


def _launcher_reference(x, c, s, grad, ref_dtype=None):
    """E and (grad_x, grad_c, grad_s) of the mmseg maths by autograd, in ref_dtype (default x's)."""
    ref_dtype = ref_dtype or x.dtype
    xr, cr, sr = (t.detach().to(ref_dtype).requires_grad_() for t in (x, c, s))
    e = reference.encoding(xr, cr, sr)
    gx, gc, gs = torch.autograd.grad(e, (xr, cr, sr), grad.to(ref_dtype))
    return e.detach(), gx, gc, gs


def _run(x, c, s, grad, channels_first):
    """The launchers on x given as [B, N, D] pixels; x / grad_x in the requested layout."""
    dev = lambda t: t.to(launcher_device())  # noqa: E731
    x_in = x.transpose(1, 2).contiguous() if channels_first else x
    e = _kernels().encoding_fwd(dev(x_in), dev(c), dev(s), channels_first)
    gx, gc, gs = _kernels().encoding_bwd(dev(grad), dev(x_in), dev(c), dev(s), channels_first)
    assert gx.shape == x_in.shape
    for t in (e, gx, gc, gs):  # outputs are dense, as the op's fake kernel promises
        assert t.is_contiguous()
    if channels_first:
        gx = gx.transpose(1, 2)
    return e.cpu(), gx.cpu(), gc.cpu(), gs.cpu()


def _compare(tag, got, want, tol):
    for name, g, w in zip(("E", "grad_x", "grad_c", "grad_s"), got, want):
        _check(f"{tag}:{name}", g, w.to(g.dtype), tol)


# (B, N, D, K): every required value of each dimension, paired so that each
# N meets several D and K, both batch sizes, all in both layouts.
SHAPES = [
    (1, 1, 1, 1), (2, 1, 16, 8), (1, 1, 40, 32),
    (1, 7, 3, 5), (2, 7, 1, 32), (2, 7, 40, 1), (1, 7, 16, 8),
    (2, 45, 40, 5), (1, 45, 16, 32), (2, 45, 3, 8), (1, 45, 1, 5), (2, 45, 40, 32), (2, 45, 16, 1),
]


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}_N{}_D{}_K{}".format(*s))
def test_triton_fp32(shape, channels_first):
    inputs = _inputs(*shape, torch.float32, seed=sum(shape))
    # fp32 kernels against the fp64 reference of the same fp32 inputs.
    _compare("fp32", _run(*inputs, channels_first), _launcher_reference(*inputs, ref_dtype=torch.float64),
             TOL[torch.float32])


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
@pytest.mark.parametrize("shape", [(2, 45, 40, 5), (1, 7, 3, 32), (2, 1, 16, 1)],
                         ids=lambda s: "B{}_N{}_D{}_K{}".format(*s))
def test_triton_fp64(shape, channels_first):
    """fp64 in the interpreter (tl.dot runs in float64 there): the maths itself, to ~1e-13."""
    if not _launch_interpret():
        pytest.skip("fp64 is interpreter-only")
    inputs = _inputs(*shape, torch.float64, seed=7 + sum(shape))
    _compare("fp64", _run(*inputs, channels_first), _launcher_reference(*inputs), TOL[torch.float64])


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
@pytest.mark.parametrize("shape", [(2, 45, 40, 5), (1, 7, 16, 32)], ids=lambda s: "B{}_N{}_D{}_K{}".format(*s))
def test_triton_fp16(shape, channels_first):
    """16-bit path: operands rounded to fp16 for the MMAs, fp32 accumulation.

    bf16 cannot be checked here: the interpreter's tl.dot multiplies the raw
    bf16 bit patterns as integers (numpy has no bfloat16).
    """
    if not _launch_interpret():
        pytest.skip("interpreter check; GPU runs use the fp32 tests")
    x, c, s, grad = _inputs(*shape, torch.float16, seed=3 + sum(shape))
    want = _launcher_reference(x, c, s, grad, ref_dtype=torch.float64)
    _compare("fp16", _run(x, c, s, grad, channels_first), want, 4e-3)


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
def test_triton_large_norm(channels_first):
    """||x|| ~ 1e3 with codewords within O(1): the centred distances must not cancel.

    The fp64 reference sees the very same fp32 inputs; the naive fp32 two-GEMM
    form is shown to be far off on them, so the test does exercise the cancellation.
    """
    batch, n, d, k = 2, 45, 40, 8
    x, c, s, grad = _inputs(batch, n, d, k, torch.float64, seed=11, x_offset=1000.0, c_offset=1000.0)
    s = s * 0.05  # distances ~ 2D: keep the logits O(1), where the softmax is sensitive
    x, c, s, grad = (t.float() for t in (x, c, s, grad))
    want = _launcher_reference(x, c, s, grad, ref_dtype=torch.float64)
    got = _run(x, c, s, grad, channels_first)
    _compare("large_norm", got, want, 5e-5)
    naive = _rel_err(reference.encoding_two_gemm(x, c, s), want[0])
    assert naive > 100 * _rel_err(got[0], want[0]), f"naive fp32 error {naive:.2e} unexpectedly small"


def test_triton_mmseg_init():
    """mmseg's initialisation: codewords U(+-1/sqrt(KD)), scale U(-1, 0), post-ReLU-like features."""
    batch, n, d, k = 2, 45, 40, 32
    g = torch.Generator().manual_seed(3)
    std = 1.0 / (k * d) ** 0.5
    x = torch.randn(batch, n, d, generator=g).relu()
    c = torch.empty(k, d).uniform_(-std, std, generator=g)
    s = torch.empty(k).uniform_(-1, 0, generator=g)
    grad = torch.randn(batch, k, d, generator=g)
    for cf in (False, True):
        _compare("mmseg_init", _run(x, c, s, grad, cf), _launcher_reference(x, c, s, grad, torch.float64),
                 TOL[torch.float32])


def test_triton_one_program_walks_every_tile(monkeypatch):
    """One program per image: every tile after the first goes through the slot read-add-store."""
    if not _launch_interpret():
        pytest.skip("the program count is only adjustable under the interpreter")
    monkeypatch.setattr(_kernels(), "INTERP_PROGRAMS", 1)
    inputs = _inputs(1, 45, 40, 5, torch.float64, seed=5)
    _compare("one_program", _run(*inputs, True), _launcher_reference(*inputs), TOL[torch.float64])


def test_triton_gradcheck():
    """The backward is the gradient of the forward (independently of the reference), incl. the codeword sign."""
    if not _launch_interpret():
        pytest.skip("fp64 is interpreter-only")

    class Enc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, c, s):
            ctx.save_for_backward(x, c, s)
            return _kernels().encoding_fwd(x, c, s, True)

        @staticmethod
        def backward(ctx, grad):
            return _kernels().encoding_bwd(grad.contiguous(), *ctx.saved_tensors, True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)  # [B, D, N]
    c = (torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    s = (-torch.rand(2, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(Enc.apply, (x, c, s), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_triton_deterministic():
    inputs = _inputs(2, 45, 40, 5, torch.float32, seed=9)
    first, second = _run(*inputs, False), _run(*inputs, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_empty():
    x, c, s, grad = _inputs(2, 0, 16, 5, torch.float32)
    e = _kernels().encoding_fwd(x.to(launcher_device()), c.to(launcher_device()), s.to(launcher_device()), False)
    assert e.shape == (2, 5, 16) and not e.any()
    gx, gc, gs = _kernels().encoding_bwd(grad.to(launcher_device()), x.to(launcher_device()), c.to(launcher_device()), s.to(launcher_device()), False)
    assert gx.shape == x.shape and not gc.any() and not gs.any()


def test_triton_rejects_too_many_codewords():
    x, c, s, grad = _inputs(1, 7, 3, 65, torch.float32)
    with pytest.raises(ValueError, match="K <= 64"):
        _kernels().encoding_fwd(x.to(launcher_device()), c.to(launcher_device()), s.to(launcher_device()), False)
    with pytest.raises(ValueError, match="K <= 64"):
        _kernels().encoding_bwd(grad.to(launcher_device()), x.to(launcher_device()), c.to(launcher_device()), s.to(launcher_device()), False)


def test_triton_k64_runs():
    """K = 64, the largest register tile (K_PAD = 64)."""
    inputs = _inputs(1, 20, 16, 64, torch.float32, seed=2)
    _compare("k64", _run(*inputs, False), _launcher_reference(*inputs, ref_dtype=torch.float64), TOL[torch.float32])


def test_zz_report_max_errors(capsys):
    """Print the largest error seen per check (run with -s to see it)."""
    with capsys.disabled():
        print("\nTriton encoding, interpreter: max error relative to max |ref|")
        for name, err in sorted(MAX_ERRORS.items()):
            print(f"  {name:<22} {err:.2e}")
