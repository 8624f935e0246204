"""ACFNet's ACFModule (paper and unofficial forms), ASPPHead and ACFHead: references, fused vs eager, errors."""
import pytest
import torch
import torch.nn.functional as F

import fastctx
from conftest import require_backend
from fastctx.nn import ACFHead, ACFModule, ASPPHead
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from test_ocr_head import assert_grad_close
from tolerances import assert_close

decode_heads = import_decode_heads()
assert decode_heads is not None, "mmsegmentation must be importable (tests/mmseg_compat.py)"

F64 = torch.float64
BACKENDS = ["reference", "cpu", "triton"]
pytestmark = pytest.mark.filterwarnings("ignore:``build_loss`` would be deprecated:UserWarning")


def _inputs(batch, channels, classes, hw, seed=1, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, *hw, dtype=dtype, generator=g),
            torch.randn(batch, classes, *hw, dtype=dtype, generator=g) * 3)


def _reduce(module, feats, train):
    """conv1 of the module written out: 1x1 conv, BatchNorm (batch or running statistics), ReLU (+ Dropout2d)."""
    conv, bn = module.conv1[0], module.conv1[1]
    out = F.conv2d(feats, conv.weight)
    out = F.batch_norm(out, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, training=train,
                       momentum=bn.momentum, eps=bn.eps)
    out = F.relu(out)
    return F.dropout2d(out, 0.2, training=train) if module.mode == "unofficial" else out


def unofficial_reference(module, feats, logits, train):
    """zrl4836/ACFNet acf_Module's maths, written from its forward: E = P F'^T, att = softmax_C'(max E - E),
    out = conv2(att^T P), on the raw logits P."""
    reduced = _reduce(module, feats, train)
    b, c, h, w = reduced.shape
    p = logits.reshape(b, logits.shape[1], h * w)                           # [B, K, N]
    energy = torch.einsum("bkn,bcn->bkc", p, reduced.reshape(b, c, h * w))  # [B, K, C']
    attention = torch.softmax(energy.amax(-1, keepdim=True) - energy, dim=-1)
    out = torch.einsum("bkc,bkn->bcn", attention, p).reshape(b, c, h, w)
    return F.conv2d(out, module.conv2.weight, module.conv2.bias)


def paper_reference(module, feats, logits, train):
    """The paper's ACF module: probability-weighted mean class centres, mixed back by the probabilities, conv2."""
    reduced = _reduce(module, feats, train)
    b, c, h, w = reduced.shape
    p = torch.softmax(logits, dim=1).reshape(b, -1, h * w)
    f = reduced.reshape(b, c, h * w)
    centres = torch.einsum("bkn,bcn->bkc", p, f) / p.sum(-1)[..., None]
    out = torch.einsum("bkn,bkc->bcn", p, centres).reshape(b, c, h, w)
    return F.conv2d(out, module.conv2.weight, module.conv2.bias)


REFERENCES = {"paper": paper_reference, "unofficial": unofficial_reference}


def _grads(fn, module, feats, logits, seed=0):
    feats, logits = feats.clone().requires_grad_(), logits.clone().requires_grad_()
    torch.manual_seed(seed)  # same Dropout2d mask
    out = fn(feats, logits)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=out.dtype)
    params = [p for p in module.parameters()]
    grads = torch.autograd.grad((out * weights).sum(), [feats, logits, *params])
    return out.detach(), grads


# ------------------------------------------------------------------------------------------------ ACFModule

