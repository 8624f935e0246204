"""`fastctx bench`: fastctx's fused ops and heads against eager PyTorch and torch.compile.

    fastctx bench [--shapes cpu|realistic|tiny] [--ops pyramid_pool,gla_context,...]
                  [--providers eager,eager_best,compile,fastctx-cpu,...] [--mode fwd,fwdbwd]
                  [--memory] [--models [NAMES]] [--out bench/results] [--plot] [--autotune]
    python -m fastctx.benchmark ...   (the same)

Prints one table, a row per (op or head, shape, mode, provider): median time and IQR,
speedup vs the eager reference, peak memory (``--memory``: each provider in a fresh
process), the modelled memory traffic, its lower bound (bytes of inputs + outputs) and
their ratio, and the bandwidth the modelled traffic implies (with the device's peak on
GPU). Results go to ``<out>/<device>.csv`` (merged with rows already there), ``--plot``
adds ``<out>/<device>.png``. See providers.py (what runs), timing.py, memory.py and
traffic.py (how each figure is taken).
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from .flops import count_flops, matmul_peak_flops
from .gpu import autotune_report, peak_bandwidth_gbps
from .memory import MiB, measure_in_subprocess
from .models import DEFAULT_MODELS, MODEL_MODES, build_model_instance, check_model_batch, model_providers
from .providers import (
    ALL_OPS, ALL_PROVIDERS, MODES, build_instance, case_shapes, default_providers,
    provider_unavailable_reason,
)
from .report import add_ratios, device_label, environment, format_table, plot_speedups, write_csv
from .shapes import SHAPE_SETS, get_shape_set
from .timing import time_interleaved
from .traffic import count_traffic

__all__ = ["main", "run", "build_parser"]

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastctx bench", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Ops: " + ", ".join(ALL_OPS) + ". Providers: " + ", ".join(ALL_PROVIDERS) + ".")
    parser.add_argument("--shapes", choices=sorted(SHAPE_SETS),
                        help="shape set (default: realistic on CUDA, cpu on CPU)")
    parser.add_argument("--ops", default=",".join(ALL_OPS),
                        help="comma-separated ops and heads, or 'none' (default: all)")
    parser.add_argument("--providers", help="comma-separated providers (default: every one that runs here)")
    parser.add_argument("--mode", default=",".join(MODES), help="fwd, fwdbwd, or both (fwd,fwdbwd; the default)")
    parser.add_argument("--memory", action="store_true", help="measure peak memory (a fresh process per provider)")
    parser.add_argument("--flops", action="store_true",
                        help="count each step's FLOPs, measure the machine's matmul peak, and show each row's "
                             "achieved GFLOP/s and FLOP ceiling of its speedup over eager")
    parser.add_argument("--models", nargs="?", const=",".join(DEFAULT_MODELS), default=None, metavar="NAMES",
                        help=f"also time whole models (default names: {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--model-size", type=int, help="image side of the model rows (default: the shape set's)")
    parser.add_argument("--model-batch", type=int, default=None,
                        help="batch of the model rows (default: the smallest each runs: 1, and 2 to train APCNet, "
                             "ACFNet and UPerNet, which apply BatchNorm to each image's 1x1 global pool)")
    parser.add_argument("--model-reps", type=int, default=3, help="timed rounds of the model rows (default: 3)")
    parser.add_argument("--out", default="bench/results", help="results directory ('' for none; default: %(default)s)")
    parser.add_argument("--plot", action="store_true", help="write <out>/<device>.png: speedups vs eager")
    parser.add_argument("--autotune", action="store_true",
                        help="CUDA only: run the Triton kernels' autotuners at the shapes and print the chosen configs")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    parser.add_argument("--reps", type=int, default=10, help="timed rounds per row (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds first, >= 1 (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="do not flush the caches before each timed call: each call finds what the call "
                             "before it (another provider's, on the same inputs) left there, as a layer finds "
                             "its input just written; results go to <out>/<device>-warm.csv")
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compile provider (default: %(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `fastctx bench` / `python -m fastctx.benchmark`: 0 on success (bad
    arguments exit with status 2 and a message saying what was expected)."""
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = _resolve(args)
    except ValueError as exc:
        parser.error(str(exc))
    run(**config)
    return 0


