"""Constructor argument checks shared by the fastctx modules: one clear message per kind of mistake.

A zero or negative size would otherwise surface later as a ZeroDivisionError
in an initialiser, an empty weight, or a kernel error at the first forward.
"""
from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from ..reference._args import is_int as _is_int

__all__ = ["check_dropout", "check_input_dtype", "check_pool_scales", "check_positive_int"]


def check_positive_int(value, name: str, who: str) -> int:
    """`value` as an int, or ValueError/TypeError naming `who`'s argument `name` and what it must be."""
    if not _is_int(value):
        raise TypeError(f"{who}: {name} must be a positive int, got {value!r}")
    if value < 1:
        raise ValueError(f"{who}: {name} must be a positive int, got {value}")
    return int(value)


def check_pool_scales(scales, who: str) -> tuple[int, ...]:
    """A non-empty list/tuple of positive int pool scales (mmseg's rule: an int alone is refused)."""
    if not isinstance(scales, Sequence) or isinstance(scales, str):
        raise TypeError(f"{who}: pool_scales must be a list or tuple of positive ints, e.g. (1, 2, 3, 6), "
                        f"got {scales!r}")
    if not scales:
        raise ValueError(f"{who}: pool_scales must name at least one scale, got {scales!r}")
    for s in scales:
        if not _is_int(s) or s < 1:
            raise ValueError(f"{who}: pool_scales must be positive ints, got {tuple(scales)!r}")
    return tuple(int(s) for s in scales)


def check_dropout(ratio, who: str) -> float:
    """A Dropout2d probability below 1; as in mmseg, a ratio <= 0 (its configs write -1) means no dropout."""
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real) or not ratio < 1:
        raise ValueError(f"{who}: dropout_ratio must be a number < 1 (<= 0: no dropout), got {ratio!r}")
    return float(ratio)


def check_input_dtype(x, module, who: str) -> None:
    """Features must be floating-point and, outside autocast, have the dtype of `module`'s parameters.

    PyTorch's convolutions (and so mmseg's heads) refuse mixed dtypes with
    "expected scalar type ..."; this says the same thing with what to do. An
    integer input gets the floating-point message (not "cast the module to int").
    """
    if not x.is_floating_point():
        raise TypeError(f"{who} expects a floating-point input, got {x.dtype}")
    param = next(module.parameters(), None)
    if param is None or x.dtype == param.dtype or torch.is_autocast_enabled(x.device.type):
        return
    raise TypeError(f"{who}: the features are {x.dtype} but the module's parameters are {param.dtype}; convert "
                    f"one to the other (module.to({x.dtype}) or x.to({param.dtype})), or run under "
                    "torch.autocast for mixed precision")
