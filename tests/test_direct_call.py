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
from fastctx.ops._dispatch import CUSTOM_OPS, dispatcher_calls
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


# ----------------------------------------------------------------------------- window_attention's C++ node

_WINDOW_NODE = "torch::autograd::CppNode<fastctx::WindowAttentionFunction>"


def _window_call(with_table: bool, with_pad: bool):
    """ops.window_attention on a 7x9 map of 6x4 windows with shift (3, 2): padding, shift mask, two heads."""
    return lambda qkv, table, pad: ops.window_attention(qkv, 2, (6, 4), table if with_table else None, (3, 2),
                                                        None, pad if with_pad else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_table,with_pad", [(True, True), (True, False), (False, True), (False, False)])
def test_window_attention_runs_its_cpp_node_with_the_custom_ops_bits(dtype, with_table, with_pad):
    """A plain eager window_attention runs window_attention_autograd (the raw kernels under a C++ node); its
    outputs, gradients and second-order gradients are the custom op's, bit for bit."""
    require_backend("cpu", dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    args = [torch.randn(s, generator=gen, dtype=dtype) for s in ((2, 7, 9, 24), (77, 2), (24,))]
    call = _window_call(with_table, with_pad)
    without_backend = lambda qkv, table, pad, backend: call(qkv, table, pad)  # noqa: E731  (the wrapper picks it)
    direct, *direct_values = _first_and_second_order(without_backend, args, None)
    with dispatcher_calls():
        dispatched, *dispatched_values = _first_and_second_order(without_backend, args, None)
    assert direct.grad_fn.name() == _WINDOW_NODE
    assert dispatched.grad_fn.name() != _WINDOW_NODE
    present = [True, with_table, with_pad]
    for what, got, want in zip(("outputs", "gradients", "second-order gradients"), direct_values, dispatched_values,
                               strict=True):
        assert len(got) == len(want), what
        for i, (a, b) in enumerate(zip(got, want)):
            if what != "outputs" and not present[i]:  # an unused input has no gradient on either path
                assert a is None and b is None, f"{what} {i}"
                continue
            assert a is not None and b is not None, f"{what} {i}: a path gives None"
            assert torch.equal(a, b), f"{what} {i}: the C++ node and the custom op differ"


def test_window_attention_cpp_node_without_grad_and_per_input():
    """No graph under no_grad or inference_mode (below autograd the op runs the forward kernel alone); with one
    input requiring grad, that input's gradient is the custom op's."""
    require_backend("cpu")
    gen = torch.Generator().manual_seed(2)
    qkv, table, pad = (torch.randn(s, generator=gen) for s in ((1, 7, 9, 24), (77, 2), (24,)))
    call = _window_call(True, True)
    want = call(qkv, table, pad)
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            out = call(qkv.requires_grad_(), table, pad)
        assert out.grad_fn is None and not out.requires_grad
        assert torch.equal(out, want)
        qkv.requires_grad_(False)
    grad = torch.randn(want.shape, generator=gen)
    for i in range(3):
        leaves = [t.detach().clone().requires_grad_(j == i) for j, t in enumerate((qkv, table, pad))]
        out = call(*leaves)
        assert out.grad_fn.name() == _WINDOW_NODE
        (got,) = torch.autograd.grad(out, leaves[i], grad)
        with dispatcher_calls():
            (expected,) = torch.autograd.grad(call(*leaves), leaves[i], grad)
        assert torch.equal(got, expected), i


def test_window_attention_mixed_dtypes_take_the_custom_op():
    """A table or pad_qkv of another dtype than qkv is cast by the custom op's path (the C++ node takes one
    dtype): the result equals the call with the cast done by hand."""
    require_backend("cpu")
    gen = torch.Generator().manual_seed(3)
    qkv, table, pad = (torch.randn(s, generator=gen) for s in ((1, 7, 9, 24), (77, 2), (24,)))
    call = _window_call(True, True)
    out = call(qkv.requires_grad_(), table.double(), pad.double())
    assert out.dtype == torch.float32 and out.grad_fn.name() != _WINDOW_NODE
    assert torch.equal(out, call(qkv, table, pad))


def test_window_attention_cpp_node_schema():
    """opcheck of window_attention_autograd where it applies: its schema and its autograd registration. It has
    no fake kernel: traced calls (compile, export, fake tensors) run the custom op fastctx::window_attention,
    which opcheck tests in full (tests/test_opcheck.py)."""
    require_backend("cpu")
    gen = torch.Generator().manual_seed(4)
    qkv, table, pad = (torch.randn(s, generator=gen, dtype=torch.float64, requires_grad=True)
                       for s in ((1, 7, 9, 24), (77, 2), (24,)))
    torch.library.opcheck(torch.ops.fastctx.window_attention_autograd.default,
                          (qkv, table, pad, 2, [6, 4], [3, 2], 0.25),
                          test_utils=("test_schema", "test_autograd_registration"))
    assert torch.autograd.gradcheck(
        lambda q, t, p: torch.ops.fastctx.window_attention_autograd(q, t, p, 2, [6, 4], [3, 2], 0.25),
        (qkv, table, pad))


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_window_attention_cpp_node_under_checkpoint(use_reentrant):
    """torch.utils.checkpoint (mmseg's Swin with_cp) saves the node's inputs through saved-tensor hooks or
    recomputes the forward: the gradients are the custom op's, bit for bit."""
    require_backend("cpu")
    from torch.utils.checkpoint import checkpoint

    gen = torch.Generator().manual_seed(5)
    leaves = [torch.randn(s, generator=gen, requires_grad=True) for s in ((2, 7, 9, 24), (77, 2), (24,))]
    call = _window_call(True, True)
    checkpoint(call, *leaves, use_reentrant=use_reentrant).square().sum().backward()  # reentrant: no .grad()
    got = [leaf.grad for leaf in leaves]
    with dispatcher_calls():
        want = torch.autograd.grad(call(*leaves).square().sum(), leaves)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(a, b), i
