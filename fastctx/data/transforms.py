"""mmsegmentation's data pipeline in numpy/torch, every random choice drawn from an explicit generator.

A transform is a callable ``transform(sample, rng) -> sample``: ``sample`` is a dict with ``"img"`` (H x W x 3,
RGB, ``uint8`` until :class:`Normalize`, ``float32`` after) and optionally ``"label"`` (H x W ``uint8``, 255 =
ignore); ``rng`` is a :class:`numpy.random.Generator`. A pipeline is then a pure function of its input and the
generator's seed, which is what exact resumption and distributed training need (mmseg draws from numpy's global
state instead).

The maths follows mmsegmentation 1.x / mmcv 2.x (the oracle in tests/test_data.py):

- sizes: ``scale`` is ``(w, h)`` as in mmseg configs; with ``keep_ratio`` the image is scaled as large as possible
  within ``(long edge, short edge) = (max(scale), min(scale))``, each side rounded as ``int(x * f + 0.5)``;
  ``crop_size`` is ``(h, w)``;
- resizing: bilinear with half-pixel centres (OpenCV's ``INTER_LINEAR``) for images, OpenCV's ``INTER_NEAREST``
  index rule (``floor(dst * src / dst_size)``) for labels;
- ``PhotoMetricDistortion`` draws its random numbers in mmseg's order and converts RGB <-> HSV exactly as OpenCV
  does for ``uint8`` images (hue in [0, 180));
- normalisation and padding are those of mmseg's ``SegDataPreProcessor``: ``(img - mean) / std`` in float32, then
  padding at the bottom/right with 0 (image, i.e. after normalisation) and 255 (label).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "Compose", "Normalize", "Pad", "PhotoMetricDistortion", "RandomCrop",
    "RandomFlip", "RandomResize", "Resize", "hsv_to_rgb", "resize_image", "resize_label", "rescale_size",
    "rgb_to_hsv", "test_pipeline", "train_pipeline",
]

Sample = dict[str, Any]
Transform = Callable[[Sample, np.random.Generator], Sample]

# mmseg's SegDataPreProcessor defaults (ImageNet statistics on the 0-255 scale, RGB order).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _pair(value: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        value = (int(value), int(value))
    if len(value) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in value):
        raise ValueError(f"{what} must be a positive int or a pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def _check_image(img: np.ndarray, dtypes: tuple = (np.uint8,)) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        got = f"{type(img).__name__} of shape {getattr(img, 'shape', None)}"
        raise ValueError(f"expected an H x W x 3 RGB numpy image, got {got}")
    if img.dtype not in dtypes:
        raise TypeError(f"expected an image of dtype {' or '.join(np.dtype(d).name for d in dtypes)}, got {img.dtype}")


# --------------------------------------------------------------------------------------------------------------
# Functional building blocks
# --------------------------------------------------------------------------------------------------------------

def rescale_size(hw: tuple[int, int], scale: Sequence[int] | float) -> tuple[int, int]:
    """Output ``(h, w)`` of a keep-ratio resize of an ``hw``-sized image (mmcv's ``rescale_size``).

    ``scale`` is a factor, or a pair whose larger entry bounds the long edge and smaller entry the short edge.
    """
    h, w = hw
    if isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool):
        if scale <= 0:
            raise ValueError(f"scale factor must be positive, got {scale}")
        factor = float(scale)
    else:
        long_edge, short_edge = max(scale), min(scale)
        factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an H x W x C image to ``size = (h, w)`` with half-pixel centres (OpenCV INTER_LINEAR).

    ``uint8`` images are interpolated in float32 and rounded half up (OpenCV's fixed-point arithmetic may differ
    by one grey level); float images stay float32.
    """
    out_h, out_w = size
    if (out_h, out_w) == img.shape[:2]:
        return img.copy()
    x = torch.from_numpy(img.astype(np.float32)).permute(2, 0, 1)[None]
    y = F.interpolate(x, size=(out_h, out_w), mode="bilinear", align_corners=False, antialias=False)
    y = y[0].permute(1, 2, 0).numpy()
    if img.dtype == np.uint8:
        return np.clip(np.floor(y + 0.5), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(y)


def _nearest_index(src: int, dst: int) -> np.ndarray:
    # OpenCV INTER_NEAREST: floor(i * (1 / (dst / src))) in double precision, clamped to the last pixel.
    inv = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst) * inv).astype(np.int64), src - 1)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of an H x W label map to ``size = (h, w)`` (OpenCV INTER_NEAREST's pixel choice)."""
    out_h, out_w = size
    h, w = label.shape[:2]
    rows, cols = _nearest_index(h, out_h), _nearest_index(w, out_w)
    return label[rows[:, None], cols[None, :]]


_HSV_SHIFT = 12


def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    # OpenCV's uint8 RGB->HSV divides through fixed-point reciprocal tables (12 fractional bits).
    i = np.maximum(np.arange(256, dtype=np.float64), 1.0)
    sdiv = np.rint((255 << _HSV_SHIFT) / i).astype(np.int32)
    hdiv = np.rint((180 << _HSV_SHIFT) / (6.0 * i)).astype(np.int32)
    sdiv[0] = hdiv[0] = 0
    return sdiv, hdiv


_SDIV, _HDIV = _hsv_tables()
# For each hue sector, which of (v, v(1-s), v(1-sf), v(1-s(1-f))) are B, G and R.
_SECTOR_BGR = np.array([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]])


