"""class_gather against its reference (mmseg's SpatialGatherModule / ACFNet's class centres): op, gradients,
opcheck, bad input. The fused backends join the parametrisation as their kernels land."""
import pytest
import torch

import fastctx
from fastctx import ops, reference
from tolerances import assert_close


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


@pytest.mark.parametrize("mode", ["ocr", "paper"])
@pytest.mark.parametrize("batch,channels,classes,h,w,scale", [
    (2, 5, 3, 4, 7, 1.0), (1, 3, 1, 1, 1, 1.0), (2, 8, 19, 5, 3, 2.5), (1, 4, 150, 3, 4, 0.7)])
def test_reference_matches_the_maths(mode, batch, channels, classes, h, w, scale):
    feats, probs = gather_inputs(batch, channels, classes, h, w)
    assert_close(reference.class_gather(feats, probs, mode, scale), _independent(feats, probs, mode, scale),
                 torch.float64)


@pytest.mark.parametrize("mode", ["ocr", "paper"])
def test_gradcheck_float64(mode):
    feats, probs = (t.requires_grad_() for t in gather_inputs(2, 3, 4, 3, 2))
    with fastctx.use_backend("reference"):
        assert torch.autograd.gradcheck(lambda f, p: ops.class_gather(f, p, mode, 1.5), (feats, probs))
        assert torch.autograd.gradgradcheck(lambda f, p: ops.class_gather(f, p, mode, 1.5), (feats, probs))


@pytest.mark.parametrize("mode", ["ocr", "paper"])
def test_opcheck(mode):
    feats, probs = (t.float().requires_grad_() for t in gather_inputs(2, 3, 4, 3, 5))
    torch.library.opcheck(torch.ops.fastctx.class_gather.default, (feats, probs, mode, 1.5, "reference"))


def test_empty_batch():
    feats, probs = (t.requires_grad_() for t in gather_inputs(0, 3, 4, 3, 5))
    with fastctx.use_backend("reference"):
        out = ops.class_gather(feats, probs, "ocr")
    assert out.shape == (0, 4, 3)


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
