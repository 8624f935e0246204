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
