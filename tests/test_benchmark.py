"""The benchmark suite (fastctx.benchmark): traffic model, lower bounds, providers, outputs, CLI.

Oracles: bytes counted by hand from the ops' definitions (docs/kernels.md and the eager
code), the eager reference's outputs and gradients, known allocations for the memory
probe, and the files read back.
"""
import csv
import math
import subprocess
import sys

import pytest
import torch

import fastctx.benchmark as bench
from fastctx.benchmark import flops, gpu, memory, timing
from fastctx.benchmark.providers import (
    ALL_OPS, CaseShape, build_instance, case_shapes, default_providers, provider_unavailable_reason,
)
from fastctx.benchmark.report import FIELDS, add_ratios, format_table, plot_speedups, read_csv, write_csv
from fastctx.benchmark.shapes import get_shape_set
from fastctx.benchmark.traffic import TrafficCounter, count_traffic, footprint_bytes
from fastctx.models import MODEL_NAMES
from tolerances import assert_close

TINY = get_shape_set("tiny")
CPU = torch.device("cpu")


def _traffic(op, case, mode, provider):
    counter = count_traffic(lambda: build_instance(op, case, mode, [provider]), lambda i: i.step(provider))
    return counter.read, counter.written


# --------------------------------------------------------------------------- traffic model

def test_counter_rules_views_broadcast_inplace_and_repeats():
    x = torch.randn(4, 8)
    row = torch.randn(8)
    with TrafficCounter() as c:
        y = x.view(8, 4).t()  # views move nothing
    assert (c.read, c.written) == (0, 0) and y.shape == (4, 8)
    with TrafficCounter() as c:
        z = x + row.expand(4, 8)  # the expanded operand is 8 floats in memory
    assert (c.read, c.written) == (4 * 32 + 4 * 8, 4 * 32)
    with TrafficCounter() as c:
        z.add_(x)  # reads z and x, writes z
    assert (c.read, c.written) == (2 * 128, 128)
    with TrafficCounter() as c:
        z.copy_(x)  # copy_ does not read its destination
    assert (c.read, c.written) == (128, 128)
    with TrafficCounter() as c:
        torch.mul(x, x)  # one tensor passed twice is read once
    assert (c.read, c.written) == (128, 128)
    assert footprint_bytes(row.expand(1000, 8)) == 32
    assert footprint_bytes(torch.empty(0, 5)) == 0


