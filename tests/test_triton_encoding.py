"""Triton Encoding kernels, run by the Triton interpreter on CPU tensors, against the reference.

TRITON_INTERPRET must be set before triton is imported (the jit decorator reads
it); conftest.py does the same for the whole session. The compiled-for-GPU
checks (sm_80 / sm_90 resources) are in test_triton_encoding_compile.py.

The launchers under the interpreter use 16 x 16 tiles and few programs, so the
small shapes below still cover: several pixel tiles per program (the slot
accumulate path), partial tiles and D chunks (masks), K not a power of two
and K < 16 (padded codewords), N = 1 and D = 1.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from fastctx.ops import triton_encoding as te  # noqa: E402
from fastctx.reference.encoding import encoding as ref_encoding  # noqa: E402
from fastctx.reference.encoding import encoding_two_gemm  # noqa: E402

if not te._INTERPRET and not torch.cuda.is_available():
    pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU", allow_module_level=True)

DEVICE = "cpu" if te._INTERPRET else "cuda"

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


def _reference(x, c, s, grad, ref_dtype=None):
    """E and (grad_x, grad_c, grad_s) of the mmseg maths by autograd, in ref_dtype (default x's)."""
    ref_dtype = ref_dtype or x.dtype
    xr, cr, sr = (t.detach().to(ref_dtype).requires_grad_() for t in (x, c, s))
    e = ref_encoding(xr, cr, sr)
    gx, gc, gs = torch.autograd.grad(e, (xr, cr, sr), grad.to(ref_dtype))
    return e.detach(), gx, gc, gs


def _run(x, c, s, grad, channels_first):
    """The launchers on x given as [B, N, D] pixels; x / grad_x in the requested layout."""
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    x_in = x.transpose(1, 2).contiguous() if channels_first else x
    e = te.encoding_fwd(dev(x_in), dev(c), dev(s), channels_first)
    gx, gc, gs = te.encoding_bwd(dev(grad), dev(x_in), dev(c), dev(s), channels_first)
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
def test_encoding_fp32(shape, channels_first):
    inputs = _inputs(*shape, torch.float32, seed=sum(shape))
    # fp32 kernels against the fp64 reference of the same fp32 inputs.
    _compare("fp32", _run(*inputs, channels_first), _reference(*inputs, ref_dtype=torch.float64),
             TOL[torch.float32])


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
@pytest.mark.parametrize("shape", [(2, 45, 40, 5), (1, 7, 3, 32), (2, 1, 16, 1)],
                         ids=lambda s: "B{}_N{}_D{}_K{}".format(*s))
def test_encoding_fp64(shape, channels_first):
    """fp64 in the interpreter (tl.dot runs in float64 there): the maths itself, to ~1e-13."""
    if not te._INTERPRET:
        pytest.skip("fp64 is interpreter-only")
    inputs = _inputs(*shape, torch.float64, seed=7 + sum(shape))
    _compare("fp64", _run(*inputs, channels_first), _reference(*inputs), TOL[torch.float64])


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
@pytest.mark.parametrize("shape", [(2, 45, 40, 5), (1, 7, 16, 32)], ids=lambda s: "B{}_N{}_D{}_K{}".format(*s))
def test_encoding_fp16(shape, channels_first):
    """16-bit path: operands rounded to fp16 for the MMAs, fp32 accumulation.

    bf16 cannot be checked here: the interpreter's tl.dot multiplies the raw
    bf16 bit patterns as integers (numpy has no bfloat16).
    """
    if not te._INTERPRET:
        pytest.skip("interpreter check; GPU runs use the fp32 tests")
    x, c, s, grad = _inputs(*shape, torch.float16, seed=3 + sum(shape))
    want = _reference(x, c, s, grad, ref_dtype=torch.float64)
    _compare("fp16", _run(x, c, s, grad, channels_first), want, 4e-3)


@pytest.mark.parametrize("channels_first", [False, True], ids=["pixels", "channels_first"])
def test_encoding_large_norm(channels_first):
    """||x|| ~ 1e3 with codewords within O(1): the centred distances must not cancel.

    The fp64 reference sees the very same fp32 inputs; the naive fp32 two-GEMM
    form is shown to be far off on them, so the test does exercise the cancellation.
    """
    batch, n, d, k = 2, 45, 40, 8
    x, c, s, grad = _inputs(batch, n, d, k, torch.float64, seed=11, x_offset=1000.0, c_offset=1000.0)
    s = s * 0.05  # distances ~ 2D: keep the logits O(1), where the softmax is sensitive
    x, c, s, grad = (t.float() for t in (x, c, s, grad))
    want = _reference(x, c, s, grad, ref_dtype=torch.float64)
    got = _run(x, c, s, grad, channels_first)
    _compare("large_norm", got, want, 5e-5)
    naive = _rel_err(encoding_two_gemm(x, c, s), want[0])
    assert naive > 100 * _rel_err(got[0], want[0]), f"naive fp32 error {naive:.2e} unexpectedly small"


def test_encoding_mmseg_init():
    """mmseg's initialisation: codewords U(+-1/sqrt(KD)), scale U(-1, 0), post-ReLU-like features."""
    batch, n, d, k = 2, 45, 40, 32
    g = torch.Generator().manual_seed(3)
    std = 1.0 / (k * d) ** 0.5
    x = torch.randn(batch, n, d, generator=g).relu()
    c = torch.empty(k, d).uniform_(-std, std, generator=g)
    s = torch.empty(k).uniform_(-1, 0, generator=g)
    grad = torch.randn(batch, k, d, generator=g)
    for cf in (False, True):
        _compare("mmseg_init", _run(x, c, s, grad, cf), _reference(x, c, s, grad, torch.float64),
                 TOL[torch.float32])


def test_encoding_one_program_walks_every_tile(monkeypatch):
    """One program per image: every tile after the first goes through the slot read-add-store."""
    if not te._INTERPRET:
        pytest.skip("the program count is only adjustable under the interpreter")
    monkeypatch.setattr(te, "INTERP_PROGRAMS", 1)
    inputs = _inputs(1, 45, 40, 5, torch.float64, seed=5)
    _compare("one_program", _run(*inputs, True), _reference(*inputs), TOL[torch.float64])


def test_encoding_gradcheck():
    """The backward is the gradient of the forward (independently of the reference), incl. the codeword sign."""
    if not te._INTERPRET:
        pytest.skip("fp64 is interpreter-only")

    class Enc(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, c, s):
            ctx.save_for_backward(x, c, s)
            return te.encoding_fwd(x, c, s, True)

        @staticmethod
        def backward(ctx, grad):
            return te.encoding_bwd(grad.contiguous(), *ctx.saved_tensors, True)

    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)  # [B, D, N]
    c = (torch.randn(2, 3, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    s = (-torch.rand(2, generator=g, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(Enc.apply, (x, c, s), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_encoding_deterministic():
    inputs = _inputs(2, 45, 40, 5, torch.float32, seed=9)
    first, second = _run(*inputs, False), _run(*inputs, False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_encoding_accepts_4d_channels_first():
    x, c, s, grad = _inputs(2, 35, 16, 5, torch.float32, seed=4)
    x4 = x.transpose(1, 2).reshape(2, 16, 5, 7).contiguous()
    e4 = te.encoding_fwd(x4.to(DEVICE), c.to(DEVICE), s.to(DEVICE), True).cpu()
    gx4 = te.encoding_bwd(grad.to(DEVICE), x4.to(DEVICE), c.to(DEVICE), s.to(DEVICE), True)[0].cpu()
    e3 = te.encoding_fwd(x.to(DEVICE), c.to(DEVICE), s.to(DEVICE), False).cpu()
    assert gx4.shape == x4.shape
    torch.testing.assert_close(e4, e3, rtol=1e-5, atol=1e-5)


def test_encoding_empty():
    x, c, s, grad = _inputs(2, 0, 16, 5, torch.float32)
    e = te.encoding_fwd(x.to(DEVICE), c.to(DEVICE), s.to(DEVICE), False)
    assert e.shape == (2, 5, 16) and not e.any()
    gx, gc, gs = te.encoding_bwd(grad.to(DEVICE), x.to(DEVICE), c.to(DEVICE), s.to(DEVICE), False)
    assert gx.shape == x.shape and not gc.any() and not gs.any()


def test_encoding_rejects_too_many_codewords():
    x, c, s, grad = _inputs(1, 7, 3, 65, torch.float32)
    with pytest.raises(ValueError, match="K <= 64"):
        te.encoding_fwd(x.to(DEVICE), c.to(DEVICE), s.to(DEVICE), False)
    with pytest.raises(ValueError, match="K <= 64"):
        te.encoding_bwd(grad.to(DEVICE), x.to(DEVICE), c.to(DEVICE), s.to(DEVICE), False)


def test_encoding_k64_runs():
    """K = 64, the largest register tile (K_PAD = 64)."""
    inputs = _inputs(1, 20, 16, 64, torch.float32, seed=2)
    _compare("k64", _run(*inputs, False), _reference(*inputs, ref_dtype=torch.float64), TOL[torch.float32])


def test_zz_report_max_errors(capsys):
    """Print the largest error seen per check (run with -s to see it)."""
    with capsys.disabled():
        print("\nTriton encoding, interpreter: max error relative to max |ref|")
        for name, err in sorted(MAX_ERRORS.items()):
            print(f"  {name:<22} {err:.2e}")
