"""fastctx.mmseg: fastctx's modules used from mmsegmentation 1.2.2's registry, segmentors and mmengine's Runner.

The oracle is mmseg itself: the same config built with mmseg's own types, the
same weights, float64. mmcv-lite lacks mmcv's compiled ops, which mmseg's
model package imports (none of the modules used here needs them): they are
stood in by tests/mmseg_compat.py before mmseg is imported.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmseg_compat import import_decode_heads
from tolerances import TOLERANCES, assert_close

assert import_decode_heads() is not None, "mmsegmentation must be importable (tests/mmseg_compat.py)"

import mmseg  # noqa: E402
from mmengine.config import Config  # noqa: E402
from mmengine.hooks import Hook  # noqa: E402
from mmengine.registry import MODELS as ROOT_MODELS  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmengine.runner import Runner  # noqa: E402
from mmengine.structures import PixelData  # noqa: E402
from mmseg.models.decode_heads.decode_head import BaseDecodeHead  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

import fastctx.mmseg as plugin  # noqa: E402

F64 = torch.float64
ZOO = Path(mmseg.__file__).parent / ".mim" / "configs"
REPO = Path(__file__).resolve().parents[1]

init_default_scope("mmseg")


def _build(cfg: dict):
    return MODELS.build(cfg).double()


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter and BN statistic away from its initial constant, so a swapped weight would show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if t.is_floating_point():
                noise = torch.rand(t.shape, generator=gen, dtype=F64).to(t.dtype)
                t.copy_(0.5 + noise if name.endswith("running_var") else t + 0.2 * (noise - 0.5))


def _samples(labels: torch.Tensor) -> list:
    """mmseg data samples holding label maps [B, H, W] and the image metas predict needs."""
    out = []
    for label in labels:
        sample = SegDataSample(gt_sem_seg=PixelData(data=label[None]))
        shape = tuple(label.shape)
        sample.set_metainfo(dict(img_shape=shape, pad_shape=shape, ori_shape=shape))
        out.append(sample)
    return out


def _labels(batch: int, hw, classes: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (batch, *hw), generator=gen)
    labels[:, :2, :3] = 255  # some ignored pixels
    return labels


def _loss_and_grads(module, run):
    """The loss dict of `run(module)` (same dropout draws for every module), and every parameter's gradient."""
    module.zero_grad()
    torch.manual_seed(7)
    losses = run(module)
    sum(v for k, v in losses.items() if "loss" in k).backward()
    return losses, {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def _assert_same_losses(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert_close(got[key], want[key], F64, key)


def _assert_same_grads(got: dict, want: dict) -> None:
    """Each gradient against the step's largest one: some are zero in exact arithmetic (a bias followed by a
    train-mode BatchNorm), so their own maximum is rounding noise."""
    assert got.keys() == want.keys()
    tol = TOLERANCES[F64]
    largest = max(g.abs().max().item() for g in want.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tol["rtol"], atol=tol["atol"] * largest,
                                   msg=lambda m, key=key: f"grad of {key}\n{m}")


# ----------------------------------------------------------------------------- registry


def test_registered_under_fastctx_scope():
    expected = {
        "APCHead": "APCHead", "EncHead": "EncHead", "OCRHead": "OCRHead", "ACFHead": None,
        "SwinTransformer": "SwinTransformer", "EncoderDecoder": "EncoderDecoder",
        "CascadeEncoderDecoder": "CascadeEncoderDecoder",
    }
    for name, mmseg_name in expected.items():
        cls = getattr(plugin, name)
        assert MODELS.get(f"fastctx.{name}") is cls
        assert ROOT_MODELS.get(f"fastctx.{name}") is cls  # without mmseg's default scope too
        if mmseg_name is not None:
            assert MODELS.get(mmseg_name) is not cls  # mmseg's own name still means mmseg's class
            assert issubclass(cls, MODELS.get(mmseg_name))
    for name in ("APCHead", "EncHead", "OCRHead", "ACFHead"):
        assert issubclass(getattr(plugin, name), BaseDecodeHead)


IMPORT_ERRORS = """
import sys
sys.modules["mmseg"] = None                      # mmsegmentation not installed
try:
    import fastctx.mmseg
except ImportError as exc:
    print("without mmseg:", exc)
del sys.modules["mmseg"]
sys.modules["mmcv.ops"] = None                   # mmcv-lite: no compiled ops
try:
    import fastctx.mmseg
except ImportError as exc:
    print("without mmcv.ops:", exc)
"""


def test_import_errors_say_what_is_missing():
    out = subprocess.run([sys.executable, "-c", IMPORT_ERRORS], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert "without mmseg: fastctx.mmseg registers fastctx's modules into mmsegmentation's model registry: it " \
           "needs mmsegmentation 1.x with mmengine and mmcv installed" in out
    assert f"without mmcv.ops: fastctx.mmseg: mmsegmentation {mmseg.__version__} is installed but its models do " \
           "not import" in out
    assert "install the full mmcv" in out


def test_docs_example_runs():
    """docs/mmseg.md's runnable example, as written (mmcv.ops stood in, as everywhere in these tests)."""
    text = (REPO / "docs" / "mmseg.md").read_text()
    example = text.split("## A runnable example", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    exec(compile(example, "docs/mmseg.md", "exec"), {})


# ----------------------------------------------------------------------------- heads vs mmseg's


def _features(channels, hw, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, c, *hw, generator=gen, dtype=F64) for c in channels)


HEAD_CASES = {
    # mmseg's APCNet config (BN), with a pixel sampler
    "apc_bn_ohem": dict(
        type="APCHead", in_channels=24, in_index=3, channels=16, pool_scales=(1, 2, 3, 6), dropout_ratio=0.1,
        num_classes=5, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False,
        loss_decode=dict(type="CrossEntropyLoss", loss_weight=1.0),
        sampler=dict(type="OHEMPixelSampler", thresh=0.6, min_kept=40)),
    # two of mmseg's losses (mmseg's DiceLoss cannot take a sampler's weights, so no sampler here)
    "apc_ce_dice": dict(
        type="APCHead", in_channels=24, channels=16, num_classes=5, norm_cfg=dict(type="SyncBN"),
        loss_decode=[dict(type="CrossEntropyLoss", loss_weight=1.0), dict(type="DiceLoss", loss_weight=0.5)]),
    # mmseg's default norm_cfg=None: convs with bias, no norm
    "apc_default_norm": dict(type="APCHead", in_channels=24, channels=16, pool_scales=(1, 3), fusion=False,
                             num_classes=4),
    # mmseg's EncNet config
    "enc_se": dict(
        type="EncHead", in_channels=[8, 12, 24], in_index=(1, 2, 3), channels=16, num_codes=6, use_se_loss=True,
        add_lateral=True, dropout_ratio=0.1, num_classes=5, norm_cfg=dict(type="BN", requires_grad=True),
        loss_decode=dict(type="CrossEntropyLoss", use_sigmoid=False, loss_weight=1.0),
        loss_se_decode=dict(type="CrossEntropyLoss", use_sigmoid=True, loss_weight=0.2)),
}


@pytest.mark.parametrize("case", sorted(HEAD_CASES))
def test_head_is_mmsegs_head_with_the_same_weights(case):
    cfg = HEAD_CASES[case]
    theirs = _build(cfg)
    _randomise(theirs)
    ours = _build({**cfg, "type": f"fastctx.{cfg['type']}"})
    ours.load_state_dict(theirs.state_dict(), strict=True)  # mmseg's checkpoint keys
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    feats = _features((4, 8, 12, 24), (9, 11))
    samples = _samples(_labels(2, (18, 22), cfg["num_classes"]))

    losses_o, grads_o = _loss_and_grads(ours.train(), lambda m: m.loss(feats, samples, {}))
    losses_t, grads_t = _loss_and_grads(theirs.train(), lambda m: m.loss(feats, samples, {}))
    _assert_same_losses(losses_o, losses_t)
    _assert_same_grads(grads_o, grads_t)
    for name, buf in theirs.named_buffers():
        assert_close(dict(ours.named_buffers())[name], buf, F64, f"buffer {name}")

    metas = [s.metainfo for s in samples]
    assert_close(ours.eval().predict(feats, metas, {}), theirs.eval().predict(feats, metas, {}), F64, "predict")


@pytest.mark.parametrize("head,classifiers", [
    (dict(type="fastctx.APCHead", pool_scales=(1, 2)), ("conv_seg",)),
    (dict(type="fastctx.ACFHead", acf_channels=4, dilations=(1, 2)), ("conv_seg", "conv_seg_coarse")),
])
def test_init_weights_is_mmsegs(head, classifiers):
    """The Runner calls init_weights: the classifiers get mmseg's Normal(0, 0.01) init_cfg, the rest keeps its init."""
    head = MODELS.build(dict(**head, in_channels=8, channels=8, num_classes=3))
    before = {k: v.clone() for k, v in head.state_dict().items()}
    for name in classifiers:
        torch.nn.init.zeros_(getattr(head, name).weight)
    head.init_weights()
    for name in classifiers:
        assert 0 < getattr(head, name).weight.std() < 0.02, name
    for key, value in head.state_dict().items():
        if not key.startswith(classifiers):
            assert torch.equal(value, before[key]), key


def test_bad_head_config_says_what_is_expected():
    with pytest.raises(ValueError, match="input_transform must be None"):
        MODELS.build(dict(type="fastctx.APCHead", in_channels=8, channels=8, num_classes=3,
                          input_transform="resize_concat"))
    with pytest.raises(ValueError, match="binary form"):
        MODELS.build(dict(type="fastctx.OCRHead", ocr_channels=8, in_channels=8, channels=8, num_classes=2,
                          out_channels=1))


# ----------------------------------------------------------------------------- segmentors from zoo model configs


def _zoo_model(base: str, **overrides):
    """The `model` of one of mmseg's shipped configs, with dotted-key overrides (list items by index)."""
    cfg = Config.fromfile(str(ZOO / base))
    cfg.merge_from_dict({f"model.{k.replace('__', '.')}": v for k, v in overrides.items()}, allow_list_keys=True)
    return cfg.model


SMALL_RESNET = dict(pretrained=None, backbone__depth=18, backbone__stem_channels=16, backbone__base_channels=16)
OCRNET = dict(**SMALL_RESNET, decode_head__0__in_channels=64, decode_head__0__channels=8, decode_head__0__num_classes=5,
              decode_head__1__in_channels=128, decode_head__1__channels=16, decode_head__1__ocr_channels=8,
              decode_head__1__num_classes=5)
SWIN = dict(backbone__embed_dims=16, backbone__depths=[2, 2], backbone__num_heads=[1, 2], backbone__window_size=3,
            backbone__strides=(4, 2), backbone__out_indices=(0, 1), backbone__drop_path_rate=0.0,
            decode_head__in_channels=[16, 32], decode_head__in_index=[0, 1], decode_head__pool_scales=(1, 2),
            decode_head__channels=16, decode_head__num_classes=5, auxiliary_head__in_channels=32,
            auxiliary_head__in_index=1, auxiliary_head__channels=8, auxiliary_head__num_classes=5)

SEGMENTOR_CASES = {
    # (mmseg's model config, overrides making it small, the switch, what the whole-model switch replaces)
    "ocrnet_per_head": ("_base_/models/ocrnet_r50-d8.py", OCRNET, dict(decode_head__1__type="fastctx.OCRHead"), 0),
    # BN in the OCR stage: fastctx.nn.convert_ocr refuses mmengine's SyncBatchNorm subclass (the zoo's SyncBN)
    "ocrnet_whole_model": ("_base_/models/ocrnet_r50-d8.py", {**OCRNET, "decode_head__1__norm_cfg": dict(type="BN")},
                           dict(type="fastctx.CascadeEncoderDecoder"), 2),
    "swin_backbone": ("_base_/models/upernet_swin.py", SWIN, dict(backbone__type="fastctx.SwinTransformer"), 0),
    "swin_whole_model": ("_base_/models/upernet_swin.py", SWIN, dict(type="fastctx.EncoderDecoder"), 4),
}


@pytest.mark.parametrize("case", sorted(SEGMENTOR_CASES))
def test_segmentor_is_mmsegs_with_the_same_weights(case):
    base, small, switch, replaced = SEGMENTOR_CASES[case]
    theirs = _build(_zoo_model(base, **small))
    _randomise(theirs)
    ours = _build(_zoo_model(base, **small, **switch))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    if "type" in switch:  # the whole-model switch says what it replaced, and every module is convertible
        assert len(ours.fastctx_report.replaced) == replaced and not ours.fastctx_report.skipped
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 40, 56, generator=gen, dtype=F64)
    samples = _samples(_labels(2, (40, 56), 5))

    losses_o, grads_o = _loss_and_grads(ours.train(), lambda m: m.loss(images, samples))
    losses_t, grads_t = _loss_and_grads(theirs.train(), lambda m: m.loss(images, samples))
    _assert_same_losses(losses_o, losses_t)
    _assert_same_grads(grads_o, grads_t)
    predicted = [s.seg_logits.data for s in ours.eval().predict(images, _samples(_labels(2, (40, 56), 5)))]
    expected = [s.seg_logits.data for s in theirs.eval().predict(images, _samples(_labels(2, (40, 56), 5)))]
    for got, want in zip(predicted, expected):
        assert_close(got, want, F64, "predicted logits")


def test_acf_head_trains_in_mmsegs_encoder_decoder():
    """ACFHead's (logits, coarse) are both supervised: loss_ce (weight 1) and loss_coarse (weight 0.4), mmseg's CE."""
    from fastctx.models.losses import seg_cross_entropy

    cfg = _zoo_model("_base_/models/apcnet_r50-d8.py", **SMALL_RESNET, auxiliary_head__in_channels=64,
                     auxiliary_head__channels=8, auxiliary_head__num_classes=5)
    cfg["decode_head"] = dict(type="fastctx.ACFHead", in_channels=128, in_index=3, channels=16, acf_channels=8,
                              dilations=(1, 2), num_classes=5, norm_cfg=dict(type="BN", requires_grad=True))
    model = _build(cfg)
    _randomise(model)
    gen = torch.Generator().manual_seed(3)
    images = torch.randn(2, 3, 40, 56, generator=gen, dtype=F64)
    labels = _labels(2, (40, 56), 5)
    model.train()
    torch.manual_seed(5)
    losses = model.loss(images, _samples(labels))
    assert set(losses) == {"decode.loss_ce", "decode.loss_coarse", "decode.acc_seg", "aux.loss_ce", "aux.acc_seg"}
    torch.manual_seed(5)  # the same dropout draws: the backbone has none, the head draws coarse then final
    logits, coarse = model.decode_head(model.extract_feat(images))
    assert_close(losses["decode.loss_ce"], seg_cross_entropy(logits, labels, 1.0), F64, "loss_ce")
    assert_close(losses["decode.loss_coarse"], seg_cross_entropy(coarse, labels, 0.4), F64, "loss_coarse")
    sum(v for k, v in losses.items() if "loss" in k).backward()
    assert model.decode_head.conv_seg_coarse.weight.grad.abs().sum() > 0

    model.eval()
    predicted = model.predict(images, _samples(labels))
    logits, _ = model.decode_head(model.extract_feat(images))
    want = torch.nn.functional.interpolate(logits, size=(40, 56), mode="bilinear", align_corners=False)
    for sample, expected in zip(predicted, want):
        assert_close(sample.seg_logits.data, expected, F64, "predicted logits")


def test_swin_loads_a_pretrained_checkpoint_as_mmseg(tmp_path):
    """init_cfg=dict(type='Pretrained', checkpoint=a segmentor's checkpoint): mmseg's loading, `backbone.` stripped."""
    small = {k.removeprefix("backbone__"): v for k, v in SWIN.items() if k.startswith("backbone__")}
    trained = _build(dict(type="SwinTransformer", **small))
    _randomise(trained)
    checkpoint = tmp_path / "segmentor.pth"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in trained.state_dict().items()}}, checkpoint)
    loaded = {}
    for kind in ("SwinTransformer", "fastctx.SwinTransformer"):
        backbone = MODELS.build(dict(type=kind, **small, init_cfg=dict(type="Pretrained", checkpoint=str(checkpoint))))
        backbone.init_weights()
        loaded[kind] = backbone.state_dict()
    assert loaded["fastctx.SwinTransformer"].keys() == loaded["SwinTransformer"].keys()
    for key, value in loaded["SwinTransformer"].items():
        assert torch.equal(loaded["fastctx.SwinTransformer"][key], value), key
    assert not torch.equal(loaded["SwinTransformer"]["patch_embed.projection.weight"],
                           MODELS.build(dict(type="SwinTransformer", **small)).state_dict()["patch_embed.projection.weight"])


