"""Iteration-based training of a segmentor, as mmseg's IterBasedTrainLoop, with exact resume.

One iteration is one optimizer step: `train.accum_steps` forward/backward
passes over batches of `train.batch_size` images (split over the processes),
SGD with momentum or AdamW (with mmseg's paramwise lr / decay multipliers),
the learning rate from `PolyLR` for that iteration. Every `log_interval` iterations a JSON record goes to
work_dir/log.jsonl; every `val_interval` the model is evaluated; every
`checkpoint_interval` (and at the end) a checkpoint is written atomically and
work_dir/latest.pth points at it.

Resuming restores the weights, optimizer (momentum buffers, Adam moments), GradScaler, the
iteration and the torch / numpy / python RNG states; the data order is a pure
function of (seed, batches consumed) (see sampler.py), so a resumed run
produces bitwise the weights of an uninterrupted one on the same machine.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import random
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch
import torch.nn as nn
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset

from .. import __version__, available_backends, use_backend
from ..nn._batchnorm import SyncBatchNorm, convert_sync_batchnorm
from .checkpoint import (CheckpointError, WorkDirError, ensure_work_dir, find_latest, load_checkpoint, load_weights,
                         previous_checkpoints, remove_stale_temporaries, rng_state, save_checkpoint, set_rng_state,
                         update_latest, write_failure)
from .config import Config, ConfigError
from .distributed import DistInfo, all_reduce_mean, barrier, init_distributed
from .evaluate import autocast_context, evaluate
from .logging import JsonLinesLog, ProgressBar, format_duration
from .metrics import SegMetrics
from .sampler import TrainBatchSampler, collate_samples
from .schedule import PolyLR

__all__ = ["Trainer", "TrainResult", "build_model_from_config", "build_datasets", "build_optimizer",
           "check_backend", "default_work_dir", "eval_window", "param_groups"]


@dataclass
class TrainResult:
    """What a training run produced (on every process; metrics are global)."""

    work_dir: Path
    iters: int
    metrics: SegMetrics | None
    wall_time: float
    train_time: float
    imgs_per_s: float
    checkpoint: Path | None
    log_path: Path


def default_work_dir(config: Config) -> Path:
    return Path(config.runtime.work_dir) if config.runtime.work_dir else Path("work_dirs") / config.name


def check_backend(config: Config, device: torch.device) -> None:
    """ConfigError unless runtime.backend can run this run's tensors (float32 on `device`): refused before
    anything is built rather than at the first forward pass."""
    backend = config.runtime.backend
    if backend == "auto":
        return
    usable = available_backends(device)
    if backend not in usable:
        raise ConfigError(f"runtime.backend: {backend!r} cannot run {device.type} tensors here; use 'auto' or one "
                          f"of {', '.join(repr(b) for b in usable)}")


def build_model_from_config(config: Config, num_classes: int) -> nn.Module:
    """`fastctx.models.build_model` with the config's model section."""
    from ..models import build_model

    m = config.model
    try:
        return build_model(m.name, num_classes, fused=m.fused, norm=m.norm, pretrained=m.pretrained, **m.kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model section: {exc}") from None


def build_datasets(config: Config, train: bool = True, val: bool = True) -> tuple[Dataset | None, Dataset | None]:
    """(training set, validation set) of the config's data section (None for the ones not asked for)."""
    from ..data import build_dataset

    d = config.data

    def build(split: str, kwargs: dict[str, Any]) -> Dataset:
        try:
            return build_dataset(d.name, d.root, split, crop_size=d.crop_size, scale=d.scale, **kwargs)
        except (KeyError, TypeError, ValueError) as exc:  # unknown name or bad dataset options
            raise ConfigError(f"data section ({d.name!r}, split {split!r}): {exc}") from None

    return (build(d.train_split, d.train_kwargs) if train else None,
            build(d.val_split, d.val_kwargs) if val else None)


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 custom_keys: dict[str, dict[str, float]] | None = None) -> list[dict[str, Any]]:
    """The trainable parameters in groups of equal (lr_mult, decay_mult), mmengine's custom_keys rule.

    A parameter takes the multipliers of the longest key (alphabetical among equal lengths) contained in
    its full name, 1 for a multiplier the key does not set, (1, 1) without a match; only the first
    match counts, as in mmengine. Groups come in the order of their first parameter, parameters in
    the model's order; each group carries "lr_mult" for `PolyLR.apply`.
    """
    keys = sorted(sorted(custom_keys or {}), key=len, reverse=True)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        rule = next((custom_keys[k] for k in keys if k in name), {})
        mults = (float(rule.get("lr_mult", 1.0)), float(rule.get("decay_mult", 1.0)))
        group = groups.setdefault(mults, {"params": [], "lr": lr * mults[0], "lr_mult": mults[0],
                                          "weight_decay": weight_decay * mults[1]})
        group["params"].append(param)
    return list(groups.values())


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    """The optim section's SGD(lr, momentum, weight_decay) or AdamW(lr, betas, eps, weight_decay) over the
    trainable parameters, grouped by `param_groups` when optim.paramwise has rules (mmseg's OptimWrapper)."""
    o = config.optim
    groups = param_groups(model, o.lr, o.weight_decay, o.paramwise)
    if o.type == "AdamW":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)


