"""OCRNet's SpatialGatherModule, ObjectAttentionBlock and OCRHead: mmseg parity, fused vs eager, conversion, errors."""
import copy
import math

import pytest
import torch

import fastctx
from conftest import require_backend
from fastctx.nn import ObjectAttentionBlock, OCRHead, SpatialGatherModule, convert_ocr
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import TOLERANCES, assert_close

decode_heads = import_decode_heads()
assert decode_heads is not None, "mmsegmentation must be importable (tests/mmseg_compat.py)"

F64 = torch.float64
BACKENDS = ["reference", "cpu", "triton"]
pytestmark = [
    pytest.mark.filterwarnings("ignore:``build_loss`` would be deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:Default ``avg_non_ignore`` is False:UserWarning"),
]


def _mmseg_head(in_ch, ch, ocr, classes, dropout=0.1, norm="BN"):
    head = decode_heads.OCRHead(ocr_channels=ocr, in_channels=in_ch, channels=ch, num_classes=classes,
                                dropout_ratio=dropout, norm_cfg=dict(type=norm, requires_grad=True))
    _randomise(head)
    return head.double()


def _inputs(batch, in_ch, classes, hw, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_ch, *hw, dtype=F64, generator=g)
    prev = torch.randn(batch, classes, *hw, dtype=F64, generator=g) * 3  # logits with some spread
    return x, prev


def _run(head, x, prev, train, seed=0):
    """Output, input gradients, parameter gradients and buffers after one forward/backward."""
    head.train(train)
    x, prev = x.clone().requires_grad_(), prev.clone().requires_grad_()
    torch.manual_seed(seed)  # same Dropout2d mask on both sides
    out = head([x], prev)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in head.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, prev.grad, grads, {n: b.clone() for n, b in head.named_buffers()}


def assert_grad_close(got, want, dtype, msg, scale):
    """assert_close, except for a gradient that is exactly zero in exact arithmetic (K = 1: the softmax over the
    classes is identically 1, so keys, queries and the previous logits get none): there the fused kernels'
    rounding must stay below the tolerance relative to `scale`, the largest gradient of the step."""
    if want.abs().max() == 0:
        assert got.abs().max() <= TOLERANCES[dtype]["atol"] * scale, f"{msg}: {got.abs().max()} (expected 0)"
    else:
        assert_close(got, want, dtype, msg)


def _assert_same_run(got, want, dtype, prefix=""):
    out, gx, gprev, grads, bufs = got
    w_out, w_gx, w_gprev, w_grads, w_bufs = want
    scale = max(g.abs().max().item() for g in (w_gx, w_gprev, *w_grads.values()))
    assert_close(out, w_out, dtype, f"{prefix}output")
    assert_grad_close(gx, w_gx, dtype, f"{prefix}grad of the features", scale)
    assert_grad_close(gprev, w_gprev, dtype, f"{prefix}grad of the previous logits", scale)
    assert grads.keys() == w_grads.keys()
    for name, g in w_grads.items():
        assert_grad_close(grads[name], g, dtype, f"{prefix}grad of {name}", scale)
    assert bufs.keys() == w_bufs.keys()
    for name, b in w_bufs.items():
        assert_close(bufs[name].double(), b.double(), dtype, f"{prefix}buffer {name}")


# ------------------------------------------------------------------------------------------------ mmseg parity

