"""FCNHead, EncoderDecoder, losses and presets vs mmsegmentation's own modules built from its config files."""
import copy
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import fastctx
from fastctx.models import (MODEL_NAMES, EncoderDecoder, ResNetV1c, build_model, get_preset, load_pretrained,
                            se_loss, seg_cross_entropy)
from fastctx.nn import APCHead, EncHead, FCNHead
from fastctx.nn.conv_module import make_norm
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import assert_close

decode_heads = import_decode_heads()
assert decode_heads is not None, "mmsegmentation must be importable (tests/mmseg_compat.py)"
import mmseg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.models.losses import CrossEntropyLoss  # noqa: E402
from mmseg.models.utils import resize as mm_resize  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

register_all_modules()
logging.getLogger("mmengine").setLevel(logging.WARNING)
# mmseg's own advisories when its heads and losses are built (not about the code under test)
pytestmark = [
    pytest.mark.filterwarnings("ignore:``build_loss`` would be deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:Default ``avg_non_ignore`` is False:UserWarning"),
]

F64 = torch.float64
CONFIGS = Path(mmseg.__file__).parent / ".mim" / "configs"
KINDS = ("apcnet", "encnet", "fcn")


def _bn_not_syncbn(cfg):
    """mmseg's configs train with SyncBN; the CPU references use BN (same parameters and maths on one process)."""
    if isinstance(cfg, dict):
        return {k: (dict(v, type="BN") if k == "norm_cfg" else _bn_not_syncbn(v)) for k, v in cfg.items()}
    return cfg


def mmseg_config(name: str, num_classes: int) -> dict:
    """mmseg's model config for a preset name, from configs/_base_/models/<kind>_r50-d8.py."""
    kind, depth = name.split("_r")[0], int(name.split("_r")[1].split("-")[0])
    cfg = _bn_not_syncbn(Config.fromfile(CONFIGS / "_base_" / "models" / f"{kind}_r50-d8.py").model.to_dict())
    cfg["pretrained"] = None  # no open-mmlab:// download
    cfg["backbone"]["depth"] = depth
    if depth == 18:  # mmseg's fcn_r18-d8 recipe (checked against its config file below), for all three models
        cfg["decode_head"].update(in_channels=[128, 256, 512] if kind == "encnet" else 512, channels=128)
        cfg["auxiliary_head"].update(in_channels=256, channels=64)
    for head in ("decode_head", "auxiliary_head"):
        cfg[head]["num_classes"] = num_classes
    return cfg


# ------------------------------------------------------------------------------------------------------- FCNHead

@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("num_convs,kernel_size,concat_input,dilation,in_ch,ch", [
    (2, 3, True, 1, 12, 8),    # FCN decode head
    (1, 3, False, 1, 10, 6),   # auxiliary head of APCNet / EncNet / FCN
    (2, 3, True, 2, 10, 6),    # dilated convs (conv_cat stays undilated)
    (0, 3, True, 1, 8, 8),     # no convs: identity
    (3, 1, False, 1, 9, 5),    # 1x1 convs
])
def test_fcn_head_matches_mmseg(train, num_convs, kernel_size, concat_input, dilation, in_ch, ch):
    torch.manual_seed(0)
    theirs = decode_heads.FCNHead(
        in_channels=in_ch, channels=ch, num_classes=7, num_convs=num_convs, kernel_size=kernel_size,
        concat_input=concat_input, dilation=dilation, dropout_ratio=0.1, in_index=-1,
        norm_cfg=dict(type="BN", requires_grad=True),
    ).double()
    _randomise(theirs)
    ours = FCNHead(in_ch, ch, 7, num_convs=num_convs, kernel_size=kernel_size, concat_input=concat_input,
                   dilation=dilation, dropout_ratio=0.1).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    feats = [torch.randn(2, 3, 5, 5, dtype=F64), torch.randn(2, in_ch, 9, 11, dtype=F64)]

    def run(module):
        module.train(train)
        x = feats[1].clone().requires_grad_(True)
        torch.manual_seed(1)  # same Dropout2d mask
        out = module([feats[0], x])
        (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)).sum().backward()
        return out, x.grad, {n: p.grad for n, p in module.named_parameters()}, dict(module.named_buffers())

    got, want = run(ours), run(theirs)
    assert got[0].shape == (2, 7, 9, 11)
    assert_close(got[0], want[0], F64, "logits")
    assert_close(got[1], want[1], F64, "grad of input")
    assert got[2].keys() == want[2].keys()
    for name, g in want[2].items():
        assert_close(got[2][name], g, F64, f"grad of {name}")
    for name, b in want[3].items():
        assert_close(got[3][name].double(), b.double(), F64, f"buffer {name}")


