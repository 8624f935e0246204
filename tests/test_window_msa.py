"""fastctx.nn.WindowMSA / ShiftWindowMSA against mmsegmentation 1.2.2's, and convert_window_msa.

The fused path is exercised with `fastctx.ops.window_attention` served by the
reference maths (the `reference_op` fixture): that checks the modules' half of
the op's contract -- qkv layout, padding value, shift, scale, one call and no
pad/roll/partition tensors -- independently of any backend, whose own tests
compare each backend with the same reference.
"""
import pytest
import torch
from torch.overrides import TorchFunctionMode

import fastctx
from fastctx.nn.window_msa import DropPath, ShiftWindowMSA, WindowMSA, convert_window_msa
from fastctx.reference.window_attention import window_attention
from mmseg_compat import import_decode_heads
from tolerances import assert_close

F64 = torch.float64
_heads = import_decode_heads()  # stubs mmcv.ops so that mmseg's backbones import with mmcv-lite
if _heads is not None:
    from mmseg.models.backbones.swin import ShiftWindowMSA as MMShiftWindowMSA
    from mmseg.models.backbones.swin import SwinTransformer as MMSwinTransformer
    from mmseg.models.backbones.swin import WindowMSA as MMWindowMSA
needs_mmseg = pytest.mark.skipif(_heads is None, reason="mmsegmentation is not installed")


class _OpCalls(list):
    """Arguments of every fastctx.ops.window_attention call; `inside` while the reference maths run."""

    inside = False


@pytest.fixture
def reference_op(monkeypatch):
    """fastctx.ops.window_attention served by fastctx.reference.window_attention, recording its calls."""
    calls = _OpCalls()

    def op(qkv, heads, window, bias_table=None, shift=(0, 0), scale=None, pad_qkv=None):
        calls.append(dict(qkv=qkv, heads=heads, window=tuple(window), bias_table=bias_table, shift=tuple(shift),
                          scale=scale, pad_qkv=pad_qkv))
        calls.inside = True
        try:
            return window_attention(qkv, heads, window, bias_table, shift, scale, pad_qkv)
        finally:
            calls.inside = False

    monkeypatch.setattr(fastctx.ops, "window_attention", op, raising=False)
    return calls


class _Recorder(TorchFunctionMode):
    """Names of the torch functions a forward calls outside the op."""

    def __init__(self, calls: _OpCalls):
        super().__init__()
        self.calls, self.names = calls, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.calls.inside:
            self.names.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 if "table" in name else 0.3))


def _run(module, x, hw, train: bool, seed: int = 3):
    module.train(train)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out = module(x, hw) if hw is not None else module(x)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    out.backward(grad)
    return out, x.grad, {n: p.grad for n, p in module.named_parameters()}


def _compare(got, want, what=""):
    out_g, gx_g, grads_g = got
    out_w, gx_w, grads_w = want
    assert_close(out_g, out_w, F64, f"{what} output")
    assert_close(gx_g, gx_w, F64, f"{what} grad of input")
    assert grads_g.keys() == grads_w.keys()
    for name, g in grads_w.items():
        assert_close(grads_g[name], g, F64, f"{what} grad of {name}")


# (embed_dims, heads, window, shift, hw, batch, qkv_bias, qk_scale)
SHIFT_CASES = [
    (24, 3, 7, 3, (10, 13), 2, True, None),
    (24, 3, 7, 0, (10, 13), 2, True, None),
    (16, 1, 4, 2, (9, 19), 1, True, None),
    (32, 8, 7, 3, (3, 4), 2, False, None),
    (32, 2, 12, 6, (14, 25), 1, True, 0.2),
    (48, 3, 7, 3, (14, 7), 1, True, None),
]


