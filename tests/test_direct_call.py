"""The ops' direct eager path (fastctx.ops._dispatch.CustomOp) against the custom op through the dispatcher.

A plain eager call runs the op's implementation under an autograd.Function of its own; every other
call (torch.compile, export, jit tracing, dispatch modes, functorch transforms) goes through the
registered custom op. Both must give the same bits: outputs, gradients and second-order gradients.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastctx import ops
from fastctx.ops._dispatch import CUSTOM_OPS
from conftest import require_backend
from op_testing import op_cases


def _leaves(args):
    return [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]


def _first_and_second_order(call, args, backend):
    """Outputs, input gradients (create_graph) and the gradients of their squared norm."""
    leaves = _leaves(args)
    result = call(*leaves, backend)
    outputs = result if isinstance(result, tuple) else (result,)
    gen = torch.Generator().manual_seed(0)
    loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outputs if o.requires_grad)
    tensors = [a for a in leaves if isinstance(a, torch.Tensor)]
    grads = torch.autograd.grad(loss, tensors, create_graph=True, allow_unused=True)
    second = [g for g in grads if g is not None and g.requires_grad]
    second_grads = torch.autograd.grad(sum((g * g).sum() for g in second), tensors, allow_unused=True) if second \
        else ()
    return result, [o.detach() for o in outputs], [None if g is None else g.detach() for g in grads], second_grads


@pytest.mark.parametrize("backend", ["cpu", "reference"])
def test_direct_call_matches_dispatcher(backend):
    if backend == "cpu":
        require_backend("cpu", dtype=torch.float64)
    for name, args in op_cases():
        custom = CUSTOM_OPS[f"fastctx::{name}"]
        direct, *direct_values = _first_and_second_order(custom, args, backend)
        dispatched, *dispatched_values = _first_and_second_order(custom.op, args, backend)
        # The direct call ran under the op's own Function, the other under custom_op's.
        direct_node = (direct if isinstance(direct, torch.Tensor) else direct[0]).grad_fn
        dispatched_node = (dispatched if isinstance(dispatched, torch.Tensor) else dispatched[0]).grad_fn
        assert direct_node.name() == f"fastctx_{name}Backward", name
        assert dispatched_node.name() != direct_node.name(), name
        for what, got, want in zip(("outputs", "gradients", "second-order gradients"), direct_values,
                                   dispatched_values, strict=True):
            assert len(got) == len(want), f"{name} {what}"
            for i, (a, b) in enumerate(zip(got, want)):
                assert (a is None) == (b is None), f"{name} {what} {i}: one path gives None"
                if a is not None:
                    assert torch.equal(a, b), f"{name} {what} {i}: direct and dispatched calls differ"


class _OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def test_dispatch_modes_see_the_custom_op():
    """Under a dispatch mode (what export, FakeTensorMode and FlopCounterMode use) the custom op runs."""
    require_backend("cpu")
    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    with _OpLog() as log:
        out = ops.pyramid_pool(x, (1, 2))
    assert "fastctx.pyramid_pool.default" in log.seen
    assert out.grad_fn.name() != "fastctx_pyramid_poolBackward"
    direct = ops.pyramid_pool(x, (1, 2))
    assert direct.grad_fn.name() == "fastctx_pyramid_poolBackward"
    assert torch.equal(out, direct)


def test_no_grad_calls_skip_autograd():
    """Without grad the direct call runs the implementation alone: no graph, the same output."""
    require_backend("cpu")
    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    with torch.no_grad():
        out = ops.pyramid_pool(x, (1, 2))
    assert out.grad_fn is None and not out.requires_grad
    assert torch.equal(out, ops.pyramid_pool(x, (1, 2)).detach())


def test_direct_call_benchmark_runs(capsys):
    """bench/direct_call.py (the A/B of this path) runs and reports every case."""
    require_backend("cpu")
    path = Path(__file__).resolve().parents[1] / "bench" / "direct_call.py"
    spec = importlib.util.spec_from_file_location("direct_call_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--reps", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + len(list(module._cases()))
    assert all(line.split()[-1].endswith("x") for line in lines[2:])


def test_jit_trace_records_the_custom_op():
    """torch.jit.trace records the custom op (with its "auto" backend), not the kernels it ran."""
    require_backend("cpu")
    x = torch.randn(2, 3, 7, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace's deprecation and shape-constant warnings
        traced = torch.jit.trace(lambda t: ops.pyramid_pool(t, (1, 2)), x)
    kinds = [node.kind() for node in traced.graph.nodes()]
    assert "fastctx::pyramid_pool" in kinds and not any(k.endswith("_fwd") for k in kinds), kinds
    assert torch.equal(traced(x), ops.pyramid_pool(x, (1, 2)))


def test_profiles_show_the_op():
    """Under the profiler the op is dispatched: its event, with input shapes, as before the direct path."""
    require_backend("cpu")
    x = torch.randn(2, 3, 7, 5, requires_grad=True)
    for call in (lambda: ops.pyramid_pool(x, (1, 2)).sum().backward(),
                 lambda: ops.pyramid_pool(x.detach(), (1, 2))):
        with torch.profiler.profile(record_shapes=True) as prof:
            call()
        shapes = [e.input_shapes for e in prof.events() if e.name == "fastctx::pyramid_pool"]
        assert len(shapes) == 1 and shapes[0][0] == [2, 3, 7, 5], shapes
