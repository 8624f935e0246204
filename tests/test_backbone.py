"""ResNetV1c vs mmsegmentation's own ResNetV1c (same weights), its init, freezing, and load_pretrained."""
import logging
import warnings

import pytest
import torch

from fastctx.models import LoadReport, ResNetV1c, load_pretrained
from mmseg_compat import import_decode_heads
from test_apc_head import _randomise
from tolerances import assert_close

assert import_decode_heads() is not None, "mmsegmentation must be importable (tests/mmseg_compat.py)"
from mmengine.logging import MMLogger  # noqa: E402
from mmseg.models.backbones import ResNet as MMResNet  # noqa: E402
from mmseg.models.backbones import ResNetV1c as MMResNetV1c  # noqa: E402

F64 = torch.float64
D8 = dict(strides=(1, 2, 1, 1), dilations=(1, 1, 2, 4), out_indices=(0, 1, 2, 3), contract_dilation=True)


def _mm_kwargs(cfg: dict) -> dict:
    """Our ResNetV1c options as mmseg's keyword arguments."""
    cfg = dict(cfg)
    return dict(cfg, norm_cfg=dict(type="BN", requires_grad=True), style="pytorch")


def _pair(cfg: dict):
    """(ours, theirs) with the same randomised weights and BN statistics, float64."""
    torch.manual_seed(0)
    theirs = MMResNetV1c(**_mm_kwargs(cfg)).double()
    _randomise(theirs)
    ours = ResNetV1c(**cfg).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _run(module, x, train: bool):
    module.train(train)
    x = x.clone().requires_grad_(True)
    outs = module(x)
    g = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return [o.detach() for o in outs], x.grad, grads, {n: b.clone() for n, b in module.named_buffers()}


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cfg", [
    dict(depth=18, **D8),
    dict(depth=50, **D8),
    # other stage layouts: no dilation / dilation without contraction, fewer outputs, narrow channels
    dict(depth=34, stem_channels=32, base_channels=16, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1),
         out_indices=(1, 3), contract_dilation=True),
    dict(depth=101, stem_channels=16, base_channels=8, strides=(1, 1, 2, 1), dilations=(1, 2, 1, 4),
         out_indices=(0, 2, 3), contract_dilation=False),
], ids=["r18-d8", "r50-d8", "r34-s32", "r101-narrow-nocontract"])
def test_matches_mmseg_resnetv1c(cfg, train):
    ours, theirs = _pair(cfg)
    x = torch.randn(1, 3, 33, 41, dtype=F64, generator=torch.Generator().manual_seed(2))
    got, gx, grads, bufs = _run(ours, x, train)
    want, gx_t, grads_t, bufs_t = _run(theirs, x, train)
    assert len(got) == len(want) == len(cfg["out_indices"])
    for i, (o, t) in enumerate(zip(got, want)):
        assert o.shape == t.shape
        assert_close(o, t, F64, f"output {i}")
    assert_close(gx, gx_t, F64, "grad of input")
    assert grads.keys() == grads_t.keys() and grads
    for name, g in grads_t.items():
        assert_close(grads[name], g, F64, f"grad of {name}")
    for name, b in bufs_t.items():  # running statistics updated identically in train mode
        assert_close(bufs[name].double(), b.double(), F64, f"buffer {name}")
    assert [o.shape[1] for o in got] == [ours.out_channels[i] for i in cfg["out_indices"]]


def test_d8_output_stride_and_channels():
    net = ResNetV1c(18).eval()
    outs = net(torch.randn(1, 3, 64, 96))
    assert [tuple(o.shape) for o in outs] == [(1, 64, 16, 24), (1, 128, 8, 12), (1, 256, 8, 12), (1, 512, 8, 12)]
    # contract_dilation: first block of layer3 / layer4 uses dilation 1 / 2, the others 2 / 4
    assert net.layer3[0].conv1.dilation == (1, 1) and net.layer3[1].conv1.dilation == (2, 2)
    assert net.layer4[0].conv1.dilation == (2, 2) and net.layer4[1].conv1.dilation == (4, 4)
    assert net.layer4[1].conv2.dilation == (1, 1)  # BasicBlock: only conv1 is dilated (as mmseg)
    assert ResNetV1c(50).layer4[0].conv2.dilation == (2, 2)


@pytest.mark.parametrize("depth", [18, 50])
@pytest.mark.parametrize("zero_init_residual", [True, False])
def test_init_matches_mmseg(depth, zero_init_residual):
    """Same seed -> mmseg's init_weights and ours give identical tensors (kaiming fan_out, BN 1/0, zero residual)."""
    theirs = MMResNetV1c(depth=depth, zero_init_residual=zero_init_residual, **D8)
    ours = ResNetV1c(depth, zero_init_residual=zero_init_residual)
    logger = MMLogger.get_current_instance()
    level = logger.level
    logger.setLevel(logging.WARNING)  # mmengine logs every parameter's init
    try:
        torch.manual_seed(3)
        theirs.init_weights()
    finally:
        logger.setLevel(level)
    torch.manual_seed(3)
    ours.init_weights()
    want = theirs.state_dict()
    for name, value in ours.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    last = ours.layer1[0].bn3 if depth == 50 else ours.layer1[0].bn2
    assert float(last.weight.detach().abs().sum()) == (0.0 if zero_init_residual else last.weight.numel())


