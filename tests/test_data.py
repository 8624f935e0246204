"""Datasets and transforms against mmsegmentation/mmcv/OpenCV (the oracle) and hand-computed values.

Dataset readers run on tiny fake directory trees written here; nothing is downloaded.
"""
import hashlib
import warnings

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from fastctx.data import (
    DATASETS,
    ADE20KDataset,
    CityscapesDataset,
    DatasetNotFoundError,
    Normalize,
    Pad,
    PascalContext59Dataset,
    PascalVOCDataset,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    Resize,
    build_dataset,
    train_pipeline,
)
from fastctx.data import transforms as T
from mmseg_compat import _stub_mmcv_ops
from tolerances import assert_close

_stub_mmcv_ops()
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import mmcv
    import mmseg.datasets as mmseg_datasets
    from mmcv.transforms import RandomResize as MMRandomResize
    from mmseg.datasets.transforms import LoadAnnotations as MMLoadAnnotations
    from mmseg.datasets.transforms import PackSegInputs as MMPackSegInputs
    from mmseg.datasets.transforms import PhotoMetricDistortion as MMPhotoMetricDistortion
    from mmseg.datasets.transforms import RandomCrop as MMRandomCrop
    from mmseg.datasets.transforms import RandomFlip as MMRandomFlip
    from mmseg.datasets.transforms import Resize as MMResize
    from mmseg.models.data_preprocessor import SegDataPreProcessor

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]


# ----------------------------------------------------------------------------------------------------------------
# Scripted randomness: record fastctx's draws, replay them into mmseg (which reads numpy's global functions)
# ----------------------------------------------------------------------------------------------------------------

class RecordingRng:
    """Stands in for np.random.Generator: real draws, logged; the first random() values can be forced."""

    def __init__(self, seed, forced_random=()):
        self._rng = np.random.default_rng(seed)
        self._forced = list(forced_random)
        self.log = []

    def random(self):
        value = self._forced.pop(0) if self._forced else float(self._rng.random())
        self.log.append(("random", None, value))
        return value

    def integers(self, low, high=None):
        value = int(self._rng.integers(low, high))
        self.log.append(("integers", (low, high), value))
        return value

    def uniform(self, low, high):
        value = float(self._rng.uniform(low, high))
        self.log.append(("uniform", (low, high), value))
        return value


class Replay:
    """numpy.random's functions as mmseg/mmcv call them, answering with the recorded draws in order."""

    def __init__(self, log):
        self.log = list(log)

    def _pop(self, kind, bounds=None):
        assert self.log, f"mmseg drew {kind} after fastctx stopped drawing"
        got_kind, got_bounds, value = self.log.pop(0)
        assert got_kind == kind, f"mmseg drew {kind}{bounds} where fastctx drew {got_kind}{got_bounds}"
        if kind == "integers" and got_bounds[1] is None:  # integers(n) draws from [0, n)
            got_bounds = (0, got_bounds[0])
        if bounds is not None:
            assert tuple(got_bounds) == tuple(bounds), f"{kind}: mmseg bounds {bounds}, fastctx {got_bounds}"
        return value

    def random_sample(self, size=None):
        return self._pop("random")

    def randint(self, low, high=None, size=None):
        return self._pop("integers", (0, low) if high is None else (low, high))

    def uniform(self, low=0.0, high=1.0, size=None):
        return self._pop("uniform", (low, high))

    def choice(self, options, p=None):
        # mmcv RandomFlip: choice([direction, None], p=[prob, 1 - prob]); fastctx flips iff random() < prob.
        value = self._pop("random")
        return options[0] if value < p[0] else options[1]

    def install(self, monkeypatch):
        for name in ("random_sample", "randint", "uniform", "choice"):
            monkeypatch.setattr(np.random, name, getattr(self, name))


# ----------------------------------------------------------------------------------------------------------------
# Fake dataset trees
# ----------------------------------------------------------------------------------------------------------------

def _write_img(path, hw, seed, fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*hw, 3), dtype=np.uint8)).save(path, format=fmt)


