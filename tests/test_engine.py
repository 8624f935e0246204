"""Engine: configs, LR schedule, sampler, inference modes, evaluation, grad accumulation, checkpoints, SyncBN.

The helpers at the top (tiny real models via config overrides, a toy dataset and a BatchNorm-free toy
segmentor) are shared with test_resume.py, test_distributed.py and test_cli.py.
"""
from __future__ import annotations

import io
import math
import os
import random
import subprocess
import sys
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastctx.engine import (Config, ConfigError, PolyLR, ShardSampler, TrainBatchSampler, Trainer, available_configs,
                            evaluate, infer_logits, load_config, slide_inference, tta_probabilities,
                            whole_inference)
from fastctx.engine import checkpoint as ckpt
from fastctx.engine.config import resolve_config_path
from fastctx.engine.logging import ProgressBar, format_duration
from fastctx.engine.metrics import ConfusionMatrix
from fastctx.nn._batchnorm import SyncBatchNorm, convert_sync_batchnorm
from fastctx.nn.conv_module import make_norm
from mmseg_compat import import_decode_heads
from tolerances import assert_close

# ----------------------------------------------------------------------------------------------- shared helpers

# A real fastctx APCNet/EncNet/FCN (ResNetV1c-18-D8 + heads) shrunk to ~0.2M parameters: 32x32 images
# take a few ms per iteration, and every code path (fused heads, BN, aux head, SE loss) is the real one.
TINY_BACKBONE = "{stem_channels: 8, base_channels: 8}"
TINY_AUX = "{in_channels: 32, channels: 8}"
TINY_DECODE = {
    "apcnet": "{in_channels: 64, channels: 16}",
    "encnet": "{in_channels: [16, 32, 64], channels: 16, num_codes: 8}",
    "fcn": "{in_channels: 64, channels: 16}",
}


def tiny_overrides(kind: str = "apcnet", iters: int = 3, batch_size: int = 2, dropout: float | None = None,
                   train_images: int = 16, val_images: int = 4, size: int = 32, workers: int = 0) -> list[str]:
    """--set overrides turning a shipped *_r18-d8_synthetic config into a seconds-long CPU run."""
    decode = TINY_DECODE[kind]
    aux = TINY_AUX
    if dropout is not None:
        decode = decode[:-1] + f", dropout_ratio: {dropout}}}"
        aux = aux[:-1] + f", dropout_ratio: {dropout}}}"
    return [
        f"model.name={kind}_r18-d8",
        f"model.kwargs={{backbone: {TINY_BACKBONE}, decode_head: {decode}, auxiliary_head: {aux}}}",
        f"data.train_kwargs={{num_images: {train_images}, size: [{size}, {size}]}}",
        f"data.val_kwargs={{num_images: {val_images}, size: [{size}, {size}]}}",
        f"data.num_workers={workers}",
        f"train.iters={iters}", f"train.batch_size={batch_size}", "train.log_interval=1",
        f"train.val_interval={iters}", f"train.checkpoint_interval={iters}",
    ]


def tiny_config(kind: str = "apcnet", extra: list[str] | None = None, **kw):
    return load_config(f"{kind}_r18-d8_synthetic", tiny_overrides(kind, **kw) + list(extra or []))


class ToyDataset(torch.utils.data.Dataset):
    """Deterministic 3-class images with a seeded random flip + noise: `ds[i]` or `ds[(i, seed)]`."""

    classes = ("dark", "mid", "bright")
    palette = [[0, 0, 0], [128, 128, 128], [255, 255, 255]]
    num_classes = 3
    ignore_index = 255

    def __init__(self, num_images: int = 12, size: tuple[int, int] = (8, 8), label_size: tuple[int, int] | None = None,
                 ignore: bool = False):
        self.num_images, self.size, self.label_size, self.ignore = num_images, size, label_size or size, ignore

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, key):
        index, seed = key if isinstance(key, tuple) else (key, key)
        base = np.random.default_rng(1000 + index)
        h, w = self.label_size
        label = base.integers(0, 3, size=(h, w))
        if self.ignore:
            label[0, :] = 255
        aug = np.random.default_rng(seed)
        if aug.random() < 0.5:
            label = label[:, ::-1]
        img = np.where(label == 255, 1, label)[None].repeat(3, 0).astype(np.float32) - 1.0
        img = img + aug.normal(0, 0.3, size=img.shape).astype(np.float32)
        img_t = torch.from_numpy(np.ascontiguousarray(img))
        if tuple(self.size) != (h, w):
            img_t = F.interpolate(img_t[None], size=self.size, mode="bilinear", align_corners=False)[0]
        return {"img": img_t, "label": torch.from_numpy(np.ascontiguousarray(label)).long(), "name": f"toy{index}",
                "ori_shape": (h, w)}


class ToyNet(nn.Module):
    """A BatchNorm-free segmentor with the EncoderDecoder interface (forward -> logits, loss -> dict)."""

    def __init__(self, num_classes: int = 3, width: int = 6, dropout: float = 0.0):
        super().__init__()
        self.num_classes, self.align_corners = num_classes, False
        self.body = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout),
                                  nn.Conv2d(width, num_classes, 1))

    def forward(self, img):
        return self.body(img)

    def loss(self, img, label):
        return {"decode.loss_ce": F.cross_entropy(self(img), label, ignore_index=255)}


