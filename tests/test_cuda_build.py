"""The CUDA kernels of fastctx._C: built for sm_80 and sm_90, resources read back.

No GPU is needed: the extension is compiled and linked with nvcc at install
time; here we read the kernels' registers, stack (spills) and shared memory
from the binary with cuobjdump and record them.
"""
import os
import re
import subprocess

import pytest
import torch

from fastctx import _backend
from fastctx.info import _cuda_tool

CUDA_BUILD_EXPECTED = bool(torch.version.cuda) and os.environ.get("FASTCTX_NO_CUDA", "0") != "1" \
    and os.environ.get("FASTCTX_NO_EXT", "0") != "1"


def test_cuda_kernels_registered():
    if not CUDA_BUILD_EXPECTED:
        pytest.skip("torch is a CPU build or FASTCTX_NO_CUDA/NO_EXT is set: no CUDA kernels to check")
    assert _backend.HAS_CUDA_KERNELS, "fastctx._C was built without CUDA kernels (is nvcc on PATH?)"
    for op in ("pyramid_pool", "gla_context", "residual_relu"):
        for phase in ("fwd", "bwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastctx::{op}_{phase}", "CUDA"), op


def parse_resource_usage(text: str) -> list[dict]:
    """Rows of `cuobjdump --dump-resource-usage`: arch, function, REG, STACK, SHARED, LOCAL."""
    rows, arch = [], None
    for line in text.splitlines():
        m = re.search(r"arch = (sm_\d+)", line)
        if m:
            arch = m.group(1)
        m = re.search(r"Function (\S+):", line)
        if m:
            rows.append({"arch": arch, "function": m.group(1)})
            continue
        m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", line)
        if m and rows:
            rows[-1].update(reg=int(m.group(1)), stack=int(m.group(2)), shared=int(m.group(3)),
                            local=int(m.group(4)))
    return rows


def test_cuda_kernels_resources(tmp_path):
    if not CUDA_BUILD_EXPECTED or not _backend.HAS_CUDA_KERNELS:
        pytest.skip("no CUDA kernels in this build")
    tool = _cuda_tool("cuobjdump")
    assert tool, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    out = subprocess.run([tool, "--dump-resource-usage", _backend._C.__file__],
                         capture_output=True, text=True, check=True)
    rows = [r for r in parse_resource_usage(out.stdout) if "reg" in r]
    archs = {r["arch"] for r in rows}
    assert {"sm_80", "sm_90"} <= archs, f"expected sm_80 and sm_90 code, found {sorted(archs)}"
    fastctx_rows = [r for r in rows if "fastctx" in r["function"]]
    assert fastctx_rows, "no fastctx kernels in the binary"
    report = tmp_path / "cuda_resources.csv"
    report.write_text("arch,function,reg,stack,shared,local\n" + "".join(
        f"{r['arch']},{r['function']},{r['reg']},{r['stack']},{r['shared']},{r['local']}\n" for r in fastctx_rows))
    print(report.read_text())
    spills = [r for r in fastctx_rows if r["local"] or r["stack"]]
    assert not spills, f"kernels using local memory (spills): {spills}"
    assert all(r["reg"] <= 255 for r in fastctx_rows)
