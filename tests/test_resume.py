"""Exact resume: a run stopped, killed or interrupted at iteration k and resumed ends with bitwise the weights
(and optimizer state) of an uninterrupted run.

The model is a real fastctx APCNet (ResNetV1c-18-D8 + APCHead with the fused CPU kernels + auxiliary FCNHead,
shrunk in width) with dropout, trained on the synthetic scenes with random flips: the result depends on the
torch RNG (dropout), the data order and the augmentation seeds, so each of them must be restored exactly.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastctx.engine import Trainer, load_checkpoint, load_config
from fastctx.engine import trainer as trainer_module
from fastctx.engine.logging import read_json_lines
from fastctx.models.segmentor import EncoderDecoder
from test_engine import state_dicts_equal, tiny_config, tiny_overrides

ITERS = 6
KILL_ITERS = 20


def _config(workers: int, checkpoint_interval: int = 0, iters: int = ITERS):
    return tiny_config("apcnet", iters=iters, dropout=0.1, workers=workers,
                       extra=["train.val_interval=0", f"train.checkpoint_interval={checkpoint_interval}"])


def _train_losses(work_dir: Path) -> list[tuple[int, float]]:
    return [(r["iter"], r["loss"]) for r in read_json_lines(work_dir / "log.jsonl") if r["mode"] == "train"]


def _assert_same_state(a: Trainer, b: Trainer) -> None:
    assert a.iteration == b.iteration
    assert state_dicts_equal(a.model.state_dict(), b.model.state_dict()), "weights differ"
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert all(torch.equal(sa["state"][k]["momentum_buffer"], sb["state"][k]["momentum_buffer"]) for k in sa["state"])


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference run, once per worker count."""
    runs = {}

    def get(workers: int) -> tuple[Trainer, list]:
        if workers not in runs:
            work_dir = tmp_path_factory.mktemp(f"uninterrupted{workers}")
            trainer = Trainer(_config(workers), work_dir, progress=False)
            trainer.fit()
            runs[workers] = trainer, _train_losses(work_dir)
        return runs[workers]

    return get


@pytest.mark.parametrize("workers", [0, 2])
def test_stopped_and_resumed_run_is_bitwise_identical(tmp_path, uninterrupted, workers):
    reference, reference_losses = uninterrupted(workers)
    first = Trainer(_config(workers), tmp_path, progress=False)
    first.fit(stop_at=3)
    assert first.iteration == 3 and (tmp_path / "iter_3.pth").is_file()
    resumed = Trainer(_config(workers), tmp_path, resume=True, progress=False)
    assert resumed.iteration == 3
    resumed.fit()
    _assert_same_state(resumed, reference)
    assert _train_losses(tmp_path) == reference_losses  # every logged loss, exactly


def test_worker_count_does_not_change_the_run(uninterrupted):
    (a, losses_a), (b, losses_b) = uninterrupted(0), uninterrupted(2)
    _assert_same_state(a, b)
    assert losses_a == losses_b


def test_without_the_rng_state_the_resumed_run_differs(tmp_path, uninterrupted, monkeypatch):
    """The check above can fail: skipping the RNG restore (dropout masks) changes the weights."""
    reference, _ = uninterrupted(0)
    Trainer(_config(0), tmp_path, progress=False).fit(stop_at=3)
    monkeypatch.setattr(trainer_module, "set_rng_state", lambda state: None)
    resumed = Trainer(_config(0), tmp_path, resume=True, progress=False)
    resumed.fit()
    assert not state_dicts_equal(resumed.model.state_dict(), reference.model.state_dict())


@pytest.mark.parametrize("workers", [0, 2])
def test_run_interrupted_mid_iteration_resumes_from_the_last_checkpoint(tmp_path, uninterrupted, monkeypatch, workers):
    reference, reference_losses = uninterrupted(workers)
    calls = {"n": 0}
    real_loss = EncoderDecoder.loss

    def crashing_loss(self, img, label):
        calls["n"] += 1
        if calls["n"] == 5:  # iteration 5, after the checkpoint of iteration 4
            raise KeyboardInterrupt
        return real_loss(self, img, label)

    monkeypatch.setattr(EncoderDecoder, "loss", crashing_loss)
    with pytest.raises(KeyboardInterrupt):
        Trainer(_config(workers, checkpoint_interval=2), tmp_path, progress=False).fit()
    monkeypatch.setattr(EncoderDecoder, "loss", real_loss)
    assert load_checkpoint(tmp_path / "latest.pth")["meta"]["iter"] == 4
    resumed = Trainer(_config(workers, checkpoint_interval=2), tmp_path, resume=True, progress=False)
    resumed.fit()
    _assert_same_state(resumed, reference)
    assert _train_losses(tmp_path) == reference_losses


