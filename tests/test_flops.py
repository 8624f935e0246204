"""FLOP formulas of the fastctx ops under torch.utils.flop_counter.FlopCounterMode.

The formulas count the fused kernels' products. The eager reference's matmuls are
counted by torch's own formulas, so the two must agree exactly, up to the products the
fused backward recomputes (docs/kernels.md): the logits of gla_context, the scores of
class_attention's query form and q k^T of window_attention.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastctx
from fastctx import ops, reference

F64 = torch.float64


def _leaf(*shape, scale=1.0):
    return (torch.randn(*shape, dtype=F64) * scale).requires_grad_()


def _flops(fn, leaves, backward: bool) -> tuple[int, dict[str, int]]:
    for t in leaves:
        t.grad = None
    with FlopCounterMode(display=False) as mode:
        out = fn()
        out = out[0] if isinstance(out, tuple) else out
        if backward:
            out.backward(torch.randn_like(out))
    return mode.get_total_flops(), {str(op): n for op, n in mode.get_flop_counts()["Global"].items()}


def _class_gather(mode):
    feats, probs = _leaf(2, 12, 6, 7), _leaf(3, 5, 6, 7, scale=3)[:2].detach().requires_grad_()
    return ([feats, probs], lambda f: f(feats, probs, mode), 0, "class_gather")


def _class_attention_query():
    query, keys, values = _leaf(2, 12, 6, 7), _leaf(2, 5, 12), _leaf(2, 5, 9)
    # the backward recomputes the scores: one [K x N] product over Cq
    return ([query, keys, values], lambda f: f(query, keys, values, None, 0.3), 2 * 2 * 5 * 42 * 12,
            "class_attention")


def _class_attention_logits():
    values, logits = _leaf(2, 5, 9), _leaf(2, 5, 6, 7, scale=3)
    return [values, logits], lambda f: f(None, None, values, logits, 0.3), 0, "class_attention"


def _window_attention(shift, padded_keys):
    # 9 x 10 tokens in 3 x 4 windows: padded to 9 x 12, 2 x 3 x 3 windows of 12 tokens
    qkv, table, pad = _leaf(2, 9, 10, 36), _leaf(5 * 7, 3), _leaf(36)
    leaves = [qkv, table] + ([pad] if padded_keys else [])
    recompute = 2 * (2 * 3 * 3) * 12 ** 2 * 12  # q k^T in every window and head: 2 windows L^2 heads d
    return (leaves, lambda f: f(qkv, 3, (3, 4), table, shift, None, pad if padded_keys else None), recompute,
            "window_attention")


def _gla_context():
    sizes = (1, 4, 9)  # 3 groups of 6 channels, 14 logits
    x, weight, bias, pooled = _leaf(2, 18, 5, 7), _leaf(14, 6), _leaf(2, 14), _leaf(2, 6, 14)
    recompute = 2 * 2 * 35 * 6 * 14  # the logits W x again: 2 B N C S_tot
    return [x, weight, bias, pooled], lambda f: f(x, weight, bias, pooled, sizes), recompute, "gla_context"


CASES = {
    "gla_context": _gla_context,
    "class_gather-ocr": lambda: _class_gather("ocr"),
    "class_gather-paper": lambda: _class_gather("paper"),
    "class_attention-query": _class_attention_query,
    "class_attention-logits": _class_attention_logits,
    "window_attention-padded-keys": lambda: _window_attention((0, 0), True),
    "window_attention-shifted": lambda: _window_attention((1, 2), False),
}


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
@pytest.mark.parametrize("case", list(CASES))
def test_flop_formulas_match_the_eager_products(case, backward):
    leaves, call, recompute, name = CASES[case]()
    fused_op, eager_op = getattr(ops, name), getattr(reference, name)
    with fastctx.use_backend("cpu"):
        fused_total, fused_by_op = _flops(lambda: call(fused_op), leaves, backward)
    eager_total, eager_by_op = _flops(lambda: call(eager_op), leaves, backward)
    # the fused call is counted as the custom ops themselves, not as matmuls inside them
    assert set(fused_by_op) == {f"fastctx.{name}"} | ({f"fastctx.{name}_backward"} if backward else set())
    assert eager_total > 0 and set(eager_by_op) <= {"aten.bmm", "aten.mm", "aten.convolution",
                                                     "aten.convolution_backward"}
    assert fused_total == eager_total + (recompute if backward else 0)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwdbwd"])
def test_encoding_flops_count_the_kernels_products(backward):
    # mmseg's eager Encoding broadcasts [B, N, K, D] residuals: no matmul for torch to count. The
    # oracles: the two-GEMM eager form (the same two products forward, four backward) and the hand
    # count of docs/kernels.md: backward, the logits again with dE X^T, grad_x's two products and
    # grad_codewords' dL^T X: the two-GEMM count plus the recomputed logits.
    x, codewords, scale = _leaf(2, 12, 5, 7), _leaf(4, 12), (-torch.rand(4, dtype=F64)).requires_grad_()
    unit = 2 * 2 * 35 * 4 * 12  # 2 B N K D
    with fastctx.use_backend("cpu"):
        total, by_op = _flops(lambda: ops.encoding(x, codewords, scale), [x, codewords, scale], backward)
    assert total == (7 if backward else 2) * unit
    assert set(by_op) == {"fastctx.encoding"} | ({"fastctx.encoding_backward"} if backward else set())
    assert _flops(lambda: reference.encoding(x, codewords, scale), [x, codewords, scale], backward)[0] == 0
    two_gemm = _flops(lambda: reference.encoding_two_gemm(x, codewords, scale), [x, codewords, scale], backward)[0]
    assert total == two_gemm + (unit if backward else 0)
