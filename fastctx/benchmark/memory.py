"""Peak memory of one step, each provider measured in a fresh process.

What is measured: the peak memory of one step (forward, or forward + backward with the
gradients it leaves in ``.grad``) above the baseline taken after the inputs, parameters
and a warm-up step at the same shape exist. So it is the memory the computation itself
needs: intermediates, tensors saved for the backward, outputs and gradients -- not the
inputs, not library state created on first use (oneDNN primitives, compiled graphs,
thread pools), which the warm-up builds before the baseline.

- CPU (Linux): resident memory. Writing "5" to ``/proc/self/clear_refs`` resets the peak
  resident size VmHWM to the current one; after the step, peak = VmHWM - VmRSS(before).
  The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every larger
  block freshly and returns it on free: memory freed by the warm-up is not silently
  reused (reused pages are already resident and would hide from VmHWM).
- CUDA: ``torch.cuda.max_memory_allocated()`` after ``reset_peak_memory_stats()``, minus
  ``memory_allocated()`` before the step (the caching allocator's tensors, not its
  reserved pool).

A fresh process per provider keeps one provider's allocator state, caches and lazily
created libraries from shifting another's numbers.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable

import torch

MiB = 1 << 20
_CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} is not in /proc/self/status")


def _reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as exc:
        raise RuntimeError("CPU peak memory needs Linux's /proc/self/clear_refs (resetting VmHWM): "
                           f"{exc}; run without --memory on this system") from exc


def peak_step_bytes(step: Callable[[], object], clear: Callable[[], None], device: torch.device | str) -> int:
    """Peak memory of `step()` above the state after a warm-up `step()` and `clear()`.

    `clear` drops what the warm-up left behind that is not part of the baseline
    (gradients in ``.grad``).
    """
    device = torch.device(device)
    step()
    clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = step()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
    else:
        _reset_peak_rss()
        before = _status_bytes("VmRSS")
        result = step()
        peak = _status_bytes("VmHWM") - before
    del result
    return max(peak, 0)


def measure_in_subprocess(spec: dict, timeout: float | None = None) -> list[dict]:
    """Run :func:`child_measure` on `spec` in a fresh Python process; its results."""
    env = {**os.environ, **_CHILD_ENV}
    # -c rather than -m: the package __init__ imports this module, and runpy warns about that.
    cmd = [sys.executable, "-c", "import sys; from fastctx.benchmark.memory import main; main(sys.argv[1:])",
           json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"memory measurement of {spec} failed (exit {proc.returncode}):\n{tail}")
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("[")]
    if not lines:
        raise RuntimeError(f"memory measurement of {spec} printed no result; stdout:\n{proc.stdout[-2000:]}")
    return json.loads(lines[-1])


def child_measure(spec: dict) -> list[dict]:
    """Peak step memory of one provider for each (shape, mode) row of `spec`.

    spec keys: kind ("op" or "model"), provider, device, dtype, threads, compile_backend,
    rows: a list of row dicts -- for ops {op, shape_set, shape_index, mode} or {op, case:
    {label, params}, mode}, for models {model, size, batch, mode}. Returns the rows with
    "peak_bytes" added.
    """
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    provider = spec["provider"]
    results = []
    for row in spec["rows"]:
        inst = _row_instance(spec, row, device)

        def clear(inst=inst):
            for t in inst.leaves:
                t.grad = None

        peak = peak_step_bytes(lambda inst=inst: inst.step(provider), clear, device)
        results.append({**row, "provider": provider, "peak_bytes": peak})
        del inst, clear
        gc.collect()
    return results


def _row_instance(spec: dict, row: dict, device: torch.device):
    from .providers import CaseShape, build_instance, case_shapes
    from .shapes import get_shape_set

    provider = spec["provider"]
    if spec["kind"] == "model":
        from .models import build_model_instance

        return build_model_instance(row["model"], row["mode"], [provider], device, size=row["size"],
                                    batch=row["batch"], num_classes=row.get("num_classes", 19))
    if "case" in row:  # an explicit shape
        case = CaseShape(row["case"]["label"], row["case"]["params"])
    else:
        case = case_shapes(row["op"], get_shape_set(row["shape_set"]))[row["shape_index"]]
    return build_instance(row["op"], case, row["mode"], [provider], device, getattr(torch, spec["dtype"]),
                          compile_backend=spec.get("compile_backend", "inductor"))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: main(['<json spec>']) of fastctx.benchmark.memory (run by fastctx bench --memory)")
    print(json.dumps(child_measure(json.loads(argv[0]))))

