"""GPU facts for the benchmark: peak memory bandwidth, and the Triton autotuners' choices.

Everything here imports on machines without a GPU; functions that need one raise a
RuntimeError saying so.
"""
from __future__ import annotations

import re
from collections.abc import Callable

import torch

from .timing import require_cuda

# Peak DRAM bandwidth in GB/s (1e9 bytes/s) from the vendors' data sheets, matched against
# torch.cuda.get_device_name() in order: the more specific patterns first.
PEAK_BANDWIDTH_GBPS: list[tuple[str, float]] = [
    (r"H200", 4800.0),
    (r"H100.*NVL", 3900.0),
    (r"H100.*PCIe", 2000.0),
    (r"H100|H800|GH200", 3350.0),
    (r"A100.*80GB.*PCIe", 1935.0),
    (r"A100.*80GB", 2039.0),
    (r"A100|A800", 1555.0),
    (r"L40S|L40", 864.0),
    (r"\bL4\b", 300.0),
    (r"A10G", 600.0),
    (r"\bA10\b", 600.0),
    (r"A30", 933.0),
    (r"V100", 900.0),
    (r"\bT4\b", 320.0),
    (r"RTX 6000 Ada", 960.0),
    (r"A6000", 768.0),
    (r"RTX 4090", 1008.0),
    (r"RTX 3090", 936.0),
    (r"B200", 8000.0),
]


def peak_bandwidth_from_name(name: str) -> float | None:
    """Data-sheet peak bandwidth (GB/s) of a device name, or None when not in the table."""
    for pattern, gbps in PEAK_BANDWIDTH_GBPS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return gbps
    return None


def peak_bandwidth_from_properties(memory_clock_khz: int, bus_width_bits: int) -> float | None:
    """Double-data-rate peak: 2 transfers per memory clock, bus width / 8 bytes each (GB/s)."""
    if memory_clock_khz <= 0 or bus_width_bits <= 0:
        return None
    return 2.0 * memory_clock_khz * 1e3 * bus_width_bits / 8 / 1e9


def peak_bandwidth_gbps(device: torch.device | str) -> tuple[float | None, str]:
    """(peak GB/s, where it came from) of a device; (None, why) for CPUs."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "no peak bandwidth table for CPUs"
    require_cuda("the peak bandwidth of a CUDA device")
    props = torch.cuda.get_device_properties(device)
    gbps = peak_bandwidth_from_name(props.name)
    if gbps is not None:
        return gbps, f"data sheet ({props.name})"
    gbps = peak_bandwidth_from_properties(getattr(props, "memory_clock_rate", 0),
                                          getattr(props, "memory_bus_width", 0))
    if gbps is not None:
        return gbps, "memory clock x bus width (device properties)"
    return None, f"unknown for {props.name}"


def autotune_report(run_all: Callable[[], None]) -> list[str]:
    """Run `run_all` (Triton provider steps at the benchmark shapes) with autotuning on, and
    return one line per kernel and tuning key: the config the autotuner picked."""
    require_cuda("--autotune (the Triton kernels tune on a GPU)")
    import importlib

    from fastctx.kernels import _launch

    if not _launch.AUTOTUNE:
        raise RuntimeError("--autotune: FASTCTX_TRITON_AUTOTUNE=0 pins every Triton kernel to its default "
                           "config; unset it to autotune")
    run_all()
    tuners = {}
    for op in _launch.OPS:
        module = importlib.import_module(f"fastctx.kernels.{op}")
        for kernel in (k for k in vars(module).values() if isinstance(k, _launch.Kernel)):
            for family in kernel.tuned_families():
                tuners[f"{kernel.name}{list(family)}"] = kernel.autotuned(family)
    lines = []
    for label, tuner in tuners.items():
        for key, config in getattr(tuner, "cache", {}).items():
            lines.append(f"{label} key={key}: {config}")
    return lines or ["no Triton kernel was autotuned (no fastctx-triton rows ran)"]
