"""ULLMC (fastctx.models.ullmc): IIWANeck, the cross-scale IIWA decoder, the segmentor, OHEM, presets and configs.

The model under test is the real network shrunk in width (Swin with strides (4, 2, 1, 1), the IIWA neck, the
cross-scale decoder, the auxiliary FCNHead), at sizes that are not multiples of any window.
"""
from __future__ import annotations

import math
from copy import deepcopy as copy_module

import pytest
import torch
import torch.nn.functional as F

from fastctx.engine import load_config
from fastctx.models import ULLMC, CrossScaleIIWA, IIWAHead, IIWANeck, build_model, get_preset, ohem_pixel_weight
from fastctx.models.losses import seg_cross_entropy
from fastctx.reference.window_attention import sine_position_encoding, upsample_add
from tolerances import assert_close

# ULLMC-Swin shrunk to ~40k parameters: stage widths 8/16/32/64, every module of the real network.
MICRO = dict(
    backbone=dict(embed_dims=8, num_heads=(1, 2, 2, 4), window_size=3, drop_path_rate=0.1),
    neck=dict(in_channels=[8, 16, 32, 64], channels=[8, 16, 32], num_heads=(2, 2, 4),
              window_sizes=((2, 3), (3, 2), (2, 2))),
    decode_head=dict(in_channels=64, memory_channels=[8, 16, 32], embed_dims=16, channels=8, num_heads=2,
                     window_size=(3, 2), depth=2),
    auxiliary_head=dict(in_channels=64, channels=8),
)
MICRO_YAML = ("{backbone: {embed_dims: 8, num_heads: [1, 2, 2, 4], window_size: 3}, "
              "neck: {in_channels: [8, 16, 32, 64], channels: [8, 16, 32], num_heads: [2, 2, 4]}, "
              "decode_head: {in_channels: 64, memory_channels: [8, 16, 32], embed_dims: 16, channels: 8, "
              "num_heads: 2, window_size: [3, 2]}, auxiliary_head: {in_channels: 64, channels: 8}, "
              "ohem: {thresh: 0.7, min_kept: 50}}")


def micro_model(num_classes: int = 4, **overrides) -> ULLMC:
    return build_model("ullmc_swin-tiny", num_classes, **{**MICRO, **overrides})


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------- the network

