"""mmsegmentation's own head tests run with fastctx's heads, and mmseg's constructor arguments.

The first part ports mmsegmentation 1.2.2's tests/test_models/test_heads/
test_apc_head.py, test_enc_head.py and test_fcn_head.py (test_fcn_head): every
block, with fastctx's APCHead / EncHead / FCNHead in place of mmseg's and the
same assertions. Two systematic differences, written into the blocks:

- mmseg's BaseDecodeHead defaults to norm_cfg=None (no norm); fastctx's heads
  default to BatchNorm. Blocks that rely on mmseg's default pass norm_cfg=None.
- mmcv's `ConvModule` becomes fastctx.nn.ConvModule (same `with_norm`, `bn`,
  `kernel_size`, `padding`, `in_channels` attributes); AssertionErrors become
  the ValueError / TypeError fastctx raises. mmseg's `forward_test` / `predict`
  (post-processing with image metas) becomes the eval-mode forward's logits.

The second part checks mmseg's arguments against mmseg's own modules: the same
state_dict keys, strict loading, and the same outputs and gradients in float64.
"""
import copy

import pytest
import torch
import torch.nn as nn

import fastctx
from fastctx.models import EncoderDecoder
from fastctx.nn import ACM, APCHead, ConvModule, EncHead, EncModule, Encoding, FCNHead
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import assert_close

decode_heads = import_decode_heads()
needs_mmseg = pytest.mark.skipif(decode_heads is None, reason="mmsegmentation is not installed")
F64 = torch.float64


def _conv_has_norm(module, sync_bn):
    """mmseg's tests/test_models/test_heads/utils.py helper, over fastctx's ConvModule."""
    for m in module.modules():
        if isinstance(m, ConvModule):
            if not m.with_norm:
                return False
            if sync_bn and not isinstance(m.bn, nn.SyncBatchNorm):
                return False
    return True


# ----------------------------------------------------------------------------- mmseg's test_apc_head.py


def test_apc_head():
    with pytest.raises(TypeError, match="pool_scales must be a list or tuple"):
        # pool_scales must be list|tuple
        APCHead(in_channels=8, channels=2, num_classes=19, pool_scales=1)

    # test no norm_cfg
    head = APCHead(in_channels=8, channels=2, num_classes=19, norm_cfg=None)
    assert not _conv_has_norm(head, sync_bn=False)

    # test with norm_cfg
    head = APCHead(in_channels=8, channels=2, num_classes=19, norm_cfg=dict(type="SyncBN"))
    assert _conv_has_norm(head, sync_bn=True)

    # fusion=True
    inputs = [torch.randn(1, 8, 45, 45)]
    head = APCHead(in_channels=8, channels=2, num_classes=19, pool_scales=(1, 2, 3), fusion=True, norm_cfg=None)
    assert head.fusion is True
    assert head.acm_modules[0].pool_scale == 1
    assert head.acm_modules[1].pool_scale == 2
    assert head.acm_modules[2].pool_scale == 3
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 45, 45)

    # fusion=False
    inputs = [torch.randn(1, 8, 45, 45)]
    head = APCHead(in_channels=8, channels=2, num_classes=19, pool_scales=(1, 2, 3), fusion=False, norm_cfg=None)
    assert head.fusion is False
    assert head.acm_modules[0].pool_scale == 1
    assert head.acm_modules[1].pool_scale == 2
    assert head.acm_modules[2].pool_scale == 3
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 45, 45)


# ----------------------------------------------------------------------------- mmseg's test_enc_head.py


def test_enc_head():
    # with se_loss, w.o. lateral
    inputs = [torch.randn(1, 8, 21, 21)]
    head = EncHead(in_channels=[8], channels=4, num_classes=19, in_index=[-1], norm_cfg=None)
    outputs = head(inputs)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    assert outputs[0].shape == (1, head.num_classes, 21, 21)
    assert outputs[1].shape == (1, head.num_classes)

    # w.o se_loss, w.o. lateral
    inputs = [torch.randn(1, 8, 21, 21)]
    head = EncHead(in_channels=[8], channels=4, use_se_loss=False, num_classes=19, in_index=[-1], norm_cfg=None)
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 21, 21)

    # with se_loss, with lateral
    inputs = [torch.randn(1, 4, 45, 45), torch.randn(1, 8, 21, 21)]
    head = EncHead(in_channels=[4, 8], channels=4, add_lateral=True, num_classes=19, in_index=[-2, -1],
                   norm_cfg=None)
    outputs = head(inputs)
    assert isinstance(outputs, tuple) and len(outputs) == 2
    assert outputs[0].shape == (1, head.num_classes, 21, 21)
    assert outputs[1].shape == (1, head.num_classes)
    head.eval()  # mmseg's test-time forward keeps the segmentation logits only
    test_output = head(inputs)[0]
    assert test_output.shape == (1, head.num_classes, 21, 21)


