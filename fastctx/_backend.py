"""Which implementation runs an op: backend registry, selection and availability.

Backends (DESIGN section 3):
  reference  eager PyTorch, the oracle; runs anywhere.
  cpu        fused C++ kernels in fastctx._C (CPU tensors, fp32/fp64).
  cuda       CUDA C++ kernels in fastctx._C (CUDA tensors, fp32/fp16/bf16).
  triton     Triton kernels (CUDA tensors; CPU tensors when TRITON_INTERPRET=1).

The choice depends on tensor metadata only (device, dtype) plus an explicit
override: `use_backend(name)` or the FASTCTX_BACKEND environment variable.
The state is a plain module global so torch.compile can guard on it.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_DTYPES = {
    "reference": _FLOATS,
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float16, torch.bfloat16),
    "triton": (torch.float32, torch.float16, torch.bfloat16),
}


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these tensors; the message says why."""


def _load_extension():
    if os.environ.get("FASTCTX_NO_EXT", "0") == "1":
        return None, "disabled by FASTCTX_NO_EXT=1"
    try:
        return importlib.import_module("fastctx._C"), None
    except ImportError as exc:  # built without the extension, or a broken build
        return None, f"fastctx._C failed to import ({exc}); reinstall with `make install`"


_C, _C_ERROR = _load_extension()


def _has_kernel(dispatch_key: str) -> bool:
    if _C is None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("fastctx::gla_context_fwd", dispatch_key)


HAS_CPU_KERNELS = _has_kernel("CPU")
HAS_CUDA_KERNELS = _has_kernel("CUDA")
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton  # noqa: F401

    TRITON_VERSION = triton.__version__
    _TRITON_ERROR = None
except ImportError as exc:
    TRITON_VERSION = None
    _TRITON_ERROR = f"triton is not installed ({exc})"


def _env_override() -> str | None:
    name = os.environ.get("FASTCTX_BACKEND", "").strip().lower() or None
    if name is not None and name not in BACKENDS + ("auto",):
        raise ValueError(f"FASTCTX_BACKEND={name!r}: expected one of {BACKENDS + ('auto',)}")
    return None if name == "auto" else name


_override: str | None = _env_override()


@contextlib.contextmanager
def use_backend(name: str | None):
    """Run fastctx ops on backend `name` inside the block ("auto" or None: automatic)."""
    global _override
    if name is not None:
        name = name.lower()
        if name == "auto":
            name = None
        elif name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}: expected one of {BACKENDS} or 'auto'")
    previous, _override = _override, name
    try:
        yield
    finally:
        _override = previous


def current_override() -> str | None:
    return _override


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `backend` can run tensors of this device and dtype, else why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}: expected one of {BACKENDS}"
    dtypes = _DTYPES[backend]
    if backend == "triton" and device.type == "cpu":
        dtypes = dtypes + (torch.float64,)  # the interpreter computes in numpy
    if dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        return f"backend {backend!r} supports {names}, got {str(dtype).replace('torch.', '')}"
    if backend == "reference":
        return None
    if backend == "cpu":
        if device.type != "cpu":
            return f"backend 'cpu' runs CPU tensors, got a {device.type} tensor"
        if not HAS_CPU_KERNELS:
            return f"the C++ extension is not available: {_C_ERROR or 'built without CPU kernels'}"
        return None
    if backend == "cuda":
        if device.type != "cuda":
            return f"backend 'cuda' runs CUDA tensors, got a {device.type} tensor"
        if not HAS_CUDA_KERNELS:
            return "fastctx._C was built without CUDA kernels (no nvcc or a CPU-only torch at build time)"
        return None
    # triton
    if TRITON_VERSION is None:
        return _TRITON_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if TRITON_INTERPRET:
            return None
        return "backend 'triton' runs CPU tensors only with TRITON_INTERPRET=1 set before import"
    return f"backend 'triton' does not run {device.type} tensors"


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend an op runs for tensors of this device and dtype."""
    if _override is not None:
        reason = unavailable_reason(_override, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"fastctx backend {_override!r} cannot run: {reason}")
        return _override
    # Automatic: the fused backends first (triton uses tensor cores on GPU), the
    # reference when nothing fused can run these tensors.
    order = ("triton", "cuda") if device.type == "cuda" else ("cpu",)
    for name in order:
        if unavailable_reason(name, device, dtype) is None:
            return name
    return "reference"


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device, dtype) is None]