def test_fcn_head_init_and_errors():
    head = FCNHead(16, 8, 5)
    assert set(head.state_dict()) == {f"{m}.{p}" for m in ("convs.0", "convs.1", "conv_cat")
                                      for p in ("conv.weight", "bn.weight", "bn.bias", "bn.running_mean",
                                                "bn.running_var", "bn.num_batches_tracked")} | {
        "conv_seg.weight", "conv_seg.bias"}
    assert head.conv_seg.bias.abs().sum() == 0 and head.convs[0].bn.weight.eq(1).all()
    assert isinstance(FCNHead(8, 8, 3, num_convs=0).convs, nn.Identity)
    assert FCNHead(8, 4, 3, dropout_ratio=0).dropout is None
    assert FCNHead(8, 4, 3, dropout_ratio=-1).dropout is None  # mmseg's configs write -1 for none
    with pytest.raises(ValueError, match=r"in_channels \(8\) must equal channels \(4\)"):
        FCNHead(8, 4, 3, num_convs=0)
    with pytest.raises(ValueError, match="num_convs must be >= 0"):
        FCNHead(8, 4, 3, num_convs=-1)
    with pytest.raises(ValueError, match="dilation must be a positive int"):
        FCNHead(8, 4, 3, dilation=0)
    with pytest.raises(ValueError, match=r"\[B, 16, H, W\] \(in_index -1\), got \(2, 12, 5, 5\)"):
        head([torch.randn(2, 16, 5, 5), torch.randn(2, 12, 5, 5)])
    with pytest.raises(ValueError, match="in_index 2 is out of range for 2"):
        FCNHead(16, 8, 5, in_index=2)([torch.randn(2, 16, 5, 5)] * 2)
    assert head(torch.randn(2, 16, 5, 5)).shape == (2, 5, 5, 5)  # a single tensor is the feature itself


