"""fastctx.convert: structural recognition, weight take-over, identical results, mmseg integration.

Oracles: the unconverted model itself (its own eager maths: mmsegmentation's
modules, or the pure-PyTorch modules below written from the published
formulas), compared in float64 before vs after conversion, train and eval:
outputs, input and parameter gradients, BatchNorm running statistics.
"""
import copy
import io
import logging
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fastctx
import fastctx.nn
from fastctx.convert import ConversionReport, FusedAPCHead
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import assert_close

decode_heads = import_decode_heads()


# ----------------------------------------------------------------------------- a pure-PyTorch look-alike tree
# Class and attribute names as mmsegmentation's; the maths written from the APCNet / EncNet formulas.

class ConvModule(nn.Module):
    """mmcv's layout: conv (no bias) -> norm (`bn`) -> activation (`activate`)."""

    def __init__(self, cin, cout, kernel=1, padding=0, norm=nn.BatchNorm2d, act=nn.ReLU):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=padding, bias=False)
        self.bn = norm(cout) if norm is not nn.GroupNorm else nn.GroupNorm(2, cout)
        self.activate = act()

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class ACM(nn.Module):
    def __init__(self, pool_scale, fusion, in_channels, channels, norm=nn.BatchNorm2d, act=nn.ReLU, gla_bias=True):
        super().__init__()
        self.pool_scale, self.fusion, self.channels = pool_scale, fusion, channels
        self.pooled_redu_conv = ConvModule(in_channels, channels, norm=norm, act=act)
        self.input_redu_conv = ConvModule(in_channels, channels, norm=norm, act=act)
        self.global_info = ConvModule(channels, channels, norm=norm, act=act)
        self.gla = nn.Conv2d(channels, pool_scale ** 2, 1, bias=gla_bias)
        self.residual_conv = ConvModule(channels, channels, norm=norm, act=act)
        if fusion:
            self.fusion_conv = ConvModule(channels, channels, norm=norm, act=act)

    def forward(self, x):
        pooled = self.pooled_redu_conv(F.adaptive_avg_pool2d(x, self.pool_scale)).flatten(2)  # [B, C, S]
        x = self.input_redu_conv(x)
        context = self.global_info(x.mean(dim=(2, 3), keepdim=True))
        affinity = torch.sigmoid(self.gla(x + context)).flatten(2)  # [B, S, N]
        z = torch.einsum("bsn,bcs->bcn", affinity, pooled).reshape(x.shape)
        out = F.relu(self.residual_conv(z) + x)
        return self.fusion_conv(out) if self.fusion else out


class Encoding(nn.Module):
    def __init__(self, channels, num_codes, extra_buffer=False):
        super().__init__()
        self.codewords = nn.Parameter(torch.randn(num_codes, channels) * 0.3)
        self.scale = nn.Parameter(-torch.rand(num_codes) * 0.5 - 0.1)
        if extra_buffer:
            self.register_buffer("temperature", torch.ones(()))

    def forward(self, x):
        pixels = x.flatten(2).transpose(1, 2)  # [B, N, D]
        residuals = pixels[:, :, None, :] - self.codewords  # [B, N, K, D]
        assignment = torch.softmax(self.scale * residuals.pow(2).sum(-1), dim=2)
        return (assignment[..., None] * residuals).sum(dim=1)  # [B, K, D]


