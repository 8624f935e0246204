"""The fused ops and heads under torch.autocast.

CPU bf16 autocast: the fused CPU kernels run (they are fp32/fp64 only, so the
ops upcast, compute in fp32 and round the result once), never a silent
fallback to the reference maths; mixed dtypes (bf16 activations, fp32
parameters) are accepted. CUDA autocast (GPU only): kernels run in the
autocast dtype.

Oracles, all at the bf16 tolerance of tolerances.py.
Op level: the reference maths in fp32 on the same (bf16-valued) inputs, the
output and every input gradient; and bitwise: the autocast result is the fp32
kernel's result rounded once.
Head level: the bf16 convolutions around the ops are the same on both sides;
the oracle is the head under the same autocast with every fastctx op replaced
by its reference maths computed in fp32 (the precision the ops promise):
outputs, input gradients, BN statistics, and the gradient w.r.t. all
parameters as one vector. Measured (4x32x12x14 features): against an all-fp32
head, mmseg's own eager maths under bf16 autocast misses the bf16 tolerance on
most per-tensor parameter gradients (5-60x) and on the input gradients
(12-25x), so that is no test of fastctx; and per tensor, even two fp32-exact
op implementations inside one bf16 head differ by up to ~3x the tolerance on
gradients that are cancelling sums (global_info under train-mode BatchNorm).
"""
import contextlib
import importlib

import pytest
import torch

import fastctx
from fastctx import ops, reference
from fastctx.nn import APCHead, EncHead
from conftest import require_backend
from test_apc_head import _randomise
from tolerances import assert_close

BF16 = torch.bfloat16


