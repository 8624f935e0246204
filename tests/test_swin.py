"""fastctx.models.SwinTransformer against mmsegmentation 1.2.2's SwinTransformer, and swin_converter.

Strict state_dict loading both ways of naming, the same features and
gradients (float64, random weights and bias tables, train and eval, fused and
eager; the fused path with the op served by the reference maths, see
test_window_msa), mmseg's initialisation from the same seed, checkpointing,
frozen stages, and the official-checkpoint converter on a synthetic
official-layout state dict.
"""
import pytest
import torch
import torch.nn.functional as F

from fastctx.models.swin import SwinTransformer, swin_converter
from fastctx.nn.window_msa import ShiftWindowMSA
from test_window_msa import _heads, needs_mmseg, reference_op  # noqa: F401  (fixture)
from tolerances import assert_close

F64 = torch.float64
if _heads is not None:
    from mmseg.models.backbones.swin import SwinTransformer as MMSwinTransformer

TINY = dict(embed_dims=12, depths=(2, 2, 2), num_heads=(1, 2, 3), strides=(4, 2, 2), out_indices=(0, 1, 2),
            window_size=7)
# ULLMC's backbone layout: strides (4, 2, 1, 1), so the last three stages stay at 1/8.
ULLMC_LIKE = dict(embed_dims=8, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), strides=(4, 2, 1, 1),
                  out_indices=(1, 3), window_size=7, qkv_bias=False, qk_scale=0.25, patch_norm=False,
                  use_abs_pos_embed=True, pretrain_img_size=(44, 52))


def _pair_of_models(config, dtype=F64, **extra):
    torch.manual_seed(0)
    theirs = MMSwinTransformer(**config, **extra)
    theirs.init_weights()
    theirs = theirs.to(dtype)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # mmseg leaves the bias tables (and the position embedding) at zero: randomise them
        for name, p in theirs.named_parameters():
            if "relative_position_bias_table" in name or "absolute_pos_embed" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.5)
    ours = SwinTransformer(**config, **extra).to(dtype)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _run(model, img, train: bool):
    model.train(train)
    leaf = img.clone().requires_grad_()
    torch.manual_seed(5)
    outs = model(leaf)
    loss = sum((o * torch.randn(o.shape, generator=torch.Generator().manual_seed(i), dtype=o.dtype)).sum()
               for i, o in enumerate(outs))
    loss.backward()
    return list(outs), leaf.grad, {n: p.grad for n, p in model.named_parameters()}


def _compare(got, want, dtype):
    assert len(got[0]) == len(want[0])
    for i, (a, b) in enumerate(zip(got[0], want[0])):
        assert a.shape == b.shape
        assert_close(a, b, dtype, f"feature {i}")
    assert_close(got[1], want[1], dtype, "grad of image")
    assert got[2].keys() == want[2].keys()
    for name, g in want[2].items():
        if g is None:
            assert got[2][name] is None, name
        else:
            assert_close(got[2][name], g, dtype, f"grad of {name}")


@needs_mmseg
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("config,image", [(TINY, (2, 3, 61, 75)), (ULLMC_LIKE, (1, 3, 44, 52))],
                         ids=["tiny", "ullmc_strides"])
def test_matches_mmseg_swin(reference_op, config, image, fused, train):
    # Training randomness: the eager path reproduces every mmseg dropout draw; the fused path draws
    # the attention-output dropout over another layout, so it is checked with DropPath only.
    drops = dict(drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.5) if fused else \
        dict(drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.5)
    ours, theirs = _pair_of_models(config, **drops)
    ours.fused = fused
    img = torch.randn(*image, dtype=F64)
    _compare(_run(ours, img, train), _run(theirs, img, train), F64)
    blocks = sum(config["depths"])
    assert len(reference_op) == (blocks if fused else 0)


