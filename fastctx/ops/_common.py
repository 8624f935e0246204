"""Shared plumbing of the public ops: input checks, backend resolution, autocast, in-op reference.

Backend resolution happens twice, on purpose:

* The Python wrapper (traced by torch.compile / torch.export) decides whether a
  custom op runs at all. It passes the op the backend the user forced with
  `use_backend` / FASTCTX_BACKEND, or "auto" when nothing was forced; when no
  fused backend can run the tensors it runs the eager reference maths instead
  (plain PyTorch, which traces and exports anywhere).
* The op itself resolves "auto" from its tensors when it runs. A compiled graph
  or an exported program therefore carries "auto", not the backend of the
  machine it was traced on: loaded elsewhere it picks that machine's backend
  (the C++ kernels, CUDA, Triton, or the reference maths inside the op).

Autocast. The fused ops have no autocast kernel, so autocast passes them by;
the wrappers apply the policy themselves (`amp_dtype`, `compute_dtype`): in a
CPU autocast region the fused CPU kernels run in float32 (they have no 16-bit
path; inputs are upcast, sums are fp32), in a CUDA region the CUDA/Triton
kernels run in the autocast dtype (they accumulate in fp32). Tensors of mixed
float dtypes are accepted inside autocast, as eager PyTorch accepts them there.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import _backend

AUTO = "auto"
_OP_BACKENDS = _backend.BACKENDS + (AUTO,)
# Device types that have an autocast state torch can be asked about.
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


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


def check_same(tensors: dict[str, torch.Tensor], same_dtype: bool = True) -> None:
    """All tensors on one device (and, unless `same_dtype` is False, with one dtype)."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: put all inputs on one device")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {first_name} is {first.dtype}: all inputs must share one dtype "
                            "(mixed dtypes are accepted inside torch.autocast)")


def check_scales(scales, name: str = "scales") -> list[int]:
    scales = [int(s) for s in scales]
    if not scales or any(s < 1 for s in scales):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {scales}")
    return scales


# ----------------------------------------------------------------------------- autocast

def amp_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype when an autocast region is active for x's device, else None.

    Like autocast itself, float64 data is left alone (None).
    """
    if x.device.type not in _AUTOCAST_DEVICES or x.dtype == torch.float64:
        return None
    if not torch.is_autocast_enabled(x.device.type):
        return None
    return torch.get_autocast_dtype(x.device.type)


def compute_dtype(device: torch.device, autocast_dtype: torch.dtype) -> torch.dtype:
    """dtype the fused kernels run in inside autocast: float32 on CPU (no 16-bit CPU kernels), else autocast's."""
    return torch.float32 if device.type == "cpu" else autocast_dtype


# ----------------------------------------------------------------------------- backend choice

def wrapper_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The `backend` argument a public wrapper passes to its custom op, or "reference".

    "reference": no fused backend runs tensors of this device/dtype (and none
    was forced), so the wrapper runs the eager maths itself. A forced backend
    is checked here so that a backend that cannot run raises at the call site.
    """
    forced = _backend.current_override()
    if forced is not None:
        reason = _backend.unavailable_reason(forced, device, dtype)
        if reason is not None:
            raise _backend.BackendUnavailableError(f"fastctx backend {forced!r} cannot run: {reason}")
        return forced
    return AUTO if _backend.select_backend(device, dtype) != "reference" else "reference"


def op_backend(backend: str, t: torch.Tensor) -> str:
    """Inside a custom op: the concrete backend for its `backend` argument and data tensor `t`."""
    if backend not in _OP_BACKENDS:
        raise ValueError(f"unknown fastctx backend {backend!r}: expected one of {_OP_BACKENDS}")
    if backend == AUTO:
        return _backend.select_backend(t.device, t.dtype)
    reason = _backend.unavailable_reason(backend, t.device, t.dtype)
    if reason is not None:
        raise _backend.BackendUnavailableError(f"fastctx backend {backend!r} cannot run: {reason}")
    return backend


# ----------------------------------------------------------------------------- reference inside an op

def _no_autocast(device: torch.device):
    # Inside an op the reference maths must run in the op's dtype, not autocast's.
    enabled = device.type in _AUTOCAST_DEVICES
    return torch.autocast(device.type if enabled else "cpu", enabled=False)


def reference_forward(fn: Callable, tensors: Sequence[torch.Tensor], *args):
    """`fn(*tensors, *args)` in the tensors' dtype, outputs in contiguous layout (as the fake kernels say)."""
    with _no_autocast(tensors[0].device):
        out = fn(*(t.contiguous() for t in tensors), *args)
    return out.contiguous()


def reference_backward(fn: Callable, tensors: Sequence[torch.Tensor], grad: torch.Tensor, *args) -> tuple:
    """Vector-Jacobian product of the reference maths: the backward when an op resolves to "reference".

    Custom-op implementations run below autograd, so torch.func.vjp (which
    carries its own autodiff level) differentiates the reference here.
    """
    with _no_autocast(tensors[0].device):
        _, pullback = torch.func.vjp(lambda *ts: fn(*ts, *args), *(t.contiguous() for t in tensors))
        grads = pullback(grad.contiguous())
    return tuple(g.contiguous() for g in grads)


__all__ = [
    "AUTO", "amp_dtype", "check_same", "check_scales", "check_tensor", "compute_dtype", "kernels",
    "op_backend", "reference_backward", "reference_forward", "wrapper_backend",
]
