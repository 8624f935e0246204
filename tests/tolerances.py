"""The one table of numeric tolerances, per dtype.

`rtol` is relative to each element; `atol` is relative to the largest magnitude
of the expected tensor (fused kernels sum in another order than eager PyTorch,
so absolute error grows with the size of the sums, not of each element).
"""
import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-2, atol=2e-3),
    torch.bfloat16: dict(rtol=5e-2, atol=1e-2),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype=None, msg: str = "") -> None:
    dtype = dtype or expected.dtype
    tol = TOLERANCES[dtype]
    scale = max(expected.detach().abs().max().item(), 1e-30) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual.detach().to(expected.dtype), expected.detach(), rtol=tol["rtol"], atol=tol["atol"] * scale,
        msg=lambda m: f"{msg}\n{m}" if msg else m,
    )
