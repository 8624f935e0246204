"""What the GPU kernels of the two class ops (class_gather, class_attention) share: one pixel tile holds
every class, so both stop at MAX_CLASSES.

CUDA pads K to 32, 64, 128 or 256 classes in shared memory (`class_k_error` of csrc/cuda/class_gather_launch.h);
Triton pads K to the next power of two >= 16 register rows (`K_MAX` of kernels/class_gather.py and
kernels/class_attention.py, which tests/ops/test_class_*.py check against this). ADE20K's 150 and
COCO-Stuff's 171 classes fit; more run on the reference backend.
"""
from __future__ import annotations

from ._dispatch import Support

MAX_CLASSES = 256
_NOTE = f"K <= {MAX_CLASSES}, B <= 65535"


def _cuda_limits(facts) -> str | None:
    if facts["K"] > MAX_CLASSES:
        return f"K = {facts['K']} classes > {MAX_CLASSES} (a pixel tile holds every class in shared memory)"
    if facts["B"] > 65535:
        return f"batch = {facts['B']} > 65535 (grid axis 1)"
    return None


def cuda_support() -> Support:
    return Support(limits=_cuda_limits, note=_NOTE)


def triton_support(op: str) -> Support:
    """The Triton launchers' own `limits` (kernels/<op>.py), imported when first asked: triton is optional."""
    def limits(facts):
        import importlib

        return importlib.import_module(f"fastctx.kernels.{op}").limits(facts)

    return Support(limits=limits, note=_NOTE)
