"""Compile every Triton Encoding config for sm_80 and sm_90 and check its resources (no GPU needed).

``fastctx.ops.triton_encoding.compile_specs()`` lists every (kernel, dtype,
layout, K_PAD, config) the launchers can run at realistic shapes. Each is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
and its cubin read with the cuobjdump that ships with Triton: any spill
(STACK or LOCAL > 0) or shared memory (static + Triton's dynamic) above the
arch limit fails, and the table is printed (run with -s) and written to
<tmp>/triton_encoding_resources_sm<arch>.csv.

The compiler runs in subprocesses (this file, run as a script) because the
test session runs with TRITON_INTERPRET=1, which the jit decorator reads at
import time; the specs are sharded over the available cores.
"""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max shared memory per block
_USAGE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def _worker(arch: int, out_dir: str, shard: int, n_shards: int) -> None:
    """Compile shard `shard` of the specs for `arch`; one JSON line per spec on stdout."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastctx.ops import triton_encoding

    os.makedirs(out_dir, exist_ok=True)
    target = GPUTarget("cuda", arch, 32)
    for i, spec in enumerate(triton_encoding.compile_specs()):
        if i % n_shards != shard:
            continue
        rec = dict(name=spec["name"], arch=arch, num_warps=spec["num_warps"], num_stages=spec["num_stages"])
        try:
            src = ASTSource(spec["fn"], spec["signature"], spec["constexprs"], spec.get("attrs"))
            compiled = triton.compile(src, target=target,
                                      options=dict(num_warps=spec["num_warps"], num_stages=spec["num_stages"]))
            path = os.path.join(out_dir, f"encoding_sm{arch}_{i:03d}.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            rec.update(cubin=path, dynamic_shared=int(compiled.metadata.shared))
        except Exception as exc:  # reported per spec; the test fails on it
            rec.update(error=f"{type(exc).__name__}: {exc}"[-2000:])
        print(json.dumps(rec), flush=True)


def _cuobjdump() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def _resource_usage(cuobjdump: Path, cubin: str) -> dict:
    out = subprocess.run([str(cuobjdump), "--dump-resource-usage", cubin],
                         capture_output=True, text=True, check=True).stdout
    match = _USAGE.search(out)
    assert match, f"no resource line in cuobjdump output for {cubin}:\n{out}"
    regs, stack, shared, local = map(int, match.groups())
    return dict(regs=regs, stack=stack, static_shared=shared, local=local)


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_encoding_compiles_without_spills(arch, tmp_path):
    pytest.importorskip("triton")
    cuobjdump = _cuobjdump()
    if not cuobjdump.exists():
        pytest.skip(f"cuobjdump not found at {cuobjdump}")
    env = dict(os.environ, TRITON_INTERPRET="0")
    n_shards = max(1, min(4, os.cpu_count() or 1))
    procs = [
        subprocess.Popen([sys.executable, __file__, "--arch", str(arch), "--out", str(tmp_path / "cubin"),
                          "--shard", str(s), "--shards", str(n_shards)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for s in range(n_shards)
    ]
    records = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)
        assert proc.returncode == 0, f"compile worker failed:\n{out[-4000:]}\n{err[-4000:]}"
        records += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert records, "compile workers produced no specs"

    rows, problems = [], []
    for rec in sorted(records, key=lambda r: r["name"]):
        if "error" in rec:
            problems.append(f"{rec['name']}: compile error: {rec['error']}")
            continue
        usage = _resource_usage(cuobjdump, rec["cubin"])
        shared = usage["static_shared"] + rec["dynamic_shared"]
        rows.append(dict(name=rec["name"], arch=f"sm_{arch}", regs=usage["regs"], stack=usage["stack"],
                         local=usage["local"], shared=shared))
        if usage["stack"] or usage["local"]:
            problems.append(f"{rec['name']}: spills (STACK {usage['stack']}, LOCAL {usage['local']})")
        if shared > SHARED_LIMIT[arch]:
            problems.append(f"{rec['name']}: {shared} B shared memory > sm_{arch} limit {SHARED_LIMIT[arch]}")

    report = tmp_path / f"triton_encoding_resources_sm{arch}.csv"
    with open(report, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["name", "arch", "regs", "stack", "local", "shared"])
        writer.writeheader()
        writer.writerows(rows)
    width = max((len(r["name"]) for r in rows), default=10)
    print(f"\nTriton encoding resources, sm_{arch} ({len(rows)} specs, {report}):")
    print(f"{'kernel[config]':<{width}}  regs  stack  local  shared")
    for r in rows:
        print(f"{r['name']:<{width}}  {r['regs']:>4}  {r['stack']:>5}  {r['local']:>5}  {r['shared']:>6}")
    assert not problems, "\n".join(problems)


if __name__ == "__main__":
    import argparse

    os.environ["TRITON_INTERPRET"] = "0"  # before triton is imported (by _worker)
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--shard", type=int, default=0)
    parser.add_argument("--shards", type=int, default=1)
    args = parser.parse_args()
    _worker(args.arch, args.out, args.shard, args.shards)
