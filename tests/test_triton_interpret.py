"""Triton launchers, forward and backward, run by the Triton interpreter on CPU.

Every launcher of fastctx/ops/triton_launch.py is checked against plain
PyTorch maths written out here (F.adaptive_avg_pool2d per scale, the GLA
formula, the residual epilogue; autograd for the backward) at small, awkward
shapes: ragged tiles (33x45), 1x1 and 7x5 maps, pool scales larger than the
map, group sizes (1, 4, 9, 36), (1, 9, 25) and single groups, B = 1 and 2,
and the multi-block paths (more bins than one register tile).

TRITON_INTERPRET must be set before triton is first imported (the jit
decorator reads it); the project conftest does it too.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from fastctx.ops import triton_launch  # noqa: E402
from fastctx.ops.residual_relu import pack_mask  # noqa: E402
from tolerances import assert_close  # noqa: E402

pytestmark = pytest.mark.skipif(
    not triton_launch._INTERPRET,
    reason="triton was imported before TRITON_INTERPRET=1 was set: kernels cannot run on CPU",
)


def _inputs(*shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


def _check(actual, expected, what):
    """Project tolerances (vs a reference computed in float64), plus the max error for -s runs."""
    err = (actual.double() - expected).abs().max().item() if expected.numel() else 0.0
    print(f"{what}: max abs err {err:.3g} (max |ref| {expected.abs().max().item():.3g})")
    assert_close(actual, expected.to(actual.dtype), dtype=actual.dtype, msg=what)


# ---------------------------------------------------------------- pyramid_pool

def _pool_ref(x, scales):
    return torch.cat([F.adaptive_avg_pool2d(x, s).flatten(2) for s in scales], dim=2)


POOL_CASES = [
    # (B, C, H, W, scales)
    (2, 3, 33, 45, (1, 2, 3, 6)),   # overlapping bins, ragged pixel tiles, split pixel ranges
    (1, 20, 7, 5, (1, 3, 5)),       # several channel blocks, scale 5 >= W
    (1, 2, 1, 1, (1, 3, 5)),        # 1x1 map: every bin is the single pixel
    (2, 3, 7, 5, (1, 2, 9)),        # scale 9 > H, W; 86 bins: two bin blocks
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch,chans,height,width,scales", POOL_CASES)
def test_pyramid_pool(batch, chans, height, width, scales, dtype):
    x, = _inputs((batch, chans, height, width), dtype=dtype)
    xr = x.double().requires_grad_()
    ref = _pool_ref(xr, scales)
    grad, = _inputs(tuple(ref.shape), dtype=dtype, seed=1)
    ref.backward(grad.double())

    _check(triton_launch.pyramid_pool_fwd(x, scales), ref.detach(), f"pool fwd {dtype} {x.shape} {scales}")
    gx = triton_launch.pyramid_pool_bwd(grad, scales, height, width)
    assert gx.shape == x.shape and gx.dtype == dtype
    _check(gx, xr.grad, f"pool bwd {dtype} {x.shape} {scales}")


def test_pyramid_pool_fp16_multi_block(monkeypatch):
    """16-bit data, bins in blocks of 16: grad_x accumulates in an fp32 buffer."""
    monkeypatch.setattr(triton_launch, "S_BLOCK_MAX", 16)
    scales = (1, 2, 3, 6)
    x, = _inputs((1, 4, 9, 11), dtype=torch.float16)
    xr = x.double().requires_grad_()
    ref = _pool_ref(xr, scales)
    grad, = _inputs(tuple(ref.shape), dtype=torch.float16, seed=1)
    ref.backward(grad.double())
    _check(triton_launch.pyramid_pool_fwd(x, scales), ref.detach(), "pool fwd fp16")
    _check(triton_launch.pyramid_pool_bwd(grad, scales, 9, 11), xr.grad, "pool bwd fp16")


# ---------------------------------------------------------------- gla_context

def _gla_ref(x, weight, bias, pooled, group_sizes):
    batch, chans_all, height, width = x.shape
    chans = chans_all // len(group_sizes)
    out, off = [], 0
    for g, size in enumerate(group_sizes):
        xg = x[:, g * chans:(g + 1) * chans].flatten(2)                        # [B, C, N]
        logits = torch.einsum("kc,bcn->bnk", weight[off:off + size], xg) + bias[:, None, off:off + size]
        z = torch.einsum("bnk,bck->bcn", torch.sigmoid(logits), pooled[:, :, off:off + size])
        out.append(z.reshape(batch, chans, height, width))
        off += size
    return torch.cat(out, dim=1)


def _gla_case(batch, chans, height, width, group_sizes, dtype):
    s_tot, groups = sum(group_sizes), len(group_sizes)
    x, weight, bias, pooled = _inputs((batch, groups * chans, height, width), (s_tot, chans),
                                      (batch, s_tot), (batch, chans, s_tot), dtype=dtype)
    weight = weight / chans ** 0.5  # logits of order 1: sigmoid neither flat nor saturated
    leaves = [t.double().requires_grad_() for t in (x, weight, bias, pooled)]
    ref = _gla_ref(*leaves, group_sizes)
    grad, = _inputs(tuple(ref.shape), dtype=dtype, seed=1)
    ref.backward(grad.double())
    tag = f"{dtype} B{batch} C{chans} {height}x{width} {group_sizes}"

    z = triton_launch.gla_context_fwd(x, weight, bias, pooled, group_sizes)
    assert z.shape == x.shape and z.dtype == dtype
    _check(z, ref.detach(), f"gla fwd {tag}")
    grads = triton_launch.gla_context_bwd(grad, x, weight, bias, pooled, group_sizes)
    assert len(grads) == 4
    for name, got, leaf in zip(("grad_x", "grad_weight", "grad_bias", "grad_pooled"), grads, leaves):
        assert got.shape == leaf.shape and got.dtype == dtype, name
        _check(got, leaf.grad, f"gla bwd {name} {tag}")
    return grads


F32, F64 = torch.float32, torch.float64
GLA_CASES = [
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


@pytest.mark.parametrize("batch,chans,height,width,group_sizes,dtype", GLA_CASES)
def test_gla_context(batch, chans, height, width, group_sizes, dtype):
    _gla_case(batch, chans, height, width, group_sizes, dtype)


def test_gla_context_multi_block(monkeypatch):
    """Every group in blocks of 16 bins: z and grad_x accumulate across blocks."""
    monkeypatch.setattr(triton_launch, "S_BLOCK_MAX", 16)
    _gla_case(2, 5, 7, 5, (1, 9, 25), torch.float64)


@pytest.mark.parametrize("s_block_max", [64, 16])
def test_gla_context_fp16(monkeypatch, s_block_max):
    """16-bit operands with fp32 accumulation; with 16-bin blocks, fp32 accumulation buffers."""
    monkeypatch.setattr(triton_launch, "S_BLOCK_MAX", s_block_max)
    _gla_case(1, 8, 7, 5, (1, 4, 9, 36), torch.float16)


def test_gla_context_bwd_deterministic():
    args = _inputs((2, 6, 7, 5), (13, 3), (2, 13), (2, 3, 13), dtype=torch.float32)
    grad, = _inputs((2, 6, 7, 5), dtype=torch.float32, seed=1)
    first = triton_launch.gla_context_bwd(grad, *args, (4, 9))
    second = triton_launch.gla_context_bwd(grad, *args, (4, 9))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- residual_relu

def _residual_ref(y, residual, scale, shift):
    return torch.relu(torch.relu(y * scale[:, None, None] + shift[:, None, None]) + residual)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
@pytest.mark.parametrize("shape", [(2, 5, 33, 45), (1, 3, 1, 1), (2, 4, 7, 5)])
def test_residual_relu(shape, dtype):
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    y, residual = _inputs(shape, shape, dtype=dtype)
    scale, shift = _inputs((shape[1],), (shape[1],), dtype=acc, seed=2)
    leaves = [t.double().requires_grad_() for t in (y, residual, scale, shift)]
    ref = _residual_ref(*leaves)
    grad, = _inputs(shape, dtype=dtype, seed=3)
    ref.backward(grad.double())

    out, mask = triton_launch.residual_relu_fwd(y, residual, scale, shift, True)
    assert out.dtype == dtype
    _check(out, ref.detach(), f"residual fwd {dtype} {shape}")
    # The saved bits are exactly out > 0 (the last byte's spare bits zero).
    assert torch.equal(mask, pack_mask(out > 0)), f"residual mask {dtype} {shape}"
    out_only, no_mask = triton_launch.residual_relu_fwd(y, residual, scale, shift, False)
    assert torch.equal(out_only, out) and no_mask.numel() == 0
    grads = triton_launch.residual_relu_bwd(grad, y, mask, scale, shift)
    for name, got, leaf, want_dtype in zip(("grad_y", "grad_residual", "grad_scale", "grad_shift"),
                                           grads, leaves, (dtype, dtype, acc, acc)):
        assert got.shape == leaf.shape and got.dtype == want_dtype, name
        _check(got, leaf.grad, f"residual bwd {name} {dtype} {shape}")