@needs_mmseg
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dims,heads,window,shift,hw,batch,qkv_bias,qk_scale", SHIFT_CASES)
def test_shift_window_msa_matches_mmseg(reference_op, dims, heads, window, shift, hw, batch, qkv_bias, qk_scale,
                                        fused, train):
    torch.manual_seed(0)
    # Dropout on the attention weights and output exists only in the eager path's layout; the fused
    # path is checked in training with DropPath (drawn per sample, the same random stream as mmseg).
    drops = dict(attn_drop_rate=0.0, proj_drop_rate=0.0) if fused else dict(attn_drop_rate=0.2, proj_drop_rate=0.1)
    kwargs = dict(shift_size=shift, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  dropout_layer=dict(type="DropPath", drop_prob=0.3), **drops)
    theirs = MMShiftWindowMSA(dims, heads, window, **kwargs).double()
    _randomise(theirs)
    ours = ShiftWindowMSA(dims, heads, window, fused=fused, **kwargs).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(batch, hw[0] * hw[1], dims, dtype=F64)
    _compare(_run(ours, x, hw, train), _run(theirs, x, hw, train))
    assert len(reference_op) == (1 if fused else 0)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_fused_shift_window_msa_is_one_op_call(reference_op, qkv_bias):
    """One op call with the module's table, shift, scale and the qkv bias as padding value; no pad or roll."""
    module = ShiftWindowMSA(24, 3, 7, shift_size=3, qkv_bias=qkv_bias).double()
    x = torch.randn(2, 10 * 13, 24, dtype=F64)
    with _Recorder(reference_op) as recorder:
        module(x, (10, 13))
    assert len(reference_op) == 1
    call = reference_op[0]
    assert call["qkv"].shape == (2, 10, 13, 72)
    assert call["heads"] == 3 and call["window"] == (7, 7) and call["shift"] == (3, 3)
    assert call["bias_table"] is module.w_msa.relative_position_bias_table
    assert call["scale"] == module.w_msa.scale
    if qkv_bias:
        assert call["pad_qkv"] is module.w_msa.qkv.bias
    else:
        assert torch.equal(call["pad_qkv"], torch.zeros(72, dtype=F64))
    assert not {"pad", "roll", "masked_fill", "cat"} & set(recorder.names), recorder.names


def test_attention_dropout_in_training_runs_eager(reference_op):
    module = ShiftWindowMSA(16, 2, 4, shift_size=2, attn_drop_rate=0.1).double()
    x = torch.randn(1, 5 * 6, 16, dtype=F64)
    module.train()
    module(x, (5, 6))
    assert len(reference_op) == 0
    module.eval()
    module(x, (5, 6))
    assert len(reference_op) == 1


@needs_mmseg
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
@pytest.mark.parametrize("window", [(7, 7), (4, 8)])
def test_window_msa_matches_mmseg(reference_op, window, with_mask, fused):
    torch.manual_seed(0)
    theirs = MMWindowMSA(24, 3, window).double()
    _randomise(theirs)
    ours = WindowMSA(24, 3, window, fused=fused).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tokens = window[0] * window[1]
    x = torch.randn(2 * 3, tokens, 24, dtype=F64)  # 2 images x 3 windows
    mask = None
    if with_mask:
        mask = torch.zeros(3, tokens, tokens, dtype=F64)
        mask[1, :, tokens // 2:] = -100.0

    def run(module):
        leaf = x.clone().requires_grad_()
        out = module(leaf, mask)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64))
        return out, leaf.grad, {n: p.grad for n, p in module.named_parameters()}

    _compare(run(ours), run(theirs))
    # An arbitrary mask is not the op's: that call runs the eager maths.
    assert len(reference_op) == (1 if fused and not with_mask else 0)


@pytest.mark.parametrize("fused", [False, True])
def test_empty_batch(reference_op, fused):
    module = ShiftWindowMSA(16, 2, 4, shift_size=2, fused=fused).double()
    x = torch.randn(0, 5 * 6, 16, dtype=F64, requires_grad=True)
    out = module(x, (5, 6))
    assert out.shape == (0, 30, 16)
    out.sum().backward()
    assert x.grad.shape == x.shape


def test_drop_path_is_mmcvs():
    """x / keep * floor(keep + U): the same draws as mmcv's DropPath, per sample."""
    x = torch.randn(4, 3, 5, dtype=F64)
    drop = DropPath(0.4).train()
    torch.manual_seed(7)
    got = drop(x)
    torch.manual_seed(7)
    keep = (0.6 + torch.rand(4, 1, 1, dtype=F64)).floor()
    assert torch.equal(got, x / 0.6 * keep)
    assert torch.equal(drop.eval()(x), x)


