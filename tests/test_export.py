"""torch.export of the eval-mode heads and models: export -> save -> load -> run == eager, anywhere.

The exported graph carries the fused ops with backend "auto" (resolved when
the program runs), so a program exported here, where the C++ kernels run it,
also runs in a process without them. A backend the user forced at export time
is kept as is.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.export import Dim

import fastctx
from fastctx import ops
from fastctx.models import build_model
from fastctx.nn import APCHead, EncHead
from conftest import require_backend
from op_testing import op_cases
from test_apc_head import _randomise
from tolerances import assert_close

HEADS = {
    "apchead": (lambda: APCHead(16, 8, 5, pool_scales=(1, 2, 3, 6)),
                lambda b, h, w: (torch.randn(b, 16, h, w),)),
    "enchead": (lambda: EncHead([8, 12], 8, 5, num_codes=4, add_lateral=True),
                lambda b, h, w: ([torch.randn(b, 8, h, w), torch.randn(b, 12, h, w)],)),
}
FUSED_OPS = {"fastctx.pyramid_pool.default", "fastctx.gla_context.default", "fastctx.residual_relu.default",
             "fastctx.encoding.default", "fastctx.window_pool.default", "fastctx.upsample_add.default",
             "fastctx.upsample_add_layer_norm.default"}


def _head(name):
    torch.manual_seed(0)
    head = HEADS[name][0]().eval()
    _randomise(head)
    return head


def _dynamic_shapes(name):
    batch, height, width = Dim("batch", min=2), Dim("height", min=2), Dim("width", min=2)
    spatial = {0: batch, 2: height, 3: width}
    return (spatial,) if name == "apchead" else ([spatial, spatial],)


def _fused_calls(program):
    """(op name, backend argument) of every fastctx op call in an exported program."""
    return [(str(n.target), n.args[-1]) for n in program.graph.nodes
            if n.op == "call_function" and str(n.target) in FUSED_OPS]


def _outputs(out):
    return out if isinstance(out, (tuple, list)) else (out,)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_export_save_load_run(name, tmp_path):
    head = _head(name)
    program = torch.export.export(head, HEADS[name][1](2, 9, 11), dynamic_shapes=_dynamic_shapes(name))
    calls = _fused_calls(program)
    assert calls, "the fused ops are not in the exported graph"
    assert {backend for _, backend in calls} == {"auto"}, calls

    path = tmp_path / f"{name}.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path).module()
    for b, h, w in [(2, 9, 11), (3, 7, 13)]:  # the exported shape and another one (symbolic sizes)
        inputs = HEADS[name][1](b, h, w)
        with torch.no_grad():
            for got, want in zip(_outputs(loaded(*inputs)), _outputs(head(*inputs)), strict=True):
                assert_close(got, want, torch.float32, f"exported {name} at {(b, h, w)}")


def test_forced_backend_is_exported_as_forced():
    head = _head("apchead")
    inputs = HEADS["apchead"][1](2, 9, 11)
    with fastctx.use_backend("cpu"):
        assert {b for _, b in _fused_calls(torch.export.export(head, inputs))} == {"cpu"}
    with fastctx.use_backend("reference"):  # eager maths, traced into plain aten ops
        assert _fused_calls(torch.export.export(head, inputs)) == []


def test_exported_program_resolves_backend_when_it_runs(tmp_path):
    """The same loaded program runs the C++ kernels, the Triton kernels or the reference maths."""
    require_backend("triton")
    head = _head("apchead")
    inputs = HEADS["apchead"][1](2, 9, 11)
    path = tmp_path / "apchead.pt2"
    torch.export.save(torch.export.export(head, inputs), path)
    loaded = torch.export.load(path).module()
    with torch.no_grad():
        want = head(*inputs)
        for backend, kernel_runs in (("cpu", True), ("triton", False), ("reference", False)):
            with fastctx.use_backend(backend), torch.profiler.profile() as prof:
                got = loaded(*inputs)
            names = {e.name for e in prof.events()}
            assert ("fastctx::gla_context_fwd" in names) == kernel_runs, (backend, sorted(names))
            assert "fastctx::gla_context" in names  # the op ran (its body chose the backend)
            assert_close(got, want, torch.float32, f"loaded program under use_backend({backend!r})")


_RUN_ELSEWHERE = r"""
import json, sys, torch
import fastctx
from fastctx import _backend
assert not _backend.HAS_CPU_KERNELS, "the extension should be disabled here"
result = {}
for name in ("apchead", "enchead"):
    program = torch.export.load(sys.argv[1] + f"/{name}.pt2").module()
    case = torch.load(sys.argv[1] + f"/{name}.io.pt")
    with torch.no_grad():
        outs = program(*case["inputs"])
    outs = outs if isinstance(outs, (tuple, list)) else (outs,)
    result[name] = [max((o - w).abs().max().item(), 0.0) / max(w.abs().max().item(), 1e-30)
                    for o, w in zip(outs, case["outputs"])]
