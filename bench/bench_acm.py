"""GLA context and APCHead forward+backward: fastctx backends vs eager PyTorch, side by side.

    python bench/bench_acm.py                     # B=2, C=512, 64x64, scales (1, 2, 3, 6)
    python bench/bench_acm.py --head              # also the whole APCHead (Cin 2048) training step

Providers, all timed in this one process, interleaved round by round so machine
noise hits them alike:
  eager-mmseg   mmseg's ACM maths per scale: gla(x + g), sigmoid, permute, matmul, permute
  eager-ref     fastctx.reference.gla_context (same maths, global term as a bias)
  <backend>     fastctx.ops.gla_context on each fused backend that runs on this device
Reported: median time of forward+backward, ratio to eager-mmseg.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fastctx
from fastctx import _backend, ops, reference


def mmseg_gla_context(x, weight, gla_bias, global_vec, pooled, sizes):
    """Per scale, as mmseg's ACM.forward: gla(x + g) -> sigmoid -> matmul -> permute."""
    batch, _, height, width = x.shape
    channels = weight.shape[1]
    outs, offset = [], 0
    for g, size in enumerate(sizes):
        x_g = x[:, g * channels:(g + 1) * channels]
        w_g = weight[offset:offset + size, :, None, None]
        logits = F.conv2d(x_g + global_vec[:, g * channels:(g + 1) * channels, None, None], w_g,
                          gla_bias[offset:offset + size])
        affinity = torch.sigmoid(logits.permute(0, 2, 3, 1).reshape(batch, -1, size))
        z = torch.matmul(affinity, pooled[:, :, offset:offset + size].permute(0, 2, 1).contiguous())
        outs.append(z.permute(0, 2, 1).contiguous().view(batch, channels, height, width))
        offset += size
    return torch.cat(outs, dim=1)


def _timeit(fn, inputs, grad):
    for t in inputs:
        t.grad = None
    start = time.perf_counter()
    out = fn(*inputs)
    out.backward(grad)
    return time.perf_counter() - start


def bench_gla_context(args) -> list[tuple[str, float]]:
    sizes = [s * s for s in args.scales]
    groups, total = len(sizes), sum(sizes)
    g = torch.Generator().manual_seed(0)
    b, c = args.batch, args.channels
    h, w = args.size
    x = torch.relu(torch.randn(b, groups * c, h, w, generator=g)).requires_grad_()
    weight = (torch.randn(total, c, generator=g) / c ** 0.5).requires_grad_()
    gla_bias = torch.randn(total, generator=g).requires_grad_()
    global_vec = torch.randn(b, groups * c, generator=g).requires_grad_()
    pooled = torch.randn(b, c, total, generator=g).requires_grad_()
    grad = torch.randn(b, groups * c, h, w, generator=g)

    def logit_bias(gv, wt, gb):
        return torch.cat([F.linear(gv[:, i * c:(i + 1) * c], wt[o:o + s], gb[o:o + s])
                          for i, (o, s) in enumerate(zip([sum(sizes[:j]) for j in range(groups)], sizes))], 1)

    providers = {
        "eager-mmseg": lambda *t: mmseg_gla_context(t[0], t[1], t[2], t[3], t[4], sizes),
        "eager-ref": lambda *t: reference.gla_context(t[0], t[1], logit_bias(t[3], t[1], t[2]), t[4], sizes),
    }
    for backend in ("cpu", "triton", "cuda"):
        if _backend.unavailable_reason(backend, x.device, x.dtype) is None and not (
                backend == "triton" and _backend.TRITON_INTERPRET):
            def run(*t, _backend_name=backend):
                with fastctx.use_backend(_backend_name):
                    return ops.gla_context(t[0], t[1], logit_bias(t[3], t[1], t[2]), t[4], sizes)
            providers[backend] = run
    inputs = (x, weight, gla_bias, global_vec, pooled)
    times = {name: [] for name in providers}
    for name, fn in providers.items():  # warm-up
        _timeit(fn, inputs, grad)
    for _ in range(args.reps):
        for name, fn in providers.items():
            times[name].append(_timeit(fn, inputs, grad))
    return [(name, statistics.median(t)) for name, t in times.items()]


def bench_head(args) -> list[tuple[str, float]]:
    from fastctx.nn import APCHead

    torch.manual_seed(0)
    h, w = args.size
    head = APCHead(args.in_channels, args.channels, num_classes=19, pool_scales=args.scales).train()
    x = torch.randn(args.batch, args.in_channels, h, w)
    grad = torch.randn(args.batch, 19, h, w)
    modes = {"eager-mmseg": False, "fastctx": True}
    times = {name: [] for name in modes}

    def step(fused):
        head.fused = fused
        head.zero_grad(set_to_none=True)
        start = time.perf_counter()
        head(x).backward(grad)
        return time.perf_counter() - start

    for fused in modes.values():
        step(fused)
    for _ in range(args.reps):
        for name, fused in modes.items():
            times[name].append(step(fused))
    return [(name, statistics.median(t)) for name, t in times.items()]


def _print_table(title, rows):
    base = rows[0][1]
    print(f"\n{title}")
    print(f"{'provider':14s} {'median ms':>10s} {'speedup vs ' + rows[0][0]:>24s}")
    for name, t in rows:
        print(f"{name:14s} {t * 1e3:10.2f} {base / t:23.2f}x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--in-channels", type=int, default=2048)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 64), metavar=("H", "W"))
    parser.add_argument("--scales", type=int, nargs="+", default=(1, 2, 3, 6))
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--head", action="store_true", help="also time the whole APCHead training step")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"B={args.batch} C={args.channels} {args.size[0]}x{args.size[1]} scales={tuple(args.scales)} fp32")
    _print_table("GLA context, forward+backward", bench_gla_context(args))
    if args.head:
        _print_table(f"APCHead (Cin={args.in_channels}) training step, forward+backward", bench_head(args))


if __name__ == "__main__":
    main()