def _resolve(args) -> dict:
    """Validated run settings from the parsed command line (ValueError saying what is wrong)."""
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: torch sees no CUDA device on this machine")
    if args.autotune and device.type != "cuda":
        raise ValueError("--autotune needs a CUDA device: the Triton kernels autotune on a GPU, "
                         "and this run is on the CPU")
    dtype = _DTYPES[args.dtype]
    ops = [] if args.ops.strip().lower() == "none" else _csv_list(args.ops)
    for op in ops:
        if op not in ALL_OPS:
            raise ValueError(f"--ops: unknown op {op!r}; expected some of {', '.join(ALL_OPS)} or 'none'")
    modes = list(MODES) if args.mode.strip().lower() == "both" else _csv_list(args.mode)
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"--mode: unknown mode {mode!r}; expected fwd, fwdbwd, or both (fwd,fwdbwd)")
    providers = None
    if args.providers:
        providers = _csv_list(args.providers)
        for name in providers:
            reason = provider_unavailable_reason(name, device, dtype)
            if reason is not None:
                raise ValueError(f"--providers: {name!r} cannot run on {device} {args.dtype}: {reason}")
    if args.reps < 1 or args.warmup < 1 or args.model_reps < 1:
        raise ValueError("--reps, --model-reps and --warmup must be >= 1 (the warm-up round is where "
                         "torch.compile compiles and Triton autotunes, outside the timing)")
    models = _csv_list(args.models) if args.models else []
    for name in models:
        check_model_batch(name, args.model_batch)
    shapes = get_shape_set(args.shapes or ("realistic" if device.type == "cuda" else "cpu"))
    if args.plot and not args.out:
        raise ValueError("--plot needs an --out directory")
    return dict(ops=ops, shapes=shapes.name, modes=modes, providers=providers, device=device, dtype=dtype,
                memory=args.memory, flops=args.flops, models=models, model_size=args.model_size or shapes.model_size,
                model_batch=args.model_batch, model_reps=args.model_reps,
                out=args.out, plot=args.plot, autotune=args.autotune, reps=args.reps, warmup=args.warmup,
                threads=args.threads, compile_backend=args.compile_backend, warm_caches=args.warm_caches)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(ops: Sequence[str], shapes: str, modes: Sequence[str], providers: Sequence[str] | None,
        device: torch.device, dtype: torch.dtype = torch.float32, memory: bool = False, flops: bool = False,
        models: Sequence[str] = (), model_size: int = 512, model_batch: int | None = None, model_reps: int = 3,
        out: str | None = "bench/results", plot: bool = False, autotune: bool = False, reps: int = 10,
        warmup: int = 1, threads: int | None = None, compile_backend: str = "inductor",
        warm_caches: bool = False) -> list[dict]:
    """Benchmark `ops` at shape set `shapes` (and whole `models`), print the table, write
    the CSV (and the plot) under `out`. Returns the rows. `warm_caches`: time without
    flushing the caches before each call (fastctx.benchmark.timing)."""
    if plot and not out:
        raise ValueError("--plot needs an --out directory")
    if threads:
        torch.set_num_threads(threads)
    shape_set = get_shape_set(shapes)
    env = environment(device)
    peak_gbps, _ = peak_bandwidth_gbps(device)
    common = dict(shape_set=shape_set.name, peak_gbps=peak_gbps, peak_mib=None, **env)
    if flops:
        _log("matmul peak: timing a large square torch.mm")
        common["matmul_peak_gflops"] = matmul_peak_flops(device, dtype) / 1e9
    flush_caches = not warm_caches
    rows, memory_jobs = _op_rows(ops, shape_set, modes, providers, device, dtype, reps, warmup, compile_backend,
                                 common, flops, flush_caches)
    model_rows, model_jobs = _model_rows(models, shape_set, providers, device, model_size, model_batch, model_reps,
                                         warmup, common, flush_caches)
    rows += model_rows
    if memory:
        dtype_name = str(dtype).removeprefix("torch.")
        _measure_memory(rows, memory_jobs, model_jobs, device, dtype_name, threads, compile_backend)
    autotune_lines = []
    if autotune:
        autotune_lines = autotune_report(lambda: _run_triton_once(ops, shape_set, device, dtype, providers))

    add_ratios(rows)
    title = (f"fastctx bench: {shape_set.describe()}; {env['device']}, {str(dtype).removeprefix('torch.')}, "
             f"{env['threads']} threads, torch {env['torch']}, triton {env['triton'] or 'none'}; "
             f"caches {'warm' if warm_caches else 'flushed before each call'}")
    print(format_table(rows, title))
    print(_footnotes(memory, device, peak_gbps, common.get("matmul_peak_gflops")))
    if autotune_lines:
        print("\nTriton autotuner choices:\n  " + "\n  ".join(autotune_lines))
    if out:
        csv_path = Path(out) / f"{device_label(device)}{'-warm' if warm_caches else ''}.csv"
        written = write_csv(csv_path, rows)
        print(f"\nresults: {csv_path}")
        if plot:
            print(f"plot:    {plot_speedups(written, csv_path.with_suffix('.png'), title=env['device'])}")
    return rows


