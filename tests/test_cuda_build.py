"""The CUDA kernels, built as fastctx._C_cuda for sm_75, sm_80 and sm_90: present, registered, no spills.

No GPU is needed: the module is compiled and linked with nvcc at install time; here we check that it
was built (the build treats a CUDA failure as a warning, so this is where a broken CUDA build shows),
that the CPU module fastctx._C does not depend on CUDA, and read every kernel's registers, stack
(spills) and shared memory from the binary with cuobjdump.
"""
import importlib
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from fastctx.info import _cuda_tool

CUDA_BUILD_EXPECTED = bool(torch.version.cuda) and os.environ.get("FASTCTX_NO_CUDA", "0") != "1" \
    and os.environ.get("FASTCTX_NO_EXT", "0") != "1"
OPS = ("pyramid_pool", "gla_context", "residual_relu", "encoding", "class_gather", "class_attention",
       "window_attention", "window_pool", "upsample_add", "upsample_add_layer_norm")
# The architectures setup.py builds when no GPU is there to ask (TORCH_CUDA_ARCH_LIST unset).
EXPECTED_ARCHS = {"sm_75", "sm_80", "sm_90"}
# Every __global__ template of csrc/cuda/*_kernel.cuh: each must be compiled for every architecture.
KERNELS = (
    "residual_relu_fwd_kernel", "residual_relu_bwd_kernel", "channel_sum_kernel",
    "pyramid_pool_fwd_kernel", "pyramid_pool_bwd_kernel",
    "gla_fwd_kernel", "gla_bwd_kernel", "sum_partials_kernel",  # sum_partials_kernel: common/partials.cuh
    "encoding_prep_kernel", "encoding_norms_kernel", "encoding_tile_kernel", "encoding_fixup_kernel",
    "encoding_fwd_reduce_kernel", "encoding_bwd_reduce_kernel",
    "class_gather_fwd_kernel", "class_gather_merge_kernel", "class_gather_prep_kernel", "class_gather_bwd_kernel",
    "class_attention_fwd_kernel", "class_attention_bwd_kernel", "class_attention_sum_kernel",
    "window_attention_fwd_kernel", "window_attention_bwd_kernel", "window_attention_sum_kernel",
    "window_pool_fwd_kernel", "window_pool_bwd_kernel", "window_pool_pos_grad_kernel",
    "upsample_add_fwd_kernel", "upsample_add_bwd_kernel",
    "upsample_add_layer_norm_fwd_kernel", "upsample_add_layer_norm_bwd_kernel",
)


def _cuda_module_file() -> Path:
    if not CUDA_BUILD_EXPECTED:
        pytest.skip("torch is a CPU build or FASTCTX_NO_CUDA/NO_EXT is set: no CUDA kernels to check")
    spec = importlib.util.find_spec("fastctx._C_cuda")
    assert spec is not None and spec.origin, (
        "fastctx._C_cuda was not built: the install printed a warning saying why (is nvcc on PATH?)")
    return Path(spec.origin)


def test_cuda_kernels_registered():
    _cuda_module_file()
    importlib.import_module("fastctx._C")  # the schemas
    importlib.import_module("fastctx._C_cuda")
    for op in OPS:
        for phase in ("fwd", "bwd"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastctx::{op}_{phase}", "CUDA"), op


def test_cpu_module_does_not_need_cuda():
    """fastctx._C (schemas + CPU kernels) links no CUDA library, so it loads whatever the CUDA build did."""
    if os.environ.get("FASTCTX_NO_EXT", "0") == "1":
        pytest.skip("FASTCTX_NO_EXT=1: no extension built")
    spec = importlib.util.find_spec("fastctx._C")
    assert spec is not None and spec.origin, "fastctx._C was not built"
    binary = Path(spec.origin).read_bytes()
    for lib in (b"libcudart", b"libc10_cuda", b"libtorch_cuda"):
        assert lib not in binary, f"fastctx._C depends on {lib.decode()}"


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
    module = _cuda_module_file()
    tool = _cuda_tool("cuobjdump")
    assert tool, "cuobjdump not found (CUDA toolkit or triton's bundled copy)"
    out = subprocess.run([tool, "--dump-resource-usage", str(module)], capture_output=True, text=True, check=True)
    rows = [r for r in parse_resource_usage(out.stdout) if "reg" in r and "fastctx" in r["function"]]
    archs = {r["arch"] for r in rows}
    if os.environ.get("TORCH_CUDA_ARCH_LIST") is None and not torch.cuda.is_available():
        assert EXPECTED_ARCHS <= archs, f"expected {sorted(EXPECTED_ARCHS)} code, found {sorted(archs)}"
    for arch in archs:
        missing = [k for k in KERNELS if not any(k in r["function"] for r in rows if r["arch"] == arch)]
        assert not missing, f"{arch}: kernels missing from fastctx._C_cuda: {missing}"
    report = tmp_path / "cuda_resources.csv"
    report.write_text("arch,function,reg,stack,shared,local\n" + "".join(
        f"{r['arch']},{r['function']},{r['reg']},{r['stack']},{r['shared']},{r['local']}\n" for r in rows))
    print(report.read_text())
    spills = [r for r in rows if r["local"] or r["stack"]]
    assert not spills, f"kernels using local memory (spills): {spills}"
    assert all(r["reg"] <= 255 for r in rows)