# ----------------------------------------------------------------------------- mmengine's Runner on zoo configs

CROP = (32, 64)  # (H, W): Cityscapes' aspect ratio, small
ITERS, CHECKPOINT_EVERY = 4, 2
CLASS_COLOURS = {0: (128, 64, 128), 1: (244, 35, 232), 2: (70, 70, 70), 13: (0, 0, 142)}  # road, sidewalk...


def _write_cityscapes(root: Path, seed: int = 0) -> None:
    """A tiny dataset in Cityscapes' folder layout: a road with a sidewalk, buildings and cars, noisy colours."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", 4), ("val", 2)):
        for i in range(count):
            label = np.zeros(CROP, np.uint8)
            label[: CROP[0] // 3] = 2
            label[CROP[0] // 3: CROP[0] // 2] = 1
            for _ in range(2):
                top, left = rng.integers(CROP[0] // 2, CROP[0] - 6), rng.integers(0, CROP[1] - 12)
                label[top:top + 6, left:left + 12] = 13
            label[-2:, :] = 255  # unlabelled
            image = np.zeros((*CROP, 3), np.float64)
            for cls, colour in CLASS_COLOURS.items():
                image[label == cls] = colour
            image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
            name = f"town_{i:06d}_000019"
            for folder, suffix, array in (("leftImg8bit", "leftImg8bit", image),
                                          ("gtFine", "gtFine_labelTrainIds", label)):
                path = root / folder / split / "town" / f"{name}_{suffix}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(array).save(path)


# The model sizes of a zoo config made small: ResNetV1c-18 at 1/4 width (channels 16, 32, 64, 128).
SMALL_MODELS = {
    "apcnet": ("apcnet/apcnet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
               "decode_head=dict(in_channels=128, channels=16)"),
    "encnet": ("encnet/encnet_r50-d8_4xb2-40k_cityscapes-512x1024.py",
               "decode_head=dict(in_channels=[32, 64, 128], channels=16, num_codes=8)"),
}

SMALL_CONFIG = """_base_ = {zoo!r}
crop_size = {crop}
model = dict(
    pretrained=None,
    data_preprocessor=dict(size=crop_size),
    backbone=dict(depth=18, stem_channels=16, base_channels=16),
    {decode_head},
    auxiliary_head=dict(in_channels=64, channels=8))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomResize', scale=(64, 32), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(64, 32), keep_ratio=True),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(batch_size=4, num_workers=0, persistent_workers=False, sampler=dict(seed=0),
                        dataset=dict(data_root={data!r}, pipeline=train_pipeline))
