"""channels_last inputs: the ops and heads give the same outputs and gradients as with NCHW inputs.

Layouts (docs/usage.md): the Encoding op reads a channels_last map in place
(its [B, N, D] pixel layout); the ACM ops' kernels take NCHW, so the op copies
a channels_last input to NCHW once and returns NCHW outputs.
"""
import pytest
import torch

import fastctx
from fastctx import ops
from fastctx.nn import APCHead, EncHead
from conftest import require_backend
from test_apc_head import _randomise
from tolerances import assert_close

CL = torch.channels_last


def _op_cases():
    """(name, op, inputs); the first input is the 4-D feature map given in both layouts."""
    g = torch.Generator().manual_seed(0)
    yield "pyramid_pool", lambda x: ops.pyramid_pool(x, (1, 2, 3, 6)), [torch.randn(2, 5, 9, 7, generator=g)]
    sizes = (1, 4, 9)
    yield "gla_context", lambda x, w, b, p: ops.gla_context(x, w, b, p, sizes), [
        torch.randn(2, 12, 6, 5, generator=g), torch.randn(14, 4, generator=g) * 0.5, torch.randn(2, 14, generator=g),
        torch.randn(2, 4, 14, generator=g)]
    yield "residual_relu", ops.residual_relu, [
        torch.randn(2, 5, 4, 6, generator=g), torch.randn(2, 5, 4, 6, generator=g),
        torch.rand(5, generator=g) + 0.5, torch.randn(5, generator=g) * 0.1]
    yield "encoding", ops.encoding, [torch.randn(2, 8, 5, 3, generator=g), torch.randn(4, 8, generator=g) * 0.5,
                                     -torch.rand(4, generator=g) * 0.5 - 0.05]


def _fwd_bwd(op, inputs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = op(*leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    return out.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("case", range(4))
def test_op_channels_last(case, backend):
    require_backend(backend)
    name, op, inputs = list(_op_cases())[case]
    inputs = [t.double() if backend == "cpu" else t for t in inputs]
    dtype = inputs[0].dtype
    cl_inputs = [inputs[0].contiguous(memory_format=CL)] + inputs[1:]
    assert not cl_inputs[0].is_contiguous()
    with fastctx.use_backend(backend):
        got, got_grads = _fwd_bwd(op, cl_inputs)
        want, want_grads = _fwd_bwd(op, inputs)
    assert_close(got, want, dtype, f"{name} output")
    for i, (a, b) in enumerate(zip(got_grads, want_grads, strict=True)):
        assert_close(a, b, dtype, f"{name} gradient of input {i}")


def test_encoding_reads_channels_last_in_place():
    """No copy of a channels_last map on the way into the fused Encoding kernel."""
    require_backend("cpu")
    x = torch.randn(2, 16, 6, 5).contiguous(memory_format=CL)
    codewords, scale = torch.randn(4, 16), -torch.rand(4)
    with torch.profiler.profile() as prof:
        ops.encoding(x, codewords, scale)
    names = {e.name for e in prof.events()}
    assert "fastctx::encoding_fwd" in names
    assert not names & {"aten::copy_", "aten::clone", "aten::_to_copy"}, sorted(names)


HEADS = {
    "apchead": (lambda: APCHead(12, 8, 5, pool_scales=(1, 2, 3, 6)), lambda: [torch.randn(2, 12, 9, 11)]),
    "enchead": (lambda: EncHead([8, 12], 8, 5, num_codes=4, add_lateral=True),
                lambda: [torch.randn(2, 8, 9, 11), torch.randn(2, 12, 9, 11)]),
}


@pytest.mark.parametrize("model_layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_channels_last(name, train, model_layout):
    """channels_last features (and optionally weights, as model.to(memory_format=...) does) == NCHW."""
    require_backend("cpu", dtype=torch.float64)
    make, inputs = HEADS[name]
    torch.manual_seed(0)
    head = make().double().train(train)
    _randomise(head)
    if model_layout == "channels_last":
        head = head.to(memory_format=CL)
    feats = [f.double() for f in inputs()]
    state = {k: v.clone() for k, v in head.state_dict().items()}

    def run(layout):
        head.load_state_dict(state)
        head.zero_grad(set_to_none=True)
        leaves = [f.contiguous(memory_format=layout).requires_grad_() for f in feats]
        torch.manual_seed(0)  # same Dropout2d masks
        outs = head(leaves if name == "enchead" else leaves[0])
        outs = outs if isinstance(outs, tuple) else (outs,)
        g = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs).backward()
        return ([o.detach() for o in outs], [t.grad for t in leaves],
                {n: p.grad.clone() for n, p in head.named_parameters()},
                {n: b.clone() for n, b in head.named_buffers()})

    got, want = run(CL), run(torch.contiguous_format)
    for kind, a, b in (("output", got[0], want[0]), ("input gradient", got[1], want[1])):
        for x, y in zip(a, b, strict=True):
            assert_close(x, y, torch.float64, kind)
    for part in (2, 3):
        assert got[part].keys() == want[part].keys()
        for k in want[part]:
            assert_close(got[part][k].double(), want[part][k].double(), torch.float64, k)
