"""OCRNet (CascadeEncoderDecoder) vs mmseg's own, ACFNet's segmentor and losses, presets, configs, training."""
import json
import logging
from pathlib import Path

import pytest
import torch

import fastctx
from fastctx.cli import main
from fastctx.engine import load_config
from fastctx.models import CascadeEncoderDecoder, CoarseToFineEncoderDecoder, build_model, get_preset
from fastctx.models.losses import seg_cross_entropy
from fastctx.nn import ACFHead, FCNHead, OCRHead
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import assert_close

assert import_decode_heads() is not None, "mmsegmentation must be importable (tests/mmseg_compat.py)"
import mmseg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402
from mmseg.utils import register_all_modules  # noqa: E402

register_all_modules()
logging.getLogger("mmengine").setLevel(logging.WARNING)
pytestmark = [
    pytest.mark.filterwarnings("ignore:``build_loss`` would be deprecated:UserWarning"),
    pytest.mark.filterwarnings("ignore:Default ``avg_non_ignore`` is False:UserWarning"),
]

F64 = torch.float64
CONFIGS = Path(mmseg.__file__).parent / ".mim" / "configs"


def mmseg_ocrnet_config(depth: int, num_classes: int) -> dict:
    """mmseg's OCRNet model config (configs/_base_/models/ocrnet_r50-d8.py) with BN; r18 heads shrunk by 4."""
    cfg = Config.fromfile(CONFIGS / "_base_" / "models" / "ocrnet_r50-d8.py").model.to_dict()
    norm = dict(type="BN", requires_grad=True)
    cfg["pretrained"] = None
    cfg["backbone"].update(depth=depth, norm_cfg=norm)
    for stage in cfg["decode_head"]:
        stage.update(num_classes=num_classes, norm_cfg=norm)
    if depth == 18:
        cfg["decode_head"][0].update(in_channels=256, channels=64)
        cfg["decode_head"][1].update(in_channels=512, channels=128, ocr_channels=64)
    return cfg


def _samples(label):
    return [SegDataSample(gt_sem_seg=PixelData(data=lbl[None])) for lbl in label]


# ----------------------------------------------------------------------------------------------------- OCRNet

@pytest.mark.parametrize("fused", [False, True])
def test_ocrnet_matches_mmseg_cascade_encoder_decoder(fused):
    """mmseg's OCRNet from its config -> strict state_dict both ways -> same logits, losses, gradients, BN stats."""
    classes = 19
    torch.manual_seed(0)
    theirs = MODELS.build(mmseg_ocrnet_config(18, classes)).double()
    _randomise(theirs)
    ours = build_model("ocrnet_r18-d8", classes, fused=fused).double()
    assert isinstance(ours, CascadeEncoderDecoder) and ours.fused == fused
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 33, 41, dtype=F64, generator=g)
    label = torch.randint(0, classes, (2, 33, 41), generator=g)
    label[1, :, :7] = 255

    ours.eval()
    theirs.eval()
    with fastctx.use_backend("cpu"), torch.no_grad():
        logits = ours(img)
        want = theirs.encode_decode(img, [dict(img_shape=img.shape[2:])] * 2)
    assert logits.shape == (2, classes, 33, 41)
    assert_close(logits, want, F64, "eval logits")

    # train: mmseg runs decode_head.0 twice (its loss, then the OCR stage's input): same dropout masks in the
    # same order, the same two running-stat updates, the gradients of both uses
    ours.train()
    theirs.train()
    with fastctx.use_backend("cpu"):
        torch.manual_seed(2)
        losses = ours.loss(img, label)
        sum(losses.values()).backward()
    torch.manual_seed(2)
    their_losses = {k: v for k, v in theirs.loss(img, _samples(label)).items() if "loss" in k}
    sum(their_losses.values()).backward()
    assert set(losses) == set(their_losses) == {"decode_0.loss_ce", "decode_1.loss_ce"}
    for key, value in their_losses.items():
        assert_close(losses[key], value, F64, key)
    their_params = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad, their_params[name].grad, F64, f"grad of {name}")
    their_buffers = dict(theirs.named_buffers())
    for name, b in ours.named_buffers():
        assert_close(b.double(), their_buffers[name].double(), F64, f"buffer {name}")
    assert int(ours.decode_head[0].convs[0].bn.num_batches_tracked) == 2  # the second forward of stage 0


