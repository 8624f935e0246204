"""Data-parallel training on CPU: two gloo processes vs one process with the same global batch.

- fastctx's SyncBatchNorm (torch's refuses CPU tensors under a process group) against single-process
  BatchNorm on the concatenated batch: outputs, input and parameter gradients, running statistics, for
  [B, C, H, W] and EncModule's [B, K, D];
- the Trainer launched as torchrun would (RANK / WORLD_SIZE / MASTER_* in the environment): real tiny
  APCNet, EncNet and ULLMC (Swin, IIWA neck and decoder, AdamW with paramwise rules) models with SyncBN
  (float64), batch 1 per process, give the single-process loss curve and weights;
- evaluation shards the images over the processes and sums the pixel counts: the metrics of one process.
"""
from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

from fastctx.data import SyntheticScenes
from fastctx.engine import Trainer, build_model_from_config, evaluate
from fastctx.engine.logging import read_json_lines
from fastctx.nn._batchnorm import SyncBatchNorm, convert_sync_batchnorm
from fastctx.engine import load_config
from test_engine import ToyDataset, ToyNet, tiny_config
from test_ullmc import MICRO
from tolerances import assert_close

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2
ITERS = 3
F64 = torch.float64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target, *args):
    """Run target(rank, queue, *args) in WORLD fresh processes joined in a gloo group; results by rank."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_bootstrap, args=(rank, port, queue, target, args)) for rank in range(WORLD)]
    for p in procs:
        p.start()
    results = {}
    try:
        for _ in procs:
            rank, result = queue.get(timeout=240)
            if isinstance(result, BaseException):
                raise result
            results[rank] = result
    finally:
        for p in procs:
            p.join(timeout=60)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return results


def _bootstrap(rank, port, queue, target, args):
    # what torchrun puts in the environment; Trainer's init_distributed reads it
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    try:
        queue.put((rank, target(rank, *args)))
    except BaseException as exc:  # report instead of hanging the parent
        import traceback

        queue.put((rank, RuntimeError(f"rank {rank}: {traceback.format_exc()}")))
        raise exc
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------- SyncBN


def _norm_cases():
    g = torch.Generator().manual_seed(0)
    x4 = torch.randn(4, 3, 5, 6, generator=g, dtype=F64) * 2 + 1
    x3 = torch.randn(4, 5, 7, generator=g, dtype=F64) - 0.5  # EncModule: BatchNorm1d over K of [B, K, D]
    return [("bn2d", nn.BatchNorm2d(3), x4), ("bn1d", nn.BatchNorm1d(5), x3),
            ("cumulative", nn.BatchNorm2d(3, momentum=None), x4)]


def _prepare(norm):
    torch.manual_seed(1)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.2, 0.2)
    return norm.double().train()


def _run_norm(norm, x, rows):
    """Two steps (running stats move twice); backprop a fixed weighting of the full batch restricted to rows."""
    weights = torch.arange(x.numel(), dtype=F64).view(x.shape).cos()
    outputs, grads = [], []
    for _ in range(2):
        xi = x[rows].clone().requires_grad_()
        out = norm(xi)
        (out * weights[rows]).sum().backward()
        outputs.append(out.detach())
        grads.append(xi.grad)
    return outputs, grads


def _syncbn_worker(rank):
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    results = {}
    for name, norm, x in _norm_cases():
        sync = convert_sync_batchnorm(_prepare(norm))
        assert type(sync) is SyncBatchNorm
        rows = slice(2 * rank, 2 * rank + 2)
        outputs, grads = _run_norm(sync, x, rows)
        param_grads = [p.grad.clone() for p in (sync.weight, sync.bias)]
        for g in param_grads:
            dist.all_reduce(g)  # the full-batch loss is the sum of the ranks' losses
        results[name] = dict(outputs=[o.numpy() for o in outputs], grads=[g.numpy() for g in grads],
                             param_grads=[g.numpy() for g in param_grads],
                             running=[sync.running_mean.numpy(), sync.running_var.numpy()],
                             tracked=int(sync.num_batches_tracked))
        sync.eval()  # eval uses the running statistics, no collective
        results[name]["eval"] = sync(x[rows]).detach().numpy()
    return results


def test_sync_batchnorm_on_cpu_equals_batchnorm_on_the_whole_batch():
    results = _spawn(_syncbn_worker)
    for name, norm, x in _norm_cases():
        norm = _prepare(norm)
        outputs, grads = _run_norm(norm, x, slice(None))
        for rank in range(WORLD):
            r = results[rank][name]
            rows = slice(2 * rank, 2 * rank + 2)
            for step in range(2):
                assert_close(torch.from_numpy(r["outputs"][step]), outputs[step][rows], F64, f"{name} output")
                assert_close(torch.from_numpy(r["grads"][step]), grads[step][rows], F64, f"{name} input grad")
            for ours, p in zip(r["param_grads"], (norm.weight, norm.bias)):
                assert_close(torch.from_numpy(ours), p.grad, F64, f"{name} parameter grad")
            assert_close(torch.from_numpy(r["running"][0]), norm.running_mean, F64, f"{name} running mean")
            assert_close(torch.from_numpy(r["running"][1]), norm.running_var, F64, f"{name} running var")
            assert r["tracked"] == int(norm.num_batches_tracked) == 2
            norm.eval()
            assert_close(torch.from_numpy(r["eval"]), norm(x[rows]).detach(), F64, f"{name} eval")
            norm.train()


# --------------------------------------------------------------------------------------------------- training


def _configs(work_dir):
    common = ["model.norm=SyncBN", "train.val_interval=0", "train.checkpoint_interval=0"]
    configs = {kind: tiny_config(kind, iters=ITERS, batch_size=2, dropout=0.0, workers=0,
                                 extra=common + [f"runtime.work_dir={work_dir}/{kind}"])
               for kind in ("apcnet", "encnet")}
    # ULLMC without random layers (dropout, drop path) and with OHEM's per-pixel rule only (min_kept 0): a
    # process selects over its own images, as mmseg's sampler on each GPU, so min_kept would differ by design
    kwargs = {**MICRO, "backbone": {**MICRO["backbone"], "drop_path_rate": 0.0},
              "neck": {**MICRO["neck"], "drop_path_rate": 0.0, "proj_drop": 0.0},
              "decode_head": {**MICRO["decode_head"], "drop_path_rate": 0.0, "dropout_ratio": 0.0},
              "auxiliary_head": {**MICRO["auxiliary_head"], "dropout_ratio": 0.0},
              "ohem": {"thresh": 0.7, "min_kept": 0}}
    configs["ullmc"] = load_config("ullmc_swin-tiny_synthetic", common + [
        f"model.kwargs:={json.dumps(kwargs)}", "data.train_kwargs={num_images: 16, size: [32, 32]}",
        "data.num_workers=0", f"train.iters={ITERS}", "train.batch_size=2", "train.log_interval=1",
        "schedule.warmup_iters=2", f"runtime.work_dir={work_dir}/ullmc"])
    return configs


def _model(cfg):
    """The config's real model in float64: rounding differences between the reduction orders of one and two
    processes stay ~1e-16, so the runs can be held to the float64 tolerances over several iterations."""
    torch.manual_seed(0)
    return build_model_from_config(cfg, SyntheticScenes.NUM_CLASSES).double()


def _train_worker(rank, work_dir):
    out = {}
    for kind, cfg in _configs(work_dir).items():
        # joins the group from the torchrun-style environment
        trainer = Trainer(cfg, model=_model(cfg), progress=False)
        assert trainer.dist.world_size == WORLD and trainer.batch_per_rank == 1
        trainer.fit()
        out[kind] = {k: v.numpy() for k, v in trainer.model.state_dict().items()}
    # evaluation: each process takes every other image, counts are summed
    torch.manual_seed(0)
    model = ToyNet()
    metrics = evaluate(model, ToyDataset(5, ignore=True), dist_info=trainer.dist)
    out["eval"] = (metrics.iou, metrics.aAcc, metrics.num_pixels)
    return out


def test_two_processes_train_like_one_with_the_same_global_batch(tmp_path):
    results = _spawn(_train_worker, str(tmp_path / "ddp"))
    for kind, cfg in _configs(tmp_path / "single").items():
        single = Trainer(cfg, model=_model(cfg), progress=False)
        single.fit()
        ddp_log = [r for r in read_json_lines(tmp_path / "ddp" / kind / "log.jsonl") if r["mode"] == "train"]
        single_log = [r for r in read_json_lines(single.log_path) if r["mode"] == "train"]
        assert [r["iter"] for r in ddp_log] == list(range(1, ITERS + 1))  # rank 0 logs once per iteration
        for a, b in zip(ddp_log, single_log):
            assert a["lr"] == b["lr"]
            for key in ("loss", "decode.loss_ce", "aux.loss_ce"):
                assert_close(torch.tensor(a[key], dtype=F64), torch.tensor(b[key], dtype=F64), F64,
                             f"{kind} {key} iteration {a['iter']}")
        if kind == "encnet":
            assert all("decode.loss_se" in r for r in ddp_log)
        reference = single.model.state_dict()
        for rank in range(WORLD):
            for key, value in results[rank][kind].items():
                ours = torch.from_numpy(np.asarray(value))
                if reference[key].is_floating_point():
                    # Held to the float32 row although computed in float64: BN-bias gradients are sums of ~1e3
                    # terms cancelling to ~1e-6, so the two reduction orders differ by ~1e-10 relative after a
                    # few steps (a wrong sync or gradient average is off by O(1)). The losses above are
                    # well conditioned and meet the float64 row.
                    assert_close(ours, reference[key], torch.float32, f"{kind} rank {rank} {key}")
                else:  # num_batches_tracked
                    assert torch.equal(ours, reference[key]), key
        assert (tmp_path / "ddp" / kind / f"iter_{ITERS}.pth").is_file()  # written by rank 0
    torch.manual_seed(0)
    expected = evaluate(ToyNet(), ToyDataset(5, ignore=True))
    for rank in range(WORLD):
        iou, aacc, pixels = results[rank]["eval"]
        assert pixels == expected.num_pixels and aacc == expected.aAcc
        assert iou == pytest.approx(expected.iou, nan_ok=True, rel=0, abs=0)
