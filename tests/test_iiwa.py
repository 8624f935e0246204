"""fastctx.nn.IIWA against an eager reference of the released ULLMC layer written here from its maths.

`released_iiwa` below works from a state_dict with the released names and
follows the released forward's steps and random draws (dropout on the same
tensors in the same order, DropPath per sample), written differently from the
module: windows gathered with `unfold`, window means with `mean`, bilinear
upsampling (align_corners=True) as interpolation matrices, the positional
encoding from its formula in float32 (as released). Float64, H and W not
multiples of the window, windows 4x8 and 7x7, train and eval, fused (op served
by the reference maths, see test_window_msa) and eager.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastctx.nn.iiwa import IIWA, PositionEmbeddingSine
from fastctx.reference.window_attention import sine_position_encoding
from test_window_msa import reference_op  # noqa: F401  (fixture)
from tolerances import assert_close

F64 = torch.float64

RELEASED_KEYS = [
    "relative_position_bias_table", "relative_position_index", "qkv.weight", "qkv.bias", "qkv2.weight", "qkv2.bias",
    "proj.0.weight", "proj.0.bias", "proj.1.weight", "proj.1.bias", "proj2.0.weight", "proj2.0.bias",
    "proj2.1.weight", "proj2.1.bias", "norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]


def _released_index(wh, ww):
    ys, xs = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :] + wh - 1) * (2 * ww - 1) + (xs[:, None] - xs[None, :] + ww - 1)


def _released_pos(hg, wg, channels):
    """PositionEmbeddingSine(normalize=True) of a [hg, wg] grid, [hg, wg, C], in float32 as released."""
    feats = channels // 2
    k = torch.arange(feats, dtype=torch.float32)
    dim_t = 10000 ** (2 * (k // 2) / feats)
    even = (torch.arange(feats) % 2 == 0)

    def axis(n):
        pos = torch.arange(1, n + 1, dtype=torch.float32)
        angle = (pos / (pos[-1:] + 1e-5) * (2 * math.pi))[:, None] / dim_t
        return torch.where(even, angle.sin(), angle.cos())  # sin on even features, cos on odd ones

    return torch.cat([axis(hg)[:, None, :].expand(hg, wg, feats), axis(wg)[None, :, :].expand(hg, wg, feats)], -1)


def _interp_matrix(out_size, in_size):
    m = torch.zeros(out_size, in_size, dtype=F64)
    for o in range(out_size):
        src = o * (in_size - 1) / (out_size - 1) if out_size > 1 else 0.0
        i0 = min(int(math.floor(src)), in_size - 1)
        i1 = min(i0 + 1, in_size - 1)
        m[o, i0] += 1 - (src - i0)
        m[o, i1] += src - i0
    return m


def released_iiwa(p, x, heads, window, scale=None, mask=None, train=False, p_attn=0.0, p_proj=0.0, p_path=0.0):
    """The released SelfIIWA.forward from its parameters `p` (released names) on x [B, H, W, C]."""
    b, h, w, c = x.shape
    wh, ww = window
    d = c // heads
    scale = d ** -0.5 if scale is None else scale
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    hg, wg = hp // wh, wp // ww
    n = wh * ww
    xp = F.pad(x, (0, 0, 0, wp - w, 0, hp - h))

    # intra-window attention: windows in (image, window row, window column) order, tokens row-major
    win = xp.unfold(1, wh, wh).unfold(2, ww, ww).permute(0, 1, 2, 4, 5, 3).reshape(b * hg * wg, n, c)
    qkv = F.linear(win, p["qkv.weight"], p.get("qkv.bias"))
    q, k, v = (qkv[..., i * c:(i + 1) * c].reshape(-1, n, heads, d).transpose(1, 2) for i in range(3))
    logits = torch.einsum("whnd,whmd->whnm", q * scale, k)
    logits = logits + p["relative_position_bias_table"][_released_index(wh, ww)].permute(2, 0, 1)
    if mask is not None:
        logits = (logits.view(b, hg * wg, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    attn = F.dropout(logits.softmax(-1), p_attn, train)
    out = torch.einsum("whnm,whmd->wnhd", attn, v).reshape(b, hg, wg, wh, ww, c)
    out = out.permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    y = xp + out
    y = y + F.dropout(F.linear(F.layer_norm(y, (c,), p["proj.0.weight"], p["proj.0.bias"]), p["proj.1.weight"],
                               p["proj.1.bias"]), p_proj, train)

    # inter-window attention over the window means + positional encoding
    tokens = y.view(b, hg, wh, wg, ww, c).mean(dim=(2, 4)) + _released_pos(hg, wg, c).to(F64)
    qkv2 = F.linear(tokens.reshape(b, hg * wg, c), p["qkv2.weight"], p.get("qkv2.bias"))
    q, k, v = (qkv2[..., i * c:(i + 1) * c].reshape(b, -1, heads, d).transpose(1, 2) for i in range(3))
    g = (torch.einsum("bhnd,bhmd->bhnm", q * scale, k).softmax(-1) @ v).transpose(1, 2).reshape(b, hg, wg, c)
    y = y + torch.einsum("yi,xj,bijc->byxc", _interp_matrix(hp, hg), _interp_matrix(wp, wg), g)
    y = y + F.dropout(F.linear(F.layer_norm(y, (c,), p["proj2.0.weight"], p["proj2.0.bias"]), p["proj2.1.weight"],
                               p["proj2.1.bias"]), p_proj, train)

    y = y[:, :h, :w]
    hidden = F.linear(F.layer_norm(y, (c,), p["norm1.weight"], p["norm1.bias"]), p["mlp.fc1.weight"],
                      p["mlp.fc1.bias"])
    mlp = F.dropout(F.linear(F.dropout(F.gelu(hidden), p_proj, train), p["mlp.fc2.weight"], p["mlp.fc2.bias"]),
                    p_proj, train)
    if train and p_path > 0:
        keep = (1 - p_path + torch.rand((b, 1, 1, 1), dtype=mlp.dtype)).floor()
        mlp = mlp / (1 - p_path) * keep
    return F.layer_norm(y + mlp, (c,), p["norm2.weight"], p["norm2.bias"])


def _random_state(module, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, t in module.state_dict().items():
        state[key] = t.clone() if key == "relative_position_index" else torch.randn(t.shape, generator=g,
                                                                                     dtype=t.dtype) * 0.4
    return state


# (dim, heads, window, H, W, batch)
CASES = [
    (32, 4, (4, 8), 13, 21, 2),
    (16, 2, (7, 7), 10, 9, 2),
    (16, 1, (7, 7), 7, 14, 1),
    (24, 3, (4, 8), 3, 5, 1),
]


def _check(module, state, x, heads, window, train, drops, mask=None):
    module.load_state_dict(state, strict=True)
    module.train(train)
    leaf = x.clone().requires_grad_()
    torch.manual_seed(9)
    out = module(leaf, mask)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=F64)
    out.backward(grad_out)

    params = {k: v.clone().requires_grad_() for k, v in state.items() if k != "relative_position_index"}
    ref_leaf = x.clone().requires_grad_()
    torch.manual_seed(9)
    want = released_iiwa(params, ref_leaf, heads, window, mask=mask, train=train, **drops)
    want.backward(grad_out)

    assert_close(out, want, F64, "output")
    assert_close(leaf.grad, ref_leaf.grad, F64, "grad of x")
    for name, p in module.named_parameters():
        assert_close(p.grad, params[name].grad, F64, f"grad of {name}")


@pytest.mark.parametrize("mode", ["eval", "train", "train_no_attn_drop"])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dim,heads,window,height,width,batch", CASES)
def test_matches_released_layer(reference_op, dim, heads, window, height, width, batch, fused, mode):
    drops = dict(p_attn=0.0 if mode == "train_no_attn_drop" else 0.2, p_proj=0.1, p_path=0.5)
    module = IIWA(dim, window, heads, attn_drop=drops["p_attn"], proj_drop=drops["p_proj"],
                  drop_path=drops["p_path"], fused=fused).double()
    state = _random_state(module)
    x = torch.randn(batch, height, width, dim, dtype=F64)
    _check(module, state, x, heads, window, mode != "eval", drops)
    # The intra-window attention runs the op unless attention dropout is active; the inter-window one always.
    if fused:
        assert len(reference_op) == (1 if mode == "train" else 2)
        if mode != "train":
            assert reference_op[0]["window"] == window and reference_op[0]["shift"] == (0, 0)
        hg, wg = math.ceil(height / window[0]), math.ceil(width / window[1])
        assert reference_op[-1]["window"] == (hg, wg) and reference_op[-1]["bias_table"] is None
    else:
        assert len(reference_op) == 0


@pytest.mark.parametrize("fused", [False, True])
def test_mask_runs_released_maths(reference_op, fused):
    module = IIWA(16, (4, 4), 2, attn_drop=0.0, proj_drop=0.0, drop_path=0.0, fused=fused).double()
    state = _random_state(module)
    x = torch.randn(2, 6, 7, 16, dtype=F64)
    mask = torch.zeros(4, 16, 16, dtype=F64)  # 2x2 windows of the padded 8x8 map
    mask[3, :, 8:] = -100.0
    mask[1, 2:5, :3] = -100.0
    _check(module, state, x, 2, (4, 4), False, dict(p_attn=0.0, p_proj=0.0, p_path=0.0), mask=mask)
    assert len(reference_op) == (1 if fused else 0)  # only the inter-window attention: a mask is not the op's


def test_state_dict_names_are_the_released_ones():
    module = IIWA(32, (4, 8), 4)
    assert list(module.state_dict()) == RELEASED_KEYS
    assert torch.equal(module.relative_position_index, _released_index(4, 8))
    state = _random_state(module, seed=4)
    fresh = IIWA(32, (4, 8), 4)
    fresh.load_state_dict(state, strict=True)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())


def test_released_defaults():
    module = IIWA(64, 7, 8)
    assert module.window_size == (7, 7) and module.scale == 8 ** -0.5
    assert module.attn_drop.p == 0.1 and module.proj_drop.p == 0.1 and module.proj_drop2.p == 0.1
    assert module.mlp.drop.p == 0.1 and module.drop_path.drop_prob == 0.1
    assert module.mlp.fc1.out_features == 256
    table = module.relative_position_bias_table
    assert table.shape == (169, 8) and 0.01 < table.std().item() < 0.03  # truncated normal, std 0.02


@pytest.mark.parametrize("normalize", [True, False])
def test_position_embedding_sine_module(normalize):
    x = torch.randn(2, 12, 3, 5, dtype=F64)
    pos = PositionEmbeddingSine(normalize=normalize)(x)
    assert pos.shape == (2, 12, 3, 5) and pos.dtype == torch.float32
    expected = sine_position_encoding(3, 5, 12, normalize=normalize).permute(2, 0, 1)
    assert torch.equal(pos[0], expected) and torch.equal(pos[1], expected)
    if normalize:
        assert torch.equal(expected.permute(1, 2, 0), _released_pos(3, 5, 12))


@pytest.mark.parametrize("build,match", [
    (lambda: IIWA(18, 7, 3), "multiple of 4"),
    (lambda: IIWA(32, 7, 3), "divisible by num_heads"),
    (lambda: PositionEmbeddingSine(scale=1.0), "normalize"),
])
def test_bad_arguments(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_input():
    module = IIWA(16, 4, 2)
    with pytest.raises(ValueError, match=r"\[B, H, W, 16\]"):
        module(torch.randn(1, 16, 5, 5))