# -------------------------------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("align_corners", [False, True])
def test_seg_cross_entropy_matches_mmseg(align_corners):
    """mmseg's decode-head loss: resize logits to the label, CrossEntropyLoss (avg over all pixels), x weight."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, 9, dtype=F64, generator=g)
    label = torch.randint(0, 5, (2, 13, 17), generator=g)
    label[0, :4] = 255
    want = CrossEntropyLoss(loss_weight=0.4)(
        mm_resize(logits, size=label.shape[1:], mode="bilinear", align_corners=align_corners), label,
        ignore_index=255)
    got = seg_cross_entropy(logits, label, weight=0.4, align_corners=align_corners)
    assert_close(got, want, F64)


def test_seg_cross_entropy_averages_over_all_pixels():
    """Hand-derived: uniform logits cost log(C) per labelled pixel; ignored pixels add 0 but count.

    mmseg divides by (pixels + float32 eps), so 2 log 4 / (4 + eps), not the 0.5 log 4 of avg_non_ignore=True.
    """
    logits = torch.zeros(1, 4, 2, 2, dtype=F64)
    label = torch.tensor([[[0, 1], [255, 255]]])
    expected = 2 * math.log(4) / (4 + torch.finfo(torch.float32).eps)
    assert_close(seg_cross_entropy(logits, label), torch.tensor(expected, dtype=F64), F64)
    with pytest.raises(TypeError, match="integer class indices"):
        seg_cross_entropy(logits, label.float())


def test_se_loss_matches_mmseg():
    """EncNet's SE loss as mmseg's EncHead computes it (class presence of the label map, 255 excluded, weight 0.2)."""
    g = torch.Generator().manual_seed(0)
    se_logits = torch.randn(3, 6, generator=g)
    label = torch.randint(0, 4, (3, 9, 10), generator=g)
    label[0] = 255
    label[1, 0, 0] = 5
    criterion = CrossEntropyLoss(use_sigmoid=True, loss_weight=0.2)
    want = criterion(se_logits, decode_heads.EncHead._convert_to_onehot_labels(label[:, None], 6))
    assert_close(se_loss(se_logits, label), want, torch.float32)


# --------------------------------------------------------------------------------------------------- segmentors

def _samples(label):
    return [SegDataSample(gt_sem_seg=PixelData(data=lbl[None])) for lbl in label]


def _bce_in_logits_dtype(pred, label, *args, **kwargs):
    """mmseg's SE criterion (binary_cross_entropy: mean BCE-with-logits of [B, C] logits vs 0/1 targets), pred's dtype.

    mmseg casts the targets with `label.float()` and F.binary_cross_entropy_with_logits then computes in the
    targets' dtype: float32 even for float64 logits, which would make the float64 comparison a float32 one.
    test_se_loss_matches_mmseg checks mmseg's own criterion in float32.
    """
    return torch.nn.functional.binary_cross_entropy_with_logits(pred, label.to(pred.dtype))


@pytest.mark.parametrize("name,fused", [
    ("apcnet_r18-d8", True), ("apcnet_r18-d8", False), ("encnet_r18-d8", True), ("encnet_r18-d8", False),
    ("fcn_r18-d8", False),  # FCNHead has no fused kernels: fused=True would run the same code
])
def test_segmentor_matches_mmseg(name, fused):
    """mmseg's EncoderDecoder from its config -> strict state_dict load -> same logits, losses, gradients."""
    classes = 6
    torch.manual_seed(0)
    theirs = MODELS.build(mmseg_config(name, classes)).double()
    _randomise(theirs)
    ours = build_model(name, classes, fused=fused).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert ours.fused == (fused and not name.startswith("fcn"))
    if name.startswith("encnet"):
        theirs.decode_head.loss_se_decode.cls_criterion = _bce_in_logits_dtype
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 33, 41, dtype=F64, generator=g)
    label = torch.randint(0, classes - 1, (2, 33, 41), generator=g)  # class 5 absent: SE targets have zeros
    label[1, :, :7] = 255

    # eval: logits at the input size (mmseg's encode_decode = head.predict -> bilinear resize)
    ours.eval()
    theirs.eval()
    with fastctx.use_backend("cpu"), torch.no_grad():
        logits = ours(img)
        want = theirs.encode_decode(img, [dict(img_shape=img.shape[2:])] * 2)
    assert logits.shape == (2, classes, 33, 41)
    assert_close(logits, want, F64, "eval logits")

    # train: losses (same dropout masks: same seed, heads run in the same order), gradients, BN statistics
    ours.train()
    theirs.train()
    with fastctx.use_backend("cpu"):
        torch.manual_seed(2)
        losses = ours.loss(img, label)
        sum(losses.values()).backward()
    torch.manual_seed(2)
    their_losses = {k: v for k, v in theirs.loss(img, _samples(label)).items() if "loss" in k}
    sum(their_losses.values()).backward()
    expected_keys = {"decode.loss_ce", "aux.loss_ce"} | ({"decode.loss_se"} if name.startswith("encnet") else set())
    assert set(losses) == set(their_losses) == expected_keys
    for key, value in their_losses.items():
        assert_close(losses[key], value, F64, key)
    their_params = dict(theirs.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad is not None, pname
        assert_close(p.grad, their_params[pname].grad, F64, f"grad of {pname}")
    their_buffers = dict(theirs.named_buffers())
    for bname, b in ours.named_buffers():
        assert_close(b.double(), their_buffers[bname].double(), F64, f"buffer {bname}")

    # forward in train mode: decode head only, at the input size, no SE logits
    with fastctx.use_backend("cpu"):
        torch.manual_seed(3)
        train_logits = ours(img)
    torch.manual_seed(3)
    feats = theirs.extract_feat(img)
    out = theirs.decode_head(feats)
    want = mm_resize(out[0] if isinstance(out, tuple) else out, size=img.shape[2:], mode="bilinear",
                     align_corners=False)
    assert_close(train_logits, want, F64, "train-mode logits")


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if "r18" not in n and n.split("_r")[0] in KINDS])
def test_large_presets_have_mmseg_state_dict(name):
    """r50 / r101: the keys and shapes of mmseg's EncoderDecoder, strict load (built on the meta device: no compute).

    For the presets of mmseg's _base_/models/{apcnet,encnet,fcn}_r50-d8.py (other presets carry their own
    parity tests)."""
    with torch.device("meta"):
        theirs = MODELS.build(mmseg_config(name, 19))
        ours = build_model(name, 19)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert got == want
    ours.load_state_dict(theirs.state_dict(), strict=True)