@pytest.mark.parametrize("size", [(37, 53), (29, 16)])
def test_forward_loss_backward_at_awkward_sizes(size):
    """Sizes that no window divides at any level: logits at the input size, finite losses, and every
    parameter gets a finite gradient (none unused: DDP needs that)."""
    torch.manual_seed(0)
    model = micro_model()
    img = torch.randn(2, 3, *size)
    label = torch.randint(0, 4, (2, *size))
    label[0, :5] = 255
    model.eval()
    assert model(img).shape == (2, 4, *size)
    model.train()
    losses = model.loss(img, label)
    assert set(losses) == {"decode.loss_ce", "aux.loss_ce"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_neck_and_head_shapes():
    torch.manual_seed(0)
    model = micro_model().eval()
    img = torch.randn(1, 3, 45, 30)
    feats = model.extract_feat(img)
    # strides (4, 2, 1, 1): 1/4, then three maps at 1/8
    assert [tuple(f.shape[1:]) for f in feats] == [(8, 12, 8), (16, 6, 4), (32, 6, 4), (64, 6, 4)]
    neck = model.neck(feats)
    assert [tuple(f.shape[1:]) for f in neck] == [(8, 12, 8), (16, 6, 4), (32, 6, 4)]
    assert model.decode_head((feats, neck)).shape == (1, 4, 12, 8)


def test_fused_and_eager_give_the_same_outputs_and_gradients():
    """float64, training mode without dropout: fused=True (fastctx.ops.window_attention everywhere) against
    fused=False (the eager maths) on the same weights."""
    torch.manual_seed(0)
    model = micro_model(backbone={**MICRO["backbone"], "drop_path_rate": 0.0},
                        neck={**MICRO["neck"], "drop_path_rate": 0.0, "proj_drop": 0.0},
                        decode_head={**MICRO["decode_head"], "drop_path_rate": 0.0, "dropout_ratio": 0.0},
                        auxiliary_head={**MICRO["auxiliary_head"], "dropout_ratio": 0.0}).double()
    img = torch.randn(2, 3, 35, 42, dtype=torch.float64)
    label = torch.randint(0, 4, (2, 35, 42))
    results = {}
    for fused in (True, False):
        copy = copy_module(model)  # a copy each: the training step updates BatchNorm's running statistics
        copy.fused = fused
        assert copy.fused is fused and copy.backbone.fused is fused and copy.neck.fused is fused
        out = copy.eval()(img)
        loss = sum(copy.train().loss(img, label).values())
        loss.backward()
        results[fused] = out, loss, _grads(copy)
    (out_f, loss_f, grads_f), (out_e, loss_e, grads_e) = results[True], results[False]
    assert_close(out_f, out_e, msg="logits")
    assert_close(loss_f, loss_e, msg="loss")
    assert grads_f.keys() == grads_e.keys()
    for name in grads_e:
        assert_close(grads_f[name], grads_e[name], msg=name)


def _windows_reference(q, k, v, heads, window, table, index):
    """softmax(q k^T * d^-1/2 + bias) v in windows of [B, H, W, heads * d] maps, padded keys excluded."""
    batch, height, width, channels = q.shape
    wh, ww = window
    hp, wp = math.ceil(height / wh) * wh, math.ceil(width / ww) * ww
    d = channels // heads
    out = torch.zeros_like(q)
    for i0 in range(0, hp, wh):
        for j0 in range(0, wp, ww):
            rows, cols = range(i0, min(i0 + wh, height)), range(j0, min(j0 + ww, width))
            pos = [(i, j) for i in rows for j in cols]
            local = [(i - i0) * ww + (j - j0) for i, j in pos]
            ii = torch.tensor([p[0] for p in pos])
            jj = torch.tensor([p[1] for p in pos])
            for h in range(heads):
                sl = slice(h * d, (h + 1) * d)
                qw, kw, vw = q[:, ii, jj, sl], k[:, ii, jj, sl], v[:, ii, jj, sl]
                bias = table[index[local][:, local], h]
                attn = (qw @ kw.transpose(1, 2) * d ** -0.5 + bias).softmax(-1)
                out[:, ii, jj, sl] = attn @ vw
    return out


def test_cross_scale_attention_groups_heads_by_scale():
    """CrossScaleIIWA's one packed window_attention call is, per scale s, attention of the query's heads of
    group s over memory s's keys and values (checked window by window), then IIWA's inter-window part."""
    from fastctx.reference.window_attention import relative_position_index

    torch.manual_seed(0)
    layer = CrossScaleIIWA(8, [4, 12], num_heads=2, window_size=(2, 3)).double().eval()
    with torch.no_grad():
        layer.relative_position_bias_table.normal_()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    memories = [torch.randn(2, 5, 7, 4, dtype=torch.float64), torch.randn(2, 5, 7, 12, dtype=torch.float64)]
    q = layer.q_proj(x)
    kv = [proj(m) for proj, m in zip(layer.kv_projs, memories)]
    index = relative_position_index((2, 3))
    table = layer.relative_position_bias_table
    local = torch.cat([
        _windows_reference(q[..., 8 * s:8 * (s + 1)], kv[s][..., :8], kv[s][..., 8:], 2, (2, 3),
                           table[:, 2 * s:2 * (s + 1)], index)
        for s in range(2)], dim=-1)
    y = layer.norm1(x + layer.proj(local))
    tokens = F.adaptive_avg_pool2d(y.permute(0, 3, 1, 2), (3, 3)).permute(0, 2, 3, 1)
    tokens = tokens + sine_position_encoding(3, 3, 8).double()
    tq, tk, tv = layer.qkv2(tokens).split(8, dim=-1)
    glob = _windows_reference(tq, tk, tv, 2, (3, 3), torch.zeros(25, 2, dtype=torch.float64),
                              relative_position_index((3, 3)))
    y = layer.norm2(upsample_add(layer.proj2(glob), y))
    expected = layer.norm3(y + layer.mlp(y))
    for fused in (True, False):
        layer.fused = fused
        assert_close(layer(x, memories), expected, msg=f"fused={fused}")


def test_head_aligns_the_finer_memory_by_space_to_depth():
    """A stride-2 memory of odd size is zero-padded to twice the query's grid and folded 2x2 into channels."""
    head = IIWAHead(16, [4, 8], 3, memory_strides=(2, 1), embed_dims=8, channels=8, num_heads=2, window_size=2)
    memory = torch.randn(1, 4, 5, 3)
    aligned = head._align(memory, 2, (3, 2))
    assert aligned.shape == (1, 3, 2, 16)
    padded = F.pad(memory, (0, 1, 0, 1))
    for c in range(4):
        for dy in range(2):
            for dx in range(2):
                assert torch.equal(aligned[0, :, :, c * 4 + dy * 2 + dx], padded[0, c, dy::2, dx::2])


def test_bad_inputs_and_arguments_say_what_was_expected():
    model = micro_model().eval()
    feats = model.extract_feat(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="IIWANeck expects 4 NCHW features"):
        model.neck(feats[:3])
    with pytest.raises(TypeError, match=r"IIWAHead takes \(backbone features, neck features\)"):
        model.decode_head(feats)
    with pytest.raises(ValueError, match="neck levels with channels"):
        model.decode_head((feats, feats[1:]))
    with pytest.raises(ValueError, match="in_channels needs one more entry"):
        IIWANeck([8, 16], [8, 16])
    with pytest.raises(ValueError, match="memory_strides needs one positive int per memory level"):
        IIWAHead(16, [4, 8], 3, memory_strides=(2,))
    with pytest.raises(ValueError, match="ohem must be dict"):
        micro_model(ohem=dict(thresh=1.5))
    with pytest.raises(ValueError, match="has no neck to override"):
        build_model("fcn_r18-d8", 3, neck=dict(channels=[8]))


# ----------------------------------------------------------------------------------------------- OHEM

def _ohem_reference(prob: torch.Tensor, label: torch.Tensor, thresh: float, min_kept: int, ignore: int):
    """mmseg's selection stated as a rule: the labelled pixels with p < thresh if more than min_kept * B of
    them are that confident-poor, else the min_kept * B least confident ones (all but the most confident one
    when there are not that many labelled pixels). Probabilities are distinct."""
    valid = label != ignore
    p = prob[valid]
    kept = min_kept * label.shape[0]
    order = p.argsort()
    if (p < thresh).sum() > kept:
        keep = p < thresh
    else:
        keep = torch.zeros_like(valid[valid])
        keep[order[:min(kept, p.numel() - 1)]] = True
    weight = torch.zeros(label.shape, dtype=prob.dtype)
    weight[valid] = keep.to(prob.dtype)
    return weight


@pytest.mark.parametrize("min_kept", [0, 3, 40, 1000])
@pytest.mark.parametrize("thresh", [0.3, 0.7])
def test_ohem_keeps_the_hard_pixels_as_mmseg(thresh, min_kept):
    torch.manual_seed(min_kept)
    logits = torch.randn(2, 5, 9, 11) * 2
    label = torch.randint(0, 5, (2, 9, 11))
    label[1, :4] = 255
    weight = ohem_pixel_weight(logits, label, thresh, min_kept, ignore_index=255)
    prob = logits.softmax(1).gather(1, label.clamp(max=4).unsqueeze(1)).squeeze(1)
    expected = _ohem_reference(prob, label, thresh, min_kept, 255)
    assert torch.equal(weight, expected)
    assert weight[label == 255].sum() == 0
    if min_kept <= 1:
        return  # mmseg's sampler asserts min_kept > 1
    # and mmseg's own sampler, the oracle
    from mmseg.structures.sampler import OHEMPixelSampler

    sampler = OHEMPixelSampler(context=type("Head", (), {"ignore_index": 255})(), thresh=thresh, min_kept=min_kept)
    assert torch.equal(weight, sampler.sample(logits, label.unsqueeze(1)))


def test_ohem_edge_cases_and_the_weighted_loss():
    logits = torch.randn(1, 3, 4, 4)
    assert ohem_pixel_weight(logits, torch.full((1, 4, 4), 255), 0.7, 10).sum() == 0  # nothing labelled
    label = torch.randint(0, 3, (1, 4, 4))
    weight = ohem_pixel_weight(logits, label, 0.7, 5)
    per_pixel = F.cross_entropy(logits, label, reduction="none")
    expected = (per_pixel * weight).sum() / (label.numel() + torch.finfo(torch.float32).eps)
    assert_close(seg_cross_entropy(logits, label, pixel_weight=weight), expected)
    with pytest.raises(ValueError, match="at the label's size"):
        ohem_pixel_weight(logits, torch.zeros(1, 8, 8, dtype=torch.long), 0.7, 5)


def test_the_segmentor_applies_ohem_to_the_decode_loss_only():
    torch.manual_seed(0)
    model = micro_model().eval()  # eval: no dropout, the same logits in both computations
    img, label = torch.randn(1, 3, 24, 24), torch.randint(0, 4, (1, 24, 24))
    with torch.no_grad():
        feats = model.extract_feat(img)
        logits = F.interpolate(model.decode_head((feats, model.neck(feats))), size=(24, 24), mode="bilinear")
        prob = logits.softmax(1).gather(1, label.unsqueeze(1))
        # an untrained model is unsure of every pixel: a threshold at the median keeps about half of them
        model.ohem = dict(thresh=prob.median().item(), min_kept=20)
        weight = ohem_pixel_weight(logits, label, model.ohem["thresh"], 20)
        assert 200 < weight.sum() < 400
        losses = model.loss(img, label)
        assert_close(losses["decode.loss_ce"], seg_cross_entropy(logits, label, pixel_weight=weight))
        assert_close(losses["aux.loss_ce"], seg_cross_entropy(model.auxiliary_head(feats), label, 0.4))
        assert losses["decode.loss_ce"] < seg_cross_entropy(logits, label)


# ----------------------------------------------------------------------------------------------- presets, configs

def test_presets_follow_the_released_configs():
    for variant, depths, dims, window in (("t", (2, 2, 6, 2), 96, 7), ("s", (2, 2, 18, 2), 96, 7),
                                          ("b", (2, 2, 18, 2), 128, 12)):
        cfg = get_preset(f"ullmc_swin-{variant}")
        assert cfg["segmentor"] == "ULLMC" and cfg["backbone_type"] == "SwinTransformer"
        b = cfg["backbone"]
        assert (b["depths"], b["embed_dims"], b["window_size"], b["strides"]) == (depths, dims, window, (4, 2, 1, 1))
        assert cfg["neck"]["in_channels"] == [dims * 2 ** i for i in range(4)]
        assert cfg["neck"]["channels"] == cfg["decode_head"]["memory_channels"] == [dims, 2 * dims, 4 * dims]
        assert cfg["auxiliary_head"]["in_channels"] == cfg["decode_head"]["in_channels"] == 8 * dims
        assert cfg["ohem"] == dict(thresh=0.7, min_kept=100000)
    model = build_model("ullmc_swin-t", 150)
    keys = model.state_dict().keys()
    assert {k.split(".")[0] for k in keys} == {"backbone", "neck", "decode_head", "auxiliary_head"}
    assert "backbone.stages.2.blocks.5.attn.w_msa.relative_position_bias_table" in keys
    assert "neck.blocks.0.relative_position_index" in keys


def test_configs_load_with_the_released_recipe():
    for name, dataset, crop, iters in (
            ("ullmc_swin-s_8xb2-160k_ade20k-512x512", "ade20k", (512, 512), 160000),
            ("ullmc_swin-s_8xb2-80k_cityscapes-512x1024", "cityscapes", (512, 1024), 80000),
            ("ullmc_swin-b_8xb2-40k_pascal-context-59-480x480", "pascal_context_59", (480, 480), 40000)):
        c = load_config(name)
        assert (c.data.name, c.data.crop_size, c.train.iters, c.train.batch_size) == (dataset, crop, iters, 16)
        assert (c.optim.type, c.optim.lr, c.optim.weight_decay, c.optim.betas) == ("AdamW", 6e-5, 0.01, (0.9, 0.999))
        assert {k: v for k, v in c.optim.paramwise.items() if k != "backbone"} == {
            "norm": {"decay_mult": 0.0}, "absolute_pos_embed": {"decay_mult": 0.0},
            "relative_position_bias_table": {"decay_mult": 0.0}}
        assert c.schedule.warmup_iters > 0 and c.schedule.eta_min == 0.0
    tiny = load_config("ullmc_swin-tiny_synthetic")
    assert tiny.model.name == "ullmc_swin-tiny" and tiny.optim.type == "AdamW" and tiny.schedule.warmup_iters > 0


# ----------------------------------------------------------------------------------------------- torch.compile

def test_torch_compile_of_the_whole_model_has_no_graph_break():
    """Dynamo traces the whole training loss (Swin, IIWA neck, decoder, auxiliary head, OHEM selection and the
    weighted CE) as one graph: every window attention is one custom op, and the OHEM threshold is found
    without a data-dependent shape or a host sync."""
    torch.manual_seed(0)
    model = micro_model().eval()
    img, label = torch.randn(1, 3, 37, 29), torch.randint(0, 4, (1, 37, 29))
    label[0, :3] = 255
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model.loss)(img, label)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons

    def ohem_loss(logits, label):
        return seg_cross_entropy(logits, label, pixel_weight=ohem_pixel_weight(logits, label, 0.7, 100))

    logits = torch.randn(1, 4, 37, 29)
    assert_close(torch.compile(ohem_loss, backend="eager", fullgraph=True)(logits, label), ohem_loss(logits, label))
