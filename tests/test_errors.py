"""Errors a user causes get one clear message: module arguments, and the `fastctx` command's faults.

Module constructors refuse zero/negative/non-integer sizes with a ValueError or
TypeError naming the argument (no ZeroDivisionError or empty weight to be found
later). The command exits with status 2 and one line naming the problem for
file-system faults (a work directory that is a file, read-only, a full disk --
simulated), a backend that cannot run here, a dataset smaller than a batch,
and bad data files (RGB / wrong-size / 16-bit label maps, corrupt images,
out-of-range class ids), also when they are read in DataLoader workers.
"""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastctx.cli import main
from fastctx.data import DatasetError, PascalVOCDataset, load_label
from fastctx.engine import checkpoint as ckpt
from fastctx.models import ResNetV1c
from fastctx.nn import ACM, APCHead, ConvModule, EncHead, EncModule, Encoding, FCNHead
from test_engine import tiny_overrides

CONFIG = "apcnet_r18-d8_synthetic"

# ----------------------------------------------------------------------------------------- module arguments

BAD_ARGUMENTS = [
    (lambda: Encoding(8, 0), ValueError, "Encoding: num_codes must be a positive int, got 0"),
    (lambda: Encoding(0, 8), ValueError, "Encoding: channels must be a positive int, got 0"),
    (lambda: Encoding(8, -2), ValueError, "num_codes must be a positive int, got -2"),
    (lambda: Encoding(8, 2.5), TypeError, "num_codes must be a positive int, got 2.5"),
    (lambda: ACM(0, True, 8, 4), ValueError, "ACM: pool_scale must be a positive int, got 0"),
    (lambda: ACM(1.5, True, 8, 4), TypeError, "ACM: pool_scale must be a positive int, got 1.5"),
    (lambda: ACM(2, True, 0, 4), ValueError, "ACM: in_channels must be a positive int"),
    (lambda: ACM(2, True, 8, -4), ValueError, "ACM: channels must be a positive int"),
    (lambda: APCHead(8, 4, 0), ValueError, "APCHead: num_classes must be a positive int, got 0"),
    (lambda: APCHead(8, 0, 3), ValueError, "APCHead: channels must be a positive int, got 0"),
    (lambda: APCHead(0, 4, 3), ValueError, "APCHead: in_channels must be a positive int, got 0"),
    (lambda: APCHead(8, 4, 3, pool_scales=()), ValueError, "pool_scales must name at least one scale"),
    (lambda: APCHead(8, 4, 3, pool_scales=(1, 0)), ValueError, r"pool_scales must be positive ints, got \(1, 0\)"),
    (lambda: APCHead(8, 4, 3, pool_scales=[1.5]), ValueError, "pool_scales must be positive ints"),
    (lambda: APCHead(8, 4, 3, pool_scales=None), TypeError, "pool_scales must be a list or tuple"),
    (lambda: APCHead(8, 4, 3, dropout_ratio=1.0), ValueError, r"dropout_ratio must be a number < 1 \(<= 0: no dropout\)"),
    (lambda: APCHead(8, 4, 3, dropout_ratio="0.1"), ValueError, "dropout_ratio must be a number < 1"),
    (lambda: EncModule(8, 0), ValueError, "EncModule: num_codes must be a positive int, got 0"),
    (lambda: EncHead(8, 4, 3, num_codes=0), ValueError, "EncHead: num_codes must be a positive int, got 0"),
    (lambda: EncHead([8, 0], 4, 3), ValueError, "EncHead: in_channels must be a positive int, got 0"),
    (lambda: EncHead([], 4, 3), ValueError, "in_channels must name at least one feature"),
    (lambda: EncHead(8, 4, -1), ValueError, "EncHead: num_classes must be a positive int, got -1"),
    (lambda: FCNHead(8, 4, 0), ValueError, "FCNHead: num_classes must be a positive int, got 0"),
    (lambda: FCNHead(0, 4, 3), ValueError, "FCNHead: in_channels must be a positive int, got 0"),
    (lambda: FCNHead(8, 0, 3, num_convs=1), ValueError, "FCNHead: channels must be a positive int, got 0"),
    (lambda: ConvModule(8, 0, 1), ValueError, "ConvModule: out_channels must be a positive int, got 0"),
    (lambda: ResNetV1c(18, stem_channels=1), ValueError, "stem_channels must be >= 2"),
    (lambda: ResNetV1c(18, base_channels=0), ValueError, "ResNetV1c: base_channels must be a positive int"),
    (lambda: ResNetV1c(18, strides=(1, 0, 1, 1)), ValueError, "every entry of strides must be a positive int"),
]


