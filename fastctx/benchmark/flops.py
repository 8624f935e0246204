"""FLOPs of each provider's step, and the FLOP ceiling of its speedup over eager.

FLOPs are the products' (2 per multiply-add), counted by torch.utils.flop_counter's
FlopCounterMode: torch's formulas for the eager matmuls and convolutions, and the fastctx
ops' own formulas for the fused kernels (registered next to each op, fastctx/ops/). Like
the traffic model, the step runs on fake tensors.

The ceiling: on a machine whose products run at most at `peak` FLOP/s, a provider doing
F FLOPs takes at least F / peak, so its speedup over eager is at most
eager time / (F / peak). `peak` is measured: the rate of a large square torch.mm at the
run's thread count, the best the machine's BLAS reaches. A row far below its ceiling loses
time outside its products (memory, exp, Python); a target above the ceiling cannot be
met by any implementation of the same products in that dtype.
"""
from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode

from .timing import require_cuda


def count_flops(build: Callable[[], object], run: Callable[[object], object]) -> int:
    """FLOPs of `run(build())`, both on fake tensors."""
    with FakeTensorMode():
        state = build()
        with FlopCounterMode(display=False) as counter:
            run(state)
    return int(counter.get_total_flops())


def matmul_peak_flops(device: torch.device | str, dtype: torch.dtype = torch.float32, size: int | None = None,
                      reps: int = 5) -> float:
    """FLOP/s of the fastest of `reps` square `size` x `size` torch.mm calls (after one warm-up).

    Default size: 2048 on the CPU (a few hundred ms per call on one core), 8192 on CUDA.
    """
    device = torch.device(device)
    if reps < 1:
        raise ValueError(f"reps must be >= 1, got {reps}")
    if device.type == "cuda":
        require_cuda("the matmul peak of a CUDA device")
    size = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            seconds = time.perf_counter() - t0
        best = min(best, seconds)
    return 2.0 * size ** 3 / best
