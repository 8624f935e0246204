"""Shape sets of the benchmark: one set of sizes per target (a GPU, a small CPU, tests)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShapeSet:
    """The sizes every op and head is benchmarked at.

    Attributes:
        batch: images per batch.
        in_channels: backbone feature channels entering the heads (Cin).
        channels: channels inside the heads (C); the ACM ops run G = len(pool_scales) groups of C.
        sizes: (H, W) of the feature maps of the APCNet ops and heads.
        pool_scales: the ACM pool scales.
        enc_size: (H, W) of the EncNet ops and heads (N = H * W pixels).
        enc_channels: D of the Encoding layer.
        num_codes: K codewords.
        num_classes: classifier outputs of the heads.
        model_size: input image side of the whole-model rows.
        class_cases: (H, W, K) of the class-context ops and heads (OCRNet, ACFNet).
        class_channels: C of the gathered features (class_gather; the OCR / ACF heads' channels).
        attention_channels: Cq = Cv of class_attention (OCR's ocr_channels).
        window_cases: (H, W, C, heads, Wh, Ww, shift) of window_attention and the IIWA / Swin blocks.
    """

    name: str
    batch: int
    in_channels: int
    channels: int
    sizes: tuple[tuple[int, int], ...]
    pool_scales: tuple[int, ...]
    enc_size: tuple[int, int]
    enc_channels: int
    num_codes: int
    num_classes: int = 19
    model_size: int = 512
    class_cases: tuple[tuple[int, int, int], ...] = ((64, 128, 19), (64, 64, 150))
    class_channels: int = 512
    attention_channels: int = 256
    window_cases: tuple[tuple[int, int, int, int, int, int, int], ...] = (
        (64, 128, 256, 8, 4, 8, 0), (56, 56, 96, 3, 7, 7, 3), (7, 7, 768, 24, 7, 7, 0))

    def describe(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        eh, ew = self.enc_size
        classes = ", ".join(f"{h}x{w} K={k}" for h, w, k in self.class_cases)
        windows = ", ".join(f"{h}x{w} C={c} heads={n} {wh}x{ww}" + (f" shift={sh}" if sh else "")
                            for h, w, c, n, wh, ww, sh in self.window_cases)
        return (f"{self.name}: B={self.batch} Cin={self.in_channels} C={self.channels} {sizes} "
                f"scales={self.pool_scales}; Encoding N={eh}x{ew} K={self.num_codes} D={self.enc_channels}; "
                f"class context C={self.class_channels} Cq={self.attention_channels} {classes}; windows {windows}")


SHAPE_SETS: dict[str, ShapeSet] = {
    # mmseg's APCNet / EncNet heads on ResNet-50-D8 features: 512x512 and 512x1024 crops.
    "realistic": ShapeSet("realistic", batch=2, in_channels=2048, channels=512, sizes=((64, 64), (64, 128)),
                          pool_scales=(1, 2, 3, 6), enc_size=(64, 128), enc_channels=512, num_codes=32),
    # A quarter of the channels and of the pixels: every op and head, all providers, in a few
    # minutes on 2 CPU cores.
    "cpu": ShapeSet("cpu", batch=2, in_channels=512, channels=128, sizes=((32, 32),),
                    pool_scales=(1, 2, 3, 6), enc_size=(32, 64), enc_channels=128, num_codes=32,
                    class_cases=((32, 64, 19), (32, 32, 150)), class_channels=128, attention_channels=64,
                    window_cases=((32, 64, 128, 4, 4, 8, 0), (28, 28, 96, 3, 7, 7, 3))),
    # Smoke tests and the unit tests of the benchmark itself (odd sizes, overlapping pool bins).
    "tiny": ShapeSet("tiny", batch=2, in_channels=12, channels=4, sizes=((7, 9),), pool_scales=(1, 2, 3),
                     enc_size=(5, 6), enc_channels=8, num_codes=4, num_classes=5, model_size=64,
                     class_cases=((5, 6, 3),), class_channels=8, attention_channels=4,
                     window_cases=((5, 7, 8, 2, 2, 4, 1), (5, 7, 8, 2, 2, 4, 0))),  # IIWA: the unshifted one
}


def get_shape_set(name: str) -> ShapeSet:
    try:
        return SHAPE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown shape set {name!r}: expected one of {sorted(SHAPE_SETS)}") from None
