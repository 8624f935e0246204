"""Interleaved timing: every provider once per round, rounds repeated, medians reported.

Running the providers round-robin (and rotating who goes first) makes a burst of machine
noise, a frequency change or another process hit all of them alike, which back-to-back
blocks of repeats do not. Warm-up calls (first-call allocation, oneDNN primitive
creation, torch.compile compilation, Triton autotuning) run before any timed round.

CPU: wall-clock time of each call (``time.perf_counter``), after reading a buffer twice
the size of the last-level cache: every call starts with caches holding clean, unrelated
lines, so none profits from data its predecessor left in cache or pays for writing back
the lines its predecessor dirtied. CUDA: CUDA events around each call, with the L2 cache
flushed before it (as ``triton.testing.do_bench`` does), for the same reason.
``flush_caches=False`` (``fastctx bench --warm-caches``) skips the flush: each call finds
what the call before it (another provider's, on the same inputs) left in cache, closer to
a layer whose input the layer before it has just written, and dependent on who ran before.
"""
from __future__ import annotations

import gc
import glob
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class TimingStats:
    """Seconds per call over the timed rounds."""

    median: float
    q25: float
    q75: float
    reps: int

    @property
    def iqr(self) -> float:
        return self.q75 - self.q25

    @classmethod
    def of(cls, samples: list[float]) -> TimingStats:
        if not samples:
            raise ValueError("no timing samples: reps must be >= 1")
        q25, median, q75 = np.percentile(np.asarray(samples, dtype=np.float64), [25, 50, 75])
        return cls(float(median), float(q25), float(q75), len(samples))


def time_interleaved(calls: dict[str, Callable[[], object]], reps: int, warmup: int = 1,
                     device: torch.device | str = "cpu",
                     prepare: Callable[[], object] | None = None,
                     flush_caches: bool = True) -> dict[str, TimingStats]:
    """Median and quartiles of each call, timed round-robin `reps` times after `warmup` rounds.

    `prepare`, when given, runs untimed before every call: state the calls share (the
    gradients of common inputs) is reset there, so that no call is charged for freeing
    what the one before it left. `flush_caches`: flush the caches before every call (see
    the module's docstring).
    """
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    names = list(calls)
    prepare = prepare or (lambda: None)
    for _ in range(warmup):
        for name in names:
            prepare()
            calls[name]()
    if device.type == "cuda":
        samples = _cuda_rounds(calls, names, reps, device, prepare, flush_caches)
    else:
        samples = _cpu_rounds(calls, names, reps, prepare, flush_caches)
    return {name: TimingStats.of(samples[name]) for name in names}


def _round_order(names: list[str], round_index: int) -> list[str]:
    shift = round_index % len(names)
    return names[shift:] + names[:shift]


_CPU_CACHE_FALLBACK_BYTES = 32 << 20
_SIZE_UNITS = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_cache_size(text: str) -> int | None:
    """Bytes of a sysfs cache size ("32768K", "1M", "512"); None if it is not one."""
    text = text.strip()
    if text[-1:] in _SIZE_UNITS and text[:-1].isdigit():
        return int(text[:-1]) * _SIZE_UNITS[text[-1]]
    return int(text) if text.isdigit() else None


def cpu_last_level_cache_bytes() -> int:
    """Size of the largest CPU cache sysfs lists for cpu0 (32 MiB when it lists none)."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                size = parse_cache_size(f.read())
        except OSError:
            continue
        if size is not None:
            sizes.append(size)
    return max(sizes, default=_CPU_CACHE_FALLBACK_BYTES)


class CpuCacheFlush:
    """Reads a buffer twice the last-level cache: what the previous call left in cache is
    evicted (its dirty lines written back here, untimed), and what is left is of no use to
    the next call."""

    def __init__(self, cache_bytes: int | None = None):
        cache_bytes = cpu_last_level_cache_bytes() if cache_bytes is None else cache_bytes
        self.buffer = torch.ones(2 * cache_bytes // 4, dtype=torch.float32)

    def __call__(self) -> None:
        self.buffer.sum()


def _cpu_rounds(calls, names, reps, prepare, flush_caches) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in names}
    flush = CpuCacheFlush() if flush_caches else (lambda: None)
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(reps):
            gc.collect()
            gc.disable()  # no collector pause inside a timed call
            for name in _round_order(names, r):
                prepare()
                flush()
                start = time.perf_counter()
                calls[name]()
                samples[name].append(time.perf_counter() - start)
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    return samples


_L2_FLUSH_BYTES = 256 << 20  # larger than the L2 of any current GPU (H100: 50 MiB)


def require_cuda(what: str) -> None:
    """Raise a RuntimeError naming `what` when no CUDA device is present."""
    if not torch.cuda.is_available():
        raise RuntimeError(f"{what} needs a CUDA device, and torch sees none on this machine "
                           f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})")


def _cuda_rounds(calls, names, reps, device, prepare, flush_caches) -> dict[str, list[float]]:
    require_cuda("CUDA-event timing")
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device) if flush_caches else None
    samples: dict[str, list[float]] = {name: [] for name in names}
    torch.cuda.synchronize(device)
    for r in range(reps):
        events = []
        for name in _round_order(names, r):
            prepare()
            if flush is not None:
                flush.zero_()
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            calls[name]()
            end.record()
            events.append((name, start, end))
        torch.cuda.synchronize(device)
        for name, start, end in events:
            samples[name].append(start.elapsed_time(end) / 1e3)
    return samples