# (batch, in_channels, channels, ocr_channels, classes, (H, W)); K = 1 needs batch 2 in training (BatchNorm
# over the class centres of the key / value projections: one value per channel otherwise, in mmseg too).
PARITY_SHAPES = [
    (2, 12, 8, 6, 1, (9, 7)),
    (1, 12, 8, 6, 19, (11, 13)),
    (2, 10, 8, 4, 150, (7, 9)),
    (1, 9, 6, 5, 171, (5, 11)),
    (1, 512, 512, 256, 19, (17, 33)),  # mmseg's OCRNet channels (in_channels 512 instead of 2048 to stay quick)
]


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch,in_ch,ch,ocr,classes,hw", PARITY_SHAPES)
def test_ocr_head_matches_mmseg(fused, train, batch, in_ch, ch, ocr, classes, hw):
    torch.manual_seed(0)
    theirs = _mmseg_head(in_ch, ch, ocr, classes)
    ours = OCRHead(ocr, in_channels=in_ch, channels=ch, num_classes=classes, dropout_ratio=0.1,
                   norm_cfg=dict(type="BN", requires_grad=True), fused=fused).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)  # both ways: the same keys
    x, prev = _inputs(batch, in_ch, classes, hw)
    with fastctx.use_backend("cpu"):
        got = _run(ours, x, prev, train)
    _assert_same_run(got, _run(theirs, x, prev, train), F64)


def test_ocr_head_matches_mmseg_resize_concat_syncbn_no_dropout():
    """HRNet-style OCRHead: features of several sizes resized and concatenated, dropout_ratio=-1, SyncBN layers."""
    in_channels, classes = [4, 6, 8], 5
    kwargs = dict(ocr_channels=6, in_channels=in_channels, in_index=(0, 1, 2), input_transform="resize_concat",
                  channels=10, num_classes=classes, dropout_ratio=-1)
    theirs = decode_heads.OCRHead(**kwargs, norm_cfg=dict(type="BN", requires_grad=True))
    _randomise(theirs)
    theirs.double().eval()
    # mmseg: dropout_ratio <= 0 means no dropout; fastctx heads take 0 (see the report on check_dropout)
    ours = OCRHead(**{**kwargs, "dropout_ratio": 0}, norm_cfg=dict(type="SyncBN", requires_grad=True),
                   fused=False).double().eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, c, 9 // s + 1, 13 // s + 1, dtype=F64, generator=g) for c, s in zip(in_channels, (1, 2, 3))]
    prev = torch.randn(2, classes, 10, 14, dtype=F64, generator=g)
    assert ours.dropout is None
    assert_close(ours(feats, prev), theirs(feats, prev), F64, "logits")


def test_spatial_gather_and_object_attention_match_mmseg():
    """The two OCR blocks on their own, with a non-unit gather scale (mmseg's softmax temperature)."""
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 7, 5, dtype=F64, generator=g)
    probs = torch.randn(2, 19, 7, 5, dtype=F64, generator=g)
    theirs = decode_heads.ocr_head.SpatialGatherModule(2.5)
    for fused in (False, True):
        with fastctx.use_backend("cpu"):
            assert_close(SpatialGatherModule(2.5, fused=fused)(feats, probs), theirs(feats, probs), F64,
                         f"gather, fused={fused}")
    block = decode_heads.ocr_head.ObjectAttentionBlock(8, 6, 1, None, dict(type="BN"), dict(type="ReLU"))
    _randomise(block)
    block.double().eval()
    centres = theirs(feats, probs)
    for fused in (False, True):
        ours = ObjectAttentionBlock(8, 6, 1, None, dict(type="BN"), dict(type="ReLU"), fused=fused).double().eval()
        ours.load_state_dict(block.state_dict(), strict=True)
        with fastctx.use_backend("cpu"):
            assert_close(ours(feats, centres), block(feats, centres), F64, f"attention, fused={fused}")


def test_ocr_head_without_norm_matches_mmseg():
    """mmseg's default norm_cfg=None: ConvModules with bias and no norm (the fused fold keeps out_project's bias)."""
    theirs = decode_heads.OCRHead(ocr_channels=4, in_channels=6, channels=8, num_classes=7, norm_cfg=None)
    _randomise(theirs)
    theirs.double()
    ours = OCRHead(4, in_channels=6, channels=8, num_classes=7, norm_cfg=None, fused=True).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.object_context_block.out_project.conv.bias is not None
    x, prev = _inputs(2, 6, 7, (5, 6))
    with fastctx.use_backend("cpu"):
        got = _run(ours, x, prev, train=True)
    _assert_same_run(got, _run(theirs, x, prev, train=True), F64)