@pytest.mark.parametrize("build,match", [
    (lambda: WindowMSA(10, 3, 7), "divisible"),
    (lambda: ShiftWindowMSA(12, 3, 7, shift_size=7), "smaller"),
    (lambda: ShiftWindowMSA(12, 3, 7, dropout_layer=dict(type="Dropout", drop_prob=0.1)), "DropPath"),
    (lambda: DropPath(1.0), "drop_prob"),
])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_input_shape():
    module = ShiftWindowMSA(12, 3, 7)
    with pytest.raises(ValueError, match=r"\[B, H\*W, 12\]"):
        module(torch.randn(1, 20, 12), (4, 6))


# ----------------------------------------------------------------------------- conversion

def _mm_swin(**kwargs):
    torch.manual_seed(0)
    model = MMSwinTransformer(**kwargs)
    model.init_weights()
    model = model.double()
    for name, p in model.named_parameters():
        if "relative_position_bias_table" in name:
            with torch.no_grad():
                p.normal_(0, 0.5)
    return model


@needs_mmseg
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fused", [False, True])
def test_convert_every_block_of_mmseg_swin(reference_op, fused, train):
    model = _mm_swin(embed_dims=16, depths=(2, 2), num_heads=(2, 4), strides=(4, 2), out_indices=(0, 1),
                     window_size=5, drop_path_rate=0.2)
    img = torch.randn(2, 3, 45, 38, dtype=F64)

    def run():
        model.train(train)
        leaf = img.clone().requires_grad_()
        torch.manual_seed(11)
        outs = model(leaf)
        loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=F64)).sum()
                   for i, o in enumerate(outs))
        grads = torch.autograd.grad(loss, [leaf, *model.parameters()])
        return outs, grads

    before = run()
    params = dict(model.named_parameters())
    for stage in model.stages:
        for block in stage.blocks:
            old = block.attn
            block.attn = convert_window_msa(old, fused=fused)
            assert isinstance(block.attn, ShiftWindowMSA) and block.attn.fused == fused
            assert block.attn.w_msa.qkv.weight is old.w_msa.qkv.weight
            assert block.attn.w_msa.relative_position_index is old.w_msa.relative_position_index
            assert block.attn.shift_size == old.shift_size and block.attn.training == old.training
    assert dict(model.named_parameters()) == params  # the same Parameter objects, same names
    after = run()
    for got, want in zip(after[0], before[0]):
        assert_close(got, want, F64, "features")
    for got, want in zip(after[1], before[1]):
        assert_close(got, want, F64, "gradient")
    assert len(reference_op) == (4 if fused else 0)


@needs_mmseg
def test_fastctx_convert_swaps_every_window_msa_of_mmseg_swin():
    """fastctx.convert on a whole mmseg SwinTransformer: every ShiftWindowMSA swapped, same tensors, same
    features."""
    model = _mm_swin(embed_dims=16, depths=(2, 2), num_heads=(2, 4), strides=(4, 2), out_indices=(0, 1),
                     window_size=5)
    model.eval()  # mmseg's SwinTransformer.train returns None
    img = torch.randn(1, 3, 45, 38, dtype=F64)
    with torch.no_grad():
        want = model(img)
    params = dict(model.named_parameters())
    _, report = fastctx.convert(model, return_report=True)
    assert sorted(r.name for r in report.replaced) == [f"stages.{s}.blocks.{b}.attn" for s in (0, 1) for b in (0, 1)]
    assert not report.skipped and dict(model.named_parameters()) == params
    assert all(isinstance(block.attn, ShiftWindowMSA) for stage in model.stages for block in stage.blocks)
    with torch.no_grad():
        for got, expected in zip(model(img), want, strict=True):
            assert_close(got, expected, F64, "features")


@needs_mmseg
def test_convert_window_msa_alone_and_refusals():
    mm = MMWindowMSA(12, 3, (4, 8), qk_scale=0.3).double()
    ours = convert_window_msa(mm, fused=False)
    assert isinstance(ours, WindowMSA) and ours.scale == 0.3 and ours.window_size == (4, 8)
    x = torch.randn(2, 32, 12, dtype=F64)
    assert_close(ours(x), mm(x), F64)

    broken = MMShiftWindowMSA(12, 3, 4)
    broken.w_msa.proj = torch.nn.Sequential(torch.nn.Linear(12, 12))
    with pytest.raises(ValueError, match="Linear"):
        convert_window_msa(broken)
    odd_index = MMShiftWindowMSA(12, 3, 4)
    odd_index.w_msa.relative_position_index.zero_()
    with pytest.raises(ValueError, match="relative position index"):
        convert_window_msa(odd_index)
