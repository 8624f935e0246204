"""The benchmark's outputs: the printed table, bench/results/<device>.csv and its PNG plot."""
from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

MiB = 1 << 20

# CSV columns: what was run, what was measured, and where.
FIELDS = (
    "op", "shape", "mode", "provider", "dtype", "shape_set",
    "median_ms", "iqr_ms", "q25_ms", "q75_ms", "reps", "speedup_vs_eager",
    "peak_mib", "traffic_bytes", "lower_bound_bytes", "traffic_ratio", "achieved_gbps", "peak_gbps", "pct_of_peak",
    "flops", "achieved_gflops", "matmul_peak_gflops", "flop_ceiling_x",
    "device", "machine", "cpu_model", "threads", "torch", "triton", "date",
)
KEY_FIELDS = ("op", "shape", "mode", "provider", "dtype")


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo, else platform)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_label(device: torch.device | str) -> str:
    """File stem of the results: "cpu-<model slug>" or the CUDA device name as a slug."""
    device = torch.device(device)
    if device.type == "cuda":
        return slug(torch.cuda.get_device_name(device))
    return "cpu-" + slug(cpu_model())


def environment(device: torch.device | str) -> dict:
    """The columns that say where and with what the numbers were taken."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_label(device),
        "machine": f"{platform.node()} ({platform.machine()})",
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton_version,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def add_ratios(rows: list[dict]) -> None:
    """Fill speedup_vs_eager (eager time / time, per op, shape, mode, dtype), the traffic ratio
    to the lower bound, the achieved bandwidth and its share of the peak, and where FLOPs were
    counted the achieved GFLOP/s and the FLOP ceiling of the speedup (fastctx/benchmark/flops.py)."""
    eager = {_group(r): r["median_ms"] for r in rows if r["provider"] == "eager" and r.get("median_ms")}
    for r in rows:
        base = eager.get(_group(r))
        r["speedup_vs_eager"] = base / r["median_ms"] if base and r.get("median_ms") else None
        traffic, bound = r.get("traffic_bytes"), r.get("lower_bound_bytes")
        r["traffic_ratio"] = traffic / bound if traffic and bound else None
        r["achieved_gbps"] = traffic / (r["median_ms"] * 1e-3) / 1e9 if traffic and r.get("median_ms") else None
        peak = r.get("peak_gbps")
        r["pct_of_peak"] = 100.0 * r["achieved_gbps"] / peak if peak and r["achieved_gbps"] else None
        flops, matmul_peak = r.get("flops"), r.get("matmul_peak_gflops")
        r["achieved_gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9 if flops and r.get("median_ms") else None
        r["flop_ceiling_x"] = base / (flops / (matmul_peak * 1e9) * 1e3) if flops and matmul_peak and base else None


def _group(row: dict) -> tuple:
    return row["op"], row["shape"], row["mode"], row.get("dtype")


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def format_table(rows: Sequence[dict], title: str = "") -> str:
    """One table: a row per (op, shape, mode, provider)."""
    show_peak = any(r.get("pct_of_peak") is not None for r in rows)
    show_flops = any(r.get("flops") is not None for r in rows)
    header = ["op", "shape", "mode", "provider", "median ms", "IQR ms", "x eager", "peak MiB",
              "traffic MiB", "LB MiB", "x LB", "GB/s"] + (["% peak"] if show_peak else []) + \
        (["GFLOP/s", "ceil x"] if show_flops else [])
    body = []
    for r in rows:
        cells = [
            r["op"], r["shape"], r["mode"], r["provider"],
            _fmt(r.get("median_ms"), ".3f"), _fmt(r.get("iqr_ms"), ".3f"), _fmt(r.get("speedup_vs_eager"), ".2f"),
            _fmt(r.get("peak_mib"), ".1f"),
            _fmt(r["traffic_bytes"] / MiB if r.get("traffic_bytes") else None, ".2f"),
            _fmt(r["lower_bound_bytes"] / MiB if r.get("lower_bound_bytes") else None, ".2f"),
            _fmt(r.get("traffic_ratio"), ".2f"), _fmt(r.get("achieved_gbps"), ".1f"),
        ]
        if show_peak:
            cells.append(_fmt(r.get("pct_of_peak"), ".1f"))
        if show_flops:
            cells += [_fmt(r.get("achieved_gflops"), ".1f"), _fmt(r.get("flop_ceiling_x"), ".2f")]
        body.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(header, *body)]
    left = {0, 1, 2, 3}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    out = ([title] if title else []) + [line(header), line(["-" * w for w in widths])]
    previous = None
    for r, cells in zip(rows, body):
        group = _group(r)
        if previous is not None and group[:2] != previous[:2]:
            out.append("")
        previous = group
        out.append(line(cells))
    return "\n".join(out)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def read_csv(path: str | os.PathLike) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: str | os.PathLike, rows: Iterable[dict], merge: bool = True) -> list[dict]:
    """Write `rows` to the CSV at `path`; with `merge`, rows already in the file whose key
    (op, shape, mode, provider, dtype) is not among `rows` are kept, so benchmarking a
    subset updates its rows only. Returns every row written (as strings)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = [{k: _csv_value(r.get(k)) for k in FIELDS} for r in rows]
    keys = {tuple(r[k] for k in KEY_FIELDS) for r in new}
    kept = []
    if merge and path.exists():
        kept = [{k: r.get(k, "") for k in FIELDS} for r in read_csv(path)
                if tuple(r.get(k, "") for k in KEY_FIELDS) not in keys]
    written = kept + new
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(written)
    os.replace(tmp, path)
    return written


