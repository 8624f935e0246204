"""What the Triton launchers share: run mode, dot precision, dtype maps, device facts."""
from __future__ import annotations

import functools
import os

import torch
from triton.runtime.interpreter import InterpretedFunction

from fastctx.kernels import residual_relu as _any_kernel_module

# The jit decorator chose interpreter or compiler when the kernels were imported.
INTERPRET = isinstance(_any_kernel_module.residual_relu_fwd_kernel, InterpretedFunction)
# FASTCTX_TRITON_AUTOTUNE=0 pins every kernel to its default config (bitwise
# reproducible across processes, no tuning runs).
AUTOTUNE = os.environ.get("FASTCTX_TRITON_AUTOTUNE", "1") != "0"
# fp32 tl.dot precision: tf32x3 is ~fp32-accurate on tensor cores; "ieee"
# (FMA) spills at the tile sizes used; "tf32" is faster and ~1e-3 relative.
FP32_DOT_PRECISION = os.environ.get("FASTCTX_TRITON_FP32_DOT", "tf32x3")

TORCH_TO_TRITON = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of partial sums for data of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float64:
        return "ieee"
    return FP32_DOT_PRECISION if dtype == torch.float32 else "tf32"  # ignored for 16-bit


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count
