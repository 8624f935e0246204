"""Which backends are built and may run here: extension loading, the override, build-level availability.

Backends (docs/design.md, "Backends"):
  reference  eager PyTorch, the oracle; runs anywhere.
  cpu        fused C++ kernels in fastctx._C (CPU tensors).
  cuda       CUDA C++ kernels in fastctx._C_cuda (CUDA tensors).
  triton     Triton kernels (CUDA tensors; CPU tensors when TRITON_INTERPRET=1).

This module answers the build-level question: is a backend's code here at
all, and can it run tensors of a device type? What each op's backend accepts
beyond that (dtypes, shape limits) is declared next to the op, in
`fastctx/ops/<op>.py`, and evaluated by `fastctx.ops._dispatch`.

The choice depends on tensor metadata only plus an explicit override:
`use_backend(name)` or the FASTCTX_BACKEND environment variable. The override
is a plain module global so torch.compile can guard on it.
"""
from __future__ import annotations

import contextlib
import importlib
import os

import torch

BACKENDS = ("reference", "cpu", "cuda", "triton")

# Data dtypes a backend computes in when an op declares nothing narrower.
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
CPU_FLOATS = (torch.float32, torch.float64)
GPU_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
# The Triton interpreter computes in numpy: 16-bit dots and bf16 are not faithful there.
INTERPRETER_FLOATS = (torch.float32, torch.float64)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


class BackendFallbackWarning(UserWarning):
    """Automatic selection skipped a fused backend that cannot run a call (issued once per reason)."""


def _import(module: str):
    try:
        return importlib.import_module(module), None
    except ImportError as exc:  # built without it, or a broken build
        return None, f"{module} failed to import ({exc}); reinstall with `make install`"


def _load_extensions():
    if os.environ.get("FASTCTX_NO_EXT", "0") == "1":
        return None, "disabled by FASTCTX_NO_EXT=1", None, "disabled by FASTCTX_NO_EXT=1"
    cpu, cpu_error = _import("fastctx._C")  # the schemas of every kernel live here: load it first
    if cpu is None:
        return None, cpu_error, None, "needs fastctx._C (the schemas), which failed to import"
    cuda, cuda_error = _import("fastctx._C_cuda")
    return cpu, cpu_error, cuda, cuda_error


_C, _C_ERROR, _C_CUDA, _C_CUDA_ERROR = _load_extensions()


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


def build_reason(backend: str, device: torch.device) -> str | None:
    """None if `backend` is built here and runs tensors on `device`'s type, else why not."""
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}: expected one of {BACKENDS}"
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
            return ("the CUDA kernels are not available: "
                    f"{_C_CUDA_ERROR or 'built without them (no nvcc or a CPU-only torch at build time)'}")
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


def default_dtypes(backend: str, device: torch.device) -> tuple[torch.dtype, ...]:
    """The data dtypes `backend` computes in on `device` unless an op declares otherwise."""
    if backend == "reference":
        return FLOATS
    if backend == "cpu":
        return CPU_FLOATS
    if backend == "triton" and device.type == "cpu":
        return INTERPRETER_FLOATS
    return GPU_FLOATS


def dtype_names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def unavailable_reason(backend: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """None if `backend` is built and computes in `dtype` on `device` (no op-specific limits), else why not."""
    reason = build_reason(backend, device)
    if reason is not None:
        return reason
    dtypes = default_dtypes(backend, device)
    if dtype not in dtypes:
        return f"backend {backend!r} supports {dtype_names(dtypes)} on {device.type}, got {dtype_names([dtype])}"
    return None


def automatic_order(device: torch.device) -> tuple[str, ...]:
    """Fused backends automatic selection tries, best first (Triton uses tensor cores on GPU)."""
    return ("triton", "cuda") if device.type == "cuda" else ("cpu",)


def select_backend(device: torch.device, dtype: torch.dtype) -> str:
    """The backend a call with tensors of this device and dtype runs on, before op-specific limits."""
    if _override is not None:
        reason = unavailable_reason(_override, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"fastctx backend {_override!r} cannot run: {reason}")
        return _override
    for name in automatic_order(device):
        if unavailable_reason(name, device, dtype) is None:
            return name
    return "reference"


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32) -> list[str]:
    device = torch.device(device)
    return [b for b in BACKENDS if unavailable_reason(b, device, dtype) is None]
