"""ACM / APCHead modules: fused path vs mmseg's eager maths with the same weights."""
import copy

import pytest
import torch

import fastctx
from fastctx.nn import ACM, APCHead
from tolerances import assert_close


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics and affine parameters, so BN bugs cannot hide."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            if isinstance(m, torch.nn.Conv2d) and m.bias is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def _run(module, x, train: bool, seed: int = 0):
    module.train(train)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)  # same Dropout2d mask on both sides
    out = module(x)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    (out * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, {n: b.clone() for n, b in module.named_buffers()}


def _compare(fused, unfused, x, train, dtype, backend):
    with fastctx.use_backend(backend):
        out_f, gx_f, grads_f, bufs_f = _run(fused, x, train)
    out_r, gx_r, grads_r, bufs_r = _run(unfused, x, train)
    assert_close(out_f, out_r, dtype, "output")
    assert_close(gx_f, gx_r, dtype, "grad of input")
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        assert_close(grads_f[name], grads_r[name], dtype, f"grad of {name}")
    for name in bufs_r:
        assert_close(bufs_f[name].double(), bufs_r[name].double(), dtype, f"buffer {name}")


BACKENDS = ["reference", "cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize(
    "batch,in_ch,ch,hw,scales,fusion",
    [
        (2, 12, 8, (33, 45), (1, 2, 3, 6), True),
        (3, 6, 4, (7, 5), (1, 3, 5), False),
        (2, 5, 3, (1, 1), (1, 2), True),
    ],
)
def test_apc_head_matches_mmseg_maths(backend, train, batch, in_ch, ch, hw, scales, fusion):
    from conftest import require_backend

    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    head = APCHead(in_ch, ch, num_classes=5, pool_scales=scales, fusion=fusion, dropout_ratio=0.1).double()
    _randomise(head)
    reference = copy.deepcopy(head)
    reference.fused = False
    x = torch.randn(batch, in_ch, *hw, dtype=torch.float64)
    _compare(head, reference, x, train, torch.float64, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_acm_single_scale_batch1_eval(backend):
    from conftest import require_backend

    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    acm = ACM(3, True, 6, 4).double()
    _randomise(acm)
    reference = copy.deepcopy(acm)
    reference.fused = False
    _compare(acm, reference, torch.randn(1, 6, 9, 11, dtype=torch.float64), False, torch.float64, backend)


@pytest.mark.parametrize("dtype,train", [(torch.float64, True), (torch.float64, False), (torch.float32, False)])
def test_apc_head_realistic_channels(dtype, train):
    """mmseg's channel counts (2048 -> 512), automatic backend.

    Gradients are compared in float64 only. In fp32 any two summation orders
    (eager vs eager included) flip a few ReLU masks among the ~10^6 activations
    whose pre-activation lies within rounding of 0, each flip moving gradient
    sums by one element's contribution; and in training, batch 2 BatchNorm-s the
    scale-1 pooled features and the global context over 2 values per channel,
    an ill-conditioned gradient. The fp32 forward is continuous, so it is
    compared at fp32 tolerance.
    """
    torch.manual_seed(0)
    head = APCHead(2048, 512, num_classes=19).to(dtype)
    _randomise(head)
    reference = copy.deepcopy(head)
    reference.fused = False
    x = torch.randn(2, 2048, 16, 16, dtype=dtype)
    if dtype == torch.float64:
        _compare(head, reference, x, train, dtype, None)
        return
    head.train(train)
    reference.train(train)
    assert_close(head(x), reference(x), dtype, "output")


# ----------------------------------------------------------------------------- inference: one scale at a time


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("batch,in_ch,ch,hw,scales,fusion", [
    (2, 12, 8, (33, 45), (1, 2, 3, 6), True),
    (3, 6, 4, (7, 5), (1, 3, 5), False),
    (1, 5, 3, (1, 1), (1, 2), True),
])
def test_inference_path_matches_mmseg_maths(backend, batch, in_ch, ch, hw, scales, fusion):
    """Without autograd the fused head runs the scales one at a time and adds each into the bottleneck conv:
    the same logits as mmseg's maths (and as the all-scales path), the ACMs' concatenation as their loop."""
    from conftest import require_backend

    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    head = APCHead(in_ch, ch, num_classes=5, pool_scales=scales, fusion=fusion).double().eval()
    _randomise(head)
    reference = copy.deepcopy(head)
    reference.fused = False
    x = torch.randn(batch, in_ch, *hw, dtype=torch.float64)
    with fastctx.use_backend(backend):
        with torch.no_grad():
            lean = head(x)
            lean_acms = fastctx.nn.apc_head.fused_acm_forward(list(head.acm_modules), x)
        all_scales = head(x)  # autograd records: every scale through each op at once
    with torch.no_grad():
        want = reference(x)
        want_acms = torch.cat([acm(x) for acm in reference.acm_modules], 1)
    assert_close(lean, want, torch.float64, "inference logits")
    assert_close(all_scales, want, torch.float64, "recorded logits")
    assert_close(lean_acms, want_acms, torch.float64, "ACM outputs")


def test_inference_runs_one_scale_at_a_time_and_training_all_at_once():
    torch.manual_seed(0)
    head = APCHead(8, 6, 4, (1, 2, 3))
    x = torch.randn(2, 8, 9, 11)

    def gla_calls(fn):
        with torch.profiler.profile() as prof:
            fn()
        return sum(e.name == "fastctx::gla_context" for e in prof.events())

    assert gla_calls(lambda: head(x).sum().backward()) == 1
    head.eval()
    with torch.no_grad():
        assert gla_calls(lambda: head(x)) == 3
    head.requires_grad_(False)  # frozen weights, input without grad: nothing is recorded either
    assert gla_calls(lambda: head(x)) == 3


def test_fused_inference_needs_no_more_memory_than_mmseg_maths():
    """Peak memory of one inference step, each form in a fresh process (fastctx.benchmark.memory, as
    `fastctx bench --memory` measures it): the fused head used to hold every scale's maps at once (1.6x
    mmseg's per-scale loop at this shape); it must never need more than mmseg's maths."""
    from fastctx.benchmark.memory import measure_in_subprocess

    params = dict(batch=2, height=48, width=48, in_channels=128, channels=32, pool_scales=(1, 2, 3, 6),
                  num_classes=19)
    peaks = {}
    for provider in ("eager", "fastctx-cpu"):
        spec = dict(kind="op", provider=provider, device="cpu", dtype="float32", threads=1,
                    rows=[dict(op="apc_head", case=dict(label="probe", params=params), mode="fwd")])
        (result,) = measure_in_subprocess(spec, timeout=300)
        peaks[provider] = result["peak_bytes"]
    one_map = 4 * 2 * 32 * 48 * 48  # one [B, C, H, W] fp32 map: the eager loop holds several
    assert peaks["eager"] > 2 * one_map, peaks
    assert peaks["fastctx-cpu"] <= peaks["eager"], peaks