def state_dicts_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def toy_config(extra: list[str] | None = None) -> Config:
    """A config whose model and data are passed to Trainer directly (ToyNet / ToyDataset)."""
    base = ["train.log_interval=1", "train.val_interval=0", "train.checkpoint_interval=0", "data.num_workers=0",
            "schedule.eta_min=0.0", "optim.lr=0.1"]
    return load_config("fcn_r18-d8_synthetic", base + list(extra or []))


# ----------------------------------------------------------------------------------------------- config


def test_shipped_configs_load_and_mirror_mmseg():
    names = available_configs()
    for kind in ("apcnet", "encnet", "fcn"):
        assert f"{kind}_r18-d8_synthetic" in names
    for kind in ("apcnet", "encnet"):
        for depth in (50, 101):
            city = load_config(f"{kind}_r{depth}-d8_4xb2-80k_cityscapes-512x1024")
            ade = load_config(f"{kind}_r{depth}-d8_4xb4-160k_ade20k-512x512")
            assert city.model.name == ade.model.name == f"{kind}_r{depth}-d8"
            assert city.model.norm == "SyncBN"
            assert (city.data.name, city.data.crop_size, city.data.scale) == ("cityscapes", (512, 1024), (2048, 1024))
            assert (ade.data.name, ade.data.crop_size, ade.data.scale) == ("ade20k", (512, 512), (2048, 512))
            assert (city.train.iters, city.train.batch_size, city.train.val_interval) == (80000, 8, 8000)
            assert (ade.train.iters, ade.train.batch_size, ade.train.checkpoint_interval) == (160000, 16, 16000)
            for c in (city, ade):
                assert (c.optim.lr, c.optim.momentum, c.optim.weight_decay) == (0.01, 0.9, 0.0005)
                assert (c.schedule.power, c.schedule.eta_min) == (0.9, 1e-4)


