"""Test configuration.

Triton kernels run on CPU tensors through the interpreter: TRITON_INTERPRET
must be set before triton is first imported (the jit decorator reads it), so it
is set here, before any fastctx import. The Triton compile tests run their
compiler in subprocesses without it, started with the session's first test
(`triton_compile_workers`) so that compiling overlaps the other tests.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import _triton_compile_worker  # noqa: E402
from fastctx import _backend  # noqa: E402

# Without FASTCTX_NO_EXT=1 the C++ extension is part of the build under test:
# its absence is a failure, not a skip.
EXTENSION_REQUIRED = os.environ.get("FASTCTX_NO_EXT", "0") != "1"


def require_backend(backend: str, device: str = "cpu", dtype=torch.float32) -> None:
    """Skip (GPU backends without a GPU) or fail (a broken build) when `backend` cannot run."""
    reason = _backend.unavailable_reason(backend, torch.device(device), dtype)
    if reason is None:
        return
    if backend == "cpu" and EXTENSION_REQUIRED:
        pytest.fail(f"cpu backend unavailable in a build that should have it: {reason}")
    if backend == "triton" and _backend.TRITON_VERSION is not None:
        pytest.fail(f"triton backend unavailable: {reason}")
    pytest.skip(reason)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session", autouse=True)
def triton_compile_workers(request, tmp_path_factory):
    """arch -> the running compile worker (tests/_triton_compile_worker.py) of every arch whose compile
    test this session collected, started at the session's first test: compiling every Triton config
    takes minutes of one core per arch, and the niced workers take it from what the other tests leave
    idle instead of after them. test_triton_compile.py waits for them."""
    archs = sorted({item.callspec.params["arch"] for item in request.session.items
                    if getattr(item, "originalname", None) == "test_triton_kernels_compile_without_spills"})
    workers = {arch: _triton_compile_worker.start(arch, tmp_path_factory.mktemp(f"sm{arch}")) for arch in archs}
    yield workers
    for worker in workers.values():
        worker.stop()
