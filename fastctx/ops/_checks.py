"""Input validation shared by every public op and module: one place, one wording.

Every check raises TypeError (wrong kind of value) or ValueError (wrong
value) with a message that names the argument, says what was expected and
what was given. The C++ and Triton backends keep only the checks that guard
memory safety; a user's mistake is caught here first.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..reference._args import is_int


def check_tensor(t, name: str, ndim: int | tuple[int, ...], shape_hint: str) -> None:
    """A floating-point tensor with one of the given numbers of dimensions."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {shape_hint}, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(f"{name} must be {shape_hint} ({' or '.join(map(str, dims))}-D), got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same(tensors: dict[str, torch.Tensor], same_dtype: bool = True) -> None:
    """All tensors on one device (and, unless `same_dtype` is False, with one dtype)."""
    (first_name, first), *rest = tensors.items()
    for name, t in rest:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: put all inputs on one device")
        if same_dtype and t.dtype != first.dtype:
            raise TypeError(f"{name} is {t.dtype} but {first_name} is {first.dtype}: all inputs must share one dtype "
                            "(mixed dtypes are accepted inside torch.autocast)")


def check_int(value, name: str, minimum: int = 1) -> int:
    """A Python/NumPy integer (not a bool, not a float that happens to be whole) >= minimum."""
    if not is_int(value):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_int_list(values, name: str, minimum: int = 1) -> list[int]:
    """A non-empty sequence of integers >= minimum (a tuple or list; a lone int is refused, not wrapped)."""
    if isinstance(values, (str, bytes, torch.Tensor)) or not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a non-empty list or tuple of integers >= {minimum}, "
                        f"got {values!r} ({type(values).__name__})")
    values = list(values)
    if not values:
        raise ValueError(f"{name} must be a non-empty list or tuple of integers >= {minimum}, got an empty one")
    return [check_int(v, f"{name}[{i}]", minimum) for i, v in enumerate(values)]


# A scale may exceed the map (its bins then repeat pixels, as adaptive_avg_pool2d's do) up to this many
# times the map's larger side, and always up to MIN_SCALE_BOUND (a head's usual scales on a tiny map);
# beyond that it is almost certainly a mistake, whose s*s bins per channel would take minutes and
# gigabytes to produce.
MAX_SCALE_PER_SIDE = 4
MIN_SCALE_BOUND = 64


def scale_bound(height: int, width: int) -> int:
    """The largest pool scale accepted for a height x width map."""
    return max(MAX_SCALE_PER_SIDE * max(height, width), MIN_SCALE_BOUND)


def check_pool_scales(scales, height: int, width: int, name: str = "scales") -> list[int]:
    """Pool scales for a map of height x width: integers in [1, scale_bound(H, W)]."""
    scales = check_int_list(scales, name)
    bound = scale_bound(height, width)
    for i, s in enumerate(scales):
        if s > bound:
            raise ValueError(f"{name}[{i}] = {s} is too large for a {height}x{width} map: a scale gives s*s bins "
                             f"per channel; use at most {bound} (max({MAX_SCALE_PER_SIDE} x the larger side, "
                             f"{MIN_SCALE_BOUND}))")
    return scales


def check_numel(shape, what: str, limit: int = 2**63 - 1) -> None:
    """The product of `shape` is representable (and below `limit`)."""
    total = 1
    for d in shape:
        total *= int(d)
    if total > limit:
        raise ValueError(f"{what} would have {total} elements (shape {tuple(int(d) for d in shape)}), "
                         f"more than the limit {limit}")


__all__ = ["MAX_SCALE_PER_SIDE", "MIN_SCALE_BOUND", "scale_bound", "check_int", "check_int_list", "check_numel", "check_pool_scales", "check_same",
           "check_tensor"]