# mmseg's gather softmaxes over prev_output's channels, whatever their number K: only conv_seg has num_classes.
@pytest.mark.parametrize("fused,backend", [(False, "cpu")] + [(True, b) for b in BACKENDS])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("prev_classes", [1, 4, 20])
def test_ocr_head_matches_mmseg_when_prev_output_has_another_class_count(fused, backend, train, prev_classes):
    require_backend(backend, dtype=F64)
    num_classes = 3
    torch.manual_seed(0)
    theirs = _mmseg_head(7, 8, 5, num_classes)
    ours = OCRHead(5, in_channels=7, channels=8, num_classes=num_classes, dropout_ratio=0.1,
                   norm_cfg=dict(type="BN", requires_grad=True), fused=fused).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, prev = _inputs(2, 7, prev_classes, (6, 9))  # batch 2: K = 1 in training needs two centres per channel
    with fastctx.use_backend(backend):
        got = _run(ours, x, prev, train)
    want = _run(theirs, x, prev, train)
    assert got[0].shape == want[0].shape == (2, num_classes, 6, 9)
    assert got[2].shape == prev.shape
    if prev_classes > 1:  # K = 1: the class softmax is identically 1, the previous logits get no gradient
        assert want[2].abs().max() > 0
    _assert_same_run(got, want, F64, f"K={prev_classes}: ")


# mmseg's `scale` is a float as well as an int: the gather's softmax temperature (no pooling for scale <= 1).
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("scale,prev_classes", [(1.0, 5), (0.5, 5), (0.25, 6), (1, 9)])
def test_ocr_head_with_a_float_scale_matches_mmseg(fused, train, scale, prev_classes):
    torch.manual_seed(0)
    theirs = decode_heads.OCRHead(4, scale, in_channels=6, channels=8, num_classes=5, dropout_ratio=0.1,
                                  norm_cfg=dict(type="BN", requires_grad=True))
    _randomise(theirs)
    theirs.double()
    ours = OCRHead(4, scale, in_channels=6, channels=8, num_classes=5, dropout_ratio=0.1,
                   norm_cfg=dict(type="BN", requires_grad=True), fused=fused).double()
    assert ours.object_context_block.query_downsample is None is theirs.object_context_block.query_downsample
    assert ours.scale == ours.spatial_gather_module.scale == scale
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x, prev = _inputs(2, 6, prev_classes, (7, 5))
    with fastctx.use_backend("cpu"):
        got = _run(ours, x, prev, train)
    _assert_same_run(got, _run(theirs, x, prev, train), F64, f"scale={scale}: ")


def test_the_scale_changes_the_output():
    """The temperature is used (a test of scale parity that would pass if scale were ignored proves nothing)."""
    torch.manual_seed(0)
    head = OCRHead(4, 1.0, in_channels=6, channels=8, num_classes=5, fused=True).double().eval()
    _randomise(head)
    x, prev = _inputs(1, 6, 5, (7, 5))
    with fastctx.use_backend("cpu"), torch.no_grad():
        one = head([x], prev)
        head.spatial_gather_module.scale = 0.5
        half = head([x], prev)
    assert (one - half).abs().max() > 1e-3


