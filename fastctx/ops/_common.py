"""Shared plumbing of the public ops: input checks and backend kernel lookup."""
from __future__ import annotations


import torch

from .. import _backend


def kernels(backend: str):
    """The object holding `<op>_fwd` / `<op>_bwd` for a fused backend."""
    if backend in ("cpu", "cuda"):
        return torch.ops.fastctx  # C++ kernels, dispatched on the tensors' device
    if backend == "triton":
        from . import triton_launch

        return triton_launch
    raise ValueError(f"no fused kernels for backend {backend!r}")


def check_tensor(t, name: str, ndim: int | tuple[int, ...], shape_hint: str) -> None:
    """Raise a TypeError/ValueError that names the argument and the expected form."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must be {shape_hint} ({' or '.join(map(str, dims))}-D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same(tensors: dict[str, torch.Tensor]) -> None:
    """All tensors on one device with one dtype."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: put all inputs on one device")
        if t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {first_name} is {first.dtype}: all inputs must share one dtype")


def check_scales(scales, name: str = "scales") -> list[int]:
    scales = [int(s) for s in scales]
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {scales}")
    return scales


def backend_for(t: torch.Tensor) -> str:
    return _backend.select_backend(t.device, t.dtype)


__all__ = ["kernels", "check_tensor", "check_same", "check_scales", "backend_for"]
