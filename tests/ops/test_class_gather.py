"""class_gather on the reference and cpu backends against mmseg's SpatialGatherModule / ACFNet's class centres:
op, gradients, opcheck, awkward and realistic shapes, NaN/inf, determinism, bad input. (The Triton launchers
are tested in test_class_gather_triton.py.)

The cpu shapes reach the kernel's paths: N not a multiple of the pixel tile (whose size follows C: 64K / C
pixels, at most 512) with several tiles and several chunks per image (the "ocr" online-softmax merge),
one chunk per image (K = 150, 171: a chunk holds >= 16 Kp pixels, Kp = K rounded up to 16), C not a
multiple of any vector width (1, 3, 37, 70), K = 1, 19, 150, 171 (the classes padded to whole vectors),
batch 1, and a negative scale.
"""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from op_testing import check_fwd_bwd, require
from test_nonfinite import VALUES, assert_same_nonfinite
from tolerances import assert_close

BACKENDS = ["reference", "cpu"]
MODES = ["ocr", "paper"]


def gather_inputs(batch, channels, classes, h, w, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64)
    probs = torch.randn(batch, classes, h, w, generator=g, dtype=torch.float64) * 2
    return feats.to(dtype), probs.to(dtype)


def _independent(feats, probs, mode, scale):
    """The maths written out per image and class with explicit sums (not the reference's matmuls)."""
    batch, classes = probs.shape[:2]
    f = feats.flatten(2)  # [B, C, N]
    logits = scale * probs.flatten(2)  # [B, K, N]
    out = torch.empty(batch, classes, feats.shape[1], dtype=feats.dtype)
    for b in range(batch):
        if mode == "ocr":
            w = torch.exp(logits[b] - logits[b].max(dim=1, keepdim=True).values)
            w = w / w.sum(dim=1, keepdim=True)
            out[b] = (w[:, None, :] * f[b][None]).sum(dim=2)
        else:
            p = torch.exp(logits[b] - logits[b].max(dim=0, keepdim=True).values)
            p = p / p.sum(dim=0, keepdim=True)
            out[b] = (p[:, None, :] * f[b][None]).sum(dim=2) / p.sum(dim=1)[:, None]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,channels,classes,h,w,scale", [
    (2, 5, 3, 4, 7, 1.0), (1, 3, 1, 1, 1, 1.0), (2, 8, 19, 5, 3, 2.5), (1, 4, 150, 3, 4, 0.7)])
def test_matches_the_maths(backend, mode, batch, channels, classes, h, w, scale):
    require(backend)
    feats, probs = gather_inputs(batch, channels, classes, h, w)
    with fastctx.use_backend(backend):
        out = ops.class_gather(feats, probs, mode, scale)
    assert_close(out, _independent(feats, probs, mode, scale), torch.float64)


