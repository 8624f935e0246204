"""NaN and inf propagate through every fused op exactly as through the eager reference.

For every op x backend x tensor argument (and the upstream gradient), one NaN,
+inf or -inf is placed in one element, or in a whole row / plane, of otherwise
finite inputs. The op's output and every input gradient must then have the
reference's NaN positions exactly, the same infinities with the same signs, and
finite entries within tests/tolerances.py. The reference is `fastctx.reference`
under plain PyTorch autograd, so "as the reference" includes autograd's rules,
e.g. ReLU passes the gradient at a NaN (its backward masks `out <= 0` only).

The shapes are small but reach the awkward paths: overlapping pooling bins, a
residual_relu plane whose pixel count is not a multiple of 8 (a partial mask
byte), two gla_context groups of different sizes, both encoding layouts.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch

import fastctx
from fastctx import ops, reference
from conftest import require_backend
from tolerances import TOLERANCES

# fp64 runs the double instantiations (and the CPU kernel's portable mask packing); CUDA computes no fp64.
BACKEND_DTYPES = [
    *(pytest.param(b, d, id=f"{b}-{str(d)[6:]}") for b in ("reference", "cpu", "triton")
      for d in (torch.float32, torch.float64)),
    pytest.param("cuda", torch.float32, id="cuda-float32", marks=pytest.mark.gpu),
]
VALUES = {"nan": math.nan, "+inf": math.inf, "-inf": -math.inf}
ALL = slice(None)

# Where a value is placed, per tensor argument: one element, then whole rows / planes.
PLANE4 = {"element": (1, 2, 1, 3), "row": (1, 2, 1, ALL), "plane": (1, 2)}


@dataclass(frozen=True)
class Case:
    make: Callable  # generator -> {argument name: tensor}, in call order
    fused: Callable  # the public op on those tensors
    ref: Callable  # the reference on those tensors
    places: dict  # argument name (or "grad", the upstream gradient) -> {placement: index}


def _pool_inputs(g):
    return {"x": torch.randn(2, 3, 7, 9, generator=g)}


POOL_SCALES = (1, 2, 3, 4)  # 7 and 9 are multiples of none but 1: bins overlap, x[.., 1, 3] lies in two


GLA_SIZES = (1, 4)
GLA_C = 3


def _gla_inputs(g):
    s_tot = sum(GLA_SIZES)
    return {
        "x": torch.randn(2, len(GLA_SIZES) * GLA_C, 5, 6, generator=g),
        "weight": torch.randn(s_tot, GLA_C, generator=g) * 0.5,
        "bias": torch.randn(2, s_tot, generator=g) * 0.5,
        "pooled": torch.randn(2, GLA_C, s_tot, generator=g),
    }


def _residual_inputs(g):
    # 5x7 = 35 pixels: four whole mask bytes and a partial one. Channel 1 has a
    # negative scale, so +inf in y there is -inf before the inner ReLU.
    scale = (torch.rand(3, generator=g) + 0.5) * torch.tensor([1.0, -1.0, 1.0])
    return {
        "y": torch.randn(2, 3, 5, 7, generator=g),
        "residual": torch.randn(2, 3, 5, 7, generator=g),
        "scale": scale,
        "shift": torch.randn(3, generator=g) * 0.5,
    }


def _encoding_inputs(g, pixels_last=False):
    x = torch.randn(2, 5, 3, 4, generator=g)
    if pixels_last:
        x = x.flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
    return {
        "x": x,
        "codewords": torch.randn(4, 5, generator=g) * 0.5,
        "scale": -(torch.rand(4, generator=g) * 0.5 + 0.05),  # mmseg's init range U(-1, 0)
    }


def _window_pool_inputs(g):
    # 4x8 windows over an 8x16 map: 2x2 tokens; pos as IIWA passes it (one per token, all images)
    return {"x": torch.randn(2, 8, 16, 3, generator=g), "pos": torch.randn(2, 2, 3, generator=g)}


def _upsample_inputs(g):
    # 2x3 tokens -> 5x7, channels last: output rows 0 and 4 and columns 0, 3 and 6 sit exactly on tokens
    # (their second tap has weight 0 and still turns an inf into NaN, as eager's)
    return {"tokens": torch.randn(2, 2, 3, 5, generator=g), "residual": torch.randn(2, 5, 7, 5, generator=g)}


def _upsample_norm_inputs(g):
    return {**_upsample_inputs(g), "weight": torch.randn(5, generator=g), "bias": torch.randn(5, generator=g)}


CASES = {
    "pyramid_pool": Case(
        _pool_inputs,
        lambda x: ops.pyramid_pool(x, POOL_SCALES),
        lambda x: reference.pyramid_pool(x, POOL_SCALES),
        # grad [2, 3, 30]: bin 20 is one of scale 4's (offset 14)
        {"x": PLANE4, "grad": {"element": (1, 2, 20), "row": (1, 2, ALL)}},
    ),
    "gla_context": Case(
        _gla_inputs,
        lambda *t: ops.gla_context(*t, GLA_SIZES),
        lambda *t: reference.gla_context(*t, GLA_SIZES),
        {
            "x": {"element": (1, 4, 2, 3), "row": (1, 4, 2, ALL), "plane": (1, 4)},  # group 1
            "weight": {"element": (3, 1), "row": (3, ALL)},
            "bias": {"element": (1, 3), "row": (1, ALL)},
            "pooled": {"element": (1, 2, 3), "row": (1, 2, ALL)},
            "grad": {"element": (1, 4, 2, 3), "row": (1, 4, 2, ALL), "plane": (1, 4)},
        },
    ),
    "residual_relu": Case(
        _residual_inputs,
        ops.residual_relu,
        reference.residual_relu,
        {
            "y": {"element": (1, 1, 2, 3), "row": (1, 2, 2, ALL), "plane": (0, 1)},
            "residual": PLANE4,
            "scale": {"element": (1,), "all": (ALL,)},
            "shift": {"element": (1,), "all": (ALL,)},
            "grad": PLANE4,
        },
    ),
    "window_pool": Case(
        _window_pool_inputs,
        lambda x, pos: ops.window_pool(x, (4, 8), pos),
        lambda x, pos: reference.window_pool(x, (4, 8), pos),
        {
            "x": {"element": (1, 5, 9, 2), "pixel": (1, 5, 9, ALL)},
            "pos": {"element": (1, 0, 2)},
            "grad": {"element": (1, 1, 0, 2)},
        },
    ),
    "upsample_add": Case(
        _upsample_inputs,
        ops.upsample_add,
        reference.upsample_add,
        {
            "tokens": {"element": (1, 1, 1, 3), "corner": (0, 1, 2, ALL)},
            "residual": {"element": (1, 2, 5, 3)},
            # on_tap: output (2, 3) lies on token column 1: its second column tap has weight 0; last_row: row 4
            # lies on the last token row, whose two row taps coincide (one of weight 0)
            "grad": {"element": (1, 2, 5, 3), "on_tap": (1, 2, 3, 3), "last_row": (1, 4, ALL, 3)},
        },
    ),
    "upsample_add_layer_norm": Case(  # (out, normed) as one tensor [..., 2C]: both outputs, both gradients
        _upsample_norm_inputs,
        lambda *a: torch.cat(ops.upsample_add_layer_norm(*a), dim=-1),
        lambda *a: torch.cat(reference.upsample_add_layer_norm(*a), dim=-1),
        {
            "tokens": {"element": (1, 1, 1, 3)},
            "residual": {"element": (1, 2, 5, 3), "first_channel": (1, 2, 5, 0)},  # the kernels' shift x0
            "weight": {"element": (3,)},
            "bias": {"element": (3,)},
            "grad": {"out": (1, 2, 5, 3), "normed": (1, 2, 5, 8), "normed_pixel": (1, 2, 5, slice(5, 10))},
        },
    ),
    "encoding": Case(  # x [B, D, H, W]: the channels-first kernels
        _encoding_inputs,
        ops.encoding,
        reference.encoding,
        {
            "x": {**PLANE4, "pixel": (1, ALL, 1, 3)},
            "codewords": {"element": (2, 3), "row": (2, ALL), "channel": (ALL, 3)},
            "scale": {"element": (2,), "all": (ALL,)},
            "grad": {"element": (1, 2, 3), "row": (1, 2, ALL), "channel": (1, ALL, 3)},
        },
    ),
    "encoding_pixels": Case(  # x [B, N, D]: the pixel-major kernels
        lambda g: _encoding_inputs(g, pixels_last=True),
        ops.encoding,
        reference.encoding,
        {"x": {"element": (1, 5, 2), "pixel": (1, 5, ALL), "channel": (1, ALL, 2)}},
    ),
}

PLACEMENTS = [
    (name, arg, where)
    for name, case in CASES.items()
    for arg, wheres in case.places.items()
    for where in wheres
]


def _device(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def _where(mask: torch.Tensor) -> str:
    idx = mask.nonzero()
    head = ", ".join(str(tuple(i)) for i in idx[:6].tolist())
    return f"{idx.shape[0]} at [{head}{', ...' if idx.shape[0] > 6 else ''}]"


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str, nan_for_inf: bool = False) -> None:
    """NaN and +-inf exactly where the reference has them; finite entries within the dtype's tolerance.

    nan_for_inf: a reference +-inf may come out NaN (never finite): see ENCODING_INF_GRAD below.
    """
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    if nan_for_inf:
        expected = torch.where(expected.isinf() & actual.isnan(), actual, expected)
    for kind, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, e = test(actual), test(expected)
        if not torch.equal(a, e):
            raise AssertionError(f"{what}: {kind} pattern differs from the reference: "
                                 f"missing {_where(e & ~a)}; extra {_where(a & ~e)}")
    finite = expected.isfinite()
    if finite.any():
        tol = TOLERANCES[expected.dtype]
        scale = expected[finite].abs().max().item()
        torch.testing.assert_close(actual[finite], expected[finite], rtol=tol["rtol"], atol=tol["atol"] * scale,
                                   msg=lambda m: f"{what}, finite entries:\n{m}")


# An infinite upstream gradient of the Encoding layer: the GPU kernels form the codeword gradient as
# X'^T W - (sum W) c' (tensor-core GEMMs), which is inf - inf = NaN where the eager sum of terms
# W_ik (x_i - c_k) is +-inf. The C++ kernel evaluates such rows term by term and matches exactly; the
# Triton and CUDA kernels give NaN there (never a finite value). Documented in docs/kernels.md.
ENCODING_INF_GRAD = {("triton", "encoding", "grad"), ("cuda", "encoding", "grad")}


@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("name,arg,where", PLACEMENTS, ids=["-".join(p) for p in PLACEMENTS])
@pytest.mark.parametrize("backend,dtype", BACKEND_DTYPES)
def test_nonfinite_propagates_as_in_reference(backend, dtype, name, arg, where, value):
    device = _device(backend)
    require_backend(backend, device, dtype)
    case = CASES[name]
    # Every tensor in `dtype`, including residual_relu's scale/shift ("acc": float32, or float64 for float64 data).
    inputs = {k: t.to(dtype=dtype, device=device) for k, t in case.make(torch.Generator().manual_seed(0)).items()}
    index = case.places[arg][where]
    if arg != "grad":
        inputs[arg][index] = VALUES[value]
    fused_in = [t.clone().requires_grad_() for t in inputs.values()]
    ref_in = [t.clone().requires_grad_() for t in inputs.values()]
    with fastctx.use_backend(backend):
        out = case.fused(*fused_in)
    expected = case.ref(*ref_in)
    label = f"{name} [{backend}] with {value} in {arg} ({where})"
    assert_same_nonfinite(out, expected, f"{label}: output")

    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=dtype).to(device)
    if arg == "grad":
        grad[index] = VALUES[value]
    with fastctx.use_backend(backend):
        out.backward(grad)
    expected.backward(grad)
    nan_for_inf = (backend, name, arg) in ENCODING_INF_GRAD and value != "nan"
    for arg_name, a, e in zip(inputs, fused_in, ref_in, strict=True):
        assert a.grad is not None, f"{label}: no gradient for {arg_name}"
        assert_same_nonfinite(a.grad, e.grad, f"{label}: gradient of {arg_name}", nan_for_inf)