def rgb_to_hsv(img: np.ndarray) -> np.ndarray:
    """uint8 RGB -> uint8 HSV exactly as ``cv2.cvtColor(bgr, COLOR_BGR2HSV)`` (H in [0, 180), S and V in [0, 255])."""
    _check_image(img)
    rgb = img.astype(np.int32)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    diff = v - rgb.min(axis=-1)
    s = (diff * _SDIV[v] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (_HSV_SHIFT - 1))) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """uint8 HSV -> uint8 RGB as OpenCV's vectorised ``COLOR_HSV2BGR`` path for uint8 images.

    That path works in float32 with fused multiply-adds for ``1 - s*h`` and truncates to uint8 (OpenCV's scalar
    tail, used for the last few pixels of a row, rounds instead; mmseg inherits that inconsistency).
    """
    _check_image(hsv)
    f32 = np.float32
    h = hsv[..., 0].astype(f32) * (f32(6) / f32(180))
    s = hsv[..., 1].astype(f32) * (f32(1) / f32(255))
    v = hsv[..., 2].astype(f32) * (f32(1) / f32(255))
    whole = np.trunc(h)
    frac = h - whole
    sector = (whole - np.trunc(whole * (f32(1) / f32(6))) * f32(6)).astype(np.int64)

    def one_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        # 1 - a*b rounded once, as an FMA does: the float32 product is exact in float64.
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(f32)

    table = np.stack([v, v * (f32(1) - s), v * one_minus(s, frac), v * one_minus(s, f32(1) - frac)], axis=-1)
    bgr = np.take_along_axis(table, _SECTOR_BGR[sector], axis=-1)
    return np.clip(np.trunc(bgr * f32(255)), 0, 255).astype(np.uint8)[..., ::-1].copy()


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------

class Compose:
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, transforms: Sequence[Transform]):
        for t in transforms:
            if not callable(t):
                raise TypeError(f"pipeline entries must be callables (sample, rng) -> sample, got {t!r}")
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        for t in self.transforms:
            sample = t(sample, rng)
        return sample

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}," for t in self.transforms)
        return f"Compose([{inner}\n])"


class Resize:
    """Resize to ``scale = (w, h)`` (mmseg/mmcv ``Resize``); with ``keep_ratio`` fit within (long, short) edges.

    Images are interpolated bilinearly, labels by nearest neighbour. ``resize_label=False`` leaves the label at
    its original size (mmseg's test pipeline: evaluation happens at the original resolution).
    """

    def __init__(self, scale: Sequence[int], keep_ratio: bool = True, resize_label: bool = True):
        self.scale = _pair(scale, "Resize scale (w, h)")
        self.keep_ratio = keep_ratio
        self.resize_label = resize_label

    def output_size(self, hw: tuple[int, int], scale: tuple[int, int] | None = None) -> tuple[int, int]:
        scale = scale or self.scale
        if self.keep_ratio:
            return rescale_size(hw, scale)
        return scale[1], scale[0]

    def apply(self, sample: Sample, scale: tuple[int, int]) -> Sample:
        img = sample["img"]
        _check_image(img, (np.uint8, np.float32))
        size = self.output_size(img.shape[:2], scale)
        sample["img"] = resize_image(img, size)
        if self.resize_label and sample.get("label") is not None:
            sample["label"] = resize_label(sample["label"], size)
        return sample

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return self.apply(sample, self.scale)

    def __repr__(self) -> str:
        return f"Resize(scale={self.scale}, keep_ratio={self.keep_ratio}, resize_label={self.resize_label})"


