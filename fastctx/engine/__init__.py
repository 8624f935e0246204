"""Training, evaluation, inference, checkpoints and distributed setup for fastctx segmentors.

    from fastctx.engine import Trainer, load_config
    cfg = load_config("apcnet_r18-d8_synthetic", ["train.iters=200"])
    result = Trainer(cfg, "work_dirs/demo").fit()
    print(result.metrics.mIoU)
"""
from .checkpoint import (CheckpointError, WorkDirError, find_latest, load_checkpoint, load_weights, save_checkpoint,
                         update_latest)
from .config import (Config, ConfigError, DataConfig, EvalConfig, ModelConfig, OptimConfig, RuntimeConfig,
                     ScheduleConfig, TrainConfig, available_configs, load_config, parse_overrides)
from .distributed import DistInfo, init_distributed
from .evaluate import evaluate
from .inference import infer_logits, predict_classes, slide_inference, tta_probabilities, whole_inference
from .metrics import ConfusionMatrix, SegMetrics, format_metrics_table, intersect_and_union, metrics_from_confusion
from .sampler import ShardSampler, TrainBatchSampler, collate_samples
from .schedule import PolyLR
from .trainer import (Trainer, TrainResult, build_datasets, build_model_from_config, build_optimizer, check_backend,
                      default_work_dir, eval_window)

__all__ = [
    "CheckpointError", "Config", "ConfigError", "ConfusionMatrix", "DataConfig", "DistInfo", "EvalConfig",
    "ModelConfig", "OptimConfig", "PolyLR", "RuntimeConfig", "ScheduleConfig", "SegMetrics", "ShardSampler",
    "TrainBatchSampler", "TrainConfig", "TrainResult", "Trainer", "WorkDirError", "available_configs",
    "build_datasets", "build_model_from_config", "build_optimizer", "check_backend", "collate_samples",
    "default_work_dir", "eval_window", "evaluate", "find_latest", "format_metrics_table", "infer_logits",
    "init_distributed", "intersect_and_union", "load_checkpoint", "load_config", "load_weights",
    "metrics_from_confusion", "parse_overrides", "predict_classes", "save_checkpoint", "slide_inference",
    "tta_probabilities", "update_latest", "whole_inference",
]