@needs_mmseg
@pytest.mark.parametrize("fused", [False, True])
def test_matches_mmseg_swin_t_float32(reference_op, fused):
    """The realistic case: Swin-T as configured in mmseg (window 7, C 96, heads 3..24), fp32, eval."""
    ours, theirs = _pair_of_models(dict(), dtype=torch.float32, drop_path_rate=0.3)
    ours.fused = fused
    img = torch.randn(1, 3, 68, 100)  # 17x25 tokens, then 9x13, 5x7, 3x4: no stage a multiple of 7
    _compare(_run(ours, img, False), _run(theirs, img, False), torch.float32)


@needs_mmseg
@pytest.mark.parametrize("config", [TINY, ULLMC_LIKE], ids=["tiny", "ullmc_strides"])
def test_same_seed_gives_mmsegs_initial_weights(config):
    torch.manual_seed(3)
    theirs = MMSwinTransformer(**config)
    theirs.init_weights()
    torch.manual_seed(3)
    ours = SwinTransformer(**config)
    want, got = theirs.state_dict(), ours.state_dict()
    assert list(got) == list(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


@pytest.mark.parametrize("fused", [False, True])
def test_with_cp_same_results(reference_op, fused):
    torch.manual_seed(0)
    plain = SwinTransformer(**TINY, drop_path_rate=0.0, fused=fused).double()
    checkpointed = SwinTransformer(**TINY, drop_path_rate=0.0, with_cp=True, fused=fused).double()
    checkpointed.load_state_dict(plain.state_dict(), strict=True)
    img = torch.randn(1, 3, 40, 36, dtype=F64)
    _compare(_run(checkpointed, img, True), _run(plain, img, True), F64)


@needs_mmseg
@pytest.mark.parametrize("frozen", [-1, 0, 2])
def test_frozen_stages_as_mmseg(frozen):
    theirs = MMSwinTransformer(**TINY, frozen_stages=frozen)
    ours = SwinTransformer(**TINY, frozen_stages=frozen)
    theirs.train()
    ours.train()
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in theirs.named_parameters()}
    modes = {n: m.training for n, m in theirs.named_modules()}
    for name, module in ours.named_modules():
        if name in modes:
            assert module.training == modes[name], name
    assert any(not p.requires_grad for p in ours.parameters()) == (frozen >= 0)


def test_fused_flag_reaches_every_block():
    model = SwinTransformer(**TINY)
    attns = [m for m in model.modules() if isinstance(m, ShiftWindowMSA)]
    assert len(attns) == 6 and model.fused
    model.fused = False
    assert not model.fused and not any(a.fused for a in attns)


