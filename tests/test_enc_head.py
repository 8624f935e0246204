"""Encoding / EncModule / EncHead modules: fused against mmseg's maths, names, the SE loss (the op: tests/ops)."""
import copy

import pytest
import torch

import fastctx
from fastctx import ops, reference
from fastctx.nn import EncHead, Encoding, se_loss, se_targets
from conftest import require_backend
from test_apc_head import _randomise
from tolerances import assert_close


# ----------------------------------------------------------------------------- modules

@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_encoding_module_takes_pytorch_encodings_layouts(backend):
    """[B, D, H, W] maps and PyTorch-Encoding's [B, D, N] pixels (channels on dim 1 in both), contiguous or a
    transposed view of [B, N, D] memory: E as PyTorch-Encoding computes it from X.transpose(1, 2)."""
    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    layer = Encoding(6, 4).double()
    x_map = torch.randn(2, 6, 5, 7, dtype=torch.float64, requires_grad=True)
    pixels_bnd = torch.randn(2, 35, 6, dtype=torch.float64)
    inputs = {"map": x_map, "[B, D, N]": x_map.detach().flatten(2).requires_grad_(),
              "[B, D, N] view of [B, N, D]": pixels_bnd.transpose(1, 2).requires_grad_()}
    for name, x in inputs.items():
        pixels = x.flatten(2).transpose(1, 2)  # [B, N, D], PyTorch-Encoding's `X.transpose(1, 2)`
        want = reference.encoding(pixels.detach(), layer.codewords.detach(), layer.scale.detach())
        for fused in (True, False):
            layer.fused = fused
            with fastctx.use_backend(backend):
                got = layer(x)
            assert_close(got, want, torch.float64, f"{name}, fused={fused}")
            (grad,) = torch.autograd.grad(got.sum(), x)
            (grad_want,) = torch.autograd.grad(reference.encoding(pixels, layer.codewords, layer.scale).sum(), x)
            assert_close(grad, grad_want, torch.float64, f"grad of {name}, fused={fused}")


def test_square_pixels_mean_different_things_to_the_module_and_the_op():
    """The pitfall the docstrings warn about: a square [B, 6, 6] tensor is [B, D, N] to the module and [B, N, D]
    to fastctx.ops.encoding."""
    torch.manual_seed(0)
    layer = Encoding(6, 4).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)
    as_module = layer(x)
    assert_close(as_module, ops.encoding(x.transpose(1, 2), layer.codewords, layer.scale), torch.float64)
    assert (as_module - ops.encoding(x, layer.codewords, layer.scale)).abs().max() > 0.1


def test_encoding_module_bad_input():
    layer = Encoding(6, 4)
    for bad in (torch.randn(2, 5, 7), torch.randn(6, 7), torch.randn(2, 6, 3, 4, 5), torch.randn(2, 7, 6)):
        with pytest.raises(ValueError, match=r"Encoding expects input of shape \[B, 6, H, W\] or \[B, 6, N\]"):
            layer(bad)
    with pytest.raises(TypeError, match="Encoding expects a tensor"):
        layer([torch.randn(2, 6, 3)])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("add_lateral", [False, True])
def test_enchead_fused_matches_unfused(backend, train, add_lateral):
    require_backend(backend, dtype=torch.float64)
    torch.manual_seed(0)
    head = EncHead([6, 10, 12], 8, num_classes=5, num_codes=4, add_lateral=add_lateral).double()
    _randomise(head)
    reference_head = copy.deepcopy(head)
    reference_head.fused = False
    feats = [torch.randn(2, c, 7, 9, dtype=torch.float64) for c in (6, 10, 12)]

    def run(module):
        module.train(train)
        leaves = [f.clone().requires_grad_() for f in feats]
        torch.manual_seed(0)
        seg, se = module(leaves)
        (seg.sum() * 0.3 + (se * torch.arange(5, dtype=se.dtype)).sum()).backward()
        return seg, se, [l.grad for l in leaves], {n: p.grad for n, p in module.named_parameters()}

    with fastctx.use_backend(backend):
        got = run(head)
    want = run(reference_head)
    assert_close(got[0], want[0], torch.float64, "seg logits")
    assert_close(got[1], want[1], torch.float64, "se logits")
    for a, b in zip(got[2], want[2]):
        if b is not None:
            assert_close(a, b, torch.float64, "feature grad")
    for name in want[3]:
        if want[3][name] is not None:
            assert_close(got[3][name], want[3][name], torch.float64, f"grad of {name}")


def test_enchead_state_dict_names():
    head = EncHead([512, 1024, 2048], 16, num_classes=7, num_codes=32)
    keys = set(head.state_dict())
    assert {"enc_module.encoding.0.codewords", "enc_module.encoding.0.scale", "enc_module.encoding.1.weight",
            "enc_module.encoding.1.running_var", "enc_module.fc.0.weight", "enc_module.fc.0.bias",
            "enc_module.encoding_project.conv.weight", "enc_module.encoding_project.bn.weight",
            "se_layer.weight", "se_layer.bias", "conv_seg.weight", "bottleneck.conv.weight"} <= keys
    assert head.state_dict()["enc_module.encoding.1.weight"].shape == (32,)
    assert head.state_dict()["bottleneck.conv.weight"].shape == (16, 2048, 3, 3)
    no_se = EncHead(64, 16, num_classes=7, use_se_loss=False)
    assert not any(k.startswith("se_layer") for k in no_se.state_dict())
    out = no_se.eval()(torch.randn(1, 64, 5, 5))
    assert isinstance(out, torch.Tensor) and out.shape == (1, 7, 5, 5)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.bool])
def test_enchead_refuses_integer_features(dtype):
    """An integer feature is a floating-point error, not "cast the module to int" (every head:
    tests/test_errors.py); here the lateral feature and the hint kept for a float dtype mismatch."""
    feat = torch.randint(0, 2, (2, 7, 5, 6)).to(dtype)
    with pytest.raises(TypeError, match=rf"^EncHead expects a floating-point input, got {dtype}$"):
        EncHead([7], 5, 3)([feat])
    head = EncHead([4, 7], 5, 3, add_lateral=True)  # the lateral feature is checked too
    with pytest.raises(TypeError, match=rf"^EncHead expects a floating-point input, got {dtype}$"):
        head([feat[:, :4], torch.randn(2, 7, 5, 6)])
    # a float feature of another dtype than the parameters keeps the conversion hint
    with pytest.raises(TypeError, match=r"^EncHead: the features are torch.float64 but the module's parameters are "
                                        r"torch.float32; convert one to the other"):
        EncHead([7], 5, 3)([torch.randn(2, 7, 5, 6, dtype=torch.float64)])


def test_se_targets_and_loss():
    labels = torch.tensor([[[0, 2], [255, 2]], [[1, 1], [1, 255]]])
    targets = se_targets(labels, 4)
    assert targets.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]]
    logits = torch.randn(2, 4)
    expected = 0.2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.equal(se_loss(logits, labels), expected)
