"""Checkpoints: written atomically with a sha256, verified on load (weights_only), `latest.pth`, RNG states.

Layout of a training checkpoint (mmengine-like, so `state_dict` is where
mmseg tools look for the weights):

    {"meta": {"iter", "config", "classes", "palette", "fastctx_version", "time"},
     "state_dict": model weights (mmseg parameter names),
     "optimizer", "scheduler", "scaler", "sampler", "rng": {"torch", "numpy", "python", "cuda"}}

Everything is stored as tensors, numbers, strings, lists and dicts so that
`torch.load(weights_only=True)` reads it: no arbitrary pickles are executed.

Next to `iter_N.pth` a sidecar `iter_N.pth.sha256` holds the sha256 of the
file in `sha256sum` format (`sha256sum -c iter_N.pth.sha256` checks it by
hand). The checkpoint itself stays a plain torch file that mmseg tools read;
loading verifies it against the sidecar when there is one and refuses a file
that changed after it was written. Files without a sidecar (mmseg releases,
older fastctx runs) load unverified.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

__all__ = ["CheckpointError", "LATEST", "WorkDirError", "checksum_path", "ensure_work_dir", "find_latest",
           "load_checkpoint", "load_weights", "previous_checkpoints", "remove_stale_temporaries", "rng_state",
           "save_checkpoint", "set_rng_state", "update_latest", "verify_checksum", "write_failure"]

LATEST = "latest.pth"
CHECKSUM_SUFFIX = ".sha256"
# Temporary files are `.<final name>.tmp.<pid of the writer>`, renamed over the final name once complete.
_TEMPORARY = re.compile(r"^\..+\.tmp\.(\d+)$")
_ITER_CHECKPOINT = re.compile(r"^iter_(\d+)\.pth$")


class CheckpointError(ValueError):
    """A checkpoint file cannot be read, is corrupt, or does not fit the model it is loaded into."""


class WorkDirError(RuntimeError):
    """A run's file cannot be written (read-only or full file system, a path that is a file, no permission).

    The message names the file and, for checkpoints, says that the previous one was kept.
    """


def _reason(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device"
    if exc.errno == errno.EROFS:
        return "the file system is read-only"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    return exc.strerror or str(exc)


def write_failure(exc: OSError, path: Path) -> str:
    """One line saying why writing `path` failed, in the user's terms."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on device while writing {path}"
    return f"cannot write {path}: {_reason(exc)}"


def ensure_work_dir(work_dir: str | Path) -> Path:
    """Create `work_dir` if needed and check that files can be written there; WorkDirError saying why not."""
    work_dir = Path(work_dir)
    if work_dir.exists() and not work_dir.is_dir():
        raise WorkDirError(f"work directory {work_dir} is a file, not a directory")
    probe = work_dir / f".fastctx_write_test.tmp.{os.getpid()}"
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with open(probe, "wb") as f:
                f.write(b"fastctx")
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WorkDirError(f"work directory {work_dir}: a part of its path is a file, not a directory") from None
    except OSError as exc:
        raise WorkDirError(f"cannot write in work directory {work_dir}: {_reason(exc)}") from None
    return work_dir


def checksum_path(path: str | Path) -> Path:
    """The sha256 sidecar of a checkpoint file."""
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