def test_config_found_by_name_and_by_path(tmp_path):
    path = resolve_config_path("apcnet_r18-d8_synthetic")
    assert path.name == "apcnet_r18-d8_synthetic.yaml" and path.is_file()
    by_path = load_config(str(path))
    assert by_path.to_dict() == load_config("apcnet_r18-d8_synthetic").to_dict()
    with pytest.raises(ConfigError, match="neither a file nor a shipped config; shipped configs: .*apcnet_r18"):
        load_config("apcnet_r18-d8_synthetc")
    with pytest.raises(ConfigError, match="neither a file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_overrides_are_parsed_as_yaml_and_typed():
    cfg = load_config("apcnet_r18-d8_synthetic", ["train.iters=200", "optim.lr=0.02", "data.crop_size=[32, 48]",
                                                  "model.kwargs.decode_head={dropout_ratio: 0}", "eval.stride=16",
                                                  "model.pretrained=null", "runtime.amp=bf16"])
    assert cfg.train.iters == 200 and cfg.optim.lr == 0.02 and isinstance(cfg.optim.lr, float)
    assert cfg.data.crop_size == (32, 48) and cfg.eval.stride == (16, 16)
    assert cfg.model.kwargs == {"decode_head": {"dropout_ratio": 0}} and cfg.runtime.amp == "bf16"
    assert Config.from_dict(cfg.to_dict(), cfg.name) == cfg
    assert cfg.with_overrides(["train.iters=5"]).train.iters == 5 and cfg.train.iters == 200


@pytest.mark.parametrize("override, message", [
    ("train.iter=3", r"unknown config key 'train.iter'; did you mean 'train.iters'\? Valid keys of section "
                     r"'train': train.iters, train.batch_size"),
    ("trian.iters=3", r"unknown config key 'trian'; did you mean 'train'\? Valid config sections: model, data"),
    ("runtime.amp=fp8", r"runtime.amp: expected one of 'none', 'bf16', 'fp16', got 'fp8'"),
    ("model.norm=GN", r"model.norm: expected one of 'BN', 'SyncBN', got 'GN'"),
    ("eval.mode=sliding", r"eval.mode: expected one of 'whole', 'slide', got 'sliding'"),
    ("train.iters=abc", r"train.iters: expected an integer, got 'abc'"),
    ("train.iters=0", r"train.iters: expected a value >= 1, got 0"),
    ("train.iters=2.5", r"train.iters: expected an integer, got 2.5"),
    ("optim.lr=-1", r"optim.lr: expected a value > 0.0, got -1.0"),
    ("model.fused=yes please", r"model.fused: expected true or false, got 'yes please'"),
    ("data.crop_size=[1, 2, 3]", r"data.crop_size: expected a list of 2 integers or null, got \[1, 2, 3\]"),
    ("model.name=apcnet_r34-d8", r"model.name: unknown name 'apcnet_r34-d8'; valid: apcnet_r18-d8, apcnet_r50-d8"),
    ("data.name=kitti", r"data.name: unknown name 'kitti'; valid: .*cityscapes"),
    ("runtime.device=tpu", r"runtime.device: expected one of 'auto', 'cpu', 'cuda', 'cuda:N', got 'tpu'"),
    ("eval.tta_scales=[1, x]", r"eval.tta_scales: expected a list of numbers, got \[1, 'x'\]"),
    ("schedule.warmup_iters=100000", r"schedule.warmup_iters \(100000\) must be smaller than train.iters \(\d+\)"),
    ("train.iters", r"override 'train.iters': expected section.key=value"),
    ("iters=3", r"override 'iters=3': the key must be section.key"),
])
def test_bad_keys_and_values_name_the_key_and_the_choices(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("apcnet_r18-d8_synthetic", [override])


def test_base_inheritance_and_cycles(tmp_path):
    (tmp_path / "parent.yaml").write_text("_base_: apcnet_r18-d8_synthetic\ntrain: {iters: 7}\n")
    (tmp_path / "child.yaml").write_text("_base_: parent.yaml\ntrain: {batch_size: 4}\nmodel: {name: fcn_r18-d8}\n")
    cfg = load_config(tmp_path / "child.yaml", ["optim.lr=0.5"])
    assert (cfg.train.iters, cfg.train.batch_size, cfg.model.name, cfg.optim.lr) == (7, 4, "fcn_r18-d8", 0.5)
    assert cfg.data.train_kwargs == {"num_images": 2000, "size": [64, 64]}  # from the shipped base
    assert cfg.name == "child"
    (tmp_path / "a.yaml").write_text("_base_: b.yaml\n")
    (tmp_path / "b.yaml").write_text("_base_: a.yaml\n")
    with pytest.raises(ConfigError, match="inheritance cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1, 2]\n")
    with pytest.raises(ConfigError, match="section 'train' must be a mapping"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "broken.yaml").write_text("train: {iters: 3\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_replace_operator_and_dataset_switch_on_the_command_line():
    base = "apcnet_r18-d8_synthetic"  # data: synthetic, train_kwargs {num_images: 2000, size: [64, 64]}
    merged = load_config(base, ["data.train_kwargs={num_images: 5}"]).data
    assert merged.train_kwargs == {"num_images": 5, "size": [64, 64]}  # '=' merges into the inherited mapping
    replaced = load_config(base, ["data.train_kwargs:={num_images: 5}"]).data
    assert replaced.train_kwargs == {"num_images": 5} and replaced.val_kwargs == {"num_images": 300, "size": [64, 64]}
    section = load_config(base, ["data:={name: synthetic, num_workers: 1}"]).data
    assert section == type(section)(name="synthetic", num_workers=1)  # every other key back to its default
    # switching the dataset resets what described the old one; the overrides then describe the new one
    voc = load_config(base, ["data.name=pascal_voc12", "data.root=data/VOCdevkit", "data.val_kwargs={}"]).data
    assert (voc.name, voc.root, voc.train_kwargs, voc.val_kwargs, voc.crop_size) == (
        "pascal_voc12", "data/VOCdevkit", {}, {}, None)
    assert voc.num_workers == 0  # not dataset-specific: inherited
    aug = load_config(base, ["data.name=pascal_voc12", "data.train_kwargs={aug: true}"]).data
    assert aug.train_kwargs == {"aug": True} and aug.val_kwargs == {}
    assert load_config(base, ["data.name=synthetic"]).data.train_kwargs == {"num_images": 2000, "size": [64, 64]}
    cfg = load_config(base)
    assert cfg.with_overrides(["data.name=ade20k"]).data.train_kwargs == {}
    with pytest.raises(ConfigError, match=r"a section is replaced by a mapping, e.g. data:=\{key: value\}"):
        load_config(base, ["data:=3"])
    with pytest.raises(ConfigError, match="unknown config key 'data.size'"):
        load_config(base, ["data:={size: 3}"])


def test_docstring_override_examples_are_true():
    """The examples in fastctx.engine.config's docstrings are what the overrides do."""
    from fastctx.engine import config as config_module
    from fastctx.models import build_model

    doc = config_module.__doc__ + config_module.ModelConfig.__doc__
    assert "model.kwargs.decode_head.dropout_ratio=0" in doc and "model.kwargs.dropout_ratio=0" not in doc
    cfg = load_config("apcnet_r18-d8_synthetic", ["model.kwargs.decode_head.dropout_ratio=0",
                                                  "data.train_kwargs:={num_images: 100}", "train.iters=200"])
    assert cfg.model.kwargs == {"decode_head": {"dropout_ratio": 0}} and cfg.data.train_kwargs == {"num_images": 100}
    with torch.device("meta"):
        model = build_model(cfg.model.name, 9, **cfg.model.kwargs)
    assert model.decode_head.dropout is None and model.auxiliary_head.dropout is not None


# ----------------------------------------------------------------------------------------------- LR schedule


def _mmengine_lrs(total: int, warmup: int, base=0.01, eta_min=1e-4, power=0.9, ratio=1e-6):
    from mmengine.optim.scheduler import LinearLR, PolyLR as MMPolyLR

    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=base)
    schedulers = []
    if warmup:
        schedulers.append(LinearLR(opt, start_factor=ratio, by_epoch=False, begin=0, end=warmup))
    schedulers.append(MMPolyLR(opt, eta_min=eta_min, power=power, begin=warmup, end=total, by_epoch=False))
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        for s in schedulers:
            s.step()
    return lrs


@pytest.mark.parametrize("total, warmup", [(10, 0), (25, 4), (7, 2), (2, 0)])
def test_poly_lr_matches_mmengine(total, warmup):
    schedule = PolyLR(0.01, total, power=0.9, eta_min=1e-4, warmup_iters=warmup, warmup_ratio=1e-6)
    ours = torch.tensor([schedule.lr_at(t) for t in range(total)], dtype=torch.float64)
    ref = torch.tensor(_mmengine_lrs(total, warmup), dtype=torch.float64)
    assert_close(ours, ref, torch.float64)


def test_poly_lr_closed_form():
    s = PolyLR(0.02, 101, power=0.9, eta_min=1e-4)
    for t in (0, 1, 37, 99, 100):
        assert s.lr_at(t) == pytest.approx((0.02 - 1e-4) * (1 - t / 100) ** 0.9 + 1e-4, rel=1e-15)
    assert s.lr_at(100) == pytest.approx(1e-4) and s.lr_at(150) == pytest.approx(1e-4)
    w = PolyLR(0.02, 101, power=1.0, eta_min=0.0, warmup_iters=11, warmup_ratio=0.1)
    assert w.lr_at(0) == pytest.approx(0.002) and w.lr_at(5) == pytest.approx(0.02 * (0.1 + 0.9 * 0.5))
    assert w.lr_at(10) == pytest.approx(0.02) and w.lr_at(11) == pytest.approx(0.02)
    assert w.lr_at(11 + 89) == pytest.approx(0.0, abs=1e-15)  # S = 101 - 11 - 1 = 89 steps after warmup
    with pytest.raises(ValueError, match="warmup_iters"):
        PolyLR(0.01, 10, warmup_iters=10)


# ----------------------------------------------------------------------------------------------- sampler


def test_sampler_shards_concatenate_to_the_single_process_batch():
    single = TrainBatchSampler(21, 4, seed=3)
    shards = [TrainBatchSampler(21, 2, world_size=2, rank=r, seed=3) for r in range(2)]
    assert single.batches_per_epoch == 5  # 21 // 4: the tail of each epoch is dropped
    it_single, its = iter(single), [iter(s) for s in shards]
    seen_epoch0 = []
    for position in range(12):  # crosses two epoch boundaries
        batch = next(it_single)
        assert batch == next(its[0]) + next(its[1])
        assert batch == single.batch(position)
        if position < 5:
            seen_epoch0 += [i for i, _ in batch]
    assert len(set(seen_epoch0)) == 20  # no repeats within an epoch
    epoch0, epoch1 = single.epoch_order(0)[0], single.epoch_order(1)[0]
    assert not np.array_equal(epoch0, epoch1)  # reshuffled per epoch
    resumed = iter(TrainBatchSampler(21, 4, seed=3, start_batch=7))
    assert next(resumed) == single.batch(7) and next(resumed) == single.batch(8)
    assert TrainBatchSampler(21, 4, seed=4).batch(0) != single.batch(0)
    # the augmentation seed belongs to the image in its epoch, whatever the sharding
    order, seeds = single.epoch_order(2)
    assert all(seed == seeds[i] for i, seed in single.batch(11))


def test_sampler_and_shards_reject_impossible_setups():
    with pytest.raises(ValueError, match="the training set has 3 images, fewer than one global batch of 4"):
        TrainBatchSampler(3, 2, world_size=2, rank=0)
    with pytest.raises(ValueError, match="rank must be in"):
        TrainBatchSampler(8, 2, world_size=2, rank=2)
    shards = [list(ShardSampler(7, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(7)) and shards[0] == [0, 3, 6]


# ----------------------------------------------------------------------------------------------- inference


def _pointwise_model(k=5):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 1), nn.Tanh(), nn.Conv2d(4, k, 1)).eval()


def _conv_model(k=4):
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, k, 3, padding=1)).eval()