# ----------------------------------------------------------------------------- mmseg's test_fcn_head.py


def test_fcn_head():
    with pytest.raises(ValueError, match="num_convs must be >= 0"):
        # num_convs must be not less than 0
        FCNHead(in_channels=32, channels=16, num_classes=19, num_convs=-1)

    # test no norm_cfg
    head = FCNHead(in_channels=8, channels=4, num_classes=19, norm_cfg=None)
    for m in head.modules():
        if isinstance(m, ConvModule):
            assert not m.with_norm

    # test with norm_cfg
    head = FCNHead(in_channels=8, channels=4, num_classes=19, norm_cfg=dict(type="SyncBN"))
    for m in head.modules():
        if isinstance(m, ConvModule):
            assert m.with_norm and isinstance(m.bn, nn.SyncBatchNorm)

    # test concat_input=False
    inputs = [torch.randn(1, 8, 23, 23)]
    head = FCNHead(in_channels=8, channels=4, num_classes=19, concat_input=False, norm_cfg=None)
    assert len(head.convs) == 2
    assert not head.concat_input and not hasattr(head, "conv_cat")
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 23, 23)

    # test concat_input=True
    inputs = [torch.randn(1, 8, 23, 23)]
    head = FCNHead(in_channels=8, channels=4, num_classes=19, concat_input=True, norm_cfg=None)
    assert len(head.convs) == 2
    assert head.concat_input
    assert head.conv_cat.in_channels == 12
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 23, 23)

    # test kernel_size=3
    inputs = [torch.randn(1, 8, 23, 23)]
    head = FCNHead(in_channels=8, channels=4, num_classes=19, norm_cfg=None)
    for i in range(len(head.convs)):
        assert head.convs[i].kernel_size == (3, 3)
        assert head.convs[i].padding == 1
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 23, 23)

    # test kernel_size=1
    inputs = [torch.randn(1, 8, 23, 23)]
    head = FCNHead(in_channels=8, channels=4, num_classes=19, kernel_size=1, norm_cfg=None)
    for i in range(len(head.convs)):
        assert head.convs[i].kernel_size == (1, 1)
        assert head.convs[i].padding == 0
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 23, 23)

    # test num_conv
    inputs = [torch.randn(1, 8, 23, 23)]
    head = FCNHead(in_channels=8, channels=4, num_classes=19, num_convs=1, norm_cfg=None)
    assert len(head.convs) == 1
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 23, 23)

    # test num_conv = 0
    inputs = [torch.randn(1, 8, 23, 23)]
    head = FCNHead(in_channels=8, channels=8, num_classes=19, num_convs=0, concat_input=False, norm_cfg=None)
    assert isinstance(head.convs, torch.nn.Identity)
    outputs = head(inputs)
    assert outputs.shape == (1, head.num_classes, 23, 23)


# ----------------------------------------------------------------------------- mmseg's arguments vs mmseg


def _parity(ours: nn.Module, theirs: nn.Module, inputs, train: bool, backend: str | None = None):
    """Strict load of theirs into ours, then the same outputs, input gradients and parameter gradients.

    Heads take the list `inputs`, modules (ACM, EncModule) its one tensor.
    """
    as_list = isinstance(ours, (APCHead, EncHead, FCNHead))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)

    def run(module):
        module.train(train)
        leaves = [x.clone().requires_grad_() for x in inputs]
        torch.manual_seed(0)  # the same dropout masks
        out = module(leaves if as_list else leaves[0])
        outs = list(out) if isinstance(out, tuple) else [out]
        gen = torch.Generator().manual_seed(1)
        sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs).backward()
        return outs, [x.grad for x in leaves], {n: p.grad for n, p in module.named_parameters()}

    with fastctx.use_backend(backend):
        got = run(ours)
    want = run(theirs)
    for a, b in zip(got[0], want[0]):
        assert_close(a, b, F64, "output")
    for a, b in zip(got[1], want[1]):
        assert_close(a, b, F64, "input gradient")
    for name, g in want[2].items():
        assert (got[2][name] is None) == (g is None), name
        if g is not None:
            assert_close(got[2][name], g, F64, f"grad of {name}")


