"""The synthetic scene dataset: determinism, splits, balance, and that its labels need global context."""
import hashlib
import time

import numpy as np
import pytest
import torch

from fastctx.data import DATASETS, SyntheticScenes, build_dataset


def _digest(*arrays):
    return hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()


def test_item_format_and_registry():
    ds = build_dataset("synthetic", root="/ignored", split="train", num_images=10, size=(48, 40))
    assert isinstance(ds, SyntheticScenes) and len(ds) == 10
    assert ds.num_classes == DATASETS["synthetic"].num_classes == len(ds.classes) == len(ds.palette) == 9
    assert ds.ignore_index == 255
    item = ds[(3, 7)]
    assert item["img"].dtype == torch.float32 and item["img"].shape == (3, 48, 40)
    assert item["label"].dtype == torch.int64 and item["label"].shape == (48, 40)
    assert item["name"] == "synthetic_train_000003" and item["ori_shape"] == (48, 40)
    # the default pipeline normalises with mmseg's ImageNet statistics
    scene = ds.generate(3)
    flipped = not np.array_equal(item["label"].numpy(), scene.label)
    img = scene.img[:, ::-1] if flipped else scene.img
    expected = (img.astype(np.float32) - np.float32([123.675, 116.28, 103.53])) / np.float32([58.395, 57.12, 57.375])
    np.testing.assert_array_equal(item["img"].numpy().transpose(1, 2, 0), expected)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=5)))
    assert batch["img"].shape == (5, 3, 48, 40)
    # the standard mmseg pipeline when crop/scale are asked for
    std = build_dataset("synthetic", split="train", num_images=4, size=64, crop_size=(32, 32))
    assert std[0]["img"].shape == (3, 32, 32)


def test_deterministic_in_seed_split_index():
    a = SyntheticScenes("train", num_images=50, seed=3)
    b = SyntheticScenes("train", num_images=50, seed=3)
    for i in (0, 17, 49):
        sa, sb = a.generate(i), b.generate(i)
        assert _digest(sa.img, sa.label) == _digest(sb.img, sb.label) and sa.scene == sb.scene
    # augmentation: a pure function of the item seed
    assert _digest(a[(5, 11)]["img"].numpy()) == _digest(b[(5, 11)]["img"].numpy())
    flips = {_digest(a[(5, s)]["label"].numpy()) for s in range(16)}
    assert len(flips) == 2  # flipped or not
    other_seed = SyntheticScenes("train", num_images=50, seed=4)
    assert all(_digest(a.generate(i).img) != _digest(other_seed.generate(i).img) for i in range(50))
    # no augmentation on val
    val = SyntheticScenes("val", num_images=4)
    assert _digest(val[(1, 0)]["img"].numpy()) == _digest(val[(1, 1)]["img"].numpy())


def test_splits_are_disjoint():
    train = SyntheticScenes("train", num_images=300)
    val = SyntheticScenes("val", num_images=300)
    train_set = {_digest(train.generate(i).img) for i in range(300)}
    val_set = {_digest(val.generate(i).img) for i in range(300)}
    assert len(train_set) == len(val_set) == 300
    assert not train_set & val_set


def test_class_and_scene_balance():
    ds = SyntheticScenes("train", num_images=300)
    pixels = np.zeros(ds.num_classes, np.int64)
    images_with = np.zeros(ds.num_classes, np.int64)
    scenes = np.zeros(3, np.int64)
    for i in range(len(ds)):
        s = ds.generate(i)
        counts = np.bincount(s.label.ravel(), minlength=ds.num_classes)
        pixels += counts
        images_with += counts > 0
        scenes[s.scene] += 1
    share = pixels / pixels.sum()
    # scenes uniform (binomial, 300 draws: 1/3 +- 0.08 is > 3 sigma)
    assert (np.abs(scenes / 300 - 1 / 3) < 0.08).all(), scenes
    # background classes ~ 1/3 of the ~85% background each; objects large enough for a stride-8 model to
    # segment (15-32 px across): every object class ~2.5% of the pixels
    assert (np.abs(share[:3] - share[:3].mean()) < 0.06).all(), share
    assert share[:3].sum() > 0.8 and (share[3:] > 0.015).all(), share
    assert (images_with[3:] >= 20).all(), images_with
    assert set(np.unique(ds.generate(0).label)) <= set(range(9))  # no ignore pixels by default