@torch.no_grad()
def test_slide_equals_whole_for_a_translation_equivariant_model():
    model = _pointwise_model()
    img = torch.randn(2, 3, 13, 17)
    whole = whole_inference(model, img)
    for crop, stride in (((5, 7), (3, 4)), ((13, 17), (5, 5)), ((20, 30), (8, 8)), ((4, 4), (4, 4))):
        assert_close(slide_inference(model, img, crop, stride), whole, torch.float32, f"crop {crop} stride {stride}")
    assert_close(infer_logits(model, img, "slide", (6, 6)), whole, torch.float32)


@torch.no_grad()
def test_slide_inference_hand_built():
    class CropMean(nn.Module):  # one constant logit map per window: its mean input
        def forward(self, x):
            return x.mean(dim=(2, 3), keepdim=True).expand(-1, 1, *x.shape[2:])

    img = torch.arange(6, dtype=torch.float32).view(1, 1, 1, 6).expand(1, 1, 4, 6).contiguous()
    out = slide_inference(CropMean(), img, (4, 4), (2, 2))
    # windows cover columns [0, 4) (mean 1.5) and [2, 6) (mean 3.5); columns 2-3 average the two
    expected = torch.tensor([1.5, 1.5, 2.5, 2.5, 3.5, 3.5]).expand(1, 1, 4, 6)
    assert torch.equal(out, expected)


@torch.no_grad()
def test_slide_inference_matches_mmseg():
    assert import_decode_heads() is not None, "mmseg is installed: the parity test must run"
    from mmengine.config import ConfigDict
    from mmseg.models.segmentors import EncoderDecoder

    model = _conv_model()
    for shape, crop, stride in (((1, 3, 23, 31), (10, 12), (6, 7)), ((2, 3, 9, 40), (16, 16), (10, 10))):
        img = torch.randn(*shape)
        fake_self = SimpleNamespace(test_cfg=ConfigDict(mode="slide", crop_size=crop, stride=stride),
                                    out_channels=4, encode_decode=lambda x, metas: model(x))
        ref = EncoderDecoder.slide_inference(fake_self, img, [dict(ori_shape=shape[2:])])
        ours = slide_inference(model, img, crop, stride)
        assert_close(ours, ref, torch.float32)
        assert not torch.allclose(ours, model(img), atol=1e-4)  # borders differ: the windows matter


