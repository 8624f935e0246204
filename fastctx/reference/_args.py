"""Integer argument checks shared by the references, the ops and the modules.

They run on every op call, so the common cases (an int, a tuple) are decided by
their exact type: `isinstance(x, numbers.Integral)` goes through ABCMeta's
Python-level __instancecheck__ and __subclasscheck__, up to a dozen Python calls
per value.
"""
from __future__ import annotations

import numbers


# Common arguments that are not integers, answered without the ABC check as well.
_NOT_INTEGRAL = frozenset((bool, float, str, tuple, list, type(None)))


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    kind = type(value)
    return kind is int or (kind not in _NOT_INTEGRAL and isinstance(value, numbers.Integral))


def int_pair(value, name: str, minimum: int) -> tuple[int, int]:
    """(a, b) from an int or a pair of ints, each >= minimum."""
    if is_int(value):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:  # not iterable (a float, a bool): the message below says what is wanted
            pair = ()
    if len(pair) != 2 or not (is_int(pair[0]) and is_int(pair[1])):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if pair[0] < minimum or pair[1] < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])