print(json.dumps(result))
"""


def test_exported_program_runs_without_the_extension(tmp_path):
    """Exported where the C++ kernels exist, loaded in a process without them (FASTCTX_NO_EXT=1)."""
    for name in sorted(HEADS):
        head = _head(name)
        inputs = HEADS[name][1](2, 9, 11)
        torch.export.save(torch.export.export(head, inputs), tmp_path / f"{name}.pt2")
        with torch.no_grad():
            outputs = [o.clone() for o in _outputs(head(*inputs))]
        torch.save({"inputs": inputs, "outputs": outputs}, tmp_path / f"{name}.io.pt")
    env = {**os.environ, "FASTCTX_NO_EXT": "1", "OMP_NUM_THREADS": "1"}
    env.pop("FASTCTX_BACKEND", None)
    proc = subprocess.run([sys.executable, "-c", _RUN_ELSEWHERE, str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # reference maths vs the C++ kernels in fp32: relative to the largest output, as tolerances.py does
    rtol = 1e-5
    for name, errors in result.items():
        assert errors and all(e <= rtol for e in errors), (name, errors)


@pytest.mark.parametrize("name", ["apcnet_r18-d8", "encnet_r18-d8"])
def test_export_model(name, tmp_path):
    torch.manual_seed(0)
    model = build_model(name, 5).eval()
    _randomise(model)
    auto = Dim.AUTO
    program = torch.export.export(model, (torch.randn(2, 3, 32, 48),), dynamic_shapes=({0: auto, 2: auto, 3: auto},))
    assert {b for _, b in _fused_calls(program)} == {"auto"}
    torch.export.save(program, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for shape in [(2, 3, 32, 48), (3, 3, 40, 56)]:
        img = torch.randn(shape)
        with torch.no_grad():
            assert_close(loaded(img), model(img), torch.float32, f"exported {name} at {shape}")


# ----------------------------------------------------------------------------- the ops' own backend resolution

@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_opcheck_in_op_resolution(backend):
    """"auto" and the in-op reference path (what a program loaded without kernels runs) pass opcheck."""
    for name, args in op_cases():
        args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.fastctx, name).default, (*args, backend))


def test_in_op_reference_matches_kernels():
    """Forward and backward of each op with backend="reference" inside the op == the C++ kernels."""
    require_backend("cpu", dtype=torch.float64)
    for name, args in op_cases():
        op = getattr(torch.ops.fastctx, name).default
        results = {}
        for backend in ("reference", "cpu"):
            leaves = [a.detach().clone().requires_grad_() if isinstance(a, torch.Tensor) else a for a in args]
            result = op(*leaves, backend)
            # + what an op saves for its backward (residual_relu's mask, the norm's mean and rstd)
            outputs = result if isinstance(result, tuple) else (result,)
            gen = torch.Generator().manual_seed(0)
            loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum()
                       for o in outputs if o.requires_grad)  # every differentiable output
            loss.backward()
            results[backend] = [o.detach() for o in outputs] + [a.grad for a in leaves
                                                                if isinstance(a, torch.Tensor)]
        for got, want in zip(results["reference"], results["cpu"], strict=True):
            if got.is_floating_point():
                assert_close(got, want, torch.float64, str(op))
            else:  # the saved bit mask: exact
                assert torch.equal(got, want), str(op)


def test_op_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown fastctx backend 'gpu'"):
        torch.ops.fastctx.pyramid_pool.default(torch.randn(1, 2, 3, 3), [1], "gpu")
    with pytest.raises(fastctx.BackendUnavailableError, match="runs CUDA tensors"):
        torch.ops.fastctx.pyramid_pool.default(torch.randn(1, 2, 3, 3), [1], "cuda")
    assert ops.pyramid_pool(torch.randn(1, 2, 3, 3), [1]).shape == (1, 2, 1)