@torch.no_grad()
def test_tta_averages_softmax_as_mmseg_seg_tta_model():
    assert import_decode_heads() is not None, "mmseg is installed: the parity test must run"
    from mmseg.models.segmentors.base import BaseSegmentor
    from mmseg.models.segmentors.seg_tta import SegTTAModel
    from mmseg.structures import SegDataSample

    model = _conv_model(k=4)
    img = torch.randn(1, 3, 10, 14)
    out_size = (20, 28)  # e.g. the label is at twice the test image's resolution
    scales = (0.5, 1.0, 1.5)
    post = SimpleNamespace(align_corners=False, decode_head=SimpleNamespace(threshold=0.3))
    samples = []
    for scale in scales:
        size = (int(10 * scale + 0.5), int(14 * scale + 0.5))
        scaled = F.interpolate(img, size=size, mode="bilinear", align_corners=False)
        for flip in (False, True):
            x = scaled.flip(-1) if flip else scaled
            meta = dict(ori_shape=out_size, img_shape=size, flip=flip, flip_direction="horizontal", img_path="x")
            samples += BaseSegmentor.postprocess_result(post, model(x), [SegDataSample(metainfo=meta)])
    tta = SimpleNamespace(module=SimpleNamespace(out_channels=4))
    with warnings.catch_warnings():  # mmengine's PixelData notes it adds a leading dim to the [H, W] argmax
        warnings.simplefilter("ignore", UserWarning)
        [merged] = SegTTAModel.merge_preds(tta, [samples])
    ref_probs = torch.stack([s.seg_logits.data.softmax(0) for s in samples]).mean(0)
    probs = tta_probabilities(model, img, out_size, scales=scales, flip=True)
    assert_close(probs[0], ref_probs, torch.float32)
    assert torch.equal(probs[0].argmax(0), merged.pred_sem_seg.data[0])


# ----------------------------------------------------------------------------------------------- evaluation


def test_evaluate_resizes_logits_to_the_label_and_restores_the_mode():
    torch.manual_seed(0)
    model = ToyNet()
    model.train()
    dataset = ToyDataset(num_images=3, size=(8, 8), label_size=(12, 10), ignore=True)
    metrics = evaluate(model, dataset)
    assert model.training
    ref = ConfusionMatrix(3, class_names=dataset.classes)
    model.eval()
    with torch.no_grad():
        for i in range(3):
            item = dataset[i]
            logits = F.interpolate(model(item["img"][None]), size=(12, 10), mode="bilinear", align_corners=False)
            ref.update(logits.argmax(1)[0], item["label"])
    expected = ref.compute()
    assert metrics.iou == pytest.approx(expected.iou, nan_ok=True) and metrics.aAcc == expected.aAcc
    assert metrics.num_pixels == 3 * 11 * 10  # the first label row is ignored
    slide = evaluate(model, dataset, mode="slide", crop_size=(4, 4), stride=(2, 2))
    assert slide.num_pixels == metrics.num_pixels


# ----------------------------------------------------------------------------------------------- trainer


def _toy_run(tmp_path, name, extra, dataset=None, model_seed=0):
    torch.manual_seed(model_seed)
    model = ToyNet()
    cfg = toy_config(extra)
    trainer = Trainer(cfg, tmp_path / name, model=model, train_dataset=dataset or ToyDataset(16),
                      progress=False)
    result = trainer.fit()
    return trainer, result


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    t4, _ = _toy_run(tmp_path, "b4", ["train.iters=4", "train.batch_size=4"])
    t22, _ = _toy_run(tmp_path, "b2x2", ["train.iters=4", "train.batch_size=2", "train.accum_steps=2"])
    t2, _ = _toy_run(tmp_path, "b2", ["train.iters=4", "train.batch_size=2"])
    for (name, a), b, c in zip(t4.model.state_dict().items(), t22.model.state_dict().values(),
                               t2.model.state_dict().values()):
        assert_close(b, a, torch.float32, name)
        assert not torch.allclose(c, a, atol=1e-4), f"{name}: batch 2 without accumulation should differ"
    losses4 = [r["loss"] for r in _records(t4) if r["mode"] == "train"]
    losses22 = [r["loss"] for r in _records(t22) if r["mode"] == "train"]
    assert losses22 == pytest.approx(losses4, rel=2e-5)


def _records(trainer):
    from fastctx.engine.logging import read_json_lines

    return read_json_lines(trainer.log_path)


def test_trainer_applies_the_poly_lr_and_sgd(tmp_path):
    """One SGD step by hand (momentum buffer = gradient on step 1) against the trainer's first iteration."""
    dataset = ToyDataset(16)
    torch.manual_seed(0)
    reference = ToyNet()
    trainer, _ = _toy_run(tmp_path, "one", ["train.iters=3", "train.batch_size=4", "optim.weight_decay=0.01"],
                          dataset=dataset)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    lrs = [PolyLR(0.1, 3, eta_min=0.0).lr_at(t) for t in range(3)]
    assert [r["lr"] for r in _records(trainer)] == lrs
    sampler = iter(TrainBatchSampler(16, 4, seed=0))
    for lr in lrs:
        keys = next(sampler)
        batch = [dataset[key] for key in keys]
        img, label = torch.stack([b["img"] for b in batch]), torch.stack([b["label"] for b in batch])
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        sum(reference.loss(img, label).values()).backward()
        opt.step()
    for (name, ours), ref in zip(trainer.model.state_dict().items(), reference.state_dict().values()):
        assert_close(ours, ref, torch.float32, name)