@pytest.mark.parametrize("scale", [2, 2.0, 1.5])
def test_scale_above_one_builds_mmseg_modules_and_refuses_the_forward(scale):
    """mmseg builds MaxPool2d(kernel_size=scale) for scale > 1 but its forward fails (a shape error for an int, a
    max_pool2d TypeError for a float): fastctx builds the same modules and state_dict and says why it stops."""
    theirs = decode_heads.OCRHead(4, scale, in_channels=6, channels=8, num_classes=5)
    ours = OCRHead(4, scale, in_channels=6, channels=8, num_classes=5, norm_cfg=None)
    assert repr(ours.object_context_block.query_downsample) == repr(theirs.object_context_block.query_downsample)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, prev = (t.float() for t in _inputs(2, 6, 5, (8, 8)))
    with pytest.raises((RuntimeError, TypeError)):
        theirs([x], prev)
    with pytest.raises(NotImplementedError, match=rf"scale={scale}: mmseg's forward fails for scale > 1.*use a "
                                                  r"scale <= 1"):
        ours([x], prev)
    block = ObjectAttentionBlock(8, 4, scale)
    assert block.query_downsample.kernel_size == scale
    with pytest.raises(NotImplementedError, match="scale > 1"):
        block(torch.randn(1, 8, 4, 4), torch.randn(1, 8, 3, 1))


# ------------------------------------------------------------------------------------------- fused vs eager

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch,in_ch,ch,ocr,classes,hw,scale", [
    (2, 6, 8, 4, 1, (5, 7), 1),
    (1, 6, 8, 5, 19, (9, 9), 1),
    (2, 5, 7, 3, 150, (3, 5), 1),
    (1, 6, 4, 3, 171, (6, 3), 1),
])
def test_fused_ocr_head_matches_eager(backend, train, batch, in_ch, ch, ocr, classes, hw, scale):
    require_backend(backend, dtype=F64)
    torch.manual_seed(0)
    eager = OCRHead(ocr, scale, in_channels=in_ch, channels=ch, num_classes=classes, fused=False).double()
    _randomise(eager)
    fused = OCRHead(ocr, scale, in_channels=in_ch, channels=ch, num_classes=classes, fused=True).double()
    fused.load_state_dict(eager.state_dict(), strict=True)
    x, prev = _inputs(batch, in_ch, classes, hw)
    with fastctx.use_backend(backend):
        got = _run(fused, x, prev, train)
    _assert_same_run(got, _run(eager, x, prev, train), F64, f"{backend}: ")


@pytest.mark.parametrize("scale", [1, 0.5, 3.0])
def test_fused_spatial_gather_matches_eager_with_scale(scale):
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 6, 7, dtype=F64, generator=g, requires_grad=True)
    probs = torch.randn(2, 4, 6, 7, dtype=F64, generator=g, requires_grad=True)
    with fastctx.use_backend("cpu"):
        got = SpatialGatherModule(scale, fused=True)(feats, probs)
        got_grads = torch.autograd.grad(got.pow(2).sum(), (feats, probs))
    want = SpatialGatherModule(scale, fused=False)(feats, probs)
    want_grads = torch.autograd.grad(want.pow(2).sum(), (feats, probs))
    assert got.shape == (2, 5, 4, 1)
    assert_close(got, want, F64, "centres")
    for a, b, name in zip(got_grads, want_grads, ("feats", "probs")):
        assert_close(a, b, F64, f"grad of {name}")


def test_fused_ocr_head_gradcheck():
    """float64 gradcheck of the fused head (eval: fixed BatchNorm statistics, no dropout) on a tiny shape."""
    torch.manual_seed(0)
    head = OCRHead(3, in_channels=4, channels=5, num_classes=3, dropout_ratio=0, fused=True).double().eval()
    _randomise(head)
    x, prev = _inputs(2, 4, 3, (3, 4))
    x.requires_grad_()
    prev.requires_grad_()
    with fastctx.use_backend("cpu"):
        assert torch.autograd.gradcheck(lambda a, b: head([a], b), (x, prev))


