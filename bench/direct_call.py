"""The ops' direct eager path against the same call through the dispatcher (fastctx.ops._dispatch.CustomOp).

window_attention's direct path on the cpu and cuda backends is its C++ autograd node
(csrc/autograd/window_attention.cpp).

    python bench/direct_call.py [--reps 300] [--threads 1]

Forward + backward of small calls, where the Python layer is a large share of the time: each call once
with the direct path and once inside `dispatcher_calls()` (what every call paid before the direct path),
round-robin in one process; medians and what the direct path saves.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import torch

from fastctx import ops
from fastctx.benchmark.timing import time_interleaved
from fastctx.ops._dispatch import dispatcher_calls


def _cases():
    r = torch.randn
    yield "window_attention 2x7x7x768 heads=24 7x7 (Swin-T stage 4)", \
        lambda q, t: ops.window_attention(q, 24, 7, t), (r(2, 7, 7, 2304), r(169, 24))
    yield "window_attention 1x7x7x64 heads=2 7x7", lambda q, t: ops.window_attention(q, 2, 7, t), \
        (r(1, 7, 7, 192), r(169, 2))
    yield "upsample_add_layer_norm 2x1x1x768 -> 7x7", ops.upsample_add_layer_norm, \
        (r(2, 1, 1, 768), r(2, 7, 7, 768), r(768), r(768))
    yield "upsample_add 2x1x1x768 -> 7x7", ops.upsample_add, (r(2, 1, 1, 768), r(2, 7, 7, 768))
    yield "window_pool 2x7x7x768 7x7", lambda x: ops.window_pool(x, 7), (r(2, 7, 7, 768),)
    yield "class_attention 1x64x16x16 K=19", lambda q, k, v: ops.class_attention(q, k, v, None, 0.125), \
        (r(1, 64, 16, 16), r(1, 19, 64), r(1, 19, 64))
    yield "pyramid_pool 1x64x16x16 scales 1,2,3,6", lambda x: ops.pyramid_pool(x, (1, 2, 3, 6)), (r(1, 64, 16, 16),)


@contextlib.contextmanager
def _direct_calls():
    yield


def _step(fn, args):
    leaves = [a.clone().requires_grad_() for a in args]
    out = fn(*leaves)
    outputs = [o for o in (out if isinstance(out, tuple) else (out,)) if o.requires_grad]
    grads = [torch.randn_like(o) for o in outputs]

    def release_grads():
        for leaf in leaves:
            leaf.grad = None

    def step():
        release_grads()
        result = fn(*leaves)
        result = [o for o in (result if isinstance(result, tuple) else (result,)) if o.requires_grad]
        torch.autograd.backward(result, grads)

    def dispatched():
        with dispatcher_calls():
            step()

    def direct():
        with _direct_calls():  # the same context-manager cost on both sides
            step()

    return direct, dispatched, release_grads


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"fwd+bwd medians over {args.reps} interleaved rounds, {args.threads} thread(s), torch {torch.__version__}")
    print(f"{'call':58s} {'dispatcher ms':>13s} {'direct ms':>10s} {'saved us':>9s} {'speedup':>8s}")
    for name, fn, tensors in _cases():
        direct, dispatched, release_grads = _step(fn, tensors)
        stats = time_interleaved({"dispatcher": dispatched, "direct": direct}, reps=args.reps, warmup=20,
                                 prepare=release_grads)
        a, b = stats["dispatcher"].median * 1e3, stats["direct"].median * 1e3
        print(f"{name:58s} {a:13.3f} {b:10.3f} {1e3 * (a - b):9.1f} {a / b:7.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