def _op_rows(ops, shape_set, modes, providers, device, dtype, reps, warmup, compile_backend, common, flops=False,
             flush_caches=True):
    """Timed rows of every (op, shape, mode, provider), with traffic and lower bound; and
    the memory jobs: (op, provider) -> the rows one child process measures."""
    rows, memory_jobs = [], {}
    dtype_name = str(dtype).removeprefix("torch.")
    cases = [(op, index, case, mode) for op in ops for index, case in enumerate(case_shapes(op, shape_set))
             for mode in modes]
    for number, (op, index, case, mode) in enumerate(cases, 1):
        names = _providers_for(op, providers, device, dtype)
        _log(f"[{number}/{len(cases)}] {op} {case.label} {mode}: {', '.join(names)}")
        inst = build_instance(op, case, mode, names, device, dtype, compile_backend=compile_backend)
        stats = time_interleaved({n: functools.partial(inst.step, n) for n in inst.providers}, reps, warmup, device,
                                 prepare=inst.release_grads, flush_caches=flush_caches)
        bound = inst.lower_bound_bytes()
        del inst
        for name, st in stats.items():
            traffic = step_flops = None
            if name != "compile":  # what Inductor fuses (or calls) is not modelled
                build = lambda name=name: build_instance(op, case, mode, [name], device, dtype)  # noqa: E731
                traffic = count_traffic(build, lambda i, name=name: i.step(name)).total
                if flops:
                    step_flops = count_flops(build, lambda i, name=name: i.step(name))
            rows.append(dict(op=op, shape=case.label, mode=mode, provider=name, dtype=dtype_name, **_times(st),
                             traffic_bytes=traffic, lower_bound_bytes=bound, flops=step_flops, shape_index=index,
                             **common))
            memory_jobs.setdefault((op, name), []).append(
                dict(op=op, shape_set=shape_set.name, shape_index=index, mode=mode))
    return rows, memory_jobs