def _pair(ours_cls, theirs_cls, *args, **kwargs):
    torch.manual_seed(0)
    theirs = theirs_cls(*args, **kwargs).double()
    _randomise(theirs)
    return ours_cls(*args, **kwargs).double(), theirs


LAYER_CFGS = {
    "SyncBN": dict(norm_cfg=dict(type="SyncBN", requires_grad=True)),
    "no norm": dict(norm_cfg=None),
    "BN + LeakyReLU": dict(norm_cfg=dict(type="BN", requires_grad=True),
                           act_cfg=dict(type="LeakyReLU", negative_slope=0.1)),
    "no norm, no act": dict(norm_cfg=None, act_cfg=None),
}


@needs_mmseg
@pytest.mark.parametrize("cfg", list(LAYER_CFGS))
@pytest.mark.parametrize("train", [True, False])
def test_acm_positional_mmseg_order(cfg, train):
    """ACM(pool_scale, fusion, in_channels, channels, conv_cfg, norm_cfg, act_cfg), as mmseg's APCHead calls it."""
    layers = LAYER_CFGS[cfg]
    args = (3, True, 6, 4, None, layers["norm_cfg"], layers.get("act_cfg", dict(type="ReLU")))
    ours, theirs = _pair(ACM, decode_heads.apc_head.ACM, *args)
    # the same layers (SyncBatchNorm, LeakyReLU, a conv bias without norm...) under the same names
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in theirs.named_modules()]
    x = torch.randn(2, 6, 9, 7, dtype=F64)
    for backend in ("reference", "cpu"):
        _parity(ours, theirs, [x], train, backend)


@needs_mmseg
@pytest.mark.parametrize("train", [True, False])
def test_encmodule_positional_mmseg_order(train):
    """EncModule(in_channels, num_codes, conv_cfg, norm_cfg, act_cfg)."""
    args = (8, 4, None, dict(type="BN", requires_grad=True), dict(type="ReLU"))
    ours, theirs = _pair(EncModule, decode_heads.enc_head.EncModule, *args)
    assert isinstance(ours.encoding[1], nn.BatchNorm1d)
    _parity(ours, theirs, [torch.randn(2, 8, 5, 6, dtype=F64)], train, "cpu")
    no_norm, theirs = _pair(EncModule, decode_heads.enc_head.EncModule, 8, 4, None, None, dict(type="ReLU"))
    assert not no_norm.encoding_project.with_norm and isinstance(no_norm.encoding[1], nn.BatchNorm1d)
    _parity(no_norm, theirs, [torch.randn(2, 8, 5, 6, dtype=F64)], train, "cpu")


@needs_mmseg
@pytest.mark.parametrize("cfg", list(LAYER_CFGS)[1:])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("head", ["APCHead", "EncHead", "FCNHead"])
def test_heads_with_mmseg_layer_configs_match_mmseg(head, train, cfg):
    """mmseg's heads built from the same keyword arguments, norm_cfg=None (conv bias, no norm) included:
    the same parameters, outputs and gradients, with the fused backends."""
    kwargs = dict(channels=4, num_classes=5, dropout_ratio=0.1, **LAYER_CFGS[cfg])
    if head == "APCHead":
        kwargs.update(in_channels=6, pool_scales=(1, 2, 3))
        feats = [torch.randn(2, 6, 9, 11, dtype=F64)]
    elif head == "EncHead":
        kwargs.update(in_channels=[3, 6], in_index=[0, 1], num_codes=4, add_lateral=True)
        feats = [torch.randn(2, 3, 9, 11, dtype=F64), torch.randn(2, 6, 9, 11, dtype=F64)]
    else:
        kwargs.update(in_channels=6, num_convs=2, concat_input=True)
        feats = [torch.randn(2, 6, 9, 11, dtype=F64)]
    ours, theirs = _pair(getattr(fastctx.nn, head), getattr(decode_heads, head), **kwargs)
    for backend in ("cpu", "triton", "reference"):
        _parity(ours, theirs, feats, train, backend)


