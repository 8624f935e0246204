"""Compile every Triton kernel config for sm_80 and sm_90 and check its resources.

No GPU is needed: triton.compile targets GPUTarget("cuda", arch, 32) and
cuobjdump (shipped with Triton) reads registers, spill stack / local memory
and static shared memory from the cubin; Triton's dynamic shared memory comes
from the compile metadata. Any spill, or shared memory above the arch limit,
fails. The figures go to <tmp>/triton_resources_sm<arch>.csv and are printed.

The compiler runs in a subprocess (tests/_triton_compile_worker.py) because
this session runs with TRITON_INTERPRET=1, which the jit decorator reads at
import time.
"""
import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

# Locate triton without importing it here: this process may run the interpreter.
_TRITON = importlib.util.find_spec("triton")
if _TRITON is None:
    pytest.skip("triton is not installed", allow_module_level=True)

WORKER = Path(__file__).with_name("_triton_compile_worker.py")
SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block
CUOBJDUMP = Path(_TRITON.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _resource_usage(cubin: str) -> dict:
    out = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", cubin],
                         capture_output=True, text=True, check=True).stdout
    match = _USAGE.search(out)
    assert match, f"no resource line in cuobjdump output for {cubin}:\n{out}"
    regs, stack, shared, local = map(int, match.groups())
    return dict(regs=regs, stack=stack, static_shared=shared, local=local)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_without_spills(arch, tmp_path):
    if not CUOBJDUMP.exists():
        pytest.skip(f"cuobjdump not found at {CUOBJDUMP}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run(
        [sys.executable, str(WORKER), "--arch", str(arch), "--out", str(tmp_path / "cubin")],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert proc.returncode == 0, f"compile worker failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    records = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert records, f"compile worker produced no specs:\n{proc.stderr[-4000:]}"

    rows, problems = [], []
    for rec in records:
        if "error" in rec:
            problems.append(f"{rec['name']}: compile error: {rec['error']}")
            continue
        usage = _resource_usage(rec["cubin"])
        shared = usage["static_shared"] + rec["dynamic_shared"]
        rows.append(dict(name=rec["name"], arch=f"sm_{arch}", regs=usage["regs"], stack=usage["stack"],
                         local=usage["local"], shared=shared))
        if usage["stack"] or usage["local"]:
            problems.append(f"{rec['name']}: spills (STACK {usage['stack']}, LOCAL {usage['local']})")
        if shared > SHARED_LIMIT[arch]:
            problems.append(f"{rec['name']}: {shared} B shared memory > sm_{arch} limit {SHARED_LIMIT[arch]}")

    report = tmp_path / f"triton_resources_sm{arch}.csv"
    with open(report, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "arch", "regs", "stack", "local", "shared"])
        writer.writeheader()
        writer.writerows(rows)
    width = max(len(r["name"]) for r in rows) if rows else 10
    print(f"\nTriton resources, sm_{arch} ({report}):")
    print(f"{'kernel[config]':<{width}}  regs  stack  shared")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['regs']:>4}  {r['stack']:>5}  {r['shared']:>6}")
    assert not problems, "\n".join(problems)
