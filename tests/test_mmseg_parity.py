"""fastctx's APCHead vs mmsegmentation's own APCHead with the same weights (strict state_dict)."""
import pytest
import torch

import fastctx
from fastctx.nn import APCHead
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise, _run
from tolerances import assert_close

decode_heads = import_decode_heads()
pytestmark = pytest.mark.skipif(decode_heads is None, reason="mmsegmentation is not installed")


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "batch,in_ch,ch,classes,hw,scales,fusion,backend",
    [
        (2, 24, 16, 19, (33, 45), (1, 2, 3, 6), True, "cpu"),
        (3, 10, 6, 150, (17, 12), (1, 3, 5), False, "cpu"),
        (2, 10, 6, 2, (5, 7), (2, 6), True, "triton"),
        (2, 12, 8, 21, (9, 9), (1, 2, 3, 6), True, "reference"),
    ],
)
def test_matches_mmseg_apchead(train, batch, in_ch, ch, classes, hw, scales, fusion, backend):
    from conftest import require_backend

    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = decode_heads.APCHead(
        in_channels=in_ch, channels=ch, num_classes=classes, pool_scales=scales, fusion=fusion,
        dropout_ratio=0.1, norm_cfg=dict(type="BN", requires_grad=True),
    ).double()
    _randomise(theirs)
    ours = APCHead(in_ch, ch, classes, pool_scales=scales, fusion=fusion, dropout_ratio=0.1).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(batch, in_ch, *hw, dtype=torch.float64)

    with fastctx.use_backend(backend):
        out_o, gx_o, grads_o, bufs_o = _run(ours, x, train)
    out_t, gx_t, grads_t, bufs_t = _run(_ListInput(theirs), x, train)
    dtype = torch.float64
    assert_close(out_o, out_t, dtype, "output")
    assert_close(gx_o, gx_t, dtype, "grad of input")
    grads_t = {k.removeprefix("head."): v for k, v in grads_t.items()}
    assert grads_o.keys() == grads_t.keys()
    for k in grads_t:
        assert_close(grads_o[k], grads_t[k], dtype, f"grad of {k}")
    for k, v in bufs_t.items():
        assert_close(bufs_o[k.removeprefix("head.")].double(), v.double(), dtype, f"buffer {k}")


class _ListInput(torch.nn.Module):
    """mmseg heads take the list of backbone features."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, x):
        return self.head([x])


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "in_channels,ch,codes,classes,add_lateral,use_se,backend",
    [
        ([6, 10, 12], 8, 4, 19, False, True, "cpu"),
        ([6, 10, 12], 8, 32, 150, True, True, "cpu"),
        ([12], 8, 7, 3, False, False, "cpu"),
        ([6, 10, 12], 8, 4, 5, True, True, "triton"),
        ([6, 10, 12], 8, 4, 5, True, True, "reference"),
    ],
)
def test_matches_mmseg_enchead(train, in_channels, ch, codes, classes, add_lateral, use_se, backend):
    from conftest import require_backend
    from fastctx.nn import EncHead

    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    n = len(in_channels)
    theirs = decode_heads.EncHead(
        in_channels=in_channels, in_index=tuple(range(4 - n, 4)), channels=ch, num_classes=classes,
        num_codes=codes, use_se_loss=use_se, add_lateral=add_lateral, dropout_ratio=0.1,
        norm_cfg=dict(type="BN", requires_grad=True),
    ).double()
    _randomise(theirs)
    ours = EncHead(in_channels, ch, classes, num_codes=codes, use_se_loss=use_se, add_lateral=add_lateral,
                   in_index=tuple(range(4 - n, 4))).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    feats = [torch.randn(2, c, 9, 11, dtype=torch.float64) for c in [3] * (4 - n) + in_channels]

    def run(module):
        module.train(train)
        leaves = [f.clone().requires_grad_() for f in feats]
        torch.manual_seed(0)
        out = module(leaves)
        seg, se = out if use_se else (out, None)
        loss = (seg * torch.randn(seg.shape, generator=torch.Generator().manual_seed(1), dtype=seg.dtype)).sum()
        if se is not None:
            loss = loss + (se * torch.arange(classes, dtype=se.dtype)).sum()
        loss.backward()
        return seg, se, {n: p.grad for n, p in module.named_parameters()}, dict(module.named_buffers())

    with fastctx.use_backend(backend):
        got = run(ours)
    want = run(theirs)
    assert_close(got[0], want[0], torch.float64, "seg logits")
    if use_se:
        assert_close(got[1], want[1], torch.float64, "se logits")
    for name, g in want[2].items():
        assert got[2][name] is not None or g is None, name
        if g is not None:
            assert_close(got[2][name], g, torch.float64, f"grad of {name}")
    for name, b in want[3].items():
        assert_close(got[3][name].double(), b.double(), torch.float64, f"buffer {name}")