@pytest.mark.parametrize("cue", SyntheticScenes.CUES)
def test_same_local_patch_has_different_labels_in_different_scenes(cue):
    ds = SyntheticScenes("train", num_images=60, noise=0.0, cue=cue)
    patches = {}  # pixel bytes of a uniform patch -> set of labels seen
    for i in range(len(ds)):
        s = ds.generate(i)
        for y in range(0, 64 - 8, 8):
            for x in range(0, 64 - 8, 8):
                app = s.appearance[y:y + 8, x:x + 8]
                if (app == app[0, 0]).all() and app[0, 0] < 5:  # a uniform patch of one material or object
                    patches.setdefault(_digest(s.img[y:y + 8, x:x + 8]), set()).add(int(s.label[y, x]))
    # identical pixels, three different labels: background patches (every material) and object patches
    ambiguous = [labels for labels in patches.values() if len(labels) == 3]
    assert len(ambiguous) >= 4, patches  # 3 materials + at least one object type
    assert {frozenset(labels) for labels in ambiguous} >= {frozenset({0, 1, 2}), frozenset({3, 4, 5})}


@pytest.mark.parametrize("cue,max_local,max_window", [("mixture", 0.5, 0.7), ("landmark", 0.45, 0.8)])
def test_scene_statistic_decides_while_local_statistics_cannot(cue, max_local, max_window):
    ds = SyntheticScenes("val", num_images=150, cue=cue)  # default difficulty, with noise
    rng = np.random.default_rng(0)
    joint = np.zeros((len(ds.COLOURS), ds.num_classes), np.int64)  # (local appearance, label) counts
    window_hits = window_total = 0
    half = 32  # a window a quarter of the image
    for i in range(len(ds)):
        s = ds.generate(i)
        # appearance is recoverable from the pixel colours, noise included
        dist = ((s.img[:, :, None, :].astype(np.float32) - ds.COLOURS) ** 2).sum(-1)
        np.testing.assert_array_equal(dist.argmin(-1), s.appearance)
        # the whole-image statistic gives the scene, and with the local appearance every label exactly
        evidence = ds.scene_evidence(s.img)
        assert evidence.argmax() == s.scene
        np.testing.assert_array_equal(ds.LABELS[evidence.argmax(), s.appearance], s.label)
        joint += np.bincount(s.appearance.ravel() * ds.num_classes + s.label.ravel(),
                             minlength=joint.size).reshape(joint.shape)
        # a regional statistic: the same evidence from a random half-side window (no evidence: a guess)
        for _ in range(8):
            y, x = rng.integers(0, 64 - half + 1, size=2)
            local = ds.scene_evidence(s.img[y:y + half, x:x + half])
            window_hits += int(local.argmax() == s.scene) if local.any() else int(rng.integers(3) == s.scene)
            window_total += 1
    # best possible decision from a pixel's own appearance: the majority label of that appearance
    local_accuracy = joint.max(axis=1).sum() / joint.sum()
    assert local_accuracy < max_local, local_accuracy      # the global rule above gets 1.0
    assert window_hits / window_total < max_window, window_hits / window_total


def test_difficulty_knobs_and_ignore_border():
    easy, hard = SyntheticScenes(difficulty=0.0), SyntheticScenes(difficulty=1.0)
    assert SyntheticScenes().cell_counts == (26, 19, 19)  # 8 x 8 cells, dominant_fraction 0.40
    assert easy.cell_counts == (29, 18, 17) and hard.cell_counts == (22, 21, 21)
    assert easy.noise < hard.noise and easy.landmark_size > hard.landmark_size
    assert SyntheticScenes(cue="landmark").cell_counts == (22, 21, 21)
    custom = SyntheticScenes(grid=6, dominant_fraction=0.5, size=96)
    assert custom.cell_counts == (18, 9, 9)
    s = custom.generate(0)
    assert s.img.shape == (96, 96, 3)
    bordered = SyntheticScenes(num_images=20, ignore_border=2)
    for i in range(20):
        s = bordered.generate(i)
        ignored = s.label == 255
        assert not (ignored & (s.appearance >= 3)).any()  # objects keep their labels
        if (s.appearance >= 3).any() and not ignored.any():
            pytest.fail("no ignore band around objects")


def test_invalid_arguments():
    with pytest.raises(ValueError, match="split"):
        SyntheticScenes("test")
    with pytest.raises(ValueError, match="difficulty"):
        SyntheticScenes(difficulty=1.5)
    with pytest.raises(ValueError, match="cue"):
        SyntheticScenes(cue="colour")
    with pytest.raises(ValueError, match="strictly the most"):
        SyntheticScenes(dominant_fraction=0.3)
    with pytest.raises(IndexError):
        SyntheticScenes(num_images=3)[3]


@pytest.mark.parametrize("cue", SyntheticScenes.CUES)
def test_generation_is_fast(cue):
    ds = SyntheticScenes(num_images=200, cue=cue)
    ds.generate(0)
    start = time.process_time()  # CPU time: robust to other processes on the machine
    for i in range(200):
        ds.generate(i)
    per_image = (time.process_time() - start) / 200
    assert per_image < 1e-3, f"{per_image * 1e3:.2f} ms per 64x64 image"
