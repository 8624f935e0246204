"""torch.compile(fullgraph=True) of the fused heads: no graph break, same results as eager.

fullgraph=True makes any graph break an error, so these tests fail on one.
"""
import pytest
import torch

from fastctx.nn import APCHead, EncHead
from test_apc_head import _randomise
from tolerances import assert_close

HEADS = {
    "apchead": (lambda: APCHead(16, 8, 5, pool_scales=(1, 2, 3, 6)), lambda: torch.randn(2, 16, 9, 11)),
    "enchead": (lambda: EncHead([8, 12], 8, 5, num_codes=4, add_lateral=True),
                lambda: [torch.randn(2, 8, 9, 11), torch.randn(2, 12, 9, 11)]),
}


@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_fullgraph_compile_matches_eager(name, train):
    make, inputs = HEADS[name]
    torch.manual_seed(0)
    head = make().double().train(train)
    _randomise(head)
    for m in head.modules():
        if isinstance(m, torch.nn.Dropout2d):
            m.p = 0.0  # compiled and eager draw dropout masks differently
    feats = inputs()
    feats = [f.double() for f in feats] if isinstance(feats, list) else feats.double()

    def step(module):
        module.zero_grad(set_to_none=True)
        outs = module(feats)
        outs = outs if isinstance(outs, tuple) else (outs,)  # EncHead: (seg, se) logits
        g = torch.Generator().manual_seed(1)
        sum(((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)).backward()
        return [o.detach() for o in outs], {n: p.grad.clone() for n, p in head.named_parameters()}

    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out_c, grads_c = step(compiled)
    head.load_state_dict(state)  # undo the compiled step's BN running-stat update
    out_e, grads_e = step(head)
    for a, b in zip(out_c, out_e, strict=True):
        assert_close(a, b, torch.float64, "output")
    assert grads_c.keys() == grads_e.keys()
    for k in grads_e:
        assert_close(grads_c[k], grads_e[k], torch.float64, f"grad of {k}")
