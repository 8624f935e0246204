"""The fused Encoding op on every backend vs mmseg's maths; Encoding/EncModule/EncHead modules."""
import copy

import pytest
import torch

import fastctx
from fastctx import ops, reference
from fastctx.nn import EncHead, se_loss, se_targets
from conftest import require_backend
from test_apc_head import _randomise
from test_ops_acm import FUSED, _check_fwd_bwd, _device
from tolerances import assert_close


def enc_inputs(batch, channels, h, w, num_codes, dtype=torch.float32, device="cpu", seed=0, offset=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, channels, h, w, generator=g, dtype=torch.float64) + offset
    codewords = torch.randn(num_codes, channels, generator=g, dtype=torch.float64) * 0.5 + offset
    # |scale| shrinks with D so the softmax stays soft: a one-hot assignment
    # makes grad_scale pure rounding noise in any fp32 implementation.
    scale = (-torch.rand(num_codes, generator=g, dtype=torch.float64) * 0.5 - 0.05) * min(1.0, 64 / channels)
    return [t.to(dtype=dtype, device=device) for t in (x, codewords, scale)]


ENC_CASES = [
    (2, 16, 5, 7, 8),
    (1, 3, 1, 1, 5),
    (3, 1, 4, 4, 1),
    (2, 40, 9, 5, 32),
    (1, 70, 3, 11, 64),  # K at its register-tile limit, D off every block size
    (2, 2048, 2, 3, 32),  # the widest features the layer supports
]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,ch,h,w,codes", ENC_CASES)
def test_encoding(backend, batch, ch, h, w, codes):
    require_backend(backend, _device(backend))
    inputs = enc_inputs(batch, ch, h, w, codes, device=_device(backend))
    _check_fwd_bwd(backend, ops.encoding, reference.encoding, inputs, torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_pixels_layout(backend):
    """[B, N, D] input (no NCHW map) and a channels_last map."""
    require_backend(backend, _device(backend))
    x, c, s = enc_inputs(2, 12, 6, 5, 8, device=_device(backend))
    pixels = x.flatten(2).transpose(1, 2).contiguous()
    _check_fwd_bwd(backend, ops.encoding, reference.encoding, [pixels, c, s], torch.float32)
    cl = x.to(memory_format=torch.channels_last)
    with fastctx.use_backend(backend):
        assert_close(ops.encoding(cl, c, s), reference.encoding(x, c, s), torch.float32)


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_large_norm_near_codewords(backend):
    """||x|| ~ 1e3 with codewords within O(1): ||x||^2 - 2x.c + ||c||^2 cancels catastrophically in fp32."""
    require_backend(backend, _device(backend))
    x, c, s = enc_inputs(2, 32, 6, 6, 8, dtype=torch.float64, offset=300.0)
    expected = reference.encoding(x, c, s)  # float64 oracle on the same values
    with fastctx.use_backend(backend):
        got = ops.encoding(x.float().to(_device(backend)), c.float().to(_device(backend)),
                           s.float().to(_device(backend)))
    # fp32 inputs of magnitude 300 carry ~3e-5 absolute rounding: compare at that resolution
    assert torch.allclose(got.double().cpu(), expected, rtol=1e-4, atol=1e-3 * expected.abs().max().item())


def test_encoding_realistic_cpu():
    """D=512, K=32 at a 32x64 map vs a float64 oracle (the two-GEMM form; mmseg's would need GiBs).

    E, grad_x and grad_codewords are held to the fp32 tolerance. grad_scale =
    sum_i dL_ik ||x_i - c_k||^2 is ill-conditioned in fp32 for any
    implementation when the assignment is peaked (dL = A (dA - sum_j A_j dA_j)
    cancels where A is near one-hot), so it must be as accurate as PyTorch's
    own fp32 autograd of the same maths -- a wrong formula or sign would be
    off by 100%, not by fp32 rounding.
    """
    require_backend("cpu")
    x, c, s = enc_inputs(2, 512, 32, 64, 32)
    leaves = [t.clone().requires_grad_() for t in (x, c, s)]
    with fastctx.use_backend("cpu"):
        out = ops.encoding(*leaves)
    ref_leaves = [t.double().requires_grad_() for t in (x, c, s)]
    expected = reference.encoding_two_gemm(*ref_leaves)
    eager32 = [t.clone().requires_grad_() for t in (x, c, s)]
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out.backward(grad.float())
    expected.backward(grad)
    reference.encoding_two_gemm(*eager32).backward(grad.float())
    assert_close(out, expected.float(), torch.float32, "forward")
    for name, a, b in zip(("x", "codewords"), leaves, ref_leaves):
        assert_close(a.grad, b.grad.float(), torch.float32, f"grad of {name}")
    ours = (leaves[2].grad.double() - ref_leaves[2].grad).abs().max()
    eager = (eager32[2].grad.double() - ref_leaves[2].grad).abs().max()
    assert ours <= eager, f"grad of scale: max error {ours:.3g}, PyTorch fp32 two-GEMM {eager:.3g}"


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("channels_first", [True, False])
def test_encoding_gradcheck_float64(backend, channels_first):
    """Includes the codeword gradient (one widely used CPU implementation returns it negated)."""
    require_backend(backend, "cpu", torch.float64)
    x, c, s = enc_inputs(2, 3, 3, 2, 4, dtype=torch.float64)
    if not channels_first:
        x = x.flatten(2).transpose(1, 2).contiguous()
    inputs = [t.requires_grad_() for t in (x, c, s)]
    with fastctx.use_backend(backend):
        assert torch.autograd.gradcheck(ops.encoding, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_opcheck(backend):
    require_backend(backend, _device(backend))
    x, c, s = enc_inputs(2, 6, 3, 4, 5, device=_device(backend))
    for channels_first, xx in ((True, x.flatten(2)), (False, x.flatten(2).transpose(1, 2).contiguous())):
        torch.library.opcheck(torch.ops.fastctx.encoding.default,
                              (xx.requires_grad_(), c.requires_grad_(), s.requires_grad_(), channels_first, backend))


@pytest.mark.parametrize("backend", FUSED)
def test_encoding_empty(backend):
    require_backend(backend, _device(backend))
    x, c, s = enc_inputs(0, 6, 3, 4, 5, device=_device(backend))
    x.requires_grad_()
    c.requires_grad_()
    with fastctx.use_backend(backend):
        e = ops.encoding(x, c, s)
        assert e.shape == (0, 5, 6)
        e.sum().backward()
    assert x.grad.shape == x.shape and torch.all(c.grad == 0)


def test_encoding_bad_input():
    x, c, s = enc_inputs(2, 6, 3, 4, 5)
    with pytest.raises(ValueError, match=r"has D = 6 channels but codewords are \[K, D\] = \(5, 7\)"):
        ops.encoding(x, torch.randn(5, 7), s)
    with pytest.raises(ValueError, match=r"scale must have shape \(5,\)"):
        ops.encoding(x, c, s[:3])
    with pytest.raises(ValueError, match=r"\[B, D, H, W\] or \[B, N, D\]"):
        ops.encoding(x[0, 0], c, s)
    with pytest.raises(TypeError, match="share one dtype"):
        ops.encoding(x, c.double(), s)
    with pytest.raises(ValueError, match="one device"):
        ops.encoding(x, c.to("meta"), s)


def test_encoding_deterministic():
    require_backend("cpu")
    x, c, s = enc_inputs(2, 64, 16, 16, 32)
    with fastctx.use_backend("cpu"):
        a, b = ops.encoding(x, c, s), ops.encoding(x, c, s)
    assert torch.equal(a, b)


# ----------------------------------------------------------------------------- modules

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


def test_se_targets_and_loss():
    labels = torch.tensor([[[0, 2], [255, 2]], [[1, 1], [1, 255]]])
    targets = se_targets(labels, 4)
    assert targets.tolist() == [[1, 0, 1, 0], [0, 1, 0, 0]]
    logits = torch.randn(2, 4)
    expected = 0.2 * torch.nn.functional.binary_cross_entropy_with_logits(logits, targets)
    assert torch.equal(se_loss(logits, labels), expected)