@pytest.mark.parametrize("frozen_stages,norm_eval", [(-1, True), (0, False), (2, True)])
def test_freezing_matches_mmseg(frozen_stages, norm_eval):
    cfg = dict(depth=18, frozen_stages=frozen_stages, norm_eval=norm_eval, **D8)
    ours, theirs = _pair(cfg)
    ours.train()
    theirs.train()
    assert {n: m.training for n, m in ours.named_modules()} == {n: m.training for n, m in theirs.named_modules()}
    assert ({n: p.requires_grad for n, p in ours.named_parameters()}
            == {n: p.requires_grad for n, p in theirs.named_parameters()})
    x = torch.randn(2, 3, 33, 41, dtype=F64, generator=torch.Generator().manual_seed(4))
    before = {n: b.clone() for n, b in ours.named_buffers()}
    got, _, grads, bufs = _run(ours, x, True)
    want, _, grads_t, bufs_t = _run(theirs, x, True)
    for o, t in zip(got, want):
        assert_close(o, t, F64, "output")
    assert grads.keys() == grads_t.keys()
    for name, b in bufs_t.items():
        assert_close(bufs[name].double(), b.double(), F64, f"buffer {name}")
    for name, b in before.items():  # frozen / norm_eval norms keep their running statistics
        frozen = norm_eval or (frozen_stages >= 0 and name.startswith("stem."))
        assert bufs[name].equal(b) == frozen, name


def test_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match=r"depth must be one of \[18, 34, 50, 101\], got 152"):
        ResNetV1c(152)
    with pytest.raises(ValueError, match="one entry per stage"):
        ResNetV1c(18, strides=(1, 2, 2))
    with pytest.raises(ValueError, match="out_indices"):
        ResNetV1c(18, out_indices=(4,))
    with pytest.raises(ValueError, match="frozen_stages"):
        ResNetV1c(18, frozen_stages=5)
    with pytest.raises(ValueError, match="norm must be"):
        ResNetV1c(18, norm="LN")
    net = ResNetV1c(18)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\], got \(1, 4, 8, 8\)"):
        net(torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match=r"got \(3, 8, 8\)"):
        net(torch.randn(3, 8, 8))
    with pytest.raises(TypeError, match="floating-point"):
        net(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# ----------------------------------------------------------------------------------------------- load_pretrained

def _random_state(module, seed=5):
    """module's state_dict with random values (so a load is visible)."""
    g = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v + 7)
            for k, v in module.state_dict().items()}


