"""Backend selection, overrides, error messages and `python -m fastctx.info` (per-op limits: tests/ops)."""
import os
import subprocess
import sys

import pytest
import torch

import fastctx
from fastctx import _backend, ops
from conftest import EXTENSION_REQUIRED


def test_automatic_choice_on_cpu():
    expected = "cpu" if _backend.HAS_CPU_KERNELS else "reference"
    assert _backend.select_backend(torch.device("cpu"), torch.float32) == expected
    # no fused CPU kernel for half precision: the reference runs it
    assert _backend.select_backend(torch.device("cpu"), torch.float16) == "reference"


def test_extension_present_when_built():
    if EXTENSION_REQUIRED:
        assert _backend.HAS_CPU_KERNELS, _backend._C_ERROR


def test_use_backend_nests_and_restores():
    assert _backend.current_override() is None
    with fastctx.use_backend("reference"):
        assert _backend.current_override() == "reference"
        with fastctx.use_backend("triton"):
            assert _backend.current_override() == "triton"
        assert _backend.current_override() == "reference"
    assert _backend.current_override() is None


def test_unknown_backend_is_rejected():
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with fastctx.use_backend("cudnn"):
            pass


def test_reference_backend_runs_everything():
    x = torch.randn(1, 2, 4, 4, dtype=torch.bfloat16)
    with fastctx.use_backend("reference"):
        assert ops.pyramid_pool(x, (1, 2)).dtype == torch.bfloat16


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


def test_environment_variable_override():
    out = _python("import fastctx._backend as b; print(b.current_override())", FASTCTX_BACKEND="reference")
    assert out.stdout.strip() == "reference", out.stderr
    out = _python("import fastctx", FASTCTX_BACKEND="nonsense")
    assert out.returncode != 0 and "FASTCTX_BACKEND='nonsense'" in out.stderr


def test_triton_needs_interpreter_for_cpu_tensors():
    out = _python(
        "import torch, fastctx\n"
        "with fastctx.use_backend('triton'):\n"
        "    fastctx.ops.pyramid_pool(torch.randn(1, 1, 2, 2), (1,))",
        TRITON_INTERPRET="0",
    )
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr


def test_info_reports_build():
    out = subprocess.run([sys.executable, "-m", "fastctx.info"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "triton" in out.stdout and "interpreter" in out.stdout
    if EXTENSION_REQUIRED:
        assert f"cpu kernels    {_backend._C.__file__}" in out.stdout
    if _backend.HAS_CUDA_KERNELS:
        assert "sm_80" in out.stdout and "sm_90" in out.stdout
    # the capability table: every op, on both device types, with its limits
    for op in fastctx.ops.OPS:
        assert f"cpu  {op}" in out.stdout and f"cuda {op}" in out.stdout
    assert "K <= 64" in out.stdout


def test_resolution_is_remembered_per_request_device_dtype_and_facts():
    """Every call resolves its backend (in its wrapper and inside its op): the answer is remembered per
    (requested backend, device, dtype, shape facts), refusals raise every time, and symbolic sizes
    (which do not hash) are decided afresh."""
    if not _backend.HAS_CPU_KERNELS:
        pytest.skip("needs the C++ extension")
    from fastctx.ops._dispatch import FusedOp, Support

    asked = []

    def limits(facts):
        asked.append(facts["K"])
        return None if facts["K"] <= 4 else f"K = {facts['K']} > 4"

    # window_attention's kernels are built, so the cpu backend's limits decide
    op = FusedOp("window_attention", cpu=Support(limits=limits), cuda=Support(), triton=Support())
    cpu, f32 = torch.device("cpu"), torch.float32
    assert op.wrapper_backend(cpu, f32, {"K": 4}) == "auto"
    assert op.resolve("auto", cpu, f32, {"K": 4}) == "cpu"
    assert asked == [4]
    with pytest.warns(fastctx.BackendFallbackWarning, match="K = 5 > 4"):
        assert op.resolve("auto", cpu, f32, {"K": 5}) == "reference"
    assert op.resolve("auto", cpu, f32, {"K": 5}) == "reference"
    assert asked == [4, 5]
    assert op.resolve("auto", cpu, torch.float64, {"K": 4}) == "cpu"
    assert asked == [4, 5, 4]
    with fastctx.use_backend("reference"):
        assert op.resolve("auto", cpu, f32, {"K": 4}) == "reference"
        assert op.wrapper_backend(cpu, f32, {"K": 4}) == "reference"
    with fastctx.use_backend("cpu"):
        assert op.resolve("auto", cpu, f32, {"K": 4}) == "cpu"
        for _ in range(2):
            with pytest.raises(fastctx.BackendUnavailableError, match="cannot run window_attention: K = 5 > 4"):
                op.wrapper_backend(cpu, f32, {"K": 5})
    assert asked == [4, 5, 4, 4, 5, 5]

    class UnhashableSize(int):  # as a SymInt under make_fx's symbolic tracing
        __hash__ = None

    for _ in range(2):
        assert op.resolve("auto", cpu, f32, {"K": UnhashableSize(3)}) == "cpu"
    assert asked == [4, 5, 4, 4, 5, 5, 3, 3]