def test_resume_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint to resume from"):
        Trainer(_config(0), tmp_path / "empty", resume=True, progress=False)
    torch.save({"state_dict": {}}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="not a fastctx training checkpoint"):
        Trainer(_config(0), tmp_path / "x", resume=tmp_path / "weights.pth", progress=False)


def _cli(work_dir: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides("apcnet", iters=KILL_ITERS, dropout=0.1) + ["train.val_interval=0",
                                                                    "train.checkpoint_interval=2"]
    return [sys.executable, "-m", "fastctx", "train", "apcnet_r18-d8_synthetic", "--work-dir", str(work_dir),
            *extra, "--set", *overrides]


def test_sigkilled_cli_run_resumes_bitwise(tmp_path):
    """`fastctx train` killed with SIGKILL (no chance to clean up) and resumed with --resume."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref_dir, killed_dir = tmp_path / "ref", tmp_path / "killed"
    quiet = dict(env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    reference = subprocess.Popen(_cli(ref_dir), **quiet)
    victim = subprocess.Popen(_cli(killed_dir), **quiet)
    deadline = time.monotonic() + 120
    while not (killed_dir / "iter_4.pth").exists():
        assert victim.poll() is None, victim.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never wrote its iteration-4 checkpoint"
        time.sleep(0.005)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert victim.returncode == -signal.SIGKILL
    assert not (killed_dir / f"iter_{KILL_ITERS}.pth").exists(), "the run finished before it could be killed"
    assert reference.wait(timeout=120) == 0, reference.stderr.read().decode()
    resumed = subprocess.run(_cli(killed_dir, "--resume"), **quiet, timeout=120)
    assert resumed.returncode == 0, resumed.stderr.decode()
    ref_state = load_checkpoint(ref_dir / f"iter_{KILL_ITERS}.pth")
    resumed_state = load_checkpoint(killed_dir / "latest.pth")
    assert resumed_state["meta"]["iter"] == KILL_ITERS
    assert state_dicts_equal(resumed_state["state_dict"], ref_state["state_dict"])
    assert _train_losses(killed_dir) == _train_losses(ref_dir)
    assert [it for it, _ in _train_losses(killed_dir)] == list(range(1, KILL_ITERS + 1))


def test_ullmc_with_adamw_and_warmup_resumes_bitwise(tmp_path):
    """ULLMC (Swin, IIWA neck and decoder, OHEM, dropout and drop path) with AdamW, Swin's paramwise rules and a
    warmup spanning the interruption: the resumed run ends with bitwise the weights and Adam moments."""
    from test_ullmc import MICRO_YAML

    overrides = [f"model.kwargs:={MICRO_YAML}", "data.train_kwargs={num_images: 8, size: [32, 32]}",
                 "data.num_workers=0", "train.iters=4", "train.batch_size=2", "train.log_interval=1",
                 "train.val_interval=0", "train.checkpoint_interval=0", "schedule.warmup_iters=3"]
    config = load_config("ullmc_swin-tiny_synthetic", overrides)
    reference = Trainer(config, tmp_path / "reference", progress=False)
    reference.fit()
    first = Trainer(config, tmp_path / "resumed", progress=False)
    first.fit(stop_at=2)
    resumed = Trainer(config, tmp_path / "resumed", resume=True, progress=False)
    assert resumed.iteration == 2 and isinstance(resumed.optimizer, torch.optim.AdamW)
    resumed.fit()
    assert state_dicts_equal(resumed.model.state_dict(), reference.model.state_dict()), "weights differ"
    sa, sb = resumed.optimizer.state_dict(), reference.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"] and len(sa["param_groups"]) == 2  # decay and no decay
    moments = ("exp_avg", "exp_avg_sq")
    assert all(torch.equal(sa["state"][k][m], sb["state"][k][m]) for k in sa["state"] for m in moments)
    assert _train_losses(tmp_path / "resumed") == _train_losses(tmp_path / "reference")
