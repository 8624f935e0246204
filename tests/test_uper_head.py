"""fastctx.nn.UPerHead against mmsegmentation's own UPerHead, and the upernet_swin-t preset.

Parity: mmseg's head is built with the same arguments, its state_dict loaded
into ours with strict=True, then float64 outputs, input gradients, every
parameter's gradient and (train mode) the BN running statistics must agree.
"""
import pytest
import torch

from fastctx.models import build_model
from fastctx.nn import PPM, ConvModule, UPerHead
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import assert_close

decode_heads = import_decode_heads()
needs_mmseg = pytest.mark.skipif(decode_heads is None, reason="mmsegmentation is not installed")
F64 = torch.float64

BN = dict(type="BN", requires_grad=True)
CONFIGS = {
    "4 levels, BN": dict(
        kwargs=dict(in_channels=[3, 5, 6, 8], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=4,
                    num_classes=5, dropout_ratio=0.1, norm_cfg=BN, align_corners=False),
        shapes=[(2, 3, 17, 23), (2, 5, 9, 12), (2, 6, 5, 6), (2, 8, 3, 3)]),
    "3 levels, align_corners, BN": dict(
        kwargs=dict(in_channels=[4, 6, 7], in_index=[1, 2, 3], pool_scales=(1, 3), channels=5, num_classes=3,
                    dropout_ratio=0.1, norm_cfg=BN, align_corners=True),
        shapes=[(2, 2, 19, 21), (2, 4, 13, 14), (2, 6, 7, 8), (2, 7, 4, 5)]),
    "4 levels, no norm": dict(
        kwargs=dict(in_channels=[3, 5, 6, 8], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=4,
                    num_classes=5, dropout_ratio=0.1, norm_cfg=None, align_corners=False),
        shapes=[(2, 3, 17, 23), (2, 5, 9, 12), (2, 6, 5, 6), (2, 8, 3, 3)]),
    "3 levels, align_corners, no norm, LeakyReLU": dict(
        kwargs=dict(in_channels=[4, 6, 7], in_index=[1, 2, 3], pool_scales=(1, 3), channels=5, num_classes=3,
                    dropout_ratio=0.1, norm_cfg=None, act_cfg=dict(type="LeakyReLU", negative_slope=0.1),
                    align_corners=True),
        shapes=[(2, 2, 19, 21), (2, 4, 13, 14), (2, 6, 7, 8), (2, 7, 4, 5)]),
}


def _run(module, inputs, train):
    module.train(train)
    leaves = [x.clone().requires_grad_() for x in inputs]
    torch.manual_seed(0)  # the same Dropout2d masks
    out = module(leaves)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    return out, [x.grad for x in leaves], {n: p.grad for n, p in module.named_parameters()}


@needs_mmseg
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cfg", list(CONFIGS))
def test_uper_head_matches_mmseg(cfg, train):
    kwargs, shapes = CONFIGS[cfg]["kwargs"], CONFIGS[cfg]["shapes"]
    torch.manual_seed(0)
    theirs = decode_heads.UPerHead(**kwargs).double()
    _randomise(theirs)
    ours = UPerHead(**kwargs).double()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    gen = torch.Generator().manual_seed(2)
    inputs = [torch.randn(s, generator=gen, dtype=F64) for s in shapes]

    got, want = _run(ours, inputs, train), _run(theirs, inputs, train)
    assert got[0].shape == (2, kwargs["num_classes"], *shapes[kwargs["in_index"][0]][2:])
    assert_close(got[0], want[0], F64, "output")
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert (a is None) == (b is None), f"input {i}"
        if b is not None:
            assert_close(a, b, F64, f"input gradient {i}")
    assert set(got[2]) == set(want[2])
    for name, g in want[2].items():
        assert g is not None, name
        assert_close(got[2][name], g, F64, f"grad of {name}")
    theirs_buffers = dict(theirs.named_buffers())
    for name, buf in ours.named_buffers():  # BN running statistics (updated in train mode)
        if buf.is_floating_point():
            assert_close(buf, theirs_buffers[name], F64, name)
        else:
            assert torch.equal(buf, theirs_buffers[name]), name


def test_uper_head_layers():
    head = UPerHead(in_channels=[3, 5, 6, 8], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3, 6), channels=4,
                    num_classes=5, norm_cfg=None)
    assert isinstance(head.psp_modules, PPM) and len(head.psp_modules) == 4
    assert [m[0].output_size for m in head.psp_modules] == [1, 2, 3, 6]
    assert head.bottleneck.conv.in_channels == 8 + 4 * 4 and head.bottleneck.conv.kernel_size == (3, 3)
    assert [c.conv.in_channels for c in head.lateral_convs] == [3, 5, 6]
    assert all(c.conv.kernel_size == (1, 1) for c in head.lateral_convs)
    assert len(head.fpn_convs) == 3 and all(c.conv.kernel_size == (3, 3) for c in head.fpn_convs)
    assert head.fpn_bottleneck.conv.in_channels == 4 * 4
    assert all(not m.with_norm for m in head.modules() if isinstance(m, ConvModule))