@pytest.mark.parametrize("name", ["ocrnet_r50-d8", "ocrnet_r101-d8"])
def test_large_ocrnet_presets_have_mmseg_state_dict(name):
    """The keys and shapes of mmseg's OCRNet, strict load both ways (meta device: no compute)."""
    depth = int(name.split("_r")[1].split("-")[0])
    with torch.device("meta"):
        theirs = MODELS.build(mmseg_ocrnet_config(depth, 19))
        ours = build_model(name, 19)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert got == want
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_ocrnet_preset_follows_mmseg_config():
    theirs = Config.fromfile(CONFIGS / "_base_" / "models" / "ocrnet_r50-d8.py").model
    ours = get_preset("ocrnet_r50-d8")
    assert theirs.type == ours["segmentor"] == "CascadeEncoderDecoder" and theirs.num_stages == 2
    assert "auxiliary_head" not in theirs and ours["auxiliary_head"] is None
    for key, value in ours["backbone"].items():
        assert theirs.backbone[key] == value, key
    for stage, their_stage in zip(ours["decode_head"], theirs.decode_head, strict=True):
        for key, value in stage.items():
            assert their_stage[key] == value, key
        assert their_stage.align_corners == ours["align_corners"]
        assert their_stage.loss_decode.type == "CrossEntropyLoss" and not their_stage.loss_decode.use_sigmoid
    assert tuple(s.loss_decode.loss_weight for s in theirs.decode_head) == ours["decode_loss_weight"] == (0.4, 1.0)
    assert get_preset("ocrnet_r101-d8") == {**ours, "backbone": {**ours["backbone"], "depth": 101}}


def test_cascade_overrides_and_errors():
    model = build_model("ocrnet_r18-d8", 5, decode_head=[None, dict(ocr_channels=16)], decode_loss_weight=(0.2, 1.5))
    assert model.decode_head[1].ocr_channels == 16 and model.decode_loss_weights == (0.2, 1.5)
    with pytest.raises(TypeError, match="one dict \\(or None\\) per stage"):
        build_model("ocrnet_r18-d8", 5, decode_head=dict(ocr_channels=16))
    with pytest.raises(TypeError, match="one dict \\(or None\\) per stage"):
        build_model("ocrnet_r18-d8", 5, decode_head=[dict(ocr_channels=16)])
    with pytest.raises(ValueError, match="unknown segmentor option"):
        build_model("ocrnet_r18-d8", 5, se_loss_weight=0.2)
    with pytest.raises(ValueError, match="one weight >= 0 \\(or None\\) per stage"):
        build_model("ocrnet_r18-d8", 5, decode_loss_weight=(1.0,))
    backbone = build_model("fcn_r18-d8", 5).backbone
    fcn = FCNHead(256, 64, 5, num_convs=1, concat_input=False)
    with pytest.raises(ValueError, match="at least two decode stages"):
        CascadeEncoderDecoder(backbone, [fcn])
    with pytest.raises(TypeError, match="list of stages"):
        CascadeEncoderDecoder(backbone, fcn)
    with pytest.raises(ValueError, match="decode_head.0 predicts 5 classes, the segmentor 6"):
        CascadeEncoderDecoder(backbone, [fcn, OCRHead(8, in_channels=512, channels=16, num_classes=6)])


def test_cascade_stage_loss_weights_default_to_the_heads_loss_decode():
    backbone = build_model("fcn_r18-d8", 5).backbone
    fcn = FCNHead(256, 64, 5, num_convs=1, concat_input=False,
                  loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=0.4))
    ocr = OCRHead(8, in_channels=512, channels=16, num_classes=5)
    assert CascadeEncoderDecoder(backbone, [fcn, ocr]).decode_loss_weights == (0.4, 1.0)


# ----------------------------------------------------------------------------------------------------- ACFNet

def test_acfnet_losses_are_the_weighted_cross_entropies():
    """decode.loss_ce 1.0, decode.loss_coarse 0.4 (the ACFHead's coarse logits), aux.loss_ce 0.4, as documented."""
    torch.manual_seed(0)
    model = build_model("acfnet_r18-d8", 6, fused=False).double()
    assert isinstance(model, CoarseToFineEncoderDecoder) and isinstance(model.decode_head, ACFHead)
    assert model.decode_head.mode == "paper" and model.decode_head.dilations == (1, 12, 24, 36)
    g = torch.Generator().manual_seed(1)
    img = torch.randn(2, 3, 35, 29, dtype=F64, generator=g)
    label = torch.randint(0, 6, (2, 35, 29), generator=g)
    label[0, :4] = 255
    torch.manual_seed(3)
    losses = model.loss(img, label)
    torch.manual_seed(3)
    feats = model.backbone(img)
    logits, coarse = model.decode_head(feats)
    aux = model.auxiliary_head(feats)
    want = {"decode.loss_ce": seg_cross_entropy(logits, label, 1.0),
            "decode.loss_coarse": seg_cross_entropy(coarse, label, 0.4),
            "aux.loss_ce": seg_cross_entropy(aux, label, 0.4)}
    assert losses.keys() == want.keys()
    for key, value in want.items():
        assert_close(losses[key], value, F64, key)
    model.eval()
    with torch.no_grad():
        assert model(img).shape == (2, 6, 35, 29)
    assert build_model("acfnet_r18-d8", 6, coarse_loss_weight=0.6).coarse_loss_weight == 0.6
    with pytest.raises(ValueError, match="unknown segmentor option"):
        build_model("apcnet_r18-d8", 6, coarse_loss_weight=0.6)