def test_trainer_writes_logs_validation_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg = toy_config(["train.iters=4", "train.batch_size=2", "train.val_interval=2", "train.checkpoint_interval=3",
                      "train.log_interval=2"])
    stream = io.StringIO()
    trainer = Trainer(cfg, tmp_path / "run", model=ToyNet(), train_dataset=ToyDataset(8),
                      val_dataset=ToyDataset(3, ignore=True), stream=stream)
    result = trainer.fit()
    records = _records(trainer)
    assert [(r["mode"], r["iter"]) for r in records] == [("train", 2), ("val", 2), ("train", 4), ("val", 4)]
    train = records[0]
    assert set(train) >= {"iter", "lr", "loss", "decode.loss_ce", "time", "data_time", "imgs_per_s"}
    assert set(records[1]) >= {"aAcc", "mIoU", "mAcc", "IoU", "Acc"} and set(records[1]["IoU"]) == {"dark", "mid",
                                                                                                     "bright"}
    assert sorted(p.name for p in (tmp_path / "run").glob("iter_*.pth")) == ["iter_3.pth", "iter_4.pth"]
    assert ckpt.find_latest(tmp_path / "run") == (tmp_path / "run" / "iter_4.pth").resolve()
    assert result.checkpoint == tmp_path / "run" / "iter_4.pth" and result.iters == 4
    assert result.metrics.mIoU == pytest.approx(records[-1]["mIoU"])
    state = ckpt.load_checkpoint(result.checkpoint)
    assert state["meta"]["iter"] == 4 and state["meta"]["classes"] == ["dark", "mid", "bright"]
    assert set(state) >= {"state_dict", "optimizer", "scheduler", "scaler", "sampler", "rng"}
    text = stream.getvalue()  # not a terminal: one line every log_interval iterations
    assert "iter 2/4 loss" in text and "iter 4/4 loss" in text and "iter 1/4" not in text
    assert "validation at iteration 2: aAcc" in text and "\r" not in text
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_bf16_autocast_on_cpu_trains(tmp_path):
    trainer, result = _toy_run(tmp_path, "bf16", ["train.iters=2", "train.batch_size=2", "runtime.amp=bf16"])
    assert all(math.isfinite(r["loss"]) for r in _records(trainer))
    with pytest.raises(ConfigError, match="fp16' needs a CUDA device"):
        _toy_run(tmp_path, "fp16", ["train.iters=2", "runtime.amp=fp16"])


def test_batch_size_must_split_over_processes_and_fit_the_dataset(tmp_path):
    # refused when the Trainer is built, before any training (a ConfigError: one line from the CLI)
    with pytest.raises(ConfigError, match=r"training set has 16 image\(s\), fewer than one batch of "
                                          r"train.batch_size=32"):
        _toy_run(tmp_path, "big", ["train.iters=1", "train.batch_size=32"])


# ----------------------------------------------------------------------------------------------- checkpoints


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "iter_1.pth"
    ckpt.save_checkpoint({"x": torch.ones(3)}, path)
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial bytes of a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(ckpt.WorkDirError, match=f"cannot write {path}: disk full"):
        ckpt.save_checkpoint({"x": torch.zeros(3)}, path)
    with pytest.raises(ckpt.WorkDirError, match="disk full"):
        ckpt.save_checkpoint({"x": torch.zeros(3)}, tmp_path / "iter_2.pth")
    monkeypatch.setattr(torch, "save", real_save)
    # no partial or temporary file; the old file and its checksum are intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_1.pth", "iter_1.pth.sha256"]
    assert torch.equal(ckpt.load_checkpoint(path)["x"], torch.ones(3))  # the old file is intact
    ckpt.update_latest(tmp_path, path)
    assert ckpt.find_latest(tmp_path) == path.resolve()
    assert ckpt.find_latest(tmp_path / "nowhere") is None


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError, match="cannot read checkpoint"):
        ckpt.load_checkpoint(tmp_path / "junk.pth")
    model = ToyNet()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in ToyNet(width=6).state_dict().items()}}
    ckpt.load_weights(model, wrapped)  # DDP-prefixed keys are accepted
    with pytest.raises(ckpt.CheckpointError, match="does not fit the model"):
        ckpt.load_weights(model, {"state_dict": ToyNet(width=5).state_dict()})