def _assert_state(module, state, keys=None):
    own = module.state_dict()
    for k in keys if keys is not None else own:
        torch.testing.assert_close(own[k], state[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("layout", ["plain", "legacy_format", "state_dict", "backbone_prefix", "module_prefix",
                                    "segmentor"])
def test_load_mmcv_layout(tmp_path, layout):
    """open-mmlab resnet*_v1c layout (with an ImageNet fc classifier) in the wrappings seen in the wild."""
    state = _random_state(ResNetV1c(18))
    classifier = {"fc.weight": torch.randn(1000, 512), "fc.bias": torch.randn(1000)}
    if layout in ("plain", "legacy_format"):
        ckpt = {**state, **classifier}
    elif layout == "state_dict":
        ckpt = {"meta": {"epoch": 100, "CLASSES": ("a", "b")}, "state_dict": {**state, **classifier}}
    elif layout == "backbone_prefix":
        ckpt = {"state_dict": {f"backbone.{k}": v for k, v in state.items()}}
    elif layout == "module_prefix":
        ckpt = {f"module.{k}": v for k, v in {**state, **classifier}.items()}
    else:  # a whole segmentor checkpoint: its backbone part
        ckpt = {"state_dict": {**{f"backbone.{k}": v for k, v in state.items()},
                               "decode_head.conv_seg.weight": torch.randn(19, 128, 1, 1),
                               "auxiliary_head.conv_seg.bias": torch.randn(19)}}
    path = tmp_path / "r18.pth"
    # legacy_format: the pickle stream torch < 1.6 wrote (old open-mmlab checkpoints)
    torch.save(ckpt, path, _use_new_zipfile_serialization=layout != "legacy_format")
    net = ResNetV1c(18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_pretrained(net, path)
    _assert_state(net, state)
    assert isinstance(report, LoadReport)
    assert sorted(report.loaded) == sorted(state) and not report.missing_keys and not report.unexpected_keys
    with_classifier = layout in ("plain", "legacy_format", "state_dict", "module_prefix")
    assert report.skipped_keys == (["fc.weight", "fc.bias"] if with_classifier else [])


def _torchvision_state(depth: int):
    """A torchvision ResNet state_dict: mmseg's plain ResNet (7x7 conv1/bn1 stem) has torchvision's key names."""
    src = MMResNet(depth=depth, strides=(1, 2, 2, 2), dilations=(1, 1, 1, 1))
    state = _random_state(src, seed=6)
    assert "conv1.weight" in state and state["conv1.weight"].shape[-1] == 7
    width = 512 if depth < 50 else 2048
    return {**state, "fc.weight": torch.randn(1000, width), "fc.bias": torch.randn(1000)}


@pytest.mark.parametrize("depth", [18, 50])
def test_load_torchvision_layout(tmp_path, depth):
    state = _torchvision_state(depth)
    if depth == 50:  # checkpoints saved before BatchNorm had num_batches_tracked
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "tv.pth"
    torch.save(state, path)
    net = ResNetV1c(depth)
    stem_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith("stem.")}
    with pytest.warns(UserWarning, match="7x7 stem cannot map") as record:
        report = load_pretrained(net, path)
    message = str(record[0].message)
    stem_keys = sorted(k for k in state if k.startswith(("conv1.", "bn1.")))
    assert all(k in message for k in stem_keys) and "stem.*" in message
    layer_keys = [k for k in state if k.startswith("layer")]
    _assert_state(net, state, layer_keys)
    _assert_state(net, stem_before, list(stem_before))  # the deep stem stays at its init
    assert sorted(report.skipped_keys) == sorted(stem_keys + ["fc.weight", "fc.bias"])
    assert sorted(report.loaded) == sorted(layer_keys)
    assert {k for k in report.missing_keys if not k.startswith("stem.")} == set()
    assert not report.unexpected_keys


def test_load_errors(tmp_path):
    net = ResNetV1c(18)
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nope.pth"):
        load_pretrained(net, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="local files only"):
        load_pretrained(net, "open-mmlab://resnet18_v1c")
    with pytest.raises(ValueError, match="local files only"):
        load_pretrained(net, "https://download.openmmlab.com/r18.pth")
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable PyTorch checkpoint"):
        load_pretrained(net, text)
    lst = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], lst)
    with pytest.raises(ValueError, match="expected a state_dict"):
        load_pretrained(net, lst)

    # a pickled Python object: refused by weights_only loading, with the way out named
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": net.state_dict(), "meta": _Opaque()}, unsafe)
    with pytest.raises(ValueError, match=r"Unsupported global: .*_Opaque.*pass weights_only=False"):
        load_pretrained(ResNetV1c(18), unsafe)
    load_pretrained(ResNetV1c(18), unsafe, weights_only=False)

    # wrong architecture: missing / unexpected keys (r18 -> r34), shape mismatch (other widths)
    r18 = tmp_path / "r18.pth"
    torch.save(_random_state(net), r18)
    with pytest.raises(ValueError, match=r"missing keys \(\d+\): layer1\.2\.conv1\.weight"):
        load_pretrained(ResNetV1c(34), r18)
    r34_path = tmp_path / "r34.pth"
    torch.save(_random_state(ResNetV1c(34)), r34_path)
    with pytest.raises(ValueError, match=r"missing keys \(0\): -; unexpected keys \(\d+\): layer1\.2\.conv1\.weight"):
        load_pretrained(ResNetV1c(18), r34_path)
    with pytest.raises(ValueError, match=r"layer1\.0\.conv1\.weight has shape \(64, 64, 3, 3\) in the checkpoint but "
                                         r"\(64, 64, 1, 1\)"):
        load_pretrained(ResNetV1c(50), r18)
    with pytest.raises(ValueError, match=r"stem\.0\.weight has shape \(32, 3, 3, 3\) in the checkpoint but "
                                         r"\(16, 3, 3, 3\) in the ResNetV1c"):
        load_pretrained(ResNetV1c(18, stem_channels=32), r18)
    target = ResNetV1c(18, stem_channels=32)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError):
        load_pretrained(target, r18)
    _assert_state(target, before)  # a failed load leaves the module untouched
    with pytest.raises(ValueError, match="no checkpoint key starts with prefix 'backbone.'; its keys start with"):
        load_pretrained(net, r18, prefix="backbone.")

    # strict=False: warn, load what matches
    r34 = ResNetV1c(34)
    with pytest.warns(UserWarning, match="missing keys"):
        report = load_pretrained(r34, r18, strict=False)
    state = torch.load(r18)
    _assert_state(r34, state, ["stem.0.weight", "layer1.1.conv2.weight"])
    assert "layer1.2.conv1.weight" in report.missing_keys


class _Opaque:
    """Stands for the non-tensor objects some training frameworks pickle into checkpoints."""

    def __reduce__(self):
        return (_Opaque, ())