@needs_mmseg
@pytest.mark.parametrize("cfg", list(LAYER_CFGS)[1:])
def test_fused_inference_path_with_mmseg_layer_configs(cfg):
    """Inference (no autograd: the per-scale fused path) equals mmseg's head for every layer config."""
    ours, theirs = _pair(APCHead, decode_heads.APCHead, in_channels=6, channels=4, num_classes=5,
                         pool_scales=(1, 2, 3, 6), **LAYER_CFGS[cfg])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ours.eval(), theirs.eval()
    x = torch.randn(2, 6, 13, 10, dtype=F64)
    with torch.no_grad():
        for backend in ("cpu", "triton", "reference"):
            with fastctx.use_backend(backend):
                assert_close(ours([x]), theirs([x]), F64, f"{cfg}, {backend}")


def test_norm_forms_are_one_and_the_same():
    """norm="SyncBN", norm=dict(...) (the issue's "'dict' object is not callable") and norm_cfg=dict(...)."""
    heads = [APCHead(8, 4, 3, norm="SyncBN"), APCHead(8, 4, 3, norm=dict(type="SyncBN", requires_grad=True)),
             APCHead(8, 4, 3, norm_cfg=dict(type="SyncBN", requires_grad=True)),
             APCHead(8, 4, 3, norm="SyncBN", norm_cfg=dict(type="SyncBN"))]
    for head in heads:
        assert _conv_has_norm(head, sync_bn=True)
        assert [type(m) for m in head.modules()] == [type(m) for m in heads[0].modules()]
    frozen = FCNHead(8, 4, 3, norm_cfg=dict(type="BN", requires_grad=False, momentum=0.01, eps=1e-3))
    bn = frozen.convs[0].bn
    assert not bn.weight.requires_grad and not bn.bias.requires_grad and (bn.momentum, bn.eps) == (0.01, 1e-3)
    assert frozen.convs[0].conv.weight.requires_grad
    with pytest.raises(ValueError, match="norm='BN' and norm_cfg=None disagree"):
        APCHead(8, 4, 3, norm="BN", norm_cfg=None)
    with pytest.raises(ValueError, match="conv_cfg must be None, dict\\(type='Conv'\\)"):
        APCHead(8, 4, 3, conv_cfg=dict(type="DCNv2"))
    with pytest.raises(ValueError, match="norm must be 'BN', 'SyncBN', a norm_cfg dict"):
        EncHead(8, 4, 3, norm_cfg=dict(type="GN", num_groups=2))
    with pytest.raises(ValueError, match="unknown activation type 'Mish'"):
        FCNHead(8, 4, 3, act_cfg=dict(type="Mish"))


@needs_mmseg
def test_mmseg_config_dicts_build_fastctx_heads():
    """The decode/auxiliary head dicts of mmseg's apcnet_r50-d8 / encnet_r50-d8 configs, as they are."""
    norm_cfg = dict(type="SyncBN", requires_grad=True)
    apc = dict(in_channels=2048, in_index=3, channels=512, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
               num_classes=19, norm_cfg=norm_cfg, align_corners=False,
               loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0))
    enc = dict(in_channels=[512, 1024, 2048], in_index=(1, 2, 3), channels=512, num_codes=32, use_se_loss=True,
               add_lateral=False, dropout_ratio=0.1, num_classes=19, norm_cfg=norm_cfg, align_corners=False,
               loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
               loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.2))
    aux = dict(in_channels=1024, in_index=2, channels=256, num_convs=1, concat_input=False, dropout_ratio=0.1,
               num_classes=19, norm_cfg=norm_cfg, align_corners=False,
               loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4))
    with torch.device("meta"):
        for ours_cls, cfg in ((APCHead, apc), (EncHead, enc), (FCNHead, aux)):
            theirs = getattr(decode_heads, ours_cls.__name__)(**cfg)
            ours = ours_cls(**cfg)
            assert set(ours.state_dict()) == set(theirs.state_dict())
        decode, auxiliary = EncHead(**enc), FCNHead(**aux)
    # the heads' loss weights reach the segmentor's losses
    segmentor = EncoderDecoder(nn.Identity(), decode, auxiliary)
    assert (segmentor.decode_loss_weight, segmentor.aux_loss_weight, segmentor.se_loss_weight) == (1.0, 0.4, 0.2)
    with pytest.raises(ValueError, match="aux_loss_weight=0.3 but the head's loss config gives loss_weight=0.4"):
        EncoderDecoder(nn.Identity(), decode, auxiliary, aux_loss_weight=0.3)