def _damage(path, size=4096):
    """Flip `size` bytes in the middle of a file (what the issue did to a checkpoint)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + size] = bytes(b ^ 0xFF for b in data[middle:middle + size])
    path.write_bytes(bytes(data))


def test_checkpoints_carry_a_sha256_and_a_modified_file_is_refused(tmp_path):
    import hashlib

    path = tmp_path / "iter_1.pth"
    ckpt.save_checkpoint({"state_dict": {"w": torch.arange(20000.0)}}, path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert ckpt.checksum_path(path).read_text() == f"{digest}  iter_1.pth\n"  # sha256sum -c format
    assert ckpt.verify_checksum(path) and ckpt.load_checkpoint(path)["state_dict"]["w"][-1] == 19999
    ckpt.update_latest(tmp_path, path)
    _damage(path)
    for name in (path, tmp_path / "latest.pth"):  # latest.pth checks the file it points at
        with pytest.raises(ckpt.CheckpointError, match=f"checkpoint {path} is corrupt: its sha256 does not "
                                                       "match the one recorded when it was written"):
            ckpt.load_checkpoint(name)
    ckpt.checksum_path(path).write_text("garbage\n")
    with pytest.raises(ckpt.CheckpointError, match="checksum file .* is damaged"):
        ckpt.load_checkpoint(path)
    # files without a sidecar (mmseg releases, older runs) load unverified
    plain = tmp_path / "mmseg.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}}, plain)
    assert not ckpt.verify_checksum(plain) and torch.equal(ckpt.load_checkpoint(plain)["state_dict"]["w"],
                                                          torch.ones(2))


def test_resume_falls_back_to_the_previous_good_checkpoint(tmp_path):
    trainer, _ = _toy_run(tmp_path, "run", ["train.iters=3", "train.checkpoint_interval=1"])
    work_dir = trainer.work_dir
    weights_2 = ckpt.load_checkpoint(work_dir / "iter_2.pth")["state_dict"]
    _damage(work_dir / "iter_3.pth")
    stream = io.StringIO()
    resumed = Trainer(toy_config(["train.iters=3", "train.checkpoint_interval=1"]), work_dir, resume=True,
                      model=ToyNet(), train_dataset=ToyDataset(16), progress=False, stream=stream)
    assert resumed.iteration == 2 and state_dicts_equal(resumed.model.state_dict(), weights_2)
    assert stream.getvalue() == (f"fastctx: warning: checkpoint {work_dir / 'iter_3.pth'} is corrupt: its sha256 "
                                 "does not match the one recorded when it was written (iter_3.pth.sha256); resuming "
                                 f"from the previous checkpoint {work_dir / 'iter_2.pth'} instead\n")
    resumed.fit()
    assert ckpt.verify_checksum(work_dir / "iter_3.pth")  # rewritten
    # an explicitly named checkpoint is refused, not replaced by another
    _damage(work_dir / "iter_1.pth")
    with pytest.raises(ckpt.CheckpointError, match="iter_1.pth is corrupt"):
        Trainer(toy_config(["train.iters=3"]), work_dir, resume=work_dir / "iter_1.pth", model=ToyNet(),
                train_dataset=ToyDataset(16), progress=False)
    for name in ("iter_2.pth", "iter_3.pth"):
        _damage(work_dir / name)
    with pytest.raises(ckpt.CheckpointError, match=f"iter_3.pth is corrupt.*; no earlier checkpoint in {work_dir} "
                                                   "loads either"):
        Trainer(toy_config(["train.iters=3"]), work_dir, resume=True, model=ToyNet(), train_dataset=ToyDataset(16),
                progress=False)


def test_stale_temporary_files_are_removed(tmp_path):
    """`.iter_N.pth.tmp.<pid>` left by a writer killed mid-save go at start-up and after the next save;
    a live process's temporary files stay."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    live = str(os.getppid())
    work_dir = tmp_path / "run"
    work_dir.mkdir()
    stale = [work_dir / f".iter_4.pth.tmp.{dead}", work_dir / f".iter_4.pth.sha256.tmp.{dead}"]
    kept = work_dir / f".iter_8.pth.tmp.{live}"
    for path in (*stale, kept):
        path.write_bytes(b"partial")
    os.symlink("iter_4.pth", work_dir / f".latest.pth.tmp.{dead}")  # a dangling temporary link
    Trainer(toy_config(["train.iters=1"]), work_dir, model=ToyNet(), train_dataset=ToyDataset(16), progress=False)
    assert sorted(p.name for p in work_dir.iterdir()) == [kept.name]
    stale[0].write_bytes(b"partial")
    ckpt.save_checkpoint({"x": torch.ones(1)}, work_dir / "iter_1.pth")
    assert sorted(p.name for p in work_dir.iterdir()) == [kept.name, "iter_1.pth", "iter_1.pth.sha256"]


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    torch.rand(5), np.random.normal(), random.random()  # noqa: B018 - advance the generators
    ckpt.save_checkpoint({"rng": ckpt.rng_state()}, tmp_path / "rng.pth")
    draws = (torch.rand(4), np.random.normal(size=3), np.random.normal(), [random.random() for _ in range(3)])
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(ckpt.load_checkpoint(tmp_path / "rng.pth")["rng"])
    again = (torch.rand(4), np.random.normal(size=3), np.random.normal(), [random.random() for _ in range(3)])
    assert torch.equal(draws[0], again[0]) and np.array_equal(draws[1], again[1])
    assert draws[2] == again[2] and draws[3] == again[3]


# ----------------------------------------------------------------------------------------------- progress line


def test_progress_line_on_a_terminal_and_in_a_log():
    tty = io.StringIO()
    bar = ProgressBar(3, stream=tty, is_tty=True, prefix="iter ")
    for step in range(1, 4):
        bar.update(step, {"loss": "0.5"}, force=True)
    bar.message("done")
    bar.close()
    text = tty.getvalue()
    assert text.startswith("\riter 1/3 loss 0.5") and text.count("\r") >= 4 and text.endswith("done\n")
    log = io.StringIO()
    bar = ProgressBar(5, stream=log, is_tty=False, line_interval=2)
    for step in range(1, 6):
        bar.update(step, {"loss": "1"})
    assert log.getvalue().splitlines() == ["2/5 loss 1", "4/5 loss 1", "5/5 loss 1"]
    assert format_duration(3725) == "1:02:05" and format_duration(65) == "1:05"


# ----------------------------------------------------------------------------------------------- SyncBN (1 process)


def test_make_norm_syncbn_is_torchs_class_and_keeps_state_dicts():
    norm = make_norm("SyncBN", 4)
    assert type(norm) is SyncBatchNorm and isinstance(norm, nn.SyncBatchNorm)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm1d(5), nn.ReLU()),
                          nn.SyncBatchNorm(6))
    with torch.no_grad():
        model[1].running_mean.uniform_()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weight = model[1].weight
    converted = convert_sync_batchnorm(model)
    assert type(converted[1]) is SyncBatchNorm and type(converted[2][0]) is SyncBatchNorm
    assert type(converted[3]) is SyncBatchNorm and converted[1].weight is weight
    assert state_dicts_equal(converted.state_dict(), before)
    # without a process group it is plain BatchNorm, on [B, C, H, W] and on EncModule's [B, K, D]
    x4, x3 = torch.randn(3, 4, 5, 5), torch.randn(3, 5, 7)
    bn2, bn1 = nn.BatchNorm2d(4), nn.BatchNorm1d(5)
    bn2.load_state_dict(before_prefix(before, "1.")), bn1.load_state_dict(before_prefix(before, "2.0."))
    assert_close(converted[1](x4), bn2(x4), torch.float32)
    assert_close(converted[2][0](x3), bn1(x3), torch.float32)
    assert_close(converted[1].running_mean, bn2.running_mean, torch.float32)