@pytest.mark.parametrize("build, error, message", BAD_ARGUMENTS, ids=[m for _, _, m in BAD_ARGUMENTS])
def test_module_constructors_refuse_bad_sizes(build, error, message):
    with pytest.raises(error, match=message):
        build()


@pytest.mark.parametrize("build, inputs, who", [
    (lambda: EncHead([7], 5, 3), lambda x: [x], "EncHead"),
    (lambda: EncModule(7, 4), lambda x: x, "EncModule"),
    (lambda: APCHead(7, 5, 3), lambda x: [x], "APCHead"),
    (lambda: FCNHead(in_channels=7, channels=5, num_classes=3), lambda x: [x], "FCNHead"),
], ids=["EncHead", "EncModule", "APCHead", "FCNHead"])
def test_integer_features_get_the_floating_point_message(build, inputs, who):
    with pytest.raises(TypeError) as info:
        build()(inputs(torch.randint(0, 9, (2, 7, 13, 29))))
    assert str(info.value) == f"{who} expects a floating-point input, got torch.int64"
    assert "module.to" not in str(info.value)


# ----------------------------------------------------------------------------------------- the command


def _run(capsys, argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_line_error(code, err, *fragments):
    """Exit status 2 and the error as the last line of stderr (after any progress lines), no traceback."""
    assert code == 2, err
    last = err.splitlines()[-1]
    assert last.startswith("fastctx: error: ") and "Traceback" not in err, err
    assert not any(line.startswith("fastctx: error") for line in err.splitlines()[:-1]), err
    for fragment in fragments:
        assert str(fragment) in last, err


def _train(capsys, work_dir, *extra, iters=2):
    return _run(capsys, ["train", CONFIG, "--work-dir", work_dir, "--set",
                         *tiny_overrides("apcnet", iters=iters), "train.checkpoint_interval=1", *extra])


def test_work_dir_that_is_a_file(capsys, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("")
    _one_line_error(*_train(capsys, target)[::2], f"work directory {target} is a file, not a directory")
    _one_line_error(*_train(capsys, target / "run")[::2], f"work directory {target / 'run'}: a part of its path "
                                                          "is a file")


def _failing_open(errno_code: int, matches):
    """builtins.open, except that opening a path for writing that `matches` fails with `errno_code`."""
    real_open = open

    def fake_open(path, mode="r", *args, **kwargs):
        if any(flag in mode for flag in "wax") and matches(Path(path)):
            raise OSError(errno_code, os.strerror(errno_code), str(path))
        return real_open(path, mode, *args, **kwargs)

    return fake_open


def test_read_only_work_dir(capsys, tmp_path, monkeypatch):
    # (root ignores chmod, so the file system's refusal is simulated)
    monkeypatch.setattr(ckpt, "open", _failing_open(errno.EROFS, lambda p: True), raising=False)
    _one_line_error(*_train(capsys, tmp_path / "ro")[::2],
                    f"cannot write in work directory {tmp_path / 'ro'}: the file system is read-only")


class _FullDisk(io.RawIOBase):
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC on write)."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()

    def close(self):
        self.f.close()


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(capsys, tmp_path, monkeypatch):
    work_dir = tmp_path / "run"
    real_open = open

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if ".iter_2.pth.tmp." in str(path):  # the second checkpoint does not fit
            return _FullDisk(f, room=4096)
        return f

    monkeypatch.setattr(ckpt, "open", open_on_a_full_disk, raising=False)
    code, out, err = _train(capsys, work_dir)
    _one_line_error(code, err, f"no space left on device while writing {work_dir / 'iter_2.pth'}; "
                               f"the previous checkpoint {work_dir / 'iter_1.pth'} is kept")
    assert "enforce fail" not in err
    assert sorted(p.name for p in work_dir.iterdir()) == ["config.yaml", "iter_1.pth", "iter_1.pth.sha256",
                                                          "latest.pth", "log.jsonl"]
    assert ckpt.find_latest(work_dir) == (work_dir / "iter_1.pth").resolve()
    assert ckpt.verify_checksum(work_dir / "iter_1.pth")


def test_corrupt_checkpoint_is_refused_and_resume_falls_back(capsys, tmp_path):
    """The issue's experiment: 4 KiB flipped in the middle of the latest checkpoint. `eval` refuses it in one
    line; `train --resume` says so and continues from the previous checkpoint."""
    work_dir = tmp_path / "run"
    assert _train(capsys, work_dir)[0] == 0
    latest = work_dir / "iter_2.pth"
    data = bytearray(latest.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = bytes(b ^ 0xFF for b in data[middle:middle + 4096])
    latest.write_bytes(bytes(data))
    code, out, err = _run(capsys, ["eval", CONFIG, "--checkpoint", latest, "--set", *tiny_overrides("apcnet")])
    _one_line_error(code, err, f"checkpoint {latest} is corrupt: its sha256 does not match")
    code, out, err = _train(capsys, work_dir, "--resume", iters=3)
    assert code == 0, err
    assert (f"fastctx: warning: checkpoint {latest} is corrupt: its sha256 does not match the one recorded when "
            f"it was written (iter_2.pth.sha256); resuming from the previous checkpoint {work_dir / 'iter_1.pth'} "
            "instead\n") in err
    assert "3 iterations" in out and ckpt.verify_checksum(work_dir / "iter_3.pth")


def test_backend_that_cannot_run_here_is_refused_before_training(capsys, tmp_path):
    code, out, err = _train(capsys, tmp_path / "w", "runtime.backend=cuda")
    _one_line_error(code, err, "runtime.backend: 'cuda' cannot run cpu tensors here; use 'auto' or one of")
    assert not (tmp_path / "w").exists()  # refused before anything was built or written
    # eval and predict: before the checkpoint or the images are even looked at
    for command in (["eval", CONFIG, "--checkpoint", tmp_path / "none.pth"],
                    ["predict", CONFIG, tmp_path / "none.png", "--checkpoint", tmp_path / "none.pth", "--out",
                     tmp_path / "masks"]):
        _one_line_error(*_run(capsys, [*command, "--set", "runtime.backend=cuda"])[::2],
                        "runtime.backend: 'cuda' cannot run cpu tensors here")


def test_triton_backend_without_the_interpreter_is_refused_in_a_fresh_process(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "fastctx", "train", CONFIG, "--work-dir", str(tmp_path / "w"),
                           "--set", "runtime.backend=triton", "runtime.device=cpu"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == ("fastctx: error: runtime.backend: 'triton' cannot run cpu tensors here; use 'auto' or "
                           "one of 'reference', 'cpu'\n")


def test_dataset_smaller_than_one_batch(capsys, tmp_path):
    code, out, err = _train(capsys, tmp_path / "w", "data.train_kwargs={num_images: 1, size: [32, 32]}")
    _one_line_error(code, err, "the training set has 1 image(s), fewer than one batch of train.batch_size=2")


# ----------------------------------------------------------------------------------------- bad data files


def _voc(root: Path, n: int = 4, size=(20, 24)) -> Path:
    """A Pascal VOC 2012 layout with n good samples, train = val."""
    rng = np.random.default_rng(0)
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    names = [f"img{i}" for i in range(n)]
    for name in names:
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(root / "JPEGImages" / f"{name}.jpg")
        Image.fromarray(rng.integers(0, 21, size, dtype=np.uint8), mode="L").save(
            root / "SegmentationClass" / f"{name}.png")
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("\n".join(names) + "\n")
    return root


def _voc_overrides(root: Path, workers: int = 0) -> list[str]:
    """The tiny synthetic run switched to Pascal VOC from the command line (data.name drops num_images...)."""
    kept = [o for o in tiny_overrides("apcnet", iters=1) if not o.startswith("data.")]
    return kept + ["data.name=pascal_voc12", f"data.root={root}", "data.crop_size=[16, 16]", "data.scale=[32, 16]",
                   f"data.num_workers={workers}"]


BAD_LABELS = {
    "RGB": (lambda size: Image.fromarray(np.zeros((*size, 3), np.uint8)),
            "has mode RGB with shape (20, 24, 3): expected a single-channel image of class ids"),
    "wrong size": (lambda size: Image.fromarray(np.zeros((size[0] + 1, size[1]), np.uint8), mode="L"),
                   "is (20, 24) but its label {label} is (21, 24): they must have the same height and width"),
    "16-bit": (lambda size: Image.fromarray(np.full(size, 300, np.uint16)),
               "(mode I;16) has ids 300..300, outside 0..255"),
    "out of range": (lambda size: Image.fromarray(np.full(size, 100, np.uint8), mode="L"),
                     "has class ids 100 outside 0..20 for the 21 classes of PascalVOCDataset (255 = ignore)"),
    "corrupt": (None, "cannot read label map {label}: "),
}


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", list(BAD_LABELS))
def test_bad_label_files_name_the_file(capsys, tmp_path, kind, workers):
    root = _voc(tmp_path / "voc")
    label = root / "SegmentationClass" / "img2.png"
    make, message = BAD_LABELS[kind]
    if make is None:
        label.write_bytes(label.read_bytes()[:60])  # truncated PNG
    else:
        make((20, 24)).save(label)
    overrides = _voc_overrides(root, workers)
    code, out, err = _run(capsys, ["train", CONFIG, "--work-dir", tmp_path / "w", "--set", *overrides,
                                   "train.batch_size=4"])
    _one_line_error(code, err, message.format(label=label))
    assert "DataLoader worker" not in err


def test_corrupt_and_truncated_images_name_the_file(capsys, tmp_path):
    root = _voc(tmp_path / "voc")
    checkpoint = _checkpoint(tmp_path, root)
    image = root / "JPEGImages" / "img1.jpg"
    image.write_bytes(image.read_bytes()[: len(image.read_bytes()) // 2])  # a JPEG cut short
    code, out, err = _run(capsys, ["eval", CONFIG, "--checkpoint", checkpoint, "--set", *_voc_overrides(root)])
    _one_line_error(code, err, f"cannot read image {image}: ")
    image.write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=f"cannot read image {image}: cannot identify image file"):
        PascalVOCDataset(root, "train")[1]


def _checkpoint(tmp_path: Path, root: Path) -> Path:
    """Weights of the tiny model for 21 classes (trained 1 iteration on the VOC layout)."""
    work_dir = tmp_path / "trained"
    assert main(["train", CONFIG, "--work-dir", str(work_dir), "--set", *map(str, _voc_overrides(root))]) == 0
    return work_dir / "iter_1.pth"


def test_switching_datasets_from_the_command_line_trains(capsys, tmp_path):
    """`--set data.name=pascal_voc12 data.root=...` on the synthetic config: the synthetic dataset's
    num_images / size do not follow to Pascal VOC (they used to: "unexpected keyword argument 'num_images'")."""
    root = _voc(tmp_path / "voc")
    code, out, err = _run(capsys, ["train", CONFIG, "--work-dir", tmp_path / "w", "--set", *_voc_overrides(root)])
    assert code == 0, err
    assert "1 iterations" in out and "| aeroplane" in out


def test_sixteen_bit_labels_with_small_ids_load_as_mmseg_reads_them(tmp_path):
    path = tmp_path / "l16.png"
    ids = np.arange(20 * 24, dtype=np.uint16).reshape(20, 24) % 21
    Image.fromarray(ids).save(path)
    assert np.array_equal(load_label(path), ids.astype(np.uint8))
    Image.fromarray(np.zeros((4, 4), np.float32)).save(tmp_path / "f.tiff")
    with pytest.raises(DatasetError, match="holds floating-point values"):
        load_label(tmp_path / "f.tiff")