val_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict(data_root={data!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
optim_wrapper = dict(optimizer=dict(lr=0.1))
param_scheduler = [dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end={iters}, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1), checkpoint=dict(interval={every}))
visualizer = dict(_delete_=True, type='SegLocalVisualizer', vis_backends=[dict(type='LocalVisBackend')])
randomness = dict(seed=0)
"""

# What a user adds to a zoo config: the per-head switch and the whole-model switch.
PLUGIN = "custom_imports = dict(imports=['fastctx.mmseg'], allow_failed_imports=False)\n"
SWITCHES = {
    "per_head": "model = dict(decode_head=dict(type='fastctx.{head}'))\n",
    "whole_model": "model = dict(type='fastctx.EncoderDecoder')\n",
}
HEAD_TYPES = {"apcnet": "APCHead", "encnet": "EncHead"}


class _Record(Hook):
    """Seeds every iteration (dropout draws independent of how many draws model building made) and records
    the losses, the weights training starts from, the validation logits and metrics."""

    def __init__(self):
        self.losses, self.val_logits, self.metrics, self.start, self.fastctx_modules = {}, [], None, None, None

    def before_train(self, runner):
        self.start = {k: v.detach().clone() for k, v in runner.model.state_dict().items()}
        self.fastctx_modules = {type(m).__qualname__ for m in runner.model.modules()
                                if type(m).__module__.startswith("fastctx.")}

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        torch.manual_seed(1000 + runner.iter)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses[runner.iter + 1] = {k: v.item() for k, v in outputs.items()}  # runner.iter counts from 0

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.val_logits += [sample.seg_logits.data.clone() for sample in outputs]

    def after_val_epoch(self, runner, metrics=None):
        self.metrics = dict(metrics)


def _run(config: Path, work_dir: Path, name: str, load_from: Path, resume: bool = False) -> _Record:
    cfg = Config.fromfile(str(config))  # imports custom_imports, as tools/train.py does
    cfg.work_dir, cfg.experiment_name, cfg.load_from, cfg.resume = str(work_dir), name, str(load_from), resume
    runner = Runner.from_cfg(cfg)
    runner.model.double()  # the optimizer is built in train(), from these (converted in place) parameters
    record = _Record()
    runner.register_hook(record, priority="LOWEST")
    runner.train()
    return record


@pytest.mark.parametrize("model_name", sorted(SMALL_MODELS))
def test_zoo_config_trains_the_same_switched_in_mmengines_runner(model_name, tmp_path, monkeypatch):
    data = tmp_path / "cityscapes"
    _write_cityscapes(data)
    zoo, decode_head = SMALL_MODELS[model_name]
    small = tmp_path / f"{model_name}_small.py"
    small.write_text(SMALL_CONFIG.format(zoo=str(ZOO / zoo), crop=CROP, decode_head=decode_head, data=str(data),
                                         iters=ITERS, every=CHECKPOINT_EVERY))
    # Not what is tested, and most of a small run's time: the environment the Runner logs (mmengine runs nvcc and
    # gcc to collect it) and yapf's layout of the config text it logs and stores in every checkpoint.
    monkeypatch.setattr("mmengine.runner.runner.collect_env", lambda: {})
    monkeypatch.setattr("mmengine.config.config.FormatCode", lambda text, **kwargs: (text, False))
    configs = {"mmseg": small}
    for switch, line in SWITCHES.items():
        configs[switch] = tmp_path / f"{model_name}_{switch}.py"
        configs[switch].write_text(f"_base_ = {str(small)!r}\n{PLUGIN}{line.format(head=HEAD_TYPES[model_name])}")

    # One set of starting weights for every run: mmseg's model, initialised, float64.
    cfg = Config.fromfile(str(small))
    start = MODELS.build(cfg.model)
    start.init_weights()
    init = tmp_path / "init.pth"
    torch.save({"state_dict": start.double().state_dict()}, init)

    runs = {name: _run(path, tmp_path / name, f"{model_name}_{name}", init) for name, path in configs.items()}
    # mmengine 0.10 pickles its message hub into checkpoints, which torch >= 2.6's default weights_only
    # torch.load refuses: resuming any mmengine run needs this (the checkpoint was written by this test).
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    resumed = _run(configs["per_head"], tmp_path / "per_head", f"{model_name}_resumed",
                   tmp_path / "per_head" / f"iter_{CHECKPOINT_EVERY}.pth", resume=True)

    reference = runs["mmseg"]
    print(f"\n{model_name}: total loss per iteration")
    for name, run in {**runs, "per_head resumed": resumed}.items():
        print(f"  {name:17s}", "  ".join(f"{i}: {run.losses[i]['loss']:.6f}" for i in sorted(run.losses)),
              f"| mIoU {run.metrics['mIoU']:.2f}")
    losses = [reference.losses[i]["loss"] for i in range(1, ITERS + 1)]
    assert all(np.isfinite(losses)) and all(later < earlier for earlier, later in zip(losses, losses[1:]))
    assert set(reference.metrics) == {"aAcc", "mIoU", "mAcc"}

    # what ran: mmseg's modules only, fastctx's head, fastctx's context modules inside mmseg's head
    fused_module = {"apcnet": "ACM", "encnet": "Encoding"}[model_name]
    assert not reference.fastctx_modules
    assert {HEAD_TYPES[model_name], fused_module} <= runs["per_head"].fastctx_modules
    assert fused_module in runs["whole_model"].fastctx_modules
    assert HEAD_TYPES[model_name] not in runs["whole_model"].fastctx_modules
    for name, run in runs.items():
        # the switched model started from mmseg's weights, key for key
        assert run.start.keys() == reference.start.keys(), name
        for key, value in reference.start.items():
            assert torch.equal(run.start[key], value), f"{name}: {key}"
        assert sorted(run.losses) == list(range(1, ITERS + 1))
        for i, step in reference.losses.items():
            assert run.losses[i].keys() == step.keys()
            for key, value in step.items():
                assert_close(torch.tensor(run.losses[i][key]), torch.tensor(value), F64, f"{name} iter {i} {key}")
        assert len(run.val_logits) == len(reference.val_logits) == 2
        for got, want in zip(run.val_logits, reference.val_logits):
            assert_close(got, want, F64, f"{name} validation logits")
        assert run.metrics == pytest.approx(reference.metrics, rel=1e-9), name

    for name in runs:
        written = sorted(p.name for p in (tmp_path / name).glob("iter_*.pth"))
        assert written == [f"iter_{i}.pth" for i in range(CHECKPOINT_EVERY, ITERS + 1, CHECKPOINT_EVERY)], name
    # a checkpoint of the switched run is an mmseg checkpoint
    trained = torch.load(tmp_path / "per_head" / f"iter_{ITERS}.pth", weights_only=False)["state_dict"]
    start.load_state_dict(trained, strict=True)
    # resuming from the first checkpoint continues the run exactly: the remaining iterations and the validation
    assert sorted(resumed.losses) == list(range(CHECKPOINT_EVERY + 1, ITERS + 1))
    for i, step in resumed.losses.items():
        for key, value in step.items():
            assert_close(torch.tensor(value), torch.tensor(runs["per_head"].losses[i][key]), F64, f"resumed {i} {key}")
    for got, want in zip(resumed.val_logits, runs["per_head"].val_logits):
        assert_close(got, want, F64, "resumed validation logits")