@pytest.mark.parametrize("kind", KINDS)
def test_presets_follow_mmseg_configs(kind):
    """Every non-parameter setting of the r50 presets (dropout, in_index, dilations, loss weights...) as mmseg's."""
    theirs = Config.fromfile(CONFIGS / "_base_" / "models" / f"{kind}_r50-d8.py").model
    ours = get_preset(f"{kind}_r50-d8")
    assert theirs.backbone.type == "ResNetV1c" and theirs.backbone.style == "pytorch"
    assert theirs.backbone.num_stages == 4
    for key, value in ours["backbone"].items():
        assert theirs.backbone[key] == value, key
    for section in ("decode_head", "auxiliary_head"):
        for key, value in ours[section].items():
            want = theirs[section][key]
            assert (list(want) if isinstance(want, (list, tuple)) else want) == (
                list(value) if isinstance(value, (list, tuple)) else value), f"{section}.{key}"
        assert theirs[section].align_corners == ours["align_corners"]
        assert theirs[section].loss_decode.type == "CrossEntropyLoss"
        assert not theirs[section].loss_decode.use_sigmoid
        assert not theirs[section].loss_decode.get("avg_non_ignore", False)
    assert theirs.decode_head.loss_decode.loss_weight == ours["decode_loss_weight"]
    assert theirs.auxiliary_head.loss_decode.loss_weight == ours["aux_loss_weight"]
    if kind == "encnet":
        assert theirs.decode_head.loss_se_decode.loss_weight == ours["se_loss_weight"]
        assert theirs.decode_head.loss_se_decode.use_sigmoid
    assert ours["backbone"]["depth"] == theirs.backbone.depth == 50
    assert get_preset(f"{kind}_r101-d8") == {**ours, "backbone": {**ours["backbone"], "depth": 101}}


def test_r18_presets_follow_mmseg_fcn_r18_config():
    theirs = Config.fromfile(CONFIGS / "fcn" / "fcn_r18-d8_4xb2-80k_cityscapes-512x1024.py").model
    assert theirs.backbone.depth == 18
    for kind in KINDS:
        ours = get_preset(f"{kind}_r18-d8")
        assert ours["backbone"]["depth"] == 18
        assert ours["decode_head"]["channels"] == theirs.decode_head.channels == 128
        last = ours["decode_head"]["in_channels"]
        assert (last[-1] if kind == "encnet" else last) == theirs.decode_head.in_channels == 512
        assert ours["auxiliary_head"]["in_channels"] == theirs.auxiliary_head.in_channels == 256
        assert ours["auxiliary_head"]["channels"] == theirs.auxiliary_head.channels == 64
    assert get_preset("encnet_r18-d8")["decode_head"]["in_channels"] == [128, 256, 512]


# ------------------------------------------------------------------------------------------------------------ API