def test_fused_ocr_head_realistic_shape():
    """OCRNet's channels (in 512 here, 2048 in the model), Cityscapes' 19 classes, training: fused vs eager.

    float64: in float32 the two summation orders flip a few ReLUs of near-zero activations, whose gradients then
    differ by whole values, so an element-wise float32 comparison of the gradients is not meaningful.
    """
    torch.manual_seed(0)
    eager = OCRHead(256, in_channels=512, channels=512, num_classes=19, fused=False).double()
    _randomise(eager)
    fused = OCRHead(256, in_channels=512, channels=512, num_classes=19, fused=True).double()
    fused.load_state_dict(eager.state_dict())
    x, prev = _inputs(2, 512, 19, (16, 24))
    with fastctx.use_backend("cpu"):
        got = _run(fused, x, prev, train=True)
    _assert_same_run(got, _run(eager, x, prev, train=True), F64)


def test_fused_ocr_head_compiles_fullgraph():
    """torch.compile(fullgraph=True) of the fused head in training, backward through the compiled graph."""
    torch.manual_seed(0)
    head = OCRHead(4, in_channels=6, channels=8, num_classes=5, dropout_ratio=0, fused=True)
    _randomise(head)
    x, prev = (t.float() for t in _inputs(2, 6, 5, (7, 9)))
    state = {k: v.clone() for k, v in head.state_dict().items()}

    def step(module):
        head.zero_grad(set_to_none=True)
        a, b = x.clone().requires_grad_(), prev.clone().requires_grad_()
        out = module([a], b)
        out.square().sum().backward()
        return [out.detach(), a.grad, b.grad] + [p.grad for p in head.parameters()]

    torch._dynamo.reset()
    with fastctx.use_backend("cpu"):
        got = step(torch.compile(head, fullgraph=True, backend="aot_eager"))
        head.load_state_dict(state)  # undo the compiled step's BatchNorm running-stat update
        want = step(head)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float32)


def test_fused_flag_propagates():
    head = OCRHead(4, in_channels=6, channels=8, num_classes=5, fused=True)
    assert head.fused and head.spatial_gather_module.fused and head.object_context_block.fused
    head.fused = False
    assert not head.fused and not head.spatial_gather_module.fused and not head.object_context_block.fused


# ------------------------------------------------------------------------------------------- conversion

@pytest.mark.parametrize("train", [True, False])
def test_convert_ocr_head_shares_parameters_and_matches(train):
    theirs = _mmseg_head(8, 6, 4, 19)
    theirs.train(train)
    ours = convert_ocr(theirs, fused=True)
    assert isinstance(ours, OCRHead) and ours.fused and ours.training == train
    assert all(a is b for a, b in zip(ours.state_dict(keep_vars=True).values(),
                                      theirs.state_dict(keep_vars=True).values()))
    x, prev = _inputs(2, 8, 19, (5, 7))
    reference = _mmseg_head(8, 6, 4, 19)
    reference.load_state_dict(theirs.state_dict())
    with fastctx.use_backend("cpu"):
        got = _run(ours, x, prev, train)
    _assert_same_run(got, _run(reference, x, prev, train), F64)


def test_convert_ocr_children_inside_mmseg_head():
    """An mmseg OCRHead keeps its class (loss, predict) and runs fastctx's fused blocks once its children are."""
    theirs = _mmseg_head(8, 6, 4, 7).eval()
    reference = _mmseg_head(8, 6, 4, 7).eval()
    reference.load_state_dict(theirs.state_dict())
    theirs.spatial_gather_module = convert_ocr(theirs.spatial_gather_module)
    theirs.object_context_block = convert_ocr(theirs.object_context_block)
    assert isinstance(theirs.spatial_gather_module, SpatialGatherModule)
    assert isinstance(theirs.object_context_block, ObjectAttentionBlock)
    x, prev = _inputs(2, 8, 7, (6, 5))
    with fastctx.use_backend("cpu"), torch.no_grad():
        assert_close(theirs([x], prev), reference([x], prev), F64, "logits")


