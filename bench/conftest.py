"""pytest-benchmark micro-benchmarks of fastctx: `pytest bench/ --benchmark-only`.

The same ops, heads, providers and inputs as `fastctx bench` (fastctx.benchmark), timed
by pytest-benchmark: a few rounds each at the "cpu" shape set on CPU, "realistic" on
CUDA. Not part of the test suite (`pytest tests` never collects this directory).

Environment: FASTCTX_BENCH_SHAPES (shape set), FASTCTX_BENCH_ROUNDS (rounds, default 3),
FASTCTX_BENCH_PROVIDERS (comma-separated subset of the providers).
"""
from __future__ import annotations

import os

import pytest
import torch

from fastctx.benchmark.models import MODEL_MODES, build_model_instance, model_providers
from fastctx.benchmark.providers import MODES, build_instance, case_shapes, default_providers
from fastctx.benchmark.shapes import get_shape_set
from fastctx.benchmark.traffic import count_traffic

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = get_shape_set(os.environ.get("FASTCTX_BENCH_SHAPES", "realistic" if DEVICE.type == "cuda" else "cpu"))
ROUNDS = int(os.environ.get("FASTCTX_BENCH_ROUNDS", "3"))
_ONLY = [p.strip() for p in os.environ.get("FASTCTX_BENCH_PROVIDERS", "").split(",") if p.strip()]


def _selected(providers: list[str]) -> list[str]:
    return [p for p in providers if not _ONLY or p in _ONLY]


def pytest_generate_tests(metafunc):
    """Parametrize `bench_case` over the ops a module lists in BENCH_OPS, and `bench_model`
    over the models in BENCH_MODELS: every shape, mode and provider that runs here."""
    if "bench_case" in metafunc.fixturenames:
        params, ids = [], []
        for op in metafunc.module.BENCH_OPS:
            for case in case_shapes(op, SHAPES):
                for mode in MODES:
                    for provider in _selected(default_providers(op, DEVICE, torch.float32)):
                        params.append((op, case, mode, provider))
                        ids.append(f"{op}-{case.label.replace(' ', '_')}-{mode}-{provider}")
        metafunc.parametrize("bench_case", params, ids=ids)
    if "bench_model" in metafunc.fixturenames:
        params = [(name, mode, provider) for name in metafunc.module.BENCH_MODELS for mode in MODEL_MODES
                  for provider in _selected(model_providers(DEVICE))]
        metafunc.parametrize("bench_model", params, ids=["-".join(p) for p in params])


def _pedantic(benchmark, step, rounds: int) -> None:
    # One untimed round first: lazy initialisation, torch.compile's compilation, autotuning.
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)


@pytest.fixture
def run_case(benchmark):
    """Benchmark one (op, shape, mode, provider); the traffic model goes to extra_info."""

    def run(bench_case) -> None:
        op, case, mode, provider = bench_case
        inst = build_instance(op, case, mode, [provider], DEVICE)
        benchmark.group = f"{op} {case.label} {mode}"
        benchmark.extra_info["lower_bound_bytes"] = inst.lower_bound_bytes()
        if provider != "compile":
            benchmark.extra_info["traffic_bytes"] = count_traffic(
                lambda: build_instance(op, case, mode, [provider], DEVICE), lambda i: i.step(provider)).total
        _pedantic(benchmark, lambda: inst.step(provider), ROUNDS)

    return run


@pytest.fixture
def run_model(benchmark):
    """Benchmark one whole-model training iteration or inference."""

    def run(bench_model, size: int, batch: int, rounds: int) -> None:
        name, mode, provider = bench_model
        inst = build_model_instance(name, mode, [provider], DEVICE, size=size, batch=batch)
        benchmark.group = f"{name} {inst.shape} {mode}"
        _pedantic(benchmark, lambda: inst.step(provider), rounds)

    return run
