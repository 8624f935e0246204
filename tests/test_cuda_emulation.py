"""CUDA kernels' device code run on the CPU through tests/cuda_emu/emu.h (residual_relu, pyramid_pool).

nvcc only proves the CUDA kernels compile; their indexing, lane packing and
warp/block reductions would first run on a GPU. Here the device part of a .cu
file (between ``namespace fastctx {`` and its host-side marker) is compiled
as C++ against emu.h, which runs one std::thread per CUDA thread with
barriers for __syncthreads and the warp collectives, and a driver program in
tests/cuda_emu/ checks every result against a float64 reference.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
HOST_MARKER = "// ---------------------------------------------------------------- host side"


def device_code(cu_file: Path) -> str:
    """The device part of `cu_file` with its csrc/common includes, as a C++ include file."""
    src = cu_file.read_text()
    start = src.index("namespace fastctx {")
    end = src.index(HOST_MARKER)
    includes = "".join(line + "\n" for line in src[:start].splitlines() if re.match(r'#include "common/', line))
    body = re.sub(r"extern __shared__ [^;]*\bsmem_raw\[\];", "unsigned char* smem_raw = emu_dyn_smem;", src[start:end])
    return includes + body + "}  // namespace\n}  // namespace fastctx\n"


def _compiler() -> str:
    cxx = shutil.which(os.environ.get("CXX", "c++"))
    if cxx is None:
        pytest.fail("no C++ compiler found (set CXX): the extension build needs one too")
    return cxx


@pytest.mark.parametrize("kernel", ["residual_relu", "pyramid_pool"])
def test_cuda_device_code_under_emulation(kernel, tmp_path):
    (tmp_path / f"{kernel}.device.inc").write_text(device_code(ROOT / "csrc" / "cuda" / f"{kernel}.cu"))
    exe = tmp_path / kernel
    build = subprocess.run([_compiler(), "-std=c++20", "-O1", "-pthread", f"-I{ROOT / 'csrc'}", f"-I{EMU}",
                            f"-I{tmp_path}", str(EMU / f"{kernel}.cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and lines[-1] == "ALL OK", run.stdout + run.stderr
    assert len(lines) > 1 and all(line.startswith("ok ") for line in lines[:-1]), run.stdout