def test_uper_head_bad_inputs():
    head = UPerHead(in_channels=[3, 5], in_index=[0, 1], pool_scales=(1, 2), channels=4, num_classes=5)
    good = [torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)]
    assert head.eval()(good).shape == (2, 5, 8, 8)
    with pytest.raises(ValueError, match=r"in_index \(0, 1\) is out of range for 1 backbone features"):
        head(good[:1])
    with pytest.raises(ValueError, match=r"level 1.*shape \[B, 5, H, W\], got \(2, 6, 4, 4\)"):
        head([good[0], torch.randn(2, 6, 4, 4)])
    with pytest.raises(TypeError, match="expects the list of backbone features"):
        head(good[0])
    with pytest.raises(TypeError, match="floating-point"):
        head([good[0], torch.ones(2, 5, 4, 4, dtype=torch.long)])
    with pytest.raises(TypeError, match="features are torch.float64"):
        head([x.double() for x in good])
    with pytest.raises(ValueError, match="share batch size"):
        head([good[0], torch.randn(3, 5, 4, 4)])


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(input_transform="resize_concat"), ValueError, "input_transform must be 'multiple_select'"),
    (dict(input_transform=None), ValueError, "input_transform must be 'multiple_select'"),
    (dict(in_channels=8, in_index=0), ValueError, "non-empty lists in_channels and in_index"),
    (dict(in_channels=[3, 5], in_index=[0, 1, 2]), ValueError, "of one length"),
    (dict(in_channels=[3, 0], in_index=[0, 1]), ValueError, "in_channels must be a positive int"),
    (dict(in_channels=[3, 5], in_index=[0, "1"]), TypeError, "in_index must be a list of ints"),
    (dict(pool_scales=1), TypeError, "pool_scales must be a list or tuple"),
    (dict(pool_scales=(1, 0)), ValueError, "pool_scales must be positive ints"),
    (dict(channels=0), ValueError, "channels must be a positive int"),
])
def test_uper_head_bad_arguments(kwargs, error, match):
    options = {**dict(in_channels=[3, 5], in_index=[0, 1], channels=4, num_classes=5), **kwargs}
    with pytest.raises(error, match=match):
        UPerHead(**options)


def test_upernet_swin_t_trains_at_an_awkward_size():
    torch.manual_seed(0)
    model = build_model("upernet_swin-t", 19).train()
    img = torch.randn(2, 3, 70, 90)
    label = torch.randint(0, 19, (2, 70, 90))
    label[0, :5] = 255
    losses = model.loss(img, label)
    assert set(losses) == {"decode.loss_ce", "aux.loss_ce"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.decode_head.psp_modules[0][1].conv.weight.grad is not None
    assert model.backbone.stages[0].blocks[0].attn.w_msa.relative_position_bias_table.grad is not None
    model.eval()
    with torch.no_grad():
        assert model(img[:1]).shape == (1, 19, 70, 90)


def test_upernet_swin_t_fused_and_eager_agree_in_float64():
    torch.manual_seed(0)
    fused = build_model("upernet_swin-t", 19, fused=True).double().eval()
    eager = build_model("upernet_swin-t", 19, fused=False).double().eval()
    eager.load_state_dict(fused.state_dict(), strict=True)
    assert fused.backbone.stages[0].blocks[0].attn.w_msa.fused is True
    assert eager.backbone.stages[0].blocks[0].attn.w_msa.fused is False
    img = torch.randn(1, 3, 45, 61, dtype=F64)
    with torch.no_grad():
        assert_close(fused(img), eager(img), F64, "fused vs eager logits")


def test_upernet_swin_t_has_mmseg_state_dict_keys():
    model = build_model("upernet_swin-t", 150)
    keys = set(model.state_dict())
    for key in ("backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table",
                "decode_head.psp_modules.0.1.conv.weight", "decode_head.psp_modules.3.1.bn.running_var",
                "decode_head.bottleneck.conv.weight", "decode_head.lateral_convs.2.conv.weight",
                "decode_head.fpn_convs.2.bn.weight", "decode_head.fpn_bottleneck.conv.weight",
                "decode_head.conv_seg.weight", "auxiliary_head.convs.0.conv.weight", "auxiliary_head.conv_seg.bias"):
        assert key in keys, key
    assert model.decode_head.in_channels == (96, 192, 384, 768) and model.decode_head.channels == 512
    assert model.auxiliary_head.in_channels == 384 and model.auxiliary_head.channels == 256
    assert model.decode_head.conv_seg.out_channels == 150
    assert (model.decode_loss_weight, model.aux_loss_weight) == (1.0, 0.4)
