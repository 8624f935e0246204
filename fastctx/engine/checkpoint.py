"""Checkpoints: written atomically, loaded safely (weights_only), a `latest.pth` pointer, RNG states.

Layout of a training checkpoint (mmengine-like, so `state_dict` is where
mmseg tools look for the weights):

    {"meta": {"iter", "config", "classes", "palette", "fastctx_version", "time"},
     "state_dict": model weights (mmseg parameter names),
     "optimizer", "scheduler", "scaler", "sampler", "rng": {"torch", "numpy", "python", "cuda"}}

Everything is stored as tensors, numbers, strings, lists and dicts so that
`torch.load(weights_only=True)` reads it: no arbitrary pickles are executed.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["CheckpointError", "save_checkpoint", "load_checkpoint", "update_latest", "find_latest", "load_weights",
           "rng_state", "set_rng_state", "LATEST"]

LATEST = "latest.pth"


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, or does not fit the model it is loaded into."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save `state` to `path` atomically: a temporary file in the same folder, fsync, os.replace.

    A crash or error while writing leaves any previous file at `path` intact
    and no partial file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def update_latest(work_dir: str | Path, checkpoint: str | Path) -> Path:
    """Point work_dir/latest.pth at `checkpoint` (a relative symlink, swapped atomically; a copy if no symlinks)."""
    work_dir, checkpoint = Path(work_dir), Path(checkpoint)
    link = work_dir / LATEST
    tmp = work_dir / f".{LATEST}.tmp.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    try:
        os.symlink(os.path.relpath(checkpoint, work_dir), tmp)
        os.replace(tmp, link)
    except OSError:  # filesystems without symlinks: an atomic copy
        tmp.unlink(missing_ok=True)
        import shutil

        shutil.copyfile(checkpoint, tmp)
        os.replace(tmp, link)
    return link


def find_latest(work_dir: str | Path) -> Path | None:
    """The checkpoint work_dir/latest.pth points at, or None when there is none."""
    link = Path(work_dir) / LATEST
    if not link.exists():
        return None
    return link.resolve()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True); clear errors for missing or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} as a weights-only torch file: {exc}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


def load_weights(model: nn.Module, checkpoint: str | Path | dict[str, Any], strict: bool = True) -> dict[str, Any]:
    """Load model weights from a fastctx or mmseg/mmengine checkpoint (the `state_dict` entry, or a bare state dict).

    Keys prefixed "module." (saved from a DistributedDataParallel wrapper) are
    accepted. Returns the checkpoint dict.
    """
    state = load_checkpoint(checkpoint) if not isinstance(checkpoint, dict) else checkpoint
    weights = state.get("state_dict", state)
    if weights and all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint state_dict is a {type(weights).__name__}, expected a dict of tensors")
    try:
        result = model.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint does not fit the model (wrong config for it?): {exc}") from None
    if strict:
        return state
    if result.missing_keys or result.unexpected_keys:
        import warnings

        warnings.warn(f"checkpoint weights: missing {result.missing_keys}, unexpected {result.unexpected_keys}",
                      stacklevel=2)
    return state


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, in weights_only-loadable types."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_state[0], "state": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state()` returned."""
    torch.set_rng_state(state["torch"].cpu())
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(py_state["state"]), py_state["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
