"""The dataset base class: index/seed keys, the pipeline, and the item format every dataset returns.

Items are dicts::

    {"img": float32 [3, H, W] (normalised RGB), "label": int64 [H, W] (255 = ignore),
     "name": str, "ori_shape": (H, W) of the image as stored}

``ds[i]`` and ``ds[(i, seed)]`` both work. With a seed every random augmentation is a pure function of
``np.random.default_rng(seed)``, so a sampler that hands out ``(index, seed)`` pairs makes training reproducible
across resumption and across any number of data-parallel processes; ``ds[i]`` uses the seed ``i``.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .transforms import Compose, Sample

__all__ = ["DatasetError", "DatasetNotFoundError", "Pipeline", "SegmentationDataset"]

#: A transform or pipeline: ``(sample, rng) -> sample`` (see :mod:`fastctx.data.transforms`).
Pipeline = Callable[[Sample, np.random.Generator], Sample]


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's root, folder, split file or listed file is missing; the message says what layout was expected."""


class DatasetError(ValueError):
    """A sample's file cannot be read or does not hold what the dataset expects; the message names the file.

    Raised in a DataLoader worker, it reaches the main process as a DatasetError
    whose message is the worker's traceback text (torch re-raises that way);
    the original one-line message is recovered from it, so the main process
    reports what the worker said.
    """

    def __init__(self, message: str):
        super().__init__(_worker_message(str(message)))


def _worker_message(message: str) -> str:
    # torch's ExceptionWrapper: "Caught DatasetError in DataLoader worker process N.\nOriginal Traceback ...\n
    # fastctx.data.base.DatasetError: <message>"
    if not message.startswith("Caught DatasetError in DataLoader worker process"):
        return message
    marker = f"\n{DatasetError.__module__}.{DatasetError.__qualname__}: "
    at = message.find(marker)
    return message[at + len(marker):].rstrip("\n") if at >= 0 else message


class SegmentationDataset(torch.utils.data.Dataset):
    """Base of all datasets here: index/seed handling, the pipeline, and the item format.

    Subclasses set ``classes``, ``palette`` and implement ``__len__``, :meth:`load` and :meth:`default_pipeline`.
    """

    classes: tuple[str, ...] = ()
    palette: list[list[int]] = []
    ignore_index: int = 255

    def __init__(self, pipeline: Pipeline | Sequence[Pipeline] | None = None, augment: bool = False):
        if pipeline is None:
            pipeline = self.default_pipeline(augment)
        elif not callable(pipeline):
            pipeline = Compose(pipeline)
        self.pipeline = pipeline

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def default_pipeline(self, augment: bool) -> Pipeline:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray, str]:
        """Sample ``index`` as stored: (H x W x 3 uint8 RGB image, H x W uint8 label ids, name)."""
        raise NotImplementedError

    def _parse_key(self, key: Any) -> tuple[int, Any]:
        if isinstance(key, tuple):
            if len(key) != 2:
                raise TypeError(f"dataset keys are an index or an (index, seed) pair, got a tuple of {len(key)}")
            index, seed = key
        else:
            index, seed = key, None
        if isinstance(index, torch.Tensor) and index.numel() == 1:
            index = index.item()
        if not isinstance(index, (int, np.integer)) or isinstance(index, bool):
            raise TypeError(f"dataset index must be an int, got {type(index).__name__}")
        if isinstance(seed, torch.Tensor):
            seed = seed.tolist()
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} samples")
        index = int(index) % n
        return index, index if seed is None else seed

    def __getitem__(self, key: int | tuple[int, Any]) -> dict[str, Any]:
        index, seed = self._parse_key(key)
        img, label, name = self.load(index)
        ori_shape = (int(img.shape[0]), int(img.shape[1]))
        sample = self.pipeline({"img": img, "label": label}, np.random.default_rng(seed))
        return {
            "img": torch.from_numpy(np.ascontiguousarray(sample["img"].transpose(2, 0, 1), dtype=np.float32)),
            "label": torch.from_numpy(np.ascontiguousarray(sample["label"], dtype=np.int64)),
            "name": name,
            "ori_shape": ori_shape,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_samples={len(self)}, num_classes={self.num_classes})"
