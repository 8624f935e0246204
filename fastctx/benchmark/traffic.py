"""Modelled memory traffic: bytes each provider reads and writes in one step.

The model: every operator that runs (an ATen op in eager PyTorch, one fastctx kernel call
in a fused op) reads each of its tensor inputs once from memory and writes each of its
results once. So eager code pays for every intermediate it materialises (written once,
read by each consumer), while a fused op pays for its kernel contract of docs/kernels.md
only: the forward reads x (and the small operands) and writes its output, the backward
reads the output gradient and what it recomputes from, and writes the input gradients.
Caches are ignored (a tensor read twice by two ops counts twice), and so are the fused
kernels' small per-tile partial sums (O(tiles * K * D), docs/kernels.md).

Counting rules, per operator call:
- views (``func.is_view``, ``_unsafe_view``) and allocations (``empty*``) move nothing;
- a tensor argument counts its footprint once per call (arguments repeated, e.g.
  ``mul(x, x)``, once): the elements its strides reach, so an ``expand``-ed operand
  counts its real size, not the broadcast one;
- written arguments (in-place ``self``, ``out=``, BatchNorm's running statistics) count
  as written; they count as read too unless the op only writes them (``copy_``,
  ``fill_``, ``zero_``, the random fills) or they are ``out=`` buffers;
- fresh results count as written.

The steps run on fake tensors (``FakeTensorMode``): no memory, no arithmetic, so realistic
shapes are modelled in milliseconds. ``torch.compile`` is not modelled: what Inductor fuses
is its own decision (its row shows no traffic).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

_aten = torch.ops.aten
# Ops that move no data although their schema returns a fresh tensor.
_NO_TRAFFIC = {
    _aten.empty, _aten.empty_like, _aten.empty_strided, _aten.new_empty, _aten.new_empty_strided,
    _aten._unsafe_view, _aten.lift_fresh, _aten.resize_, _aten.set_,
}
# In-place ops whose written argument's old contents are not read.
_WRITE_ONLY = {
    _aten.copy_, _aten.fill_, _aten.zero_, _aten.uniform_, _aten.normal_, _aten.bernoulli_, _aten.random_,
    _aten.exponential_,
}


def footprint_bytes(t: torch.Tensor) -> int:
    """Bytes of memory a read or write of `t` touches: broadcast (stride-0) dims count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if size == 0:
            return 0
        if stride != 0:
            n *= size
    return n * t.element_size()


def _key(t: torch.Tensor):
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()))


class TrafficCounter(TorchDispatchMode):
    """Counts bytes read and written by every operator dispatched while active.

    ``read`` and ``written`` are running totals; ``per_op`` sums bytes per operator name,
    for reading where a provider's traffic comes from.
    """

    def __init__(self) -> None:
        super().__init__()
        self.read = 0
        self.written = 0
        self.per_op: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self.read + self.written

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.is_view or func.overloadpacket in _NO_TRAFFIC or func.namespace == "prim":
            return out  # views, allocations, metadata queries (prim.device, ...)
        read, written = self._count(func, args, kwargs, out)
        self.read += read
        self.written += written
        name = str(func.overloadpacket)
        self.per_op[name] = self.per_op.get(name, 0) + read + written
        return out

    @staticmethod
    def _count(func, args, kwargs, out) -> tuple[int, int]:
        schema = func._schema
        write_only = func.overloadpacket in _WRITE_ONLY
        seen_read, seen_written = set(), set()
        read = written = 0
        values = {a.name: kwargs.get(a.name, args[i] if i < len(args) else None)
                  for i, a in enumerate(schema.arguments)}
        for arg in schema.arguments:
            tensors = [t for t in tree_flatten(values[arg.name])[0] if isinstance(t, torch.Tensor)]
            is_write = arg.alias_info is not None and arg.alias_info.is_write
            for t in tensors:
                key = _key(t)
                if is_write and key not in seen_written:
                    seen_written.add(key)
                    written += footprint_bytes(t)
                if (not is_write or not (write_only or arg.kwarg_only)) and key not in seen_read:
                    seen_read.add(key)
                    read += footprint_bytes(t)
        results = out if isinstance(out, (tuple, list)) else (out,)
        for ret, value in zip(schema.returns, results):
            if ret.alias_info is not None:  # returns a written argument, counted above
                continue
            for t in tree_flatten(value)[0]:
                if isinstance(t, torch.Tensor):
                    written += footprint_bytes(t)
        return read, written


def count_traffic(build: Callable[[], object], run: Callable[[object], object]) -> TrafficCounter:
    """Counter of `run(build())`, both on fake tensors (build's own allocations not counted)."""
    with FakeTensorMode():
        state = build()
        with TrafficCounter() as counter:
            run(state)
    return counter
