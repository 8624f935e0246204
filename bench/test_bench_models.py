"""Whole models: a training iteration and an inference of APCNet-R50 and EncNet-R50 at 512x512.

Slow on CPU (seconds per iteration): one timed round after the warm-up, batch 2 (a
training iteration needs more than one image for BatchNorm over the ACM's pooled maps).
"""
import torch

BENCH_MODELS = ("apcnet_r50-d8", "encnet_r50-d8")


def test_model(bench_model, run_model):
    run_model(bench_model, size=512, batch=2, rounds=5 if torch.cuda.is_available() else 1)