@pytest.mark.parametrize("name", ["apcnet_r18-d8", "encnet_r18-d8", "fcn_r18-d8"])
def test_forward_and_loss_api(name):
    model = build_model(name, 4)
    assert model.num_classes == 4 and isinstance(model.backbone, ResNetV1c)
    img = torch.randn(2, 3, 30, 35)
    label = torch.randint(0, 4, (2, 30, 35), dtype=torch.uint8)
    with fastctx.use_backend("cpu"):
        for train in (True, False):
            model.train(train)
            out = model(img)
            assert isinstance(out, torch.Tensor) and out.shape == (2, 4, 30, 35)
        model.train()
        feats = model.extract_feat(img)
        assert [f.shape[1] for f in feats] == [64, 128, 256, 512]
        losses = model.loss(img, label)
        assert list(losses) == ["decode.loss_ce"] + (["decode.loss_se"] if "encnet" in name else []) + ["aux.loss_ce"]
        sum(losses.values()).backward()
    assert model.backbone.stem[0].weight.grad is not None
    assert model.auxiliary_head.conv_seg.weight.grad is not None


def test_fused_switch():
    for name, head_cls in (("apcnet_r18-d8", APCHead), ("encnet_r18-d8", EncHead)):
        model = build_model(name, 3, fused=False)
        assert isinstance(model.decode_head, head_cls) and not model.fused and not model.decode_head.fused
        model.fused = True
        assert model.fused and model.decode_head.fused
        img = torch.randn(2, 3, 17, 19)
        model.eval()
        with fastctx.use_backend("cpu"):
            fused = model(img)
        model.fused = False
        assert_close(fused, model(img), torch.float32, f"{name} fused vs reference")
    fcn = build_model("fcn_r18-d8", 3, fused=True)
    assert not fcn.fused  # FCNHead has no fused kernels
    fcn.fused = True
    assert not fcn.fused


def test_input_errors():
    model = build_model("fcn_r18-d8", 3)
    img, label = torch.randn(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long)
    with pytest.raises(ValueError, match=r"img must be a batch of images \[B, 3, H, W\], got shape \(3, 16, 16\)"):
        model(img[0])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got shape \(2, 1, 16, 16\)"):
        model.loss(img[:, :1], label)
    with pytest.raises(TypeError, match="floating-point"):
        model(img.to(torch.uint8))
    with pytest.raises(TypeError, match="img must be a tensor"):
        model(img.numpy())
    with pytest.raises(ValueError, match=r"label must be a \[B, H, W\] map of class indices, got shape "
                                         r"\(2, 1, 16, 16\)"):
        model.loss(img, label[:, None])
    with pytest.raises(TypeError, match=r"integer class indices \(e.g. torch.int64\), got torch.float32"):
        model.loss(img, label.float())
    with pytest.raises(TypeError, match="got torch.bool"):
        model.loss(img, label.bool())
    with pytest.raises(ValueError, match="label batch size 1 does not match the images' batch size 2"):
        model.loss(img, label[:1])


def test_encoder_decoder_construction_errors():
    backbone = ResNetV1c(18)
    with pytest.raises(ValueError, match="decode_head predicts 5 classes, the segmentor 4"):
        EncoderDecoder(backbone, FCNHead(512, 16, 5), num_classes=4)
    with pytest.raises(ValueError, match="auxiliary_head predicts 3 classes, the segmentor 5"):
        EncoderDecoder(backbone, FCNHead(512, 16, 5), FCNHead(256, 8, 3, in_index=2))
    with pytest.raises(ValueError, match="auxiliary_head has align_corners=True"):
        EncoderDecoder(backbone, FCNHead(512, 16, 5), FCNHead(256, 8, 5, in_index=2, align_corners=True))
    model = EncoderDecoder(backbone, FCNHead(512, 16, 5))
    assert model.num_classes == 5 and model.auxiliary_head is None
    assert list(model.loss(torch.randn(2, 3, 16, 16), torch.zeros(2, 16, 16, dtype=torch.long))) == ["decode.loss_ce"]


