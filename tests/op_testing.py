"""What the per-op test files (tests/ops/test_<op>.py) share: backends, the fwd+bwd check, launcher checks.

Backends under test: cpu (C++ extension), triton (the interpreter on CPU tensors
here, real on a GPU), cuda (GPU only, marked `gpu`). Every fused result is
compared with the reference maths: the output and every input gradient.
"""
from __future__ import annotations

import importlib

import pytest
import torch

import fastctx
from conftest import require_backend
from tolerances import assert_close

FUSED = ["cpu", "triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def device_of(backend: str) -> str:
    return "cuda" if backend == "cuda" else "cpu"


def require(backend: str, dtype=torch.float32) -> str:
    """Skip or fail as conftest.require_backend does; returns the device the backend's tensors live on."""
    device = device_of(backend)
    require_backend(backend, device, dtype)
    return device


def check_fwd_bwd(backend, fn, ref_fn, inputs, dtype, seed=0, msg=""):
    """fn(*inputs) under `backend` vs ref_fn(*inputs): output and every floating input's gradient."""
    leaves_a = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    leaves_b = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    with fastctx.use_backend(backend):
        out = fn(*leaves_a)
    expected = ref_fn(*leaves_b)
    assert out.shape == expected.shape and out.dtype == expected.dtype
    assert_close(out, expected, dtype, f"{msg} forward")
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad.to(dtype=expected.dtype, device=expected.device)
    with fastctx.use_backend(backend):
        out.backward(grad)
    expected.backward(grad)
    for i, (a, b) in enumerate(zip(leaves_a, leaves_b)):
        if b.grad is None:
            continue
        assert a.grad is not None, f"{msg} no gradient for input {i}"
        assert_close(a.grad, b.grad, dtype, f"{msg} gradient of input {i}")


def triton_launchers(op: str):
    """fastctx.kernels.<op> when its kernels can run here (the interpreter, or a GPU), else skip."""
    pytest.importorskip("triton")
    from fastctx.kernels import _launch

    if not _launch.INTERPRET and not torch.cuda.is_available():
        pytest.skip("triton was imported without TRITON_INTERPRET=1 and there is no GPU")
    return importlib.import_module(f"fastctx.kernels.{op}")


def launcher_device() -> str:
    from fastctx.kernels import _launch

    return "cpu" if _launch.INTERPRET else "cuda"


def check_launcher(actual, expected, what):
    """A launcher's result vs a float64 reference, at the project tolerance of actual's dtype."""
    err = (actual.double().cpu() - expected.cpu()).abs().max().item() if expected.numel() else 0.0
    print(f"{what}: max abs err {err:.3g} (max |ref| {expected.abs().max().item() if expected.numel() else 0:.3g})")
    assert_close(actual.cpu(), expected.cpu().to(actual.dtype), dtype=actual.dtype, msg=what)


def randn(*shapes, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype) for shape in shapes]


# ----------------------------------------------------------------------------- inputs of each op

def gla_inputs(batch, channels, h, w, sizes, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    total, groups = sum(sizes), len(sizes)
    x = torch.relu(torch.randn(batch, groups * channels, h, w, generator=g, dtype=torch.float64))
    weight = torch.randn(total, channels, generator=g, dtype=torch.float64) / channels ** 0.5
    bias = torch.randn(batch, total, generator=g, dtype=torch.float64)
    pooled = torch.randn(batch, channels, total, generator=g, dtype=torch.float64)
    return [t.to(dtype=dtype, device=device) for t in (x, weight, bias, pooled)]


def residual_inputs(batch, ch, h, w, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(batch, ch, h, w, generator=g, dtype=torch.float64)
    res = torch.randn(batch, ch, h, w, generator=g, dtype=torch.float64)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(ch, generator=g, dtype=torch.float64) + 0.5).to(acc)
    shift = (torch.randn(ch, generator=g, dtype=torch.float64) * 0.1).to(acc)
    return [y.to(dtype=dtype, device=device), res.to(dtype=dtype, device=device),
            scale.to(device), shift.to(device)]


def enc_inputs(batch, channels, h, w, num_codes, dtype=torch.float32, device="cpu", seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) + offset
    codewords = torch.randn(num_codes, channels, generator=g, dtype=torch.float64) * 0.5 + offset
    # |scale| shrinks with D so the softmax stays soft: a one-hot assignment
    # makes grad_scale pure rounding noise in any fp32 implementation.
    scale = (-torch.rand(num_codes, generator=g, dtype=torch.float64) * 0.5 - 0.05) * min(1.0, 64 / channels)
    return [t.to(dtype=dtype, device=device) for t in (x, codewords, scale)]


def op_cases():
    """(name, args without the backend) of a small float64 call of every public op, `torch.ops.fastctx.<name>`."""
    gen = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    yield "pyramid_pool", (r(2, 3, 7, 5), [1, 2, 3])
    yield "gla_context", (r(2, 6, 5, 4), r(5, 3), r(2, 5), r(2, 3, 5), [1, 4])
    y = r(2, 3, 4, 5)
    yield "residual_relu", (y, r(*y.shape), torch.rand(3, generator=gen, dtype=torch.float64) + 0.5, r(3), True)
    yield "encoding", (r(2, 6, 20), r(4, 6), -torch.rand(4, generator=gen, dtype=torch.float64), True)
    yield "class_gather", (r(2, 6, 4, 5), r(2, 3, 4, 5), "ocr", 1.5)
    yield "class_gather", (r(2, 6, 4, 5), r(2, 3, 4, 5), "paper", 1.0)
    yield "class_attention", (r(2, 4, 3, 5), r(2, 3, 4), r(2, 3, 6), None, 0.5)
    yield "class_attention", (None, None, r(2, 3, 6), r(2, 3, 3, 5), 1.0)
    yield "window_attention", (r(2, 5, 7, 12), 2, [2, 4], r(21, 2), [1, 2], 0.5, r(12))
    yield "window_pool", (r(2, 4, 6, 3), r(2, 2, 3), [2, 3])
    yield "upsample_add", (r(2, 2, 3, 3), r(2, 5, 7, 3))
    yield "upsample_add_layer_norm", (r(2, 2, 3, 6), r(2, 5, 7, 6), r(6), r(6), 1e-5)
