"""Datasets, mmsegmentation's data pipeline, and the synthetic scene dataset.

>>> from fastctx.data import build_dataset
>>> ds = build_dataset("synthetic", split="train", num_images=16)
>>> item = ds[(3, 1234)]          # or ds[3]: sample 3 with its augmentation drawn from default_rng(1234)
>>> item["img"].shape, item["label"].dtype
(torch.Size([3, 64, 64]), torch.int64)
"""
from .base import DatasetError, DatasetNotFoundError, Pipeline, SegmentationDataset
from .datasets import (
    DATASETS,
    ADE20KDataset,
    CityscapesDataset,
    DatasetInfo,
    FileSegmentationDataset,
    PascalContext59Dataset,
    PascalVOCDataset,
    SampleFiles,
    build_dataset,
    load_image,
    load_label,
)
from .synthetic import SceneSample, SyntheticScenes
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Compose,
    Normalize,
    Pad,
    PhotoMetricDistortion,
    RandomCrop,
    RandomFlip,
    RandomResize,
    Resize,
    test_pipeline,
    train_pipeline,
)

__all__ = [
    "ADE20KDataset", "CityscapesDataset", "Compose", "DATASETS", "DatasetError", "DatasetInfo",
    "DatasetNotFoundError", "FileSegmentationDataset", "IMAGENET_MEAN", "IMAGENET_STD", "Normalize", "Pad",
    "PascalContext59Dataset",
    "PascalVOCDataset", "PhotoMetricDistortion", "Pipeline", "RandomCrop", "RandomFlip", "RandomResize", "Resize",
    "SampleFiles", "SceneSample", "SegmentationDataset", "SyntheticScenes", "build_dataset", "load_image",
    "load_label", "test_pipeline", "train_pipeline",
]
