"""The `fastctx` command end to end on the synthetic scenes with tiny real models, and its error handling."""
from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from fastctx.cli import main
from fastctx.data import IMAGENET_MEAN, IMAGENET_STD, SyntheticScenes
from fastctx.engine import build_model_from_config, load_checkpoint, load_config
from fastctx.engine.logging import read_json_lines
from test_engine import tiny_overrides

CONFIG = "apcnet_r18-d8_synthetic"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """`fastctx train` for 3 iterations: (work_dir, overrides, exit code, stdout, stderr)."""
    work_dir = tmp_path_factory.mktemp("train")
    overrides = tiny_overrides("apcnet", iters=3)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["train", CONFIG, "--work-dir", str(work_dir), "--set", *overrides])
    return work_dir, overrides, code, out.getvalue(), err.getvalue()


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_train_writes_checkpoints_log_and_prints_the_table(trained):
    work_dir, overrides, code, out, err = trained
    assert code == 0, err
    assert (work_dir / "iter_3.pth").is_file() and (work_dir / "latest.pth").is_file()
    records = read_json_lines(work_dir / "log.jsonl")
    assert [(r["mode"], r["iter"]) for r in records] == [("train", 1), ("train", 2), ("train", 3), ("val", 3)]
    assert "validation at iteration 3" in out and "| water" in out and "mIoU" in out
    assert "3 iterations" in out and "iter 3/3 loss" in err


def test_eval_reproduces_the_validation_of_training(trained, capsys, tmp_path):
    work_dir, overrides, *_ = trained
    ckpt = str(work_dir / "iter_3.pth")
    code, out, err = _run(capsys, ["eval", CONFIG, "--checkpoint", ckpt, "--json", str(tmp_path / "m.json"),
                                   "--set", *overrides])
    assert code == 0, err
    val = read_json_lines(work_dir / "log.jsonl")[-1]
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["mIoU"] == pytest.approx(val["mIoU"], rel=1e-12) and metrics["aAcc"] == val["aAcc"]
    assert f"aAcc {val['aAcc']:.2f}" in out
    for flags, extra in ((["--mode", "slide"], ["eval.crop_size=[16, 16]", "eval.stride=[8, 8]"]),
                         (["--tta"], ["eval.tta_scales=[0.75, 1.0]"])):
        code, out, err = _run(capsys, ["eval", CONFIG, "--checkpoint", ckpt, *flags, "--set", *overrides, *extra])
        assert code == 0, err
        assert "mIoU" in out and ("slide" in out if "--mode" in flags else "TTA" in out)