class APCHead(nn.Module):
    """Just what convert needs of an mmseg decode head: _transform_inputs, cls_seg, the ACM loop."""

    def __init__(self, in_channels, channels, num_classes, pool_scales):
        super().__init__()
        self.acm_modules = nn.ModuleList([ACM(s, True, in_channels, channels) for s in pool_scales])
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3, padding=1)
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)

    def _transform_inputs(self, inputs):
        return inputs[-1]

    def cls_seg(self, feat):
        return self.conv_seg(feat)

    def forward(self, inputs):
        x = self._transform_inputs(inputs)
        feats = [x] + [acm(x) for acm in self.acm_modules]
        return self.cls_seg(self.bottleneck(torch.cat(feats, dim=1)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = ConvModule(3, 8, 3, padding=1)
        self.decode_head = APCHead(8, 6, 4, (1, 2, 3))
        self.context = nn.Sequential(ACM(2, False, 8, 6))  # an ACM outside any head
        self.encoding = nn.Sequential(Encoding(8, 5), nn.BatchNorm1d(5), nn.ReLU())
        # look-alikes: right class names, other layouts
        self.gelu_acm = ACM(2, True, 8, 6, act=nn.GELU)
        self.gn_acm = ACM(1, False, 8, 6, norm=nn.GroupNorm)
        self.unbiased_acm = ACM(3, True, 8, 6, gla_bias=False)
        self.odd_encoding = Encoding(8, 3, extra_buffer=True)

    def forward(self, img):
        f = self.stem(img)
        return (self.decode_head([f]), self.context(f), self.encoding(f), self.gelu_acm(f), self.gn_acm(f),
                self.unbiased_acm(f), self.odd_encoding(f))


def _run(model, inputs, train, seed=0):
    """Outputs, input gradients, parameter gradients and buffers of one step of `model`."""
    model.train(train)
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    torch.manual_seed(seed)  # identical Dropout2d masks on both sides
    outs = model(*leaves)
    outs = [o for o in (outs if isinstance(outs, (tuple, list)) else (outs,))]
    g = torch.Generator().manual_seed(1)
    sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs).backward()
    return ([o.detach() for o in outs], [t.grad for t in leaves],
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            {n: b.clone() for n, b in model.named_buffers()})


def _assert_same(got, want):
    for part, name in ((0, "output"), (1, "input gradient")):
        assert len(got[part]) == len(want[part])
        for i, (a, b) in enumerate(zip(got[part], want[part])):
            if b is None:  # an input the model does not use (e.g. the first backbone feature)
                assert a is None, f"{name} {i}"
                continue
            assert_close(a, b, torch.float64, f"{name} {i}")
    for part, name in ((2, "gradient"), (3, "buffer")):
        assert got[part].keys() == want[part].keys(), name
        for k in want[part]:
            assert_close(got[part][k].double(), want[part][k].double(), torch.float64, f"{name} of {k}")


def _convert_and_compare(model, inputs, train, **kwargs):
    """Convert a deep copy; both see the same state; compare one step. Returns (converted, report)."""
    reference_model = copy.deepcopy(model)
    converted, report = fastctx.convert(model, inplace=False, return_report=True, **kwargs)
    assert converted.state_dict().keys() == reference_model.state_dict().keys()
    for k, v in reference_model.state_dict().items():
        assert torch.equal(converted.state_dict()[k], v), k
    _assert_same(_run(converted, inputs, train), _run(reference_model, inputs, train))
    return converted, report


@pytest.mark.parametrize("train", [False, True])
def test_lookalike_tree(train):
    torch.manual_seed(0)
    net = Net().double()
    _randomise(net)
    img = torch.randn(2, 3, 9, 11, dtype=torch.float64)
    converted, report = _convert_and_compare(net, [img], train)

    assert isinstance(report, ConversionReport)
    assert [r.name for r in report.replaced] == [
        "decode_head.acm_modules.0", "decode_head.acm_modules.1", "decode_head.acm_modules.2", "decode_head",
        "context.0", "encoding.0"]
    assert report.replaced[0] == ("decode_head.acm_modules.0", f"{__name__}.ACM", "fastctx.nn.apc_head.ACM")
    assert report.replaced[3].new_class == "fastctx.convert.FusedAPCHead"
    assert report.replaced[5] == ("encoding.0", f"{__name__}.Encoding", "fastctx.nn.enc_head.Encoding")
    reasons = {s.name: s.reason for s in report.skipped}
    assert reasons.keys() == {"gelu_acm", "gn_acm", "unbiased_acm", "odd_encoding"}
    assert "activate is torch.nn.modules.activation.GELU, expected torch.nn.ReLU" in reasons["gelu_acm"]
    assert "GroupNorm, expected BatchNorm2d or SyncBatchNorm" in reasons["gn_acm"]
    assert "gla has no bias" in reasons["unbiased_acm"]
    assert "buffers ['temperature']" in reasons["odd_encoding"]

    assert isinstance(converted.decode_head, APCHead) and isinstance(converted.decode_head, FusedAPCHead)
    acms = list(converted.decode_head.acm_modules)
    assert all(type(a) is fastctx.nn.ACM and a.fused for a in acms)
    assert [a.pool_scale for a in acms] == [1, 2, 3] and all(a.fusion for a in acms)
    assert type(converted.context[0]) is fastctx.nn.ACM and converted.context[0].fusion is False
    enc = converted.encoding[0]
    assert type(enc) is fastctx.nn.Encoding and (enc.channels, enc.num_codes) == (8, 5)
    for name in ("gelu_acm", "gn_acm", "unbiased_acm", "odd_encoding"):
        assert type(getattr(converted, name)) is type(getattr(net, name))  # left alone


def _op_calls(fn, op: str) -> list[list]:
    """Input shapes of each call of the custom op `op` (e.g. "fastctx::gla_context") while fn() runs."""
    with torch.profiler.profile(record_shapes=True) as prof:
        fn()
    return [e.input_shapes for e in prof.events() if e.name == op]


def test_fused_path_runs_one_op_for_all_scales():
    """The routed APCHead calls gla_context once for its three ACMs when autograd records (training), and
    once per scale in inference, where each scale's maps are freed before the next (the per-scale loop's
    memory); every scale's sub-regions come from one pooling pass over x in both."""
    torch.manual_seed(0)
    head = fastctx.convert(APCHead(8, 6, 4, (1, 2, 3)))
    x = torch.randn(2, 8, 9, 11)
    assert len(_op_calls(lambda: head([x]).sum().backward(), "fastctx::gla_context")) == 1
    head.eval()
    with torch.no_grad():
        assert len(_op_calls(lambda: head([x]), "fastctx::gla_context")) == 3
        pools_of_x = [s for s in _op_calls(lambda: head([x]), "fastctx::pyramid_pool") if s[0] == list(x.shape)]
    assert len(pools_of_x) == 1


def test_inplace_keeps_parameter_objects_and_flags():
    torch.manual_seed(0)
    net = Net()
    net.decode_head.acm_modules[1].gla.weight.requires_grad_(False)  # a frozen parameter stays frozen
    params = {n: p for n, p in net.named_parameters()}
    buffers = {n: b for n, b in net.named_buffers()}
    net.eval()
    net.decode_head.acm_modules[0].train()  # mixed train/eval flags are kept per submodule
    assert fastctx.convert(net) is net
    for n, p in net.named_parameters():
        assert p is params[n], n  # an optimizer built before conversion still holds them
    for n, b in net.named_buffers():
        assert b is buffers[n], n
    assert not net.decode_head.acm_modules[1].gla.weight.requires_grad
    assert net.decode_head.acm_modules[0].training and net.decode_head.acm_modules[0].input_redu_conv.bn.training
    assert not net.decode_head.acm_modules[1].training


def test_not_inplace_leaves_the_input_untouched():
    torch.manual_seed(0)
    net = Net()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    classes = {n: type(m) for n, m in net.named_modules()}
    converted = fastctx.convert(net, inplace=False)
    assert converted is not net
    assert {n: type(m) for n, m in net.named_modules()} == classes
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k])
    assert not any(p is q for p in net.parameters() for q in converted.parameters())