def test_fastctx_convert_swaps_the_children_of_an_mmseg_ocr_head():
    """fastctx.convert finds an mmseg OCRHead's gather and attention modules by class name and swaps them,
    keeping the head (its loss and predict) and every tensor; a GroupNorm head is skipped with the reason."""
    theirs = _mmseg_head(8, 6, 4, 7).eval()
    reference = _mmseg_head(8, 6, 4, 7).eval()
    reference.load_state_dict(theirs.state_dict())
    params = dict(theirs.named_parameters())
    converted, report = fastctx.convert(theirs, return_report=True)
    assert converted is theirs and type(theirs) is decode_heads.OCRHead
    assert {r.name for r in report.replaced} == {"spatial_gather_module", "object_context_block"}
    assert isinstance(theirs.object_context_block, ObjectAttentionBlock)
    assert dict(theirs.named_parameters()) == params
    x, prev = _inputs(2, 8, 7, (6, 5))
    with fastctx.use_backend("cpu"), torch.no_grad():
        assert_close(theirs([x], prev), reference([x], prev), F64, "logits")
    gn = decode_heads.OCRHead(ocr_channels=4, in_channels=6, channels=8, num_classes=3,
                              norm_cfg=dict(type="GN", num_groups=2))
    _, report = fastctx.convert(gn, return_report=True)
    assert [s.name for s in report.skipped] == ["object_context_block"] and "GroupNorm" in report.skipped[0].reason


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_convert_keeps_a_float_scale(scale):
    """fastctx.convert (the children) and convert_ocr (the whole head) carry mmseg's float scale over."""
    torch.manual_seed(0)
    theirs = decode_heads.OCRHead(4, scale, in_channels=6, channels=8, num_classes=5, dropout_ratio=0,
                                  norm_cfg=dict(type="BN"))
    _randomise(theirs)
    theirs.double().eval()
    reference = copy.deepcopy(theirs)
    x, prev = _inputs(2, 6, 3, (5, 7))  # and 3 previous classes for 5 outputs
    whole = convert_ocr(copy.deepcopy(theirs), fused=True)
    assert isinstance(whole, OCRHead) and whole.scale == whole.spatial_gather_module.scale == scale
    converted, report = fastctx.convert(theirs, return_report=True)
    assert {r.name for r in report.replaced} == {"spatial_gather_module", "object_context_block"}
    assert not report.skipped
    assert converted.spatial_gather_module.scale == scale
    with fastctx.use_backend("cpu"), torch.no_grad():
        want = reference([x], prev)
        assert_close(converted([x], prev), want, F64, "children converted")
        assert_close(whole([x], prev), want, F64, "whole head converted")


def test_convert_skips_a_gather_scale_fastctx_refuses():
    """mmseg runs scale=0 (a uniform average); fastctx's modules take positive scales only, so fastctx.convert
    leaves that gather to mmseg with the reason (the attention block, which does not use the scale, converts)."""
    theirs = decode_heads.OCRHead(4, 0, in_channels=6, channels=8, num_classes=5)
    _, report = fastctx.convert(theirs, return_report=True)
    assert [r.name for r in report.replaced] == ["object_context_block"]
    assert [s.name for s in report.skipped] == ["spatial_gather_module"]
    assert "scale must be a positive finite number" in report.skipped[0].reason


def test_convert_ocr_refuses_what_it_cannot_compute():
    from fastctx.convert import _NotConvertible

    gn = decode_heads.OCRHead(ocr_channels=4, in_channels=6, channels=8, num_classes=3,
                              norm_cfg=dict(type="GN", num_groups=2))
    with pytest.raises(_NotConvertible, match="GroupNorm"):
        convert_ocr(gn)
    head = _mmseg_head(6, 8, 4, 3)
    head.object_context_block.query_project[1].activate = torch.nn.GELU()
    with pytest.raises(_NotConvertible, match="mix"):
        convert_ocr(head.object_context_block)
    with pytest.raises(_NotConvertible, match="not an mmseg"):
        convert_ocr(torch.nn.Conv2d(3, 3, 1))