@pytest.mark.parametrize("kwargs,match", [
    (dict(strides=(2, 2, 2)), "patch_size"),
    (dict(num_heads=(1, 5, 3)), "divisible"),
    (dict(out_indices=(3,)), "out_indices"),
    (dict(norm_cfg=dict(type="BN")), "norm_cfg"),
    (dict(act_cfg=dict(type="ReLU")), "act_cfg"),
    (dict(depths=(2, 2)), "one entry per stage"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SwinTransformer(**{**TINY, **kwargs})


def test_bad_inputs():
    model = SwinTransformer(**TINY)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="floating-point"):
        model(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with_pos = SwinTransformer(**ULLMC_LIKE)
    with pytest.raises(ValueError, match="pretraining token count"):
        with_pos(torch.randn(1, 3, 48, 52))


# ----------------------------------------------------------------------------- official checkpoints

def _official_state_dict(depths, embed_dims, num_heads, window, mlp_ratio=4, classes=10, seed=0):
    """A random state_dict laid out as Microsoft's Swin Transformer names it."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    sd = {"patch_embed.proj.weight": rand(embed_dims, 3, 4, 4), "patch_embed.proj.bias": rand(embed_dims),
          "patch_embed.norm.weight": rand(embed_dims), "patch_embed.norm.bias": rand(embed_dims)}
    tokens = window * window
    for i, depth in enumerate(depths):
        c = embed_dims * 2 ** i
        for j in range(depth):
            p = f"layers.{i}.blocks.{j}."
            sd.update({
                p + "norm1.weight": rand(c), p + "norm1.bias": rand(c),
                p + "attn.relative_position_bias_table": rand((2 * window - 1) ** 2, num_heads[i]),
                p + "attn.relative_position_index": torch.zeros(tokens, tokens, dtype=torch.long),
                p + "attn.qkv.weight": rand(3 * c, c), p + "attn.qkv.bias": rand(3 * c),
                p + "attn.proj.weight": rand(c, c), p + "attn.proj.bias": rand(c),
                p + "norm2.weight": rand(c), p + "norm2.bias": rand(c),
                p + "mlp.fc1.weight": rand(mlp_ratio * c, c), p + "mlp.fc1.bias": rand(mlp_ratio * c),
                p + "mlp.fc2.weight": rand(c, mlp_ratio * c), p + "mlp.fc2.bias": rand(c),
            })
            if j % 2:
                sd[p + "attn_mask"] = rand(4, tokens, tokens)
        if i < len(depths) - 1:
            sd.update({f"layers.{i}.downsample.reduction.weight": rand(2 * c, 4 * c),
                       f"layers.{i}.downsample.norm.weight": rand(4 * c),
                       f"layers.{i}.downsample.norm.bias": rand(4 * c)})
    last = embed_dims * 2 ** (len(depths) - 1)
    sd.update({"norm.weight": rand(last), "norm.bias": rand(last), "head.weight": rand(classes, last),
               "head.bias": rand(classes)})
    return sd


def _official_patch_merging(x, hw, norm_weight, norm_bias, reduction):
    """Microsoft's PatchMerging: concatenate x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]."""
    b, _, c = x.shape
    x = x.view(b, *hw, c)
    x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1).view(b, -1, 4 * c)
    return F.linear(F.layer_norm(x, (4 * c,), norm_weight, norm_bias), reduction)


@pytest.mark.parametrize("wrapper", [None, "model", "state_dict"])
def test_swin_converter(wrapper):
    depths, heads = (2, 2, 2), (1, 2, 4)
    official = _official_state_dict(depths, 8, heads, 7)
    converted = swin_converter({wrapper: official} if wrapper else official)
    model = SwinTransformer(embed_dims=8, depths=depths, num_heads=heads, strides=(4, 2, 2), out_indices=(0, 2))
    missing, unexpected = model.load_state_dict(converted, strict=False)
    assert unexpected == []
    assert sorted(missing) == ["norm0.bias", "norm0.weight", "norm2.bias", "norm2.weight"]  # not in official files

    renamed = {"patch_embed.projection.weight": "patch_embed.proj.weight",
               "stages.1.blocks.1.attn.w_msa.qkv.bias": "layers.1.blocks.1.attn.qkv.bias",
               "stages.2.blocks.0.attn.w_msa.relative_position_bias_table":
                   "layers.2.blocks.0.attn.relative_position_bias_table",
               "stages.0.blocks.1.ffn.layers.0.0.weight": "layers.0.blocks.1.mlp.fc1.weight",
               "stages.2.blocks.1.ffn.layers.1.bias": "layers.2.blocks.1.mlp.fc2.bias",
               "stages.1.blocks.0.norm2.weight": "layers.1.blocks.0.norm2.weight"}
    for new, old in renamed.items():
        assert converted[new] is official[old], new
    assert not [k for k in converted if k.startswith(("head", "norm.")) or k.endswith("attn_mask")]

    # PatchMerging computes the official merge with the permuted norm and reduction weights.
    for i, hw in ((0, (6, 10)), (1, (4, 2))):
        c = 8 * 2 ** i
        x = torch.randn(2, hw[0] * hw[1], c)
        got, size = model.stages[i].downsample(x, hw)
        p = f"layers.{i}.downsample."
        want = _official_patch_merging(x, hw, official[p + "norm.weight"], official[p + "norm.bias"],
                                       official[p + "reduction.weight"])
        assert size == (hw[0] // 2, hw[1] // 2)
        assert_close(got, want, torch.float32, f"merged tokens of stage {i}")