def before_prefix(state, prefix):
    return {k[len(prefix):]: v.clone() for k, v in state.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------------------------- AdamW, paramwise

def test_param_groups_follow_mmengines_custom_keys():
    """Every parameter's lr and weight decay as mmengine's DefaultOptimWrapperConstructor gives them (the
    longest matching key wins, so "backbone" rules the backbone's norms), on ULLMC's parameter names."""
    from mmengine.logging import MMLogger
    from mmengine.optim import DefaultOptimWrapperConstructor

    from fastctx.engine.trainer import param_groups
    from fastctx.models import build_model

    torch.manual_seed(0)
    model = build_model("ullmc_swin-tiny", 3)
    model.backbone.patch_embed.projection.weight.requires_grad_(False)  # frozen: in no group
    rules = {"backbone": {"lr_mult": 0.2}, "norm": {"decay_mult": 0.0}, "absolute_pos_embed": {"decay_mult": 0.0},
             "relative_position_bias_table": {"decay_mult": 0.0}}
    ours = {id(p): (g["lr"], g["weight_decay"], g["lr_mult"]) for g in param_groups(model, 6e-5, 0.01, rules)
            for p in g["params"]}
    MMLogger.get_current_instance().setLevel("WARNING")
    constructor = DefaultOptimWrapperConstructor(
        dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=6e-5, weight_decay=0.01)),
        paramwise_cfg=dict(custom_keys=rules))
    theirs = {id(p): (g["lr"], g["weight_decay"]) for g in constructor(model).optimizer.param_groups
              for p in g["params"] if p.requires_grad}
    assert ours.keys() == theirs.keys() and id(model.backbone.patch_embed.projection.weight) not in ours
    assert all(ours[k][:2] == pytest.approx(theirs[k], rel=1e-15) for k in ours)
    names = dict(model.named_parameters())
    decay = {n for n, p in names.items() if id(p) in ours and ours[id(p)][1] > 0}
    assert "decode_head.layers.0.norm1.weight" not in decay and "neck.blocks.0.norm2.bias" not in decay
    assert "decode_head.layers.0.relative_position_bias_table" not in decay
    assert "backbone.stages.0.blocks.0.norm1.weight" in decay  # "backbone" is the longer key
    assert ours[id(names["backbone.stages.0.blocks.0.attn.w_msa.relative_position_bias_table"])] == (6e-5, 0.0, 1.0)


def test_trainer_applies_adamw_with_paramwise_rules_and_warmup(tmp_path):
    """AdamW steps by hand (per-group lr multiplier and decay) against the trainer's, warmup included."""
    dataset = ToyDataset(16)
    torch.manual_seed(0)
    reference = ToyNet()
    extra = ["train.iters=4", "train.batch_size=4", "optim.type=AdamW", "optim.lr=0.01", "optim.weight_decay=0.1",
             "optim.betas=[0.8, 0.99]", "optim.paramwise={body.0: {lr_mult: 0.5, decay_mult: 0}}",
             "schedule.warmup_iters=2", "schedule.warmup_ratio=0.1"]
    trainer, _ = _toy_run(tmp_path, "adamw", extra, dataset=dataset)
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    body0 = list(reference.body[0].parameters())
    rest = [p for p in reference.parameters() if all(p is not q for q in body0)]
    opt = torch.optim.AdamW([dict(params=body0, weight_decay=0.0), dict(params=rest, weight_decay=0.1)],
                            betas=(0.8, 0.99))
    lrs = [PolyLR(0.01, 4, eta_min=0.0, warmup_iters=2, warmup_ratio=0.1).lr_at(t) for t in range(4)]
    assert lrs[0] == pytest.approx(0.001) and [r["lr"] for r in _records(trainer)] == lrs
    sampler = iter(TrainBatchSampler(16, 4, seed=0))
    for lr in lrs:
        batch = [dataset[key] for key in next(sampler)]
        img, label = torch.stack([b["img"] for b in batch]), torch.stack([b["label"] for b in batch])
        opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = 0.5 * lr, lr
        opt.zero_grad()
        sum(reference.loss(img, label).values()).backward()
        opt.step()
    for (name, ours), ref in zip(trainer.model.state_dict().items(), reference.state_dict().values()):
        assert_close(ours, ref, torch.float32, name)


@pytest.mark.parametrize("override, message", [
    ("optim.type=Adam", "optim.type: expected one of 'SGD', 'AdamW'"),
    ("optim.betas=[0.9, 1.0]", r"optim.betas: expected two numbers in \[0, 1\)"),
    ("optim.paramwise={norm: {decay: 0}}", "optim.paramwise.norm: expected a mapping of lr_mult and/or decay_mult"),
    ("optim.paramwise={norm: {lr_mult: -1}}", "optim.paramwise.norm: expected a mapping"),
])
def test_bad_optimizer_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("fcn_r18-d8_synthetic", [override])