def plot_speedups(rows: Sequence[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Bar chart of the speedup vs eager per op/head and provider, one panel per mode (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    rows = [r for r in rows if r.get("speedup_vs_eager") not in (None, "") and r["provider"] != "eager"]
    if not rows:
        raise ValueError("nothing to plot: no row has a speedup vs eager (was the eager provider run?)")
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    order = ("eager_best", "compile", "fastctx-cpu", "fastctx-cuda", "fastctx-triton")
    everyone = {r["provider"] for r in rows}
    colours = {p: f"C{i}" for i, p in enumerate([p for p in order if p in everyone] + sorted(everyone - set(order)))}
    n_groups = max(len({(r["op"], r["shape"]) for r in rows if r["mode"] == m}) for m in modes)
    fig, axes = plt.subplots(len(modes), 1, figsize=(max(8.0, 1.5 * n_groups + 2), 4.2 * len(modes)), squeeze=False)
    for ax, mode in zip(axes[:, 0], modes):
        mode_rows = [r for r in rows if r["mode"] == mode]
        present = {r["provider"] for r in mode_rows}
        providers = [p for p in order if p in present] + sorted(present - set(order))
        groups = list(dict.fromkeys((r["op"], r["shape"]) for r in mode_rows))
        width = 0.8 / len(providers)
        speeds = []
        for i, provider in enumerate(providers):
            speed = {(r["op"], r["shape"]): float(r["speedup_vs_eager"]) for r in mode_rows if r["provider"] == provider}
            xs = [g + (i - (len(providers) - 1) / 2) * width for g, key in enumerate(groups) if key in speed]
            ys = [speed[key] for key in groups if key in speed]
            bars = ax.bar(xs, ys, width, label=provider, color=colours[provider])
            ax.bar_label(bars, labels=[f"{y:.1f}" for y in ys], fontsize=6, padding=1)
            speeds += ys
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(min(0.8, min(speeds) / 1.25), max(1.25, max(speeds) * 1.4))
        ax.yaxis.set_major_formatter(ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([f"{op}\n{shape}" for op, shape in groups], fontsize=6)
        ax.set_ylabel("speedup vs eager (x)")
        ax.set_title(f"{title} - {mode}" if title else mode)
        ax.legend(fontsize=7, ncol=len(providers))
        ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