class RandomResize:
    """mmcv ``RandomResize(scale, ratio_range)``: ``scale`` times a ratio drawn uniformly from ``ratio_range``."""

    def __init__(self, scale: Sequence[int], ratio_range: tuple[float, float] = (0.5, 2.0), keep_ratio: bool = True):
        self.scale = _pair(scale, "RandomResize scale (w, h)")
        lo, hi = ratio_range
        if not 0 < lo <= hi:
            raise ValueError(f"ratio_range must satisfy 0 < min <= max, got {ratio_range!r}")
        self.ratio_range = (float(lo), float(hi))
        self._resize = Resize(self.scale, keep_ratio=keep_ratio)

    def sample_scale(self, rng: np.random.Generator) -> tuple[int, int]:
        lo, hi = self.ratio_range
        ratio = rng.random() * (hi - lo) + lo
        return int(self.scale[0] * ratio), int(self.scale[1] * ratio)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        return self._resize.apply(sample, self.sample_scale(rng))

    def __repr__(self) -> str:
        return (f"RandomResize(scale={self.scale}, ratio_range={self.ratio_range}, "
                f"keep_ratio={self._resize.keep_ratio})")


class RandomCrop:
    """mmseg ``RandomCrop``: a random ``crop_size = (h, w)`` window (smaller if the image is smaller).

    With ``cat_max_ratio < 1`` a window is redrawn, up to ``max_tries`` times as mmseg, while it holds a single
    class or its most frequent class covers ``cat_max_ratio`` or more of its non-ignored pixels; after the last
    try the last window drawn is kept unchecked.
    """

    def __init__(self, crop_size: int | Sequence[int], cat_max_ratio: float = 1.0, ignore_index: int = 255,
                 max_tries: int = 10):
        self.crop_size = _pair(crop_size, "crop_size (h, w)")
        self.cat_max_ratio = float(cat_max_ratio)
        self.ignore_index = ignore_index
        self.max_tries = max_tries

    def _draw_box(self, hw: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
        margin_h = max(hw[0] - self.crop_size[0], 0)
        margin_w = max(hw[1] - self.crop_size[1], 0)
        top = int(rng.integers(0, margin_h + 1))
        left = int(rng.integers(0, margin_w + 1))
        return top, top + self.crop_size[0], left, left + self.crop_size[1]

    def _acceptable(self, label_crop: np.ndarray) -> bool:
        _, counts = np.unique(label_crop[label_crop != self.ignore_index], return_counts=True)
        return len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio

    def sample_box(self, sample: Sample, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """The crop window ``(y1, y2, x1, x2)`` for this sample."""
        hw = sample["img"].shape[:2]
        box = self._draw_box(hw, rng)
        if self.cat_max_ratio < 1.0:
            label = sample.get("label")
            if label is None:
                raise ValueError("RandomCrop with cat_max_ratio < 1 needs sample['label']")
            for _ in range(self.max_tries):
                y1, y2, x1, x2 = box
                if self._acceptable(label[y1:y2, x1:x2]):
                    break
                box = self._draw_box(hw, rng)
        return box

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        y1, y2, x1, x2 = self.sample_box(sample, rng)
        sample["img"] = sample["img"][y1:y2, x1:x2]
        if sample.get("label") is not None:
            sample["label"] = sample["label"][y1:y2, x1:x2]
        return sample

    def __repr__(self) -> str:
        return f"RandomCrop(crop_size={self.crop_size}, cat_max_ratio={self.cat_max_ratio})"


class RandomFlip:
    """Horizontal flip of image and label with probability ``prob``."""

    def __init__(self, prob: float = 0.5):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"flip probability must be in [0, 1], got {prob}")
        self.prob = float(prob)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        if rng.random() < self.prob:
            sample["img"] = sample["img"][:, ::-1]
            if sample.get("label") is not None:
                sample["label"] = sample["label"][:, ::-1]
        return sample

    def __repr__(self) -> str:
        return f"RandomFlip(prob={self.prob})"


class PhotoMetricDistortion:
    """mmseg ``PhotoMetricDistortion`` on a uint8 RGB image; each step happens with probability 1/2:

    1. brightness: ``+ U(-brightness_delta, brightness_delta)``;
    2. a fair coin puts contrast (``* U(contrast_range)``) here (mode 1) or last (mode 0);
    3. saturation: HSV's S ``* U(saturation_range)``;
    4. hue: HSV's H ``+ randint(-hue_delta, hue_delta)`` (upper bound exclusive, as numpy's), modulo 180;
    5. contrast, in mode 0.

    Every step clips to [0, 255] and truncates to uint8, as mmseg does.
    """

    def __init__(self, brightness_delta: int = 32, contrast_range: tuple[float, float] = (0.5, 1.5),
                 saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18):
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    @staticmethod
    def _affine(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
        return np.clip(y, 0, 255).astype(np.uint8)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img = sample["img"]
        _check_image(img)
        if rng.integers(2):
            img = self._affine(img, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first and rng.integers(2):
            img = self._affine(img, alpha=rng.uniform(*self.contrast_range))
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = self._affine(hsv[..., 1], alpha=rng.uniform(*self.saturation_range))
            img = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            shift = int(rng.integers(-self.hue_delta, self.hue_delta))
            hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180
            img = hsv_to_rgb(hsv)
        if not contrast_first and rng.integers(2):
            img = self._affine(img, alpha=rng.uniform(*self.contrast_range))
        sample["img"] = img
        return sample

    def __repr__(self) -> str:
        return (f"PhotoMetricDistortion(brightness_delta={self.brightness_delta}, "
                f"contrast_range={self.contrast_range}, saturation_range={self.saturation_range}, "
                f"hue_delta={self.hue_delta})")


class Normalize:
    """``(img - mean) / std`` per RGB channel in float32 (mmseg's ``SegDataPreProcessor``)."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        if self.mean.shape != (3,) or self.std.shape != (3,) or (self.std <= 0).any():
            raise ValueError(f"mean and std must be 3 values (RGB), std positive; got {mean!r}, {std!r}")

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        img = sample["img"]
        _check_image(img, (np.uint8, np.float32))
        sample["img"] = (img.astype(np.float32) - self.mean) / self.std
        return sample

    def __repr__(self) -> str:
        return f"Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})"


class Pad:
    """Pad at the bottom/right to ``size = (h, w)``: image with ``img_pad_val``, label with ``label_pad_val``.

    Placed after :class:`Normalize` this is mmseg's ``SegDataPreProcessor(size=crop_size)`` padding: a padded
    image pixel is 0 after normalisation. Larger inputs are left as they are.
    """

    def __init__(self, size: int | Sequence[int], img_pad_val: float = 0.0, label_pad_val: int = 255):
        self.size = _pair(size, "Pad size (h, w)")
        self.img_pad_val = img_pad_val
        self.label_pad_val = label_pad_val

    def _pad(self, x: np.ndarray, value: float) -> np.ndarray:
        pad_h, pad_w = max(self.size[0] - x.shape[0], 0), max(self.size[1] - x.shape[1], 0)
        if pad_h == 0 and pad_w == 0:
            return x
        widths = [(0, pad_h), (0, pad_w)] + [(0, 0)] * (x.ndim - 2)
        return np.pad(x, widths, mode="constant", constant_values=value)

    def __call__(self, sample: Sample, rng: np.random.Generator) -> Sample:
        sample["img"] = self._pad(sample["img"], self.img_pad_val)
        if sample.get("label") is not None:
            sample["label"] = self._pad(sample["label"], self.label_pad_val)
        return sample

    def __repr__(self) -> str:
        return f"Pad(size={self.size}, img_pad_val={self.img_pad_val}, label_pad_val={self.label_pad_val})"


def train_pipeline(crop_size: int | Sequence[int], scale: Sequence[int], ratio_range: tuple[float, float] = (0.5, 2.0),
                   cat_max_ratio: float = 0.75, flip_prob: float = 0.5, photometric: bool = True,
                   mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> Compose:
    """mmseg's training pipeline: RandomResize, RandomCrop, RandomFlip, PhotoMetricDistortion, Normalize, Pad.

    Every sample comes out ``crop_size``-sized, so torch's default collate can batch them.
    """
    crop_size = _pair(crop_size, "crop_size (h, w)")
    transforms: list[Transform] = [
        RandomResize(scale, ratio_range=ratio_range, keep_ratio=True),
        RandomCrop(crop_size, cat_max_ratio=cat_max_ratio),
        RandomFlip(flip_prob),
    ]
    if photometric:
        transforms.append(PhotoMetricDistortion())
    transforms += [Normalize(mean, std), Pad(crop_size)]
    return Compose(transforms)


def test_pipeline(scale: Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> Compose:
    """mmseg's test pipeline: keep-ratio Resize of the image only (the label stays at its original size), Normalize."""
    return Compose([Resize(scale, keep_ratio=True, resize_label=False), Normalize(mean, std)])


test_pipeline.__test__ = False  # not a pytest test when imported into a test module