@pytest.mark.parametrize("depth,in_ch,ch", [(50, 2048, 512), (101, 2048, 512), (18, 512, 128)])
def test_acfnet_presets(depth, in_ch, ch):
    with torch.device("meta"):
        model = build_model(f"acfnet_r{depth}-d8", 19)
    head = model.decode_head
    assert (head.in_channels, head.channels, head.acf_channels, head.in_index) == (in_ch, ch, ch, 3)
    assert model.backbone.depth == depth and model.auxiliary_head.in_index == 2
    assert (model.decode_loss_weight, model.coarse_loss_weight, model.aux_loss_weight) == (1.0, 0.4, 0.4)
    keys = {k.split(".")[1] for k in model.state_dict() if k.startswith("decode_head.")}
    assert keys == {"image_pool", "aspp_modules", "bottleneck", "conv_seg", "conv_seg_coarse", "acf_module",
                    "acf_bottleneck"}


# ----------------------------------------------------------------------------------------------------- configs

def test_shipped_configs_follow_mmseg_ocrnet_recipes():
    for kind in ("ocrnet", "acfnet"):
        for depth in (50, 101):
            city = load_config(f"{kind}_r{depth}-d8_8xb2-80k_cityscapes-512x1024")
            ade = load_config(f"{kind}_r{depth}-d8_4xb4-160k_ade20k-512x512")
            assert city.model.name == ade.model.name == f"{kind}_r{depth}-d8"
            assert city.model.norm == ade.model.norm == "SyncBN" and city.model.fused
            assert (city.data.name, city.data.crop_size, city.data.scale) == ("cityscapes", (512, 1024), (2048, 1024))
            assert (ade.data.name, ade.data.crop_size, ade.data.scale) == ("ade20k", (512, 512), (2048, 512))
            # ocrnet_r101-d8_8xb2-80k_cityscapes: SGD lr 0.02 on 8 x 2 images, PolyLR eta_min 2e-4
            assert (city.train.iters, city.train.batch_size, city.optim.lr, city.schedule.eta_min) == \
                (80000, 16, 0.02, 2e-4)
            # ocrnet_hr18_4xb4-160k_ade20k: lr 0.01 on 4 x 4 images, schedule_160k
            assert (ade.train.iters, ade.train.batch_size, ade.optim.lr, ade.schedule.eta_min) == \
                (160000, 16, 0.01, 1e-4)
            assert ade.train.val_interval == ade.train.checkpoint_interval == 16000
            for c in (city, ade):
                assert (c.optim.momentum, c.optim.weight_decay, c.schedule.power) == (0.9, 0.0005, 0.9)
    mm = Config.fromfile(CONFIGS / "ocrnet" / "ocrnet_r101-d8_8xb2-80k_cityscapes-512x1024.py")
    assert (mm.optimizer.lr, mm.param_scheduler[0].eta_min, mm.train_dataloader.batch_size) == (0.02, 2e-4, 2)
    mm = Config.fromfile(CONFIGS / "ocrnet" / "ocrnet_hr18_4xb4-160k_ade20k-512x512.py")
    assert (mm.optimizer.lr, mm.param_scheduler[0].eta_min, mm.train_dataloader.batch_size) == (0.01, 1e-4, 4)


TINY = {  # ResNet18-D8 with 8 stem / base channels and heads to match: a seconds-long CPU run
    "ocrnet": "{backbone: {stem_channels: 8, base_channels: 8}, decode_head: [{in_channels: 32, channels: 8}, "
              "{in_channels: 64, channels: 16, ocr_channels: 8}]}",
    "acfnet": "{backbone: {stem_channels: 8, base_channels: 8}, decode_head: {in_channels: 64, channels: 16, "
              "acf_channels: 8, dilations: [1, 2, 3, 4]}, auxiliary_head: {in_channels: 32, channels: 8}}",
}


@pytest.mark.parametrize("kind", ["ocrnet", "acfnet"])
def test_fastctx_compare_trains_the_synthetic_config(kind, capsys, tmp_path):
    config = f"{kind}_r18-d8_synthetic"
    overrides = [f"model.kwargs={TINY[kind]}", "data.train_kwargs={num_images: 8, size: [32, 32]}",
                 "data.val_kwargs={num_images: 2, size: [32, 32]}", "train.iters=3", "train.batch_size=2",
                 "train.log_interval=1", "train.val_interval=3", "train.checkpoint_interval=3"]
    assert main(["compare", config, "--work-dir", str(tmp_path), "--set", *overrides]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert any(line.startswith(f"| {config}") for line in out.splitlines())
    run = json.loads((tmp_path / "compare.json").read_text())["runs"][0]
    assert run["config"] == config and run["iters"] == 3 and 0 <= run["mIoU"] <= 100
    records = [json.loads(line) for line in (tmp_path / config / "log.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("mode") == "train"]
    keys = {"decode_0.loss_ce", "decode_1.loss_ce"} if kind == "ocrnet" else \
        {"decode.loss_ce", "decode.loss_coarse", "aux.loss_ce"}
    assert len(train) == 3 and all(keys <= set(r) for r in train)
