"""Readers for mmsegmentation's on-disk dataset layouts, and the registry :func:`build_dataset` reads.

Items are the dicts of :class:`~fastctx.data.base.SegmentationDataset`; nothing is ever downloaded: a missing
root, folder, split file or listed file raises :class:`DatasetNotFoundError` naming the path and the layout.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from . import metainfo
from .base import DatasetError, DatasetNotFoundError, Pipeline, SegmentationDataset
from .synthetic import SyntheticScenes
from .transforms import _pair, test_pipeline, train_pipeline

__all__ = [
    "ADE20KDataset", "CityscapesDataset", "DATASETS", "DatasetError", "DatasetInfo", "DatasetNotFoundError",
    "FileSegmentationDataset",
    "PascalContext59Dataset", "PascalVOCDataset", "SampleFiles", "SegmentationDataset", "build_dataset",
    "load_image", "load_label",
]

@dataclass(frozen=True)
class SampleFiles:
    """One sample on disk."""

    name: str
    img_path: Path
    label_path: Path


def _decode(path, what: str, rgb: bool = False) -> tuple[str, np.ndarray]:
    """(PIL mode as stored, pixels; converted to RGB if `rgb`); DatasetError naming the file if it cannot be
    decoded (truncated, corrupt, not an image)."""
    try:
        with Image.open(path) as im:
            return im.mode, np.array(im.convert("RGB") if rgb and im.mode != "RGB" else im)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # what PIL raises for bad files
        raise DatasetError(f"cannot read {what} {path}: {exc}") from None


def load_image(path: str | os.PathLike) -> np.ndarray:
    """H x W x 3 uint8 RGB (grey, palette, RGBA and CMYK images are converted)."""
    return _decode(path, "image", rgb=True)[1].astype(np.uint8, copy=False)


def load_label(path: str | os.PathLike) -> np.ndarray:
    """H x W uint8 label ids from a single-channel (grey or palette-index) PNG, as mmseg reads them.

    16-bit and 32-bit grey maps are accepted when their ids fit 0..255.
    """
    mode, label = _decode(path, "label map")
    if label.ndim != 2:
        raise DatasetError(
            f"label map {path} has mode {mode} with shape {label.shape}: expected a single-channel image of class "
            "ids (grey 'L' or palette 'P' PNG), not a colour visualisation")
    if label.dtype.kind == "f":
        raise DatasetError(f"label map {path} holds floating-point values (mode {mode}): expected integer class ids")
    if label.dtype != np.uint8:
        if label.size and (label.min() < 0 or label.max() > 255):
            raise DatasetError(f"label map {path} (mode {mode}) has ids {int(label.min())}..{int(label.max())}, "
                               "outside 0..255: expected class ids with 255 = ignore")
        label = label.astype(np.uint8)
    return label


def _reduce_zero_label(label: np.ndarray) -> np.ndarray:
    # 0 (unlabelled "other") -> ignore, class k -> k - 1; 255 stays ignore.
    out = label.astype(np.int16) - 1
    out[(label == 0) | (label == 255)] = 255
    return out.astype(np.uint8)


class FileSegmentationDataset(SegmentationDataset):
    """A dataset given as a list of (image, label) files; subclasses only find the files."""

    reduce_zero_label: bool = False
    #: mmseg's defaults for the standard pipelines: training crop (h, w) and test resize scale (w, h).
    crop_size: tuple[int, int] = (512, 512)
    test_scale: tuple[int, int] = (2048, 512)

    def __init__(self, samples: Sequence[SampleFiles], pipeline: Pipeline | Sequence[Pipeline] | None = None,
                 augment: bool = False):
        self.samples = list(samples)
        super().__init__(pipeline, augment)

    def default_pipeline(self, augment: bool) -> Pipeline:
        if augment:
            return train_pipeline(self.crop_size, self.test_scale)
        return test_pipeline(self.test_scale)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        files = self.samples[index]
        img = load_image(files.img_path)
        label = load_label(files.label_path)
        if label.shape != img.shape[:2]:
            raise DatasetError(f"image {files.img_path} is {img.shape[:2]} but its label {files.label_path} is "
                               f"{label.shape}: they must have the same height and width")
        self._check_ids(label, files.label_path)
        if self.reduce_zero_label:
            label = _reduce_zero_label(label)
        return img, label, files.name

    def _check_ids(self, label: np.ndarray, path: Path) -> None:
        """Class ids as stored: 0..K-1 (0..K with reduce_zero_label, where 0 is ignored) or ignore_index."""
        highest = self.num_classes if self.reduce_zero_label else self.num_classes - 1
        if not label.size or label.max() <= highest:
            return
        bad = np.unique(label[(label > highest) & (label != self.ignore_index)])
        if bad.size:
            shown = ", ".join(map(str, bad[:8].tolist())) + (", ..." if bad.size > 8 else "")
            raise DatasetError(f"label map {path} has class ids {shown} outside 0..{highest} for the "
                               f"{self.num_classes} classes of {type(self).__name__} ({self.ignore_index} = ignore)")


# --------------------------------------------------------------------------------------------------------------
# File discovery helpers
# --------------------------------------------------------------------------------------------------------------

def _require(path: Path, kind: str, dataset: str, layout: str) -> Path:
    exists = path.is_dir() if kind == "directory" else path.is_file()
    if not exists:
        raise DatasetNotFoundError(f"{dataset}: expected {kind} {path} (not found).\nExpected layout:\n{layout}")
    return path


def _resolve_root(root: str | os.PathLike | None, dataset: str, marker: str, subfolder: str, layout: str) -> Path:
    """``root`` itself when it holds ``marker``; else ``root/subfolder`` (e.g. VOCdevkit/VOC2012) when that does."""
    if root is None:
        raise ValueError(f"{dataset} needs root=<dataset folder>.\nExpected layout:\n{layout}")
    root = Path(root).expanduser()
    _require(root, "directory", dataset, layout)
    if not (root / marker).exists() and (root / subfolder / marker).exists():
        root = root / subfolder
    return root


def _read_split_file(path: Path, dataset: str, layout: str) -> list[str]:
    _require(path, "file", dataset, layout)
    names = [line.strip() for line in path.read_text().splitlines()]
    names = [n for n in names if n]
    if not names:
        raise DatasetNotFoundError(f"{dataset}: split file {path} lists no images.\nExpected layout:\n{layout}")
    return names


def _samples_from_list(names: Sequence[str], img_dir: Path, label_dir: Path, img_suffix: str, label_suffix: str,
                       dataset: str, layout: str) -> list[SampleFiles]:
    samples = [SampleFiles(n, img_dir / (n + img_suffix), label_dir / (n + label_suffix)) for n in names]
    _check_files_exist(samples, dataset, layout)
    return samples


def _check_files_exist(samples: Sequence[SampleFiles], dataset: str, layout: str) -> None:
    for s in samples:
        _require(s.img_path, "file", dataset, layout)
        _require(s.label_path, "file", dataset, layout)


def _split_name(split: str, valid: Mapping[str, str], dataset: str) -> str:
    if split not in valid:
        raise ValueError(f"{dataset} has no split {split!r}; valid splits: {sorted(valid)}")
    return valid[split]


# --------------------------------------------------------------------------------------------------------------
# The datasets
# --------------------------------------------------------------------------------------------------------------

class CityscapesDataset(FileSegmentationDataset):
    """Cityscapes fine annotations, 19 train ids (mmseg ``CityscapesDataset``).

    The ``*_gtFine_labelTrainIds.png`` maps are made from the official ``*_labelIds.png`` by cityscapesscripts'
    ``createTrainIdLabelImgs`` (mmseg: ``tools/dataset_converters/cityscapes.py``).
    """

    classes = metainfo.CITYSCAPES_CLASSES
    palette = [list(c) for c in metainfo.CITYSCAPES_PALETTE]
    crop_size = (512, 1024)
    test_scale = (2048, 1024)
    img_suffix = "_leftImg8bit.png"
    label_suffix = "_gtFine_labelTrainIds.png"
    splits = {"train": "train", "val": "val", "test": "test"}

    @classmethod
    def layout(cls, root: Any = "<root>", split: str = "{split}") -> str:
        return (f"  {root}/leftImg8bit/{split}/<city>/<name>{cls.img_suffix}\n"
                f"  {root}/gtFine/{split}/<city>/<name>{cls.label_suffix}")

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 pipeline: Pipeline | Sequence[Pipeline] | None = None, augment: bool | None = None):
        split_dir = _split_name(split, self.splits, "Cityscapes")
        layout = self.layout(root, split_dir)
        root = _resolve_root(root, "Cityscapes", "leftImg8bit", "cityscapes", layout)
        img_dir = _require(root / "leftImg8bit" / split_dir, "directory", "Cityscapes", layout)
        label_dir = _require(root / "gtFine" / split_dir, "directory", "Cityscapes", layout)
        samples = []
        for img_path in sorted(img_dir.glob(f"*/*{self.img_suffix}")):
            stem = img_path.name[: -len(self.img_suffix)]
            label_path = label_dir / img_path.parent.name / (stem + self.label_suffix)
            samples.append(SampleFiles(stem, img_path, label_path))
        if not samples:
            raise DatasetNotFoundError(f"Cityscapes: no *{self.img_suffix} images under {img_dir}.\n"
                                       f"Expected layout:\n{layout}")
        _check_files_exist(samples, "Cityscapes", layout)
        super().__init__(samples, pipeline, split == "train" if augment is None else augment)


class ADE20KDataset(FileSegmentationDataset):
    """ADE20K / SceneParsing (ADEChallengeData2016), 150 classes; label 0 ("other") is ignored and k -> k - 1."""

    classes = metainfo.ADE20K_CLASSES
    palette = [list(c) for c in metainfo.ADE20K_PALETTE]
    reduce_zero_label = True
    crop_size = (512, 512)
    test_scale = (2048, 512)
    splits = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}

    @staticmethod
    def layout(root: Any = "<root>", split: str = "{training,validation}") -> str:
        return (f"  {root}/images/{split}/<name>.jpg\n"
                f"  {root}/annotations/{split}/<name>.png\n"
                f"(root is the ADEChallengeData2016 folder or the folder that contains it)")

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 pipeline: Pipeline | Sequence[Pipeline] | None = None, augment: bool | None = None):
        split_dir = _split_name(split, self.splits, "ADE20K")
        layout = self.layout(root, split_dir)
        root = _resolve_root(root, "ADE20K", "images", "ADEChallengeData2016", layout)
        img_dir = _require(root / "images" / split_dir, "directory", "ADE20K", layout)
        label_dir = _require(root / "annotations" / split_dir, "directory", "ADE20K", layout)
        samples = [SampleFiles(p.stem, p, label_dir / (p.stem + ".png")) for p in sorted(img_dir.glob("*.jpg"))]
        if not samples:
            raise DatasetNotFoundError(f"ADE20K: no .jpg images in {img_dir}.\nExpected layout:\n{layout}")
        _check_files_exist(samples, "ADE20K", layout)
        super().__init__(samples, pipeline, split_dir == "training" if augment is None else augment)


class PascalVOCDataset(FileSegmentationDataset):
    """Pascal VOC 2012, 21 classes (background included); 255 marks object borders (ignored).

    ``aug=True`` (training split only) appends the SBD augmentation set (``SegmentationClassAug`` +
    ``ImageSets/Segmentation/aug.txt``, made by mmseg's ``tools/dataset_converters/voc_aug.py``) after the
    ``train.txt`` samples, as mmseg's ``pascal_voc12_aug`` config concatenates the two datasets.
    """

    classes = metainfo.PASCAL_VOC_CLASSES
    palette = [list(c) for c in metainfo.PASCAL_VOC_PALETTE]
    crop_size = (512, 512)
    test_scale = (2048, 512)
    splits = {"train": "train", "val": "val", "trainval": "trainval"}

    @staticmethod
    def layout(root: Any = "<root>", split: str = "{train,val}", aug: bool = False) -> str:
        text = (f"  {root}/JPEGImages/<name>.jpg\n"
                f"  {root}/SegmentationClass/<name>.png\n"
                f"  {root}/ImageSets/Segmentation/{split}.txt (one <name> per line)")
        if aug:
            text += (f"\n  {root}/SegmentationClassAug/<name>.png\n"
                     f"  {root}/ImageSets/Segmentation/aug.txt")
        return text + "\n(root is the VOC2012 folder or the VOCdevkit folder that contains it)"

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 pipeline: Pipeline | Sequence[Pipeline] | None = None, augment: bool | None = None,
                 aug: bool = False):
        split_name = _split_name(split, self.splits, "Pascal VOC 2012")
        if aug and split_name != "train":
            raise ValueError(f"Pascal VOC: aug=True adds the SBD training images and applies to split='train' only, "
                             f"got split={split!r}")
        layout = self.layout(root, split_name, aug)
        root = _resolve_root(root, "Pascal VOC 2012", "JPEGImages", "VOC2012", layout)
        img_dir = _require(root / "JPEGImages", "directory", "Pascal VOC 2012", layout)
        label_dir = _require(root / "SegmentationClass", "directory", "Pascal VOC 2012", layout)
        names = _read_split_file(root / "ImageSets" / "Segmentation" / f"{split_name}.txt", "Pascal VOC 2012", layout)
        samples = _samples_from_list(names, img_dir, label_dir, ".jpg", ".png", "Pascal VOC 2012", layout)
        if aug:
            aug_dir = _require(root / "SegmentationClassAug", "directory", "Pascal VOC 2012 aug", layout)
            aug_names = _read_split_file(root / "ImageSets" / "Segmentation" / "aug.txt", "Pascal VOC 2012 aug",
                                         layout)
            samples += _samples_from_list(aug_names, img_dir, aug_dir, ".jpg", ".png", "Pascal VOC 2012 aug", layout)
        super().__init__(samples, pipeline, split_name == "train" if augment is None else augment)


class PascalContext59Dataset(FileSegmentationDataset):
    """Pascal Context, 59 classes (mmseg ``PascalContextDataset59``): label 0 (background) is ignored, k -> k - 1.

    ``SegmentationClassContext`` is made by mmseg's ``tools/dataset_converters/pascal_context.py``.
    """

    classes = metainfo.PASCAL_CONTEXT_59_CLASSES
    palette = [list(c) for c in metainfo.PASCAL_CONTEXT_59_PALETTE]
    reduce_zero_label = True
    crop_size = (480, 480)
    test_scale = (520, 520)
    splits = {"train": "train", "val": "val"}

    @staticmethod
    def layout(root: Any = "<root>", split: str = "{train,val}") -> str:
        return (f"  {root}/JPEGImages/<name>.jpg\n"
                f"  {root}/SegmentationClassContext/<name>.png\n"
                f"  {root}/ImageSets/SegmentationContext/{split}.txt (one <name> per line)\n"
                "(root is the VOC2010 folder or the VOCdevkit folder that contains it)")

    def __init__(self, root: str | os.PathLike, split: str = "train",
                 pipeline: Pipeline | Sequence[Pipeline] | None = None, augment: bool | None = None):
        split_name = _split_name(split, self.splits, "Pascal Context")
        layout = self.layout(root, split_name)
        root = _resolve_root(root, "Pascal Context", "JPEGImages", "VOC2010", layout)
        img_dir = _require(root / "JPEGImages", "directory", "Pascal Context", layout)
        label_dir = _require(root / "SegmentationClassContext", "directory", "Pascal Context", layout)
        names = _read_split_file(root / "ImageSets" / "SegmentationContext" / f"{split_name}.txt", "Pascal Context",
                                 layout)
        samples = _samples_from_list(names, img_dir, label_dir, ".jpg", ".png", "Pascal Context", layout)
        super().__init__(samples, pipeline, split_name == "train" if augment is None else augment)


# --------------------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetInfo:
    """A registered dataset and its mmseg defaults (crop ``(h, w)``, test scale ``(w, h)``)."""

    name: str
    cls: type[SegmentationDataset]
    num_classes: int
    crop_size: tuple[int, int]
    test_scale: tuple[int, int]
    needs_root: bool = True


def _registry() -> dict[str, DatasetInfo]:
    entries = [
        DatasetInfo("cityscapes", CityscapesDataset, 19, CityscapesDataset.crop_size, CityscapesDataset.test_scale),
        DatasetInfo("ade20k", ADE20KDataset, 150, ADE20KDataset.crop_size, ADE20KDataset.test_scale),
        DatasetInfo("pascal_voc12", PascalVOCDataset, 21, PascalVOCDataset.crop_size, PascalVOCDataset.test_scale),
        DatasetInfo("pascal_context_59", PascalContext59Dataset, 59, PascalContext59Dataset.crop_size,
                    PascalContext59Dataset.test_scale),
        DatasetInfo("synthetic", SyntheticScenes, SyntheticScenes.NUM_CLASSES, SyntheticScenes.DEFAULT_SIZE,
                    SyntheticScenes.DEFAULT_SIZE[::-1], needs_root=False),
    ]
    return {e.name: e for e in entries}


#: Registered datasets by name.
DATASETS: Mapping[str, DatasetInfo] = _registry()
_ALIASES = {"ade": "ade20k", "voc": "pascal_voc12", "voc12": "pascal_voc12", "pascal_voc": "pascal_voc12",
            "context59": "pascal_context_59", "pascal_context59": "pascal_context_59"}


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", *,
                  pipeline: Pipeline | Sequence[Pipeline] | None = None, crop_size: int | Sequence[int] | None = None,
                  scale: Sequence[int] | None = None, augment: bool | None = None,
                  **kwargs: Any) -> SegmentationDataset:
    """Build a registered dataset.

    Args:
        name: a key of :data:`DATASETS` ("cityscapes", "ade20k", "pascal_voc12", "pascal_context_59",
            "synthetic"; aliases "ade", "voc", "voc12", "context59").
        root: the dataset folder (ignored by "synthetic").
        split: "train" or "val" (ADE20K's "training"/"validation" also accepted).
        pipeline: transforms to use instead of the standard ones (a callable or a sequence of callables).
        crop_size, scale: override the dataset's mmseg defaults in the standard pipelines: training crop (h, w)
            and resize scale (w, h) (RandomResize base scale in training, Resize scale in testing).
        augment: use the training pipeline (default: for the training split).
        **kwargs: dataset-specific options (``aug`` for Pascal VOC; ``num_images``, ``size``, ``seed``,
            ``difficulty``... for "synthetic").
    """
    key = _ALIASES.get(name, name)
    if key not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; registered: {sorted(DATASETS)} (aliases: {sorted(_ALIASES)})")
    info = DATASETS[key]
    augment = split in ("train", "training") if augment is None else augment
    if pipeline is not None and (crop_size is not None or scale is not None):
        raise ValueError("give either pipeline= or crop_size=/scale= (which configure the standard pipeline)")
    default_crop, default_scale = info.crop_size, info.test_scale
    if not info.needs_root and "size" in kwargs:  # synthetic images: crop and scale default to their size
        default_crop = _pair(kwargs["size"], "size (h, w)")
        default_scale = default_crop[::-1]
    # Synthetic scenes keep their own light default pipeline unless the standard one is configured explicitly.
    if pipeline is None and (crop_size is not None or scale is not None or info.needs_root):
        if augment:
            pipeline = train_pipeline(crop_size or default_crop, scale or default_scale)
        else:
            pipeline = test_pipeline(scale or default_scale)
    if info.needs_root:
        return info.cls(root, split, pipeline=pipeline, augment=augment, **kwargs)
    return info.cls(split=split, pipeline=pipeline, augment=augment, **kwargs)
