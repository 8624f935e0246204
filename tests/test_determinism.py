"""The CPU kernels give bit-identical results run to run and for any thread count.

docs/design.md: deterministic by default. The C++ kernels cut their work into chunks
that depend on the shapes only and reduce partial sums in a fixed order, and
they pin MKL to one thread inside a chunk; so 1, 2 or 3 threads must give the
same bits, forward and every gradient. The shapes span several chunks and
tiles of every kernel.
"""
import pytest
import torch

import fastctx
from fastctx import ops
from conftest import require_backend
from op_testing import enc_inputs, gla_inputs, residual_inputs

SIZES = (1, 4, 9, 36)
CASES = {
    "pyramid_pool": (lambda: [torch.randn(2, 64, 33, 45, generator=torch.Generator().manual_seed(0))],
                     lambda x: ops.pyramid_pool(x, (1, 2, 3, 6))),
    "gla_context": (lambda: gla_inputs(2, 64, 33, 45, SIZES), lambda *t: ops.gla_context(*t, SIZES)),
    "residual_relu": (lambda: residual_inputs(2, 64, 33, 45), ops.residual_relu),
    "encoding": (lambda: enc_inputs(2, 128, 33, 45, 32), ops.encoding),
}


def _fwd_bwd(name: str, threads: int) -> list[torch.Tensor]:
    make, fn = CASES[name]
    leaves = [t.requires_grad_() for t in make()]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastctx.use_backend("cpu"):
            out = fn(*leaves)
            weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
            (out * weights).sum().backward()
    finally:
        torch.set_num_threads(previous)
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_kernels_are_bitwise_deterministic_across_runs_and_thread_counts(name):
    require_backend("cpu")
    first = _fwd_bwd(name, 2)
    for threads in (2, 1, 3):
        for i, (a, b) in enumerate(zip(first, _fwd_bwd(name, threads), strict=True)):
            assert torch.equal(a, b), f"{name}: result {i} differs with {threads} thread(s)"