class _HashingWriter:
    """The file object torch.save writes to: hashes the bytes as they go (torch writes sequentially) and
    keeps the file system's error, which torch.save reports as an unhelpful "enforce fail ..." RuntimeError.
    """

    def __init__(self, f):
        self.f, self.sha256, self.error = f, hashlib.sha256(), None

    def write(self, data) -> int:
        try:
            written = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha256.update(data)
        return written

    def flush(self) -> None:
        self.f.flush()


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp.{os.getpid()}")


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """torch.save `state` to `path` atomically, with its sha256 in `path`.sha256.

    Both are written to temporary files in the same folder, fsynced and
    renamed over the final names, so a crash or error (a full disk: WorkDirError
    "no space left on device while writing <path>") leaves any previous file at
    `path` intact and no partial file behind. Temporary files left by killed
    writers are removed after a successful save.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp, digest, digest_tmp = _temporary(path), checksum_path(path), _temporary(checksum_path(path))
    try:
        with open(tmp, "wb") as f:
            sink = _HashingWriter(f)
            try:
                torch.save(state, sink)
            except RuntimeError:
                if sink.error is None:
                    raise
                raise sink.error from None  # the file system's error, not torch's report of it
            f.flush()
            os.fsync(f.fileno())
        with open(digest_tmp, "w") as f:
            f.write(f"{sink.sha256.hexdigest()}  {path.name}\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        os.replace(digest_tmp, digest)
    except OSError as exc:
        raise WorkDirError(write_failure(exc, path)) from None
    finally:
        tmp.unlink(missing_ok=True)
        digest_tmp.unlink(missing_ok=True)
    remove_stale_temporaries(path.parent)
    return path


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the `.<name>.tmp.<pid>` files of writers that no longer run (killed mid-write); returns them."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match is None or (entry.is_dir() and not entry.is_symlink()):
            continue
        pid = int(match.group(1))
        if pid == os.getpid() or _process_alive(pid):
            continue
        entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


def update_latest(work_dir: str | Path, checkpoint: str | Path) -> Path:
    """Point work_dir/latest.pth at `checkpoint` (a relative symlink, swapped atomically; a copy if no symlinks)."""
    work_dir, checkpoint = Path(work_dir), Path(checkpoint)
    link = work_dir / LATEST
    tmp = _temporary(link)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(os.path.relpath(checkpoint, work_dir), tmp)
            os.replace(tmp, link)
            checksum_path(link).unlink(missing_ok=True)  # a copy's sidecar, from a file system without symlinks
        except OSError:  # file systems without symlinks: an atomic copy, with the checkpoint's sidecar
            import shutil

            tmp.unlink(missing_ok=True)
            shutil.copyfile(checkpoint, tmp)
            os.replace(tmp, link)
            if checksum_path(checkpoint).is_file():
                shutil.copyfile(checksum_path(checkpoint), checksum_path(link))
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise WorkDirError(write_failure(exc, link)) from None
    return link


def find_latest(work_dir: str | Path) -> Path | None:
    """The checkpoint work_dir/latest.pth points at, or None when there is none."""
    link = Path(work_dir) / LATEST
    if not link.exists():
        return None
    return link.resolve()


def previous_checkpoints(work_dir: str | Path, before: Path | None = None) -> list[Path]:
    """work_dir's iter_N.pth files, newest first (only those older than `before`'s iteration when given)."""
    found = []
    for entry in Path(work_dir).glob("iter_*.pth"):
        match = _ITER_CHECKPOINT.match(entry.name)
        if match and entry.is_file():
            found.append((int(match.group(1)), entry))
    limit = None
    if before is not None and _ITER_CHECKPOINT.match(before.name):
        limit = int(_ITER_CHECKPOINT.match(before.name).group(1))
    return [p for n, p in sorted(found, reverse=True) if limit is None or n < limit]


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def verify_checksum(path: str | Path) -> bool:
    """Check `path` against its sha256 sidecar: True if verified, False if it has none, CheckpointError if it
    does not match."""
    path = Path(path).resolve()  # latest.pth -> the checkpoint it points at, whose sidecar it is
    sidecar = checksum_path(path)
    if not sidecar.is_file():
        return False
    recorded = sidecar.read_text().split()
    if not recorded or not re.fullmatch(r"[0-9a-f]{64}", recorded[0]):
        raise CheckpointError(f"checkpoint {path}: its checksum file {sidecar} is damaged (no sha256 in it)")
    if _file_sha256(path) != recorded[0]:
        raise CheckpointError(f"checkpoint {path} is corrupt: its sha256 does not match the one recorded when it "
                              f"was written ({sidecar.name})")
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with torch.load(weights_only=True) after verifying its sha256 sidecar (if any).

    Clear errors (one line, naming the file) for missing, corrupt or foreign files.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    verify_checksum(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"cannot read checkpoint {str(path)!r} as a weights-only torch file: {reason}"
                              ) from None
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