# ------------------------------------------------------------------------------------------- errors

def test_bad_inputs_raise_clear_errors():
    head = OCRHead(4, in_channels=6, channels=8, num_classes=5, fused=False)
    x, prev = (t.float() for t in _inputs(2, 6, 5, (7, 9)))
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        head([x[:, :5]], prev)
    assert head.eval()([x], prev[:, :4]).shape == (2, 5, 7, 9)  # any class count in prev_output, as mmseg
    head.train()
    with pytest.raises(ValueError, match=r"OCRHead expects class scores of shape \[B, K, H, W\], got \(2, 7, 9\)"):
        head([x], prev[:, 0])
    with pytest.raises(ValueError, match=r"need at least one class"):
        head([x], prev[:, :0])
    with pytest.raises(ValueError, match="spatial size"):
        head([x], prev[:, :, :6])
    with pytest.raises(ValueError, match="batch size"):
        head([x], prev[:1])
    with pytest.raises(TypeError, match="floating-point"):
        head([x], prev.long())
    with pytest.raises(TypeError, match="parameters are torch.float32"):
        head([x.double()], prev.double())
    with pytest.raises(ValueError, match="in_index"):
        OCRHead(4, in_channels=6, channels=8, num_classes=5, in_index=3)([x], prev)
    gather = SpatialGatherModule(1)
    with pytest.raises(ValueError, match="spatial size"):
        gather(x, prev[:, :, :, :8])
    block = ObjectAttentionBlock(6, 4)
    with pytest.raises(ValueError, match=r"class centres of shape \[B, 6, H, W\]"):
        block(x, torch.randn(2, 5, 5, 1))


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="ocr_channels must be a positive int"):
        OCRHead(0, in_channels=6, channels=8, num_classes=5)
    with pytest.raises(ValueError, match="input_transform must be None or 'resize_concat'"):
        OCRHead(4, in_channels=[6], in_index=[0], channels=8, num_classes=5, input_transform="multiple_select")
    with pytest.raises(TypeError, match="in_channels and in_index must be ints"):
        OCRHead(4, in_channels=[6, 2], channels=8, num_classes=5)
    with pytest.raises(ValueError, match="conv_cfg"):
        OCRHead(4, in_channels=6, channels=8, num_classes=5, conv_cfg=dict(type="DCN"))
    head = OCRHead(4, 2, in_channels=6, channels=8, num_classes=5)  # mmseg builds it too
    x, prev = (t.float() for t in _inputs(2, 6, 5, (8, 8)))
    with pytest.raises(NotImplementedError, match="scale > 1"):
        head([x], prev)


BAD_SCALES = [(0, ValueError, "got 0$"), (-0.5, ValueError, "got -0.5$"), (math.nan, ValueError, "got nan$"),
              (math.inf, ValueError, "got inf$"), ("1", TypeError, r"got '1' \(str\)"),
              (None, TypeError, r"got None \(NoneType\)"), (True, TypeError, r"got True \(bool\)"),
              (torch.tensor(0.5), TypeError, r"\(Tensor\)")]


@pytest.mark.parametrize("scale,error,tail", BAD_SCALES, ids=[repr(s) for s, _, _ in BAD_SCALES])
def test_bad_scales_raise_clear_errors(scale, error, tail):
    expected = r"scale must be a positive finite number \(the gather's softmax temperature, e\.g\. 1 or 0\.5"
    for who, build in (("OCRHead", lambda: OCRHead(4, scale, in_channels=6, channels=8, num_classes=5)),
                       ("ObjectAttentionBlock", lambda: ObjectAttentionBlock(8, 4, scale)),
                       ("SpatialGatherModule", lambda: SpatialGatherModule(scale))):
        with pytest.raises(error, match=rf"^{who}: {expected}.*{tail}"):
            build()
