"""mmsegmentation 1.x state_dict compatibility of ACM / APCHead (docs/design.md 2.5)."""
import pytest
import torch

from fastctx.nn import ACM, APCHead
from tolerances import assert_close

CBR = ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var", "bn.num_batches_tracked")


def mmseg_apchead_keys(num_scales: int, fusion: bool) -> set:
    """The keys of mmseg's APCHead state_dict with norm_cfg BN/SyncBN, written out from its module tree."""
    keys = set()
    for i in range(num_scales):
        convs = ["pooled_redu_conv", "input_redu_conv", "global_info", "residual_conv"] + (["fusion_conv"] if fusion else [])
        keys |= {f"acm_modules.{i}.{conv}.{k}" for conv in convs for k in CBR}
        keys |= {f"acm_modules.{i}.gla.weight", f"acm_modules.{i}.gla.bias"}
    keys |= {f"bottleneck.{k}" for k in CBR}
    keys |= {"conv_seg.weight", "conv_seg.bias"}
    return keys


@pytest.mark.parametrize("scales,fusion", [((1, 2, 3, 6), True), ((1, 3, 5), False)])
def test_apchead_keys_are_mmseg_keys(scales, fusion):
    head = APCHead(16, 8, num_classes=7, pool_scales=scales, fusion=fusion)
    assert set(head.state_dict()) == mmseg_apchead_keys(len(scales), fusion)
    sd = head.state_dict()
    assert sd["acm_modules.3.gla.weight" if len(scales) == 4 else "acm_modules.2.gla.weight"].shape[0] == scales[-1] ** 2
    assert sd["bottleneck.conv.weight"].shape == (8, 16 + len(scales) * 8, 3, 3)
    assert sd["conv_seg.weight"].shape == (7, 8, 1, 1)
    assert "bottleneck.conv.bias" not in sd  # a norm follows: no conv bias, as mmcv's ConvModule


def test_strict_load_of_mmseg_named_state_dict_reproduces_outputs():
    """A state_dict with mmseg's names (random values) loads strictly and drives both paths the same."""
    g = torch.Generator().manual_seed(0)
    src = APCHead(12, 8, num_classes=5)
    state = {k: (torch.rand(v.shape, generator=g) + 0.5 if v.is_floating_point() else v + 3)
             for k, v in src.state_dict().items()}
    head = APCHead(12, 8, num_classes=5).eval()
    missing = head.load_state_dict(state, strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    for k, v in head.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)
    x = torch.randn(2, 12, 9, 10)
    fused = head(x)
    head.fused = False
    assert_close(fused, head(x), torch.float32)
    # a list of backbone features: the last one is used (mmseg's in_index=-1)
    head.fused = True
    assert_close(head([torch.randn(2, 3, 4, 4), x]), fused, torch.float32)


def test_acm_keys():
    acm = ACM(6, True, 16, 8)
    names = {k.split(".")[0] for k in acm.state_dict()}
    assert names == {"pooled_redu_conv", "input_redu_conv", "global_info", "gla", "residual_conv", "fusion_conv"}


def test_init_matches_mmseg():
    torch.manual_seed(0)
    head = APCHead(64, 32, num_classes=5)
    assert head.conv_seg.weight.std().item() == pytest.approx(0.01, rel=0.3)
    assert torch.all(head.conv_seg.bias == 0)
    bn = head.bottleneck.bn
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    # kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * k * k))
    w = head.bottleneck.conv.weight
    assert w.std().item() == pytest.approx((2 / (32 * 9)) ** 0.5, rel=0.1)


def test_bad_input_to_modules():
    head = APCHead(12, 8, num_classes=5)
    with pytest.raises(ValueError, match=r"expects input of shape \[B, 12, H, W\]"):
        head(torch.randn(2, 11, 8, 8))
    with pytest.raises(ValueError, match=r"expects input of shape"):
        head(torch.randn(12, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        head(torch.zeros(2, 12, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="norm must be"):
        APCHead(12, 8, num_classes=5, norm="GN")