def _write_label(path, label, palette=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(label.astype(np.uint8), mode="L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    im.save(path)


def _label(hw, seed, high):
    return np.random.default_rng(seed).integers(0, high, hw).astype(np.uint8)


def _read_rgb(path):
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture
def cityscapes_root(tmp_path):
    root = tmp_path / "cityscapes"
    for split, cities in {"train": ["zurich", "aachen"], "val": ["lindau"]}.items():
        for c, city in enumerate(cities):
            for k in range(2):
                stem = f"{city}_{k:06d}_000019"
                _write_img(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", (24, 48), c * 10 + k)
                lab = _label((24, 48), c * 10 + k, 19)
                lab[0, :5] = 255
                _write_label(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png", lab)
    # files that must be ignored
    _write_img(root / "leftImg8bit" / "train" / "aachen" / "notes.png", (4, 4), 0)
    return root


@pytest.fixture
def ade_root(tmp_path):
    root = tmp_path / "ade" / "ADEChallengeData2016"
    for split, n in (("training", 3), ("validation", 2)):
        for k in range(n):
            name = f"ADE_{split[:5]}_{k:08d}"
            _write_img(root / "images" / split / f"{name}.jpg", (20, 30), k, fmt="JPEG")
            lab = _label((20, 30), k, 151)
            lab[0, :4] = [0, 1, 150, 255]
            _write_label(root / "annotations" / split / f"{name}.png", lab)
    return root


def _shift_ids(label):
    return np.where(label == 255, 255, (label.astype(int) + 1) % 21)


@pytest.fixture
def voc_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2012"
    train, val, aug = ["2007_000032", "2007_000039"], ["2007_000033"], ["2008_000001", "2007_000032", "2008_000002"]
    for k, name in enumerate(sorted(set(train + val + aug))):
        _write_img(root / "JPEGImages" / f"{name}.jpg", (16, 20), k, fmt="JPEG")
        lab = _label((16, 20), k, 21)
        lab[3, :] = 255
        if name in train + val:
            _write_label(root / "SegmentationClass" / f"{name}.png", lab, palette=True)
        if name in aug:
            _write_label(root / "SegmentationClassAug" / f"{name}.png", _shift_ids(lab))
    sets = root / "ImageSets" / "Segmentation"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(train) + "\n")
    (sets / "val.txt").write_text("\n".join(val) + "\n\n")
    (sets / "aug.txt").write_text("\n".join(aug) + "\n")
    return root


@pytest.fixture
def context_root(tmp_path):
    root = tmp_path / "VOCdevkit" / "VOC2010"
    train, val = ["2008_000002", "2008_000003"], ["2008_000007"]
    for k, name in enumerate(train + val):
        _write_img(root / "JPEGImages" / f"{name}.jpg", (18, 14), k, fmt="JPEG")
        _write_label(root / "SegmentationClassContext" / f"{name}.png", _label((18, 14), k, 60))
    sets = root / "ImageSets" / "SegmentationContext"
    sets.mkdir(parents=True)
    (sets / "train.txt").write_text("\n".join(train))
    (sets / "val.txt").write_text("\n".join(val))
    return root


def _mmseg_dataset(cls, root, img_path, seg_map_path, ann_file=""):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = cls(data_root=str(root), data_prefix=dict(img_path=img_path, seg_map_path=seg_map_path),
                 ann_file=ann_file, pipeline=[], serialize_data=False)
    return [(d["img_path"], d["seg_map_path"]) for d in ds.data_list], ds.metainfo


def _mmseg_label(path, reduce_zero_label):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = MMLoadAnnotations()(dict(seg_map_path=str(path), reduce_zero_label=reduce_zero_label, seg_fields=[]))
    return out["gt_seg_map"]


def _ours(ds):
    return [(str(s.img_path), str(s.label_path)) for s in ds.samples]


def _check_metainfo(ds, meta):
    assert ds.classes == tuple(meta["classes"])
    assert ds.palette == [list(c) for c in meta["palette"]]
    assert ds.num_classes == len(meta["classes"]) and ds.ignore_index == 255


# ----------------------------------------------------------------------------------------------------------------
# Readers: discovery, label mapping, metadata, against mmseg's own dataset classes
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("split", ["train", "val"])
def test_cityscapes_matches_mmseg(cityscapes_root, split):
    ours = CityscapesDataset(cityscapes_root, split)
    theirs, meta = _mmseg_dataset(mmseg_datasets.CityscapesDataset, cityscapes_root, f"leftImg8bit/{split}",
                                  f"gtFine/{split}")
    assert _ours(ours) == theirs and len(ours) == (4 if split == "train" else 2)
    _check_metainfo(ours, meta)
    assert ours.samples[0].name == ("aachen_000000_000019" if split == "train" else "lindau_000000_000019")
    for i, (img_path, seg_path) in enumerate(theirs):
        img, label, _ = ours.load(i)
        np.testing.assert_array_equal(img, _read_rgb(img_path))
        np.testing.assert_array_equal(label, _mmseg_label(seg_path, False))


def test_ade20k_matches_mmseg_and_reduces_zero_label(ade_root):
    # root may be ADEChallengeData2016 itself or the folder holding it
    for root in (ade_root, ade_root.parent):
        ours = ADE20KDataset(root, "train")
        theirs, meta = _mmseg_dataset(mmseg_datasets.ADE20KDataset, ade_root, "images/training",
                                      "annotations/training")
        assert _ours(ours) == theirs and len(ours) == 3
    _check_metainfo(ours, meta)
    assert len(ADE20KDataset(ade_root, "val")) == len(ADE20KDataset(ade_root, "validation")) == 2
    for i, (img_path, seg_path) in enumerate(theirs):
        img, label, _ = ours.load(i)
        np.testing.assert_array_equal(img, _read_rgb(img_path))
        np.testing.assert_array_equal(label, _mmseg_label(seg_path, True))
        # hand-written pixels: 0 -> 255 (ignored), k -> k - 1, 255 stays ignored
        np.testing.assert_array_equal(label[0, :4], [255, 0, 149, 255])
        raw = np.asarray(Image.open(seg_path))
        np.testing.assert_array_equal(label[raw > 0], raw[raw > 0] - 1 + (raw[raw > 0] == 255))


def test_pascal_voc_split_files_and_aug(voc_root):
    ours = PascalVOCDataset(voc_root, "train")
    theirs, meta = _mmseg_dataset(mmseg_datasets.PascalVOCDataset, voc_root, "JPEGImages", "SegmentationClass",
                                  "ImageSets/Segmentation/train.txt")
    assert _ours(ours) == theirs
    _check_metainfo(ours, meta)
    assert [s.name for s in ours.samples] == ["2007_000032", "2007_000039"]
    # palette-mode PNG: the ids, not the colours; the 255 border row survives
    _, label, _ = ours.load(0)
    np.testing.assert_array_equal(label, _mmseg_label(theirs[0][1], False))
    assert (label[3] == 255).all() and label.max() == 255 and label[label != 255].max() < 21

    # aug: train.txt with SegmentationClass, then aug.txt with SegmentationClassAug (mmseg ConcatDataset order)
    aug = PascalVOCDataset(voc_root.parent, "train", aug=True)  # root may also be VOCdevkit
    theirs_aug, _ = _mmseg_dataset(mmseg_datasets.PascalVOCDataset, voc_root, "JPEGImages", "SegmentationClassAug",
                                   "ImageSets/Segmentation/aug.txt")
    assert _ours(aug) == theirs + theirs_aug and len(aug) == 5
    _, label_aug, name = aug.load(3)
    assert name == "2007_000032"  # listed in both train.txt and aug.txt: kept twice, as mmseg does
    np.testing.assert_array_equal(label_aug, _shift_ids(label))  # the Aug file, not SegmentationClass

    val = PascalVOCDataset(voc_root, "val")
    assert [s.name for s in val.samples] == ["2007_000033"]  # blank lines skipped
    with pytest.raises(ValueError, match="aug=True"):
        PascalVOCDataset(voc_root, "val", aug=True)


def test_pascal_context59_reduces_zero_label(context_root):
    ours = PascalContext59Dataset(context_root, "train")
    theirs, meta = _mmseg_dataset(mmseg_datasets.PascalContextDataset59, context_root, "JPEGImages",
                                  "SegmentationClassContext", "ImageSets/SegmentationContext/train.txt")
    assert _ours(ours) == theirs
    _check_metainfo(ours, meta)
    for i, (_, seg_path) in enumerate(theirs):
        _, label, _ = ours.load(i)
        np.testing.assert_array_equal(label, _mmseg_label(seg_path, True))
        raw = np.asarray(Image.open(seg_path))
        np.testing.assert_array_equal(label == 255, raw == 0)


def test_missing_paths_raise_clear_errors(tmp_path, cityscapes_root, voc_root, ade_root, context_root):
    def raises(fn, *fragments):
        with pytest.raises(DatasetNotFoundError) as info:
            fn()
        msg = str(info.value)
        assert "Expected layout" in msg
        for f in fragments:
            assert str(f) in msg, f"{f} not in: {msg}"
        return msg

    raises(lambda: CityscapesDataset(tmp_path / "nowhere"), tmp_path / "nowhere", "_leftImg8bit.png")
    raises(lambda: CityscapesDataset(cityscapes_root, "test"), cityscapes_root / "leftImg8bit" / "test",
           "gtFine/test/<city>/<name>_gtFine_labelTrainIds.png")
    (cityscapes_root / "gtFine/train/zurich/zurich_000001_000019_gtFine_labelTrainIds.png").unlink()
    raises(lambda: CityscapesDataset(cityscapes_root), "zurich_000001_000019_gtFine_labelTrainIds.png")

    raises(lambda: ADE20KDataset(tmp_path), tmp_path / "images" / "training", "annotations/training/<name>.png")
    (ade_root / "images" / "validation" / "ADE_valid_00000001.jpg").unlink()
    (ade_root / "images" / "validation" / "ADE_valid_00000000.jpg").unlink()
    raises(lambda: ADE20KDataset(ade_root, "val"), "no .jpg images", ade_root / "images" / "validation")

    (voc_root / "ImageSets" / "Segmentation" / "aug.txt").unlink()
    raises(lambda: PascalVOCDataset(voc_root, aug=True), voc_root / "ImageSets" / "Segmentation" / "aug.txt")
    (voc_root / "JPEGImages" / "2007_000039.jpg").unlink()
    raises(lambda: PascalVOCDataset(voc_root), voc_root / "JPEGImages" / "2007_000039.jpg")

    (context_root / "ImageSets" / "SegmentationContext" / "val.txt").unlink()
    raises(lambda: PascalContext59Dataset(context_root, "val"), "ImageSets/SegmentationContext/val.txt")

    with pytest.raises(ValueError, match="valid splits"):
        CityscapesDataset(cityscapes_root, "training")
    with pytest.raises(ValueError, match="needs root"):
        build_dataset("cityscapes", None)
    with pytest.raises(KeyError, match="registered"):
        build_dataset("kitti", cityscapes_root)


def test_bad_label_files_raise(tmp_path, cityscapes_root):
    ds = CityscapesDataset(cityscapes_root, "val")
    Image.fromarray(np.zeros((24, 48, 3), np.uint8)).save(ds.samples[0].label_path)  # a colour map, not ids
    with pytest.raises(ValueError, match="single-channel"):
        ds.load(0)
    _write_label(ds.samples[1].label_path, np.zeros((10, 48)))
    with pytest.raises(ValueError, match="same height and width"):
        ds.load(1)


def test_registry_defaults():
    expected = {"cityscapes": (19, (512, 1024), (2048, 1024)), "ade20k": (150, (512, 512), (2048, 512)),
                "pascal_voc12": (21, (512, 512), (2048, 512)), "pascal_context_59": (59, (480, 480), (520, 520))}
    for name, (classes, crop, scale) in expected.items():
        info = DATASETS[name]
        assert (info.num_classes, info.crop_size, info.test_scale) == (classes, crop, scale)
        assert len(info.cls.classes) == classes
    assert "synthetic" in DATASETS


# ----------------------------------------------------------------------------------------------------------------
# Items, pipelines, determinism
# ----------------------------------------------------------------------------------------------------------------

def _key_bytes(item):
    return hashlib.sha1(item["img"].numpy().tobytes() + item["label"].numpy().tobytes()).hexdigest()


def test_train_items_are_fixed_size_deterministic_and_collate(cityscapes_root):
    ds = build_dataset("cityscapes", cityscapes_root, "train", crop_size=(16, 32), scale=(48, 24))
    item = ds[(1, 123)]
    assert item["img"].dtype == torch.float32 and item["img"].shape == (3, 16, 32)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (16, 32)
    assert item["name"] == "aachen_000001_000019" and item["ori_shape"] == (24, 48)
    # same (index, seed) -> identical; ds[i] is ds[(i, i)]; other seeds -> other augmentations
    assert _key_bytes(ds[(1, 123)]) == _key_bytes(item)
    assert _key_bytes(ds[2]) == _key_bytes(ds[(2, 2)])
    assert len({_key_bytes(ds[(1, s)]) for s in range(8)}) == 8
    # labels stay ids (or padding/ignore) through resize, crop, flip and pad
    assert set(item["label"].unique().tolist()) <= set(range(19)) | {255}
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["img"].shape == (4, 3, 16, 32) and batch["label"].shape == (4, 16, 32)
    with pytest.raises(IndexError):
        ds[4]
    with pytest.raises(TypeError, match="index"):
        ds[(1, 2, 3)]


def test_test_pipeline_resizes_image_only(ade_root):
    ds = build_dataset("ade20k", ade_root, "val", scale=(60, 15))
    item = ds[0]
    # keep ratio within (long 60, short 15): factor min(60/30, 15/20) = 0.75 -> 15 x 22.5 -> (15, 23)
    assert item["img"].shape == (3, 15, 23)
    assert item["label"].shape == (20, 30) and item["ori_shape"] == (20, 30)
    _, label, _ = ds.load(0)
    np.testing.assert_array_equal(item["label"].numpy(), label)
    # no randomness in the test pipeline: the seed does not matter
    assert _key_bytes(ds[(0, 1)]) == _key_bytes(ds[(0, 2)])


def test_default_pipelines_use_mmseg_defaults(cityscapes_root):
    ds = CityscapesDataset(cityscapes_root, "train")
    resize, crop = ds.pipeline.transforms[0], ds.pipeline.transforms[1]
    assert resize.scale == (2048, 1024) and resize.ratio_range == (0.5, 2.0)
    assert crop.crop_size == (512, 1024) and crop.cat_max_ratio == 0.75
    assert ds[0]["img"].shape == (3, 512, 1024)
    val = CityscapesDataset(cityscapes_root, "val")
    assert val.pipeline.transforms[0].scale == (2048, 1024) and not val.pipeline.transforms[0].resize_label


def _mmseg_train_sample(img_rgb, label, log, monkeypatch, crop_size, scale):
    """mmseg's train pipeline + SegDataPreProcessor on the same data, replaying fastctx's random draws."""
    Replay(log).install(monkeypatch)
    results = dict(img=np.ascontiguousarray(img_rgb[..., ::-1]), gt_seg_map=label.copy(), seg_fields=["gt_seg_map"],
                   img_shape=img_rgb.shape[:2], ori_shape=img_rgb.shape[:2], img_path="", seg_map_path="",
                   reduce_zero_label=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in (MMRandomResize(scale=scale, ratio_range=(0.5, 2.0), keep_ratio=True),
                  MMRandomCrop(crop_size=crop_size, cat_max_ratio=0.75), MMRandomFlip(prob=0.5),
                  MMPhotoMetricDistortion(), MMPackSegInputs()):
            results = t(results)
        pre = SegDataPreProcessor(mean=MEAN, std=STD, bgr_to_rgb=True, size=crop_size, pad_val=0, seg_pad_val=255)
        out = pre(dict(inputs=[results["inputs"]], data_samples=[results["data_samples"]]), training=True)
    return out["inputs"][0], out["data_samples"][0].gt_sem_seg.data[0]


@pytest.mark.parametrize("seed", range(6))
def test_train_pipeline_matches_mmseg_end_to_end(seed, monkeypatch):
    # A 40 x 64 image and scale (64, 40): the first draw is forced to ratio 1, so the resize is the identity in
    # both libraries (resampling is compared on its own below) and every other step must agree exactly. Crops
    # stay 64 pixels wide: OpenCV converts HSV -> RGB in blocks of 64 pixels per row and rounds (instead of
    # truncating) on a row's remainder, so mmseg itself is only self-consistent on such widths.
    rng_img = np.random.default_rng(100 + seed)
    img = rng_img.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    label = np.zeros((40, 64), np.uint8)
    label[:, 40:] = rng_img.integers(0, 5, (40, 24))
    label[:3] = 255
    crop_size = (32, 64) if seed % 2 else (48, 96)  # larger than the image: crop is clipped, then padded
    rng = RecordingRng(seed, forced_random=[1 / 3])  # 0.5 + (1/3) * 1.5 = 1.0
    sample = train_pipeline(crop_size, (64, 40))({"img": img, "label": label}, rng)
    ours_img = torch.from_numpy(np.ascontiguousarray(sample["img"].transpose(2, 0, 1)))
    ours_label = torch.from_numpy(sample["label"].astype(np.int64))
    theirs_img, theirs_label = _mmseg_train_sample(img, label, rng.log, monkeypatch, crop_size, (64, 40))
    assert ours_img.shape == (3, *crop_size) and ours_label.shape == crop_size
    assert_close(ours_img, theirs_img)
    torch.testing.assert_close(ours_label, theirs_label.long(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# Transforms one by one
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("hw,scale", [((24, 48), (2048, 1024)), ((375, 500), (2048, 512)), ((500, 333), (520, 520)),
                                      ((7, 3), 2.5), ((1024, 2048), (1024, 512))])
def test_rescale_size_matches_mmcv(hw, scale):
    w, h = mmcv.rescale_size(hw[::-1], scale)
    assert T.rescale_size(hw, scale) == (h, w)


@pytest.mark.parametrize("src,dst", [((7, 9), (15, 4)), ((20, 30), (11, 13)), ((16, 16), (32, 24)), ((5, 8), (5, 17))])
def test_resize_image_matches_opencv_bilinear(src, dst):
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (*src, 3)).astype(np.float32)
    ref = cv2.resize(img, dst[::-1], interpolation=cv2.INTER_LINEAR)
    assert_close(torch.from_numpy(T.resize_image(img, dst)), torch.from_numpy(ref))
    # uint8: same maths, rounded; OpenCV's 11-bit fixed-point weights may land one grey level away
    img8 = rng.integers(0, 256, (*src, 3), dtype=np.uint8)
    ours, ref8 = T.resize_image(img8, dst), cv2.resize(img8, dst[::-1], interpolation=cv2.INTER_LINEAR)
    assert ours.dtype == np.uint8 and ours.shape == (*dst, 3)
    assert np.abs(ours.astype(int) - ref8).max() <= 1


def test_resize_image_by_hand():
    # 2x upsampling with half-pixel centres: output x maps to (x + 0.5) / 2 - 0.5, clamped at the borders.
    img = np.array([[0, 100], [200, 40]], np.uint8)[..., None].repeat(3, axis=2)
    out = T.resize_image(img, (4, 4))[..., 0]
    row0 = [0, 25, 75, 100]      # 0, 0.25 * 100, 0.75 * 100, 100
    row3 = [200, 160, 80, 40]    # 200, 0.75 * 200 + 0.25 * 40, 0.25 * 200 + 0.75 * 40, 40
    np.testing.assert_array_equal(out[0], row0)
    np.testing.assert_array_equal(out[3], row3)
    # row 1 = 0.75 * row0 + 0.25 * row3 = [50, 58.75, 76.25, 85]
    np.testing.assert_array_equal(out[1], [50, 59, 76, 85])
    # row 2 = 0.25 * row0 + 0.75 * row3 = [150, 126.25, 78.75, 55]
    np.testing.assert_array_equal(out[2], [150, 126, 79, 55])
    # ties round half up: [0, 2] -> [0, 0.5, 1.5, 2]
    ties = T.resize_image(np.array([[[0] * 3, [2] * 3]], np.uint8), (1, 4))[0, :, 0]
    np.testing.assert_array_equal(ties, [0, 1, 2, 2])


@pytest.mark.parametrize("src,dst", [((7, 9), (15, 4)), ((20, 30), (11, 13)), ((3, 3), (10, 10)), ((97, 61), (40, 122)),
                                     ((512, 1024), (384, 768))])
def test_resize_label_matches_opencv_nearest(src, dst):
    label = np.random.default_rng(1).integers(0, 256, src).astype(np.uint8)
    ref = cv2.resize(label, dst[::-1], interpolation=cv2.INTER_NEAREST)
    np.testing.assert_array_equal(T.resize_label(label, dst), ref)


def test_resize_matches_mmseg_resize_label():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    label = rng.integers(0, 19, (37, 53)).astype(np.uint8)
    for scale in [(100, 30), (20, 20), (2048, 1024)]:
        ours = Resize(scale)({"img": img, "label": label}, None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs = MMResize(scale=scale, keep_ratio=True)(dict(img=img, gt_seg_map=label, seg_fields=["gt_seg_map"]))
        assert ours["img"].shape == theirs["img"].shape
        np.testing.assert_array_equal(ours["label"], theirs["gt_seg_map"])
    out = Resize((30, 10), keep_ratio=False, resize_label=False)({"img": img, "label": label}, None)
    assert out["img"].shape == (10, 30, 3) and out["label"] is label


class _Scripted:
    """A generator that answers with fixed values (hand-computed expectations)."""

    def __init__(self, random=(), integers=()):
        self._random, self._integers = list(random), list(integers)

    def random(self):
        return self._random.pop(0)

    def integers(self, low, high=None):
        value = self._integers.pop(0)
        assert (low if high is None else low) <= value < (high if high is not None else low)
        return value


def test_random_resize_scale_by_hand():
    img = np.zeros((50, 100, 3), np.uint8)
    t = RandomResize((2048, 512), ratio_range=(0.5, 2.0))
    # ratio = 0.5 + u * 1.5; scale = (int(2048 r), int(512 r))
    out = t({"img": img, "label": np.zeros((50, 100), np.uint8)}, _Scripted(random=[1 / 6]))  # r = 0.75
    # (1536, 384): factor min(1536/100, 384/50) = 7.68 -> (384, 768)
    assert out["img"].shape == (384, 768, 3) and out["label"].shape == (384, 768)


def test_random_crop_keeps_alignment_and_rejects_dominated_crops():
    h, w = 20, 30
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy, xx, yy * 0], -1).astype(np.uint8)  # pixel value = its coordinates
    label = np.zeros((h, w), np.uint8)
    label[:, 20:] = 1 + (yy[:, 20:] + xx[:, 20:]) % 3  # left 20 columns: one class; right: three classes

    crop = RandomCrop((10, 10), cat_max_ratio=0.75)
    # first window (top 2, left 0) is all class 0: rejected; second (top 5, left 20) has 3 classes: kept
    out = crop({"img": img.copy(), "label": label.copy()}, _Scripted(integers=[2, 0, 5, 20]))
    np.testing.assert_array_equal(out["img"][..., 0], yy[5:15, 20:30])
    np.testing.assert_array_equal(out["img"][..., 1], xx[5:15, 20:30])
    np.testing.assert_array_equal(out["label"], label[5:15, 20:30])

    # ignore pixels do not count: a window of class 0 + 255 is still a single class -> rejected
    label2 = label.copy()
    label2[:10, :10][::2] = 255
    box = crop.sample_box({"img": img, "label": label2}, _Scripted(integers=[0, 0, 5, 20]))
    assert box == (5, 15, 20, 30)
    # after 10 rejected retries the 11th window is kept unchecked (mmseg's loop)
    box = crop.sample_box({"img": img, "label": label}, _Scripted(integers=[0, 0] * 10 + [3, 4]))
    assert box == (3, 13, 4, 14)
    # cat_max_ratio = 1: no check, one draw
    assert RandomCrop((10, 10)).sample_box({"img": img}, _Scripted(integers=[1, 2])) == (1, 11, 2, 12)
    # a crop larger than the image keeps the whole image
    out = RandomCrop((40, 50))({"img": img, "label": label}, _Scripted(integers=[0, 0]))
    assert out["img"].shape == (20, 30, 3)


@pytest.mark.parametrize("seed", range(4))
def test_random_crop_matches_mmseg(seed, monkeypatch):
    rng_data = np.random.default_rng(seed)
    label = np.zeros((60, 80), np.uint8)
    label[:, 50:] = rng_data.integers(1, 3, (60, 30))
    img = rng_data.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    rng = RecordingRng(seed)
    ours = RandomCrop((24, 24), cat_max_ratio=0.75)({"img": img, "label": label}, rng)
    Replay(rng.log).install(monkeypatch)
    theirs = MMRandomCrop((24, 24), cat_max_ratio=0.75)(dict(img=img, gt_seg_map=label, seg_fields=["gt_seg_map"]))
    np.testing.assert_array_equal(ours["img"], theirs["img"])
    np.testing.assert_array_equal(ours["label"], theirs["gt_seg_map"])


def test_random_flip():
    img = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    label = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
    out = RandomFlip(0.5)({"img": img, "label": label}, _Scripted(random=[0.49]))
    np.testing.assert_array_equal(out["label"], [[2, 1, 0], [5, 4, 3]])
    np.testing.assert_array_equal(out["img"][:, 0], img[:, 2])
    out = RandomFlip(0.5)({"img": img, "label": label}, _Scripted(random=[0.5]))
    assert out["label"] is label


def test_rgb_to_hsv_matches_opencv():
    rng = np.random.default_rng(3)
    colours = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
    levels = np.array([0, 1, 2, 127, 128, 254, 255], np.uint8)  # greys, primaries, ties between channels
    corners = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(1, -1, 3)
    for img in (colours, corners):
        ref = cv2.cvtColor(np.ascontiguousarray(img[..., ::-1]), cv2.COLOR_BGR2HSV)
        np.testing.assert_array_equal(T.rgb_to_hsv(img), ref)


def test_hsv_to_rgb_matches_opencv():
    # rows whose length is a multiple of 64 pixels: OpenCV converts them entirely on its vectorised path
    rng = np.random.default_rng(4)
    hsv = np.stack([rng.integers(0, 180, (256, 1024)), rng.integers(0, 256, (256, 1024)),
                    rng.integers(0, 256, (256, 1024))], -1).astype(np.uint8)
    ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)[..., ::-1]
    np.testing.assert_array_equal(T.hsv_to_rgb(hsv), ref)


@pytest.mark.parametrize("seed", range(8))
def test_photometric_distortion_matches_mmseg(seed, monkeypatch):
    img = np.random.default_rng(seed).integers(0, 256, (16, 64, 3), dtype=np.uint8)
    rng = RecordingRng(seed)
    ours = PhotoMetricDistortion()({"img": img.copy()}, rng)["img"]
    log = rng.log
    assert [k for k, _, _ in log].count("integers") >= 5  # 4 coins + the mode at least
    Replay(log).install(monkeypatch)
    theirs = MMPhotoMetricDistortion()(dict(img=np.ascontiguousarray(img[..., ::-1])))["img"][..., ::-1]
    np.testing.assert_array_equal(ours, theirs)


def test_photometric_distortion_draw_order():
    # every coin up, contrast first (mode 1): brightness, mode, contrast, saturation, hue
    class AllOn(RecordingRng):
        def __init__(self):
            self.log = []

        def integers(self, low, high=None):
            value = -18 if high is not None else 1
            self.log.append(("integers", (low, high), value))
            return value

        def uniform(self, low, high):
            self.log.append(("uniform", (low, high), low))
            return low

    scripted = AllOn()
    img = np.full((2, 64, 3), 200, np.uint8)
    out = PhotoMetricDistortion()({"img": img}, scripted)["img"]
    assert [(k, b) for k, b, _ in scripted.log] == [
        ("integers", (2, None)), ("uniform", (-32, 32)),        # brightness -32
        ("integers", (2, None)),                                 # mode 1: contrast now
        ("integers", (2, None)), ("uniform", (0.5, 1.5)),        # contrast x0.5
        ("integers", (2, None)), ("uniform", (0.5, 1.5)),        # saturation x0.5
        ("integers", (2, None)), ("integers", (-18, 18)),        # hue -18
    ]
    # grey stays grey through saturation/hue: (200 - 32) * 0.5 = 84
    np.testing.assert_array_equal(out, np.full((2, 64, 3), 84, np.uint8))


def test_normalize_and_pad_match_mmseg_preprocessor():
    img = np.random.default_rng(5).integers(0, 256, (13, 17, 3), dtype=np.uint8)
    label = np.random.default_rng(6).integers(0, 21, (13, 17)).astype(np.uint8)
    ours = Pad((16, 20))(Normalize()({"img": img, "label": label}, None), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        packed = MMPackSegInputs()(dict(img=np.ascontiguousarray(img[..., ::-1]), gt_seg_map=label,
                                        seg_fields=["gt_seg_map"], img_shape=(13, 17), ori_shape=(13, 17)))
        pre = SegDataPreProcessor(mean=MEAN, std=STD, bgr_to_rgb=True, size=(16, 20), pad_val=0, seg_pad_val=255)
        out = pre(dict(inputs=[packed["inputs"]], data_samples=[packed["data_samples"]]), training=True)
    ours_img = torch.from_numpy(np.ascontiguousarray(ours["img"].transpose(2, 0, 1)))
    assert_close(ours_img, out["inputs"][0])
    np.testing.assert_array_equal(ours["label"], out["data_samples"][0].gt_sem_seg.data[0].numpy())
    # by hand: padded image pixels are 0 after normalisation, padded labels 255; the top-left is untouched
    assert (ours["img"][13:] == 0).all() and (ours["img"][:, 17:] == 0).all()
    assert (ours["label"][13:] == 255).all() and (ours["label"][:, 17:] == 255).all()
    expected = (img[0, 0].astype(np.float32) - np.float32(MEAN)) / np.float32(STD)
    np.testing.assert_array_equal(ours["img"][0, 0], expected)
    assert ours["img"].dtype == np.float32


def test_transform_input_errors():
    with pytest.raises(ValueError, match="H x W x 3"):
        Normalize()({"img": np.zeros((4, 4), np.uint8)}, None)
    with pytest.raises(TypeError, match="uint8"):
        PhotoMetricDistortion()({"img": np.zeros((4, 4, 3), np.float32)}, None)
    with pytest.raises(ValueError, match="crop_size"):
        RandomCrop((0, 4))
    with pytest.raises(ValueError, match="ratio_range"):
        RandomResize((10, 10), ratio_range=(2.0, 1.0))