def test_base_decode_head_arguments_fastctx_does_not_build_are_refused():
    for kwargs, message in [
        (dict(out_channels=1), "mmseg's binary form"), (dict(threshold=0.3), "threshold belongs to"),
        (dict(sampler=dict(type="OHEMPixelSampler")), "pixel samplers"),
        (dict(loss_decode=dict(type="DiceLoss")), "loss_decode must be dict\\(type='CrossEntropyLoss'"),
        (dict(loss_decode=dict(type="CrossEntropyLoss", avg_non_ignore=True)), "avg_non_ignore"),
        (dict(init_cfg=dict(type="Kaiming")), "init_cfg must be None or mmseg's default"),
        (dict(input_transform="resize_concat"), "input_transform must be None"),
    ]:
        with pytest.raises(ValueError, match=message):
            APCHead(8, 4, 3, **kwargs)
    head = FCNHead(8, 4, 3, out_channels=3, ignore_index=254, init_cfg=dict(type="Normal", std=0.01,
                                                                             override=dict(name="conv_seg")))
    assert head.out_channels == 3 and head.ignore_index == 254
    with pytest.raises(ValueError, match="auxiliary_head has ignore_index=254, the segmentor ignore_index=255"):
        EncoderDecoder(nn.Identity(), FCNHead(8, 4, 3), head)


@needs_mmseg
@pytest.mark.parametrize("train", [False, True])
def test_convert_takes_mmseg_heads_without_norm(train):
    """convert() replaces the ACMs of an mmseg APCHead built with norm_cfg=None (it used to skip them)."""
    torch.manual_seed(0)
    theirs = decode_heads.APCHead(in_channels=6, channels=4, num_classes=5, pool_scales=(1, 2, 3),
                                  norm_cfg=None).double()
    _randomise(theirs)
    reference = copy.deepcopy(theirs)
    converted, report = fastctx.convert(theirs, inplace=False, return_report=True)
    assert not report.skipped, report
    assert [r.name for r in report.replaced] == ["acm_modules.0", "acm_modules.1", "acm_modules.2", ""]
    assert all(type(a) is ACM and not a.residual_conv.with_norm for a in converted.acm_modules)
    x = [torch.randn(2, 6, 9, 11, dtype=F64)]
    converted.train(train), reference.train(train)
    torch.manual_seed(0)
    got = converted(x)
    torch.manual_seed(0)
    assert_close(got, reference(x), F64, "converted output")
    # a conv bias next to a BatchNorm is still not ACM's layout
    odd = decode_heads.apc_head.ACM(2, True, 6, 4, None, dict(type="BN"), dict(type="ReLU"))
    odd.residual_conv.conv.bias = nn.Parameter(torch.zeros(4))
    _, report = fastctx.convert(odd, return_report=True)
    assert "residual_conv.conv has a bias, expected none" in report.skipped[0].reason


@needs_mmseg
def test_mixed_dtypes_outside_autocast():
    """mmseg's Encoding promotes (fp16 features on an fp32 layer give fp32, fp64 give fp64): so does fastctx's,
    fused or not. mmseg's heads fail in their first conv ("expected scalar type"); fastctx's say what to do."""
    from mmseg.models.utils import Encoding as MMEncoding

    torch.manual_seed(0)
    theirs = MMEncoding(8, 4)
    ours = Encoding(8, 4)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 8, 5, 6)
    for dtype in (torch.float16, torch.float64):
        want = theirs(x.to(dtype))
        for fused in (True, False):
            ours.fused = fused
            got = ours(x.to(dtype))
            assert got.dtype == want.dtype == torch.promote_types(dtype, torch.float32)
            assert_close(got, want, want.dtype, f"{dtype}, fused={fused}")
    for head, feats in ((APCHead(8, 4, 3), [x]), (EncHead([8], 4, 3), [x]), (FCNHead(8, 4, 3), [x]),
                        (ACM(2, True, 8, 4), x), (EncModule(8, 4), x)):
        for dtype in (torch.float16, torch.float64):
            wrong = [f.to(dtype) for f in feats] if isinstance(feats, list) else feats.to(dtype)
            with pytest.raises(TypeError, match=rf"features are {dtype} but the module's parameters are "
                                                r"torch.float32; convert one to the other \(module.to"):
                head(wrong)