def _model_rows(models, shape_set, providers, device, size, batch, reps, warmup, common, flush_caches=True):
    """Timed rows of each model's training iteration and inference, and their memory jobs."""
    rows, memory_jobs = [], {}
    for name in models:
        for mode in MODEL_MODES:
            names = [p for p in model_providers(device) if providers is None or p in providers]
            inst = build_model_instance(name, mode, names, device, size=size, batch=batch,
                                        num_classes=shape_set.num_classes)
            _log(f"[model] {name} {inst.shape} {mode}: {', '.join(names)}")
            stats = time_interleaved({n: functools.partial(inst.step, n) for n in names}, reps, warmup, device,
                                     flush_caches=flush_caches)
            for provider, st in stats.items():
                rows.append(dict(op=name, shape=inst.shape, mode=mode, provider=provider, dtype="float32",
                                 **_times(st), traffic_bytes=None, lower_bound_bytes=None, **common))
                memory_jobs.setdefault((name, provider), []).append(
                    dict(model=name, size=size, batch=inst.img.shape[0], mode=mode, num_classes=shape_set.num_classes))
            del inst
    return rows, memory_jobs


def _times(st) -> dict:
    return dict(median_ms=st.median * 1e3, iqr_ms=st.iqr * 1e3, q25_ms=st.q25 * 1e3, q75_ms=st.q75 * 1e3,
                reps=st.reps)


def _providers_for(op: str, requested: Sequence[str] | None, device, dtype) -> list[str]:
    available = default_providers(op, device, dtype)
    if requested is None:
        return available
    return [p for p in requested if p in available]  # e.g. no eager_best for pyramid pooling


def _measure_memory(rows, memory_jobs, model_jobs, device, dtype_name, threads, compile_backend) -> None:
    """Peak memory of every row, one fresh child process per (op or model, provider)."""
    peaks = {}
    jobs = [("op", key, job) for key, job in memory_jobs.items()] + [("model", key, job) for key, job in model_jobs.items()]
    for number, (kind, (name, provider), job) in enumerate(jobs, 1):
        _log(f"[memory {number}/{len(jobs)}] {name} {provider}")
        spec = dict(kind=kind, provider=provider, device=str(device),
                    dtype="float32" if kind == "model" else dtype_name, threads=threads,
                    compile_backend=compile_backend, rows=job)
        try:
            results = measure_in_subprocess(spec)
        except RuntimeError as exc:
            _log(f"  peak memory not measured: {exc}")
            continue
        for res in results:
            peaks[(name, res.get("shape_index"), res["mode"], provider)] = res["peak_bytes"] / MiB
    for r in rows:
        r["peak_mib"] = peaks.get((r["op"], r.get("shape_index"), r["mode"], r["provider"]))


def _run_triton_once(ops, shape_set, device, dtype, providers) -> None:
    """One forward + backward of every op on fastctx-triton (autotunes its kernels)."""
    if providers is None or "fastctx-triton" in providers:
        return  # the timing rounds ran (and tuned) them already
    for op in ops:
        for case in case_shapes(op, shape_set):
            build_instance(op, case, "fwdbwd", ["fastctx-triton"], device, dtype).step("fastctx-triton")


def _footnotes(memory: bool, device, peak_gbps, matmul_peak_gflops=None) -> str:
    notes = [
        "x eager: eager median / median. IQR: interquartile range of the interleaved rounds.",
        "traffic: modelled bytes read + written (every op reads its inputs and writes its outputs once; "
        "fused ops per docs/kernels.md); LB: bytes of inputs + outputs; x LB = traffic / LB; "
        "GB/s = traffic / median. compile and whole models: not modelled.",
    ]
    if memory:
        what = "max_memory_allocated" if torch.device(device).type == "cuda" else "VmHWM (peak RSS)"
        notes.append(f"peak MiB: {what} during one step minus the baseline after inputs, parameters and a "
                     "warm-up step (a fresh process per provider).")
    if peak_gbps:
        notes.append(f"% peak: of {peak_gbps:.0f} GB/s.")
    if matmul_peak_gflops:
        notes.append(f"GFLOP/s: the step's product FLOPs (FlopCounterMode) / median. ceil x: eager median / "
                     f"(FLOPs / {matmul_peak_gflops:.0f} GFLOP/s, a large square torch.mm here), the x eager "
                     "this provider would reach if its products ran at that peak and nothing else took time.")
    return "\n".join(notes)