def _reference_prediction(config, ckpt, image: np.ndarray) -> np.ndarray:
    """The class map by hand: mmseg normalisation, the model's logits at the image size, argmax."""
    model = build_model_from_config(config, SyntheticScenes.NUM_CLASSES)
    model.load_state_dict(load_checkpoint(ckpt)["state_dict"])
    model.eval()
    x = (torch.from_numpy(image).float() - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    with torch.no_grad():
        return model(x.permute(2, 0, 1)[None]).argmax(1)[0].numpy()


def test_predict_writes_palette_masks(trained, capsys, tmp_path):
    work_dir, overrides, *_ = trained
    ckpt = work_dir / "iter_3.pth"
    scenes = SyntheticScenes("val", num_images=2, size=(32, 32))
    images = {"scene": scenes.load(0)[0], "odd": scenes.load(1)[0][:24, :29]}  # any size works
    paths = []
    for name, image in images.items():
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    out_dir = tmp_path / "masks"
    code, out, err = _run(capsys, ["predict", CONFIG, *paths, "--checkpoint", str(ckpt), "--out", str(out_dir),
                                   "--set", *overrides])
    assert code == 0, err
    config = load_config(CONFIG, overrides)
    for name, image in images.items():
        mask = Image.open(out_dir / f"{name}.png")
        assert mask.mode == "P" and mask.size == (image.shape[1], image.shape[0])
        classes = np.asarray(mask)
        assert np.array_equal(classes, _reference_prediction(config, ckpt, image))
        colours = np.asarray(mask.convert("RGB")).reshape(-1, 3)
        palette = np.asarray(SyntheticScenes.palette)
        assert np.array_equal(colours, palette[classes.reshape(-1)])


def test_compare_trains_each_config_and_writes_table_plot_and_summary(capsys, tmp_path):
    overrides = [o for o in tiny_overrides("apcnet", iters=2) if not o.startswith("model.name=")]
    code, out, err = _run(capsys, ["compare", "apcnet_r18-d8_synthetic", "fcn_r18-d8_synthetic", "--work-dir",
                                   str(tmp_path), "--set", *overrides])
    assert code == 0, err
    header = next(line for line in out.splitlines() if line.startswith("| config"))
    assert [c.strip() for c in header.strip("|").split("|")] == ["config", "mIoU", "aAcc", "mAcc", "wall time (s)",
                                                                 "img/s"]
    assert any(line.startswith("| apcnet_r18-d8_synthetic") for line in out.splitlines())
    assert any(line.startswith("| fcn_r18-d8_synthetic") for line in out.splitlines())
    with Image.open(tmp_path / "compare.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400
    summary = json.loads((tmp_path / "compare.json").read_text())
    assert [r["config"] for r in summary["runs"]] == ["apcnet_r18-d8_synthetic", "fcn_r18-d8_synthetic"]
    for run in summary["runs"]:
        val = read_json_lines(tmp_path / run["config"] / "log.jsonl")[-1]
        assert run["mIoU"] == val["mIoU"] and run["iters"] == 2 and run["imgs_per_s"] > 0
    assert load_checkpoint(tmp_path / "fcn_r18-d8_synthetic" / "iter_2.pth")["meta"]["config"]["model"]["name"] \
        == "fcn_r18-d8"


@pytest.mark.parametrize("argv, message", [
    (["train", "no_such_config"], "neither a file nor a shipped config; shipped configs: "),
    (["train", CONFIG, "--set", "train.iter=3"], "unknown config key 'train.iter'; did you mean 'train.iters'"),
    (["train", CONFIG, "--set", "runtime.amp=fp8"], "runtime.amp: expected one of 'none', 'bf16', 'fp16'"),
    (["train", CONFIG, "--set", "model.kwargs={decode_head: {pool_sizes: [1]}}"],
     "model section: unknown decode_head option(s) ['pool_sizes'] for APCHead"),
    (["train"], "train: a CONFIG is required"),
    (["eval", CONFIG, "--checkpoint", "{tmp}/missing.pth"], "checkpoint '{tmp}/missing.pth' does not exist"),
    (["predict", CONFIG, "{tmp}/none.png", "--checkpoint", "x.pth", "--out", "{tmp}"],
     "image file(s) not found: {tmp}/none.png"),
])
def test_bad_input_exits_2_with_a_message(capsys, tmp_path, argv, message):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert err.startswith("fastctx: error: ") and message.replace("{tmp}", str(tmp_path)) in err


def test_missing_dataset_exits_2_naming_the_path(capsys, tmp_path):
    root = tmp_path / "cityscapes"
    code, out, err = _run(capsys, ["train", "apcnet_r50-d8_4xb2-80k_cityscapes-512x1024", "--work-dir",
                                   str(tmp_path / "w"), "--set", f"data.root={root}", "runtime.device=cpu"])
    assert code == 2 and err.startswith("fastctx: error: ") and str(root) in err


def test_checkpoint_of_another_model_exits_2(trained, capsys):
    work_dir, overrides, *_ = trained
    other = [o for o in overrides if not o.startswith("model.kwargs")]  # the full-width r18 model
    code, out, err = _run(capsys, ["eval", CONFIG, "--checkpoint", str(work_dir / "iter_3.pth"), "--set", *other])
    assert code == 2 and "does not fit the model" in err


def test_usage_errors_and_config_list(capsys):
    assert main([]) == 2
    assert main(["train", CONFIG, "--mode", "x"]) == 2
    capsys.readouterr()
    assert main(["train", "--list"]) == 0
    assert CONFIG in capsys.readouterr().out.splitlines()


def test_bench_dispatches_to_the_benchmark_module(monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("fastctx.benchmark")
    fake.main = lambda argv: calls.append(argv) or 0
    monkeypatch.setitem(sys.modules, "fastctx.benchmark", fake)
    assert main(["bench", "--shapes", "cpu", "--ops", "encoding"]) == 0
    assert calls == [["--shapes", "cpu", "--ops", "encoding"]]
    monkeypatch.setitem(sys.modules, "fastctx.benchmark", types.ModuleType("fastctx.benchmark"))
    code, out, err = _run(capsys, ["bench"])
    assert code == 2 and "fastctx.benchmark has no main(argv)" in err


def test_python_dash_m_fastctx_runs_the_cli():
    proc = subprocess.run([sys.executable, "-m", "fastctx", "train", "no_such_config"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastctx: error: config 'no_such_config' is neither a file nor a shipped config")