def test_unfused_conversion_and_root_module():
    torch.manual_seed(0)
    head = APCHead(8, 6, 4, (1, 2))
    converted, report = fastctx.convert(head, fused=False, return_report=True)
    assert type(converted) is APCHead  # not routed: eager maths requested
    assert all(not a.fused for a in converted.acm_modules)
    acm = ACM(2, True, 8, 6)
    new = fastctx.convert(acm)
    assert type(new) is fastctx.nn.ACM  # the root itself is replaced and returned


def test_syncbn_and_settings_are_inferred():
    torch.manual_seed(0)
    acm = ACM(3, False, 8, 6, norm=nn.SyncBatchNorm)
    acm.input_redu_conv.bn.eps, acm.input_redu_conv.bn.momentum = 1e-3, 0.03
    new = fastctx.convert(acm)
    assert (new.pool_scale, new.fusion, new.in_channels, new.channels) == (3, False, 8, 6)
    assert all(isinstance(m.bn, nn.SyncBatchNorm) for m in (new.input_redu_conv, new.residual_conv))
    assert (new.input_redu_conv.bn.eps, new.input_redu_conv.bn.momentum) == (1e-3, 0.03)


def test_report_is_logged_and_printed(caplog, capsys):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="fastctx.convert"):
        fastctx.convert(Net(), verbose=True)
    printed = capsys.readouterr().out
    assert "6 module(s) replaced, 4 skipped" in printed
    assert "replaced decode_head: " in printed and "skipped  gelu_acm" in printed
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("replaced encoding.0:") for m in messages)
    assert any(r.levelno == logging.WARNING and r.getMessage().startswith("skipped gn_acm") for r in caplog.records)


