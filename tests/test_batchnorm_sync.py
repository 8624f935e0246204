"""Cross-process BatchNorm statistics of the fused ACM path (SyncBatchNorm), on CPU with gloo.

torch's own SyncBatchNorm needs GPUs once a process group exists, so this
checks fastctx's stacked BatchNorm helper directly: two processes holding half
a batch each must produce the scale/shift, gradients and running statistics
of one process holding the whole batch.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastctx.nn._batchnorm import batchnorm_affine
from tolerances import assert_close


def _norms(kind):
    torch.manual_seed(0)
    norms = [kind(3), kind(2)]
    with torch.no_grad():
        for n in norms:
            n.weight.uniform_(0.5, 1.5)
            n.bias.uniform_(-0.1, 0.1)
    return [n.double().train() for n in norms]


def _run(norms, y, rows=slice(None)):
    """Normalise y (rows `rows` of the full batch) and backprop the full batch's loss restricted to them."""
    y = y.clone().requires_grad_()
    scale, shift = batchnorm_affine(norms, y)
    out = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    weights = torch.arange(_batch().numel(), dtype=out.dtype).view(_batch().shape).sin()[rows]
    (out * weights).sum().backward()
    return out.detach(), y.grad, [n.weight.grad for n in norms], [(n.running_mean, n.running_var) for n in norms]


def _batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 5, 3, 2, generator=g, dtype=torch.float64) * 2 + 1


def _worker(rank, port, queue):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        norms = _norms(torch.nn.SyncBatchNorm)
        rows = slice(2 * rank, 2 * rank + 2)
        out, gy, gw, stats = _run(norms, _batch()[rows], rows)
        gw = [g.clone() for g in gw]
        for g in gw:
            dist.all_reduce(g)  # the full-batch loss is the sum of the ranks' losses
        # plain arrays: shared-memory tensors would die with this process
        queue.put((rank, out.numpy(), gy.numpy(), [g.numpy() for g in gw],
                   [(m.numpy(), v.numpy()) for m, v in stats]))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_sync_batchnorm_statistics_across_two_processes():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r[0], r[1:]) for r in (queue.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    out, gy, gw, stats = _run(_norms(torch.nn.BatchNorm2d), _batch())
    dtype = torch.float64
    for rank in (0, 1):
        r_out, r_gy, r_gw, r_stats = results[rank]
        r_out, r_gy = torch.from_numpy(r_out), torch.from_numpy(r_gy)
        r_gw = [torch.from_numpy(g) for g in r_gw]
        r_stats = [(torch.from_numpy(m), torch.from_numpy(v)) for m, v in r_stats]
        assert_close(r_out, out[2 * rank:2 * rank + 2], dtype, "normalised output")
        assert_close(r_gy, gy[2 * rank:2 * rank + 2], dtype, "input gradient")
        for a, b in zip(r_gw, gw):
            assert_close(a, b, dtype, "weight gradient")
        for (rm, rv), (m, v) in zip(r_stats, stats):
            assert_close(rm, m, dtype, "running mean")
            assert_close(rv, v, dtype, "running var")