def _bf16_values(*shape, scale=1.0, offset=0.0, seed=0):
    """fp32 tensor whose values are exactly representable in bf16 (what a bf16 activation holds)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale + offset).to(BF16).float()


def _op_cases():
    """(name, public op, inputs as given under autocast, dtype of the result)."""
    x = _bf16_values(2, 6, 9, 7, seed=1)
    yield "pyramid_pool", lambda t: ops.pyramid_pool(t, (1, 2, 3, 6)), [x.to(BF16)], BF16
    sizes = (1, 4, 9)
    c = 4
    gx = _bf16_values(2, 3 * c, 6, 5, seed=2)
    weight = torch.randn(sum(sizes), c, generator=torch.Generator().manual_seed(3)) * 0.5
    bias = _bf16_values(2, sum(sizes), seed=4)
    pooled = torch.randn(2, c, sum(sizes), generator=torch.Generator().manual_seed(5))
    # bf16 activations with fp32 parameters: mixed dtypes, as an autocast region produces them
    yield ("gla_context", lambda a, w, b, p: ops.gla_context(a, w, b, p, sizes),
           [gx.to(BF16), weight, bias.to(BF16), pooled], BF16)
    y = _bf16_values(2, 5, 4, 6, seed=6)
    res = _bf16_values(2, 5, 4, 6, seed=7)
    scale = torch.rand(5, generator=torch.Generator().manual_seed(8)) + 0.5
    shift = torch.randn(5, generator=torch.Generator().manual_seed(9)) * 0.1
    yield "residual_relu", ops.residual_relu, [y.to(BF16), res.to(BF16), scale, shift], BF16
    # fp32 residual: the result takes the promoted dtype, as the eager expression would
    yield "residual_relu", ops.residual_relu, [y.to(BF16), res, scale, shift], torch.float32
    ex = _bf16_values(2, 8, 5, 3, seed=10)
    codewords = torch.randn(4, 8, generator=torch.Generator().manual_seed(11)) * 0.5
    enc_scale = -torch.rand(4, generator=torch.Generator().manual_seed(12)) * 0.5 - 0.05
    yield "encoding", ops.encoding, [ex.to(BF16), codewords, enc_scale], BF16


REFERENCE_OF = {"pyramid_pool": lambda t: reference.pyramid_pool(t, (1, 2, 3, 6)),
                "gla_context": lambda a, w, b, p: reference.gla_context(a, w, b, p, (1, 4, 9)),
                "residual_relu": reference.residual_relu, "encoding": reference.encoding}


def _kernel_calls(prof) -> set[str]:
    return {e.name for e in prof.events() if e.name.startswith("fastctx::")}


@pytest.mark.parametrize("case", range(5))
def test_op_under_cpu_bf16_autocast(case):
    require_backend("cpu")
    name, op, inputs, out_dtype = list(_op_cases())[case]
    grad_seed = torch.Generator().manual_seed(13)

    leaves = [t.clone().requires_grad_() for t in inputs]
    with torch.autocast("cpu", BF16), torch.profiler.profile() as prof:
        out = op(*leaves)
        grad = torch.randn(out.shape, generator=grad_seed).to(out.dtype)
        out.backward(grad)
    assert out.dtype == out_dtype
    # the fused C++ kernels ran, forward and backward: no fallback to the reference
    assert {f"fastctx::{name}_fwd", f"fastctx::{name}_bwd"} <= _kernel_calls(prof), sorted(_kernel_calls(prof))

    # fp32 computation rounded once: exactly the fp32 kernel's result on the upcast inputs
    with torch.no_grad():
        assert torch.equal(out, op(*(t.float() for t in inputs)).to(out_dtype))

    # vs the reference maths in fp32 on the same values, output and every input gradient
    ref_leaves = [t.detach().float().requires_grad_() for t in inputs]
    expected = REFERENCE_OF[name](*ref_leaves)
    expected.backward(grad.float())
    assert_close(out, expected, BF16, f"{name} output")
    for i, (a, b) in enumerate(zip(leaves, ref_leaves, strict=True)):
        assert a.grad.dtype == inputs[i].dtype
        assert_close(a.grad, b.grad, BF16, f"{name} gradient of input {i}")


def test_triton_backend_under_cpu_autocast():
    """A forced backend follows the same policy (here Triton's interpreter, fp32 on CPU)."""
    require_backend("triton")
    _, op, inputs, _ = list(_op_cases())[1]
    with torch.autocast("cpu", BF16), fastctx.use_backend("triton"):
        out = op(*inputs)
    with torch.no_grad():
        expected = REFERENCE_OF["gla_context"](*(t.float() for t in inputs))
    assert out.dtype == BF16
    assert_close(out, expected, BF16, "triton gla_context under autocast")


def test_mixed_dtypes_outside_autocast_still_rejected():
    _, op, inputs, _ = list(_op_cases())[1]
    with pytest.raises(TypeError, match="share one dtype"):
        op(*inputs)


# ----------------------------------------------------------------------------- heads

HEADS = {
    "apchead": (lambda: APCHead(32, 16, 5, pool_scales=(1, 2, 3, 6)),
                lambda: torch.randn(4, 32, 12, 14),
                {"pyramid_pool", "gla_context", "residual_relu"}),
    "enchead": (lambda: EncHead([16, 24], 16, 5, num_codes=8, add_lateral=True),
                lambda: [torch.randn(4, 16, 12, 14), torch.randn(4, 24, 12, 14)],
                {"encoding"}),
}


def _fp32_reference(name, fn):
    """fastctx.reference.<name> computed in fp32 outside autocast, returning the dtype the op promises."""

    def run(*args):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if name in ("gla_context", "encoding"):
            out_dtype = torch.get_autocast_dtype("cpu")
        elif name == "residual_relu":
            out_dtype = torch.promote_types(args[0].dtype, args[1].dtype)
        else:
            out_dtype = tensors[0].dtype
        with torch.autocast("cpu", enabled=False):
            out = fn(*(a.float() if isinstance(a, torch.Tensor) else a for a in args))
        return out.to(out_dtype)

    return run


@contextlib.contextmanager
def _fp32_reference_ops(monkeypatch):
    """Every fastctx op runs its reference maths in fp32 (the oracle of the fused ops under autocast)."""
    with monkeypatch.context() as patch:
        for name in ("pyramid_pool", "gla_context", "residual_relu", "encoding"):
            # the op's module holds the reference it runs (bound at import), so that is what is patched
            op_module = importlib.import_module(f"fastctx.ops.{name}")
            patch.setattr(op_module, "_reference", _fp32_reference(name, op_module._reference))
        with fastctx.use_backend("reference"):
            yield


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_under_cpu_bf16_autocast(name, train, monkeypatch):
    require_backend("cpu")
    make, inputs, op_names = HEADS[name]
    torch.manual_seed(0)
    head = make().train(train)
    _randomise(head)
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    feats = inputs()
    state = {k: v.clone() for k, v in head.state_dict().items()}

    def run():
        head.load_state_dict(state)  # the same BN statistics for both runs
        head.zero_grad(set_to_none=True)
        leaves = [f.clone().requires_grad_() for f in feats] if isinstance(feats, list) \
            else feats.clone().requires_grad_()
        with torch.autocast("cpu", BF16), torch.profiler.profile() as prof:
            outs = head(leaves)
            outs = outs if isinstance(outs, tuple) else (outs,)
            g = torch.Generator().manual_seed(1)
            sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs).backward()
        input_grads = [t.grad for t in (leaves if isinstance(leaves, list) else [leaves])]
        # The gradient w.r.t. the parameters as one vector: per-tensor comparison at bf16 tolerance
        # is ill-posed for the few tensors whose gradients are sums that cancel (e.g. global_info
        # under train-mode BatchNorm): there two fp32-exact op implementations already differ by
        # one bf16 rounding of an upstream gradient, amplified by the cancellation.
        param_grad = torch.cat([p.grad.flatten() for p in head.parameters()])
        buffers = {k: v.clone() for k, v in head.named_buffers()}
        return [o.detach() for o in outs], input_grads, param_grad, buffers, _kernel_calls(prof)

    outs, input_grads, param_grad, buffers, calls = run()
    assert all(o.dtype == BF16 for o in outs)
    for op in op_names:  # the fused kernels ran, forward and backward
        assert {f"fastctx::{op}_fwd", f"fastctx::{op}_bwd"} <= calls, (op, sorted(calls))

    with _fp32_reference_ops(monkeypatch):
        want_outs, want_input_grads, want_param_grad, want_buffers, calls = run()
    assert not any(c.endswith(("_fwd", "_bwd")) for c in calls), "the oracle must not run the kernels"
    for a, b in zip(outs, want_outs, strict=True):
        assert_close(a, b, BF16, "output")
    for a, b in zip(input_grads, want_input_grads, strict=True):
        assert_close(a, b, BF16, "gradient of the input features")
    assert_close(param_grad, want_param_grad, BF16, "gradient w.r.t. the parameters")
    for k in want_buffers:
        assert_close(buffers[k].double(), want_buffers[k].double(), BF16, f"buffer {k}")


