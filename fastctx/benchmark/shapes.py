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

    def describe(self) -> str:
        sizes = ", ".join(f"{h}x{w}" for h, w in self.sizes)
        eh, ew = self.enc_size
        return (f"{self.name}: B={self.batch} Cin={self.in_channels} C={self.channels} {sizes} "
                f"scales={self.pool_scales}; Encoding N={eh}x{ew} K={self.num_codes} D={self.enc_channels}")


SHAPE_SETS: dict[str, ShapeSet] = {
    # mmseg's APCNet / EncNet heads on ResNet-50-D8 features: 512x512 and 512x1024 crops.
    "realistic": ShapeSet("realistic", batch=2, in_channels=2048, channels=512, sizes=((64, 64), (64, 128)),
                          pool_scales=(1, 2, 3, 6), enc_size=(64, 128), enc_channels=512, num_codes=32),
    # A quarter of the channels and of the pixels: every op and head, all providers, in a few
    # minutes on 2 CPU cores.
    "cpu": ShapeSet("cpu", batch=2, in_channels=512, channels=128, sizes=((32, 32),),
                    pool_scales=(1, 2, 3, 6), enc_size=(32, 64), enc_channels=128, num_codes=32),
    # Smoke tests and the unit tests of the benchmark itself (odd sizes, overlapping pool bins).
    "tiny": ShapeSet("tiny", batch=2, in_channels=12, channels=4, sizes=((7, 9),), pool_scales=(1, 2, 3),
                     enc_size=(5, 6), enc_channels=8, num_codes=4, num_classes=5, model_size=64),
}


def get_shape_set(name: str) -> ShapeSet:
    try:
        return SHAPE_SETS[name]
    except KeyError:
        raise ValueError(f"unknown shape set {name!r}: expected one of {sorted(SHAPE_SETS)}") from None