def test_converted_model_pickles_and_deep_copies():
    torch.manual_seed(0)
    net = fastctx.convert(Net().eval())
    img = torch.randn(1, 3, 6, 7)
    with torch.no_grad():
        want = net(img)[0]
        for clone in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
            assert isinstance(clone.decode_head, FusedAPCHead)
            assert torch.equal(clone(img)[0], want)


def test_bad_input():
    with pytest.raises(TypeError, match="expects a torch.nn.Module, got dict"):
        fastctx.convert({"decode_head": None})


# ----------------------------------------------------------------------------- mmsegmentation's own modules

requires_mmseg = pytest.mark.skipif(decode_heads is None, reason="mmsegmentation is not installed")
NORM = dict(type="BN", requires_grad=True)


def _mmseg_apc_head(norm=NORM, fusion=True):
    return decode_heads.APCHead(in_channels=12, channels=8, num_classes=5, pool_scales=(1, 2, 3, 6), fusion=fusion,
                                dropout_ratio=0.1, norm_cfg=norm)


def _mmseg_enc_head():
    return decode_heads.EncHead(in_channels=[6, 10, 12], in_index=(1, 2, 3), channels=8, num_classes=5, num_codes=4,
                                use_se_loss=True, add_lateral=True, dropout_ratio=0.1, norm_cfg=NORM)


@requires_mmseg
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("kind", ["apc", "apc_nofusion_syncbn", "enc"])
def test_mmseg_heads(kind, train):
    torch.manual_seed(0)
    if kind == "enc":
        head = _mmseg_enc_head()
        feats = [torch.randn(2, c, 9, 11, dtype=torch.float64) for c in (3, 6, 10, 12)]
    else:
        head = _mmseg_apc_head(dict(type="SyncBN", requires_grad=True), False) if "syncbn" in kind \
            else _mmseg_apc_head()
        feats = [torch.randn(2, 12, 9, 11, dtype=torch.float64)]
    head = head.double()
    _randomise(head)

    class ListInput(nn.Module):  # mmseg heads take the list of backbone features
        def __init__(self, h):
            super().__init__()
            self.head = h

        def forward(self, *xs):
            return self.head(list(xs))

    converted, report = _convert_and_compare(ListInput(head), feats, train)
    replaced = {r.name: r.new_class for r in report.replaced}
    assert not report.skipped
    if kind == "enc":
        assert replaced == {"head.enc_module.encoding.0": "fastctx.nn.enc_head.Encoding"}
    else:
        assert replaced == {**{f"head.acm_modules.{i}": "fastctx.nn.apc_head.ACM" for i in range(4)},
                            "head": "fastctx.convert.FusedAPCHead"}
        assert isinstance(converted.head, decode_heads.APCHead)
        norm_type = nn.SyncBatchNorm if "syncbn" in kind else nn.BatchNorm2d
        assert all(isinstance(a.residual_conv.bn, norm_type) for a in converted.head.acm_modules)