@pytest.mark.parametrize("mode", ["paper", "unofficial"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("batch,in_ch,out_ch,classes,hw", [
    (2, 6, 5, 1, (5, 7)), (1, 7, 4, 19, (9, 11)), (2, 5, 6, 150, (3, 7)), (1, 4, 3, 171, (7, 3)),
])
def test_acf_module_matches_its_reference(mode, fused, train, batch, in_ch, out_ch, classes, hw):
    torch.manual_seed(0)
    module = ACFModule(in_ch, out_ch, classes, mode=mode, fused=fused).double()
    _randomise(module)
    module.train(train)
    feats, logits = _inputs(batch, in_ch, classes, hw)
    reference = REFERENCES[mode]
    # the reference runs on a copy so both see the same running statistics
    twin = ACFModule(in_ch, out_ch, classes, mode=mode, fused=False).double()
    twin.load_state_dict(module.state_dict())
    with fastctx.use_backend("cpu"):
        out, grads = _grads(module, module, feats, logits)
    want, want_grads = _grads(lambda f, p: reference(twin, f, p, train), twin, feats, logits)
    assert out.shape == (batch, out_ch, *hw)
    assert_close(out, want, F64, "output")
    names = ["feats", "logits"] + [n for n, _ in module.named_parameters()]
    scale = max(w.abs().max().item() for w in want_grads)
    for name, g, w in zip(names, grads, want_grads, strict=True):
        assert_grad_close(g, w, F64, f"grad of {name}", scale)  # K = 1, paper form: no logits gradient
    # running statistics: updated once from the batch in training (the reference's copy is untouched)
    ref_bn = twin.conv1[1].train(train)
    ref_bn(F.conv2d(feats, twin.conv1[0].weight))
    bn = module.conv1[1]
    assert_close(bn.running_mean, ref_bn.running_mean, F64, "running_mean")
    assert_close(bn.running_var, ref_bn.running_var, F64, "running_var")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["paper", "unofficial"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_acf_module_matches_eager(backend, mode, train):
    require_backend(backend, dtype=F64)
    torch.manual_seed(0)
    eager = ACFModule(6, 5, 19, mode=mode, fused=False).double()
    _randomise(eager)
    fused = ACFModule(6, 5, 19, mode=mode, fused=True).double()
    fused.load_state_dict(eager.state_dict())
    eager.train(train)
    fused.train(train)
    feats, logits = _inputs(2, 6, 19, (7, 9))
    with fastctx.use_backend(backend):
        out, grads = _grads(fused, fused, feats, logits)
    want, want_grads = _grads(eager, eager, feats, logits)
    assert_close(out, want, F64, "output")
    for g, w in zip(grads, want_grads):
        assert_close(g, w, F64, "grad")
    for (name, b), w in zip(fused.named_buffers(), eager.buffers()):
        assert_close(b.double(), w.double(), F64, name)


@pytest.mark.parametrize("mode", ["paper", "unofficial"])
def test_fused_acf_module_gradcheck(mode):
    torch.manual_seed(0)
    module = ACFModule(4, 3, 5, mode=mode, fused=True).double().eval()
    _randomise(module)
    feats, logits = (t.requires_grad_() for t in _inputs(2, 4, 5, (3, 4)))
    with fastctx.use_backend("cpu"):
        assert torch.autograd.gradcheck(module, (feats, logits))


@pytest.mark.parametrize("mode", ["paper", "unofficial"])
def test_acf_module_realistic_shape(mode):
    """The unofficial code's C' = 512, Cityscapes' 19 classes, training: fused vs eager (float64, see
    test_ocr_head.test_fused_ocr_head_realistic_shape for why not float32)."""
    torch.manual_seed(0)
    eager = ACFModule(512, 512, 19, mode=mode, fused=False).double()
    _randomise(eager)
    fused = ACFModule(512, 512, 19, mode=mode, fused=True).double()
    fused.load_state_dict(eager.state_dict())
    feats, logits = _inputs(2, 512, 19, (16, 24))
    with fastctx.use_backend("cpu"):
        out, grads = _grads(fused, fused, feats, logits)
    want, want_grads = _grads(eager, eager, feats, logits)
    assert_close(out, want, F64, "output")
    for name, g, w in zip(["feats", "logits", "conv1.0", "conv1.1.weight", "conv1.1.bias", "conv2.weight",
                           "conv2.bias"], grads, want_grads, strict=True):
        assert_close(g, w, F64, f"grad of {name}")


def test_unofficial_parameter_names_load_strictly():
    """The unofficial acf_Module's state_dict (InPlaceABN: no num_batches_tracked) loads with strict=True."""
    g = torch.Generator().manual_seed(0)
    theirs = {"conv1.0.weight": torch.randn(5, 6, 1, 1, generator=g), "conv1.1.weight": torch.rand(5, generator=g),
              "conv1.1.bias": torch.randn(5, generator=g), "conv1.1.running_mean": torch.randn(5, generator=g),
              "conv1.1.running_var": torch.rand(5, generator=g) + 0.5,
              "conv2.weight": torch.randn(5, 5, 1, 1, generator=g), "conv2.bias": torch.randn(5, generator=g)}
    for mode in ("unofficial", "paper"):  # both forms have the same parameters
        module = ACFModule(6, 5, 19, mode=mode)
        module.load_state_dict(theirs, strict=True)
        assert set(module.state_dict()) == set(theirs) | {"conv1.1.num_batches_tracked"}
    assert isinstance(ACFModule(6, 5, 19, mode="unofficial").conv1[3], torch.nn.Dropout2d)
    assert len(ACFModule(6, 5, 19, mode="paper").conv1) == 3


def test_paper_fused_mode_folds_conv2_exactly():
    """conv2 after the probability-weighted mix equals conv2 applied to each centre first: the fold is exact."""
    torch.manual_seed(0)
    module = ACFModule(4, 6, 7, fused=False).double().eval()
    _randomise(module)
    feats, logits = _inputs(1, 4, 7, (5, 5))
    reduced = module.conv1(feats).flatten(2)
    p = torch.softmax(logits, 1).flatten(2)
    centres = (p @ reduced.transpose(1, 2)) / p.sum(-1, keepdim=True)
    folded = F.linear(centres, module.conv2.weight.flatten(1), module.conv2.bias)   # [B, K, C']
    out = (folded.transpose(1, 2) @ p).view(1, 6, 5, 5)
    assert_close(out, module(feats, logits), F64)


# ------------------------------------------------------------------------------------------------ ASPPHead

@pytest.mark.parametrize("train", [True, False])
def test_aspp_head_matches_mmseg(train):
    torch.manual_seed(0)
    kwargs = dict(dilations=(1, 2, 3, 5), in_channels=6, channels=4, num_classes=5, dropout_ratio=0.1)
    theirs = decode_heads.ASPPHead(**kwargs, norm_cfg=dict(type="BN", requires_grad=True))
    _randomise(theirs)
    theirs.double()
    ours = ASPPHead(**kwargs).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = _inputs(2, 6, 1, (9, 11))[0]
    results = []
    for head in (ours, theirs):
        head.train(train)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(0)
        out = head([leaf])
        out.mul(torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)).sum().backward()
        results.append((out, leaf.grad, {n: p.grad for n, p in head.named_parameters()},
                        dict(head.named_buffers())))
    (out, gx, grads, bufs), (w_out, w_gx, w_grads, w_bufs) = results
    assert_close(out, w_out, F64, "output")
    assert_close(gx, w_gx, F64, "grad of input")
    for name, g in w_grads.items():
        assert_close(grads[name], g, F64, f"grad of {name}")
    for name, b in w_bufs.items():
        assert_close(bufs[name].double(), b.double(), F64, name)


# ------------------------------------------------------------------------------------------------ ACFHead

def _acf_head(mode, fused, **kw):
    kwargs = dict(acf_channels=5, dilations=(1, 2, 3), mode=mode, in_channels=6, channels=4, num_classes=7,
                  dropout_ratio=0.1, fused=fused)
    kwargs.update(kw)
    return ACFHead(**kwargs).double()


def test_acf_head_layout_and_base_network():
    """ASPP part in mmseg's ASPPHead layout (its state_dict loads; the rest are ACFHead's own layers), same features."""
    head = _acf_head("paper", fused=False).eval()
    theirs = decode_heads.ASPPHead(dilations=(1, 2, 3), in_channels=6, channels=4, num_classes=7,
                                   norm_cfg=dict(type="BN", requires_grad=True))
    _randomise(theirs)
    theirs.double().eval()
    missing, unexpected = head.load_state_dict(theirs.state_dict(), strict=False)
    assert not unexpected
    assert {k.split(".")[0] for k in missing} == {"conv_seg_coarse", "acf_module", "acf_bottleneck"}
    x = _inputs(2, 6, 1, (7, 9))[0]
    with torch.no_grad():
        assert_close(head._forward_feature([x]), theirs._forward_feature([x]), F64, "ASPP features")
        logits, coarse = head([x])
    assert logits.shape == coarse.shape == (2, 7, 7, 9)
    assert set(dict(head.acf_module.named_parameters())) == {"conv1.0.weight", "conv1.1.weight", "conv1.1.bias",
                                                               "conv2.weight", "conv2.bias"}


def test_acf_head_composes_its_parts():
    """forward = conv_seg(acf_bottleneck(cat[ACF(F, coarse), F])) with coarse = conv_seg_coarse(F), in eval."""
    torch.manual_seed(0)
    head = _acf_head("paper", fused=False).eval()
    _randomise(head)
    x = _inputs(2, 6, 1, (6, 5))[0]
    with torch.no_grad():
        feats = head._forward_feature([x])
        coarse = head.conv_seg_coarse(feats)
        out = head.conv_seg(head.acf_bottleneck(torch.cat([head.acf_module(feats, coarse), feats], 1)))
        logits, got_coarse = head([x])
    assert_close(got_coarse, coarse, F64, "coarse")
    assert_close(logits, out, F64, "logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["paper", "unofficial"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_acf_head_matches_eager(backend, mode, train):
    require_backend(backend, dtype=F64)
    torch.manual_seed(0)
    eager = _acf_head(mode, fused=False)
    _randomise(eager)
    fused = _acf_head(mode, fused=True)
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = _inputs(2, 6, 1, (7, 5))[0]
    results = []
    for head, name in ((fused, backend), (eager, "reference")):
        head.train(train)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(0)
        with fastctx.use_backend(name):
            logits, coarse = head([leaf])
            g = torch.Generator().manual_seed(2)
            loss = (logits * torch.randn(logits.shape, generator=g, dtype=F64)).sum() + \
                (coarse * torch.randn(coarse.shape, generator=g, dtype=F64)).sum()
            loss.backward()
        results.append((logits.detach(), coarse.detach(), leaf.grad,
                        {n: p.grad for n, p in head.named_parameters()}, dict(head.named_buffers())))
    (lo, co, gx, grads, bufs), (w_lo, w_co, w_gx, w_grads, w_bufs) = results
    assert_close(lo, w_lo, F64, "logits")
    assert_close(co, w_co, F64, "coarse")
    assert_close(gx, w_gx, F64, "grad of input")
    for name, g in w_grads.items():
        assert_close(grads[name], g, F64, f"grad of {name}")
    for name, b in w_bufs.items():
        assert_close(bufs[name].double(), b.double(), F64, name)


@pytest.mark.parametrize("mode", ["paper", "unofficial"])
def test_fused_acf_head_compiles_fullgraph(mode):
    """torch.compile(fullgraph=True) of the fused head in training, backward through the compiled graph."""
    torch.manual_seed(0)
    head = _acf_head(mode, fused=True, dropout_ratio=0).float()
    if mode == "unofficial":  # no Dropout2d: compiled and eager code draw masks differently
        del head.acf_module.conv1[3]
    _randomise(head)
    x = _inputs(2, 6, 1, (7, 9), dtype=torch.float32)[0]
    state = {k: v.clone() for k, v in head.state_dict().items()}

    def step(module):
        head.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        logits, coarse = module([leaf])
        (logits.square().sum() + coarse.square().sum()).backward()
        return [logits.detach(), coarse.detach(), leaf.grad] + [p.grad for p in head.parameters()]

    torch._dynamo.reset()
    with fastctx.use_backend("cpu"):
        got = step(torch.compile(head, fullgraph=True, backend="aot_eager"))
        head.load_state_dict(state)  # undo the compiled step's BatchNorm running-stat update
        want = step(head)
    for a, b in zip(got, want, strict=True):
        assert_close(a, b, torch.float32)


def test_fused_flag_propagates():
    head = _acf_head("paper", fused=True)
    assert head.fused and head.acf_module.fused
    head.fused = False
    assert not head.fused and not head.acf_module.fused


# ------------------------------------------------------------------------------------------------ errors

def test_bad_inputs_raise_clear_errors():
    module = ACFModule(6, 5, 7, fused=False)
    feats, logits = _inputs(2, 6, 7, (5, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"features of shape \[B, 6, H, W\]"):
        module(feats[:, :5], logits)
    with pytest.raises(ValueError, match=r"class scores of shape \[B, 7, H, W\]"):
        module(feats, logits[:, :6])
    with pytest.raises(ValueError, match="spatial size"):
        module(feats, logits[:, :, :4])
    with pytest.raises(TypeError, match="floating-point"):
        module(feats, logits.long())
    with pytest.raises(TypeError, match="parameters are torch.float32"):
        module(feats.double(), logits.double())
    head = _acf_head("paper", fused=False)
    with pytest.raises(ValueError, match=r"\[B, 6, H, W\]"):
        head([feats[:, :4]])


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="mode must be one of"):
        ACFModule(6, 5, 7, mode="official")
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        ACFModule(6, 5, 0)
    with pytest.raises(ValueError, match="dilations"):
        ACFHead(dilations=(), in_channels=6, channels=4, num_classes=3)
    with pytest.raises(ValueError, match="acf_channels must be a positive int"):
        ACFHead(0, in_channels=6, channels=4, num_classes=3)