def eval_window(config: Config) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """(crop_size, stride) of slide inference: the eval section's, else the training crop and 2/3 of it."""
    crop = config.eval.crop_size or config.data.crop_size
    if crop is None:
        with contextlib.suppress(ImportError, KeyError):
            from ..data import DATASETS

            crop = tuple(DATASETS[config.data.name].crop_size)
    stride = config.eval.stride or (tuple(max(1, 2 * c // 3) for c in crop) if crop else None)
    return crop, stride


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _DistributedDataParallel(DistributedDataParallel):
    """DDP that also accepts fastctx's SyncBatchNorm in CPU modules.

    DDP rejects every nn.SyncBatchNorm in a CPU module because torch's kernel
    needs GPUs; fastctx's subclass synchronises CPU tensors itself, so only
    other SyncBatchNorm layers are left to DDP's check.
    """

    def _passing_sync_batchnorm_handle(self, module: nn.Module) -> None:
        foreign = [m for m in module.modules() if isinstance(m, nn.SyncBatchNorm) and not isinstance(m, SyncBatchNorm)]
        if foreign or self.device_type != "cpu":
            super()._passing_sync_batchnorm_handle(module)


class _LossStep(nn.Module):
    """`forward(img, label) -> model.loss(img, label)`, so DistributedDataParallel wraps the training call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, img: torch.Tensor, label: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(img, label)


class Trainer:
    """Trains `config` (see module docstring); `fit()` runs it.

    Args:
        config: the run's Config.
        work_dir: logs, config.yaml and checkpoints (default: runtime.work_dir or work_dirs/<name>).
        resume: True for work_dir/latest.pth, or a checkpoint path; None/False starts fresh.
        model, train_dataset, val_dataset: use these instead of building them from the config
            (the model needs `loss(img, label) -> dict` and `forward(img) -> logits`).
        progress: show the progress line on stderr (default: on the main process).
        stream: where the progress line and messages go (default sys.stderr).
    """

    def __init__(self, config: Config, work_dir: str | Path | None = None, *, resume: bool | str | Path | None = None,
                 model: nn.Module | None = None, train_dataset: Dataset | None = None,
                 val_dataset: Dataset | None = None, progress: bool | None = None, stream: TextIO | None = None):
        self.config = cfg = config
        self.dist: DistInfo = init_distributed(cfg.runtime.device, cfg.runtime.dist_backend)
        self.device = self.dist.device
        if cfg.runtime.amp == "fp16" and self.device.type != "cuda":
            raise ConfigError("runtime.amp: 'fp16' needs a CUDA device (it uses a GradScaler); use 'bf16' on CPU")
        world = self.dist.world_size
        if cfg.train.batch_size % world:
            raise ConfigError(f"train.batch_size ({cfg.train.batch_size}) must be divisible by the number of "
                              f"processes ({world}): each process takes batch_size / {world} images")
        check_backend(cfg, self.device)
        self.batch_per_rank = cfg.train.batch_size // world
        self.work_dir = Path(work_dir) if work_dir is not None else default_work_dir(cfg)
        if self.dist.is_main:
            ensure_work_dir(self.work_dir)
            remove_stale_temporaries(self.work_dir)  # left by a run killed while writing a checkpoint
        self.stream = stream if stream is not None else sys.stderr
        self.show_progress = self.dist.is_main if progress is None else (progress and self.dist.is_main)

        _seed_everything(cfg.train.seed)
        if train_dataset is None or (val_dataset is None and cfg.train.val_interval > 0):
            built_train, built_val = build_datasets(cfg, train=train_dataset is None,
                                                    val=val_dataset is None and cfg.train.val_interval > 0)
            train_dataset = train_dataset if train_dataset is not None else built_train
            val_dataset = val_dataset if val_dataset is not None else built_val
        self.train_dataset, self.val_dataset = train_dataset, val_dataset
        if len(train_dataset) < cfg.train.batch_size:
            raise ConfigError(f"the training set has {len(train_dataset)} image(s), fewer than one batch of "
                              f"train.batch_size={cfg.train.batch_size}: lower train.batch_size or use more images")
        num_classes = getattr(train_dataset, "num_classes", None)
        if model is None:
            if num_classes is None:
                raise ValueError("the training set has no num_classes attribute; pass a model explicitly")
            model = build_model_from_config(cfg, num_classes)
        if cfg.model.norm == "SyncBN" and self.dist.distributed:
            model = convert_sync_batchnorm(model)
        self.model = model.to(self.device)
        # images come as float32; a float64 model (e.g. for exact comparisons) gets float64 images
        self.input_dtype = next(self.model.parameters()).dtype
        self.optimizer = build_optimizer(self.model, cfg)
        self.schedule = PolyLR(cfg.optim.lr, cfg.train.iters, cfg.schedule.power, cfg.schedule.eta_min,
                               cfg.schedule.warmup_iters, cfg.schedule.warmup_ratio)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.runtime.amp == "fp16")
        self.iteration = 0
        self.log_path = self.work_dir / "log.jsonl"
        self.log = JsonLinesLog(self.log_path) if self.dist.is_main else None
        self.last_checkpoint: Path | None = None
        if resume:
            self._resume(resume)
        elif self.log is not None and self.log_path.exists():
            self.log_path.unlink()  # a fresh run in a used work_dir starts a fresh log
        if self.dist.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # Buffers (BN running statistics) are not re-broadcast from rank 0 every forward, as mmseg's
            # MMDistributedDataParallel; newer torch spells the option forward_sync_buffers.
            params = inspect.signature(DistributedDataParallel.__init__).parameters
            no_buffer_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
                              else {"broadcast_buffers": False})
            self.step_module: nn.Module = _DistributedDataParallel(_LossStep(self.model), device_ids=ids,
                                                                   **no_buffer_sync)
        else:
            self.step_module = _LossStep(self.model)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "meta": {"iter": self.iteration, "config": cfg.to_dict(), "config_name": cfg.name,
                     "classes": list(getattr(self.train_dataset, "classes", []) or []),
                     "palette": [list(map(int, c)) for c in getattr(self.train_dataset, "palette", []) or []],
                     "fastctx_version": __version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                     "world_size": self.dist.world_size},
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "sampler": self._sampler().state_dict(self.iteration * cfg.train.accum_steps),
            "rng": rng_state(),
        }

    def save_checkpoint(self) -> Path | None:
        """Write work_dir/iter_<n>.pth (main process) and point latest.pth at it."""
        path = None
        if self.dist.is_main:
            try:
                path = save_checkpoint(self.state_dict(), self.work_dir / f"iter_{self.iteration}.pth")
                update_latest(self.work_dir, path)
            except WorkDirError as exc:
                kept = f"; the previous checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint else ""
                raise WorkDirError(f"{exc}{kept}") from None
            self.last_checkpoint = path
        barrier()
        return path

    def _warn(self, text: str) -> None:
        if self.dist.is_main:
            self.stream.write(f"fastctx: warning: {text}\n")
            self.stream.flush()

    def _load_latest(self, latest: Path) -> tuple[Path, dict[str, Any]]:
        """`latest`, or when it is corrupt or unreadable the newest earlier checkpoint that loads (said so)."""
        try:
            return latest, load_checkpoint(latest)
        except CheckpointError as exc:
            failure = exc
        for previous in previous_checkpoints(self.work_dir, before=latest):
            try:
                state = load_checkpoint(previous)
            except CheckpointError:
                continue
            self._warn(f"{failure}; resuming from the previous checkpoint {previous} instead")
            return previous, state
        raise CheckpointError(f"{failure}; no earlier checkpoint in {self.work_dir} loads either") from None

    def _resume(self, resume: bool | str | Path) -> None:
        if resume is True:
            latest = find_latest(self.work_dir)
            if latest is None:
                raise FileNotFoundError(f"--resume: no checkpoint to resume from in {self.work_dir} "
                                        f"(expected {self.work_dir / 'latest.pth'})")
            path, state = self._load_latest(latest)
        else:
            path = Path(resume)
            state = load_checkpoint(path)
        missing = [k for k in ("meta", "state_dict", "optimizer", "rng") if k not in state]
        if missing:
            raise CheckpointError(f"{path} is not a fastctx training checkpoint (no {missing}); "
                                  "use model.pretrained to initialise from weights only")
        iteration = int(state["meta"]["iter"])
        if iteration > self.config.train.iters:
            raise CheckpointError(f"checkpoint {path} is at iteration {iteration}, past train.iters "
                                  f"({self.config.train.iters})")
        load_weights(self.model, state)
        self.optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if state.get("scheduler") and state["scheduler"] != self.schedule.state_dict():
            warnings.warn(f"resuming with a different schedule than the checkpoint's: {state['scheduler']} -> "
                          f"{self.schedule.state_dict()}; the config's is used", stacklevel=2)
        self.iteration = iteration
        expected = self._sampler().state_dict(iteration * self.config.train.accum_steps)
        if state.get("sampler") and state["sampler"] != expected:
            warnings.warn(f"the data order differs from the interrupted run's (sampler {state['sampler']} -> "
                          f"{expected}): the resumed run will not match an uninterrupted one", stacklevel=2)
        set_rng_state(state["rng"])
        self.last_checkpoint = path
        if self.log is not None:
            self.log.truncate_after(iteration)

    # ------------------------------------------------------------------ data

    def _sampler(self, start_batch: int = 0) -> TrainBatchSampler:
        return TrainBatchSampler(len(self.train_dataset), self.batch_per_rank, world_size=self.dist.world_size,
                                 rank=self.dist.rank, seed=self.config.train.seed, start_batch=start_batch)

    def _train_batches(self):
        start = self.iteration * self.config.train.accum_steps
        loader = DataLoader(self.train_dataset, batch_sampler=self._sampler(start),
                            num_workers=self.config.data.num_workers, collate_fn=collate_samples,
                            pin_memory=self.device.type == "cuda",
                            generator=torch.Generator())  # own generator: the global RNG stays untouched
        return iter(loader)

    # ------------------------------------------------------------------ loop

    def validate(self) -> SegMetrics:
        """Evaluate the current weights on the validation set (all processes; metrics are global)."""
        if self.val_dataset is None:  # train.val_interval = 0: built on first use
            _, self.val_dataset = build_datasets(self.config, train=False, val=True)
        e = self.config.eval
        crop, stride = eval_window(self.config)
        return evaluate(self.model, self.val_dataset, mode=e.mode, crop_size=crop, stride=stride, tta=e.tta,
                        tta_scales=e.tta_scales, tta_flip=e.tta_flip, device=self.device, amp=self.config.runtime.amp,
                        dist_info=self.dist, num_workers=self.config.data.num_workers)

    def _train_iteration(self, batches) -> tuple[dict[str, float], float]:
        cfg = self.config
        accum = cfg.train.accum_steps
        lr = self.schedule.apply(self.optimizer, self.iteration)
        sums: dict[str, torch.Tensor] = {}
        data_time = 0.0
        for micro in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            data_time += time.perf_counter() - t0
            img = batch["img"].to(self.device, self.input_dtype, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.dist.distributed and micro < accum - 1:
                sync = self.step_module.no_sync()  # all-reduce the gradients once, on the last micro-batch
            with sync:
                with autocast_context(self.device, cfg.runtime.amp):
                    losses = self.step_module(img, label)
                total = sum(losses.values())
                self.scaler.scale(total / accum).backward()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + value.detach().double() / accum
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        values = {k: v.item() for k, v in sums.items()}
        values["loss"] = sum(values.values())
        values["lr"] = lr
        return values, data_time

    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to train.iters (or stop after iteration `stop_at`, writing a checkpoint there)."""
        cfg = self.config
        total_iters = cfg.train.iters
        start_iter = self.iteration
        if stop_at is not None and not start_iter < stop_at <= total_iters:
            raise ValueError(f"stop_at must be in ({start_iter}, {total_iters}] (after the current iteration, "
                             f"at most train.iters), got {stop_at}")
        if self.dist.is_main:
            config_path = ensure_work_dir(self.work_dir) / "config.yaml"
            try:
                with open(config_path, "w") as f:
                    yaml.safe_dump(cfg.to_dict(), f, sort_keys=False)
            except OSError as exc:
                raise WorkDirError(write_failure(exc, config_path)) from None
        bar = ProgressBar(total_iters, stream=self.stream, line_interval=cfg.train.log_interval,
                          enabled=self.show_progress, prefix="iter ")
        imgs_per_iter = cfg.train.batch_size * cfg.train.accum_steps
        metrics = None
        wall_start = time.perf_counter()
        train_time = 0.0
        window: dict[str, list[float]] = {}
        window_time = window_data = 0.0
        recent: list[float] = []
        self.model.train()
        batches = self._train_batches() if self.iteration < total_iters else None
        try:
            with use_backend(cfg.runtime.backend):
                while self.iteration < total_iters:
                    t0 = time.perf_counter()
                    values, data_time = self._train_iteration(batches)
                    self.iteration += 1
                    elapsed = time.perf_counter() - t0
                    train_time += elapsed
                    window_time += elapsed
                    window_data += data_time
                    recent = (recent + [elapsed])[-20:]
                    for key, value in values.items():
                        window.setdefault(key, []).append(value)
                    it = self.iteration
                    last = it == total_iters or it == stop_at
                    speed = imgs_per_iter / (sum(recent) / len(recent))
                    eta = (total_iters - it) * sum(recent) / len(recent)
                    bar.update(it, {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.3e}",
                                    "img/s": f"{speed:.1f}", "ETA": format_duration(eta)})
                    if it % cfg.train.log_interval == 0 or last:
                        self._log_train(it, window, window_time, window_data, imgs_per_iter)
                        window, window_time, window_data = {}, 0.0, 0.0
                    if cfg.train.val_interval and (it % cfg.train.val_interval == 0 or it == total_iters):
                        metrics = self.validate()
                        self._log_val(it, metrics, bar)
                    if (cfg.train.checkpoint_interval and it % cfg.train.checkpoint_interval == 0) or last:
                        self.save_checkpoint()
                    if it == stop_at:
                        break
        finally:
            bar.close()
            del batches  # shuts the DataLoader workers down
        trained = self.iteration - start_iter
        return TrainResult(work_dir=self.work_dir, iters=self.iteration, metrics=metrics,
                           wall_time=time.perf_counter() - wall_start, train_time=train_time,
                           imgs_per_s=trained * imgs_per_iter / train_time if train_time > 0 else float("nan"),
                           checkpoint=self.last_checkpoint, log_path=self.log_path)

    def _log_train(self, it: int, window: dict[str, list[float]], window_time: float, window_data: float,
                   imgs_per_iter: int) -> None:
        n = len(window["loss"])
        means = all_reduce_mean({k: sum(v) / n for k, v in window.items() if k != "lr"})
        if not math.isfinite(means["loss"]):
            raise FloatingPointError(f"the training loss is {means['loss']} at iteration {it} ({means})")
        if self.log is None:
            return
        record = {"mode": "train", "iter": it, "lr": window["lr"][-1], "loss": means.pop("loss"), **means,
                  "time": window_time / n, "data_time": window_data / n,
                  "imgs_per_s": imgs_per_iter * n / window_time if window_time > 0 else None}
        if self.device.type == "cuda":
            record["memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        self.log.write(record)

    def _log_val(self, it: int, metrics: SegMetrics, bar: ProgressBar) -> None:
        if self.log is None:
            return
        self.log.write({"mode": "val", "iter": it, **metrics.to_dict()})
        bar.message(f"validation at iteration {it}: aAcc {metrics.aAcc:.2f}  mIoU {metrics.mIoU:.2f}  "
                    f"mAcc {metrics.mAcc:.2f}")
