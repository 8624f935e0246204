"""Encoding layer forward+backward: fastctx vs mmseg's form and the two-GEMM rewrite.

    python bench/bench_encoding.py                   # B=2, D=512, 64x128 (N=8192), K=32, fp32, CPU
    python bench/bench_encoding.py --size 32 64 --reps 5

Time: every provider in this process, repetitions interleaved round by round.
Memory: each provider in its own fresh process; its inputs' bytes plus the
peak RSS growth (VmHWM, reset just before) during one forward+backward, next
to the bytes the computation truly needs: inputs (x, dE, parameters) and
outputs (E, grad_x, parameter gradients).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

import fastctx
from fastctx import _backend, ops, reference

MiB = 1 << 20


def providers(device) -> dict:
    out = {"mmseg-form": reference.encoding, "two-gemm": reference.encoding_two_gemm}
    for backend in ("cpu", "cuda", "triton"):
        if _backend.unavailable_reason(backend, torch.device(device), torch.float32) is None and not (
                backend == "triton" and _backend.TRITON_INTERPRET):
            def run(x, c, s, _name=backend):
                with fastctx.use_backend(_name):
                    return ops.encoding(x, c, s)
            out[f"fastctx-{backend}"] = run
    return out


def make_inputs(args):
    g = torch.Generator().manual_seed(0)
    h, w = args.size
    x = torch.randn(args.batch, args.channels, h, w, generator=g).requires_grad_()
    std = 1.0 / (args.codes * args.channels) ** 0.5
    c = (torch.rand(args.codes, args.channels, generator=g) * 2 - 1).mul_(std).requires_grad_()
    s = (-torch.rand(args.codes, generator=g)).requires_grad_()
    grad = torch.randn(args.batch, args.codes, args.channels, generator=g)
    return x, c, s, grad


def step(fn, x, c, s, grad, backward=True):
    for t in (x, c, s):
        t.grad = None
    start = time.perf_counter()
    out = fn(x, c, s)
    if backward:
        out.backward(grad)
    return time.perf_counter() - start


def input_bytes(args) -> int:
    """x, dE and the parameters (fp32)."""
    h, w = args.size
    return 4 * (args.batch * args.channels * h * w + args.batch * args.codes * args.channels
                + args.codes * args.channels + args.codes)


def needed_bytes(args) -> int:
    """Inputs plus outputs of forward+backward: x/grad_x, dE/E, parameters/their grads."""
    return 2 * input_bytes(args)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) to the current RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_memory(args, name) -> dict:
    """Child process: peak RSS growth of one forward+backward of `name`."""
    fn = providers("cpu")[name]
    small = argparse.Namespace(**{**vars(args), "batch": 1, "size": (4, 4)})
    step(fn, *make_inputs(small))  # lazy library initialisation outside the measurement
    x, c, s, grad = make_inputs(args)
    _reset_peak_rss()
    before = _status_bytes("VmRSS")
    step(fn, x, c, s, grad)
    return {"provider": name, "peak_extra_bytes": max(_status_bytes("VmHWM") - before, 0)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=512)
    parser.add_argument("--codes", type=int, default=32)
    parser.add_argument("--size", type=int, nargs=2, default=(64, 128), metavar=("H", "W"))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip-mmseg", action="store_true", help="leave out the (slow, GiB-hungry) mmseg form")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(measure_memory(args, args.memory_child)))
        return

    names = [n for n in providers("cpu") if not (args.skip_mmseg and n == "mmseg-form")]
    table = {n: {} for n in names}
    x, c, s, grad = make_inputs(args)
    fns = providers("cpu")
    for phase, backward in (("fwd", False), ("fwd+bwd", True)):
        times = {n: [] for n in names}
        for n in names:
            step(fns[n], x, c, s, grad, backward)  # warm-up
        for _ in range(args.reps):
            for n in names:
                times[n].append(step(fns[n], x, c, s, grad, backward))
        for n in names:
            table[n][phase] = statistics.median(times[n])
    argv_child = [sys.executable, __file__, "--memory-child"]
    for n in names:
        opts = ["--batch", str(args.batch), "--channels", str(args.channels), "--codes", str(args.codes),
                "--size", str(args.size[0]), str(args.size[1])]
        out = subprocess.run(argv_child + [n] + opts, capture_output=True, text=True, check=True)
        table[n]["mem"] = json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_bytes"]

    h, w = args.size
    need = needed_bytes(args)
    print(f"Encoding, B={args.batch} N={h}x{w}={h * w} K={args.codes} D={args.channels} fp32, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"tensors the computation needs: {need / MiB:.1f} MiB (inputs x, dE, params; outputs E, grad_x, grads)")
    base = names[0]
    print(f"{'provider':16s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'vs ' + base:>12s} {'vs two-gemm':>12s} "
          f"{'peak MiB':>9s} {'/ needed':>9s}")
    for n in names:
        r = table[n]
        print(f"{n:16s} {r['fwd'] * 1e3:9.1f} {r['fwd+bwd'] * 1e3:11.1f} "
              f"{table[base]['fwd+bwd'] / r['fwd+bwd']:11.1f}x {table['two-gemm']['fwd+bwd'] / r['fwd+bwd']:11.2f}x "
              f"{(r['mem'] + input_bytes(args)) / MiB:9.1f} {(r['mem'] + input_bytes(args)) / need:8.2f}x")


if __name__ == "__main__":
    main()