# (B, C, K, H, W, scale) for the comparison with the reference, outputs and both gradients.
SHAPES = [
    (2, 16, 3, 33, 45, 1.0),    # N = 1485: 3 tiles of 512 (the last short), 3 chunks per image
    (1, 37, 19, 33, 45, 1.3),   # C = 37, ADE's neighbour K = 19 (Cityscapes)
    (2, 70, 150, 17, 19, 0.7),  # ADE20K's K, one chunk per image
    (1, 3, 171, 9, 13, -0.5),   # COCO-Stuff's K, C = 3, a negative scale
    (2, 1, 1, 5, 7, 1.0),       # K = 1, C = 1
    (1, 130, 19, 40, 41, 2.0),  # tiles of 496 pixels (not a power of two), 4 tiles, 2 chunks
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch,channels,classes,h,w,scale", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_the_reference(backend, mode, batch, channels, classes, h, w, scale, dtype):
    require(backend, dtype)
    inputs = gather_inputs(batch, channels, classes, h, w, dtype=dtype)
    check_fwd_bwd(backend, lambda f, p: ops.class_gather(f, p, mode, scale),
                  lambda f, p: reference.class_gather(f, p, mode, scale), inputs, dtype,
                  msg=f"class_gather {mode} {tuple(inputs[0].shape)} K={classes}")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("classes,h,w", [(19, 64, 128), (150, 64, 64)])
def test_realistic_shape_cpu(mode, classes, h, w):
    """B = 2, C = 512 at the issue's benchmark maps, fp32, outputs and gradients."""
    require("cpu")
    inputs = gather_inputs(2, 512, classes, h, w, dtype=torch.float32)
    check_fwd_bwd("cpu", lambda f, p: ops.class_gather(f, p, mode, 1.0),
                  lambda f, p: reference.class_gather(f, p, mode, 1.0), inputs, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_float64(backend, mode):
    require(backend, torch.float64)
    # N = 6 in a 2 x 3 map and K = 4: the cpu kernel's short-tile paths
    feats, probs = (t.requires_grad_() for t in gather_inputs(2, 3, 4, 3, 2))
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(lambda f, p: ops.class_gather(f, p, mode, 1.5), (feats, probs))
        assert torch.autograd.gradgradcheck(lambda f, p: ops.class_gather(f, p, mode, 1.5), (feats, probs))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", MODES)
def test_opcheck(backend, mode):
    require(backend)
    feats, probs = (t.float().requires_grad_() for t in gather_inputs(2, 3, 4, 3, 5))
    torch.library.opcheck(torch.ops.fastctx.class_gather.default, (feats, probs, mode, 1.5, backend))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck_backward_cpu(mode):
    require("cpu")
    feats, probs = (t.float().requires_grad_() for t in gather_inputs(2, 3, 4, 3, 5))
    centres, stat = torch.ops.fastctx.class_gather(feats.detach(), probs.detach(), mode, 1.5, "cpu")
    grad = torch.randn(centres.shape, generator=torch.Generator().manual_seed(1)).requires_grad_()
    torch.library.opcheck(torch.ops.fastctx.class_gather_backward.default,
                          (grad, feats, probs, centres, stat, mode, 1.5, "cpu"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    require(backend)
    feats, probs = (t.requires_grad_() for t in gather_inputs(0, 3, 4, 3, 5))
    with fastctx.use_backend(backend):
        out = ops.class_gather(feats, probs, "ocr")
        out.sum().backward()
    assert out.shape == (0, 4, 3)
    assert feats.grad.shape == feats.shape and probs.grad.shape == probs.shape


# One non-finite value per input (and in the upstream gradient), then whole rows of probs: NaN and
# +-inf must land where the reference's maths puts them, forward and backward. The map is 5 x 7 with
# C = 3 and K = 4; in "ocr" a row of -inf in probs is a class whose logits are all -inf (NaN, 0 / 0),
# a pixel of -inf a pixel no class weighs.
NONFINITE_PLACES = {
    "feats": {"element": (1, 2, 1, 3)},
    "probs": {"element": (1, 2, 1, 3), "class": (1, 2), "pixel": (1, slice(None), 1, 3)},
    "grad": {"element": (1, 2, 1)},
}
NONFINITE_CASES = [(arg, where) for arg, wheres in NONFINITE_PLACES.items() for where in wheres]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", sorted(VALUES))
@pytest.mark.parametrize("arg,where", NONFINITE_CASES, ids=["-".join(c) for c in NONFINITE_CASES])
@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_like_the_reference_cpu(mode, arg, where, value, dtype):
    require("cpu", dtype)
    feats, probs = gather_inputs(2, 3, 4, 5, 7, dtype=dtype)
    index = NONFINITE_PLACES[arg][where]
    if arg != "grad":
        {"feats": feats, "probs": probs}[arg][index] = VALUES[value]
    fused_in = [t.clone().requires_grad_() for t in (feats, probs)]
    ref_in = [t.clone().requires_grad_() for t in (feats, probs)]
    with fastctx.use_backend("cpu"):
        out = ops.class_gather(*fused_in, mode, 1.0)
    expected = reference.class_gather(*ref_in, mode, 1.0)
    label = f"class_gather {mode} with {value} in {arg} ({where})"
    assert_same_nonfinite(out, expected, f"{label}: output")
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    if arg == "grad":
        grad[index] = VALUES[value]
    out.backward(grad)
    expected.backward(grad)
    for name, a, e in zip(("feats", "probs"), fused_in, ref_in):
        assert_same_nonfinite(a.grad, e.grad, f"{label}: gradient of {name}")


@pytest.mark.parametrize("mode", MODES)
def test_ocr_chunk_of_only_minus_inf_cpu(mode):
    """A class whose logits are -inf over a whole chunk of pixels (and finite elsewhere) weighs those pixels 0:
    the chunk drops out of the online-softmax merge instead of turning the class into NaN."""
    require("cpu")
    feats, probs = gather_inputs(1, 16, 3, 33, 45, dtype=torch.float32)  # 3 chunks of one 512-pixel tile
    probs[0, 1].view(-1)[512:1024] = -float("inf")
    check_fwd_bwd("cpu", lambda f, p: ops.class_gather(f, p, mode, 1.0),
                  lambda f, p: reference.class_gather(f, p, mode, 1.0), [feats, probs], torch.float32)


def _fwd_bwd_bits(mode, threads):
    feats, probs = (t.requires_grad_() for t in gather_inputs(2, 40, 19, 33, 45, dtype=torch.float32))
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with fastctx.use_backend("cpu"):
            out = ops.class_gather(feats, probs, mode, 1.0)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)))
    finally:
        torch.set_num_threads(previous)
    return [out.detach(), feats.grad, probs.grad]


@pytest.mark.parametrize("mode", MODES)
def test_cpu_is_bitwise_deterministic_across_runs_and_thread_counts(mode):
    """Several tiles and chunks per image: the chunking and the merge order depend on the shapes only."""
    require("cpu")
    first = _fwd_bwd_bits(mode, 2)
    for threads in (2, 1, 3):
        for i, (a, b) in enumerate(zip(first, _fwd_bwd_bits(mode, threads), strict=True)):
            assert torch.equal(a, b), f"class_gather {mode}: result {i} differs with {threads} thread(s)"


def test_bad_input():
    feats, probs = gather_inputs(2, 3, 4, 3, 5)
    with pytest.raises(ValueError, match="mode must be one of"):
        ops.class_gather(feats, probs, "mean")
    with pytest.raises(ValueError, match="must share the batch and the spatial size"):
        ops.class_gather(feats, probs[:, :, :2], "ocr")
    with pytest.raises(ValueError, match=r"feats must be of shape \[B, C, H, W\]"):
        ops.class_gather(feats[0], probs, "ocr")
    with pytest.raises(TypeError, match="share one dtype"):
        ops.class_gather(feats, probs.float(), "ocr")
    with pytest.raises(ValueError, match="non-empty spatial size"):
        ops.class_gather(feats[:, :, :0], probs[:, :, :0], "ocr")
    with pytest.raises(TypeError, match="scale must be a float"):
        ops.class_gather(feats, probs, "ocr", scale="1")


def test_triton_declines_more_classes_than_its_register_tile():
    """The Triton kernels' limits are the op's: forced, K = 257 is refused before launch with the reason."""
    require("triton", torch.float32)
    feats, probs = gather_inputs(1, 4, 257, 2, 3, torch.float32)
    with fastctx.use_backend("triton"), pytest.raises(fastctx.BackendUnavailableError, match="K = 257 classes > 256"):
        ops.class_gather(feats, probs)