def test_build_model_options_and_errors():
    with pytest.raises(ValueError, match=r"unknown model 'apcnet_r34-d8'; valid names: apcnet_r18-d8, .*fcn_r101-d8"):
        build_model("apcnet_r34-d8", 19)
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['pool_scales'\]; valid: backbone"):
        build_model("apcnet_r18-d8", 19, pool_scales=(1, 2))
    with pytest.raises(ValueError, match=r"unknown decode_head option\(s\) \['pool_scale'\] for APCHead; valid: "):
        build_model("apcnet_r18-d8", 19, decode_head=dict(pool_scale=(1, 2)))
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        build_model("fcn_r18-d8", 0)
    with pytest.raises(ValueError, match="decode_head cannot be None"):
        build_model("fcn_r18-d8", 3, decode_head=None)
    with pytest.raises(ValueError, match="norm must be"):
        build_model("fcn_r18-d8", 3, norm="GN")

    model = build_model("apcnet_r18-d8", 3, auxiliary_head=None, decode_head=dict(pool_scales=(1, 2), dropout_ratio=0),
                        backbone=dict(norm_eval=True), align_corners=True, aux_loss_weight=0.3)
    assert model.auxiliary_head is None and model.decode_head.pool_scales == (1, 2)
    assert model.decode_head.dropout is None and model.backbone.norm_eval
    assert model.align_corners and model.decode_head.align_corners
    model = build_model("fcn_r18-d8", 3, align_corners=True, aux_loss_weight=0.3)
    assert model.auxiliary_head.align_corners and model.aux_loss_weight == 0.3
    assert PRESET_UNCHANGED == get_preset("apcnet_r18-d8")  # overrides never leak into the presets

    sync = type(make_norm("SyncBN", 4))
    model = build_model("fcn_r18-d8", 3, norm="SyncBN")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is sync for m in norms)


PRESET_UNCHANGED = copy.deepcopy(get_preset("apcnet_r18-d8"))


# ---------------------------------------------------------------------------------------- pretrained segmentors

def test_load_segmentor_checkpoints(tmp_path):
    torch.manual_seed(0)
    theirs = MODELS.build(mmseg_config("encnet_r18-d8", 5))
    _randomise(theirs)
    want = theirs.state_dict()
    full = tmp_path / "encnet.pth"
    torch.save({"meta": {"mmseg_version": "1.2.2", "dataset_meta": {"classes": list("abcde")}},
                "state_dict": want}, full)

    # a released segmentor checkpoint: whole model, strictly
    model = build_model("encnet_r18-d8", 5, pretrained=full)
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0, msg=k)
    # the same file into a bare backbone: its backbone part
    backbone = ResNetV1c(18)
    load_pretrained(backbone, full)
    for k, v in backbone.state_dict().items():
        torch.testing.assert_close(v, want[f"backbone.{k}"], rtol=0, atol=0, msg=k)
    # an ImageNet backbone checkpoint into a segmentor: the backbone only, heads untouched
    imagenet = tmp_path / "resnet18_v1c.pth"
    torch.save({**backbone.state_dict(), "fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}, imagenet)
    model = build_model("apcnet_r18-d8", 5)
    head_before = copy.deepcopy(model.decode_head.state_dict())
    report = load_pretrained(model, imagenet)
    assert report.loaded and all(k.startswith("backbone.") for k in report.loaded + report.missing_keys)
    assert report.skipped_keys == ["fc.weight", "fc.bias"]
    for k, v in model.backbone.state_dict().items():
        torch.testing.assert_close(v, want[f"backbone.{k}"], rtol=0, atol=0, msg=k)
    for k, v in model.decode_head.state_dict().items():
        torch.testing.assert_close(v, head_before[k], rtol=0, atol=0, msg=k)

    # wrong num_classes / wrong model: the key and both shapes; missing heads: named
    with pytest.raises(ValueError, match=r"decode_head\.conv_seg\.weight has shape \(5, 128, 1, 1\) in the "
                                         r"checkpoint but \(19, 128, 1, 1\)"):
        build_model("encnet_r18-d8", 19, pretrained=full)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): decode_head\.convs\.0\.conv\.weight.*; "
                                         r"unexpected keys \(\d+\): decode_head\.bottleneck"):
        build_model("fcn_r18-d8", 5, pretrained=full)