# ----------------------------------------------------------------------------- CUDA

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", range(5))
def test_op_under_cuda_autocast(case, dtype, monkeypatch):
    """On CUDA the kernels run in the autocast dtype (fp32 accumulation): results within its tolerance."""
    import importlib

    name, op, inputs, out_dtype = list(_op_cases())[case]
    triton_launch = importlib.import_module(f"fastctx.kernels.{name}")
    # activations in the autocast dtype (bf16-valued data is exact in fp16 too), parameters fp32
    inputs = [(t.to(dtype) if t.dtype == BF16 else t).cuda() for t in inputs]
    launched = []
    launcher = getattr(triton_launch, f"{name}_fwd")
    monkeypatch.setattr(triton_launch, f"{name}_fwd", lambda x, *a: launched.append(x.dtype) or launcher(x, *a))
    with torch.autocast("cuda", dtype), fastctx.use_backend("triton"):
        out = op(*inputs)
    assert launched == [dtype]  # the kernel ran in the autocast dtype
    expected = REFERENCE_OF[name](*(t.float() for t in inputs))
    assert out.dtype == (dtype if out_dtype == BF16 else out_dtype)
    assert_close(out, expected, dtype, f"{name} under CUDA autocast")


def test_modules_pass_fp32_parameters_to_the_op_under_cpu_autocast():
    """Encoding's codewords and scale reach the fp32 kernel unrounded (no 16-bit detour)."""
    require_backend("cpu")
    from fastctx.nn import Encoding

    torch.manual_seed(0)
    layer = Encoding(16, 8)
    x = torch.randn(2, 16, 5, 7).bfloat16()
    with torch.autocast("cpu", torch.bfloat16):
        out = layer(x)
    expected = ops.encoding(x.float(), layer.codewords, layer.scale).to(torch.bfloat16)
    assert torch.equal(out, expected)