def test_residual_relu_traffic_matches_hand_count():
    case = case_shapes("residual_relu", TINY)[0]
    b, h, w = case.params["batch"], case.params["height"], case.params["width"]
    c = len(case.params["pool_scales"]) * case.params["channels"]
    t, v = 4 * b * c * h * w, 4 * c  # one [B, C, H, W] map and one per-channel vector, fp32
    m = b * c * ((h * w + 7) // 8)  # the saved out > 0 bits
    # eager: y*scale, +shift, relu, +residual, relu -- each reads its operands, writes a map
    assert _traffic("residual_relu", case, "fwd", "eager") == ((t + v) + (t + v) + t + 2 * t + t, 5 * t)
    # fused forward (kernel contract): reads y, residual, scale, shift; writes out
    assert _traffic("residual_relu", case, "fwd", "fastctx-cpu") == (2 * t + 2 * v, t)
    # training forward also writes the mask; backward reads grad, y, mask, scale, shift and writes
    # grad_y, grad_residual, grad_scale, grad_shift
    assert _traffic("residual_relu", case, "fwdbwd", "fastctx-cpu") == (4 * t + m + 4 * v, 3 * t + m + 2 * v)


def test_pyramid_pool_and_gla_context_traffic_match_hand_count():
    case = case_shapes("pyramid_pool", TINY)[0]
    p = case.params
    x = 4 * p["batch"] * p["in_channels"] * p["height"] * p["width"]
    pooled = 4 * p["batch"] * p["in_channels"] * sum(s * s for s in p["pool_scales"])
    groups = len(p["pool_scales"])
    # eager: one adaptive_avg_pool2d per scale reads all of x; torch.cat reads the pieces, writes the result
    assert _traffic("pyramid_pool", case, "fwd", "eager") == (groups * x + pooled, 2 * pooled)
    assert _traffic("pyramid_pool", case, "fwd", "fastctx-cpu") == (x, pooled)
    assert _traffic("pyramid_pool", case, "fwdbwd", "fastctx-cpu") == (x + pooled, pooled + x)

    case = case_shapes("gla_context", TINY)[0]
    p = case.params
    s_tot = sum(s * s for s in p["pool_scales"])
    x = 4 * p["batch"] * len(p["pool_scales"]) * p["channels"] * p["height"] * p["width"]
    small = 4 * (s_tot * p["channels"] + p["batch"] * s_tot + p["batch"] * p["channels"] * s_tot)  # W, bias, P
    assert _traffic("gla_context", case, "fwd", "fastctx-cpu") == (x + small, x)
    # backward recomputes the affinity from x: reads grad, x and the small operands again
    assert _traffic("gla_context", case, "fwdbwd", "fastctx-cpu") == (x + small + 2 * x + small, x + x + small)


def test_lower_bound_is_inputs_plus_outputs():
    case = case_shapes("gla_context", TINY)[0]
    p = case.params
    s_tot = sum(s * s for s in p["pool_scales"])
    x = 4 * p["batch"] * len(p["pool_scales"]) * p["channels"] * p["height"] * p["width"]
    small = 4 * (s_tot * p["channels"] + p["batch"] * s_tot + p["batch"] * p["channels"] * s_tot)
    fwd = build_instance("gla_context", case, "fwd", ["eager"])
    assert fwd.lower_bound_bytes() == (x + small) + x
    # + grad of z read, grads of x, W, bias, P written
    assert build_instance("gla_context", case, "fwdbwd", ["eager"]).lower_bound_bytes() == 2 * (2 * x + small)
    # a fused op at its lower bound in the forward; mmseg's maths well above it
    assert sum(_traffic("gla_context", case, "fwd", "fastctx-cpu")) == fwd.lower_bound_bytes()
    assert sum(_traffic("gla_context", case, "fwd", "eager")) > 2 * fwd.lower_bound_bytes()


def test_head_lower_bound_counts_parameters_and_buffers():
    case = case_shapes("enc_module", TINY)[0]
    inst = build_instance("enc_module", case, "fwdbwd", ["eager"])
    p = case.params
    b, c, n = p["batch"], p["channels"], p["height"] * p["width"]
    params = sum(t.numel() for t in inst.module.parameters())
    buffers = sum(t.numel() * t.element_size() for t in inst.module.buffers())
    outputs = b * c + b * c * n
    data = b * c * n
    # read: x, params, buffers, output grads; written: outputs, grad x, param grads, buffers
    expected = 4 * (data + params + outputs) + buffers + 4 * (outputs + data + params) + buffers
    assert inst.lower_bound_bytes() == expected


# --------------------------------------------------------------------------- providers

def _seeded(inst, provider):
    torch.manual_seed(0)  # the heads' Dropout2d masks
    return inst.outputs_and_grads(provider)


@pytest.mark.parametrize("op", ALL_OPS)
def test_every_provider_computes_the_reference(op):
    """eager_best, compile (aot_eager: Dynamo + AOTAutograd without code generation; for
    the ops and one head, to bound the test's time) and fastctx-cpu give eager's outputs and
    gradients (float64, forward + backward)."""
    case = case_shapes(op, TINY)[0]
    providers = default_providers(op, CPU, torch.float64)
    assert providers[0] == "eager" and "fastctx-cpu" in providers and "compile" in providers
    if op in ("acm", "apc_head", "enc_module"):
        providers.remove("compile")
    inst = build_instance(op, case, "fwdbwd", providers, dtype=torch.float64, compile_backend="aot_eager")
    ref_out, ref_grads = _seeded(inst, "eager")
    assert len(ref_grads) == len(inst.leaves) > 0
    for provider in providers[1:]:
        outs, grads = _seeded(inst, provider)
        for got, want in zip(outs + grads, ref_out + ref_grads, strict=True):
            assert_close(got, want, torch.float64, f"{op} {provider}")


def test_triton_interpreter_is_not_a_provider_and_bad_names_are_refused():
    assert "fastctx-triton" not in default_providers("encoding", CPU, torch.float32)
    assert "not a benchmark provider" in provider_unavailable_reason("fastctx-triton", CPU, torch.float32)
    assert "runs CUDA tensors" in provider_unavailable_reason("fastctx-cuda", CPU, torch.float32)
    case = case_shapes("encoding", TINY)[0]
    with pytest.raises(ValueError, match="unknown provider 'fast'"):
        build_instance("encoding", case, "fwd", ["fast"])
    with pytest.raises(ValueError, match="unknown op 'acm2'.*pyramid_pool"):
        case_shapes("acm2", TINY)
    with pytest.raises(ValueError, match="unknown mode 'bwd'"):
        build_instance("encoding", case, "bwd", ["eager"])
    with pytest.raises(ValueError, match="unknown shape set 'huge'"):
        get_shape_set("huge")


# --------------------------------------------------------------------------- timing and memory

def test_timing_interleaves_rotates_and_takes_quartiles():
    calls = []
    stats = timing.time_interleaved({n: (lambda n=n: calls.append(n)) for n in "abc"}, reps=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert set(stats) == set("abc") and all(s.reps == 3 and s.q25 <= s.median <= s.q75 for s in stats.values())
    st = timing.TimingStats.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (st.median, st.q25, st.q75, st.iqr) == (3.0, 2.0, 4.0, 2.0)
    with pytest.raises(ValueError, match="reps must be >= 1"):
        timing.time_interleaved({"a": lambda: None}, reps=0)


@pytest.fixture
def events(monkeypatch):
    """What the timed calls record, with "flush" for each CPU cache flush."""
    events = []

    class RecordingFlush:
        def __call__(self):
            events.append("flush")

    monkeypatch.setattr(timing, "CpuCacheFlush", RecordingFlush)
    return events


def test_cpu_timing_flushes_caches_before_every_timed_call(events):
    timing.time_interleaved({n: (lambda n=n: events.append(n)) for n in "ab"}, reps=2, warmup=1,
                            prepare=lambda: events.append("prepare"))
    # prepare before every call; warm-up round unflushed, then a flush before each timed call
    assert events == ["prepare", "a", "prepare", "b",
                      "prepare", "flush", "a", "prepare", "flush", "b",
                      "prepare", "flush", "b", "prepare", "flush", "a"]


def test_cpu_timing_with_warm_caches_never_flushes(events):
    timing.time_interleaved({n: (lambda n=n: events.append(n)) for n in "ab"}, reps=2, warmup=1, flush_caches=False)
    assert events == ["a", "b", "a", "b", "b", "a"]


def test_main_warm_caches_times_unflushed_into_its_own_csv(tmp_path, capsys, monkeypatch):
    flushes = []
    real = timing.time_interleaved

    def recording(*args, flush_caches=True, **kwargs):
        flushes.append(flush_caches)
        return real(*args, flush_caches=flush_caches, **kwargs)

    monkeypatch.setattr(bench, "time_interleaved", recording)
    out = tmp_path / "results"
    assert bench.main(["--shapes", "tiny", "--ops", "window_attention", "--providers", "eager,fastctx-cpu",
                       "--mode", "fwd", "--reps", "1", "--out", str(out), "--warm-caches"]) == 0
    assert flushes and not any(flushes)
    assert "caches warm" in capsys.readouterr().out
    (csv_path,) = out.glob("*.csv")
    assert csv_path.name.startswith("cpu-") and csv_path.stem.endswith("-warm")  # flushed results stay apart
    assert {r["provider"] for r in read_csv(csv_path)} == {"eager", "fastctx-cpu"}


def test_op_benchmark_releases_gradients_untimed_between_providers(monkeypatch):
    # The providers share the leaves: no step may be timed freeing another's gradients.
    seen = []
    real = timing.time_interleaved

    def checking(calls, reps, warmup, device, prepare=None, flush_caches=True):
        def call(name):
            def run():
                assert all(t.grad is None for t in seen[-1].__self__.leaves), f"{name} starts with gradients"
                calls[name]()
            return run
        seen.append(prepare)
        return real({name: call(name) for name in calls}, reps, warmup, device, prepare, flush_caches)

    monkeypatch.setattr(bench, "time_interleaved", checking)
    rows = bench.run(ops=["window_attention"], shapes="tiny", modes=["fwdbwd"], providers=["eager", "fastctx-cpu"],
                     device=CPU, reps=2, out=None, warmup=1)
    assert len(seen) == 2 and all(p.__name__ == "release_grads" for p in seen)
    assert {r["provider"] for r in rows} == {"eager", "fastctx-cpu"}


def test_cpu_cache_flush_size():
    assert timing.parse_cache_size("32768K\n") == 32 << 20
    assert timing.parse_cache_size("1M") == 1 << 20
    assert timing.parse_cache_size("2G") == 2 << 30
    assert timing.parse_cache_size("512") == 512
    assert timing.parse_cache_size("") is None and timing.parse_cache_size("lots") is None
    assert timing.cpu_last_level_cache_bytes() >= 1 << 20
    assert timing.CpuCacheFlush(1 << 20).buffer.numel() * 4 == 2 << 20


_KNOWN_ALLOCATION = """
import torch
from fastctx.benchmark import memory
holder = []
def step():
    holder.append(torch.ones(64 * memory.MiB // 4))
print(memory.peak_step_bytes(step, holder.clear, "cpu"))
"""


def test_cpu_peak_memory_of_a_known_allocation():
    # In a fresh process, as the suite measures: a long-lived test process's
    # allocator state and threads make its resident-memory peak unreliable.
    size = 64 * memory.MiB  # above glibc's largest mmap threshold: freed to the OS at once
    out = subprocess.run([sys.executable, "-c", _KNOWN_ALLOCATION], capture_output=True, text=True, check=True)
    peak = int(out.stdout.strip().splitlines()[-1])
    assert size <= peak < size + 8 * memory.MiB


def test_encoding_peak_memory_fresh_process_vs_fused():
    """mmseg's form materialises [B, N, K, D] tensors (measured in a fresh process, as
    `--memory` does); the fused op never does (measured here)."""
    b, d, k, h, w = 1, 64, 32, 32, 32
    params = dict(batch=b, height=h, width=w, in_channels=d, channels=d, enc_channels=d, num_codes=k, num_classes=5)
    spec = dict(kind="op", provider="eager", device="cpu", dtype="float32", threads=1,
                rows=[dict(op="encoding", case=dict(label="probe", params=params), mode="fwd")])
    (result,) = memory.measure_in_subprocess(spec, timeout=120)
    assert result["provider"] == "eager" and result["mode"] == "fwd"
    one_bnkd = 4 * b * h * w * k * d  # 8 MiB
    assert result["peak_bytes"] >= one_bnkd
    inst = build_instance("encoding", CaseShape("probe", params), "fwd", ["fastctx-cpu"])
    fused = memory.peak_step_bytes(lambda: inst.step("fastctx-cpu"), lambda: None, "cpu")
    assert fused < one_bnkd / 4


# --------------------------------------------------------------------------- outputs

def _rows():
    rows = []
    for provider, ms, traffic in (("eager", 4.0, 400), ("fastctx-cpu", 1.0, 100), ("compile", 2.0, None)):
        rows.append(dict(op="encoding", shape="2x8x5x6 K=4", mode="fwd", provider=provider, dtype="float32",
                         shape_set="tiny", median_ms=ms, iqr_ms=0.5, q25_ms=ms - 0.25, q75_ms=ms + 0.25, reps=3,
                         peak_mib=1.5, traffic_bytes=traffic, lower_bound_bytes=100, peak_gbps=None,
                         device="cpu-test", machine="m", cpu_model="c", threads=1, torch="t", triton="", date="d"))
    return rows


def test_ratios_table_csv_merge_and_plot(tmp_path):
    rows = _rows()
    add_ratios(rows)
    by = {r["provider"]: r for r in rows}
    assert by["fastctx-cpu"]["speedup_vs_eager"] == 4.0 and by["compile"]["speedup_vs_eager"] == 2.0
    assert by["eager"]["traffic_ratio"] == 4.0 and by["compile"]["traffic_ratio"] is None
    assert math.isclose(by["fastctx-cpu"]["achieved_gbps"], 100 / 1e-3 / 1e9)

    table = format_table(rows, "title")
    lines = table.splitlines()
    assert lines[0] == "title" and "median ms" in lines[1] and "x LB" in lines[1]
    assert any(line.startswith("encoding") and "fastctx-cpu" in line and "4.00" in line for line in lines)

    path = tmp_path / "cpu-test.csv"
    write_csv(path, rows)
    other = dict(rows[0], op="acm", shape="s")
    updated = dict(rows[1], median_ms=0.5)
    written = write_csv(path, [updated, other])  # replaces fastctx-cpu's row, keeps eager and compile
    back = read_csv(path)
    assert list(back[0]) == list(FIELDS) and back == written
    assert sorted((r["op"], r["provider"], r["median_ms"]) for r in back) == [
        ("acm", "eager", "4"), ("encoding", "compile", "2"), ("encoding", "eager", "4"),
        ("encoding", "fastctx-cpu", "0.5")]
    with open(path, newline="") as f:
        assert next(csv.reader(f)) == list(FIELDS)

    png = plot_speedups(back, tmp_path / "cpu-test.png", title="t")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_speedups([r for r in back if r["provider"] == "eager"], tmp_path / "x.png")


def test_flops_of_a_step_on_fake_tensors_and_their_ceiling():
    case = case_shapes("class_attention", TINY)[0]
    p = case.params
    b, k, c, n = p["batch"], p["num_classes"], p["attention_channels"], p["height"] * p["width"]
    unit = 2 * b * n * k * c  # one [K x N] product over C channels (Cq = Cv = C here)

    def step_flops(mode, provider):
        return flops.count_flops(lambda: build_instance("class_attention", case, mode, [provider]),
                                 lambda i: i.step(provider))

    # eager: scores and out forward, two products each backward; fused: the scores once more
    assert step_flops("fwd", "eager") == step_flops("fwd", "fastctx-cpu") == 2 * unit
    assert step_flops("fwdbwd", "eager") == 6 * unit and step_flops("fwdbwd", "fastctx-cpu") == 7 * unit

    rows = _rows()
    for r in rows:
        r.update(flops=None if r["provider"] == "compile" else 8e6, matmul_peak_gflops=100.0)
    add_ratios(rows)
    by = {r["provider"]: r for r in rows}
    # 8 MFLOP at 100 GFLOP/s: 0.08 ms; eager takes 4 ms
    assert math.isclose(by["fastctx-cpu"]["achieved_gflops"], 8.0) and math.isclose(by["eager"]["achieved_gflops"], 2.0)
    assert math.isclose(by["fastctx-cpu"]["flop_ceiling_x"], 50.0) and by["compile"]["flop_ceiling_x"] is None
    header = format_table(rows).splitlines()[0]
    assert "GFLOP/s" in header and "ceil x" in header
    assert "ceil x" not in format_table(_rows()).splitlines()[0]

    peak = flops.matmul_peak_flops("cpu", size=256, reps=2)
    assert 1e8 < peak < 1e13
    with pytest.raises(ValueError, match="reps must be >= 1"):
        flops.matmul_peak_flops("cpu", reps=0)


def test_main_end_to_end_tiny(tmp_path, capsys):
    out = tmp_path / "results"
    status = bench.main(["--shapes", "tiny", "--ops", "encoding", "--reps", "2", "--out", str(out),
                         "--plot", "--compile-backend", "aot_eager", "--threads", "1"])
    assert status == 0
    printed = capsys.readouterr().out
    (csv_path,) = out.glob("*.csv")
    assert csv_path.name.startswith("cpu-") and csv_path.with_suffix(".png").exists()
    rows = read_csv(csv_path)
    providers = ["eager", "eager_best", "compile", "fastctx-cpu"]
    assert sorted((r["op"], r["mode"], r["provider"]) for r in rows) == sorted(
        ("encoding", mode, p) for mode in ("fwd", "fwdbwd") for p in providers)
    for r in rows:
        assert float(r["median_ms"]) > 0 and r["torch"] == torch.__version__ and r["threads"] == "1"
        assert r["cpu_model"] and r["machine"] and r["date"] and r["shape_set"] == "tiny"
        assert (r["traffic_bytes"] == "") == (r["provider"] == "compile")
        assert float(r["lower_bound_bytes"]) > 0
        if r["provider"] == "eager":
            assert float(r["speedup_vs_eager"]) == 1.0
        assert any(line.startswith(r["op"]) and r["provider"] in line for line in printed.splitlines())
    fused = [r for r in rows if r["provider"] == "fastctx-cpu" and r["mode"] == "fwd"]
    assert all(float(r["traffic_ratio"]) == 1.0 for r in fused)  # fused forwards sit at the lower bound


def test_main_with_flops_fills_the_flop_columns(tmp_path, capsys):
    out = tmp_path / "results"
    assert bench.main(["--shapes", "tiny", "--ops", "window_attention", "--providers", "eager,fastctx-cpu",
                       "--mode", "fwdbwd", "--reps", "1", "--out", str(out), "--flops", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "ceil x" in printed and "GFLOP/s: the step's product FLOPs" in printed
    rows = read_csv(next(out.glob("*.csv")))
    assert {r["provider"] for r in rows} == {"eager", "fastctx-cpu"}
    for r in rows:
        assert float(r["flops"]) > 0 and float(r["matmul_peak_gflops"]) > 0
        assert math.isclose(float(r["achieved_gflops"]), float(r["flops"]) / float(r["median_ms"]) / 1e6, rel_tol=1e-4)
        assert float(r["flop_ceiling_x"]) > float(r["speedup_vs_eager"]) or r["provider"] == "eager"


def test_model_rows_time_training_and_inference(tmp_path):
    rows = bench.run(ops=[], shapes="tiny", modes=["fwd"], providers=None, device=CPU, models=["apcnet_r18-d8"],
                     model_size=32, model_batch=2, model_reps=1, out=None, warmup=1)
    assert sorted((r["mode"], r["provider"]) for r in rows) == [
        ("infer", "eager"), ("infer", "fastctx-cpu"), ("train", "eager"), ("train", "fastctx-cpu")]
    assert all(r["op"] == "apcnet_r18-d8" and r["shape"] == "2x3x32x32" and r["median_ms"] > 0 for r in rows)


def test_model_rows_default_to_the_smallest_batch_each_model_runs():
    rows = bench.run(ops=[], shapes="tiny", modes=["fwd"], providers=["eager"], device=CPU,
                     models=["apcnet_r18-d8", "encnet_r18-d8"], model_size=32, model_reps=1, out=None, warmup=1)
    shapes = {(r["op"], r["mode"]): r["shape"] for r in rows}
    # One image, except APCNet training: its ACM's BatchNorm over a 1x1 pool needs two.
    assert shapes == {("apcnet_r18-d8", "train"): "2x3x32x32", ("apcnet_r18-d8", "infer"): "1x3x32x32",
                      ("encnet_r18-d8", "train"): "1x3x32x32", ("encnet_r18-d8", "infer"): "1x3x32x32"}


def test_models_that_norm_a_global_pool_train_two_images():
    """ACFNet's ASPP base, like APCNet's ACM and UPerNet's PPM, applies BatchNorm to a [B, C, 1, 1] pool: training
    needs B >= 2."""
    from fastctx.benchmark.models import model_batch
    from fastctx.models import build_model

    with torch.device("meta"):
        models = {name: build_model(name, 19)
                  for name in ("acfnet_r18-d8", "apcnet_r18-d8", "ocrnet_r18-d8", "upernet_swin-t")}
    assert [model_batch(n, m, "train", None) for n, m in models.items()] == [2, 2, 1, 2]
    assert [model_batch(n, m, "infer", None) for n, m in models.items()] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="training acfnet_r18-d8 needs at least 2 images .* ASPP image pool"):
        model_batch("acfnet_r18-d8", models["acfnet_r18-d8"], "train", 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_passes_the_models_check(name):
    """`fastctx bench --models NAME` checks the architecture on the meta device first: every preset must
    build there (Swin and ULLMC once read drop-path rates with .item() and crashed)."""
    from fastctx.benchmark.models import check_model_batch

    check_model_batch(name, None)


@pytest.mark.parametrize("argv,message", [
    (["--ops", "nope"], "unknown op 'nope'"),
    (["--mode", "bwd"], "unknown mode 'bwd'"),
    (["--providers", "fastctx-cuda"], "'fastctx-cuda' cannot run on cpu"),
    (["--models", "--model-batch", "1"], "training apcnet_r50-d8 needs at least 2 images"),
    (["--models", "nope"], "unknown model 'nope'"),
    (["--models", "encnet_r18-d8", "--model-batch", "0"], "--model-batch 0: must be >= 1"),
    (["--shapes", "huge"], "invalid choice: 'huge'"),
])
def test_main_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--device", "cpu", *argv])
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_mode_both_is_fwd_and_fwdbwd(capsys):
    """`--mode both` is what the help calls the default: both passes, in the table."""
    assert bench.main(["--device", "cpu", "--shapes", "tiny", "--ops", "window_attention", "--providers",
                       "fastctx-cpu", "--mode", "both", "--out", "", "--reps", "1", "--warmup", "1"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("window_attention")]
    assert {"fwd", "fwdbwd"} <= {word for row in rows for word in row}


# --------------------------------------------------------------------------- GPU paths on a CPU machine

def test_gpu_paths_refuse_clearly_without_cuda(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for call in (lambda: timing.time_interleaved({"a": lambda: None}, reps=1, device="cuda"),
                 lambda: gpu.autotune_report(lambda: None),
                 lambda: gpu.peak_bandwidth_gbps("cuda")):
        with pytest.raises(RuntimeError, match="needs a CUDA device"):
            call()
    assert gpu.peak_bandwidth_gbps("cpu")[0] is None
    for argv in (["--autotune"], ["--device", "cuda"]):
        with pytest.raises(SystemExit) as exc:
            bench.main(argv)
        assert exc.value.code == 2
        assert "CUDA device" in capsys.readouterr().err


def test_peak_bandwidth_table_and_device_properties():
    assert gpu.peak_bandwidth_from_name("NVIDIA A100-SXM4-80GB") == 2039.0
    assert gpu.peak_bandwidth_from_name("NVIDIA A100-PCIE-40GB") == 1555.0
    assert gpu.peak_bandwidth_from_name("NVIDIA H100 80GB HBM3") == 3350.0
    assert gpu.peak_bandwidth_from_name("NVIDIA H100 PCIe") == 2000.0
    assert gpu.peak_bandwidth_from_name("NVIDIA L4") == 300.0
    assert gpu.peak_bandwidth_from_name("NVIDIA L40S") == 864.0
    assert gpu.peak_bandwidth_from_name("Some Future GPU") is None
    # A100 40GB: 1215 MHz HBM2, 5120-bit bus, two transfers per clock
    assert math.isclose(gpu.peak_bandwidth_from_properties(1_215_000, 5120), 1555.2)
    assert gpu.peak_bandwidth_from_properties(0, 5120) is None


def test_explicit_case_shape_builds():
    case = CaseShape("x", dict(batch=1, height=3, width=4, in_channels=6, channels=2, pool_scales=(1, 2),
                               num_classes=3))
    inst = build_instance("apc_head", case, "fwd", ["eager", "fastctx-cpu"])
    out = inst.step("fastctx-cpu")
    assert out.shape == (1, 3, 3, 4) and inst.module.training is False
