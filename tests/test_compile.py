"""torch.compile of the fused heads and models: no graph break, no recompile per shape, same results as eager.

fullgraph=True makes any graph break an error, so these tests fail on one.
Backends: inductor for the heads (codegen around the custom ops); aot_eager
(dynamo + AOTAutograd with the ops' fake kernels, no codegen) where many
compiles would otherwise blow the test budget: dynamic shapes and the models.
"""
import pytest
import torch
import torch._dynamo.testing

from fastctx.models import build_model
from fastctx.nn import APCHead, EncHead
from test_apc_head import _randomise
from tolerances import assert_close

HEADS = {
    "apchead": (lambda: APCHead(16, 8, 5, pool_scales=(1, 2, 3, 6)), lambda: torch.randn(2, 16, 9, 11)),
    "enchead": (lambda: EncHead([8, 12], 8, 5, num_codes=4, add_lateral=True),
                lambda: [torch.randn(2, 8, 9, 11), torch.randn(2, 12, 9, 11)]),
}
# Inputs of any (batch, height, width), for the dynamic-shape tests.
SIZED_INPUTS = {
    "apchead": lambda b, h, w: torch.randn(b, 16, h, w, dtype=torch.float64),
    "enchead": lambda b, h, w: [torch.randn(b, 8, h, w, dtype=torch.float64),
                                torch.randn(b, 12, h, w, dtype=torch.float64)],
}
# Batch, height and width all change between calls, and no two sizes of the
# first call are equal (dynamo would assume they always are: duck sizing).
SHAPES = [(2, 9, 11), (3, 7, 13), (4, 12, 10)]


def _make_head(name: str, train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    head = HEADS[name][0]().double().train(train)
    _randomise(head)
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0  # compiled and eager draw dropout masks differently
    return head


def _step(module, params_of, feats):
    """Outputs and every parameter gradient of sum(outputs * fixed random weights)."""
    params_of.zero_grad(set_to_none=True)
    outs = module(feats)
    outs = outs if isinstance(outs, tuple) else (outs,)  # EncHead: (seg, se) logits
    g = torch.Generator().manual_seed(1)
    sum(((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)).backward()
    return [o.detach() for o in outs], {n: p.grad.clone() for n, p in params_of.named_parameters()}


def _assert_same_step(compiled, eager):
    (out_c, grads_c), (out_e, grads_e) = compiled, eager
    for a, b in zip(out_c, out_e, strict=True):
        assert_close(a, b, torch.float64, "output")
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        assert_close(grads_c[k], grads_e[k], torch.float64, f"grad of {k}")


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_fullgraph_compile_matches_eager(name, train):
    head = _make_head(name, train)
    feats = HEADS[name][1]()
    feats = [f.double() for f in feats] if isinstance(feats, list) else feats.double()

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    got = _step(compiled, head, feats)
    head.load_state_dict(state)  # undo the compiled step's BN running-stat update
    _assert_same_step(got, _step(head, head, feats))


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_no_graph_break(name, train):
    """dynamo's own account: one graph, zero breaks (fails listing the break reasons otherwise)."""
    head = _make_head(name, train)
    torch._dynamo.reset()
    report = torch._dynamo.explain(head)(SIZED_INPUTS[name](2, 9, 11))
    reasons = [str(b.reason) for b in report.break_reasons]
    assert report.graph_break_count == 0, reasons
    assert report.graph_count == 1, reasons
    assert any(n.op == "call_function" and str(n.target).startswith("fastctx.")
               for g in report.graphs for n in g.graph.nodes), "the fused ops are not in the graph"


@pytest.mark.parametrize("name", sorted(HEADS))
def test_dynamic_shapes_compile_once(name):
    """dynamic=True: new (B, H, W) reuse the first graph (fake kernels and wrappers are shape-generic).

    Training mode, the harder case (batch statistics over a symbolic count);
    eval-mode graphs are shape-generic in the inductor test below and in the
    dynamic-shape exports of tests/test_export.py.
    """
    head = _make_head(name, train=True)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(head, backend=counter, fullgraph=True, dynamic=True)
    compiles_after_first = None
    for b, h, w in SHAPES:
        feats = SIZED_INPUTS[name](b, h, w)
        state = {k: v.clone() for k, v in head.state_dict().items()}
        got = _step(compiled, head, feats)
        head.load_state_dict(state)
        _assert_same_step(got, _step(head, head, feats))
        if compiles_after_first is None:
            compiles_after_first = counter.frame_count
    assert compiles_after_first >= 1
    assert counter.frame_count == compiles_after_first, f"recompiled for new shapes: {counter.frame_count} compiles"


def test_inductor_dynamic_inference():
    """Inductor with symbolic shapes around the fused ops (all three ACM ops): one compile for every shape.

    (In training, inductor's CPU convolution backward specialises the spatial
    size even for plain nn.Conv2d + BatchNorm models, so only inference is
    shape-generic there; the aot_eager test above covers training.)
    """
    name = "apchead"
    head = _make_head(name, train=False)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(head, backend=counter, fullgraph=True, dynamic=True)
    compiles_after_first = None
    with torch.no_grad():
        for b, h, w in SHAPES:
            feats = SIZED_INPUTS[name](b, h, w)
            outs, want = compiled(feats), head(feats)
            for a, e in zip(*(o if isinstance(o, tuple) else (o,) for o in (outs, want)), strict=True):
                assert_close(a, e, torch.float64, f"output at {(b, h, w)}")
            if compiles_after_first is None:
                compiles_after_first = counter.frame_count
    assert counter.frame_count == compiles_after_first, f"recompiled for new shapes: {counter.frame_count} compiles"


# ----------------------------------------------------------------------------- whole models

def _make_model(name: str, train: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(name, 5).double().train(train)
    _randomise(model)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0
    return model


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", ["apcnet_r18-d8", "encnet_r18-d8"])
def test_model_fullgraph_matches_eager(name, train):
    """The r18 segmentors in one graph: train mode compiles `loss` (all heads, SE loss), eval the forward."""
    model = _make_model(name, train)
    img = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    label = torch.randint(0, 5, (2, 32, 48))
    label[:, :3] = 255  # ignored pixels

    def objective(module):
        if train:
            return torch.stack(list(module(img, label).values())).sum(), None
        out = module(img)
        return (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)).sum(), out

    def step(fn):
        model.zero_grad(set_to_none=True)
        total, out = objective(fn)
        total.backward()
        # eval: the auxiliary head takes no part in the forward, its parameters get no gradient
        return total.detach(), out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model.loss if train else model, backend=counter, fullgraph=True)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    total_c, out_c, grads_c = step(compiled)
    model.load_state_dict(state)
    total_e, out_e, grads_e = step(model.loss if train else model)
    assert counter.frame_count == 1
    assert_close(total_c, total_e, torch.float64, "loss" if train else "objective")
    if out_e is not None:
        assert_close(out_c, out_e, torch.float64, "logits")
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        assert_close(grads_c[k], grads_e[k], torch.float64, f"grad of {k}")
