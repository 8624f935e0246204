"""Compile every Triton kernel config for sm_80 and sm_90 and check its resources.

No GPU is needed: triton.compile targets GPUTarget("cuda", arch, 32) and
cuobjdump (shipped with Triton) reads registers, spill stack / local memory
and static shared memory from the cubin; Triton's dynamic shared memory comes
from the compile metadata. Any spill (a stack frame or local memory with
local-memory loads/stores in the SASS), or shared memory above the arch limit,
fails. The figures go to <tmp>/triton_resources_sm<arch>.csv and are printed.

The compiler runs in subprocesses (tests/_triton_compile_worker.py, one per
arch) because this session runs with TRITON_INTERPRET=1, which the jit
decorator reads at import time; tests/conftest.py starts them with the
session's first test, so that they compile while the other tests run.
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
from _triton_compile_worker import ARCHS

# Locate triton without importing it here: this process may run the interpreter.
_TRITON = importlib.util.find_spec("triton")
if _TRITON is None:
    pytest.skip("triton is not installed", allow_module_level=True)

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


_LOCAL_ACCESS = re.compile(r"\b(?:LDL|STL)(?:\.[A-Z0-9]+)*\b")


def _local_memory_instructions(cubin: str) -> int:
    """Local-memory loads and stores (LDL / STL) in the SASS: what a spill costs at run time."""
    sass = subprocess.run([str(CUOBJDUMP), "-sass", cubin], capture_output=True, text=True, check=True).stdout
    return len(_LOCAL_ACCESS.findall(sass))


@pytest.fixture(scope="module")
def compile_workers(triton_compile_workers):
    """arch -> its compile worker, running since the session's first test (tests/conftest.py)."""
    if not CUOBJDUMP.exists():
        pytest.skip(f"cuobjdump not found at {CUOBJDUMP}")
    return triton_compile_workers


@pytest.mark.parametrize("arch", ARCHS)
def test_triton_kernels_compile_without_spills(arch, compile_workers):
    worker = compile_workers[arch]
    returncode = worker.process.wait(timeout=3600)
    out, err = (worker.out / "specs.jsonl").read_text(), (worker.out / "stderr.txt").read_text()
    assert returncode == 0, f"compile worker failed:\n{out[-4000:]}\n{err[-4000:]}"
    records = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records, f"compile worker produced no specs:\n{err[-4000:]}"

    rows, problems, frames = [], [], []
    for rec in records:
        if "error" in rec:
            problems.append(f"{rec['name']}: compile error: {rec['error']}")
            continue
        usage = _resource_usage(rec["cubin"])
        shared = usage["static_shared"] + rec["dynamic_shared"]
        rows.append(dict(name=rec["name"], arch=f"sm_{arch}", regs=usage["regs"], stack=usage["stack"],
                         local=usage["local"], shared=shared))
        if usage["stack"] or usage["local"]:
            traffic = _local_memory_instructions(rec["cubin"])
            if traffic:
                problems.append(f"{rec['name']}: spills (STACK {usage['stack']}, LOCAL {usage['local']}; "
                                f"{traffic} local-memory loads/stores in the SASS)")
            else:
                frames.append(f"{rec['name']}: STACK {usage['stack']} with no local-memory load or store")
        if shared > SHARED_LIMIT[arch]:
            problems.append(f"{rec['name']}: {shared} B shared memory > sm_{arch} limit {SHARED_LIMIT[arch]}")

    report = worker.out / f"triton_resources_sm{arch}.csv"
    with open(report, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "arch", "regs", "stack", "local", "shared"])
        writer.writeheader()
        writer.writerows(rows)
    width = max(len(r["name"]) for r in rows) if rows else 10
    print(f"\nTriton resources, sm_{arch} ({report}):")
    print(f"{'kernel[config]':<{width}}  regs  stack  shared")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['regs']:>4}  {r['stack']:>5}  {r['shared']:>6}")
    if frames:  # reported, not failed: nothing is spilled (ptxas reserves a frame it never touches)
        print("stack frames without local-memory traffic:\n  " + "\n  ".join(frames))
    assert not problems, "\n".join(problems)


_SPILLING_KERNEL = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "0"
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


@triton.jit
def every_value_live(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
    norm = tl.sum(x * x, axis=1)  # 512 values per thread stay live across the reduction: more than 255 registers
    tl.store(out_ptr + offs[:, None] * BLOCK + offs[None, :], x / norm[:, None])


src = ASTSource(every_value_live, {"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"}, {"BLOCK": 128})
kernel = triton.compile(src, target=GPUTarget("cuda", 80, 32), options=dict(num_warps=1, num_stages=1))
open(sys.argv[1], "wb").write(kernel.asm["cubin"])
'''


def test_spill_check_sees_a_spill(tmp_path):
    """The check above can fail: a kernel that must spill shows a stack frame and local-memory traffic."""
    if not CUOBJDUMP.exists():
        pytest.skip(f"cuobjdump not found at {CUOBJDUMP}")
    cubin, script = tmp_path / "spilling.cubin", tmp_path / "spilling_kernel.py"
    script.write_text(_SPILLING_KERNEL)  # a file: triton.jit reads the kernel's source
    subprocess.run([sys.executable, str(script), str(cubin)], check=True, timeout=600,
                   env=dict(os.environ, TRITON_INTERPRET="0"))
    assert _resource_usage(str(cubin))["stack"] > 0
    assert _local_memory_instructions(str(cubin)) > 0