def _mmseg_segmentor(decode: str):
    from mmengine import ConfigDict
    from mmseg.registry import MODELS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=False)
    if decode == "apc":
        head = dict(type="APCHead", in_channels=512, in_index=3, channels=16, pool_scales=(1, 2, 3, 6))
    else:
        head = dict(type="EncHead", in_channels=[128, 256, 512], in_index=(1, 2, 3), channels=16, num_codes=8,
                    use_se_loss=True, add_lateral=False,
                    loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.2))
    ce = dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0)
    cfg = dict(
        type="EncoderDecoder", data_preprocessor=None,
        backbone=dict(type="ResNetV1c", depth=18, out_indices=(0, 1, 2, 3), dilations=(1, 1, 2, 4),
                      strides=(1, 2, 1, 1), norm_cfg=NORM, norm_eval=False, contract_dilation=True),
        decode_head=dict(**head, dropout_ratio=0.1, num_classes=5, norm_cfg=NORM, align_corners=False,
                         loss_decode=ce),
        auxiliary_head=dict(type="FCNHead", in_channels=256, in_index=2, channels=8, num_convs=1,
                            concat_input=False, dropout_ratio=0.1, num_classes=5, norm_cfg=NORM,
                            align_corners=False, loss_decode={**ce, "loss_weight": 0.4}),
        train_cfg=ConfigDict(), test_cfg=ConfigDict(mode="whole"))
    return MODELS.build(cfg)


def _data_samples(labels):
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    samples = []
    for label in labels:
        shape = tuple(label.shape)
        sample = SegDataSample(metainfo=dict(img_shape=shape, ori_shape=shape, pad_shape=shape))
        sample.gt_sem_seg = PixelData(data=label[None])
        samples.append(sample)
    return samples


@requires_mmseg
@pytest.mark.parametrize("decode", ["apc", "enc"])
def test_mmseg_encoder_decoder(decode):
    """A real mmseg EncoderDecoder keeps working inside mmseg: loss (train), predict and tensor modes (eval)."""
    torch.manual_seed(0)
    model = _mmseg_segmentor(decode).double()
    _randomise(model)
    img = torch.randn(2, 3, 32, 48, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 32, 48))
    labels[:, :4] = 255

    reference_model = copy.deepcopy(model)
    converted, report = fastctx.convert(model, inplace=False, return_report=True)
    assert not report.skipped
    assert converted.state_dict().keys() == reference_model.state_dict().keys()
    expected = {"apc": {"decode_head", *(f"decode_head.acm_modules.{i}" for i in range(4))},
                "enc": {"decode_head.enc_module.encoding.0"}}[decode]
    assert {r.name for r in report.replaced} == expected
    assert isinstance(converted.decode_head, FusedAPCHead) == (decode == "apc")

    def loss_step(m):
        m.train()
        m.zero_grad(set_to_none=True)
        torch.manual_seed(0)
        losses = m.loss(img, _data_samples(labels))
        total = sum(v for k, v in losses.items() if "loss" in k)
        total.backward()
        return losses, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, \
            {n: b.clone() for n, b in m.named_buffers()}

    got, want = loss_step(converted), loss_step(reference_model)
    assert got[0].keys() == want[0].keys()
    for k in want[0]:
        assert_close(got[0][k].double(), want[0][k].double(), torch.float64, k)
    for part in (1, 2):
        assert got[part].keys() == want[part].keys()
        for k in want[part]:
            assert_close(got[part][k].double(), want[part][k].double(), torch.float64, k)

    converted.eval(), reference_model.eval()
    with torch.no_grad():
        tensors = [converted(img, mode="tensor"), reference_model(img, mode="tensor")]
        for a, b in zip(*(t if isinstance(t, tuple) else (t,) for t in tensors), strict=True):  # EncHead: (seg, se)
            assert_close(a, b, torch.float64, "tensor mode")
        pred_got = converted.predict(img, _data_samples(labels))
        pred_want = reference_model.predict(img, _data_samples(labels))
    for a, b in zip(pred_got, pred_want, strict=True):
        assert_close(a.seg_logits.data, b.seg_logits.data, torch.float64, "predict seg_logits")
        assert torch.equal(a.pred_sem_seg.data, b.pred_sem_seg.data)

    buffer = io.BytesIO()  # torch.save of the whole converted segmentor, as mmengine checkpoints a model
    torch.save(converted, buffer)
    buffer.seek(0)
    restored = torch.load(buffer, weights_only=False).eval()
    with torch.no_grad():
        for a, b in zip(*(t if isinstance(t, tuple) else (t,)
                          for t in (restored(img, mode="tensor"), converted(img, mode="tensor"))), strict=True):
            assert torch.equal(a, b)
